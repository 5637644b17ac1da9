"""KIVI's KV quantizer and the cache that stores its codes: the quantizer against a per-group
computation by hand, the full-precision window across update boundaries, the cache's byte count,
generation through stored codes, and the 16-bit setting against transformers' own cache."""

import pytest
import torch
from conftest import make_model
from test_attachments import generate as generate_with_logits

from treeq.errors import TreeqError
from treeq.numerics import dequantize_minmax_groups, quantize_minmax_groups
from treeq.runtime.kivi import MinMaxKV, PackedStates
from treeq.runtime.kv_cache import QuantizedKVLayer
from treeq.runtime.kv_schemes import cache_nbytes, kv_cache_for
from treeq.schemes import KVCacheScheme

HEAD_DIM = 32  # KIVI groups values by 32 channels, so the tiny models get heads that wide


def kv_model(**overrides):
    return make_model("llama", head_dim=HEAD_DIM, hidden_size=128, **overrides)


def states(tokens, seed=0, batch=1, heads=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, heads, tokens, HEAD_DIM, generator=g)
    return x + 4 * torch.randn(1, 1, 1, HEAD_DIM, generator=g)  # channel offsets, as keys have


def by_hand(x, bits, dim, group):
    """Each group of ``group`` consecutive entries along ``dim`` on its own: levels from its fp16
    minimum in steps of the fp16 (max - min) / (2^bits - 1), nearest level taken."""
    runs = x.float().movedim(dim, -1)
    out = torch.empty_like(runs)
    for index in torch.cartesian_prod(*(torch.arange(n) for n in runs.shape[:-1])).tolist():
        for start in range(0, runs.shape[-1], group):
            run = runs[(*index, slice(start, start + group))]
            low = run.min().half().float()
            scale = ((run.max() - low) / (2**bits - 1)).half().float()
            codes = torch.clamp(torch.round((run - low) / scale), 0, 2**bits - 1)
            out[(*index, slice(start, start + group))] = codes * scale + low
    return out.movedim(-1, dim)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False], ids=["keys-per-channel", "values-per-token"])
def test_kivi_decodes_what_the_numerics_reference_computes_group_by_group(bits, per_channel):
    x = states(64)
    kivi = MinMaxKV(bits, per_channel, 32)
    dim = -2 if per_channel else -1
    stored = kivi.encode(x)
    assert isinstance(stored, PackedStates) and stored.words.dtype == torch.int32
    assert torch.equal(
        kivi.decode(stored), dequantize_minmax_groups(*quantize_minmax_groups(x, bits, dim, 32), dim, 32)
    )
    assert torch.equal(kivi.decode(stored), by_hand(x, bits, dim, 32))


def test_kivi_returns_the_dtype_it_was_given_and_codes_a_constant_group_exactly():
    x = torch.full((1, 1, 32, HEAD_DIM), 0.75, dtype=torch.bfloat16)
    kivi = MinMaxKV(2, True, 32)
    assert torch.equal(kivi.decode(kivi.encode(x)), x)


