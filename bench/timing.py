"""Timing for the benches: functions run in turns, so load from other processes hits each alike."""

from __future__ import annotations

import statistics
import time

MAX_ROUNDS = 400


def median_seconds(fns: list, repeats: int = 40, budget: float = 0.0) -> list[float]:
    """Median time of each function over ``repeats`` rounds, after one warm-up call each; more rounds
    (up to ``MAX_ROUNDS``) where ``budget`` seconds of rounds allow, timed by the warm-up, so short
    calls get enough samples for their median to settle."""
    start = time.perf_counter()
    for fn in fns:
        fn()
    if budget > 0:
        repeats = max(repeats, min(MAX_ROUNDS, int(budget / max(time.perf_counter() - start, 1e-9))))
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]
