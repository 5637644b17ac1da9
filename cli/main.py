"""`treeq` command line: a thin shell over treeq's Python API."""

from __future__ import annotations

import functools
import logging
import os
import signal
from collections import Counter
from pathlib import Path

import click

import treeq  # before torch: it sets allocator options torch and glibc read once

# isort: split
import torch

from treeq.config import CalibrationSettings, CheckpointSettings, DistillSettings, QuantConfig
from treeq.data import BOS_RULES
from treeq.default_model import DEFAULT_GROUP_SIZE, DEFAULT_MODEL
from treeq.engine.resume import Interrupted
from treeq.errors import TreeqError
from treeq.eval.compare_table import CompareInterrupted
from treeq.eval.perplexity import KV_PROTOCOLS
from treeq.eval.tasks import TASKS, check_tasks, task_dir
from treeq.methods import METHODS
from treeq.models import load_spec_file
from treeq.numerics import GRIDS
from treeq.recipe import merged, read_recipe
from treeq.runtime.input_transform import InputTransform
from treeq.runtime.kv_choice import NO_KV
from treeq.schemes import KV_PRESETS, ActivationScheme, WeightScheme
from treeq.storage.model_card import record_perplexity
from treeq.transforms import TRANSFORMS
from treeq.user_input import new_output_dir, writable_dir

from .config_options import derived_options, parse_key_values, settings_from
from .kv_options import kv_chunk_option, kv_options, kv_scheme


def user_errors(fn):
    """Show TreeqError as a one-line message instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TreeqError as e:
            raise click.ClickException(str(e)) from None
        except Interrupted as e:  # Ctrl-C after finished layers: one line instead of a traceback
            click.echo(e.told(f"the same command and --out {str(e.work).removesuffix('.partial')} --resume"), err=True)
            raise SystemExit(130) from None
        except CompareInterrupted as e:  # Ctrl-C with rows of the table finished: where they are
            click.echo(e.told("the same command and --resume"), err=True)
            raise SystemExit(130) from None

    return wrapper


def sigterm_interrupts(fn):
    """SIGTERM (a scheduler stopping the job) ends the command as Ctrl-C does, so an interrupted
    quantize keeps its finished layers; the previous handler is back afterwards."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            return fn(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


def threads_option(fn):
    return click.option(
        "--threads",
        type=click.IntRange(1),
        default=os.cpu_count(),
        show_default=True,
        help="torch intra-op threads (CPU work)",
    )(fn)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_option(default: str, multiple: bool = False):
    return click.option(
        "--dtype",
        "dtypes" if multiple else "dtype",
        type=click.Choice(sorted(DTYPES)),
        default=(default,) if multiple else default,
        multiple=multiple,
        show_default=True,
        help="activation dtype" + (" (repeatable)" if multiple else ""),
    )


def _register_spec_file(_ctx, _param, path):
    if path is not None:
        try:
            load_spec_file(path)
        except TreeqError as e:
            raise click.BadParameter(str(e)) from None
    return path


def spec_option(fn):
    """``--spec FILE``: a tree spec of the user's, registered before the command runs."""
    return click.option(
        "--spec",
        "spec_file",
        type=click.Path(path_type=Path),
        default=None,
        expose_value=False,
        is_eager=True,
        callback=_register_spec_file,
        help="a Python file defining SPEC = TreeSpec(...) for an architecture treeq does not know",
    )(fn)


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def _free_path(base: Path) -> Path:
    """``base`` or ``base-2``, ``base-3``...: a default output never overwrites an earlier run."""
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


@click.group()
@click.version_option(treeq.__version__)
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def main(verbose: bool) -> None:
    """treeq: post-training quantization of Hugging Face causal LMs."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _model_name(model: str | None) -> str:
    """How default output directories name the model: its directory name, or the built-in's name."""
    return DEFAULT_MODEL if model is None else Path(model).name


def _task_names(tasks: str) -> list[str]:
    names = list(TASKS) if tasks == "all" else [t.strip() for t in tasks.split(",")]
    check_tasks(names)  # before the model is loaded and its perplexity measured
    return names


def _print_ppl(label: str, result) -> None:
    click.echo(f"{label} perplexity: {result.ppl:.3f}  [{result.protocol()}]")


SETTINGS = {
    "weights": [WeightScheme],
    "calibration": [CalibrationSettings],
    "checkpoint": [CheckpointSettings],
    "options": [m.Options for m in METHODS.values() if m.Options is not None],
    "migration_options": [t.Options for t in TRANSFORMS.values() if t.Options is not None],
}


