"""Several methods and bit widths on one model, in one table: quantize once per setting, evaluate
each the same way as the fp model, write the table as Markdown and CSV."""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import TreeqError


def _fp16_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * 2
    return total


def _evaluate(model, tok, tasks, limit, text: str, seqlen: int, windows: int) -> dict:
    from .. import api

    row = {"ppl": api.evaluate_perplexity(model, tok, text, seqlen, windows).ppl}
    for task, metrics in (api.evaluate_tasks(model, tok, list(tasks), limit) if tasks else {}).items():
        for metric, value in metrics.items():
            row[f"{task}:{metric}"] = value
    return row


def compare(
    model: str | None,
    methods: list[str],
    bits: list[int],
    out,
    group_size: int | None = None,
    tasks: tuple[str, ...] = (),
    limit: int | None = None,
    calib_text: str = "wiki-train",
    eval_text: str = "wiki-test",
    eval_seqlen: int = 1024,
    eval_windows: int = 32,
    act_bits: tuple[int | None, ...] = (None,),
    **settings,
) -> list[dict]:
    """Rows of the comparison (the fp model first); checkpoints and compare.{md,csv} go under ``out``.
    ``act_bits``: the input bits of each row's quantized linears, None for weight-only rows (one
    row per method x weight bits x activation bits); ``settings`` may name a ``migration``."""
    from .. import api
    from ..config import QuantConfig

    out = Path(out)
    if out.exists():
        raise TreeqError(f"output directory {out} already exists; choose another --out or remove it")
    if group_size is not None:
        settings["group_size"] = group_size
    configs = [
        api.for_model(QuantConfig.build(method=m, bits=b, activations=_inputs(a), **settings), model)
        for b in bits
        for a in act_bits
        for m in methods
    ]
    fp, tok = api.load_fp_model(model)
    rows = [dict(method="fp", bits=16, act_bits=16, group=None, size_mb=_fp16_bytes(fp) / 2**20, quant_s=None)]
    evaluation = dict(tasks=tasks, limit=limit, text=eval_text, seqlen=eval_seqlen, windows=eval_windows)
    rows[0].update(_evaluate(fp, tok, **evaluation))
    del fp
    for cfg in configs:
        fp, tok = api.load_fp_model(model)
        w, a = cfg.weights, 16 if cfg.activations is None else cfg.activations.bits
        method = f"{cfg.migration}+{cfg.method}" if cfg.migration else cfg.method
        method += "" if w.grid == "minmax" else f"-{w.grid}"
        target = out / f"{method}-w{w.bits}a{a}g{w.group_size}"
        report = api.quantize(fp, cfg, target, tokenizer=tok, calib_text=calib_text)
        size = sum(p.stat().st_size for p in target.glob("*.safetensors"))
        row = dict(method=method, bits=w.bits, act_bits=a, group=w.group_size, size_mb=size / 2**20)
        row["quant_s"] = report.seconds
        row.update(_evaluate(report.model, tok, **evaluation))
        rows.append(row)
        del fp, report
    add_deltas(rows)
    write_table(rows, out)
    return rows


def _inputs(bits: int | None) -> dict | None:
    """The activation scheme of a row: dynamic per-token inputs of ``bits``, or none."""
    return None if bits in (None, 16) else {"bits": bits}


def add_deltas(rows: list[dict]) -> None:
    """A "d <metric>" column (row minus fp) for perplexity and every task metric."""
    # Listed before any row changes: the fp row gains delta columns of its own.
    metrics = [k for k in rows[0] if k == "ppl" or ":" in k]
    for row in rows:
        for key in metrics:
            row[f"d {key}"] = row[key] - rows[0][key]


def _cell(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_table(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
