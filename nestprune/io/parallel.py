"""A bounded worker pool for independent jobs: at most ``2 × workers`` jobs exist at once (so memory stays
bounded by what that many jobs hold), the first failure stops the rest and is raised in the caller, and
``workers <= 1`` runs everything in the calling thread, in order.

Used by the variant writer (each job reads, gathers and writes one disjoint part of an output file) and by
the registry (each job moves one byte range over the network). The heavy parts of every job — ``pread``,
``pwrite``, ``copy_file_range``, numpy gathers, sha256, sockets — release the GIL, so threads scale.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")


def default_workers(cap: int = 4) -> int:
    """Threads for local disk work: the cores this process may use, at most ``cap``."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(cap, n))


def run_jobs(jobs: Iterable[Callable[[], T]], workers: int) -> Iterator[T]:
    """Run ``jobs`` on ``workers`` threads; yields each result as its job finishes (in order when
    ``workers <= 1``). On the first exception the jobs not yet started are dropped, the running ones are
    waited for, and the exception is raised here."""
    if workers <= 1:
        for job in jobs:
            yield job()
        return
    window = 2 * workers
    it = iter(jobs)
    pending: set[Future[T]] = set()
    with ThreadPoolExecutor(workers, thread_name_prefix="nestprune-io") as pool:
        try:
            for job in it:
                pending.add(pool.submit(job))
                if len(pending) >= window:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        yield f.result()
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        except BaseException:
            for f in pending:
                f.cancel()
            wait(pending)
            raise
