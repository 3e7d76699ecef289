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
chat template, else used as plain text. Other keys of a line (a reference answer kept beside the prompt) are not
read: they are named in a warning (a misspelt key, or a setting of one prompt such as `max_new_tokens`, was ignored
silently; generation settings are the job's, for every prompt).

Output JSONL: one line per prompt,

    {"id": "q1", "completion": " Paris.", "finish_reason": "stop", "prompt_tokens": 12, "completion_tokens": 3,
     "prompt_sha256": "9f2c...", "settings_sha256": "51ab...", "model_sha256": "0c7e..."}

`finish_reason` is `"stop"` (an end-of-sequence token, a stop string of `stop_strings=` or a stopping criterion of
`stopping_criteria=`) or `"length"` (`max_new_tokens` reached); `completion_tokens` counts the end-of-sequence token
(the completion leaves it out, but keeps a stop string); `prompt_sha256` identifies the prompt and `settings_sha256` the
settings (`chat`, the tokenizer, as it serializes its vocabulary, added tokens and normalization, with its
`clean_up_tokenization_spaces`, the generation settings that change what is generated, from the keyword arguments and
the generation config, and a sampled job's `seed`) and `model_sha256` the model (a streamed model's shard files as its
manifest records them, else its `name_or_path` and size; the dtype of its parameters; the PEFT adapters attached, with
their weights), so a rerun against a different input file, with other settings or with another model is refused instead
of mixing results. Results written by an older hf_layerstream, which record no settings, no tokenizer or no model,
resume with a warning.

Order and crash safety. Prompts are sorted by token length (longest first) so that each batch holds prompts of
similar length and little padding; greedy results do not depend on the batch. Each finished batch is appended to
the output file, flushed and `fsync`ed before the next batch starts, so a crash loses at most the batch in flight.
A rerun reads the output, drops a torn last line left by a crash (an unfinished result line), and generates only
the prompts without a result; a file with any other line that is not a result is refused, never truncated.
When every prompt has its result, the file is rewritten (atomically: temporary file, `fsync`, rename) in input
order: a finished output file is in input order, one line per prompt, whatever crashes happened on the way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import threading
import time
import types
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.generation import GenerationMode

from ._safetensors import atomic_write_bytes, fsync_dir
from .modeling import check_flag, check_path, learned_position_limit, position_overrun, vocabulary_overrun
from .quant import _is_int  # (an int, NumPy's too, not a bool)
from .speculative import (
    SweepCounter,
    _generation_config,
    _refuse_lookup_settings,
    _refuse_what_drafting_fails_on,
    _require_model,
    _setting_source,
    _StopRecorder,
    _StopWatch,
    _with_settings,
    count_new_tokens,
    eos_token_ids,
)
from .split import progress_bar
from .stream import _adapter_modules, get_streaming_state

logger = logging.getLogger(__name__)

__all__ = ["generate_batch", "generate_jsonl"]

_FORBIDDEN_KWARGS = ("input_ids", "attention_mask", "inputs", "streamer")
# the decoding modes that take a streamer (the tokens/s display)
_METERED_MODES = tuple(  # (by name: a mode a transformers release folds into another is left out, not an import error)
    m for n in ("GREEDY_SEARCH", "SAMPLE", "ASSISTED_GENERATION") if (m := getattr(GenerationMode, n, None)) is not None
)
# the keys every result line has (`settings_sha256` and `model_sha256` too, from files written by newer versions)
_RESULT_KEYS = ("id", "completion", "finish_reason", "prompt_tokens", "completion_tokens", "prompt_sha256")
# the keys an input line (a JSON object) takes
_INPUT_KEYS = ("id", "prompt", "messages")
_RECORD_START = b'{"id": '  # how every result line written by `_dumps` starts
# generation settings that change the speed or what `generate` returns besides the tokens, not the tokens
_NOT_IN_SETTINGS = frozenset(
    {
        "_from_model_config",
        "transformers_version",
        "assistant_confidence_threshold",
        "assistant_early_exit",
        "assistant_lookbehind",
        "target_lookbehind",
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "max_matching_ngram_size",
        "prompt_lookup_num_tokens",
        "use_mtp",
        "is_assistant",
        "use_cache",
        "cache_config",
        "cache_implementation",
        "max_cache_len",
        "compile_config",
        "disable_compile",
        "continuous_batching_config",
        "prefill_chunk_size",
        "low_memory",
        "output_attentions",
        "output_hidden_states",
        "output_logits",
        "output_scores",
        "return_dict_in_generate",
    }
)
# generation settings transformers uses only when sampling (`do_sample=True`): a greedy job's results do not depend
# on them, as they do not on its `seed`
_SAMPLING_ONLY = frozenset(
    {"temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff"}
)


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


def _warn_untemplated(tokenizer, chat: bool) -> None:
    """`chat=True` with a tokenizer that has no chat template: its plain-text prompts are tokenized as they are, as
    with `chat=False`; said (it was taken without a word, where `generate --chat` says it)."""
    if chat and not _has_chat_template(tokenizer):
        logger.warning(
            "`chat=True`, but the tokenizer (%s) has no chat template: plain-text prompts are tokenized as they are, "
            "as with chat=False. Set `tokenizer.chat_template`, or pass chat=False.",
            type(tokenizer).__name__,
        )


def _continues_final_message(prompt: str | list) -> bool:
    """Whether `prompt` is a conversation whose last message is the assistant's, which the reply continues."""
    return (
        isinstance(prompt, list)
        and bool(prompt)
        and isinstance(prompt[-1], dict)
        and prompt[-1].get("role") == "assistant"
    )


def _check_model_and_tokenizer(model, tokenizer) -> None:
    """Checked first: something else than a model failed deep inside ("'NoneType' object has no attribute
    'config'"), and something else than a tokenizer (None, the shard directory's path) blamed the first prompt
    ("Prompt 0 could not be rendered and tokenized: TypeError: 'str' object is not callable")."""
    _require_model(model)
    if not callable(tokenizer):
        raise TypeError(
            "`tokenizer` must be the model's tokenizer (`AutoTokenizer.from_pretrained(shard_dir)`), got "
            f"{type(tokenizer).__name__}."
        )


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
    # a conversation ending with an assistant turn is a prefill that the reply continues, as the text-generation
    # pipeline treats it (most templates cannot follow an assistant turn with another)
    prefill = _continues_final_message(messages)
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=not prefill, continue_final_message=prefill
    )
    # the template writes the special tokens (BOS) itself, as pipelines do
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pad_token_id(model: nn.Module, tokenizer, generate_kwargs: dict, batched: bool = True) -> int:
    """The id batches are left-padded with (and `generate` fills finished rows with). `batched` (several prompts per
    call): the model runs the padding, so an id that is not a token of the model (a padding token added to the
    tokenizer without resizing the model's embeddings, a `-1` in a config) failed in the embedding with torch's
    "IndexError: index out of range in self" (on a GPU a device-side assert), though each prompt alone, unpadded,
    generates. One given (`pad_token_id=`, or in a `generation_config` given) is refused; the tokenizer's or the
    model's own is passed over for the next, with a warning (the padding is masked: the completions are the same)."""
    skipped = None
    for where, value, given in (
        ("`pad_token_id`", generate_kwargs.get("pad_token_id"), True),
        (
            "the `generation_config`'s `pad_token_id`",
            getattr(generate_kwargs.get("generation_config"), "pad_token_id", None),
            True,
        ),
        ("the tokenizer's `pad_token_id`", getattr(tokenizer, "pad_token_id", None), False),
        (
            "the model's `generation_config.pad_token_id`",
            getattr(getattr(model, "generation_config", None), "pad_token_id", None),
            False,
        ),
    ):
        if value is None:
            continue
        value = int(value)
        size = vocabulary_overrun(model, value)
        if not batched or (value >= 0 and size is None):
            if skipped is not None:
                logger.warning("%s; padding with %d instead (masked: the same completions).", skipped, value)
            return value
        problem = f"{where[0].upper()}{where[1:]}, {value}, is not a token of {type(model).__name__}'s vocabulary" + (
            f" of {size} tokens (a padding token added to the tokenizer without resizing the model's embeddings?)"
            if size is not None
            else ""
        )
        if given:
            eos = eos_token_ids(model, tokenizer, generate_kwargs)
            raise ValueError(
                f"{problem}: batched generation pads prompts with it, and the padded rows would fail in the "
                "embedding. Pass `pad_token_id=` a token of the model"
                + (f" (its end-of-sequence id, {min(eos)}, as `generate` pads without one)" if eos else "")
                + "."
            )
        skipped = skipped or problem
    eos = eos_token_ids(model, tokenizer, generate_kwargs)
    if eos:
        if skipped is not None:
            logger.warning(
                "%s; padding with the end-of-sequence id %d instead (masked: the same completions).", skipped, min(eos)
            )
        return min(eos)
    raise ValueError(
        (
            "Batched generation needs a padding token and neither the tokenizer nor the model defines one"
            if skipped is None
            else f"{skipped}, and batched generation needs a padding token the model has"
        )
        + " (nor an end-of-sequence token). Pass `pad_token_id=...` or set `tokenizer.pad_token`."
    )


