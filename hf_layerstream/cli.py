"""`hf-layerstream` console script: split | generate | demo | inspect | verify | bench."""

from __future__ import annotations

import argparse
import errno
import io
import json
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path

from . import __version__
from .errors import LayerLoadError


def _max_memory(text: str | None) -> dict | None:
    """`"cpu=16GiB,0=4GiB"` -> `{"cpu": "16GiB", 0: "4GiB"}`; `None` (the option not given) -> `None`."""
    if text is None:
        return None
    if not text.replace(",", "").strip():  # (it meant the default plan without a word, as if the option were not given)
        raise ValueError(
            f"--max-memory {text!r} gives no budget: give one or more, e.g. cpu=16GiB,0=4GiB, or leave the option out "
            "for the default plan."
        )
    out: dict = {}
    for item in filter(str.strip, text.split(",")):  # (a trailing comma is harmless)
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--max-memory item {item!r} must look like cpu=16GiB or 0=4GiB")
        key = key.strip()
        # (ASCII digits only: int() takes '٤' and str.isdigit() '²', which int() refuses with its own message; and
        # written as the library takes them, "0" not "00": `check_max_memory` names the key those mean)
        key = int(key) if key.isascii() and key.isdigit() and str(int(key)) == key else key
        if key in out:  # (the last one silently won)
            raise ValueError(f"--max-memory gives {key} twice: {text!r}; give each key once.")
        out[key] = value.strip()
    from .engine import check_max_memory

    check_max_memory(out)  # (before a device is picked for the keys: `cuda:0=1GiB` is named as the key it means)
    return out


def _reserve(text: str | None) -> int | None:
    """`--reserve 3GiB` -> its bytes (as `--max-memory`'s sizes are read); `None` (not given) -> `None`."""
    from .engine import check_reserve

    return check_reserve(text)


def _page_cache(choice: str | None) -> bool | None:
    """`--page-cache auto|keep|drop` -> `keep_in_page_cache` None/True/False."""
    return {"keep": True, "drop": False}.get(choice or "auto")


_RESERVE_HELP = (
    "on a GPU: the part of its budget left free for activations and the KV cache, in bytes or as a size such as 3GiB "
    "(default: a tenth of the GPU's budget, at most 2GiB; more for a long context or a large batch; ignored on CPU)"
)


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="execution device (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype",
        default=None,
        help="compute dtype: auto (the config's, as from_pretrained(dtype='auto') loads it), float32, bfloat16, float16",
    )
    p.add_argument(
        "--max-memory", default=None, help="memory budget, e.g. 'cpu=16GiB,0=4GiB' (accelerate's convention)"
    )
    p.add_argument("--reserve", default=None, metavar="SIZE", help=_RESERVE_HELP)
    p.add_argument(
        "--prefetch",
        type=int,
        default=None,
        help="layers read ahead of the compute (default on CPU: 3 with full-precision shards, 2 with quantized ones, "
        "lowered to fit a --max-memory cpu= budget other than 0; on CUDA: 2, or as many layers as hold 320 MiB, up "
        "to 8, where that gives up no layer kept on the GPU, lowered to fit the GPU's budget and a --max-memory cpu= "
        "budget other than 0 with its pinned staging buffers)",
    )
    p.add_argument(
        "--page-cache",
        choices=["auto", "keep", "drop"],
        default="auto",
        help="streamed layers' pages after use: keep them in the page cache, drop them, or auto (keep while they fit "
        "in a safe share of the free memory)",
    )
    _add_dequantize_arg(p)


def _add_hub_args(p: argparse.ArgumentParser, what: str = "SHARD_DIR", token: str | None = None) -> None:
    """`--revision`/`--token` of `what` (SHARD_DIR, bench's SOURCE) where it is a hub repo (`token`: the help of
    `--token`, where it serves more)."""
    p.add_argument(
        "--revision",
        default=None,
        help=f"for a hub repo {what}: its branch, tag or commit (default: its default branch)",
    )
    p.add_argument("--token", default=None, help=token or f"for a hub repo {what}: hub token for gated/private repos")


def _add_dequantize_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dequantize",
        type=str.lower,  # (case-insensitive, as `dequantize=` is)
        choices=["auto", "layer", "module"],
        default="auto",
        help="quantized shards: dequantize each layer ahead of the compute (layer), or hold layers packed and "
        "dequantize each weight as its module runs (module: less memory); auto: module on a GPU that cannot keep "
        "every layer dequantized, else layer",
    )


def _dequantize(text: str | None) -> str | None:
    return None if text in (None, "auto") else text


_MAX_NEW_TOKENS = 64  # `generate`'s default `--max-new-tokens`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-layerstream",
        description="Run Hugging Face causal LMs larger than memory by streaming decoder layers from disk.",
    )
    parser.add_argument("--version", action="version", version=f"hf_layerstream {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("split", help="split a checkpoint into a per-layer shard directory (once)")
    p.add_argument("source", help="local checkpoint folder or hub repo id")
    p.add_argument("shard_dir", help="output shard directory")
    p.add_argument(
        "--compression",
        type=str.lower,  # (case-insensitive, as `compression=` and `--quant-type` are)
        choices=["4bit", "8bit"],
        default=None,
        help="block-wise quantization (default: none, lossless)",
    )
    p.add_argument("--quant-type", default=None, help="4-bit code: nf4 (default) or fp4 (8-bit takes blockwise only)")
    p.add_argument("--blocksize", type=int, default=None, help="quantization block size")
    p.add_argument(
        "--double-quant",
        action="store_true",
        help="4-bit: quantize the block scales too (8%% less to read per token at nf4/64, same error)",
    )
    p.add_argument("--dtype", default=None, help="cast floating tensors (default: keep the checkpoint's)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--token", default=None, help="hub token for gated/private repos")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a shard directory of another model/options, or write into a non-empty folder holding none",
    )
    p.add_argument("--wait", action="store_true", help="wait for another split into the same directory to finish")
    p.add_argument(
        "--remove-from-cache",
        action="store_true",
        help="for a hub repo: download each weight file when the split first reads it and delete it from the hub "
        "cache once written, so the disk holds the split and a few of the repo's files, not the whole repo beside it",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar, nor a line for each retry while the hub cannot be reached",
    )
    p.add_argument(
        "--model-class",
        default=None,
        help="transformers class to build the model as, e.g. AutoModelForImageTextToText for Llama-4 or "
        "Llama-3.2-Vision with their vision weights (default: AutoModelForCausalLM's, else "
        "AutoModelForImageTextToText's)",
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=None,
        help="a PEFT adapter of the model (LoRA and the like), folder or hub id, merged into the weights as they are "
        "written, as merge_and_unload merges it (needs peft: pip install peft; a hub id is fetched "
        "with --token, at --adapter-revision); repeated, each is merged in turn, onto what the ones before left",
    )
    p.add_argument(
        "--adapter-revision",
        action="append",
        default=None,
        metavar="REVISION",
        help="with --adapter: the hub adapter's revision (branch, tag or commit; default: its default branch); with "
        "--adapter repeated, once per --adapter, in the same order ('' for a default branch or a local folder)",
    )

    p = sub.add_parser("generate", help="generate text with a streamed model (tokens printed as produced)")
    p.add_argument("shard_dir", help="shard directory made by `split`, or a hub repo holding one")
    p.add_argument(
        "prompt",
        nargs="?",
        default=None,
        help="prompt text, or - (the default) to read it from stdin, without the one newline that ends it, as echo "
        "writes it: a prompt meant to end in a newline is piped in with two",
    )
    # (as other LLM command lines take it; without it, argparse read `--prompt TEXT` as `--prompt-lookup TEXT`, its
    # abbreviation, and refused TEXT as "invalid int value")
    p.add_argument(
        "--prompt", dest="prompt_option", default=None, metavar="TEXT", help="the prompt, as an option (- for stdin)"
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the shard directory's)")
    # (None: not given, the default said as such where a refusal names it)
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"tokens to generate (default {_MAX_NEW_TOKENS})")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="with --do-sample: the sampling temperature, a finite number above 0 (default: the shard directory's "
        "generation config's)",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="with --do-sample: nucleus sampling's probability mass, 0 to 1 (default: the shard directory's "
        "generation config's)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed for sampling, with --do-sample (without it, ignored with a warning; with --input: part of "
        "a sampled job's settings, a resume with another is refused)",
    )
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to the prompt")
    p.add_argument(
        "--input", default=None, help="JSONL of prompts (batched, resumable; - for standard input); needs --output"
    )
    p.add_argument(
        "--output",
        default=None,
        help="JSONL results, each batch's appended as the batch completes (with --input; a regular file, read back to "
        "resume)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="prompts per sweep with --input (default 8)")
    p.add_argument("--assistant", default=None, help="small draft model (folder or hub id) for assisted decoding")
    p.add_argument(
        "--num-assistant-tokens",
        type=int,
        default=None,
        help="with --assistant: draft tokens proposed per verification sweep at first (default 8); +2 after a fully "
        "accepted block, -1 otherwise, and never cut short by the draft's confidence (transformers' own default: up "
        "to 20, cut short when the draft is unsure)",
    )
    p.add_argument("--prompt-lookup", type=int, default=None, metavar="N", help="prompt-lookup decoding with N tokens")
    p.add_argument(
        "--adapter",
        action="append",  # (one: given twice it is refused, not the last taken, as `split` merges each it is given)
        default=None,
        metavar="ADAPTER",
        help="a PEFT adapter (LoRA) of the model, folder or hub id, applied as the weights stream (needs peft; "
        "`split --adapter` merges one into the shards instead: the base model's speed, no adapter weights in memory)",
    )
    p.add_argument(
        "--adapter-revision",
        action="append",  # (one, as `--adapter`)
        default=None,
        metavar="REVISION",
        help="with --adapter: the hub adapter's revision (branch, tag or commit; default: its default branch)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="print where the time went after generating: compute, waiting for the loader, reads, dequantizing, "
        "copies (totals; per layer in the API: get_streaming_state(model).last_profile)",
    )
    p.add_argument("--verify", action="store_true", help="check every shard file's checksum before loading")
    _add_runtime_args(p)
    _add_hub_args(p, token="hub token for gated/private repos (SHARD_DIR, and --adapter, --assistant, --tokenizer)")

    p = sub.add_parser("demo", help="the whole pipeline on a built-in random-weight Llama-shaped model (no download)")
    p.add_argument(
        "--dir",
        default=None,
        help="work folder, kept: the checkpoint is written to DIR/checkpoint (one already there is reused if it has "
        "the sizes and dtype asked for, else refused) and split into DIR/shards (and DIR/shards-4bit, "
        "DIR/shards-4bit-dq or DIR/shards-8bit with --compression); nothing else in DIR is touched (default: a "
        "temporary folder, removed afterwards)",
    )
    p.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    p.add_argument("--hidden-size", type=int, default=1024, help="hidden size (default 1024)")
    p.add_argument("--intermediate-size", type=int, default=2816, help="MLP size (default 2816)")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=32000,
        help="vocabulary size, at least the demo tokenizer's 120 tokens (default: 32000)",
    )
    p.add_argument("--dtype", default="bfloat16", help="checkpoint dtype (default bfloat16)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    p.add_argument(
        "--compression",
        type=str.lower,  # (case-insensitive, as split's is)
        choices=["4bit", "4bit-dq", "8bit"],  # (bench's `--compression` names: 4bit-dq is split's `--double-quant`)
        default=None,
        help="also compare quantized shards: 4bit, 4bit-dq (its block scales quantized too, split's --double-quant) "
        "or 8bit",
    )
    p.add_argument(
        "--max-memory",
        default=None,
        help="budget for the streamed run (default: stream every layer: cpu=0, and 0=0,cpu=0 on a GPU)",
    )
    p.add_argument("--reserve", default=None, metavar="SIZE", help=f"for the streamed run, {_RESERVE_HELP}")
    p.add_argument(
        "--prefetch", type=int, default=None, help="layers read ahead in the streamed run (default: the library's)"
    )
    p.add_argument("--device", default=None, help="where both runs compute (default: cuda if available, else cpu)")

    p = sub.add_parser("inspect", help="show a shard directory: scheme, bytes per layer, residency plan")
    p.add_argument("shard_dir", help="shard directory made by `split`, or a hub repo holding one")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_runtime_args(p)
    _add_hub_args(p)

    p = sub.add_parser("verify", help="check every file of a shard directory against its manifest")
    p.add_argument("shard_dir", help="shard directory made by `split`, or a hub repo holding one")
    p.add_argument(
        "--quick",
        action="store_true",
        help="sizes, headers and a sample digest of each file (as every load checks them), no full checksums",
    )
    _add_hub_args(p)

    try:
        from .bench import add_bench_parser
    except ImportError:  # pragma: no cover - bench is optional at import time
        add_bench_parser = None
    if add_bench_parser is not None:
        add_bench_parser(sub)
    # (`-v` after the command, `generate SHARD_DIR PROMPT -v`, was refused as "unrecognized arguments: -v", an option
    # of the program: taken there too; not given there, the one before the command, if any, stands)
    for command in sub.choices.values():
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what the library does"
        )
    return parser


