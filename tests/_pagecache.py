"""Page-cache helpers for tests: drop a file, tell how much of it is cached, leave it in small folios, and time
how much CPU mapping it takes (what tells 2 MiB folios from small ones)."""

from __future__ import annotations

import os
import time

import pytest

from hf_layerstream._safetensors import cached_fraction, map_readonly, populate


def drop_from_page_cache(files) -> None:
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


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
