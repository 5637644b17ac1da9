"""Checkpoints: packed safetensors, quantize_config.json, the matching config.json and a model card.

In memory every quantized linear is in treeq's GPTQ layout with zero points as they are (GPTQ v2);
``laid_out`` turns that into the layout of the weight scheme's ``format`` (:mod:`treeq.formats`),
and the format writes the quantization_config its loaders read. The unquantized tensors are stored
in ``QuantConfig.checkpoint.storage_dtype`` (fp16 by default).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..atomic import atomic_directory
from ..config import QuantConfig
from ..default_model import DEFAULT_MODEL, is_default_model_dir
from ..engine.quant_log import QuantLog
from ..errors import TreeqError
from ..formats import FORMATS, FormatSummary
from ..kernels import LinearFormat
from ..methods import QuantResult
from ..models import TreeSpec, spec_for
from ..numerics import group_width
from ..recipe import RECIPE_NAME, recipe_text
from ..runtime.input_transform import WEIGHT_GROUPS
from ..runtime.kv_calibration import KVCalibration
from ..runtime.quant_linear import QuantLinear
from ..schemes import ActivationScheme, WeightScheme
from ..version import __version__
from .kv_checkpoint import save_kv_calibration
from .model_card import QUANT_CONFIG_NAME, write_model_card
from .names import upstream_dynamic, upstream_name, upstream_state

WEIGHTS_NAME = "model.safetensors"


def linear_format(
    scheme: WeightScheme,
    linear: nn.Linear,
    desc_act: bool,
    sym: bool,
    activation: ActivationScheme | None = None,
    extras: str | None = None,
) -> LinearFormat:
    return LinearFormat(
        bits=scheme.bits,
        group_size=scheme.group_size,
        sym=sym,
        desc_act=desc_act,
        in_features=linear.in_features,
        out_features=linear.out_features,
        grid=scheme.grid,
        activation=activation,
        extras=extras,
    )


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def reorders(results: dict[str, QuantResult]) -> bool:
    """The checkpoint's desc_act: whether any module's g_idx is really permuted. RTN, or act-order
    with static groups, keeps groups contiguous, so kernels without g_idx support can run them."""
    return any(r.reorders for r in results.values())


def learned_zeros(results: dict[str, QuantResult], config: QuantConfig) -> tuple[str, ...]:
    """Modules asked for sym whose method moved zero points off the middle code: a per-module
    record of their sym (an override's) must say False, or loaders would ignore those zero points."""

    def moved(name: str) -> bool:
        scheme = config.quantized_scheme(name)
        return scheme.sym and not bool((results[name].zeros == 2 ** (scheme.bits - 1)).all())

    return tuple(sorted(name for name in results if moved(name)))


def symmetric(results: dict[str, QuantResult], config: QuantConfig, learned: tuple[str, ...] | None = None) -> bool:
    """The checkpoint's sym: true only if every module was asked for sym and no method moved its zero
    points (``learned``: :func:`learned_zeros`, if already known), so kernels that ignore qzeros
    stay exact (a method may learn zero points even when ``sym`` was asked)."""
    learned = learned_zeros(results, config) if learned is None else learned
    return not learned and all(config.quantized_scheme(name).sym for name in results)


def input_transform(results: dict[str, QuantResult], config: QuantConfig) -> dict | None:
    """What ``quantization_config`` records about the modules' input transform, if any. A rotation
    grouped like each module's weights is recorded as such, so that modules of different widths
    (group_size -1) or group sizes (overrides) share the one record the format keeps."""

    def described(name: str, r: QuantResult) -> str:
        record = r.transform.describe()
        rot = record.get("rotation")
        if rot and rot["group_size"] == group_width(config.quantized_scheme(name).group_size, r.codes.shape[1]):
            rot["group_size"] = WEIGHT_GROUPS
        return json.dumps(record, sort_keys=True)

    kinds = {described(name, r) for name, r in results.items() if r.transform is not None}
    if len(kinds) > 1:
        raise ValueError(f"modules carry different input transforms ({sorted(kinds)}); the format records one")
    return json.loads(kinds.pop()) if kinds else None


def summary_of(results: dict[str, QuantResult], config: QuantConfig) -> FormatSummary:
    modules = tuple(sorted(results))
    extras = tuple(sorted({r.extras.kind for r in results.values() if r.extras is not None}))
    learned = learned_zeros(results, config)
    return FormatSummary(
        modules,
        reorders(results),
        symmetric(results, config, learned),
        input_transform(results, config),
        extras,
        learned,
    )


def swap_in_quantized(model: nn.Module, results: dict[str, QuantResult], config: QuantConfig) -> None:
    desc_act, sym = reorders(results), symmetric(results, config)
    for name, result in results.items():
        linear = model.get_submodule(name)
        kind = None if result.extras is None else result.extras.kind
        fmt = linear_format(config.quantized_scheme(name), linear, desc_act, sym, config.activations, kind)
        set_module(model, name, QuantLinear.from_result(fmt, result, linear.bias))


def treeq_meta(config: QuantConfig, summary: FormatSummary, source: str | None) -> dict:
    """treeq's own record, under ``meta`` where GPTQ loaders do not mistake it for their fields."""
    return {
        "quantizer": [f"treeq:{__version__}"],
        "treeq_version": __version__,
        "method": config.method,
        "settings": config.model_dump(),
        "source": source,
        "modules": list(summary.modules),
    }


def quantization_config(
    config: QuantConfig,
    summary: FormatSummary,
    source: str | None = None,
    unquantized: list[str] = (),
    spec: TreeSpec | None = None,
) -> dict:
    """What config.json's quantization_config (and quantize_config.json) say, in the terms of the
    loaders of the config's format. ``unquantized``: the linears left in full precision. Module
    names (in memory) are written as ``spec``'s original checkpoints spell them."""
    if spec is None or not spec.checkpoint_names:
        meta = treeq_meta(config, summary, source)
        return FORMATS[config.weights.format].quantization_config(config, summary, meta, list(unquantized))
    modules = (*summary.modules, *unquantized)
    stored = replace(summary, modules=tuple(sorted(upstream_name(spec, m) for m in summary.modules)))
    qcfg = quantization_config(config, stored, source, [upstream_name(spec, m) for m in unquantized])
    if "dynamic" in qcfg:
        qcfg["dynamic"] = upstream_dynamic(qcfg["dynamic"], spec, modules)
    return qcfg


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the second name of tied tensors (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict().items():
        if t.numel() and t.data_ptr() in seen:  # empty tensors (a CSR without entries) share no storage
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().cpu().contiguous()
    return out


def _unquantized_floats(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors outside the quantized state (a quantized linear's bias is
    outside it; its scales stay fp16 and its input transform fp32)."""
    quantized = tuple(k[: -len("qweight")] for k in tensors if k.endswith(".qweight"))
    return [
        k
        for k, t in tensors.items()
        if t.is_floating_point() and not (k.startswith(quantized) and not k.endswith(".bias"))
    ]


def in_storage_dtype(tensors: dict[str, torch.Tensor], dtype_name: str) -> dict[str, torch.Tensor]:
    """The unquantized tensors cast to the checkpoint's storage dtype."""
    dtype = getattr(torch, dtype_name)
    out = dict(tensors)
    for key in _unquantized_floats(tensors):
        cast = tensors[key].to(dtype)
        if not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(tensors[key]).all()):
            raise TreeqError(f"{key} has values beyond {dtype_name}'s range; store it with --dtype bfloat16")
        out[key] = cast
    return out


def round_to_storage_(model: nn.Module, dtype_name: str) -> None:
    """Round the model's unquantized tensors, in place and in their own dtype, to the values the
    checkpoint stores, so the model in memory computes what the checkpoint does."""
    state = model.state_dict()
    for key, value in in_storage_dtype({k: state[k] for k in _unquantized_floats(state)}, dtype_name).items():
        state[key].copy_(value)


def laid_out(tensors: dict[str, torch.Tensor], config: QuantConfig, spec: TreeSpec) -> dict[str, torch.Tensor]:
    """A state dict in treeq's GPTQ layout (v2 zero points), as ``config`` says to write it, under
    the names of ``spec``'s original checkpoints."""
    tensors = in_storage_dtype(tensors, config.checkpoint.storage_dtype)
    return upstream_state(FORMATS[config.weights.format].to_stored(tensors, config), spec)


def source_name(model_path: str | Path | None) -> str | None:
    """How a checkpoint names the model it came from: the built-in model by the name treeq takes it
    by (so `treeq bench` finds it again), any other by its directory's name, never a local path."""
    if not model_path:
        return None
    return DEFAULT_MODEL if is_default_model_dir(model_path) else Path(model_path).name


def unquantized_linears(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def write_metadata(
    directory: Path, model, tokenizer, config: QuantConfig, summary: FormatSummary, log: QuantLog, source: str | None
) -> None:
    """Everything of a checkpoint but its weights: config.json with quantization_config (and the
    storage dtype), quantize_config.json, the tokenizer, quant_log.csv and the model card."""
    qcfg = quantization_config(config, summary, source, unquantized_linears(model), spec_for(model.config))
    cfg = json.loads(model.config.to_json_string())
    cfg["dtype"] = config.checkpoint.storage_dtype
    cfg["quantization_config"] = qcfg
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    (directory / QUANT_CONFIG_NAME).write_text(json.dumps(qcfg, indent=2))
    tokenizer.save_pretrained(directory)
    log.save(directory)
    (directory / RECIPE_NAME).write_text(recipe_text(config))
    write_model_card(directory, qcfg)


def save_quantized(
    model,
    tokenizer,
    config: QuantConfig,
    results: dict[str, QuantResult],
    out: Path,
    log: QuantLog,
    source: str | None = None,
    kv_calibration: KVCalibration | None = None,
) -> Path:
    """``kv_calibration``: what ``config.kv_cache`` was calibrated to, where it needs calibration."""
    out = Path(out)
    round_to_storage_(model, config.checkpoint.storage_dtype)
    with atomic_directory(out) as tmp:
        tensors = laid_out(_unique_tensors(model), config, spec_for(model.config))
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        write_metadata(tmp, model, tokenizer, config, summary_of(results, config), log, source)
        if kv_calibration is not None:
            save_kv_calibration(tmp, kv_calibration)
    return out
