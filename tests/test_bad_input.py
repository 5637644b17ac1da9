"""Bad input gets one line naming the problem and the fix, never a traceback, and leaves every file
as it was."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, MOE_ARCHS, make_model, save_model_dir
from test_cli import one_line_error, quantize_args, run
from test_end_to_end import quick_config
from test_evaluation import hide_lm_eval

import treeq
from treeq.engine.resume import partial_dir


def snapshot(root):
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def checkpoint(tmp_path, tokenizer, text_file):
    treeq.quantize(
        make_model("llama"), quick_config(method="rtn"), tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file)
    )
    return tmp_path / "q"


def each_refused_in_one_line(root, calls):
    """Each Python API call of ``calls`` (needle -> call) raises a one-line TreeqError holding its
    needle, and nothing under ``root`` changes."""
    before = snapshot(root)
    for needle, call in calls.items():
        with pytest.raises(treeq.TreeqError) as raised:
            call()
        assert needle in str(raised.value) and "\n" not in str(raised.value), (needle, str(raised.value))
    assert snapshot(root) == before


def unchanged_after(root, *args, needles):
    before = snapshot(root)
    one_line_error(run(*args), *needles)
    assert snapshot(root) == before


def test_a_model_directory_without_tokenizer_files(model_dir, text_file, tmp_path):
    for f in model_dir.glob("tokenizer*"):
        f.unlink()
    unchanged_after(tmp_path, *quantize_args(model_dir, text_file, tmp_path / "q"), needles=("has no tokenizer files",))


def test_truncated_model_weights(model_dir, text_file, tmp_path):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    unchanged_after(tmp_path, *quantize_args(model_dir, text_file, tmp_path / "q"), needles=("truncated or corrupt",))


def test_truncated_checkpoint_weights(checkpoint, tmp_path):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    unchanged_after(tmp_path, "eval", checkpoint, "--max-windows", 1, needles=("truncated or corrupt",))


def test_nan_weights_name_the_module(tmp_path, tokenizer, text_file):
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    src = tmp_path / "src"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    unchanged_after(
        tmp_path, *quantize_args(src, text_file, tmp_path / "q"), needles=("model.layers.1.mlp.up_proj has 1 NaN",)
    )


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("bits", 7, "bits=7"),
        ("group_size", 48, "group_size=48 does not divide"),
        ("sym", "yes", "sym and desc_act must be true or false"),
    ],
)
def test_a_quantization_config_that_cannot_describe_the_tensors(checkpoint, tmp_path, field, value, needle):
    for name in ("config.json", "quantize_config.json"):
        cfg = json.loads((checkpoint / name).read_text())
        (cfg["quantization_config"] if name == "config.json" else cfg)[field] = value
        (checkpoint / name).write_text(json.dumps(cfg))
    unchanged_after(tmp_path, "inspect", checkpoint, needles=(needle,))
    unchanged_after(tmp_path, "eval", checkpoint, "--max-windows", 1, needles=(needle,))


def test_tensors_that_do_not_match_the_config(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(checkpoint / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.scales"
    state[key] = torch.cat([state[key], state[key]])
    save_file(state, checkpoint / "model.safetensors", metadata={"format": "pt"})
    unchanged_after(tmp_path, "eval", checkpoint, "--max-windows", 1, needles=("do not match the quantization_config",))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("flag,value", [("--device", "cuda:0"), ("--devices", "cuda:0,cuda:1"), ("--device", "tpu")])
def test_a_device_this_machine_does_not_have(model_dir, text_file, tmp_path, flag, value):
    unchanged_after(
        tmp_path,
        *quantize_args(model_dir, text_file, tmp_path / "q", flag, value, "--no-eval"),
        needles=(value.split(",")[0],),
    )


@pytest.mark.parametrize(
    "extra,needle",
    [
        (("--group-size", 24), "group_size=24 does not divide in_features=64"),
        (("--calib-text", "no-such-text"), "neither a file nor a built-in corpus"),
        (("--device", "tpu"), "'tpu' is not a device name"),
        (("--override", r"model\.layers\.0\.mlp\.upproj=bits:8"), "matches none of the modules"),
        (("--kv", "kivi-2"), "do not fit head_dim 16"),
        (("--resume",), "nothing to resume"),
        (("--seqlen", 300), "seqlen=300 is longer than the model's 256 positions"),
    ],
)
def test_a_setting_that_cannot_run_fails_before_the_fp_model_is_loaded(
    model_dir, text_file, tmp_path, monkeypatch, extra, needle
):
    """Each of these failed only once the fp model was loaded and its perplexity measured, a minute
    on SmolLM2 (treeq.quantize checks them, but the CLI evaluates the fp model before calling it)."""

    monkeypatch.setattr(treeq, "load_fp_model", never_loaded)
    unchanged_after(tmp_path, *quantize_args(model_dir, text_file, tmp_path / "q", *extra), needles=(needle,))


def never_loaded(*args, **kwargs):
    raise AssertionError("the fp model was loaded before the settings were checked")


def test_a_run_over_an_interrupted_one_fails_before_the_fp_model_is_loaded(model_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(treeq, "load_fp_model", never_loaded)
    partial_dir(tmp_path / "q").mkdir()
    args = quantize_args(model_dir, text_file, tmp_path / "q")
    unchanged_after(tmp_path, *args, needles=("holds an interrupted run", "add --resume"))


def test_compare_checks_every_row_before_the_fp_model_is_loaded(model_dir, text_file, tmp_path, monkeypatch):
    """The fp row comes first, so a row that cannot run failed only after the fp model's evaluation."""
    monkeypatch.setattr(treeq.api, "load_fp_model", never_loaded)
    args = ("compare", model_dir, "--calib-text", text_file, "--seqlen", 64, "--methods", "rtn", "--bits", "4,8")
    args += ("--group-size", 24)
    unchanged_after(tmp_path, *args, "--out", tmp_path / "c", needles=("group_size=24 does not divide",))


