"""The x86 instruction sets the CPU kernels may use: what the CPU has, capped by ``$TREEQ_CPU_ISA``.

Machines differ (AMX; AVX512-BF16 without AMX; AVX2 only), and a kernel path runs only where its
instructions exist. The cap lets one machine stand in for an older one, so every path is tested
wherever a machine can run it: ``TREEQ_CPU_ISA=avx512_bf16`` forbids AMX, ``avx2`` forbids both.
It is read at every kernel selection and call, so tests set it with ``monkeypatch.setenv``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from ..errors import TreeqError

ENV = "TREEQ_CPU_ISA"
# A test aid: "1" builds the AVX512-BF16 kernels with AMX's tile instructions in software
# (amx_emulated.h), so their AMX paths run, slowly, on CPUs without AMX. Read at each kernel
# selection and call, as the cap is.
AMX_EMULATED_ENV = "TREEQ_AMX_EMULATED"
LEVELS = ("avx2", "avx512_bf16", "amx")  # each level allows the ones before it
# /proc/cpuinfo's flags for each level beyond the baseline
FLAGS = {"avx512_bf16": ("avx512bw", "avx512_bf16"), "amx": ("amx_tile", "amx_bf16")}


def cap() -> str:
    """The highest level allowed; the last when ``$TREEQ_CPU_ISA`` is unset."""
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return LEVELS[-1]
    if value not in LEVELS:
        raise TreeqError(f"{ENV}={value!r} is not one of {', '.join(LEVELS)}; unset it to use all the CPU has")
    return value


def allows(level: str) -> bool:
    return LEVELS.index(level) <= LEVELS.index(cap())


def amx_emulated() -> bool:
    return os.environ.get(AMX_EMULATED_ENV) == "1"


def forbidden(level: str) -> str | None:
    """Why ``level`` may not be used although the CPU may have it; None when it may."""
    return None if allows(level) else f"{level} instructions forbidden by {ENV}={cap()}"


def cpu_info() -> tuple[str, set[str], str]:
    """(model name, flags, "family F model M") from /proc/cpuinfo; the family tells CPU generations
    apart where the model name does not ("AMD EPYC"). Unknowns where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown", set(), "family unknown"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    family = f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
    return fields.get("model name", "unknown"), set(fields.get("flags", "").split()), family


@functools.cache
def _flags() -> frozenset[str]:
    return frozenset(cpu_info()[1])


def native_bf16() -> bool:
    """Whether the CPU multiplies bf16 numbers in hardware (AVX512-BF16; every AMX CPU has it too)
    and the cap allows it. Elsewhere oneDNN emulates a bf16 matmul, at a fraction of fp32's speed."""
    return allows("avx512_bf16") and all(f in _flags() for f in FLAGS["avx512_bf16"])


def describe() -> str:
    """The CPU's model and which of the levels it has, for benches' headers."""
    name, flags, family = cpu_info()
    has = [lvl for lvl, need in FLAGS.items() if all(f in flags for f in need)]
    levels = ", ".join(f"{lvl} {'yes' if lvl in has else 'no'}" for lvl in FLAGS)
    capped = f"; capped at {cap()} by {ENV}" if os.environ.get(ENV) else ""
    return f"CPU: {name}, {family} ({levels}){capped}"
