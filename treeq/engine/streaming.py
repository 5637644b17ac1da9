"""Low-memory quantization: at most one decoder layer's fp weights in memory.

The model is built as a skeleton without weights and only the modules around the decoder layers
(embeddings, final norm, head) are loaded. Each layer is read from the source safetensors shards
just before the looper quantizes it; afterwards its quantized tensors are written to an output
shard of their own and the layer goes back to the skeleton (the meta device).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import QuantConfig
from ..errors import TreeqError
from ..formats import FormatSummary
from ..methods import QuantResult
from ..models import TreeSpec
from ..storage.checkpoint import laid_out, summary_of, swap_in_quantized
from .memory import release_free_heap

INDEX_NAME = "model.safetensors.index.json"


class ShardReader:
    """Reads single tensors from a directory of safetensors shards, never a whole shard."""

    def __init__(self, directory: Path):
        files = sorted(Path(directory).glob("*.safetensors"))
        if not files:
            raise TreeqError(f"{directory} has no .safetensors weights; --low-memory streams from them")
        self.where: dict[str, Path] = {}
        for f in files:
            with safe_open(f, "pt") as handle:
                self.where.update(dict.fromkeys(handle.keys(), f))

    def get(self, key: str) -> torch.Tensor:
        with safe_open(self.where[key], "pt") as handle:
            return handle.get_tensor(key)


def load_into(module: nn.Module, prefix: str, reader: ShardReader, skip: str | None = None) -> None:
    """Give ``module``'s tensors named ``prefix`` + name their stored values (in the skeleton's
    dtypes), except names under ``skip``; tensors the shards lack (tied ones) stay as they are."""
    wanted = {n: t for n, t in module.state_dict(keep_vars=True).items() if not (skip and n.startswith(skip))}
    state = {n: reader.get(prefix + n).to(t.dtype) for n, t in wanted.items() if prefix + n in reader.where}
    module.load_state_dict(state, strict=False, assign=True)


def _check_loaded(module: nn.Module, what: str) -> None:
    empty = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if empty:
        raise TreeqError(f"the model's shards lack weights for {what}: {', '.join(empty[:5])}")


class LayerStream:
    """Loads each decoder layer before the looper quantizes it and writes it out afterwards."""

    def __init__(self, model: nn.Module, spec: TreeSpec, config: QuantConfig, reader: ShardReader, out: Path):
        self.model, self.spec, self.config, self.reader, self.out = model, spec, config, reader, out
        self.shards = len(model.get_submodule(spec.layers)) + 1  # one per layer, one for the rest
        self.weight_map: dict[str, str] = {}
        self.summary = FormatSummary((), False, True, None)  # the identity of merge

    def _shard_name(self, number: int) -> str:
        return f"model-{number:05d}-of-{self.shards:05d}.safetensors"

    def _write(self, tensors: dict[str, torch.Tensor], number: int) -> None:
        name = self._shard_name(number)
        save_file(tensors, self.out / name, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, name))

    def load_surroundings(self) -> None:
        load_into(self.model, "", self.reader, skip=f"{self.spec.layers}.")
        self.model.tie_weights()
        for path in (*self.spec.before, *self.spec.after):
            _check_loaded(self.model.get_submodule(path), path)

    def inputs_captured(self) -> None:
        """The looper has the layers' inputs: embeddings and head are not needed until the end,
        and finish() copies them from the source shards. (On a 6 GB Llama they are 400 MB.)"""
        for path in (*self.spec.before, *self.spec.after):
            self.model.get_submodule(path).to("meta")
        release_free_heap()

    def load(self, index: int, layer: nn.Module) -> None:
        load_into(layer, f"{self.spec.layers}.{index}.", self.reader)
        _check_loaded(layer, f"{self.spec.layers}.{index}")

    def emit(self, index: int, layer: nn.Module, results: dict[str, QuantResult]) -> None:
        swap_in_quantized(self.model, results, self.config)
        prefix = f"{self.spec.layers}.{index}."
        tensors = {prefix + n: t.detach().cpu().contiguous() for n, t in layer.state_dict().items()}
        self._write(laid_out(tensors, self.config, self.spec), index + 1)
        self.summary = self.summary.merge(summary_of(results, self.config))
        layer.to("meta")  # the looper hands the freed pages back once the layer is done

    def finish(self) -> None:
        """The tensors outside the decoder layers, from the source in the storage dtype, and the
        shard index."""
        self.model.to("meta")  # its loaded copies of those tensors
        release_free_heap()
        rest = [k for k in self.reader.where if not k.startswith(f"{self.spec.layers}.")]
        self._write(laid_out({k: self.reader.get(k) for k in rest}, self.config, self.spec), self.shards)
        (self.out / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": self.weight_map}, indent=2))
