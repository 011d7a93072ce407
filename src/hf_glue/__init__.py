"""hf-glue: merge fine-tuned experts into one model for a new domain, with α learned by gradient-free SPSA.

Public names are imported on first use, so ``hf-glue --help`` and the streaming ``blend`` path do not pay for
torch or the transformers Trainer stack before they need them.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("hf-glue")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

_EXPORTS = {
    "merge_experts": ".api",
    "GlueCallback": ".api",
    "BlendConfig": ".config",
    "CompareConfig": ".config",
    "DataConfig": ".config",
    "EstimateConfig": ".config",
    "ExpertsConfig": ".config",
    "FinetuneConfig": ".config",
    "GlueConfig": ".config",
    "OutputConfig": ".config",
    "PushConfig": ".config",
    "TrackingConfig": ".config",
    "GlueError": ".errors",
    "MergeResult": ".report.result",
    "estimate_merge": ".plan",
}

__all__ = [
    "BlendConfig",
    "CompareConfig",
    "DataConfig",
    "EstimateConfig",
    "ExpertsConfig",
    "FinetuneConfig",
    "GlueCallback",
    "GlueConfig",
    "GlueError",
    "MergeResult",
    "OutputConfig",
    "PushConfig",
    "TrackingConfig",
    "__version__",
    "estimate_merge",
    "merge_experts",
]

if TYPE_CHECKING:
    from .api import GlueCallback, merge_experts
    from .config import (
        BlendConfig,
        CompareConfig,
        DataConfig,
        ExpertsConfig,
        FinetuneConfig,
        GlueConfig,
        OutputConfig,
        PushConfig,
        TrackingConfig,
    )
    from .errors import GlueError
    from .report.result import MergeResult


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'hf_glue' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
