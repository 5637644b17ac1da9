"""treeq: post-training quantization of Hugging Face causal LMs, driven by declarative tree specs."""

__version__ = "0.1.0"

from .reproducible import request_reproducible_blas

request_reproducible_blas()  # before anything calls MKL

from .api import (  # noqa: E402
    bench,
    compare,
    error_report,
    evaluate_perplexity,
    evaluate_tasks,
    generate,
    inspect_checkpoint,
    load,
    load_fp_model,
    quantize,
)
from .config import QuantConfig  # noqa: E402
from .errors import TreeqError  # noqa: E402

__all__ = [
    "QuantConfig",
    "TreeqError",
    "__version__",
    "bench",
    "compare",
    "error_report",
    "generate",
    "evaluate_perplexity",
    "evaluate_tasks",
    "inspect_checkpoint",
    "load",
    "load_fp_model",
    "quantize",
]
