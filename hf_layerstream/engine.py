"""The loader: makes decoder layers present on the execution device just in time, under a memory budget.

The hooks only call `acquire(i)` before layer `i` runs and `release(i)` after; everything about *how* a layer
gets there lives here:

* a residency plan: resident parts, N layers kept on the device, M layers kept in host RAM (pinned on CUDA), the
  rest streamed from disk;
* a background thread that reads streamed layers `prefetch` layers ahead of the compute (cyclically: the next
  token's first layers load while the head and sampling run; the first ones from the moment streaming is enabled);
* CPU: every layer is a zero-copy memory map of its file. Kept layers stay mapped. Streamed layers are mapped
  with `MADV_HUGEPAGE` and populated (`MADV_POPULATE_READ`): those the disk must supply in the background, by two
  map threads reading two layers at once; those in the page cache by the loader thread at their first use, then by
  the compute thread as each use begins (a warm layer's whole load: see `_maps_in_place`). What is not in the page
  cache comes in by read-ahead into 2 MiB folios (0.66-1.37 GB/s here, against 0.41-1.22 for `O_DIRECT`), and 2 MiB
  folios are mapped with one page-table entry each (the compute takes no page faults). Each streamed layer's map is
  made once and kept: after use its pages leave the resident set (`MADV_DONTNEED`), and the next use populates the
  same map (for a warm 86 MB layer here about 0.1-0.2 ms to populate, against 0.3-0.4 ms to map it afresh with its
  views, and about 0.1 ms to release). Its pages stay in the page cache while the plan's page-cache share holds
  them, and are dropped (`POSIX_FADV_DONTNEED`) otherwise, so a model larger than RAM does not flush the cache for
  nothing;
* CUDA: pinned staging buffers allocated once, `non_blocking` copies on a side stream, events to order copy and
  compute, no `empty_cache()` in the hot path;
* quantized shards are dequantized on the execution device by the codec, in the loader. On CPU a map thread
  maps and reads a quantized layer's file from the disk while the loader thread decodes the layer before it. Or,
  with `deferred` weights (`dequantize="module"`), those are handed over packed (`PackedWeight`) and the hooks decode
  each as its module runs.
"""

from __future__ import annotations

import bisect
import errno
import fractions
import functools
import logging
import mmap
import numbers
import os
import re
import threading
import time
import traceback
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Collection
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import attrgetter

import torch

from ._safetensors import (
    DATA_ALIGN,
    Header,
    _advise,
    _views,
    advise_huge,
    cached_fraction,
    can_release_mapped_pages,
    huge_pages_enabled,
    map_address,
    map_file,
    map_populated,
    map_readonly,
    mmap_tensors,
    populate,
    release_mapped_pages,
    release_mapped_range,
    thread_usage,
)
from .errors import LayerLoadError, ShardDirError, ShardFileError, unreadable
from .modeling import RESIDENT, layer_unit
from .shard_dir import ShardDirectory, redownload_advice

logger = logging.getLogger(__name__)

# a number (ASCII digits, at most one decimal point, digits on one side of it at least), then a unit: K, M, G or T, an
# `i` only after one of them, and a `B`; nothing else. ASCII only: under IGNORECASE a Unicode pattern's K matches the
# Kelvin sign and its i the dotted capital I, which the unit lookup then did not find (`"4\u212aB"` was 4 bytes), and
# a bare `i` was taken as binary (`"4iB"` was 4 bytes)
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:([KMGT])(i?))?(B?)\s*", re.IGNORECASE | re.ASCII)


def parse_size(value: int | float | str, *, name: str = "max_memory") -> int:
    """`"4GiB"` / `"500MB"` / `4_000_000_000` -> bytes (accelerate's convention: GiB is 2**30, GB is 10**9).

    Strict: a string is a non-negative number in ASCII digits (`"1.5GiB"`), with an optional unit and nothing else;
    its bytes are computed exactly (a number of 400 digits is that many bytes, not a float's overflow). A lowercase
    `b` other than in `KiB`-style units (`"500Mb"`, `"500mb"`) is refused: accelerate reads it as bits.

    Raises:
        `TypeError`: Neither a number nor a string (None, a list, a bool), naming `name`.
        `ValueError`: Anything else (empty, negative, trailing or leading text, non-ASCII digits, a second decimal
            point, NaN, infinity), naming `name`.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):  # (NumPy's integers too, as accelerate)
        if not value >= 0 or value == float("inf"):  # (NaN fails the first test)
            raise ValueError(f"`{name}` sizes must be finite and non-negative, got {value}.")
        if value != int(value):  # (1.5 was 1 byte, as "1.5" was)
            raise ValueError(f"`{name}` got the size {value!r}: a number is bytes, a whole number.")
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if m and m.group(4) == "b" and not m.group(3):
            # accelerate reads "500Mb" as megabits (a lowercase b after a decimal unit: an eighth of "500MB"), which
            # the same budget given to `from_pretrained` then means: refused, not read as bytes 8 times larger
            number, unit = m.group(1), (m.group(2) or "").upper()
            binary = f", or {number + unit + 'iB'!r} for powers of 1024" if unit else ""
            raise ValueError(
                f"`{name}` got the size {value!r}, whose lowercase b accelerate reads as bits (an eighth of the bytes); "
                f"write {number + unit + 'B'!r} for bytes{binary}."
            )
        if m:
            number, unit, binary, _ = m.groups()
            power = "KMGT".index(unit.upper()) + 1 if unit else 0
            base = 1024 if binary or not unit else 1000
            if not unit and fractions.Fraction(number).denominator != 1:  # ("1.5" was 1 byte; accelerate refuses it)
                raise ValueError(
                    f"`{name}` got the size {value!r}: without a unit a size is bytes, a whole number; give a unit, "
                    f"e.g. {number + 'GiB'!r}."
                )
            return int(fractions.Fraction(number) * base**power)
    if not isinstance(value, str):  # (None, a list, a bool: another type than a size's)
        raise TypeError(
            f"`{name}` got the size {value!r}, a {type(value).__name__}; use bytes (a non-negative int) or a string "
            "such as '4GiB', '1.5GB' or '500MB'."
        )
    raise ValueError(
        f"`{name}` got the size {value!r}; use bytes (a non-negative int) or a string such as '4GiB', '1.5GB' or "
        "'500MB' (ASCII digits, then an optional unit: K, M, G or T, with i for powers of 1024, and B)."
    )


def available_host_memory() -> int:
    """The memory this process can still get without swapping: MemAvailable, or less where the memory limit of its
    cgroup (a container's, a Kubernetes pod's, a Slurm job's) leaves less (`cgroup_memory_room`)."""
    return host_memory()["available"]


def host_memory() -> dict[str, int | str | None]:
    """`available` (see `available_host_memory`) and what it is the less of: `mem_available` (`memory_reading`:
    /proc/meminfo where there is one; where it was read in `mem_available_from`) and `cgroup_room` (`None` where no
    cgroup limit applies)."""
    (mem_available, told), room = memory_reading(), cgroup_memory_room()
    available = mem_available if room is None else min(mem_available, room)
    return {"available": available, "mem_available": mem_available, "cgroup_room": room, "mem_available_from": told}


_MEMINFO = "/proc/meminfo"
_ASSUMED_AVAILABLE = 4 * 2**30
_warned_assumed = False


def memory_reading() -> tuple[int, str]:
    """The memory the system can give without swapping, and where it was read: `"MemAvailable"` (/proc/meminfo),
    `"psutil"` (where there is no /proc/meminfo, as on macOS, and psutil is installed), `"free memory"` (sysconf's
    available pages: free memory only, without the page cache the kernel could give back; less than it can give),
    or `"assumed"`: none of them (4 GiB, with a warning once: a plan made from it may be far from the machine's)."""
    global _warned_assumed
    try:
        with open(_MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        pass
    else:
        try:
            return int(psutil.virtual_memory().available), "psutil"
        except Exception:  # noqa: BLE001 - (a platform psutil cannot read)
            pass
    try:
        pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        pages = size = -1
    if pages > 0 and size > 0:
        return pages * size, "free memory"
    if not _warned_assumed:
        _warned_assumed = True
        logger.warning(
            "Could not read the memory available on this system (no /proc/meminfo, psutil or sysconf "
            "SC_AVPHYS_PAGES): default plans assume %.0f GiB. Pass `max_memory={'cpu': ...}` to plan for this "
            "machine.",
            _ASSUMED_AVAILABLE / 2**30,
        )
    return _ASSUMED_AVAILABLE, "assumed"


_NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as the largest page count (9223372036854771712 with 4 KiB pages)


def cgroup_memory_room(proc_cgroup: str = "/proc/self/cgroup", mountinfo: str = "/proc/self/mountinfo") -> int | None:
    """The room left under the tightest memory limit of this process's cgroup and the cgroups above it: the limit less
    the working set (the memory charged, less its inactive file pages, which the kernel reclaims first; Kubernetes
    counts it the same way). `None` where no limit applies or none can be read. /proc/meminfo shows the whole host
    inside a container, so a plan made from it alone could ask for more than the limit allows, and be killed.

    cgroup v2: `memory.max` and `memory.high`, `memory.current`, `inactive_file`, at every level up to the mount's
    root. v1: the memory controller's `hierarchical_memory_limit`, `memory.usage_in_bytes`, `total_inactive_file`."""
    try:
        with open(proc_cgroup) as f:
            entries = [fields for line in f if len(fields := line.rstrip("\n").split(":", 2)) == 3]
        with open(mountinfo) as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    # "0::PATH" is the v2 cgroup; "N:memory:PATH" (or "N:cpu,memory:PATH") the v1 memory controller's
    v2_path = next((path for number, names, path in entries if number == "0" and names == ""), None)
    v1_path = next((path for _, names, path in entries if "memory" in names.split(",")), None)
    rooms = []
    for fields in mounts:
        # mount ID, parent ID, major:minor, root, mount point, options, optional fields..., "-", type, source, options
        if "-" not in fields or len(fields) < 5:
            continue
        root, point = fields[3], fields[4].replace("\\040", " ")
        fs_type, *rest = fields[fields.index("-") + 1 :] or [""]
        super_options = rest[1].split(",") if len(rest) > 1 else []
        room = None
        if fs_type == "cgroup2" and v2_path is not None:
            room = _cgroup2_room(point, _relative(v2_path, root))
        elif fs_type == "cgroup" and "memory" in super_options and v1_path is not None:
            room = _cgroup1_room(os.path.join(point, _relative(v1_path, root)))
        if room is not None:
            rooms.append(room)
    return min(rooms) if rooms else None


def _relative(path: str, root: str) -> str:
    """`path` (from /proc/self/cgroup) below the mount's `root`: "" where the mount shows the process's own cgroup
    (a cgroup namespace, or a container given its subtree) or the path lies outside it."""
    path, root = path.rstrip("/"), root.rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root) :]
    elif root:
        return ""
    return path.lstrip("/")


