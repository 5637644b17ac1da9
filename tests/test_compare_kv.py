"""KV-cache rows in `treeq compare`: each preset on the fp model by each perplexity protocol, with the
bytes its cache holds per token beside the fp16 cache's."""

import csv

import pytest
from conftest import make_model
from test_cli import one_line_error, run

import treeq
from treeq.schemes import KVCacheScheme

PREFILL = 250  # not a whole number of KIVI's 32-token key groups past its 128-token window
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 64  # heads as wide as SmolLM2's, so every preset's groups fit


@pytest.fixture
def kv_model_dir(tmp_path, tokenizer):
    path = tmp_path / "tiny-llama-64"
    make_model("llama", head_dim=HEAD_DIM, hidden_size=128).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def kivi_bytes(scheme: KVCacheScheme, tokens: int) -> int:
    """KIVI's cache counted by hand: whole groups of ``group_size`` tokens beyond the newest
    ``residual`` are stored as codes with an fp16 scale and minimum per group (keys: per channel
    over the group's tokens; values: per token over groups of channels), the rest stays in bf16."""
    stored = (tokens - scheme.residual) // scheme.group_size * scheme.group_size
    entries = stored * KV_HEADS * HEAD_DIM  # per layer, of keys and of values each
    codes = entries * (scheme.key_bits + scheme.value_bits) // 8
    groups = entries // scheme.group_size * 2  # keys' groups and values' groups, as many of each
    window = (tokens - stored) * KV_HEADS * HEAD_DIM * 2
    return LAYERS * (codes + groups * 2 * 2 + window * 2)


