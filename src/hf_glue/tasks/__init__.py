"""Task registry: each module registers one task family with ``@register_task``."""

from . import causal_lm, image_classification, text_classification  # noqa: F401  (registration)
from .base import Task, available_tasks, detect_task, get_task, register_task

__all__ = ["Task", "available_tasks", "detect_task", "get_task", "register_task"]
