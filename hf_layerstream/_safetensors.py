"""Minimal, defensive safetensors I/O for the hot path.

We parse the (tiny) safetensors header ourselves instead of going through ``safe_open`` because the loader needs
three things the library does not give: every header checked against the file before any tensor is touched (so a
hostile or truncated file fails with a message naming it, not deep inside torch), zero-copy views over a memory
map we control the lifetime of, and reads of the raw data region into a caller-owned (possibly pinned) buffer.
Files are written in the safetensors format byte for byte (`serialize`), so they stay readable by every other tool.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import platform
import struct
import sys
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ShardFileError, unreadable

# safetensors dtype tags -> torch dtypes (only those torch can represent)
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _tag, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        _DTYPES[_tag] = getattr(torch, _name)

# source checkpoints may hold more: every dtype the safetensors library reads (torch dtypes where it maps them)
_SOURCE_DTYPES: dict[str, torch.dtype] = {**_DTYPES, "C64": torch.complex64}
for _tag, _name in (
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),
):
    if hasattr(torch, _name):
        _SOURCE_DTYPES[_tag] = getattr(torch, _name)
# ... and sub-byte ones, by their bits per element (checked for size, not listed in `Header.tensors`)
_SOURCE_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
_SOURCE_FIX = (
    "It is a file of the source checkpoint: re-download it, or save the checkpoint again (`from_pretrained` and "
    "`save_pretrained`)."
)


def source_fix(path: str | os.PathLike) -> str:
    """The fix for a damaged file `path` of a source checkpoint: where it is a file of a hub repo's download in the
    hub cache (a hub repo being split, or its snapshot given by its path), the command that downloads it again
    (`shard_dir.redownload_advice`, as a shard directory's files are told; "re-download it" named none), else
    `_SOURCE_FIX`."""
    from .shard_dir import redownload_advice  # (here: shard_dir imports this module)

    again = redownload_advice(Path(path).parent)  # (its folder: the file may be a link to a blob, or missing)
    return _SOURCE_FIX if again is None else f"{again}, then run the same split again."


_MAX_HEADER = 100_000_000  # the safetensors library's bound (its MAX_HEADER_SIZE): a longer header it refuses


def dtype_to_str(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"` (the spelling used in our manifest and in transformers configs)."""
    return str(dtype).removeprefix("torch.")


def str_to_dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"Unknown dtype {name!r}; expected a torch dtype name such as 'float32' or 'bfloat16'.")
    return value


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # offset inside the data region
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A validated safetensors header."""

    path: Path
    data_offset: int  # absolute offset of the data region in the file
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    identity: tuple[int, int, int, int] | None = None  # (st_dev, st_ino, st_size, st_mtime_ns) when read

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_offset

    def check_unchanged(self, fd: int) -> None:
        """Raise if the open file `fd` is not the file this header was read from (replaced, rewritten, truncated).

        One `fstat`: cheap enough for every read, and it keeps a file swapped or rewritten under a running model
        from being read with a stale header (which would give wrong tensors instead of an error).
        """
        self.check_stat(os.fstat(fd))

    def check_stat(self, st: os.stat_result) -> None:
        """`check_unchanged` from a `stat` of the file (of its path: one system call, no file to open)."""
        if self.identity is None:
            return
        now = _identity(st)
        if now != self.identity:
            replaced = now[:2] != self.identity[:2]
            if now[2] != self.identity[2]:
                how = f"size {self.identity[2]} -> {now[2]} bytes" + (", another file" if replaced else "")
            elif replaced:
                how = "replaced by another file"
            else:
                how = "rewritten in place: modified since"
            if replaced:
                # (a split writes each file anew and renames it into place: most likely the directory was split
                # again, or its path now leads to another split; deleting that file would damage a sound split)
                fix = (
                    "Another file is at this path now: the shard directory was split again (`overwrite=True`), or "
                    "its path leads to another split now (a symlink moved). To stream what is there, call "
                    "`disable_layer_streaming(model)` and `enable_layer_streaming(model, shard_dir)` again "
                    "(`hf-layerstream verify` checks every file against the manifest)."
                )
            else:
                fix = (
                    "Do not modify a shard directory while a model streams from it. Restore the file: delete it and "
                    "re-run the same `split_checkpoint` (`hf-layerstream split`), which writes it again (a re-run "
                    "alone checks sizes, headers and sample digests only: it takes a file changed within for sound; "
                    "`hf-layerstream verify` lists every file that no longer matches), then call "
                    "`disable_layer_streaming(model)` and `enable_layer_streaming(model, shard_dir)` again."
                )
            raise ShardFileError(self.path, f"changed on disk since it was opened ({how})", fix)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _advise(fd: int, offset: int, length: int, advice: str) -> None:
    """`posix_fadvise` where the platform has it (a hint: refusals are ignored)."""
    value = getattr(os, advice, None)
    if value is not None:
        try:
            os.posix_fadvise(fd, offset, length, value)
        except OSError:
            pass


def _drop_header_pages(fd: int, end: int) -> None:
    """Drop the small page-cache pages that reading a header put there.

    Measured here: after a plain buffered read of the header, the first read of the tensor data through a
    huge-page map (`advise_huge`, `populate`) brought the whole file in as small folios, because read-ahead
    continued from the header's small pages; remapping it then cost 2 ms per 86 MB layer at every sweep instead of
    0.2 ms. Reading the header without read-ahead (`POSIX_FADV_RANDOM`) and dropping its pages afterwards leaves
    the data to come in 2 MiB folios. Pages that are part of a larger cached folio are not dropped by the kernel
    (nor is anything of a file that is already warm in 2 MiB folios)."""
    page = mmap.PAGESIZE
    _advise(fd, 0, (end + page - 1) // page * page, "POSIX_FADV_DONTNEED")  # whole pages only are dropped


def read_header(path: str | os.PathLike, *, expected_size: int | None = None, source: bool = False) -> Header:
    """Read and validate the header of a safetensors file.

    Every offset is checked against the real file size, so a truncated file or a header that points outside the
    file raises [`ShardFileError`] naming the file, before any tensor is created.

    `source`: a file of a source checkpoint, checked no more strictly than the safetensors library reads it: its
    tensors need not start at a multiple of their element size (only our own files' must, as they are mapped), every
    dtype the library reads is accepted (those torch has no dtype of the same layout for, such as `F4`, are left out
    of `tensors`), and an error says what to do about a source file.
    """
    if not source:
        return _read_header(Path(path), expected_size, source=False)
    try:
        return _read_header(Path(path), expected_size, source=True)
    except ShardFileError as e:
        # (a fix for what is no damage, a permission or a limit of the process, is kept: no download mends it)
        raise ShardFileError(e.path, e.problem, e.fix or source_fix(e.path)) from e.__cause__


def _read_header(path: Path, expected_size: int | None, *, source: bool) -> Header:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:  # permission, symlink loop, missing...
        raise unreadable(path, e) from e
    try:
        st = os.fstat(fd)
        file_size = st.st_size
        if expected_size is not None and file_size != expected_size:
            raise ShardFileError(
                path, f"has {file_size} bytes but the manifest records {expected_size} (truncated or replaced)"
            )
        # only the header's own pages: no read-ahead into the tensor data (see `_drop_header_pages`)
        _advise(fd, 0, 0, "POSIX_FADV_RANDOM")
        prefix = os.pread(fd, 8, 0)
        if len(prefix) != 8:
            raise ShardFileError(path, "is too short to be a safetensors file (no 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > file_size:
            raise ShardFileError(path, f"declares a {header_len}-byte header but the file has only {file_size} bytes")
        if header_len > _MAX_HEADER:  # (the library then failed with "header too large", naming no file)
            raise ShardFileError(
                path, f"declares a {header_len}-byte header, more than the {_MAX_HEADER} bytes safetensors reads"
            )
        raw = b""
        while len(raw) < header_len:
            chunk = os.pread(fd, header_len - len(raw), 8 + len(raw))
            if not chunk:
                break
            raw += chunk
        _drop_header_pages(fd, 8 + header_len)
    except OSError as e:  # a directory (EISDIR at the read), an I/O error...
        raise unreadable(path, e) from e
    finally:
        os.close(fd)
    if len(raw) != header_len:
        raise ShardFileError(path, f"ended inside its {header_len}-byte header (truncated while reading)")
    try:
        parsed = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardFileError(path, f"has a header that is not valid JSON ({e})") from e
    if not isinstance(parsed, dict):
        raise ShardFileError(path, "has a header that is not a JSON object")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ShardFileError(path, "has a `__metadata__` entry that is not an object")
    odd = next((k for k, v in metadata.items() if not isinstance(v, str)), None)
    if odd is not None:  # (the safetensors library refuses such a file: its metadata maps strings to strings)
        raise ShardFileError(
            path, f"has a `__metadata__` value that is not a string: {odd!r}: {_clipped(metadata[odd])}"
        )
    data_offset = 8 + header_len
    data_size = file_size - data_offset
    dtypes = _SOURCE_DTYPES if source else _DTYPES
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in parsed.items():
        try:
            tag = entry["dtype"]
            dtype = dtypes.get(tag)
            bits = dtype.itemsize * 8 if dtype is not None else _SOURCE_BITS[tag] if source else None
            if bits is None:
                raise KeyError(tag)
            shape = tuple(_integers(entry["shape"]))
            begin, end = _integers(entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            fault = _entry_fault(entry, set(dtypes) | (set(_SOURCE_BITS) if source else set()))
            raise ShardFileError(path, f"has a malformed header entry for tensor {name!r}: {fault}") from e
        if any(s < 0 for s in shape):
            raise ShardFileError(path, f"declares a negative dimension for tensor {name!r}: {shape}")
        numel = 1
        for s in shape:
            numel *= s
        if not (0 <= begin <= end <= data_size) or (end - begin) * 8 != numel * bits:
            raise ShardFileError(
                path,
                f"declares tensor {name!r} at bytes [{begin}, {end}) of a {data_size}-byte data region, which does "
                f"not fit its shape {list(shape)} and dtype {dtype_to_str(dtype) if dtype is not None else tag}",
            )
        if numel and begin % (bits // 8 or 1) and not source:
            raise ShardFileError(path, f"stores tensor {name!r} at a misaligned offset {begin}")
        if dtype is not None:
            tensors[name] = TensorInfo(dtype, shape, begin, end)
        spans.append((begin, end, name))
    # The data region must be covered exactly once, as the safetensors format requires: no holes that could hide
    # data and no overlapping tensors (two names aliasing the same bytes).
    cursor = 0
    for begin, end, name in sorted(spans):
        if begin != cursor:
            what = "overlaps the previous tensor" if begin < cursor else f"leaves a hole at byte {cursor}"
            raise ShardFileError(path, f"declares tensor {name!r} at byte {begin}, which {what}")
        cursor = end
    if cursor != data_size:
        raise ShardFileError(
            path, f"has {data_size - cursor} bytes after its last tensor (the data region must be fully indexed)"
        )
    return Header(path, data_offset, file_size, tensors, {str(k): str(v) for k, v in metadata.items()}, _identity(st))


def _entry_fault(entry, known: set[str]) -> str:
    """What is wrong with a header's tensor entry, its values cut short: in a damaged header the entry can be the
    whole metadata (a byte of `__metadata__` changed makes it a tensor's name), kilobytes of it."""
    if not isinstance(entry, dict):
        return f"a {type(entry).__name__} ({_clipped(entry)}), not an object of `dtype`, `shape` and `data_offsets`"
    lacking = [f"`{k}`" for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if lacking:
        return f"it has no {', '.join(lacking)} (its keys: {_clipped(sorted(map(str, entry)))})"
    if not isinstance(entry["dtype"], str) or entry["dtype"] not in known:
        return f"`dtype` {_clipped(entry['dtype'])} is none of the safetensors dtypes this reads"
    for key, count in (("shape", None), ("data_offsets", 2)):
        value = entry[key]
        if not isinstance(value, list) or any(type(v) is not int for v in value) or count not in (None, len(value)):
            return f"`{key}` {_clipped(value)} is not a list of {count or 'any number of'} integers"
    return _clipped(entry)


def _clipped(value, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters (saying how long it was) where longer."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _integers(values) -> list[int]:
    """A header's list of integers, as the safetensors library reads them: JSON integers only (`64`, not `64.0`,
    `64.9`, `"64"`, `true` or `1e400`, which `int()` would each turn into a number)."""
    if not isinstance(values, list) or any(type(v) is not int for v in values):
        raise TypeError(f"not a list of integers: {values!r}")
    return values


def _consume_readonly_warning() -> None:
    """torch warns once per process that a read-only buffer gives a tensor it cannot write to. Our maps are read
    only on purpose: spend that one warning here, at import, in the importing thread (`warnings.catch_warnings` is
    not thread-safe, and `_views` runs in the loader thread on every read)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.frombuffer(b"\0", dtype=torch.uint8)


_consume_readonly_warning()


def _views(header: Header, buffer, base_offset: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, info in header.tensors.items():
        numel = info.nbytes // max(info.dtype.itemsize, 1)
        if numel == 0:
            out[name] = torch.empty(info.shape, dtype=info.dtype)
            continue
        t = torch.frombuffer(buffer, dtype=info.dtype, count=numel, offset=base_offset + info.begin)
        out[name] = t.view(info.shape)
    return out


_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
# Linux 5.14; Python exposes the constant from 3.13 on
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if hasattr(mmap, "MADV_HUGEPAGE") else None)


def advise_huge(mm: mmap.mmap) -> None:
    """Ask for huge pages on a file mapping (`MADV_HUGEPAGE`): pages the kernel reads in through it come as 2 MiB
    folios, and 2 MiB folios are mapped with one page-table entry instead of 512. Mapping an 86 MB layer then costs
    about 0.2 ms instead of about 2 ms (measured here), and the compute takes fewer TLB misses. A no-op where unsupported."""
    if _MADV_HUGEPAGE is not None:
        try:
            mm.madvise(_MADV_HUGEPAGE)
        except OSError:
            pass


_HUGE_PAGES = None


def huge_pages_enabled() -> bool:
    """Whether `MADV_HUGEPAGE` can do anything here (Linux with transparent huge pages not set to `never`)."""
    global _HUGE_PAGES
    if _HUGE_PAGES is None:
        try:
            with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
                _HUGE_PAGES = _MADV_HUGEPAGE is not None and "[never]" not in f.read()
        except OSError:
            _HUGE_PAGES = False
    return _HUGE_PAGES


def thread_usage() -> tuple[float, int] | None:
    """(CPU seconds, bytes read from storage) of the calling thread so far, or `None` where the platform cannot tell.

    The CPU time is `CLOCK_THREAD_CPUTIME_ID` (`time.thread_time`), exact to the nanosecond. The user and system
    times of `getrusage` are not: here they moved in 4 ms steps (the scheduler tick), so a 0.1 ms call that a tick
    happened to land in looked like a 4 ms one. The bytes are `getrusage(RUSAGE_THREAD).ru_inblock`."""
    try:
        import resource

        u = resource.getrusage(resource.RUSAGE_THREAD)
        cpu = time.thread_time()
    except (ImportError, AttributeError, OSError):
        return None
    return cpu, u.ru_inblock * 512


def map_readonly(path, size: int) -> mmap.mmap:
    """A private read-only mapping of the first `size` bytes of `path`, asked for huge pages (`advise_huge`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    advise_huge(mm)
    return mm


def populate(mm: mmap.mmap, path, address: int | None = None) -> bool:
    """Build the page tables of a whole mapping now (`MADV_POPULATE_READ`), reading what is not in the page cache
    (read-ahead in large folios after `advise_huge`). Returns `False` where the kernel cannot (before Linux 5.14);
    a file that cannot be read (I/O error, truncated) raises `ShardFileError` instead of a later `SIGBUS`. Where
    the memory to read it into cannot be had (`ENOMEM`: the process or its cgroup at its limit), `MemoryError`: the
    file is not at fault, re-creating it would not help.
    `address`: where `mm` starts, if known (`map_address`)."""
    if _MADV_POPULATE_READ is None:
        return False
    try:
        madvise_released(mm, _MADV_POPULATE_READ, address)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOSYS):
            return False
        if e.errno == errno.ENOMEM:
            raise MemoryError(
                f"Out of memory reading {path} ({len(mm) / 2**20:.0f} MiB) into memory (MADV_POPULATE_READ: "
                f"{e.strerror or e}): this process or its cgroup is at its memory limit. Free memory, or lower "
                "`max_memory['cpu']` or `prefetch`."
            ) from e
        raise ShardFileError(path, f"could not be read: {e.strerror or e}") from e
    return True


def map_populated(fd: int, size: int):
    """Before Linux 5.14 (no `MADV_POPULATE_READ`, see `populate`): a private copy-on-write map of the first `size`
    bytes of `fd`, its page tables built now (`MAP_POPULATE`) over the page cache's pages, as a writable buffer that
    unmaps itself once nothing views it (a ctypes array: `torch.frombuffer` keeps it alive). `MAP_POPULATE` on a
    writable private map pre-faults it for writing, which copies every page into anonymous memory: a layer's worth
    at every use, and the layers in flight held twice (streaming every layer of the bench model from a warm page
    cache, with the newer call refused: 0.74-0.76 s per token, against 0.14-0.17 s mapped so). So it is mapped
    read-only, populated, then made writable (`mprotect`): its pages stay the page cache's, and a write (a hook
    changing a weight in place) copies the page it touches, as before. `None` where that cannot be done (no libc
    through ctypes): map with `MAP_POPULATE` as it is."""
    libc = _libc()
    if libc is None or not hasattr(mmap, "MAP_POPULATE"):
        return None
    import ctypes

    address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_POPULATE, fd, 0)
    if address is None or address == ctypes.c_void_p(-1).value:  # (MAP_FAILED)
        raise _errno_error()
    if libc.mprotect(address, size, mmap.PROT_READ | mmap.PROT_WRITE) != 0:
        error = _errno_error()
        libc.munmap(address, size)
        raise error
    buf = (ctypes.c_char * size).from_address(address)
    # (not at exit: a thread still computing with its views then would fault, instead of the process just ending)
    weakref.finalize(buf, libc.munmap, address, size).atexit = False
    return buf


def madvise_released(mm: mmap.mmap, advice: int, address: int | None = None) -> None:
    """`mm.madvise(advice)` without holding the GIL.

    CPython's `mmap.madvise` keeps the GIL through the system call. `MADV_POPULATE_READ` of a layer that is not in
    the page cache then holds it for the whole read from the disk (tens of milliseconds per layer). Measured here,
    that stalled the compute thread's Python code and stretched a cold decoder layer's forward over the read of the
    next one. Through `ctypes` the call runs with the GIL released. Raises `OSError` as `mm.madvise` does."""
    libc = _libc()
    if libc is None or len(mm) == 0:
        mm.madvise(advice)
        return
    if libc.madvise(map_address(mm) if address is None else address, len(mm), advice) != 0:
        raise _errno_error()


def _errno_error() -> OSError:
    """The `OSError` of the last libc call made through `_libc()` (which keeps `errno` for ctypes)."""
    import ctypes

    err = ctypes.get_errno()
    return OSError(err, os.strerror(err))


_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


def release_mapped_pages(tensor: torch.Tensor) -> None:
    """Unmap the whole pages under `tensor`, a view of a private read-only file mapping, from this process
    (`MADV_DONTNEED`): they leave our resident set, stay in the page cache, and would be mapped again from there if
    read. For a packed quantized weight once it has been decoded. Never call it on anonymous memory (it would read
    back as zeros). A no-op where unsupported."""
    page = mmap.PAGESIZE
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    first, last = (begin + page - 1) // page * page, end // page * page  # the pages wholly inside the tensor
    if last > first:
        release_mapped_range(first, last - first)


def can_release_mapped_pages() -> bool:
    """Whether `release_mapped_range` does anything here (Linux `madvise(MADV_DONTNEED)` through libc)."""
    return _MADV_DONTNEED is not None and _libc() is not None


def release_mapped_range(address: int, length: int) -> None:
    """`MADV_DONTNEED` on `[address, address + length)` (page-aligned `address`; the kernel rounds `length` up to
    whole pages), part of a private file mapping (pages written since, copied on write, go too): see
    `release_mapped_pages`. A no-op where unsupported."""
    libc = _libc()
    if libc is None or _MADV_DONTNEED is None or length <= 0:
        return
    libc.madvise(address, length, _MADV_DONTNEED)  # a hint: a refusal changes nothing


def map_address(mm: mmap.mmap) -> int:
    """The address a (non-empty) mapping starts at."""
    probe = torch.frombuffer(mm, dtype=torch.uint8, count=1)  # read-only maps give no ctypes view
    address = probe.data_ptr()
    del probe  # the buffer export would keep `mm` from closing
    return address


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            c = ctypes
            libc.mmap.argtypes = [c.c_void_p, c.c_size_t, c.c_int, c.c_int, c.c_int, c.c_long]
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _LIBC = libc
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


# `cachestat` has this number in the common system call table, which x86-64 and arm64 share for new calls
_SYS_CACHESTAT = 451
_CACHESTAT: bool | tuple = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64", "arm64")


def _cachestat_fraction(libc, fd: int, size: int) -> float | None:
    """`cached_fraction` through `cachestat(2)`; `None` where the kernel (before 6.5) or a sandbox refuses it (then
    it is not asked again)."""
    global _CACHESTAT
    if not _CACHESTAT:
        return None
    import ctypes

    if _CACHESTAT is True:

        class _Range(ctypes.Structure):
            _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]

        class _Stat(ctypes.Structure):  # nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted
            _fields_ = [("nr_cache", ctypes.c_uint64), ("rest", ctypes.c_uint64 * 4)]

        _CACHESTAT = (_Range, _Stat)
    range_type, stat_type = _CACHESTAT
    stat = stat_type()
    if libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(range_type(0, size)), ctypes.byref(stat), 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # no such call here (old kernel, seccomp filter)
            _CACHESTAT = False
        return None
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    return min(stat.nr_cache / pages, 1.0)


def cached_fraction(fd: int, size: int, *, cheap: bool = False) -> float | None:
    """Share of a file's first `size` bytes that is in the page cache, or `None` where it cannot be told (with
    `cheap`: where it cannot be told with `cachestat`).

    Asked with `cachestat` (Linux 6.5), one system call that reads nothing; else with `mincore` on a throw-away
    mapping, which reads nothing either but costs far more (measured here on an 86 MB file in the page cache: about
    1.7 ms, against 0.01 ms for `cachestat`; the CUDA read path asks before every read of a layer). A read probe
    (`RWF_NOWAIT`) is no good for this: on recent kernels it starts read-ahead of what it does not find."""
    if size <= 0:
        return 1.0
    libc = _libc()
    if libc is None:
        return None
    fraction = _cachestat_fraction(libc, fd, size)
    if fraction is not None or cheap:
        return fraction
    import ctypes

    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        return None
    try:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = ctypes.create_string_buffer(pages)
        if libc.mincore(addr, size, vec) != 0:
            return None
        return 1.0 - vec.raw.count(0) / pages  # the kernel writes 1 (resident) or 0 per page
    finally:
        libc.munmap(addr, size)


def mmap_tensors(header: Header) -> dict[str, torch.Tensor]:
    """Zero-copy CPU tensors over a private (copy-on-write) memory map of the file.

    The mapping lives as long as any returned tensor does; pages are read from the page cache on first touch.
    """
    return map_file(header)[1]


def map_file(header: Header) -> tuple[mmap.mmap | None, dict[str, torch.Tensor]]:
    """`mmap_tensors`, with the map (`None` for an empty file): its `size()` is its own file's, whatever the path
    names later (Python keeps a descriptor of the file mapped)."""
    if header.file_size == 0:
        return None, {}
    try:
        with open(header.path, "rb") as f:
            header.check_unchanged(f.fileno())
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as e:
        raise unreadable(header.path, e) from e
    if len(mm) != header.file_size:
        raise ShardFileError(header.path, f"changed size while being opened ({len(mm)} != {header.file_size})")
    advise_huge(mm)
    return mm, _views(header, mm, header.data_offset)


_TAGS = {v: k for k, v in _DTYPES.items()}


# the data region of every file we write, and each tensor in it whose size is a multiple of this, start at a multiple
# of it: a cache line (also a multiple of 8, the alignment the safetensors format recommends)
DATA_ALIGN = 64


def _layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[bytes, list[str], int]:
    """The file's first bytes (header length and padded header), the order of the tensors after it, and the file's
    size (see `serialize`)."""
    order = sorted(tensors, key=lambda n: (bool(tensors[n].nbytes % DATA_ALIGN), -tensors[n].element_size(), n))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata)}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _TAGS:
            raise ValueError(f"Cannot store tensor {name!r} of dtype {t.dtype} in a safetensors file.")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _TAGS[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % DATA_ALIGN)
    head = struct.pack("<Q", len(raw)) + raw
    return head, order, len(head) + offset


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes as they are stored (row-major, little-endian), without a copy where it is a contiguous CPU
    tensor."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytearray:
    """A safetensors file as bytes, byte-for-byte deterministic (readable by `safetensors` and every other tool).

    `safetensors.torch.save` writes `__metadata__` in hash-map order, which changes from one process to the next:
    two splits of the same checkpoint would differ in their first bytes, and a resumed split would not be
    byte-identical to an uninterrupted one. Here the metadata keys are sorted; the header is padded with spaces (as
    the format allows) so that the data region starts at a multiple of `DATA_ALIGN` bytes; tensors whose size is a
    multiple of `DATA_ALIGN` come first (each then starts at such a multiple), the others after them by decreasing
    element size (each aligned to its element size), each group by name. In a memory map of the file, every weight
    matrix of a usual model then starts on a cache line, as it does in memory torch allocates: matrix-vector products
    over weights 8 bytes off a cache line ran 8-10% slower here (bf16, 2048 x 8192).

    [`atomic_write_safetensors`] writes the same bytes to a file without holding them in memory.
    """
    head, order, size = _layout(tensors, metadata)
    out = bytearray(size)
    out[: len(head)] = head
    start = len(head)
    for name in order:
        data = _tensor_bytes(tensors[name])
        out[start : start + len(data)] = data
        start += len(data)
    return out


