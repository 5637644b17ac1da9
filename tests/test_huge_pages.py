"""Importing treeq puts torch's large tensors on transparent huge pages (engine/memory.py), which
saves the looper's layer forwards most of their page faults; the user's own setting wins."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# A 64 MB tensor written through, then the process's anonymous huge-page kilobytes.
PROBE = """
import treeq, torch
x = torch.ones(16 << 20)
kb = [int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages:')][0]
print(kb)
"""


def _huge_kb(env_value: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(
    not THP.exists() or "[never]" in THP.read_text() or "[always]" in THP.read_text(),
    reason="transparent huge pages are off here, or always on without asking",
)
def test_importing_treeq_puts_large_tensors_on_huge_pages_unless_the_user_says_no():
    assert _huge_kb(None) >= 32 << 10  # at least half of the tensor on 2 MB pages
    assert _huge_kb("0") < 4 << 10