def _check_batch_size(batch_size: Any) -> int:
    """`batch_size` as an int (NumPy's integers too, made Python's): another type (a str, a float, a bool) is a
    TypeError, a number below 1 a ValueError."""
    if not _is_int(batch_size):
        raise TypeError(
            f"`batch_size` must be a positive int (e.g. 8 or 16), got {type(batch_size).__name__} {batch_size!r}."
        )
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int (e.g. 8 or 16), got {batch_size!r}.")
    return int(batch_size)


def _check_seed(seed: Any, name: str = "seed") -> int | None:
    """`seed` as a Python int (NumPy's integers too: a job's settings are JSON), or None: another type is a TypeError,
    a number out of `torch.manual_seed`'s range a ValueError, naming it as `name` (`generate --seed` checks its own
    here, before the model loads)."""
    if seed is not None and not _is_int(seed):
        raise TypeError(f"`{name}` must be an int or None, got {seed!r}.")
    seed = None if seed is None else int(seed)
    if seed is not None and not -(2**63) <= seed < 2**64:
        # (`torch.manual_seed`'s range: torch's "Overflow when unpacking long long" named no argument, and came after
        # the output file was made)
        raise ValueError(f"`{name}` {seed} is out of range: use a whole number from {-(2**63)} to {2**64 - 1}.")
    return seed


def _check_kwargs(
    model: nn.Module, batch_size: Any, generate_kwargs: dict, tokenizer=None
) -> tuple[int, GenerationConfig, str]:
    """Checks the arguments against the settings `generate` will run with (the keyword arguments over
    `generation_config`, else the model's own); returns the batch size to use, those settings and the decoding mode."""
    # (NumPy's integers too, as `prefetch` takes them: they were refused as not an int; made Python's, for the stats)
    batch_size = _check_batch_size(batch_size)
    for name in _FORBIDDEN_KWARGS:
        if name in generate_kwargs:
            raise ValueError(
                f"`{name}` cannot be passed to batched generation: the prompts are tokenized, padded and batched "
                f"here{' and progress is reported through a streamer of its own' if name == 'streamer' else ''}. "
                "Remove it, or call `model.generate` yourself."
            )
    if generate_kwargs.get("cache_implementation") == "paged":  # (transformers' continuous batching: other outputs)
        raise ValueError(
            "`cache_implementation='paged'` makes `generate` run transformers' continuous batching, which returns "
            "its results otherwise and takes no streamer: drop it here (these batches share each sweep of the weights "
            "already), or call `model.generate_batch(...)` yourself."
        )
    config = _generation_config(model, generate_kwargs)
    if (config.num_return_sequences or 1) != 1:
        where = _setting_source(model, generate_kwargs, "num_return_sequences") or ""
        raise ValueError(
            f"`num_return_sequences` must be 1 for batched generation (one result per prompt), got "
            f"{config.num_return_sequences!r}{where}. Repeat the prompt with different ids instead."
        )
    _refuse_lookup_settings(model, config, generate_kwargs)
    assistant = generate_kwargs.get("assistant_model")
    mode = config.get_generation_mode(assistant)
    _refuse_what_drafting_fails_on(model, config, generate_kwargs, tokenizer)
    if mode == GenerationMode.ASSISTED_GENERATION and batch_size > 1:
        reasons = ["assistant_model"] if assistant is not None else []
        reasons += [k for k in ("prompt_lookup_num_tokens", "assistant_early_exit") if getattr(config, k) is not None]
        reasons += ["use_mtp"] if config.use_mtp else []
        logger.warning(
            "%s: transformers' speculative decoding handles one prompt per generate call; using batch_size=1 instead "
            "of %d (every sweep then verifies several tokens of one prompt).",
            " and ".join(f"`{k}`" for k in reasons),
            batch_size,
        )
        batch_size = 1
    return batch_size, config, mode


