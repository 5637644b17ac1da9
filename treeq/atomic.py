"""Write a directory or a file under a temporary name and rename it into place only when complete,
so an interrupted write leaves what was there before, never half of it."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(target: Path):
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    # mkdtemp makes it 0700; the finished directory gets the mode any other directory would.
    tmp.chmod(0o777 & ~_umask())
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
    # A fresh name, not mkstemp's file: the writer creates it, with the mode any other file would get.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (read by setting it, so restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
