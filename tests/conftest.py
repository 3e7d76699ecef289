"""Shared fixtures: tiny offline checkpoints of real architectures, split once per session."""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import _models  # noqa: E402

from hf_layerstream import enable_layer_streaming, split_checkpoint  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """`checkpoints(arch, **kw)` -> (checkpoint dir, shard dir), built once per distinct request."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("ckpts")

    def get(arch: str, *, dtype=torch.float32, num_hidden_layers=None, compression=None, **split_kw):
        key = (arch, dtype, num_hidden_layers, compression, tuple(sorted(split_kw.items())))
        if key not in cache:
            name = f"{arch}-{str(dtype).removeprefix('torch.')}-{num_hidden_layers}-{compression}-{len(cache)}"
            ckpt = root / name / "checkpoint"
            ckpt_key = (arch, dtype, num_hidden_layers)
            existing = next((c for k, (c, _) in cache.items() if k[:3] == ckpt_key), None)
            if existing is None:
                _models.save_tiny_checkpoint(arch, ckpt, dtype=dtype, num_hidden_layers=num_hidden_layers)
            else:
                ckpt = existing
            shards = split_checkpoint(ckpt, root / name / "shards", compression=compression, progress=False, **split_kw)
            cache[key] = (ckpt, shards)
        return cache[key]

    return get


def build_meta_model(config, *, meta_device: bool = False, dtype=None):
    """The user's side: the model built without weights, as the README shows."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": _models.ATTN_IMPLEMENTATION}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if meta_device:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()


def streamed_model(checkpoint: Path, shards: Path, *, meta_device: bool = False, dtype=None, **kwargs):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    model = build_meta_model(config, meta_device=meta_device, dtype=dtype)
    return enable_layer_streaming(model, shards, device="cpu", dtype=dtype, **kwargs)


def shaped_shard_dir(num_layers: int, layer: int, resident: int, *, stored: int | None = None):
    """A stand-in for a shard directory: only the sizes `plan_residency` reads. Layers of `layer` bytes at the
    model's dtype and `stored` on disk (default the same: full precision; less: quantized)."""
    from types import SimpleNamespace

    units = {"resident": SimpleNamespace(logical_nbytes=resident, size=resident)}
    on_disk = layer if stored is None else stored
    units |= {f"layers.{i}": SimpleNamespace(logical_nbytes=layer, size=on_disk) for i in range(num_layers)}
    return SimpleNamespace(num_layers=num_layers, unit=units.__getitem__)


@contextmanager
def tqdm_lock_held_elsewhere():
    """tqdm's global write lock, held by another thread for as long as the block runs.

    This is how a process finds the lock when a relative was SIGKILLed holding it (its multiprocessing half is a
    semaphore shared with every process forked from the one that created it), or when it was forked while tqdm's
    monitor thread held it: anything that takes the lock then blocks forever.
    """
    from tqdm.std import tqdm

    lock = tqdm.get_lock()
    held, release = threading.Event(), threading.Event()

    def hold():
        with lock:
            held.set()
            release.wait()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(10)
    try:
        yield
    finally:
        release.set()
        holder.join()


def run_python(code: str, *args, timeout: float = 300):
    """`code` run by this Python in a child process (`sys.argv[1:]`: `args`, as strings), importing this checkout's
    hf_layerstream; its completed process, output captured as text. (For a limit set on the child, `ulimit` style,
    that the test process must not take.)"""
    import subprocess

    import hf_layerstream

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(hf_layerstream.__file__).parents[1]), *sys.path]))
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


def returns_within(seconds: float, fn, *args, **kwargs):
    """`fn(*args, **kwargs)` run in a thread; fails if it has not returned after `seconds` (it is left to finish)."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{getattr(fn, '__name__', fn)} still blocked after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def generate_from_threads(model, tok, prompts: list[str], wanted: list, calls: int = 3, **kwargs) -> None:
    """One thread per prompt, started at once, each calling `model.generate` on its prompt `calls` times (a server's
    worker threads); every call must give `wanted[i]` exactly, none may raise."""
    results: dict[int, list] = {i: [] for i in range(len(prompts))}
    start = threading.Barrier(len(prompts))

    def run(i):
        start.wait()
        for _ in range(calls):
            try:
                results[i].append(model.generate(**tok(prompts[i], return_tensors="pt"), **kwargs))
            except Exception as e:  # noqa: BLE001 - reported below
                results[i].append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(len(prompts)):
        assert len(results[i]) == calls
        for out in results[i]:
            assert isinstance(out, torch.Tensor), out
            assert torch.equal(out, wanted[i])


def assert_same_decode_steps(
    ref, streamed, inputs, steps: int = 4, *, pad_token_id: int = _models.PAD_TOKEN_ID, hidden_states: bool = False
) -> tuple[torch.Tensor, ...]:
    """Greedy `generate` of both: the same tokens, and every step's logits (and, with `hidden_states`, every layer's
    hidden states) bit for bit. Returns the logits."""
    kw = {
        "max_new_tokens": steps,
        "min_new_tokens": steps,
        "do_sample": False,
        "return_dict_in_generate": True,
        "output_logits": True,
        "output_hidden_states": hidden_states,
        "pad_token_id": pad_token_id,
    }
    a, b = ref.generate(**inputs, **kw), streamed.generate(**inputs, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.logits) == len(b.logits) == steps
    for step, (x, y) in enumerate(zip(a.logits, b.logits)):
        assert torch.equal(x, y), f"step {step}: logits differ by up to {(x - y).abs().max().item():.3g}"
    if hidden_states:
        assert len(a.hidden_states) == len(b.hidden_states) == steps
        assert all(len(xs) == len(ys) for xs, ys in zip(a.hidden_states, b.hidden_states))
        for step, (xs, ys) in enumerate(zip(a.hidden_states, b.hidden_states)):
            for layer, (x, y) in enumerate(zip(xs, ys)):
                assert torch.equal(x, y), f"step {step}, hidden state {layer} differs"
    return a.logits


def anon_growth_under_autocast(model, ids, *, calls: int = 3, tokens: int = 4) -> int | None:
    """Bytes of anonymous memory (`RssAnon`) the process gained over `calls` `generate` calls of `tokens` tokens in
    one `torch.autocast` block to bfloat16 (after one call outside it), measured inside the block; `None` without
    /proc/self/status."""
    import gc

    from hf_layerstream._measure import _status_bytes

    if not _status_bytes("RssAnon"):
        return None
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, pad_token_id=0)
        gc.collect()
        before = _status_bytes("RssAnon")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for _ in range(calls):
                model.generate(ids, max_new_tokens=tokens, pad_token_id=0)
            return _status_bytes("RssAnon") - before
