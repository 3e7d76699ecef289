"""`hf-layerstream bench`: ours against the whole model in memory and accelerate's disk offload, in one run.

Every system runs in its own child process (`_measure.run_child`), so each peak RSS (`VmHWM`) is its own. The same
run measures the two physical limits the figures are compared with:

* warm (files in the page cache, put there by one untimed `generate` call in the same process): the compute, i.e.
  the whole model in memory, seconds per token;
* cold (every weight file dropped from the page cache before each forward): bytes read per sweep / the disk's
  sequential read bandwidth, measured here on the shard files: the fastest of O_DIRECT reads and the kernel's
  read-ahead into a huge-page map, each one file at a time and two files at once, each after
  `POSIX_FADV_DONTNEED`;
* on CUDA, also the host-to-device copy: bytes that cross to the device per sweep / the pinned-memory
  host-to-device bandwidth, measured in a child of its own (`measure_h2d_bandwidth`). It is the limit of decoding
  from host RAM (the `streamed_host` row: every layer kept in pinned host RAM, none on the device), and the GPU
  memory peak of each streamed row is checked against resident parts + (prefetch + 1) layers + the KV cache and
  activations (what the whole model on the device peaks at beyond its weights, measured in the same run).

```
hf-layerstream bench --demo                      # the 1.7 GB Llama-shaped model of the README's Performance section
hf-layerstream bench path/to/checkpoint          # split into --work (or a temp dir) first
hf-layerstream bench path/to/shards --checkpoint path/to/checkpoint
```
"""

from __future__ import annotations

import argparse
import json
import logging
import mmap
import os
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SYSTEMS = ("in_memory", "accelerate_offload", "streamed", "streamed_disk", "streamed_host")
CUDA_ONLY = ("streamed_host",)  # host RAM is the device's memory on CPU: the row would be the budget row again
LABELS = {
    "in_memory": "transformers, whole model in RAM",
    "accelerate_offload": "accelerate disk offload",
    "streamed": "hf_layerstream (budget)",
    "streamed_disk": "hf_layerstream (every layer from disk)",
    "streamed_host": "hf_layerstream (every layer in host RAM)",
    "physical_limit": "physical limit",
}
DEMO_SIZES = {"layers": 16, "hidden_size": 2048, "intermediate_size": 5632, "vocab_size": 32000}
PROMPT = (
    "The quick brown fox jumps over the lazy dog while layer streaming keeps only a few decoder layers in memory at "
    "a time"
)
# targets of issue #4
WARM_TARGET = 1.10  # x in-memory time, streaming from the page cache
WARM_RESIDENT_TARGET = 1.05  # x in-memory time, a budget that holds everything
COLD_TARGET = 1.15  # x bytes per sweep / disk bandwidth
COLD_VS_ACCELERATE = 0.6  # x accelerate's cold disk offload
RSS_SLACK = 1.15
# the whole model in memory is measured only where its weights take at most this share of the memory free for them
# (the available host memory on CPU, see `available_host_memory`; the GPU's free memory on CUDA): a model larger than
# RAM is what streaming is for, and loading it whole would only get the row killed, and maybe the benchmark with it
FIT_SHARE = 0.9
CUDA_HOST_TARGET = 1.2  # x bytes per sweep / pinned host-to-device bandwidth, decoding from host RAM
COMPRESSED_SPEEDUP = 1.8  # issue #3: 4-bit shards vs full-precision shards, cold, on CPU
# `--compression`'s names -> `split_checkpoint`'s options
COMPRESSIONS = {
    "4bit": {"compression": "4bit"},
    "4bit-dq": {"compression": "4bit", "double_quant": True},
    "8bit": {"compression": "8bit"},
}
# a cold row whose weight files kept more than this share of their bytes in the page cache after the drop (a tmpfs,
# where the drop does nothing) read from memory: marked "cold (cached)", and held to no cold target
COLD_CACHED_SHARE = 0.5
# a row whose decode steps lost at least this share of the machine's CPU time to the hypervisor (steal) says so: on
# this 2-core VM, reading the layer files while both cores computed lost 29-31% (0 computing or reading alone)
STEAL_NOTE_SHARE = 0.02


def _label(system: str, scheme: str | None = None) -> str:
    """The table's name of `system`; `scheme`: the quantization of the shards it streams, where SOURCE is a quantized
    shard directory."""
    if system.startswith("streamed_disk_"):  # compressed shards, e.g. streamed_disk_4bit
        return f"hf_layerstream, {system.rsplit('_', 1)[1]} shards (from disk)"
    label = LABELS.get(system, system)
    return f"{label}, {scheme} shards" if scheme else label


def scheme_name(compression: dict | None) -> str | None:
    """A shard manifest's `compression` in a few characters (`"4bit nf4"`, `"8bit"`), `None` for full precision."""
    if not compression:
        return None
    bits = compression.get("bits")
    quant_type = compression.get("quant_type")
    double = " dq" if compression.get("double_quant") else ""
    return f"{bits}bit" + (f" {quant_type}" if bits == 4 and quant_type else "") + double


def token_agreement(tokens: list, reference: list) -> float:
    """Share of `reference`'s greedy tokens that `tokens` has at the same position (lossy shards' check)."""
    return sum(a == b for a, b in zip(tokens, reference)) / len(reference)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `hf-layerstream bench` on the CLI's subparsers.

    Args:
        subparsers: what `argparse.ArgumentParser.add_subparsers` returned.

    Returns:
        The `bench` parser (its handler is [`run_bench`]).
    """
    p = subparsers.add_parser(
        "bench",
        help="ours vs whole model in RAM vs accelerate disk offload, warm and cold, against the physical limits",
        description=__doc__.split("\n\n")[0],
    )
    from .cli import _RESERVE_HELP, _add_dequantize_arg, _add_hub_args

    p.add_argument("source", nargs="?", default=None, help="checkpoint folder, hub id, or shard directory")
    p.add_argument(
        "--demo",
        action="store_true",
        help="instead of SOURCE: write and measure the random-weight Llama-shaped model of the README's Performance "
        "section (sized by --layers, --hidden-size, ...)",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="original checkpoint, a folder or hub id (when SOURCE is a shard directory; a hub one is downloaded first)",
    )
    p.add_argument(
        "--checkpoint-revision",
        default=None,
        help="for a hub repo --checkpoint: its branch, tag or commit (default: its default branch)",
    )
    _add_hub_args(p, "SOURCE", token="hub token for gated/private repos: SOURCE's and --checkpoint's, hub repos")
    p.add_argument("--work", default=None, help="folder for the split / demo model / offload (default: temporary)")
    p.add_argument("--layers", type=int, default=None, help=f"--demo: decoder layers (default {DEMO_SIZES['layers']})")
    p.add_argument(
        "--hidden-size", type=int, default=None, help=f"--demo: hidden size (default {DEMO_SIZES['hidden_size']})"
    )
    p.add_argument(
        "--intermediate-size",
        type=int,
        default=None,
        help=f"--demo: MLP size (default {DEMO_SIZES['intermediate_size']})",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help=f"--demo: vocabulary, at least the demo tokenizer's 120 tokens (default {DEMO_SIZES['vocab_size']})",
    )
    p.add_argument("--dtype", default=None, help="--demo: checkpoint dtype (default bfloat16)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per run (default 8)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length in tokens (default 16)")
    p.add_argument("--prefetch", type=int, default=None, help="layers read ahead by our loader (default: library's)")
    _add_dequantize_arg(p)
    p.add_argument(
        "--max-memory", default=None, help="budget of the 'streamed' row, e.g. 'cpu=1GiB' (default: library's plan)"
    )
    p.add_argument("--reserve", default=None, metavar="SIZE", help=f"for the 'streamed' row, {_RESERVE_HELP}")
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)} (streamed_disk: nothing kept, every layer read from "
        "disk; streamed_host, CUDA only: every layer kept in pinned host RAM, none on the device; default: all)",
    )
    p.add_argument(
        "--compression",
        default=None,
        help="also split with 4bit, 4bit-dq (its block scales quantized too: double quantization) and/or 8bit (e.g. "
        "'4bit,8bit') and add rows streaming those shards from disk, side by side with the full-precision ones "
        "(needs the original checkpoint)",
    )
    p.add_argument("--modes", default="warm,cold", help="warm, cold or both (default warm,cold)")
    p.add_argument("--batch-sizes", default="1", help="prompts per sweep, e.g. 1,4,16,64: one row per size")
    p.add_argument(
        "--assistant",
        default=None,
        help="draft model folder (or `demo` with --demo): adds assisted-decoding rows with sweeps per token",
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="generate calls per measurement (median over all steps; default 1)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every system this many times, interleaved; report the median round (default 1)",
    )
    p.add_argument(
        "--paired-calls",
        type=int,
        default=10,
        help="warm: also run the whole model in RAM and our full-precision systems in one process, alternating "
        "generate calls, this many each, and report the median per-call ratio and the middle half of them (free of "
        "the few percent that separate processes differ by on a shared machine); 0: off (default 10)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads in every child (default: torch's)")
    p.add_argument("--device", default=None, help="execution device of our rows (default: cuda if available)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per child process (default 1800)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.set_defaults(handler=run_bench)
    return p


# --- measuring the limits -------------------------------------------------------------------------------------------


def drop_from_page_cache(paths) -> None:
    """Evict files from the page cache (`POSIX_FADV_DONTNEED`)."""
    from ._measure import drop_page_cache

    drop_page_cache([str(p) for p in paths])


def _read_direct(paths: list[str], chunk: int) -> tuple[int, str]:
    """Read `paths` with `O_DIRECT` (buffered where the file system refuses it); returns (bytes, method)."""
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT requires
    view = memoryview(buf)
    total, method = 0, "O_DIRECT" if hasattr(os, "O_DIRECT") else "buffered (no O_DIRECT here)"
    try:
        for path in paths:
            flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
            try:
                fd = os.open(path, flags)
            except OSError:
                fd, method = os.open(path, os.O_RDONLY), "buffered after POSIX_FADV_DONTNEED"
            try:
                offset = 0
                while True:
                    try:
                        n = os.preadv(fd, [view], offset)
                    except OSError:  # O_DIRECT refused at read time (e.g. tmpfs): fall back for this file
                        os.close(fd)
                        fd, method = os.open(path, os.O_RDONLY), "buffered after POSIX_FADV_DONTNEED"
                        n = os.preadv(fd, [view], offset)
                    if n <= 0:
                        break
                    offset += n
                    total += n
            finally:
                os.close(fd)
    finally:
        view.release()
        buf.close()
    return total, method


def _read_mapped(paths: list[str]) -> tuple[int, str]:
    """Read `paths` the way our CPU loader does: a huge-page mapping populated by the kernel's read-ahead."""
    from ._safetensors import map_readonly, populate

    total = 0
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            continue
        mm = map_readonly(path, size)
        try:
            if not populate(mm, path):
                raise OSError("MADV_POPULATE_READ is not supported here")
        finally:
            mm.close()
        total += size
    return total, MAPPED_WAY


