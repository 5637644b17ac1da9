"""Perplexity and calibration windows start with a BOS exactly where the tokenizer puts one before text."""

import math

import pytest
import torch
from conftest import SENTENCES, make_model, make_tokenizer
from test_cli import run
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

import treeq
from treeq import data
from treeq.eval.perplexity import perplexity

TEXT = " ".join(SENTENCES * 4)


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level test tokenizer, adding a <bos> before every text as Gemma's does."""
    inner = make_tokenizer().backend_tokenizer
    inner.add_special_tokens(["<bos>"])
    bos = inner.token_to_id("<bos>")
    inner.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<eos>", pad_token="<eos>", bos_token="<bos>")


def hand_perplexity(model, windows: list[list[int]]) -> float:
    """exp of the mean NLL of every token but each window's first, one token at a time."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(torch.tensor([w])).logits[0].double(), -1)
            for pos in range(1, len(w)):
                nll -= float(logp[pos - 1, w[pos]])
                count += 1
    return math.exp(nll / count)


def test_auto_follows_the_tokenizer_and_the_rules_can_force_it():
    plain, with_bos = make_tokenizer(), bos_tokenizer()
    assert data.bos_for(plain).token_id is None and "adds none" in data.bos_for(plain).reason
    assert data.bos_for(with_bos).token_id == with_bos.bos_token_id
    assert data.bos_for(with_bos, "never").token_id is None
    # A tokenizer that knows a BOS but does not add it (SmolLM2's <|im_start|>): forced on request only.
    knows_bos = PreTrainedTokenizerFast(tokenizer_object=plain.backend_tokenizer, bos_token="<eos>")
    assert data.bos_for(knows_bos).token_id is None and data.bos_for(knows_bos, "always").token_id == 256
    with pytest.raises(treeq.TreeqError, match="has no BOS token; use bos=auto or never"):
        data.bos_for(plain, "always")
    with pytest.raises(treeq.TreeqError, match="bos='sometimes' is not one of auto, always, never"):
        data.bos_for(plain, "sometimes")


def test_perplexity_windows_are_the_bos_and_the_next_text_tokens_all_scored():
    model, tok = make_model("llama"), bos_tokenizer()
    ids = data.tokenize(tok, TEXT)
    assert int(ids[0]) != tok.bos_token_id  # the stream itself carries no BOS
    seqlen, n = 32, 3
    with_bos = perplexity(model, ids, seqlen, n, data.bos_for(tok))
    expected = hand_perplexity(model, [[tok.bos_token_id] + ids[w * 31 : (w + 1) * 31].tolist() for w in range(n)])
    assert with_bos.ppl == pytest.approx(expected, rel=1e-6) and with_bos.tokens_scored == n * 31
    without = perplexity(model, ids, seqlen, n, data.bos_for(tok, "never"))
    expected = hand_perplexity(model, [ids[w * 32 : (w + 1) * 32].tolist() for w in range(n)])
    assert without.ppl == pytest.approx(expected, rel=1e-6)
    assert without.ppl != pytest.approx(with_bos.ppl)
    assert "BOS (id 257) + 31 text tokens (bos=auto: the tokenizer adds one)" in with_bos.protocol()
    assert "no BOS (bos=never)" in without.protocol()


def test_calibration_windows_start_with_the_bos_followed_by_contiguous_text():
    tok = bos_tokenizer()
    ids = data.tokenize(tok, TEXT).tolist()
    batches = data.calibration_batches(tok, TEXT, samples=5, seqlen=24, batch_size=2)
    windows = torch.cat(batches)
    assert windows.shape == (5, 24) and (windows[:, 0] == tok.bos_token_id).all()
    starts = {i for i in range(len(ids) - 22) if ids[i : i + 23] in [w[1:] for w in windows.tolist()]}
    assert len(starts) >= 4  # five random offsets (two may coincide) into the text
    plain = torch.cat(data.calibration_batches(make_tokenizer(), TEXT, samples=5, seqlen=24, batch_size=2))
    assert plain.shape == (5, 24) and not (plain[:, 0] == tok.bos_token_id).any()
    forced_off = torch.cat(data.calibration_batches(tok, TEXT, samples=5, seqlen=24, batch_size=2, bos="never"))
    torch.testing.assert_close(forced_off, plain)  # the same offsets and text as a tokenizer without BOS


def test_calibration_says_what_it_draws_and_when_the_text_is_too_short_to_draw_it_once(caplog):
    """A short text calibrated as many windows as a long one, drawing the same tokens over and over,
    and the log said nothing of the text's size or the BOS."""
    tok = bos_tokenizer()
    tokens = data.tokenize(tok, TEXT).numel()
    disjoint = tokens // 23  # a window: the BOS and 23 text tokens
    with caplog.at_level("INFO", logger="treeq"):
        data.calibration_batches(tok, TEXT, samples=disjoint, seqlen=24, batch_size=2)
        data.calibration_batches(tok, TEXT, samples=disjoint + 1, seqlen=24, batch_size=2, bos="never")
    first, second = [r.getMessage() for r in caplog.records if r.name == "treeq.data"]
    said = f"{disjoint} windows of 24 tokens at random offsets in {tokens} tokens of text, a BOS first (bos=auto"
    assert said in first and "repeat" not in first
    assert "no BOS (bos=never)" in second
    assert f"the text holds only {tokens // 24} disjoint windows, so they repeat it" in second


def test_eval_bos_option_is_followed_and_printed(tmp_path):
    model_dir = tmp_path / "m"
    make_model("llama").save_pretrained(model_dir)
    bos_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    common = ("eval", model_dir, "--text", text, "--seqlen", 32, "--max-windows", 2)
    auto, never = run(*common), run(*common, "--bos", "never")
    assert auto.exit_code == 0 and never.exit_code == 0, auto.output + never.output
    assert "BOS (id 257) + 31 text tokens (bos=auto: the tokenizer adds one)" in auto.output
    assert "no BOS (bos=never)" in never.output
    assert run(*common, "--bos", "sometimes").exit_code != 0


def test_quantize_calibrates_with_the_configs_bos_rule(monkeypatch, tokenizer, text_file, tmp_path):
    """CalibrationSettings.bos (``treeq quantize --bos``) reaches the calibration windows."""
    from conftest import make_model

    import treeq

    seen = []
    real = treeq.data.calibration_batches

    def spy(*args, **kwargs):
        seen.append(kwargs.get("bos"))
        return real(*args, **kwargs)

    monkeypatch.setattr(treeq.data, "calibration_batches", spy)
    cfg = treeq.QuantConfig(method="rtn", bits=4, group_size=32, calib_samples=4, seqlen=32, batch_size=4, bos="never")
    treeq.quantize(make_model("llama"), cfg, tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file))
    assert seen == ["never"] and cfg.calibration.bos == "never"
