"""KVQuant in the quantized KV cache: keys kept before RoPE, offline calibration (per-channel key
ranges, Fisher-weighted non-uniform levels), dense-and-sparse outliers and the full-precision
attention sink, each against what it must equal; and the settings' one-line refusals."""

import math

import pytest
import torch
from test_attachments import generate
from test_cli import one_line_error, run
from test_kivi import HEAD_DIM, kv_model, states

from treeq.errors import TreeqError
from treeq.eval.perplexity import evaluate_perplexity
from treeq.eval.speed import generate as generate_text
from treeq.models import spec_for
from treeq.runtime.kv_cache import IdentityKV, QuantizedKVLayer, quantized_kv_cache
from treeq.runtime.kv_calibration import calibrate_kv, collect_kv_activations, weighted_kmeans
from treeq.runtime.kv_schemes import cache_nbytes, kv_cache_for
from treeq.runtime.kvquant import OUTLIER_DTYPE, ChannelRange, KVQuantKV
from treeq.schemes import KVCacheScheme


def kvquant(bits=3, **changes):
    """Every part on, sized for the tiny models (head_dim 32)."""
    fields = dict(method="kvquant", key_bits=bits, value_bits=bits, group_size=HEAD_DIM, residual=0)
    fields |= dict(pre_rope_keys=True, levels="nonuniform", outliers=0.02, sink_tokens=1)
    return KVCacheScheme(**(fields | changes))


@pytest.fixture(scope="module")
def calibrated():
    model = kv_model()
    g = torch.Generator().manual_seed(0)
    activations = collect_kv_activations(model, [torch.randint(0, 256, (2, 48), generator=g) for _ in range(2)])
    return model, activations


def identity_cache(model, residual=4):
    return quantized_kv_cache(model, spec_for(model.config), lambda *_: (IdentityKV(), IdentityKV()), residual, 0, True)


def test_pre_rope_keys_with_an_identity_quantizer_generate_what_transformers_cache_does():
    model = kv_model().to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    expected_sequences, expected_logits = generate(model, ids)
    cache = identity_cache(model)
    sequences, step_logits = generate(model, ids, cache)
    assert cache.layers[0].stored_tokens > 0 and cache.layers[0].rotation is not None
    assert torch.equal(sequences, expected_sequences) and torch.equal(step_logits, expected_logits)
    # In fp32 RoPE undone and redone rounds in the last bit, no more.
    model = model.float()
    expected_sequences, expected_logits = generate(model, ids)
    sequences, step_logits = generate(model, ids, identity_cache(model))
    assert torch.equal(sequences, expected_sequences)
    assert torch.allclose(step_logits, expected_logits, rtol=0, atol=1e-5)


def test_stored_keys_are_the_key_projection_before_rope():
    model = kv_model()  # Llama: the key before RoPE is k_proj's output, one head per head_dim slice
    projected = []
    model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda _m, _i, out: projected.append(out))
    cache = identity_cache(model, residual=0)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1)), cache=cache)
    ((_, stored_keys, _),) = cache.layers[0].stored
    expected = projected[0].unflatten(-1, (-1, HEAD_DIM)).transpose(1, 2)
    assert torch.allclose(stored_keys, expected, atol=1e-5)
    after_rope = cache.layers[0].rotation.rotate(stored_keys, 0, torch.float32)
    assert not torch.allclose(after_rope[..., 1:, :], expected[..., 1:, :], atol=1e-3)  # position 0 is unrotated


@pytest.mark.parametrize("granularity", ["per-channel", "per-token"])
@pytest.mark.parametrize("bits", [3, 4])
def test_the_calibrated_quantizer_decodes_exactly_its_fake_quant(calibrated, granularity, bits):
    model, activations = calibrated
    scheme = kvquant(bits, key_granularity=granularity)
    cache = kv_cache_for(model, scheme, calibrate_kv(activations, scheme))
    layer = cache.layers[1]
    for quantizer, seed in ((layer.key_quantizer, 1), (layer.value_quantizer, 2)):
        assert isinstance(quantizer, KVQuantKV)
        x = states(40, seed=seed)
        stored = quantizer.encode(x)
        assert stored.words.dtype == torch.int32 and stored.outlier_index.numel() > 0
        assert torch.equal(quantizer.decode(stored), quantizer.fake_quantize(x))
    if granularity == "per-channel":
        assert layer.key_quantizer.channels is not None