def sha256_file(path: str | os.PathLike, chunk: int = 16 * 1024 * 1024) -> str:
    """The SHA-256 of a whole file, read in chunks (hex)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


SAMPLE_BYTES = 64 * 1024


def sample_digest(path: str | os.PathLike) -> str:
    """A cheap content fingerprint: SHA-256 of the size, the first and the last 64 KiB of the file (hex).

    Reads at most 128 KiB whatever the file size, so it runs at every load. It catches what a size check cannot: a
    same-size file from another split or another layer, a zeroed or rewritten file start or end. Full integrity
    needs [`sha256_file`] (`ShardDirectory.verify()` / `hf-layerstream verify`).
    """
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(min(size, SAMPLE_BYTES))
        tail_start = max(size - SAMPLE_BYTES, SAMPLE_BYTES)
        f.seek(tail_start)
        tail = f.read(size - tail_start) if size > tail_start else b""
    return _sample_of(size, head, tail)


def _sample_of(size: int, head: bytes, tail: bytes) -> str:
    """[`sample_digest`] of a file of `size` bytes from its first `SAMPLE_BYTES` and its bytes from
    `max(size - SAMPLE_BYTES, SAMPLE_BYTES)` on."""
    h = hashlib.sha256(size.to_bytes(8, "little"))
    h.update(head)
    h.update(tail)
    return h.hexdigest()


# errnos a directory fsync may legitimately return on filesystems that do not support it
_FSYNC_DIR_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR, errno.EACCES}


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable. Real I/O errors (EIO, ENOSPC) are raised; "not supported" is ignored."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _FSYNC_DIR_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


TMP_MARKER = ".tmp-"
_WRITE_CHUNK = 64 * 1024 * 1024


def _write_all(fd: int, data: memoryview) -> None:
    """Write every byte of `data` to `fd` (short writes retried; chunked so a huge unit needs no second copy)."""
    done = 0
    while done < len(data):
        n = os.write(fd, data[done : done + _WRITE_CHUNK])
        if n <= 0:  # pragma: no cover - os.write raises instead
            raise OSError(errno.EIO, f"write returned {n}")
        done += n


def tmp_path_for(path: Path) -> Path:
    """The temporary name `atomic_write_bytes` writes `path` under (hidden, per process)."""
    return path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` so that `path` is either absent/old or complete: temp file, fsync, rename, fsync dir.

    On any error (ENOSPC, EIO, a signal) the temporary file is removed and `path` is left as it was, so no file
    that looks complete but is not can appear under its final name. A process killed with SIGKILL may leave the
    hidden temporary file behind; [`remove_stale_tmp_files`] clears those (the split does, under its lock).
    """
    view = memoryview(data).cast("B")
    _atomic_write(path, lambda fd: _write_all(fd, view))


