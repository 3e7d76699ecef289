"""Batched generation: many prompts per sweep of the streamed weights, resumable JSONL jobs.

A streamed model pays one sweep over its weights per decoding step, whatever the batch size; decoding 16 prompts
together costs little more than decoding one. [`generate_batch`] runs a list of prompts through the native
`model.generate` in left-padded batches; [`generate_jsonl`] does the same for a JSONL file and writes results as
they complete, so a crashed job resumes where it stopped (`hf-layerstream generate SHARD_DIR --input prompts.jsonl
--output results.jsonl --batch-size 16`).

Input JSONL: one prompt per line, in any of these forms (blank lines are skipped):

    {"id": "q1", "prompt": "What is the capital of France?"}
    {"id": 7, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]}
    {"prompt": "No id: the line's position among the prompts (0, 1, ...) is its id"}
    "a bare JSON string is a prompt too"

`id` is a string or an integer, unique in the file. `messages` are rendered with the tokenizer's chat template
(always; there must be one). A `prompt` is rendered as one user message when `chat=True` and the tokenizer has a
chat template, else used as plain text.

Output JSONL: one line per prompt,

    {"id": "q1", "completion": " Paris.", "finish_reason": "stop", "prompt_tokens": 12, "completion_tokens": 3,
     "prompt_sha256": "9f2c..."}

`finish_reason` is `"stop"` (an end-of-sequence token) or `"length"` (`max_new_tokens` reached);
`completion_tokens` counts the end-of-sequence token; `prompt_sha256` identifies the prompt so a rerun against a
different input file is refused instead of mixing results.

Order and crash safety. Prompts are sorted by token length (longest first) so that each batch holds prompts of
similar length and little padding; greedy results do not depend on the batch. Each finished batch is appended to
the output file, flushed and `fsync`ed before the next batch starts, so a crash loses at most the batch in flight.
A rerun reads the output, drops a torn last line left by a crash, and generates only the prompts without a result.
When every prompt has its result, the file is rewritten (atomically: temporary file, `fsync`, rename) in input
order: a finished output file is in input order, one line per prompt, whatever crashes happened on the way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._safetensors import atomic_write_bytes, fsync_dir
from .speculative import count_new_tokens, count_sweeps, eos_token_ids
from .split import progress_bar

logger = logging.getLogger(__name__)

__all__ = ["generate_batch", "generate_jsonl"]

_SPECULATIVE_KWARGS = ("assistant_model", "prompt_lookup_num_tokens")
_FORBIDDEN_KWARGS = ("input_ids", "attention_mask", "inputs", "streamer")


@dataclass
class _Prompt:
    index: int  # position in the input
    id: str | int
    prompt: str | list  # text, or a list of chat messages
    input_ids: list[int] | None = None

    @property
    def key(self) -> str:
        return json.dumps(self.id)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.prompt, sort_keys=True).encode()).hexdigest()[:16]


# --- prompts -> token ids ------------------------------------------------------------------------------------------


def _check_messages(messages: Any, where: str) -> list:
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f"{where}: `messages` must be a non-empty list of {{'role': ..., 'content': ...}}, got {messages!r}."
        )
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: every message needs 'role' and 'content', got {m!r}.")
    return messages


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _encode(tokenizer, prompt: str | list, chat: bool) -> list[int]:
    """Token ids of one prompt: chat messages through the template, text through the template when `chat`, else plain."""
    if isinstance(prompt, list):
        if not _has_chat_template(tokenizer):
            raise ValueError(
                f"A prompt is a list of chat messages but the tokenizer {type(tokenizer).__name__} has no chat "
                "template. Give plain-text prompts, or set `tokenizer.chat_template`."
            )
        messages = prompt
    elif chat and _has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}]
    else:
        return list(tokenizer(prompt)["input_ids"])
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # the template writes the special tokens (BOS) itself, as pipelines do
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pad_token_id(model: nn.Module, tokenizer, generate_kwargs: dict) -> int:
    for value in (
        generate_kwargs.get("pad_token_id"),
        getattr(generate_kwargs.get("generation_config"), "pad_token_id", None),
        getattr(tokenizer, "pad_token_id", None),
        getattr(getattr(model, "generation_config", None), "pad_token_id", None),
    ):
        if value is not None:
            return int(value)
    eos = eos_token_ids(model, tokenizer, generate_kwargs)
    if eos:
        return min(eos)
    raise ValueError(
        "Batched generation needs a padding token and neither the tokenizer nor the model defines one (nor an "
        "end-of-sequence token). Pass `pad_token_id=...` or set `tokenizer.pad_token`."
    )


def _check_kwargs(batch_size: Any, generate_kwargs: dict) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int (e.g. 8 or 16), got {batch_size!r}.")
    for name in _FORBIDDEN_KWARGS:
        if name in generate_kwargs:
            raise ValueError(
                f"`{name}` cannot be passed to batched generation: the prompts are tokenized, padded and batched "
                f"here{' and progress is reported through a streamer of its own' if name == 'streamer' else ''}. "
                "Remove it, or call `model.generate` yourself."
            )
    if generate_kwargs.get("num_return_sequences", 1) != 1:
        raise ValueError(
            f"`num_return_sequences` must be 1 for batched generation (one result per prompt), got "
            f"{generate_kwargs['num_return_sequences']!r}. Repeat the prompt with different ids instead."
        )
    speculative = [k for k in _SPECULATIVE_KWARGS if generate_kwargs.get(k) is not None]
    if speculative and batch_size > 1:
        logger.warning(
            "%s: transformers' speculative decoding handles one prompt per generate call; using batch_size=1 instead "
            "of %d (every sweep then verifies several tokens of one prompt).",
            " and ".join(f"`{k}`" for k in speculative),
            batch_size,
        )
        batch_size = 1
    return batch_size


# --- the batch loop -----------------------------------------------------------------------------------------------


class _TokenMeter:
    """A `generate` streamer that counts the generated tokens of the rows still running, for the tokens/s display."""

    def __init__(self, eos_ids: set[int], on_tokens):
        self.eos_ids = eos_ids
        self.on_tokens = on_tokens
        self._started = False
        self._finished: list[bool] = []

    def put(self, value: torch.Tensor) -> None:
        if not self._started:  # the first call hands over the prompt
            self._started = True
            self._finished = [False] * value.shape[0]
            return
        rows = value[:, None] if value.dim() == 1 else value  # (batch,) per step, (1, n) under assisted decoding
        n = 0
        for i, row in enumerate(rows.tolist()):
            for t in row:
                if self._finished[i]:
                    break
                n += 1
                if t in self.eos_ids:
                    self._finished[i] = True
        if n:
            self.on_tokens(n)

    def end(self) -> None:
        self._started = False


class _Progress:
    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = progress_bar(enabled, total=total, desc=desc, unit="prompt", dynamic_ncols=True)
        self.tokens = 0
        self.t0 = time.perf_counter()
        self._shown = 0.0

    def add_tokens(self, n: int) -> None:
        self.tokens += n
        now = time.perf_counter()
        if now - self._shown > 0.5:
            self._shown = now
            self._postfix(now)

    def _postfix(self, now: float) -> None:
        elapsed = now - self.t0
        if elapsed > 0:
            self.bar.set_postfix_str(f"{self.tokens / elapsed:.1f} tok/s", refresh=True)

    def done(self, n: int) -> None:
        self._postfix(time.perf_counter())
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _run(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[_Prompt],
    *,
    batch_size: int,
    chat: bool,
    progress: bool,
    generate_kwargs: dict,
    stats: dict,
) -> Iterator[list[tuple[_Prompt, dict]]]:
    """Generate `prompts` in length-sorted batches; yields each finished batch as (prompt, result) pairs."""
    for p in prompts:
        if p.input_ids is None:
            p.input_ids = _encode(tokenizer, p.prompt, chat)
        if not p.input_ids:
            raise ValueError(f"Prompt {p.id!r} is empty after tokenization; give it some text.")
    pad_id = _pad_token_id(model, tokenizer, generate_kwargs)
    eos_ids = eos_token_ids(model, tokenizer, generate_kwargs)
    kwargs = {"pad_token_id": pad_id, **generate_kwargs}
    # longest first: batches of similar lengths (little padding), and an out-of-memory shows up on the first batch
    order = sorted(prompts, key=lambda p: -len(p.input_ids))
    bar = _Progress(len(order), progress, "Generating")
    use_meter = kwargs.get("num_beams", getattr(model.generation_config, "num_beams", 1) or 1) == 1
    device = model.device
    try:
        with count_sweeps(model) as counter:
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                width = max(len(p.input_ids) for p in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, p in enumerate(batch):  # left padding: every prompt ends where generation starts
                    ids[row, width - len(p.input_ids) :] = torch.tensor(p.input_ids, dtype=torch.long)
                    mask[row, width - len(p.input_ids) :] = 1
                extra = {"streamer": _TokenMeter(eos_ids, bar.add_tokens)} if use_meter else {}
                with torch.no_grad():
                    out = model.generate(ids.to(device), attention_mask=mask.to(device), **kwargs, **extra)
                sequences = out.sequences if hasattr(out, "sequences") else out
                new = sequences[:, width:].cpu().tolist()
                counts = count_new_tokens(new, eos_ids)
                results = []
                for p, row, n in zip(batch, new, counts):
                    tokens = row[:n]
                    stopped = bool(tokens) and tokens[-1] in eos_ids
                    text = tokenizer.decode(tokens[:-1] if stopped else tokens, skip_special_tokens=True)
                    results.append(
                        (
                            p,
                            {
                                "id": p.id,
                                "completion": text,
                                "finish_reason": "stop" if stopped else "length",
                                "prompt_tokens": len(p.input_ids),
                                "completion_tokens": n,
                                "prompt_sha256": p.digest,
                            },
                        )
                    )
                stats["batches"] += 1
                stats["prompt_tokens"] += sum(len(p.input_ids) for p in batch)
                stats["tokens"] += sum(counts)
                stats["padding_tokens"] += sum(width - len(p.input_ids) for p in batch)
                stats["sweeps"] = counter.sweeps
                if not use_meter:
                    bar.add_tokens(sum(counts))
                yield results
                bar.done(len(batch))
    finally:
        bar.close()


def _new_stats(batch_size: int) -> dict:
    return {
        "batch_size": batch_size,
        "batches": 0,
        "prompt_tokens": 0,
        "padding_tokens": 0,
        "tokens": 0,
        "sweeps": 0,
    }


def _finish_stats(stats: dict, seconds: float) -> dict:
    stats["seconds"] = round(seconds, 4)
    stats["tokens_per_s"] = round(stats["tokens"] / seconds, 3) if seconds > 0 and stats["tokens"] else 0.0
    stats["tokens_per_sweep"] = round(stats["tokens"] / stats["sweeps"], 3) if stats["sweeps"] else 0.0
    return stats


def generate_batch(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    *,
    batch_size: int = 8,
    chat: bool = False,
    progress: bool = True,
    **generate_kwargs,
) -> list[str]:
    """Generate a completion for every prompt, many prompts per sweep of the (streamed) weights.

    Prompts are tokenized one by one, sorted by length, left-padded into batches of `batch_size` and run through
    `model.generate`; the completions come back in input order. With greedy decoding each completion equals what
    generating that prompt alone gives.

    Args:
        model (`transformers.PreTrainedModel`):
            A causal LM, streamed ([`enable_layer_streaming`]) or not.
        tokenizer (`transformers.PreTrainedTokenizerBase`):
            Its tokenizer.
        prompts (list of `str` or of chat message lists):
            Plain-text prompts, or conversations (`[{"role": "user", "content": ...}, ...]`, rendered with the
            tokenizer's chat template).
        batch_size (`int`, defaults to 8):
            Prompts per `generate` call (per sweep). Speculative decoding (`assistant_model=`,
            `prompt_lookup_num_tokens=`) runs one prompt per call.
        chat (`bool`, defaults to `False`):
            Render plain-text prompts as a user message with the tokenizer's chat template (when it has one).
        progress (`bool`, defaults to `True`):
            Show a progress bar with tokens/s.
        **generate_kwargs:
            Passed to `model.generate` (`max_new_tokens`, `do_sample`, `assistant_model`, ...). Use `max_new_tokens`
            rather than `max_length`, which counts the padding of the batch.

    Returns:
        `list[str]`: the completion of each prompt (special tokens removed), in input order.

    Example:
    ```python
    >>> from hf_layerstream import generate_batch
    >>> generate_batch(model, tok, ["The capital of France is", "2 + 2 ="], batch_size=16, max_new_tokens=20)
    [' Paris.', ' 4']
    ```
    """
    if isinstance(prompts, (str, bytes)):
        raise TypeError("`prompts` must be a list of prompts, got a single string; wrap it: `[prompt]`.")
    batch_size = _check_kwargs(batch_size, generate_kwargs)
    items = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, list):
            prompt = _check_messages(prompt, f"`prompts[{i}]`")
        elif not isinstance(prompt, str):
            raise TypeError(f"`prompts[{i}]` must be a string or a list of chat messages, got {type(prompt).__name__}.")
        items.append(_Prompt(i, i, prompt))
    completions: list[str | None] = [None] * len(items)
    stats = _new_stats(batch_size)
    t0 = time.perf_counter()
    for results in _run(
        model,
        tokenizer,
        items,
        batch_size=batch_size,
        chat=chat,
        progress=progress,
        generate_kwargs=generate_kwargs,
        stats=stats,
    ):
        for p, record in results:
            completions[p.index] = record["completion"]
    _finish_stats(stats, time.perf_counter() - t0)
    logger.info("generate_batch: %s", stats)
    return completions


# --- JSONL jobs ---------------------------------------------------------------------------------------------------


def _read_input(path: Path) -> list[_Prompt]:
    if not path.is_file():
        raise FileNotFoundError(f"`input_path` {path} does not exist; give a JSONL file with one prompt per line.")
    items: list[_Prompt] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8-sig") as f:  # (a byte-order mark, as some Windows editors write, is not JSON)
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where} is not valid JSON ({e}); each line must be one JSON value.") from None
            index = len(items)
            pid: Any = index
            if isinstance(obj, str):
                prompt: str | list = obj
            elif isinstance(obj, dict):
                pid = obj.get("id", index)
                if "messages" in obj:
                    prompt = _check_messages(obj["messages"], where)
                elif isinstance(obj.get("prompt"), str):
                    prompt = obj["prompt"]
                else:
                    raise ValueError(
                        f"{where} has neither a string 'prompt' nor 'messages': {line.strip()[:80]!r}. Use "
                        '{"id": ..., "prompt": "..."} or {"id": ..., "messages": [{"role": "user", "content": "..."}]}.'
                    )
            else:
                raise ValueError(
                    f"{where} must be a JSON object or string, got {type(obj).__name__}. Use "
                    '{"id": ..., "prompt": "..."}, {"id": ..., "messages": [...]} or "a prompt".'
                )
            if isinstance(pid, bool) or not isinstance(pid, (str, int)):
                raise ValueError(f"{where}: 'id' must be a string or an integer, got {pid!r}.")
            item = _Prompt(index, pid, prompt)
            if item.key in seen:
                raise ValueError(
                    f"{where}: id {pid!r} already used by prompt {seen[item.key]}; ids must be unique (results are "
                    "matched to prompts by id when a job resumes)."
                )
            seen[item.key] = index
            items.append(item)
    return items


def _load_done(path: Path, by_key: dict[str, _Prompt]) -> tuple[dict[str, dict], bool]:
    """Results already in `path`, by id key; drops a torn last line (a crash mid-write). Returns (done, repaired)."""
    if not path.exists():
        return {}, False
    with open(path, "rb") as f:
        data = f.read()
    done: dict[str, dict] = {}
    good_end = 0
    pos = 0
    repaired = False
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        raw = data[pos:end]
        is_last = end == len(data)
        try:
            record = json.loads(raw) if raw.strip() else None
            if record is not None and (not isinstance(record, dict) or "id" not in record):
                raise ValueError("not a result record")
        except ValueError:
            if is_last:  # a write torn by a crash: only ever the last line
                logger.warning("Dropping a torn last line of %s (left by an interrupted run): %r", path, raw[:80])
                repaired = True
                break
            lineno = data.count(b"\n", 0, pos) + 1
            raise ValueError(
                f"`output_path` {path}:{lineno} is not a result line ({raw[:80]!r}). It is not an output of "
                "`generate_jsonl`; choose another `output_path` or remove the file."
            ) from None
        if nl < 0 and record is not None:
            repaired = True  # complete JSON without its newline: keep it, add the newline
        pos = end
        good_end = end
        if record is None:
            continue
        key = json.dumps(record["id"])
        prompt = by_key.get(key)
        if prompt is None:
            raise ValueError(
                f"`output_path` {path} has a result for id {record['id']!r}, which is not in the input. It was made "
                "from another input file; choose another `output_path` or remove the file."
            )
        if record.get("prompt_sha256") not in (None, prompt.digest):
            raise ValueError(
                f"`output_path` {path} has a result for id {record['id']!r} whose prompt differs from the input's. "
                "It was made from another input file; choose another `output_path` or remove the file."
            )
        if key in done:
            logger.warning("Ignoring a second result for id %r in %s.", record["id"], path)
            continue
        done[key] = record
    if repaired:
        with open(path, "r+b") as f:
            f.truncate(good_end)
            if good_end and not data[:good_end].endswith(b"\n"):
                f.seek(good_end)
                f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
    return done, repaired


def _dumps(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def _lock(f, path: Path) -> None:
    """Hold an exclusive lock on the output while the job runs: two jobs appending to one file would mix results."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(
            f"`output_path` {path} is being written by another running job. Wait for it to finish, or write to "
            "another file."
        ) from None


