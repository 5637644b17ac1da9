"""The KV-cache scheme a checkpoint carries and its calibration.

The scheme is ``QuantConfig.kv_cache``, recorded with the other settings in quantize_config.json's
``meta.settings.kv_cache``. A scheme that needs calibration (KVQuant's per-channel key ranges,
non-uniform levels) has its tensors in ``kv_calibration.safetensors`` beside the weights, per layer
``layers.N.key_center`` / ``key_half`` (a range per kv head and channel), ``key_levels`` and
``value_levels``; its metadata holds the scheme it was made for and the sensitivity used, so the
cache refuses it for another scheme as it refuses any calibration (kv_schemes._checked).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..errors import TreeqError
from ..runtime.kv_calibration import KVCalibration, LayerCalibration, needs_calibration
from ..runtime.kvquant import ChannelRange
from ..schemes import KVCacheScheme

KV_CALIBRATION_NAME = "kv_calibration.safetensors"


def _tensors(calibration: KVCalibration) -> dict[str, torch.Tensor]:
    out = {}
    for i, layer in enumerate(calibration.layers):
        parts = {"key_levels": layer.key_levels, "value_levels": layer.value_levels}
        if layer.keys is not None:
            parts |= {"key_center": layer.keys.center, "key_half": layer.keys.half}
        out |= {f"layers.{i}.{k}": t.detach().cpu().contiguous() for k, t in parts.items() if t is not None}
    return out


def save_kv_calibration(directory: Path, calibration: KVCalibration) -> None:
    metadata = {
        "scheme": calibration.scheme.model_dump_json(),
        "sensitivity": calibration.sensitivity,
        "layers": str(len(calibration.layers)),
    }
    save_file(_tensors(calibration), Path(directory) / KV_CALIBRATION_NAME, metadata=metadata)


def load_kv_calibration(path: Path, device: str | torch.device = "cpu") -> KVCalibration:
    """The calibration stored at ``path`` (a kv_calibration.safetensors); one-line errors otherwise."""
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path, device=str(device))
        scheme = KVCacheScheme.model_validate_json(metadata["scheme"])
        count = int(metadata["layers"])
    except (SafetensorError, KeyError, ValueError, OSError) as e:
        raise TreeqError(f"{path} is not a readable KV calibration ({type(e).__name__}: {e})".split("\n")[0]) from None

    def get(i: int, name: str) -> torch.Tensor | None:
        return tensors.get(f"layers.{i}.{name}")

    layers = []
    for i in range(count):
        center, half = get(i, "key_center"), get(i, "key_half")
        keys = None if center is None or half is None else ChannelRange(center, half)
        layers.append(LayerCalibration(keys, get(i, "key_levels"), get(i, "value_levels")))
    return KVCalibration(scheme, layers, metadata.get("sensitivity", KVCalibration.sensitivity))


def stored_kv_calibration(
    path: Path, scheme: KVCacheScheme | None, device: str | torch.device = "cpu"
) -> KVCalibration | None:
    """The calibration a checkpoint directory stores for its recorded ``scheme``; None where the
    scheme needs none."""
    if scheme is None or not needs_calibration(scheme):
        return None
    file = Path(path) / KV_CALIBRATION_NAME
    if not file.is_file():
        raise TreeqError(
            f"{path} records a {scheme.method} KV scheme, which needs calibration, but has no "
            f"{KV_CALIBRATION_NAME}; quantize again with the KV scheme or without it"
        )
    return load_kv_calibration(file, device)


def check_layers(calibration: KVCalibration | None, model_layers: int, path: Path) -> None:
    if calibration is not None and len(calibration.layers) != model_layers:
        raise TreeqError(
            f"{path / KV_CALIBRATION_NAME} calibrates {len(calibration.layers)} layers, the model has {model_layers}"
        )
