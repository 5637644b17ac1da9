"""ZeroQuant's layer-wise knowledge distillation (treeq/engine/distill.py): trained weights are
re-rounded onto the method's own levels, a layer keeps them only when its held-out output error
falls, and the checkpoint computes what the distilled model in memory did."""

import re
from dataclasses import replace

import pytest
import torch
from conftest import make_model, save_model_dir
from test_path_equivalence import tensors

import treeq
from treeq.config import DistillSettings
from treeq.engine.distill import distill_layer
from treeq.engine.quant_log import QuantLog
from treeq.errors import TreeqError
from treeq.methods import InputStats, make_method

CALIB = dict(bits=3, group_size=32, calib_samples=16, seqlen=64, batch_size=4, method="rtn")
LKD_LINE = re.compile(
    r"layer (\d+) LKD: held-out output error (\S+) -> (\S+) \((\d+) codes changed\), (kept|discarded)"
)


def quantize(src, out, text_file, **settings):
    lines = []
    report = treeq.quantize(
        str(src), treeq.QuantConfig(**{**CALIB, **settings}), out, calib_text=str(text_file), log=QuantLog(lines.append)
    )
    return report, [LKD_LINE.match(line).groups() for line in lines if LKD_LINE.match(line)]


@pytest.mark.parametrize("train_scales", [False, True])
def test_distilled_layers_lower_held_out_error_and_the_checkpoint_keeps_them(
    train_scales, tmp_path, tokenizer, text_file
):
    """Every layer is reported; a kept layer's held-out error fell and its codes moved; the
    checkpoint differs from plain RTN's (in its scales too where they are learned, never in its
    zero points) and loads to the in-memory logits."""
    src = save_model_dir(tmp_path / "src", "llama", tokenizer)
    distill = dict(steps=30, lr=0.003, train_scales=train_scales)
    report, records = quantize(src, tmp_path / "lkd", text_file, distill=distill)
    quantize(src, tmp_path / "rtn", text_file)
    assert [int(r[0]) for r in records] == [0, 1]
    for _, before, after, changed, verdict in records:
        assert (verdict == "kept") == (float(after) < float(before))
        assert verdict == "discarded" or int(changed) > 0
    assert any(r[4] == "kept" for r in records)
    lkd, rtn = tensors(tmp_path / "lkd"), tensors(tmp_path / "rtn")
    assert any(not torch.equal(lkd[k], rtn[k]) for k in lkd if k.endswith(".qweight"))
    assert all(torch.equal(lkd[k], rtn[k]) for k in lkd if k.endswith(".qzeros"))
    same_scales = all(torch.equal(lkd[k], rtn[k]) for k in lkd if k.endswith(".scales"))
    assert same_scales != train_scales
    loaded, _ = treeq.load(tmp_path / "lkd")
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, report.model(ids).logits, rtol=0, atol=1e-5)


def test_only_the_chosen_layers_are_distilled(tmp_path, tokenizer, text_file):
    src = save_model_dir(tmp_path / "src", "llama", tokenizer)
    _, records = quantize(src, tmp_path / "q", text_file, distill=dict(steps=2, layers=[1]))
    assert [int(r[0]) for r in records] == [1]


def test_the_fp_model_teacher_also_aims_at_the_error_earlier_layers_left(tmp_path, tokenizer, text_file):
    """Layer 0 reads the same inputs either way, so both teachers give it the same targets and
    record; from layer 1 on the fp-model teacher aims at the fp model's own hidden states, which
    the quantized layer 0 no longer reproduces, so layer 1 starts further from its target. (Checked
    to fail with layer 1's targets computed from the embeddings, i.e. the fp stream not advanced.)"""
    src = save_model_dir(tmp_path / "src", "llama", tokenizer)
    runs = {
        teacher: quantize(src, tmp_path / teacher, text_file, distill=dict(steps=5, teacher=teacher))[1]
        for teacher in ("fp-model", "fp-layer")
    }
    model, layer = runs["fp-model"], runs["fp-layer"]
    assert model[0] == layer[0]
    assert float(model[1][1]) > float(layer[1][1])


