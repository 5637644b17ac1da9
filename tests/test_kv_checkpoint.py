"""The KV-cache scheme and its calibration saved with a checkpoint: quantize with weights and a KV
scheme in one run, load both back, use the stored scheme by default, replace it or turn it off,
and refuse a bad stored or requested setting in one line."""

import json
import logging

import pytest
import torch
from conftest import make_model
from test_cli import one_line_error, quantize_args, run
from test_end_to_end import quick_config
from test_kivi import kv_model, small_kivi
from test_kvquant import kvquant

import treeq
from treeq.errors import TreeqError
from treeq.eval.perplexity import KVProtocol
from treeq.runtime.kivi import PackedStates
from treeq.runtime.kv_calibration import calibrate_kv, collect_kv_activations
from treeq.runtime.kv_choice import KVChoice, choose_kv, stored_kv
from treeq.storage.kv_checkpoint import KV_CALIBRATION_NAME, load_kv_calibration, save_kv_calibration

KIVI_TINY = ("--kv", "kivi-2", "--kv-group-size", 16, "--kv-residual", 4)  # head_dim 16: KIVI's 32 does not fit
PROMPT = "The river ran past the old mill and"  # 35 byte tokens: more than a 16-token block beyond the window


def assert_same_calibration(a, b):
    assert a.scheme == b.scheme and a.sensitivity == b.sensitivity and len(a.layers) == len(b.layers)
    for x, y in zip(a.layers, b.layers):
        assert (x.keys is None) == (y.keys is None)
        if x.keys is not None:
            assert torch.equal(x.keys.center, y.keys.center) and torch.equal(x.keys.half, y.keys.half)
        for t, u in ((x.key_levels, y.key_levels), (x.value_levels, y.value_levels)):
            assert (t is None and u is None) or torch.equal(t, u)


@pytest.mark.parametrize("granularity", ["per-channel", "per-token"])
def test_a_kvquant_calibration_saves_and_loads_exactly(tmp_path, granularity):
    model = kv_model()
    batches = [torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))]
    scheme = kvquant(4, key_granularity=granularity)
    calibration = calibrate_kv(collect_kv_activations(model, batches), scheme)
    save_kv_calibration(tmp_path, calibration)
    loaded = load_kv_calibration(tmp_path / KV_CALIBRATION_NAME)
    assert_same_calibration(loaded, calibration)
    assert (loaded.layers[0].keys is None) == (granularity == "per-token")


def captured_caches(monkeypatch) -> list:
    """Every cache a KVChoice builds from now on (the one generation runs with)."""
    made = []
    build = KVChoice.cache

    def spy(self, model):
        cache = build(self, model)
        made.append(cache)
        return cache

    monkeypatch.setattr(KVChoice, "cache", spy)
    return made


def test_quantize_stores_kvquant_calibrated_on_the_calibration_text_and_load_reads_it_back(
    tmp_path, tokenizer, text_file, monkeypatch
):
    scheme = kvquant(4, residual=4)
    out = tmp_path / "q"
    report = treeq.quantize(
        kv_model(), quick_config(kv_cache=scheme), out, tokenizer=tokenizer, calib_text=str(text_file)
    )
    assert report.kv_calibration is not None and (out / KV_CALIBRATION_NAME).is_file()
    recorded = json.loads((out / "quantize_config.json").read_text())["meta"]["settings"]["kv_cache"]
    assert recorded == scheme.model_dump()
    model, tok = treeq.load(out)
    stored = stored_kv(model)
    assert stored.scheme == scheme and "stored with q" in stored.origin
    assert_same_calibration(stored.calibration, report.kv_calibration)
    caches = captured_caches(monkeypatch)
    treeq.generate(model, tok, PROMPT, max_new_tokens=4)
    assert caches and caches[0].layers[0].stored_tokens > 0
    assert torch.equal(caches[0].layers[0].key_quantizer.levels, stored.calibration.layers[0].key_levels)
    info = treeq.inspect_checkpoint(out)
    assert info.kv_cache == scheme and info.kv_calibration == KV_CALIBRATION_NAME


