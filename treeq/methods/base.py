"""The small protocol between the looper and a quantization method.

The looper hands a method the input statistics of one subset (every module of a subset reads the
same input) and one module's weight at a time; the method returns integer codes and grid params.
A method never sees the model or its architecture.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import pydantic
import torch

from ..engine.calib_precision import calibration_dtype, cpu_statistics
from ..errors import parse_settings
from ..extras import WeightExtras
from ..kernels import gram_bf16
from ..numerics import ROW_CHUNK, Grid, UniformGrid, dequantize_grouped, group_width, make_grid
from ..runtime.activations import ActivationQuantizer
from ..runtime.input_transform import InputTransform
from ..schemes import WeightScheme


@dataclass
class QuantResult:
    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # fp16 [groups, out]
    zeros: torch.Tensor  # int32 [groups, out]
    g_idx: torch.Tensor  # int32 [in]: group of each input channel
    loss: float  # the method's objective on the calibration inputs
    grid: str = UniformGrid.name  # which grid's dequantization the codes are for
    transform: InputTransform | None = None  # applied to the layer's input before the matmul
    # Tensors the format keeps beside the four above (treeq.extras: a sparse residual, ...), with
    # how they enter the weight; None: the four are the whole weight.
    extras: WeightExtras | None = None
    # Set by the engine, not the method: what quantizes the layer's input (its calibrated levels
    # are saved with the layer); None: weight-only.
    input_quantizer: ActivationQuantizer | None = None

    def weight(self) -> torch.Tensor:
        """The effective dense weight in the layer's original input basis."""
        if self.extras is None:
            w = dequantize_grouped(self.codes, self.scales, self.zeros, self.g_idx, self.grid)
        else:
            w = self.extras.dequantize(self.codes, self.scales, self.zeros, self.g_idx, self.grid)
        return w if self.transform is None else self.transform.effective_weight(w)

    @property
    def reorders(self) -> bool:
        """True when groups are not contiguous runs of input channels (act-order without static
        groups), i.e. when a kernel must honour g_idx."""
        return bool((self.g_idx[1:] < self.g_idx[:-1]).any())


class InputStats:
    """Second moment H = E[x x^T] of a subset's input, accumulated in fp32 over calibration tokens.

    With ``dtype`` bf16 (calibration forwards autocast to bf16, so the layer multiplies bf16-rounded
    inputs anyway), each batch's x^T x rounds x to bf16 and sums the exact products in fp32, so H
    is the Gram matrix of the rounded inputs and positive semi-definite; on a CPU by the fastest
    route it has (:func:`treeq.engine.calib_precision.cpu_statistics`). (Rounding a bf16 GEMM's output to
    bf16 instead made Cholesky need 5x the damping.)

    Per-subset derived quantities (a factorised inverse, a permutation) are cached here so modules
    that share an input compute them once.
    """

    def __init__(self, in_features: int, device: torch.device, dtype: torch.dtype = torch.float32):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.dtype = dtype
        # How x^T x of the rounded inputs is accumulated in fp32 (treeq.engine.calib_precision.cpu_statistics).
        low_precision_cpu = dtype != torch.float32 and torch.device(device).type == "cpu"
        self.route = cpu_statistics() if low_precision_cpu else "fp32"
        self.tokens = 0
        # Each input channel's range seen: migrations balance it (SmoothQuant), static activation
        # schemes take their levels from it.
        self.low = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.high = torch.zeros(in_features, dtype=torch.float32, device=device)
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        n = x.shape[0]
        torch.minimum(self.low, x.amin(dim=0).float(), out=self.low)
        torch.maximum(self.high, x.amax(dim=0).float(), out=self.high)
        # Running mean keeps H's scale independent of the token count.
        keep, alpha = self.tokens / (self.tokens + n), 1.0 / (self.tokens + n)
        if self.route == "kernel":
            gram_bf16.gram_update(self.h, x if x.dtype == torch.bfloat16 else x.float(), keep, alpha)
        else:
            # Rounded here, not left to oneDNN's bf16 matmul mode: CPUs without AMX ignore that
            # mode and would accumulate the unrounded inputs.
            x = x.to(self.dtype).float()
            self.h.mul_(keep)
            with _cpu_matmul_inputs(torch.bfloat16 if self.route == "onednn" else torch.float32):
                self.h.addmm_(x.T, x, alpha=alpha)
        self.tokens += n

    @property
    def absmax(self) -> torch.Tensor:
        """Each input channel's largest magnitude seen (the range includes 0)."""
        return torch.maximum(-self.low, self.high)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        # Modules of a subset are quantized in parallel threads; the first computes, others wait.
        with self._lock:
            if key not in self._cache:
                self._cache[key] = compute()
            return self._cache[key]


