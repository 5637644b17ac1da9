"""treeq's malloc settings (engine/memory.py): every thread on one heap from import, so the lockstep
batches' threads reuse each other's freed activations; in memory, activation-sized tensors come from
that heap instead of fresh mappings page-faulted at every op; streaming keeps one mapping per tensor."""

import ctypes.util
import os
import subprocess
import sys

import pytest

# 20 fresh 12 MB tensors written through in a worker thread (as lockstep batches run), after as
# many to warm up: the minor page faults they cost.
REUSE = """
import resource, sys, threading
import treeq, torch
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

# Threads that allocate and exit (as a tokenizer's or an evaluation's do before the looper starts),
# then threads that allocate and stay; glibc's own report then lists each heap ("Arena n:").
HEAPS = """
import ctypes, threading
import treeq, torch
def allocate():
    torch.ones(3 << 20)
    torch.ones(1000)
for _ in range(3):
    t = threading.Thread(target=allocate)
    t.start()
    t.join()
threads = [threading.Thread(target=allocate) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
ctypes.CDLL(None).malloc_stats()
"""

needs_glibc = pytest.mark.skipif(ctypes.util.find_library("c") is None or sys.platform != "linux", reason="glibc")


def _run(probe: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    # 4 KB pages, so a fresh mapping's cost shows in full.
    env = {**{k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}, "THP_MEM_ALLOC_ENABLE": "0", **env}
    return subprocess.run([sys.executable, "-c", probe, *args], env=env, capture_output=True, text=True, check=True)


def _faults(policy: str) -> int:
    return int(_run(REUSE, policy).stdout.split()[-1])


@needs_glibc
def test_in_memory_tensors_reuse_freed_blocks_and_streaming_maps_each_one():
    assert _faults("reuse_freed_memory") < 1000
    assert _faults("map_large_allocations") > 20 * 3000 * 0.9  # every 4 KB page of every tensor


@needs_glibc
def test_every_thread_allocates_from_one_heap_unless_the_user_set_malloc_arena_max():
    assert _run(HEAPS).stderr.count("Arena ") == 1
    assert _run(HEAPS, MALLOC_ARENA_MAX="8").stderr.count("Arena ") > 1
