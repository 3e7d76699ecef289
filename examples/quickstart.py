"""Split a checkpoint once, then generate with the native transformers model and `pipeline`, one layer at a time.

    python examples/quickstart.py Qwen/Qwen2.5-0.5B-Instruct --shards qwen05b.layers
    python examples/quickstart.py ./my-local-checkpoint --shards my.layers --compression 4bit --max-memory '{"cpu": "2GiB"}'
    python examples/quickstart.py ./my-local-checkpoint --shards tuned.layers --adapter ./my-lora  # merged as it splits
    python examples/quickstart.py Qwen/Qwen2.5-0.5B-Instruct --adapter some-org/qwen-lora --adapter-revision v2
    python examples/quickstart.py ./my-local-checkpoint --adapter ./domain-lora --adapter ./style-lora  # each in turn

The first run splits the checkpoint into `--shards` (one file per decoder layer); later runs find the split done and
go straight to generating. Nothing but the resident parts (embeddings, final norm, head) and the layers the budget
allows is ever in memory.
"""

from __future__ import annotations

import argparse
import json

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TextStreamer, pipeline

from hf_layerstream import enable_layer_streaming, get_streaming_state, split_checkpoint


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "model",
        nargs="?",
        default="Qwen/Qwen2.5-0.5B-Instruct",
        help="hub id or local checkpoint folder (default: %(default)s, downloaded)",
    )
    p.add_argument(
        "--shards",
        default=None,
        help="shard directory (default: <model name>.layers; <model name>+<adapter name>[+...].layers with --adapter, "
        "<model name>+<adapter name>@<revision>.layers with --adapter-revision too)",
    )
    p.add_argument("--compression", choices=["4bit", "8bit"], default=None, help="block-quantized shards (lossy)")
    p.add_argument(
        "--adapter",
        action="append",
        default=None,
        help="a PEFT adapter (LoRA and the like), folder or hub id, merged into the weights as they are split (needs "
        "peft); repeated, each is merged in turn",
    )
    p.add_argument(
        "--adapter-revision",
        action="append",
        default=None,
        help="branch, tag or commit of a hub --adapter (default: its default branch); once per --adapter where given",
    )
    p.add_argument(
        "--max-memory",
        type=json.loads,
        default=None,
        help='budget, e.g. \'{"cpu": "16GiB", "0": "4GiB"}\' (default: the library\'s plan)',
    )
    p.add_argument(
        "--reserve",
        default=None,
        help="on a GPU: the part of its budget left free for activations and the KV cache, in bytes or as a size such "
        "as 3GiB (default: the library's; ignored on CPU)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--prompt", default="What is the capital of France?", help="the prompt (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: %(default)s)")
    args = p.parse_args(argv)
    adapters, revisions = args.adapter or [], args.adapter_revision or []  # ('' for a default branch, as in `split`)
    if revisions and not adapters:
        p.error("--adapter-revision is the revision of a hub --adapter: pass the --adapter too")
    if revisions and len(revisions) != len(adapters):
        p.error("give --adapter-revision once per --adapter, or not at all")
    # (another folder with an adapter merged: a split with other adapters, or none, is another split; so is one of
    # an adapter at another revision, where its files differ)
    name = "+".join(a.rstrip("/").split("/")[-1] for a in [args.model, *adapters])
    if revisions:
        name += "@" + ",".join(r.replace("/", "-") or "-" for r in revisions)  # (a branch may hold a slash: refs/pr/1)
    shards = args.shards or name + ".layers"

    # 1. once: one safetensors file per decoder layer (resumable; a finished split is only checked)
    split_checkpoint(
        args.model,
        shards,
        compression=args.compression,
        adapter=adapters or None,
        adapter_revision=[r or None for r in revisions] or None,
    )

    # 2. the model as transformers builds it, without weights; the shard directory carries config and tokenizer
    config = AutoConfig.from_pretrained(shards)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(shards)

    # 3. the one extra line
    enable_layer_streaming(model, shards, device=args.device, max_memory=args.max_memory, reserve=args.reserve)
    print("residency plan:", get_streaming_state(model).plan.summary())

    # the model is still a transformers model: generate with a streamer...
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            streamer=TextStreamer(tokenizer, skip_special_tokens=True),
        )

    # ...or use it in a pipeline
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    result = generator(args.prompt, max_new_tokens=args.max_new_tokens, do_sample=False, return_full_text=False)
    return result[0]["generated_text"]


if __name__ == "__main__":
    print(main())
