"""Per-layer statistics of the inputs each subset of linears reads, before and after SmoothQuant's
smoothing: the figure drawn to choose SmoothQuant's alpha and to see why 4-bit inputs fail.

For every decoder layer and subset (attention input, attention output, MLP input, MLP down
projection), over calibration windows: the largest channel magnitude, the share of input channels
whose magnitude exceeds LLM.int8()'s threshold somewhere, and the kurtosis of the input's values
(3 for a Gaussian; outlier channels make it large). The smoothed input is x / s with the scales
SmoothQuant folds for that subset (:mod:`treeq.transforms.smoothquant`); its statistics follow
exactly from per-channel power sums, so one pass over the text gives both.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import user_input
from ..atomic import atomic_file
from ..data import calibration_batches, read_text
from ..methods import InputStats
from ..models import spec_for
from ..transforms.smoothquant import SmoothQuant

log = logging.getLogger(__name__)

CSV_NAME = "activation_stats.csv"
PNG_NAME = "activation_stats.png"


@dataclass(frozen=True)
class SubsetStats:
    layer: int
    subset: str
    channels: int
    max_absmax: float
    share_above: float
    kurtosis: float
    max_absmax_smoothed: float
    share_above_smoothed: float
    kurtosis_smoothed: float


class _PowerSums:
    """Per-channel range and sums of x, x^2, x^3, x^4 over every token, in fp64."""

    def __init__(self, channels: int):
        self.sums = torch.zeros(4, channels, dtype=torch.float64)
        self.low = torch.zeros(channels)
        self.high = torch.zeros(channels)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        power = torch.ones_like(x)
        for k in range(4):
            power = power * x
            self.sums[k] += power.sum(dim=0)
        self.low = torch.minimum(self.low, x.amin(dim=0).float())
        self.high = torch.maximum(self.high, x.amax(dim=0).float())
        self.count += x.shape[0]

    def summary(self, scale: torch.Tensor, threshold: float) -> tuple[float, float, float]:
        """(max channel magnitude, share of channels above ``threshold``, kurtosis of all values) of
        the input divided by ``scale`` per channel."""
        absmax = torch.maximum(-self.low, self.high) / scale
        s = scale.double()
        n = self.count * len(scale)
        m1, m2, m3, m4 = (float((self.sums[k] / s ** (k + 1)).sum()) / n for k in range(4))
        var = m2 - m1**2
        fourth = m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4  # E[(x - mean)^4]
        kurtosis = fourth / var**2 if var > 0 else float("nan")
        return float(absmax.max()), float((absmax > threshold).float().mean()), kurtosis


def activation_stats(
    model, tokenizer, text: str = "wiki-train", samples: int = 16, seqlen: int = 512, alpha: float = 0.5,
    threshold: float = 6.0,
) -> list[SubsetStats]:  # fmt: skip
    """Statistics of each dense subset's input over ``samples`` windows of ``text``, raw and after
    SmoothQuant at ``alpha``; ``threshold``: LLM.int8()'s outlier magnitude."""
    user_input.loaded_model(model, "activation_stats")
    user_input.loaded_tokenizer(tokenizer, "activation_stats")
    user_input.whole_number(samples, "samples", 1)
    spec = spec_for(model.config)
    layers = model.get_submodule(spec.layers)
    taps: dict[tuple[int, str], tuple[_PowerSums, list[torch.nn.Module]]] = {}
    handles = []
    for index, layer in enumerate(layers):
        for subset in spec.subsets:
            if subset.per_expert or not all(_has(layer, m) for m in subset.modules):
                continue
            modules = [layer.get_submodule(m) for m in subset.modules]
            sums = _PowerSums(modules[0].in_features)
            taps[(index, subset.name)] = (sums, modules)
            handles.append(modules[0].register_forward_pre_hook(lambda _m, args, s=sums: s.add(args[0])))
    try:
        with torch.no_grad():
            batches = calibration_batches(tokenizer, read_text(text), samples, seqlen, batch_size=1)
            user_input.tokens_fit(model, batches)
            if warning := user_input.beyond_positions(model, seqlen):  # statistics to look at, not to calibrate
                log.warning(warning)
            for batch in batches:
                model(batch.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    smooth = SmoothQuant({"alpha": alpha})
    rows = []
    for (index, name), (sums, modules) in taps.items():
        stats = InputStats(len(sums.low), torch.device("cpu"))
        stats.low, stats.high = sums.low, sums.high
        scale = smooth.scales([m.weight.data.float().cpu() for m in modules], stats, lambda w: w)
        before = sums.summary(torch.ones_like(scale), threshold)
        after = sums.summary(scale, threshold)
        rows.append(SubsetStats(index, name, len(scale), *before, *after))
    return rows


def _has(layer, path: str) -> bool:
    try:
        layer.get_submodule(path)
    except AttributeError:
        return False
    return True


def save_stats(rows: list[SubsetStats], out: Path, alpha: float, threshold: float) -> list[Path]:
    """``activation_stats.csv`` and ``activation_stats.png`` (matplotlib, from ``treeq[eval]``) in
    ``out``; returns the files written."""
    import matplotlib

    user_input.writable_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / CSV_NAME) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = [
        ("max_absmax", "largest channel magnitude", "log"),
        ("share_above", f"share of channels above {threshold}", "linear"),
        ("kurtosis", "kurtosis of the values", "log"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4.5))
    for ax, (field, title, yscale) in zip(axes, panels):
        for i, subset in enumerate(dict.fromkeys(r.subset for r in rows)):
            mine = [r for r in rows if r.subset == subset]
            x = [r.layer for r in mine]
            ax.plot(x, [getattr(r, field) for r in mine], color=f"C{i}", label=subset)
            ax.plot(x, [getattr(r, field + "_smoothed") for r in mine], color=f"C{i}", linestyle="--")
        ax.set(title=title, xlabel="decoder layer", yscale=yscale)
    axes[0].legend(title=f"solid: as is, dashed: SmoothQuant alpha {alpha}", fontsize="small")
    fig.tight_layout()
    with atomic_file(out / PNG_NAME) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return [out / CSV_NAME, out / PNG_NAME]
