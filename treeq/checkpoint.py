"""Checkpoints: packed safetensors, quantize_config.json, the matching config.json and a model card.

In memory every quantized linear is in treeq's GPTQ layout with zero points as they are (GPTQ v2);
``laid_out`` turns that into what the weight scheme's ``format`` names: GPTQ v1 or v2
(:mod:`treeq.gptq_format`), AutoAWQ's GEMM layout or compressed-tensors' pack-quantized one. The
unquantized tensors are stored in ``QuantConfig.checkpoint.storage_dtype`` (fp16 by default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from . import compressed_tensors_format, gptq_format
from .atomic import atomic_directory
from .awq_format import awq_quantization_config, to_awq
from .config import QuantConfig
from .errors import TreeqError
from .kernels import LinearFormat
from .methods import METHODS, QuantResult
from .model_card import QUANT_CONFIG_NAME, write_model_card
from .numerics import INTEGER_ZERO_GRIDS, make_grid
from .quant_linear import QuantLinear
from .quant_log import QuantLog
from .schemes import WeightScheme, scheme_for
from .version import __version__

WEIGHTS_NAME = "model.safetensors"
# Method options that GPTQ loaders' quantize_config also names, recorded where a method has them.
GPTQ_METHOD_FIELDS = ("static_groups", "damp_percent")
TREEQ_QUANT_METHOD = "treeq"  # checkpoints only treeq.load computes correctly


def linear_format(scheme: WeightScheme, linear: nn.Linear, desc_act: bool, sym: bool) -> LinearFormat:
    return LinearFormat(
        bits=scheme.bits,
        group_size=scheme.group_size,
        sym=sym,
        desc_act=desc_act,
        in_features=linear.in_features,
        out_features=linear.out_features,
        grid=scheme.grid,
    )


def module_scheme(config: QuantConfig, name: str) -> WeightScheme:
    """The weight scheme a quantized module ``name`` was written with."""
    scheme = scheme_for(name, config.weights, config.overrides)
    if scheme is None:
        raise ValueError(f"{name} was quantized although an override skips it")
    return scheme


def schemes(config: QuantConfig) -> list[WeightScheme]:
    """Every weight scheme the config can give a module: its own and each override's."""
    return [config.weights] + [o.apply(config.weights) for o in config.overrides if not o.skip]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def reorders(results: dict[str, QuantResult]) -> bool:
    """The checkpoint's desc_act: whether any module's g_idx is really permuted. RTN, or act-order
    with static groups, keeps groups contiguous, so kernels without g_idx support can run them."""
    return any(r.reorders for r in results.values())


def symmetric(results: dict[str, QuantResult], config: QuantConfig) -> bool:
    """The checkpoint's sym: true only if every zero point written is the middle code, so kernels
    that ignore qzeros stay exact (a method may learn zero points even when ``sym`` was asked)."""
    def pinned(name: str, r: QuantResult) -> bool:
        scheme = module_scheme(config, name)
        return scheme.sym and bool((r.zeros == 2 ** (scheme.bits - 1)).all())

    return all(pinned(name, r) for name, r in results.items())


def input_transform(results: dict[str, QuantResult]) -> dict | None:
    """What ``quantization_config`` records about the modules' input transform, if any."""
    kinds = {json.dumps(r.transform.describe(), sort_keys=True) for r in results.values() if r.transform is not None}
    if len(kinds) > 1:
        raise ValueError(f"modules carry different input transforms ({sorted(kinds)}); the format records one")
    return json.loads(kinds.pop()) if kinds else None


@dataclass(frozen=True)
class FormatSummary:
    """What the checkpoint-wide quantization_config says about the modules written: built from one
    results dict, or merged layer by layer when layers are streamed out and freed."""

    modules: tuple[str, ...]
    desc_act: bool
    sym: bool
    transform: dict | None

    @classmethod
    def of(cls, results: dict[str, QuantResult], config: QuantConfig) -> "FormatSummary":
        return cls(tuple(sorted(results)), reorders(results), symmetric(results, config), input_transform(results))

    def merge(self, other: "FormatSummary") -> "FormatSummary":
        if self.transform is not None and other.transform is not None and self.transform != other.transform:
            raise ValueError(f"modules carry different input transforms ({self.transform}, {other.transform})")
        return FormatSummary(
            tuple(sorted(self.modules + other.modules)),
            self.desc_act or other.desc_act,
            self.sym and other.sym,
            self.transform if self.transform is not None else other.transform,
        )


def swap_in_quantized(model: nn.Module, results: dict[str, QuantResult], config: QuantConfig) -> None:
    desc_act, sym = reorders(results), symmetric(results, config)
    for name, result in results.items():
        linear = model.get_submodule(name)
        fmt = linear_format(module_scheme(config, name), linear, desc_act, sym)
        set_module(model, name, QuantLinear.from_result(fmt, result, linear.bias))


def other_loaders_run(config: QuantConfig) -> bool:
    """Whether GPTQ loaders (GPTQModel, transformers, vLLM) compute what treeq does with this
    checkpoint: integer zero points without a grid offset, and no input transform."""
    grids_run = all(s.grid in INTEGER_ZERO_GRIDS for s in schemes(config))
    return grids_run and not METHODS[config.method].adds_input_transform


def zero_point_version(config: QuantConfig) -> str:
    """GPTQ v1 for symmetric checkpoints other loaders run (unless v2 is asked for); v2 otherwise,
    since v1 cannot hold an asymmetric zero point of 0."""
    all_sym = all(s.sym for s in schemes(config))
    v1 = config.checkpoint.gptq_version == 1 and all_sym and other_loaders_run(config)
    return gptq_format.V1 if v1 else gptq_format.V2


