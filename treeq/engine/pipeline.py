"""The quantize pipeline: check the model against its spec and the config, calibrate, quantize
layer by layer (in memory, or streamed from disk with ``low_memory``) and save the checkpoint."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import data, packing
from ..config import QuantConfig
from ..default_model import DEFAULT_GROUP_SIZE, DEFAULT_MODEL
from ..errors import TreeqError
from ..fp_model import load_fp_model, model_path
from ..models import spec_for
from ..runtime.kv_calibration import KVCalibration, calibrate_on_text, needs_calibration
from ..runtime.kv_choice import attach_kv
from ..runtime.kv_schemes import kv_cache_for
from ..schemes import ActivationScheme, WeightScheme
from ..spec_check import check_spec
from ..storage.checkpoint import save_quantized, source_name, swap_in_quantized, write_metadata
from ..user_input import (
    loaded_model,
    local_path,
    new_output_dir,
    parse_devices,
    positions,
    resolve_device,
    tokens_fit,
)
from ..version import __version__
from .calib_precision import calibration_dtype
from .experts import calibration_routing, layer_modules, unfuse_experts
from .looper import quantize_layers
from .memory import release_free_heap
from .plan import MethodPlan
from .quant_log import QuantLog
from .resume import Progress, directory_fingerprint, model_fingerprint, run_identity
from .streaming import LayerStream, ShardReader


def check_quantizable(model, spec, config: QuantConfig) -> None:
    """Fail before any work if a module's shape does not fit its scheme's groups or packing (weights
    and inputs), or an override matches no module (a misspelt pattern would quietly change nothing)."""
    names = []
    for i, layer in enumerate(model.get_submodule(spec.layers)):
        for name in layer_modules(layer, spec):
            where = f"{spec.layers}.{i}.{name}"
            names.append(where)
            scheme = config.scheme_of(where)
            if scheme is not None:
                lin = layer.get_submodule(name)
                _check_fits(lin, where, scheme)
                _check_inputs_fit(lin, where, config.activations)
    for override in config.overrides:
        if not any(override.matches(n) for n in names):
            raise TreeqError(
                f"override pattern {override.pattern!r} matches none of the modules treeq quantizes (such as "
                f"{names[0]}); fix the pattern or drop the override"
            )


def _check_inputs_fit(lin, where: str, inputs: ActivationScheme | None) -> None:
    if inputs is None or inputs.granularity != "per-group" or inputs.group_size is None:
        return
    if lin.in_features % inputs.group_size:
        divisors = [g for g in (8, 16, 32, 64, 128) if lin.in_features % g == 0]
        raise TreeqError(
            f"activations.group_size={inputs.group_size} does not divide in_features={lin.in_features} of {where}; "
            f"use one of {divisors}"
        )


def _check_fits(lin, where: str, scheme: WeightScheme) -> None:
    codes_per_period, _ = packing.period(scheme.bits)
    if scheme.group_size != -1 and lin.in_features % scheme.group_size:
        divisors = [g for g in (32, 64, 128) if lin.in_features % g == 0]
        raise TreeqError(
            f"group_size={scheme.group_size} does not divide in_features={lin.in_features} of {where}; "
            f"use one of {divisors or [-1]} (or -1 for per-row groups)"
        )
    for what, n in (("in_features", lin.in_features), ("out_features", lin.out_features)):
        if n % codes_per_period:
            raise TreeqError(
                f"{where} has {what}={n}, not a multiple of {codes_per_period} as {scheme.bits}-bit "
                f"GPTQ packing needs; try other bits"
            )


@dataclass
class QuantizeReport:
    out: Path
    seconds: float
    log: QuantLog
    model: object = field(repr=False)  # the quantized model, in memory
    tokenizer: object = field(repr=False)
    kv_calibration: KVCalibration | None = field(default=None, repr=False)  # stored with the checkpoint


def quantize(
    model=None,
    config: QuantConfig | None = None,
    out: str | Path = "treeq-out",
    tokenizer=None,
    calib_text: str = "wiki-train",
    device: str | None = None,
    log: QuantLog | None = None,
    workers: int | None = None,
    devices: str | list[str] | None = None,
    low_memory: bool = False,
    resume: bool = False,
) -> QuantizeReport:
    """Calibrate, quantize layer by layer, and save a GPTQ-format checkpoint to ``out``.

    ``model`` is a local directory, None for the built-in default, or a loaded PreTrainedModel
    (then ``tokenizer`` is required). The model passed in is quantized in place. ``workers``
    threads quantize a subset's modules side by side (default: torch's thread count), spread over
    ``devices`` ("cuda:0,cuda:1", or ["cpu", "cpu"]: one worker each) when given; the checkpoint is
    the same bit for bit whatever the workers and devices. ``low_memory`` streams a model directory
    one decoder layer at a time (:mod:`treeq.engine.streaming`); the report then holds no model.
    Finished layers are kept in ``out``.partial (:mod:`treeq.engine.resume`); after Ctrl-C,
    ``resume`` continues from them to the checkpoint an uninterrupted run writes.
    """
    _check_arguments(model, config, tokenizer)
    config = for_model(config or QuantConfig(), model)
    _check_run_settings(calib_text, device, devices)
    out = new_output_dir(local_path(out, "out"))
    log = log or QuantLog(echo=tqdm.write)
    log.lines.append(f"treeq {__version__} quantize, calibration text {calib_text}: {config.model_dump_json()}")
    progress = Progress(out, resume, log)
    kv = config.kv_cache
    if low_memory and kv is not None and needs_calibration(kv):
        raise TreeqError(
            f"KV method {kv.method!r} calibrates through the whole model, which low_memory never holds; "
            "quantize without --low-memory, or store no KV scheme and give it at eval (--kv)"
        )
    if low_memory:
        with log.capturing():
            return _quantize_streaming(model, config, out, calib_text, device, log, workers, devices, progress)
    if tokenizer is None:
        model, tokenizer = load_fp_model(model)
    spec = spec_for(model.config)
    fingerprint = model_fingerprint(model)
    _prepare(model, spec, config)
    start = time.perf_counter()
    with log.capturing():
        batches = _calibration_batches(model, tokenizer, config, calib_text)
        progress.check(run_identity(config, batches, fingerprint, False, len(model.get_submodule(spec.layers))))
    # Until the checkpoint is saved: Ctrl-C keeps the finished layers, another failure of a fresh
    # run leaves nothing behind.
    with progress.interruptible():
        with log.capturing():
            results = _calibrate_and_quantize(model, spec, batches, config, device, log, workers, devices, progress)
        swap_in_quantized(model, results, config)
        # On the quantized model: its keys and values are what the cache will hold once loaded.
        kv_calibration = None if kv is None else calibrate_on_text(model, tokenizer, kv, calib_text)
        attach_kv(model, kv, kv_calibration, f"stored with {out.name}")
        seconds = time.perf_counter() - start
        log.lines.append(f"quantized {len(log.records)} modules in {seconds:.1f} s")
        source = source_name(model.config._name_or_path)
        save_quantized(model, tokenizer, config, results, out, log, source, kv_calibration)
        progress.discard()  # the checkpoint is complete
    return QuantizeReport(out, seconds, log, model, tokenizer, kv_calibration)


def _check_arguments(model, config, tokenizer) -> None:
    """quantize's model and config as its docstring says, each refused in one line otherwise."""
    if config is not None and not isinstance(config, QuantConfig):
        raise TreeqError(
            f"config must be a treeq.QuantConfig, got {type(config).__name__}; build one with "
            "treeq.QuantConfig(**settings)"
        )
    if model is None or isinstance(model, (str, os.PathLike)):
        return
    if isinstance(model, QuantConfig):
        raise TreeqError(
            "model is a QuantConfig: settings go second, quantize(model, config, out), model None for the built-in one"
        )
    if not isinstance(model, torch.nn.Module):
        raise TreeqError(
            f"model must be a model directory, None for the built-in model, or a loaded transformers model, "
            f"got {type(model).__name__}"
        )
    loaded_model(model, "quantize")
    if tokenizer is None:
        raise TreeqError("a loaded model needs its tokenizer: quantize(model, config, out, tokenizer=tokenizer)")


