"""Files rewritten in place (statistics, plots, a checkpoint's card) are replaced whole or not at
all: an interrupted write leaves what was there before, never half of it."""

import os
from pathlib import Path

import pytest

from treeq.atomic import atomic_directory, atomic_file


def test_an_interrupted_file_write_leaves_the_file_as_it_was(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("before")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "before" and list(tmp_path.iterdir()) == [target]
    with atomic_file(target) as tmp:
        tmp.write_text("after")
    assert target.read_text() == "after" and list(tmp_path.iterdir()) == [target]


def test_statistics_interrupted_while_plotting_keep_the_last_plot(model_dir, text_file, tmp_path, monkeypatch):
    """The plot was written in place: Ctrl-C there left a truncated PNG where the last run's was."""
    import matplotlib.figure
    from test_cli import run

    args = ("stats", model_dir, "--text", text_file, "--samples", 2, "--seqlen", 32, "--out", tmp_path / "stats")
    assert run(*args).exit_code == 0
    png = tmp_path / "stats" / "activation_stats.png"
    before = png.read_bytes()

    def interrupted(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PN")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted)
    assert run(*args).exit_code != 0
    assert png.read_bytes() == before
    assert sorted(p.name for p in png.parent.iterdir()) == ["activation_stats.csv", "activation_stats.png"]


def test_what_is_renamed_into_place_gets_the_usual_modes(tmp_path):
    """mkdtemp made every checkpoint directory 0700: only its owner could read it (vLLM run as
    another user, a shared model store)."""
    before = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "checkpoint") as tmp:
            (tmp / "config.json").write_text("{}")
        with atomic_file(tmp_path / "card.md") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(before)
    assert (tmp_path / "checkpoint").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "card.md").stat().st_mode & 0o777 == 0o644