def _prompt_from_leftovers(leftovers: list[str]) -> tuple[str | None, list[str]]:
    """`generate`'s PROMPT among the arguments argparse left over, and what is left after it.

    argparse fills an optional positional from the first run of positionals only, so in `generate SHARD_DIR
    --max-new-tokens 3 PROMPT` the prompt is left over. The first leftover that argparse reads as a positional (not
    an option: a prompt may be a dash, begin with one where it holds a space, "- item one", or be a negative number,
    "-5"),
    or the one after `--`, is taken as the prompt.

    Args:
        leftovers (`list[str]`): What `parse_known_args` did not match.

    Returns:
        `(prompt or None, the other leftovers)`.
    """
    for i, arg in enumerate(leftovers):
        if arg == "--":  # everything after it is positional
            if i + 1 < len(leftovers):
                return leftovers[i + 1], leftovers[:i] + leftovers[i + 2 :]
            break
        if not arg.startswith("-") or arg == "-" or " " in arg or _NEGATIVE_NUMBER.fullmatch(arg):  # (as argparse does)
            return arg, leftovers[:i] + leftovers[i + 1 :]
    return None, leftovers


_NEGATIVE_NUMBER = re.compile(r"-\d+|-\d*\.\d+")  # (argparse's `_negative_number_matcher`)


def _dash_values_joined(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` with each value that begins with a dash, given after an option of the command that takes one, joined to
    it as `--option=value`, which argparse reads as that option's value.

    argparse reads `--max-memory -1=4GiB` (a key beginning with a dash, not a negative number) as two options, and
    refused it: "argument --max-memory: expected one argument", where one was given, naming no fix. A value that is
    one of the command's own options (or an abbreviation of one, as argparse takes them) stays an option; nothing
    after `--` is touched.

    Args:
        parser (`argparse.ArgumentParser`): The top-level parser (its options take no value).
        argv (`list[str]`): The command line's arguments.

    Returns:
        `list[str]`: The arguments to parse.
    """
    sub = next((_command_parser(parser, a) for a in argv if not a.startswith("-")), None)
    if sub is None:  # (no command, or an unknown one: argparse says so)
        return argv
    options = sub._option_string_actions
    longs = [o for o in options if o.startswith("--")]

    def action_of(arg: str):
        name = arg.partition("=")[0] if arg.startswith("--") else arg
        if name in options:
            return options[name]
        matches = {options[o] for o in longs if o.startswith(name)} if name.startswith("--") and name != "--" else ()
        return next(iter(matches)) if len(matches) == 1 else (False if matches else None)  # (False: ambiguous)

    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        out.append(arg)
        i += 1
        if arg == "--":
            return out + argv[i:]
        action = action_of(arg) if arg.startswith("-") and "=" not in arg else None
        if not action or action.nargs is not None or i == len(argv):  # (a flag, or no option that takes one value)
            continue
        value = argv[i]
        if not value.startswith("-"):  # (its value: not looked at as an option)
            out.append(value)
            i += 1
        elif value != "--" and action_of(value) is None:
            out[-1] = f"{arg}={value}"
            i += 1
    return out


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser | None:
    """The parser of `command` (`split`, `generate`, ...) under the top-level `parser`, if it has one."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return None if sub is None else sub.choices.get(command)


def _as_options(message: str, parser: argparse.ArgumentParser, command: str) -> str:
    """The library's error `message` with each Python argument it names written as the command's option, where the
    command has one (`` `dtype` `` as `` `--dtype` ``, `quant_type='fp4'` as `--quant-type 'fp4'`, in backticks too):
    what the user of the command line typed."""
    sub = _command_parser(parser, command)
    if sub is None:
        return message
    for action in sub._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        if long and action.dest != "help":
            for name in (action.dest, *_LIBRARY_NAMES.get(action.dest, ())):
                message = message.replace(f"`{name}`", f"`{long[0]}`").replace(f"`{name}=`", f"`{long[0]}`")
                if isinstance(action, argparse._StoreTrueAction):  # (`double_quant=True` is `--double-quant`)
                    message = re.sub(rf"(?<![\w.`-]){re.escape(name)}=True\b", long[0], message)
                message = re.sub(rf"(?<![\w.`-]){re.escape(name)}=", f"{long[0]} ", message)
                # (`dequantize='module'` in backticks too; not a flag's `overwrite=True`, which such messages name
                # beside it as `--overwrite`, nor a budget's dict, written below)
                if action.nargs != 0:
                    message = re.sub(
                        rf"`{re.escape(name)}=((?!\{{)[^`]+)`", lambda m, o=long[0]: f"`{o} {m.group(1)}`", message
                    )
        if action.dest == "max_memory":  # its entries and examples as the option writes them, not as Python does
            message = re.sub(r"max_memory\[(['\"]?)(\w+)\1\]", r"--max-memory \2", message)
            message = re.sub(r"\{(?:'?\w+'?: (?:'[^']*'|\d+)(?:, )?)+\}", _as_option_value, message)
    split = _command_parser(parser, "split")
    if command != "split" and split is not None:
        # how the shard directory is compressed, which only `split` sets (`compression`, named by `--dtype int8`'s
        # refusal, an option of neither `generate` nor `inspect`): named as `split`'s option
        for action in split._actions:
            if action.dest in _SPLIT_ONLY and action.option_strings:
                message = message.replace(f"`{action.dest}`", f"`split {action.option_strings[-1]}`")
    return message


# `split`'s settings of how layers are stored, which the other commands read from the shard directory
_SPLIT_ONLY = ("compression", "quant_type", "blocksize", "double_quant")


def _as_option_value(match: re.Match) -> str:
    """`{0: '4GiB', 'cpu': '16GiB'}` -> `0=4GiB,cpu=16GiB` (`{'cpu': 0}` -> `cpu=0`)."""
    entries = re.findall(r"'?(\w+)'?: (?:'([^']*)'|(\d+))", match.group(0))
    return ",".join(f"{key}={text or number}" for key, text, number in entries)


class _OptionNames(logging.Filter):
    """Writes the library's records (the warnings of a plan) with the command's option names, as its errors are."""

    def __init__(self, parser: argparse.ArgumentParser, command: str):
        super().__init__()
        self.parser, self.command = parser, command

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("hf_layerstream"):
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a record that does not format: logging reports it as it emits it
                return True
            # (a child's traceback quoted in it, `bench`'s failed row: its source lines as they are, not `dtype=dtype`
            # written as `--dtype dtype`)
            head, sep, traceback = message.partition("Traceback (most recent call last):")
            record.msg, record.args = _as_options(head, self.parser, self.command) + sep + traceback, None
        return True


# an option's destination -> the library's names for the same value, where they differ (`generate_jsonl`'s paths)
_LIBRARY_NAMES = {"input": ("input_path",), "output": ("output_path",)}