def _rewarm(paths) -> None:
    """Put `paths` back in the page cache as a warm sweep of our CPU loader leaves them: dropped, then read through a
    huge-page map (2 MiB folios). For the warm comparison in one process, which runs after the cold rows: those
    rows leave the files partly evicted, and a host that reclaims idle page cache (this project's VM pages out what
    was not used for a minute) leaves holes that come back in small folios. In one process the budget model keeps
    those pages mapped, so the streamed model's repair (`engine._SMALL_PAGES_CPU_PER_MIB`) cannot drop them, and it
    would pay the small-folio mapping cost at every sweep: a state of the page cache, not warm streaming."""
    paths = [str(p) for p in paths]
    drop_from_page_cache(paths)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            _read_mapped(paths)
        except (OSError, MemoryError) as e:  # the child's untimed warm-up call reads them instead
            logger.info("could not read the shard files back through a huge-page map (%s)", e)


def measure_h2d_bandwidth(device, *, nbytes: int = 256 * 2**20, repeats: int = 8) -> dict:
    """Host-to-device copy bandwidth from pinned memory to CUDA `device`, in bytes per second (the fastest of
    `repeats` copies of `nbytes`, timed with CUDA events after one untimed copy): the limit of decoding from host RAM.

    Returns:
        `{"bytes", "seconds", "bandwidth", "samples"}`, `samples` being every copy's bandwidth.
    """
    import torch

    from .engine import empty_allocator_caches

    device = torch.device(device)
    with torch.cuda.device(device):
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        seconds = []
        for _ in range(repeats):
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
    del src, dst
    # once, outside any timing: the free memory read next (`probe_cuda`) does not count the buffers as taken
    empty_allocator_caches(device)
    best = min(seconds)
    return {"bytes": nbytes, "seconds": best, "bandwidth": nbytes / best, "samples": [nbytes / t for t in seconds]}


