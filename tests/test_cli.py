import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from cli.main import main
from treeq.kernels import LinearFormat, select_kernel


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def quantize_args(model_dir, text_file, out, *extra):
    return (
        "quantize",
        model_dir,
        "--calib-text",
        text_file,
        "--calib-samples",
        8,
        "--seqlen",
        64,
        "--group-size",
        32,
        "--out",
        out,
        "--threads",
        2,
        *extra,
    )


def one_line_error(result, *needles):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_quantize_inspect_eval_round_trip(model_dir, text_file, tmp_path):
    out = tmp_path / "q"
    r = run(*quantize_args(model_dir, text_file, out, "--method", "gptq", "--asym", "--desc-act"))
    assert r.exit_code == 0, r.output
    assert "mlp.down_proj" in r.output and "loss" in r.output  # the per-module table
    qcfg = json.loads((out / "quantize_config.json").read_text())
    assert qcfg["sym"] is False and qcfg["desc_act"] is True and qcfg["group_size"] == 32

    r = run("inspect", out, "--explain")
    assert r.exit_code == 0, r.output
    assert "bits: 4" in r.output and "size on disk" in r.output
    fp32 = select_kernel(LinearFormat(4, 32, False, True, 64, 64), "cpu", torch.float32).name
    assert f"kernel on cpu/float32: {fp32} for 14 modules" in r.output
    fast = select_kernel(LinearFormat(4, 32, False, True, 64, 64), "cpu", torch.bfloat16).name  # what this CPU gets
    assert f"kernel on cpu/bfloat16: {fast} for 14 modules" in r.output
    assert "torch rejected" not in r.output
    # One line per distinct reason, not one per module.
    assert "cpu_int4 rejected for 14 modules (e.g. model.layers.0.mlp.down_proj): dtype" in r.output
    assert "scheme 4-bit g32 asym minmax: 14 modules" in r.output

    r = run("generate", out, "--prompt", "The river", "--max-new-tokens", 5, "--threads", 2)
    assert r.exit_code == 0, r.output
    assert r.output.startswith("The river") and len(r.output.strip()) > len("The river")

    r = run("bench", out, "--fp", model_dir, "--new-tokens", 3, "--repeats", 1, "--threads", 2)
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line for line in r.output.splitlines() if line.startswith(("quantized ", "fp bf16 "))}
    assert set(rows) == {"quantized", "fp"} and rows["fp"].endswith("1.00x"), r.output

    r = run("eval", out, "--text", text_file, "--seqlen", 64, "--max-windows", 2, "--threads", 2)
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.output and "2 non-overlapping windows x 64 tokens" in r.output
    assert "model in float32" in r.output
    # In bf16 on the kernel a bf16 model gets (eval ran only in fp32, so a bf16 kernel could not be
    # evaluated at all): the protocol says so, and the figure is near fp32's.
    r16 = run(
        "eval", out, "--text", text_file, "--seqlen", 64, "--max-windows", 2, "--dtype", "bfloat16", "--kernel", fast
    )
    assert r16.exit_code == 0, r16.output
    assert "model in bfloat16" in r16.output

    def ppl(output):
        return float(output.split(" perplexity: ")[1].split()[0])

    assert ppl(r16.output) == pytest.approx(ppl(r.output), rel=0.01)


def test_eval_and_generate_on_an_fp_model_dir(model_dir, text_file):
    """generate took checkpoints only ("not a quantized checkpoint"), so the fp model's continuation
    could not be set beside a checkpoint's; a --kernel, which only a checkpoint's layers take, is refused."""
    r = run("eval", model_dir, "--text", text_file, "--seqlen", 64, "--max-windows", 1)
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.output
    r = run("generate", model_dir, "--prompt", "The river", "--max-new-tokens", 3)
    said = r.output.split("The river", 1)[-1]  # after transformers' progress bar, on stderr
    assert r.exit_code == 0 and "The river" in r.output and said.strip(), r.output
    for command in (("generate", model_dir, "--prompt", "The river"), ("eval", model_dir, "--max-windows", 1)):
        one_line_error(run(*command, "--kernel", "torch"), "picks a quantized checkpoint's kernel", "drop --kernel")


def test_spec_check_ok(model_dir):
    r = run("spec", "check", model_dir)
    assert r.exit_code == 0, r.output
    assert "OK: llama spec covers 14 linears in 2 layers" in r.output


def test_spec_check_names_an_uncovered_linear(model_dir, monkeypatch):
    import treeq.models as models
    from treeq.models.spec import TreeSpec

    llama = models.SPECS["llama"]
    partial = TreeSpec(model_types=("llama",), subsets=llama.subsets[:-1])
    monkeypatch.setitem(models.SPECS, "llama", partial)
    one_line_error(run("spec", "check", model_dir), "mlp.down_proj", "not covered")


def test_unknown_architecture_lists_supported(tmp_path, model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps(cfg))
    one_line_error(run("spec", "check", odd), "unsupported architecture 'gpt2'", "llama", "treeq/models/")


def test_bits_5_is_refused(model_dir, text_file, tmp_path):
    r = run(*quantize_args(model_dir, text_file, tmp_path / "q", "--bits", 5))
    one_line_error(r, "--bits", "'5'")


def test_bits_5_is_refused_by_the_python_api():
    import treeq

    with pytest.raises(treeq.TreeqError, match="bits"):
        treeq.QuantConfig.build(bits=5)


def test_group_size_not_dividing_in_features(model_dir, text_file, tmp_path):
    r = run(*quantize_args(model_dir, text_file, tmp_path / "q")[:-2], "--group-size", 48, "--threads", 2)
    one_line_error(r, "group_size=48 does not divide in_features=64")
    assert not (tmp_path / "q").exists()


def test_empty_calibration_text(model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    one_line_error(run(*quantize_args(model_dir, empty, tmp_path / "q")), "text is empty")


def test_output_dir_exists_is_not_touched(model_dir, text_file, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_line_error(run(*quantize_args(model_dir, text_file, out)), "already exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_model_dir(tmp_path):
    one_line_error(run("quantize", tmp_path / "nope", "--out", tmp_path / "q"), "not a local model directory")


@pytest.mark.parametrize(
    "typed,parsed", [("1,1", [1, 1]), ("[2, 3]", [2, 3]), ("3", [3]), ("0, 2", [0, 2]), ("all", "all")]
)
def test_tuple_options_take_comma_separated_values(typed, parsed):
    """``--epochs 1,1`` and ``--lkd-layers 0,1`` reached the settings as text and were refused."""
    from cli.config_options import _sequence

    assert _sequence(None, None, typed) == parsed


def test_lkd_layers_from_the_command_line_reach_the_recipe(model_dir, text_file, tmp_path):
    out = tmp_path / "q"
    args = quantize_args(model_dir, text_file, out, "--method", "rtn", "--batch-size", 4, "--lkd", "--lkd-steps", 2)
    r = run(*args, "--lkd-layers", "0,1")
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((out / "recipe.yaml").read_text())["distill"]["layers"] == [0, 1]
