"""treeq: post-training quantization of Hugging Face causal LMs, driven by declarative tree specs."""

__version__ = "0.1.0"

from .api import bench, evaluate_perplexity, generate, inspect_checkpoint, load, load_fp_model, quantize  # noqa: E402
from .config import QuantConfig  # noqa: E402
from .errors import TreeqError  # noqa: E402

__all__ = [
    "QuantConfig",
    "TreeqError",
    "__version__",
    "bench",
    "generate",
    "evaluate_perplexity",
    "inspect_checkpoint",
    "load",
    "load_fp_model",
    "quantize",
]
