"""One bench row on the built-in SmolLM2-135M: quantize by a config into a temporary directory,
load the checkpoint back, and measure what the SmolLM2 benches all report. The benches add their
own fields from the row's checkpoint and loaded model while it exists (inside the ``with``)."""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Row:
    report: object  # treeq.QuantizeReport: the quantized model in memory and its log
    loaded: torch.nn.Module  # the checkpoint as treeq.load reads it
    out: Path  # the checkpoint directory (temporary)
    quantize_s: float
    ppl: object  # the loaded model's treeq.evaluate_perplexity result
    reload_max_logit_diff: float  # memory vs loaded, on 512 wiki-test tokens
    ppl_memory: float | None  # the in-memory model's perplexity, where asked for

    def fields(self) -> dict:
        losses = [r.loss for r in self.report.log.records]
        return dict(
            quantize_s=self.quantize_s,
            ppl=self.ppl.ppl,
            ppl_memory=self.ppl_memory,
            reload_max_logit_diff=self.reload_max_logit_diff,
            mean_loss=sum(losses) / len(losses),
            protocol=self.ppl.protocol(),
        )


def fp_ppl(windows: int) -> float:
    import treeq

    model, tok = treeq.load_fp_model()
    return treeq.evaluate_perplexity(model, tok, max_windows=windows).ppl


@contextmanager
def quantized_row(cfg, windows: int, memory_ppl: bool = False):
    """Quantize SmolLM2 by ``cfg``, load the checkpoint; yields a :class:`Row`. The perplexity is
    the loaded checkpoint's (what a user runs); the model left in memory by quantizing must give
    the same logits, or saving lost something."""
    import treeq
    from treeq.engine.quant_log import QuantLog

    model, tok = treeq.load_fp_model()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q"
        start = time.perf_counter()
        report = treeq.quantize(model, cfg, out, tokenizer=tok, log=QuantLog(echo=lambda _: None))
        seconds = time.perf_counter() - start
        loaded, _ = treeq.load(out)
        ids = tok(treeq.data.read_text("wiki-test")[:4000], return_tensors="pt").input_ids[:, :512]
        with torch.no_grad():
            diff = float((loaded(ids).logits - report.model(ids).logits).abs().max())
        ppl = treeq.evaluate_perplexity(loaded, tok, max_windows=windows)
        memory = treeq.evaluate_perplexity(report.model, tok, max_windows=windows).ppl if memory_ppl else None
        yield Row(report, loaded, out, seconds, ppl, diff, memory)


def run_rows(names: list[str], run, out: Path, threads: int, header: str, **fields) -> None:
    """On ``threads`` threads, after a header naming the CPU and the calibration path: ``run(name)``
    for each row, each appended to ``out`` as one JSON line (with ``fields``) as soon as it is done,
    so a long run keeps what it finished, and printed."""
    import machine  # bench/machine.py, beside this file

    torch.set_num_threads(threads)
    print(machine.cpu())
    print(machine.calibration())
    print(f"threads={threads}, {header}")
    for name in names:
        result = {**run(name), **fields}
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "outlier_shares"}), flush=True)
