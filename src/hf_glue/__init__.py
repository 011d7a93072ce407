"""hf-glue: merge fine-tuned experts into one model for a new domain, with α learned by gradient-free SPSA."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hf-glue")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

from .api import GlueCallback, merge_experts
from .config import CompareConfig, DataConfig, ExpertsConfig, FinetuneConfig, GlueConfig, OutputConfig
from .errors import GlueError
from .result import MergeResult

__all__ = [
    "CompareConfig",
    "DataConfig",
    "ExpertsConfig",
    "FinetuneConfig",
    "GlueCallback",
    "GlueConfig",
    "GlueError",
    "MergeResult",
    "OutputConfig",
    "__version__",
    "merge_experts",
]
