"""Evaluation: lm-eval tasks offline on a treeq model, the comparison table, the error plot."""

import csv

import pytest
import torch
from conftest import make_model
from test_cli import run

import treeq

pytest.importorskip("lm_eval")


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEQ_CACHE", str(tmp_path / "cache"))


def test_local_tasks_run_offline_on_a_quantized_model(own_cache, tmp_path, tokenizer, text_file):
    model = make_model("llama")
    cfg = treeq.QuantConfig(method="rtn", bits=4, group_size=32, calib_samples=4, seqlen=64, batch_size=4)
    report = treeq.quantize(model, cfg, tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file))
    scores = treeq.evaluate_tasks(report.model, tokenizer, list(treeq.api.TASKS), limit=3, max_length=64)
    assert set(scores) == set(treeq.api.TASKS)
    assert 0 <= scores["treeq_mmlu"]["acc"] <= 1 and 0 <= scores["treeq_capitals"]["acc"] <= 1
    # A random byte-level model is far from fluent: its perplexity per byte must be well above 1.
    assert scores["treeq_wiki"]["byte_perplexity"] > 2


def test_task_files_hold_the_real_data(own_cache):
    from treeq.eval_tasks import task_dir

    d = task_dir()
    mmlu = (d / "treeq_mmlu.jsonl").read_text().splitlines()
    assert len(mmlu) == 14042  # 14044 lines less the two header rows
    capitals = (d / "treeq_capitals.jsonl").read_text().splitlines()
    assert (
        len(capitals) == 506 and '"query": "Athens is the capital of Greece. Baghdad is the capital of"' in capitals[0]
    )
    assert "dataset_path: json" in (d / "treeq_wiki.yaml").read_text()


def test_compare_writes_one_table_for_all_settings(model_dir, text_file, tmp_path):
    out = tmp_path / "cmp"
    r = run(
        "compare",
        model_dir,
        "--methods",
        "rtn,awq",
        "--bits",
        "4,3",
        "--group-size",
        32,
        "--calib-samples",
        4,
        "--seqlen",
        64,
        "--calib-text",
        text_file,
        "--eval-text",
        text_file,
        "--eval-seqlen",
        64,
        "--eval-windows",
        2,
        "--out",
        out,
        "--threads",
        2,
    )
    assert r.exit_code == 0, r.output
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(x["method"], x["bits"]) for x in rows] == [
        ("fp", "16"),
        ("rtn", "4"),
        ("awq", "4"),
        ("rtn", "3"),
        ("awq", "3"),
    ]
    assert float(rows[0]["d ppl"]) == 0 and all(float(x["size_mb"]) > 0 for x in rows)
    assert float(rows[3]["size_mb"]) < float(rows[1]["size_mb"]) < float(rows[0]["size_mb"])
    assert "| rtn | 4 | 32 |" in (out / "compare.md").read_text()


def test_error_report_plots_every_module_and_names_the_hardest(tmp_path, tokenizer, text_file):
    model = make_model("qwen3")
    cfg = treeq.QuantConfig(method="gptq", bits=3, group_size=32, calib_samples=4, seqlen=64, batch_size=4)
    treeq.quantize(model, cfg, tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file))
    r = run("report", tmp_path / "q", "--top", 3)
    assert r.exit_code == 0, r.output
    png = tmp_path / "q" / "errors.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert r.output.count("layer ") == 3


def test_report_on_a_directory_without_log_is_one_clear_error(tmp_path):
    r = run("report", tmp_path)
    assert r.exit_code != 0 and "has no quant_log.csv" in r.output


def test_tasks_without_lm_eval_name_the_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name.startswith("lm_eval"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(treeq.TreeqError, match=r"pip install -e \".\[eval\]\""):
        treeq.evaluate_tasks(torch.nn.Linear(1, 1), None, ["treeq_mmlu"])


def test_compare_deltas_with_task_columns(tmp_path):
    from treeq.compare import add_deltas, write_table

    rows = [
        dict(method="fp", ppl=10.0, **{"treeq_mmlu:acc": 0.5}),
        dict(method="rtn", ppl=12.0, **{"treeq_mmlu:acc": 0.4}),
        dict(method="gptq", ppl=11.0, **{"treeq_mmlu:acc": 0.45}),
    ]
    add_deltas(rows)
    assert [r["d ppl"] for r in rows] == [0.0, 2.0, 1.0]
    assert [round(r["d treeq_mmlu:acc"], 6) for r in rows] == [0.0, -0.1, -0.05]
    assert all(set(r) == set(rows[0]) for r in rows)
    write_table(rows, tmp_path)
    assert "d treeq_mmlu:acc" in (tmp_path / "compare.csv").read_text().splitlines()[0]
