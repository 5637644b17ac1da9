"""The real built-in path: SmolLM2-135M from its GGUF package and gensim's Wikipedia text."""

import math

import pytest
import torch

import treeq

pytestmark = pytest.mark.slow


def test_smollm2_gptq_end_to_end(tmp_path):
    fp, tok = treeq.load_fp_model()
    fp_ppl = treeq.evaluate_perplexity(fp, tok, seqlen=512, max_windows=4)
    cfg = treeq.QuantConfig(method="gptq", bits=4, group_size=64, calib_samples=16, seqlen=256)
    report = treeq.quantize(fp, cfg, tmp_path / "q", tokenizer=tok)
    q_ppl = treeq.evaluate_perplexity(report.model, tok, seqlen=512, max_windows=4)
    assert math.isfinite(q_ppl.ppl) and fp_ppl.ppl < q_ppl.ppl < 2 * fp_ppl.ppl
    loaded, tok2 = treeq.load(tmp_path / "q")
    ids = tok2("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, report.model(ids).logits, rtol=1e-4, atol=1e-4)
