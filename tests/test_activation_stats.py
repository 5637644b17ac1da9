"""`treeq stats`: per-layer input statistics of every dense subset, as is and after SmoothQuant,
computed from per-channel power sums in one pass; checked against the recorded inputs."""

import csv

import torch
from conftest import make_model

import treeq


def test_statistics_match_the_inputs_each_subset_reads(tokenizer, text_file, tmp_path):
    """The first layer's attention input, recorded by a hook, gives the same largest magnitude,
    share above the threshold and kurtosis; after smoothing the largest channel is smaller."""
    model = make_model("llama")
    seen = []
    q_proj = model.model.layers[0].self_attn.q_proj
    handle = q_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, 64).clone()))
    rows = treeq.activation_stats(model, tokenizer, str(text_file), samples=4, seqlen=32, threshold=0.5)
    handle.remove()
    x = torch.cat(seen).double()
    row = next(r for r in rows if (r.layer, r.subset) == (0, "qkv"))
    absmax = x.abs().amax(dim=0)
    centred = x - x.mean()
    kurtosis = float((centred**4).mean() / (centred**2).mean() ** 2)
    assert row.channels == 64 and abs(row.max_absmax - float(absmax.max())) < 1e-6
    assert row.share_above == float((absmax > 0.5).float().mean())
    assert abs(row.kurtosis - kurtosis) < 1e-6 * kurtosis
    assert row.max_absmax_smoothed < row.max_absmax
    assert {(r.layer, r.subset) for r in rows} == {(i, s) for i in range(2) for s in ("qkv", "o", "gate_up", "down")}


def test_cli_writes_the_table_and_the_plot(model_dir, text_file, tmp_path):
    from test_cli import run

    out = tmp_path / "stats"
    r = run("stats", str(model_dir), "--text", str(text_file), "--samples", "2", "--seqlen", "32", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "largest input channel: layer" in r.output
    with open(out / "activation_stats.csv") as f:
        assert len(list(csv.DictReader(f))) == 8
    assert (out / "activation_stats.png").read_bytes()[:4] == b"\x89PNG"


def test_windows_longer_than_the_model_positions_are_flagged(tokenizer, text_file, caplog):
    """Statistics of windows past the 256 positions the tiny model states were shown without a word."""
    model = make_model("llama")
    with caplog.at_level("WARNING", logger="treeq"):
        treeq.activation_stats(model, tokenizer, str(text_file), samples=1, seqlen=256)
        assert "positions" not in caplog.text
        treeq.activation_stats(model, tokenizer, str(text_file), samples=1, seqlen=300)
    assert "windows of 300 tokens are longer than the model's 256 positions" in caplog.text
