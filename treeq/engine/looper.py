"""The generic looper: walks a tree spec layer by layer and hands each subset's inputs to a method.

It knows no method and no architecture by name. Per decoder layer:
1. move the layer to the compute device;
2. true-sequential (default): run the layer on every calibration batch in lockstep
   (:mod:`treeq.engine.lockstep`); all batches pause at each subset in spec order while the method
   quantizes it from their inputs, then go on with the fake-quantized weights in place, so each
   subset sees the ones before it quantized and the forwards' outputs are the next layer's inputs;
3. otherwise: one pass gathers every subset's input from the fp layer, every module is quantized,
   and the layer is replayed with its quantized weights to produce the next layer's inputs.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import user_input
from ..config import DistillSettings
from ..methods import InputStats, Method, QuantResult
from ..models import Subset, TreeSpec
from ..transforms.base import InputSample
from . import experts
from .distill import distill_layer
from .lockstep import StopForward, batch_threads, run_lockstep, run_rerunning
from .memory import map_large_allocations, release_free_heap, reuse_freed_memory
from .plan import MethodPlan
from .quant_log import ModuleRecord, QuantLog, peak_memory_mb
from .scaling import can_fold, fold_input_scales


@dataclass
class LayerInputs:
    hidden: list[torch.Tensor]  # one [batch, seq, hidden] tensor per calibration batch
    kwargs: list[list[dict[str, Any]]]  # [layer][batch] keyword arguments each layer was called with
    # Layer forwards autocast to this dtype (float32: none, they run as the weights are); weights
    # and the residual stream stay fp32, only the matmuls run in low precision.
    autocast: torch.dtype = torch.float32
    # The fp model's own hidden states into the current layer (fp32), carried only where
    # distillation targets them (DistillSettings.teacher "fp-model"); None otherwise.
    fp_hidden: list[torch.Tensor] | None = None


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_inputs(
    model: nn.Module,
    spec: TreeSpec,
    batches: list[torch.Tensor],
    device: torch.device,
    autocast: torch.dtype = torch.float32,
) -> LayerInputs:
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
        raise StopForward

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
                except StopForward:
                    pass
    finally:
        handle.remove()
        for layer in layers:
            del layer.forward
        for m in surrounding:
            m.to("cpu")
    return LayerInputs(hidden, kwargs, autocast)


def _forward(layer, hidden, kwargs, autocast: torch.dtype):
    # Autocast state is per thread, so it is entered here, inside each lockstep batch's thread.
    with torch.autocast(hidden.device.type, dtype=autocast, enabled=autocast != torch.float32):
        return layer(hidden, **kwargs)


def _forwards(layer, inputs: LayerInputs, index: int, advance: bool = False) -> list:
    """One callable per calibration batch running ``layer`` on it. With ``advance`` each replaces
    its batch's hidden states by the layer's output as soon as it has it (and returns nothing), so
    the calibration set's inputs and outputs are never all in memory at once."""

    def run(b: int):
        out = _forward(layer, inputs.hidden[b], inputs.kwargs[index][b], inputs.autocast)
        if not advance:
            return out
        inputs.hidden[b] = _first_output(out)

    return [functools.partial(run, b) for b in range(len(inputs.hidden))]


class BoundSubset:
    """A subset bound to one layer: the modules its input passes first (the lockstep barrier), and
    its module names in groups that share one input's statistics (one group per expert for routed
    experts, each fed only its own tokens). The statistics are allocated when the subset's input
    first arrives, so a layer's later subsets hold no memory while earlier ones are quantized."""

    def __init__(self, subset: Subset, taps: list[nn.Module], make_groups):
        self.subset, self.taps, self._make_groups = subset, taps, make_groups
        self._groups: list[tuple[InputStats, list[str]]] | None = None

    @property
    def name(self) -> str:
        return self.subset.name

    @property
    def groups(self) -> list[tuple[InputStats, list[str]]]:
        if self._groups is None:
            self._groups = self._make_groups()
        return self._groups

    def release(self) -> None:
        self._groups = []

    def record(self, x) -> None:
        if len(self.groups) == 1:
            self.groups[0][0].add(x)
            return
        for (stats, _), xe in zip(self.groups, x):
            if len(xe):  # an expert no token of this batch was routed to
                stats.add(xe.to(stats.h.device))


def bind(layer: nn.Module, spec: TreeSpec, subset: Subset, method: Method, devices: list) -> BoundSubset:
    """Statistics groups go round-robin over ``devices``; each module is quantized on its group's."""
    names = experts.module_groups(layer, spec, subset)

    def make_groups():
        return [
            (method.stats(layer.get_submodule(group[0]).in_features, devices[j % len(devices)]), group)
            for j, group in enumerate(names)
        ]

    return BoundSubset(subset, experts.input_taps(layer, spec, subset), make_groups)


