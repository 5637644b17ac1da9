"""The generic looper: walks a tree spec layer by layer and hands each subset's inputs to a method.

It knows no method and no architecture by name. Per decoder layer:
1. move the layer to the compute device;
2. true-sequential (default): run the layer on every calibration batch in lockstep
   (:mod:`treeq.lockstep`); all batches pause at each subset in spec order while the method
   quantizes it from their inputs, then go on with the fake-quantized weights in place, so each
   subset sees the ones before it quantized and the forwards' outputs are the next layer's inputs;
3. otherwise: one pass gathers every subset's input from the fp layer, every module is quantized,
   and the layer is replayed with its quantized weights to produce the next layer's inputs.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .lockstep import run_lockstep
from .memory import map_large_allocations
from .methods import InputStats, Method, QuantResult
from .models import Subset, TreeSpec
from .quant_log import ModuleRecord, QuantLog, peak_memory_mb
from .scaling import can_fold, fold_input_scales


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
            for cache_arg in ("past_key_values", "cache"):  # the name changed within transformers 5
                kw.pop(cache_arg, None)
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


def _forwards(layer, inputs: LayerInputs, index: int) -> list:
    return [functools.partial(layer, h, **kw) for h, kw in zip(inputs.hidden, inputs.kwargs[index])]


def _collect(layer, subsets: tuple[Subset, ...], stats: dict[str, InputStats], inputs: LayerInputs, index: int):
    """One fp pass feeding each subset's input to its stats; the first module of a subset to run
    records the input for all of them, since they share it."""
    seen: set[str] = set()

    def hook_for(name):
        def hook(_module, args):
            if name not in seen:
                stats[name].add(args[0])
                seen.add(name)

        return hook

    handles = [layer.get_submodule(m).register_forward_pre_hook(hook_for(s.name)) for s in subsets for m in s.modules]
    try:
        for forward in _forwards(layer, inputs, index):
            seen.clear()
            forward()
    finally:
        for handle in handles:
            handle.remove()


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
    map_large_allocations()
    layers = model.get_submodule(spec.layers)
    results: dict[str, QuantResult] = {}
    with torch.no_grad(), ThreadPoolExecutor(max(1, workers)) as pool:
        inputs = capture_inputs(model, spec, batches, device)
        for index, layer in enumerate(tqdm(layers, desc="quantizing layers", unit="layer")):
            layer.to(device)
            if method.rescales_inputs:
                _rescale_inputs(layer, spec, method, inputs, index, device)
            stats = {s.name: method.stats(layer.get_submodule(s.modules[0]).in_features, device) for s in spec.subsets}

            def quantize(subset: Subset) -> None:
                for name, result in _quantize_subset(layer, subset, method, stats.pop(subset.name), index, log, pool):
                    results[f"{spec.layers}.{index}.{name}"] = result

            if true_sequential:
                barriers = [
                    (s.name, [layer.get_submodule(m) for m in s.modules], stats[s.name].add) for s in spec.subsets
                ]
                outputs = run_lockstep(_forwards(layer, inputs, index), barriers, lambda k: quantize(spec.subsets[k]))
            else:
                _collect(layer, spec.subsets, stats, inputs, index)
                for s in spec.subsets:
                    quantize(s)
                outputs = [forward() for forward in _forwards(layer, inputs, index)]
            inputs.hidden = [_first_output(o) for o in outputs]
            layer.to("cpu")
    return results


def _rescale_inputs(layer, spec: TreeSpec, method: Method, inputs: LayerInputs, index: int, device) -> None:
    """One pass over the fp layer gathers every subset's input; the method picks per-channel scales
    for each subset whose feeding op can absorb them, and they are folded in before quantizing."""
    stats = {s.name: method.stats(layer.get_submodule(s.modules[0]).in_features, device) for s in spec.subsets}
    _collect(layer, spec.subsets, stats, inputs, index)
    for s in spec.subsets:
        if can_fold(layer, s.fed_by, stats[s.name].h.shape[0]):
            weights = [layer.get_submodule(m).weight.data for m in s.modules]
            scales = method.input_scales(weights, stats[s.name])
            fold_input_scales(layer, s.modules, s.fed_by, scales, spec.norm_weight_offset)


def _timed_quantize(method: Method, weight: torch.Tensor, stats: InputStats) -> tuple[QuantResult, float]:
    start = time.perf_counter()
    return method.quantize(weight, stats), time.perf_counter() - start


def _quantize_subset(layer, subset: Subset, method: Method, stats: InputStats, index: int, log: QuantLog, pool):
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
                peak_mem_mb=peak_memory_mb(stats.h.device),
            )
        )
        yield name, result
