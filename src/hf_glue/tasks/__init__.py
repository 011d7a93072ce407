"""Task registry: each module registers one task family with ``@register_task``."""

from . import (  # noqa: F401  (registration)
    audio_classification,
    causal_lm,
    ctc,
    image_classification,
    seq2seq,
    text_classification,
    token_classification,
)
from .base import Task, available_tasks, detect_task, get_task, register_task

__all__ = ["Task", "available_tasks", "detect_task", "get_task", "register_task"]