@main.command()
@click.argument("model", required=False)
@click.option(
    "--config",
    "recipe",
    type=click.Path(path_type=Path),
    default=None,
    help="a recipe (YAML or JSON of QuantConfig's fields, e.g. an output directory's recipe.yaml); "
    "options given on the command line change it",
)
@click.option("--method", type=click.Choice(sorted(METHODS)), default=None, help="[default: gptq]")
@click.option(
    "--migration",
    type=click.Choice(sorted(TRANSFORMS)),
    default=None,
    help=QuantConfig.model_fields["migration"].description + " (awq before gptq: AWQ's scales, GPTQ's rounding)",
)
@derived_options(SETTINGS)
@derived_options({"activations": [ActivationScheme]}, prefix="act-")
@click.option("--lkd", is_flag=True, help="distil every quantized layer towards its fp output (ZeroQuant's LKD)")
@derived_options({"distill": [DistillSettings]}, prefix="lkd-")
@click.option(
    "--option",
    "options",
    multiple=True,
    help="method setting KEY=VALUE (repeatable), e.g. --option krot=8 --option epochs=[10,10]",
)
@click.option(
    "--override",
    "overrides",
    multiple=True,
    help="PATTERN=skip or PATTERN=KEY:VALUE,... (repeatable): the weight scheme of modules whose name "
    "PATTERN matches (re.match, first match wins), e.g. '.*self_attn=bits:8' or 'model\\.layers\\.0\\.=skip'",
)
@click.option("--calib-text", default="wiki-train", show_default=True, help="wiki-train, news, or a text file")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="output directory (must not exist)")
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--devices",
    default=None,
    help="quantize modules in one worker thread per listed device, e.g. cuda:0,cuda:1 or cpu,cpu",
)
@click.option(
    "--low-memory",
    is_flag=True,
    help="stream MODEL one decoder layer at a time: peak memory about one layer's fp weights",
)
@click.option(
    "--resume",
    is_flag=True,
    help="continue an interrupted run from the finished layers kept in OUT.partial (same model and settings)",
)
@click.option(
    "--eval/--no-eval",
    "evaluate",
    default=None,
    help="perplexity before and after (default: on for the built-in model)",
)
@click.option("--eval-windows", type=int, default=32, show_default=True)
@kv_options(with_protocol=False)
@spec_option
@threads_option
@user_errors
@sigterm_interrupts
def quantize(
    model,
    recipe,
    method,
    migration,
    lkd,
    options,
    overrides,
    calib_text,
    out,
    device,
    devices,
    low_memory,
    resume,
    evaluate,
    eval_windows,
    kv_preset,
    threads,
    **settings,
):
    """Quantize MODEL (a local HF directory; omit it for the built-in SmolLM2-135M) and save it;
    --kv stores a KV-cache scheme with it (calibrated on --calib-text where it needs calibration)."""
    _set_threads(threads)
    builtin = model is None
    kv = kv_scheme(kv_preset, settings)  # takes the --kv-FIELD options out of settings
    given = settings_from(settings)
    if kv is not None:
        given["kv_cache"] = None if kv == NO_KV else kv.model_dump()
    given["options"] = {**given.get("options", {}), **parse_key_values(options)}
    if method is not None:
        given["method"] = method
    if migration is not None:
        given["migration"] = migration
    if overrides:
        given["overrides"] = [parse_override(o) for o in overrides]
    if lkd:
        given.setdefault("distill", {})
    config = treeq.QuantConfig.build(**merged(read_recipe(recipe) if recipe else {}, given))
    config = treeq.api.for_model(config, model)
    w = config.weights
    method = f"{config.migration}+{config.method}" if config.migration else config.method
    if out is None:
        out = _free_path(Path("treeq-out") / f"{_model_name(model)}-{method}-w{w.bits}g{w.group_size}")
    else:
        new_output_dir(out)  # before the fp model is loaded and evaluated
    click.echo(f"threads={threads} device={device} settings: {config.model_dump()}")
    run = dict(calib_text=calib_text, device=device, devices=devices, resume=resume)
    if low_memory:
        # Perplexity would need the whole fp model in memory; `treeq eval OUT` measures the result.
        report = treeq.quantize(model, config, out, low_memory=True, **run)
        click.echo(f"quantized {len(report.log.records)} modules in {report.seconds:.1f}s -> {report.out}")
        return
    evaluate = builtin if evaluate is None else evaluate
    treeq.api.check_run(model, config, calib_text, device, devices, out, resume)  # not after the fp perplexity
    fp, tok = treeq.load_fp_model(model)
    fp_ppl = treeq.evaluate_perplexity(fp, tok, max_windows=eval_windows) if evaluate else None
    report = treeq.quantize(fp, config, out, tokenizer=tok, **run)
    click.echo(f"quantized {len(report.log.records)} modules in {report.seconds:.1f}s -> {report.out}")
    if fp_ppl is not None:
        q_ppl = treeq.evaluate_perplexity(report.model, tok, max_windows=eval_windows)
        _print_ppl("fp       ", fp_ppl)
        _print_ppl(f"{method} w{w.bits}", q_ppl)
        click.echo(f"increase over fp: {q_ppl.ppl - fp_ppl.ppl:+.3f}")
        record_perplexity(report.out, fp_ppl, q_ppl)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise TreeqError(f"{flag} {text!r} is not a comma-separated list of integers, e.g. 4,3") from None