@pytest.mark.parametrize("command", ["eval", "compare"])
@pytest.mark.parametrize("lm_eval_installed", [True, False])
def test_a_task_that_cannot_run_fails_before_the_model_is_loaded(
    command, lm_eval_installed, model_dir, text_file, tmp_path, monkeypatch
):
    """An unknown task, or any task without lm-eval, failed only after the perplexity (73 s on the
    built-in model)."""
    for loader in (treeq, treeq.api):
        monkeypatch.setattr(loader, "load_fp_model", never_loaded)
    if not lm_eval_installed:
        hide_lm_eval(monkeypatch)
    task, needle = ("no_such_task", "unknown task(s) no_such_task") if lm_eval_installed else ("treeq_wiki", "lm-eval")
    args = (command, model_dir, "--tasks", task)
    if command == "compare":
        args += ("--calib-text", text_file, "--methods", "rtn", "--out", tmp_path / "c")
    unchanged_after(tmp_path, *args, needles=(needle,))


@pytest.mark.parametrize("arch", [*ARCHS, *MOE_ARCHS])
def test_check_run_refuses_what_quantize_refuses_without_reading_a_weight(arch, tmp_path, tokenizer):
    """On the model directory's skeleton (fused MoE experts unfused on the meta device): the weights
    may be gone."""
    path = save_model_dir(tmp_path / arch, arch, tokenizer)
    for weights in path.glob("*.safetensors"):
        weights.unlink()
    treeq.api.check_run(path, quick_config())
    with pytest.raises(treeq.TreeqError, match="group_size=24 does not divide"):
        treeq.api.check_run(path, quick_config(group_size=24))


def test_calibration_windows_longer_than_the_model_positions(tmp_path, tokenizer, text_file):
    """The tiny model states 256 positions. Windows of 300 were calibrated on without a word: their
    last tokens' activations came from positions the model never saw. The Python API and the
    low-memory path refuse them too; a window of exactly 256 is fine."""
    path = save_model_dir(tmp_path / "m", "llama", tokenizer)
    config, out, text = quick_config(method="rtn", seqlen=300), tmp_path / "q", str(text_file)
    each_refused_in_one_line(
        tmp_path,
        {
            "longer than the model's 256 positions": lambda: treeq.quantize(
                make_model("llama"), config, out, tokenizer=tokenizer, calib_text=text
            ),
            "seqlen=300": lambda: treeq.quantize(path, config, out, calib_text=text, low_memory=True),
        },
    )
    treeq.api.check_run(path, quick_config(method="rtn", seqlen=256))


