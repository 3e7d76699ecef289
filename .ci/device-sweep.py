"""In one process on a GPU: the bench model's decode time per token, whole on the GPU and streamed, over `prefetch`.

    python .ci/device-sweep.py WORK [PREFETCH ...]     (`ONLY=sweep bash .ci/device-check` runs it)

Separate processes on the lent machine differ by up to 1.7x in speed from one call to the next (the whole model took
12 to 21 ms a token), so `bench`'s rows, each in its own process, cannot tell a few percent apart; here every row
runs in one process, in rounds, the whole model first and last. Rows: every layer from pinned host RAM at each
`prefetch` (default 2 3 4 6 8) and at the default, every layer from the disk (warm) at the default and at 2, and the
default plan (it keeps every layer there). A step's time is (generate 9 tokens - generate 1) / 8, medians of 5 each.
The host-RAM row at the default `prefetch` also gives the loader's mean times per layer: waiting for the GPU to pass
the released layers (`_wait_released`), a whole load (`_load_streamed`), and the compute thread's `acquire`. Last, the
copy limit: one sweep's layer files copied from pinned RAM, one copy each. WORK: `bench --demo`'s work folder (the
model is written and split there if missing)."""

import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hf_layerstream import engine, get_streaming_state
from hf_layerstream.bench import DEMO_SIZES, split_in_work
from hf_layerstream.cli import load_streamed_model
from hf_layerstream.demo import write_demo_checkpoint
from hf_layerstream.modeling import layer_unit
from hf_layerstream.shard_dir import ShardDirectory
from hf_layerstream.stream import disable_layer_streaming

work = Path(sys.argv[1])
prefetches = [int(p) for p in sys.argv[2:]] or [2, 3, 4, 6, 8]
ckpt = work / "checkpoint"
if not (ckpt / "config.json").exists():
    write_demo_checkpoint(ckpt, **DEMO_SIZES)
shards = split_in_work(ckpt, work / "shards")
dev = torch.device("cuda", 0)
ids = torch.arange(100, 116, device=dev)[None]
mask = torch.ones_like(ids)


def step_time(model, reps: int = 5, n: int = 9) -> float:
    def gen(k):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(n), gen(1)
    ones = [gen(1) for _ in range(reps)]
    alls = [gen(n) for _ in range(reps)]
    return (statistics.median(alls) - statistics.median(ones)) / (n - 1)


def tokens(model) -> list[int]:
    return model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)[0].tolist()


def record(name: str, seconds: float, extra: str = "") -> None:
    print(f"{name:50s} {seconds * 1000:8.2f} ms/token {extra}", flush=True)


whole = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, use_kernels=False).to(dev).eval()
reference = tokens(whole)
record("whole model on the GPU", step_time(whole))

times: dict[str, list[float]] = {}


def timed(name, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times.setdefault(name, []).append(time.perf_counter() - t0)

    return wrapper


def streamed(name: str, max_memory, prefetch=None, instrument: bool = False) -> None:
    patched = ("_wait_released", "_load_streamed", "acquire")
    originals = {attr: getattr(engine.LayerLoader, attr) for attr in patched}
    if instrument:
        for attr in patched:
            setattr(engine.LayerLoader, attr, timed(attr, originals[attr]))
    model = None
    try:
        model = load_streamed_model(shards, device=dev, max_memory=max_memory, prefetch=prefetch)
        loader = get_streaming_state(model).loader
        same = tokens(model) == reference
        times.clear()
        torch.cuda.reset_peak_memory_stats(dev)
        seconds = step_time(model)
        extra = (
            f"same tokens: {same}; prefetch {loader.prefetch}; peak {torch.cuda.max_memory_allocated(dev) / 1e9:.2f} GB"
        )
        if instrument:
            extra += "; per layer " + ", ".join(f"{k} {statistics.mean(v) * 1e6:.0f} us" for k, v in times.items())
        record(name, seconds, extra)
    finally:
        for attr, fn in originals.items():
            setattr(engine.LayerLoader, attr, fn)
        if model is not None:
            disable_layer_streaming(model)
        del model
        torch.cuda.empty_cache()


host, disk = {"0": 0}, {"0": 0, "cpu": 0}
for round_ in range(2):
    for p in prefetches:
        streamed(f"host RAM, prefetch {p} (round {round_})", host, prefetch=p)
    streamed(f"host RAM, default prefetch (round {round_})", host, instrument=round_ == 0)
    streamed(f"disk (warm), default prefetch (round {round_})", disk)
    streamed(f"disk (warm), prefetch 2 (round {round_})", disk, prefetch=2)
    streamed(f"default plan (round {round_})", None)
record("whole model on the GPU, again", step_time(whole))

layers = ShardDirectory(shards)
sizes = [layers.unit(layer_unit(i)).size for i in range(layers.num_layers)]
sources = [torch.empty(s, dtype=torch.uint8).pin_memory() for s in sizes]
targets = [torch.empty(s, dtype=torch.uint8, device=dev) for s in sizes]
side = torch.cuda.Stream(dev)
for _ in range(3):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.cuda.stream(side):
        for target, source in zip(targets, sources):
            target.copy_(source, non_blocking=True)
    side.synchronize()
    print(
        f"copy limit: {len(sizes)} layer files, {sum(sizes) / 1e9:.2f} GB, {(time.perf_counter() - t0) * 1000:.2f} ms"
    )
