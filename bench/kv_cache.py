"""KV-cache memory and decode speed: KIVI-2 and KIVI-4 against the 16-bit cache.

1. Bytes: each model's cache holding L tokens (1k, 4k, 16k), counted from the cache's own tensors
   (packed codes, fp16 scales and minima, the full-precision window of the newest 128-159 tokens)
   against transformers' DynamicCache holding the same tokens in bf16 (an fp16 cache's bytes).
2. Decode: batch-1 greedy decode tokens/s once the cache holds L tokens, with each cache, models in
   bf16. The caches are filled with random states of the model's shapes instead of a prefill: a
   decode step's time depends on how many tokens are cached, not on their values, and a 16k-token
   prefill of the 2048-wide Llama would take minutes per cache on 2 cores. The caches take turns
   each round, so load from other jobs falls on all alike; the median round is reported.

Models: SmolLM2-135M (30 layers, 3 kv heads x 64) and a random Llama, hidden 2048 x 16 layers (16
heads, 4 kv heads x 128). The quantized cache decodes every stored block at every step in plain
PyTorch (no fused kernel), so its decode cost grows with the cached length.

Usage: python bench/kv_cache.py [--lengths 1024,4096,16384] [--llama-lengths ...] [--llama-speed-lengths ...]
       [--steps 4] [--rounds 3] (treeq importable: installed, or PYTHONPATH=.)
"""

from __future__ import annotations

import statistics
import time

import click
import torch
from machine import kv_path  # bench/: run as a script, bench/ is on sys.path
from transformers import DynamicCache
from workloads import random_llama

import treeq
from treeq.kernels.cpu_isa import describe
from treeq.models import spec_for
from treeq.runtime.kv_cache import attention_shape
from treeq.runtime.kv_schemes import cache_nbytes, kv_cache_for

SETTINGS = ("kivi-4", "kivi-2")


def make_cache(model, setting: str):
    return DynamicCache(config=model.config) if setting == "bf16" else kv_cache_for(model, setting)


def filled(model, setting: str, tokens: int):
    """A cache of ``setting`` holding ``tokens`` random bf16 states per layer, stored as it stores them."""
    cache = make_cache(model, setting)
    shape = attention_shape(model.config, spec_for(model.config))
    g = torch.Generator().manual_seed(0)
    for layer in range(model.config.num_hidden_layers):
        k, v = (torch.randn(1, shape.num_kv_heads, tokens, shape.head_dim, generator=g) for _ in range(2))
        cache.update(k.to(torch.bfloat16), v.to(torch.bfloat16), layer)
    return cache


def dynamic_nbytes(cache: DynamicCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def bytes_table(models: dict, lengths: dict[str, list[int]]) -> None:
    print("\n| model | tokens | bf16 cache MiB | " + " | ".join(f"{s} MiB (x bf16)" for s in SETTINGS) + " |")
    print("|---|---|---|" + "---|" * len(SETTINGS))
    first = next(iter(models.values()))
    paths = [f"{s}: {kv_path(filled(first, s, 1))}" for s in SETTINGS]
    for name, model in models.items():
        for tokens in lengths[name]:
            fp = dynamic_nbytes(filled(model, "bf16", tokens))
            cells = []
            for s in SETTINGS:
                q = cache_nbytes(filled(model, s, tokens))
                cells.append(f"{q / 2**20:.2f} ({q / fp:.3f}x)")
            print(f"| {name} | {tokens} | {fp / 2**20:.2f} | " + " | ".join(cells) + " |", flush=True)
    print("\n".join(paths))


def seconds_per_step(model, cache, steps: int) -> float:
    next_id = torch.zeros(1, 1, dtype=torch.long)
    model(input_ids=next_id, cache=cache, use_cache=True)  # warm-up: first call allocates
    start = time.perf_counter()
    for _ in range(steps):
        next_id = model(input_ids=next_id, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps


def speed_table(models: dict, lengths: dict[str, list[int]], steps: int, rounds: int) -> None:
    kinds = ("bf16", *SETTINGS)
    print(f"\ndecode tokens/s, {steps} greedy steps after the cache holds the tokens, median of {rounds} rounds")
    print("\n| model | cached tokens | " + " | ".join(f"{k} tok/s" for k in kinds) + " |")
    print("|---|---|" + "---|" * len(kinds))
    with torch.no_grad():
        for name, model in models.items():
            for tokens in lengths[name]:
                caches = {k: filled(model, k, tokens) for k in kinds}
                times: dict[str, list[float]] = {k: [] for k in kinds}
                for _ in range(rounds):
                    for k in kinds:
                        times[k].append(seconds_per_step(model, caches[k], steps))
                speed = {k: 1 / statistics.median(t) for k, t in times.items()}
                cells = [
                    f"{speed[k]:.2f}" + ("" if k == "bf16" else f" ({speed[k] / speed['bf16']:.2f}x)") for k in kinds
                ]
                print(f"| {name} | {tokens} | " + " | ".join(cells) + " |", flush=True)


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",")]


@click.command()
@click.option("--lengths", default="1024,4096,16384", show_default=True, help="cached tokens, SmolLM2")
@click.option("--llama-lengths", default="1024,4096,16384", show_default=True, help="cached tokens, random Llama")
@click.option(
    "--llama-speed-lengths",
    default="1024,4096",
    show_default=True,
    help="cached tokens of the random Llama's decode rows (16k: minutes per step on a loaded 2-core machine)",
)
@click.option("--steps", type=click.IntRange(1), default=4, show_default=True)
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True)
@click.option("--skip-speed", is_flag=True)
def main(lengths, llama_lengths, llama_speed_lengths, steps, rounds, threads, skip_speed):
    torch.set_num_threads(threads)
    print(describe())
    print(f"threads={threads}, torch {torch.__version__}")
    models = {
        "SmolLM2-135M": treeq.load_fp_model(dtype=torch.bfloat16)[0],
        "random Llama 2048x16": random_llama(49152, torch.bfloat16, 32768),
    }
    per_model = {"SmolLM2-135M": _ints(lengths), "random Llama 2048x16": _ints(llama_lengths)}
    bytes_table(models, per_model)
    if not skip_speed:
        speed_table(models, {**per_model, "random Llama 2048x16": _ints(llama_speed_lengths)}, steps, rounds)


if __name__ == "__main__":
    main()
