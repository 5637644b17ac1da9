"""Where a quantization run's time goes: wraps named functions with a clock that charges each
call's time to its phase, exclusive of the phases it calls (a layer forward does not count the
statistics its hooks accumulate, nor the pauses while the lockstep quantizes a subset).

Per thread, so a phase's figure is thread-seconds: the driving phases (forwards, statistics,
quantizing a subset) take turns and add up to wall time; the method's own phases run in the
worker threads side by side (``workers``, by default torch's thread count), so they add up to
about that many times the subset wall time.
"""

from __future__ import annotations

import functools
import importlib
import threading
import time
from collections import defaultdict
from contextlib import contextmanager

# (phase, "module:attribute path") of the function charged to it; "waiting" is not work.
DRIVING = [
    ("capture inputs", "treeq.engine.looper:capture_inputs"),
    ("layer forwards", "treeq.engine.looper:_forward"),
    ("statistics", "treeq.methods.base:InputStats.add"),
    ("waiting", "treeq.engine.lockstep:_Batch.pause"),
    ("quantize subsets (wall)", "treeq.engine.looper:_quantize_subset"),
    ("heap trims", "treeq.engine.looper:release_free_heap"),
    ("swap in quantized modules", "treeq.engine.pipeline:swap_in_quantized"),
    ("pack + save checkpoint", "treeq.engine.pipeline:save_quantized"),
]
METHOD = [
    ("gptq: Cholesky + inverse", "treeq.methods.gptq:_prepare"),
    ("grid params + clip search", "treeq.numerics:Grid.params"),
    ("gptq: column loop (rest)", "treeq.methods.gptq:GPTQ.quantize"),
    ("rtn (rest)", "treeq.methods.rtn:RTN.quantize"),
    ("loss", "treeq.methods.gptq:output_error"),
    ("loss", "treeq.methods.rtn:output_error"),
]


class PhaseClock:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._local = threading.local()
        self._lock = threading.Lock()

    @contextmanager
    def phase(self, name: str):
        stack = self._local.__dict__.setdefault("stack", [])
        now = time.perf_counter()
        if stack:
            self._charge(stack[-1][0], now - stack[-1][1])
        stack.append([name, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            self._charge(name, now - stack.pop()[1])
            if stack:
                stack[-1][1] = now

    def _charge(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds

    def wrap(self, name: str, target: str) -> None:
        module_name, path = target.split(":")
        owner = importlib.import_module(module_name)
        *parents, attr = path.split(".")
        for p in parents:
            owner = getattr(owner, p)
        original = getattr(owner, attr)
        clock = self

        if original.__code__.co_flags & 0x20:  # a generator: time the whole iteration

            @functools.wraps(original)
            def timed(*args, **kwargs):
                with clock.phase(name):
                    yield from original(*args, **kwargs)
        else:

            @functools.wraps(original)
            def timed(*args, **kwargs):
                with clock.phase(name):
                    return original(*args, **kwargs)

        setattr(owner, attr, timed)


def install() -> PhaseClock:
    clock = PhaseClock()
    for name, target in DRIVING + METHOD:
        try:
            clock.wrap(name, target)
        except (ImportError, AttributeError):
            pass  # a method this run does not have
    return clock


def table(seconds: dict[str, float], total: float) -> str:
    rows = [f"{'phase':<28} {'s':>7}"]
    driving = [n for n, _ in DRIVING if n != "waiting"]
    for name in dict.fromkeys(driving):
        rows.append(f"{name:<28} {seconds.get(name, 0.0):>7.1f}")
    rows.append(f"{'other (load, calib text...)':<28} {total - sum(seconds.get(n, 0.0) for n in set(driving)):>7.1f}")
    rows.append("method phases, thread-seconds of the workers quantizing side by side:")
    for name in dict.fromkeys(n for n, _ in METHOD):
        if name in seconds:
            rows.append(f"  {name:<26} {seconds[name]:>7.1f}")
    return "\n".join(rows)
