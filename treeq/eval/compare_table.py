"""compare's table as it grows, and its saved progress.

Each finished step (the fp row, each KV row, the KV rows' cache bytes, each quantized row) is written
to compare.md and compare.csv at once, and recorded in compare.json with the settings that made it.
Ctrl-C then loses only the step in progress, and ``resume=True`` (``treeq compare --resume``)
continues from there with the same settings: a row whose quantization was interrupted continues from
its own finished layers (treeq.quantize's resume), one quantized but not yet evaluated is evaluated
from its saved checkpoint.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..atomic import atomic_file
from ..errors import TreeqError
from ..user_input import json_file, new_output_dir

STATE_FILE = "compare.json"


class CompareInterrupted(KeyboardInterrupt):
    """Ctrl-C during compare: the rows finished so far are in the table already written."""

    def __init__(self, finished: int, total: int, out: Path):
        super().__init__(finished, total, out)
        self.finished, self.total, self.out = finished, total, out

    def told(self, how: str) -> str:
        """One line: how far compare got, where its rows are, and ``how`` to continue it."""
        return (
            f"interrupted after {self.finished} of {self.total} rows, which are in {self.out / 'compare.md'} "
            f"and compare.csv; continue with {how}"
        )

    def __str__(self) -> str:
        return self.told("the same arguments and treeq.compare(..., resume=True)")


class CompareProgress:
    """The steps compare finished in ``out`` and the rows and notes they left; opening it refuses at
    once, before any work, a resume of nothing or of other ``settings``, and a fresh start over an
    existing directory."""

    def __init__(self, out: Path, settings: dict, resume: bool):
        self.out, self.path = out, out / STATE_FILE
        self.settings = json.loads(json.dumps(settings, default=str))  # as saved and read back: tuples as lists
        self.steps: list[str] = []
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.quant_seconds: dict[str, float] = {}  # rows quantized, by checkpoint name
        self.all_done = False
        if not resume:
            if self.path.is_file() and not json_file(self.path).get("complete"):
                raise TreeqError(f"output directory {out} already exists; add --resume to continue it")
            new_output_dir(out)
            return
        if not self.path.is_file():
            raise TreeqError(
                f"nothing to resume: {out} holds no interrupted compare ({STATE_FILE}); run without --resume"
            )
        saved = json_file(self.path)
        changed = sorted(
            k
            for k in self.settings.keys() | saved["settings"].keys()
            if self.settings.get(k) != saved["settings"].get(k)
        )
        if changed:
            raise TreeqError(
                f"{out} holds a compare made with other {', '.join(changed)}; give the same settings to resume it, "
                "or another --out"
            )
        self.steps, self.rows, self.notes = saved["steps"], saved["rows"], saved["notes"]
        self.quant_seconds = saved["quant_seconds"]

    def done(self, step: str) -> bool:
        return step in self.steps

    def finished(self, step: str, row: dict | None = None) -> None:
        """``step`` done (adding ``row`` to the table if it made one): the table and the progress written."""
        self.steps.append(step)
        if row is not None:
            self.rows.append(row)
        self.save()

    def complete(self) -> None:
        """Every step done: a rerun over ``out`` is told to choose another, not to resume."""
        self.all_done = True
        self.save()

    def save(self) -> None:
        if self.rows:
            table = [dict(r) for r in self.rows]
            add_deltas(table)  # on copies: compare adds them to the rows it returns once all are finished
            write_table(table, self.out, self.notes)
        state = dict(settings=self.settings, steps=self.steps, rows=self.rows, notes=self.notes)
        state.update(quant_seconds=self.quant_seconds, complete=self.all_done)
        with atomic_file(self.path) as path:
            path.write_text(json.dumps(state, indent=1))


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


def write_table(rows: list[dict], out: Path, notes: list[str] = ()) -> None:
    """compare.csv, and compare.md with ``notes`` (how columns were measured) below its table."""
    out.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    # Rewritten after each row: an interrupted write leaves the last table whole.
    with atomic_file(out / "compare.csv") as path, open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    lines += ["", *(f"- {note}" for note in notes)] if notes else []
    with atomic_file(out / "compare.md") as path:
        path.write_text("\n".join(lines) + "\n")
