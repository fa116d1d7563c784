"""Timing helpers shared by every layer of the benchmark: a log line, one timed action, robust medians."""

import statistics
import sys
import time
from typing import Callable


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


# Short actions are repeated until they have run this long in all, so that one stall of the shared machine
# does not move their median (at most MAX_REPEATS times).
MIN_TOTAL_S = 3.0
MAX_REPEATS = 41


def enough(times: list[float], repeats: int) -> bool:
    return len(times) >= MAX_REPEATS or (len(times) >= repeats and sum(times) >= MIN_TOTAL_S)


def median_time(action: Callable[[], object], repeats: int) -> float:
    """The median of at least `repeats` runs, more for short actions (MIN_TOTAL_S)."""
    times: list[float] = []
    while not enough(times, repeats):
        times.append(timed(action))
    return statistics.median(times)
