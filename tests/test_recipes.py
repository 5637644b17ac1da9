"""Recipes: every setting from one file (--config), every output directory holding the recipe that
made it and a quantize.log of the run, and a saved recipe repeating the run to the byte."""

import yaml
from safetensors.torch import load_file
from test_cli import one_line_error, run

from treeq.engine.quant_log import RUN_LOG_NAME
from treeq.recipe import RECIPE_NAME


def quantize(src, text_file, out, *extra):
    return run("quantize", src, "--calib-text", text_file, "--out", out, "--threads", 2, *extra)


def test_a_saved_recipe_repeats_the_run_and_flags_change_single_fields(model_dir, text_file, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": "gptq",
                "weights": {"bits": 4, "group_size": 32, "sym": False},
                "calibration": {"calib_samples": 8, "seqlen": 64},
                "options": {"desc_act": False},
                "overrides": [{"pattern": r".*self_attn\.o_proj", "bits": 8}],
            }
        )
    )
    first = quantize(model_dir, text_file, tmp_path / "a", "--config", recipe)
    assert first.exit_code == 0, first.output
    saved = yaml.safe_load((tmp_path / "a" / RECIPE_NAME).read_text())
    assert saved["weights"]["sym"] is False and saved["options"] == {"desc_act": False}
    assert saved["overrides"][0]["bits"] == 8 and saved["calibration"]["seqlen"] == 64
    log = (tmp_path / "a" / RUN_LOG_NAME).read_text()
    assert "self_attn.o_proj" in log and "quantized 14 modules" in log and '"method":"gptq"' in log

    again = quantize(model_dir, text_file, tmp_path / "b", "--config", tmp_path / "a" / RECIPE_NAME)
    assert again.exit_code == 0, again.output
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    changed = quantize(model_dir, text_file, tmp_path / "c", "--config", recipe, "--bits", 3)
    assert changed.exit_code == 0, changed.output
    saved = yaml.safe_load((tmp_path / "c" / RECIPE_NAME).read_text())
    assert saved["weights"]["bits"] == 3 and saved["weights"]["group_size"] == 32  # one field changed


def test_bad_recipes_are_one_line_errors(model_dir, text_file, tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("weights: {bits: 4\n")
    one_line_error(quantize(model_dir, text_file, tmp_path / "x", "--config", bad_yaml), "is not valid YAML")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("weights: {bitz: 4}\n")
    one_line_error(quantize(model_dir, text_file, tmp_path / "x", "--config", unknown), "weights.bitz")
    one_line_error(quantize(model_dir, text_file, tmp_path / "x", "--config", tmp_path / "none.yaml"), "does not exist")
    assert not (tmp_path / "x").exists()
