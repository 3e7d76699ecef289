"""More than one token per sweep: a small resident draft model proposes tokens, one sweep of the streamed model
verifies them all. With greedy decoding the output is exactly that of plain decoding; only the sweeps change.

    python examples/speculative.py qwen7b.layers Qwen/Qwen2.5-0.5B-Instruct --max-new-tokens 64

The draft must share the streamed model's tokenizer. It is loaded whole (`from_pretrained`) on the same device.
"""

from __future__ import annotations

import argparse

from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_layerstream import configure_draft, enable_layer_streaming, measure_sweeps


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shard_dir", help="the streamed (large) model's shard directory")
    p.add_argument("draft", help="the draft (small) model: hub id or local folder")
    p.add_argument("--prompt", default="def fibonacci(n):", help="the prompt (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: %(default)s)")
    p.add_argument(
        "--num-assistant-tokens", type=int, default=8, help="tokens the draft proposes per sweep (default: %(default)s)"
    )
    p.add_argument("--device", default=None, help="cpu or cuda, for both models (default: cuda when available)")
    args = p.parse_args(argv)

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.shard_dir))
    tokenizer = AutoTokenizer.from_pretrained(args.shard_dir)
    enable_layer_streaming(model, args.shard_dir, device=args.device)
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype="auto").to(model.device).eval()
    configure_draft(draft, num_assistant_tokens=args.num_assistant_tokens)

    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    plain = measure_sweeps(model, ids, max_new_tokens=args.max_new_tokens)
    assisted = measure_sweeps(model, ids, assistant_model=draft, max_new_tokens=args.max_new_tokens)
    for name, run in (("plain", plain), ("assisted", assisted)):
        tokens, sweeps = run["tokens"], run["sweeps"]
        print(
            f"{name:9s} {tokens:4d} token{'s' if tokens != 1 else ''} in {sweeps:4d} sweep{'s' if sweeps != 1 else ''} "
            f"({run['tokens_per_sweep']:.2f} tokens/sweep, {run['tokens_per_s']:.2f} tokens/s)"
        )
    print("same output:", plain["output_ids"] == assisted["output_ids"])
    print(tokenizer.decode(assisted["output_ids"][0], skip_special_tokens=True))
    return {"plain": plain, "assisted": assisted}


if __name__ == "__main__":
    main()
