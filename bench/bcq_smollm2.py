"""BCQ (binary-coding quantization, method bcq) against RTN asym on the built-in SmolLM2-135M, group
64: per-module output loss (the same calibration set, module by module) and perplexity; a BCQ row's
perplexity is measured on its checkpoint loaded back (treeq.load; BCQ layers run the LUT kernel
below cpu_lut_bcq.DENSE_FROM tokens of their number of planes and its exact dense path above, so
windows of 1024 at 3 and 4 bits run the dense path), and on the first --same-windows windows both
in memory and loaded; an RTN row's in memory only (RTN checkpoints are checked elsewhere).

One process, the fp model loaded once and copied per row. The table goes to stdout and to
bench/results/bcq_smollm2.md (rewritten after every row). Usage:

    flock /tmp/treeq-heavy.lock python bench/bcq_smollm2.py --threads 2
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

# label -> (bits, QuantConfig settings); each BCQ row is compared with the RTN row of its bits.
ROWS = {  # the error-feedback rows are not in the default run (time on a shared 2-core machine)
    "rtn-asym-4": (4, dict(method="rtn", sym=False)),
    "bcq-4": (4, dict(method="bcq")),
    "bcq-ef-4": (4, dict(method="bcq", options={"error_feedback": True})),
    "rtn-asym-3": (3, dict(method="rtn", sym=False)),
    "bcq-3": (3, dict(method="bcq")),
    "bcq-ef-3": (3, dict(method="bcq", options={"error_feedback": True})),
}
RESULTS = Path(__file__).parent / "results" / "bcq_smollm2.md"


@click.command()
@click.option("--rows", default="rtn-asym-4,bcq-4,rtn-asym-3,bcq-3", show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--calib-samples", type=int, default=32, show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--eval-windows", type=int, default=32, show_default=True)
@click.option("--same-windows", type=int, default=2, show_default=True, help="windows of the save -> load check")
@click.option("--fp-ppl", type=float, default=None, help="the fp model's perplexity on this protocol if known")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
def main(rows, threads, calib_samples, seqlen, eval_windows, same_windows, fp_ppl, out):
    torch.set_num_threads(threads)
    import machine

    import treeq
    from treeq.engine.quant_log import QuantLog

    fp, tok = treeq.load_fp_model()
    fp_line = f"fp perplexity: {fp_ppl:.3f} (given, not measured in this run)" if fp_ppl is not None else None
    if fp_line is None:
        fp_line = f"fp perplexity: {treeq.evaluate_perplexity(fp, tok, max_windows=eval_windows).ppl:.3f}"
    lines = [
        f"threads={threads}  calibration: {calib_samples} x {seqlen} tokens of wiki-train  group=64  clip search off",
        machine.cpu(),
        machine.calibration(),
        f"eval: wiki-test, {eval_windows} windows of 1024 tokens",
        fp_line,
        "loss: per-module output MSE E[(x (W - Q)^T)^2] on the calibration inputs, mean / median over modules;",
        "  'modules <= RTN': modules whose loss is at most the RTN asym row's of the same bits;",
        "  stored bits / weight: every stored tensor of the quantized linears (treeq inspect's count) per weight",
        "",
        f"| row | bits | ppl ({eval_windows} windows; BCQ: loaded checkpoint) | "
        f"first {same_windows} windows: in memory / loaded | loaded / memory - 1 | mean loss | median loss | "
        "modules <= RTN | stored bits / weight | quant s | kernels (loaded model for BCQ) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    print("\n".join(lines), flush=True)
    table, rtn_losses = [], {}
    for label in rows.split(","):
        bits, settings = ROWS[label]
        cfg = treeq.QuantConfig(
            bits=bits, group_size=64, calib_samples=calib_samples, seqlen=seqlen, clip_search=False, **settings
        )
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            report = treeq.quantize(
                copy.deepcopy(fp), cfg, Path(tmp) / "q", tokenizer=tok, log=QuantLog(echo=lambda _: None)
            )
            seconds = time.perf_counter() - start
            stored_bits = treeq.inspect_checkpoint(Path(tmp) / "q").mean_bits_per_weight
            if settings["method"] == "rtn":
                loaded, from_disk = report.model, None
                row_ppl = treeq.evaluate_perplexity(report.model, tok, max_windows=eval_windows).ppl
            else:
                loaded, _ = treeq.load(Path(tmp) / "q")
                row_ppl = treeq.evaluate_perplexity(loaded, tok, max_windows=eval_windows).ppl
                # save -> load on the first `same_windows` windows (in memory against loaded)
                in_memory, from_disk = (
                    treeq.evaluate_perplexity(m, tok, max_windows=same_windows).ppl for m in (report.model, loaded)
                )
        losses = {f"{r.layer}.{r.module}": r.loss for r in report.log.records}
        if settings["method"] == "rtn":
            rtn_losses[bits] = losses
        baseline = rtn_losses.get(bits)
        wins = "-" if baseline is None else f"{sum(losses[m] <= baseline[m] for m in losses)} / {len(losses)}"
        same = "- | -"
        if from_disk is not None:
            same = f"{in_memory:.3f} / {from_disk:.3f} | {from_disk / in_memory - 1:+.4%}"
        row = (
            f"| {label} | {bits} | {row_ppl:.3f} | {same} | "
            f"{statistics.mean(losses.values()):.4g} | {statistics.median(losses.values()):.4g} | {wins} | "
            f"{stored_bits:.3f} | {seconds:.0f} | {machine.kernels(loaded)} |"
        )
        print(row, flush=True)
        table.append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines + table) + "\n")


if __name__ == "__main__":
    main()
