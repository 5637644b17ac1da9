"""Build a C++ source (a kernel, or a native loop of the numerics or of a method) into a shared
library on first use, once per source and machine.

The library is cached under ``$TREEQ_CACHE`` (default ``~/.cache/treeq``) by a hash of the source,
the local headers it includes and the flags, written to a temporary name and renamed, so
concurrent processes never load half a file. It links OpenMP by soname; torch has already loaded
its own ``libgomp.so.1``, so both share one thread pool and ``torch.set_num_threads`` governs the
kernel too. Failure (no compiler, an old one, a CPU without the instructions) is an answer, not an
error: the caller declines and a portable kernel is chosen instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("TREEQ_CACHE", Path.home() / ".cache" / "treeq")) / "kernels"


def source_text(source: Path) -> bytes:
    """The source and the local headers it includes (``#include "..."``, and theirs, each once), so
    the cache key changes with any of them."""
    text, seen, queue = b"", set(), [source]
    while queue:
        path = queue.pop(0)
        if path in seen:
            continue
        seen.add(path)
        body = path.read_bytes()
        text += body
        queue += [path.parent / name.decode() for name in re.findall(rb'^#include "([^"]+)"', body, re.MULTILINE)]
    return text


@functools.cache
def build(source: Path, flags: tuple[str, ...]) -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, why it could not be built)."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return None, "no C++ compiler (g++) on PATH"
    if not source.exists():
        return None, f"{source.name} is not installed with treeq (pyproject.toml's package-data)"
    text = source_text(source)
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


# For loops that repeat torch's fp32 steps exactly: AVX2, and no multiply-add fused unless the
# source asks for it (std::fma). -fno-trapping-math lets nearbyint vectorize; it changes no value.
AVX2_EXACT = ("-mavx2", "-mfma", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp")


def load(
    source: Path, flags: tuple[str, ...], supported: str, lacks: str, functions: dict[str, list]
) -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, why this machine cannot run it): ``source`` built with ``flags``,
    its ``supported()`` symbol asked whether this CPU has the instructions (``lacks`` says what is
    missing when not), and each of ``functions`` given its argument types (returning nothing)."""
    lib, why = build(source, flags)
    if lib is None:
        return None, why
    if not getattr(lib, supported)():
        return None, lacks
    for name, argtypes in functions.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    return lib, None
