"""`treeq bench`: the right two models, tokens/s from each model's own time, ratios against fp.

Times are never asserted: a fake clock that advances by a known cost per forward stands in for time."""

import pytest
import torch
from conftest import make_model
from test_cli import run

import treeq
from treeq.eval import speed
from treeq.runtime.quant_linear import QuantLinear


def test_bench_times_the_checkpoint_against_its_own_fp_model_both_in_bf16(model_dir, tokenizer, text_file, tmp_path):
    # Checked failing with bench handing the quantized model in as the fp row too.
    cfg = treeq.QuantConfig(method="rtn", bits=4, group_size=32, calib_samples=4, seqlen=64, batch_size=4)
    treeq.quantize(str(model_dir), cfg, tmp_path / "q", calib_text=str(text_file))
    seen = {}

    def fake_measure(models, ids, new_tokens, repeats):
        seen.update(models)
        return {}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(speed, "measure_speeds", fake_measure)
        treeq.bench(tmp_path / "q", fp_model=str(model_dir), new_tokens=2, repeats=1)
    quantized, fp = seen["quantized"], seen["fp bf16"]
    assert any(isinstance(m, QuantLinear) for m in quantized.modules())
    assert not any(isinstance(m, QuantLinear) for m in fp.modules())
    assert all(p.dtype == torch.bfloat16 for p in fp.parameters())
    source = treeq.load_fp_model(str(model_dir))[0]
    for name, weight in source.state_dict().items():
        torch.testing.assert_close(fp.state_dict()[name], weight.to(torch.bfloat16), rtol=0, atol=0)


def test_tokens_per_second_come_from_each_models_own_time(monkeypatch):
    """Each forward advances a fake clock by seconds_per_token x tokens + overhead, so the expected
    tokens/s are known exactly. Checked failing with the decode rate computed from the prefill time,
    and with every round's times appended to the first model's list."""
    clock = [0.0]
    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock[0])
    costs = {"slow": 0.02, "fast": 0.005}
    overhead = 0.1
    models = {}
    for seed, (name, per_token) in enumerate(costs.items()):
        model = make_model("llama", seed=seed)

        def advance(_module, _args, kwargs, per_token=per_token):
            clock[0] += per_token * kwargs["input_ids"].shape[1] + overhead

        model.register_forward_pre_hook(advance, with_kwargs=True)
        models[name] = model
    prompt, new_tokens = 12, 4
    speeds = speed.measure_speeds(models, torch.arange(prompt)[None], new_tokens=new_tokens, repeats=3)
    for name, per_token in costs.items():
        s = speeds[name]
        assert (s.prompt_tokens, s.new_tokens) == (prompt, new_tokens)
        assert s.prefill_tokens_per_s == pytest.approx(prompt / (per_token * prompt + overhead), rel=1e-9)
        assert s.decode_tokens_per_s == pytest.approx(1 / (per_token + overhead), rel=1e-9)


def test_bench_prints_each_models_decode_rate_over_the_fp_models(monkeypatch, tmp_path):
    # Checked failing with the ratio computed as fp over fp for every row.
    speeds = {"quantized": speed.Speed(30, 3, 100.0, 50.0), "fp bf16": speed.Speed(30, 3, 80.0, 20.0)}
    monkeypatch.setattr(treeq, "bench", lambda *args, **kwargs: speeds)
    r = run("bench", tmp_path, "--fp", tmp_path, "--new-tokens", 3, "--repeats", 1)
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line.split() for line in r.output.splitlines() if line.startswith(("quantized", "fp"))}
    assert rows["quantized"][1:] == ["100.0", "50.0", "2.50x"] and rows["fp"][2:] == ["80.0", "20.0", "1.00x"]


def test_the_prefill_computes_the_last_positions_logits_only_as_generate_does():
    """Every position's logits are work generation never does (a fifth of a long prefill on a big
    vocabulary). Checked failing with the prefill called without ``logits_to_keep``."""
    model = make_model("llama")
    positions = []
    model.lm_head.register_forward_pre_hook(lambda _m, args: positions.append(args[0].shape[1]))
    speed.measure_speeds({"m": model}, torch.arange(12)[None], new_tokens=2, repeats=1)
    assert positions and set(positions) == {1}


def test_a_checkpoint_of_the_built_in_model_names_it_as_treeq_takes_it(monkeypatch, tmp_path):
    """It recorded its cache directory's name, which no command resolves: `treeq bench` on the
    README's own checkpoint failed with "not a local model directory"."""
    from treeq.default_model import DEFAULT_DIR, DEFAULT_MODEL
    from treeq.storage.checkpoint import source_name

    monkeypatch.setenv("TREEQ_CACHE", str(tmp_path))
    assert source_name(tmp_path / DEFAULT_DIR) == DEFAULT_MODEL
    assert source_name(tmp_path / "elsewhere" / DEFAULT_DIR) == DEFAULT_DIR
    assert source_name(tmp_path / "my-llama") == "my-llama"


def test_bench_asks_for_the_fp_model_where_the_recorded_name_is_no_directory(
    model_dir, text_file, tmp_path, monkeypatch
):
    cfg = treeq.QuantConfig(method="rtn", bits=4, group_size=32, calib_samples=4, seqlen=64, batch_size=4)
    treeq.quantize(str(model_dir), cfg, tmp_path / "q", calib_text=str(text_file))
    monkeypatch.chdir(tmp_path / "q")  # the recorded name is the model directory's, which is not here
    with pytest.raises(treeq.TreeqError, match=f"names its fp model '{model_dir.name}': .*; pass the fp model"):
        treeq.bench(tmp_path / "q", new_tokens=2, repeats=1)
    monkeypatch.chdir(model_dir.parent)  # from where the name is a directory, it is the fp model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(speed, "measure_speeds", lambda models, *rest: dict.fromkeys(models))
        assert set(treeq.bench(tmp_path / "q", new_tokens=2, repeats=1)) == {"quantized", "fp bf16"}
