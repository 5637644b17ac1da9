"""Build a kernel's C++ source into a shared library on first use, once per source and machine.

The library is cached under ``$TREEQ_CACHE`` (default ``~/.cache/treeq``) by a hash of the source
and flags, written to a temporary name and renamed, so concurrent processes never load half a
file. It links OpenMP by soname; torch has already loaded its own ``libgomp.so.1``, so both share
one thread pool and ``torch.set_num_threads`` governs the kernel too. Failure (no compiler, an
old one, a CPU without the instructions) is an answer, not an error: the caller declines and a
portable kernel is chosen instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("TREEQ_CACHE", Path.home() / ".cache" / "treeq")) / "kernels"


@functools.cache
def build(source: Path, flags: tuple[str, ...]) -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, why it could not be built)."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return None, "no C++ compiler (g++) on PATH"
    text = source.read_bytes()
    key = hashlib.sha256(text + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", *flags, str(source), "-o", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            os.unlink(tmp)
            return None, f"cannot run the C++ compiler {compiler}: {e.strerror}"
        if done.returncode:
            os.unlink(tmp)
            first = (done.stderr.strip().splitlines() or ["?"])[0]
            return None, f"{source.name} did not compile: {first}"
        os.replace(tmp, target)
    return ctypes.CDLL(str(target)), None