def parse_override(text: str) -> dict:
    """``PATTERN=skip`` or ``PATTERN=KEY:VALUE,KEY:VALUE`` -> ModuleOverride fields."""
    pattern, sep, rest = text.rpartition("=")
    if not sep or not pattern or not rest:
        raise TreeqError(f"--override {text!r} is not PATTERN=skip or PATTERN=KEY:VALUE,...; e.g. '.*mlp=bits:8'")
    if rest == "skip":
        return {"pattern": pattern, "skip": True}
    pairs = [p.partition(":") for p in rest.split(",")]
    if any(not sep or not k for k, sep, _ in pairs):
        raise TreeqError(f"--override {text!r}: write each change as KEY:VALUE, e.g. bits:8,group_size:64")
    return {"pattern": pattern, **parse_key_values(tuple(f"{k}={v}" for k, _, v in pairs))}


@main.command("eval")
@click.argument("target", required=False)
@click.option("--ppl/--no-ppl", default=True, show_default=True, help="perplexity on held-out text")
@click.option("--text", default="wiki-test", show_default=True, help="wiki-test, news, or a text file")
@click.option("--seqlen", type=int, default=1024, show_default=True)
@click.option("--max-windows", type=int, default=32, show_default=True)
@click.option("--device", default="auto", show_default=True)
@dtype_option("float32")
@click.option("--kernel", default=None, help="force a kernel by name")
@click.option("--tasks", default=None, help=f"lm-eval tasks, comma-separated, or 'all': {', '.join(TASKS)}")
@click.option("--limit", type=click.IntRange(1), default=None, help="at most this many documents per task")
@click.option(
    "--bos",
    type=click.Choice(BOS_RULES),
    default=BOS_RULES[0],
    show_default=True,
    help="a BOS before each perplexity window: auto where the tokenizer adds one to text",
)
@kv_options(with_protocol=True)
@spec_option
@threads_option
@user_errors
def evaluate(
    target,
    ppl,
    text,
    seqlen,
    max_windows,
    device,
    dtype,
    kernel,
    tasks,
    limit,
    bos,
    kv_preset,
    kv_protocol,
    kv_chunk,
    threads,
    **kv,
):
    """Evaluate TARGET: a treeq checkpoint, a local fp model, or (omitted) the built-in model."""
    _set_threads(threads)
    kv = kv_scheme(kv_preset, kv)
    task_names = _task_names(tasks) if tasks else []
    model, tok = _load_target(target, device, dtype, kernel)
    # Chosen (and a kvquant scheme calibrated) once for perplexity and tasks alike.
    kv = treeq.api.choose_kv(model, tok, kv)
    if ppl:
        result = treeq.evaluate_perplexity(model, tok, text, seqlen, max_windows, bos, kv, kv_protocol, kv_chunk)
        _print_ppl(target or DEFAULT_MODEL, result)
    if task_names:
        how = treeq.api.kv_protocol_for(model, tok, kv, kv_protocol, kv_chunk)
        click.echo(f"tasks KV: {'no quantized cache' if how is None else how.describe()}")
        run = dict(kv=kv, kv_protocol=kv_protocol, kv_chunk=kv_chunk)
        for task, metrics in treeq.evaluate_tasks(model, tok, task_names, limit, **run).items():
            click.echo(f"{task}: " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        click.echo(f"(task definitions: lm_eval --include_path {task_dir()})")


def _load_target(target: str | None, device: str, dtype: str, kernel: str | None):
    """(model, tokenizer) of a treeq checkpoint, a local fp model, or (None) the built-in model."""
    if target is not None and treeq.api.is_quantized_checkpoint(target):
        return treeq.load(target, device=device, dtype=DTYPES[dtype], kernel=kernel)
    if kernel is not None:
        fp = target or DEFAULT_MODEL
        raise TreeqError(f"--kernel {kernel} picks a quantized checkpoint's kernel; {fp} is an fp model, drop --kernel")
    model, tok = treeq.load_fp_model(target, dtype=DTYPES[dtype])
    return model.to(treeq.api.resolve_device(device)), tok


@main.command()
@click.argument("model", required=False)
@click.option("--methods", default="rtn,gptq,awq", show_default=True)
@click.option("--bits", "bits_list", default="4,3", show_default=True)
@click.option(
    "--act-bits",
    "act_bits_list",
    default="16",
    show_default=True,
    help="input bits of the quantized linears per row, comma-separated; 16: weight-only (e.g. 16,8,4)",
)
@click.option("--migration", type=click.Choice(sorted(TRANSFORMS)), default=None, help="scale migration of every row")
@click.option("--grid", type=click.Choice(list(GRIDS)), default=None, help="weight grid of every row (default minmax)")
@click.option("--group-size", type=int, default=None, help=f"default 128 ({DEFAULT_GROUP_SIZE} for the built-in model)")
@click.option("--tasks", default=None, help=f"lm-eval tasks too, comma-separated or 'all': {', '.join(TASKS)}")
@click.option("--limit", type=click.IntRange(1), default=None, help="at most this many documents per task")
@click.option("--calib-samples", type=int, default=128, show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--calib-text", default="wiki-train", show_default=True)
@click.option("--eval-text", default="wiki-test", show_default=True)
@click.option("--eval-seqlen", type=int, default=1024, show_default=True)
@click.option("--eval-windows", type=int, default=32, show_default=True)
@click.option(
    "--kv",
    "kv_list",
    default=None,
    help=f"KV-cache rows on the fp model, comma-separated: {', '.join(KV_PRESETS)}; adds a cache bytes/token column",
)
@click.option(
    "--kv-protocol",
    "kv_protocols",
    default=KV_PROTOCOLS[0],
    show_default=True,
    help=f"perplexity protocols of each KV row, comma-separated: {', '.join(KV_PROTOCOLS)} (as treeq eval's)",
)
@kv_chunk_option
@click.option(
    "--kv-tokens",
    type=click.IntRange(1),
    default=4096,
    show_default=True,
    help="tokens of --eval-text prefilled before cache bytes per token are counted",
)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="directory for checkpoints and tables")
@click.option("--resume", is_flag=True, help="continue the interrupted compare in --out (the same settings)")
@threads_option
@user_errors
@sigterm_interrupts
def compare(
    model,
    methods,
    bits_list,
    act_bits_list,
    migration,
    grid,
    group_size,
    tasks,
    limit,
    calib_samples,
    seqlen,
    calib_text,
    eval_text,
    eval_seqlen,
    eval_windows,
    kv_list,
    kv_protocols,
    kv_chunk,
    kv_tokens,
    out,
    resume,
    threads,
):
    """Quantize MODEL with each method and bit width, and evaluate each --kv cache on the fp model; one
    table of size, time, perplexity and tasks (and cache bytes per token with --kv)."""
    _set_threads(threads)
    if resume and out is None:
        raise TreeqError("--resume continues the compare in --out; give the --out of the interrupted one")
    out = out or _free_path(Path("treeq-out") / f"compare-{_model_name(model)}")
    task_names = _task_names(tasks) if tasks else []
    treeq.compare(
        model,
        [m.strip() for m in methods.split(",")],
        _int_list(bits_list, "--bits"),
        out,
        act_bits=tuple(_int_list(act_bits_list, "--act-bits")),
        group_size=group_size,
        tasks=tuple(task_names),
        limit=limit,
        calib_text=calib_text,
        eval_text=eval_text,
        eval_seqlen=eval_seqlen,
        eval_windows=eval_windows,
        kv=tuple(k.strip() for k in kv_list.split(",")) if kv_list else (),
        kv_protocols=tuple(p.strip() for p in kv_protocols.split(",")),
        kv_chunk=kv_chunk,
        kv_tokens=kv_tokens,
        resume=resume,
        calib_samples=calib_samples,
        seqlen=seqlen,
        **({} if migration is None else {"migration": migration}),
        **({} if grid is None else {"grid": grid}),
    )
    click.echo((out / "compare.md").read_text())
    click.echo(f"written: {out / 'compare.md'}, {out / 'compare.csv'}")


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--png", type=click.Path(path_type=Path), default=None, help="default: DIRECTORY/errors.png")
@click.option("--top", type=click.IntRange(1), default=5, show_default=True)
@user_errors
def report(directory, png, top):
    """Plot DIRECTORY's per-layer, per-module quantization loss and name the hardest modules."""
    rep = treeq.error_report(directory, png, top)
    click.echo(f"plot: {rep.png}")
    click.echo("hardest modules (loss / median loss of the same module in other layers):")
    for r in rep.hardest:
        click.echo(f"  layer {r['layer']:>3} {r['module']:<22} loss {r['loss']:.4e}")


@main.command()
@click.argument("model", required=False)
@click.option("--text", default="wiki-train", show_default=True, help="wiki-train, news, or a text file")
@click.option("--samples", type=click.IntRange(1), default=16, show_default=True, help="windows of text")
@click.option("--seqlen", type=click.IntRange(2), default=512, show_default=True)
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="SmoothQuant's strength")
@click.option("--threshold", type=click.FloatRange(0, min_open=True), default=6.0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("treeq-stats"), show_default=True)
@spec_option
@threads_option
@user_errors
def stats(model, text, samples, seqlen, alpha, threshold, out, threads):
    """Per-layer input statistics of MODEL's linears (largest channel, share of channels above the
    LLM.int8() threshold, kurtosis), as is and after SmoothQuant: a CSV and a PNG in OUT."""
    _set_threads(threads)
    writable_dir(out)  # before the statistics are gathered
    fp, tok = treeq.load_fp_model(model)
    rows = treeq.activation_stats(fp, tok, text, samples, seqlen, alpha, threshold)
    for path in treeq.api.save_stats(rows, out, alpha, threshold):
        click.echo(f"wrote {path}")
    worst = max(rows, key=lambda r: r.max_absmax)
    click.echo(
        f"largest input channel: layer {worst.layer} {worst.subset} {worst.max_absmax:.1f} "
        f"({worst.max_absmax_smoothed:.1f} after SmoothQuant {alpha})"
    )