def _describe(value: Any, depth: int = 0, *, legacy: bool = False) -> Any:
    """`value` for the settings fingerprint: JSON values as they are; a tensor by its dtype, shape and bytes; an object
    (a logits processor, a stopping criterion) by its type's name and, two levels deep, its attributes (a processor
    suppressing other tokens is another setting: by its name alone, two runs with different ones had one
    fingerprint); a function by its name. `legacy`: as hf_layerstream 0.1.0 described it (anything not JSON by its
    type's name), so that the results it wrote still resume."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_describe(v, depth, legacy=legacy) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v, depth, legacy=legacy) for k, v in value.items()}
    name = getattr(value, "__qualname__", None) or type(value).__qualname__
    if legacy:
        return name
    if isinstance(value, (set, frozenset)):
        return sorted((_describe(v, depth) for v in value), key=repr)
    if isinstance(value, torch.Tensor):
        data = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return {"tensor": str(value.dtype), "shape": list(value.shape), "sha256": hashlib.sha256(data).hexdigest()}
    if getattr(value, "shape", None) == () and callable(getattr(value, "item", None)):
        # a NumPy number (`max_new_tokens=np.int64(64)`, `temperature=np.float32(0.7)`): by its value, as Python's (by
        # its type's name, "int64", a resume with another one was taken, the results mixing)
        return _describe(value.item(), depth)
    if isinstance(value, (type, types.FunctionType, types.MethodType, types.BuiltinFunctionType)) or depth >= 2:
        return name
    state = getattr(value, "__dict__", None)
    if not isinstance(state, dict):
        return name
    return {"type": name, "state": _describe({k: v for k, v in state.items() if not k.startswith("_")}, depth + 1)}


def _tokenizer_digest(tokenizer) -> str:
    """A fingerprint of how `tokenizer` tokenizes (and decodes): a fast tokenizer's serialization (its vocabulary,
    merges, added tokens, normalizer, pre-tokenizer, post-processor and decoder, as `tokenizer.json` holds them; not
    its truncation and padding, which each call sets), else its class, vocabulary and added tokens (and a
    SentencePiece model's bytes); and its `clean_up_tokenization_spaces`, which decoding reads. The same tokenizer
    loaded again, in another process, has the same one; not its folder's path (the same files elsewhere are the same
    tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if callable(getattr(backend, "to_str", None)):
        identity: Any = json.loads(backend.to_str())
        identity.pop("truncation", None)
        identity.pop("padding", None)
    else:
        vocab = tokenizer.get_vocab() if callable(getattr(tokenizer, "get_vocab", None)) else {}
        added = getattr(tokenizer, "added_tokens_decoder", None)
        sp_model = getattr(tokenizer, "sp_model", None)
        proto = getattr(sp_model, "serialized_model_proto", None)
        identity = {
            "type": type(tokenizer).__qualname__,
            "vocab": sorted((str(k), int(v)) for k, v in vocab.items()),
            "added": sorted((int(k), repr(v)) for k, v in added.items()) if isinstance(added, dict) else None,
            "sentencepiece": hashlib.sha256(proto()).hexdigest() if callable(proto) else None,
        }
    # (not serialized: whether decoding drops the spaces before punctuation, which changes the completions' text)
    clean_up = getattr(tokenizer, "clean_up_tokenization_spaces", None)
    return hashlib.sha256(
        json.dumps({"tokenizer": identity, "clean_up": bool(clean_up)}, sort_keys=True).encode()
    ).hexdigest()


def _settings_digest(
    tokenizer,
    chat: bool,
    config: GenerationConfig,
    generate_kwargs: dict,
    legacy=False,
    seed: int | None = None,
    prefill: bool = False,
    messages: bool = False,
    greedy_sampling: bool = False,
    vocabulary: bool = False,
) -> str:
    """A fingerprint of what decides a job's results besides the prompt and the model: how prompts are rendered (the
    chat template's text, where `chat` or a conversation has it render them), the generation settings (not those
    that only change the speed, such as a draft model or prompt lookup) and `seed` (given for a sampled job only:
    greedy results do not depend on it; without it, the fingerprint is the one made before seeds were part of it) and
    `prefill`: some conversation ends with an assistant turn, which the reply continues (rendered as a new turn after
    it before, so results written then are not taken). `messages`: some prompt is a conversation, which the chat
    template renders whatever `chat` says (its text was left out then: a resume with another template mixed results).
    `legacy`: as hf_layerstream 0.1.0 made it (`chat` as a flag, see `_describe`). The sampling-only settings
    (`_SAMPLING_ONLY`) of a greedy job are left out, as its seed is (its results do not depend on them), unless
    `legacy` or `greedy_sampling`: as the fingerprint was made before. `vocabulary`: with the tokenizer's identity
    (`_tokenizer_digest`), as a job's fingerprint has it now (without, as it was made before: a resume with another
    tokenizer mixed results)."""
    sampling = config.do_sample is True or legacy or greedy_sampling
    generation = {
        k: v
        for k, v in config.to_diff_dict().items()
        if k not in _NOT_IN_SETTINGS and (sampling or k not in _SAMPLING_ONLY)
    }
    custom = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "custom_generate")
    templated = bool(chat and _has_chat_template(tokenizer))
    settings = {
        "chat": templated if legacy or not templated else str(tokenizer.chat_template),
        "generation": _describe(generation, legacy=legacy),
        "custom": {
            k: _describe(generate_kwargs[k], legacy=legacy) for k in custom if generate_kwargs.get(k) is not None
        },
    }
    if messages and not templated and not legacy and _has_chat_template(tokenizer):
        settings["template"] = str(tokenizer.chat_template)  # (the conversations'; "prompt" lines are plain text)
    if seed is not None:
        settings["seed"] = seed
    if prefill:
        settings["prefill"] = "continue_final_message"
    if vocabulary:
        settings["tokenizer"] = _tokenizer_digest(tokenizer)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _model_digest(model: nn.Module, *, legacy: bool = False) -> str:
    """A fingerprint of the model a job's results come from (`model_sha256`, beside the settings'), read without its
    base weights: for a streamed model, the digests of its shard directory's files as its manifest records them (the
    checkpoint, the split's dtype and compression, an adapter merged by the split; the same files at another path are
    the same model); for another, its `name_or_path` and number of parameters (and quantization config). For both,
    the dtypes of its parameters (the dtype a model is streamed at) and the PEFT adapters attached: their configs,
    each adapter layer's active adapters and its adapter weights (hashed: small beside the model), the layers named
    in the base model (a `PeftModel`'s, as `load_adapter` attaches them: the same adapter attached either way is the
    same model). `legacy`: as hf_layerstream 0.1.0 made it (a `PeftModel`'s layers named in it, `base_model.model.`)."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # (a `PeftModel`)
    state = get_streaming_state(base)
    if state is not None:
        weights: Any = [unit.sha256 for unit in state.shard_dir.manifest.units.values()]
    else:
        config = getattr(base, "config", None)
        weights = {
            "name_or_path": str(getattr(base, "name_or_path", "") or getattr(config, "_name_or_path", "")),
            "parameters": sum(p.numel() for p in base.parameters()),
            "quantization": _describe(getattr(config, "quantization_config", None)),
        }
    configs = getattr(model, "peft_config", None)
    identity = {
        "weights": weights,
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "adapter_configs": {
            str(k): _describe(c.to_dict() if callable(getattr(c, "to_dict", None)) else c)
            for k, c in (configs.items() if isinstance(configs, dict) else ())
        },
        "adapters": [
            {
                "module": name,
                "active": _describe(getattr(module, "active_adapters", None)),
                "disabled": bool(getattr(module, "disable_adapters", False)),
                "weights": {n: _describe(p) for n, p in module.named_parameters() if not n.startswith("base_layer.")},
            }
            for name, module in _adapter_modules(model if legacy else base)
        ],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


# --- the batch loop -----------------------------------------------------------------------------------------------


class _TokenMeter:
    """A `generate` streamer that counts the generated tokens of the rows still running, for the tokens/s display."""

    def __init__(self, eos_ids: set[int], on_tokens, recorder: _StopRecorder | None = None):
        self.eos_ids = eos_ids
        self.on_tokens = on_tokens
        self.recorder = recorder  # rows ended by stop strings or stopping criteria
        self._started = False
        self._finished: list[bool] = []
        self._counts: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if not self._started:  # the first call hands over the prompt
            self._started = True
            self._finished = [False] * value.shape[0]
            self._counts = [0] * value.shape[0]
            return
        rows = value[:, None] if value.dim() == 1 else value  # (batch,) per step, (1, n) under assisted decoding
        stopped = self.recorder.stopped_at() if self.recorder is not None else []
        n = 0
        for i, row in enumerate(rows.tolist()):
            for t in row:
                if not self._finished[i] and i < len(stopped) and stopped[i] is not None:
                    self._finished[i] = self._counts[i] >= stopped[i]
                if self._finished[i]:
                    break
                n += 1
                self._counts[i] += 1
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
    config: GenerationConfig,
    mode: str,
    stats: dict,
) -> Iterator[list[tuple[_Prompt, dict]]]:
    """Generate `prompts` in length-sorted batches; yields each finished batch as (prompt, result) pairs."""
    for p in prompts:
        if p.input_ids is None:
            try:
                p.input_ids = _encode(tokenizer, p.prompt, chat)
            except Exception as e:  # (a template's own refusal, say of an assistant turn to continue: which prompt)
                raise ValueError(f"Prompt {p.id!r} could not be rendered and tokenized: {type(e).__name__}: {e}") from e
        if not p.input_ids:
            raise ValueError(f"Prompt {p.id!r} is empty after tokenization; give it some text.")
    # (refused before anything is generated: the loaded model ends in a torch `IndexError` there, and with it the job)
    largest = max(prompts, key=lambda p: max(p.input_ids), default=None)
    size = vocabulary_overrun(model, max(largest.input_ids)) if largest is not None else None
    if size is not None:
        raise ValueError(
            f"Prompt {largest.id!r} holds token id {max(largest.input_ids)}, past the {size} tokens of "
            f"{type(model).__name__}'s vocabulary: the tokenizer is not this model's; nothing was generated."
        )
    new = config.max_new_tokens
    longest = max(prompts, key=lambda p: len(p.input_ids), default=None)
    n = len(longest.input_ids) if longest else 0
    where = _setting_source(model, generate_kwargs, "max_length") if new is None and longest else None
    limit = learned_position_limit(model) if new is None and longest and where is None else None
    if limit is not None and n >= limit:
        # no length set: transformers generates its default number of new tokens, up to the table's end (`max_length`
        # capped at `max_position_embeddings`), and refused a prompt that fills the table ("Input length of input_ids
        # is 256, but `max_length` is set to 256 ... consider increasing `max_length`", a value nobody set, past which
        # the table ends)
        default = GenerationConfig._get_default_generation_params().get("max_length", 20)
        raise ValueError(
            f"Prompt {longest.id!r} ({n} tokens) {'fills' if n == limit else 'runs past'} the {limit} positions of "
            f"{type(model).__name__}'s learned position table (`max_position_embeddings`), and no length is set "
            f"(transformers' default: {default} new tokens, up to the table's end"
            + (", which leaves none): pass `max_new_tokens` 1, or " if n == limit else "): ")
            + "shorten the prompt (or leave it out); nothing was generated."
        )
    if where is not None and config.max_length is not None:
        # `max_length` (where `max_new_tokens` is not set: it decides where both are) counts the prompt and the
        # padding, whose row runs its own positions from 0: the longest prompt's row reaches `max_length` (at least
        # one new token, past a `max_length` the prompt alone reaches); one past the table ended in a bare IndexError
        length = int(config.max_length)
        overrun = position_overrun(model, n, max(length - n, 1))
        if overrun is not None:
            limit, room = overrun
            raise ValueError(
                f"Prompt {longest.id!r} ({n} tokens) and `max_length` {length}{where} run past the {limit} positions "
                f"of {type(model).__name__}'s learned position table (`max_position_embeddings`): "
                + (
                    f"pass `max_length` {limit + 1} or less (or `max_new_tokens` {room} or less, which counts the "
                    "new tokens alone), or "
                    if room >= 1
                    else ""
                )
                + "shorten the prompt (or leave it out); nothing was generated."
            )
    overrun = position_overrun(model, n, new) if new is not None and longest else None
    if overrun is not None:
        limit, room = overrun
        raise ValueError(
            f"Prompt {longest.id!r} ({n} tokens) and `max_new_tokens` {new} run past the {limit} positions of "
            f"{type(model).__name__}'s learned position table (`max_position_embeddings`): "
            + (f"pass `max_new_tokens` {room} or less, or " if room >= 1 else "")
            + "shorten the prompt (or leave it out); nothing was generated."
        )
    pad_id = _pad_token_id(model, tokenizer, generate_kwargs, batched=batch_size > 1 and len(prompts) > 1)
    eos_ids = eos_token_ids(model, tokenizer, generate_kwargs)
    kwargs = dict(generate_kwargs)
    if "pad_token_id" not in kwargs:
        kwargs = _with_settings(kwargs, pad_token_id=pad_id)
    if "custom_generate" not in kwargs:  # (a custom decoding function takes only its own arguments)
        kwargs["tokenizer"] = tokenizer  # for `stop_strings`, and a draft model with another vocabulary
    stops = _StopWatch(config, kwargs)
    # longest first: batches of similar lengths (little padding), and an out-of-memory shows up on the first batch
    order = sorted(prompts, key=lambda p: -len(p.input_ids))
    bar = _Progress(len(order), progress, "Generating")
    use_meter = mode in _METERED_MODES
    device = model.device
    try:
        # (this job's sweeps: another thread's jobs on the model count theirs)
        with SweepCounter(model, thread=threading.get_ident()) as counter:
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                width = max(len(p.input_ids) for p in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, p in enumerate(batch):  # left padding: every prompt ends where generation starts
                    ids[row, width - len(p.input_ids) :] = torch.tensor(p.input_ids, dtype=torch.long)
                    mask[row, width - len(p.input_ids) :] = 1
                call = stops.criteria(width, kwargs, len(batch))
                extra = {"streamer": _TokenMeter(eos_ids, bar.add_tokens, stops.recorder)} if use_meter else {}
                with torch.no_grad():
                    out = model.generate(ids.to(device), attention_mask=mask.to(device), **call, **extra)
                sequences = out.sequences if hasattr(out, "sequences") else out
                if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
                    raise ValueError(  # (a custom decoding function's own output, say)
                        f"`generate` returned {type(sequences).__name__} "
                        f"{tuple(sequences.shape) if isinstance(sequences, torch.Tensor) else ''}, not a tensor of one "
                        "sequence per prompt: batched generation reads that. Remove the setting that makes it return "
                        "another output."
                    )
                if sequences.shape[0] != len(batch):
                    raise ValueError(
                        f"`generate` returned {sequences.shape[0]} sequences for a batch of {len(batch)} prompts; "
                        "batched generation pairs each prompt with one sequence. Remove the setting that asks for "
                        "several sequences per prompt."
                    )
                new = sequences[:, width:].cpu().tolist()
                stopped_at = stops.stopped_at(new)
                counts = count_new_tokens(new, eos_ids, stopped_at)
                results = []
                for p, row, n, stop in zip(batch, new, counts, stopped_at):
                    tokens = row[:n]
                    at_eos = bool(tokens) and tokens[-1] in eos_ids
                    text = completion_text(tokenizer, p.input_ids, tokens[:-1] if at_eos else tokens)
                    results.append(
                        (
                            p,
                            {
                                "id": p.id,
                                "completion": text,
                                "finish_reason": "stop" if at_eos or stop == n else "length",
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


def completion_text(tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """What `new_ids` add to the decoded prompt (special tokens removed): prompt + completion is the whole
    sequence's text. Decoded on their own, a SentencePiece tokenizer's new tokens (Llama-2's, Mistral's) drop the
    first one's leading space: " Paris." came out as "Paris.", glued to the prompt when the two are joined (as the
    text-generation pipeline of transformers 5 joins them: it decodes the new tokens alone). Where the whole sequence,
    decoded, does not begin with the decoded prompt (a cleanup that changes the prompt's end), the new tokens alone."""
    prompt = tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    whole = tokenizer.decode([*prompt_ids, *new_ids], skip_special_tokens=True)
    if whole.startswith(prompt):
        return whole[len(prompt) :]
    return tokenizer.decode(list(new_ids), skip_special_tokens=True)


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
    seed: int | None = None,
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
            Its tokenizer; also passed to `model.generate` (as `tokenizer=`, for `stop_strings` and for a draft
            model with another vocabulary, with `assistant_tokenizer=`).
        prompts (list of `str` or of chat message lists):
            Plain-text prompts, or conversations (`[{"role": "user", "content": ...}, ...]`, rendered with the
            tokenizer's chat template).
        batch_size (`int`, defaults to 8):
            Prompts per `generate` call (per sweep). Speculative decoding (`assistant_model=`,
            `prompt_lookup_num_tokens=`, `assistant_early_exit=`, `use_mtp=`, as arguments or in the generation
            config) runs one prompt per call.
        chat (`bool`, defaults to `False`):
            Render plain-text prompts as a user message with the tokenizer's chat template (one without a template:
            as they are, with a warning).
        progress (`bool`, defaults to `True`):
            Show a progress bar with tokens/s.
        seed (`int`, *optional*):
            Seeds torch's random number generators (`torch.manual_seed`, which takes -2**63 to 2**64 - 1) before
            the first batch, for sampling (`do_sample=True`), as [`generate_jsonl`] does: the same prompts, batch
            size and seed, the same samples.
        **generate_kwargs:
            Passed to `model.generate` (`max_new_tokens`, `do_sample`, `generation_config`, `stop_strings`,
            `assistant_model`, ...). Use `max_new_tokens` rather than `max_length`, which counts the padding of the
            batch; either, past a learned position table (GPT-2's), is refused before anything is generated. The
            generation config must ask for one sequence per prompt (`num_return_sequences=1`).

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
    if isinstance(prompts, Mapping):  # (iterated, its keys were the prompts: a dict of id -> prompt generated its ids)
        raise TypeError(
            "`prompts` is a dict: pass a list of prompts (its prompts in order: `list(prompts.values())`), or write "
            "them with their ids to a JSONL file for `generate_jsonl`."
        )
    if not isinstance(prompts, Iterable):
        raise TypeError(f"`prompts` must be a list of prompts, got {type(prompts).__name__}.")
    chat, progress = check_flag("chat", chat), check_flag("progress", progress)
    _check_model_and_tokenizer(model, tokenizer)
    seed = _check_seed(seed)  # (it went on to `generate`: "model_kwargs are not used by the model: ['seed']")
    batch_size, config, mode = _check_kwargs(model, batch_size, generate_kwargs, tokenizer)
    _warn_untemplated(tokenizer, chat)
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
    if seed is not None:
        torch.manual_seed(seed)
    for results in _run(
        model,
        tokenizer,
        items,
        batch_size=batch_size,
        chat=chat,
        progress=progress,
        generate_kwargs=generate_kwargs,
        config=config,
        mode=mode,
        stats=stats,
    ):
        for p, record in results:
            completions[p.index] = record["completion"]
    _finish_stats(stats, time.perf_counter() - t0)
    logger.info("generate_batch: %s", stats)
    return completions


# --- JSONL jobs ---------------------------------------------------------------------------------------------------


def _check_paths(input_path: Path, output_path: Path) -> None:
    """A job's files, as far as they can be checked without reading them (and without a model)."""
    if not input_path.exists():
        raise FileNotFoundError(
            f"`input_path` {input_path} does not exist; give a JSONL file with one prompt per line."
        )
    if input_path.is_dir():
        raise ValueError(f"`input_path` {input_path} is a directory; give a JSONL file with one prompt per line.")
    if output_path.resolve() == input_path.resolve():
        raise ValueError(f"`output_path` {output_path} is the input file; write results to another file.")
    if output_path.exists() and not output_path.is_file():
        # (a pipe or `/dev/stdout` waited forever for the read-back, `/dev/null` failed to fsync after the first batch)
        raise ValueError(
            f"`output_path` {output_path} is not a regular file: the results are read back (to resume a job) and "
            "rewritten in input order at the end. Write them to a file."
        )


def check_job(input_path: str | os.PathLike, output_path: str | os.PathLike, batch_size: Any = 8) -> None:
    """What `generate_jsonl` refuses of its files and batch size without a model: for the command line to refuse
    them before the model loads (a hub shard directory is downloaded first). An input that is a regular file is read
    (its lines checked); a pipe is left for the job to read, once."""
    input_path, output_path = Path(input_path), Path(output_path)
    _check_batch_size(batch_size)
    _check_paths(input_path, output_path)
    if input_path.is_file() and not str(input_path).startswith("/dev/"):  # (`--input -`: standard input, left alone)
        _read_input(input_path, warn=False)


def _read_input(path: Path, warn: bool = True) -> list[_Prompt]:
    # (read once: a pipe, `/dev/stdin` or `<(...)`, does too; its path checked by `_check_paths` first). `warn`: of
    # keys a line does not take, once (`check_job` reads the file before the job does)
    items: list[_Prompt] = []
    seen: dict[str, str] = {}  # id key -> the line that has it
    unread: dict[str, int] = {}  # a key no line takes -> the first line that has it
    with open(path, "rb") as f:  # (decoded line by line: a line that is not UTF-8 is named)
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:  # (a byte-order mark, as some Windows editors write, is not JSON)
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                if lineno == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):  # (Windows PowerShell's `>` writes it)
                    raise ValueError(
                        f"{where}: the file is UTF-16 text (it begins with a UTF-16 byte-order mark); convert it to "
                        "UTF-8 (e.g. `iconv -f UTF-16 -t UTF-8`)."
                    ) from None
                raise ValueError(
                    f"{where} is not UTF-8 text ({e.reason} at byte {e.start}); convert the file to "
                    "UTF-8 (e.g. `iconv -f LATIN1 -t UTF-8`)."
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where} is not valid JSON ({e}); each line must be one JSON value.") from None
            try:
                json.dumps(obj, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    f'{where} holds an unpaired surrogate escape (such as "\\ud800"), which is not text: it can be '
                    "neither tokenized nor written to the output. Fix the line."
                ) from None
            index = len(items)
            pid: Any = index
            if isinstance(obj, str):
                prompt: str | list = obj
            elif isinstance(obj, dict):
                pid = obj.get("id", index)
                if "messages" in obj and "prompt" in obj:  # (the prompt was ignored, silently)
                    raise ValueError(
                        f"{where} has both 'prompt' and 'messages': {line.strip()[:80]!r}. Give one of them (the "
                        "messages for a chat, the prompt for a completion)."
                    )
                for k in (k for k in obj if k not in _INPUT_KEYS):
                    unread.setdefault(k, lineno)
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
            # (a line without an id has its position among the prompts, from 0: named so, as no id is written there)
            given = "" if isinstance(obj, dict) and "id" in obj else " (its position: it has no 'id')"
            if item.key in seen:
                raise ValueError(
                    f"{where}: id {pid!r}{given} is already the id of {seen[item.key]}; ids must be unique "
                    "(results are matched to prompts by id when a job resumes)."
                )
            seen[item.key] = f"line {lineno}{given}"
            items.append(item)
    if unread and warn:  # (a line's own data, such as a reference answer, or a misspelt key: read by no one)
        keys = sorted(unread, key=unread.get)
        logger.warning(
            "%s: %s not read (first on line %d): a line's 'id' and 'prompt' or 'messages' are; generation settings "
            "such as `max_new_tokens` are the job's, for every prompt. Check a misspelt key.",
            path,
            f"key {keys[0]!r} is" if len(keys) == 1 else "keys " + ", ".join(map(repr, keys)) + " are",
            unread[keys[0]],
        )
    return items


def _load_done(
    path: Path,
    by_key: dict[str, _Prompt],
    settings: Collection[str],
    *,
    untokenized: Collection[str] = (),
    unseeded: str | None = None,
    seed=None,
    untemplated: Collection[str] = (),
    model: Collection[str] | None = None,
) -> tuple[dict[str, dict], bool]:
    """Results already in `path`, by id key; drops a torn last line (a crash mid-write). Returns (done, repaired).
    `model`: this run's `_model_digest`s (as made now and by older versions); a result made by another model is
    refused, one that records none (written before it was recorded) taken, with a warning.
    `untokenized`: the fingerprints of this run's settings without the tokenizer, which results written before it
    was part of them carry (as do those `unseeded` and `untemplated` name): taken, with a warning.
    `unseeded`: for a sampled job given `seed`, the fingerprint of its settings without it, which results written
    before seeds were part of it carry: taken, with a warning. `untemplated`: for a job of conversations, the
    fingerprints of its settings without the chat template (with and without the seed), which results written before
    the template was part of them carry: taken, with a warning."""
    if not path.exists():
        return {}, False
    with open(path, "rb") as f:
        data = f.read()
    done: dict[str, dict] = {}
    good_end = 0
    pos = 0
    repaired = False
    unchecked = 0
    seedless = 0
    templateless = 0
    modelless = 0
    tokenless = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        raw = data[pos:end]
        record = None
        if raw.strip():
            try:
                record = json.loads(raw)
            except ValueError:
                # a write torn by a crash: only ever the last line, unfinished, and the start of a result line
                if nl < 0 and (raw.startswith(_RECORD_START) or _RECORD_START.startswith(raw)):
                    logger.warning("Dropping a torn last line of %s (left by an interrupted run): %r", path, raw[:80])
                    repaired = True
                    break
            if not isinstance(record, dict) or any(k not in record for k in _RESULT_KEYS):
                lineno = data.count(b"\n", 0, pos) + 1
                raise ValueError(
                    f"`output_path` {path}:{lineno} is not a result line ({raw[:80]!r}). It is not an output of "
                    f"`generate_jsonl` (a result line has {', '.join(_RESULT_KEYS)}); choose another `output_path` "
                    "or remove the file."
                )
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
        if record["prompt_sha256"] != prompt.digest:
            raise ValueError(
                f"`output_path` {path} has a result for id {record['id']!r} whose prompt differs from the input's. "
                "It was made from another input file; choose another `output_path` or remove the file."
            )
        if "settings_sha256" not in record:
            unchecked += 1
        elif unseeded is not None and record["settings_sha256"] == unseeded:
            seedless += 1
        elif record["settings_sha256"] in untemplated:
            templateless += 1
        elif record["settings_sha256"] not in settings and record["settings_sha256"] not in untokenized:
            raise ValueError(
                f"`output_path` {path} has a result for id {record['id']!r} made with other settings than this "
                "run's: `chat` (the chat template), the tokenizer, `max_new_tokens`, another generation setting or "
                "the `seed` of a sampled job differs, and the results would mix. Rerun with the settings (and "
                "tokenizer) of the run that wrote it, or choose another `output_path`."
            )
        if "settings_sha256" in record and record["settings_sha256"] not in settings:
            tokenless += 1  # (every fingerprint taken but this run's was made before the tokenizer was in it)
        if "model_sha256" not in record:
            modelless += 1
        elif model is not None and record["model_sha256"] not in model:
            raise ValueError(
                f"`output_path` {path} has a result for id {record['id']!r} made by another model than this run's: "
                "another checkpoint or shard directory, another dtype or another adapter (PEFT), and the results would "
                "mix. Rerun with the model that wrote it, or choose another `output_path`."
            )
        if key in done:
            logger.warning("Ignoring a second result for id %r in %s.", record["id"], path)
            continue
        done[key] = record
    if unchecked:
        logger.warning(
            "%d results in %s have no `settings_sha256` (an older hf_layerstream wrote them): whether they were made "
            "with this run's settings is not checked.",
            unchecked,
            path,
        )
    if modelless:
        logger.warning(
            "%d results in %s record no model (an older hf_layerstream wrote them): whether this run's model made "
            "them is not checked.",
            modelless,
            path,
        )
    if templateless:
        logger.warning(
            "%d results in %s record no chat template (an older hf_layerstream wrote them): whether their "
            "conversations were rendered with this run's template is not checked.",
            templateless,
            path,
        )
    if tokenless:
        logger.warning(
            "%d results in %s record no tokenizer (an older hf_layerstream wrote them): whether their prompts were "
            "tokenized with this run's tokenizer is not checked.",
            tokenless,
            path,
        )
    if seedless:
        logger.warning(
            "%d results in %s record no seed (written without `seed`, or by an older hf_layerstream): whether they "
            "were sampled with seed %d is not checked.",
            seedless,
            path,
            seed,
        )
    if repaired:
        with open(path, "r+b") as f:
            f.truncate(good_end)
            if good_end and not data[:good_end].endswith(b"\n"):
                f.seek(good_end)
                f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
    return done, repaired


# characters `str.splitlines()` (and so `Path.read_text().splitlines()`) ends a line at, which JSON leaves as they are
# in a string: escaped, so that a result is one line however the file is split (a completion holding one was two)
_LINE_BREAKS = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"})


def _dumps(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False).translate(_LINE_BREAKS) + "\n").encode("utf-8")


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