@contextmanager
def _cpu_matmul_inputs(dtype: torch.dtype):
    """CPU fp32 matmuls round their inputs to ``dtype`` (bf16) and accumulate in fp32 (oneDNN; only
    AMX CPUs apply it, the others ignore it). The setting is process-wide; the looper never runs
    input statistics alongside other matmuls (batches run one at a time, and methods only while
    every batch is paused)."""
    if dtype == torch.float32:
        yield
        return
    setting = torch.backends.mkldnn.matmul
    before, setting.fp32_precision = setting.fp32_precision, "bf16"
    try:
        yield
    finally:
        setting.fp32_precision = before


def row_output_errors(weight: torch.Tensor, quantized: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Each output row's squared error E[(x·(w - q))^2] from H without touching inputs, ROW_CHUNK
    rows at a time: rows are independent, so a method may pick between candidates row by row."""
    errors = []
    for w, q in zip(weight.split(ROW_CHUNK), quantized.split(ROW_CHUNK)):
        delta = w.float() - q.float()
        errors.append(((delta @ h) * delta).sum(dim=1))
    return torch.cat(errors)


def output_error(weight: torch.Tensor, quantized: torch.Tensor, h: torch.Tensor) -> float:
    """Mean squared error of the layer output, E[(x·(W - Q)^T)^2], mean over output rows."""
    return float(row_output_errors(weight, quantized, h).double().sum()) / weight.shape[0]


class Method(ABC):
    name: ClassVar[str]
    # A scale migration (a name in treeq.transforms.TRANSFORMS) this method always runs first, as
    # AWQ is round-to-nearest after AWQ's scale search; None: only the one the config names.
    migration: ClassVar[str | None] = None

    # True when results carry an input transform (QuantResult.transform) for the kernel to apply.
    adds_input_transform: ClassVar[bool] = False

    # True when results carry weight extras (QuantResult.extras), which only treeq's loader reads.
    adds_weight_extras: ClassVar[bool] = False

    # Bit widths the method quantizes to; None: every width the grid allows.
    bits: ClassVar[tuple[int, ...] | None] = None

    # Grids whose codes the method produces; None: any grid in treeq.numerics.GRIDS. A method with a
    # grid of its own must list only it, or checkpoints would record a grid the codes are not on.
    grids: ClassVar[tuple[str, ...] | None] = None

    # ``QuantConfig.clip_search`` when the user leaves it unset.
    default_clip_search: ClassVar[bool] = False

    # The pydantic model that validates ``QuantConfig.options`` for this method; None: no options.
    Options: ClassVar[type[pydantic.BaseModel] | None] = None

    def __init__(self, config, scheme: WeightScheme | None = None):
        """``scheme``: the weight scheme of the modules this instance quantizes (a per-module
        override's), by default the config's."""
        self.config = config
        self.scheme = scheme or config.weights
        self.grid = make_grid(self.scheme.grid, self.scheme.bits, self.scheme.sym, bool(self.scheme.clip_search))
        self.options = self.parse_options(config.options)

    @classmethod
    def parse_options(cls, options: dict) -> pydantic.BaseModel | None:
        """Validated options; raises ValueError naming ``options.<field>`` and what is allowed."""
        return parse_settings(cls.Options, options, "options", f"method {cls.name!r}")

    @classmethod
    def reorders_columns(cls, options: pydantic.BaseModel | None) -> bool:
        """Whether these (parsed) options make groups other than contiguous runs of input channels
        (g_idx)."""
        return False

    def stats(self, in_features: int, device: torch.device) -> InputStats:
        return InputStats(in_features, device, calibration_dtype(self.config.calibration.calib_dtype, device))

    def group_size(self, in_features: int) -> int:
        return group_width(self.scheme.group_size, in_features)

    @abstractmethod
    def quantize(self, weight: torch.Tensor, stats: InputStats) -> QuantResult:
        """Quantize one [out, in] weight given its subset's input statistics."""

    def round(self, weight: torch.Tensor, grid: Grid | None = None) -> QuantResult:
        """Round-to-nearest on this method's scheme (or on ``grid``, at the scheme's group size):
        codes and grid params of ``weight``, each group on its own grid; loss not set. Scale
        migrations judge their scales by it."""
        grid = (grid or self.grid).for_weight(weight)
        w = grid.prepare(weight.float())
        out, n_in = w.shape
        gs = self.group_size(n_in)
        groups = w.reshape(out, n_in // gs, gs).transpose(0, 1)  # [groups, out, gs]
        scales, zeros = zip(*(grid.params(g) for g in groups))
        scales, zeros = torch.stack(scales), torch.stack(zeros)
        codes = grid.quantize(groups, scales[..., None], zeros[..., None])
        codes = codes.transpose(0, 1).reshape(out, n_in).to(torch.uint8)
        g_idx = torch.arange(n_in, device=w.device, dtype=torch.int32) // gs
        return QuantResult(codes, scales.half(), zeros.int(), g_idx, loss=math.nan, grid=grid.name)
