"""The W8A8 kernel (treeq/kernels/w8a8_vnni) against bf16 F.linear, side by side in one process.

Per layer shape and token count M, at 1 and 2 threads: bf16 ``F.linear`` and the int8 kernel
including the per-token quantization of its bf16 input (bf16 out, as a model would use it), the
median of calls taken in turns, and the ratio bf16 time / int8 time. Each side cycles through
copies of its weight totalling at least COLD_BYTES, so every call reads its weight from memory as
a model's decode step does (one 4096 x 4096 int8 weight alone would stay in a 32 MB L3 and look
twice as fast as it is). The header names the CPU and the path (kernel or why it declines).

Then the model rows (bench/model_speed.py): prefill (512 tokens) and batch-1 greedy decode
tokens/s of RTN W8A8 checkpoints (int8 per-channel weights, int8 per-token inputs) of SmolLM2-135M
and a random Llama 2048 x 16 layers against the same models in bf16, at each thread count.

Usage: python bench/w8a8_kernel.py [--threads 1,2] [--tokens 1,16,128,512,2048] [--skip-models]
"""

from __future__ import annotations

import itertools

import click
import torch
import torch.nn.functional as F
from model_speed import short_calibration, speed_table  # bench/: run as a script, bench/ is on sys.path
from timing import median_seconds

from treeq.kernels import cpu_isa
from treeq.kernels import w8a8_vnni as w8

SHAPES = ((4096, 4096), (576, 576), (576, 192), (576, 1536), (1536, 576))  # (in, out): SmolLM2-135M's
COLD_BYTES = 96 * 2**20  # three times a 32 MB L3


def _cycling(copies: list):
    """A function returning the next of ``copies`` at each call."""
    return itertools.cycle(copies).__next__


def shape_rows(k: int, n: int, tokens: list[int], threads: list[int]) -> None:
    w = torch.randn(n, k) * 0.02
    scale = w.abs().amax(dim=1) / 127
    w_int8 = torch.round(w / scale[:, None]).to(torch.int8)
    packed = w8.pack_weight(w_int8)
    dense = w.bfloat16()
    next_dense = _cycling([dense.clone() for _ in range(max(1, COLD_BYTES // (2 * n * k)))])
    copies = max(1, COLD_BYTES // packed.data.numel())
    next_packed = _cycling([w8.PackedWeight(packed.data.clone(), n, k) for _ in range(copies)])
    for t in threads:
        torch.set_num_threads(t)
        for m in tokens:
            x = torch.randn(m, k).bfloat16()

            def int8():
                codes, xs = w8.quantize_per_token(x)
                return w8.int8_linear(codes, xs, next_packed(), scale)

            repeats = 40 if m * n * k < 2**31 else 8
            bf16_s, int8_s = median_seconds([lambda: F.linear(x, next_dense()), int8], repeats)
            print(f"{k:>5}->{n:<5} {t:>7} {m:>5} {bf16_s * 1e3:>9.3f} {int8_s * 1e3:>9.3f} {bf16_s / int8_s:>6.2f}")


@click.command()
@click.option("--threads", default="1,2", help="comma-separated thread counts")
@click.option("--tokens", default="1,16,128,512,2048", help="comma-separated token counts M")
@click.option("--prompt-tokens", type=int, default=512, show_default=True, help="prefill length of the model rows")
@click.option("--new-tokens", type=int, default=32, show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True)
@click.option("--skip-models", is_flag=True, help="only the layer table")
def main(threads: str, tokens: str, prompt_tokens: int, new_tokens: int, repeats: int, skip_models: bool) -> None:
    print(cpu_isa.describe())
    why = w8.available()
    print(f"int8 path: {'w8a8_vnni (AVX512-VNNI)' if why is None else 'declined: ' + why}")
    if why is not None:
        return
    print("times in ms, median of calls taken in turns (40; 8 above 2^31 multiply-adds); ratio = bf16 / int8")
    print(f"{'shape':<11} {'threads':>7} {'M':>5} {'bf16':>9} {'int8':>9} {'ratio':>6}")
    thread_counts = [int(t) for t in threads.split(",")]
    for k, n in SHAPES:
        shape_rows(k, n, [int(m) for m in tokens.split(",")], thread_counts)
    if not skip_models:
        # W8A8 as SmoothQuant and LLM.int8() run it: int8 per-channel weights, int8 per-token inputs.
        w8a8 = short_calibration(method="rtn", bits=8, group_size=-1, activations=dict(bits=8, granularity="per-token"))
        configs = {"SmolLM2-135M": w8a8, "random Llama 2048x16": w8a8}
        speed_table(configs, {"w8a8": {}}, prompt_tokens, thread_counts, new_tokens, repeats)


if __name__ == "__main__":
    main()
