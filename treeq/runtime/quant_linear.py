"""The module that replaces an nn.Linear: GPTQ-layout tensors plus the kernel chosen to run them,
and optionally an input transform (:mod:`treeq.runtime.input_transform`, its buffers stored beside the
weight's) and an input quantizer applied before the kernel's matmul."""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import extras as weight_extras
from .. import packing
from ..extras import WeightExtras
from ..kernels import LinearFormat, select_kernel
from ..methods import QuantResult
from ..numerics import SCALE_DTYPE, dequantize_grouped, group_width
from . import input_transform
from .activations import input_quantizer
from .input_transform import InputTransform


class QuantLinear(nn.Module):
    # Buffers that hold the quantized weight (all but bias), as named in checkpoints.
    QUANTIZED_STATE = ("qweight", "qzeros", "scales", "g_idx", *input_transform.BUFFERS, *weight_extras.NAMES)

    def __init__(
        self,
        fmt: LinearFormat,
        bias: bool,
        bias_dtype: torch.dtype = torch.float16,
        transform: InputTransform | None = None,
        extras: WeightExtras | None = None,
    ):
        """``transform``: the input transform whose buffers this layer holds (values to be loaded
        or copied in), or None. ``extras``: the weight extras of kind ``fmt.extras`` it holds, their
        tensors' values taken as they are (their shapes vary per module, e.g. a CSR's nonzeros, so
        loading assigns them rather than copying into buffers shaped in advance)."""
        super().__init__()
        self.fmt = fmt
        self.in_features, self.out_features = fmt.in_features, fmt.out_features
        gs = group_width(fmt.group_size, fmt.in_features)
        groups = fmt.in_features // gs
        pack_rows = packing.period(fmt.bits)
        words_in = fmt.in_features // pack_rows[0] * pack_rows[1]
        words_out = fmt.out_features // pack_rows[0] * pack_rows[1]
        self.register_buffer("qweight", torch.zeros(words_in, fmt.out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, words_out, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, fmt.out_features, dtype=SCALE_DTYPE))
        self.register_buffer("g_idx", torch.arange(fmt.in_features, dtype=torch.int32) // gs)
        self.register_buffer("bias", torch.zeros(fmt.out_features, dtype=bias_dtype) if bias else None)
        stored = {} if transform is None else transform.buffers()
        self.transform_buffers = tuple(stored)
        self.transform_group_size = 0 if transform is None else transform.group_size
        for name, value in stored.items():
            self.register_buffer(name, value.detach().cpu().clone())
        if (extras is None) != (fmt.extras is None) or (extras is not None and extras.kind != fmt.extras):
            raise ValueError(f"weight extras {extras and extras.kind!r} do not match the format's {fmt.extras!r}")
        self.extras_buffers = () if extras is None else tuple(extras.tensors)
        for name, value in ({} if extras is None else extras.tensors).items():
            self.register_buffer(name, value.detach().cpu())
        self.extras_state = None  # the extras as forward applies them, built with the kernel
        self.kernel = None
        self.kernel_state = None
        # Quantizes the matmul's input (treeq.runtime.activations); None: inputs as they come.
        self.input_quantizer = input_quantizer(fmt.activation, fmt.in_features)

    @classmethod
    def from_result(cls, fmt: LinearFormat, result: QuantResult, bias: torch.Tensor | None) -> "QuantLinear":
        bias_dtype = bias.dtype if bias is not None else torch.float16
        layer = cls(fmt, bias is not None, bias_dtype, result.transform, result.extras)
        layer.qweight = packing.pack(result.codes.T.cpu(), fmt.bits)
        layer.qzeros = packing.pack(result.zeros.T.cpu(), fmt.bits).T.contiguous()
        layer.scales = result.scales.cpu().to(SCALE_DTYPE)
        layer.g_idx = result.g_idx.cpu().to(torch.int32)
        if result.input_quantizer is not None:  # the one the model calibrated against, levels and all
            layer.input_quantizer = result.input_quantizer
        if bias is not None:
            layer.bias = bias.detach().cpu().clone()
        return layer

    def codes(self) -> torch.Tensor:
        return packing.unpack(self.qweight, self.fmt.bits).T

    def zeros(self) -> torch.Tensor:
        return packing.unpack(self.qzeros.T.contiguous(), self.fmt.bits).T

    @property
    def extras(self) -> WeightExtras | None:
        if self.fmt.extras is None:
            return None
        return weight_extras.EXTRAS[self.fmt.extras]({n: getattr(self, n) for n in self.extras_buffers})

    def dequantized_weight(self, additive: bool = True) -> torch.Tensor:
        """The weight from the stored tensors, before any input transform; ``additive=False``
        leaves out an additive extra's term (the part a dense kernel multiplies)."""
        tensors = self.codes(), self.scales, self.zeros(), self.g_idx, self.fmt.grid
        e = self.extras
        if e is None or (e.additive and not additive):
            return dequantize_grouped(*tensors)
        return e.dequantize(*tensors)

    @property
    def transform(self) -> InputTransform | None:
        if not self.transform_buffers:
            return None
        return InputTransform.from_buffers(
            {n: getattr(self, n) for n in self.transform_buffers}, self.transform_group_size
        )

    def effective_weight(self) -> torch.Tensor:
        """The dense weight this layer applies to its untransformed input."""
        w, t = self.dequantized_weight(), self.transform
        return w if t is None else t.effective_weight(w)

    def select_kernel(self, device: str, dtype: torch.dtype, force: str | None = None) -> None:
        self.kernel = select_kernel(self.fmt, device, dtype, force)
        self.kernel.prepare(self)
        e = self.extras
        self.extras_state = e if e is not None and e.additive else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):  # the native kernels would read past x's end
            raise RuntimeError(f"input of shape {tuple(x.shape)} to a quantized linear of {self.in_features} inputs")
        if self.kernel is None:
            self.select_kernel(x.device.type, x.dtype)
        transform = self.transform
        if transform is not None:
            x = transform.apply(x)
        if self.input_quantizer is not None and not self.kernel.integer_inputs:
            x = self.input_quantizer(x)
        y = self.kernel.forward(self, x)
        if self.extras_state is None:
            return y
        x2 = x.reshape(-1, x.shape[-1])  # the additive term, e.g. a sparse addmm, in fp32
        return (y.reshape(x2.shape[0], -1).float() + self.extras_state.matmul(x2)).to(y.dtype).reshape(y.shape)

    def extra_repr(self) -> str:
        f = self.fmt
        kernel = self.kernel.name if self.kernel else "unselected"
        t = self.transform
        extra = "" if t is None else f", input_transform={t.describe()}"
        if f.activation is not None:
            extra += f", activations=a{f.activation.bits} {f.activation.granularity}"
        if self.extras is not None:
            extra += f", extras={self.extras.describe(f.in_features, f.out_features)}"
        return f"in={f.in_features}, out={f.out_features}, bits={f.bits}, group={f.group_size}, kernel={kernel}{extra}"
