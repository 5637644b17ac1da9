"""Quantize the built-in SmolLM2-135M with each method and bit width; report time, peak RSS and
held-out perplexity side by side, with GPTQ's perplexity increase as a ratio of RTN's, and where
each run's time went (``bench/phases.py``).

Each quantization runs in its own process so its peak RSS is its own; all runs use the same thread
count, text and eval protocol. Usage:

    python bench/quantize_smollm2.py --threads 2 --bits 4,3 --methods rtn,gptq
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

import treeq  # before torch: it sets allocator options torch reads once

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).parent))
import machine  # noqa: E402
import phases  # noqa: E402


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(
    method: str, bits: int, threads: int, calib_samples: int, seqlen: int, eval_windows: int, layers: int = 0
) -> dict:
    """Quantize in this process; timing covers load, calibration, quantization and saving. With
    ``layers`` only the model's first that many decoder layers (a quick look at the phases)."""
    torch.set_num_threads(threads)
    from treeq.engine.quant_log import QuantLog

    clock = phases.install()
    start = time.perf_counter()
    model, tok = treeq.load_fp_model()
    if layers:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    cpu_start = time.process_time()
    cfg = treeq.QuantConfig(method=method, bits=bits, group_size=64, calib_samples=calib_samples, seqlen=seqlen)
    with tempfile.TemporaryDirectory() as tmp:
        report = treeq.quantize(model, cfg, Path(tmp) / "q", tokenizer=tok, log=QuantLog(echo=lambda _: None))
        # CPU seconds of all threads: unlike wall time, barely moved by other processes on a shared machine.
        cpu = time.process_time() - cpu_start
        total = time.perf_counter() - start
        rss = _peak_rss_mb()
        ppl = treeq.evaluate_perplexity(report.model, tok, max_windows=eval_windows)
    losses = [r.loss for r in report.log.records]
    return dict(
        method=method,
        bits=bits,
        quantize_s=report.seconds,
        quantize_cpu_s=cpu,
        total_s=total,
        peak_rss_mb=rss,
        ppl=ppl.ppl,
        mean_loss=sum(losses) / len(losses),
        protocol=ppl.protocol(),
        kernels=machine.kernels(report.model),
        phases=dict(clock.seconds),
    )


def run_fp(threads: int, eval_windows: int) -> dict:
    torch.set_num_threads(threads)

    model, tok = treeq.load_fp_model()
    ppl = treeq.evaluate_perplexity(model, tok, max_windows=eval_windows)
    return dict(method="fp", bits=32, ppl=ppl.ppl, protocol=ppl.protocol())


def _subprocess(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@click.command()
@click.option("--methods", default="rtn,gptq", show_default=True)
@click.option("--bits", default="4,3", show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--calib-samples", type=int, default=128, show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--eval-windows", type=int, default=32, show_default=True)
@click.option("--one", nargs=2, default=None, hidden=True, help="internal: METHOD BITS in this process")
@click.option("--fp", "fp_only", is_flag=True, hidden=True)
@click.option("--layers", type=int, default=0, help="quantize only the first N decoder layers (0: all)")
@click.option("--fp-ppl", type=float, default=None, help="the fp model's perplexity from an earlier run (same eval)")
def main(methods, bits, threads, calib_samples, seqlen, eval_windows, layers, one, fp_only, fp_ppl):
    if fp_only:
        print(json.dumps(run_fp(threads, eval_windows)))
        return
    if one:
        print(json.dumps(run_one(one[0], int(one[1]), threads, calib_samples, seqlen, eval_windows, layers)))
        return
    common = [
        "--threads",
        str(threads),
        "--calib-samples",
        str(calib_samples),
        "--seqlen",
        str(seqlen),
        "--eval-windows",
        str(eval_windows),
        "--layers",
        str(layers),
    ]
    fp = _subprocess("--fp", *common) if fp_ppl is None else dict(ppl=fp_ppl, protocol="as in the earlier run")
    print(machine.cpu())
    print(machine.calibration())
    print(
        f"threads={threads}  calibration={calib_samples}x{seqlen} wiki-train  group=64  machine cores={os.cpu_count()}"
    )
    print("quant s: wall seconds of quantization; cpu s: CPU seconds of all its threads")
    print(f"eval: wiki-test, {fp['protocol']}")
    print(f"fp (dequantized GGUF) perplexity: {fp['ppl']:.3f}")
    print(
        f"{'method':<6} {'bits':>4} {'quant s':>8} {'cpu s':>7} {'total s':>8} {'peak RSS MB':>11} {'mean loss':>10} "
        f"{'ppl':>8} {'+ppl':>7} {'+ppl / rtn +ppl':>15}"
    )
    for b in [int(x) for x in bits.split(",")]:
        rows = {m: _subprocess("--one", m, str(b), *common) for m in methods.split(",")}
        for m, r in rows.items():
            inc = r["ppl"] - fp["ppl"]
            ratio = inc / (rows["rtn"]["ppl"] - fp["ppl"]) if "rtn" in rows else float("nan")
            print(
                f"{m:<6} {b:>4} {r['quantize_s']:>8.1f} {r['quantize_cpu_s']:>7.1f} {r['total_s']:>8.1f} "
                f"{r['peak_rss_mb']:>11.0f} "
                f"{r['mean_loss']:>10.4g} {r['ppl']:>8.3f} {inc:>7.3f} {ratio:>15.3f}"
            )
        for m, r in rows.items():
            print(f"\n{m} {b}-bit, evaluated through kernels {r['kernels']}")
            print(f"where the total's seconds went:\n{phases.table(r['phases'], r['total_s'])}")


if __name__ == "__main__":
    main()