def bind_layer(layer: nn.Module, spec: TreeSpec, method: Method, devices: list) -> list[BoundSubset]:
    return [bind(layer, spec, s, method, devices) for s in spec.subsets if experts.present(layer, spec, s)]


def _collect(layer, bound: list[BoundSubset], inputs: LayerInputs, index: int, sample_rows: int = 0):
    """One fp pass feeding each subset's input to its stats; the first module of a subset to run
    records the input for all of them, since they share it. With ``sample_rows``, returns about
    that many of each subset's input rows (fp32), spread evenly over every batch's tokens."""
    seen: set[str] = set()
    samples: dict[str, list[torch.Tensor]] = {b.name: [] for b in bound}
    per_batch = -(-sample_rows // max(1, len(inputs.hidden)))

    def hook_for(b: BoundSubset):
        def hook(_module, args):
            if b.name not in seen:
                b.record(args[0])
                seen.add(b.name)
                if per_batch:
                    x = args[0].reshape(-1, args[0].shape[-1])
                    rows = torch.linspace(0, x.shape[0] - 1, min(per_batch, x.shape[0])).long()
                    samples[b.name].append(x[rows].float())

        return hook

    handles = [tap.register_forward_pre_hook(hook_for(b)) for b in bound for tap in b.taps]
    try:
        for forward in _forwards(layer, inputs, index):
            seen.clear()
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(rows) for name, rows in samples.items() if rows}


def quantize_layers(
    model: nn.Module,
    spec: TreeSpec,
    plan: MethodPlan,
    batches: list[torch.Tensor],
    device: torch.device,
    true_sequential: bool = True,
    log: QuantLog | None = None,
    workers: int = 1,
    fallback_below: int = 0,
    devices: list[torch.device] | None = None,
    stream=None,
    autocast: torch.dtype = torch.float32,
    lockstep: bool = True,
    progress=None,
) -> dict[str, QuantResult]:
    """Quantize every module the spec names with the method ``plan`` gives it (skipping those it
    gives none); returns results by full module name. Modules whose input statistics hold fewer
    than ``fallback_below`` tokens (experts the router rarely picks) get the plan's fallback method,
    and the log says so.

    On return each quantized module holds its fake-quantized weight, which equals bit for bit what
    a kernel reconstructs from the packed result. ``workers`` threads (at least one per entry of
    ``devices``) quantize the modules of a subset side by side, each group of modules sharing an
    input on one of ``devices`` (default: ``device``), where its statistics are accumulated; the
    results are the same for any number of workers.

    A ``stream`` (:class:`treeq.engine.streaming.LayerStream`) loads each layer's weights before it is
    quantized and takes its results afterwards; they are then not kept in the returned dict.
    Layer forwards run under ``autocast`` to that dtype unless it is float32. Without
    ``lockstep``, true-sequential reruns the layer per subset (:func:`run_rerunning`): the same
    results, slower, with one batch's activations in memory instead of every batch's.

    A ``progress`` (:class:`treeq.engine.resume.Progress`) keeps each finished layer and the hidden
    states out of it; holding finished layers, it puts them back and the loop starts after them.
    """
    log = log or QuantLog()
    # Streaming is for memory; the in-memory looper reuses freed activations (engine/memory.py).
    if stream is not None:
        map_large_allocations()
    else:
        reuse_freed_memory()
    layers = model.get_submodule(spec.layers)
    devices = devices or [device]
    results: dict[str, QuantResult] = {}
    workers = max(1, workers, len(devices))
    with torch.no_grad(), ThreadPoolExecutor(workers) as pool, batch_threads():
        inputs = capture_inputs(model, spec, batches, device, autocast)
        if plan.config.distill is not None and plan.config.distill.teacher == "fp-model":
            inputs.fp_hidden = list(inputs.hidden)  # the looper replaces entries, never the tensors
        if stream is not None:
            stream.inputs_captured()
        start = 0 if progress is None else progress.done
        if start:  # the kwargs are recaptured above (cheap); the hidden states are the saved ones
            inputs.hidden, inputs.fp_hidden, kept = progress.restore(layers, device, stream)
            results.update(kept)
        steps = tqdm(range(start, len(layers)), "quantizing layers", len(layers), unit="layer", initial=start)
        for index in steps:
            layer = layers[index]
            if stream is not None:
                stream.load(index, layer)
            layer.to(device)
            layer_results: dict[str, QuantResult] = {}
            if plan.migration is not None:
                _rescale_inputs(layer, spec, plan, inputs, index, device)
            teacher = _teacher(layer, inputs, index, plan.config.distill)
            bound = bind_layer(layer, spec, plan.default, devices)

            def quantize(b: BoundSubset) -> None:
                with _threads_per_job(sum(len(names) for _, names in b.groups), workers):
                    prefix = f"{spec.layers}.{index}."
                    for name, result in _quantize_subset(layer, b, plan, prefix, index, log, pool, fallback_below):
                        layer_results[prefix + name] = result
                b.release()  # frees the statistics
                release_free_heap()

            barriers = [(b.name, b.taps, b.record) for b in bound]
            if true_sequential and lockstep:
                run_lockstep(_forwards(layer, inputs, index, advance=True), barriers, lambda k: quantize(bound[k]))
            elif true_sequential:
                run_rerunning(_forwards(layer, inputs, index), barriers, lambda k: quantize(bound[k]))
                for forward in _forwards(layer, inputs, index, advance=True):
                    forward()
            else:
                _collect(layer, bound, inputs, index)
                for b in bound:
                    quantize(b)
                for forward in _forwards(layer, inputs, index, advance=True):
                    forward()
            if teacher is not None:
                _distill(layer, spec, plan, inputs, index, layer_results, teacher, log)
            layer.to("cpu")
            if stream is not None:
                stream.emit(index, layer, layer_results)
            else:
                results.update(layer_results)
            if progress is not None:
                progress.layer_done(index, layer, layer_results, inputs.hidden, inputs.fp_hidden, stream)
            # Streamed out, the swapped-out fp modules (reachable from bound) and the codes are
            # garbage; dropped now, not when the next layer rebinds, they never overlap its peak.
            bound = layer_results = None
            release_free_heap()
        if progress is not None:
            progress.flush()  # the last layer's files written before its results go on to be saved
    return results


