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
import tempfile
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).parent))
import machine  # noqa: E402

W8 = dict(bits=8, group_size=-1)
A8 = dict(bits=8, granularity="per-token")
ROWS = {
    "rtn-w8a16": dict(method="rtn", **W8),
    "rtn-w8a8": dict(method="rtn", **W8, activations=A8),
    "sq0.5-w8a8": dict(method="rtn", migration="smoothquant", alpha=0.5, **W8, activations=A8),
    "sq0.8-w8a8": dict(method="rtn", migration="smoothquant", alpha=0.8, **W8, activations=A8),
    "sq0.8-gptq-w8a8": dict(method="gptq", migration="smoothquant", alpha=0.8, **W8, activations=A8),
    "llm.int8": dict(method="rtn", **W8, activations=dict(A8, outlier_threshold=6.0)),
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
    from treeq.engine.quant_log import QuantLog

    model, tok = treeq.load_fp_model()
    if name == "fp":
        return dict(row="fp", ppl=treeq.evaluate_perplexity(model, tok, max_windows=windows).ppl)
    cfg = treeq.QuantConfig(**ROWS[name], calib_samples=calib_samples, seqlen=seqlen)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = treeq.quantize(model, cfg, Path(tmp) / "q", tokenizer=tok, log=QuantLog(echo=lambda _: None))
        seconds = time.perf_counter() - start
        loaded, _ = treeq.load(Path(tmp) / "q")
        # The perplexity is the loaded checkpoint's (what a user runs); the model still in memory
        # after quantizing must give the same logits, or saving lost something.
        ids = tok(treeq.data.read_text("wiki-test")[:4000], return_tensors="pt").input_ids[:, :512]
        with torch.no_grad():
            reload_diff = float((loaded(ids).logits - report.model(ids).logits).abs().max())
        ppl = treeq.evaluate_perplexity(loaded, tok, max_windows=windows)
    return dict(
        row=name,
        settings=ROWS[name],
        quantize_s=seconds,
        ppl=ppl.ppl,
        reload_max_logit_diff=reload_diff,
        kernels=machine.kernels(loaded),
        protocol=ppl.protocol(),
        mean_outlier_share=_mean(outlier_shares(loaded)),
        outlier_shares=outlier_shares(loaded),
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
    torch.set_num_threads(threads)
    print(machine.cpu())
    print(machine.calibration())
    print(f"threads={threads} calibration={calib_samples}x{seqlen} wiki-train, eval {windows}x1024 wiki-test")
    for name in rows.split(","):
        result = run_row(name, calib_samples, seqlen, windows)
        result.update(cpu=machine.cpu(), calibration=f"{calib_samples}x{seqlen}", windows=windows)
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "outlier_shares"}), flush=True)


if __name__ == "__main__":
    main()
