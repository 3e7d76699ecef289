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


def vm_hwm() -> int:
    """Peak resident set size of this process in bytes (0 where /proc is not available)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def vm_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def drop_page_cache(paths) -> None:
    """Evict files from the page cache (POSIX_FADV_DONTNEED), simulating a model larger than RAM."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class _TokenClock:
    """A streamer that timestamps every generated token (the first `put` is the prompt)."""

    def __init__(self, before_forward=None):
        self.times: list[float] = []
        self.before_forward = before_forward

    def put(self, value):
        self.times.append(time.perf_counter())
        if self.before_forward is not None:
            self.before_forward()

    def end(self):
        pass


def weight_files(system: str, path: str) -> list[str]:
    from pathlib import Path

    root = Path(path)
    return [str(p) for p in sorted(root.rglob("*.safetensors"))] + [str(p) for p in sorted(root.rglob("*.bin"))] + [
        str(p) for p in sorted(root.rglob("*.dat"))
    ]


def _load(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    system = spec["system"]
    dtype = getattr(torch, spec["dtype"]) if spec.get("dtype") else None
    if system == "in_memory":
        model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype or "auto")
        files = []
    elif system == "accelerate_offload":
        # accelerate's disk offload: the peer we compare against
        model = AutoModelForCausalLM.from_pretrained(
            spec["path"],
            dtype=dtype or "auto",
            device_map="auto",
            max_memory={"cpu": spec.get("offload_budget", "10MiB")},
            offload_folder=spec["offload_folder"],
        )
        files = weight_files(system, spec["offload_folder"])
    elif system == "streamed":
        from .cli import load_streamed_model

        model = load_streamed_model(
            spec["path"],
            device=spec.get("device"),
            dtype=dtype,
            max_memory=spec.get("max_memory"),
            prefetch=spec.get("prefetch"),
            profile=spec.get("profile", False),
        )
        files = weight_files(system, spec["path"])
    else:
        raise ValueError(f"unknown system {system!r}")
    return model.eval(), files


def measure(spec: dict) -> dict:
    """Run `spec` in this process: load, generate greedily, time every token. Returns a JSON-able dict."""
    import torch

    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    t0 = time.perf_counter()
    model, files = _load(spec)
    load_s = time.perf_counter() - t0
    cold = bool(spec.get("cold"))
    if cold and not files:
        raise ValueError(f"system {spec['system']} has no weight files to evict; cold runs need a disk-backed system")
    ids = torch.tensor([spec["input_ids"]], dtype=torch.long)
    batch = int(spec.get("batch", 1))
    ids = ids.repeat(batch, 1)
    device = model.device
    ids = ids.to(device)
    new = int(spec.get("max_new_tokens", 8))
    evict = (lambda: drop_page_cache(files)) if cold else None
    results = []
    for _ in range(int(spec.get("repeats", 1))):
        clock = _TokenClock(evict)
        if evict:
            evict()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                streamer=clock,
                pad_token_id=spec.get("pad_token_id", 0),
            )
        gaps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]  # decode steps (after the first token)
        results.append(
            {"prefill_s": clock.times[1] - clock.times[0] if len(clock.times) > 1 else None, "decode_gaps": gaps}
        )
    gaps = sorted(g for r in results for g in r["decode_gaps"])
    median = gaps[len(gaps) // 2] if gaps else None
    info = {
        "system": spec["system"],
        "cold": cold,
        "batch": batch,
        "load_s": load_s,
        "s_per_token": median,
        "tokens": out[0, ids.shape[1]:].tolist(),
        "peak_rss": vm_hwm(),
        "cuda_peak": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "prefill_s": results[-1]["prefill_s"],
    }
    from .stream import get_streaming_state

    state = get_streaming_state(model)
    if state is not None:
        info["plan"] = state.plan.summary()
        if state.last_profile is not None:
            info["profile"] = state.last_profile["totals"]
    return info


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
    print(json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
