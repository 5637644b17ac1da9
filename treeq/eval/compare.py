"""Several methods and bit widths on one model, in one table: quantize once per setting, evaluate
each the same way as the fp model, write the table as Markdown and CSV. KV-cache settings are rows
too, on the fp model, with the bytes their cache holds per token."""

from __future__ import annotations

import torch

from .. import data
from ..engine.resume import partial_dir
from ..errors import TreeqError
from ..runtime.kv_choice import KVChoice
from ..runtime.kv_schemes import cache_nbytes, fp16_cache_nbytes
from ..schemes import KVCacheScheme
from ..user_input import listed, local_path
from .compare_table import CompareInterrupted, CompareProgress, add_deltas
from .perplexity import KV_PROTOCOLS, PerplexityResult, check_kv_protocol
from .tasks import check_tasks


def _fp16_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * 2
    return total


def _evaluate(model, tok, tasks, limit, text: str, seqlen: int, windows: int, **kv) -> tuple[dict, PerplexityResult]:
    """A row's perplexity and task metrics, and how perplexity was measured; ``kv``: the ``kv``,
    ``kv_protocol`` and ``kv_chunk`` that evaluate_perplexity and evaluate_tasks take."""
    from .. import api

    result = api.evaluate_perplexity(model, tok, text, seqlen, windows, **kv)
    row = {"ppl": result.ppl}
    for task, metrics in (api.evaluate_tasks(model, tok, list(tasks), limit, **kv) if tasks else {}).items():
        for metric, value in metrics.items():
            row[f"{task}:{metric}"] = value
    return row, result


def _cache_bytes_per_token(model, choice: KVChoice, ids: torch.Tensor) -> float:
    """Bytes a fresh cache of ``choice`` holds per token once ``ids`` went through ``model`` in one forward."""
    cache = choice.cache(model)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)  # only the cache is wanted
    return cache_nbytes(cache) / ids.shape[-1]


def compare(
    model: str | None,
    methods: list[str],
    bits: list[int],
    out,
    group_size: int | None = None,
    tasks: tuple[str, ...] = (),
    limit: int | None = None,
    calib_text: str = "wiki-train",
    eval_text: str = "wiki-test",
    eval_seqlen: int = 1024,
    eval_windows: int = 32,
    act_bits: tuple[int | None, ...] = (None,),
    kv: tuple[str, ...] = (),
    kv_protocols: tuple[str, ...] = (KV_PROTOCOLS[0],),
    kv_chunk: int = 32,
    kv_tokens: int = 4096,
    resume: bool = False,
    **settings,
) -> list[dict]:
    """Rows of the comparison (the fp model first); checkpoints and compare.{md,csv} go under ``out``.
    ``act_bits``: the input bits of each row's quantized linears, None for weight-only rows (one
    row per method x weight bits x activation bits); ``settings`` may name a ``migration``.
    ``kv``: KV-cache preset names (``KV_PRESETS``, as ``treeq eval --kv`` takes them), one row each
    per protocol of ``kv_protocols``, all on the fp model (a kvquant scheme calibrated on
    ``calib_text`` first). With them the table gets a column of the bytes each row's cache holds per
    token once the first ``kv_tokens`` tokens of ``eval_text`` went through; rows without a
    quantized cache show an fp16 cache's. ``resume``: continue an interrupted compare in ``out`` with the
    same settings (:mod:`treeq.eval.compare_table`)."""
    from .. import api
    from ..config import QuantConfig

    lists = dict(methods=methods, bits=bits, tasks=tasks, act_bits=act_bits, kv=kv, kv_protocols=kv_protocols)
    for name, values in lists.items():
        listed(values, name)
    check_tasks(list(tasks))
    if not (methods and bits) and not kv:
        raise TreeqError("nothing to compare: give methods and bits (or KV presets in kv)")
    out = local_path(out, "out")
    identity = dict(
        model=model, methods=methods, bits=bits, act_bits=act_bits, group_size=group_size, tasks=tasks, limit=limit,
        calib_text=calib_text, eval_text=eval_text, eval_seqlen=eval_seqlen, eval_windows=eval_windows, kv=kv,
        kv_protocols=kv_protocols, kv_chunk=kv_chunk, kv_tokens=kv_tokens, settings=settings,
    )  # fmt: skip
    progress = CompareProgress(out, identity, resume)
    # Every KV name and protocol is checked before any model is loaded, quantized or evaluated.
    kv_schemes = {name: KVCacheScheme.named(name) for name in kv}
    for protocol in kv_protocols:
        check_kv_protocol(protocol, kv_chunk)
    if group_size is not None:
        settings["group_size"] = group_size
    configs = [
        api.for_model(QuantConfig.build(method=m, bits=b, activations=_inputs(a), **settings), model)
        for b in bits
        for a in act_bits
        for m in methods
    ]
    for cfg in configs:  # a row that cannot run fails now, not after the fp model's evaluation
        api.check_run(model, cfg, calib_text)
    evaluation = dict(tasks=tasks, limit=limit, text=eval_text, seqlen=eval_seqlen, windows=eval_windows)
    total = 1 + len(kv_schemes) * len(kv_protocols) + len(configs)
    try:
        _rows(model, configs, progress, calib_text, kv_schemes, kv_protocols, kv_chunk, kv_tokens, **evaluation)
    except KeyboardInterrupt:  # a row's quantize keeps its finished layers (Interrupted): resume continues it
        raise CompareInterrupted(len(progress.rows), total, out) from None
    progress.complete()
    rows = progress.rows
    add_deltas(rows)
    return rows


