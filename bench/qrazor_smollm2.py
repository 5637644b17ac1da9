"""QRazor (significant-data razoring) on the built-in SmolLM2-135M, beside RTN 4-bit asym g64 in
the same process: each row quantized with treeq's default calibration, written in its checkpoint
format, loaded back; perplexity of the loaded checkpoint, the largest logit difference between
the model left in memory and the loaded one (512 wiki-test tokens), and for the rows named in
``--memory-ppl`` the in-memory model's perplexity too (they must agree within 0.1%); bits per
weight counted from the stored tensors (treeq inspect's count, over all quantized linears),
quantization time and the kernels the loaded model ran. One JSON line per row is appended to
``--out`` when the row is done; ``--table`` prints the markdown table.

    flock /tmp/treeq-heavy.lock python bench/qrazor_smollm2.py --rows rtn-asym-g64,qrazor-g8 --out q.jsonl
    python bench/qrazor_smollm2.py --table q.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's treeq, not the installed one
import machine  # noqa: E402
from quantized_row import fp_ppl, quantized_row, run_rows  # noqa: E402

QRAZOR = dict(bits=4, grid="qrazor", format="qrazor")
# Round-to-nearest weights and dynamic activations use no calibration data: RTN rows calibrate on 4
# samples (their mean loss is over those), GPTQ rows on treeq's default 128 x 512.
RTN = dict(method="rtn", calib_samples=4)
# QRazor's activations: each token to 16 bits, razored per group of 8 input channels
RAZORED_INPUTS = dict(granularity="per-group", group_size=8, grid="qrazor")
ROWS = {
    "rtn-asym-g64": dict(**RTN, bits=4, group_size=64, sym=False),
    "qrazor-g8": dict(**RTN, group_size=8, **QRAZOR),
    "qrazor-g16": dict(**RTN, group_size=16, **QRAZOR),
    "qrazor-g32": dict(**RTN, group_size=32, **QRAZOR),
    "qrazor-g8+clip": dict(**RTN, group_size=8, clip_search=True, **QRAZOR),
    "gptq-qrazor-g8": dict(method="gptq", group_size=8, **QRAZOR),
    "gptq-qrazor-g8-noclip": dict(method="gptq", group_size=8, clip_search=False, **QRAZOR),
    "gptq-qrazor-g16": dict(method="gptq", group_size=16, **QRAZOR),
    "qrazor-w4a8-g8": dict(**RTN, group_size=8, **QRAZOR, activations=dict(bits=8, **RAZORED_INPUTS)),
    "qrazor-w4a4-g8": dict(**RTN, group_size=8, **QRAZOR, activations=dict(bits=4, **RAZORED_INPUTS)),
    "gptq-qrazor-w4a4-g8": dict(method="gptq", group_size=8, **QRAZOR, activations=dict(bits=4, **RAZORED_INPUTS)),
}


def bits_per_weight(path: Path) -> float:
    """Stored bits of every quantized linear over its weight count, all linears together."""
    from treeq.storage.inspect import inspect_checkpoint

    info = inspect_checkpoint(path)
    weights = {n: f.in_features * f.out_features for n, f in info.formats.items()}
    return sum(info.bits_per_weight[n] * w for n, w in weights.items()) / sum(weights.values())


def run_row(name: str, windows: int, memory_ppl: bool) -> dict:
    import treeq

    if name == "fp":
        return dict(row="fp", ppl=fp_ppl(windows))
    cfg = treeq.QuantConfig(**ROWS[name])
    with quantized_row(cfg, windows, memory_ppl) as row:
        return dict(
            row=name,
            settings=ROWS[name],
            calibration=f"{cfg.calibration.calib_samples}x{cfg.calibration.seqlen}",
            **row.fields(),
            bits_per_weight=bits_per_weight(row.out),
            kernels=machine.kernels(row.loaded),
        )


def table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    fp = next((r["ppl"] for r in rows if r["row"] == "fp"), None)
    base = next((r["ppl"] for r in rows if r["row"] == "rtn-asym-g64"), None)
    print(
        "| row | bits/weight | ppl (loaded) | +% vs fp | vs RTN asym g64 | logit diff, memory vs loaded "
        "| ppl loaded / memory - 1 | mean loss | quantize s | kernels |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        if r["row"] == "fp":
            print(f"| fp | 16 | {r['ppl']:.3f} | | | | | | | |")
            continue
        inc = f"{100 * (r['ppl'] / fp - 1):+.2f}%" if fp else ""
        vs = f"{r['ppl'] / base:.3f}x" if base else ""
        memory = r.get("ppl_memory")
        same = "" if memory is None else f"{r['ppl'] / memory - 1:+.1e}"
        print(
            f"| {r['row']} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | {inc} | {vs} "
            f"| {r.get('reload_max_logit_diff', float('nan')):.1e} | {same} | {r['mean_loss']:.4g} "
            f"| {r['quantize_s']:.0f} | {r['kernels']} |"
        )


@click.command()
@click.option("--rows", default="fp," + ",".join(ROWS), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("qrazor-rows.jsonl"))
@click.option("--windows", type=int, default=32, show_default=True, help="wiki-test windows of 1024 tokens")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--memory-ppl", default="qrazor-g8", show_default=True, help="rows evaluated in memory too")
@click.option("--table", "table_of", type=click.Path(path_type=Path), default=None)
def main(rows, out, windows, threads, memory_ppl, table_of):
    if table_of is not None:
        table(table_of)
        return
    in_memory = memory_ppl.split(",")
    run_rows(
        rows.split(","),
        lambda name: run_row(name, windows, name in in_memory),
        out,
        threads,
        f"eval {windows}x1024 wiki-test",
        cpu=machine.cpu(),
        windows=windows,
    )


if __name__ == "__main__":
    main()
