"""Model-level speed for the kernel benches: a quantized checkpoint of each workload, loaded in
bf16 with each kernel variant, against the same architecture in bf16, prefill and batch-1 greedy
decode tokens/s measured in turns (treeq.eval.speed.measure_speeds)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from workloads import random_llama  # bench/workloads.py: run as a script, bench/ is on sys.path

import treeq
from treeq.config import QuantConfig
from treeq.engine.quant_log import QuantLog
from treeq.eval.speed import measure_speeds


def workloads(tokenizer) -> dict:
    """name -> loader of the model in a dtype: the built-in model, and a random Llama where the
    weights dominate the time."""
    return {
        "SmolLM2-135M": lambda dtype: treeq.load_fp_model(dtype=dtype)[0],
        "random Llama 2048x16": lambda dtype: random_llama(len(tokenizer), dtype, 4096),
    }


def prompt_ids(tokenizer, tokens: int | None) -> torch.Tensor:
    """The bench prompt, or ``tokens`` tokens of it repeated (prefill speed does not depend on the
    words)."""
    ids = tokenizer(treeq.api.BENCH_PROMPT, return_tensors="pt").input_ids
    if tokens is None:
        return ids
    return ids.repeat(1, -(-tokens // ids.shape[1]))[:, :tokens]


def speed_table(
    configs: dict[str, QuantConfig],
    variants: dict[str, dict],
    prompt_tokens: int | None | list[int | None],
    threads: list[int],
    new_tokens: int,
    repeats: int,
) -> None:
    """For each workload named in ``configs`` (its quantization settings), quantize, load the
    checkpoint once per ``variants`` entry (keyword arguments of treeq.load, e.g. a forced kernel)
    and time them with the bf16 model at each thread count and prompt length (``prompt_tokens``:
    one or a list; None: the bench prompt)."""
    tok = treeq.load_fp_model()[1]
    lengths = prompt_tokens if isinstance(prompt_tokens, list) else [prompt_tokens]
    prompts = [prompt_ids(tok, n) for n in lengths]
    shown = ", ".join(str(ids.shape[1]) for ids in prompts)
    print(f"\nmodel speed: prompt {shown} tokens, {new_tokens} greedy steps, median of {repeats}")
    speeds = f"{'prefill tok/s':>14} {'vs bf16':>8} {'decode tok/s':>13} {'vs bf16':>8}"
    print(f"{'model':<40} {'threads':>7} {'prompt':>6} {speeds}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, load in workloads(tok).items():
            if name not in configs:
                continue
            out = Path(tmp) / name.split()[0]
            model = load(torch.float32)
            treeq.quantize(
                model, configs[name], out, tokenizer=tok, calib_text="news", log=QuantLog(echo=lambda _: None)
            )
            del model
            bf16 = {"device": "cpu", "dtype": torch.bfloat16}
            models = {kind: treeq.load(out, **bf16, **kw)[0] for kind, kw in variants.items()}
            models["bf16"] = load(torch.bfloat16)
            for t, ids in ((t, ids) for t in threads for ids in prompts):
                torch.set_num_threads(t)
                speeds = measure_speeds(models, ids, new_tokens, repeats)
                base = speeds["bf16"]
                for kind, sp in speeds.items():
                    print(
                        f"{name + ' ' + kind:<40} {t:>7} {ids.shape[1]:>6} {sp.prefill_tokens_per_s:>14.1f} "
                        f"{sp.prefill_tokens_per_s / base.prefill_tokens_per_s:>7.2f}x {sp.decode_tokens_per_s:>13.2f} "
                        f"{sp.decode_tokens_per_s / base.decode_tokens_per_s:>7.2f}x",
                        flush=True,
                    )
            del models


def short_calibration(**settings) -> QuantConfig:
    """Settings for a speed checkpoint: data-free methods need no more than two short sequences."""
    return QuantConfig(**settings, calib_samples=2, seqlen=32)