def test_gptq_w4_and_kivi_2_in_one_run_give_a_checkpoint_that_generates_through_codes(
    model_dir, text_file, tmp_path, monkeypatch, caplog
):
    out = tmp_path / "q"
    r = run(*quantize_args(model_dir, text_file, out, "--method", "gptq", "--bits", 4, *KIVI_TINY))
    assert r.exit_code == 0, r.output
    assert not (out / KV_CALIBRATION_NAME).exists()  # KIVI takes no calibration
    r = run("inspect", out, "--dtype", "float32")
    assert r.exit_code == 0, r.output
    assert "KV cache (used by eval and generate unless --kv is given): minmax: keys 2-bit per-channel" in r.output
    assert "bits: 4" in r.output
    caches = captured_caches(monkeypatch)
    with caplog.at_level(logging.INFO, logger="treeq.runtime.kv_choice"):
        r = run("generate", out, "--prompt", PROMPT, "--max-new-tokens", 4, "--dtype", "float32")
    assert r.exit_code == 0, r.output
    assert "KV cache: minmax: keys 2-bit per-channel, values 2-bit per-token, groups of 16" in caplog.text
    assert "(stored with q)" in caplog.text
    layer = caches[0].layers[0]
    (_, keys, values), *_ = layer.stored
    assert layer.stored_tokens >= 16 and isinstance(keys, PackedStates) and keys.words.dtype == torch.int32
    assert isinstance(values, PackedStates)


@pytest.fixture
def stored_kivi(tmp_path, tokenizer, text_file):
    out = tmp_path / "q"
    config = quick_config(kv_cache=small_kivi(2))
    treeq.quantize(make_model("llama"), config, out, tokenizer=tokenizer, calib_text=str(text_file))
    return out


def test_an_explicit_kv_setting_replaces_the_stored_one_and_none_turns_it_off(stored_kivi, text_file):
    model, tok = treeq.load(stored_kivi)
    assert choose_kv(model, tok, None).scheme == small_kivi(2)
    assert choose_kv(model, tok, "none").scheme is None and choose_kv(model, tok, "none").cache(model) is None
    given = choose_kv(model, tok, small_kivi(4))
    assert given.scheme.key_bits == 4 and "replacing the checkpoint's stored scheme" in given.origin
    stored = treeq.evaluate_perplexity(model, tok, str(text_file), 64, 1)
    assert (
        "KV: simulated" in stored.protocol()
        and "keys 2-bit" in stored.protocol()
        and "[stored with q]" in stored.protocol()
    )
    off = treeq.evaluate_perplexity(model, tok, str(text_file), 64, 1, kv="none")
    assert "KV: no cache" in off.protocol() and off.ppl != stored.ppl


def test_cli_eval_uses_the_stored_scheme_unless_told_otherwise(stored_kivi, text_file):
    common = ("--text", text_file, "--seqlen", 64, "--max-windows", 1)
    r = run("eval", stored_kivi, *common)
    assert r.exit_code == 0, r.output
    assert "minmax: keys 2-bit per-channel" in r.output and "[stored with q]" in r.output
    r = run("eval", stored_kivi, "--kv", "kivi-4", "--kv-group-size", 16, *common)
    assert r.exit_code == 0, r.output
    assert "keys 4-bit per-channel" in r.output and "replacing the checkpoint's stored scheme" in r.output
    r = run("eval", stored_kivi, "--kv", "none", *common)
    assert r.exit_code == 0, r.output
    assert "KV: no cache" in r.output
    one_line_error(run("eval", stored_kivi, "--kv", "none", "--kv-residual", 4, *common), "--kv none", "kv-residual")


def rewrite_stored_kv(out, **changes):
    for name in ("config.json", "quantize_config.json"):
        cfg = json.loads((out / name).read_text())
        qcfg = cfg.get("quantization_config", cfg)
        qcfg["meta"]["settings"]["kv_cache"].update(changes)
        (out / name).write_text(json.dumps(cfg))


