"""Build a quantized model from a checkpoint directory without materialising fp weights."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pydantic
import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .. import extras as weight_extras
from .. import formats, user_input
from ..engine.experts import unfuse_experts
from ..errors import TreeqError
from ..formats import CheckpointFormat
from ..kernels import LinearFormat, explain
from ..models import spec_for
from ..numerics import GRIDS, SUPPORTED_BITS, UniformGrid, group_width
from ..runtime.input_transform import InputTransform
from ..runtime.kv_choice import attach_kv
from ..runtime.quant_linear import QuantLinear
from ..schemes import ActivationScheme, KVCacheScheme
from .checkpoint import QUANT_CONFIG_NAME, set_module
from .kv_checkpoint import KV_CALIBRATION_NAME, check_layers, stored_kv_calibration
from .names import first_entry, runtime_state

log = logging.getLogger(__name__)


def read_quantization_config(path: Path) -> dict:
    """The checkpoint's quantization_config in the terms the loader reads (bits, group_size, sym,
    desc_act, grid), with ``reader`` naming the format (:mod:`treeq.formats`) that stored it."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise TreeqError(f"{path} has no config.json; give a directory written by `treeq quantize`")
    qcfg = user_input.quantization_config(path)
    if qcfg is None and (path / QUANT_CONFIG_NAME).is_file():
        qcfg = user_input.json_file(path / QUANT_CONFIG_NAME)
    if qcfg is None:
        raise TreeqError(f"{path} is not a quantized checkpoint (config.json has no quantization_config)")
    try:
        fmt = formats.reading(qcfg)
        return {**fmt.reader_config(qcfg), "reader": fmt.name}
    except TreeqError as e:
        raise TreeqError(f"{path}: {e}") from None


def stored_format(qcfg: dict) -> CheckpointFormat:
    return formats.FORMATS[qcfg["reader"]]


def linear_shape(qcfg: dict, packed_shape) -> tuple[int, int]:
    """(in_features, out_features) of a quantized linear from its stored packed codes' shape;
    ``qcfg`` the module's own (:func:`quantized_module_qcfg`)."""
    return stored_format(qcfg).linear_shape(packed_shape, qcfg)


def in_runtime_layout(state: dict[str, torch.Tensor], qcfg: dict) -> dict[str, torch.Tensor]:
    """A stored state dict converted, exactly, to treeq's GPTQ layout with v2 zero points."""
    return stored_format(qcfg).to_runtime(state, qcfg, lambda name: quantized_module_qcfg(qcfg, name)["bits"])


def module_qcfg(qcfg: dict, name: str) -> dict | None:
    """``qcfg`` as it applies to the module ``name``: the first entry of GPTQModel's ``dynamic``
    whose pattern matches (re.match) overrides the checkpoint-wide fields; None where a "-:" entry
    leaves the module unquantized. A changed grid brings its own offset. ``name`` as stored."""
    dynamic = qcfg.get("dynamic", {})
    pattern = first_entry(dynamic, name)
    if pattern is None:
        return qcfg
    if pattern.startswith("-:"):
        return None
    out = {**qcfg, **dynamic[pattern]}
    if "grid" in dynamic[pattern]:
        out.pop("grid_offset", None)
    return out


def linear_format_from(qcfg: dict, in_features: int, out_features: int, extras: str | None = None) -> LinearFormat:
    """The format of one quantized linear as the checkpoint's quantization_config describes it;
    ``extras``: the kind of weight extras its stored tensors hold (treeq.extras), if any."""
    grid = qcfg.get("grid", UniformGrid.name)
    if grid not in GRIDS:
        raise TreeqError(f"unknown grid {grid!r} in quantization_config; this treeq knows {', '.join(GRIDS)}")
    offset = qcfg.get("grid_offset", GRIDS[grid].offset)
    if offset != GRIDS[grid].offset:
        raise TreeqError(f"grid {grid!r} has offset {GRIDS[grid].offset}, but quantization_config records {offset}")
    group = qcfg["group_size"]
    if not isinstance(group, int) or (group != -1 and (group <= 0 or in_features % group)):
        raise TreeqError(f"quantization_config's group_size={group!r} does not divide in_features={in_features}")
    return LinearFormat(
        bits=qcfg["bits"],
        group_size=qcfg["group_size"],
        sym=qcfg["sym"],
        desc_act=qcfg["desc_act"],
        in_features=in_features,
        out_features=out_features,
        grid=grid,
        activation=activation_scheme(qcfg),
        extras=extras,
    )


def recorded_scheme(qcfg: dict, field: str, model: type[pydantic.BaseModel]):
    """The scheme treeq recorded as QuantConfig's ``field`` (``meta.settings``); None where it
    recorded none (older checkpoints, other tools')."""
    recorded = qcfg.get("meta", {}).get("settings", {}).get(field)
    if recorded is None:
        return None
    try:
        return model.model_validate(recorded)
    except pydantic.ValidationError as e:
        problem = e.errors()[0]["msg"]
        raise TreeqError(f"quantization_config's meta.settings.{field} is not a valid scheme: {problem}") from None


