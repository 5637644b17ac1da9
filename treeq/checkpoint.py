"""GPTQ-format checkpoints: packed safetensors, quantize_config.json, and the matching config.json.

Zero points are stored as they are (`checkpoint_format: gptq_v2`), not minus one as GPTQ v1 did,
so asymmetric grids with a zero point of 0 survive the round trip.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from . import __version__
from .atomic import atomic_directory
from .config import QuantConfig
from .kernels import LinearFormat
from .methods import QuantResult
from .quant_linear import QuantLinear
from .quant_log import QuantLog

WEIGHTS_NAME = "model.safetensors"
QUANT_CONFIG_NAME = "quantize_config.json"


def linear_format(config: QuantConfig, linear: nn.Linear, desc_act: bool) -> LinearFormat:
    return LinearFormat(
        bits=config.bits,
        group_size=config.group_size,
        sym=config.sym,
        desc_act=desc_act,
        in_features=linear.in_features,
        out_features=linear.out_features,
    )


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def reorders(results: dict[str, QuantResult]) -> bool:
    """The checkpoint's desc_act: whether any module's g_idx is really permuted. RTN, or act-order
    with static groups, keeps groups contiguous, so kernels without g_idx support can run them."""
    return any(r.reorders for r in results.values())


def swap_in_quantized(model: nn.Module, results: dict[str, QuantResult], config: QuantConfig) -> None:
    desc_act = reorders(results)
    for name, result in results.items():
        linear = model.get_submodule(name)
        set_module(model, name, QuantLinear.from_result(linear_format(config, linear, desc_act), result, linear.bias))


def quantization_config(config: QuantConfig, modules: list[str], desc_act: bool, source: str | None = None) -> dict:
    return {
        "quant_method": "gptq",
        "format": "gptq",
        "checkpoint_format": "gptq_v2",
        "pack_dtype": "int32",
        "bits": config.bits,
        "group_size": config.group_size,
        "desc_act": desc_act,
        "sym": config.sym,
        "static_groups": config.static_groups,
        "true_sequential": config.true_sequential,
        "damp_percent": config.damp_percent,
        "method": config.method,
        "meta": {
            "quantizer": [f"treeq:{__version__}"],
            "treeq_version": __version__,
            "method": config.method,
            "settings": config.model_dump(),
            "source": source,
            "modules": modules,
        },
    }


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
    qcfg = quantization_config(config, sorted(results), reorders(results), source)
    with atomic_directory(out) as tmp:
        save_file(_unique_tensors(model), tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        write_metadata(tmp, model.config, tokenizer, qcfg, log)
    return out