def test_non_uniform_levels_follow_the_fisher_weights():
    x = torch.linspace(-1, 1, 2001)
    uniform = torch.linspace(-1, 1, 4)
    heavy_left = torch.where(x < -0.5, 100.0, 1.0)
    levels = weighted_kmeans(x, heavy_left, 4)
    assert (levels[1:] > levels[:-1]).all() and (levels < -0.5).sum() >= 2  # levels crowd where weight is

    def cost(c):
        return (heavy_left * (x[:, None] - c).square().amin(1)).sum()

    assert cost(levels) < cost(uniform)
    assert torch.equal(weighted_kmeans(x, torch.ones_like(x), 4, iterations=0), uniform)


def test_calibration_sets_the_per_channel_range_at_the_outlier_quantiles(calibrated):
    model, activations = calibrated
    scheme = kvquant(levels="uniform", pre_rope_keys=False, sink_tokens=0, outliers=0.1)
    channels = calibrate_kv(activations, scheme).layers[0].keys
    keys = activations[0].keys.transpose(0, 1).flatten(1, 2)  # [heads, entries, head_dim]
    outside = ((keys - channels.center[:, None]).abs() > channels.half[:, None] * (1 + 1e-6)).float().mean()
    assert 0.09 <= outside <= 0.11  # 0.05 on each side, the quantile rounded to one of 192 entries per channel


def test_outliers_bypass_the_codes_per_token_and_per_channel():
    x = states(16)
    x[0, 1, 5, 7] = 1000.0  # far outside every range
    levels = torch.linspace(-1, 1, 8)
    per_token = KVQuantKV(3, levels, group=HEAD_DIM, outliers=0.05)
    stored = per_token.encode(x)
    # round(0.05 x 2 heads x 32 channels) = 3 per token, the largest magnitudes
    assert stored.outlier_index.numel() == 16 * 3
    decoded = per_token.decode(stored)
    assert decoded[0, 1, 5, 7] == 1000.0
    flat_index = stored.outlier_index.long()
    assert torch.equal(decoded.flatten()[flat_index], x.flatten()[flat_index].to(OUTLIER_DTYPE).float())
    # Without outliers the same entry is coded: the token's range stretches to hold it.
    assert (
        KVQuantKV(3, levels, group=HEAD_DIM).decode(KVQuantKV(3, levels, group=HEAD_DIM).encode(x))[0, 1, 5, 6]
        != (decoded[0, 1, 5, 6])
    )
    channels = ChannelRange(torch.zeros(2, HEAD_DIM), torch.full((2, HEAD_DIM), 3.0))
    per_channel = KVQuantKV(3, levels, channels=channels, outliers=0.01)
    stored = per_channel.encode(x)
    outside = (x.abs() > 3.0).flatten().nonzero().squeeze(1)
    assert torch.equal(stored.outlier_index.long(), outside)
    assert per_channel.decode(stored)[0, 1, 5, 7] == 1000.0
    clamped = KVQuantKV(3, levels, channels=channels)
    assert clamped.decode(clamped.encode(x))[0, 1, 5, 7] == 3.0  # no outliers: clamped to the range


def test_the_sink_keeps_the_first_tokens_exact_across_updates():
    keys, values = states(60, seed=1), states(60, seed=2)
    quantizer = KVQuantKV(2, torch.linspace(-1, 1, 4), group=HEAD_DIM)
    layer = QuantizedKVLayer(quantizer, quantizer, residual=0, sink=3)
    seen = 0
    for n in (2, 1, 30, 27):
        got_k, got_v = layer.update(keys[..., seen : seen + n, :], values[..., seen : seen + n, :])
        seen += n
        kept = min(seen, 3)
        assert torch.equal(got_k[..., :kept, :], keys[..., :kept, :])
        assert torch.equal(got_v[..., :kept, :], values[..., :kept, :])
        assert layer.get_seq_length() == seen and layer.stored_tokens == seen - kept
        if seen > 3:
            assert not torch.allclose(got_k[..., 3:, :], keys[..., 3:seen, :], atol=1e-3)
            assert torch.equal(got_k[..., 3:, :], quantizer.fake_quantize(keys[..., 3:seen, :]))


