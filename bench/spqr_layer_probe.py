"""A cheap proxy for bench/spqr_smollm2.py, not a perplexity: one SmolLM2-135M layer's linears
quantized from the same calibration inputs (16 x 512 wiki-train tokens through the fp model) with
each SpQR row of bench/spqr_smollm2.py and with GPTQ 4- and 3-bit g64 (asym, clip search: GPTQ's
default), printing per module the output loss E[(x (W - Q)^T)^2], and over the modules the outlier share and the bits
per weight their checkpoint format stores (codes, zero points, scales or their codes and statistics,
g_idx or act-order groups, outliers). About a minute per layer on one core.

    python bench/spqr_layer_probe.py --layers 10,25 >> bench/results/spqr_smollm2.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's treeq, not the installed one
import machine  # noqa: E402
from spqr_smollm2 import ROWS  # noqa: E402

MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
BASELINES = {
    "gptq-4bit-g64": dict(method="gptq", bits=4, group_size=64, sym=False),
    "gptq-3bit-g64": dict(method="gptq", bits=3, group_size=64, sym=False),
}


def stored_bits(cfg, result, linear) -> float:
    """Bits per weight of ``result`` as ``cfg``'s checkpoint format stores it."""
    from treeq.formats import FORMATS
    from treeq.runtime.quant_linear import QuantLinear
    from treeq.storage.checkpoint import linear_format

    kind = None if result.extras is None else result.extras.kind
    fmt = linear_format(cfg.weights, linear, result.reorders, False, None, kind)
    state = {f"m.{k}": v for k, v in QuantLinear.from_result(fmt, result, None).state_dict().items()}
    stored = FORMATS[cfg.weights.format].to_stored(state, cfg)
    return sum(t.numel() * t.element_size() * 8 for t in stored.values()) / linear.weight.numel()


@click.command()
@click.option("--layers", default="10,25", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True)
def main(layers, threads):
    import treeq
    from treeq.methods import make_method

    torch.set_num_threads(threads)
    model, tok = treeq.load_fp_model()
    ids = tok(treeq.data.read_text("wiki-train")[:200000], return_tensors="pt").input_ids[:, : 16 * 512]
    print(f"\n### Layer probe (`python bench/spqr_layer_probe.py --layers {layers}`), {machine.cpu()}")
    print("per-module output loss on 16 x 512 wiki-train tokens through the fp model; not a perplexity")
    print("path: the fp model's forwards in fp32; each module's loss from its fake-quant weight (no kernel runs)\n")
    print("| layer | row | " + " | ".join(m.rpartition(".")[2] for m in MODULES) + " | bits/weight | outliers |")
    print("| ---: | --- |" + " ---: |" * (len(MODULES) + 2))
    for index in [int(x) for x in layers.split(",")]:
        layer = model.model.layers[index]
        inputs: dict[str, list[torch.Tensor]] = {}
        hooks = [
            layer.get_submodule(m).register_forward_pre_hook(
                lambda _mod, args, m=m: inputs.setdefault(m, []).append(args[0].reshape(-1, args[0].shape[-1]))
            )
            for m in MODULES
        ]
        with torch.no_grad():
            model(ids.reshape(16, 512))
        for h in hooks:
            h.remove()
        weights = sum(layer.get_submodule(m).weight.numel() for m in MODULES)
        for row, settings in {**BASELINES, **ROWS}.items():
            cfg = treeq.QuantConfig(**settings)
            method = make_method(cfg)
            cells, bits, kept = [], [], []
            for m in MODULES:
                linear = layer.get_submodule(m)
                stats = method.stats(linear.in_features, torch.device("cpu"))
                stats.add(torch.cat(inputs[m]))
                result = method.quantize(linear.weight.data, stats)
                cells.append(f"{result.loss:.3e}")
                bits.append(stored_bits(cfg, result, linear) * linear.weight.numel())
                kept.append(0 if result.extras is None else result.extras.nnz)
            print(
                f"| {index} | {row} | " + " | ".join(cells) + f" | {sum(bits) / weights:.3f} "
                f"| {100 * sum(kept) / weights:.3f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
