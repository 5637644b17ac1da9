"""Architectures added from outside the installed package: a spec file (--spec), register_spec, and
the treeq.specs entry-point group."""

import json
import textwrap
from importlib.metadata import EntryPoint

import pytest
import torch
from conftest import COMMON
from test_cli import one_line_error, quantize_args, run
from transformers import AutoConfig, AutoModelForCausalLM

import treeq
from treeq import models
from treeq.errors import TreeqError
from treeq.runtime.quant_linear import QuantLinear

# Granite has Llama's layer layout, but no built-in spec names its model_type.
GRANITE_SPEC = textwrap.dedent(
    """
    from treeq.models import Subset, TreeSpec

    SPEC = TreeSpec(
        model_types=("granite",),
        subsets=(
            Subset(name="qkv", modules=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   fed_by="input_layernorm"),
            Subset(name="o", modules=("self_attn.o_proj",), fed_by="self_attn.v_proj"),
            Subset(name="gate_up", modules=("mlp.gate_proj", "mlp.up_proj"), fed_by="post_attention_layernorm"),
            Subset(name="down", modules=("mlp.down_proj",), fed_by="mlp.up_proj"),
        ),
    )
    """
)


@pytest.fixture
def clean_registry():
    before = dict(models.SPECS)
    yield
    models.SPECS.clear()
    models.SPECS.update(before)


@pytest.fixture
def granite_dir(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("granite", **COMMON))
    model.save_pretrained(tmp_path / "tiny-granite")
    tokenizer.save_pretrained(tmp_path / "tiny-granite")
    return tmp_path / "tiny-granite"


def test_a_spec_file_outside_the_package_checks_and_quantizes_its_model(
    clean_registry, granite_dir, text_file, tmp_path
):
    spec_file = tmp_path / "my_granite.py"
    spec_file.write_text(GRANITE_SPEC)
    one_line_error(run("spec", "check", granite_dir), "unsupported architecture 'granite'", "--spec FILE")
    checked = run("spec", "check", granite_dir, "--spec", spec_file)
    assert checked.exit_code == 0, checked.output
    assert "OK: granite spec covers 14 linears in 2 layers" in checked.output
    result = run(*quantize_args(granite_dir, text_file, tmp_path / "q", "--spec", spec_file, "--no-eval"))
    assert result.exit_code == 0, result.output
    loaded, _ = treeq.load(tmp_path / "q")
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14


def test_register_spec_from_python(clean_registry, granite_dir, text_file, tmp_path):
    namespace: dict = {}
    exec(GRANITE_SPEC, namespace)
    treeq.register_spec(namespace["SPEC"])
    cfg = treeq.QuantConfig(method="rtn", bits=4, group_size=32, calib_samples=4, seqlen=32, batch_size=4)
    treeq.quantize(str(granite_dir), cfg, tmp_path / "q", calib_text=str(text_file))
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qcfg["bits"] == 4


def test_plug_in_entry_points_register_and_a_broken_one_only_warns(clean_registry, monkeypatch, tmp_path, caplog):
    (tmp_path / "granite_plugin.py").write_text(GRANITE_SPEC)
    monkeypatch.syspath_prepend(str(tmp_path))
    good = EntryPoint("granite", "granite_plugin", models.ENTRY_POINT_GROUP)
    broken = EntryPoint("broken", "no_such_module_here", models.ENTRY_POINT_GROUP)
    monkeypatch.setattr(
        models, "entry_points", lambda group: [good, broken] if group == models.ENTRY_POINT_GROUP else []
    )
    models._load_plugins()
    assert models.SPECS["granite"].model_types == ("granite",)
    assert "no_such_module_here" in caplog.text


@pytest.mark.parametrize(
    "content,message",
    [
        ("x = 1\n", "defines no SPEC = TreeSpec(...)"),
        ("raise RuntimeError('oops')\n", "failed to import: RuntimeError: oops"),
    ],
)
def test_a_bad_spec_file_is_a_one_line_error(content, message, tmp_path):
    path = tmp_path / "bad_spec.py"
    path.write_text(content)
    with pytest.raises(TreeqError, match=message.replace("(", r"\(").replace(")", r"\)")):
        models.load_spec_file(path)
    with pytest.raises(TreeqError, match="does not exist"):
        models.load_spec_file(tmp_path / "missing.py")