def _rows(model, configs, progress, calib_text, kv_schemes, kv_protocols, kv_chunk, kv_tokens, **evaluation):
    """compare's steps not yet in ``progress`` (all of them in a fresh run), each recorded once
    finished: the fp row, the KV rows, their cache bytes, the quantized rows."""
    from .. import api

    fp, tok = api.load_fp_model(model)
    bytes_column = f"cache bytes/token ({kv_tokens} tokens)"
    # Rows without a quantized cache show an fp16 cache's bytes, the reference the KV rows are read against.
    no_kv = dict(kv=None, kv_protocol=None, **{bytes_column: fp16_cache_nbytes(fp, 1)}) if kv_schemes else {}
    fp_cells = dict(method="fp", bits=16, act_bits=16, group=None, size_mb=_fp16_bytes(fp) / 2**20, quant_s=None)
    kv_steps = {f"kv {label} {protocol}": (label, protocol) for label in kv_schemes for protocol in kv_protocols}
    kv_left = [step for step in [*kv_steps, "kv bytes"] if kv_schemes and not progress.done(step)]
    # Before any evaluation: a text too short for the prefill fails now.
    prefill = _first_tokens(tok, evaluation["text"], kv_tokens) if "kv bytes" in kv_left else None
    if not progress.done("fp"):
        metrics, result = _evaluate(fp, tok, **evaluation)
        progress.notes.append(f"perplexity: {result.protocol()}")
        progress.finished("fp", {**fp_cells, **no_kv, **metrics})
    choices = {label: api.choose_kv(fp, tok, scheme, calib_text) for label, scheme in kv_schemes.items() if kv_left}
    for step, (label, protocol) in kv_steps.items():
        if progress.done(step):
            continue
        kv_run = dict(kv=choices[label], kv_protocol=protocol, kv_chunk=kv_chunk)
        metrics, result = _evaluate(fp, tok, **evaluation, **kv_run)
        progress.notes.append(f"{label}, {protocol}: {result.kv}")
        progress.finished(step, dict(fp_cells, kv=label, kv_protocol=protocol, **metrics))
    del fp
    if "kv bytes" in kv_left:
        # A bf16 copy gives the cache the 16-bit states a half-precision model would (the fp16 rows
        # compare), after the fp32 model is gone; the calibration made on fp32 states applies as is.
        half = api.load_fp_model(model, dtype=torch.bfloat16)[0]
        per_token = {label: _cache_bytes_per_token(half, choice, prefill) for label, choice in choices.items()}
        for row in progress.rows[1:]:  # the KV rows: weight rows come later
            row[bytes_column] = per_token[row["kv"]]
        del half
        progress.notes.append(
            f"{bytes_column}: the bytes a fresh cache's own tensors hold (codes, scales, outliers, tables, the "
            f"full-precision window and sink) once the first {kv_tokens} tokens of {evaluation['text']} went "
            f"through a bf16 copy of the fp model, / {kv_tokens}; rows without a quantized cache: fp16, 2 bytes x "
            "layers x kv heads x head_dim x 2 (keys, values)"
        )
        progress.finished("kv bytes")
    for cfg in configs:
        w, a = cfg.weights, 16 if cfg.activations is None else cfg.activations.bits
        method = f"{cfg.migration}+{cfg.method}" if cfg.migration else cfg.method
        method += "" if w.grid == "minmax" else f"-{w.grid}"
        name = f"{method}-w{w.bits}a{a}g{w.group_size}"
        if progress.done(name):
            continue
        target = progress.out / name
        if target.is_dir():  # quantized before an interruption, not yet evaluated
            quantized, tok = api.load(target)
        else:
            fp, tok = api.load_fp_model(model)
            resume = partial_dir(target).is_dir()  # its finished layers, kept by an interrupted quantize
            report = api.quantize(fp, cfg, target, tokenizer=tok, calib_text=calib_text, resume=resume)
            quantized, progress.quant_seconds[name] = report.model, report.seconds
            progress.save()
            del fp, report
        size = sum(p.stat().st_size for p in target.glob("*.safetensors"))
        row = dict(method=method, bits=w.bits, act_bits=a, group=w.group_size, size_mb=size / 2**20, **no_kv)
        row["quant_s"] = progress.quant_seconds.get(name)
        row.update(_evaluate(quantized, tok, **evaluation)[0])
        progress.finished(name, row)
        del quantized


def _first_tokens(tokenizer, text: str, tokens: int) -> torch.Tensor:
    """The first ``tokens`` tokens of ``text`` as one batch, the prefill cache bytes are counted after."""
    ids = data.tokenize(tokenizer, data.read_text(text))
    if ids.numel() < tokens:
        raise TreeqError(f"kv_tokens={tokens} is more than the {ids.numel()} tokens of {text}; use at most that many")
    return ids[None, :tokens]


def _inputs(bits: int | None) -> dict | None:
    """The activation scheme of a row: dynamic per-token inputs of ``bits``, or none."""
    return None if bits in (None, 16) else {"bits": bits}