def for_model(config: QuantConfig, model) -> QuantConfig:
    """``config`` with the built-in model's group size where the user chose none: its hidden size,
    576, is no multiple of the usual 128."""
    builtin = model is None or model == DEFAULT_MODEL
    if not builtin or "group_size" in config.weights.model_fields_set:
        return config
    weights = config.weights.model_copy(update={"group_size": DEFAULT_GROUP_SIZE})
    return config.model_copy(update={"weights": weights})


def check_run(
    model: str | Path | None = None,
    config: QuantConfig | None = None,
    calib_text: str = "wiki-train",
    device: str | None = None,
    devices: str | list[str] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
) -> None:
    """What quantize checks before any work, for a model directory (None: the built-in model), on its
    skeleton (no weight is read): the calibration text and devices, ``out``'s saved progress against
    ``resume``, the spec, each module's fit to its scheme, the overrides and the KV scheme. For
    callers that spend time on the fp model first (the CLI's fp perplexity), so a bad setting fails
    in seconds, not after that."""
    config = for_model(config or QuantConfig(), model)
    _check_run_settings(calib_text, device, devices)
    if out is not None:
        Progress(local_path(out, "out"), resume, QuantLog())  # refuses a resume of nothing, or a restart
    spec, skeleton = _skeleton(model_path(model))
    _prepare(skeleton, spec, config)