def _rewrite_in_order(path: Path, items: list[_Prompt], done: dict[str, dict]) -> None:
    """Write every result in input order to a temporary file and rename it over `path` (atomic)."""
    body = b"".join(_dumps(done[p.key]) for p in items)
    if path.exists() and path.read_bytes() == body:
        return
    atomic_write_bytes(path, body)


def generate_jsonl(
    model: nn.Module,
    tokenizer,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    batch_size: int = 8,
    chat: bool = False,
    progress: bool = True,
    **generate_kwargs,
) -> dict:
    """Generate a completion for every prompt of a JSONL file; resumable, results appended as they complete.

    See the module docstring for the input and output schemas. Prompts that already have a result in `output_path`
    are skipped, so rerunning the same command after a crash finishes the job. Once all prompts have a result,
    `output_path` holds exactly one line per prompt, in input order.

    Args:
        model (`transformers.PreTrainedModel`):
            A causal LM, streamed or not.
        tokenizer (`transformers.PreTrainedTokenizerBase`):
            Its tokenizer.
        input_path (`str` or `os.PathLike`):
            JSONL prompts.
        output_path (`str` or `os.PathLike`):
            JSONL results; created, or resumed when it exists.
        batch_size (`int`, defaults to 8):
            Prompts per sweep.
        chat (`bool`, defaults to `False`):
            Render `"prompt"` lines with the tokenizer's chat template (`"messages"` lines always are).
        progress (`bool`, defaults to `True`):
            Show a progress bar with tokens/s.
        **generate_kwargs:
            Passed to `model.generate`.

    Returns:
        `dict` of statistics: `prompts`, `skipped` (already done), `generated`, `batches`, `prompt_tokens`,
        `padding_tokens`, `tokens` (generated), `sweeps` (forward sweeps of the model), `tokens_per_sweep`,
        `seconds`, `tokens_per_s`, `repaired` (a torn line from a crash was dropped), `input`, `output`.

    Example:
    ```python
    >>> generate_jsonl(model, tok, "prompts.jsonl", "results.jsonl", batch_size=16, max_new_tokens=128)
    {'prompts': 1000, 'skipped': 0, 'generated': 1000, 'tokens_per_sweep': 15.2, ...}
    ```
    """
    input_path = Path(input_path)
    output_path = Path(output_path)
    if output_path.resolve() == input_path.resolve():
        raise ValueError(f"`output_path` {output_path} is the input file; write results to another file.")
    batch_size = _check_kwargs(batch_size, generate_kwargs)
    items = _read_input(input_path)
    by_key = {p.key: p for p in items}
    output_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    created = not output_path.exists()
    with open(output_path, "ab") as out:
        _lock(out, output_path)
        if created:
            fsync_dir(output_path.parent)
        done, repaired = _load_done(output_path, by_key)
        todo = [p for p in items if p.key not in done]
        stats = {"input": str(input_path), "output": str(output_path), "prompts": len(items), "skipped": len(done)}
        stats.update(_new_stats(batch_size))
        if done:
            logger.info("Resuming %s: %d of %d prompts already done.", output_path, len(done), len(items))
        for results in _run(
            model,
            tokenizer,
            todo,
            batch_size=batch_size,
            chat=chat,
            progress=progress,
            generate_kwargs=generate_kwargs,
            stats=stats,
        ):
            for p, record in results:
                out.write(_dumps(record))
                out.flush()
                done[p.key] = record
            os.fsync(out.fileno())
        _rewrite_in_order(output_path, items, done)  # still under the lock
    stats["generated"] = len(todo)
    stats["repaired"] = repaired
    _finish_stats(stats, time.perf_counter() - t0)
    logger.info("generate_jsonl: %s", stats)
    return stats