def activation_scheme(qcfg: dict) -> ActivationScheme | None:
    """How the checkpoint's linears quantize their inputs; None for weight-only checkpoints."""
    return recorded_scheme(qcfg, "activations", ActivationScheme)


def _check_fields(qcfg: dict) -> dict:
    """A quantization_config that cannot describe the tensors is refused, not run."""
    missing = [k for k in ("bits", "group_size", "sym", "desc_act") if k not in qcfg]
    if missing:
        raise TreeqError(f"quantization_config lacks {', '.join(missing)}; the checkpoint is incomplete")
    if qcfg["bits"] not in SUPPORTED_BITS:
        raise TreeqError(f"quantization_config says bits={qcfg['bits']!r}; treeq reads {list(SUPPORTED_BITS)}")
    if not isinstance(qcfg["sym"], bool) or not isinstance(qcfg["desc_act"], bool):
        raise TreeqError("quantization_config's sym and desc_act must be true or false")
    return qcfg


def quantized_module_qcfg(qcfg: dict, name: str) -> dict:
    """The fields of the quantized module ``name`` (:func:`module_qcfg`), checked."""
    found = module_qcfg(qcfg, name)
    if found is None:
        raise TreeqError(f"{name} has quantized tensors, but the checkpoint's dynamic says it is not quantized")
    return _check_fields(found)


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: one, or the shards --low-memory writes (not the KV calibration)."""
    return sorted(f for f in path.glob("*.safetensors") if f.name != KV_CALIBRATION_NAME)


def checkpoint_weight_files(path: Path) -> list[Path]:
    """:func:`weight_files`, refusing a checkpoint that has none."""
    files = weight_files(path)
    if not files:
        raise TreeqError(f"{path} has no .safetensors weights; copy the checkpoint's model*.safetensors there")
    return files


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    files = checkpoint_weight_files(path)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(f))
        except user_input.READ_ERRORS as e:
            raise user_input.unreadable_weights(f, e) from None
    return state


def load_quantized(path, device: str = "cpu", dtype: torch.dtype = torch.float32, kernel: str | None = None):
    """Returns (model, tokenizer) ready for inference, each quantized linear bound to a kernel."""
    path = user_input.local_path(path, "checkpoint")
    user_input.float_dtype(dtype)
    qcfg = read_quantization_config(path)
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    spec = spec_for(config)  # unsupported architectures fail here, with the list of supported ones
    kv_scheme = recorded_scheme(qcfg, "kv_cache", KVCacheScheme)
    kv_calibration = stored_kv_calibration(path, kv_scheme, device)
    check_layers(kv_calibration, config.get_text_config().num_hidden_layers, path)
    # Formats and dynamic speak the stored names; the model transformers 5 builds, its own.
    state, stored = runtime_state(in_runtime_layout(_state_dict(path), qcfg), spec)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    unfuse_experts(model, spec)  # checkpoints hold one set of quantized tensors per expert
    quantized = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    described = qcfg.get("input_transform")
    for name in quantized:
        linear = model.get_submodule(name)
        extras = weight_extras.stored_for(name, state)
        kind = None if extras is None else extras.kind
        own = quantized_module_qcfg(qcfg, stored[f"{name}.qweight"].removesuffix(".qweight"))
        fmt = linear_format_from(own, linear.in_features, linear.out_features, kind)
        weight_group = group_width(own["group_size"], linear.in_features)
        transform = InputTransform.stored_for(name, state, described, linear.in_features, weight_group)
        layer = QuantLinear(fmt, linear.bias is not None, dtype, transform, extras)
        set_module(model, name, layer)
    # Assigning takes each tensor's own dtype; the rest of the model (embeddings, norms, lm_head)
    # must run in ``dtype`` too, or an fp32 lm_head dominates a bf16 decode step.
    inside = tuple(f"{name}." for name in quantized)
    state = {k: v.to(dtype) if v.is_floating_point() and not k.startswith(inside) else v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # tensors whose shapes the quantization_config does not predict
        first = str(e).strip().splitlines()[-1].strip()
        raise TreeqError(f"{path}: the tensors do not match the quantization_config ({first})") from None
    if result.unexpected_keys:
        raise TreeqError(f"{path}: weights not in the model: {', '.join(result.unexpected_keys[:5])}")
    # A quantized linear's buffers start as zeros, not on the meta device, so a missing one would
    # compute silently wrong; only g_idx may be absent (contiguous groups, its default).
    lacking = [k for k in result.missing_keys if k.startswith(inside) and not k.endswith(".g_idx")]
    if lacking:
        raise TreeqError(f"{path}: checkpoint lacks quantized tensors {', '.join(lacking[:5])}")
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
    attach_kv(model, kv_scheme, kv_calibration, f"stored with {path.name}")
    return model, AutoTokenizer.from_pretrained(path)


def is_quantized_checkpoint(path) -> bool:
    """Whether ``path`` holds a quantized checkpoint, treeq's or another tool's (which the loader
    then reads or refuses with the reason), rather than a full-precision model."""
    path = user_input.local_path(path, "model or checkpoint")
    if (path / QUANT_CONFIG_NAME).is_file():
        return True
    return (path / "config.json").is_file() and user_input.quantization_config(path) is not None
