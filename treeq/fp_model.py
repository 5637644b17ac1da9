"""The full-precision model a run starts from: a local directory or the built-in default."""

from __future__ import annotations

from pathlib import Path

import torch

from . import user_input
from .default_model import DEFAULT_MODEL, default_model_path
from .errors import TreeqError


def model_path(model: str | None) -> Path:
    if model in (None, DEFAULT_MODEL):
        return default_model_path()
    path = user_input.local_path(model, "model")
    if not (path / "config.json").is_file():
        raise TreeqError(
            f"model {model!r} is not a local model directory with config.json; treeq never downloads, "
            f"so give a saved Hugging Face model directory (or omit MODEL for the built-in {DEFAULT_MODEL})"
        )
    qcfg = user_input.quantization_config(path)
    if qcfg is not None:
        source = (qcfg.get("meta") or {}).get("source")
        made_from = f", recorded there as {source!r}" if source else ""
        raise TreeqError(
            f"{path} is a quantized checkpoint (its config.json has a quantization_config), not a full-precision "
            f"model; give the model it was made from{made_from}"
        )
    return path


def load_fp_model(model: str | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in full precision from a local directory, or the built-in default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(model)
    user_input.float_dtype(dtype)
    # Read, not memory-mapped: pages of a mapped checkpoint stay resident after the looper replaces
    # the weights they hold, which on SmolLM2 added 400 MB of peak RSS by the last layer.
    user_input.tokenizer_dir(path)
    user_input.model_weights_dir(path)
    try:
        fp = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, disable_mmap=True).eval()
    except user_input.READ_ERRORS as e:
        raise user_input.unreadable_weights(path, e) from None
    return fp, AutoTokenizer.from_pretrained(path)
