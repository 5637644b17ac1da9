"""Ctrl-C after a finished layer, then resume: the checkpoint an uninterrupted run writes, byte for
byte; saved progress of another run, or none, is refused in one line with nothing on disk changed."""

import csv
import io
import os
import signal

import pytest
from conftest import make_model
from test_bad_input import unchanged_after
from test_cli import quantize_args, run
from test_combinations import QUICK_OPTIONS

import treeq
from treeq.engine import looper
from treeq.engine.quant_log import LOG_NAME, RUN_LOG_NAME, QuantLog
from treeq.engine.resume import Interrupted, partial_dir
from treeq.methods import METHODS

LAYERS = 4
# Timings differ between any two runs; the logs are compared without them.
TIMED = {LOG_NAME, RUN_LOG_NAME}


def config(method="gptq", **kw):
    base = dict(method=method, bits=4, group_size=32, calib_samples=8, seqlen=64, batch_size=4)
    return treeq.QuantConfig(**base, options=QUICK_OPTIONS.get(method, {}), **kw)


@pytest.fixture
def source(tmp_path, tokenizer):
    path = tmp_path / "src"
    make_model("llama", num_hidden_layers=LAYERS).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def ctrl_c():
    raise KeyboardInterrupt


def interrupt_in_layer(monkeypatch, layer: int, interrupt=ctrl_c) -> None:
    """Ctrl-C (or ``interrupt``), once, while layer ``layer`` is being quantized, after its first
    subset: the layers before it are finished, and its own work so far must be thrown away."""
    real, seen = looper._quantize_subset, []

    def quantize_subset(layer_module, bound, plan, prefix, index, *args, **kw):
        if index == layer:
            seen.append(bound.name)
            if len(seen) == 2:
                interrupt()
        yield from real(layer_module, bound, plan, prefix, index, *args, **kw)

    monkeypatch.setattr(looper, "_quantize_subset", quantize_subset)


def without_timings(name: str, text: str) -> list:
    if name == LOG_NAME:
        return [
            {k: v for k, v in row.items() if k not in ("seconds", "peak_mem_mb")}
            for row in csv.DictReader(io.StringIO(text))
        ]
    lines = [line for line in text.splitlines() if not line.startswith(("resumed after", "quantized "))]
    # A module's line: layer module in out loss samples sec peak ...; sec and peak are timings.
    return [p[:6] + p[8:] if p and p[0].isdigit() else p for p in (line.split() for line in lines)]


def assert_same_checkpoint(a, b):
    names = sorted(f.name for f in a.iterdir())
    assert names == sorted(f.name for f in b.iterdir())
    for name in names:
        x, y = (a / name).read_bytes(), (b / name).read_bytes()
        if name in TIMED:
            assert without_timings(name, x.decode()) == without_timings(name, y.decode()), name
        else:
            assert x == y, name


@pytest.mark.parametrize(
    "method,low_memory",
    [("gptq", False), ("gptq", True), ("awq", False)],
    ids=["gptq-memory", "gptq-streamed", "awq-memory"],
)
@pytest.mark.parametrize("layer", [1, 3])
def test_interrupted_then_resumed_writes_the_uninterrupted_checkpoint(
    method, low_memory, layer, source, tmp_path, text_file, monkeypatch
):
    kw = dict(calib_text=str(text_file), low_memory=low_memory)
    whole = tmp_path / "whole"
    treeq.quantize(str(source), config(method), whole, log=QuantLog(str), **kw)
    out = tmp_path / "q"
    interrupt_in_layer(monkeypatch, layer)
    with pytest.raises(Interrupted, match=f"after {layer} of {LAYERS} decoder layers"):
        treeq.quantize(str(source), config(method), out, log=QuantLog(str), **kw)
    assert not out.exists() and partial_dir(out).is_dir()
    log = QuantLog(str)
    treeq.quantize(str(source), config(method), out, log=log, resume=True, **kw)
    assert f"resumed after {layer} of {LAYERS} decoder layers" in "\n".join(log.lines)
    assert not partial_dir(out).exists()
    assert_same_checkpoint(whole, out)