def treeq_meta(config: QuantConfig, summary: FormatSummary, source: str | None) -> dict:
    """treeq's own record, under ``meta`` where GPTQ loaders do not mistake it for their fields."""
    meta = {
        "quantizer": [f"treeq:{__version__}"],
        "treeq_version": __version__,
        "method": config.method,
        "settings": config.model_dump(),
        "source": source,
        "modules": list(summary.modules),
    }
    if config.weights.format == "gptq":
        meta["zero_points"] = zero_point_version(config)
    return meta


def gptq_dynamic(overrides) -> dict:
    """Per-module overrides in GPTQModel's and vLLM's ``dynamic`` form: "-:" skips, "+:" changes
    fields; patterns keep their meaning, since both sides match with re.match, first match first."""
    return {("-:" if o.skip else "+:") + o.pattern: o.changes() for o in overrides}


def gptq_quantization_config(config: QuantConfig, summary: FormatSummary, meta: dict) -> dict:
    if summary.transform is not None and other_loaders_run(config):
        raise ValueError(f"{config.method} wrote an input transform it does not declare (adds_input_transform)")
    version = zero_point_version(config)
    w = config.weights
    options = METHODS[config.method].parse_options(config.options)
    method_fields = {k: v for k, v in (options.model_dump() if options else {}).items() if k in GPTQ_METHOD_FIELDS}
    qcfg = {
        # Loaders that would run an offset grid or an input transform as plain GPTQ do not know
        # this method name, so they refuse the checkpoint instead of computing wrong outputs.
        "quant_method": "gptq" if other_loaders_run(config) else TREEQ_QUANT_METHOD,
        # GPTQModel reads `format`, older tools `checkpoint_format`: both say the same.
        "format": version,
        "checkpoint_format": version,
        "pack_dtype": "int32",
        "bits": w.bits,
        "group_size": w.group_size,
        "desc_act": summary.desc_act,
        "sym": summary.sym,
        **method_fields,
        "true_sequential": config.calibration.true_sequential,
        **make_grid(w.grid, w.bits, w.sym).describe(),
        "meta": meta,
    }
    if config.overrides:
        qcfg["dynamic"] = gptq_dynamic(config.overrides)
    if summary.transform is not None:
        # y = rotate(x / channel_scales) @ dequant(qweight)^T: per module buffers channel_scales
        # (fp32 [in]) and, with rotation, pairs (int16 [krot, in]) and theta (fp32 [krot, in/2]).
        qcfg["input_transform"] = summary.transform
    return qcfg


def quantization_config(
    config: QuantConfig, summary: FormatSummary, source: str | None = None, unquantized: list[str] = ()
) -> dict:
    """What config.json's quantization_config (and quantize_config.json) say, in the terms of the
    loaders of ``config.checkpoint_format``. ``unquantized``: the linears left in full precision."""
    meta, w = treeq_meta(config, summary, source), config.weights
    if w.format == "awq":
        return awq_quantization_config(w.bits, w.group_size, meta)
    if w.format == "compressed-tensors":
        return compressed_tensors_format.quantization_config(w.bits, summary.sym, w.group_size, list(unquantized), meta)
    return gptq_quantization_config(config, summary, meta)


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the second name of tied tensors (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
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


def laid_out(tensors: dict[str, torch.Tensor], config: QuantConfig) -> dict[str, torch.Tensor]:
    """A state dict in treeq's GPTQ layout (v2 zero points), as ``config`` says to write it."""
    tensors, w = in_storage_dtype(tensors, config.checkpoint.storage_dtype), config.weights
    if w.format == "awq":
        return to_awq(tensors, w.group_size)
    if w.format == "compressed-tensors":
        return compressed_tensors_format.to_compressed_tensors(tensors, w.bits, w.sym, w.group_size)
    if zero_point_version(config) == gptq_format.V1:
        return gptq_format.to_v1(tensors, lambda name: module_scheme(config, name).bits)
    return tensors


def source_name(model_path: str | Path | None) -> str | None:
    """How a checkpoint names the model it came from: the directory's name, never a local path."""
    return Path(model_path).name if model_path else None


def unquantized_linears(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def write_metadata(
    directory: Path, model, tokenizer, config: QuantConfig, summary: FormatSummary, log: QuantLog, source: str | None
) -> None:
    """Everything of a checkpoint but its weights: config.json with quantization_config (and the
    storage dtype), quantize_config.json, the tokenizer, quant_log.csv and the model card."""
    qcfg = quantization_config(config, summary, source, unquantized_linears(model))
    cfg = json.loads(model.config.to_json_string())
    cfg["dtype"] = config.checkpoint.storage_dtype
    cfg["quantization_config"] = qcfg
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    (directory / QUANT_CONFIG_NAME).write_text(json.dumps(qcfg, indent=2))
    tokenizer.save_pretrained(directory)
    log.save(directory)
    write_model_card(directory, qcfg)


def save_quantized(
    model,
    tokenizer,
    config: QuantConfig,
    results: dict[str, QuantResult],
    out: Path,
    log: QuantLog,
    source: str | None = None,
) -> Path:
    out = Path(out)
    round_to_storage_(model, config.checkpoint.storage_dtype)
    with atomic_directory(out) as tmp:
        save_file(laid_out(_unique_tensors(model), config), tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        write_metadata(tmp, model, tokenizer, config, FormatSummary.of(results, config), log, source)
    return out
