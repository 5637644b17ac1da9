"""The Python API, one function per CLI command; each lives with its part and is gathered here."""

from __future__ import annotations

import torch

from .engine.pipeline import QuantizeReport, check_run, for_model, quantize
from .eval.activation_stats import activation_stats, save_stats
from .eval.perplexity import evaluate_perplexity, kv_protocol_for
from .eval.report import ErrorReport, error_report
from .eval.speed import BENCH_PROMPT, bench, generate
from .eval.tasks import TASKS, run_tasks
from .fp_model import load_fp_model, model_path
from .runtime.kv_choice import choose_kv
from .storage.inspect import CheckpointInfo, inspect_checkpoint
from .storage.loading import is_quantized_checkpoint, load_quantized
from .user_input import resolve_device


def load(path, device: str | None = None, dtype: torch.dtype = torch.float32, kernel: str | None = None):
    """Load a treeq checkpoint: returns (model, tokenizer)."""
    return load_quantized(path, str(resolve_device(device)), dtype, kernel)


evaluate_tasks = run_tasks

__all__ = [
    "BENCH_PROMPT",
    "TASKS",
    "activation_stats",
    "CheckpointInfo",
    "ErrorReport",
    "QuantizeReport",
    "bench",
    "check_run",
    "choose_kv",
    "error_report",
    "evaluate_perplexity",
    "evaluate_tasks",
    "for_model",
    "generate",
    "inspect_checkpoint",
    "is_quantized_checkpoint",
    "kv_protocol_for",
    "load",
    "load_fp_model",
    "model_path",
    "quantize",
    "resolve_device",
    "save_stats",
]