STATIC_INPUTS = dict(activations=dict(bits=8, dynamic=False, granularity="per-tensor"))


@pytest.mark.parametrize(
    "method,extra",
    [(m, {}) for m in sorted(set(METHODS) - {"gptq", "awq"})]
    + [("rtn", {"distill": {}, **STATIC_INPUTS}), ("gptq", {"migration": "smoothquant", "activations": {"bits": 8}})],
)
def test_every_method_resumes_to_the_same_weights(method, extra, source, tmp_path, text_file, monkeypatch):
    """What the saved layers hold (transforms, weight extras, calibrated input levels, distilled
    weights, folded scales) comes back exactly."""

    def quantize(out, **kw):
        treeq.quantize(str(source), config(method, **extra), out, calib_text=str(text_file), log=QuantLog(str), **kw)

    quantize(tmp_path / "whole")
    interrupt_in_layer(monkeypatch, 2)
    with pytest.raises(Interrupted):
        quantize(tmp_path / "q")
    quantize(tmp_path / "q", resume=True)
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "q")


def test_resuming_a_run_of_other_settings_or_model_or_nothing_is_refused(
    source, tmp_path, tokenizer, text_file, monkeypatch
):
    out = tmp_path / "q"
    args = quantize_args(source, text_file, out, "--no-eval")
    unchanged_after(tmp_path, *args, "--resume", needles=("nothing to resume", "without --resume"))
    interrupt_in_layer(monkeypatch, 2)
    r = run(*args)
    assert r.exit_code == 130, r.output
    told = [line for line in r.output.splitlines() if line.startswith("interrupted")]
    assert len(told) == 1 and "after 2 of 4 decoder layers" in told[0] and f"--out {out} --resume" in told[0]
    other = tmp_path / "other"
    make_model("llama", seed=1, num_hidden_layers=LAYERS).save_pretrained(other)
    tokenizer.save_pretrained(other)
    for refused, needles in [
        ((*args, "--bits", 3, "--resume"), ("other quantization settings", "remove it")),
        ((*quantize_args(other, text_file, out, "--no-eval"), "--resume"), ("another model",)),
        ((*args, "--low-memory", "--resume"), ("was made without --low-memory",)),
        (args, ("holds an interrupted run", "add --resume", "remove it")),
    ]:
        unchanged_after(tmp_path, *refused, needles=needles)
    r = run(*args, "--resume")
    assert r.exit_code == 0 and out.is_dir() and not partial_dir(out).exists(), r.output


def test_sigterm_stops_quantize_as_ctrl_c_does(source, tmp_path, text_file, monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    interrupt_in_layer(monkeypatch, 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
    r = run(*quantize_args(source, text_file, tmp_path / "q", "--no-eval"))
    assert r.exit_code == 130 and "interrupted after 1 of 4 decoder layers" in r.output, r.output
    assert (partial_dir(tmp_path / "q") / "resume" / "manifest.json").is_file()
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_failure_writing_a_finished_layer_ends_the_run_with_nothing_left(source, tmp_path, text_file, monkeypatch):
    """A layer's files are written in a thread while the next layer runs; a failure there (a full
    disk, say) still ends the run with that error, and a fresh run leaves nothing behind."""
    from treeq.engine import resume

    real, calls = resume.torch.save, []

    def save(obj, path):
        calls.append(path)
        if len(calls) == 3:  # layer 1's state: layer 0's two files are written
            raise OSError(28, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(resume.torch, "save", save)
    out = tmp_path / "q"
    with pytest.raises(OSError, match="No space left"):
        treeq.quantize(str(source), config(), out, calib_text=str(text_file), log=QuantLog(str))
    assert len(calls) == 3  # no layer written after the failure
    assert not out.exists() and not partial_dir(out).exists()
