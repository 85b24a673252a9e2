"""dynq: plan-first dynamic low-bit GGUF quantization."""

from importlib.metadata import PackageNotFoundError, version

from dynq.api import coverage, inspect, plan
from dynq.errors import DynqError

try:
    __version__ = version("dynq")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"

__all__ = ["DynqError", "__version__", "coverage", "inspect", "plan"]
