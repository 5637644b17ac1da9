"""Quantization grids on the built-in SmolLM2-135M: RTN and GPTQ at each bit width across the grids of
treeq/numerics.py; held-out perplexity and the per-module output loss (mean and median over modules).

One process, one fp model loaded once and copied per run; every run uses the same thread count,
calibration set and eval protocol. The table goes to stdout and to bench/results/grids_smollm2.md
(rewritten after every row, so an interrupted run keeps what it measured). Usage:

    flock /tmp/treeq-heavy.lock python bench/grids_smollm2.py --threads 2
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

# Measure the treeq of the tree this script sits in, not whichever one is pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# label -> QuantConfig settings. The first five are the grids and run first (every bit width
# and method), so an interrupted run still has them; the zero-point-free variants follow.
VARIANTS = {
    "asym": dict(grid="minmax", sym=False),
    "sym": dict(grid="minmax", sym=True),
    "half-step": dict(grid="half-step"),
    "stretched": dict(grid="stretched"),
    "fp8-int4": dict(grid="fp8-int4"),
    "restricted": dict(grid="restricted"),
    "restricted+clip": dict(grid="restricted", clip_search=True),
    "signed": dict(grid="signed"),
}
CORE = 5
RESULTS = Path(__file__).parent / "results" / "grids_smollm2.md"


@click.command()
@click.option("--methods", default="rtn,gptq", show_default=True)
@click.option("--bits", default="2,3,4", show_default=True)
@click.option("--variants", default=",".join(VARIANTS), show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--calib-samples", type=int, default=32, show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--eval-windows", type=int, default=16, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
def main(methods, bits, variants, threads, calib_samples, seqlen, eval_windows, out):
    torch.set_num_threads(threads)
    import machine

    import treeq
    from treeq.engine.quant_log import QuantLog

    fp, tok = treeq.load_fp_model()
    fp_ppl = treeq.evaluate_perplexity(fp, tok, max_windows=eval_windows)
    lines = [
        f"threads={threads}  calibration: {calib_samples} x {seqlen} tokens of wiki-train  group=64  act-order on  "
        "clip search off (but in +clip rows)",
        machine.cpu(),
        machine.calibration(),
        f"eval: wiki-test, {fp_ppl.protocol()}",
        f"fp perplexity: {fp_ppl.ppl:.3f}",
        "loss: per-module output MSE E[(x (W - Q)^T)^2] on the calibration inputs, mean / median over modules",
        "",
        "| method | bits | grid | ppl | +ppl | mean loss | median loss | quant s | evaluated through |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    print("\n".join(lines), flush=True)
    methods, bits, variants = methods.split(","), [int(x) for x in bits.split(",")], variants.split(",")
    core = [v for v in variants if v in list(VARIANTS)[:CORE]]
    runs = [
        (m, b, v)
        for group in (core, [v for v in variants if v not in core])
        for b in bits
        for m in methods
        for v in group
        if b in treeq.numerics.GRIDS[VARIANTS[v]["grid"]].bits_allowed
    ]
    rows = {}
    for method, b, label in runs:
        cfg = treeq.QuantConfig(
            method=method,
            bits=b,
            group_size=64,
            calib_samples=calib_samples,
            seqlen=seqlen,
            **{"clip_search": False, **VARIANTS[label]},  # grids alone: GPTQ's default clip search off
        )
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            report = treeq.quantize(
                copy.deepcopy(fp), cfg, Path(tmp) / "q", tokenizer=tok, log=QuantLog(echo=lambda _: None)
            )
        seconds = time.perf_counter() - start
        ppl = treeq.evaluate_perplexity(report.model, tok, max_windows=eval_windows).ppl
        losses = [r.loss for r in report.log.records]
        rows[method, b, label] = (
            f"| {method} | {b} | {label} | {ppl:.3f} | {ppl - fp_ppl.ppl:+.3f} | "
            f"{statistics.mean(losses):.4g} | {statistics.median(losses):.4g} | {seconds:.0f} | "
            f"{machine.kernels(report.model)} |"
        )
        print(rows[method, b, label], flush=True)
        ordered = [rows[k] for k in sorted(rows, key=lambda k: (methods.index(k[0]), k[1], variants.index(k[2])))]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines + ordered) + "\n")


if __name__ == "__main__":
    main()
