"""`hf-layerstream demo`: the whole pipeline on a built-in random-weight Llama-shaped checkpoint, no download."""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
import time
from pathlib import Path

# the config fields the CLI's size options set, and how a mismatch names them
_SIZE_FIELDS = {
    "num_hidden_layers": "layers",
    "hidden_size": "hidden",
    "intermediate_size": "intermediate",
    "vocab_size": "vocab",
    "dtype": "dtype",
}


def checkpoint_dtype(text: str) -> str:
    """Check the demo checkpoint's `--dtype` before anything is written.

    Args:
        text (`str`): The dtype name given, e.g. `"bfloat16"`.

    Returns:
        `str`: `text`, a floating-point dtype a checkpoint can be written in.

    Raises:
        `ValueError`: Not `float32`, `bfloat16` or `float16` (a typo such as `bfloat61`, or `auto`).
    """
    if text not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"`--dtype` {text!r} is not a checkpoint dtype (use float32, bfloat16 or float16).")
    return text


def write_demo_checkpoint(
    path: str | Path,
    *,
    layers: int = 8,
    hidden_size: int = 1024,
    intermediate_size: int = 2816,
    vocab_size: int = 32000,
    dtype: str = "bfloat16",
    seed: int = 0,
) -> Path:
    """Write a Llama-shaped checkpoint with random weights (several safetensors shards, as `save_pretrained` lays
    them out) and an offline tokenizer.

    The model is never built: its weights are drawn and written one shard at a time, so a checkpoint larger than
    this machine's RAM (a 70B-shaped one, to see streaming from disk) can be written too. Drawn as
    [`~testing.init_random_weights`] draws them: N(0, 0.02), norm weights 1 + N(0, 0.1); the same `seed` gives the
    same checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config, tok = _demo_config(layers, hidden_size, intermediate_size, vocab_size)
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):  # (names and shapes only)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    # (a size past the disk, `--layers 100000`, was written until the disk was full, then failed: refused first, as the
    # split refuses a shard directory that does not fit)
    needed = sum(p.numel() for p in model.parameters()) * torch_dtype.itemsize
    free = shutil.disk_usage(next(p for p in (path, *path.absolute().parents) if p.exists())).free
    if needed > free:
        from .engine import size_text

        raise OSError(
            errno.ENOSPC,
            f"Not enough disk space in {path} for the demo checkpoint: its weights take {size_text(needed)} (and its "
            f"split as much again) and {size_text(free)} are free. Choose smaller sizes, or a folder on a disk with "
            "room; nothing was written",
        )
    path.mkdir(parents=True, exist_ok=True)
    _write_random_weights(model, path, torch_dtype, seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.save_pretrained(path)
    tok.save_pretrained(path)
    model.config.architectures = [type(model).__name__]  # (as `save_pretrained` records it: vLLM and others need it)
    # (last: a checkpoint there is known by it, and reused; written before the tokenizer, a run interrupted between
    # them left one the next run reused and failed on)
    model.config.save_pretrained(path)
    return path


_SHARD_BYTES = 100 * 10**6  # what `save_pretrained(max_shard_size="100MB")` writes at most per file (bar one tensor)
_DRAW = 2**24  # values drawn at once (float32: 64 MiB)


def _write_random_weights(model, path: Path, dtype, seed: int) -> None:
    """Draw the weights of `model` (on the meta device) and write them as `save_pretrained` would: safetensors files
    of at most `_SHARD_BYTES` (bar a larger tensor, alone in its file) with their index, or one `model.safetensors`."""
    import torch
    from safetensors.torch import save_file

    from .testing import _is_norm

    names, seen = [], set()
    for prefix, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) not in seen:  # (a tied pair is stored once, under its first name, as `save_pretrained` does)
                seen.add(id(param))
                norm = _is_norm(module) and pname == "weight"
                names.append((f"{prefix}.{pname}" if prefix else pname, param.shape, norm))
    groups: list[list] = [[]]
    size = 0
    for item in names:
        nbytes = item[1].numel() * dtype.itemsize
        if groups[-1] and size + nbytes > _SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, group in enumerate(groups, 1):
        # (one file: `model.safetensors` and no index, as `save_pretrained` writes it)
        filename = f"model-{k:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 else "model.safetensors"
        tensors = {}
        for name, shape, norm in group:
            out = torch.empty(shape, dtype=dtype)
            flat = out.view(-1)
            for start in range(0, flat.numel(), _DRAW):  # (in pieces: a 70B model's embeddings are 4 GiB in float32)
                noise = torch.randn(min(_DRAW, flat.numel() - start), generator=generator)
                flat[start : start + noise.numel()] = 1.0 + 0.1 * noise if norm else 0.02 * noise
            tensors[name] = out
            weight_map[name] = filename
            total += out.nbytes
        save_file(tensors, path / filename, metadata={"format": "pt"})
    if len(groups) == 1:
        return
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _demo_config(layers: int, hidden_size: int, intermediate_size: int, vocab_size: int):
    """The demo checkpoint's `LlamaConfig` for these sizes, and its tokenizer (the vocabulary holds at least its
    tokens)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import LlamaConfig

    from .testing import make_tokenizer

    sizes = (("--layers", layers), ("--hidden-size", hidden_size), ("--intermediate-size", intermediate_size))
    for option, value in sizes:
        if value < 1:
            raise ValueError(f"`{option}` is {value}; use at least 1.")
    tok = make_tokenizer()
    if vocab_size < len(tok):  # (it was raised to the tokenizer's without a word: a checkpoint of another size)
        raise ValueError(
            f"`--vocab-size` is {vocab_size}; use at least {len(tok)}, the demo tokenizer's number of tokens (the "
            "embeddings and the head hold a row for each)."
        )
    heads = max(hidden_size // 64, 1)
    head_size, rest = divmod(hidden_size, heads)
    if rest or head_size % 2:  # (checked here: transformers before 5.2x builds the config and fails in the forward)
        raise ValueError(
            f"`--hidden-size` {hidden_size} makes no Llama-shaped model: its {heads} attention heads "
            f"{'do not divide it' if rest else f'are of {head_size}, and RoPE needs an even size'}; use a multiple of "
            "64 (heads of 64)."
        )
    kv_heads = max(heads // 4, 1)
    while heads % kv_heads:  # (grouped-query attention: the key/value heads divide the heads)
        kv_heads -= 1
    try:
        config = LlamaConfig(
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=vocab_size,
            max_position_embeddings=2048,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )
    except (ValueError, StrictDataclassError) as e:  # (transformers' own checks of the config, where it has more)
        raise ValueError(
            f"`--hidden-size` {hidden_size} makes no Llama-shaped model ({e.__cause__ or e}); use a multiple of 64 "
            "(heads of 64)."
        ) from None
    return config, tok


def _describe(sizes: dict) -> str:
    return ", ".join(f"{label} {sizes.get(key)}" for key, label in _SIZE_FIELDS.items())


def write_demo_checkpoint_from_args(path: str | Path, args) -> bool:
    """Write the demo checkpoint sized by the CLI's `--layers/--hidden-size/...` unless `path` has one.

    A checkpoint already there (a `--dir`/`--work` used before) is reused only if it has the sizes and dtype asked
    for, and never overwritten: it may not be one the demo wrote, and the shards split from it are beside it.

    Args:
        path (`str` or `os.PathLike`): The checkpoint folder.
        args (`argparse.Namespace`): `layers`, `hidden_size`, `intermediate_size`, `vocab_size` and `dtype`.

    Returns:
        `bool`: `True` if it was written, `False` if the one there was reused.

    Raises:
        `ValueError`: `path` holds a checkpoint of other sizes or dtype (both are named), or `dtype` is unknown.
    """
    checkpoint_dtype(args.dtype)
    config_file = Path(path) / "config.json"
    if config_file.exists():
        config, _ = _demo_config(args.layers, args.hidden_size, args.intermediate_size, args.vocab_size)
        wanted = {key: getattr(config, key) for key in _SIZE_FIELDS if key != "dtype"}
        wanted["dtype"] = args.dtype
        stored = json.loads(config_file.read_text())
        stored.setdefault("dtype", stored.get("torch_dtype"))  # (the name before transformers 5)
        found = {key: stored.get(key) for key in _SIZE_FIELDS}
        if found != wanted:
            # (the fix named the work folder to be emptied: one given may hold more than the demo's folders)
            split = sorted(str(p) for p in Path(path).parent.glob("shards*") if p.is_dir())
            beside = f" and {', '.join(split)} (split from it)" if split else ""
            raise ValueError(
                f"{path} already holds a checkpoint of {_describe(found)}, not the {_describe(wanted)} asked for; "
                f"pass another folder, or delete {path}{beside} to start anew (nothing there is overwritten: the "
                "shards there were split from the checkpoint there)."
            )
        return False
    write_demo_checkpoint(
        path,
        layers=args.layers,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
        dtype=args.dtype,
    )
    return True


def top1_agreement(reference, candidate, input_ids, *, chunk: int = 256) -> dict:
    """Teacher-forced next-token agreement of two models over every position of `input_ids` (batch, seq).

    Returns the share of positions where both models' argmax agree, and the mean cosine similarity of the logits.
    """
    import torch

    agree = total = 0
    cos_sum = 0.0
    with torch.no_grad():
        for start in range(0, input_ids.shape[0], max(chunk // input_ids.shape[1], 1)):
            ids = input_ids[start : start + max(chunk // input_ids.shape[1], 1)]
            a = reference(ids.to(reference.device)).logits.float().cpu()
            b = candidate(ids.to(candidate.device)).logits.float().cpu()
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0] * a.shape[1]
            cos_sum += float(torch.nn.functional.cosine_similarity(a, b, dim=-1).sum())
    return {"positions": total, "top1_agreement": agree / max(total, 1), "mean_cosine": cos_sum / max(total, 1)}


def work_folder(path: str | None, option: str, prefix: str) -> Path:
    """The work folder `path` (the command's `option`), made with its parents, or a new temporary one (named with
    `prefix`) where `path` is `None`.

    Raises:
        `ValueError`: `path` is empty, a file, or cannot be made a folder (naming the option, not an `[Errno 17]`).
    """
    if path is None:
        return Path(tempfile.mkdtemp(prefix=prefix))
    if not path:  # (`Path('')` is the current folder, which the command took for its own and removed when done)
        raise ValueError(f"`{option}` is empty: pass a folder, or leave the option out for a temporary one.")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"`{option}` {path!r} is a file; pass a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # (a file on the way: "[Errno 20] Not a directory"; no permission)
        raise ValueError(f"`{option}` {path!r} cannot be made a folder ({e.strerror or e}); pass another.") from e
    return folder


def remove_work_folder(work: Path) -> None:
    """Remove the temporary work folder `work` (`work_folder`'s, `path` `None`), whatever Ctrl-C comes meanwhile.

    It is removed as the command ends, also on Ctrl-C, where a second Ctrl-C (pressed twice, as people do) came while
    it was removed: that stopped the removal part way, and the folder was left in the temporary folder, a checkpoint
    and its shards. A SIGINT or SIGTERM arriving while it is removed is noted instead, and its handler run once it is
    removed (the KeyboardInterrupt of Ctrl-C, the command line's SIGTERM taken as Ctrl-C). Only for handlers that are
    Python functions, in the main thread, where Python runs them; a signal's other handling (its default action, as
    for SIGTERM outside the command line) is left as it is.
    """
    import signal
    import threading

    held: dict = {}
    arrived: list = []
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(signum)
            if callable(handler):
                held[signum] = handler
    try:
        for signum in held:
            signal.signal(signum, lambda signum, frame: arrived.append((signum, frame)))
        shutil.rmtree(work, ignore_errors=True)
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
    for signum, frame in arrived[:1]:  # (the first: Ctrl-C or SIGTERM, acted on as if it came now)
        held[signum](signum, frame)


def run_demo(args) -> int:
    from transformers import AutoTokenizer

    from ._measure import run_child
    from .bench import COMPRESSIONS, split_in_work
    from .cli import _max_memory, _reserve
    from .engine import check_device, check_max_memory, size_text

    checkpoint_dtype(args.dtype)  # (a typo fails before anything is written)
    # what the streamed run would refuse only in its child, after the checkpoint was written, split and run whole
    device = str(check_device(getattr(args, "device", None)))
    budget = args.max_memory  # (an empty one is refused, as by generate: it gives no budget)
    if budget is None:
        budget = "cpu=0" if device == "cpu" else f"{device.partition(':')[2] or 0}=0,cpu=0"
    max_memory = _max_memory(budget)
    check_max_memory(max_memory)
    reserve = _reserve(getattr(args, "reserve", None))
    if args.prefetch is not None and args.prefetch < 0:
        raise ValueError(f"`--prefetch` is {args.prefetch}; use a non-negative number of layers.")
    if args.max_new_tokens < 1:
        raise ValueError(f"`--max-new-tokens` is {args.max_new_tokens}; use at least 1.")
    # (the sizes too: refused after the first step's line was printed)
    _demo_config(args.layers, args.hidden_size, args.intermediate_size, args.vocab_size)
    work = work_folder(args.dir, "--dir", "hf_layerstream_demo_")
    try:
        ckpt = work / "checkpoint"
        shards = work / "shards"
        sizes = f"{args.layers} layers, hidden {args.hidden_size}"
        reused = (ckpt / "config.json").exists()
        if not reused:
            print(f"1. writing a random-weight Llama-shaped checkpoint ({sizes}) to {ckpt}")
        write_demo_checkpoint_from_args(ckpt, args)  # (one already there is checked against the sizes asked for)
        if reused:
            print(f"1. reusing the checkpoint in {ckpt} ({sizes})")
        size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
        print(f"   checkpoint: {size_text(size)} of weights")
        print(f"2. splitting it into one file per decoder layer: {shards}")
        t0 = time.perf_counter()
        # (a split of another checkpoint there, or a folder of other files: refused with the demo's fix, not split's
        # `--overwrite`, which the demo has not)
        in_work = {"command": "demo", "option": "--dir", "progress": True}
        split_in_work(ckpt, shards, **in_work)
        print(f"   done in {time.perf_counter() - t0:.1f} s")
        # both runs on the same device (on a GPU: the whole model there, against every layer streamed to it)
        runs = [("whole model in memory", {"system": "in_memory", "path": str(ckpt), "device": device})]
        stream = {"system": "streamed", "path": str(shards), "max_memory": max_memory, "prefetch": args.prefetch}
        stream["reserve"] = reserve
        runs.append((f"streamed (max_memory={budget})", {**stream, "device": device}))
        if args.compression:
            qdir = work / f"shards-{args.compression}"
            print(f"   also splitting with compression={args.compression}: {qdir}")
            split_in_work(ckpt, qdir, **COMPRESSIONS[args.compression], **in_work)
            runs.append((f"streamed, {args.compression} shards", {**stream, "path": str(qdir), "device": device}))
        tok = AutoTokenizer.from_pretrained(ckpt)
        prompt = "The quick brown fox jumps over the lazy dog. Layer streaming lets"
        ids = tok(prompt)["input_ids"]
        print(f"3. generating {args.max_new_tokens} tokens greedily from {prompt!r}, each system in its own process")
        print("   (random weights: the tokens mean nothing, but every system must produce the same ones)")
        results = []
        for label, spec in runs:
            spec.update(input_ids=ids, max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id)
            r = run_child(spec)
            results.append((label, r))
            shown = ", ".join(map(str, r["tokens"][:10])) + (", ..." if len(r["tokens"]) > 10 else "")
            print(f"   {label}: token ids [{shown}]")
        ref = results[0][1]
        print()
        print(f"{'system':44} {'s/token':>9} {'tokens/s':>9} {'peak RSS':>10} {'same tokens':>12}")
        for label, r in results:
            same = "yes" if r["tokens"] == ref["tokens"] else "NO"
            if label.endswith(("bit shards", "bit-dq shards")):
                agree = sum(a == b for a, b in zip(r["tokens"], ref["tokens"])) / max(len(ref["tokens"]), 1)
                same = f"{agree:.0%} (lossy)"
            spt = r["s_per_token"]
            peak = size_text(r["peak_rss"]) if r.get("peak_rss") else "-"  # (0: no /proc/self/status to read it)
            print(f"{label:44} {spt:9.4f} {1 / spt:9.1f} {peak:>10} {same:>12}")
        exact = results[1][1]["tokens"] == ref["tokens"]
        print()
        print("streamed output equals the whole model's:", "yes" if exact else "NO")
        if args.compression:
            import torch
            from transformers import AutoModelForCausalLM

            from .cli import load_streamed_model

            full = AutoModelForCausalLM.from_pretrained(ckpt, use_kernels=False).eval()
            quant = load_streamed_model(work / f"shards-{args.compression}", device="cpu")
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(4, full.config.vocab_size, (4, 128), generator=gen)
            report = top1_agreement(full, quant, ids)
            print(
                f"{args.compression} shards vs full precision, teacher-forced over {report['positions']} positions: "
                f"top-1 agreement {report['top1_agreement']:.1%}, mean logit cosine {report['mean_cosine']:.4f}"
            )
        return 0 if exact else 1
    finally:
        if args.dir is None:  # (a temporary folder of its own; never one given)
            remove_work_folder(work)