def _stdout_to_devnull() -> None:
    """After a broken pipe: point stdout at /dev/null so the flush at exit does not fail again (the Python docs' Note
    on SIGPIPE). Nothing to do where stdout is not a file descriptor (captured in tests)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


class _NamedStdout:
    """`sys.stdout` for a command's run: an `OSError` writing it (stdout redirected to a full disk, `> /dev/full`)
    ended the command with "error: [Errno 28] No space left on device", naming no file (the shard directory's disk,
    the reader would think). It is raised as standard output's (`StdoutWriteError`); a broken pipe as it is (`main`
    handles it). Anything else is the stream's."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        return self._named(self._stream.write, text)

    def flush(self):
        return self._named(self._stream.flush)

    @staticmethod
    def _named(call, *args):
        try:
            return call(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise StdoutWriteError(e) from e

    def __getattr__(self, name):
        return getattr(self._stream, name)


class StdoutWriteError(OSError):
    """Standard output could not be written (see `_NamedStdout`)."""

    def __init__(self, error: OSError):
        super().__init__(error.errno, error.strerror)
        self.error = error

    def __str__(self) -> str:
        full = self.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        fix = ": free space on the disk it is redirected to, or redirect it elsewhere" if full else ""
        return f"cannot write standard output ({self.error}){fix}."


def _closed_standard_streams_on_devnull() -> None:
    """Run with a standard stream closed (`2>&-`), its file descriptor was free: the next file the command opened
    took its number (a shard file or results file as fd 2, where anything written to standard error would land), and
    Python's `sys.stderr` was `None`, which the progress bars and logging write to (`split` and `generate --input`
    failed). Each closed one is opened on /dev/null instead, and `sys.stderr` writes there (a closed `sys.stdout` stays
    `None`: `print` then prints nothing)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            devnull = os.open(os.devnull, os.O_RDWR)  # (the lowest free number: `fd` itself, the lower ones open)
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the process's life, as sys.stderr is


def main(argv: list[str] | None = None) -> int:
    """Run the `hf-layerstream` command line.

    Args:
        argv (`list[str]`, *optional*): The arguments (default: `sys.argv[1:]`).

    Returns:
        `int`: The exit status: 0 on success, 1 when a check failed (or stdout was closed early: a broken pipe), 2
        for a usage error or a one-line error, 130 on Ctrl-C, 143 on SIGTERM (handled as Ctrl-C).
    """
    _closed_standard_streams_on_devnull()
    _escape_what_stdout_cannot_encode()  # (every command's: a path, a prompt or a model's text)
    parser = build_parser()
    args, leftovers = parser.parse_known_args(_dash_values_joined(parser, sys.argv[1:] if argv is None else argv))
    if args.command == "generate" and args.prompt is None and leftovers:
        args.prompt, leftovers = _prompt_from_leftovers(leftovers)
    if leftovers:  # what `parse_args` would have refused
        parser.error(f"unrecognized arguments: {' '.join(leftovers)}")
    if getattr(args, "prompt_option", None) is not None:
        if args.prompt is not None:
            # (as `generate`'s own usage error: the top-level one showed the usage of `hf-layerstream COMMAND`)
            _command_parser(parser, "generate").error(
                f"the prompt is given twice: {args.prompt!r} and --prompt {args.prompt_option!r}"
            )
        args.prompt = args.prompt_option
    for name in _PATH_ARGUMENTS:  # `"~/m.layers"` quoted (no shell expanded it): as `split`, `inspect` take it
        value = getattr(args, name, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    names = _OptionNames(parser, args.command)
    log_handlers = list(logging.getLogger().handlers)
    for log_handler in log_handlers:
        log_handler.addFilter(names)
    handlers = {
        "split": _cmd_split,
        "generate": _cmd_generate,
        "demo": _cmd_demo,
        "inspect": _cmd_inspect,
        "verify": _cmd_verify,
    }
    handler = handlers.get(args.command) or getattr(args, "handler", None)
    terminated = _sigterm_as_ctrl_c()
    stdout = sys.stdout
    if stdout is not None:  # (`None` where the command ran with standard output closed, `>&-`)
        sys.stdout = _NamedStdout(stdout)
    try:  # (torch, transformers and huggingface_hub are first imported in here: Ctrl-C during that is handled too)
        # huggingface_hub prints its records through a handler of its own (its retries while the hub cannot be
        # reached): passed on to the root logger's too, each came out twice
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.get_logger().propagate = False
        _refuse_empty_revisions(args)
        _refuse_empty_paths(args)
        status = int(handler(args) or 0)
        if sys.stdout is not None:  # (`None` where the command ran with standard output closed, `>&-`)
            sys.stdout.flush()  # a closed pipe shows here rather than at exit, where it could not be handled
        return status
    except BrokenPipeError:  # stdout closed early (`| head`): quietly, as the Python docs recommend
        _stdout_to_devnull()
        return 1
    except StdoutWriteError as e:  # (named: nothing more can be written there, the flush at exit included)
        print(f"hf-layerstream {args.command}: error: {e}", file=sys.stderr)
        _stdout_to_devnull()
        return 2
    # (ImportError: an optional dependency is missing; the message says what to install)
    except (ValueError, FileNotFoundError, TypeError, OSError, NotImplementedError, ImportError) as e:
        print(f"hf-layerstream {args.command}: error: {_as_options(str(e), parser, args.command)}", file=sys.stderr)
        return 2
    except LayerLoadError as e:  # a shard file that changed or went bad while streaming, as any error above
        if not isinstance(e.__cause__, (ValueError, OSError)):  # (anything else: a fault of ours, the traceback)
            raise
        print(f"hf-layerstream {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if terminated.seen:
            print("terminated", file=sys.stderr)
            return 128 + signal.SIGTERM  # (143: as a shell reports a process SIGTERM ended)
        print("interrupted", file=sys.stderr)
        return 130
    finally:  # (`main` called again in one process, as the tests do: one filter per call, one handler)
        if isinstance(sys.stdout, _NamedStdout):
            sys.stdout = stdout
        terminated.restore()
        for log_handler in log_handlers:
            log_handler.removeFilter(names)


class _SigtermAsCtrlC:
    """The SIGTERM handler of a command's run (see `_sigterm_as_ctrl_c`): `seen` once one arrived."""

    def __init__(self):
        self.seen = False
        self.previous = None

    def __call__(self, signum, frame):
        self.seen = True
        # (the SIGINT handler in place: Python's, raising KeyboardInterrupt, or one noting Ctrl-C around a read in
        # torch's C code, `split._ctrl_c_noted`, which would otherwise take the interrupt for a damaged file)
        interrupt = signal.getsignal(signal.SIGINT)
        if callable(interrupt):
            interrupt(signal.SIGINT, frame)
        raise KeyboardInterrupt  # (SIGINT ignored, as in a background job of a script: Ctrl-C's way all the same)

    def restore(self) -> None:
        if self.previous is not None and signal.getsignal(signal.SIGTERM) is self:
            signal.signal(signal.SIGTERM, self.previous)


def _sigterm_as_ctrl_c() -> _SigtermAsCtrlC:
    """SIGTERM (`kill`, a job scheduler, `timeout`) taken as Ctrl-C for the command's run: it ended the process at
    once, so what Ctrl-C cleans up was left (`demo`'s and `bench`'s temporary work folders, a child process measuring
    a system). Now a KeyboardInterrupt is raised as for Ctrl-C, the command cleans up as it does then, and `main`
    says "terminated" and returns 143. Only where SIGTERM has its default action, in the main thread (where Python
    runs signal handlers); put back by `restore`."""
    handler = _SigtermAsCtrlC()
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        handler.previous = signal.signal(signal.SIGTERM, handler)
    return handler


# the arguments that name files or folders, of every command (a hub id never starts with "~")
_PATH_ARGUMENTS = ("source", "shard_dir", "tokenizer", "assistant", "input", "output", "checkpoint", "work", "dir")


def _refuse_empty_revisions(args) -> None:
    """`--revision ''` (a shell variable left unset, `--revision "$REV"`) was passed on as the revision '': offline
    the error named `hf download REPO --revision ` to run, a command that does not run; online a URL with no
    revision. Refused, as an empty `--max-memory` is (`--adapter-revision ''` stays the default branch: it is given
    once per `--adapter`, in order, where '' holds a place)."""
    for dest in ("revision", "checkpoint_revision"):
        value = getattr(args, dest, None)
        if isinstance(value, str) and not value.strip():
            raise ValueError(
                f"`--{dest.replace('_', '-')}` is empty: give a branch, tag or commit of the hub repo, or leave the "
                "option out for its default branch."
            )


def _refuse_empty_paths(args) -> None:
    """A SOURCE, SHARD_DIR or `--checkpoint` given as '' (a shell variable left unset, `split CKPT "$OUT"`) was the
    current folder (`Path('')` is `.`): `split` wrote its shards there ("shard directory ready: ."), `inspect`,
    `verify` and `generate` read it as the shard directory, `split --adapter ''` as the adapter. Refused, naming the
    argument (generate's own options that take a folder are refused in `_generate`, saying what each takes)."""
    named = [("source", "SOURCE"), ("shard_dir", "SHARD_DIR"), ("checkpoint", "--checkpoint")]
    if args.command == "split":
        named.append(("adapter", "--adapter"))
    for dest, name in named:
        value = getattr(args, dest, None)
        if value == "" or (isinstance(value, list) and "" in value):
            raise ValueError(f"`{name}` is empty: pass a folder or a hub repo id.")


def _refuse_without_partner(*pairs: tuple[str, object, str, object]) -> None:
    """Options that do nothing without their partner, `(option, value, partner, partner's value)`: refused rather
    than silently ignored."""
    for option, value, partner, needed in pairs:
        if value is not None and not needed:
            raise ValueError(f"`{option}` only applies with `{partner}`; pass `{partner}` too, or drop `{option}`.")


def _adapter_text(record: dict) -> str:
    """An adapter the manifest records, for `inspect`: its id, the commit of a hub one, its kind."""
    at = f" at revision {record['revision']}" if record.get("revision") else ""
    return f"{record.get('id')}{at} ({record.get('peft_type')})"


def _cmd_split(args) -> int:
    from .split import split_checkpoint

    _refuse_without_partner(("--adapter-revision", args.adapter_revision, "--adapter", args.adapter))
    adapters = args.adapter or []
    revisions = [r or None for r in args.adapter_revision or []]  # ('' for none: a default branch, a local folder)
    if revisions and len(revisions) != len(adapters):
        raise ValueError(
            f"{len(adapters)} `--adapter` and {len(revisions)} `--adapter-revision`: give `--adapter-revision` once per "
            "`--adapter`, in the same order ('' for a default branch or a local folder), or not at all."
        )
    retries = logging.getLogger("huggingface_hub.utils._http")
    if args.quiet:
        retries.addFilter(_no_hub_retries)
    try:
        path = split_checkpoint(
            args.source,
            args.shard_dir,
            compression=args.compression,
            quant_type=args.quant_type,
            blocksize=args.blocksize,
            double_quant=args.double_quant,
            dtype=args.dtype,
            revision=args.revision,
            token=args.token,
            overwrite=args.overwrite,
            wait=args.wait,
            progress=not args.quiet,
            model_class=args.model_class,
            adapter=adapters or None,  # (a list of one is that adapter: `split._adapters_given`)
            adapter_revision=revisions or None,
            remove_from_cache=args.remove_from_cache,
        )
    finally:  # (`main` called again in one process, as the tests do)
        retries.removeFilter(_no_hub_retries)
    print(f"shard directory ready: {path}")
    return 0


def _no_hub_retries(record: logging.LogRecord) -> bool:
    """`split --quiet`'s filter of huggingface_hub's records: not its line for each retry of a request while the hub
    cannot be reached (ten lines over about 20 s per file, which the split's error then sums up in one); its other
    warnings (the hub's own, about a repo) pass."""
    message = record.getMessage()
    return " thrown while requesting " not in message and "[Retry " not in message


def load_streamed_model(
    shard_dir,
    *,
    device=None,
    dtype=None,
    max_memory=None,
    prefetch=None,
    profile=False,
    verify=False,
    keep_in_page_cache=None,
    dequantize=None,
    revision=None,
    token=None,
    reserve=None,
):
    """Build the model of a shard directory (or of a hub repo holding one, at `revision`, with `token`) on meta and
    enable streaming (what `generate` and `bench` use)."""
    from transformers import AutoConfig

    from .modeling import build_for_shards
    from .shard_dir import ShardDirectory, local_shard_dir, snapshot_commit
    from .stream import enable_layer_streaming

    # (a hub repo: its manifest and config, the model built from them; its layers downloaded by the enable, once it
    # checked the model against the manifest, at the commit they came from: a push in between changes nothing, and
    # what the hub cache holds of that commit is not fetched again)
    local = local_shard_dir(shard_dir, weights=False, revision=revision, token=token)
    # a clear error before transformers reads config.json
    shards = ShardDirectory(local, check_files=local is shard_dir)
    config = AutoConfig.from_pretrained(local)
    model = build_for_shards(shards.manifest, config)  # the class it was split for
    model.eval()
    return enable_layer_streaming(
        model,
        shard_dir,
        device=device,
        dtype=dtype,
        max_memory=max_memory,
        reserve=reserve,
        prefetch=prefetch,
        profile=profile,
        verify=verify,
        keep_in_page_cache=keep_in_page_cache,
        dequantize=dequantize,
        # (a local folder: `revision` and `token` warned about once, above)
        revision=None if local is shard_dir else snapshot_commit(local),
        token=None if local is shard_dir else token,
    )


def _attach_adapter(model, adapter: str, revision: str | None = None, token: str | None = None) -> None:
    """`--adapter`: the PEFT adapter (at `revision`, `--adapter-revision`, with `token`, for a hub one) loaded into the
    streaming model (transformers' `load_adapter`, inside `attaching_adapters`), which stays the same object."""
    from .merge import import_peft, resolve_adapter
    from .stream import attaching_adapters

    import_peft("`--adapter`")
    # (a hub repo's files fetched first: a clear error offline)
    folder = resolve_adapter(adapter, revision=revision, token=token)
    with attaching_adapters(model):
        model.load_adapter(str(folder))


# `generate`'s options that apply only with `--do-sample`, by their names in `args` (and in a generation config, for
# the ones transformers takes: `--top-p` is `top_p`)
_SAMPLING_OPTIONS = ("temperature", "top_p", "seed")


def _sampling_options_unused(args) -> list[str]:
    """`generate`'s sampling options (`_SAMPLING_OPTIONS`) given without `--do-sample`, by their names in `args`:
    greedy decoding ignored them, the user told only by transformers' generic "The following generation flags are not
    valid and may be ignored: ['temperature']" once the prompt was printed (the seed, only torch's, not even that)."""
    if args.do_sample:
        return []
    return [name for name in _SAMPLING_OPTIONS if getattr(args, name) is not None]


def _generation_config_before_load(shard_dir):
    """The generation config the model of a local `shard_dir` will run with, read without loading the model, as
    enabling streaming picks it (`stream._load_generation_config`): its generation_config.json where that reads, else
    the one its config.json derives. `None` for a hub repo (its generation_config.json is fetched with the weights),
    or where neither reads (the load then says why)."""
    from transformers import AutoConfig, GenerationConfig

    from .shard_dir import side_file_damage

    if not os.path.isdir(shard_dir):
        return None
    path = Path(shard_dir, "generation_config.json")
    try:
        if path.is_file() and side_file_damage(path) is None:
            try:
                return GenerationConfig.from_pretrained(shard_dir)
            except Exception:  # noqa: BLE001 - enabling streaming keeps the config's then (with a warning), as here
                pass
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(shard_dir))
    except Exception:  # noqa: BLE001 - the load says what is wrong
        return None


