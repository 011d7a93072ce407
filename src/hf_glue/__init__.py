"""hf-glue: merge fine-tuned experts into one model for a new domain, with α learned by gradient-free SPSA."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hf-glue")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

from .api import merge_experts
from .config import DataConfig, ExpertsConfig, GlueConfig, OutputConfig
from .errors import GlueError
from .result import MergeResult

__all__ = [
    "DataConfig",
    "ExpertsConfig",
    "GlueConfig",
    "GlueError",
    "MergeResult",
    "OutputConfig",
    "__version__",
    "merge_experts",
]