def test_a_tokenizer_that_is_not_the_models(tmp_path, tokenizer, text_file):
    """A model of 100 tokens beside a tokenizer of 257 (a tokenizer copied from another model): every
    place treeq feeds tokenized text to the model ended in torch's IndexError deep in the embedding
    (lm-eval's requests too, which it tokenizes itself)."""
    path = tmp_path / "m"
    make_model("llama", vocab_size=100).save_pretrained(path)
    tokenizer.save_pretrained(path)
    model, text = make_model("llama", vocab_size=100), str(text_file)
    needle = "but the model's embedding has 100 rows"
    kv = treeq.schemes.KVCacheScheme(method="kvquant", key_bits=4, value_bits=4, group_size=16, residual=0)
    each_refused_in_one_line(
        tmp_path,
        {
            needle: lambda: treeq.quantize(path, quick_config(method="rtn"), tmp_path / "q", calib_text=text),
            f"{needle}: its tokenizer": lambda: treeq.quantize(
                path, quick_config(method="rtn"), tmp_path / "q", calib_text=text, low_memory=True
            ),
            "embedding has 100 rows": lambda: treeq.evaluate_perplexity(model, tokenizer, text, 64, 2),
            "the tokenizer gives token id": lambda: treeq.generate(model, tokenizer, "hello world", 2),
            "model was trained with": lambda: treeq.activation_stats(model, tokenizer, text, 2, 64),
            "has 100 rows": lambda: treeq.runtime.kv_calibration.calibrate_on_text(model, tokenizer, kv, text),
            "its tokenizer files are not": lambda: treeq.evaluate_tasks(model, tokenizer, ["treeq_capitals"], limit=2),
        },
    )
    unchanged_after(tmp_path, *quantize_args(path, text_file, tmp_path / "q"), needles=(needle,))


def test_a_checkpoint_directory_without_config(checkpoint, tmp_path):
    shutil.move(checkpoint / "config.json", tmp_path / "elsewhere.json")
    unchanged_after(tmp_path, "inspect", checkpoint, needles=("has no config.json",))


def test_a_quantized_checkpoint_given_as_the_model_to_quantize(checkpoint, text_file, tmp_path):
    """transformers tried to load it as a GPTQ model and failed on a missing package (optimum)."""
    unchanged_after(
        tmp_path,
        *quantize_args(checkpoint, text_file, tmp_path / "again"),
        needles=("is a quantized checkpoint", "give the model it was made from"),
    )


def test_another_tools_checkpoint_is_read_as_a_checkpoint_not_as_a_model(checkpoint, tmp_path):
    """Without treeq's quantize_config.json, config.json's quantization_config still marks a checkpoint:
    `eval` hands it to the loader (which reads or refuses it), never to the fp model's path."""
    (checkpoint / "quantize_config.json").unlink()
    assert treeq.api.is_quantized_checkpoint(checkpoint)
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 7
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    unchanged_after(tmp_path, "eval", checkpoint, "--max-windows", 1, needles=("bits=7",))