def _rescale_inputs(layer, spec: TreeSpec, plan: MethodPlan, inputs: LayerInputs, index: int, device) -> None:
    """One pass over the fp layer gathers every subset's input; the plan's scale migration picks
    per-channel scales for each subset whose feeding op can absorb them, judged by the rounding of
    the subset's scheme, and they are folded in before quantizing.

    A subset is scaled only when it alone reads its feeding op's output in this layer. Routed
    experts never are: their gate/up input comes from a norm that also feeds the router and every
    other expert. Nor is a shared expert beside them (Qwen2-MoE, DeepSeek-V3): its scales folded
    into that norm would change the router's and the routed experts' inputs too."""
    present = [s for s in spec.subsets if experts.present(layer, spec, s)]
    readers = Counter(s.fed_by for s in present)
    bound = [
        b
        for b in bind_layer(layer, spec, plan.default, [device])
        if not b.subset.per_expert and readers[b.subset.fed_by] == 1
    ]
    samples = _collect(layer, bound, inputs, index, plan.migration.sample_rows())
    for b in bound:
        s, (stats, _) = b.subset, b.groups[0]
        if can_fold(layer, s.fed_by, stats.h.shape[0]):
            weights = [layer.get_submodule(m).weight.data for m in s.modules]
            # The scales suit the first module's scheme; those of a subset differ only by override.
            name = f"{spec.layers}.{index}.{s.modules[0]}"
            method = plan.method(name) or plan.default
            sample = _input_sample(plan, name, stats, samples.get(b.name))
            scales = plan.migration.scales(weights, stats, lambda w: method.round(w).weight(), sample)
            fold_input_scales(layer, s.modules, s.fed_by, scales, spec.norm_weight_offset)


def _input_sample(plan: MethodPlan, module: str, stats: InputStats, rows: torch.Tensor | None) -> InputSample | None:
    """The sampled input rows with what ``module``'s input quantizer makes of them once divided by
    scales s (static levels calibrated on the divided range)."""
    if rows is None:
        return None
    if plan.input_quantizer(module, stats) is None:
        return InputSample(rows, None)
    return InputSample(rows, lambda x, s: plan.input_quantizer(module, stats, s)(x))


