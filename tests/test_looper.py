"""The looper's lockstep true-sequential pass against a naive one that reruns the layer per subset."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import make_model

import treeq
from treeq.data import calibration_batches
from treeq.engine import lockstep, looper
from treeq.engine.experts import unfuse_experts
from treeq.engine.plan import MethodPlan
from treeq.engine.quant_log import QuantLog
from treeq.models import spec_for


def _batches(tokenizer, text_file):
    return calibration_batches(tokenizer, text_file.read_text(), 8, 64, 4)


def _naive_true_sequential(model, spec, plan, batches, fallback_below=0):
    """Per subset: rerun every batch through the layer from its start, then quantize; replay at the end."""
    results = {}
    inputs = looper.capture_inputs(model, spec, batches, torch.device("cpu"))
    with torch.no_grad(), ThreadPoolExecutor(1) as pool:
        for index, layer in enumerate(model.get_submodule(spec.layers)):
            prefix = f"{spec.layers}.{index}."
            for bound in looper.bind_layer(layer, spec, plan.default, [torch.device("cpu")]):
                looper._collect(layer, [bound], inputs, index)
                for name, r in looper._quantize_subset(
                    layer, bound, plan, prefix, index, QuantLog(), pool, fallback_below
                ):
                    results[prefix + name] = r
            for forward in looper._forwards(layer, inputs, index, advance=True):
                forward()
    return results


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen2_moe"])
def test_lockstep_equals_rerunning_the_layer_for_each_subset(arch, tokenizer, text_file):
    """For MoE, each expert's statistics come from its own tokens and rare experts fall back to RTN
    (a threshold of 40 tokens makes some do so), in both runs alike."""
    cfg = treeq.QuantConfig(method="gptq", bits=3, group_size=32, desc_act=True)
    batches = _batches(tokenizer, text_file)
    a, b = make_model(arch), make_model(arch)
    spec = spec_for(a.config)
    for m in (a, b):
        unfuse_experts(m, spec)
    log = QuantLog(echo=str)
    fast = looper.quantize_layers(a, spec, MethodPlan(cfg), batches, torch.device("cpu"), log=log, fallback_below=40)
    slow = _naive_true_sequential(b, spec, MethodPlan(cfg), batches, fallback_below=40)
    if arch == "qwen2_moe":
        assert 0 < sum(bool(r.fallback) for r in log.records) < len(log.records) / 2
    assert fast.keys() == slow.keys()
    for name in fast:
        assert torch.equal(fast[name].codes, slow[name].codes), name
        assert torch.equal(fast[name].scales, slow[name].scales), name


def test_true_sequential_differs_from_one_pass(tokenizer, text_file):
    """Later subsets really see earlier ones quantized (else the two modes would agree)."""
    cfg = treeq.QuantConfig(method="gptq", bits=2, group_size=32)
    batches = _batches(tokenizer, text_file)
    runs = {}
    for seq in (True, False):
        m = make_model("llama")
        runs[seq] = looper.quantize_layers(
            m, spec_for(m.config), MethodPlan(cfg), batches, torch.device("cpu"), seq, QuantLog(echo=str)
        )
    first = "model.layers.0.self_attn.q_proj"
    later = "model.layers.0.mlp.down_proj"
    assert torch.equal(runs[True][first].codes, runs[False][first].codes)
    assert not torch.equal(runs[True][later].codes, runs[False][later].codes)


def test_spec_out_of_execution_order_is_a_clear_error(tokenizer, text_file):
    model = make_model("llama")
    spec = spec_for(model.config)
    swapped = spec.model_copy(update={"subsets": (spec.subsets[1], spec.subsets[0], *spec.subsets[2:])})
    cfg = treeq.QuantConfig(method="rtn", bits=4, group_size=32)
    with pytest.raises(treeq.TreeqError, match="'o' ran after a later one"):
        looper.quantize_layers(
            model, swapped, MethodPlan(cfg), _batches(tokenizer, text_file), torch.device("cpu"), log=QuantLog(str)
        )
    _assert_no_batch_left()


def _lockstep_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == lockstep._Worker.THREAD_NAME]


def _assert_no_batch_left():
    """Every lockstep worker thread has ended, none left paused inside a forward."""
    assert lockstep._Worker.started > 0
    assert _lockstep_threads() == [] and lockstep._Worker.alive == []


def test_a_failing_method_leaves_no_paused_threads(tokenizer, text_file, monkeypatch):
    model = make_model("llama")
    method = MethodPlan(treeq.QuantConfig(method="rtn", bits=4, group_size=32))

    def boom(weight, stats):
        raise RuntimeError("method failed")

    monkeypatch.setattr(method.default, "quantize", boom)
    with pytest.raises(RuntimeError, match="method failed"):
        looper.quantize_layers(
            model,
            spec_for(model.config),
            method,
            _batches(tokenizer, text_file),
            torch.device("cpu"),
            log=QuantLog(str),
        )
    _assert_no_batch_left()


def test_lockstep_reuses_its_worker_threads_across_layers_and_ends_them_after(tokenizer, text_file):
    model = make_model("llama")
    assert model.config.num_hidden_layers > 1
    batches = _batches(tokenizer, text_file)
    method = MethodPlan(treeq.QuantConfig(method="rtn", bits=4, group_size=32))
    before, threads = lockstep._Worker.started, threading.active_count()
    looper.quantize_layers(model, spec_for(model.config), method, batches, torch.device("cpu"), log=QuantLog(str))
    assert 0 < lockstep._Worker.started - before <= len(batches) + 1
    # Threads that ran torch ops and stayed alive would slow every later OpenMP region (see
    # lockstep._Worker.retire_all).
    assert _lockstep_threads() == [] and threading.active_count() == threads


@pytest.mark.parametrize("calib_dtype", ["float32", "bfloat16"])
def test_calibration_forwards_autocast_to_calib_dtype(calib_dtype, tokenizer, text_file):
    """The matmuls' outputs (here: down_proj's input, made from gate/up outputs) come out in the
    calibration dtype, and the quantized codes stay close to an fp32 run's."""
    cfg = treeq.QuantConfig(method="gptq", bits=4, group_size=32, calib_dtype=calib_dtype)
    model = make_model("llama")
    seen = set()
    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda _m, args: seen.add(args[0].dtype))
    spec, batches = spec_for(model.config), _batches(tokenizer, text_file)
    dtype = getattr(torch, calib_dtype)
    results = looper.quantize_layers(
        model, spec, MethodPlan(cfg), batches, torch.device("cpu"), log=QuantLog(str), autocast=dtype
    )
    assert seen == {dtype}
    reference = make_model("llama")
    fp32 = MethodPlan(treeq.QuantConfig(method="gptq", bits=4, group_size=32, calib_dtype="float32"))
    exact = looper.quantize_layers(reference, spec, fp32, batches, torch.device("cpu"), log=QuantLog(str))
    agree = torch.cat([(results[n].codes == exact[n].codes).flatten() for n in exact]).float().mean()
    # bf16 forwards move many of a tiny random model's weights across a rounding boundary. Measured
    # agreement: 0.884 with every route this test can take forced on a Zen 5 (native bf16 with
    # treeq's Gram kernel; TREEQ_CPU_ISA=avx2, the fp32 statistics route; oneDNN capped with
    # ONEDNN_MAX_CPU_ISA=AVX2 and AVX512_CORE; 1 and 2 threads), spread 5e-4; 0.799 with the
    # method handed weights rounded to bf16 (weights must stay fp32). 0.84 sits between. Checked
    # failing (0.799) with the looper rounding each weight to its statistics' dtype.
    assert agree == 1 if calib_dtype == "float32" else 0.84 < agree < 1


