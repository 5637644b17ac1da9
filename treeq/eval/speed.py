"""Generation and tokens/s: prefill and batch-1 greedy decode, timed with a KV cache."""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass

import torch

from .. import user_input
from ..errors import TreeqError
from ..fp_model import load_fp_model, model_path
from ..runtime.kv_choice import KVChoice, choose_kv
from ..schemes import KVCacheScheme
from ..storage.loading import load_quantized, read_quantization_config


@dataclass
class Speed:
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


def generate(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    kv: KVChoice | KVCacheScheme | str | None = None,
    kv_calib_text: str = "wiki-train",
) -> str:
    """Greedy at temperature 0, else sampling; returns only the new text. ``kv``: a KV-cache
    setting or preset name (``"kivi-4"``) to keep keys and values in; one that needs calibration
    (kvquant) is calibrated on ``kv_calib_text`` first. None: the scheme a loaded checkpoint
    stored, else transformers' cache; "none": transformers' cache."""
    user_input.loaded_model(model, "generate")
    user_input.loaded_tokenizer(tokenizer, "generate")
    if not isinstance(prompt, str):
        raise TreeqError(f"prompt must be a str, got {type(prompt).__name__}")
    user_input.whole_number(max_new_tokens, "max_new_tokens", 1)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise TreeqError(f"temperature={temperature!r} must be a number >= 0 (0: greedy)")
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    if ids.numel() == 0:
        raise TreeqError("the prompt is empty (no tokens to continue); give some text")
    user_input.tokens_fit(model, ids)
    cache = choose_kv(model, tokenizer, kv, kv_calib_text).cache(model)
    torch.manual_seed(seed)
    sample = temperature > 0
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            cache=cache,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _last_logits_only(model) -> dict:
    """The keyword that makes the prefill compute the last position's logits alone, as
    ``generate`` asks of models that take it: every position's logits are a vocabulary-wide product
    and a prompt x vocabulary output, a large part of a long prefill (bench/results/kernels.md) that
    generation never does."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _decode_once(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds for the prefill and for ``new_tokens`` greedy decode steps (no early stop)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    out = model(input_ids=ids, cache=cache, use_cache=True, **_last_logits_only(model))
    prefill = time.perf_counter() - start
    next_id = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=next_id, cache=cache, use_cache=True)
        next_id = out.logits[:, -1:].argmax(-1)
    return prefill, time.perf_counter() - start


def measure_speeds(models: dict, ids: torch.Tensor, new_tokens: int = 32, repeats: int = 5) -> dict[str, Speed]:
    """Median tokens/s per model over ``repeats`` rounds after a warm-up; ``ids`` is [1, prompt].

    The models take turns within each round, so load from other processes on a shared machine
    falls on all of them alike and the ratios stay meaningful.
    """
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            _decode_once(model, ids.to(next(model.parameters()).device), 2)
        for _ in range(repeats):
            for name, model in models.items():
                runs[name].append(_decode_once(model, ids.to(next(model.parameters()).device), new_tokens))
    return {
        name: Speed(
            ids.shape[1],
            new_tokens,
            ids.shape[1] / statistics.median(r[0] for r in rs),
            new_tokens / statistics.median(r[1] for r in rs),
        )
        for name, rs in runs.items()
    }


BENCH_PROMPT = (
    "The history of the printing press begins in the fifteenth century, when movable type made books "
    "cheaper to produce and spread literacy across Europe. Within a few decades"
)


def bench(
    path, fp_model: str | None = None, prompt: str = BENCH_PROMPT, new_tokens: int = 32, repeats: int = 5
) -> dict[str, Speed]:
    """Prefill and batch-1 decode tokens/s of a checkpoint and of its fp model, both in bf16 (the
    fp model from ``fp_model`` or the source recorded at quantization), measured in turns."""
    user_input.whole_number(new_tokens, "new_tokens", 1)
    user_input.whole_number(repeats, "repeats", 1)
    source = fp_model or read_quantization_config(user_input.local_path(path, "checkpoint"))["meta"].get("source")
    if source is None:
        raise TreeqError(f"{path} does not record its fp model; pass it explicitly (--fp MODEL)")
    try:
        model_path(source)  # before anything is loaded
    except TreeqError as e:
        if fp_model is not None:
            raise
        raise TreeqError(f"{path} names its fp model {source!r}: {e}; pass the fp model (--fp MODEL)") from None
    qmodel, tok = load_quantized(path, "cpu", torch.bfloat16)
    fp, _ = load_fp_model(source, dtype=torch.bfloat16)
    ids = tok(prompt, return_tensors="pt").input_ids
    return measure_speeds({"quantized": qmodel, "fp bf16": fp}, ids, new_tokens, repeats)