def _read_number(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # ("max": no limit)


def _stat_field(path: str, name: str) -> int:
    try:
        with open(path) as f:
            return next((int(line.split()[1]) for line in f if line.split()[:1] == [name]), 0)
    except (OSError, ValueError, IndexError):
        return 0


def _cgroup2_room(mount_point: str, relative: str) -> int | None:
    rooms = []
    parts = [p for p in relative.split("/") if p]
    for depth in range(len(parts), -1, -1):  # the process's cgroup, then each one above it up to the mount's root
        level = os.path.join(mount_point, *parts[:depth])
        # memory.high: above it the kernel throttles the cgroup and reclaims hard; memory.max: above it, the OOM killer
        limits = [_read_number(os.path.join(level, name)) for name in ("memory.max", "memory.high")]
        limit = min((n for n in limits if n is not None), default=None)
        current = _read_number(os.path.join(level, "memory.current"))
        if limit is not None and current is not None and limit < _NO_LIMIT:
            working_set = current - _stat_field(os.path.join(level, "memory.stat"), "inactive_file")
            rooms.append(max(limit - max(working_set, 0), 0))
    return min(rooms) if rooms else None


def _cgroup1_room(level: str) -> int | None:
    stat = os.path.join(level, "memory.stat")
    limit = _stat_field(stat, "hierarchical_memory_limit") or _read_number(os.path.join(level, "memory.limit_in_bytes"))
    usage = _read_number(os.path.join(level, "memory.usage_in_bytes"))
    if not limit or usage is None or limit >= _NO_LIMIT:
        return None
    return max(limit - max(usage - _stat_field(stat, "total_inactive_file"), 0), 0)


# --- residency plan ------------------------------------------------------------------------------------------------

DEFAULT_HOST_SHARE = 0.5  # of the available memory: leave the rest to the page cache, the KV cache and other programs
DEFAULT_DEVICE_SHARE = 0.8  # of free device memory, before reserving room for activations and the KV cache
# a GPU plan's default room for activations and the KV cache (`reserve=None`): a tenth of the device budget, at most
# this
DEFAULT_RESERVE_MAX = 2 * 2**30
# of the available memory, for the pages of kept and streamed layers together: streamed layers beyond it are dropped
# from the page cache after use (a sweep over more than fits would evict each layer before its next use anyway)
DEFAULT_PAGE_CACHE_SHARE = 0.8


@dataclass
class ResidencyPlan:
    """Where each decoder layer lives between uses."""

    device: torch.device
    device_layers: list[int]  # kept on the execution device
    host_layers: list[int]  # kept in host RAM (pinned on CUDA); on CPU execution these are the device layers
    streamed: list[int]  # loaded for each use and released after it
    resident_bytes: int
    layer_bytes: list[int]  # at execution dtype (quantized weights dequantized per module: packed)
    stored_bytes: list[int]  # on disk
    budgets: dict[str, int] = field(default_factory=dict)
    prefetch: int = 1
    # streamed layers whose file pages are left in the page cache between uses (the others are dropped after use)
    page_cache_layers: list[int] = field(default_factory=list)
    # resident parts kept in host RAM instead of on a GPU too small for them (`"input_embeddings"`: looked up on the
    # host; `"output_embeddings"`: copied to the device for each forward pass), and their bytes
    host_resident: list[str] = field(default_factory=list)
    host_resident_bytes: int = 0
    # bytes copied to the device for each forward pass for the host-resident parts (the head's, or the tied
    # embeddings' a head computes with): held there while the head runs, with `prefetch` layers read ahead
    host_resident_copied: int = 0
    # CUDA: what the plan leaves free on the device for activations and the KV cache (0 for a budget of 0: no limit)
    reserve: int = 0
    # where quantized weights are dequantized: "layer" (the whole layer by the loader, before its forward pass) or
    # "module" (each weight as its module runs: layers are held packed, and `scratch` bytes hold the weight dequantized)
    dequantize: str = "layer"
    scratch: int = 0

    def tier(self, index: int) -> str:
        if index in self._device_set:
            return "device"
        if index in self._host_set:
            return "host"
        return "disk"

    def __post_init__(self):
        self._device_set = set(self.device_layers)
        self._host_set = set(self.host_layers)
        self._page_cache_set = set(self.page_cache_layers)

    def __repr__(self) -> str:
        # (the default listed every layer's index and bytes: `summary()` says it in words, `to_dict()` in full)
        return (
            f"ResidencyPlan(device={self.device}, device_layers={len(self.device_layers)}, "
            f"host_layers={len(self.host_layers)}, streamed={len(self.streamed)}, prefetch={self.prefetch}, "
            f"dequantize={self.dequantize!r})"
        )

    def keeps_in_page_cache(self, index: int) -> bool:
        return index in self._page_cache_set

    def planned_use(self) -> int:
        """The bytes the plan counts against the budget of the device it computes on (`budgets`: "cpu", or the GPU's
        index): the resident parts there, the layers kept there, and the working set (`prefetch + 1` layers in flight
        where any layer is not kept there, the weight dequantized one module at a time, the reserve on a GPU), as
        `plan_residency` sums them."""
        biggest = max(self.layer_bytes, default=0)
        kept = sum(self.layer_bytes[i] for i in self.device_layers)
        working = self.scratch
        if len(self.device_layers) < len(self.layer_bytes):
            working += (self.prefetch + 1) * biggest
        if self.host_resident_copied:  # (the head's copy, with the next sweep's first layers read ahead)
            working = max(working, self.host_resident_copied + self.prefetch * biggest)
        return self.resident_bytes + kept + working + self.reserve

    def summary(self) -> str:
        parts = [f"resident parts {size_text(self.resident_bytes)} on {self.device}"]
        if self.host_resident:
            how = {
                "input_embeddings": "input embeddings, looked up there",
                "output_embeddings": "output head, copied to the device for each forward pass",
            }
            kept = [how.get(name, name) for name in self.host_resident]
            if "output_embeddings" not in self.host_resident and self.host_resident_copied:
                kept.append("the head tied to them copies them to the device for each forward pass")
            parts.append(f"{size_text(self.host_resident_bytes)} kept in host RAM ({'; '.join(kept)})")
        parts.append(f"{_layers(len(self.device_layers))} kept on {self.device}")
        if self.dequantize == "module":
            parts.append(
                f"quantized weights held packed, dequantized one module at a time (up to {size_text(self.scratch)})"
            )
        # (read ahead are the layers not kept on the device, copied from host RAM or read from the disk: with every
        # layer kept there is nothing to read ahead, and a prefetch shown there only misled)
        ahead = f" (prefetch {self.prefetch})"
        if self.device.type != "cpu":
            copied = ahead if self.host_layers and not self.streamed else ""
            parts.append(f"{_layers(len(self.host_layers))} kept in pinned host RAM{copied}")
        parts.append(f"{len(self.streamed)} streamed from disk{ahead if self.streamed else ''}")
        if self.streamed:
            parts.append(f"{len(self.page_cache_layers)} of those left in the page cache between sweeps")
        budget = ", ".join(f"{k}: {size_text(v)}{self._reserve_text(k, v)}" for k, v in self.budgets.items())
        return "; ".join(parts) + (f" [budget {budget}]" if budget else "")

    def _reserve_text(self, key: str, budget: int) -> str:
        """For the GPU's budget in `summary`: the part of it the plan leaves free for activations and the KV cache
        (nothing for a budget of 0: every layer streamed, no limit to leave room in)."""
        if self.device.type == "cpu" or key == "cpu" or not budget:  # (the other key: the GPU's)
            return ""
        return f" ({size_text(self.reserve)} of it reserved for activations and the KV cache)"

    def to_dict(self) -> dict:
        return {
            "device": str(self.device),
            "device_layers": self.device_layers,
            "host_layers": self.host_layers,
            "streamed": self.streamed,
            "resident_bytes": self.resident_bytes,
            "layer_bytes": self.layer_bytes,
            "stored_bytes": self.stored_bytes,
            "budgets": self.budgets,
            "prefetch": self.prefetch,
            "page_cache_layers": self.page_cache_layers,
            "host_resident": self.host_resident,
            "host_resident_bytes": self.host_resident_bytes,
            "host_resident_copied": self.host_resident_copied,
            "reserve": self.reserve,
            "dequantize": self.dequantize,
            "scratch": self.scratch,
        }


def _spread(candidates: list[int], count: int) -> list[int]:
    """Pick `count` of `candidates` evenly spaced, so resident layers' compute hides streamed layers' reads."""
    if count <= 0:
        return []
    if count >= len(candidates):
        return list(candidates)
    step = len(candidates) / count
    return sorted({candidates[int(i * step)] for i in range(count)})


def _device_key(device: torch.device) -> int | str:
    """`device`'s key in a `max_memory` dict: `"cpu"`, or the CUDA device's index."""
    if device.type == "cpu":
        return "cpu"
    return device.index if device.index is not None else torch.cuda.current_device()


def check_max_memory(max_memory: dict | None) -> None:
    """Every key is one accelerate knows (GPU indices, `"cpu"`, `"disk"`, which streaming ignores: the shards are the
    disk; also GPU indices as digit strings, as a JSON config gives them) and every value a size: a misspelled key
    would otherwise be ignored silently, and the plan built on a default the caller meant to replace. A GPU given
    twice, as an int and as its digits (`{0: "1GiB", "0": "4GiB"}`: a JSON config merged with a Python dict), is refused
    as the command line refuses `--max-memory 0=1GiB,0=4GiB`: the plan took the int's and ignored the other. Another
    type than a dict (or None) is a TypeError."""
    if max_memory is not None and not isinstance(max_memory, dict):
        raise TypeError(
            f"`max_memory` must be a dict such as {{0: '4GiB', 'cpu': '16GiB'}}, got {type(max_memory).__name__}."
        )
    seen: dict[int, object] = {}
    for key, value in (max_memory or {}).items():
        index = isinstance(key, numbers.Integral) and not isinstance(key, bool) and key >= 0  # (NumPy's too)
        # (as `_max_memory_for` looks them up: "00" would be ignored, and the plan built on the default)
        digits = isinstance(key, str) and key.isascii() and key.isdigit() and str(int(key)) == key
        if not (index or digits or key in ("cpu", "disk")):
            if not isinstance(key, (str, numbers.Integral)) or isinstance(key, bool):  # (None, 1.5, True)
                raise TypeError(
                    f"`max_memory` key {key!r} is a {type(key).__name__}: use GPU indices (0, 1, ...), 'cpu' or "
                    "'disk', as accelerate does, e.g. {0: '4GiB', 'cpu': '16GiB'}."
                )
            hint = ""
            if isinstance(key, str) and key.startswith("cuda:") and key[5:].isascii() and key[5:].isdigit():
                hint = f" (for {key}, the key is {int(key[5:])})"
            elif isinstance(key, str) and key.isascii() and key.isdigit():
                hint = f" (the key is {int(key)})"
            elif isinstance(key, str) and key.strip().lower() in ("cpu", "disk"):  # ("CPU", "Disk ": said nothing)
                hint = f" (the key is {key.strip().lower()!r})"
            elif key in ("mps", "xpu", "npu", "mlu", "sdaa", "musa", "hpu"):  # (accelerate's other devices' keys)
                hint = " (streaming runs on the CPU and on CUDA GPUs only)"
            raise ValueError(
                f"`max_memory` key {key!r} is not recognized{hint}: use GPU indices (0, 1, ...), 'cpu' or 'disk', as "
                f"accelerate does, e.g. {{0: '4GiB', 'cpu': '16GiB'}}."
            )
        if key not in ("cpu", "disk"):
            gpu = int(key)
            if gpu in seen:
                raise ValueError(
                    f"`max_memory` gives GPU {gpu} twice, as {seen[gpu]!r} and {key!r}: give its budget once."
                )
            seen[gpu] = key
        parse_size(value)


def default_reserve(budget: int) -> int:
    """A GPU plan's room for activations and the KV cache when `reserve` is not given: a tenth of the device's budget,
    at most 2 GiB."""
    return min(DEFAULT_RESERVE_MAX, budget // 10)


def default_device_budget(device: torch.device) -> int:
    """A GPU's budget where `max_memory` gives none: `DEFAULT_DEVICE_SHARE` of its free memory now."""
    free, _total = torch.cuda.mem_get_info(_device_key(device))
    return int(DEFAULT_DEVICE_SHARE * free)


def check_reserve(reserve) -> int | None:
    """`reserve` (`enable_layer_streaming`'s, `--reserve`) as bytes: an int, or a size string as `max_memory` takes
    its values (`"3GiB"`, parsed by `parse_size`); `None` (the default) stays `None`.

    Raises:
        `TypeError`: A value of another type than a size's (a bool, a list), naming `reserve`, the value and what to
            give.
        `ValueError`: A value that is not a size (negative, a float with a fraction, garbage), naming `reserve`, the
            value and what to give.
    """
    if reserve is None:
        return None
    if isinstance(reserve, bool):  # (an int to Python: True was 1 byte)
        raise TypeError(
            f"`reserve` got {reserve!r}: give the bytes to leave free on the GPU for activations and the KV cache, as "
            "an int or a size such as '3GiB', or None for the default (a tenth of the device budget, at most 2 GiB)."
        )
    return parse_size(reserve, name="reserve")


def check_reserve_fits(plan: ResidencyPlan, max_memory: dict | None) -> None:
    """A GPU plan made with a `reserve` given: refused where that reserve is more than the device's budget (other than
    0, which asks for every layer streamed, not for a limit), which it is part of: nothing would be left for the
    model. Nothing to check on CPU, where it is ignored.

    Raises:
        `ValueError`: Naming `reserve`, the budget and where it came from (`max_memory`, or the default share of
            the free memory), and the fix.
    """
    if plan.device.type != "cpu":
        check_reserve_within(plan.reserve, plan.device, max_memory, plan.budgets.get(str(_device_key(plan.device))))


def check_reserve_within(
    reserve: int, device: torch.device, max_memory: dict | None, budget: int | Callable[[], int] | None = None
):
    """`check_reserve_fits` before a plan is made (`enable_layer_streaming` checks it before a hub repo's layers
    download), against the GPU's `max_memory` (or `budget`, the plan's, or a function giving it: the default share of
    the free memory, `default_device_budget`); where neither is known, nothing to check yet."""
    key = _given_key(max_memory, _device_key(device))
    given = _max_memory_for(max_memory, key)
    budget = given if given is not None else budget() if callable(budget) else budget
    if not budget or reserve <= budget:
        return
    source = (
        f"max_memory[{key!r}]"
        if given is not None
        else f"the default budget, {DEFAULT_DEVICE_SHARE:.0%} of its free memory"
    )
    raise ValueError(
        f"`reserve` = {size_text(reserve)} is more than the budget of {device} ({source}: "
        f"{size_text(budget)}), which it is part of: nothing would be left for the model. Give a smaller `reserve`, "
        f"or a larger max_memory[{key!r}]."
    )


def _given_key(max_memory: dict | None, key):
    """`key` as `max_memory` gives it, for messages naming it: a GPU's index, or its digits (`"0"`, as a JSON config
    gives them); `key` where it is not given."""
    return next((k for k in (key, str(key)) if k in (max_memory or {})), key)


def _max_memory_for(max_memory: dict | None, key) -> int | None:
    if not max_memory:
        return None
    for k in (key, str(key)):
        if k in max_memory:
            return parse_size(max_memory[k])
    return None


def plan_residency(
    shards: ShardDirectory,
    device: torch.device,
    *,
    dtype_size: dict[int, int] | None = None,
    resident_size: int | None = None,
    max_memory: dict | None = None,
    prefetch: int = 1,
    reserve: int | str | None = None,
    keep_in_page_cache: bool | None = None,
    host_candidates: list[tuple[str, int, int]] | None = None,
    dequantize: str = "layer",
    scratch: int = 0,
) -> ResidencyPlan:
    """Turn a memory budget (accelerate's `max_memory` convention) into a static residency plan.

    A sweep over all layers defeats an LRU cache, so the plan is static: which layers stay, decided once. Room for
    `prefetch + 1` layers in flight is set aside only where some layer is streamed: a budget that holds the resident
    parts and every layer (and the reserve, on a GPU) keeps them all.
    `dtype_size` (per layer) and `resident_size`: bytes at the dtypes the model computes in (default: as stored,
    dequantized).

    `host_candidates`: resident parts that may live in host RAM instead of on a GPU, in the order to move them, as
    `(name, bytes, bytes copied to the device for each forward pass)`. They move, one after the other, only while the
    device budget cannot hold the resident parts, `prefetch + 1` layers and the reserve: a 70B model's embeddings and
    head (2 GiB each at a 128k vocabulary) do not fit a 4 GiB GPU together with a layer. (Ignored on CPU: the host
    is the device.)

    `dequantize="module"`: the quantized weights are dequantized one module at a time, as it runs; `dtype_size` then
    gives their layers' sizes with those weights packed, and `scratch` (the largest of them dequantized) is added to
    the working set.

    `reserve` (on a GPU): the bytes of its budget left free for activations and the KV cache (an int, or a size string
    as `max_memory` takes, see `check_reserve`); default `default_reserve(budget)`, a tenth of the budget, at most
    2 GiB (one larger than the budget is the caller's to refuse: `check_reserve_fits`). Ignored on CPU and for a
    budget of 0, every layer streamed with no limit (the plan's is 0).
    """
    check_max_memory(max_memory)
    reserve = check_reserve(reserve)
    n = shards.num_layers
    prefetch = min(prefetch, max(n - 1, 0))  # (the loader reads at most n - 1 layers ahead: more would be counted)
    layer_bytes = [dtype_size[i] if dtype_size else shards.unit(layer_unit(i)).logical_nbytes for i in range(n)]
    stored = [shards.unit(layer_unit(i)).size for i in range(n)]
    resident = shards.unit(RESIDENT).logical_nbytes if resident_size is None else resident_size
    biggest = max(layer_bytes, default=0)
    working = (prefetch + 1) * biggest + scratch
    budgets: dict[str, int] = {}
    host_budget = _max_memory_for(max_memory, "cpu")
    # one reading (of /proc and the cgroup's files) for both the default host budget and the page cache's room
    free_host = available_host_memory() if host_budget is None or keep_in_page_cache is None else 0
    if host_budget is None:
        host_budget = int(DEFAULT_HOST_SHARE * free_host)
    budgets["cpu"] = host_budget
    order = list(range(n))
    host_resident: list[str] = []
    host_resident_bytes = host_copied = 0
    # a budget that holds every layer (and the one weight dequantized at a time) keeps them all: nothing is in flight
    everything = sum(layer_bytes) + scratch
    if device.type == "cpu":
        gpus = [k for k in (max_memory or {}) if k not in ("cpu", "disk")]
        if gpus:  # (they were ignored without a word)
            logger.warning(
                "`max_memory` gives a budget for GPU %s, but the model streams on the CPU, where only max_memory['cpu'] "
                "counts: ignored. Pass device='cuda' to stream on a GPU.",  # (the command line writes it `--device 'cuda'`)
                ", ".join(dict.fromkeys(str(k) for k in gpus)),  # ("0" and 0: the same GPU)
            )
        room = host_budget - resident - working
        device_layers = order if host_budget - resident >= everything else _pick(layer_bytes, order, room)
        host_layers: list[int] = []
    else:
        index = _device_key(device)
        dev_budget = _max_memory_for(max_memory, index)
        if dev_budget is None:
            dev_budget = default_device_budget(device)
        budgets[str(index)] = dev_budget
        if not dev_budget:  # (every layer streamed, no limit: there is no budget to leave room in, as on CPU)
            reserve = 0
        elif reserve is None:
            reserve = default_reserve(dev_budget)  # activations and KV cache
        fits_all = dev_budget - resident - reserve >= everything
        # (a budget of 0 is the usual way to ask for every layer streamed, not for the resident parts off the device)
        for name, size, copied in (host_candidates or ()) if dev_budget and not fits_all else ():
            if dev_budget - resident - working - reserve >= 0:
                break
            host_resident.append(name)
            host_resident_bytes += size
            resident -= size
            host_copied = max(host_copied, copied)
            # while the head runs on its copy, the loader holds the next sweep's first `prefetch` layers
            working = max(working, host_copied + prefetch * biggest)
        room = dev_budget - resident - working - reserve
        device_layers = order if fits_all else _pick(layer_bytes, order, room)
        rest = [i for i in order if i not in set(device_layers)]
        # host copies are kept as stored (packed when quantized), dequantized on the device
        host_layers = _host_tier(stored, rest, host_budget - host_resident_bytes, prefetch)
    kept = set(device_layers) | set(host_layers)
    streamed = [i for i in order if i not in kept]
    # the page cache's share of host RAM, less what the plan itself takes there: on CPU the kept layers (file maps,
    # in the same page cache) and the working set; on CUDA the pinned host-tier layers and staging buffers
    if device.type == "cpu":
        host_use = sum(stored[i] for i in kept) + working
    else:
        host_use = (
            sum(stored[i] for i in host_layers) + _staging_bytes(stored, streamed, prefetch) + host_resident_bytes
        )
    if keep_in_page_cache is None:
        cache_room = int(DEFAULT_PAGE_CACHE_SHARE * free_host) - host_use
        page_cache_layers = _pick(stored, streamed, cache_room)
    else:
        page_cache_layers = list(streamed) if keep_in_page_cache else []
    return ResidencyPlan(
        device,
        device_layers,
        host_layers,
        streamed,
        resident,
        layer_bytes,
        stored,
        budgets,
        prefetch,
        page_cache_layers,
        host_resident,
        host_resident_bytes,
        host_copied,
        reserve if device.type != "cpu" else 0,
        dequantize,
        scratch,
    )


def _staging_bytes(stored: list[int], streamed: list[int], prefetch: int) -> int:
    """CUDA: the pinned staging buffers the layers read from the disk go through, one per such layer in flight (the
    loader's pool makes them as they are needed, each of its largest stored size): at most `prefetch + 1`, and no
    more than are streamed (none where every layer not on the device is kept in host RAM)."""
    return min(prefetch + 1, len(streamed)) * max((stored[i] for i in streamed), default=0)


def _host_tier(stored: list[int], rest: list[int], room: int, prefetch: int) -> list[int]:
    """CUDA: the layers of `rest` (those not kept on the device) to keep in pinned host RAM, within `room` bytes
    together with the staging buffers the others are read from the disk through (`_staging_bytes`): where every one
    of them fits, none is streamed and no buffer is needed; where fewer than `prefetch + 1` are streamed, buffers for
    only those. (The buffers are counted at the largest layer of `rest`: the loader sizes them by the streamed ones.)"""
    biggest = max((stored[i] for i in rest), default=0)
    for buffers in range(min(prefetch + 1, len(rest)) + 1):
        host = _pick(stored, rest, room - buffers * biggest)
        if min(prefetch + 1, len(rest) - len(host)) <= buffers:
            return host
    return []  # (not reached: with the most buffers, any pick qualifies)


def _least_need(plan: ResidencyPlan) -> tuple[int, int, str]:
    """The least the plan needs on the execution device, whatever it keeps there: the resident parts plus the layers in
    flight (or the head's copy, when kept in host RAM, with the layers read ahead while it runs, if more); as
    `(bytes, bytes of the working set, what the working set is)`."""
    if len(plan.device_layers) == len(plan.layer_bytes):  # every layer kept: none in flight
        return plan.resident_bytes + plan.scratch, plan.scratch, "no layer in flight (every layer is kept)"
    biggest = max(plan.layer_bytes, default=0)
    in_flight = min(plan.prefetch, max(len(plan.layer_bytes) - 1, 0)) + 1  # (the loader reads at most n - 1 ahead)
    working = in_flight * biggest + plan.scratch
    what = f"the {_layers(in_flight)} in flight with prefetch={plan.prefetch}"
    if plan.scratch:
        what += " (packed, and one weight dequantized)"
    if plan.host_resident_copied + (in_flight - 1) * biggest > working:  # (the head's copy, while it runs)
        working = plan.host_resident_copied + (in_flight - 1) * biggest
        ahead = f" and the {_layers(in_flight - 1)} read ahead while it runs" if in_flight > 1 else ""
        what = f"the head's copy{ahead}"
    return plan.resident_bytes + working, working, what


def _layers(n: int) -> str:
    return f"{n} layer" if n == 1 else f"{n} layers"


def fit_prefetch(
    plan_for: Callable[[int], ResidencyPlan], prefetch: int, max_memory: dict | None = None
) -> ResidencyPlan:
    """`plan_for(prefetch)`, or, where that plan's budget for the execution device cannot hold the least it needs there
    (the resident parts and the layers in flight, see `budget_shortfall`; on CUDA with its reserve for activations and
    the KV cache), the plan of the largest smaller `prefetch` whose budget can, else of 0. For the default `prefetch`
    only, which is a choice for speed: on a small GPU fitting comes first (a 70B model's 1.7 GB layers on a 4 GiB GPU
    fit one at a time). A budget of 0 asks for nothing on the device and changes nothing.

    On a GPU the caller's `max_memory["cpu"]` (given, and not 0) lowers it the same way where the plan's pinned host
    RAM passes it (`_over_host_budget`: a staging buffer for each layer in flight read from the disk, which the plan
    counts before the layers it keeps there): the buffers fit first, and the layers kept in host RAM take the room
    they leave. Only where even `prefetch` 0 passes it does `host_budget_shortfall` warn.

    On CPU only the caller's `max_memory["cpu"]` lowers it, not the available memory: there the layers in flight are
    file pages, which the kernel reclaims as it needs (a used layer's, the embedding rows no token looked up), and
    lowering the default for a small memory was not measured to gain anything. A 70B-shaped model (1.78 GB layers,
    3.9 GiB of embeddings and head), six forward passes from a cold page cache in an 8 GiB cgroup: 103, 96, 96 and
    92 s at `prefetch` 0 to 3 (an earlier rule lowered it to 0 there); in 5 GiB: 90, 92, 69 and 87 s."""
    plan = plan_for(prefetch)
    if plan.device.type == "cpu":
        budget = _max_memory_for(max_memory, "cpu")
        while budget and plan.prefetch > 0 and plan.streamed and _least_need(plan)[0] > budget:
            plan = plan_for(plan.prefetch - 1)  # (nothing streamed: nothing in flight, nothing to lower)
        return plan
    host = bool(_max_memory_for(max_memory, "cpu"))  # (the default host budget, a share of the free memory, does not)
    while plan.prefetch > 0 and (_over_budget(plan) or host and _over_host_budget(plan)):
        plan = plan_for(plan.prefetch - 1)
    return plan


def _over_budget(plan: ResidencyPlan) -> bool:
    """A GPU plan: whether its device budget (0 or none: nothing asked of it) cannot hold the least the plan needs
    there, with the reserve for activations and the KV cache."""
    budget = plan.budgets.get(str(_device_key(plan.device)))
    return bool(budget) and _least_need(plan)[0] + plan.reserve > budget


def _over_host_budget(plan: ResidencyPlan) -> bool:
    """A GPU plan: whether host RAM's budget (0: nothing asked of it) cannot hold what `plan_residency` counts there:
    the layers and resident parts kept in host RAM and the pinned staging buffers of the streamed layers in flight
    (`_staging_bytes`). (The plan keeps a layer in host RAM only in the room the buffers leave, but keeps none where
    they take more than the budget.)"""
    budget = plan.budgets.get("cpu")
    staging = _staging_bytes(plan.stored_bytes, plan.streamed, plan.prefetch)
    kept = sum(plan.stored_bytes[i] for i in plan.host_layers) + plan.host_resident_bytes
    return bool(budget) and kept + staging > budget


def deepen_prefetch(plan: ResidencyPlan, plan_for: Callable[[int], ResidencyPlan], most: int) -> ResidencyPlan:
    """On CUDA: `plan` (made with a `prefetch` of at most 2, and fitted to the budget by `fit_prefetch`), or the plan of
    the largest `prefetch` up to `most` (the default by layer size, see `stream.CUDA_AHEAD_BYTES`) that keeps as much:
    the same layers on the device and in host RAM, the same resident parts on the device, within the device's budget
    and host RAM's (where that keeps no layer, the staging buffers could outgrow it: `_over_host_budget`).
    A layer kept saves its copy at every sweep, which reading further ahead only spreads out: what reading ahead gets
    is the room left over after the layers kept, or any with a budget of 0 (every layer streamed, as asked)."""
    most = min(most, len(plan.layer_bytes) - 1)  # (the loader reads at most n - 1 layers ahead: more would be shown)
    if plan.device.type == "cpu" or most <= plan.prefetch or len(plan.device_layers) == len(plan.layer_bytes):
        return plan  # (every layer kept on the device: none is copied to it, from host RAM or the disk)
    for prefetch in range(most, plan.prefetch, -1):
        deeper = plan_for(prefetch)
        if (
            deeper.device_layers == plan.device_layers
            and deeper.host_layers == plan.host_layers
            and deeper.host_resident == plan.host_resident
            and not _over_budget(deeper)
            and not _over_host_budget(deeper)
        ):
            return deeper
    return plan


def budget_shortfall(plan: ResidencyPlan, max_memory: dict | None) -> str | None:
    """A warning where the caller's `max_memory` for the execution device cannot hold even the least the plan needs:
    the resident parts plus `prefetch + 1` layers in flight, and on a GPU the plan's `reserve` for activations and the
    KV cache, as `fit_prefetch` counts them (every layer is then streamed, and the peak still reaches that). `None`
    otherwise, and for a budget of 0, the usual way to ask for every layer streamed. On a GPU with no `max_memory` for
    it, the default budget (a share of its free memory) is checked the same way."""
    key = _device_key(plan.device)
    budget = _max_memory_for(max_memory, key)
    name = f"max_memory[{_given_key(max_memory, key)!r}] = {size_text(budget or 0)}"
    if budget is None and plan.device.type != "cpu":
        budget = plan.budgets.get(str(key))
        name = (
            f"The default budget of {plan.device} ({DEFAULT_DEVICE_SHARE:.0%} of its free memory, {size_text(budget)})"
        )
    biggest = max(plan.layer_bytes, default=0)
    need, working, what = _least_need(plan)
    need += plan.reserve  # (0 on CPU)
    if not budget or budget >= need:
        return None
    where = " on the device" if plan.host_resident else ""
    less = f" Each step less of `prefetch` saves {size_text(biggest)}." if plan.prefetch else ""
    what += f" ({size_text(working)})"
    if plan.reserve:  # (a GPU's: counted as `fit_prefetch` counts it)
        what += f", with the `reserve` for activations and the KV cache ({size_text(plan.reserve)})"
        if need - plan.reserve <= budget:  # (the model alone fits: a smaller reserve is the fix)
            less += f" A `reserve` of at most {size_text(budget - need + plan.reserve)} fits it."
    fate = "every layer is streamed"
    if plan.host_layers:  # (a GPU's plan keeping layers in host RAM: copied for each pass, not read from the disk)
        rest = ", the rest streamed from disk" if plan.streamed else ""
        fate = (
            f"no layer is kept on the device ({_layers(len(plan.host_layers))} in host RAM, copied for each pass{rest})"
        )
    return (
        f"{name} cannot hold the resident parts{where} ({size_text(plan.resident_bytes)}) and {what}: {fate}, and "
        f"peak memory will still reach about {size_text(need)}.{less}"
    )


def host_budget_shortfall(plan: ResidencyPlan, max_memory: dict | None) -> str | None:
    """A GPU plan: a warning where the caller's `max_memory["cpu"]` (given, and not 0: nothing asked of it) cannot
    hold the pinned host RAM the plan takes there (`_over_host_budget`): the staging buffers of the layers read from
    the disk, one per layer in flight, and what it keeps in host RAM. The plan keeps no layer there where the buffers
    take the budget; the default `prefetch` is lowered for it (`fit_prefetch`), a `prefetch` given is not, and pinned
    memory is not reclaimed: past the budget with the one given, or even at 0, the budget is exceeded, and said so.
    `None` otherwise, and on CPU, where `budget_shortfall` tells."""
    budget = _max_memory_for(max_memory, "cpu")
    if plan.device.type == "cpu" or not budget or not _over_host_budget(plan):
        return None
    biggest = max((plan.stored_bytes[i] for i in plan.streamed), default=0)
    buffers = min(plan.prefetch + 1, len(plan.streamed))
    staging = _staging_bytes(plan.stored_bytes, plan.streamed, plan.prefetch)
    kept = sum(plan.stored_bytes[i] for i in plan.host_layers) + plan.host_resident_bytes
    what = f"{buffers} staging buffer{'s' if buffers != 1 else ''} for the layers read from the disk with "
    what += f"prefetch={plan.prefetch} ({size_text(staging)})"
    if kept:
        what += f" and what it keeps in host RAM ({size_text(kept)})"
    less = f" Each step less of `prefetch` saves {size_text(biggest)}." if plan.prefetch and buffers > 1 else ""
    return (
        f"max_memory['cpu'] = {size_text(budget)} cannot hold the pinned host RAM the plan takes there: {what}; "
        f"about {size_text(staging + kept)} will be pinned.{less}"
    )


def budget_warnings(plan: ResidencyPlan, max_memory: dict | None) -> list[str]:
    """What `plan` cannot hold of the caller's `max_memory`, as enable logs it and `inspect` shows it: the execution
    device's budget (`budget_shortfall`), then, on a GPU, host RAM's (`host_budget_shortfall`)."""
    return [w for w in (budget_shortfall(plan, max_memory), host_budget_shortfall(plan, max_memory)) if w is not None]


_LARGE_UNITS = ("TiB", "PiB", "EiB", "ZiB", "YiB")


def size_text(nbytes: int) -> str:
    """`nbytes` for a message: in GiB from a tenth of one, else in MiB, KiB or bytes (a small model's sizes read 0.00
    GiB otherwise); from 1 TiB up in TiB to YiB, and past 1024 YiB (a budget of many digits, which `parse_size`
    takes, as a way to say "no limit") in bytes as a power of ten: such a budget was written as a number of GiB of
    up to hundreds of digits."""
    if nbytes >= 2**40:
        nbytes = int(nbytes)
        power = min((nbytes.bit_length() - 1) // 10, 3 + len(_LARGE_UNITS))
        if nbytes < 2**10 * 2 ** (10 * power):  # (TiB to YiB, in exact integers: the size may be past a float's range)
            return f"{nbytes / 2 ** (10 * power):.2f} {_LARGE_UNITS[power - 4]}"
        digits = str(nbytes)  # (its first digits, not rounded: 10**400 is past a float's range)
        return f"{digits[0]}.{digits[1:3]}e+{len(digits) - 1} B"
    if nbytes >= 2**30 // 10:
        return f"{nbytes / 2**30:.2f} GiB"
    if nbytes >= 2**20:
        return f"{nbytes / 2**20:.1f} MiB"
    return f"{nbytes / 2**10:.1f} KiB" if nbytes >= 2**10 else f"{int(nbytes)} B"


def _fit(sizes: list[int], order: list[int], room: int) -> int:
    count, used = 0, 0
    for i in order:
        if used + sizes[i] > room:
            break
        used += sizes[i]
        count += 1
    return count


def _pick(sizes: list[int], candidates: list[int], room: int) -> list[int]:
    """The layers of `candidates` to keep in `room` bytes: never more than fit, spread over the stack.

    With layers of one size, the most that fit, evenly spaced (`_spread`). Where sizes differ (DeepSeek-V3's dense
    layers before its MoE ones, Jamba's Mamba and attention layers), the largest evenly spaced pick that fits, then
    the largest of the other layers that still fit in what is left."""
    most = _fit(sizes, sorted(candidates, key=lambda i: sizes[i]), room)  # (no pick of more layers fits)
    chosen: list[int] = []
    for count in range(most, 0, -1):
        chosen = _spread(candidates, count)
        if sum(sizes[i] for i in chosen) <= room:
            break
    else:
        chosen = []
    left = room - sum(sizes[i] for i in chosen)
    taken = set(chosen)
    for i in sorted((i for i in candidates if i not in taken), key=lambda i: -sizes[i]):
        if sizes[i] <= left:
            chosen.append(i)
            left -= sizes[i]
    return sorted(chosen)


# --- profiling -------------------------------------------------------------------------------------------------------


@dataclass
class LayerTimes:
    wait: float = 0.0
    read: float = 0.0
    dequantize: float = 0.0
    copy: float = 0.0
    compute: float = 0.0
    calls: int = 0
    bytes_read: int = 0


class Profile:
    """Per-layer timings: waiting for the loader, read, dequantize, host-to-device copy, compute (seconds). A layer's
    read is its own: on CPU two layers may be read from the disk at once, so the total can exceed the wall time.

    A `generate` call has a profile of its own besides (`follow`): what the passes of the thread that made it record
    (every time is recorded in the thread running the pass: the loader's, of a layer read ahead, at its use) goes to
    that call's too, so that calls made at once from several threads each get theirs."""

    def __init__(self):
        self._lock = threading.Lock()
        self.layers: dict[int, LayerTimes] = defaultdict(LayerTimes)
        # resident parts kept in host RAM ("input_embeddings", "output_embeddings"): the head's copy to the device,
        # and the pass (for the embeddings: the ids to the host, the lookup, the embeddings back)
        self.host_resident: dict[str, LayerTimes] = defaultdict(LayerTimes)
        self.forward_calls = 0
        self.started = time.perf_counter()
        # when the `generate` call it profiles ended (`stop`): the wall time is the call's, not the time since, as a
        # summary printed after the call read; `None` while passes run (a pass after the call clears it: see `begin`)
        self.ended: float | None = None
        # the profiles of the `generate` calls under way, by the thread that made each (see `follow`)
        self._calls: dict[int, Profile] = {}

    def follow(self) -> Profile:
        """A `generate` call begins in this thread: a new profile that the passes of this thread record into too,
        until `unfollow`. A call made while none is under way restarts this profile (`reset`): both start now."""
        call = Profile()
        with self._lock:
            if not self._calls:
                self._clear()
                call.started = self.started
            self._calls[threading.get_ident()] = call
        return call

    def unfollow(self) -> None:
        """The call of this thread ended: its profile stops, and this one with it where it was the last under way
        (both at the same moment)."""
        now = time.perf_counter()
        with self._lock:
            call = self._calls.pop(threading.get_ident(), None)
            if not self._calls:
                self.ended = now
        if call is not None:
            call.stop(now)

    def __repr__(self) -> str:
        # (`summary()` prints the times; `to_dict()` holds them per layer)
        with self._lock:
            calls, layers = self.forward_calls, len(self.layers)
        return f"Profile(forward_calls={calls}, layers={layers})"

    def begin(self) -> None:
        """A pass begins: counted, and the wall time runs on again (to now) if a `generate` call had stopped it."""
        with self._lock:
            self.forward_calls += 1
            self.ended = None
            call = self._calls.get(threading.get_ident())
        if call is not None:
            call.begin()

    def stop(self, now: float | None = None) -> None:
        """The `generate` call profiled ended: the wall time stays what it is now (or at `now`, a `perf_counter`)."""
        with self._lock:
            self.ended = time.perf_counter() if now is None else now

    def add(self, index: int, **values: float) -> None:
        with self._lock:
            t = self.layers[index]
            for k, v in values.items():
                setattr(t, k, getattr(t, k) + v)
            call = self._calls.get(threading.get_ident())
        if call is not None:
            call.add(index, **values)

    def add_host_resident(self, part: str, **values: float) -> None:
        with self._lock:
            t = self.host_resident[part]
            for k, v in values.items():
                setattr(t, k, getattr(t, k) + v)
            call = self._calls.get(threading.get_ident())
        if call is not None:
            call.add_host_resident(part, **values)

    def reset(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        """`reset`, the lock held."""
        self.layers.clear()
        self.host_resident.clear()
        self.forward_calls = 0
        self.started = time.perf_counter()
        self.ended = None

    def totals(self) -> dict[str, float]:
        out = {k: 0.0 for k in ("wait", "read", "dequantize", "copy", "compute")}
        out["bytes_read"] = 0
        with self._lock:
            for t in self.layers.values():
                for k in ("wait", "read", "dequantize", "copy", "compute"):
                    out[k] += getattr(t, k)
                out["bytes_read"] += t.bytes_read
        out["wall"] = (time.perf_counter() if self.ended is None else self.ended) - self.started
        out["forward_calls"] = self.forward_calls
        return out

    def to_dict(self) -> dict:
        with self._lock:
            layers = {i: vars(t).copy() for i, t in sorted(self.layers.items())}
            host = {
                part: {"copy": t.copy, "compute": t.compute, "calls": t.calls} for part, t in self.host_resident.items()
            }
        return {"totals": self.totals(), "layers": layers, "host_resident": host}

    def summary(self) -> str:
        t = self.totals()
        lines = [
            f"forward calls: {t['forward_calls']}, wall {t['wall']:.3f} s",
            f"  compute   {t['compute']:.3f} s",
            f"  wait      {t['wait']:.3f} s (compute blocked on the loader, or mapping a warm layer itself)",
            f"  read      {t['read']:.3f} s ({t['bytes_read'] / 2**20:.1f} MiB, mostly background; reads at once add "
            "up)",
            f"  dequant   {t['dequantize']:.3f} s",
            f"  copy H2D  {t['copy']:.3f} s",
        ]
        with self._lock:
            host = dict(self.host_resident)
        names = {"input_embeddings": "embeddings", "output_embeddings": "head"}
        for part, h in host.items():
            copied = f", copy H2D {h.copy:.3f} s" if part == "output_embeddings" else ""
            lines.append(f"  {names.get(part, part):9} {h.compute:.3f} s in host RAM ({h.calls} passes{copied})")
        return "\n".join(lines)


def _leaves(tensors: dict) -> list[torch.Tensor]:
    """A layer's tensors as the loader hands them over, with each packed weight's parts in its place."""
    out = []
    for value in tensors.values():
        parts = getattr(value, "parts", None)
        out.extend(parts.values() if isinstance(parts, dict) else (value,))
    return out


def _noop() -> None:
    return None


def _open_error(path: str | os.PathLike, error: OSError) -> ShardFileError:
    """A layer file that cannot be opened or `stat`ed at its use: one deleted (or its folder moved or deleted) while
    a model streams from it is named so, with the fix (a bare `FileNotFoundError` was raised, naming no way out);
    any other error as `unreadable` names it."""
    if error.errno != errno.ENOENT:
        return unreadable(path, error)
    # (a hub repo's download in the hub cache: downloaded again. By its folder: the file may be a link to a blob
    # deleted)
    again = redownload_advice(os.path.dirname(path)) or (
        "Run the same `split_checkpoint` (`hf-layerstream split`) again, which writes the files missing"
    )
    return ShardFileError(
        path,
        "is gone: deleted, or its folder moved or deleted, since streaming was enabled",
        f"Do not modify a shard directory while a model streams from it. {again}, then call "
        "`disable_layer_streaming(model)` and `enable_layer_streaming(model, shard_dir)` again (with the folder's new "
        "path, if it was moved).",
    )


def _stat(header: Header) -> os.stat_result:
    """`os.stat` of a layer file at its use (see `_open_error`)."""
    try:
        return os.stat(header.path)
    except OSError as e:
        raise _open_error(header.path, e) from e


def _open(header: Header, flags: int = os.O_RDONLY) -> int:
    """`os.open` of a layer file at its use (see `_open_error`)."""
    try:
        return os.open(header.path, flags)
    except OSError as e:
        raise _open_error(header.path, e) from e


def _check_file(header: Header, st: os.stat_result) -> None:
    """At every use of a layer file: one replaced or rewritten under a running model fails loudly, and one shorter
    than its header says fails before it is mapped (a read past the end of a map is a `SIGBUS`, not an error)."""
    check = getattr(header, "check_stat", None)
    if check is not None:
        check(st)
    if st.st_size < header.file_size:
        raise ShardFileError(header.path, f"is shorter than its {header.file_size} bytes (truncated)")


class _Executor(ThreadPoolExecutor):
    """The loader's threads, each started at its first task: one that cannot start (`RuntimeError: can't start new
    thread`, bare) is named by the limits that stop it."""

    def __init__(self, *args, **kwargs) -> None:
        self._closing = False  # (shut down by us: see `_handed`)
        super().__init__(*args, **kwargs)

    def _adjust_thread_count(self) -> None:
        # every thread started: nothing to do. The base class first asks its idle semaphore, a `threading.Semaphore`
        # whose `Condition` is entered in Python code: a Ctrl-C landing as that took its lock left the lock taken, and
        # the next task handed over hung both threads (the compute thread here, the loader thread releasing the
        # semaphore after its task; signal handlers run in the main thread only, so that release cannot leave it so)
        threads, most = getattr(self, "_threads", None), getattr(self, "_max_workers", None)
        if threads is not None and most is not None and len(threads) >= most:
            return
        super()._adjust_thread_count()

    def load(self, fn: Callable, *args) -> _Load:
        """`fn(*args)` in this executor's thread, as a `_Load` (not a `Future`: see there). One that a shutdown with
        `cancel_futures` drops never finishes: `LayerLoader.close` cancels the loads it holds before that. Once the
        interpreter's exit has stopped the threads (see `submit`), the first thread that waits for it runs it (not
        here: the loader hands loads over holding its lock, which the load takes)."""
        load = _Load(fn, *args)
        if self._handed(_run_load, [load]) is None:
            load._by_waiter = True
        return load

    def submit(self, fn: Callable, *args, **kwargs) -> Future | _Load:
        """As `ThreadPoolExecutor.submit`; once the interpreter's exit has stopped the threads, a `_Load` its first
        waiter runs (work nobody waits for, a page-cache warm-up or eviction, is left undone then)."""
        if kwargs:
            fn = functools.partial(fn, **kwargs)
        future = self._handed(fn, *args)
        if future is None:
            future = _Load(fn, *args)
            future._by_waiter = True
        return future

    def shutdown(self, *args, **kwargs) -> None:
        self._closing = True  # (ours: work handed over after it is refused, as before)
        super().shutdown(*args, **kwargs)

    def _handed(self, fn: Callable, *args) -> Future | None:
        """`fn(*args)` handed to this executor's thread; `None` where the interpreter's exit stopped its threads. At
        exit Python stops every `concurrent.futures` thread pool (its threads leave, and it refuses work from then
        on: "cannot schedule new futures after [interpreter] shutdown"), and only then waits for the threads that are
        not daemons: a `generate` running in one (a worker that outlives the main thread) failed at its next layer,
        where the loaded model finished the call. Its threads gone, the waiting thread does their work."""
        try:
            return super().submit(fn, *args)
        except RuntimeError as e:
            if type(e) is RuntimeError and str(e).startswith("cannot schedule new futures after"):
                if not self._closing:
                    return None
                raise
            if "can't start new thread" not in str(e):
                raise
            raise RuntimeError(
                f"Layer streaming cannot start a loader thread ({e}): this process is at a limit of its address space "
                "(`ulimit -v`: on CPU every layer file stays mapped while streaming is enabled, and each thread takes "
                "its stack, 8 MiB by default, and up to 64 MiB of malloc arena), of threads (`ulimit -u`, a cgroup's "
                "`pids.max`) or of memory. Raise the limit at fault."
            ) from e


def _run_load(box: list) -> None:
    """In the executor's thread: the `_Load` in `box`, taken out of it first: the pool's work item (which the frames
    of a failed load's traceback keep) holds the empty box, not the load, whose error holds that traceback: a cycle
    that kept a failed load's layer (its tensors, its read buffer) until the garbage collector ran."""
    box.pop().run()


class _Load:
    """A layer's load handed to the loader thread (`_Executor.load`), and its outcome: what the compute thread uses of
    a `concurrent.futures.Future` (`result`, `done`, `cancelled`, `exception`, `cancel`), finished and waited for with
    a bare lock, whose methods are C code. A `Future` is entered by its `threading.Condition`, whose `__enter__` is
    Python code: a Ctrl-C landing just after it took its lock (the compute thread waits for a load at every layer)
    left the lock taken, and the loader thread hung setting that load's result, with every load queued after it: the
    next pass waiting for one of those, or `disable_layer_streaming` for the thread, hung for good. Here the waiter
    only takes the lock (interrupted while it waits, it has not taken it) and gives it back; a Ctrl-C between the two
    leaves it taken, but the outcome, set before the loader thread gave the lock, is read without it from then on."""

    __slots__ = ("_call", "_claim", "_signal", "_finished", "_value", "_error", "_by_waiter", "__weakref__")

    def __init__(self, fn: Callable, *args) -> None:
        self._call = (fn, args)
        self._claim = [True]  # popped once (an atomic step): by the thread that runs the load, or by `cancel`
        self._signal = threading.Lock()
        self._signal.acquire()  # given when the outcome is set
        self._finished = False
        self._value = self._error = None
        self._by_waiter = False  # run by the first thread that waits for it (see `_Executor.load`)

    def run(self) -> None:
        """In the loader thread (or, after the interpreter's exit stopped it, in the first that waits for it)."""
        try:
            self._claim.pop()
        except IndexError:  # cancelled
            return
        fn, args = self._call
        self._call = None
        try:
            self._value = fn(*args)
        except BaseException as e:  # noqa: BLE001 - raised in the thread that asks for the result
            self._error = e
        # (the error's traceback keeps this frame: none of its locals may lead back to the error, see `_run_load`)
        fn = args = None
        self._finished = True
        signal, self = self._signal, None  # noqa: PLW0642
        signal.release()

    def cancel(self) -> bool:
        """As `Future.cancel`: `True` where the load had not begun (it will not run), `False` otherwise."""
        try:
            self._claim.pop()
        except IndexError:
            return self.cancelled()
        self._call = None
        self._error = CancelledError()
        self._finished = True
        self._signal.release()
        return True

    def done(self) -> bool:
        return self._finished

    def cancelled(self) -> bool:
        return self._finished and isinstance(self._error, CancelledError)

    def exception(self) -> BaseException | None:
        """The load's error, waiting for it to finish; raises `CancelledError` for a cancelled load, as a `Future`."""
        self._wait()
        if isinstance(self._error, CancelledError):
            raise self._error
        return self._error

    def result(self):
        self._wait()
        if self._error is not None:
            try:
                raise self._error
            finally:  # (no reference cycle through this frame: the error's traceback holds it)
                self = None  # noqa: PLW0642
        return self._value

    def _wait(self) -> None:
        if not self._finished:
            if self._by_waiter:
                self.run()  # (claimed by another waiter, or cancelled: returns at once, and that one gives the lock)
            self._signal.acquire()
            self._signal.release()


# --- the loader ----------------------------------------------------------------------------------------------------


@dataclass
class _Ready:
    tensors: dict[str, torch.Tensor]
    event: object = None  # CUDA event the compute stream must wait for
    buffer: object = None  # (pool, buffer) to give back on release
    mapped: bool = False  # views of a file map: its pages leave the resident set on release
    evict: object = None  # path of a file whose pages leave the page cache after use
    repair: bool = False  # the eviction is to bring the file back in 2 MiB folios: make sure it is whole
    # profiling: the loader's times for this layer (read, dequantize, copy), added to the profile when the layer is
    # used, so a `generate` call's profile has the reads of the layers it used, read ahead before it began or not
    times: dict | None = None
    # CPU, a streamed layer: the header of the file it was read from (checked again at a use long after: see
    # `LayerLoader._still_sound`)
    header: object = None
    # its tensors were let go (`LayerLoader._let_go`): not to be handed back as read ahead (a Ctrl-C in `acquire`)
    let_go: bool = False


@dataclass
class _LayerMap:
    """CPU: a streamed layer's file, mapped once and kept for the loader's life (see `LayerLoader._map_file`)."""

    mm: mmap.mmap
    address: int
    views: dict[str, torch.Tensor]  # the stored tensors, zero-copy views of `mm`
    header: Header  # the header the map was made with (the file as it was then)
    finished: dict[str, torch.Tensor] | None = None  # the layer's tensors, where they are `views` as they are

    # the views' in-place writes (autograd's `_version`s, summed) as its pages were last released: those made since
    # (a weight a hook kept, written after its pass) are in the map's own pages, not the file's (see `written_since`)
    written: int = 0

    def release_pages(self) -> None:
        """Its pages out of the resident set: they stay in the page cache, and the next use maps them again. Pages
        written in place (copied on write: a hook's write during the pass) go too, so each pass computes with the
        file's weights. Never where the pass's weights may still be in use: an autograd graph holding them for its
        backward would compute with the file's values instead of the written ones (`LayerLoader.release`'s
        `graph`)."""
        release_mapped_range(self.address, len(self.mm))
        self.written = sum(map(_version, self.views.values()))

    def written_since(self) -> bool:
        """Whether a view was written in place since the pages were last released (a weight a hook kept, written
        after its pass): the write is in the map's pages, and the next use would compute with it. (A write through
        `.data` is not counted.)"""
        return sum(map(_version, self.views.values())) != self.written


_version = attrgetter("_version")


def _evict(path, *, whole: bool = False) -> None:
    """Drop a file's pages from the page cache (pages still mapped somewhere stay). `whole`: check (`cached_fraction`)
    and try once more if some pages were busy (held for a moment by reclaim or compaction): a page left behind
    would keep its 2 MiB neighbourhood in small folios when the file is read again."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        _advise(fd, 0, 0, "POSIX_FADV_DONTNEED")
        if whole and cached_fraction(fd, os.fstat(fd).st_size):
            time.sleep(0.001)
            _advise(fd, 0, 0, "POSIX_FADV_DONTNEED")
    except OSError:  # fstat
        pass
    finally:
        os.close(fd)


# Mapping pages that are already in the page cache costs about 1-4 us of CPU per MiB when the page cache holds them in
# 2 MiB folios, and 13-50 us per MiB in the small folios that `read()`, `cp` or a partial eviction leave behind (the
# loader thread takes that CPU from the compute at every sweep). Above this, a streamed layer's file is dropped from
# the page cache after use, so that the next read brings it back in 2 MiB folios: at most `_MAX_REPAIRS` times per
# layer (file systems without large folios never improve), and only for layers of at least `_REPAIR_MIN_BYTES`.
_SMALL_PAGES_CPU_PER_MIB = 8e-6
_MAX_REPAIRS = 2
_REPAIR_MIN_BYTES = 8 * 2**20

_ALIGN = 4096  # O_DIRECT wants the buffer, the file offset and the length aligned to the logical block size
_READ_CHUNK = 64 * 2**20
# a layer file read (`_read_file`: CUDA, and host-tier layers) from the disk is read as this many parts at once, one
# in the loader thread and the others in helper threads: one sequential reader keeps too few requests in flight.
# Measured here, 4 alternating rounds of reading the bench model's 16 layer files, dropped from the page cache before
# each: O_DIRECT 1.36 GB/s (median) in one part, 1.46 in 4; buffered 1.07 and 1.79. Files in the page cache are read
# in parts on CUDA only (on the CPU the cores are computing). CPU maps are populated in one part: in parts, a cold
# `generate` of the bench model took 0.64 and 0.72 s/token against 0.59 and 0.65 (two runs, 21 and 28 steps each,
# alternating), and 1.04x the one-part time in an 8-round rerun with 2 parts, although the same reads alone ran
# faster in parts (why is not pinned down: populating a cold 86 MB layer takes only ~1.5 ms of the thread's CPU).
READ_STREAMS = 4
# CPU: full-precision layers that the disk must supply are mapped (read) by this many map threads, taking turns, so
# this many layers are read at once. Measured here on the bench model, every layer streamed from a cold page cache,
# alternating `generate` calls in one process (8 tokens each; medians of per-round ratios): 0.85x the step time of
# one layer at a time (10 rounds), 0.90x and 0.94x in two earlier runs (10 and 6 rounds); 3 threads with prefetch 3
# did no better (0.94x). Reading the layer files alone, two at once was faster in most rounds, but noisily.
MAP_STREAMS = 2
_PART_ALIGN = 2 * 2**20  # parts start on huge-page boundaries (and so on O_DIRECT's alignment)
_PARALLEL_MIN_BYTES = 8 * 2**20  # smaller files are read in one part


def _round_up(n: int, align: int = _ALIGN) -> int:
    return (n + align - 1) // align * align


def _parts(start: int, end: int, count: int) -> list[tuple[int, int]]:
    """`[start, end)` cut into at most `count` contiguous parts of about equal size, inner bounds on `_PART_ALIGN`."""
    if count <= 1 or end - start < _PARALLEL_MIN_BYTES:
        return [(start, end)]
    step = _round_up(-(-(end - start) // count), _PART_ALIGN)
    bounds = [start] + [b for b in range(_round_up(start, _PART_ALIGN) + step, end, step)] + [end]
    if len(bounds) > 2 and bounds[1] - start < _PART_ALIGN:  # a sliver before the first aligned bound: merge it
        del bounds[1]
    return list(zip(bounds[:-1], bounds[1:]))


def _read_part(fd: int, view: memoryview, lo: int, hi: int, limit: int, path, size: int) -> None:
    """`pread` bytes `[lo, hi)` of the file into `view[lo:hi]`, in chunks; the last chunk may ask up to `limit`
    (`O_DIRECT` reads whole blocks past the end of the file)."""
    done = lo
    while done < hi:
        n = os.preadv(fd, [view[done : min(done + _READ_CHUNK, limit)]], done)
        if n <= 0:
            raise ShardFileError(path, f"ended at byte {done} of {size} (truncated while reading)")
        done += n


class _PinnedHost:
    """Page-locked host buffers of exactly the size asked for (the CUDA staging buffers and host-tier layers).

    `torch.empty(..., pin_memory=True)` goes through torch's caching host allocator, which rounds every block up to a
    power of two: an 86 MB layer pins 128 MB, a 1.1 GB one 2 GB, so a host budget would be overrun by up to 2x. Here
    an anonymous map of the exact size is registered with `cudaHostRegister` (as torch's own checkpoint stager
    does). The buffers live until `release`, which unregisters each one before its map can go (`LayerLoader.close`
    calls it once every copy reading them is done); a view kept alive after that reads ordinary pageable memory.
    Where registering fails, the caching allocator is used instead.
    """

    _PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context, as torch registers

    def __init__(self, device: torch.device | None = None):
        self._held: dict[int, mmap.mmap] = {}  # address -> the map it starts
        self._lock = threading.Lock()
        self._registering = True
        # registering and unregistering run in the loader thread: under the model's device, so that a thread that
        # never set one does not create a context on GPU 0 (hundreds of MiB there) for a model on another GPU
        self.device = device

    def empty(self, size: int) -> torch.Tensor:
        if size == 0:  # (a tensor with no elements: nothing to pin, and `mmap` refuses an empty map)
            return torch.empty(0, dtype=torch.uint8)
        if self._registering:
            mm = mmap.mmap(-1, size)
            buf = torch.frombuffer(mm, dtype=torch.uint8)
            try:
                with torch.cuda.device(self.device):
                    err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), size, self._PORTABLE))
            except (AssertionError, AttributeError, RuntimeError) as e:  # no cudart binding in this build
                err = repr(e)
            if err == 0:
                with self._lock:
                    self._held[buf.data_ptr()] = mm
                return buf
            logger.info("cudaHostRegister failed (%s); pinning with torch's caching host allocator instead", err)
            if isinstance(err, int):
                _clear_cuda_error(self.device)
            self._registering = False
            del buf  # the map goes with it
        with torch.cuda.device(self.device):
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            if buf.data_ptr() % _ALIGN:  # (its blocks are page-aligned; asking for more would double a power of two)
                buf = torch.empty(size + _ALIGN, dtype=torch.uint8, pin_memory=True)
        skip = (-buf.data_ptr()) % _ALIGN
        return buf[skip : skip + size]

    def free(self, buf: torch.Tensor) -> None:
        """Unregister one buffer of ours now (nothing has been queued to copy from it): a host-tier layer whose read
        failed, which is read again into a new buffer. Buffers from the fallback allocator are left to torch."""
        with self._lock:
            held = self._held.pop(buf.data_ptr(), None)
        if held is not None:
            _unregister(buf.data_ptr(), self.device)

    def release(self, stream=None) -> None:
        """Unregister every buffer; their maps go once no tensor views them. No copy may still be reading one:
        pass the `stream` the copies were queued on to wait for them first."""
        if stream is not None:
            stream.synchronize()
        with self._lock:
            held, self._held = self._held, {}
        for ptr in held:
            _unregister(ptr, self.device)


def _unregister(ptr: int, device: torch.device | None) -> None:
    """`cudaHostUnregister(ptr)`; a failure is logged (the memory stays pinned until its map goes)."""
    with torch.cuda.device(device):
        err = int(torch.cuda.cudart().cudaHostUnregister(ptr))
    if err != 0:
        logger.warning("cudaHostUnregister(%#x) failed with CUDA error %d", ptr, err)
        _clear_cuda_error(device)  # else the next kernel launched in this thread would raise it as its own


def _clear_cuda_error(device: torch.device | None) -> None:
    """Reset this thread's last CUDA runtime error after a failed call whose failure is handled (`cudaHostRegister`,
    `cudaHostUnregister`): the runtime keeps it until `cudaGetLastError` reads it, and torch reads it after every
    kernel launch, so the next cast or decode in this thread would raise it as its own.

    torch binds no `cudaGetLastError` (its `cudart()` has a few calls only), so a one-element kernel is launched here
    instead: torch's check after the launch reads the error off, in the runtime torch itself uses (linked statically
    or not), and raises it, and that is dropped. A binding is used where a torch build has one."""
    try:
        get = getattr(torch.cuda.cudart(), "cudaGetLastError", None)
        if get is not None:
            get()
            return
        _launch_one_kernel(device)
    except RuntimeError as e:  # (torch.AcceleratorError is one): the error being cleared, or a binding missing
        logger.debug("cleared the CUDA error of a failed host (un)registering: %s", e)


def _launch_one_kernel(device: torch.device | None) -> None:
    """One element, one kernel on `device`, its launch checked by torch (`C10_CUDA_KERNEL_LAUNCH_CHECK`)."""
    with torch.cuda.device(device):
        torch.zeros(1, device=device if device is not None else "cuda").add_(1)


def empty_allocator_caches(device: torch.device) -> None:
    """Hand what torch's caching allocators keep of freed memory back to the driver and the OS: the device's blocks,
    and pinned host blocks (where `cudaHostRegister` failed and torch's pinned allocator was used). Once, as streaming
    is disabled and the weights are gone; never in the hot path."""
    with torch.cuda.device(device):
        torch.cuda.empty_cache()
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()


def _loader_thread_begins(device: torch.device | None) -> None:
    """The loader thread's initializer. Its OpenMP threads are set to torch's number of threads
    (`torch.set_num_threads`, as it is when the thread starts), as torch sets them in each thread where it first
    runs an op of its own: bitsandbytes' CPU kernel, which decodes quantized layers here, runs OpenMP directly, and
    took the OpenMP default (one thread per CPU, or `OMP_NUM_THREADS`) before any such op had run in this thread, so
    a process limited to fewer threads decoded with more (a team that spun beside the compute thread's: on this
    2-core VM, loaded by other processes, a 4-bit `generate` of 4 tokens under `torch.set_num_threads(1)`, every layer
    from disk, took a median 1.50 s against 0.33 s with this, 30 calls each alternating in one process). On CUDA the
    model's device is made its current device."""
    torch.get_num_threads()  # (torch's lazy per-thread set-up: `omp_set_num_threads` with torch's number)
    if device is not None:
        torch.cuda.set_device(device)


def _loader_event() -> torch.cuda.Event:
    """A CUDA event the loader thread waits for (`synchronize`): a blocking one, so that the thread sleeps until the
    GPU reaches it. A default event is waited for by spinning on a core (CUDA's automatic scheduling, with fewer
    contexts than cores), the core the reads, the decoding and the compute thread's Python need."""
    return torch.cuda.Event(blocking=True)


def _aligned_buffer(size: int, pinned: _PinnedHost | None = None) -> torch.Tensor:
    """A page-aligned uint8 CPU tensor of at least `size` bytes (from `pinned` for CUDA staging)."""
    size = _round_up(max(size, 1))
    if pinned is not None:
        return pinned.empty(size)
    # an anonymous mapping is page-aligned and returned to the OS as soon as the tensor dies
    return torch.frombuffer(mmap.mmap(-1, size), dtype=torch.uint8)


def _free_locals(error: BaseException) -> None:
    """Clear the local variables of the finished frames in `error`'s traceback and in those of the errors it chains
    (the frames stay, for the traceback's lines), so that tensors a failed load had made are freed now rather than
    when the error is."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)  # (frames still running are skipped)
        error = error.__cause__ or error.__context__


class _BufferPool:
    """Reusable page-aligned byte buffers (pinned on CUDA), allocated once and reused for every read.

    On CPU a buffer is reused only once no tensor viewing it is alive. On CUDA a buffer is reused once the
    host-to-device copy reading it has completed (its event): an idle buffer first, else a new one while fewer than
    `limit` exist (so the next read from the disk overlaps the copy out of the last one), else the oldest, waiting
    for its copy.
    """

    def __init__(self, pinned: _PinnedHost | None):
        self.pinned = pinned
        self._free: list[tuple[torch.Tensor, object]] = []  # (buffer, CUDA event that must complete, or None)
        self._lock = threading.Lock()
        self.allocated = 0
        self.made = 0  # buffers allocated in all (`allocated` less those dropped since)

    def take(self, size: int, limit: int | None = None) -> torch.Tensor:
        need = _round_up(size)
        found = None
        with self._lock:
            fits = [i for i, (buf, _) in enumerate(self._free) if buf.numel() >= need]
            idle = [i for i in fits if self._free[i][1] is None or self._free[i][1].query()]
            if idle:
                found = self._free.pop(idle[0])
            elif fits and (limit is None or self.allocated >= limit):
                found = self._free.pop(fits[0])
        if found is not None:
            buf, event = found
            if event is not None:
                event.synchronize()  # in the loader thread; the copy was queued long ago, this rarely waits
            return buf
        buf = _aligned_buffer(need, self.pinned)
        with self._lock:  # (counted once made: a failed allocation leaves no buffer to count)
            self.allocated += 1
            self.made += 1
        return buf

    def give(self, buf: torch.Tensor, views: list[weakref.ref], event=None) -> None:
        # Views still referenced elsewhere (e.g. an autograd graph, a traceback) would see the next layer's bytes:
        # the buffer leaves the pool, and goes with the last of them
        if any(r() is not None for r in views):
            with self._lock:
                self.allocated -= 1
            return
        with self._lock:
            self._free.append((buf, event))

    def discard_one(self) -> None:
        """Free one idle buffer: a layer was mapped instead of read, so the pool needs one buffer fewer (keeps the
        total of buffers and mapped layers at about `prefetch + 1` when the two paths mix)."""
        with self._lock:
            for i, (_, event) in enumerate(self._free):
                if event is None:
                    del self._free[i]
                    self.allocated -= 1
                    return

    def clear(self) -> None:
        with self._lock:
            for _, event in self._free:
                if event is not None:
                    event.synchronize()
            self._free.clear()


def _decode_buffers():
    from .quant import DecodeBuffers  # (as the loader imports the codec: where a layer is decoded)

    return DecodeBuffers()


def _page_cached(fd: int, header: Header) -> bool:
    """Whether all of the file is in the page cache (then a buffered read costs no I/O)."""
    fraction = cached_fraction(fd, header.file_size)
    return fraction is None or fraction >= 1.0


def _read_from_disk(before: tuple[float, int] | None, after: tuple[float, int] | None, size: int) -> bool:
    """Whether a map populated between two `thread_usage` readings read its file (of `size` bytes) from the disk:
    at least 1/16 of it; `True` where the platform cannot tell."""
    return before is None or after is None or after[1] - before[1] >= size // 16


def _known_cached(header: Header) -> bool:
    """Whether all of the file is in the page cache, asked only where that is cheap (`cachestat`); `False` where
    it cannot be told so."""
    fd = os.open(header.path, os.O_RDONLY)
    try:
        fraction = cached_fraction(fd, header.file_size, cheap=True)
    finally:
        os.close(fd)
    return fraction is not None and fraction >= 1.0


_RENEWED_AFTER_FORK: weakref.WeakSet = weakref.WeakSet()  # live loaders and pass guards (see `renew_after_fork`)


def renew_after_fork(obj) -> None:
    """Have `obj._after_fork()` run in every child forked while `obj` lives: the threads of the parent are not there,
    and a lock one of them held stays held."""
    _RENEWED_AFTER_FORK.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_RENEWED_AFTER_FORK):
        obj._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_NO_COPY = (
    "A model with layer streaming enabled cannot be copied or pickled (its loader holds threads, file maps and "
    "buffers): call `disable_layer_streaming(model)` first, then enable streaming on each copy."
)


class LayerLoader:
    """Provides each decoder layer's tensors (names relative to the layer) on the execution device."""

    def __init__(
        self,
        shards: ShardDirectory,
        device: torch.device,
        plan: ResidencyPlan,
        *,
        target_dtypes: dict[str, torch.dtype],
        layer_prefixes: list[str],
        prefetch: int = 1,
        profile: Profile | None = None,
        deferred: Collection[str] = frozenset(),
    ):
        self.shards = shards
        self.device = device
        self.plan = plan
        self.profile = profile
        self.target_dtypes = target_dtypes  # full name -> dtype the model computes in
        self.layer_prefixes = layer_prefixes
        # quantized weights (full names) handed over packed (`PackedWeight`), dequantized by the hooks as each one's
        # module runs (`dequantize="module"`)
        self.deferred = frozenset(deferred)
        self.is_cuda = device.type == "cuda"
        n = shards.num_layers
        # every layer that is not kept on the device goes through the loader thread (host tier: an H2D copy from
        # pinned RAM; disk tier: a read, then the copy on CUDA), in this order, `prefetch` ahead of the compute
        self._streamed = [i for i in range(n) if plan.tier(i) != "device"]
        self._window = self._streamed  # the streamed layers the pass running reaches (see `pass_runs`)
        self.prefetch = max(0, min(prefetch, max(len(self._streamed) - 1, 0)))
        self._direct = hasattr(os, "O_DIRECT")  # turned off at the first file system that refuses it
        self.reads = {"mapped": 0, "page_cache": 0, "direct": 0}
        self._map = True  # CPU: streamed layers are mapped, not copied (tests turn it off to exercise reads)
        self._populate = True  # MADV_POPULATE_READ works here (else MAP_POPULATE: no huge read-ahead)
        self.repairs: dict[int, int] = {}  # layer -> times dropped from the page cache to come back in huge pages
        self.small_page_layers: set[int] = set()  # layers whose last mapping found the page cache in small folios
        # CPU: each streamed layer's file map, kept between uses with its pages released (see `_map_file`)
        self._maps: dict[int, _LayerMap] = {}
        self._keep_maps = can_release_mapped_pages()
        # a file read from the disk is read in `read_streams` parts at once (see `READ_STREAMS`), the loader thread
        # reading one and helper threads, started at the first such read, the others
        self.read_streams = READ_STREAMS
        # CPU: layers the disk must supply are mapped and read ahead by map threads (`_map_ahead`; see `_maps_ahead`),
        # each layer always by the same one (`_map_thread`), so its eviction after use and its next map run in order
        self._map_streams = MAP_STREAMS if self._streamed and not self.is_cuda and hasattr(mmap, "MAP_POPULATE") else 0
        self._new_executors()
        decoded = {
            i
            for i in self._streamed
            if any(t.quant and n not in self.deferred for n, t in shards.unit(layer_unit(i)).tensors.items())
        }
        # full-precision layers take turns (two read at once; with an odd number of streamed layers, the last and the
        # first share one), quantized ones all go to the first (their reads are small and overlap the decoding: two at
        # once gained nothing there, 1.03x and 1.08x the step time, measured)
        self._map_thread = {i: 0 if i in decoded else pos % MAP_STREAMS for pos, i in enumerate(self._streamed)}
        self._from_disk = set(self._streamed)  # layers whose last map read from the disk (every layer until mapped)
        self._dropped: set[int] = set()  # streamed layers dropped from the page cache after their last use
        self._in_place = True  # warm layers mapped by the compute thread (see `_maps_in_place`; tests turn it off)
        self._pending: dict[int, _Load] = {}
        self._in_use: dict[int, _Ready] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._close_done = False  # (`close` ran to its end)
        self._pinned = _PinnedHost(device) if self.is_cuda else None
        self._pool = _BufferPool(self._pinned)
        # CPU: the buffers streamed layers' 4-bit and 8-bit weights are decoded into, reused from layer to layer (see
        # `quant.DecodeBuffers`); given back as each layer is let go
        self._decoded = _decode_buffers() if not self.is_cuda else None
        # read buffers all take the largest file of a layer streamed from the disk: any buffer fits any such layer, so
        # the pool never grows past `prefetch + 1` (layers of different sizes, or file sizes that round up to
        # different pages, would otherwise leave buffers that fit none of the next ones)
        self._staging_size = max((shards.unit(layer_unit(i)).size for i in plan.streamed), default=0)
        self._device_cache: dict[int, _Ready] = {}
        # the layers the plan keeps, in order, and those read into the page cache ahead of their first use (see
        # `_warm_kept_ahead`)
        self._kept_order = sorted(plan.device_layers)
        self._warmed: set[int] = set()
        # CPU: the files the model computes with in place, mapped once and kept (the resident parts, the layers the
        # plan keeps), by unit, with their maps: checked at every pass (`check_kept_files`)
        self._kept_files: dict[str, tuple[Header, mmap.mmap | None]] = {}
        # of those, the ones found changed: they fail every later pass (the map shows the changed file)
        self._changed_kept: dict[str, ShardFileError] = {}
        self._host_cache: dict[int, dict[str, torch.Tensor]] = {}
        self._copy_stream = torch.cuda.Stream(device) if self.is_cuda else None
        if self._pinned is not None:  # a loader dropped without `close` (model deleted while streaming) unpins too,
            # once the copies queued from its buffers have run
            self._unpin = weakref.finalize(self, self._pinned.release, self._copy_stream)
            self._unpin.atexit = False  # at exit the process's pinned memory goes with it
        # CUDA: a compute-stream event per released streamed layer; its memory is free for the next layer only once
        # the GPU has passed it (see `_wait_released`)
        self._released: deque = deque()
        # the newest of them, which the loader's taking them does not hide (see `wait_released_passed`)
        self._last_released = None
        self.failures = 0
        renew_after_fork(self)

    # -- public API used by the hooks -----------------------------------------------------------------------------

    @property
    def copy_stream(self):
        """CUDA: the side stream the loader copies layers to the device on (`None` on CPU)."""
        return self._copy_stream

    def acquire(self, index: int) -> dict[str, torch.Tensor]:
        """Block until layer `index` is on the device; schedule the next streamed layers; return its tensors."""
        if self._closed:
            raise RuntimeError("Layer streaming was disabled; call `enable_layer_streaming` again to run the model.")
        self.release(index)  # (nothing to release, unless this layer's last forward pass raised before its release)
        ready = self._device_cache.get(index)
        if ready is not None and self.profile is None:
            # kept on the device and loaded already (every layer at every token where the device holds the model):
            # nothing to wait for or to time
            self._in_use[index] = ready
            if self._streamed:
                self._schedule_after(index)
            return ready.tensors
        t0 = time.perf_counter()
        tier = self.plan.tier(index)
        future, prefetched, in_place = None, False, False
        if tier != "device":
            with self._lock:
                future = self._pending.pop(index, None)
            prefetched = future is not None
            in_place = future is None and self._maps_in_place(index)
            if future is None and not in_place:
                future = self._submit(index)
        try:
            if tier == "device":  # (kept: loaded at its first use, then held)
                ready = self._kept_ready(index)
            else:
                self._schedule_after(index)
                try:
                    if in_place:
                        ready = self._load_streamed(index)
                        if index in self._from_disk:
                            self._after_cold_in_place(index)
                    else:
                        ready = future.result()
                        if prefetched and ready.header is not None and not self._still_sound(index, ready):
                            future = self._submit(index)  # (here: a Ctrl-C while it reads hands this one back)
                            ready = future.result()
                except Exception:  # noqa: BLE001
                    if not prefetched:
                        raise
                    # read ahead, possibly long ago: the file may have been repaired since; read it again now
                    future = self._submit(index)
                    ready = future.result()
        except LayerLoadError:
            raise
        except Exception as e:  # noqa: BLE001 - surfaced in the caller, naming the layer
            self.failures += 1
            raise LayerLoadError(
                f"Loading decoder layer {index} from {self.shards.files[layer_unit(index)]} failed: "
                f"{type(e).__name__}: {e}"
            ) from e
        except BaseException:
            # interrupted while waiting (Ctrl-C): the load goes on in the loader thread; handed back as read
            # ahead, it is used by the next pass or let go as that pass begins (`sweep_begins`), not lost with
            # its buffer or populated pages; one that failed so (a `SystemExit` in the loader) is not: the next pass
            # reads the layer again, where it re-raised at every pass; nor is one let go here (interrupted while
            # `_still_sound` checked it, or just after it found it stale): the next pass used it with no tensors
            if future is not None and not (
                future.done() and (future.cancelled() or future.exception() is not None or future.result().let_go)
            ):
                with self._lock:
                    self._pending.setdefault(index, future)
            raise
        self._in_use[index] = ready  # (before the stream work: a pass interrupted there puts it back too)
        if tier == "device":
            if self._streamed:
                self._schedule_after(index)
        elif ready.event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(ready.event)
            # allocated on the copy stream, used on the compute stream: tell the caching allocator, so the
            # memory is not handed back to the copy stream while compute kernels still read it
            for t in ready.tensors.values():
                t.record_stream(compute)
        if self.profile is not None:
            self.profile.add(index, wait=time.perf_counter() - t0, calls=1, **(ready.times or {}))
        return ready.tensors

    def _still_sound(self, index: int, ready: _Ready) -> bool:
        """CPU: whether layer `index`, read ahead (possibly long before this use), can be used: checked at its use as
        a layer mapped at its use is (one `stat`), since a file rewritten in place after the read shows through the
        map's pages (or was read before it changed), and was computed with once, silently. `False` (the layer let go:
        load it again) where it was read ahead before `ShardDirectory.verify` read the headers anew (the map is made
        anew then, see `_map_file`).

        Raises:
            `ShardFileError`: The file changed since it was read (the layer let go).
        """
        header = self.shards.header(layer_unit(index))
        stale = header is not ready.header
        if not stale:
            try:
                _check_file(header, _stat(header))
            except BaseException:
                self._let_go(index, ready)
                raise
            kept = self._maps.get(index) if ready.mapped else None
            if kept is None or not kept.written_since():
                return True
            # a weight of the layer's last use, kept by the caller, was written since this map was read ahead: the
            # write is in its pages; forgotten, not released (that weight keeps its write), and mapped afresh
        self._let_go(index, ready, forget=not stale)
        return False

    def kept_runs(self, index: int) -> None:
        """Layer `index`, kept on the device and holding its weights since its last pass, runs (no `acquire`): the
        streamed layers after it are read ahead as `acquire` would."""
        if self._streamed:
            self._schedule_after(index)
        if self.profile is not None:
            self.profile.add(index, wait=0.0, calls=1)

    def release(self, index: int, graph: bool = False) -> None:
        """Layer `index` finished its forward pass: drop its tensors (their memory is reused by later reads).
        `graph`: the pass recorded an autograd graph on its weights (a pass with gradients to its inputs, or to a
        tensor inside the layer), which may hold them until its backward: a kept map of the layer's file is
        forgotten, not released (see `_LayerMap.release_pages`)."""
        ready = self._in_use.pop(index, None)
        if ready is not None:
            self._let_go(index, ready, forget=graph)

    def holds(self, index: int) -> bool:
        """Whether layer `index` is in use (see `in_use`)."""
        return index in self._in_use

    def in_use(self) -> list[int]:
        """Layers acquired and not released: the one whose forward pass runs, or one whose forward pass raised."""
        return list(self._in_use)

    def sweep_begins(self) -> None:
        """A pass over the decoder layers begins after one that raised part way (Ctrl-C, out of memory, an error in a
        layer; `PassGuard` calls it then, having put back the layer that was in use). Layers read ahead other than
        the new pass's first `prefetch` streamed ones were read for the rest of the pass that stopped: they are let
        go, those still loading once loaded (at most `prefetch` of them), so what is held stays within the plan's
        (prefetch + 1) layers instead of growing by the stale ones until the new pass reaches them. (A pass that
        ends early without raising keeps its read-ahead for the pass that goes on: an early-exit draft's wraps to
        layer 0 at its exit, and other passes read ahead only as far as that bound leaves room, see
        `_schedule_after`.)"""
        first = set(self._streamed[: self.prefetch])
        with self._lock:
            stale = [i for i in self._pending if i not in first]
        for index in stale:
            with self._lock:
                future = self._pending.pop(index, None)
            if future is None:
                continue
            try:
                ready = future.result()
            except Exception:  # noqa: BLE001 - read again, and reported, when the layer is next acquired
                continue
            except BaseException:  # interrupted again: the next pass that begins lets it go
                with self._lock:
                    self._pending.setdefault(index, future)
                raise
            self._let_go(index, ready)
        if stale:
            self._schedule_after(-1)

    def _let_go(self, index: int, ready: _Ready, forget: bool = False) -> None:
        """`forget`: a kept map of the layer's file is forgotten, not released: something other than the loader may
        still view it (an autograd graph, a weight the caller kept), and must keep what it sees."""
        # the addresses of its weights decoded into our buffers, which go back once its tensors are dropped (others
        # are not ours: ignored; none on CUDA, which decodes into no buffers)
        decoded = [] if self._decoded is None else self._decoded.addresses(ready.tensors.values())
        try:
            self._drop(index, ready, forget)
        finally:
            if decoded:
                self._decoded.give(decoded)

    def _drop(self, index: int, ready: _Ready, forget: bool) -> None:
        """`_let_go`'s work, but for the buffers its weights were decoded into."""
        ready.let_go = True
        if ready.mapped:
            # its pages leave the resident set here and now: `MADV_DONTNEED` on a kept map, or the munmap when the
            # last view of a map made for this use dies (about 0.1 ms for an 86 MB layer in 2 MiB mappings here);
            # the eviction, when the plan asks for one, in the loader thread (pages still mapped are not dropped)
            ready.tensors = {}
            kept = self._maps.get(index)
            if kept is not None:
                if forget:  # (the next use maps the file afresh; this map goes once no tensor views it)
                    self._maps.pop(index, None)
                else:
                    kept.release_pages()
            if ready.evict is None:
                self._dropped.discard(index)
                return
            self._dropped.add(index)
            if not self._closed:
                # in the thread that maps this layer next: in order with that map (mapped pages are not dropped)
                pool = self._mappers[self._map_thread[index]] if self.prefetch and self._maps_ahead(index) else None
                (pool or self._executor).submit(_evict, ready.evict, whole=ready.repair)
            return
        if ready.event is not None:  # CUDA, streamed: see `_wait_released`
            # its tensors go first: freed, each is marked by the caching allocator as in use on the compute stream up
            # to here, so once the event recorded next has completed, their memory is free for the next copy
            ready.tensors = {}
            done = _loader_event()
            done.record(torch.cuda.current_stream(self.device))
            self._released.append(done)
            self._last_released = done
        if ready.buffer is None:
            return
        pool, buf, views = ready.buffer
        ready.tensors, ready.buffer = {}, None  # (given once)
        pool.give(buf, views)

    def __deepcopy__(self, memo):
        raise TypeError(_NO_COPY)

    def __reduce__(self):
        raise TypeError(_NO_COPY)

    def wait_idle(self) -> None:
        """Wait until every read scheduled so far has finished (tests and benchmarks)."""
        with self._lock:
            pending = list(self._pending.values())
        for f in pending:
            try:
                f.result()
            except Exception:  # noqa: BLE001 - reported when the layer is acquired
                pass

    def close(self) -> None:
        """Stop the background thread and free every buffer; safe to call twice (a second call finishes a first one
        interrupted part way, by Ctrl-C while it waited for the threads)."""
        if self._close_done:
            return
        self._closed = True  # (at once: no acquire from here on)
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for f in pending:
            f.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)
        for mapper in self._mappers:  # (maps made ahead for loads that were cancelled: not begun ones are dropped)
            mapper.shutdown(wait=True, cancel_futures=True)
        if self._helpers is not None:  # idle now: only the loader thread, stopped above, gives them work
            self._helpers.shutdown(wait=True)
        if self._warmer is not None:
            self._warmer.shutdown(wait=True, cancel_futures=True)
        if self._copy_stream is not None:
            self._copy_stream.synchronize()  # no copy may still read a staging buffer we are about to free
        # layers read ahead for a sweep that will not come: unmap them; then the evictions the shutdown cancelled
        # (and those of the read-ahead layers): leave the page cache as the plan says
        done = [f.result() for f in pending if f.done() and not f.cancelled() and f.exception() is None]
        for ready in done + list(self._in_use.values()):
            ready.tensors = {}
        self._in_use.clear()
        self._released.clear()
        self._last_released = None
        mapped = self.reads["mapped"] or self._maps  # (maps made ahead for loads that were cancelled count too)
        for kept in self._maps.values():
            kept.release_pages()
        self._maps.clear()  # each map goes once no tensor views it
        if not self.is_cuda and mapped:
            for i in self.plan.streamed:
                if not self.plan.keeps_in_page_cache(i):
                    _evict(self.shards.files[layer_unit(i)])
        self._device_cache.clear()
        self._kept_files.clear()
        self._changed_kept.clear()
        self._host_cache.clear()
        self._pool.clear()
        if self._decoded is not None:
            self._decoded.clear()
        if self._pinned is not None:
            self._unpin()
        self._close_done = True

    def _after_fork(self) -> None:
        """In a child forked from a process that streams with this loader (gunicorn's `--preload`, a fork-based
        process pool): the parent's threads do not exist here, so work given to its executors would never run (the
        next `generate` waited forever), and a lock one of them held stays held. New locks and threads; the parent's
        read-ahead is dropped (its threads may not have finished it), and the next pass reads those layers again."""
        self._lock = threading.Lock()
        self._pool._lock = threading.Lock()  # (layers in use hand their buffers back to it: a held lock would hang)
        self._pool = _BufferPool(self._pinned)
        if self._decoded is not None:  # (as the read buffers: a lock held by a parent's thread would hang)
            self._decoded = _decode_buffers()
        if self.profile is not None:
            self.profile._lock = threading.Lock()
            # (the calls of the parent's other threads never end here: they would keep the profile from restarting)
            mine = self.profile._calls.get(threading.get_ident())
            self.profile._calls = {} if mine is None else {threading.get_ident(): mine}
        self._pending = {}
        self._released.clear()
        self._last_released = None
        if not self._closed:
            self._new_executors()

    def _new_executors(self) -> None:
        """The loader thread's executor, the map threads' (none where layers are not mapped ahead) and none yet for
        the helper threads (made at the first read in parts); each thread starts at its first task. On CUDA the
        loader thread's current device is the model's from its start (every call that needs one also names it): a
        call made there without `torch.cuda.device` would otherwise reach device 0, and make a CUDA context there.
        Its OpenMP threads are torch's number (see `_loader_thread_begins`)."""
        device = self.device if self.is_cuda else None
        self._executor = _Executor(
            max_workers=1,
            thread_name_prefix="hf_layerstream-loader",
            initializer=_loader_thread_begins,
            initargs=(device,),
        )
        self._helpers: ThreadPoolExecutor | None = None
        self._mappers = [
            _Executor(max_workers=1, thread_name_prefix=f"hf_layerstream-loader-map-{k}")
            for k in range(self._map_streams)
        ]
        self._warmer: ThreadPoolExecutor | None = None  # (see `_warm_kept_ahead`; made at its first task)

    # -- scheduling -----------------------------------------------------------------------------------------------

    def _submit(self, index: int) -> _Load:
        return self._executor.load(self._load_in_loader, index)

    def _load_in_loader(self, index: int, ahead: Future | None = None) -> _Ready:
        """`_load_streamed` in the loader thread. A load that fails (a GPU out of memory part way, a damaged file)
        leaves no memory behind: the tensors it had made stay referenced by its traceback's frames, which the future
        keeps until the layer is acquired, and the error raised then keeps too; they are freed here."""
        try:
            return self._load_streamed(index, ahead)
        except BaseException as e:
            _free_locals(e)
            raise

    def start(self) -> None:
        """Start reading the first `prefetch` streamed layers now (`enable_layer_streaming` calls it last), so the
        first forward pass does not wait for reads that could have begun while the caller tokenized its prompt."""
        if not self._closed:
            self._schedule_after(-1)
            self._warm_kept_ahead(-1)

    def _warm_kept_ahead(self, after: int) -> None:
        """Layers the plan keeps are mapped (CPU) or copied to the device at their first use, in the compute thread:
        from a cold page cache each was read from the disk there, a page fault at a time, not overlapping the compute
        (the bench model's first pass under the default plan took 2.2-3.1 s against 1.6 warm, where streaming every
        layer took 1.9). The next two of them after `after` not loaded yet (or `prefetch`, if more; it is 0 where
        every layer is kept) are read into the page cache ahead of their use, by a thread of their own, as streamed
        layers are read ahead (`_warm_file`)."""
        todo = [i for i in self._kept_order if i > after and i not in self._device_cache and i not in self._warmed]
        if self._closed or not todo:
            return
        if self._warmer is None:
            self._warmer = _Executor(max_workers=1, thread_name_prefix="hf_layerstream-loader-warm")
        for i in todo[: max(self.prefetch, 2)]:
            self._warmed.add(i)
            self._warmer.submit(self._warm_file, i)

    def _warm_file(self, index: int) -> None:
        """In the warm thread: layer `index`'s file read into the page cache (in large folios, as streamed layers'
        are: a map asked for huge pages, populated and let go; the pages stay in the page cache), unless it is there.
        Best effort: a file that cannot be read is named by its use, which maps it anyway."""
        header = self.shards.header(layer_unit(index))
        try:
            if _known_cached(header):
                return
            populated = False
            if self._populate:  # (refused once, by an older kernel: not asked again, as the loader does not)
                mm = map_readonly(header.path, header.file_size)
                try:
                    populated = populate(mm, header.path)
                finally:
                    mm.close()
                if not populated:
                    self._populate = False
            if not populated:  # (an older kernel: read at mmap time, and unmapped at once)
                fd = os.open(header.path, os.O_RDONLY)
                try:
                    map_populated(fd, header.file_size)
                finally:
                    os.close(fd)
        except Exception as e:  # noqa: BLE001 - the layer's first use reads it and raises what is wrong
            logger.debug("Could not read layer %d ahead (%s: %s)", index, type(e).__name__, e)

    def check_kept_files(self) -> None:
        """At every pass (`PassGuard`), on CPU: the files mapped once and kept (`_kept_files`), one `stat` each. A
        file rewritten in place since it was mapped changes the weights under the model (its map shows the page
        cache's pages): that raises, as a streamed layer's file does at its next use, and at every pass after it (the
        map stays the changed file's, also once the path names a repaired one). A path that now names another file
        (replaced by a rename: what a re-run split does) or none leaves the map the file it was: that file's size is
        checked through the map (`mmap.size()`, an `fstat` of the descriptor Python keeps), since one truncated before
        it was replaced would end the process with `SIGBUS` at the next read of its pages."""
        for unit, (header, mm) in list(self._kept_files.items()):
            if header.identity is None:
                continue
            found = self._changed_kept.get(unit)
            if found is not None:  # (as found then: also where it was rewritten to its old bytes since)
                raise ShardFileError(found.path, found.problem, found.fix)
            try:
                try:
                    st = os.stat(header.path)
                except OSError:
                    st = None
                if st is not None and (st.st_dev, st.st_ino) == header.identity[:2]:
                    _check_file(header, st)
                    continue
                size = mm.size() if mm is not None and not mm.closed else header.file_size
                if size < header.file_size:
                    raise ShardFileError(
                        header.path,
                        f"was truncated to {size} of its {header.file_size} bytes after it was mapped, then replaced "
                        "by another file (the map still maps the truncated one)",
                        "Do not modify a shard directory while a model streams from it. Call "
                        "`disable_layer_streaming(model)` and `enable_layer_streaming(model, shard_dir)` again.",
                    )
            except ShardFileError as e:
                self._changed_kept[unit] = e
                raise

    def pass_runs(self, layers: int | None) -> None:
        """A pass begins that runs only the first `layers` decoder layers (`None`: all of them), as an early-exit
        draft does (transformers' `assistant_early_exit` lowers the config's `num_hidden_layers` for its drafts): the
        layers are read ahead cyclically within those, so each draft reads the next one's first layers ahead, not the
        layers past its exit that no draft uses. Where no streamed layer is within them, as before: all."""
        window = [i for i in self._streamed if i < layers] if layers is not None else []
        self._window = window or self._streamed

    def _schedule_after(self, index: int) -> None:
        """Keep the next `prefetch` streamed layers (cyclically) loading in the background, while no more than
        `prefetch + 1` streamed layers are held: read ahead, in use, and `index` as it is acquired. Cyclically within
        the layers the pass runs (`pass_runs`): an early-exit draft's read-ahead wraps to layer 0 at its exit. A pass
        that ended early otherwise (without raising, and without a lowered `num_hidden_layers`) leaves its read-ahead
        for the pass that goes on, and the passes that begin meanwhile read fewer layers ahead, not more than the
        plan has room for."""
        if not self.prefetch or not self._streamed:
            return
        window = self._window
        pos = bisect.bisect_right(window, index) % len(window)  # the first streamed layer after it, in this pass
        with self._lock:
            streamed_in_use = (i for i in (*self._in_use, index) if i >= 0 and self.plan.tier(i) != "device")
            held = len({*self._pending, *streamed_in_use})
            for k in range(self.prefetch):
                nxt = window[(pos + k) % len(window)]
                if nxt == index or nxt in self._pending or nxt in self._in_use or self._maps_in_place(nxt):
                    continue
                if held > self.prefetch:
                    break
                held += 1
                ahead = (
                    self._mappers[self._map_thread[nxt]].submit(self._map_ahead, nxt) if self._maps_ahead(nxt) else None
                )
                self._pending[nxt] = self._executor.load(self._load_in_loader, nxt, ahead)

    def _maps_in_place(self, index: int) -> bool:
        """CPU: whether layer `index` is mapped where it is used, in the compute thread as its forward begins, with no
        thread in between: a layer whose kept map found it in the page cache last time, was left there after its
        last use, and whose tensors are its map's views as they are (nothing to decode or cast). Populating such a
        map is the whole load (about 0.1 ms for an 86 MB layer here); handed over to the loader thread, it cost more
        than that in the compute thread's waits for the GIL and the core the loader took from torch: a warm
        `generate` streaming every layer took 0.97x, 0.97x, 1.00x and 0.97x the step time mapped in place (in-process
        runs of 14, 20, 16 and 30 rounds alternating the two). Layers that are decoded or cast stay in the loader
        thread, where that work overlaps the compute, as do layers the disk must supply (see `_maps_ahead`)."""
        if not (self._in_place and self._map):
            return False
        kept = self._maps.get(index)
        return (
            kept is not None
            and kept.finished is not None
            and index not in self._from_disk
            and index not in self._dropped
        )

    def _after_cold_in_place(self, index: int) -> None:
        """A layer mapped in place had to be read from the disk: the page cache lost it, and most likely the layers
        after it too (memory pressure, a cache drop). Every streamed layer goes back to the map threads, which find
        the ones still warm (`cachestat`) and leave those to the loader thread, and the next ones are read ahead now:
        the rest of the sweep does not read from the disk in the compute thread, one layer at a time. Each map that
        finds its layer warm returns it to being mapped in place."""
        self._from_disk.update(self._streamed)
        self._schedule_after(index)

    def _maps_ahead(self, index: int) -> bool:
        """CPU: whether layer `index` is mapped by a map thread, ahead of its use: where its last map read it from
        the disk (or it was not mapped yet). Reads from the disk then overlap in two ways: two full-precision layers
        are read at once (`MAP_STREAMS`), and a layer of quantized weights is read while the loader thread decodes
        the one before (decoding takes about as long as reading the packed bytes here). Both need `prefetch` >= 2:
        a layer's map and its load in the loader thread are scheduled together, so with 1 a single map is in
        flight, and the decoding waits for it. A layer its last map found in the page cache is mapped where it is
        used, by the compute thread (`_maps_in_place`) or the loader thread: a map thread would only add a hand-over
        per layer to a warm sweep."""
        return bool(self._mappers) and self._map and index in self._from_disk

    def _map_ahead(self, index: int) -> tuple[dict[str, torch.Tensor], float] | None:
        """In a map thread: layer `index`'s map, populated (read from the disk), and the seconds it took; `None`
        where the loader thread is to map (or read) it just before use: when the whole file is in the page cache
        (`cachestat` tells; mapping ahead gains nothing there, and its pages would be resident one layer earlier:
        30-40 MB more peak RSS on the 4-bit bench model, measured here), or when mapping is off."""
        header = self.shards.header(layer_unit(index))
        t0 = time.perf_counter()
        if _known_cached(header):
            return None
        raw = self._map_file(header, index)
        return (raw, time.perf_counter() - t0) if raw is not None else None

    # -- loading --------------------------------------------------------------------------------------------------

    def _in_parts(self, work, start: int, end: int, count: int | None = None) -> None:
        """`work(lo, hi)` over `[start, end)` cut into up to `count` (default `read_streams`) parts (`_parts`), all
        at once: the first in this thread, the others in helper threads. Returns when every part has finished (no
        helper still writes into a buffer the caller may free), raising the first failure."""
        parts = _parts(start, end, self.read_streams if count is None else count)
        if len(parts) == 1:
            work(start, end)
            return
        if self._helpers is None:
            self._helpers = _Executor(
                max_workers=self.read_streams - 1, thread_name_prefix="hf_layerstream-loader-read"
            )
        futures = [self._helpers.submit(work, lo, hi) for lo, hi in parts[1:]]
        error = None
        try:
            work(*parts[0])
        except BaseException as e:  # noqa: BLE001 - raised below, once the other parts are done
            error = e
        for f in futures:
            try:
                f.result()
            except BaseException as e:  # noqa: BLE001
                error = error or e
        if error is not None:
            raise error

    def _relative(self, index: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prefix = self.layer_prefixes[index]
        return {name[len(prefix) :] if name.startswith(prefix) else name: t for name, t in tensors.items()}

    def _finish(
        self,
        unit: str,
        raw: dict[str, torch.Tensor],
        index: int,
        mapped: bool = False,
        times: dict | None = None,
        skip: frozenset = frozenset(),
        buffers=None,
    ) -> dict[str, torch.Tensor]:
        """Stored tensors (host or device) -> logical tensors on the device, at the model's dtypes. `mapped`: `raw`
        views a private map of the file used for this sweep only; packed parts leave the resident set once decoded,
        and stored tensors once cast (so a layer's stored and decoded or cast weights are not both resident until its
        use ends: the plan counts a layer in flight at the compute dtype only). The weights
        in `deferred` stay packed (`PackedWeight`, its parts on the device). `buffers`: where 4-bit and 8-bit
        weights are decoded on CPU (a streamed layer's: see `quant.DecodeBuffers`)."""
        entry = self.shards.unit(unit)
        out: dict[str, torch.Tensor] = {}
        try:
            return self._finish_into(out, entry, raw, index, mapped, times, skip, buffers)
        except BaseException:
            if buffers is not None:  # (a decode failing part way: the buffers its first weights took go back)
                buffers.give(buffers.addresses(out.values()))
            raise

    def _finish_into(self, out, entry, raw, index, mapped, times, skip, buffers) -> dict[str, torch.Tensor]:
        """`_finish`'s work, filling `out`."""
        from .quant import PackedWeight, dequantize_tensor

        t_deq = 0.0
        t_copy = 0.0
        # copies are asynchronous on CUDA: when profiling (only then) wait for each, so the times are real
        sync = torch.cuda.current_stream(self.device).synchronize if (self.is_cuda and self.profile) else _noop
        for name, info in entry.tensors.items():
            if name in skip:
                continue
            target = self.target_dtypes.get(name, info.dtype)
            if info.quant is not None:
                parts = {p: raw[f"{name}::{p}"] for p in info.quant["parts"]}
                if name in self.deferred:
                    if any(part.device != self.device for part in parts.values()):
                        t0 = time.perf_counter()
                        # (as the codec copies them: asynchronously from pinned memory, a file map's pages synchronously)
                        parts = {p: part.to(self.device, non_blocking=part.is_pinned()) for p, part in parts.items()}
                        sync()
                        t_copy += time.perf_counter() - t0
                    value = PackedWeight(parts, info.quant, target, self.device)
                else:
                    t0 = time.perf_counter()
                    value = dequantize_tensor(parts, info.quant, device=self.device, dtype=target, buffers=buffers)
                    if mapped:
                        for part in parts.values():
                            release_mapped_pages(part)
                    sync()
                    t_deq += time.perf_counter() - t0
            else:
                value = raw[name]
                if value.device != self.device:
                    t0 = time.perf_counter()
                    value = value.to(self.device, non_blocking=True)
                    sync()
                    t_copy += time.perf_counter() - t0
                if value.dtype != target:
                    stored = value
                    value = value.to(target)
                    if mapped:  # the cast is a copy: the stored bytes leave the resident set now, as decoded parts do
                        release_mapped_pages(stored)
            out[name] = value
        if times is not None:  # a streamed layer's: added to the profile when it is used
            times.update(dequantize=t_deq, copy=t_copy)
        elif self.profile is not None and index >= 0:
            self.profile.add(index, dequantize=t_deq, copy=t_copy)
        return out

    def kept(self, index: int) -> dict[str, torch.Tensor]:
        """The tensors of layer `index`, which the plan keeps on the device (loaded now if never used yet)."""
        return self._kept_ready(index).tensors

    def _kept_ready(self, index: int) -> _Ready:
        return self._device_cache.get(index) or self._load_device_resident(index)

    def _load_device_resident(self, index: int) -> _Ready:
        self._warm_kept_ahead(index)  # (the next kept layers read from the disk while this one is and runs)
        unit = layer_unit(index)
        # in the compute thread, at the layer's first use, kept for every later one: made outside inference mode
        # whatever the caller's, as a loaded model's weights are (an inference tensor cannot be saved for backward)
        header = self.shards.header(unit)
        with torch.inference_mode(False):
            mm, raw = map_file(header)
            tensors = self._relative(index, self._finish(unit, raw, index))
        if self.is_cuda:  # as for the resident parts: a later pass run on another stream must find them there
            torch.cuda.current_stream(self.device).synchronize()
        else:  # (its tensors view the file's map)
            self._kept_files[unit] = (header, mm)
        # (one `_Ready` for every use: releasing a kept layer changes nothing in it)
        ready = self._device_cache[index] = _Ready(tensors)
        return ready

    def host_tensor(self, index: int, name: str) -> torch.Tensor:
        """Layer `index`'s tensor `name` (relative to the layer) in host memory of its own, at the model's dtype (a
        quantized one dequantized), read from its file, off the streaming path: what transformers' `save_pretrained`
        asks of an offloaded layer, one tensor at a time (`LayerStreamingHook.weights_map`). Only that tensor's
        bytes are read (the file is mapped), and nothing is kept."""
        unit = layer_unit(index)
        full = self.layer_prefixes[index] + name
        if full not in self.shards.unit(unit).tensors:
            raise KeyError(name)
        return self._host_value(unit, mmap_tensors(self.shards.header(unit)), full, copy=True)

    def load_resident(self, on_host: Collection[str] = (), pinned: Collection[str] = ()) -> dict[str, torch.Tensor]:
        """The resident parts (embeddings, final norm, head), at the model's dtypes, on the device; those named in
        `on_host` in host memory instead (views of the file's map where no cast or decoding is needed; a pinned copy
        on CUDA for those named in `pinned` too, which are copied to the device at each forward pass)."""
        header = self.shards.header(RESIDENT)
        if not self.is_cuda and header.data_offset % DATA_ALIGN:
            logger.warning(
                "%s was split by an older hf_layerstream: the tensors in its files do not start on %d-byte cache "
                "lines, and the CPU computes with them in place (memory maps), about 10%% slower than it could. "
                "Split the checkpoint again into a new directory to fix it.",
                self.shards.path,
                DATA_ALIGN,
            )
        mm, raw = map_file(header)
        if not self.is_cuda or set(on_host) - set(pinned):  # (on CUDA, parts in host RAM may be views of the map)
            self._kept_files[RESIDENT] = (header, mm)
        skip = frozenset(on_host)
        out = self._finish(RESIDENT, raw, -1, skip=skip)
        for name in skip:
            value = self._host_value(RESIDENT, raw, name)
            if self.is_cuda and name in pinned:  # (pinned at its exact size, as host-tier layers are)
                buf = self._pinned.empty(value.numel() * value.element_size())
                value = buf.view(value.dtype).view(value.shape).copy_(value)
            out[name] = value
        if self.is_cuda:  # queued on the stream current now: a pass run on another stream must find them there
            torch.cuda.current_stream(self.device).synchronize()
        return out

    def _host_value(self, unit: str, raw: dict[str, torch.Tensor], full: str, copy: bool = False) -> torch.Tensor:
        """Tensor `full` of `unit` in host memory at the model's dtype, from `raw` (views of the file's map): the view
        itself when it needs no decoding or cast, unless `copy`."""
        from .quant import dequantize_tensor

        info = self.shards.unit(unit).tensors[full]
        target = self.target_dtypes.get(full, info.dtype)
        if info.quant is not None:
            parts = {p: raw[f"{full}::{p}"] for p in info.quant["parts"]}
            return dequantize_tensor(parts, info.quant, device="cpu", dtype=target)
        return raw[full].to(target, copy=copy)

    def _read_file(self, header: Header, buf, index: int) -> tuple[dict[str, torch.Tensor], str]:
        """Read a layer file into `buf` (laid out as the file; an array, `buffer.numpy()`) and return views of its
        tensors. Each view's memory holds a reference to `buf`: while `buf` is alive, something still reads it.

        Through the page cache when the file is there or the plan keeps it there; else with `O_DIRECT`, which reads
        straight from the disk into our buffer (no kernel copy competing with the compute for CPU time, no page
        cache filled with a layer that will be evicted before the next sweep anyway).
        """
        size = header.file_size
        view = memoryview(buf)
        fd = _open(header)
        try:
            check = getattr(header, "check_unchanged", None)
            if check is not None:  # a file replaced or rewritten under a running model fails loudly, naming it
                check(fd)
            how = "page_cache"
            cached = _page_cached(fd, header)
            if self._direct and not cached and not self.plan.keeps_in_page_cache(index):
                try:
                    self._read_direct(header, view)
                    how = "direct"
                except OSError as e:
                    # a file system without O_DIRECT refuses it with EINVAL (at open, or at the first read); any
                    # other error (an I/O error, say) is the file's, and reading it again is the caller's retry
                    if isinstance(e, ShardFileError) or e.errno != errno.EINVAL:
                        raise
                    logger.info("O_DIRECT reads refused for %s (%s); reading through the page cache", header.path, e)
                    self._direct = False
            if how == "page_cache":
                # from the disk: in parts at once; from the page cache: in parts too on CUDA (the host's cores are
                # not computing), in one on the CPU (they are)
                self._in_parts(
                    lambda lo, hi: _read_part(fd, view, lo, hi, hi, header.path, size),
                    header.data_offset,
                    size,
                    1 if cached and not self.is_cuda else None,
                )
                if not cached and not self.plan.keeps_in_page_cache(index):
                    # through the page cache only where O_DIRECT is refused or missing: its pages go, as the plan
                    # says (a model larger than RAM would otherwise push everything else out of the cache)
                    _advise(fd, 0, 0, "POSIX_FADV_DONTNEED")
        finally:
            os.close(fd)
            view.release()
        self.reads[how] += 1
        return _views(header, buf, header.data_offset), how

    def _map_file(self, header: Header, index: int = -1) -> dict[str, torch.Tensor] | None:
        """CPU only: map the layer file instead of copying it (zero-copy, no memcpy taking CPU time from the compute)
        and build its page tables here, in the loader thread (or the map thread), so the compute takes no page
        faults. Pages not in the page cache are read in on the way, with huge-page read-ahead (see `advise_huge`).
        The mapping is private (copy-on-write; populated, it maps the page cache read-only, as a read-only map
        would, in the same folios): an in-place write to a weight from a hook inside the layer's pass changes that
        pass's weights, as a copy's would, and `release` drops it (a read-only map killed the process with SIGSEGV).
        Returns `None` where mapping is off or unavailable.

        A streamed layer's map (with its tensor views) is made at its first use and kept: `release` takes its pages
        out of the resident set (`MADV_DONTNEED`; they stay in the page cache), and the next use populates the same
        map again. Measured here on a warm 86 MB layer, that takes about half the time of mapping it afresh (no
        `mmap`, no views to build, and the page-table pages are reused), and the resident set is the same. Where pages
        cannot be released (no `madvise`), a map lives as long as the tensors viewing it."""
        map_populate = getattr(mmap, "MAP_POPULATE", None)
        if map_populate is None or not self._map or header.file_size == 0:
            return None
        kept = self._maps.get(index)
        if kept is not None and (kept.header is not header or kept.written_since()):
            # the directory's headers were read again since the map was made (`ShardDirectory.verify`): the map holds
            # the file as it was then, the header the file as it is now; or a weight of its last use, kept by the
            # caller, was written since, in the map's pages: map it anew (that weight keeps the map it views)
            self._maps.pop(index, None)
            kept = None
        populating = self._populate  # (read once: the loader and the map thread may both be here)
        if kept is not None:  # a map we have: one `stat` of the path checks the file, nothing to open
            _check_file(header, _stat(header))
            mm = kept.mm
        else:
            try:  # (out of descriptors, one per map kept; `vm.max_map_count`; `ulimit -v`: see `errors.unreadable`)
                fd = os.open(header.path, os.O_RDONLY)
                try:
                    _check_file(header, os.fstat(fd))
                    # (an older kernel: populated at mmap time, over the page cache's pages, see `map_populated`)
                    mm = None if populating else map_populated(fd, header.file_size)
                    if mm is None:
                        flags = mmap.MAP_PRIVATE | (0 if populating else map_populate)
                        mm = mmap.mmap(fd, header.file_size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                finally:
                    os.close(fd)
            except OSError as e:
                raise _open_error(header.path, e) from e
            if populating:
                advise_huge(mm)
        if populating:
            before = thread_usage()
            try:
                done = populate(mm, header.path, kept.address if kept is not None else None)
            except (ShardFileError, MemoryError):
                if kept is None:
                    mm.close()
                else:  # a map whose file could not be read: the next use maps it anew
                    kept.release_pages()
                    self._maps.pop(index, None)
                raise
            if not done:  # an older kernel: populate at mmap time instead (no huge read-ahead, no kept maps)
                if kept is not None:  # (a kept map worked before: its views may be in use, it must not be closed)
                    raise ShardFileError(header.path, "could no longer be populated (MADV_POPULATE_READ refused)")
                mm.close()
                self._populate = False
                return self._map_file(header, index)
            after = thread_usage()
            # judged only when (almost) nothing came from the disk: reading costs CPU too, whatever the folio size
            # (and what was just read came in through the huge-page advice: no reason to drop it again)
            warm = not _read_from_disk(before, after, header.file_size)
            if warm and after[0] - before[0] > _SMALL_PAGES_CPU_PER_MIB * header.file_size / 2**20:
                self.small_page_layers.add(index)
            else:
                self.small_page_layers.discard(index)
            if warm:
                self._from_disk.discard(index)
            elif index >= 0:
                self._from_disk.add(index)
            if kept is None and self._keep_maps and index >= 0:
                kept = _LayerMap(mm, map_address(mm), _views(header, mm, header.data_offset), header)
                self._maps[index] = kept
        return kept.views if kept is not None else _views(header, mm, header.data_offset)

    def _keep_cached(self, index: int, header: Header) -> bool:
        """Whether a mapped streamed layer's pages stay in the page cache after use: as the plan says, unless they
        are there in small folios (see `_SMALL_PAGES_CPU_PER_MIB`): then drop them once or twice, so they come back
        in 2 MiB folios."""
        if not self.plan.keeps_in_page_cache(index):
            return False
        if index not in self.small_page_layers or header.file_size < _REPAIR_MIN_BYTES or not huge_pages_enabled():
            return True
        done = self.repairs.get(index, 0)
        if done >= _MAX_REPAIRS:
            return True
        self.repairs[index] = done + 1
        logger.info(
            "Decoder layer %d is in the page cache in small pages (mapping it costs CPU at every sweep); dropping it "
            "after use so the next read brings it back in 2 MiB pages (%d of at most %d).",
            index,
            done + 1,
            _MAX_REPAIRS,
        )
        return False

    def _read_direct(self, header: Header, view: memoryview) -> None:
        size = header.file_size
        end = _round_up(size)  # the buffer's size: the last read asks for whole blocks
        fd = _open(header, os.O_RDONLY | os.O_DIRECT)
        try:
            check = getattr(header, "check_unchanged", None)
            if check is not None:  # (opened again: the file checked on the other descriptor may have been replaced)
                check(fd)
            self._in_parts(
                lambda lo, hi: _read_part(fd, view, lo, hi, end if hi == size else hi, header.path, size), 0, size
            )
        finally:
            os.close(fd)

    def _load_streamed(self, index: int, ahead: Future | None = None) -> _Ready:
        """Runs in the loader thread. `ahead`: the map thread's `_map_ahead` of this layer, if it was asked."""
        unit = layer_unit(index)
        header = self.shards.header(unit)
        tier = self.plan.tier(index)
        t0 = time.perf_counter()
        read_s = None  # the map thread's time, for a layer it mapped
        buffer = array = None  # a pool buffer read into, and its array, which every view of its bytes holds
        nread = 0
        mapped = False
        if tier == "host":
            raw = self._host_cache.get(index)
            if raw is None:
                buf = _aligned_buffer(header.file_size, self._pinned)
                try:
                    raw, _ = self._read_file(header, buf.numpy(), index)
                except BaseException:
                    if self._pinned is not None:  # a retry reads into a new buffer: do not keep this one pinned
                        self._pinned.free(buf)
                    raise
                self._host_cache[index] = raw
                nread = header.data_size
        else:
            done = ahead.result() if ahead is not None else None
            if done is not None:  # mapped by the map thread, while this thread decoded the layers before
                raw, read_s = done
            else:
                raw = self._map_file(header, index) if not self.is_cuda else None
            mapped = raw is not None
            if mapped:
                with self._lock:
                    self.reads["mapped"] += 1
                self._pool.discard_one()
            else:
                # (as many as the plan counts: one per layer read from the disk in flight, see `_staging_bytes`)
                limit = min(self.prefetch + 1, len(self.plan.streamed)) if self.is_cuda else None
                buffer = self._pool.take(self._staging_size, limit)
                array = buffer.numpy()
                try:
                    raw, _ = self._read_file(header, array, index)
                except BaseException:
                    self._pool.give(buffer, [])  # nothing views it yet: a failed read must not leak a (pinned) buffer
                    raise
            nread = header.data_size
        if read_s is None:
            read_s = time.perf_counter() - t0
        times = {"read": read_s, "bytes_read": nread} if self.profile is not None else None
        if not self.is_cuda:
            kept = self._maps.get(index) if mapped else None
            try:
                if kept is not None and kept.finished is not None:  # the views it gave last time, as they are
                    tensors = kept.finished
                    if times is not None:
                        times.update(dequantize=0.0, copy=0.0)
                else:
                    tensors = self._relative(
                        index, self._finish(unit, raw, index, mapped=mapped, times=times, buffers=self._decoded)
                    )
                    if kept is not None and raw is kept.views:
                        # nothing decoded or cast: the layer's tensors are its map's views (or packed weights of
                        # them), the same at every use
                        if {id(t) for t in _leaves(tensors)} == {id(t) for t in raw.values()}:
                            kept.finished = tensors
            except BaseException:
                if buffer is not None:  # (the failed decode's views, alive in the traceback, keep it from reuse)
                    self._pool.give(buffer, [weakref.ref(array)])
                raise
            # every tensor made from the buffer's bytes (the views, what was made of them, and what an autograd graph
            # saved of those: a weight that `nn.Parameter` wrapped, a transposed view) keeps `array` alive
            views = [weakref.ref(array)] if buffer is not None else []
            evict = header.path if mapped and not self._keep_cached(index, header) else None
            repair = evict is not None and self.plan.keeps_in_page_cache(index)
            return _Ready(
                tensors,
                None,
                (self._pool, buffer, views) if buffer is not None else None,
                mapped,
                evict,
                repair,
                times,
                header,
            )
        # CUDA: copy (and dequantize/cast) on the side stream; the compute stream waits on the event, and the
        # staging buffer goes back to the pool tagged with the event, to be refilled once the copy has landed
        try:
            self._wait_released()
        except BaseException:
            if buffer is not None:  # nothing was queued from it yet
                self._pool.give(buffer, [])
            raise
        with torch.cuda.device(self.device), torch.cuda.stream(self._copy_stream):
            try:
                tensors = self._relative(index, self._finish(unit, raw, index, times=times))
            finally:  # also when a copy or decode failed half way: the buffer returns once what was queued has run
                event = _loader_event()
                event.record(self._copy_stream)
                if buffer is not None:
                    self._pool.give(buffer, [], event)
        return _Ready(tensors, event, None, times=times)

    def wait_released_passed(self) -> None:
        """CUDA, in the compute thread, before it allocates beside the layers (the output head's copy, kept in host RAM):
        wait until the GPU has passed every streamed layer released so far, so that the memory of the last one (freed
        as its forward was queued, still read by its kernels) is free again, as the plan counts it (the head's copy
        and the layers read ahead, not one more). Waits on the newest release, which the loader may already have taken
        from its queue while the GPU still runs that layer (the compute stream passes them in order)."""
        newest = self._last_released
        if newest is not None:
            newest.synchronize()

    def _wait_released(self) -> None:
        """CUDA, in the loader thread: wait until the GPU has finished every streamed layer released so far.

        The compute thread only queues kernels, so it can run many layers ahead of the GPU. A released layer's memory
        (freed with `record_stream`) goes back to the caching allocator only once the compute stream has passed it;
        copying the next layer before then would allocate anew, and device memory would grow towards every streamed
        layer of a sweep. Waiting here keeps it at (prefetch + 1) layers, and costs no overlap: the read from the disk
        is done by now, and the copy still has the compute of the `prefetch` layers before it to hide behind."""
        while True:
            try:
                done = self._released.popleft()
            except IndexError:
                return
            done.synchronize()


def check_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if not isinstance(device, (str, torch.device, numbers.Integral)) or isinstance(device, bool):
        # (a wrong type is a TypeError, as for every argument of the public API: 1.5 and [0] were a ValueError, and
        # True was taken as GPU 1)
        raise TypeError(
            f"`device` must be a str, an int (a GPU's index) or a torch.device (e.g. 'cpu', 'cuda', 'cuda:1'), got "
            f"{type(device).__name__}."
        )
    try:
        # (an index as NumPy's integer too, as `prefetch` takes them: `torch.device(np.int64(0))` failed without CUDA
        # as "not a valid torch device", where 0 is told CUDA is not available)
        if isinstance(device, numbers.Integral):
            device = torch.device("cuda", int(device))
        else:
            device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"`device` {device!r} is not a valid torch device (e.g. 'cpu', 'cuda', 'cuda:1').") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"`device` is {device} but CUDA is not available here; pass device='cpu'.")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            # (else the plan's `mem_get_info`, or the loader's stream, failed with CUDA's "invalid device ordinal")
            count = torch.cuda.device_count()
            raise ValueError(
                f"`device` is {device} but this machine has {count} CUDA device{'' if count == 1 else 's'} "
                f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})."
            )
    elif device.type != "cpu":
        raise ValueError(f"`device` {device} is not supported yet; use 'cpu' or a CUDA device.")
    elif device.index is not None:
        # "cpu:0" is the CPU, but not equal to torch.device("cpu"), which the tensors made there report: every
        # `tensor.to(device)` would copy (a streamed layer's file map, at every use) where it should leave it in place
        device = torch.device("cpu")
    return device


__all__ = ["LayerLoader", "ResidencyPlan", "plan_residency", "Profile", "parse_size", "ShardDirError"]
