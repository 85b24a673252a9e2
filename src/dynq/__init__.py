"""dynq: plan-first dynamic low-bit GGUF quantization. The public API is `dynq.api`, re-exported here."""

from dynq.api import (
    EvalResult,
    FileSummary,
    Hardware,
    Imatrix,
    OffloadPlan,
    QuantizeResult,
    QuantPlan,
    RunContext,
    Settings,
    Text,
    build_tools,
    calibration,
    collect_imatrix,
    coverage,
    evaluate,
    evaluation,
    fetch,
    inspect,
    offload,
    open_source,
    plan,
    quantize,
)
from dynq.core.context import Progress
from dynq.core.source import TensorSource
from dynq.errors import DynqError
from dynq.recipe.rules import Recipe
from dynq.version import __version__

__all__ = [
    "DynqError",
    "EvalResult",
    "FileSummary",
    "Hardware",
    "Imatrix",
    "OffloadPlan",
    "Progress",
    "QuantPlan",
    "QuantizeResult",
    "Recipe",
    "RunContext",
    "Settings",
    "TensorSource",
    "Text",
    "__version__",
    "build_tools",
    "calibration",
    "collect_imatrix",
    "coverage",
    "evaluate",
    "evaluation",
    "fetch",
    "inspect",
    "offload",
    "open_source",
    "plan",
    "quantize",
]
