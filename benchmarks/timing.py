"""The one way the benchmarks time a JAX call: the median of synchronised calls after a warm-up
(compile) call. Imported by scripts in this folder (run as ``python benchmarks/<script>.py``,
so this folder is on ``sys.path``)."""

from __future__ import annotations

import statistics
import time


def median_seconds(fn, *args, repeats: int) -> float:
    """Median wall seconds per call of ``fn(*args)`` after one warm-up call, each call waited
    on (``jax.block_until_ready``) so that asynchronous dispatch is not mistaken for speed."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - started)
    return statistics.median(times)
