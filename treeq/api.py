"""The Python API; every CLI command is a thin shell over one of these functions."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data, packing, user_input
from .atomic import atomic_directory
from .calib_precision import calibration_dtype
from .checkpoint import save_quantized, source_name, swap_in_quantized, write_metadata
from .config import QuantConfig
from .default_model import DEFAULT_GROUP_SIZE, DEFAULT_MODEL, default_model_path
from .errors import TreeqError
from .eval_tasks import TASKS, run_tasks
from .experts import calibration_routing, layer_modules, unfuse_experts
from .kernels import LinearFormat, explain, select_kernel
from .loading import (
    linear_format_from,
    linear_shape,
    load_quantized,
    quantized_module_qcfg,
    read_quantization_config,
    stored_format,
)
from .looper import quantize_layers
from .memory import release_free_heap
from .models import spec_for
from .perplexity import PerplexityResult, perplexity
from .plan import MethodPlan
from .quant_linear import QuantLinear
from .quant_log import QuantLog
from .report import ErrorReport, error_report
from .schemes import WeightScheme
from .spec_check import check_spec
from .speed import Speed, generate, measure_speeds
from .streaming import LayerStream, ShardReader
from .version import __version__


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return user_input.device(str(device))


def parse_devices(devices: str | list[str] | None) -> list[torch.device] | None:
    if devices is None:
        return None
    names = devices.split(",") if isinstance(devices, str) else devices
    return [user_input.device(n.strip()) for n in names]


def model_path(model: str | None) -> Path:
    if model in (None, DEFAULT_MODEL):
        return default_model_path()
    path = Path(model)
    if not (path / "config.json").is_file():
        raise TreeqError(
            f"model {model!r} is not a local model directory with config.json; treeq never downloads, "
            f"so give a saved Hugging Face model directory (or omit MODEL for the built-in {DEFAULT_MODEL})"
        )
    return path


def load_fp_model(model: str | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in full precision from a local directory, or the built-in default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(model)
    # Read, not memory-mapped: pages of a mapped checkpoint stay resident after the looper replaces
    # the weights they hold, which on SmolLM2 added 400 MB of peak RSS by the last layer.
    user_input.tokenizer_dir(path)
    try:
        fp = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, disable_mmap=True).eval()
    except user_input.READ_ERRORS as e:
        raise user_input.unreadable_weights(path, e) from None
    return fp, AutoTokenizer.from_pretrained(path)


def load(path, device: str | None = None, dtype: torch.dtype = torch.float32, kernel: str | None = None):
    """Load a treeq checkpoint: returns (model, tokenizer)."""
    return load_quantized(path, str(resolve_device(device)), dtype, kernel)


def is_quantized_checkpoint(path) -> bool:
    return (Path(path) / "quantize_config.json").is_file()


def check_quantizable(model, spec, config: QuantConfig) -> None:
    """Fail before any work if a module's shape does not fit its scheme's groups or packing."""
    for i, layer in enumerate(model.get_submodule(spec.layers)):
        for name in layer_modules(layer, spec):
            where = f"{spec.layers}.{i}.{name}"
            scheme = config.scheme_of(where)
            if scheme is not None:
                _check_fits(layer.get_submodule(name), where, scheme)


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
) -> QuantizeReport:
    """Calibrate, quantize layer by layer, and save a GPTQ-format checkpoint to ``out``.

    ``model`` is a local directory, None for the built-in default, or a loaded PreTrainedModel
    (then ``tokenizer`` is required). The model passed in is quantized in place. ``workers``
    threads quantize a subset's modules side by side (default: torch's thread count), spread over
    ``devices`` ("cuda:0,cuda:1", or ["cpu", "cpu"]: one worker each) when given; the checkpoint is
    the same bit for bit whatever the workers and devices. ``low_memory`` streams a model directory
    one decoder layer at a time (:mod:`treeq.streaming`); the report then holds no model.
    """
    config = for_model(config or QuantConfig(), model)
    out = Path(out)
    if out.exists():
        raise TreeqError(f"output directory {out} already exists; choose another --out or remove it")
    log = log or QuantLog(echo=tqdm.write)
    log.lines.append(f"treeq {__version__} quantize, calibration text {calib_text}: {config.model_dump_json()}")
    if low_memory:
        with log.capturing():
            return _quantize_streaming(model, config, out, calib_text, device, log, workers, devices)
    if tokenizer is None:
        model, tokenizer = load_fp_model(model)
    spec = spec_for(model.config)
    _prepare(model, spec, config)
    start = time.perf_counter()
    batches = _calibration_batches(tokenizer, config, calib_text)
    with log.capturing():
        results = _calibrate_and_quantize(model, spec, batches, config, device, log, workers, devices)
    swap_in_quantized(model, results, config)
    seconds = time.perf_counter() - start
    log.lines.append(f"quantized {len(log.records)} modules in {seconds:.1f} s")
    save_quantized(model, tokenizer, config, results, out, log, source=source_name(model.config._name_or_path))
    return QuantizeReport(out, seconds, log, model, tokenizer)


def for_model(config: QuantConfig, model) -> QuantConfig:
    """``config`` with the built-in model's group size where the user chose none: its hidden size,
    576, is no multiple of the usual 128."""
    builtin = model is None or model == DEFAULT_MODEL
    if not builtin or "group_size" in config.weights.model_fields_set:
        return config
    weights = config.weights.model_copy(update={"group_size": DEFAULT_GROUP_SIZE})
    return config.model_copy(update={"weights": weights})


def _prepare(model, spec, config: QuantConfig) -> None:
    check_spec(model, spec)
    unfuse_experts(model, spec)
    check_quantizable(model, spec, config)


def _calibration_batches(tokenizer, config: QuantConfig, calib_text: str) -> list[torch.Tensor]:
    text = data.read_text(calib_text)
    c = config.calibration
    return data.calibration_batches(tokenizer, text, c.calib_samples, c.seqlen, c.batch_size, bos=c.bos)


def _calibrate_and_quantize(
    model, spec, batches, config: QuantConfig, device, log, workers, devices, stream=None
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
        )


def _quantize_streaming(model, config: QuantConfig, out: Path, calib_text, device, log, workers, devices):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if model is not None and not isinstance(model, (str, Path)):
        raise TreeqError("low_memory streams weights from a model directory; pass its path, not a loaded model")
    path = model_path(model)
    hf_config = AutoConfig.from_pretrained(path)
    spec = spec_for(hf_config)
    if spec.experts is not None:
        raise TreeqError(
            f"--low-memory does not stream MoE experts yet ({hf_config.model_type}); quantize without --low-memory"
        )
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    _prepare(skeleton, spec, config)
    with atomic_directory(out) as tmp:
        start = time.perf_counter()
        batches = _calibration_batches(tokenizer, config, calib_text)
        # Tokenizing the whole text leaves ~300 MB of freed heap; hand it back before the weights come.
        release_free_heap()
        stream = LayerStream(skeleton, spec, config, ShardReader(path), tmp)
        stream.load_surroundings()
        _calibrate_and_quantize(skeleton, spec, batches, config, device, log, workers, devices, stream)
        stream.finish()
        seconds = time.perf_counter() - start
        write_metadata(tmp, skeleton, tokenizer, config, stream.summary, log, source_name(path))
    return QuantizeReport(out, seconds, log, None, tokenizer)


def evaluate_perplexity(
    model,
    tokenizer,
    text: str = "wiki-test",
    seqlen: int = 1024,
    max_windows: int | None = 32,
    bos: str = data.BOS_RULES[0],
) -> PerplexityResult:
    """``bos``: "auto" starts each window with a BOS where the tokenizer adds one; "always" / "never" force it."""
    start = data.bos_for(tokenizer, bos)
    return perplexity(model, data.tokenize(tokenizer, data.read_text(text)), seqlen, max_windows, start)


BENCH_PROMPT = (
    "The history of the printing press begins in the fifteenth century, when movable type made books "
    "cheaper to produce and spread literacy across Europe. Within a few decades"
)


def bench(
    path, fp_model: str | None = None, prompt: str = BENCH_PROMPT, new_tokens: int = 32, repeats: int = 5
) -> dict[str, Speed]:
    """Prefill and batch-1 decode tokens/s of a checkpoint and of its fp model, both in bf16 (the
    fp model from ``fp_model`` or the source recorded at quantization), measured in turns."""
    qmodel, tok = load(path, device="cpu", dtype=torch.bfloat16)
    source = fp_model or read_quantization_config(Path(path))["meta"].get("source")
    if source is None:
        raise TreeqError(f"{path} does not record its fp model; pass it explicitly (--fp MODEL)")
    fp, _ = load_fp_model(source, dtype=torch.bfloat16)
    ids = tok(prompt, return_tensors="pt").input_ids
    return measure_speeds({"quantized": qmodel, "fp bf16": fp}, ids, new_tokens, repeats)


@dataclass
class CheckpointInfo:
    path: Path
    quantization: dict
    size_bytes: int
    fp16_bytes: int
    kernels: dict[str, str]  # module -> chosen kernel
    rejected: dict[str, dict[str, str]]  # kernel -> {module: reason}, for --explain
    formats: dict[str, LinearFormat]  # module -> its stored format (bits, groups, grid...)
    # module -> bits per weight, counted from every stored tensor of its weight (codes, scales,
    # zero points, indices, an input transform's buffers)
    bits_per_weight: dict[str, float]


SAFETENSORS_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8}


def inspect_checkpoint(path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> CheckpointInfo:
    """Format, size on disk against the same model in fp16, and each module's kernel."""
    from safetensors import safe_open

    path = Path(path)
    qcfg = read_quantization_config(path)
    stored = stored_format(qcfg)
    suffix, quantized_state = stored.packed_suffix, (*QuantLinear.QUANTIZED_STATE, *stored.stored_state)
    fp16_bytes = 0
    kernels: dict[str, str] = {}
    rejected: dict[str, dict[str, str]] = {}
    formats: dict[str, LinearFormat] = {}
    stored_bits: Counter = Counter()  # module -> bits of every tensor that stores its weight
    for weights in sorted(path.glob("*.safetensors")):  # one file, or the shards --low-memory writes
        with safe_open(weights, "pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                shape = tensor.get_shape()
                owner, _, leaf = key.rpartition(".")
                if leaf in quantized_state:
                    stored_bits[owner] += math.prod(shape) * SAFETENSORS_BITS[tensor.get_dtype()]
                if key.endswith(suffix):
                    name = key[: -len(suffix)]
                    module = quantized_module_qcfg(qcfg, name)
                    in_f, out_f = linear_shape(module, shape)
                    fmt = linear_format_from(module, in_f, out_f)
                    formats[name] = fmt
                    fp16_bytes += in_f * out_f * 2
                    reasons = explain(fmt, device, dtype)
                    kernels[name] = select_kernel(fmt, device, dtype, reasons=reasons).name
                    for kname, reason in reasons.items():
                        if reason:
                            rejected.setdefault(kname, {})[name] = reason
                elif key.rpartition(".")[2] not in quantized_state:
                    fp16_bytes += math.prod(shape) * 2
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    per_weight = {n: stored_bits[n] / (f.in_features * f.out_features) for n, f in formats.items()}
    return CheckpointInfo(path, qcfg, size, fp16_bytes, kernels, rejected, formats, per_weight)


evaluate_tasks = run_tasks

__all__ = [
    "QuantLinear",
    "TASKS",
    "ErrorReport",
    "error_report",
    "evaluate_tasks",
    "bench",
    "generate",
    "evaluate_perplexity",
    "inspect_checkpoint",
    "is_quantized_checkpoint",
    "load",
    "load_fp_model",
    "quantize",
]
