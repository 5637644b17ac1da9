"""The looper's malloc settings (engine/memory.py): in memory, a batch thread's activation-sized
tensors reuse freed heap blocks instead of page-faulting fresh mappings at every op; streaming keeps
one mapping per tensor, returned at its free."""

import ctypes.util
import os
import subprocess
import sys

import pytest

# 20 fresh 12 MB tensors written through in a worker thread (as lockstep batches run), after as
# many to warm up: the minor page faults they cost.
PROBE = """
import resource, sys, threading, torch
from treeq.engine import memory
assert getattr(memory, sys.argv[1])()
def work():
    for _ in range(20):
        torch.ones(3 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(3 << 20)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=work)
t.start()
t.join()
"""


def _faults(policy: str) -> int:
    # 4 KB pages, so a fresh mapping's cost shows in full.
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0"}
    out = subprocess.run([sys.executable, "-c", PROBE, policy], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(ctypes.util.find_library("c") is None or sys.platform != "linux", reason="glibc settings")
def test_in_memory_tensors_reuse_freed_blocks_and_streaming_maps_each_one():
    assert _faults("reuse_freed_memory") < 1000
    assert _faults("map_large_allocations") > 20 * 3000 * 0.9  # every 4 KB page of every tensor