def _layer_case(seed=0):
    """A tiny llama's first layer quantized to 2 bits, its inputs and fp outputs."""
    model = make_model("llama")
    layer = model.model.layers[0]
    gen = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(2, 16, 64, generator=gen) for _ in range(4)]
    pos = torch.arange(16)[None]
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden[0], pos)}
    with torch.no_grad():
        targets = [layer(h, **kwargs) for h in hidden]
        targets = [t[0] if isinstance(t, tuple) else t for t in targets]
    cfg = treeq.QuantConfig(method="rtn", bits=2, group_size=32)
    method = make_method(cfg)
    results = {}
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        module = layer.get_submodule(name)
        fp = module.weight.data.clone()
        results[name] = (method.quantize(fp, InputStats(module.in_features, torch.device("cpu"))), 2, fp)
        module.weight.data = results[name][0].weight()
    return layer, hidden, [kwargs] * 4, targets, results


def test_a_worse_result_is_discarded_and_the_layer_keeps_its_weights():
    """A learning rate far too large moves the weights by many levels: held-out error rises, the
    given results come back and the modules hold their weights. Checked failing with the verdict
    ignored (the rounded results returned regardless)."""
    layer, hidden, kwargs, targets, results = _layer_case()
    kept, record = distill_layer(layer, 0, results, hidden, kwargs, targets, DistillSettings(steps=5, lr=1.0))
    assert not record.kept and record.after > record.before and record.changed_codes > 0
    for name, (r, *_) in results.items():
        assert kept[name] is r
        assert torch.equal(layer.get_submodule(name).weight.data, r.weight())


def test_training_lowers_held_out_error_on_its_levels():
    layer, hidden, kwargs, targets, results = _layer_case()
    kept, record = distill_layer(layer, 0, results, hidden, kwargs, targets, DistillSettings(steps=30, lr=0.003))
    assert record.kept and record.after < record.before
    for name, (r, *_) in results.items():
        assert torch.equal(kept[name].scales, r.scales) and torch.equal(kept[name].zeros, r.zeros)
        assert torch.equal(layer.get_submodule(name).weight.data, kept[name].weight())


def test_learned_scales_lower_held_out_error_further_and_are_stored_in_fp16():
    """On the same layer and steps, learning the scales too reaches a lower held-out error than
    moving weights alone (9% below the start against 2% here)."""
    errors = {}
    for train_scales in (False, True):
        layer, hidden, kwargs, targets, results = _layer_case()
        settings = DistillSettings(steps=30, lr=0.003, train_scales=train_scales)
        kept, record = distill_layer(layer, 0, results, hidden, kwargs, targets, settings)
        errors[train_scales] = record.after
    assert record.kept and errors[True] < errors[False] < record.before
    for name, (r, *_) in results.items():
        assert kept[name].scales.dtype == torch.float16 and not torch.equal(kept[name].scales, r.scales)
        assert torch.equal(layer.get_submodule(name).weight.data, kept[name].weight())


def test_learned_scales_need_the_minmax_grid():
    layer, hidden, kwargs, targets, results = _layer_case()
    results = {n: (replace(r, grid="half-step"), b, fp) for n, (r, b, fp) in results.items()}
    with pytest.raises(ValueError, match="minmax grid only, not \\['half-step'\\]"):
        distill_layer(layer, 0, results, hidden, kwargs, targets, DistillSettings(steps=1, train_scales=True))


def test_bad_distillation_settings_are_one_line_errors():
    with pytest.raises(TreeqError, match="distill.holdout"):
        treeq.QuantConfig.build(distill=dict(holdout=1.5))
    with pytest.raises(TreeqError, match="distill.steps"):
        treeq.QuantConfig.build(distill=dict(steps=0))
    with pytest.raises(TreeqError, match="train_scales learns minmax scales only, not grid 'half-step'"):
        treeq.QuantConfig.build(grid="half-step", distill=dict(train_scales=True))
    with pytest.raises(TreeqError, match="adds an input transform"):
        treeq.QuantConfig.build(method="paroquant", distill={})


def test_a_step_on_some_sequences_sees_their_own_keyword_arguments():
    """Cutting a batch to a few sequences cuts the batch-shaped keyword arguments with it (here
    per-sequence positions): the layer's output on the cut equals those rows of the whole batch's."""
    from treeq.engine.distill import _rows

    model = make_model("llama")
    layer = model.model.layers[0]
    hidden = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).repeat(4, 1) + torch.arange(4)[:, None] * 3  # each sequence its own offset
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden, positions)}
    with torch.no_grad():
        whole = layer(hidden, **kwargs)
        part = layer(hidden[1:3], **_rows(kwargs, slice(1, 3), 4))
    whole, part = (t[0] if isinstance(t, tuple) else t for t in (whole, part))
    torch.testing.assert_close(part, whole[1:3])
