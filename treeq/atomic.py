"""Write a directory or a file under a temporary name and rename it into place only when complete,
so an interrupted write leaves what was there before, never half of it."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(target: Path):
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(target)
    tmp.mkdir()  # not mkdtemp's 0700: the mode any other directory gets
    try:
        yield tmp
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: Path):
    """A temporary path beside ``target`` to write; it replaces ``target`` once the block ends."""
    target = Path(target)
    tmp = _beside(target)  # the writer creates it, with the mode any other file gets (mkstemp's is 0600)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _beside(target: Path) -> Path:
    """A fresh hidden name in ``target``'s directory for the work in progress."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