@contextlib.contextmanager
def _open_output(path: Path) -> Iterator[tuple[Any, bool]]:
    """`path` opened to append results and locked (`_lock`), created with the folders above it where missing; yields
    (the file, whether this call created it). A job that ends in an error before it writes a result (a prompt refused
    by the checks before generation, an interrupt) leaves no empty file behind: the file this call created is
    removed, with the folders it created for it; a file that was there before is left as it is, empty or not."""
    new_folders = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # (deepest first)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    try:  # (exclusive: a file another job created meanwhile, or a link, is not taken for one this call created)
        fd, created = os.open(path, flags | os.O_EXCL, 0o666), True
    except FileExistsError:
        fd, created = os.open(path, flags, 0o666), False
    with open(fd, "ab") as out:
        _lock(out, path)
        held = os.fstat(out.fileno())
        try:
            named = os.stat(path)
        except FileNotFoundError:
            named = None
        if named is None or (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
            # another job, which held the lock while this call opened the file, renamed its finished results over it
            # or removed the empty file it had created: results appended to the file opened would be lost
            raise ValueError(
                f"`output_path` {path} was replaced or removed by another job while this one opened it. Run again "
                "(it resumes from the results there)."
            )
        try:
            yield out, created
        except BaseException:
            if created and os.fstat(out.fileno()).st_size == 0:
                os.unlink(path)  # (still under the lock)
                for folder in new_folders:
                    try:
                        folder.rmdir()
                    except OSError:  # (something else was put there meanwhile)
                        break
            raise


def _rewrite_in_order(path: Path, items: list[_Prompt], done: dict[str, dict]) -> None:
    """Write every result in input order to a temporary file and rename it over `path` (atomic). Where `path` is a
    symlink, over the file it points to, where the results were appended (renaming over the link replaced it with a
    file, and left the target out of order); that file keeps its permissions."""
    body = b"".join(_dumps(done[p.key]) for p in items)
    target = path.resolve()
    if target.exists() and target.read_bytes() == body:
        return
    mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else None
    atomic_write_bytes(target, body)
    if mode is not None:
        os.chmod(target, mode)


def generate_jsonl(
    model: nn.Module,
    tokenizer,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    batch_size: int = 8,
    chat: bool = False,
    progress: bool = True,
    seed: int | None = None,
    **generate_kwargs,
) -> dict:
    """Generate a completion for every prompt of a JSONL file; resumable, results appended as they complete.

    See the module docstring for the input and output schemas. Prompts that already have a result in `output_path`
    are skipped, so rerunning the same command after a crash finishes the job; a rerun with other settings (`chat`,
    another tokenizer, generation settings, a sampled job's `seed`) or another model (another checkpoint or shard
    directory, dtype or PEFT adapter) is refused. Each batch's results are `fsync`ed once the batch completes. Once
    all prompts have a result, `output_path` holds exactly one line per prompt, in input order.

    Args:
        model (`transformers.PreTrainedModel`):
            A causal LM, streamed or not.
        tokenizer (`transformers.PreTrainedTokenizerBase`):
            Its tokenizer; also passed to `model.generate` (see [`generate_batch`]).
        input_path (`str` or `os.PathLike`):
            JSONL prompts (read once: a pipe does too).
        output_path (`str` or `os.PathLike`):
            JSONL results, a regular file; created, or resumed when it exists. A job that ends in an error before it
            writes a result removes the file (and folders) it created, not a file that was there.
        batch_size (`int`, defaults to 8):
            Prompts per sweep.
        chat (`bool`, defaults to `False`):
            Render `"prompt"` lines with the tokenizer's chat template (`"messages"` lines always are; one without a
            template: as they are, with a warning).
        progress (`bool`, defaults to `True`):
            Show a progress bar with tokens/s.
        seed (`int`, *optional*):
            Seeds torch's random number generators (`torch.manual_seed`, which takes -2**63 to 2**64 - 1) before
            the first batch, for sampling (`do_sample=True`). A sampled job's seed is one of its settings: a rerun
            with another one (or none) is refused. A resumed job seeds them again, so its remaining prompts get other
            samples than an uninterrupted run's (each batch draws from the generator in turn).
        **generate_kwargs:
            Passed to `model.generate` (see [`generate_batch`]).

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
    chat, progress = check_flag("chat", chat), check_flag("progress", progress)
    _check_model_and_tokenizer(model, tokenizer)
    check_path("input_path", input_path)
    check_path("output_path", output_path)
    input_path = Path(input_path)
    output_path = Path(output_path)
    _check_paths(input_path, output_path)
    seed = _check_seed(seed)
    batch_size, config, mode = _check_kwargs(model, batch_size, generate_kwargs, tokenizer)
    _warn_untemplated(tokenizer, chat)
    sampled_seed = seed if config.do_sample else None  # (greedy results do not depend on it)
    items = _read_input(input_path)
    prefill = any(_continues_final_message(p.prompt) for p in items)
    messages = any(isinstance(p.prompt, list) for p in items)  # (rendered with the chat template, whatever `chat`)
    settings = _settings_digest(
        tokenizer, chat, config, generate_kwargs, seed=sampled_seed, prefill=prefill, messages=messages, vocabulary=True
    )
    # (results written before the tokenizer was part of the settings carry the same without it, with a warning)
    untokenized = _settings_digest(
        tokenizer, chat, config, generate_kwargs, seed=sampled_seed, prefill=prefill, messages=messages
    )
    by_key = {p.key: p for p in items}
    model_digest = _model_digest(model)
    t0 = time.perf_counter()
    with _open_output(output_path) as (out, created):
        if created:
            fsync_dir(output_path.parent)
        # (results an older hf_layerstream wrote carry its fingerprint of the same settings)
        legacy = _settings_digest(tokenizer, chat, config, generate_kwargs, legacy=True, prefill=prefill)
        # (and results of a greedy job written while its sampling-only settings were part of its fingerprint)
        sampling = _settings_digest(
            tokenizer,
            chat,
            config,
            generate_kwargs,
            seed=sampled_seed,
            prefill=prefill,
            messages=messages,
            greedy_sampling=True,
        )
        # (and results written before a sampled job's seed was part of the settings, with a warning)
        unseeded = (
            None
            if sampled_seed is None
            else _settings_digest(tokenizer, chat, config, generate_kwargs, prefill=prefill, messages=messages)
        )
        # (and results written before a conversation's chat template was, with a warning)
        untemplated = (
            {
                _settings_digest(tokenizer, chat, config, generate_kwargs, seed=sampled_seed, prefill=prefill),
                _settings_digest(tokenizer, chat, config, generate_kwargs, prefill=prefill),
                # (a greedy job's, its sampling-only settings in it then)
                _settings_digest(tokenizer, chat, config, generate_kwargs, prefill=prefill, greedy_sampling=True),
            }
            - {settings}
            if messages
            else set()
        )
        done, repaired = _load_done(
            output_path,
            by_key,
            {settings},
            untokenized={untokenized, legacy, sampling},
            unseeded=unseeded,
            seed=sampled_seed,
            untemplated=untemplated,
            model={model_digest, _model_digest(model, legacy=True)},  # (the latter: results an older version wrote)
        )
        todo = [p for p in items if p.key not in done]
        stats = {"input": str(input_path), "output": str(output_path), "prompts": len(items), "skipped": len(done)}
        stats.update(_new_stats(batch_size))
        if done:
            logger.info("Resuming %s: %d of %d prompts already done.", output_path, len(done), len(items))
        if seed is not None:
            torch.manual_seed(seed)
        for results in _run(
            model,
            tokenizer,
            todo,
            batch_size=batch_size,
            chat=chat,
            progress=progress,
            generate_kwargs=generate_kwargs,
            config=config,
            mode=mode,
            stats=stats,
        ):
            for p, record in results:
                record["settings_sha256"] = settings
                record["model_sha256"] = model_digest
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
