"""Where the time goes: a memory budget, the residency plan it gives, and per-layer timings of one `generate` call.

    python examples/budget_and_profile.py qwen05b.layers --max-memory '{"cpu": 0}'         # all streamed
    python examples/budget_and_profile.py qwen05b.layers --max-memory '{"cpu": "1GiB"}'    # some kept
    python examples/budget_and_profile.py qwen05b.layers --max-memory '{"0": "2GiB", "cpu": "8GiB"}' --prefetch 3
    python examples/budget_and_profile.py qwen05b.layers --max-memory '{"0": "8GiB"}' --reserve 3GiB  # a long context

`SHARD_DIR` is a shard directory made by `split_checkpoint` or `hf-layerstream split` (see quickstart.py). The profile
separates what the compute waited for the loader from what the loader did in the background (read, dequantize,
host-to-device copy): a large `wait` means the disk (or the decoding of compressed shards) is the limit. On CUDA,
profiling waits for the GPU after every copy and every layer so that the times are real: it removes the overlap of
copies and compute, so time the speed itself without it.
"""

from __future__ import annotations

import argparse
import json

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_layerstream import disable_layer_streaming, enable_layer_streaming, get_streaming_state


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shard_dir", help="shard directory made by `split_checkpoint` / `hf-layerstream split`")
    p.add_argument(
        "--max-memory", type=json.loads, default={"cpu": 0}, help='budget (default {"cpu": 0}: every layer from disk)'
    )
    p.add_argument(
        "--reserve",
        default=None,
        help="on a GPU: the part of its budget left free for activations and the KV cache, in bytes or as a size such "
        "as 3GiB (default: the library's; ignored on CPU)",
    )
    p.add_argument(
        "--prefetch", type=int, default=None, help="layers read ahead of the compute (default: the library's)"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--prompt", default="The quick brown fox", help="the prompt (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default: %(default)s)")
    args = p.parse_args(argv)

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.shard_dir))
    tokenizer = AutoTokenizer.from_pretrained(args.shard_dir)
    enable_layer_streaming(
        model,
        args.shard_dir,
        device=args.device,
        max_memory=args.max_memory,
        reserve=args.reserve,
        prefetch=args.prefetch,
        profile=True,
    )
    state = get_streaming_state(model)
    print("plan:", state.plan.summary())
    for index in range(len(state.plan.layer_bytes)):
        print(f"  layer {index:3d}: {state.plan.tier(index)}")

    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tokenizer.decode(out[0], skip_special_tokens=True))

    profile = state.last_profile  # the last generate call's, as data; `state.profile.summary()` prints it
    print(state.profile.summary())
    slowest = max(profile["layers"].items(), key=lambda kv: kv[1]["wait"] + kv[1]["compute"])
    print(f"slowest layer: {slowest[0]} ({slowest[1]['wait'] + slowest[1]['compute']:.4f} s waiting and computing)")
    disable_layer_streaming(model)  # stops the loader thread and frees every buffer
    return profile


if __name__ == "__main__":
    main()
