"""Timing shared by the benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable


def per_call(fn: Callable[[], object], n: int, warmup: int = 200) -> float:
    """Microseconds per call of fn(), after `warmup` calls; the best of three rounds of n calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6