def test_kvquant_cache_counts_codes_ranges_outliers_tables_and_sink(calibrated):
    model, activations = calibrated
    scheme = kvquant(3)
    cache = kv_cache_for(model, scheme, calibrate_kv(activations, scheme))
    ids = torch.randint(0, 256, (1, 65), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(input_ids=ids, cache=cache)
    layer = cache.layers[0]
    ((_, k, v),) = layer.stored
    assert k.center is None and v.center.dtype == torch.float16  # keys per channel (calibrated), values per token
    codes = 2 * 64 * 2 * HEAD_DIM * 3 // 8
    outliers = (k.outlier_index.numel() + v.outlier_index.numel()) * (4 + 2)
    per_token_ranges = 64 * 2 * 2 * 2  # tokens x heads x (center, half) x fp16
    tables = 2 * 2 * HEAD_DIM * 4 + 2 * 8 * 4  # key center and half, fp32; two 8-level tables
    sink = 2 * 2 * HEAD_DIM * 4  # one fp32 token's keys and values
    assert layer.nbytes() == codes + outliers + per_token_ranges + tables + sink
    assert cache_nbytes(cache) == sum(layer.nbytes() for layer in cache.layers)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(pre_rope_keys=True), "pre_rope_keys=True: method 'minmax' does not have it; methods that do: kvquant"),
        (dict(outliers=0.01), "outliers=0.01: method 'minmax' does not have it"),
        (dict(levels="nonuniform"), "levels='nonuniform': method 'minmax' does not have it"),
        (dict(method="kvquant", value_granularity="per-channel"), "kvquant keeps values per token; allowed: per-token"),
    ],
)
def test_the_scheme_refuses_kvquant_fields_elsewhere_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        KVCacheScheme(**fields)


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: kv_cache_for(kv_model(), kvquant()), "needs calibration: pass calibration=calibrate_kv"),
        (
            lambda: kv_cache_for(kv_model(), kvquant(group_size=64, levels="uniform", key_granularity="per-token")),
            "do not fit head_dim 32",
        ),
        (lambda: KVQuantKV(3, torch.linspace(-1, 1, 4), group=32), "4 levels given for 3 bits; give 8"),
    ],
)
def test_bad_kvquant_settings_are_one_line_errors(build, message):
    with pytest.raises(TreeqError, match=message.replace("(", r"\(")) as err:
        build()
    assert "\n" not in str(err.value)


def test_a_calibration_made_for_another_scheme_is_refused(calibrated):
    model, activations = calibrated
    calibration = calibrate_kv(activations, kvquant(3))
    with pytest.raises(TreeqError, match="made for other key_bits, value_bits; calibrate again") as err:
        kv_cache_for(model, kvquant(4), calibration)
    assert "\n" not in str(err.value)


def test_perplexity_calibrates_a_kvquant_scheme_on_the_text_it_is_given(tokenizer, text_file):
    result = evaluate_perplexity(
        kv_model(), tokenizer, str(text_file), 64, 2, kv=kvquant(4), kv_protocol="decode", kv_calib_text=str(text_file)
    )
    assert math.isfinite(result.ppl) and "calibrated, weights: Fisher information" in result.protocol()


@pytest.mark.slow  # calibrates on the built-in wiki-train text: ~50 s
def test_cli_eval_takes_the_kvquant_preset_and_its_fields(model_dir, text_file):
    common = ("--text", text_file, "--seqlen", 64, "--max-windows", 1, "--kv-group-size", 16)  # head_dim 16
    r = run("eval", model_dir, "--kv", "kvquant-4", "--kv-protocol", "decode", *common)
    assert r.exit_code == 0, r.output
    assert "kvquant: keys 4-bit per-channel, values 4-bit per-token" in r.output
    assert "keys before RoPE, nonuniform levels, 1.0% outliers fp16, first 1 tokens fp" in r.output
    assert "calibrated, weights: Fisher information" in r.output
    one_line_error(run("eval", model_dir, "--kv", "kivi-2", "--kv-outliers", 0.01, *common), "outliers=0.01")
    one_line_error(run("eval", model_dir, "--kv", "kvquant-3", *common), "head_dim 16 cannot be packed at 3 bits")


def test_generate_calibrates_a_kvquant_scheme_and_attends_to_its_codes(tokenizer, text_file):
    model = kv_model()
    scheme = kvquant(4, residual=4)  # a fp window as well: sink, stored codes, window
    text = generate_text(model, tokenizer, "The river ran", max_new_tokens=6, kv=scheme, kv_calib_text=str(text_file))
    assert isinstance(text, str)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    _, fp_logits = generate(model, ids)
    g = torch.Generator().manual_seed(4)
    activations = collect_kv_activations(model, [torch.randint(0, 256, (1, 32), generator=g)])
    cache = kv_cache_for(model, scheme, calibrate_kv(activations, scheme))
    _, step_logits = generate(model, ids, cache)
    layer = cache.layers[0]
    assert layer.sink_keys.shape[-2] == 1 and layer.stored_tokens == 21 - 1 - 4
    assert step_logits.isfinite().all() and not torch.allclose(step_logits, fp_logits, atol=1e-3)
