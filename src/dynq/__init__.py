"""dynq: plan-first dynamic low-bit GGUF quantization. The public API (dynq/api.py) is this package's namespace:
`dynq.plan`, `dynq.quantize`, `dynq.evaluate` and the rest, with the types they take and return."""

from dynq.api import *  # noqa: F403
from dynq.api import __all__ as __all__
