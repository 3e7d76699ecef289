"""Many prompts per sweep of the weights: a resumable JSONL job.

    python examples/batch_jsonl.py qwen05b.layers prompts.jsonl results.jsonl --batch-size 16

Each line of the input is `{"id": ..., "prompt": "..."}` or `{"id": ..., "messages": [...]}`. Each result is appended
to the output (and fsync'd) as its batch completes; rerun the same command after a crash and only the prompts
without a result are generated. Every prompt of a batch shares one read of each layer, so a batch of B prompts
costs about one token's worth of disk reads per B tokens.
"""

from __future__ import annotations

import argparse
import json
import os

from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_layerstream import enable_layer_streaming, generate_jsonl


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shard_dir", help="shard directory made by `split_checkpoint` / `hf-layerstream split`")
    p.add_argument("input", help="JSONL prompts")
    p.add_argument("output", help="JSONL results (resumed when it exists)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per sweep (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per prompt (default: %(default)s)")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to plain prompts")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)
    # (before the model is built: a usage error, not a traceback; a pipe, `<(...)`, is read as a file is)
    if not os.path.exists(args.input) or os.path.isdir(args.input):
        p.error(f"no input file {args.input!r}")

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.shard_dir))
    tokenizer = AutoTokenizer.from_pretrained(args.shard_dir)
    enable_layer_streaming(model, args.shard_dir, device=args.device)
    stats = generate_jsonl(
        model,
        tokenizer,
        args.input,
        args.output,
        batch_size=args.batch_size,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
    )
    print(json.dumps(stats, indent=2, default=str))
    return stats


if __name__ == "__main__":
    main()
