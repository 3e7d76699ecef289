"""Page-cache helpers for tests: drop a file, tell how much of it is cached, leave it in small folios, and time
how much CPU mapping it takes (what tells 2 MiB folios from small ones)."""

from __future__ import annotations

import os
import time

import pytest

from hf_layerstream._safetensors import cached_fraction, map_readonly, populate


def drop_from_page_cache(files, *, tries: int = 5) -> None:
    """Drop files from the page cache, each checked and dropped again, up to `tries` times 1 to 8 ms apart, while
    some of it is left: a page held for a moment by reclaim or compaction stays behind a drop (seen 29 times in 6000).
    Pages something maps stay whatever is done (the tries then end in 15 ms)."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            size = os.fstat(fd).st_size
            for attempt in range(tries):
                if attempt:
                    time.sleep(0.001 * 2 ** (attempt - 1))
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                if not cached_fraction(fd, size):  # (0.0; `None` where it cannot be told: one drop)
                    break
        finally:
            os.close(fd)


def drop_or_skip(files, *, mapped=()) -> None:
    """Drop `files` from the page cache, and skip the test where one of them not in `mapped` (files something maps:
    their pages stay) is still there after it: a file system that keeps files in memory (tmpfs)."""
    files = list(files)
    drop_from_page_cache(files)
    mapped = set(map(str, mapped))
    if any(cached_share(p) for p in files if str(p) not in mapped):
        pytest.skip("this file system keeps dropped files in the page cache")


def cached_share(path) -> float:
    """Share of the file in the page cache (`cached_fraction`: reads nothing); skips the test where that cannot be
    told."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fraction = cached_fraction(fd, os.path.getsize(path))
    finally:
        os.close(fd)
    if fraction is None:
        pytest.skip("the page cache cannot be probed here (no cachestat or mincore)")
    return fraction


def read_in_big_chunks(path) -> None:
    """Drop a file from the page cache and read it back with 16 MiB `pread`s, which leaves it in small folios."""
    drop_from_page_cache([path])
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while chunk := os.pread(fd, 16 * 2**20, offset):
            offset += len(chunk)
    finally:
        os.close(fd)


def map_cpu_per_mib(path) -> float:
    """CPU seconds per MiB to map a cached file (huge-page advice, populated): ~1e-6 in 2 MiB folios."""
    size = os.path.getsize(path)
    mm = map_readonly(path, size)
    try:
        t0 = time.thread_time()
        populate(mm, path)
        return (time.thread_time() - t0) / (size / 2**20)
    finally:
        mm.close()