def _fp32_outputs(layer, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """The layer's outputs on each batch of ``hidden``, computed in fp32 (no autocast)."""
    return [_first_output(_forward(layer, h, kw, torch.float32)) for h, kw in zip(hidden, kwargs)]


def _teacher(layer, inputs: LayerInputs, index: int, settings: DistillSettings | None):
    """The layer's inputs, the outputs distillation aims at (in fp32) and its linears' fp weights,
    kept for distillation (``settings``) before quantizing changes the layer; None where the layer
    is not distilled. The targets are the fp layer's outputs on the fp model's hidden states, which
    this advances past the layer (teacher "fp-model": every layer up to the last distilled one), or
    on the inputs the quantized model computes (teacher "fp-layer")."""
    kwargs = inputs.kwargs[index]
    fp_outputs = None
    if inputs.fp_hidden is not None:
        fp_outputs = _fp32_outputs(layer, inputs.fp_hidden, kwargs)
        # Carried only while a later layer will be distilled (it is freed after the last one).
        inputs.fp_hidden = fp_outputs if settings.distills_after(index) else None
    if settings is None or not settings.applies_to(index):
        return None
    hidden = list(inputs.hidden)  # the looper replaces entries with outputs, not the tensors
    if fp_outputs is not None:
        targets = fp_outputs
    else:
        targets = _fp32_outputs(layer, hidden, kwargs)
    weights = {name: m.weight.data.clone() for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    return hidden, targets, weights


def _distill(layer, spec: TreeSpec, plan: MethodPlan, inputs: LayerInputs, index: int, results, teacher, log) -> None:
    """Distil the quantized layer towards ``teacher`` (:mod:`treeq.engine.distill`), replace its
    results by the kept ones, and recompute the layer's outputs for the next layer."""
    hidden, targets, weights = teacher
    prefix = f"{spec.layers}.{index}."
    own = {n[len(prefix) :]: (r, plan.scheme(n).bits, weights[n[len(prefix) :]]) for n, r in results.items()}
    kept, record = distill_layer(layer, index, own, hidden, inputs.kwargs[index], targets, plan.config.distill)
    for name, r in kept.items():
        results[prefix + name] = r
    log.say(record.line())
    for b, h in enumerate(hidden):
        inputs.hidden[b] = _first_output(_forward(layer, h, inputs.kwargs[index][b], inputs.autocast))


def _timed_quantize(method: Method, weight: torch.Tensor, stats: InputStats) -> tuple[QuantResult, float]:
    start = time.perf_counter()
    return method.quantize(weight, stats), time.perf_counter() - start


def _fp_input_share(quantizer, stats: InputStats) -> float | None:
    """Share of the input columns an outlier threshold passes in fp somewhere in calibration."""
    threshold = None if quantizer is None else quantizer.scheme.outlier_threshold
    return None if threshold is None else float((stats.absmax > threshold).float().mean())


def _quantizing_input(quantizer):
    def hook(_module, args):
        x = args[0]
        q = quantizer(x)
        if torch.is_grad_enabled() and x.requires_grad:  # distillation trains through it
            q = x + (q - x).detach()
        return (q, *args[1:])

    return hook


@contextmanager
def _threads_per_job(jobs: int, workers: int):
    """Split the thread budget among the jobs that run at once, so workers x threads <= cores."""
    budget = torch.get_num_threads()
    per_job = max(1, budget // max(1, min(jobs, workers)))
    torch.set_num_threads(per_job)
    try:
        yield
    finally:
        torch.set_num_threads(budget)


def _quantize_subset(
    layer, bound: BoundSubset, plan: MethodPlan, prefix: str, index: int, log: QuantLog, pool, fallback_below: int = 0
):
    """Quantize a subset's modules concurrently (they are independent given their stats), then
    install the fake-quantized weights and log in spec order, so results do not depend on timing.
    Modules the plan gives no method (``prefix`` + name: the full name) keep their fp weights."""
    planned = []
    for stats, names in bound.groups:
        starved = stats.tokens < fallback_below
        for name in names:
            chosen = plan.method(prefix + name, fallback=starved)
            if chosen is not None:
                planned.append((name, layer.get_submodule(name), stats, chosen, chosen.name if starved else ""))
    for name, module, *_ in planned:
        user_input.finite_weight(prefix + name, module.weight.data)
    futures = [pool.submit(_timed_quantize, q, m.weight.data.to(st.h.device), st) for _, m, st, q, _ in planned]
    for (name, module, stats, _, fell_back), future in zip(planned, futures):
        result, seconds = future.result()
        module.weight.data = result.weight().to(module.weight.device, module.weight.dtype)
        result.input_quantizer = plan.input_quantizer(prefix + name, stats)
        if result.input_quantizer is not None:  # later subsets and layers calibrate on what the model will compute
            module.register_forward_pre_hook(_quantizing_input(result.input_quantizer))
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
                fallback=fell_back,
                extras="" if result.extras is None else result.extras.describe(module.in_features, module.out_features),
                fp_input_share=_fp_input_share(result.input_quantizer, stats),
            )
        )
        yield name, result