def _warn_sampling_options_unused(args, config) -> None:
    """The sampling options given without `--do-sample` (`_sampling_options_unused`), said once, for all of them
    (transformers' own, for some, is left out in `_cmd_generate`), with the decoding that runs instead: greedy, or beam
    search where the generation config (`config`, the settings `generate` runs with) asks for it (`num_beams` > 1,
    which this line said was greedy when it was printed before the generation config was read). Said before the model
    loads where the generation config can be read then (`_generation_config_before_load`), else once it has loaded."""
    unused = [f"`--{name.replace('_', '-')}` {getattr(args, name)}" for name in _sampling_options_unused(args)]
    if not unused:
        return
    named = " and ".join(filter(None, (", ".join(unused[:-1]), unused[-1])))
    they = "it applies" if len(unused) == 1 else "they apply"
    beams = config.num_beams or 1
    decoding = f"beam search (the generation config's `num_beams` {beams})" if beams > 1 else "greedy"
    print(
        f"hf-layerstream generate: {named} {'is' if len(unused) == 1 else 'are'} ignored without `--do-sample`: "
        f"{they} only to sampling, and decoding is {decoding}; pass `--do-sample` to sample.",
        file=sys.stderr,
    )


def _sampling_flags_warned(flags: set[str]):
    """A filter of transformers' generation-config records leaving out its warning "The following generation flags
    are not valid and may be ignored: [...]" where each flag it lists is one of `flags`: options the command has warned
    about itself (`_sampling_options_unused`). Any other flag listed: the record passes, whole."""

    def passes(record: logging.LogRecord) -> bool:
        found = re.match(
            r"The following generation flags are not valid and may be ignored: \[([^]]*)\]", str(record.msg)
        )
        return found is None or not set(re.findall(r"'(\w+)'", found.group(1))) <= flags

    return passes


def _cmd_generate(args) -> int:
    # transformers warns of the sampling flags it is given without sampling, as the command does (once is enough; the
    # seed, no flag of transformers', is never among those it lists)
    flags = set(_sampling_options_unused(args))
    warned = logging.getLogger("transformers.generation.configuration_utils")
    leave_out = _sampling_flags_warned(flags)
    if flags:
        warned.addFilter(leave_out)
    # (transformers' candidate generator calls the draft's `generate` with a generation config and length arguments,
    # which transformers itself says is deprecated: a warning in the middle of the text, of nothing the user can change)
    drafting = logging.getLogger("transformers.generation.utils")
    if args.assistant:
        drafting.addFilter(_draft_call_deprecation)
    try:
        return _generate(args)
    finally:  # (`main` called again in one process, as the tests do)
        warned.removeFilter(leave_out)
        drafting.removeFilter(_draft_call_deprecation)


def _draft_call_deprecation(record: logging.LogRecord) -> bool:
    """`generate --assistant`'s filter of transformers' "Passing `generation_config` together with generation-related
    arguments=(...) is deprecated ...", which its own call of the draft's `generate` makes; its other records pass."""
    return not str(record.msg).startswith("Passing `generation_config` together with generation-related arguments")


