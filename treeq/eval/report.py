"""Per-layer error analysis of a checkpoint from its quant_log.csv: a plot of every module's loss by
layer (log scale, one line per module kind), and the modules that lost the most."""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .. import user_input
from ..atomic import atomic_file
from ..engine.quant_log import LOG_NAME
from ..errors import TreeqError


@dataclass
class ErrorReport:
    png: Path
    hardest: list[dict]  # quant_log rows, largest loss relative to the median of their kind first


def _rows(path: Path) -> list[dict]:
    log = path / LOG_NAME
    if not log.is_file():
        raise TreeqError(f"{path} has no {LOG_NAME}; give a directory written by `treeq quantize`")
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise TreeqError(f"{log} has no modules")
    for r in rows:
        r["layer"], r["loss"] = int(r["layer"]), float(r["loss"])
    return rows


def error_report(path, png: str | Path | None = None, top: int = 5) -> ErrorReport:
    """Plot ``path``'s per-module losses to ``png`` (default: errors.png inside ``path``).

    Losses of different module kinds differ by orders of magnitude (a down projection's output is
    not an attention projection's), so "hardest" ranks each module against the median of its kind.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import FigureCanvasBase

    path = user_input.local_path(path, "checkpoint")
    rows = _rows(path)
    png = user_input.local_path(png, "png") if png is not None else path / "errors.png"
    if not png.parent.is_dir():
        raise TreeqError(f"cannot write {png}: {png.parent} is not a directory; choose another --png")
    image_format = png.suffix.lstrip(".").lower() or "png"
    if image_format not in FigureCanvasBase.get_supported_filetypes():
        raise TreeqError(f"cannot write {png}: matplotlib writes no .{image_format} images; end --png in .png or .svg")
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_kind[r["module"]].append(r)
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    for kind, rs in by_kind.items():
        ax.plot([r["layer"] for r in rs], [r["loss"] for r in rs], marker="o", markersize=3, label=kind)
    medians = {k: sorted(r["loss"] for r in rs)[len(rs) // 2] for k, rs in by_kind.items()}
    hardest = sorted(rows, key=lambda r: r["loss"] / max(medians[r["module"]], 1e-30), reverse=True)[:top]
    for r in hardest:
        ax.annotate(
            f"L{r['layer']} {r['module'].split('.')[-1]}",
            (r["layer"], r["loss"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
            color="crimson",
        )
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("output MSE on calibration inputs")
    ax.set_title(f"per-module quantization loss: {path.name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, format=image_format)
    plt.close(fig)
    return ErrorReport(png, hardest)