def _in_parallel(way, paths: list[str], streams: int) -> tuple[int, str]:
    """`way` on `streams` threads at once, each reading every `streams`-th file (more requests in flight); a
    failure in any of them is raised here."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=streams) as pool:
        results = list(pool.map(way, [paths[k::streams] for k in range(streams)]))
    return sum(n for n, _ in results), f"{results[0][1]}, {streams} files at once"


MAPPED_WAY = "read-ahead into a huge-page map"


def disk_ways(*, chunk: int = 16 * 2**20, streams: int = 2, files: int = 2) -> dict:
    """The ways `measure_disk_bandwidth` reads files, by name: `{name: way}`, `way(paths) -> (bytes, method)`
    (`method` says what was done where it differs from the name, e.g. buffered reads where O_DIRECT is refused).
    `files`: how many files will be read (no parallel way for one)."""
    one_by_one = {"O_DIRECT": lambda paths: _read_direct(paths, chunk)}
    if hasattr(mmap, "MADV_HUGEPAGE"):
        one_by_one[MAPPED_WAY] = _read_mapped
    ways = dict(one_by_one)
    if streams > 1 and files > 1:
        for name, way in one_by_one.items():
            ways[f"{name}, {streams} files at once"] = lambda paths, w=way: _in_parallel(
                w, paths, min(streams, len(paths))
            )
    return ways


def measure_disk_bandwidth(paths, *, chunk: int = 16 * 2**20, streams: int = 2, rounds: int = 2) -> dict:
    """Sequential read bandwidth of `paths` from the disk (not the page cache), in bytes per second.

    Several ways (`disk_ways`), each after dropping the files from the page cache, and the fastest is the limit:
    `O_DIRECT` reads (buffered where the file system refuses `O_DIRECT`) and the kernel's read-ahead into a huge-page
    memory map (what our CPU loader does; on some disks it keeps more requests in flight), each one file at a time and
    `streams` files at once (a disk that serves parallel requests faster has that much more bandwidth), in `rounds`
    rounds (every other one in the reverse order). The files are dropped from the page cache afterwards too.

    Args:
        paths: the files to read (the shard files: the bytes a cold sweep reads).
        chunk (`int`): bytes per `O_DIRECT` read call.
        streams (`int`): files read at once by the parallel ways (1: no parallel way).
        rounds (`int`): times each way is tried.

    Returns:
        `{"bytes", "seconds", "bandwidth", "method", "way", "pair_way", "by_method", "cpu_steal_share"}`: the
        fastest read of all (the limit), `way` naming its way (a key of `disk_ways`); `pair_way` the way fastest over
        all rounds together (least time in all), the one a cold step of ours is paired with
        (`_measure._DiskPairing`): a way that read fast once and slowly after does not set every step's yardstick (a
        lucky `O_DIRECT` read on a shared disk made the steps 0.35x "plain reads" of their bytes); `by_method` maps
        each way tried to its fastest bandwidth in bytes per second; `cpu_steal_share` the share of the machine's CPU
        time a hypervisor took while the reads ran (`_measure.cpu_ticks`; `None` without /proc/stat).
    """
    paths = [str(p) for p in paths]
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"`rounds` must be a positive int, got {rounds!r}.")
    from ._measure import cpu_ticks, steal_share

    results = []
    spans = []  # the CPU time of the reads (`cpu_steal_share`)
    ways = list(disk_ways(chunk=chunk, streams=streams, files=len(paths)).items())
    for name, way in [w for r in range(rounds) for w in (ways if r % 2 == 0 else ways[::-1])]:
        drop_from_page_cache(paths)
        before = cpu_ticks()
        t0 = time.perf_counter()
        try:
            total, method = way(paths)
        except (OSError, MemoryError) as e:  # (a huge-page map's populate out of memory: `MemoryError`)
            logger.info("disk bandwidth: one way of reading failed (%s); skipped", e)
            continue
        seconds = time.perf_counter() - t0
        spans.append((before, cpu_ticks()))
        results.append(
            {
                "bytes": total,
                "seconds": seconds,
                "bandwidth": total / seconds if seconds > 0 else None,
                "method": method,
                "way": name,
            }
        )
    drop_from_page_cache(paths)
    if not results:
        raise OSError(f"could not read {len(paths)} files to measure the disk bandwidth")
    best = dict(max(results, key=lambda r: r["bandwidth"] or 0))
    best["by_method"] = {}
    for r in results:
        best["by_method"][r["method"]] = max(best["by_method"].get(r["method"]) or 0, r["bandwidth"] or 0)
    tried = {}  # way -> its rounds' seconds (a way that failed in a round is not paired with)
    for r in results:
        tried.setdefault(r["way"], []).append(r["seconds"])
    complete = {w: sum(t) for w, t in tried.items() if len(t) == rounds} or {w: sum(t) for w, t in tried.items()}
    best["pair_way"] = min(complete, key=complete.get)
    best["cpu_steal_share"] = steal_share(spans)
    return best


# --- preparing the inputs -------------------------------------------------------------------------------------------


def _is_shard_dir(path: Path) -> bool:
    from .shard_dir import MANIFEST_NAME

    return (path / MANIFEST_NAME).is_file()


def _check_source(args) -> None:
    """Refuse what `prepare` would silently ignore: a SOURCE with `--demo`, the demo model's sizes and dtype without
    it, a `--checkpoint` beside a SOURCE that is a checkpoint itself (or with `--demo`), and a `--dtype` the demo model
    cannot be written in; fill in the demo model's default sizes and dtype.

    Raises:
        `ValueError`: Naming the options that conflict.
    """
    from .demo import checkpoint_dtype

    given = [f"--{k.replace('_', '-')}" for k in (*DEMO_SIZES, "dtype") if getattr(args, k) is not None]
    if given and not args.demo:
        raise ValueError(
            f"{', '.join(given)}: only for the model `--demo` writes; SOURCE is measured as it is. Drop "
            f"{'them' if len(given) > 1 else 'it'}, or pass `--demo` instead of SOURCE."
        )
    for key, value in {**DEMO_SIZES, "dtype": "bfloat16"}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    checkpoint_dtype(args.dtype)  # (the demo model's, and `--assistant demo`'s)
    from .split import missing_local_folder

    for what, value in (("SOURCE", args.source), ("`--checkpoint`", args.checkpoint)):
        # (else a local path that is not there went to the hub as a repo id: "Repo id must be in the form ...", after
        # the rows measured before it, for `--checkpoint`)
        if value is not None and missing_local_folder(value):
            raise ValueError(
                f"{what} {value!r} is neither an existing local folder nor a hub repo id (`organization/name`)."
            )
    if args.demo and args.source is not None:
        raise ValueError(
            f"Pass either SOURCE ({args.source!r}) or `--demo` (which writes and measures its own model), not both."
        )
    if args.source is not None:
        # a hub repo holding a shard directory: downloaded, and measured as the folder it is then (a local folder:
        # itself, `--revision` and `--token` ignored with a warning; `--token` not where a hub `--checkpoint` takes it)
        from .errors import ShardDirError
        from .shard_dir import local_shard_dir

        hub_checkpoint = args.checkpoint is not None and not Path(args.checkpoint).is_dir()
        token = None if hub_checkpoint and Path(args.source).is_dir() else args.token
        try:
            args.source = str(local_shard_dir(args.source, revision=args.revision, token=token))
        except (ShardDirError, OSError):  # (no manifest there, or none to fetch: a checkpoint's, named below)
            pass
    if args.source is not None and not Path(args.source).is_dir():  # a hub id: its config.json, before any work
        _checkpoint_folder(args.source, fetch=False, revision=args.revision, token=args.token)
    if args.checkpoint is None:
        if args.checkpoint_revision is not None:
            raise ValueError(
                "`--checkpoint-revision` only applies with `--checkpoint`; pass `--checkpoint` too, or drop "
                "`--checkpoint-revision`."
            )
        return
    if Path(args.checkpoint).is_dir():
        from .shard_dir import warn_hub_only

        warn_hub_only(
            args.checkpoint, "read as it is", revision=args.checkpoint_revision, revision_name="`--checkpoint-revision`"
        )
    if args.demo:
        raise ValueError("`--checkpoint` is not used with `--demo` (which writes its own checkpoint); drop it.")
    if args.source is not None and not (Path(args.source).is_dir() and _is_shard_dir(Path(args.source))):
        raise ValueError(
            f"`--checkpoint` is only used when SOURCE is a shard directory; SOURCE {args.source!r} is not one (it is "
            "split and measured itself): drop `--checkpoint`, or pass the shard directory as SOURCE."
        )
    if Path(args.checkpoint).is_dir() and _is_shard_dir(Path(args.checkpoint)):
        # (its rows of the whole model in memory and of accelerate's offload each failed with transformers' traceback,
        # "no file named model.safetensors", after the streamed rows were measured: exit 1)
        raise ValueError(
            f"`--checkpoint` {args.checkpoint!r} is a shard directory (it holds manifest.json), not a checkpoint: pass "
            "the checkpoint folder or hub id SOURCE was split from (its manifest.json names it), or drop "
            "`--checkpoint` to measure the streamed rows only."
        )
    if args.source is not None:
        _refuse_another_model(args.checkpoint, Path(args.source), revision=args.checkpoint_revision, token=args.token)


def _meta_model(path: Path):
    """The model of the shard directory or checkpoint folder `path`, on meta (as `generate` builds a shard
    directory's, `split` a checkpoint's), for the checks before measuring; `None` where it does not build (the split
    or the rows name what is wrong)."""
    from transformers import AutoConfig

    from .modeling import build_for_shards, build_skeleton
    from .shard_dir import ShardDirectory

    try:
        config = AutoConfig.from_pretrained(path)
        if _is_shard_dir(path):
            return build_for_shards(ShardDirectory(path, check_files=False).manifest, config, meta=True)
        return build_skeleton(config, meta=True)
    except (ValueError, TypeError, OSError, ImportError, RuntimeError, AttributeError) as e:
        logger.debug("could not build the model of %s to check its positions: %s", path, e)
        return None


def _refuse_past_the_position_table(path: Path, prompt_tokens: int, max_new_tokens: int) -> None:
    """A `--prompt-tokens` and `--max-new-tokens` that run past the learned position table (GPT-2's, OPT's; see
    `modeling.position_overrun`) of the model at `path` (`_meta_model`): every row failed in its child process, with
    torch's traceback ("IndexError: index out of range in self"), after the minutes of work before it. Refused before
    anything is measured."""
    from .modeling import position_overrun

    model = _meta_model(path)
    overrun = None if model is None else position_overrun(model, prompt_tokens, max_new_tokens)
    if overrun is None:
        if model is not None:
            _refuse_a_prompt_past_the_context(model.config, prompt_tokens)
        return
    limit, _ = overrun
    raise ValueError(
        f"`--prompt-tokens` {prompt_tokens} and `--max-new-tokens` {max_new_tokens} run past the {limit} positions of "
        f"{type(model).__name__}'s learned position table (`max_position_embeddings`): pass values that add up to "
        f"{limit + 1} or less."
    )


def _refuse_a_prompt_past_the_context(config, prompt_tokens: int) -> None:
    """A `--prompt-tokens` longer than the context of the model of `config`: its `max_position_embeddings`, times its
    RoPE scaling factor where it has one (what a long-context config allows: rotary models run past it, but not as the
    model was made to). The bench grew its prompt's token ids to that length by doubling a list: a huge value ran the
    machine out of memory. A model without one (Mamba's) is bounded by `_refuse_a_prompt_past_the_memory`."""
    text = config.get_text_config()
    limit = getattr(text, "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        return
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
    # (transformers 5 keeps one set of rope parameters per layer type where they differ: Gemma 3's)
    sets = [] if not isinstance(rope, dict) else [rope] if "rope_type" in rope or "factor" in rope else rope.values()
    factors = [r["factor"] for r in sets if isinstance(r, dict) and isinstance(r.get("factor"), (int, float))]
    factor = max([f for f in factors if f > 1], default=None)
    context = limit if factor is None else int(limit * factor)
    if prompt_tokens > context:
        scaled = "" if factor is None else f", times its RoPE scaling factor {factor:g}"
        raise ValueError(
            f"`--prompt-tokens` is {prompt_tokens}, more than the {context} positions of the model's context (its "
            f"config's `max_position_embeddings` {limit}{scaled}): pass at most {context}."
        )


def _refuse_a_prompt_past_the_memory(prompt_tokens: int) -> None:
    """A `--prompt-tokens` whose token ids alone (8 bytes each, an int64 tensor; the model's activations take many
    times that) are more than the memory available: checked before anything is written, for any model (one without a
    position limit too)."""
    from .engine import available_host_memory

    need, free = 8 * prompt_tokens, available_host_memory()
    if need > free:
        raise ValueError(
            f"`--prompt-tokens` is {prompt_tokens}: its token ids alone take {need / 1e6:.2f} MB, more than the "
            f"{free / 1e6:.2f} MB of memory available here; pass a prompt of at most the model's context."
        )


def _fetch_checkpoint(args) -> None:
    """A hub repo `--checkpoint` downloaded (or found in the hub cache), at `--checkpoint-revision`, with `--token`:
    `args.checkpoint` becomes its folder, which the rows load. They loaded the repo id in their child processes, which
    get no token, at its default branch: a gated one given `--token` failed there, after the streamed rows."""
    if args.checkpoint is not None and not Path(args.checkpoint).is_dir():
        args.checkpoint = str(
            _checkpoint_folder(
                args.checkpoint, role="`--checkpoint`", revision=args.checkpoint_revision, token=args.token
            )
        )


def _check_systems(args, systems: list[str], modes: list[str], compressed: list[str]) -> None:
    """Refuse a `--systems` selection that leaves nothing to measure here (the bench measured nothing and exited 0):
    `streamed_host` needs a CUDA device, the whole model in memory and accelerate's offload need the original
    checkpoint, and the whole model in memory is measured warm only. Rows of `--compression` count.

    Raises:
        `ValueError`: Naming why each system selected does not apply, and the systems that do.
    """
    import torch

    on_cuda = torch.device(args.device).type == "cuda" if args.device else torch.cuda.is_available()
    source = Path(args.source) if args.source is not None else None
    no_checkpoint = not args.demo and args.checkpoint is None and source is not None and _is_shard_dir(source)
    why_not = {}
    for system in systems:
        if system in CUDA_ONLY and not on_cuda:
            why_not[system] = "needs a CUDA device"
        elif system in ("in_memory", "accelerate_offload") and no_checkpoint:
            why_not[system] = "needs the original checkpoint (`--checkpoint`)"
        elif system == "in_memory" and "warm" not in modes and not args.assistant:
            why_not[system] = "is measured warm only"
    if compressed or any(s not in why_not for s in systems):
        return
    valid = [s for s in SYSTEMS if not (s in CUDA_ONLY and not on_cuda)]
    if no_checkpoint:
        valid = [s for s in valid if s not in ("in_memory", "accelerate_offload")]
    reasons = "; ".join(f"{s} {why}" for s, why in why_not.items())
    raise ValueError(
        f"`--systems` {args.systems!r} leaves nothing to measure here ({reasons}); choose from {', '.join(valid)}."
    )


def split_in_work(ckpt: Path, dest: Path, *, command: str = "bench", option: str = "--work", **kwargs) -> Path:
    """`split_checkpoint(ckpt, dest, progress=False, **kwargs)` into the work folder, where a refusal advises what
    the `command` (bench, or demo with its work folder `option`, `--dir`) can do. `split` refuses a directory holding
    another split (or an unfinished one, or a newer format's) and says to pass `--overwrite`, an option neither has:
    they never overwrite a split in their work folder.

    Raises:
        `ShardDirError`: `dest` holds another split: the problem as `split` states it, and the command's fix.
    """
    from .errors import ShardDirError, ShardDirOccupiedError
    from .split import split_checkpoint

    try:
        return split_checkpoint(ckpt, dest, **{"progress": False, **kwargs})
    except ShardDirOccupiedError as e:
        raise ShardDirError(
            f"{e.problem} {command} does not overwrite a split in its `{option}` folder: pass another `{option}`, or "
            f"delete {dest} to have it split there anew."
        ) from e


def prepare(args, work: Path) -> tuple[Path | None, Path]:
    """(checkpoint folder or None, shard directory) for `args`: writes the demo model and splits as needed."""
    if args.demo:
        from .demo import write_demo_checkpoint_from_args

        ckpt = work / "checkpoint"
        if write_demo_checkpoint_from_args(ckpt, args):
            logger.info("wrote the demo checkpoint to %s", ckpt)
        return ckpt, split_in_work(ckpt, work / "shards")
    if args.source is None:
        raise ValueError("`bench` needs a SOURCE (checkpoint folder, hub id or shard directory) or `--demo`.")
    source = Path(args.source)
    if source.is_dir() and _is_shard_dir(source):
        ckpt = _checkpoint_folder(args.checkpoint, fetch=False, role="`--checkpoint`") if args.checkpoint else None
        if ckpt is None:
            logger.warning(
                "SOURCE is a shard directory and no --checkpoint was given: skipping in-memory and accelerate rows"
            )
        return ckpt, source
    ckpt = _checkpoint_folder(args.source, revision=args.revision, token=args.token)
    return ckpt, split_in_work(ckpt, work / "shards")


def _refuse_another_model(
    checkpoint: str, source: Path, *, revision: str | None = None, token: str | None = None
) -> None:
    """`--checkpoint` (a hub one at `revision`, with `token`) must build the model the shard directory `source` was
    split from (its architecture fingerprint): another model was measured beside it, and its rows said the streamed
    output was not the same (exit 1), as if streaming were wrong."""
    from transformers import AutoConfig

    from .shard_dir import ShardDirectory

    shards = ShardDirectory(source)
    # (a folder without config.json: named so)
    _checkpoint_folder(checkpoint, fetch=False, role="`--checkpoint`", revision=revision, token=token)
    config = AutoConfig.from_pretrained(checkpoint, revision=revision, token=token)
    try:
        differs = shards.model_mismatch(config)
    except Exception as e:  # noqa: BLE001 - a one-line error, not a traceback; the rows that load it fail alike
        raise ValueError(
            f"`--checkpoint` {checkpoint!r}: building its model (as the class SOURCE was split for) failed "
            f"({type(e).__name__}: {e}); pass the checkpoint SOURCE was split from, or drop `--checkpoint` to measure "
            "the streamed rows only."
        ) from e
    if differs is not None:
        raise ValueError(
            f"`--checkpoint` {checkpoint!r} is not the model SOURCE {str(source)!r} was split from ({differs}): "
            "pass the checkpoint it was split from, or drop `--checkpoint` to measure the streamed rows only."
        )


def _checkpoint_folder(
    source: str, *, fetch: bool = True, role: str = "SOURCE", revision: str | None = None, token: str | None = None
) -> Path:
    """The checkpoint `source` (given as `role`), checked before anything is measured (the rows that load it run in
    child processes, where a repo that cannot be reached failed each of them after the streamed rows were measured):
    a local folder holding a config.json, or a hub repo (at `revision`, with `token`), whose files are fetched (or
    found in the hub cache: its safetensors weights, or its `.bin` ones where it has none, the JSON and tokenizer
    files), to split it and for the rows to load, or with `fetch=False` (a check before any work) whose config.json is.

    Raises:
        `FileNotFoundError`: A hub repo that cannot be reached and is not in the hub cache, or that the hub lacks.
        `ValueError`: No config.json.
    """
    from .split import cannot_reach_hub, fetch_hub_file, hub_unreachable_error, no_such_repo_error

    path = Path(source)
    # a hub id: from_pretrained and split_checkpoint both resolve it (without a config.json: refused below)
    if not path.is_dir() and fetch_hub_file(source, "config.json", role, revision=revision, token=token) is not None:
        if not fetch:
            return path
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

        # (the hub unreachable: the hub cache's snapshot, at once; huggingface_hub retried the listing for 23 s)
        hub = {
            "revision": revision,
            "token": token,
            "local_files_only": cannot_reach_hub(source, "config.json") is not None,
        }
        try:
            patterns = ["*.json", "*.safetensors", "*.model", "*.txt"]
            path = Path(snapshot_download(source, allow_patterns=patterns, **hub))
            if not any(path.rglob("*.safetensors")):
                # (a checkpoint of `.bin` files only, as `from_pretrained` falls back to: they were not downloaded,
                # and the split found its index's files missing)
                patterns = ["pytorch_model*.bin"]
                path = Path(snapshot_download(source, allow_patterns=patterns, **hub))
        except LocalEntryNotFoundError as e:  # (a subclass of EntryNotFoundError: first)
            raise hub_unreachable_error(source, "the weight files", role, revision=revision) from e
        except EntryNotFoundError:
            pass
        except RepositoryNotFoundError as e:
            raise no_such_repo_error(source, role) from e
    if not (path / "config.json").is_file():
        raise ValueError(f"{source!r} holds no config.json: it is not a checkpoint (a model folder or hub repo).")
    return path


def _prompt_ids(path: Path, n: int) -> tuple[list[int], int]:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok(PROMPT)["input_ids"]
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    except (OSError, ValueError):  # no tokenizer: any ids within the vocabulary do
        ids, pad = [5 + i % 50 for i in range(n)], 0
    while len(ids) < n:
        ids = ids + ids
    return ids[:n], pad


def _parse_list(text: str, allowed, name: str) -> list[str]:
    # (case-insensitive, as the library's `compression=` and split's `--compression` are)
    items = [s.strip().lower() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise ValueError(f"`{name}` got {text!r}; choose a comma-separated subset of {', '.join(allowed)}.")
    return items


def _parse_batches(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"`--batch-sizes` got {text!r}; use positive integers such as 1,4,16,64.")
    return sizes


# --- the run ----------------------------------------------------------------------------------------------------------


def run_bench(args) -> int:
    """`hf-layerstream bench`: measure, print the table (or JSON); exit 1 when streamed tokens differ or a
    measurement failed (a row or the warm run in one process: the table shows its error, and a benchmark with a
    missing figure is not a success)."""
    report = bench(args)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    mismatched = [r for r in report["rows"] if r.get("same_tokens") is False]
    mismatched += [s for s, same in ((report.get("paired") or {}).get("same_tokens") or {}).items() if not same]
    failed = failed_measurements(report)
    if failed:
        print(f"hf-layerstream bench: {len(failed)} measurement(s) failed: {'; '.join(failed)}", file=sys.stderr)
    return 1 if mismatched or failed else 0


def failed_measurements(report: dict) -> list[str]:
    """What failed in `report`, one line each: the rows with an error, and the warm run in one process."""
    failed = [f"{r['system']} {r['mode']} batch {r['batch']}: {r['error']}" for r in report["rows"] if r.get("error")]
    paired = report.get("paired") or {}
    if paired.get("error"):
        failed.append(f"warm, in one process: {paired['error']}")
    return failed


def bench(args) -> dict:
    """Run every requested system side by side and return the report (see `format_report` for the table).

    Returns:
        `{"model", "disk", "baseline_rss", "rows", "paired", "targets"}`; each row has `system`, `mode`, `batch`,
        `s_per_token`, `tokens_per_s`, `peak_rss`, `cuda_peak`, `limit_s`, `ratio_to_limit`, `same_tokens` (or
        `token_agreement` for rows of quantized shards: `model["compression"]` is the SOURCE's scheme), `cold_cached`
        (a cold row whose files stayed in the page cache after the drop), ...;
        `paired` (or `None`) is the warm comparison in one process (see `_measure.measure_paired`), with `targets`
        and `same_tokens` per system; `disk` is the faster of two measurements (`measure_disk_bandwidth`), before
        and after the runs, with both bandwidths in `samples` and both ways a cold step is paired with
        (`pair_way`) in `sample_ways`.
    """
    import torch

    from .cli import _dequantize, _max_memory, _reserve
    from .demo import remove_work_folder, work_folder
    from .engine import check_device, check_max_memory
    from .shard_dir import ShardDirectory

    systems = _parse_list(args.systems, SYSTEMS, "--systems")
    modes = _parse_list(args.modes, ("warm", "cold"), "--modes")
    batches = _parse_batches(args.batch_sizes)
    # ('' too is refused, as an empty `--systems` is: a shell variable left unset left the rows out without a word)
    compressed = [] if args.compression is None else _parse_list(args.compression, COMPRESSIONS, "--compression")
    if args.max_new_tokens < 2:
        raise ValueError(f"`--max-new-tokens` is {args.max_new_tokens}; use at least 2 (decode steps are timed).")
    if args.rounds < 1 or args.repeats < 1:
        raise ValueError(f"`--rounds` ({args.rounds}) and `--repeats` ({args.repeats}) must be at least 1.")
    if args.paired_calls < 0:
        raise ValueError(f"`--paired-calls` is {args.paired_calls}; use 0 (off) or more calls.")
    if args.prefetch is not None and args.prefetch < 0:
        raise ValueError(f"`--prefetch` is {args.prefetch}; use a non-negative number of layers.")
    # what would otherwise fail only in a child, after the minutes of work before it (a failed row)
    if args.prompt_tokens < 1:
        raise ValueError(f"`--prompt-tokens` is {args.prompt_tokens}; use at least 1 token.")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"`--threads` is {args.threads}; use at least 1 (or leave it out for torch's default).")
    if not args.timeout > 0:  # (NaN too)
        raise ValueError(f"`--timeout` is {args.timeout}; use a positive number of seconds per child process.")
    max_memory = _max_memory(args.max_memory)
    check_max_memory(max_memory)  # keys accelerate knows, sizes that parse
    reserve = _reserve(getattr(args, "reserve", None))
    if args.device:  # before any work: a device this machine lacks fails here, with the fix
        check_device(args.device)
    if args.assistant and args.assistant != "demo" and _is_shard_dir(Path(args.assistant)):
        raise ValueError(
            f"`--assistant` {args.assistant!r} is a shard directory; the draft model is loaded whole "
            "(`from_pretrained`): pass its checkpoint folder."
        )
    if args.assistant and args.assistant != "demo" and not (Path(args.assistant) / "config.json").is_file():
        # (the word demo is not in backticks: the command line's messages write a backticked option name as the option)
        raise ValueError(
            f"`--assistant` {args.assistant!r} is not a model folder with a config.json; pass a small draft model "
            "sharing the tokenizer (or demo, with `--demo`)."
        )
    if args.assistant == "demo" and not args.demo:
        raise ValueError("`--assistant demo` builds a 1-layer draft of the demo model; it needs `--demo`.")
    _check_source(args)
    _check_systems(args, systems, modes, compressed)
    if args.demo:  # (its config, before it is written)
        from .demo import _demo_config

        config, _ = _demo_config(args.layers, args.hidden_size, args.intermediate_size, args.vocab_size)
        _refuse_a_prompt_past_the_context(config, args.prompt_tokens)
    source = Path(args.source) if args.source is not None else None
    local = source is not None and source.is_dir()
    if local:  # (before anything is written; a hub SOURCE's once split)
        _refuse_past_the_position_table(source, args.prompt_tokens, args.max_new_tokens)
    # (any model, one without a position limit too, or a hub SOURCE's, whose model is known once it is split)
    _refuse_a_prompt_past_the_memory(args.prompt_tokens)
    _fetch_checkpoint(args)
    work = work_folder(args.work, "--work", "hf_layerstream_bench_")
    try:
        ckpt, shard_dir = prepare(args, work)
        shards = ShardDirectory(shard_dir)
        if not local:  # (a hub SOURCE's, or the demo's: a local one was checked before)
            _refuse_past_the_position_table(Path(shard_dir), args.prompt_tokens, args.max_new_tokens)
        # quantized shards as SOURCE: every row of ours is lossy, held to token agreement rather than exactness
        scheme = scheme_name(shards.compression)
        lossy = {"streamed", "streamed_disk", "streamed_host"} if scheme else set()
        if scheme and compressed:
            raise ValueError(
                f"`--compression` adds rows of quantized shards beside full-precision ones; SOURCE {str(shard_dir)!r} "
                f"is quantized itself ({scheme}): pass its full-precision shard directory (or the checkpoint) as "
                "SOURCE, or drop `--compression`."
            )
        if ckpt is None:
            systems = [s for s in systems if s not in ("in_memory", "accelerate_offload")]
        ids, pad = _prompt_ids(ckpt or shard_dir, args.prompt_tokens)
        assistant = args.assistant
        if assistant == "demo":
            from .demo import write_demo_checkpoint

            assistant = str(work / "assistant")
            if not (work / "assistant" / "config.json").exists():
                write_demo_checkpoint(
                    assistant,
                    layers=1,
                    hidden_size=256,
                    intermediate_size=512,
                    vocab_size=args.vocab_size,
                    dtype=args.dtype,
                )
        layer_files = [shards.files[f"layers.{i}"] for i in range(shards.num_layers)]
        stored = [shards.unit(f"layers.{i}").size for i in range(shards.num_layers)]
        resident_bytes = shards.unit("resident").logical_nbytes
        layer_bytes = max(shards.unit(f"layers.{i}").logical_nbytes for i in range(shards.num_layers))
        model_info = {
            "checkpoint": str(ckpt) if ckpt else None,
            "shard_dir": str(shard_dir),
            "num_layers": shards.num_layers,
            "layer_file_bytes": sum(stored),
            "resident_bytes": resident_bytes,
            "max_layer_bytes": layer_bytes,
            "compression": shards.compression,
            "prompt_tokens": len(ids),
            "max_new_tokens": args.max_new_tokens,
        }
        device = torch.device(args.device) if args.device else None
        if device is None and torch.cuda.is_available():
            device = torch.device("cuda")
        on_cuda = device is not None and device.type == "cuda"
        if on_cuda and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        skipped = [s for s in systems if s in CUDA_ONLY and not on_cuda]
        if skipped:
            logger.info("skipping %s: only meaningful on a CUDA device", ", ".join(skipped))
            systems = [s for s in systems if s not in skipped]
        whole = resident_bytes + sum(shards.unit(f"layers.{i}").logical_nbytes for i in range(shards.num_layers))
        gpu = _probe_cuda(device, args.timeout) if on_cuda else None
        if "in_memory" in systems:
            why = _does_not_fit(whole, device if on_cuda else None, gpu["free"] if gpu else None)
            if why:
                if systems == ["in_memory"] and not compressed:
                    raise ValueError(
                        f"`--systems` {args.systems!r} leaves nothing to measure: the whole model in memory "
                        f"(in_memory) does not fit, {why}. Add one of ours: streamed, streamed_disk."
                    )
                logger.warning("skipping the whole model in memory (in_memory): %s; ours are measured without it", why)
                systems = [s for s in systems if s != "in_memory"]
        # (after the refusal above: a selection that measures nothing does not wait for the disk's measurement)
        disk = measure_disk_bandwidth(layer_files) if "cold" in modes else None
        h2d = gpu["h2d"] if gpu else None
        common = {"input_ids": ids, "max_new_tokens": args.max_new_tokens, "pad_token_id": pad, "repeats": args.repeats}
        if disk is not None:
            common["disk_way"] = disk["pair_way"]  # cold runs of ours: every step paired with a read that way
        if args.threads:
            common["threads"] = args.threads
        rows: list[dict] = []

        def spec_for(system: str) -> dict:
            if system == "in_memory":  # on the device ours runs on (ours defaults to CUDA where there is one)
                return {"system": "in_memory", "path": str(ckpt), "device": str(device) if device else None}
            if system == "accelerate_offload":
                # every decoder layer offloaded to disk, the rest where the compute runs: as ours streams
                return {
                    "system": "accelerate_offload",
                    "path": str(ckpt),
                    "offload_folder": str(work / "offload"),
                    "offload_device": device.index if on_cuda else None,
                }
            path = compressed_dirs.get(system, shard_dir)
            # profiling waits for the GPU after every copy and every layer (to time them): not on CUDA, where that
            # would remove the very overlap being measured
            spec = {"system": "streamed", "path": str(path), "prefetch": args.prefetch, "profile": not on_cuda}
            spec["dequantize"] = _dequantize(args.dequantize)
            spec["device"] = args.device
            if system.startswith("streamed_disk"):  # nothing kept anywhere: on the device neither
                spec["max_memory"] = {"cpu": 0, **({str(device.index): 0} if on_cuda else {})}
            elif system == "streamed_host":  # nothing on the device; the host keeps what its default share holds
                spec["max_memory"] = {str(device.index): 0}
            else:
                spec["max_memory"] = max_memory
                spec["reserve"] = reserve
            return spec

        stored_by_system: dict[str, list[int]] = {}
        compressed_dirs: dict[str, Path] = {}
        if compressed:
            if ckpt is None:
                raise ValueError("`--compression` needs the original checkpoint: pass it with `--checkpoint`.")
            for c in compressed:
                qdir = split_in_work(ckpt, work / f"shards-{c}", **COMPRESSIONS[c])
                q = ShardDirectory(qdir)
                name = f"streamed_disk_{c}"
                systems.append(name)
                stored_by_system[name] = [q.unit(f"layers.{i}").size for i in range(q.num_layers)]
                compressed_dirs[name] = qdir

        plans = {}
        for _ in range(args.rounds):
            _one_round(rows, plans, batches, modes, systems, spec_for, common, assistant, args)
        rows = _merge_rounds(rows)
        paired = None
        members = [s for s in ("in_memory", "streamed", "streamed_disk") if s in systems]
        pairable = args.paired_calls and "warm" in modes and members[:1] == ["in_memory"] and len(members) > 1
        if pairable and not on_cuda and "streamed" in members:
            # one process holds the whole model and ours, whose budget plan keeps what fits: on CPU both in RAM (on a
            # GPU ours plans with the memory the whole model leaves free there)
            why = _does_not_fit(2 * whole, None)
            if why:
                logger.warning("skipping the warm run in one process (--paired-calls), two models: %s", why)
                pairable = False
        if pairable:
            logger.info("measuring %s warm in one process, alternating", ", ".join(members))
            spec = {
                **common,
                "system": "paired",
                "members": [{**spec_for(s), "name": s, "profile": False} for s in members],
                "calls": args.paired_calls,
            }
            spec.pop("repeats")
            _rewarm(layer_files)
            paired = _run(spec, args.timeout)
        if disk is not None:
            # the disk is shared too: measure again after the runs and keep the faster (the physical limit)
            again = measure_disk_bandwidth(layer_files)
            samples = [disk["bandwidth"], again["bandwidth"]]
            ways = [disk["pair_way"], again["pair_way"]]  # (the cold steps of ours were paired with the first)
            steal = [disk.get("cpu_steal_share"), again.get("cpu_steal_share")]
            disk = max(disk, again, key=lambda d: d["bandwidth"] or 0)
            disk["samples"] = samples
            disk["sample_ways"] = ways
            disk["steal_samples"] = steal
        baseline_rss = min((r["baseline_rss"] for r in rows if r.get("baseline_rss")), default=None)
        _derive(rows, disk, stored, baseline_rss, resident_bytes, layer_bytes, stored_by_system, h2d, lossy, scheme)
        if paired is not None and not paired.get("error"):
            paired["targets"] = paired_targets(paired, rows, on_cuda)
            ref = paired["tokens"]["in_memory"]
            ours = {s: t for s, t in paired["tokens"].items() if s != "in_memory"}
            paired["same_tokens"] = {s: t == ref for s, t in ours.items() if s not in lossy}
            paired["token_agreement"] = {s: token_agreement(t, ref) for s, t in ours.items() if s in lossy}
            paired["labels"] = {s: _label(s, scheme if s in lossy else None) for s in ours}
        return {
            "model": model_info,
            "disk": disk,
            "h2d": h2d,
            "baseline_rss": baseline_rss,
            "rows": rows,
            "paired": paired,
            "targets": {
                "warm": WARM_TARGET,
                "warm_resident": WARM_RESIDENT_TARGET,
                "cold": COLD_TARGET,
                "cold_vs_accelerate": COLD_VS_ACCELERATE,
                "rss_slack": RSS_SLACK,
                "cuda_host": CUDA_HOST_TARGET,
            },
        }
    finally:
        if args.work is None:  # (a temporary folder of its own; never one given)
            remove_work_folder(work)


def probe_cuda(device) -> dict:
    """In a child (`_probe_cuda`): the free and total memory of CUDA `device`, and its pinned host-to-device bandwidth
    (`measure_h2d_bandwidth`)."""
    import torch

    device = torch.device(device)
    h2d = measure_h2d_bandwidth(device)
    free, total = torch.cuda.mem_get_info(device)
    return {"free": free, "total": total, "h2d": h2d}


def _probe_cuda(device, timeout: float) -> dict:
    """`probe_cuda` in a child process of its own. Measured here, it would leave this process a CUDA context (a few
    hundred MiB of the GPU) for the whole run, which each child's default budget would see as taken."""
    from ._measure import run_child

    return run_child({"system": "cuda_probe", "device": str(device)}, timeout=timeout)


def _does_not_fit(nbytes: int, device, free: int | None = None) -> str | None:
    """Why weights of `nbytes` cannot be measured whole in memory on `device` (the host where `None`), or `None` where
    they fit (see `FIT_SHARE`). A CUDA device's `free` memory is given (`probe_cuda`)."""
    from .engine import available_host_memory

    if device is None:
        free, where = available_host_memory(), "this machine's available RAM"
    else:
        where = f"the free memory of {device}"
    if nbytes <= FIT_SHARE * free:
        return None
    return f"their weights ({nbytes / 1e9:.2f} GB) are more than {FIT_SHARE:.0%} of {where} ({free / 1e9:.2f} GB)"


def _one_round(rows, plans, batches, modes, systems, spec_for, common, assistant, args) -> None:
    """Every requested measurement once, appended to `rows` (rounds interleave systems, so load spikes on a
    shared machine hit all of them alike)."""
    for batch in batches:
        for mode in modes:
            for system in systems:
                if mode == "cold" and system == "in_memory":
                    continue
                if (
                    mode == "cold"
                    and system in ("streamed", "streamed_host")
                    and plans.get(system, {}).get("streamed") == []
                ):
                    continue  # nothing is read from disk: a cold run would measure the warm one again
                spec = {**spec_for(system), **common, "batch": batch, "cold": mode == "cold"}
                if mode == "cold" and spec["system"] == "streamed":
                    # cold stands for a model larger than RAM: our plan would then keep none of the streamed layers
                    # in the page cache (a layer read ahead for the next sweep must come from the disk again)
                    spec["keep_in_page_cache"] = False
                logger.info("measuring %s %s batch %d", system, mode, batch)
                t0 = time.perf_counter()
                r = _run(spec, args.timeout)
                r["wall_s"] = time.perf_counter() - t0
                r["system"], r["mode"] = system, mode
                if "plan_data" in r:
                    plans[system] = r["plan_data"]
                rows.append(r)
        if assistant and batch == 1:
            # accelerate's offload hooks do not survive assisted decoding (meta tensors): ours and the reference
            for system in (s for s in systems if s != "accelerate_offload"):
                spec = {**spec_for(system), **common, "batch": 1, "assistant": assistant}
                r = _run(spec, args.timeout)
                r["system"], r["mode"] = system, "warm, assisted"
                rows.append(r)


def _merge_rounds(rows: list[dict]) -> list[dict]:
    """One row per (system, mode, batch): the round with the median seconds per token, all rounds listed."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["system"], r["mode"], r["batch"]), []).append(r)
    merged = []
    for group in groups.values():
        ok = sorted((r for r in group if r.get("s_per_token")), key=lambda r: r["s_per_token"])
        pick = dict(ok[(len(ok) - 1) // 2] if ok else group[0])
        pick["rounds_s_per_token"] = [r.get("s_per_token") for r in group]
        merged.append(pick)
    return merged


def _run(spec: dict, timeout: float) -> dict:
    """One child; a failing system becomes a row with its error instead of ending the whole benchmark."""
    from ._measure import run_child

    try:
        return run_child(spec, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - reported in the table
        logger.warning("%s failed: %s", spec["system"], e)
        return {
            "system": spec["system"],
            "batch": spec.get("batch", 1),
            "error": str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__,
            "s_per_token": None,
            "tokens": None,
            "peak_rss": None,
        }


def paired_targets(paired: dict, rows: list[dict], on_cuda: bool) -> dict[str, float | None]:
    """The targets of the warm run in one process: its rows' (1.05x for a budget that keeps every layer, else 1.10x),
    and none where the row has none: on CUDA a row that copies layers to the device is bound by the copy, not by the
    whole model the ratios there are to. A row that failed in its own process tells nothing of its plan: on CUDA no
    target then, on CPU 1.10x."""
    warm_rows = {r["system"]: r for r in rows if r["mode"] == "warm" and r["batch"] == 1 and not r.get("error")}
    fallback = None if on_cuda else WARM_TARGET
    return {s: warm_rows[s].get("target") if s in warm_rows else fallback for s in paired["ratios"]}


_REF_MODES = ("warm", "warm, assisted")


def _derive(
    rows,
    disk,
    stored,
    baseline_rss,
    resident_bytes,
    layer_bytes,
    stored_by_system=None,
    h2d=None,
    lossy=(),
    scheme=None,
) -> None:
    """Add tokens/s, limits, ratios and target checks to each row, in place.

    Rows of quantized shards are lossy: those of `stored_by_system` (`--compression`) and the systems in `lossy`
    (all of ours where SOURCE is quantized, by `scheme`, named in their labels). They get `token_agreement` with the
    whole model in memory instead of `same_tokens`, which stays `None`.

    A row that ran on CUDA (it has a `cuda_peak`) is also compared with the host-to-device limit (`h2d`, see
    `measure_h2d_bandwidth`): every byte of a layer not kept on the device crosses to it at every sweep. Warm, that
    copy (not the GPU's compute) is the limit; the `streamed_host` row's target is `CUDA_HOST_TARGET` times it. Its
    GPU memory peak is checked against the resident parts, the layers the plan keeps on the device, (prefetch + 1)
    layers in flight, and the KV cache and activations: what the whole model on the device peaked at beyond its
    weights at the same batch size.
    """
    stored_by_system = stored_by_system or {}
    full_disk = {(r["mode"], r["batch"]): r for r in rows if r["system"] == "streamed_disk"}

    # the whole model in memory, warm: what each row is compared with (an assisted row with its assisted row: the
    # same decoding, not plain decoding, which takes other time per token)
    ref = {(r["mode"], r["batch"]): r for r in rows if r["system"] == "in_memory" and r["mode"] in _REF_MODES}
    acc_cold = {r["batch"]: r for r in rows if r["system"] == "accelerate_offload" and r["mode"] == "cold"}
    bandwidth = disk["bandwidth"] if disk else None
    h2d_bandwidth = h2d["bandwidth"] if h2d else None
    for r in rows:
        spt = r.get("s_per_token")
        r["label"] = _label(r["system"], scheme if r["system"] in lossy else None)
        r["tokens_per_s"] = r["batch"] / spt if spt else None
        base = ref.get(("warm, assisted" if "assisted" in r["mode"] else "warm", r["batch"]))
        comparable = base is not None and r["system"] != "in_memory" and r.get("tokens") and base.get("tokens")
        extra_rows = r["system"] in stored_by_system
        is_lossy = extra_rows or r["system"] in lossy
        r["same_tokens"] = (r["tokens"] == base["tokens"]) if comparable and not is_lossy else None
        if comparable and is_lossy:
            r["token_agreement"] = token_agreement(r["tokens"], base["tokens"])
        full = full_disk.get((r["mode"], r["batch"]))
        if extra_rows and full is not None and spt and full.get("s_per_token"):
            r["speedup_vs_full_precision"] = full["s_per_token"] / spt
        plan = r.get("plan_data")
        on_cuda = r.get("cuda_peak") is not None
        sizes = stored_by_system.get(r["system"], stored)
        if r["system"].startswith("streamed") and plan is not None:
            swept = sum(sizes[i] for i in plan["streamed"])
        elif r["system"] == "accelerate_offload":
            swept = sum(stored)  # accelerate reads every layer's weights per sweep (its own files, same bytes)
        else:
            swept = 0
        r["bytes_per_sweep"] = swept
        r["compute_s"] = base["s_per_token"] if base else None
        r["disk_limit_s"] = swept / bandwidth if (bandwidth and swept) else None
        if on_cuda and plan is not None:
            # host tier and disk tier alike cross to the device at every sweep, as stored (dequantized there); so
            # does a head kept in host RAM (a small GPU's plan, e.g. `--max-memory 0=300MiB`)
            crossing = swept + sum(sizes[i] for i in plan["host_layers"]) + plan.get("host_resident_copied", 0)
            r["h2d_bytes_per_sweep"] = crossing
            r["h2d_limit_s"] = crossing / h2d_bandwidth if (h2d_bandwidth and crossing) else None
        r["target"] = None
        if r["mode"] == "cold":
            r["limit_s"] = r["disk_limit_s"]
            # neither can be faster than the slower of the two, whatever the overlap
            r["bound_s"] = max(x for x in (r["disk_limit_s"], r["compute_s"], 0) if x is not None)
            if r["system"].startswith("streamed") and swept:  # (a plan that streams nothing reads nothing: no target)
                r["target"] = COLD_TARGET
                acc = acc_cold.get(r["batch"])
                if acc is not None and spt and acc.get("s_per_token"):
                    r["ratio_to_accelerate"] = spt / acc["s_per_token"]
        elif on_cuda and plan is not None:
            # warm on a GPU: the copy to the device, not the compute, is the limit of whatever is not kept there
            r["limit_s"] = max((x for x in (r["compute_s"], r.get("h2d_limit_s")) if x is not None), default=None)
            r["bound_s"] = r["limit_s"]
            if r["system"] == "streamed_host":
                r["target"] = CUDA_HOST_TARGET
            elif r["system"] == "streamed" and not plan["streamed"] and not plan["host_layers"]:
                r["target"] = WARM_RESIDENT_TARGET
        else:
            r["limit_s"] = r["compute_s"]
            r["bound_s"] = r["compute_s"]
            if r["system"] == "streamed_disk" or (r["system"] == "streamed" and plan and plan["streamed"]):
                r["target"] = WARM_TARGET
            elif r["system"] == "streamed":
                r["target"] = WARM_RESIDENT_TARGET
        share = r.get("cold_cached_share")
        r["cold_cached"] = r["mode"] == "cold" and share is not None and share > COLD_CACHED_SHARE
        if r["cold_cached"]:
            r["target"] = None  # (not a read from the disk: the disk's limit does not bound it)
        r["ratio_to_limit"] = spt / r["limit_s"] if (spt and r.get("limit_s")) else None
        if not r.get("peak_rss"):  # (0: no /proc/self/status here, nothing was measured)
            r["peak_rss"] = None
        r["ratio_to_bound"] = spt / r["bound_s"] if (spt and r.get("bound_s")) else None
        k = plan["prefetch"] if plan is not None else None
        # a layer in flight, and what its weights need beyond that: held packed, one weight dequantized at a time,
        # where the plan dequantizes per module (its layer sizes are the packed ones)
        packed = plan is not None and plan.get("dequantize") == "module"
        in_flight_layer = max(plan["layer_bytes"], default=0) if packed else layer_bytes
        scratch = plan.get("scratch", 0) if packed else 0
        # (what the allowances below count in flight, as the notes say it)
        in_flight_terms = (
            "(prefetch+1) packed layers + the largest dequantized weight" if packed else "(prefetch+1) layers"
        )
        # host RSS on CPU only: on CUDA the weights live on the device, and the CUDA runtime's libraries (loaded at
        # its first use, after the baseline) dwarf what the loader holds in host memory
        if r["system"].startswith("streamed_disk") and plan is not None and not on_cuda and r["peak_rss"] is not None:
            allowed = RSS_SLACK * (resident_bytes + (k + 1) * in_flight_layer + scratch)
            r["rss_over_baseline"] = r["peak_rss"] - (r.get("baseline_rss") or baseline_rss or 0)
            r["rss_allowed"] = allowed
            r["in_flight_terms"] = in_flight_terms
        if on_cuda and plan is not None and base is not None and base.get("cuda_peak") is not None:
            # (what the whole model holds)
            weights = resident_bytes + (len(plan["layer_bytes"]) * layer_bytes if packed else sum(plan["layer_bytes"]))
            kv_and_activations = max(0, base["cuda_peak"] - weights)
            kept = sum(plan["layer_bytes"][i] for i in plan["device_layers"])
            in_flight = (k + 1) * in_flight_layer if (plan["streamed"] or plan["host_layers"]) else 0
            in_flight += scratch
            on_device = resident_bytes
            if plan.get("host_resident"):  # the embeddings and head in host RAM: the head's copy while it runs
                on_device = plan["resident_bytes"]
                in_flight = max(in_flight, plan["host_resident_copied"] + k * in_flight_layer)
            r["cuda_kv_and_activations"] = kv_and_activations
            r["cuda_allowed"] = on_device + kept + in_flight + kv_and_activations
            r["in_flight_terms"] = in_flight_terms
        r.pop("plan_data", None)


def _mode(r: dict) -> str:
    """A row's mode as the table shows it: "cold (cached)" for a cold row whose files the drop left cached."""
    return "cold (cached)" if r.get("cold_cached") else r["mode"]


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _gb(n) -> str:
    """Bytes as GB; below 0.1 GB as MB (a tiny model's "0.01 GB, allowed 0.00 GB" told nothing)."""
    if n is None:
        return "-"
    return f"{n / 1e6:.1f} MB" if abs(n) < 1e8 else f"{n / 1e9:.2f} GB"


def format_report(report: dict) -> str:
    """The report as a text table: one row per system, mode and batch size, then the limits and the targets."""
    m = report["model"]
    lines = [
        f"model: {m['num_layers']} layers, {m['layer_file_bytes'] / 1e9:.2f} GB of layer files + "
        f"{m['resident_bytes'] / 1e9:.2f} GB resident parts; prompt {m['prompt_tokens']} tokens, "
        f"{m['max_new_tokens']} new tokens (greedy)",
    ]
    scheme = scheme_name(m.get("compression"))
    if scheme:
        lines.append(
            f"shards quantized ({scheme}): lossy, so our rows show the share of the whole model's greedy tokens they "
            "agree with (same: %), not exactness"
        )
    disk = report.get("disk")
    if disk:
        lines.append(
            f"disk read bandwidth: {disk['bandwidth'] / 1e9:.2f} GB/s ({disk['method']}, {disk['bytes'] / 1e9:.2f} GB "
            f"in {disk['seconds']:.2f} s; best of {', '.join(f'{b / 1e9:.2f}' for b in disk.get('samples', []))} GB/s "
            "measured before and after the runs)"
        )
        if disk.get("by_method"):
            ways = "; ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in disk["by_method"].items() if v)
            lines.append(f"  by way of reading (the fastest is the limit): {ways}")
    h2d = report.get("h2d")
    if h2d:
        lines.append(
            f"pinned host-to-device bandwidth: {h2d['bandwidth'] / 1e9:.2f} GB/s (fastest of {len(h2d['samples'])} "
            f"copies of {h2d['bytes'] / 2**20:.0f} MiB)"
        )
    lines.append(
        f"baseline RSS (python + torch + transformers imported, before loading): {_gb(report['baseline_rss'])}"
    )
    # (as wide as the longest label: a quantized SOURCE's labels name the scheme at their end)
    width = max([40] + [len(r["label"]) for r in report["rows"]])
    header = (
        f"{'system':{width}} {'mode':14} {'batch':>5} {'s/token':>8} {'tok/s':>7} {'prompt s':>8} {'peak RSS':>9} "
        f"{'CUDA peak':>9} {'limit s':>8} {'x limit':>7} {'x bound':>7} {'target':>7} {'same':>5}"
    )
    lines += ["", header, "-" * len(header)]
    for r in report["rows"]:
        ok = ""
        if r.get("target") and r.get("ratio_to_limit"):
            ok = f"{'<=' if r['ratio_to_limit'] <= r['target'] else '>'}{r['target']:.2f}"
        same = {True: "yes", False: "NO", None: "ref" if r["system"] == "in_memory" else "-"}[r.get("same_tokens")]
        if r.get("token_agreement") is not None:  # lossy: the share of the reference's tokens
            same = f"{r['token_agreement']:.0%}"
        if r.get("error"):
            lines.append(f"{r['label']:{width}} {_mode(r):14} {r['batch']:>5} failed: {r['error'][:80]}")
            continue
        lines.append(
            f"{r['label']:{width}} {_mode(r):14} {r['batch']:>5} {_fmt(r['s_per_token'], '8.3f'):>8} "
            f"{_fmt(r['tokens_per_s'], '7.2f'):>7} {_fmt(r.get('prefill_s'), '8.3f'):>8} {_gb(r['peak_rss']):>9} "
            f"{_gb(r.get('cuda_peak')):>9} {_fmt(r.get('limit_s'), '8.3f'):>8} {_fmt(r.get('ratio_to_limit'), '7.2f'):>7} "
            f"{_fmt(r.get('ratio_to_bound'), '7.2f'):>7} {ok:>7} {same:>5}"
        )
    notes = []
    for r in report["rows"]:
        if r.get("ratio_to_accelerate") is not None:
            # the target compares like with like: every layer from disk at full precision, as accelerate reads them
            # (a budget plan keeps layers in memory; compressed shards read fewer bytes and are lossy)
            if r["system"] == "streamed_disk" and not scheme and not r.get("cold_cached"):
                verdict = "ok" if r["ratio_to_accelerate"] <= COLD_VS_ACCELERATE else "short"
                verdict = f"target <= {COLD_VS_ACCELERATE}: {verdict}"
            else:
                verdict = "for information: not the target's like-for-like row"
            notes.append(
                f"{r['label']} {_mode(r)}, batch {r['batch']}: {r['ratio_to_accelerate']:.2f}x accelerate's cold disk "
                f"offload ({verdict})"
            )
        if r.get("speedup_vs_full_precision") is not None:
            target = f" (issue target >= {COMPRESSED_SPEEDUP} cold)" if r["mode"] == "cold" else ""
            agreement = r.get("token_agreement")
            agreement = "not compared (no in-memory row)" if agreement is None else f"{agreement:.0%}"
            notes.append(
                f"{r['label']} {_mode(r)}, batch {r['batch']}: {r['speedup_vs_full_precision']:.2f}x the speed of "
                f"full-precision shards from disk{target}; greedy tokens agreeing with full precision: {agreement}"
            )
        if r.get("rss_allowed") is not None:
            verdict = "ok" if r["rss_over_baseline"] <= r["rss_allowed"] else "over"
            notes.append(
                f"{r['label']} {_mode(r)}: peak RSS over baseline {_gb(r['rss_over_baseline'])}, allowed "
                f"{RSS_SLACK:.2f} x (resident + {r['in_flight_terms']}) = {_gb(r['rss_allowed'])} ({verdict})"
            )
        if r.get("cuda_allowed") is not None and r.get("cuda_peak") is not None:
            verdict = "ok" if r["cuda_peak"] <= r["cuda_allowed"] else "over"
            reserved = r.get("cuda_reserved_peak")
            notes.append(
                f"{r['label']} {_mode(r)}: CUDA peak {_gb(r['cuda_peak'])}, allowed resident + kept + "
                f"{r['in_flight_terms']} + KV cache and activations ({_gb(r['cuda_kv_and_activations'])}, the whole "
                f"model's peak beyond its weights) = {_gb(r['cuda_allowed'])} ({verdict})"
                + (f"; reserved by torch's allocator at most {_gb(reserved)}" if reserved is not None else "")
            )
        if r.get("h2d_limit_s") is not None:
            notes.append(
                f"{r['label']} {_mode(r)}: {r['h2d_bytes_per_sweep'] / 1e9:.2f} GB cross to the device per sweep, "
                f"{r['h2d_limit_s']:.4f} s at the pinned host-to-device bandwidth"
            )
        pd = r.get("paired_disk")
        if pd and pd.get("ratio") is not None:
            verdict = "ok" if pd["ratio"] <= COLD_TARGET else "short"
            if r.get("cold_cached"):
                verdict = "not a read from the disk: the files stayed cached"
            bw = sorted(pd["sample_bandwidth"])
            notes.append(
                f"{r['label']} {_mode(r)}, batch {r['batch']}, each step against a read of its {pd['files']} layer files "
                f"({pd['way']}, {bw[0] / 1e9:.2f}-{bw[-1] / 1e9:.2f} GB/s) just before it: {pd['ratio']:.2f}x (median of "
                f"{len(pd['ratios'])} steps; target <= {COLD_TARGET}: {verdict})"
            )
        if "assisted" in r["mode"] and r.get("sweeps_per_token") is not None:  # (a row that failed has none)
            notes.append(f"{r['label']} assisted: {r['sweeps_per_token']:.2f} sweeps per generated token")
        if r.get("disk_read_bytes") is not None and r.get("total_sweeps") and r["system"] != "in_memory":
            notes.append(
                f"{r['label']} {_mode(r)}: read from the disk while generating {r['disk_read_bytes'] / 1e9:.2f} GB "
                f"= {r['disk_read_bytes'] / r['total_sweeps'] / 1e9:.3f} GB per sweep"
            )
        steal = r.get("cpu_steal_share")
        if steal is not None and steal >= STEAL_NOTE_SHARE:
            notes.append(
                f"{r['label']} {_mode(r)}: the hypervisor took {steal:.0%} of this machine's CPU time during the timed "
                "decode steps (steal, /proc/stat)"
            )
        if r.get("profile"):
            p = r["profile"]
            notes.append(
                f"{r['label']} {_mode(r)} profile: compute {p['compute']:.2f} s, wait {p['wait']:.2f} s, read "
                f"{p['read']:.2f} s ({p['bytes_read'] / 1e9:.2f} GB), dequantize {p['dequantize']:.2f} s, copy "
                f"{p['copy']:.2f} s over {p['forward_calls']} sweeps"
            )
    lines += [
        "",
        "s/token: median decode step; prompt s: the prompt pass (time to the first token, not in s/token)",
        "limit: warm = whole model in RAM (compute), on CUDA the larger of that and bytes crossing to the device "
        "per sweep / pinned host-to-device bandwidth; cold = bytes per sweep / disk bandwidth; "
        "bound = max(disk limit, compute)",
    ]
    stolen = [r for r in report["rows"] if r["mode"] == "cold" and (r.get("cpu_steal_share") or 0) >= STEAL_NOTE_SHARE]
    if stolen and disk and disk.get("steal_samples"):
        alone = ", ".join(_fmt(x, ".0%") for x in disk["steal_samples"])
        lines.append(
            f"steal: the hypervisor took CPU time from this virtual machine while cold rows computed and read (up to "
            f"{max(r['cpu_steal_share'] for r in stolen):.0%}), against {alone} while the disk bandwidth was measured "
            "with the CPUs idle: where the host's disk emulation shares the cores, the disk limit may not be "
            "reachable while computing"
        )
    cached = [r for r in report["rows"] if r.get("cold_cached")]
    if cached:
        share = min(r["cold_cached_share"] for r in cached)
        least = " (the least of those rows)" if len(cached) > 1 else ""
        lines.append(
            f"cold (cached): after the drop from the page cache, {share:.0%} of the weight files' bytes stayed cached"
            f"{least} ("
            + (
                "a tmpfs keeps them in memory whatever is dropped; or something else maps them"
                if hasattr(os, "posix_fadvise")
                else "this system has no posix_fadvise to drop them"
            )
            + "), so those cold rows read from memory, not from the disk; no cold target is held to them"
        )
    lines += notes
    paired = report.get("paired")
    if paired and paired.get("error"):
        lines.append(f"warm, in one process: failed: {paired['error'][:120]}")
    elif paired:
        n = len(paired["calls"]["in_memory"])
        lines.append(
            f"warm, in one process, alternating generate calls ({n} each; whole model in RAM "
            f"{paired['s_per_token']['in_memory']:.3f} s/token):"
        )
        for s, ratio in paired["ratios"].items():
            target = paired["targets"][s]
            if s in (paired.get("token_agreement") or {}):  # quantized shards: lossy
                same = f"greedy tokens agreeing with the whole model's: {paired['token_agreement'][s]:.0%}"
            else:
                same = "same tokens" if paired["same_tokens"][s] else "DIFFERENT TOKENS"
            low, high = paired["spread"][s]
            label = (paired.get("labels") or {}).get(s) or _label(s)
            verdict = f"target <= {target:.2f}: {'ok' if ratio <= target else 'short'}" if target else "no target"
            lines.append(
                f"  {label}: {paired['s_per_token'][s]:.3f} s/token, {ratio:.2f}x the whole model in RAM "
                f"(median of per-call ratios, the middle half {low:.2f}x-{high:.2f}x; {verdict}); {same}"
            )
    return "\n".join(lines)
