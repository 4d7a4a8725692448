"""The worker pool of prepare: `Workers.map(fn, tasks)` in task order, in this process or in
worker processes, and a per-process cache of what a worker opens once (vocabularies, TFDS splits).

Everything per line (reading, normalising, tokenising, serialising, writing) runs in the
workers, one task per shard; results come back in task order, so the output is the same for
any number of workers.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import sys

_CACHE: dict = {}


def worker_cache(key, make):
    """`make()`, once per process and key (a worker keeps its vocabulary and open splits)."""
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def clear_worker_cache() -> None:
    _CACHE.clear()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# Native libraries with thread pools that a forked child inherits broken (array_record's
# writer/reader pool segfaults in a child forked after the parent used it; JAX warns).
_THREADED = ("array_record", "grain", "jax", "tensorflow", "torch")


def _start_method() -> str:
    """fork (fast, and no `if __name__ == "__main__"` guard needed in the calling script)
    unless this process has loaded a library whose threads a fork would break; then spawn,
    which re-imports the main module (the CLI and pytest guard theirs)."""
    loaded = {name.split(".")[0] for name in list(sys.modules)}
    return "spawn" if sys.platform != "linux" or loaded.intersection(_THREADED) else "fork"


class Workers:
    """`map(fn, tasks)` in task order: in this process (n == 1) or in n worker processes, with
    at most 2n tasks in flight so results never pile up."""

    def __init__(self, n: int):
        self.n, self.pool = n, None

    def __enter__(self):
        if self.n > 1:
            self.pool = multiprocessing.get_context(_start_method()).Pool(self.n)
        return self

    def __exit__(self, exc_type, *_):
        if self.pool is not None:
            if exc_type is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()

    def map(self, fn, tasks):
        if self.pool is None:
            yield from map(fn, tasks)
            return
        pending = collections.deque()
        for t in tasks:
            pending.append(self.pool.apply_async(fn, (t,)))
            if len(pending) >= 2 * self.n:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
