"""AWQ: scale folding keeps the layer's function; the scale search beats plain rounding; round trip."""

import pytest
import torch
from conftest import make_model

import treeq
from treeq.engine.looper import capture_inputs
from treeq.engine.scaling import can_fold, fold_input_scales
from treeq.methods import InputStats, make_method, output_error
from treeq.models import spec_for
from treeq.transforms import TRANSFORMS


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_folding_scales_leaves_each_layer_function_unchanged(arch):
    model = make_model(arch)
    spec = spec_for(model.config)
    layer = model.get_submodule(spec.layers)[0]
    torch.nn.init.normal_(layer.get_submodule(spec.subsets[0].fed_by).weight, 0.3, 0.1)  # a non-trivial norm
    inputs = capture_inputs(model, spec, [torch.randint(0, 256, (2, 10))], torch.device("cpu"))
    h, kwargs = inputs.hidden[0], inputs.kwargs[0][0]
    with torch.no_grad():
        before = layer(h, **kwargs)
        folded = 0
        for s in spec.subsets:
            n = layer.get_submodule(s.modules[0]).in_features
            if can_fold(layer, s.fed_by, n):
                fold_input_scales(layer, s.modules, s.fed_by, torch.rand(n) * 3 + 0.2, spec.norm_weight_offset)
                folded += 1
        after = layer(h, **kwargs)
    assert folded == 3  # qkv and gate_up through their norms, down through up_proj; o is fed by a GQA v_proj
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def _subset_with_outlier_channels(seed=0, n=128):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, n, generator=gen)
    x[:, :4] *= 30  # a few channels carry large activations, as in real LLMs
    stats = InputStats(n, torch.device("cpu"))
    stats.add(x)
    return [torch.randn(64, n, generator=gen) * 0.02 for _ in range(2)], stats


def test_awq_scales_cut_the_subset_error_below_plain_rounding():
    weights, stats = _subset_with_outlier_channels()
    rtn = make_method(treeq.QuantConfig(method="rtn", bits=3, group_size=32))
    s = TRANSFORMS["awq"]({}).scales(weights, stats, lambda w: rtn.round(w).weight())
    assert s.shape == (128,) and bool((s > 0).all())
    plain = sum(output_error(w, rtn.round(w).weight(), stats.h) for w in weights)
    scaled = sum(output_error(w, rtn.round(w * s).weight() / s, stats.h) for w in weights)
    assert scaled < 0.8 * plain
    assert s[:4].mean() > s[4:].mean()  # the loud channels were scaled up


def test_awq_checkpoint_round_trip(tmp_path, tokenizer, text_file):
    model = make_model("gemma3_text")
    cfg = treeq.QuantConfig(method="awq", bits=4, group_size=32, calib_samples=8, seqlen=64, batch_size=4)
    report = treeq.quantize(model, cfg, tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file))
    loaded, _ = treeq.load(tmp_path / "q")
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, report.model(ids).logits, rtol=1e-4, atol=1e-5)
