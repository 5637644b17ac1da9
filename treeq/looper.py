"""The generic looper: walks a tree spec layer by layer and hands each subset's inputs to a method.

It knows no method and no architecture by name. Per decoder layer:
1. move the layer to the compute device;
2. for each subset (in spec order): run the layer on the calibration batches until the subset's
   input is produced, accumulate the method's statistics, quantize each module, and put the
   fake-quantized weight in place so later subsets see it (true-sequential);
3. replay the layer with its quantized weights to produce the next layer's inputs.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .methods import InputStats, Method, QuantResult
from .models import Subset, TreeSpec
from .quant_log import ModuleRecord, QuantLog, peak_memory_mb


class _Stop(Exception):
    """Raised from a hook to end a forward pass once what it was run for has been seen."""


@dataclass
class LayerInputs:
    hidden: list[torch.Tensor]  # one [batch, seq, hidden] tensor per calibration batch
    kwargs: list[list[dict[str, Any]]]  # [layer][batch] keyword arguments each layer was called with


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_inputs(model: nn.Module, spec: TreeSpec, batches: list[torch.Tensor], device: torch.device) -> LayerInputs:
    """Layer-0 hidden states and every layer's kwargs (masks, position embeddings), computed once.

    Layers are stood in for by a recorder that passes hidden states through, so nothing but the
    embeddings runs; the pass stops at the first module after the layers. Recording every layer's
    kwargs (not only layer 0's) serves models whose layers differ, e.g. sliding-window ones.
    """
    layers = model.get_submodule(spec.layers)
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict[str, Any]]] = [[] for _ in layers]

    def recorder(index):
        def forward(hidden_states, *args, **kw):
            if index == 0:
                hidden.append(hidden_states)
            kw.pop("past_key_values", None)
            kw["use_cache"] = False
            kwargs[index].append(kw)
            return hidden_states

        return forward

    def stop(*_):
        raise _Stop

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    surrounding = [model.get_submodule(p) for p in (*spec.before, *spec.after)]
    for m in surrounding:
        m.to(device)
    handle = model.get_submodule(spec.after[0]).register_forward_pre_hook(stop)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
        for layer in layers:
            del layer.forward
        for m in surrounding:
            m.to("cpu")
    return LayerInputs(hidden, kwargs)


def _collect(
    layer, subsets: list[Subset], stats: dict[str, InputStats], inputs: LayerInputs, index: int, stop_early: bool
) -> None:
    """Feed each subset's input to its stats; with ``stop_early`` each forward ends right there.

    All modules of a subset read the same tensor, so the first one to run records it for all.
    """
    seen: set[str] = set()

    def hook_for(name):
        def hook(_module, args):
            if name not in seen:
                stats[name].add(args[0])
                seen.add(name)
            if stop_early:
                raise _Stop

        return hook

    handles = [layer.get_submodule(m).register_forward_pre_hook(hook_for(s.name)) for s in subsets for m in s.modules]
    try:
        for h, kw in zip(inputs.hidden, inputs.kwargs[index]):
            seen.clear()
            try:
                layer(h, **kw)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()


def _replay(layer, inputs: LayerInputs, index: int) -> list[torch.Tensor]:
    return [_first_output(layer(h, **kw)) for h, kw in zip(inputs.hidden, inputs.kwargs[index])]


def quantize_layers(
    model: nn.Module,
    spec: TreeSpec,
    method: Method,
    batches: list[torch.Tensor],
    device: torch.device,
    true_sequential: bool = True,
    log: QuantLog | None = None,
    workers: int = 1,
) -> dict[str, QuantResult]:
    """Quantize every module the spec names; returns results by full module name.

    On return each quantized module holds its fake-quantized weight, which equals bit for bit what
    a kernel reconstructs from the packed result. ``workers`` threads quantize the modules of a
    subset side by side; the results are the same for any number of workers.
    """
    log = log or QuantLog()
    layers = model.get_submodule(spec.layers)
    results: dict[str, QuantResult] = {}
    with torch.no_grad(), ThreadPoolExecutor(max(1, workers)) as pool:
        inputs = capture_inputs(model, spec, batches, device)
        for index, layer in enumerate(tqdm(layers, desc="quantizing layers", unit="layer")):
            layer.to(device)
            # Without true-sequential, one pass gathers every subset's input from the fp layer.
            rounds = [[s] for s in spec.subsets] if true_sequential else [list(spec.subsets)]
            for subsets in rounds:
                stats = {s.name: method.stats(layer.get_submodule(s.modules[0]).in_features, device) for s in subsets}
                _collect(layer, subsets, stats, inputs, index, stop_early=true_sequential)
                for s in subsets:
                    for name, result in _quantize_subset(layer, s, method, stats[s.name], index, log, device, pool):
                        results[f"{spec.layers}.{index}.{name}"] = result
            inputs.hidden = _replay(layer, inputs, index)
            layer.to("cpu")
    return results


def _timed_quantize(method: Method, weight: torch.Tensor, stats: InputStats) -> tuple[QuantResult, float]:
    start = time.perf_counter()
    return method.quantize(weight, stats), time.perf_counter() - start


def _quantize_subset(layer, subset: Subset, method: Method, stats: InputStats, index: int, log: QuantLog, device, pool):
    """Quantize a subset's modules concurrently (they are independent given the shared stats), then
    install the fake-quantized weights and log in spec order, so results do not depend on timing."""
    modules = [(name, layer.get_submodule(name)) for name in subset.modules]
    futures = [pool.submit(_timed_quantize, method, m.weight.data, stats) for _, m in modules]
    for (name, module), future in zip(modules, futures):
        result, seconds = future.result()
        module.weight.data = result.weight().to(module.weight.dtype)
        log.add(
            ModuleRecord(
                layer=index,
                module=name,
                in_features=module.in_features,
                out_features=module.out_features,
                loss=result.loss,
                samples=stats.tokens,
                seconds=seconds,
                peak_mem_mb=peak_memory_mb(device),
            )
        )
        yield name, result