@main.group()
def spec() -> None:
    """Tree specs: check that one fits a model."""


@spec.command("check")
@click.argument("model")
@spec_option
@user_errors
def spec_check(model):
    """Verify the spec for MODEL (a local directory) covers every Linear of each decoder layer once."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from treeq.engine.experts import layer_modules, unfuse_experts
    from treeq.models import spec_for
    from treeq.spec_check import check_spec

    config = AutoConfig.from_pretrained(treeq.api.model_path(model))
    config.__dict__.pop("quantization_config", None)
    spec_ = spec_for(config)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    check_spec(skeleton, spec_)
    unfuse_experts(skeleton, spec_)
    layers = skeleton.get_submodule(spec_.layers)
    n_linears = sum(len(layer_modules(layer, spec_)) for layer in layers)
    click.echo(
        f"OK: {config.model_type} spec covers {n_linears} linears in {len(layers)} layers "
        f"in subsets {', '.join(s.name for s in spec_.subsets)}"
    )


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--explain", is_flag=True, help="why each other kernel was rejected")
@click.option("--modules", "list_modules", is_flag=True, help="list every module under its scheme")
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--dtype",
    "dtypes",
    type=click.Choice(sorted(DTYPES)),
    multiple=True,
    default=("float32", "bfloat16"),
    show_default=True,
    help="activation dtypes to show kernel choices for (repeatable)",
)
@user_errors
def inspect(directory, explain, list_modules, device, dtypes):
    """Format, size and kernel choice of a treeq checkpoint."""
    infos = {d: treeq.inspect_checkpoint(directory, device, DTYPES[d]) for d in dtypes}
    info = next(iter(infos.values()))
    q = info.quantization
    click.echo(f"checkpoint: {info.path}")
    pack = f", pack {q['pack_dtype']}" if "pack_dtype" in q else ""  # the GPTQ layout's word type
    click.echo(
        f"format: {q.get('format', q['quant_method'])} "
        f"({q['checkpoint_format']}{pack})  "
        f"method: {q.get('method', q['meta'].get('method'))}  "
        f"bits: {q['bits']}  group_size: {q['group_size']}  sym: {q['sym']}  desc_act: {q['desc_act']}  "
        f"grid: {q.get('grid', 'minmax')}"
    )
    if info.kv_cache is not None:
        stored = f"; calibration in {info.kv_calibration}" if info.kv_calibration else ""
        click.echo(f"KV cache (used by eval and generate unless --kv is given): {info.kv_cache.describe()}{stored}")
    transform = q.get("input_transform")
    if transform:
        click.echo(f"input transform (before the matmul): {InputTransform.explain(transform)}")
    click.echo(
        f"size on disk: {info.size_bytes / 2**20:.1f} MiB vs fp16 {info.fp16_bytes / 2**20:.1f} MiB "
        f"({info.size_bytes / info.fp16_bytes:.2f}x)"
    )
    for scheme, modules in _by_scheme(info.formats).items():
        bits = sum(info.bits_per_weight[m] for m in modules) / len(modules)
        click.echo(f"scheme {scheme}: {len(modules)} modules, e.g. {modules[0]}; {bits:.2f} bits per weight stored")
        if list_modules:
            click.echo("".join(f"  {m}{_extras_text(info, m)}\n" for m in modules), nl=False)
    for dtype, info in infos.items():
        for name, count in Counter(info.kernels.values()).items():
            click.echo(f"kernel on {device}/{dtype}: {name} for {count} modules")
        if explain:
            for kernel, reasons in info.rejected.items():
                # One line per distinct reason: SmolLM2's 210 modules share a handful.
                for reason, modules in _grouped(reasons).items():
                    click.echo(f"  {kernel} rejected for {len(modules)} modules (e.g. {modules[0]}): {reason}")


def _extras_text(info, module: str) -> str:
    """A module's own bits and what its weight extras hold (an outlier share), where it has extras."""
    if module not in info.extras:
        return ""
    return f": {info.bits_per_weight[module]:.3f} bits per weight, {info.extras[module]}"