def test_auto_calib_dtype_is_bf16_only_where_native(monkeypatch):
    from treeq.engine.calib_precision import calibration_dtype

    # The CPU's instruction sets are faked here, so a TREEQ_CPU_ISA cap set for the whole run (to
    # stand in for an older CPU) must not also apply.
    monkeypatch.delenv("TREEQ_CPU_ISA", raising=False)
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
        assert calibration_dtype("auto", torch.device("cpu")) == expected
    assert calibration_dtype("float32", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_rerunning_equals_lockstep(arch, tokenizer, text_file):
    """The low-memory driver (rerun the layer up to each subset) records the same inputs."""
    cfg = treeq.QuantConfig(method="gptq", bits=3, group_size=32)
    batches = _batches(tokenizer, text_file)
    runs = []
    for lockstep_on in (True, False):
        m = make_model(arch)
        runs.append(
            looper.quantize_layers(
                m,
                spec_for(m.config),
                MethodPlan(cfg),
                batches,
                torch.device("cpu"),
                log=QuantLog(str),
                lockstep=lockstep_on,
            )
        )
    assert runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        assert torch.equal(runs[0][name].codes, runs[1][name].codes), name


def test_a_subsets_statistics_exist_only_from_its_first_input_until_it_is_quantized(tokenizer, text_file):
    """Memory: down_proj's Hessian must not be allocated while q/k/v/o/gate/up are quantized."""
    model = make_model("llama")
    spec = spec_for(model.config)
    method = MethodPlan(treeq.QuantConfig(method="gptq", bits=4, group_size=32))
    bound = looper.bind_layer(model.get_submodule(spec.layers)[0], spec, method, [torch.device("cpu")])
    assert [b._groups for b in bound] == [None] * len(bound)
    seen = []
    real = looper._quantize_subset

    def spy(layer, b, *args, **kwargs):
        seen.append([other.name for other in bound_of_layer if other._groups])  # allocated right now
        yield from real(layer, b, *args, **kwargs)

    bound_of_layer = []
    real_bind = looper.bind_layer

    def bind_spy(*args):
        bound_of_layer[:] = real_bind(*args)
        return bound_of_layer

    looper._quantize_subset, looper.bind_layer = spy, bind_spy
    try:
        looper.quantize_layers(
            model, spec, method, _batches(tokenizer, text_file), torch.device("cpu"), log=QuantLog(str)
        )
    finally:
        looper._quantize_subset, looper.bind_layer = real, real_bind
    names = [b.name for b in bound]
    # When subset k is quantized, only its own statistics exist (earlier ones were released).
    assert seen[: len(names)] == [[name] for name in names]


def test_a_worker_released_after_retirement_begins_does_not_stay_in_the_idle_pool():
    """A batch reports "done" before its worker rejoins the idle pool; retiring in between must
    not leave the ended worker there, where the next run would hand it a job that never runs."""
    gate = threading.Event()

    def job():
        gate.wait()
        lockstep._Worker.release_current()

    lockstep._Worker.start(job)
    retiring = threading.Thread(target=lockstep._Worker.retire_all)
    retiring.start()
    retiring.join(timeout=0.2)  # retirement has begun and waits for the job
    gate.set()
    retiring.join()
    assert lockstep._Worker.idle == [] and _lockstep_threads() == []
