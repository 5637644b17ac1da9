"""SpQR on the built-in SmolLM2-135M: each row quantized with treeq's default calibration (128 x 512
wiki-train), written as checkpoint_format spqr, loaded back; perplexity of the model in memory and of
the loaded checkpoint (they must agree within 0.1%), bits per weight counted from the stored tensors
(treeq inspect's count over all quantized linears: codes, zero points, scale codes, second-level
steps and minima, act-order permutation, outlier rows, columns and values), the outlier share, and
per module kind the mean outlier share and bits. One JSON line per row is appended to ``--out``;
``--table ROWS.jsonl`` writes the markdown table to bench/results/spqr_smollm2.md.

    flock /tmp/treeq-heavy.lock python bench/spqr_smollm2.py --rows spqr-w3-g16 --out spqr.jsonl
    python bench/spqr_smollm2.py --table spqr.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's treeq, not the installed one
import machine  # noqa: E402
from quantized_row import fp_ppl, quantized_row, run_rows  # noqa: E402

SPQR = dict(method="spqr", bits=3, sym=False, format="spqr")
ROWS = {
    # <= 4.0 bits: 3-bit codes in groups of 16, scales' second level per 32 rows (3.45 bits before
    # outliers), about 1.5% outliers; clip search on (it lowered the layer loss 5-20%)
    "spqr-w3-g16-t0.25-s32-clip": dict(group_size=16, outlier_threshold=0.25, stats_group=32, clip_search=True, **SPQR),
    # <= 3.1 bits: groups of 192 (3.06 bits before outliers), under 0.1% outliers
    "spqr-w3-g192-t2.5-clip": dict(group_size=192, outlier_threshold=2.5, clip_search=True, **SPQR),
    # <= 3.1 bits with half the groups' width: groups of 96, second level per 32 rows (3.08 bits
    # before outliers), few outliers
    "spqr-w3-g96-t4-s32-clip": dict(group_size=96, outlier_threshold=4.0, stats_group=32, clip_search=True, **SPQR),
    "spqr-w3-g96-t8-s32-clip": dict(group_size=96, outlier_threshold=8.0, stats_group=32, clip_search=True, **SPQR),
    # SpQR's default threshold and groups: about 2% outliers on SmolLM2, over 4 bits
    "spqr-w3-g16": dict(group_size=16, **SPQR),
}
RESULTS = Path(__file__).parent / "results" / "spqr_smollm2.md"


def outlier_counts(loaded) -> tuple[dict[str, int], dict[str, int]]:
    """(outliers, weights) per module kind (q_proj, ..., down_proj), over every layer."""
    from treeq.runtime.quant_linear import QuantLinear

    kept, total = defaultdict(int), defaultdict(int)
    for name, m in loaded.named_modules():
        if isinstance(m, QuantLinear) and m.extras is not None:
            kind = name.rpartition(".")[2]
            kept[kind] += m.extras.nnz
            total[kind] += m.in_features * m.out_features
    return kept, total


def run_row(name: str, windows: int) -> dict:
    import treeq

    if name == "fp":
        return dict(row="fp", ppl=fp_ppl(windows))
    cfg = treeq.QuantConfig(**ROWS[name])
    with quantized_row(cfg, windows, memory_ppl=True) as row:
        kept, total = outlier_counts(row.loaded)
        return dict(
            row=name,
            settings=ROWS[name],
            calibration=f"{cfg.calibration.calib_samples}x{cfg.calibration.seqlen}",
            **row.fields(),
            bits_per_weight=treeq.inspect_checkpoint(row.out).mean_bits_per_weight,
            outliers=sum(kept.values()) / sum(total.values()),
            outliers_by_kind={k: kept[k] / total[k] for k in total},
            kernels=machine.kernels(row.loaded),
        )


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    fp = next((r["ppl"] for r in rows if r["row"] == "fp"), None)
    first = next(r for r in rows if r["row"] != "fp")
    lines = [
        f"`python bench/spqr_smollm2.py` on {first['cpu']}; calibration {first['calibration']} wiki-train "
        f"(treeq's default), eval {first['protocol']}",
        "Baselines on this protocol (issue 16): fp 17.989, GPTQ 4-bit g64 22.24, GPTQ 3-bit g64 31.98.",
        "bits/weight: stored bits of every quantized linear over their weights (treeq inspect's count: codes, "
        "zero points, scale codes, second-level steps and minima, act-order groups, outlier counts, columns, "
        "values).",
        "",
        "| row | settings | bits/weight | ppl (loaded) | ppl in memory | loaded / memory - 1 | +% vs fp "
        "| outliers | outliers by module | mean loss | quantize s | kernels |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for r in rows:
        if r["row"] == "fp":
            lines.append(f"| fp | | 16 | {r['ppl']:.3f} | | | | | | | | |")
            continue
        inc = f"{100 * (r['ppl'] / fp - 1):+.2f}%" if fp else ""
        kinds = ", ".join(f"{k} {100 * v:.2f}%" for k, v in r["outliers_by_kind"].items())
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items() if k not in ("method", "format"))
        lines.append(
            f"| {r['row']} | {settings} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | {r['ppl_memory']:.3f} "
            f"| {r['ppl'] / r['ppl_memory'] - 1:+.1e} | {inc} | {100 * r['outliers']:.2f}% | {kinds} "
            f"| {r['mean_loss']:.4g} | {r['quantize_s']:.0f} | {r['kernels']} |"
        )
    return "\n".join(lines)


@click.command()
@click.option("--rows", default="fp," + ",".join(ROWS), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("spqr-rows.jsonl"))
@click.option("--windows", type=int, default=32, show_default=True, help="wiki-test windows of 1024 tokens")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--table", "table_of", type=click.Path(path_type=Path), default=None)
def main(rows, out, windows, threads, table_of):
    if table_of is not None:
        RESULTS.write_text(table(table_of) + "\n")
        print(RESULTS.read_text())
        return
    header = f"eval {windows}x1024 wiki-test"
    run_rows(
        rows.split(","), lambda name: run_row(name, windows), out, threads, header, cpu=machine.cpu(), windows=windows
    )


if __name__ == "__main__":
    main()