def atomic_write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, *, consume: bool = False
) -> tuple[int, str, str]:
    """Write `serialize(tensors, metadata)` to `path` as [`atomic_write_bytes`] does, one tensor at a time: the file
    is never held in memory (a 70B model's embeddings and head are 4 GiB; its bytes and a copy were 8 more).

    Args:
        consume (`bool`): Drop each tensor from `tensors` once it is written, so that its memory can be freed while
            the rest are written.

    Returns:
        `tuple[int, str, str]`: The file's size, its SHA-256 ([`sha256_file`]) and its [`sample_digest`].
    """
    head, order, size = _layout(tensors, metadata)
    digest = hashlib.sha256()
    # the sampled bytes (see `sample_digest`), taken as they go by
    tail_start = max(size - SAMPLE_BYTES, SAMPLE_BYTES)
    sampled = {"head": bytearray(), "tail": bytearray(), "at": 0}

    def write(fd: int, data: memoryview) -> None:
        at, end = sampled["at"], sampled["at"] + len(data)
        if at < SAMPLE_BYTES:
            sampled["head"] += data[: SAMPLE_BYTES - at]
        if end > tail_start:
            sampled["tail"] += data[max(tail_start - at, 0) :]
        digest.update(data)
        _write_all(fd, data)
        sampled["at"] = end

    def body(fd: int) -> None:
        write(fd, memoryview(head))
        for name in order:
            data = _tensor_bytes(tensors.pop(name) if consume else tensors[name])
            write(fd, data)
            del data

    _atomic_write(path, body)
    return size, digest.hexdigest(), _sample_of(size, bytes(sampled["head"]), bytes(sampled["tail"]))


def _atomic_write(path: Path, body: Callable[[int], None]) -> None:
    """Write a file through `body(fd)` atomically (see [`atomic_write_bytes`])."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # (the umask decides, as for `save_pretrained`)
        try:
            body(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def remove_stale_tmp_files(directory: Path, subfolders: tuple[str, ...] = ("layers",)) -> list[Path]:
    """Delete temporary files left by an `atomic_write_bytes` that was killed, in `directory` and its `subfolders`;
    only call this under the lock."""
    removed = []
    for sub in (directory, *(directory / name for name in subfolders)):
        if not sub.is_dir():
            continue
        for p in sub.iterdir():
            if p.name.startswith(".") and TMP_MARKER in p.name and p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(p)
    return removed