def _generate(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from .modeling import resolve_dtype
    from .shard_dir import MANIFEST_NAME
    from .split import missing_local_folder
    from .stream import get_streaming_state

    # (a shell variable left unset, `--adapter "$LORA"`: '' was taken as the option not given, without a word, and the
    # base model ran; `--input ''` and `--output ''` were refused as the other one missing)
    for option, value, what in (
        ("--tokenizer", args.tokenizer, "a tokenizer's folder or hub id"),
        ("--assistant", args.assistant, "a draft model's folder or hub id"),
        ("--adapter", next((a for a in args.adapter or [] if not a), None), "a PEFT adapter's folder or hub id"),
        ("--input", args.input, "a JSONL file of prompts (- for standard input)"),
        ("--output", args.output, "the JSONL file the results go to"),
    ):
        if value is not None and not value:
            raise ValueError(f"`{option}` is empty: pass {what}, or leave the option out.")
    if args.adapter and len(args.adapter) > 1:
        raise ValueError(
            f"`--adapter` given {len(args.adapter)} times: `generate` attaches one adapter. Merge several into the "
            "shards as they are split, each in turn (`split SOURCE SHARD_DIR --adapter A --adapter B`)."
        )
    if args.adapter_revision and len(args.adapter_revision) > 1:
        raise ValueError(
            f"`--adapter-revision` given {len(args.adapter_revision)} times: `generate` attaches one adapter, at one "
            "revision."
        )
    args.adapter = args.adapter[0] if args.adapter else None
    args.adapter_revision = (args.adapter_revision or [None])[0] or None  # ('' for none, as `split` takes it)
    # refused before the model loads: transformers would take one of them and ignore the other
    if args.assistant and args.prompt_lookup is not None:
        raise ValueError("Pass either `--assistant` or `--prompt-lookup`, not both.")
    # (a count past any context: one past torch's 64-bit integers, 10**23, was "OverflowError: int too big to convert"
    # in transformers' lookup, a traceback once the model had loaded and the prompt was printed)
    if args.prompt_lookup is not None and not 1 <= args.prompt_lookup < 2**31:
        raise ValueError(
            f"`--prompt-lookup` must be a positive number of tokens, at most {2**31 - 1}, got {args.prompt_lookup}."
        )
    # (`configure_draft` refused it too, but only once the model and the draft were loaded)
    if args.num_assistant_tokens is not None and args.num_assistant_tokens < 1:
        raise ValueError(
            f"`--num-assistant-tokens` must be a positive number of tokens, got {args.num_assistant_tokens}."
        )
    args.default_max_new_tokens = args.max_new_tokens is None
    if args.default_max_new_tokens:
        args.max_new_tokens = _MAX_NEW_TOKENS
    if args.max_new_tokens < 1:  # (transformers refuses it too, but only once the model is loaded)
        raise ValueError(f"`--max-new-tokens` must be a positive number of tokens, got {args.max_new_tokens}.")
    # (as transformers' sampling checks them, which they met only once the model was loaded and the prompt printed;
    # unused without --do-sample, where the command warns that they are ignored)
    if args.do_sample and args.temperature is not None and not args.temperature > 0:
        raise ValueError(f"`--temperature` (={args.temperature}) has to be a strictly positive number.")
    # (transformers takes it: the logits divided by it are all 0, and every token was sampled alike, whatever the model)
    if args.do_sample and args.temperature == float("inf"):
        raise ValueError(
            f"`--temperature` (={args.temperature}) has to be a finite number: an infinite one samples every token "
            "alike, whatever the model; pass a positive number such as 1.0, or leave it out."
        )
    if args.do_sample and args.top_p is not None and not 0 <= args.top_p <= 1:
        raise ValueError(f"`--top-p` (={args.top_p}) has to be a number from 0 to 1.")
    # (torch's range: past it, torch's "Overflow when unpacking long long" once the model had loaded, naming no option)
    from . import batch

    batch._check_seed(args.seed, "--seed")
    for option, value in (
        ("--assistant", args.assistant),
        ("--tokenizer", args.tokenizer),
        ("--adapter", args.adapter),
    ):
        if value and missing_local_folder(value):
            raise ValueError(  # (it went to the hub as a repo id, once the model was loaded)
                f"`{option}` {value} is neither an existing local folder nor a hub repo id (`organization/name`)."
            )
    if args.assistant and os.path.isfile(os.path.join(args.assistant, MANIFEST_NAME)):
        raise ValueError(
            f"`--assistant` {args.assistant} is a shard directory; the draft model is loaded whole "
            "(`from_pretrained`): pass its checkpoint folder or hub id."
        )
    if (
        args.assistant
        and os.path.isdir(args.assistant)
        and not any(os.path.isfile(os.path.join(args.assistant, f)) for f in ("config.json", "adapter_config.json"))
    ):  # (a PEFT adapter's folder holds adapter_config.json: `from_pretrained` loads it, with peft installed)
        raise ValueError(  # (transformers' error, once the model was loaded, asked for a `model_type` in a config.json)
            f"`--assistant` {args.assistant} is a folder without a config.json, not a model: pass a small draft "
            "model's checkpoint folder or hub id, sharing the tokenizer."
        )
    if args.tokenizer and os.path.isdir(args.tokenizer) and not _holds_tokenizer_files(args.tokenizer):
        # (transformers' error, once the model was loaded, was about converting a slow tokenizer, over five lines)
        raise ValueError(
            f"`--tokenizer` {args.tokenizer} is a folder without tokenizer files (tokenizer.json, "
            "tokenizer_config.json, a vocabulary): pass the folder or hub id of the model's tokenizer."
        )
    if (
        args.adapter
        and os.path.isdir(args.adapter)
        and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json"))
    ):
        raise ValueError(f"`--adapter` {args.adapter} is a folder without an adapter_config.json, not a PEFT adapter.")
    if args.input == "-":  # (the usual name for standard input: it was looked for as a file named "-")
        args.input = "/dev/stdin"  # (read once, as a pipe is)
    if args.output == "-":
        raise ValueError(
            "`--output` - (standard output) is not supported: the results go to a regular file, read back to resume "
            "the job; pass a file path."
        )
    if args.input and args.prompt is not None:
        raise ValueError("Pass either a PROMPT or `--input` (a JSONL file of prompts), not both.")
    if args.prompt == "-":  # (standard input, as for `--input -`: it was the prompt's text, "-")
        args.prompt = None
    if args.input and not args.output:
        raise ValueError("`--input` needs `--output` (each batch's results are appended there as the batch completes).")
    _refuse_without_partner(
        ("--output", args.output, "--input", args.input),
        ("--batch-size", args.batch_size, "--input", args.input),
        ("--num-assistant-tokens", args.num_assistant_tokens, "--assistant", args.assistant),
        ("--adapter-revision", args.adapter_revision, "--adapter", args.adapter),
    )
    if args.input:  # (before the model loads, which downloads a hub one's layers first: not minutes later)
        from .batch import check_job

        check_job(args.input, args.output, 8 if args.batch_size is None else args.batch_size)
        if args.input == "/dev/stdin" and sys.stdin is not None and sys.stdin.isatty():  # (it waited silently)
            print(
                "Reading the prompts (JSONL, one per line) from standard input once the model has loaded; end them "
                "with Ctrl-D.",
                file=sys.stderr,
                flush=True,
            )
    if not args.input:  # (before the model loads: a missing prompt is refused at once, not minutes later)
        # (an argument's bytes: the file system encoding's, as `os.fsencode` gives them back; from standard input,
        # without the one newline that ends the piped text, in the stream's encoding)
        if args.prompt is not None:
            prompt = _as_utf8(args.prompt, os.fsencode)
        else:
            encoding = getattr(sys.stdin, "encoding", None) or "utf-8"  # (`None`: a `StringIO` put in its place)
            prompt = _as_utf8(_prompt_from_stdin(), lambda text: text.encode(encoding, "surrogateescape"))
        if not prompt.strip():
            raise ValueError("No prompt: pass it as an argument or on standard input.")

    # (a hub id: its first file fetched now, as SHARD_DIR's manifest is, not once the model has loaded)
    _fetch_first_hub_file("--tokenizer", args.tokenizer, "tokenizer_config.json", "tokenizer folder", args.token)
    _fetch_first_hub_file("--assistant", args.assistant, "config.json", "draft model folder", args.token)
    # (a local SHARD_DIR is read without `--token`, which is said to be unused: not where it serves a hub `--adapter`,
    # `--tokenizer` or `--assistant`, as `split` says nothing of it where it serves a hub adapter)
    hub = [v for v in (args.adapter, args.tokenizer, args.assistant) if v and not os.path.isdir(os.path.expanduser(v))]
    local_token = None if hub and os.path.isdir(args.shard_dir) else args.token
    # (before the load, minutes for a large model: the decoding it names is the generation config's, read on its own)
    early = _generation_config_before_load(args.shard_dir) if _sampling_options_unused(args) else None
    if early is not None:
        _warn_sampling_options_unused(args, early)
    model = load_streamed_model(
        args.shard_dir,
        device=args.device,
        dtype=resolve_dtype(args.dtype),
        max_memory=_max_memory(args.max_memory),
        reserve=_reserve(args.reserve),
        prefetch=args.prefetch,
        profile=args.profile,
        verify=args.verify,
        keep_in_page_cache=_page_cache(args.page_cache),
        dequantize=_dequantize(args.dequantize),
        revision=args.revision,
        token=local_token,
    )
    if args.adapter:
        _attach_adapter(model, args.adapter, args.adapter_revision, args.token)
    if args.tokenizer is None:
        # a tokenizer file the split wrote gone (a download cut short, deleted): the tokenizer loads without it and
        # tokenizes otherwise (the prompt read as no tokens), so it is named first, with its fix; so is one damaged
        # (tokenizer_config.json a list: transformers' AttributeError, a traceback naming no file)
        gone = get_streaming_state(model).shard_dir._side_file_problems(content=True, tokenizer=True)
        if gone:
            raise ValueError(f"{gone[0]}; or give a tokenizer with `--tokenizer` (a folder or a hub id).")
    try:
        tok = AutoTokenizer.from_pretrained(
            args.tokenizer or get_streaming_state(model).shard_dir.path,
            token=args.token,
            local_files_only=_cache_only(args.tokenizer),
        )
    except (OSError, ValueError) as e:
        if args.tokenizer is not None:
            raise _not_loaded("--tokenizer", args.tokenizer, e) from e
        raise ValueError(
            f"The shard directory {args.shard_dir} holds no tokenizer that loads ({' '.join(str(e).split())}); give "
            "one with `--tokenizer` (a folder or a hub id)."
        ) from e
    gen_kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.temperature is not None:
        gen_kwargs["temperature"] = args.temperature
    if args.top_p is not None:
        gen_kwargs["top_p"] = args.top_p
    if args.prompt_lookup:
        gen_kwargs["prompt_lookup_num_tokens"] = args.prompt_lookup
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if args.assistant:
        from transformers import AutoModelForCausalLM

        from .speculative import configure_draft

        try:
            # (transformers passes `local_files_only` to everything it fetches but its look for an adapter's config,
            # which takes `adapter_kwargs`)
            cache_only = {"local_files_only": True, "adapter_kwargs": {"local_files_only": True}}
            draft = AutoModelForCausalLM.from_pretrained(
                args.assistant, token=args.token, **(cache_only if _cache_only(args.assistant) else {})
            )
        except OSError as e:
            raise _not_loaded("--assistant", args.assistant, e) from e
        draft = draft.to(model.device).eval()
        tokens = 8 if args.num_assistant_tokens is None else args.num_assistant_tokens
        threshold = draft.generation_config.assistant_confidence_threshold
        gen_kwargs["assistant_model"] = configure_draft(draft, num_assistant_tokens=tokens)
        # transformers takes a draft of another vocabulary size for one with another tokenizer: it then translates
        # through both tokenizers (universal assisted decoding) and refuses `assistant_tokenizer` otherwise. There
        # the draft keeps transformers' confidence threshold: with `configure_draft`'s 0 (draft every token asked
        # for), transformers failed inside once a draft of several tokens was accepted ("cannot reshape tensor of 0
        # elements"; see `speculative._refuse_what_drafting_fails_on`)
        if draft.config.get_text_config().vocab_size != model.config.get_text_config().vocab_size:
            draft.generation_config.assistant_confidence_threshold = threshold
            gen_kwargs["assistant_tokenizer"] = AutoTokenizer.from_pretrained(
                args.assistant, token=args.token, local_files_only=_cache_only(args.assistant)
            )
        from .speculative import _generation_config, _refuse_what_drafting_fails_on

        names = ("`--do-sample`", "`--assistant`")
        _refuse_what_drafting_fails_on(model, _generation_config(model, gen_kwargs), gen_kwargs, tok, names=names)

    if args.chat and not getattr(tok, "chat_template", None):
        print(
            "hf-layerstream generate: the tokenizer has no chat template; prompts are used as they are", file=sys.stderr
        )
    if args.input:
        from .batch import generate_jsonl

        batch_size = 8 if args.batch_size is None else args.batch_size
        state = get_streaming_state(model)
        # the profile restarts at every generate call (one per batch): sum them into one for the whole job
        job = _JobProfile(model, state) if args.profile and state.profile is not None else None
        config = _one_sequence(model, gen_kwargs, "one is generated for each prompt")
        if early is None:
            _warn_sampling_options_unused(args, config)
        try:
            stats = generate_jsonl(
                model,
                tok,
                args.input,
                args.output,
                batch_size=batch_size,
                # (said above where the tokenizer has no template, and not again: the same settings either way)
                chat=args.chat and bool(getattr(tok, "chat_template", None)),
                seed=args.seed,
                **gen_kwargs,
            )
        except ValueError as e:
            # (a prompt and the default `--max-new-tokens` past a learned position table: named as the default, as
            # in prompt mode, not as if it were given)
            given = f"`max_new_tokens` {args.max_new_tokens} run past"
            if args.default_max_new_tokens and given in str(e):
                said = given.replace(" run past", " (its default) run past")
                raise ValueError(str(e).replace(given, said, 1)) from e
            raise
        except (RuntimeError, MemoryError) as e:
            overflow = _temperature_overflow(e, args)
            if overflow is not None:  # (nothing of the batch is written: the job goes on with a larger one)
                raise overflow from e
            if not _out_of_memory(e):
                raise
            from transformers.generation import GenerationMode

            # (speculative decoding runs one prompt per generate call, whatever the batch size: a smaller one is no
            # help there; a draft is not one of the job's settings, nor are the budgets: the job resumes without it)
            mode = config.get_generation_mode(gen_kwargs.get("assistant_model"))
            if mode == GenerationMode.ASSISTED_GENERATION:
                which = "`--assistant`" if args.assistant else "`--prompt-lookup`" if args.prompt_lookup else None
                draft = ", or a smaller draft model (or none)" if args.assistant else ""
                raise ValueError(
                    f"Out of memory generating one prompt ({_first_line(e)}); speculative decoding"
                    f"{f' ({which})' if which else ''} runs one prompt at a time, whatever `--batch-size`. The results "
                    f"of the prompts done are in {args.output}; run the command again with a lower budget for the "
                    f"device (`--max-memory`) or `--prefetch`{draft} to go on from there."
                ) from e
            # (a traceback before; the batch size is not one of the job's settings: a smaller one resumes it)
            raise ValueError(
                f"Out of memory generating a batch of up to {batch_size} prompts ({_first_line(e)}). The results of "
                f"the batches done are in {args.output}; run the same command with a smaller `--batch-size` to go on "
                "from there."
            ) from e
        finally:
            if job is not None:
                job.stop()
        print(json.dumps(stats), file=sys.stderr)
        if job is not None:
            calls = f"{job.calls} generate call{'s' if job.calls != 1 else ''}"
            print(f"profile of the whole job ({calls}):", file=sys.stderr)
            print(job.profile.summary(), file=sys.stderr)
        return 0

    templated = bool(args.chat and getattr(tok, "chat_template", None))
    which = f"`--tokenizer` {args.tokenizer}" if args.tokenizer else "the shard directory's tokenizer"
    if templated:
        try:
            from jinja2.exceptions import TemplateError
        except ImportError:  # pragma: no cover - transformers needs jinja2 to apply a template
            TemplateError = ()  # noqa: N806
        try:
            inputs = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        except TemplateError as e:  # (its `raise_exception(...)`, or a template that does not parse: a traceback)
            raise ValueError(f"The chat template of {which} failed for the prompt: {e}") from e
    else:
        inputs = tok(prompt, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    if inputs["input_ids"].shape[-1] == 0:  # (torch's "cannot reshape tensor of 0 elements" traceback before)
        if templated:
            raise ValueError(
                f"The chat template of {which} made no tokens of the prompt: drop `--chat`, or pass a "
                "tokenizer whose template works with `--tokenizer`."
            )
        raise ValueError(f"The prompt is no tokens for {which} (which adds no BOS token): give other text.")
    _refuse_tokens_past_the_vocabulary(model, inputs["input_ids"], which)
    _refuse_past_the_position_table(
        model, inputs["input_ids"].shape[-1], args.max_new_tokens, args.default_max_new_tokens
    )
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        gen_kwargs["pad_token_id"] = tok.eos_token_id
    streamer = _continuation_streamer(tok, inputs["input_ids"][0].tolist(), skip_special_tokens=True)
    streams, config = _one_sequence_streamed(model, gen_kwargs)
    if early is None:
        _warn_sampling_options_unused(args, config)
    if streams:
        streamer, gen_kwargs = _streamed_to_the_stop(streamer, model, config, gen_kwargs, tok)
    # (a chat reply answers the prompt, on a line of its own; a completion continues it)
    print(prompt, end="\n" if templated else "", flush=True)
    try:
        with torch.no_grad():
            if streams:
                model.generate(**inputs, streamer=streamer, tokenizer=tok, **gen_kwargs)
            else:  # (the best beam, printed through the same streamer once done: the same text streaming prints)
                out = model.generate(**inputs, tokenizer=tok, **gen_kwargs)
                streamer.put(inputs["input_ids"].cpu())  # (the prompt: skipped, as generate's first put is)
                streamer.put(out[:1, inputs["input_ids"].shape[-1] :].cpu())
                streamer.end()
    except BaseException as e:  # (Ctrl-C too)
        print(flush=True)  # (the error goes on a line of its own, not after the text printed: "hihf-layerstream ...")
        overflow = _temperature_overflow(e, args)
        if overflow is not None:
            raise overflow from e
        if isinstance(e, (RuntimeError, MemoryError)) and _out_of_memory(e):
            # (torch's traceback before, where `--input` said it in one line)
            raise ValueError(
                f"Out of memory generating ({_first_line(e)}). Lower the budget of the device (`--max-memory`) or "
                "`--prefetch`, or generate fewer tokens (`--max-new-tokens`) from a shorter prompt."
            ) from e
        raise
    state = get_streaming_state(model)
    # (with `-v` the library has logged it, as it logs each generate call's profile)
    if (
        args.profile
        and state.profile is not None
        and not logging.getLogger("hf_layerstream").isEnabledFor(logging.INFO)
    ):
        print(state.profile.summary(), file=sys.stderr)
    return 0


def _one_sequence(model, gen_kwargs: dict, which: str = "one is generated and printed"):
    """The settings `generate` runs with (`speculative._generation_config`, built once here for the command's
    checks), asking for one sequence in `gen_kwargs` where the generation config (generation_config.json, which the
    command has no option to override) asks for more (`num_return_sequences`), and saying so on stderr: the command
    prints one (`which`), and `generate --input` writes one result a prompt (`generate_jsonl` refused the job,
    "`num_return_sequences` must be 1 ... (from the shard directory's generation_config.json)")."""
    from .speculative import _generation_config

    config = _generation_config(model, gen_kwargs)
    if (config.num_return_sequences or 1) > 1:
        print(
            f"hf-layerstream generate: the generation config asks for {config.num_return_sequences} sequences "
            f"(`num_return_sequences`); {which}",
            file=sys.stderr,
        )
        gen_kwargs["num_return_sequences"] = config.num_return_sequences = 1  # (the settings returned are the run's)
    return config


def _one_sequence_streamed(model, gen_kwargs: dict):
    """Whether `generate`'s tokens can be printed as they come, and the settings it runs with, asking for one sequence
    (`_one_sequence`).
    transformers refuses a streamer with beam search ("`streamer` cannot be used with beam search (yet!). Make sure
    that `num_beams` is set to 1."), and with several rows its streamer fails ("TextStreamer only supports batch size
    1"): a generation config (generation_config.json) with `num_beams` > 1 ended the command there, with no option to
    set it. The command generates the beams then, printing the best one when done, and says so on stderr."""
    config = _one_sequence(model, gen_kwargs)
    if (config.num_beams or 1) == 1:
        return True, config
    print(
        f"hf-layerstream generate: the generation config asks for beam search (`num_beams` {config.num_beams}), "
        "whose tokens cannot be printed as they come; the best beam is printed once generated",
        file=sys.stderr,
        flush=True,
    )
    return False, config


def _out_of_memory(e: BaseException) -> bool:
    """Whether `e`, or what caused it (a layer that failed to load: `LayerLoadError`), is torch running out of memory:
    `torch.OutOfMemoryError` on a GPU, a `RuntimeError` of its CPU allocator, `MemoryError`."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", ())
    while e is not None:
        if isinstance(e, MemoryError) or (oom and isinstance(e, oom)):
            return True
        if isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e):
            return True
        e = e.__cause__
    return False


def _temperature_overflow(e: BaseException, args) -> ValueError | None:
    """The error for torch's "probability tensor contains either `inf`, `nan` or element < 0" (`e`, a traceback once
    the prompt was printed, naming no option) where `--temperature` is so small that the logits divided by it overflow
    float32, as transformers divides them (below about 3e-39 every logit of 1 or more does): the one-line error naming
    it and the fix; `None` for another error, or a temperature at which no logit below 10**4 overflows (something
    else made the probabilities inf or NaN: its traceback, as before)."""
    import torch

    temperature = args.temperature if args.do_sample else None  # (unused without `--do-sample`)
    if temperature is None or not isinstance(e, RuntimeError) or "probability tensor contains" not in str(e):
        return None
    if temperature * torch.finfo(torch.float32).max >= 1e4:
        return None
    return ValueError(
        f"`--temperature` {temperature} is too small: the logits divided by it overflow float32, and sampling met inf "
        f"or NaN probabilities ({_first_line(e)}). Pass a larger one, or leave out `--do-sample` for greedy "
        "decoding, which a temperature near 0 approaches."
    )


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__  # (a bare `MemoryError()`: no ": ")


def _as_utf8(prompt: str, to_bytes) -> str:
    """`prompt` as read from the command line or standard input, where bytes the locale's encoding does not decode came
    as lone surrogates (`surrogateescape`), which the tokenizer refuses oddly ("TextEncodeInput must be
    Union[...]"): its bytes (`to_bytes`) decoded as UTF-8. Under `LC_ALL=C` with Python's UTF-8 mode off, the locale's
    encoding is ASCII, and a UTF-8 prompt came as surrogates for every other character: it was refused as not UTF-8.
    Bytes that are not UTF-8 (a Latin-1 file piped in) are refused, naming the fix."""
    try:
        prompt.encode("utf-8")
        return prompt
    except UnicodeEncodeError:
        pass
    try:
        return to_bytes(prompt).decode("utf-8")
    except (UnicodeError, LookupError):
        raise ValueError(
            "The prompt is not valid UTF-8 text; pass it in UTF-8 (e.g. convert it with `iconv -t UTF-8`)."
        ) from None


def _prompt_from_stdin() -> str:
    """The prompt piped in, without the one line ending that ends it (`echo`'s, a text file's last line's, LF or
    CRLF); empty where standard input is closed (`<&-`). The line endings before that one are the prompt's: a prompt
    ending in a blank line (a few-shot prompt the model is to go on after) lost them all. From a terminal, read as
    typed, with a line on stderr saying so (it waited silently)."""
    if sys.stdin is None:
        return ""
    if sys.stdin.isatty():
        print("Reading the prompt from standard input; end it with Ctrl-D.", file=sys.stderr, flush=True)
    text = sys.stdin.read()
    return text[:-1].removesuffix("\r") if text.endswith("\n") else text


def _refuse_past_the_position_table(model, prompt_tokens: int, max_new_tokens: int, default: bool = False) -> None:
    """Refused before anything is generated (see `modeling.position_overrun`), saying where `max_new_tokens` is the
    default (`default`: the option not given, which the refusal named as if it were)."""
    from .modeling import position_overrun

    overrun = position_overrun(model, prompt_tokens, max_new_tokens)
    if overrun is None:
        return
    limit, room = overrun
    table = f"the {limit} positions of {type(model).__name__}'s learned position table (`max_position_embeddings`)"
    if room < 1:
        raise ValueError(f"The prompt ({prompt_tokens} tokens) runs past {table}: shorten it.")
    given = " (its default)" if default else ""
    raise ValueError(
        f"The prompt ({prompt_tokens} tokens) and `--max-new-tokens` {max_new_tokens}{given} run past {table}: pass "
        f"`--max-new-tokens` {room} or less, or a shorter prompt."
    )


def _escape_what_stdout_cannot_encode() -> None:
    """Standard output in an encoding other than UTF-8 (a Latin-1 locale, `PYTHONIOENCODING=ascii`, a file on Windows)
    cannot encode every character a model writes (curly quotes, CJK, emoji), nor every path `verify` and `inspect`
    print: the first one ended the command part way ("error: 'latin-1' codec can't encode character '\\u201c'").
    Such characters are written as Python's escapes (`\\u201c`) instead, as Python writes them to standard error."""
    import codecs

    stream = sys.stdout
    encoding = getattr(stream, "encoding", None)
    if stream is None or not encoding or not hasattr(stream, "reconfigure"):
        return
    try:
        if codecs.lookup(encoding).name in ("utf-8", "utf-16", "utf-32"):
            return
        stream.reconfigure(errors="backslashreplace")
    except (LookupError, ValueError, io.UnsupportedOperation):  # (an unknown codec, a stream that cannot change)
        return


def _refuse_tokens_past_the_vocabulary(model, input_ids, which: str) -> None:
    """A prompt whose token ids run past the model's embedding table (a `--tokenizer` of another model) ended in
    torch's traceback ("IndexError: index out of range in self"; on a GPU, a device-side assert): refused before
    anything is printed, naming the tokenizer (`which`)."""
    from .modeling import vocabulary_overrun

    largest = int(input_ids.max()) if input_ids.numel() else -1
    size = vocabulary_overrun(model, largest)
    if size is None:
        return
    raise ValueError(
        f"The prompt holds token id {largest}, past the {size} tokens of the model's vocabulary: {which} is not this "
        "model's; pass the model's tokenizer with `--tokenizer` (a folder or a hub id)."
    )


def _continuation_streamer(tokenizer, prompt_ids: list[int], **decode_kwargs):
    """A `TextStreamer(tokenizer, skip_prompt=True)` that prints what the new tokens add to the decoded prompt:
    decoded on their own, a SentencePiece tokenizer (Llama-2's, Mistral's) drops the first one's leading space, and
    the first word was glued to the prompt ("is itcm" for "is it cm"). After a newline the last token stays as the
    context, as transformers 5.25 keeps it (5.15 emptied its cache there: the first space of the next line, an
    indentation's, was lost)."""
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def put(self, value):
            super().put(value)
            if not self.token_cache and value.numel():  # (emptied after a newline by a transformers before 5.25)
                self.token_cache = [int(value.reshape(-1)[-1])]
                self.print_len = len(self.tokenizer.decode(self.token_cache, **self.decode_kwargs))

    streamer = _Streamer(tokenizer, skip_prompt=True, **decode_kwargs)
    if not (hasattr(streamer, "token_cache") and hasattr(streamer, "print_len")):
        # (a transformers whose streamer keeps its state otherwise: its own, which may glue the first word)
        return TextStreamer(tokenizer, skip_prompt=True, **decode_kwargs)
    # (it decodes its cache whole at each token and prints past `print_len`: the prompt's text is already out)
    streamer.token_cache = list(prompt_ids)
    streamer.print_len = len(tokenizer.decode(prompt_ids, **decode_kwargs))
    return streamer


def _streamed_to_the_stop(streamer, model, config, gen_kwargs: dict, tokenizer):
    """`streamer`, and the settings `generate` streams to it with (`config`: the settings of `gen_kwargs`, as
    `_one_sequence` gives them), where the call decodes speculatively
    (`--prompt-lookup`, `--assistant`, or the generation config's): there each step adds a block of accepted draft
    tokens, which transformers puts to the streamer before it asks the stopping criteria, once, of the whole sequence.
    A stop string (the generation config's `stop_strings`) ending inside the block went unseen (`StopStringCriteria`
    looks at the sequence's end), and the text past it was printed, where plain decoding stops. The stateless criteria
    (`speculative._STATELESS_CRITERIA`: the stop strings, the end-of-sequence ids) are asked of each length the block
    adds (`speculative._StopRecorder`): the tokens up to the first they end are printed, none after, and the call ends
    at that step (its tokens past there are not printed)."""
    import torch
    from transformers import EosTokenCriteria, StoppingCriteria, StoppingCriteriaList
    from transformers.generation import GenerationMode
    from transformers.generation.streamers import BaseStreamer

    from .speculative import _STATELESS_CRITERIA, _StopRecorder, _StopWatch, eos_token_ids

    if config.get_generation_mode(gen_kwargs.get("assistant_model")) != GenerationMode.ASSISTED_GENERATION:
        return streamer, gen_kwargs  # (a token a step: the criteria see each)
    criteria = [c for c in _StopWatch(config, gen_kwargs, tokenizer).watched if type(c) in _STATELESS_CRITERIA]
    eos = eos_token_ids(model, None, gen_kwargs)
    if eos:  # (transformers 5.25 cuts a block at one itself; a release that does not would print past it)
        criteria.append(EosTokenCriteria(sorted(eos)))
    if not criteria:
        return streamer, gen_kwargs

    class _ToTheStop(BaseStreamer, StoppingCriteria):
        def __init__(self):
            self.recorder = None
            self.ids = None
            self.ended = False

        def put(self, value):
            value = value.reshape(1, -1)
            if self.recorder is None:  # (`generate`'s first put: the prompt)
                self.recorder, self.ids = _StopRecorder(criteria, value.shape[1]), value
            elif self.ended:
                return
            else:
                before = self.ids.shape[1]
                self.ids = torch.cat([self.ids, value], dim=1)
                self.recorder(self.ids, None)
                (stop,) = self.recorder.stopped_at()
                self.ended = stop is not None
                if self.ended:
                    value = self.ids[:, before : self.recorder.prompt_length + stop]
            streamer.put(value)

        def end(self):
            streamer.end()

        def __call__(self, input_ids, scores, **kwargs):  # (a stopping criterion: the printing ended, the call too)
            return torch.full((input_ids.shape[0],), self.ended, dtype=torch.bool, device=input_ids.device)

    cut = _ToTheStop()
    given = list(gen_kwargs.get("stopping_criteria") or [])
    return cut, {**gen_kwargs, "stopping_criteria": StoppingCriteriaList([*given, cut])}


class _JobProfile:
    """Sums the per-call profiles of every `generate` call made while it is on (a job of several batches).

    A streamed model's profile restarts at each `generate` call; this wraps the model's `generate` (until `stop`)
    and adds each call's profile, layer by layer, into one [`~engine.Profile`], whose wall time runs from this
    object's creation (the job's start) to the summary.

    Args:
        model (`nn.Module`): The streamed model.
        state (`StreamingState`): Its streaming state (`get_streaming_state(model)`), profiling on.
    """

    def __init__(self, model, state):
        from .engine import Profile

        self.model, self.state = model, state
        self.profile = Profile()  # (its clock starts now: the wall time is the job's)
        self.calls = 0
        self.original = model.generate
        original = self.original

        def generate(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            finally:  # (the streamed generate has just stored this call's profile in `last_profile`)
                self._add(state.last_profile)

        model.generate = generate

    def _add(self, call: dict | None) -> None:
        if not call:
            return
        self.calls += 1
        for index, times in call["layers"].items():
            self.profile.add(index, **times)
        for part, times in call["host_resident"].items():
            self.profile.add_host_resident(part, **times)
        self.profile.forward_calls += call["totals"]["forward_calls"]

    def stop(self) -> None:
        """Put the model's `generate` back: streaming's own wrapper (every streamed model has one)."""
        self.model.generate = self.original


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def _cmd_inspect(args) -> int:
    import torch

    from .engine import budget_warnings, host_memory, size_text
    from .errors import NOT_DAMAGE, ShardDirError, ShardFileError
    from .modeling import resolve_dtype
    from .shard_dir import ShardDirectory, local_shard_dir
    from .stream import plan_shard_dir

    max_memory = _max_memory(args.max_memory)
    reserve = _reserve(args.reserve)
    device, absent = _planned_device(args.device, max_memory)
    dtype = resolve_dtype(args.dtype)
    # (a hub repo: its manifest and config only, what the plan needs; its layer files neither downloaded nor checked)
    local = local_shard_dir(args.shard_dir, weights=False, revision=args.revision, token=args.token)
    # a local folder: the check every load makes (sizes, headers, sample digests). One that fails it is inspected all
    # the same, from its manifest (it was refused with the first damaged file alone), and every problem the check
    # finds is named after the plan, with `verify`'s fix, exit 1; a damaged manifest or config.json, which the plan
    # is made from, is refused, as before
    damaged: list[str] = []
    try:
        shards = ShardDirectory(local, check_files=local is args.shard_dir)
    except (ShardDirError, ShardFileError) as e:
        if isinstance(e, ShardFileError) and Path(e.path).name == "config.json":  # (checked first)
            raise
        shards = ShardDirectory(local, check_files=False)
        damaged = shards.verify(checksums=False) or [str(e)]
    m = shards.manifest
    units = [shards.unit(f"layers.{i}") for i in range(m.num_layers)]
    bf16_bytes = [u.nbytes_as(torch.bfloat16) for u in units]
    full_bytes = bf16_bytes if dtype is None else [u.nbytes_as(dtype) for u in units]
    stored = [u.size for u in units]
    # (as `enable_layer_streaming` plans: the default prefetch lowered until a GPU's budget holds it, and so on)
    plan = plan_shard_dir(
        shards,
        device,
        dtype=dtype,
        prefetch=args.prefetch,
        dequantize=_dequantize(args.dequantize),
        max_memory=max_memory,
        keep_in_page_cache=_page_cache(args.page_cache),
        reserve=reserve,
    )
    ratio = sum(stored) / max(sum(full_bytes), 1)
    memory = host_memory()  # (what the default plan took its share of)
    # what streaming computes in: `--dtype`, else the dtype `from_pretrained(dtype="auto")` loads at (recorded by the
    # split; a directory split before it was recorded streams at its stored dtypes)
    computes = str(dtype).replace("torch.", "") if dtype is not None else (m.load_dtype or m.dtype)
    info = {
        "shard_dir": str(shards.path),
        "source": m.source,
        "model_type": m.model_type,
        "num_layers": m.num_layers,
        "dtype": m.dtype,
        "compute_dtype": computes,
        "compression": m.compression,
        "adapter": m.adapter,
        "resident_bytes": shards.unit("resident").size,
        "layer_bytes": stored,
        # (the same keys whatever `--dtype`: each layer at bfloat16, and at the dtype `ratio` is to, `ratio_dtype`)
        "bf16_layer_bytes": bf16_bytes,
        "ratio_to_bf16": round(sum(stored) / max(sum(bf16_bytes), 1), 4),
        "full_layer_bytes": full_bytes,
        "ratio": round(ratio, 4),
        "ratio_dtype": "bfloat16" if dtype is None else str(dtype).replace("torch.", ""),
        "plan": plan.to_dict(),
        "device_available": not absent,
        "host_memory": memory,
        # (the execution device's budget, then, on a GPU, host RAM's: each a sentence, joined; with the options'
        # names, `--max-memory cpu`, `--prefetch 2`, as the text output has them)
        "warning": _as_options(" ".join(budget_warnings(plan, max_memory)), build_parser(), "inspect") or None,
        # (its config.json edited since the split: a model built from it is refused; a re-run of the split writes it
        # back. Builds the model on meta: about a second for a 70B one)
        "config_problem": _config_problem(shards),
        # (a local folder's side files the manifest lists that it lacks; a hub repo's are not downloaded here)
        "missing_side_files": shards.missing_side_files() if local is args.shard_dir else [],
        # (what the check every load makes found wrong, one message per file, and the fix: `verify`'s)
        "damaged": damaged,
        "repair": _problems_summary(shards, damaged) + _INSPECT_CHECKED if damaged else None,
    }
    if args.json:
        print(json.dumps(info, indent=1))
        return 1 if damaged else 0
    scheme = "none (full precision)" if not m.compression else ", ".join(f"{k}={v}" for k, v in m.compression.items())
    print(f"shard directory  {shards.path}")
    if local is not args.shard_dir:
        print(f"hub repo         {args.shard_dir}: its manifest and config read, its layer files not downloaded")
    revision = f" (revision {m.source['revision']})" if m.source.get("revision") else ""  # (a local source: none)
    print(f"source           {m.source.get('id')}{revision}")
    dtypes = f"dtype {m.dtype}" if computes == m.dtype else f"stored in {m.dtype}, computes in {computes}"
    print(f"model            {m.model_type}, {m.num_layers} layers under {m.layers_prefix!r}, {dtypes}")
    print(f"compression      {scheme}")
    if isinstance(m.adapter, list):
        print(f"adapters         {len(m.adapter)}, merged into the weights in this order:")
        for n, record in enumerate(m.adapter, 1):
            print(f"  {n}. {_adapter_text(record)}")
    elif m.adapter is not None:
        print(f"adapter          {_adapter_text(m.adapter)}, merged into the weights")
    print(f"resident file    {size_text(shards.unit('resident').size)}")
    named = "bfloat16" if dtype is None else str(dtype).replace("torch.", "")
    mean_stored, mean_full = (sum(b) // max(len(b), 1) for b in (stored, full_bytes))
    print(f"per layer        {size_text(mean_stored)} on disk (mean), {size_text(mean_full)} at {named}")
    print(f"ratio            {ratio:.3f}x of {'bf16' if dtype is None else named}")
    print(f"{f'plan on {device}':16} {'(not on this machine) ' if absent else ''}{plan.summary()}")
    gib = 2**30
    told, amount = memory["mem_available_from"], f"{memory['mem_available'] / gib:.2f} GiB"
    source = {
        "assumed": f"assumed {amount}: this system reports none; plan with --max-memory",
        "free memory": f"free memory {amount}, without the page cache",
    }.get(told, f"{told} {amount}")
    if memory["cgroup_room"] is not None:
        source += f"; left under this process's cgroup memory limit {memory['cgroup_room'] / gib:.2f} GiB"
    print(f"host memory      {memory['available'] / gib:.2f} GiB available ({source})")
    if info["warning"]:
        print(f"warning          {info['warning']}")
    if info["config_problem"]:
        print(f"warning          {info['config_problem']}")
    if info["missing_side_files"]:
        print(
            f"warning          side files its split wrote are missing: {', '.join(info['missing_side_files'])} "
            "(`hf-layerstream verify` says what each is for; running the same split again writes them back)"
        )
    for problem in damaged:
        print(f"{'unreadable' if NOT_DAMAGE in problem else 'damaged':16} {problem}")
    if damaged:
        print(info["repair"], file=sys.stderr)
        return 1
    return 0


# (`inspect`'s check of the files is `verify --quick`'s)
_INSPECT_CHECKED = "; `hf-layerstream verify SHARD_DIR` also compares each file's full checksum"


def _config_problem(shards) -> str | None:
    from .shard_dir import MANIFEST_NAME

    mismatch, fingerprint = shards.model_problems()
    if fingerprint is not None:  # (config.json builds the shards' model: the manifest's record of it differs)
        return f"{MANIFEST_NAME} {fingerprint}."
    if mismatch is None:
        return None
    return (
        f"config.json {mismatch}: a model built from it does not take the shards. If it was edited, run the same "
        "split again (`hf-layerstream split` with the same source and options), which writes it back."
    )


def _not_loaded(option: str, value: str, error: Exception) -> OSError:
    """transformers' error for a folder or hub id given as `option` that did not load (offline: "We couldn't connect to
    'https://huggingface.co'..."), naming the option: it named neither. On one line, as the command's errors are
    (transformers writes some over several)."""
    return OSError(f"`{option}` {value} did not load: {' '.join(str(error).split())}")


def _fetch_first_hub_file(option: str, value: str | None, filename: str, what: str, token: str | None) -> None:
    """`--tokenizer` or `--assistant` (`option`) given a hub id (`value`): the first file transformers reads of it
    (`filename`) fetched into the hub cache before the model loads, as SHARD_DIR's manifest is. Without network
    (HF_HUB_OFFLINE unset) the model loaded first, then transformers retried the hub for each file it tried (a
    tokenizer: about 50 s) and said "We couldn't connect to 'https://huggingface.co'...", naming neither the option
    nor the fix; now one round of retries, and the error names the option, that no folder has that name, and what to
    download (`split.hub_unreachable_error`; `what`: what a local one is). A repo the hub does not have, or a gated
    one, is named too. Nothing is fetched where the file is in the hub cache (or recorded absent there): transformers
    reads it from there, as before; nor for a local folder, nor where the hub has no such file (transformers then
    looks for the others)."""
    if not value or os.path.isdir(os.path.expanduser(value)):
        return
    from huggingface_hub import try_to_load_from_cache

    from .split import fetch_hub_file

    if try_to_load_from_cache(value, filename) is None:
        fetch_hub_file(value, filename, f"`{option}`", token=token, what=what)


def _cache_only(value: str | None) -> bool:
    """Whether `--tokenizer` or `--assistant` given as `value` is to be loaded from the hub cache only
    (`local_files_only`): a hub id where the hub cannot be reached (`split.cannot_reach_hub`: one connection, its
    answer kept a minute). transformers asks the hub for each file a tokenizer or model may hold, and huggingface_hub
    retried each lookup of one the cache lacks for 23 s: a tokenizer and a draft from the cache loaded after about 2
    minutes without network."""
    if not value or os.path.isdir(os.path.expanduser(value)):
        return False
    from .split import cannot_reach_hub

    return cannot_reach_hub(value, "config.json") is not None


def _holds_tokenizer_files(folder: str) -> bool:
    """Whether the local `folder` holds a file a tokenizer is saved as (its JSON files, a vocabulary, a SentencePiece
    or tiktoken model): one without any does not load as a tokenizer."""
    try:
        names = os.listdir(folder)
    except OSError:  # (unreadable: transformers names what is wrong)
        return True
    prefixes = ("tokenizer", "vocab", "merges", "spiece", "special_tokens_map", "added_tokens")
    return any(n.startswith(prefixes) or n.endswith((".model", ".tiktoken")) for n in names)


def _planned_device(name: str | None, max_memory: dict | None):
    """`inspect`'s device, and whether this machine lacks it: a GPU this machine does not have is planned for from
    its budget in `--max-memory` (planning for the machine one is about to rent), else refused as `enable` would."""
    import torch

    from .engine import check_device

    try:
        return check_device(name), False
    except ValueError:
        try:
            wanted = torch.device(name)
        except (RuntimeError, TypeError):
            wanted = None
        if wanted is None or wanted.type != "cuda":
            raise
        index = wanted.index or 0
        if torch.cuda.is_available() and index < torch.cuda.device_count():
            raise
        if index not in (max_memory or {}) and str(index) not in (max_memory or {}):
            raise ValueError(
                f"{wanted} is not available here: to plan for it anyway, give its budget, e.g. "
                f"--max-memory {index}=4GiB."
            ) from None
        return torch.device("cuda", index), True


def _problems_summary(shards, problems: list[str]) -> str:
    """`verify`'s last line for the `problems` it found in `shards` (`ShardDirectory.verify`'s): how many, and the fix
    (delete the files named and re-run the same split, which writes them again; download them again; for a file that
    may be sound or a manifest record edited, what their messages name)."""
    from .errors import NOT_DAMAGE
    from .shard_dir import MANIFEST_NAME, redownload_command

    listed = shards.manifest.side_files or []  # (none: split before the manifest listed them)
    sound = sum(NOT_DAMAGE in p for p in problems)  # (permissions or a limit of the process: not damage)
    # (a record of the manifest edited since the split, the message saying what to put back: deleting it would
    # leave a folder the split refuses as no shard directory's)
    edited = sum(p.startswith(f"{shards.manifest_path} ") for p in problems)
    # (config.json damaged or edited, a side file missing: the same split run again writes them back as they
    # are, so there is nothing to delete; a unit file damaged within passes the re-run's checks, so it is deleted)
    rewritten = [
        name
        for name in ("config.json", *listed)
        if any(p.startswith(f"{shards.path / name} ") and NOT_DAMAGE not in p for p in problems)
    ]
    rerun = "re-run the same split (`hf-layerstream split SOURCE SHARD_DIR`)"
    damaged = len(problems) - sound - edited - len(rewritten)
    advice = f"delete the files named and {rerun}, which writes them again"
    if rewritten:
        what = ", ".join(rewritten)
        advice = (
            f"delete the files named except {what} and {rerun}, which writes them again and {what} back"
            if damaged
            else f"{rerun}, which writes {what} back (nothing to delete)"
        )
    command = redownload_command(shards.path)
    if command is not None:  # (a download from the hub, in its cache: downloaded again)
        advice = f"download them again (`{command}`)"
    if sound == len(problems):  # (a new split is not the fix)
        advice = "the files named could not be read, but may be sound: fix what each message names"
    elif edited == len(problems):
        advice = f"fix {MANIFEST_NAME} as its message says"
    else:
        if sound:
            advice += f"; {sound} of them may be sound: fix what their messages name instead"
        if edited:
            advice += f"; {MANIFEST_NAME}: fix it as its message says, not by deleting it"
    checked = f"{len(shards.manifest.units)} files" + (f" and {len(listed)} side files" if listed else "")
    return f"{len(problems)} problem(s) in {checked} of {shards.path}: {advice}"


def _cmd_verify(args) -> int:
    from .errors import ShardFileError
    from .shard_dir import ShardDirectory, local_shard_dir, redownload_command

    # (a hub repo: downloaded, then checked)
    args.shard_dir = local_shard_dir(args.shard_dir, revision=args.revision, token=args.token)
    try:
        shards = ShardDirectory(args.shard_dir, check_files=False)
    except ShardFileError as e:  # (its manifest: a check failed, not an option refused)
        print(f"{e.path} {e.problem}", file=sys.stderr)
        if e.fix is not None:  # (not damage, a fix of its own: a newer hf_layerstream's format is upgraded to)
            print(e.fix, file=sys.stderr)
            return 1
        command = redownload_command(args.shard_dir)
        print(  # (the directory as every other line names it: absolute, as `ShardDirectory` holds it)
            f"The manifest of {Path(args.shard_dir).expanduser().absolute()} is damaged: "
            + (
                f"download it again (`{command}`)"
                if command is not None
                else "split again there (`hf-layerstream split SOURCE SHARD_DIR --overwrite`)"
            ),
            file=sys.stderr,
        )
        return 1
    problems = shards.verify(checksums=not args.quick)
    for p in problems:
        print(p)
    n = len(shards.manifest.units)
    listed = shards.manifest.side_files or []  # (none: split before the manifest listed them)
    if problems:
        print(_problems_summary(shards, problems), file=sys.stderr)
        return 1
    missing = shards.missing_side_files()  # (a license file or the model card: a warning, logged by `verify`)
    side = f", and the {len(listed)} side files it lists are there" if listed else ""
    if missing:
        side = (
            f", and {len(listed) - len(missing)} of the {len(listed)} side files it lists are there "
            f"({', '.join(missing)} missing: see the warning)"
        )
    print(
        f"{shards.path}: all {n} files match the manifest{' (sizes, headers and sample digests)' if args.quick else ''}"
        + side
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