def _check_run_settings(calib_text: str, device, devices) -> None:
    data.check_text(calib_text)
    resolve_device(device)
    parse_devices(devices)


def _skeleton(path: Path):
    """The spec and an empty model (meta tensors) of the model directory at ``path``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(path)
    spec = spec_for(hf_config)
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    return spec, skeleton


def _prepare(model, spec, config: QuantConfig) -> None:
    _check_positions(model, config.calibration.seqlen)
    check_spec(model, spec)
    unfuse_experts(model, spec)
    check_quantizable(model, spec, config)
    kv = config.kv_cache
    if kv is not None and not needs_calibration(kv):
        kv_cache_for(model, kv)  # a scheme that does not fit the attention heads fails before any work


def _check_positions(model, seqlen: int) -> None:
    """Refuse calibration windows longer than the positions the model states it was trained on: the
    tokens past them would feed activations from positions it never saw (RoPE extrapolated, or no
    learned embedding at all) into every statistic, so the checkpoint would be calibrated on inputs
    no prompt within its context produces."""
    trained = positions(model)
    if trained is not None and seqlen > trained:
        raise TreeqError(
            f"calibration seqlen={seqlen} is longer than the model's {trained} positions "
            f"(max_position_embeddings); use a seqlen (--seqlen) of {trained} or less"
        )


def _calibration_batches(model, tokenizer, config: QuantConfig, calib_text: str) -> list[torch.Tensor]:
    text = data.read_text(calib_text)
    c = config.calibration
    batches = data.calibration_batches(tokenizer, text, c.calib_samples, c.seqlen, c.batch_size, bos=c.bos)
    tokens_fit(model, batches)
    return batches


def _calibrate_and_quantize(
    model, spec, batches, config: QuantConfig, device, log, workers, devices, progress: Progress, stream=None
) -> dict:
    calib = config.calibration
    calib_tokens = sum(b.numel() for b in batches)
    device = resolve_device(device)
    with calibration_routing(model, spec, calib.routing):
        return quantize_layers(
            model,
            spec,
            MethodPlan(config),
            batches,
            device,
            calib.true_sequential,
            log,
            workers or torch.get_num_threads(),
            math.ceil(calib.fallback_fraction * calib_tokens),
            parse_devices(devices),
            stream,
            calibration_dtype(calib.calib_dtype, device),
            lockstep=stream is None,  # streaming is for memory, so it reruns layers instead
            progress=progress,
        )


def _quantize_streaming(model, config: QuantConfig, out: Path, calib_text, device, log, workers, devices, progress):
    from transformers import AutoTokenizer

    if model is not None and not isinstance(model, (str, Path)):
        raise TreeqError("low_memory streams weights from a model directory; pass its path, not a loaded model")
    path = model_path(model)
    spec, skeleton = _skeleton(path)
    if spec.experts is not None:
        raise TreeqError(
            f"--low-memory does not stream MoE experts yet ({skeleton.config.model_type}); quantize without "
            "--low-memory"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    _prepare(skeleton, spec, config)
    start = time.perf_counter()
    batches = _calibration_batches(skeleton, tokenizer, config, calib_text)
    # Tokenizing the whole text leaves ~300 MB of freed heap; hand it back before the weights come.
    release_free_heap()
    layers = len(skeleton.get_submodule(spec.layers))
    progress.check(run_identity(config, batches, directory_fingerprint(path), True, layers))
    # Shards go where the finished layers are kept, the directory that becomes ``out`` when complete.
    with progress.interruptible():  # as in quantize(), until the checkpoint is complete
        stream = LayerStream(skeleton, spec, config, ShardReader(path), progress.work)
        stream.load_surroundings()
        _calibrate_and_quantize(skeleton, spec, batches, config, device, log, workers, devices, progress, stream)
        stream.finish()
        seconds = time.perf_counter() - start
        write_metadata(progress.work, skeleton, tokenizer, config, stream.summary, log, source_name(path))
        progress.complete(out)
    return QuantizeReport(out, seconds, log, None, tokenizer)