@pytest.mark.parametrize("chunks", [(200,), (1,) * 200, (5, 37, 60, 3, 95)], ids=["one", "token-by-token", "uneven"])
def test_the_cache_stores_whole_blocks_and_keeps_the_newest_tokens_exact_across_updates(chunks):
    keys, values = states(200, seed=1), states(200, seed=2)
    key_q, value_q = MinMaxKV(2, True, 32), MinMaxKV(2, False, 32)
    layer = QuantizedKVLayer(MinMaxKV(2, True, 32), MinMaxKV(2, False, 32), residual=16)
    seen = 0
    for n in chunks:
        got_k, got_v = layer.update(keys[..., seen : seen + n, :], values[..., seen : seen + n, :])
        seen += n
        stored = layer.stored_tokens
        assert stored == max(0, (seen - 16) // 32 * 32)  # whole 32-token blocks, at least 16 fp tokens left
        assert layer.get_seq_length() == seen and got_k.shape[-2] == seen
        assert torch.equal(got_k[..., stored:, :], keys[..., stored:seen, :])
        assert torch.equal(got_v[..., stored:, :], values[..., stored:seen, :])
        if stored == 0:
            continue
        # Blocks start at token 0 whatever the updates, so they hold what encoding at once holds.
        assert torch.equal(got_k[..., :stored, :], key_q.decode(key_q.encode(keys[..., :stored, :])))
        assert torch.equal(got_v[..., :stored, :], value_q.decode(value_q.encode(values[..., :stored, :])))


@pytest.mark.parametrize("bits", [2, 4])
def test_the_cache_counts_codes_scales_minima_and_the_fp_window(bits):
    heads, tokens, residual = 2, 200, 16
    layer = QuantizedKVLayer(MinMaxKV(bits, True, 32), MinMaxKV(bits, False, 32), residual)
    layer.update(states(tokens, heads=heads), states(tokens, seed=1, heads=heads))
    stored = 160  # (200 - 16) // 32 whole blocks
    codes = 2 * stored * heads * HEAD_DIM * bits // 8
    key_groups = stored // 32 * heads * HEAD_DIM  # per channel, per 32 tokens
    value_groups = stored * heads * HEAD_DIM // 32  # per token, per 32 channels
    params = (key_groups + value_groups) * 2 * 2  # fp16 scale and minimum
    window = 2 * (tokens - stored) * heads * HEAD_DIM * 4  # fp32 keys and values
    assert layer.nbytes() == codes + params + window


def test_a_models_cache_bytes_are_its_layers_and_shrink_with_bits():
    model = kv_model()
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(0))
    sizes = {}
    for name in ("fp", "kivi-4", "kivi-2"):
        cache = kv_cache_for(model, name)
        model(input_ids=ids, cache=cache, use_cache=True)
        sizes[name] = cache_nbytes(cache)
        assert sizes[name] == sum(layer.nbytes() for layer in cache.layers)
    assert sizes["fp"] == 2 * 2 * 200 * 2 * HEAD_DIM * 4  # layers x (keys, values) x tokens x heads x dim x fp32
    assert sizes["fp"] > sizes["kivi-4"] > sizes["kivi-2"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_16_bit_setting_generates_exactly_what_transformers_cache_does(dtype):
    model = kv_model().to(dtype)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    expected_sequences, expected_logits = generate_with_logits(model, ids)
    cache = kv_cache_for(model, KVCacheScheme(key_bits=16, value_bits=16, residual=4))
    sequences, step_logits = generate_with_logits(model, ids, cache)
    assert torch.equal(sequences, expected_sequences) and torch.equal(step_logits, expected_logits)
    assert cache.layers[0].stored_tokens > 0  # tokens left the window and came back through storage


def small_kivi(bits=2, **changes):
    return KVCacheScheme(key_bits=bits, value_bits=bits, group_size=16, residual=4, **changes)


def test_generation_attends_to_stored_codes():
    model = kv_model()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    _, fp_logits = generate_with_logits(model, ids)
    cache = kv_cache_for(model, small_kivi())
    _, step_logits = generate_with_logits(model, ids, cache)
    assert isinstance(cache.layers[0].stored[0][1], PackedStates)  # (position, keys, values)
    assert cache.layers[0].stored_tokens == 16  # 21 tokens seen, 4 kept fp, whole blocks of 16
    assert step_logits.isfinite().all() and not torch.allclose(step_logits, fp_logits, atol=1e-3)


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: KVCacheScheme.named("kivi-3"), "unknown KV setting 'kivi-3'; choose one of fp, kivi-4, kivi-2"),
        (lambda: kv_cache_for(make_model("llama"), "kivi-2"), "do not fit head_dim 16; set group_size"),
        (lambda: MinMaxKV(3, True, 16), "use a group size that is a multiple of 32"),
    ],
)
def test_bad_kv_settings_are_one_line_errors_naming_the_fix(build, message):
    with pytest.raises(TreeqError, match=message.replace("(", r"\(")) as err:
        build()
    assert "\n" not in str(err.value)


def test_kv_scheme_refuses_fields_no_method_honours():
    with pytest.raises(ValueError, match="sym=True: method 'minmax' is asymmetric; allowed: sym=False"):
        KVCacheScheme(sym=True)
