"""Scale migrations are their own step: any method runs after one, and ``--method awq`` is exactly
round-to-nearest after the AWQ migration."""

import pytest
import torch
from conftest import save_model_dir
from test_path_equivalence import assert_same_tensors, tensors

import treeq
from treeq.engine.quant_log import QuantLog
from treeq.errors import TreeqError
from treeq.runtime.quant_linear import QuantLinear

CALIB = dict(bits=4, group_size=32, calib_samples=8, seqlen=64, batch_size=4)


def quantize(src, out, text_file, **settings):
    cfg = treeq.QuantConfig(**CALIB, **settings)
    return treeq.quantize(str(src), cfg, out, calib_text=str(text_file), log=QuantLog(str))


def test_method_awq_is_rtn_after_the_awq_migration(tmp_path, tokenizer, text_file):
    src = save_model_dir(tmp_path / "src", "llama", tokenizer)
    quantize(src, tmp_path / "awq", text_file, method="awq")
    quantize(src, tmp_path / "rtn+awq", text_file, method="rtn", migration="awq")
    assert_same_tensors(tensors(tmp_path / "awq"), tensors(tmp_path / "rtn+awq"))


def test_gptq_after_the_awq_migration_folds_scales_and_round_trips(tmp_path, tokenizer, text_file):
    """Checked failing with the looper ignoring ``migration`` (the norms came out unchanged)."""
    src = save_model_dir(tmp_path / "src", "llama", tokenizer)
    plain = quantize(src, tmp_path / "gptq", text_file, method="gptq")
    migrated = quantize(src, tmp_path / "awq+gptq", text_file, method="gptq", migration="awq")
    a, b = tensors(tmp_path / "gptq"), tensors(tmp_path / "awq+gptq")
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(a[norm], b[norm])  # AWQ's scales went into the norm feeding q/k/v
    loaded, _ = treeq.load(tmp_path / "awq+gptq")
    assert any(isinstance(m, QuantLinear) for m in loaded.modules())
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, migrated.model(ids).logits, rtol=1e-4, atol=1e-5)
        assert not torch.equal(migrated.model(ids).logits, plain.model(ids).logits)
    recorded = treeq.inspect_checkpoint(tmp_path / "awq+gptq").quantization["meta"]["settings"]
    assert recorded["migration"] == "awq"


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(migration="nope"), "unknown migration 'nope'; choose one of .*awq"),
        (dict(migration_options={"x": 1}), r"migration_options \['x'\] given without a migration"),
        (dict(migration="awq", migration_options={"x": 1}), "migration 'awq' takes no options"),
    ],
)
def test_bad_migration_settings_are_one_line_errors(settings, message):
    with pytest.raises(TreeqError, match=message):
        treeq.QuantConfig.build(method="gptq", **settings)