def test_a_bad_stored_kv_scheme_or_a_missing_calibration_is_a_one_line_error(stored_kivi):
    rewrite_stored_kv(stored_kivi, key_bits=7)
    with pytest.raises(TreeqError, match="meta.settings.kv_cache is not a valid scheme: Input should be") as err:
        treeq.load(stored_kivi)
    assert "\n" not in str(err.value)
    one_line_error(run("inspect", stored_kivi), "meta.settings.kv_cache")
    rewrite_stored_kv(stored_kivi, **kvquant(4).model_dump())  # valid, but needs a calibration not stored
    with pytest.raises(TreeqError, match=f"needs calibration, but has no {KV_CALIBRATION_NAME}") as err:
        treeq.load(stored_kivi)
    assert "\n" not in str(err.value)


def test_a_kv_scheme_that_does_not_fit_is_refused_before_quantizing(model_dir, text_file, tmp_path):
    out = tmp_path / "q"
    r = run(*quantize_args(model_dir, text_file, out, "--kv", "kivi-2"))  # values in 32 channels, head_dim 16
    one_line_error(r, "do not fit head_dim 16", "--kv-group-size")
    assert not out.exists()
    with pytest.raises(TreeqError, match="low_memory never holds") as err:
        treeq.quantize(model_dir, quick_config(kv_cache=kvquant(4)), out, low_memory=True)
    assert "\n" not in str(err.value)


def test_low_memory_records_a_scheme_without_calibration(model_dir, text_file, tmp_path):
    out = tmp_path / "q"
    config = quick_config(kv_cache=small_kivi(2))
    treeq.quantize(model_dir, config, out, calib_text=str(text_file), low_memory=True)
    model, _ = treeq.load(out)
    assert stored_kv(model).scheme == config.kv_cache


def forward_lengths(monkeypatch) -> list:
    """(batch, tokens) of every forward run through a quantized cache's protocol."""
    shapes = []
    logits = KVProtocol.logits

    def spy(self, model, x):
        shapes.append(tuple(x.shape))
        return logits(self, model, x)

    monkeypatch.setattr(KVProtocol, "logits", spy)
    return shapes


def test_tasks_score_through_the_cache_one_request_at_a_time(stored_kivi, monkeypatch, tmp_path):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("TREEQ_CACHE", str(tmp_path / "cache"))
    model, tok = treeq.load(stored_kivi)
    shapes = forward_lengths(monkeypatch)
    task = dict(tasks=["treeq_wiki"], limit=1, max_length=64)
    stored = treeq.evaluate_tasks(model, tok, **task)["treeq_wiki"]["byte_perplexity"]
    assert shapes and all(batch == 1 for batch, _ in shapes)
    plain = treeq.evaluate_tasks(model, tok, **task, kv="none")["treeq_wiki"]["byte_perplexity"]
    fp = treeq.evaluate_tasks(model, tok, **task, kv="fp")["treeq_wiki"]["byte_perplexity"]
    # The 16-bit cache keeps what the model computes: the figure without a cache, to rounding.
    assert fp == pytest.approx(plain, rel=1e-5) and stored != pytest.approx(plain, rel=1e-4)


def test_cli_eval_runs_tasks_through_the_kv_cache_and_says_how(stored_kivi, monkeypatch, tmp_path):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("TREEQ_CACHE", str(tmp_path / "cache"))
    shapes = forward_lengths(monkeypatch)
    r = run(
        "eval", stored_kivi, "--no-ppl", "--kv", "kivi-4", "--kv-group-size", 16, "--tasks", "treeq_mmlu", "--limit", 2
    )
    assert r.exit_code == 0, r.output
    assert "tasks KV: simulated (window in one forward through the cache), minmax: keys 4-bit" in r.output
    assert "treeq_mmlu: acc=" in r.output and shapes and all(batch == 1 for batch, _ in shapes)
