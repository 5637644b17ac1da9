"""Build a quantized model from a checkpoint directory without materialising fp weights."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from . import packing
from .awq_format import as_treeq_config, from_awq
from .awq_format import linear_shape as awq_linear_shape
from .checkpoint import QUANT_CONFIG_NAME, set_module
from .errors import TreeqError
from .experts import unfuse_experts
from .kernels import LinearFormat, explain
from .models import spec_for
from .numerics import GRIDS, UniformGrid
from .quant_linear import QuantLinear

log = logging.getLogger(__name__)


def read_quantization_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise TreeqError(f"{path} has no config.json; give a directory written by `treeq quantize`")
    qcfg = json.loads(cfg_file.read_text()).get("quantization_config")
    if qcfg is None and (path / QUANT_CONFIG_NAME).is_file():
        qcfg = json.loads((path / QUANT_CONFIG_NAME).read_text())
    if qcfg is not None and qcfg.get("quant_method") == "awq":
        return as_treeq_config(qcfg)
    if qcfg is None or qcfg.get("quant_method") != "gptq":
        raise TreeqError(f"{path} is not a GPTQ- or AWQ-format quantized checkpoint (no such quantization_config)")
    if qcfg.get("checkpoint_format", "gptq") != "gptq_v2":
        raise TreeqError(
            f"{path}: checkpoint_format {qcfg.get('checkpoint_format')!r} is not supported yet (gptq_v2 is)"
        )
    return qcfg


def linear_shape(qcfg: dict, qweight_shape) -> tuple[int, int]:
    """(in_features, out_features) of a quantized linear from its stored qweight's shape."""
    if qcfg.get("checkpoint_format") == "awq_gemm":
        return awq_linear_shape(qweight_shape)
    return qweight_shape[0] * packing.WORD_BITS // qcfg["bits"], qweight_shape[1]


def linear_format_from(qcfg: dict, in_features: int, out_features: int) -> LinearFormat:
    """The format of one quantized linear as the checkpoint's quantization_config describes it."""
    grid = qcfg.get("grid", UniformGrid.name)
    if grid not in GRIDS:
        raise TreeqError(f"unknown grid {grid!r} in quantization_config; this treeq knows {', '.join(GRIDS)}")
    offset = qcfg.get("grid_offset", GRIDS[grid].offset)
    if offset != GRIDS[grid].offset:
        raise TreeqError(f"grid {grid!r} has offset {GRIDS[grid].offset}, but quantization_config records {offset}")
    return LinearFormat(
        bits=qcfg["bits"],
        group_size=qcfg["group_size"],
        sym=qcfg["sym"],
        desc_act=qcfg["desc_act"],
        in_features=in_features,
        out_features=out_features,
        grid=grid,
    )


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise TreeqError(f"{path} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def load_quantized(path, device: str = "cpu", dtype: torch.dtype = torch.float32, kernel: str | None = None):
    """Returns (model, tokenizer) ready for inference, each quantized linear bound to a kernel."""
    path = Path(path)
    qcfg = read_quantization_config(path)
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    spec = spec_for(config)  # unsupported architectures fail here, with the list of supported ones
    state = _state_dict(path)
    if qcfg.get("checkpoint_format") == "awq_gemm":
        state = from_awq(state, qcfg["group_size"])
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    unfuse_experts(model, spec)  # checkpoints hold one set of quantized tensors per expert
    quantized = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    rotation = qcfg.get("input_transform", {}).get("rotation", {})
    for name in quantized:
        linear = model.get_submodule(name)
        fmt = linear_format_from(qcfg, linear.in_features, linear.out_features)
        krot = None
        if f"{name}.channel_scales" in state:
            pairs = state.get(f"{name}.pairs")
            krot = 0 if pairs is None else pairs.shape[0]
        layer = QuantLinear(fmt, linear.bias is not None, dtype, krot, rotation.get("group_size", 0))
        set_module(model, name, layer)
    # Assigning takes each tensor's own dtype; the rest of the model (embeddings, norms, lm_head)
    # must run in ``dtype`` too, or an fp32 lm_head dominates a bf16 decode step.
    inside = tuple(f"{name}." for name in quantized)
    state = {k: v.to(dtype) if v.is_floating_point() and not k.startswith(inside) else v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise TreeqError(f"{path}: weights not in the model: {', '.join(result.unexpected_keys[:5])}")
    model.tie_weights()
    still_empty = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_empty:
        raise TreeqError(f"{path}: checkpoint lacks weights for {', '.join(still_empty[:5])}")
    model.to(device).eval()
    device_type = torch.device(device).type
    chosen: Counter = Counter()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            module.select_kernel(device_type, dtype, kernel)
            chosen[module.kernel.name] += 1
            if log.isEnabledFor(logging.DEBUG):  # every kernel's reasons, worked out only when shown
                for other, reason in explain(module.fmt, device_type, dtype).items():
                    if reason:
                        log.debug("%s: kernel %s rejected: %s", name, other, reason)
    log.info("kernels on %s/%s: %s", device_type, dtype, ", ".join(f"{k} x{n}" for k, n in chosen.items()))
    return model, AutoTokenizer.from_pretrained(path)
