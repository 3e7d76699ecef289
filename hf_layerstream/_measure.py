"""Measure one way of running a model in a fresh child process: tokens, seconds per token, peak memory.

Each system runs in its own process so peak memory is its own: we read `VmHWM` from `/proc/self/status` inside
the child (`ru_maxrss` would carry the parent's peak across fork+exec). The child prints one JSON line.

    python -m hf_layerstream._measure '{"system": "streamed", "path": "...", ...}'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def _status_bytes(field: str) -> int:
    """A `kB` field of /proc/self/status in bytes (0 where /proc is not available)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def vm_hwm() -> int:
    """Peak resident set size of this process in bytes."""
    return _status_bytes("VmHWM")


def vm_rss() -> int:
    """Current resident set size of this process in bytes."""
    return _status_bytes("VmRSS")


def library_rss() -> int:
    """Resident bytes of this process's shared-library mappings (`.so` files: their code and read-only data), from
    `/proc/self/smaps` (0 where it is not available). The first pass pages in library code a process had not run yet,
    which its peak RSS counts: 11 MiB of libtorch_cpu.so here with torch's CPU build, 27 MiB with its CUDA build."""
    total, library = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                parts = line.split()
                if parts[0].endswith(":"):  # (a field of the mapping above)
                    if library and parts[0] == "Rss:":
                        total += int(parts[1]) * 1024
                else:  # (a mapping: address range, permissions, offset, device, inode, then its path if any)
                    library = len(parts) > 5 and ".so" in os.path.basename(parts[5])
    except (OSError, ValueError, IndexError):
        return 0
    return total


def reset_peak_rss() -> bool:
    """Set this process's peak RSS (`VmHWM`) back to its current RSS (Linux 4.0: `/proc/self/clear_refs`); whether
    it could."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def disk_read_bytes() -> int | None:
    """Bytes this process (all its threads) has had read from storage: what did not come from the page cache
    (`getrusage(RUSAGE_SELF)`, the process-wide twin of `_safetensors.thread_usage`). `None` where unsupported."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_inblock * 512
    except (ImportError, AttributeError, OSError):
        return None


