"""Merge-method registry: each module registers one method with ``@register_method``."""

from . import cma_es, data_size, full_gradient, glue, ngopt, proxy, uniform, weights  # noqa: F401  (registration)
from .base import (
    MergeContext,
    MergeMethod,
    MethodOutput,
    available_methods,
    check_method,
    get_method,
    initial_alpha,
    method_info,
    register_method,
)

__all__ = [
    "MergeContext",
    "MergeMethod",
    "MethodOutput",
    "available_methods",
    "check_method",
    "get_method",
    "initial_alpha",
    "method_info",
    "register_method",
]