@pytest.mark.parametrize("where", ["model", "checkpoint"])
def test_a_config_json_that_is_not_json(where, model_dir, checkpoint, text_file, tmp_path):
    """transformers' message blamed the weights; the line names the file."""
    directory = model_dir if where == "model" else checkpoint
    (directory / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    args = quantize_args(model_dir, text_file, tmp_path / "q2") if where == "model" else ("eval", checkpoint)
    unchanged_after(tmp_path, *args, needles=(f"{directory / 'config.json'} is not valid JSON",))


@pytest.mark.parametrize("windows", [0, -1])
def test_no_window_to_evaluate(checkpoint, tmp_path, windows):
    """-1 ended in a ZeroDivisionError, 0 in a message about the text being too short."""
    unchanged_after(tmp_path, "eval", checkpoint, "--max-windows", windows, needles=(f"max_windows={windows}",))


@pytest.mark.parametrize("command", ["quantize", "compare"])
def test_an_output_directory_under_a_file(command, model_dir, text_file, tmp_path):
    """Failed with NotADirectoryError at the first layer's write, after the model was loaded."""
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub"
    if command == "quantize":
        args = quantize_args(model_dir, text_file, out)
    else:
        args = ("compare", model_dir, "--calib-text", text_file, "--methods", "rtn", "--out", out)
    unchanged_after(tmp_path, *args, needles=(f"{tmp_path / 'afile'} is a file",))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no directory can be made")
def test_an_output_directory_that_cannot_be_made(model_dir, text_file, tmp_path):
    """A directory test would pass as root whatever its mode bits; /proc refuses every new directory."""
    unchanged_after(
        tmp_path, *quantize_args(model_dir, text_file, "/proc/treeq-out"), needles=("cannot write to /proc/treeq-out",)
    )
    assert not Path("/proc/treeq-out.partial").exists()


def test_a_checkpoint_without_weights(checkpoint, tmp_path):
    """inspect ended in a ZeroDivisionError."""
    (checkpoint / "model.safetensors").unlink()
    for args in (("inspect", checkpoint), ("eval", checkpoint, "--max-windows", 1)):
        unchanged_after(tmp_path, *args, needles=("has no .safetensors weights",))


def test_distillation_with_no_batch_left_to_train_on(model_dir, text_file, tmp_path):
    """Was a ValueError from the first distilled layer, after its modules were quantized."""
    args = quantize_args(model_dir, text_file, tmp_path / "q", "--method", "rtn", "--lkd")  # 8 samples, 1 batch
    unchanged_after(tmp_path, *args, needles=("distill holds out 1 of the 1 calibration batch",))


def test_a_method_option_error_shows_the_value_not_the_whole_config(model_dir, text_file, tmp_path):
    args = quantize_args(model_dir, text_file, tmp_path / "q", "--method", "gptq", "--block-size", 0)
    r = run(*args)
    one_line_error(r, "options.block_size: Input should be greater than 0 (got 0)")
    assert "calibration" not in r.output.splitlines()[-1]


def test_compare_bit_lists_that_are_not_integers(model_dir, tmp_path):
    for flag in ("--bits", "--act-bits"):
        args = ("compare", model_dir, "--methods", "rtn", flag, "four", "--out", tmp_path / "c")
        unchanged_after(tmp_path, *args, needles=(f"{flag} 'four' is not a comma-separated list of integers",))


def test_a_report_plot_into_a_missing_directory(checkpoint, tmp_path):
    unchanged_after(tmp_path, "report", checkpoint, "--png", tmp_path / "nowhere" / "x.png", needles=("--png",))


def test_a_report_plot_in_a_format_matplotlib_does_not_write(checkpoint, tmp_path):
    """Was matplotlib's ValueError traceback, once the plot was drawn."""
    unchanged_after(tmp_path, "report", checkpoint, "--png", tmp_path / "x.foo", needles=("no .foo images", "--png"))


def test_stats_into_an_output_under_a_file(model_dir, text_file, tmp_path):
    """Failed with NotADirectoryError once the statistics were gathered."""
    args = ("stats", model_dir, "--text", text_file, "--samples", 2, "--seqlen", 32, "--out", text_file / "x")
    unchanged_after(tmp_path, *args, needles=(f"{text_file} is a file",))


def test_an_override_that_matches_no_module(model_dir, text_file, tmp_path):
    """A misspelt pattern quantized every module with the base scheme and said nothing."""
    args = quantize_args(model_dir, text_file, tmp_path / "q", "--override", r"model\.layers\.0\.mlp\.upproj=bits:8")
    unchanged_after(tmp_path, *args, needles=("matches none of the modules treeq quantizes",))


def test_a_calibration_text_that_is_not_text(model_dir, tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    unchanged_after(tmp_path, *quantize_args(model_dir, binary, tmp_path / "q"), needles=("is not UTF-8 text",))


def test_an_input_group_size_that_does_not_divide_the_inputs(model_dir, text_file, tmp_path):
    """Was a RuntimeError from torch's unflatten in the first layer's forward."""
    per_group = ("--act-bits", 4, "--act-granularity", "per-group", "--act-group-size", 7)
    args = quantize_args(model_dir, text_file, tmp_path / "q", *per_group)
    unchanged_after(tmp_path, *args, needles=("activations.group_size=7 does not divide in_features=64",))


def test_an_empty_prompt(checkpoint, tmp_path):
    unchanged_after(tmp_path, "generate", checkpoint, "--prompt", "", needles=("the prompt is empty",))


def test_a_dtype_no_model_runs_in(checkpoint, model_dir):
    """transformers' ValueError before; the Python API's twins of --dtype."""
    loads = (lambda: treeq.load(checkpoint, dtype=torch.int8), lambda: treeq.load_fp_model(str(model_dir), torch.int8))
    for load in loads:
        with pytest.raises(treeq.TreeqError, match="dtype torch.int8 is not one a model runs in"):
            load()


def test_a_model_directory_without_weights(model_dir, text_file, tmp_path):
    """The message said the weights were truncated or corrupt."""
    (model_dir / "model.safetensors").unlink()
    unchanged_after(tmp_path, *quantize_args(model_dir, text_file, tmp_path / "q"), needles=("has no weight files",))


def test_a_recipe_section_that_is_not_a_mapping(model_dir, text_file, tmp_path):
    """``weights: 4`` was a TypeError."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("weights: 4\n")
    args = ("quantize", model_dir, "--config", recipe, "--out", tmp_path / "q", "--calib-text", text_file)
    unchanged_after(tmp_path, *args, needles=("weights must be a mapping of its settings",))


def test_python_api_arguments_of_the_wrong_kind(checkpoint, tokenizer, tmp_path):
    """Deep pathlib TypeErrors and AttributeErrors before (a QuantConfig passed as the model, a dict
    as the config, a path where a loaded model belongs); nothing is written."""
    model = make_model("llama")
    cfg = quick_config(method="rtn")
    calls = {
        "model is a QuantConfig: settings go second": lambda: treeq.quantize(cfg, out=tmp_path / "a"),
        "config must be a treeq.QuantConfig, got dict": lambda: treeq.quantize(None, {"bits": 4}, tmp_path / "b"),
        "model must be a model directory, None for the built-in model, or a loaded": lambda: treeq.quantize(
            3, cfg, tmp_path / "c"
        ),
        "a loaded model needs its tokenizer": lambda: treeq.quantize(model, cfg, tmp_path / "d"),
        "quantize takes a loaded transformers model, got Linear": lambda: treeq.quantize(
            torch.nn.Linear(2, 2), cfg, tmp_path / "e", tokenizer=tokenizer
        ),
        "out must be a path (a str or pathlib.Path), got int": lambda: treeq.quantize(
            model, cfg, 7, tokenizer=tokenizer
        ),
        "checkpoint must be a path (a str or pathlib.Path), got int": lambda: treeq.load(3),
        "checkpoint must be a path (a str or pathlib.Path), got NoneType": lambda: treeq.inspect_checkpoint(None),
        "model must be a path (a str or pathlib.Path), got int": lambda: treeq.load_fp_model(5),
        "evaluate_perplexity takes a loaded transformers model, got PosixPath; load it first": lambda: (
            treeq.evaluate_perplexity(checkpoint, tokenizer)
        ),
        "generate takes a loaded transformers model, got str": lambda: treeq.generate(str(checkpoint), tokenizer, "a"),
        "activation_stats takes a loaded transformers model, got str": lambda: treeq.activation_stats("x", tokenizer),
        "png must be a path (a str or pathlib.Path), got int": lambda: treeq.error_report(checkpoint, png=3),
    }
    each_refused_in_one_line(tmp_path, calls)


def test_python_api_values_the_cli_would_refuse(tokenizer, tmp_path):
    """The Python twins of the CLI's ranges and lists: transformers' ValueError (max_new_tokens 0),
    torch.stack on nothing (samples 0), a string taken for a list of methods or tasks ("unknown method 'r'"),
    greedy decoding without a word (a negative temperature), a run that compared nothing."""
    model = make_model("llama")
    calls = {
        "generate needs the model's tokenizer": lambda: treeq.generate(model, None, "a"),
        "evaluate_perplexity needs the model's tokenizer": lambda: treeq.evaluate_perplexity(model, None),
        "prompt must be a str, got int": lambda: treeq.generate(model, tokenizer, 5),
        "max_new_tokens=0 must be an integer >= 1": lambda: treeq.generate(model, tokenizer, "a", max_new_tokens=0),
        "temperature=-1.0 must be a number >= 0": lambda: treeq.generate(model, tokenizer, "a", temperature=-1.0),
        "seqlen='64' must be an integer >= 2": lambda: treeq.evaluate_perplexity(model, tokenizer, seqlen="64"),
        "max_windows='2' must be an integer >= 1": lambda: treeq.evaluate_perplexity(model, tokenizer, max_windows="2"),
        "samples=0 must be an integer >= 1": lambda: treeq.activation_stats(model, tokenizer, samples=0),
        "methods must be a list, got str 'rtn'": lambda: treeq.compare(None, "rtn", [4], tmp_path / "a"),
        "nothing to compare": lambda: treeq.compare(None, ["rtn"], [], tmp_path / "b"),
        "kv must be a list, got str 'kivi-4'": lambda: treeq.compare(None, [], [], tmp_path / "c", kv="kivi-4"),
        "tasks must be a list, got str 'treeq_wiki'": lambda: treeq.evaluate_tasks(model, tokenizer, "treeq_wiki"),
    }
    each_refused_in_one_line(tmp_path, calls)
