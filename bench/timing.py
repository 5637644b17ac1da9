"""Timing for the benches: functions run in turns, so load from other processes hits each alike."""

from __future__ import annotations

import statistics
import time


def median_seconds(fns: list, repeats: int = 40) -> list[float]:
    """Median time of each function over ``repeats`` rounds, after one warm-up call each."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]
