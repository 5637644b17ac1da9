"""Attachment points for the quantizers of the weight-activation and KV-cache families: an
activation quantizer on each quantized linear's input, and a KV cache that stores through a
quantizer, placed by the spec's attention block. Identity quantizers change nothing; a lossy one
shows the attachment is live."""

import pytest
import torch
from conftest import make_model
from test_end_to_end import logits, quick_config

import treeq
from treeq.errors import TreeqError
from treeq.models import spec_for
from treeq.runtime.activations import ActivationQuantizer, IdentityActivation
from treeq.runtime.kv_cache import IdentityKV, KVQuantizer, attention_shape, quantized_kv_cache
from treeq.runtime.quant_linear import QuantLinear


class RoundToHalf(ActivationQuantizer):
    def forward(self, x):
        return (x * 2).round() / 2


class Bf16KV(KVQuantizer):
    token_block = 2

    def encode(self, states):
        return states.to(torch.bfloat16)

    def decode(self, stored):
        return stored.float()


def test_an_identity_input_quantizer_on_every_quantized_linear_changes_no_logit(tmp_path, tokenizer, text_file):
    treeq.quantize(make_model("llama"), quick_config(), tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file))
    model, _ = treeq.load(tmp_path / "q")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.input_quantizer = IdentityActivation()
    assert torch.equal(logits(model, ids), before)
    for layer in layers:
        layer.input_quantizer = RoundToHalf()
    assert not torch.allclose(logits(model, ids), before)


def generate(model, ids, cache=None):
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=10,
        do_sample=False,
        cache=cache,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "deepseek_v3"])
def test_an_identity_kv_cache_generates_exactly_what_the_default_cache_does(arch):
    model = make_model(arch)
    spec = spec_for(model.config)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    expected_sequences, expected_logits = generate(model, ids)
    cache = quantized_kv_cache(model, spec, lambda i, shape: (IdentityKV(), IdentityKV()), residual=4)
    sequences, step_logits = generate(model, ids, cache)
    assert torch.equal(sequences, expected_sequences) and torch.equal(step_logits, expected_logits)
    assert cache.layers[0].stored_tokens >= 12  # the prompt left the 4-token window: the quantizers were used
    lossy = quantized_kv_cache(model, spec, lambda i, shape: (Bf16KV(), Bf16KV()), residual=4)
    assert not torch.equal(generate(model, ids, lossy)[1], expected_logits)


def test_kv_quantizers_are_sized_by_the_specs_attention_block():
    model = make_model("llama")
    seen = []
    quantized_kv_cache(
        model, spec_for(model.config), lambda i, shape: seen.append((i, shape)) or (IdentityKV(),) * 2, 8
    )
    assert [i for i, _ in seen] == [0, 1]
    assert seen[0][1] == attention_shape(model.config, spec_for(model.config))
    assert (seen[0][1].num_heads, seen[0][1].num_kv_heads, seen[0][1].head_dim) == (4, 2, 16)


def test_a_sliding_window_model_is_refused_in_one_line():
    model = make_model("gemma3_text")
    with pytest.raises(TreeqError, match="sliding-window attention layers"):
        quantized_kv_cache(model, spec_for(model.config), lambda i, shape: (IdentityKV(), IdentityKV()), 4)
