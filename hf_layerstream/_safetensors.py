"""Minimal, defensive safetensors I/O for the hot path.

We parse the (tiny) safetensors header ourselves instead of going through ``safe_open`` because the loader needs
three things the library does not give: every header checked against the file before any tensor is touched (so a
hostile or truncated file fails with a message naming it, not deep inside torch), zero-copy views over a memory
map we control the lifetime of, and reads of the raw data region into a caller-owned (possibly pinned) buffer.
Files are still written with ``safetensors.torch.save`` so they stay readable by every other tool.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ShardFileError

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

_MAX_HEADER = 100 * 1024 * 1024  # same bound as the safetensors library


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

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_offset


def read_header(path: str | os.PathLike, *, expected_size: int | None = None) -> Header:
    """Read and validate the header of a safetensors file.

    Every offset is checked against the real file size, so a truncated file or a header that points outside the
    file raises [`ShardFileError`] naming the file, before any tensor is created.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            if expected_size is not None and file_size != expected_size:
                raise ShardFileError(
                    path, f"has {file_size} bytes but the manifest records {expected_size} (truncated or replaced)"
                )
            prefix = f.read(8)
            if len(prefix) != 8:
                raise ShardFileError(path, "is too short to be a safetensors file (no 8-byte header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER or 8 + header_len > file_size:
                raise ShardFileError(
                    path, f"declares a {header_len}-byte header but the file has only {file_size} bytes"
                )
            raw = f.read(header_len)
    except OSError as e:  # permission, symlink loop, is a directory...
        raise ShardFileError(path, f"cannot be read: {e.strerror or e}") from e
    try:
        parsed = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardFileError(path, f"has a header that is not valid JSON ({e})") from e
    if not isinstance(parsed, dict):
        raise ShardFileError(path, "has a header that is not a JSON object")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ShardFileError(path, "has a `__metadata__` entry that is not an object")
    data_offset = 8 + header_len
    data_size = file_size - data_offset
    tensors: dict[str, TensorInfo] = {}
    for name, entry in parsed.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ShardFileError(path, f"has a malformed header entry for tensor {name!r}: {entry!r}") from e
        if any(s < 0 for s in shape):
            raise ShardFileError(path, f"declares a negative dimension for tensor {name!r}: {shape}")
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not (0 <= begin <= end <= data_size) or end - begin != numel * itemsize:
            raise ShardFileError(
                path,
                f"declares tensor {name!r} at bytes [{begin}, {end}) of a {data_size}-byte data region, which does "
                f"not fit its shape {list(shape)} and dtype {dtype_to_str(dtype)}",
            )
        if numel and begin % itemsize:
            raise ShardFileError(path, f"stores tensor {name!r} at a misaligned offset {begin}")
        tensors[name] = TensorInfo(dtype, shape, begin, end)
    return Header(path, data_offset, file_size, tensors, {str(k): str(v) for k, v in metadata.items()})


def _views(header: Header, buffer, base_offset: int) -> dict[str, torch.Tensor]:
    out = {}
    with warnings.catch_warnings():
        # torch warns about read-only buffers; our mmaps are copy-on-write and the buffers are ours.
        warnings.simplefilter("ignore", UserWarning)
        for name, info in header.tensors.items():
            numel = info.nbytes // max(torch.empty((), dtype=info.dtype).element_size(), 1)
            if numel == 0:
                out[name] = torch.empty(info.shape, dtype=info.dtype)
                continue
            t = torch.frombuffer(buffer, dtype=info.dtype, count=numel, offset=base_offset + info.begin)
            out[name] = t.view(info.shape)
    return out


def mmap_tensors(header: Header) -> dict[str, torch.Tensor]:
    """Zero-copy CPU tensors over a private (copy-on-write) memory map of the file.

    The mapping lives as long as any returned tensor does; pages are read from the page cache on first touch.
    """
    if header.file_size == 0:
        return {}
    with open(header.path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if len(mm) != header.file_size:
        raise ShardFileError(header.path, f"changed size while being opened ({len(mm)} != {header.file_size})")
    return _views(header, mm, header.data_offset)


def read_tensors_into(header: Header, buffer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Read the data region of the file into `buffer` (a uint8 CPU tensor, possibly pinned) and return views.

    The read goes through `readinto`, which releases the GIL, so it overlaps with compute in another thread.
    """
    size = header.data_size
    if buffer is None or buffer.numel() < size:
        buffer = torch.empty(size, dtype=torch.uint8)
    target = memoryview(buffer.numpy()).cast("B")[:size]
    with open(header.path, "rb", buffering=0) as f:
        f.seek(header.data_offset)
        done = 0
        while done < size:
            n = f.readinto(target[done:])
            if not n:
                raise ShardFileError(header.path, f"ended after {done} of {size} data bytes (truncated while reading)")
            done += n
    return _views(header, buffer.numpy(), 0)


def sha256_file(path: str | os.PathLike, chunk: int = 16 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` so that `path` is either absent/old or complete: temp file, fsync, rename, fsync dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