def cpu_ticks() -> tuple[int, int] | None:
    """The machine's CPU time so far, in clock ticks, from /proc/stat: `(steal, total)`. `steal` is the time a
    hypervisor gave this virtual machine's CPUs to something else while they had work (on some VMs the host's own
    emulation of the disk); `total` the time of every state, idle included. `None` where /proc/stat is missing."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != b"cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal (guest is within user)
    return ticks[7], sum(ticks)


def steal_share(spans: list[tuple[tuple[int, int] | None, tuple[int, int] | None]]) -> float | None:
    """The share of the CPU time stolen (see `cpu_ticks`) over `spans`, `(before, after)` pairs of `cpu_ticks()`."""
    steal = total = 0
    for before, after in spans:
        if before is None or after is None:
            return None
        steal += after[0] - before[0]
        total += after[1] - before[1]
    return steal / total if total > 0 else None


def drop_page_cache(paths) -> None:
    """Evict files from the page cache (POSIX_FADV_DONTNEED), simulating a model larger than RAM; each is checked and
    dropped again where pages were busy a moment (`_evict(whole=True)`): a cold run's file read partly warm is not
    cold."""
    from .engine import _evict

    for path in paths:
        _evict(path, whole=True)


def cached_after_drop(paths) -> float | None:
    """Drop `paths` from the page cache and return the share of their bytes still in it, or `None` where that cannot
    be told (`cached_fraction`). About 0 where the drop works; about 1 on a file system that keeps files in memory
    (tmpfs: the drop does nothing), or where something else maps the files: cold reads there are not cold."""
    from ._safetensors import cached_fraction

    for path in paths:  # dirty pages are not dropped: a file just written (a fresh split) would look cached
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
    drop_page_cache(paths)
    cached = total = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            size = os.fstat(fd).st_size
            fraction = cached_fraction(fd, size)
        finally:
            os.close(fd)
        if fraction is None:
            return None
        cached += fraction * size
        total += size
    return cached / total if total else None


class _TokenClock:
    """A streamer that timestamps every generated token (the first `put` is the prompt).

    `before_forward` (the cold runs' page-cache eviction) runs after the timestamp and its time is excluded: each
    step is timed from `resumed[i]` (after the eviction) to `times[i + 1]`. The seconds it returns, if any (a wait
    for reads the step just ended started), count in that step, as `_DiskPairing` counts its waits.
    """

    def __init__(self, before_forward=None):
        self.times: list[float] = []
        self.resumed: list[float] = []
        self.counts: list[int] = []
        self.ticks: list[tuple] = []  # `cpu_ticks()` at each put, and after its `before_forward`
        self.before_forward = before_forward

    def put(self, value):
        self.times.append(time.perf_counter())
        at_put = cpu_ticks()
        # plain decoding puts one token per row ([batch]); assisted decoding puts the accepted tokens ([1, n])
        self.counts.append(int(value.shape[-1]) if getattr(value, "ndim", 0) == 2 else 1)
        charged = self.before_forward() if self.before_forward is not None else None
        self.times[-1] += charged or 0.0
        self.ticks.append((at_put, cpu_ticks()))
        self.resumed.append(time.perf_counter())

    def end(self):
        pass

    def decode_steps(self) -> list[tuple[float, int]]:
        """(seconds, tokens produced) of each decode step after the first generated token."""
        return [(self.times[i + 1] - self.resumed[i], self.counts[i + 1]) for i in range(1, len(self.times) - 1)]

    def step_ticks(self) -> list[tuple]:
        """`cpu_ticks()` at the start and end of each decode step (the spans `decode_steps` times)."""
        return [(self.ticks[i][1], self.ticks[i + 1][0]) for i in range(1, len(self.ticks) - 1)]


def weight_files(system: str, path: str) -> list[str]:
    from pathlib import Path

    root = Path(path)
    return (
        [str(p) for p in sorted(root.rglob("*.safetensors"))]
        + [str(p) for p in sorted(root.rglob("*.bin"))]
        + [str(p) for p in sorted(root.rglob("*.dat"))]
    )


def _count_sweeps(model) -> list[int]:
    """Count forward passes through the first decoder layer (one per sweep over the layers, whatever the system)."""
    from .modeling import find_layer_stack

    counter = [0]
    stack = find_layer_stack(model)
    if stack is not None:

        def bump(module, args):
            counter[0] += 1

        stack.layers[0].register_forward_pre_hook(bump)
    return counter


def _is_compressed(path: str) -> bool:
    """Whether `path` is a shard directory of quantized shards (its manifest names a compression)."""
    from .shard_dir import MANIFEST_NAME

    try:
        with open(os.path.join(path, MANIFEST_NAME)) as f:
            return bool(json.load(f).get("compression"))
    except (OSError, ValueError, AttributeError):
        return False


def _baseline_rss(path: str) -> int:
    """VmHWM once the libraries and the model's modeling code are imported, before any weight is loaded.

    Building the model on meta imports its transformers modules (~140 MB for Llama): every system pays that, so
    it belongs to the baseline, not to the weights. Likewise the codec of quantized shards: importing bitsandbytes
    took 70-114 MiB here (its CPU library and torch.compile set-up), code that any reader of those shards loads.
    """
    import gc

    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from . import stream  # noqa: F401
    from .modeling import model_from_config

    if _is_compressed(path):
        from .quant import load_backend

        load_backend()

    try:
        config = AutoConfig.from_pretrained(path)
        with init_empty_weights():
            model = model_from_config(config)
        del model
    except (OSError, ValueError, KeyError):  # the measurement itself will report a broken path
        pass
    gc.collect()
    return vm_hwm()


def _offload_device_map(spec: dict) -> dict:
    """accelerate's disk offload placed as ours streams: every decoder layer on disk, and what holds weights outside
    the layers (embeddings, final norm, head, rotary frequencies) where the compute runs (the CPU, or the GPU of
    `offload_device`). A budget-based "auto" map put those on disk too, and accelerate then read the embeddings and
    head from the disk at every token, which ours do not: bytes the comparison did not count, in our favour."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from .modeling import model_from_config, require_layer_stack

    with init_empty_weights():
        skeleton = model_from_config(AutoConfig.from_pretrained(spec["path"]))
    stack = require_layer_stack(skeleton)
    home = int(spec["offload_device"]) if spec.get("offload_device") is not None else "cpu"
    device_map: dict = {f"{stack.prefix}.{i}": "disk" for i in range(len(stack))}
    for name, module in skeleton.named_modules():
        if name.startswith(stack.prefix + "."):
            continue
        if (
            next(module.parameters(recurse=False), None) is not None
            or next(module.buffers(recurse=False), None) is not None
        ):
            device_map[name] = home
    return device_map


def _load(spec: dict):
    import torch
    from transformers import AutoConfig

    from .modeling import auto_class_for

    system = spec["system"]
    dtype = getattr(torch, spec["dtype"]) if spec.get("dtype") else None
    if system == "baseline":
        # the interpreter with torch and transformers imported and the model built on meta: what every system pays
        from accelerate import init_empty_weights

        from .modeling import model_from_config

        with init_empty_weights():
            model = model_from_config(AutoConfig.from_pretrained(spec["path"]))
        return model, []
    if system in ("in_memory", "accelerate_offload"):
        # AutoModelForCausalLM, or AutoModelForImageTextToText for a vision-language model (as the shards were split)
        model_class = auto_class_for(AutoConfig.from_pretrained(spec["path"]))
    if system == "in_memory":
        # use_kernels=False: the plain model (transformers 5.25 swaps in hub kernels by default; ours computes with
        # the model's own modules)
        model = model_class.from_pretrained(spec["path"], dtype=dtype or "auto", use_kernels=False)
        if spec.get("device") and torch.device(spec["device"]).type != "cpu":
            model.to(spec["device"])  # the reference runs where ours does
        files = []
    elif system == "accelerate_offload":
        # accelerate's disk offload: the peer we compare against
        model = model_class.from_pretrained(
            spec["path"],
            dtype=dtype or "auto",
            use_kernels=False,
            device_map=_offload_device_map(spec),
            offload_folder=spec["offload_folder"],
        )
        # transformers 5 offloads safetensors weights by memory-mapping the checkpoint itself (offload_folder only
        # receives what is not already safetensors): evict both
        files = weight_files(system, spec["offload_folder"]) + weight_files(system, spec["path"])
    elif system == "streamed":
        from .cli import load_streamed_model

        model = load_streamed_model(
            spec["path"],
            device=spec.get("device"),
            dtype=dtype,
            max_memory=spec.get("max_memory"),
            reserve=spec.get("reserve"),
            prefetch=spec.get("prefetch"),
            profile=spec.get("profile", False),
            keep_in_page_cache=spec.get("keep_in_page_cache"),
            dequantize=spec.get("dequantize"),
        )
        files = weight_files(system, spec["path"])
    else:
        raise ValueError(f"unknown system {system!r}")
    return model.eval(), files


def _prompt(spec: dict, model):
    """The prompt batch (`input_ids` repeated `batch` times) on the model's input device, and greedy `generate`
    arguments producing exactly `max_new_tokens` tokens."""
    import torch

    device = model.device
    if device.type == "meta":  # accelerate offloaded the first parameter to disk: inputs start on the CPU
        device = torch.device("cpu")
    ids = torch.tensor([spec["input_ids"]], dtype=torch.long).repeat(int(spec.get("batch", 1)), 1).to(device)
    new = int(spec.get("max_new_tokens", 8))
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=spec.get("pad_token_id", 0),
    )
    return ids, kwargs


