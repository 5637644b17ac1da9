"""Whole-model ParoQuant on the built-in SmolLM2-135M: quantization time, then perplexity of the
in-memory quantized model and of the same checkpoint after ``treeq.load`` (same protocol as GPTQ's
figures: wiki-train calibration 128x512, 32 windows x 1024 of wiki-test).

Modules of a subset are optimised in parallel threads (``--workers``), each with ``--threads``
intra-op threads; on a 2-core machine 1 x 2 beats 2 x 2, whose small ops mostly wait on each other.

    flock /tmp/treeq-heavy.lock python bench/paroquant_smollm2.py --threads 1 --workers 2
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import machine
import torch

import treeq
from treeq.engine.quant_log import QuantLog


@click.command()
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--bits", type=int, default=4, show_default=True)
@click.option("--option", "options", default="{}", show_default=True, help="ParoQuant options as JSON")
def main(threads, workers, bits, options):
    torch.set_num_threads(threads)
    cfg = treeq.QuantConfig(method="paroquant", bits=bits, group_size=64, options=json.loads(options))
    model, tok = treeq.load_fp_model()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q"
        report = treeq.quantize(model, cfg, out, tokenizer=tok, log=QuantLog(echo=lambda _: None), workers=workers)
        losses = [r.loss for r in report.log.records]
        print(f"threads={threads} workers={workers} settings={cfg.model_dump()}")
        print(machine.cpu())
        print(machine.calibration(cfg.calibration.calib_dtype))
        mean = sum(losses) / len(losses)
        print(f"quantized {len(losses)} modules in {report.seconds:.1f}s, mean module loss {mean:.4g}")
        in_memory = treeq.evaluate_perplexity(report.model, tok)
        loaded, tok2 = treeq.load(out)
        restored = treeq.evaluate_perplexity(loaded, tok2)
        print(f"kernels in memory: {machine.kernels(report.model)}; after save+load: {machine.kernels(loaded)}")
    print(f"perplexity in memory {in_memory.ppl:.3f}, after save+load {restored.ppl:.3f}  [{in_memory.protocol()}]")


if __name__ == "__main__":
    main()