def test_compare_has_kv_rows_with_protocols_and_cache_bytes(kv_model_dir, text_file, tmp_path):
    out = tmp_path / "cmp"
    r = run(
        "compare", kv_model_dir, "--methods", "rtn", "--bits", "4", "--group-size", "32", "--calib-samples", "4",
        "--seqlen", "32", "--calib-text", text_file, "--eval-text", text_file, "--eval-seqlen", "256",
        "--eval-windows", "2", "--kv", "fp,kivi-2,kvquant-3", "--kv-protocol", "simulated,decode",
        "--kv-chunk", "64", "--kv-tokens", PREFILL, "--out", out,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    # Checked failing with the KV loop in compare() skipped (only the fp and rtn rows came out).
    assert [(x["method"], x["kv"], x["kv_protocol"]) for x in rows] == [
        ("fp", "", ""),
        ("fp", "fp", "simulated"),
        ("fp", "fp", "decode"),
        ("fp", "kivi-2", "simulated"),
        ("fp", "kivi-2", "decode"),
        ("fp", "kvquant-3", "simulated"),
        ("fp", "kvquant-3", "decode"),
        ("rtn", "", ""),
    ]
    row = {(x["method"], x["kv"], x["kv_protocol"]): x for x in rows}
    per_token = {k: float(x[f"cache bytes/token ({PREFILL} tokens)"]) for k, x in row.items()}
    # Rows without a quantized cache: an fp16 cache, keys and values at 2 bytes per entry. The fp
    # preset stores the bf16 states as they are, so it counts the same from its own tensors.
    # Checked failing with the bytes counted on the fp32 model instead of the bf16 copy (2048 here),
    # and with the kivi-2 total divided by 256 tokens instead of the prefill's 250 (1000 vs 1024).
    fp16 = 2 * LAYERS * KV_HEADS * HEAD_DIM * 2
    assert per_token[("fp", "", "")] == per_token[("rtn", "", "")] == per_token[("fp", "fp", "decode")] == fp16
    # Checked failing with KIVI's blocks counting their scales but not their minima (692.2 vs 704.5).
    kivi = kivi_bytes(KVCacheScheme.named("kivi-2"), PREFILL) / PREFILL
    assert per_token[("fp", "kivi-2", "simulated")] == per_token[("fp", "kivi-2", "decode")] == pytest.approx(kivi)
    assert kivi < fp16 and per_token[("fp", "kvquant-3", "simulated")] < fp16
    ppl = {k: float(x["ppl"]) for k, x in row.items()}
    d_ppl = {k: float(x["d ppl"]) for k, x in row.items()}
    # The fp cache changes perplexity by less than 0.1% by either protocol; KIVI-2's changes it (the
    # rows really go through their cache: 1.5% simulated, 0.16% decode). Checked failing with the
    # decode protocol giving each chunk a fresh cache (fp decode 325.1 vs 329.3 without a cache).
    for protocol in ("simulated", "decode"):
        assert ppl[("fp", "fp", protocol)] == pytest.approx(ppl[("fp", "", "")], rel=1e-3)
        assert ppl[("fp", "kivi-2", protocol)] != pytest.approx(ppl[("fp", "", "")], rel=1e-4)
    assert all(d_ppl[k] == pytest.approx(ppl[k] - ppl[("fp", "", "")], abs=1e-9) for k in row)
    table = (out / "compare.md").read_text()
    assert f"| kv | kv_protocol | cache bytes/token ({PREFILL} tokens) |" in table
    assert "- kivi-2, decode: decode (window fed 64 tokens at a time through the cache), minmax: keys 2-bit" in table
    assert "- kvquant-3, simulated: simulated (window in one forward through the cache), kvquant:" in table


def test_unknown_kv_name_or_protocol_is_one_line_before_any_model_loads(model_dir, monkeypatch, tmp_path):
    # Checked failing with the names resolved only when the KV rows are evaluated (compare() loaded
    # the fp model first, which raised the AssertionError below instead of the one-line error).
    def no_model(*_args, **_kwargs):
        raise AssertionError("the fp model was loaded before the KV settings were checked")

    monkeypatch.setattr(treeq.api, "load_fp_model", no_model)
    common = ("compare", model_dir, "--methods", "rtn", "--bits", "4", "--out", tmp_path / "cmp")
    r = run(*common, "--kv", "fp,kivi-9")
    one_line_error(r, "unknown KV setting 'kivi-9'; choose one of fp, kivi-4, kivi-2,", "kvquant-3")
    r = run(*common, "--kv", "kivi-2", "--kv-protocol", "simulated,prefill")
    one_line_error(r, "kv_protocol 'prefill' is unknown; choose one of simulated, decode")
    assert not (tmp_path / "cmp").exists()


def test_a_compare_interrupted_among_its_kv_rows_resumes_to_the_same_table(
    kv_model_dir, text_file, tmp_path, monkeypatch
):
    """Ctrl-C after the first KV row: resume evaluates the rest, counts every KV row's cache bytes
    (the interrupted run never reached that step) and quantizes the weight row."""
    from treeq.eval import compare

    real, calls = compare._evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the fp row, the first KV row, then Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    args = (
        "compare", kv_model_dir, "--methods", "rtn", "--bits", "4", "--group-size", "32", "--calib-samples", "4",
        "--seqlen", "32", "--calib-text", text_file, "--eval-text", text_file, "--eval-seqlen", "64",
        "--eval-windows", "2", "--kv", "kivi-2,kvquant-3", "--kv-tokens", PREFILL,
    )  # fmt: skip
    monkeypatch.setattr(compare, "_evaluate", evaluate)
    assert run(*args, "--out", tmp_path / "cmp").exit_code == 130
    monkeypatch.undo()
    assert run(*args, "--out", tmp_path / "cmp", "--resume").exit_code == 0
    assert run(*args, "--out", tmp_path / "whole").exit_code == 0

    def table(path):
        with open(path / "compare.csv") as f:
            return [{k: v for k, v in row.items() if k != "quant_s"} for row in csv.DictReader(f)]

    assert [(x["kv"], x["method"]) for x in table(tmp_path / "cmp")] == [
        ("", "fp"),
        ("kivi-2", "fp"),
        ("kvquant-3", "fp"),
        ("", "rtn"),
    ]
    assert table(tmp_path / "cmp") == table(tmp_path / "whole")


def test_a_prefill_longer_than_the_text_fails_before_any_evaluation(kv_model_dir, text_file, tmp_path, monkeypatch):
    from treeq.eval import compare

    def evaluate(*args, **kwargs):
        raise AssertionError("a row was evaluated before the prefill was checked")

    monkeypatch.setattr(compare, "_evaluate", evaluate)
    r = run(
        "compare", kv_model_dir, "--methods", "rtn", "--bits", "4", "--group-size", "32", "--seqlen", "32",
        "--calib-text", text_file, "--eval-text", text_file, "--kv", "kivi-2", "--kv-tokens", 10**7,
        "--out", tmp_path / "cmp",
    )  # fmt: skip
    one_line_error(r, "kv_tokens=10000000 is more than the", "use at most that many")