def _scheme_text(fmt) -> str:
    group = "per-row" if fmt.group_size == -1 else f"g{fmt.group_size}"
    text = f"{fmt.bits}-bit {group} {'sym' if fmt.sym else 'asym'} {fmt.grid}"
    a = fmt.activation
    if a is None:
        return text
    return text + f" with inputs {a.describe()}"


def _by_scheme(formats: dict) -> dict[str, list[str]]:
    return _grouped({name: _scheme_text(fmt) for name, fmt in formats.items()})


def _grouped(values: dict[str, str]) -> dict[str, list[str]]:
    """value -> the sorted keys that have it."""
    out: dict[str, list[str]] = {}
    for key in sorted(values):
        out.setdefault(values[key], []).append(key)
    return out


@main.command()
@click.argument("target", required=False)
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0: greedy")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--kernel", default=None, help="force a kernel by name")
@click.option("--device", default="auto", show_default=True)
@dtype_option("bfloat16")
@kv_options(with_protocol=False)
@threads_option
@user_errors
def generate(target, prompt, max_new_tokens, temperature, seed, kernel, device, dtype, kv_preset, threads, **kv):
    """Continue PROMPT with TARGET: a treeq checkpoint, a local fp model, or (omitted) the built-in model."""
    _set_threads(threads)
    kv = kv_scheme(kv_preset, kv)
    model, tok = _load_target(target, device, dtype, kernel)
    click.echo(prompt + treeq.generate(model, tok, prompt, max_new_tokens, temperature, seed, kv))


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--fp", "fp_model", default=None, help="fp model to compare with (default: the one quantized)")
@click.option("--new-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True)
@threads_option
@user_errors
def bench(directory, fp_model, new_tokens, repeats, threads):
    """Prefill and batch-1 decode tokens/s of DIRECTORY vs its fp model in bf16, same process."""
    _set_threads(threads)
    speeds = treeq.bench(directory, fp_model, new_tokens=new_tokens, repeats=repeats)
    fp = speeds["fp bf16"]
    click.echo(f"threads={threads}  prompt={fp.prompt_tokens} tokens  decode={new_tokens} tokens  median of {repeats}")
    click.echo(f"{'model':<10} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode vs fp':>13}")
    for name, sp in speeds.items():
        ratio = sp.decode_tokens_per_s / fp.decode_tokens_per_s
        click.echo(f"{name:<10} {sp.prefill_tokens_per_s:>14.1f} {sp.decode_tokens_per_s:>13.1f} {ratio:>12.2f}x")


if __name__ == "__main__":
    main()
