"""Weight-activation rows on the built-in SmolLM2-135M: each setting quantized, its perplexity in
its loaded checkpoint (after save -> treeq.load; the logits of the model left in memory by
quantizing are compared with the loaded one's), quantization time, and for LLM.int8() each module's
share of full-precision input columns. One JSON line per row is appended to ``--out`` as soon as
the row is done, so a long run keeps what it finished; ``--table`` prints the markdown table.

    python bench/weight_activation_smollm2.py --rows rtn-w8a8,sq0.5-w8a8 --out /tmp/wa.jsonl
    python bench/weight_activation_smollm2.py --table /tmp/wa.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).parent))
import machine  # noqa: E402
from quantized_row import fp_ppl, quantized_row, run_rows  # noqa: E402

W8 = dict(bits=8, group_size=-1)
W6 = dict(bits=6, group_size=-1)
A8 = dict(bits=8, granularity="per-token")
A6 = dict(bits=6)
SQ = dict(method="rtn", migration="smoothquant")
ATTENTION_8BIT = dict(pattern=r".*self_attn\.", bits=8)
ROWS = {
    "rtn-w8a16": dict(method="rtn", **W8),
    "rtn-w8a8": dict(method="rtn", **W8, activations=A8),
    "sq0.5-w8a8": dict(SQ, alpha=0.5, **W8, activations=A8),
    "sq0.8-w8a8": dict(SQ, alpha=0.8, **W8, activations=A8),
    "sq0.8-w8a8-static": dict(SQ, alpha=0.8, **W8, activations=dict(bits=8, granularity="per-tensor", dynamic=False)),
    "sq-search-w8a8": dict(SQ, search=True, **W8, activations=A8),
    "sq0.8-gptq-w8a8": dict(SQ, method="gptq", alpha=0.8, **W8, activations=A8),
    "rtn-w6a6": dict(method="rtn", **W6, activations=A6),
    "sq0.5-w6a6": dict(SQ, alpha=0.5, **W6, activations=A6),
    "sq0.8-w6a6": dict(SQ, alpha=0.8, **W6, activations=A6),
    "sq-search-w6a6": dict(SQ, search=True, **W6, activations=A6),
    "llm.int8": dict(method="rtn", **W8, activations=dict(A8, outlier_threshold=6.0)),
    # ZeroQuant: group-wise weights, per-token dynamic inputs, attention 8-bit and MLP 4-bit by
    # override, and layer-wise knowledge distillation (learned scales too), towards the fp model's
    # own layer outputs (the default teacher) or the fp layer's on the quantized model's inputs.
    "zq-w8a8": dict(method="rtn", bits=8, group_size=64, activations=A8),
    "zq-w4/8-a16": dict(method="rtn", bits=4, group_size=64, overrides=[ATTENTION_8BIT]),
    "zq-w4/8-a16-lkd": dict(
        method="rtn",
        bits=4,
        group_size=64,
        overrides=[ATTENTION_8BIT],
        distill=dict(steps=25, train_scales=True),
    ),
    "zq-w4/8-a16-lkd-fp-layer": dict(
        method="rtn",
        bits=4,
        group_size=64,
        overrides=[ATTENTION_8BIT],
        distill=dict(steps=25, train_scales=True, teacher="fp-layer"),
    ),
    "gptq-w4a8": dict(method="gptq", bits=4, group_size=64, activations=A8),
    "gptq-w4a4": dict(method="gptq", bits=4, group_size=64, activations=dict(bits=4)),
}


def outlier_shares(model) -> dict[str, float]:
    from treeq.runtime.quant_linear import QuantLinear

    return {
        name: m.input_quantizer.outlier_share
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
        and getattr(m.input_quantizer, "scheme", None) is not None
        and m.input_quantizer.scheme.outlier_threshold is not None
    }


def run_row(name: str, calib_samples: int, seqlen: int, windows: int) -> dict:
    import treeq

    if name == "fp":
        return dict(row="fp", ppl=fp_ppl(windows))
    cfg = treeq.QuantConfig(**ROWS[name], calib_samples=calib_samples, seqlen=seqlen)
    with quantized_row(cfg, windows) as row:
        shares = outlier_shares(row.loaded)
        return dict(
            row=name,
            settings=ROWS[name],
            **row.fields(),
            kernels=machine.kernels(row.loaded),
            mean_outlier_share=_mean(shares),
            outlier_shares=shares,
            distillation=[line for line in row.report.log.lines if " LKD: " in line],
        )


def _mean(values: dict[str, float]) -> float | None:
    return sum(values.values()) / len(values) if values else None


def table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    fp = next((r["ppl"] for r in rows if r["row"] == "fp"), None)
    columns = ["row", "quantize s", "ppl (loaded)", "+% vs fp", "logit diff, memory vs loaded", "fp inputs", "kernels"]
    print("| " + " | ".join(columns) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r["row"] == "fp":
            print(f"| fp | | {r['ppl']:.3f} | | | | |")
            continue
        inc = f"{100 * (r['ppl'] / fp - 1):+.2f}%" if fp else ""
        share = "" if r["mean_outlier_share"] is None else f"{100 * r['mean_outlier_share']:.2f}% (mean)"
        print(
            f"| {r['row']} | {r['quantize_s']:.0f} | {r['ppl']:.3f} | {inc} | {r['reload_max_logit_diff']:.2e} "
            f"| {share} | {r['kernels']} |"
        )


@click.command()
@click.option("--rows", default="fp," + ",".join(ROWS), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("wa-rows.jsonl"))
@click.option("--calib-samples", type=int, default=128, show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--windows", type=int, default=32, show_default=True, help="wiki-test windows of 1024 tokens")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--table", "table_of", type=click.Path(path_type=Path), default=None)
def main(rows, out, calib_samples, seqlen, windows, threads, table_of):
    if table_of is not None:
        table(table_of)
        return
    run_rows(
        rows.split(","),
        lambda name: run_row(name, calib_samples, seqlen, windows),
        out,
        threads,
        f"calibration {calib_samples}x{seqlen} wiki-train, eval {windows}x1024 wiki-test",
        cpu=machine.cpu(),
        calibration=f"{calib_samples}x{seqlen}",
        windows=windows,
    )


if __name__ == "__main__":
    main()