def measure(spec: dict) -> dict:
    """Run `spec` in this process: load, generate greedily, time every token. Returns a JSON-able dict.

    Keys of `spec`: `system` (`in_memory`, `accelerate_offload`, `streamed` or `baseline`), `path`, `input_ids`,
    `max_new_tokens`, and optionally `cold`, `batch`, `repeats`, `threads`, `dtype`, `device`, `max_memory`,
    `reserve`, `prefetch`, `profile`, `keep_in_page_cache`, `dequantize`, `offload_folder`, `assistant` (a draft
    model folder for assisted decoding), `pad_token_id`, `warmup` (warm runs only: one untimed `generate` first; default true), `disk_way`
    (cold runs of our model: pair every decode step with a read of the layer files it streams, that way, just before
    it; see `_DiskPairing`).
    """
    import torch

    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    baseline_rss = _baseline_rss(spec["path"])
    library_before = library_rss()
    cold = bool(spec.get("cold"))
    # before the model maps anything: whether the drop that makes a run cold leaves the weight files cached (tmpfs)
    cached_share = cached_after_drop(weight_files(spec["system"], spec["path"])) if cold else None
    t0 = time.perf_counter()
    model, files = _load(spec)
    load_s = time.perf_counter() - t0
    if spec["system"] == "baseline":
        return {"system": "baseline", "peak_rss": vm_hwm(), "baseline_rss": baseline_rss, "load_s": load_s}
    if cold and not files:
        raise ValueError(f"system {spec['system']} has no weight files to evict; cold runs need a disk-backed system")
    ids, kwargs = _prompt(spec, model)
    batch = ids.shape[0]
    device = ids.device
    # where the model computes: accelerate's offload takes its inputs on the CPU and computes on its GPU
    gpu = device if device.type == "cuda" else None
    if gpu is None and spec.get("offload_device") is not None:
        gpu = torch.device("cuda", int(spec["offload_device"]))
    extra = {}
    if spec.get("assistant"):
        from transformers import AutoModelForCausalLM

        extra["assistant_model"] = (
            AutoModelForCausalLM.from_pretrained(spec["assistant"], use_kernels=False).to(device).eval()
        )
    kwargs.update(extra)
    sweeps = _count_sweeps(model)
    evict = (lambda: drop_page_cache(files)) if cold else None
    if cold and spec["system"] == "streamed":
        from .stream import get_streaming_state

        loader = get_streaming_state(model).loader

        def evict():
            # the loader's reads ahead finish first, and their wait counts in the step that started them: they must
            # not go on, untimed, while the page cache is dropped
            t0 = time.perf_counter()
            loader.wait_idle()
            waited = time.perf_counter() - t0
            drop_page_cache(files)
            return waited

    pairing = None
    # (the samples map files: only where the peak RSS can be set back after each, so they do not count as ours)
    loaded_peak = vm_hwm()  # (loading counts, as in every other row: the pairing below sets the high-water mark back)
    if cold and spec.get("disk_way") and spec["system"] == "streamed" and reset_peak_rss():
        pairing = _DiskPairing(model, files, spec["disk_way"])
        if pairing.layer_files:  # (a plan that streams nothing reads nothing to pair with)
            evict = pairing.before_forward
        else:
            pairing = None
    if not cold and spec.get("warmup", True):
        # warm means "the weights are in the page cache": one untimed call puts them there (whatever earlier runs
        # or the host's reclaim left) and, like any benchmark warm-up, pays first-call costs outside the timing
        with torch.no_grad():
            model.generate(ids, **kwargs)
    results = []
    spans = []  # the CPU time of every decode step timed: how much the hypervisor took (`steal_share`)
    read_before = disk_read_bytes()
    if gpu is not None:  # (once: the peak of every repeat, not the last one's)
        torch.cuda.reset_peak_memory_stats(gpu)
    for _ in range(int(spec.get("repeats", 1))):
        clock = _TokenClock(evict)
        if evict:
            evict()
        sweeps[0] = 0
        with torch.no_grad():
            out = model.generate(ids, streamer=clock, **kwargs)
        # paired with disk reads: each step with its wait for the read-ahead (which, unpaired, runs on in the
        # step's untimed eviction; with a read sampled there, it would be done before the next step began)
        steps = clock.decode_steps() if pairing is None else pairing.end_call(clock)
        spans += clock.step_ticks()
        results.append(
            {
                "prefill_s": clock.times[1] - clock.resumed[0] if len(clock.times) > 1 else None,
                "steps": steps,
                "sweeps": sweeps[0],
                "new_tokens": int(out.shape[1] - ids.shape[1]),
            }
        )
    # seconds per generated token: median over plain decode steps (one token each), or, when a step yields several
    # tokens (assisted decoding), total decode time over the tokens it produced
    read_after = disk_read_bytes()
    per_token = sorted(dt / max(n, 1) for r in results for dt, n in r["steps"])
    median = per_token[len(per_token) // 2] if per_token else None
    total_t = sum(dt for r in results for dt, _ in r["steps"])
    total_n = sum(n for r in results for _, n in r["steps"])
    last = results[-1]
    info = {
        "system": spec["system"],
        "cold": cold,
        "batch": batch,
        "load_s": load_s,
        "s_per_token": median if not extra else (total_t / total_n if total_n else None),
        "mean_s_per_token": total_t / total_n if total_n else None,
        "tokens": out[0, ids.shape[1] :].tolist(),
        "new_tokens": last["new_tokens"],
        "sweeps": last["sweeps"],
        "sweeps_per_token": last["sweeps"] / max(last["new_tokens"], 1),
        "peak_rss": max(vm_hwm(), pairing.peak_rss if pairing else 0, loaded_peak),
        "baseline_rss": baseline_rss,
        # (of the growth over the baseline: library code the run paged in, not what it holds; see `library_rss`)
        "library_rss_growth": library_rss() - library_before,
        # bytes read from storage while generating, and sweeps made: a warm run that reads much is not warm
        "disk_read_bytes": (read_after - read_before - (pairing.sampled_bytes if pairing else 0))
        if read_before is not None and read_after is not None
        else None,
        "total_sweeps": sum(r["sweeps"] for r in results),
        "cuda_peak": torch.cuda.max_memory_allocated(gpu) if gpu is not None else None,
        # what the caching allocator held at most (blocks freed on one stream wait there until the other passes them)
        "cuda_reserved_peak": torch.cuda.max_memory_reserved(gpu) if gpu is not None else None,
        "prefill_s": last["prefill_s"],
        "threads": torch.get_num_threads(),
        "cpu_steal_share": steal_share(spans),
    }
    if cold:
        info["cold_cached_share"] = cached_share
    if pairing is not None:
        info["paired_disk"] = pairing.report()
    from .stream import get_streaming_state

    state = get_streaming_state(model)
    if state is not None:
        info["plan"] = state.plan.summary()
        info["plan_data"] = state.plan.to_dict()
        if state.last_profile is not None:
            info["profile"] = state.last_profile["totals"]
    return info


class _DiskPairing:
    """Cold runs of our model: each decode step against a read of the same bytes from the disk, just before it.

    The disk is shared: its bandwidth, measured minutes away from a run, went from 1.9 to 3.2 GB/s between runs
    here. So before every forward pass (after the previous one's timestamp, untimed) this waits for the loader's
    read-ahead (that wait is the previous step's: the bytes it reads belong to the sweep just timed), drops the weight
    files from the page cache, reads the layer files the model streams (`disk_way`, a way of `bench.disk_ways`, timed:
    the sample), and drops them again. Each step's ratio is its time (with its wait) over the time the sample's bandwidth
    needs for the bytes a sweep streams: 1.0 means the step ran at the speed of a plain read of its bytes, with
    nothing else running. The sample's bandwidth counts the bytes it read from the disk (`disk_read_bytes`): the
    layers read ahead for the next step are mapped, so the eviction leaves them, and the sample finds them cached.
    The samples map files too: the peak RSS is recorded before each and set back after it (`reset_peak_rss`).
    """

    def __init__(self, model, files: list[str], way: str):
        from .bench import disk_ways
        from .modeling import layer_unit
        from .stream import get_streaming_state

        state = get_streaming_state(model)
        self.loader = state.loader
        shards = self.loader.shards
        self.layer_files = [str(shards.files[layer_unit(i)]) for i in state.plan.streamed]
        self.files = files
        self.swept = sum(os.path.getsize(p) for p in self.layer_files)
        ways = disk_ways(files=len(self.layer_files))
        # (a way reading several files at once, for a plan that streams one file: that way, one file at a time)
        self.way_name = way if way in ways else way.split(", ")[0]
        self.way = ways[self.way_name]
        self.waits: list[float] = []
        self.samples: list[float] = []  # bandwidth of each read, bytes per second
        self.sampled_bytes = 0  # read from the disk by the samples (not by the model)
        self.peak_rss = 0  # the peak RSS before each sample (it is set back after each)
        self.steps: list[float] = []
        self.sample_bandwidth: list[float] = []
        self.ratios: list[float] = []

    def before_forward(self) -> None:
        t0 = time.perf_counter()
        self.loader.wait_idle()
        self.waits.append(time.perf_counter() - t0)
        self.peak_rss = max(self.peak_rss, vm_hwm())  # the model's peak so far; the sample's own is not
        drop_page_cache(self.files)
        before = disk_read_bytes()
        t0 = time.perf_counter()
        nbytes, _ = self.way(self.layer_files)
        seconds = time.perf_counter() - t0
        after = disk_read_bytes()
        if before is not None and after is not None and after > before:
            nbytes = after - before
            self.sampled_bytes += nbytes
        self.samples.append(nbytes / max(seconds, 1e-9))
        drop_page_cache(self.files)
        reset_peak_rss()

    def end_call(self, clock: _TokenClock) -> list[tuple[float, int]]:
        """Pair the decode steps of the `generate` call just timed (its `before_forward` calls: one before the
        call, then one after each token), then start afresh for the next call. Returns its decode steps as
        `_TokenClock.decode_steps` does, each with its wait for the read-ahead."""
        waits, samples = self.waits, self.samples
        steps = []
        # `before_forward` call 0 is the eviction before `generate`, call k + 1 follows the streamer's put k (put 0:
        # the prompt, put k: token k); step i (i >= 1) runs from `resumed[i]` (after call i + 1, which took sample
        # i + 1) to `times[i + 1]`, and call i + 2 waits for its read-ahead
        for i, (dt, n) in enumerate(clock.decode_steps(), start=1):
            step = dt + waits[i + 2]
            steps.append((step, n))
            self.steps.append(step)
            self.ratios.append(step / (self.swept / samples[i + 1]))
        self.sample_bandwidth += samples[2 : len(waits) - 1]
        self.waits, self.samples = [], []
        return steps

    def report(self) -> dict:
        return {
            "way": self.way_name,
            "files": len(self.layer_files),
            "bytes_per_sweep": self.swept,
            "steps_s": self.steps,
            "sample_bandwidth": self.sample_bandwidth,
            "ratios": self.ratios,
            "ratio": _median(self.ratios) if self.ratios else None,
        }


def _median(values: list[float]) -> float:
    """The median (of an even count, the mean of the two middle values: not the upper one, which beside the middle
    half's nearest-rank quartiles read "median 3.73x, middle half 0.74x-3.73x" for two values)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _middle_half(values: list[float]) -> list[float]:
    """The lower and upper quartiles of `values` (nearest rank): half of them lie between the two."""
    ordered = sorted(values)
    k = (len(ordered) - 1) // 4
    return [ordered[k], ordered[-1 - k]]


def measure_paired(spec: dict) -> dict:
    """Warm, in one process: load every member of `spec["members"]` (the first is the reference), warm each with
    one untimed `generate`, then alternate timed `generate` calls between them, `calls` each (the order reversed on
    every other pass). Separate processes differ by several percent on a shared machine whatever they run; here
    every member sees the same process, and each pass compares calls made seconds apart.

    Returns `{"system": "paired", "members": [...], "s_per_token": {name: median}, "calls": {name: [per-call
    median s/token]}, "ratios": {name: median over passes of member / reference}, "spread": {name: [lower, upper]
    quartile of those per-pass ratios}, "tokens": {name: [...]}}`. The spread shows how much the machine moved
    between calls: on a shared VM, passes seconds apart differed by up to 20% here.
    """
    import torch

    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    models = []
    # the reference last: our plans are made from the free memory, as in their own processes (the reference takes
    # what it takes whenever it loads)
    for member in reversed(spec["members"]):
        model, _ = _load({"dtype": spec.get("dtype"), **member})
        models.insert(0, (member["name"], model))
    ids, kwargs = _prompt(spec, models[0][1])
    tokens = {}
    with torch.no_grad():
        for name, model in models:
            tokens[name] = model.generate(ids, **kwargs)[0, ids.shape[1] :].tolist()
    calls: dict[str, list[float]] = {name: [] for name, _ in models}
    for i in range(int(spec.get("calls", 6))):
        for name, model in models if i % 2 == 0 else models[::-1]:
            clock = _TokenClock()
            with torch.no_grad():
                model.generate(ids, streamer=clock, **kwargs)
            calls[name].append(_median([dt / max(n, 1) for dt, n in clock.decode_steps()]))
    ref = models[0][0]
    per_pass = {name: [a / b for a, b in zip(v, calls[ref])] for name, v in calls.items() if name != ref}
    return {
        "system": "paired",
        "members": [name for name, _ in models],
        "s_per_token": {name: _median(v) for name, v in calls.items()},
        "calls": calls,
        "ratios": {name: _median(v) for name, v in per_pass.items()},
        "spread": {name: _middle_half(v) for name, v in per_pass.items()},
        "tokens": tokens,
        "threads": torch.get_num_threads(),
    }


def run_child(spec: dict, *, timeout: float | None = None) -> dict:
    """Run `measure(spec)` in a fresh Python process and return its result (raises with the child's stderr)."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "hf_layerstream._measure", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement of {spec['system']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(sys.argv[1])
    if spec["system"] == "cuda_probe":
        from .bench import probe_cuda

        result = probe_cuda(spec["device"])
    else:
        result = measure_paired(spec) if spec["system"] == "paired" else measure(spec)
    print(json.dumps(result), flush=True)
