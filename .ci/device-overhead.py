"""In one process on a GPU: what the default plan (every layer kept on the device) costs a token beyond the whole model.

    python .ci/device-overhead.py WORK [CALLS]     (`ONLY=overhead bash .ci/device-check` runs it)

At batch 1 a GPU waits for the Python that launches its kernels (the bench model's 16 layers: 12 to 21 ms a token on
the lent H200, against well under 1 ms of reading weights), so our hooks' work per layer counts in full. Three models
take turns, `generate` call by call (CALLS each, default 10, 32 new tokens): the whole model on the GPU, ours with
the default plan, and ours with the layer hooks taken off (each layer holding its kept weights from a first call,
its own forward back): the last two's ratios to the first split the default plan's cost into the hooks' share and
the rest (the model's and `generate`'s wrappers, the head's hooks). Then the hooks' own time inside those calls
(`pre_forward` and `post_forward`, per layer call) and the top of a cProfile of one call of each. WORK: `bench
--demo`'s work folder (the model is written and split there if missing). `DEVICE=cpu` runs it here (slowly: the
bench model is 1.7 GB)."""

import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hf_layerstream.bench import DEMO_SIZES, split_in_work
from hf_layerstream.cli import load_streamed_model
from hf_layerstream.demo import write_demo_checkpoint

work = Path(sys.argv[1])
calls = int(sys.argv[2]) if len(sys.argv) > 2 else 10
ckpt = work / "checkpoint"
if not (ckpt / "config.json").exists():
    write_demo_checkpoint(ckpt, **DEMO_SIZES)
shards = split_in_work(ckpt, work / "shards")
dev = torch.device(os.environ.get("DEVICE", "cuda"))
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
ids = torch.arange(100, 116, device=dev)[None]
mask = torch.ones_like(ids)
NEW = 32


def call(model) -> tuple[float, list[int]]:
    sync()
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    sync()
    return (time.perf_counter() - t0) / NEW, out[0].tolist()


whole = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, use_kernels=False).to(dev).eval()
hooked = load_streamed_model(shards, device=dev)
bare = load_streamed_model(shards, device=dev)
call(bare)  # (after a pass without gradients every kept layer holds its weights in its modules)
for layer in bare.model.layers:
    assert layer._hf_hook._installed, "a layer of the default plan does not hold its weights between passes"
    layer.forward = layer._old_forward
models = {"whole model": whole, "default plan": hooked, "default plan, layer hooks off": bare}
reference = call(whole)[1]
for name, model in models.items():
    assert call(model)[1] == reference, f"{name}: other tokens than the whole model's"
seconds: dict[str, list[float]] = {name: [] for name in models}
for _ in range(calls):
    for name, model in models.items():
        seconds[name].append(call(model)[0])
base = seconds["whole model"]
for name, times in seconds.items():
    ratios = sorted(t / b for t, b in zip(times, base))
    print(
        f"{name:32s} {statistics.median(times) * 1000:7.2f} ms/token  {statistics.median(ratios):.3f}x the whole model "
        f"(per-call ratios, the middle half {ratios[len(ratios) // 4]:.3f}-{ratios[(3 * len(ratios)) // 4]:.3f})",
        flush=True,
    )

spent = {"pre_forward": 0.0, "post_forward": 0.0}
counted = [0]
for layer in hooked.model.layers:
    hook = layer._hf_hook
    for attr in spent:

        def timed(*args, _fn=getattr(hook, attr), _attr=attr, **kwargs):
            t0 = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                spent[_attr] += time.perf_counter() - t0
                counted[0] += _attr == "pre_forward"

        setattr(hook, attr, timed)
for _ in range(3):
    call(hooked)
print(
    "hooks inside the calls, per layer call: "
    + ", ".join(f"{k} {v / counted[0] * 1e6:.1f} us" for k, v in spent.items())
)
for name in ("whole model", "default plan"):
    profile = cProfile.Profile()
    profile.enable()
    call(models[name])
    profile.disable()
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    stats.sort_stats("tottime").print_stats(12)
    print(f"cProfile, {name}: {stats.total_tt:.3f} s in all")
    print("\n".join(line[:160] for line in text.getvalue().splitlines()[6:20] if line.strip()))
