"""treeq: post-training quantization of Hugging Face causal LMs, driven by declarative tree specs."""

from .engine.memory import one_heap, request_huge_pages
from .reproducible import request_reproducible_blas
from .version import __version__

request_reproducible_blas()  # before anything calls MKL
request_huge_pages()  # before torch's first allocation
one_heap()  # before threads that allocate come and go

from .api import (  # noqa: E402
    activation_stats,
    bench,
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
from .eval.compare import compare  # noqa: E402
from .models import register_spec  # noqa: E402

__all__ = [
    "QuantConfig",
    "TreeqError",
    "__version__",
    "activation_stats",
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
    "register_spec",
]
