"""Views of files and reusable anonymous buffers, without copies where the kernel allows.

``mapped`` maps a range of a file for a ``with`` block (the page cache itself, no copy).

Writes (``pwrite``) from buffers backed by transparent huge pages were measured 5-10x slower than from buffers
on small pages on the project's virtual machines (bench/results/materialize.md), so every buffer the writers
fill and write from is mapped with ``MADV_NOHUGEPAGE``; ``scratch`` keeps one per thread and slot, so a
writer's blocks find their pages already there.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Iterator

from nestprune.errors import NestpruneError

MAX_KEPT = 64 << 20  # a thread keeps a scratch buffer up to this size for reuse; larger ones are one-off

_SCRATCH = threading.local()


def small_pages(n: int) -> mmap.mmap:
    """A zeroed anonymous buffer of ``n`` bytes (at least 1) on small pages (``MADV_NOHUGEPAGE``)."""
    m = mmap.mmap(-1, max(1, n))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        m.madvise(mmap.MADV_NOHUGEPAGE)
    return m


def scratch(n: int, slot: int = 0) -> memoryview:
    """A buffer of ``n`` bytes for this thread to fill and use before it asks for the same ``slot`` again: reused
    (grown by doubling), so blocks of similar sizes fault in no fresh pages."""
    bufs: dict[int, mmap.mmap] = getattr(_SCRATCH, "bufs", None) or {}
    _SCRATCH.bufs = bufs
    buf = bufs.get(slot)
    if buf is None or len(buf) < n:
        buf = small_pages(max(n, min(2 * len(buf) if buf is not None else 0, MAX_KEPT)))
        if n <= MAX_KEPT:
            bufs[slot] = buf
    return memoryview(buf)[:n]


@contextlib.contextmanager
def mapped(fd: int, offset: int, length: int, *, ahead: int = 0) -> Iterator[memoryview]:
    """A read-only view of ``length`` bytes of ``fd`` at ``offset``, straight on the page cache (no copy), mapped
    for the ``with`` block only (pages are mapped as they are touched: faster here than ``MAP_POPULATE``), so a reader's mappings never outlive it and the process's resident
    memory stays bounded by what its readers hold at once. ``ahead``: bytes after the view to ask the kernel to
    start reading now (``POSIX_FADV_WILLNEED``), so a cold file is read ahead while this view is used. A file
    shorter than ``offset + length`` is an error (one line)."""
    if ahead > 0 and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset + length, ahead, os.POSIX_FADV_WILLNEED)
    if length == 0:
        yield memoryview(b"")
        return
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        m = mmap.mmap(fd, length + offset - start, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=start)
    except ValueError:  # the file is shorter than the mapping asked for
        raise NestpruneError("a base weight file ended early while being read; was it modified?") from None
    view = memoryview(m)
    try:
        part = view[offset - start: offset - start + length]
        try:
            if len(part) < length:
                raise NestpruneError("a base weight file ended early while being read; was it modified?")
            yield part
        finally:
            part.release()
    finally:
        view.release()
        try:
            m.close()
        except BufferError:  # a view of it outlives the block (held by an exception's traceback): unmapped with it
            pass
