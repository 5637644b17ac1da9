"""GPTQ-format checkpoints: packed safetensors, quantize_config.json, and the matching config.json.

Zero points are stored as they are (`checkpoint_format: gptq_v2`), not minus one as GPTQ v1 did,
so asymmetric grids with a zero point of 0 survive the round trip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .version import __version__
from .atomic import atomic_directory
from .awq_format import awq_quantization_config, to_awq
from .config import QuantConfig
from .kernels import LinearFormat
from .methods import QuantResult
from .numerics import make_grid
from .quant_linear import QuantLinear
from .quant_log import QuantLog

WEIGHTS_NAME = "model.safetensors"
QUANT_CONFIG_NAME = "quantize_config.json"


def linear_format(config: QuantConfig, linear: nn.Linear, desc_act: bool, sym: bool) -> LinearFormat:
    return LinearFormat(
        bits=config.bits,
        group_size=config.group_size,
        sym=sym,
        desc_act=desc_act,
        in_features=linear.in_features,
        out_features=linear.out_features,
        grid=config.grid,
    )


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
    mid = 2 ** (config.bits - 1)
    return config.sym and all(bool((r.zeros == mid).all()) for r in results.values())


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
        fmt = linear_format(config, linear, desc_act, sym)
        set_module(model, name, QuantLinear.from_result(fmt, result, linear.bias))


def quantization_config(config: QuantConfig, summary: FormatSummary, source: str | None = None) -> dict:
    qcfg = {
        "quant_method": "gptq",
        "format": "gptq",
        "checkpoint_format": "gptq_v2",
        "pack_dtype": "int32",
        "bits": config.bits,
        "group_size": config.group_size,
        "desc_act": summary.desc_act,
        "sym": summary.sym,
        "static_groups": config.static_groups,
        "true_sequential": config.true_sequential,
        "damp_percent": config.damp_percent,
        "method": config.method,
        **make_grid(config.grid, config.bits, config.sym).describe(),
        "meta": {
            "quantizer": [f"treeq:{__version__}"],
            "treeq_version": __version__,
            "method": config.method,
            "settings": config.model_dump(),
            "source": source,
            "modules": list(summary.modules),
        },
    }
    if config.checkpoint_format == "awq":
        return awq_quantization_config(qcfg)
    transform = summary.transform
    if transform is not None:
        # y = rotate(x / channel_scales) @ dequant(qweight)^T: per module buffers channel_scales
        # (fp32 [in]) and, with rotation, pairs (int16 [krot, in]) and theta (fp32 [krot, in/2]).
        qcfg["input_transform"] = transform
    return qcfg


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


def laid_out(tensors: dict[str, torch.Tensor], config: QuantConfig) -> dict[str, torch.Tensor]:
    """A state dict in treeq's GPTQ layout, as ``config.checkpoint_format`` writes it."""
    return to_awq(tensors, config.group_size) if config.checkpoint_format == "awq" else tensors


def write_metadata(directory: Path, model_config, tokenizer, qcfg: dict, log: QuantLog) -> None:
    """Everything of a checkpoint but its weights: config.json with quantization_config,
    quantize_config.json, the tokenizer and quant_log.csv."""
    cfg = json.loads(model_config.to_json_string())
    cfg["quantization_config"] = qcfg
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    (directory / QUANT_CONFIG_NAME).write_text(json.dumps(qcfg, indent=2))
    tokenizer.save_pretrained(directory)
    log.save(directory)


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
    qcfg = quantization_config(config, FormatSummary.of(results, config), source)
    with atomic_directory(out) as tmp:
        save_file(laid_out(_unique_tensors(model), config), tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        write_metadata(tmp, model.config, tokenizer, qcfg, log)
    return out
