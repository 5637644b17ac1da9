"""The two perplexity protocols that exercise a quantized KV cache, and the KV options of
`treeq.generate`, `treeq eval` and `treeq generate`."""

import pytest
import torch
from conftest import make_model
from test_cli import one_line_error, run
from test_end_to_end import quick_config
from test_kivi import kv_model, small_kivi

import treeq
from treeq.errors import TreeqError
from treeq.eval.perplexity import KVProtocol, perplexity
from treeq.schemes import KVCacheScheme


def test_decode_feeds_chunks_so_early_tokens_see_fp_states_and_simulated_quantizes_them():
    model = kv_model()
    x = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp = model(input_ids=x).logits
        simulated = KVProtocol(small_kivi(), "simulated").logits(model, x)
        decoded = KVProtocol(small_kivi(), "decode", chunk=4).logits(model, x)
    # Each 4-token chunk decoded fits the 4-token window of the one before: the first 8 tokens
    # never attend to codes. In one simulated forward, all but the newest 4-19 tokens are codes.
    assert torch.allclose(decoded[:, :8], fp[:, :8], atol=1e-5)
    assert not torch.allclose(simulated[:, :8], fp[:, :8], atol=1e-3)
    assert not torch.allclose(decoded[:, 40:], fp[:, 40:], atol=1e-3)


def count_forwards(model):
    lengths = []
    model.register_forward_pre_hook(lambda _m, _a, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    return lengths


def test_perplexity_protocols_feed_windows_as_they_say_and_the_fp_cache_matches_no_cache():
    model = kv_model()
    ids = torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(0))
    plain = perplexity(model, ids, 64, max_windows=3)
    lengths = count_forwards(model)
    fp_decode = perplexity(model, ids, 64, max_windows=3, kv=KVProtocol(KVCacheScheme.named("fp"), "decode", 24))
    assert lengths == [24, 24, 16] * 3
    assert fp_decode.ppl == pytest.approx(plain.ppl, rel=1e-5)
    lengths.clear()
    simulated = perplexity(model, ids, 64, max_windows=3, kv=KVProtocol(small_kivi(), "simulated"))
    assert lengths == [64] * 3 and simulated.ppl != pytest.approx(plain.ppl, rel=1e-4)
    assert (
        "KV: simulated (window in one forward" in simulated.protocol()
        and "keys 2-bit per-channel" in simulated.protocol()
    )
    assert "KV: decode (window fed 24 tokens" in fp_decode.protocol() and "no cache" in plain.protocol()


def test_generate_takes_a_kv_setting(tokenizer):
    assert treeq.generate(kv_model(), tokenizer, "The river ran", max_new_tokens=5, kv=small_kivi(4))


def test_an_unknown_protocol_is_a_one_line_error():
    with pytest.raises(TreeqError, match="kv_protocol 'prefill' is unknown; choose one of simulated, decode"):
        KVProtocol(small_kivi(), "prefill")


def test_cli_eval_and_generate_take_a_kv_setting(model_dir, text_file, tokenizer, tmp_path):
    common = ("--kv-group-size", 16, "--kv-residual", 8, "--text", text_file, "--seqlen", 64, "--max-windows", 1)
    r = run("eval", model_dir, "--kv", "kivi-2", "--kv-protocol", "decode", "--kv-chunk", 16, *common)
    assert r.exit_code == 0, r.output
    assert "KV: decode (window fed 16 tokens at a time through the cache), minmax: keys 2-bit" in r.output
    one_line_error(run("eval", model_dir, "--kv", "kivi-2", "--kv-sym", *common), "sym=True")
    out = tmp_path / "q"
    treeq.quantize(make_model("llama"), quick_config(method="rtn"), out, tokenizer=tokenizer, calib_text=str(text_file))
    r = run("generate", out, "--prompt", "The river", "--max-new-tokens", 5, "--kv", "kivi-4", "--kv-group-size", 16)
    assert r.exit_code == 0, r.output
    assert r.output.startswith("The river")
