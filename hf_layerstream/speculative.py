"""More tokens per sweep: count the streamed model's weight sweeps, and measure speculative decoding.

Every forward pass of a streamed model reads every streamed decoder layer once (a *sweep*): decode is bound by
the sweeps, not by the tokens. Two ways get more than one token out of a sweep, both through transformers' own
`generate`:

- many prompts per sweep (see [`generate_batch`] in `hf_layerstream.batch`);
- speculative decoding with the streamed model as the verifier: a small draft model kept resident proposes several
  tokens and one sweep of the streamed model checks them all (`model.generate(..., assistant_model=draft)`), or
  the candidates come from n-grams of the prompt (`prompt_lookup_num_tokens=N`). With greedy decoding the output
  is the same as plain greedy decoding; only the number of sweeps changes.

[`count_sweeps`] counts the sweeps of any model during a block; [`measure_sweeps`] runs one `generate` call and
reports tokens, sweeps and tokens per sweep (what `hf-layerstream bench` and `generate_jsonl` report).

```python
>>> from hf_layerstream.speculative import measure_sweeps
>>> draft = AutoModelForCausalLM.from_pretrained("small-draft-model")          # resident, same tokenizer
>>> measure_sweeps(model, tok("Hello", return_tensors="pt").input_ids, assistant_model=draft, max_new_tokens=64)
{'tokens': 64, 'sweeps': 21, 'tokens_per_sweep': 3.05, ...}
```

The draft's own `generation_config` sets how many tokens it proposes (`num_assistant_tokens`,
`num_assistant_tokens_schedule`, `assistant_confidence_threshold`). transformers' defaults cut a draft short as soon
as the draft is unsure of a token, which suits a verifier that is cheap to run; when every verification is a sweep
over the disk, a full block of draft tokens usually pays: see [`configure_draft`].
"""

from __future__ import annotations

import copy
import logging
import numbers
import threading
import time
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import (
    EosTokenCriteria,
    GenerationConfig,
    MaxLengthCriteria,
    MaxTimeCriteria,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)
from transformers.generation import GenerationMode

from .quant import _is_int  # (an int, NumPy's too, not a bool)

logger = logging.getLogger(__name__)

__all__ = ["SweepCounter", "count_sweeps", "measure_sweeps", "configure_draft", "count_new_tokens"]


def _sweep_module(model: nn.Module) -> nn.Module:
    """The module whose forward marks one sweep: the last decoder layer (the model itself when there is none), which
    every full pass reaches and an early-exit draft (`assistant_early_exit`: the model's own first layers) does not."""
    from .modeling import find_layer_stack
    from .stream import get_streaming_state

    state = get_streaming_state(model)
    stack = state.stack if state is not None else find_layer_stack(model)
    if stack is None or len(stack.layers) == 0:
        return model
    return stack.layers[-1]


class SweepCounter:
    """Counts the forward sweeps of a model over its decoder layers while active.

    A forward pre-hook on the last decoder layer counts one sweep per forward pass of the model over all its layers: a
    prefill, a decoding step, or the verification of a block of draft tokens. The draft model of assisted generation
    is a different module and is not counted, nor are the passes of an early-exit draft, which stop before the last
    layer. Use it as a context manager (see [`count_sweeps`]) or call
    [`~SweepCounter.start`] / [`~SweepCounter.stop`].

    Args:
        model (`torch.nn.Module`):
            The model to watch, streamed or not.
        thread (`int`, *optional*):
            Count only the passes run by this thread (its `threading.get_ident()`), where other threads run the model
            too: a job's own sweeps (default: every thread's).

    Attributes:
        sweeps (`int`): Forward sweeps seen since the counter started (or was [`~SweepCounter.reset`]).
    """

    def __init__(self, model: nn.Module, *, thread: int | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module (a transformers model), got {type(model).__name__}.")
        if thread is not None and (not isinstance(thread, int) or isinstance(thread, bool)):
            raise TypeError(
                f"`thread` must be a thread's `threading.get_ident()` (an int), got {type(thread).__name__}"
                + (": pass its `.ident`." if isinstance(thread, threading.Thread) else ".")
            )
        self.model = model
        self.thread = thread
        self.sweeps = 0
        self._handle = None
        self._depth = 0
        self._started_before = False

    def _hook(self, module, args):
        if self.thread is None or threading.get_ident() == self.thread:
            self.sweeps += 1

    @property
    def active(self) -> bool:
        return self._handle is not None

    def start(self) -> SweepCounter:
        """Start counting (idempotent); returns the counter."""
        if self._handle is None:
            self._handle = _sweep_module(self.model).register_forward_pre_hook(self._hook)
        return self

    def stop(self) -> SweepCounter:
        """Stop counting and remove the hook; `sweeps` keeps its value."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return self

    def reset(self) -> None:
        self.sweeps = 0

    def __enter__(self) -> SweepCounter:
        # (nested `with` blocks of one counter: counting stops as the outermost ends, unless it counted before it,
        # started with `start()`, and then goes on as it was)
        if not self._depth:
            self._started_before = self.active
        self._depth += 1
        return self.start()

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if not self._depth and not self._started_before:
            self.stop()

    def __repr__(self) -> str:
        thread = "" if self.thread is None else f", thread={self.thread}"
        return f"SweepCounter(model={type(self.model).__name__}, sweeps={self.sweeps}, active={self.active}{thread})"


def count_sweeps(model: nn.Module) -> SweepCounter:
    """Count the forward sweeps of `model` over its decoder layers inside a `with` block.

    Args:
        model (`torch.nn.Module`):
            A transformers model, streamed or fully loaded.

    Returns:
        [`SweepCounter`]: a context manager; read `.sweeps` during or after the block.

    Example:
    ```python
    >>> with count_sweeps(model) as counter:
    ...     out = model.generate(**inputs, max_new_tokens=32, prompt_lookup_num_tokens=10)
    >>> (out.shape[1] - inputs["input_ids"].shape[1]) / counter.sweeps   # tokens per sweep
    ```
    """
    return SweepCounter(model)


def eos_token_ids(model: nn.Module | None = None, tokenizer=None, generate_kwargs: dict | None = None) -> set[int]:
    """The end-of-sequence ids `generate` stops on: from `generate_kwargs`, the model's generation config, else the tokenizer."""
    generate_kwargs = generate_kwargs or {}
    value = generate_kwargs.get("eos_token_id")
    config = generate_kwargs.get("generation_config")
    if value is None and config is not None:
        value = getattr(config, "eos_token_id", None)
    if value is None and model is not None and getattr(model, "generation_config", None) is not None:
        value = model.generation_config.eos_token_id
    if value is None and tokenizer is not None:
        value = tokenizer.eos_token_id
    if value is None:
        return set()
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def count_new_tokens(
    new_tokens: torch.Tensor | Sequence[Sequence[int]],
    eos_ids: Iterable[int],
    stopped_at: Sequence[int | None] | None = None,
) -> list[int]:
    """Generated tokens per row, up to and including the first end-of-sequence token (the padding after it excluded).

    Args:
        new_tokens (`torch.Tensor` or list of lists):
            The generated part of `generate`'s output, one row per prompt.
        eos_ids (iterable of `int`):
            End-of-sequence token ids.
        stopped_at (list of `int` or `None`, *optional*):
            For each row, the number of generated tokens at which another stopping criterion (stop strings, a
            `StoppingCriteria`) ended it, or `None`; `generate` pads such a row after that point.

    Returns:
        `list[int]`: the count for each row.
    """
    eos = set(eos_ids)
    rows = new_tokens.tolist() if isinstance(new_tokens, torch.Tensor) else new_tokens
    counts = []
    for i, row in enumerate(rows):
        n = len(row)
        for j, t in enumerate(row):
            if t in eos:
                n = j + 1
                break
        if stopped_at is not None and stopped_at[i] is not None:
            n = min(n, stopped_at[i])
        counts.append(n)
    return counts


# --- what a generate call will do, and which rows its stopping criteria ended -----------------------------------


def _require_model(model) -> None:
    """`model`, of `measure_sweeps`, `generate_batch` and `generate_jsonl`, checked first: something else (None, the
    shard directory's path, the tokenizer) failed deep inside, "'NoneType' object has no attribute 'config'"."""
    if not isinstance(model, nn.Module) or not callable(getattr(model, "generate", None)):
        raise TypeError(
            "`model` must be a transformers model with `generate` (a causal LM, streaming or loaded), got "
            f"{type(model).__name__}."
        )


def _given_generation_config(generate_kwargs: dict) -> GenerationConfig | None:
    """The `generation_config` of `generate_kwargs`, checked: another object than a `GenerationConfig` (its settings as
    a dict) failed in attribute lookups, "'dict' object has no attribute 'num_return_sequences'", naming no
    argument."""
    given = generate_kwargs.get("generation_config")
    if given is not None and not isinstance(given, GenerationConfig):
        hint = ": make one of it, `GenerationConfig(**generation_config)`" if isinstance(given, Mapping) else ""
        raise TypeError(
            f"`generation_config` must be a transformers `GenerationConfig`, got {type(given).__name__}{hint}, or "
            "pass its settings as keyword arguments (`max_new_tokens=...`)."
        )
    return given


def _generation_config(model: nn.Module, generate_kwargs: dict) -> GenerationConfig:
    """The settings a `model.generate(**generate_kwargs)` call runs with, as `generate` works them out.

    A copy of `generation_config` (the model's own when none is given; the model's values fill what a given one
    leaves unset), updated with the keyword arguments that are generation settings.
    """
    given = _given_generation_config(generate_kwargs)
    own = getattr(model, "generation_config", None)
    config = copy.deepcopy(given if given is not None else own if own is not None else GenerationConfig())
    if given is not None and own is not None:
        for key, value in own.to_dict().items():
            if hasattr(config, key) and getattr(config, key) is None:
                setattr(config, key, value)
    for key, value in generate_kwargs.items():
        if key != "generation_config" and hasattr(config, key):
            setattr(config, key, value)
    return config


def _setting_source(model: nn.Module, generate_kwargs: dict, name: str) -> str | None:
    """Where the generation setting `name` of a `model.generate(**generate_kwargs)` call comes from, as words to put
    after its value in a message: "" (the call's own argument), " (from the `generation_config` given)", " (from the
    shard directory's generation_config.json)" (a streaming model's, as enabling streaming loads it), " (from
    `model.generation_config`)"; `None` where none of them sets it: transformers' default (a refusal saying "from the
    generation config" of a value nobody set misled)."""
    if name in generate_kwargs:
        return ""
    given = generate_kwargs.get("generation_config")
    if given is not None and name in given.to_diff_dict():
        return " (from the `generation_config` given)"
    own = getattr(model, "generation_config", None)
    if own is None or name not in own.to_diff_dict():
        return None
    from .stream import get_streaming_state

    state = get_streaming_state(model)
    if state is not None and state.generation_config is own:
        return " (from the shard directory's generation_config.json)"
    return " (from `model.generation_config`)"


def _refuse_lookup_settings(model: nn.Module, config: GenerationConfig, generate_kwargs: dict) -> None:
    """Prompt lookup's settings in `config` (what `model.generate(**generate_kwargs)` runs with) that are not positive
    ints, refused naming each and where it came from (`_setting_source`): 0 or -1 ended in transformers' "Invalid
    max_matching_ngram_size or num_output_tokens", naming neither, or ran without a word."""
    for name, example in (("prompt_lookup_num_tokens", 10), ("max_matching_ngram_size", 2)):
        value = getattr(config, name, None)
        if value is None:
            continue
        where = _setting_source(model, generate_kwargs, name) or ""
        problem = f"`{name}` must be a positive int (e.g. {example}) or None, got"
        if not _is_int(value):
            raise TypeError(f"{problem} {type(value).__name__} {value!r}{where}.")
        if value < 1:
            raise ValueError(f"{problem} {value!r}{where}.")


def _with_settings(generate_kwargs: dict, **settings) -> dict:
    """`generate_kwargs` plus `settings`, inside a copy of `generation_config` when one is given (transformers warns
    when a config comes with generation arguments), else as keyword arguments."""
    kwargs = dict(generate_kwargs)
    given = kwargs.get("generation_config")
    if given is None or not settings:
        kwargs.update(settings)
        return kwargs
    config = copy.deepcopy(given)
    for key, value in settings.items():
        setattr(config, key, value)
    kwargs["generation_config"] = config
    return kwargs


def _vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config.get_text_config(), "vocab_size", None) if config is not None else None


def _refuse_what_drafting_fails_on(
    model: nn.Module,
    config: GenerationConfig,
    generate_kwargs: dict,
    tokenizer=None,
    *,
    names: tuple[str, str] = ("`do_sample=True`", "`assistant_model`"),
) -> None:
    """Settings with which transformers' assisted decoding by a draft model fails inside `generate`, refused up front.

    `config` is what `model.generate(**generate_kwargs)` runs with (`_generation_config`); `tokenizer` the model's,
    where `generate_kwargs` has none; `names` how the caller names sampling and the draft (the command line's
    options)."""
    draft = generate_kwargs.get("assistant_model")
    if draft is not None and not isinstance(draft, nn.Module):
        # (the draft's hub id, say: transformers' `generate` failed with "'str' object has no attribute 'config'")
        raise TypeError(
            f"{names[1]} must be a model (a draft loaded with `AutoModelForCausalLM.from_pretrained(...)`), got "
            f"{type(draft).__name__}."
        )
    if config.get_generation_mode(draft) != GenerationMode.ASSISTED_GENERATION:
        return
    # (the call's own, as an argument or in a `generation_config` given, where `measure_sweeps` puts its argument)
    lookup = generate_kwargs.get("prompt_lookup_num_tokens")
    lookup = (
        lookup
        if lookup is not None
        else getattr(generate_kwargs.get("generation_config"), "prompt_lookup_num_tokens", None)
    )
    if draft is not None and lookup is not None:
        # (refused by `measure_sweeps` alone: `generate_batch` took both, and transformers, which drafts with prompt
        # lookup before a draft model, left the draft unused without a word)
        raise ValueError(
            f"Pass either {names[1]} or `prompt_lookup_num_tokens`, not both: transformers uses one candidate "
            "generator per call, prompt lookup before a draft model, which would be left unused. Drop one of them."
        )
    if config.stop_strings and (draft is not None or config.assistant_early_exit is not None):
        # (the draft's own `generate` gets the call's settings, stop strings included, and no tokenizer)
        which = names[1] if draft is not None else "`assistant_early_exit`"
        raise ValueError(
            f"`stop_strings` ({config.stop_strings!r}) cannot be used with a draft model ({which}): transformers "
            "hands them to the draft's own `generate` without the tokenizer, which fails there ('we could not "
            "locate a tokenizer', though `tokenizer` is given). Drop the draft (plain decoding, or "
            "`prompt_lookup_num_tokens`), or drop `stop_strings` and cut the text at the stop string."
        )
    draft_config = getattr(draft, "generation_config", None)
    threshold = getattr(draft_config, "assistant_confidence_threshold", None)
    draft_tokenizer = generate_kwargs.get("assistant_tokenizer")
    universal = draft_tokenizer is not None and _vocab_size(draft) != _vocab_size(model)
    tokenizer = generate_kwargs.get("tokenizer", tokenizer)
    if universal and config.do_sample and tokenizer is not None:
        # (transformers 5.25 prunes the draft's head to the tokens the model lacks, and with none to prune, sets no
        # map it then reads: "'AssistantToTargetTranslator' object has no attribute 'assistant_overlap_token_ids'")
        if set(draft_tokenizer.get_vocab()) <= set(tokenizer.get_vocab()):
            sample, which = names
            raise ValueError(
                f"{sample} with a draft ({which}) whose vocabulary size differs from the model's while its tokenizer's "
                "tokens are all the model's (a padded embedding) fails inside transformers' universal assisted "
                "decoding (\"'AssistantToTargetTranslator' object has no attribute 'assistant_overlap_token_ids'\"). "
                "Decode greedily with this draft, or sample without it."
            )
    if universal and not config.do_sample and threshold == 0:
        default = GenerationConfig._get_default_generation_params()["assistant_confidence_threshold"]
        raise ValueError(
            "The draft's `assistant_confidence_threshold` is 0 (`configure_draft`'s `confidence_threshold`, 0 by "
            "default) and it has a tokenizer of its own (`assistant_tokenizer`): transformers' universal assisted "
            "decoding fails inside once a draft of several tokens is accepted ('cannot reshape tensor of 0 "
            "elements'), where drafting never stops early. Configure the draft with "
            f"`configure_draft(draft, confidence_threshold={default})` (transformers' default: fewer tokens per draft; "
            "a draft sure of several tokens can still meet that failure), or use a draft that shares the model's "
            "tokenizer."
        )


# transformers' stopping criteria that depend on the tokens alone, which can be asked again of a shorter sequence
_STATELESS_CRITERIA = (EosTokenCriteria, StopStringCriteria)


def _ended_by(criteria: Sequence[StoppingCriteria], input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
    """Per row of `input_ids`, whether any of `criteria` ends it (their verdicts OR-ed, as `generate` does)."""
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for criterion in criteria:
        done = done | criterion(input_ids, scores, **kwargs)
    return done


class _StopRecorder(StoppingCriteria):
    """Runs stopping criteria for `generate` (their verdicts OR-ed, as `generate` does) and records, per row, the
    length at which one of them first ended it.

    Speculative decoding adds a block of accepted tokens per step and asks the criteria once, of the whole sequence: a
    stop string ending inside the block went unseen (`StopStringCriteria` looks at the sequence's end), the output
    running on past where plain decoding stops. The stateless criteria (`_STATELESS_CRITERIA`) are asked of each
    shorter length the block adds too: the row ends at the first one they end, where the output is then cut
    (`count_new_tokens`). Other criteria are asked once per step, as `generate` asks them."""

    def __init__(self, criteria: Sequence[StoppingCriteria], prompt_length: int):
        self.criteria = list(criteria)
        self.stateless = [c for c in self.criteria if type(c) in _STATELESS_CRITERIA]
        self.prompt_length = prompt_length
        self.lengths: torch.Tensor | None = None  # per row: sequence length when stopped, -1 while running
        self.seen = prompt_length  # the sequence length the criteria were last asked of

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        length = input_ids.shape[1]
        if self.lengths is None:
            self.lengths = torch.full((input_ids.shape[0],), -1, dtype=torch.long, device=input_ids.device)
        # (on the device: no synchronization per step)
        for shorter in range(self.seen + 1, length) if self.stateless else ():
            ended = _ended_by(self.stateless, input_ids[:, :shorter], scores)
            self.lengths = torch.where(ended & (self.lengths < 0), shorter, self.lengths)
        self.seen = length
        done = (self.lengths >= 0) | _ended_by(self.criteria, input_ids, scores, **kwargs)
        self.lengths = torch.where(done & (self.lengths < 0), length, self.lengths)
        return done

    def stopped_at(self) -> list[int | None]:
        """For each row, the generated tokens when a criterion ended it, or `None`."""
        if self.lengths is None:
            return []
        return [n - self.prompt_length if n >= 0 else None for n in self.lengths.tolist()]


class _BeamStopRecorder(StoppingCriteria):
    """Under beam search: runs stopping criteria as `_StopRecorder` does, on the beams `generate` weighs (all the
    prompts' candidates, prompt by prompt), and records the generated tokens of each beam one of them ended. A row of
    the output is ended by them at the first length where its tokens are those of a beam so ended, for its prompt."""

    def __init__(self, criteria: Sequence[StoppingCriteria], prompt_length: int, batch_size: int):
        self.criteria = list(criteria)
        self.prompt_length = prompt_length
        self.batch_size = batch_size
        self.ended: set[tuple[int, tuple[int, ...]]] = set()  # (prompt, generated tokens)
        self.lengths: set[int] = set()

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = _ended_by(self.criteria, input_ids, scores, **kwargs)
        if bool(done.any()):
            rows = input_ids.shape[0]
            for r in done.nonzero().flatten().tolist():
                new = tuple(input_ids[r, self.prompt_length :].tolist())
                self.ended.add((r * self.batch_size // rows, new))
                self.lengths.add(len(new))
        return done

    def stopped_at(self, new_tokens: Sequence[Sequence[int]]) -> list[int | None]:
        """For each row of the output (`num_return_sequences` rows per prompt), the generated tokens when a criterion
        ended it, or `None`."""
        stops: list[int | None] = []
        for i, row in enumerate(new_tokens):
            prompt = i * self.batch_size // len(new_tokens)
            lengths = (n for n in sorted(self.lengths) if n <= len(row))
            stops.append(next((n for n in lengths if (prompt, tuple(row[:n])) in self.ended), None))
        return stops


class _StopWatch:
    """Finds which rows of a `generate` call were ended by stop strings or custom stopping criteria, and when.

    `generate` pads such rows after their end without saying which they are (it does say for an end-of-sequence
    token: the token is there). For each call, `criteria` gives the `stopping_criteria` to pass
    instead of the caller's: the same criteria, the caller's custom ones called (once per step, as before) through a
    recorder. Transformers' own criterion types (`EosTokenCriteria`, `StopStringCriteria`, `MaxLengthCriteria`,
    `MaxTimeCriteria`) stay in place (one given replaces `generate`'s own of its type); the first two are stateless
    and are also evaluated by the recorder. Beam search ranks beams, not prompts: there the recorder notes the beams
    the criteria end (`_BeamStopRecorder`); `generate` fills the rest of such a row with padding, or with an
    end-of-sequence id where the padding id is 0 (transformers takes it for none), which no model generated there.

    Args:
        config (`GenerationConfig`):
            The call's settings (`_generation_config`).
        generate_kwargs (`dict`):
            The call's keyword arguments (`stopping_criteria`, `tokenizer`).
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            For `stop_strings`, when `generate_kwargs` has none.
    """

    def __init__(self, config: GenerationConfig, generate_kwargs: dict, tokenizer=None):
        given = list(generate_kwargs.get("stopping_criteria") or [])
        self.kept: list[StoppingCriteria] = []
        self.watched: list[StoppingCriteria] = []
        for criterion in given:
            if type(criterion) in (MaxLengthCriteria, MaxTimeCriteria):  # they end every row: "length"
                self.kept.append(criterion)
            elif type(criterion) in (EosTokenCriteria, StopStringCriteria):
                self.kept.append(criterion)
                self.watched.append(criterion)
            else:
                self.watched.append(criterion)
        tokenizer = generate_kwargs.get("tokenizer", tokenizer)
        if config.stop_strings and tokenizer is not None and not any(type(c) is StopStringCriteria for c in given):
            # the criterion `generate` builds from `stop_strings` (it raises itself when there is no tokenizer)
            self.watched.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=config.stop_strings))
        self.active = bool(self.watched)
        self.beams = (config.num_beams or 1) > 1
        self.recorder: _StopRecorder | _BeamStopRecorder | None = None

    def criteria(self, prompt_length: int, generate_kwargs: dict, batch_size: int = 1) -> dict:
        """The keyword arguments for one `generate` call of `batch_size` prompts of `prompt_length` tokens (padded)."""
        self.recorder = None
        if not self.active:
            return generate_kwargs
        if self.beams:
            self.recorder = _BeamStopRecorder(self.watched, prompt_length, batch_size)
        else:
            self.recorder = _StopRecorder(self.watched, prompt_length)
        return {**generate_kwargs, "stopping_criteria": StoppingCriteriaList([*self.kept, self.recorder])}

    def stopped_at(self, new_tokens: Sequence[Sequence[int]]) -> list[int | None]:
        """For each row of the last call's generated tokens, the count at which a criterion ended it, or `None`."""
        if isinstance(self.recorder, _BeamStopRecorder):
            return self.recorder.stopped_at(new_tokens)
        if self.recorder is not None:
            return self.recorder.stopped_at() or [None] * len(new_tokens)
        return [None] * len(new_tokens)


def _as_tensor(name: str, value) -> torch.Tensor:
    """`measure_sweeps`' `input_ids` or `attention_mask` as a tensor: a list (of lists) of ints is made one. What is
    not (the prompt's text, None, lists of unequal lengths) failed in `torch.tensor`, naming no argument ("new():
    invalid data type 'str'", "expected sequence of length 2 at dim 1 (got 1)")."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping) and name == "input_ids":
        # (`tokenizer(prompt, return_tensors="pt")` whole, a `BatchEncoding`: "'str' object cannot be interpreted as an
        # integer")
        raise TypeError(
            f"`input_ids` is the tokenizer's whole output ({type(value).__name__}): pass its `input_ids` (and "
            "`attention_mask=`), or unpack it: `measure_sweeps(model, **inputs, ...)`."
        )
    hint = (
        ": tokenize the prompt first, `tokenizer(prompt, return_tensors='pt').input_ids`"
        if isinstance(value, str)
        else ""
    )
    try:
        return torch.tensor(value, dtype=torch.long)
    except (TypeError, ValueError) as e:
        raise type(e)(
            f"`{name}` must be a tensor or a list of ints (a list of such lists of one length for a batch), got "
            f"{type(value).__name__} ({e}){hint}."
        ) from e


# the config attributes naming a multimodal placeholder token, which the model replaces before its embedding
_PLACEHOLDER_NAMES = ("image_token_id", "image_token_index", "video_token_id", "video_token_index", "audio_token_id")


def _refuse_what_the_model_cannot_run(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int | None) -> None:
    """`measure_sweeps`' `input_ids`, refused before anything is generated where the model cannot run them, as
    `generate_batch` refuses such prompts: no token (torch's "cannot reshape tensor of 0 elements"), an id that is not a
    row of the embedding (another tokenizer's, or a negative one: torch's bare "IndexError: index out of range in
    self", on a GPU a device-side assert; a placeholder its config names, `image_token_id` and the like, is left to the
    model), or a prompt and `max_new_tokens` running past a learned position table."""
    from .modeling import position_overrun, vocabulary_overrun

    if input_ids.numel() == 0:
        raise ValueError(
            f"`input_ids` holds no token (shape {tuple(input_ids.shape)}); give a prompt of at least one token."
        )
    # (a vision-language model's image or video placeholder may lie past the embedding: Gemma-3 and PaliGemma map it
    # to a token before embedding it)
    config = getattr(model, "config", None)
    placeholders = sorted(
        {v for k, v in vars(config).items() if k.endswith(_PLACEHOLDER_NAMES) and _is_int(v)} if config else ()
    )
    ids = (
        input_ids[~torch.isin(input_ids, torch.tensor(placeholders, device=input_ids.device))]
        if placeholders
        else input_ids
    )
    smallest, largest = (int(ids.min()), int(ids.max())) if ids.numel() else (0, 0)
    size = vocabulary_overrun(model, largest)
    if smallest < 0 or size is not None:
        which = smallest if smallest < 0 else largest
        raise ValueError(
            f"`input_ids` holds token id {which}, which is not a token of {type(model).__name__}'s vocabulary"
            + (f" of {size} tokens: the ids are not from this model's tokenizer" if size is not None else "")
            + "; nothing was generated."
        )
    overrun = position_overrun(model, input_ids.shape[1], max_new_tokens) if max_new_tokens is not None else None
    if overrun is not None:
        (limit, room), n = overrun, input_ids.shape[1]
        raise ValueError(
            f"`input_ids` ({n} tokens) and `max_new_tokens` {max_new_tokens} run past the {limit} positions of "
            f"{type(model).__name__}'s learned position table (`max_position_embeddings`): "
            + (f"pass `max_new_tokens` {room} or less, or " if room >= 1 else "")
            + "shorten the prompt; nothing was generated."
        )


def _refuse_a_length_past_the_table(model: nn.Module, n: int, config: GenerationConfig, generate_kwargs: dict) -> None:
    """`measure_sweeps`' `input_ids` (`n` tokens, padding included) and the length the call sets otherwise than by its
    `max_new_tokens` argument (`config`'s `max_new_tokens`, from a `generation_config` given, else its `max_length`,
    which counts the prompt), refused where they run past a learned position table, naming the length and where it came
    from (`_setting_source`): it ended in torch's bare "IndexError: index out of range in self" once generated that
    far."""
    from .modeling import position_overrun

    if config.max_new_tokens is not None:
        name, value, new = "max_new_tokens", config.max_new_tokens, config.max_new_tokens
    elif config.max_length is not None:  # (at least one new token, past a `max_length` the prompt alone reaches)
        name, value, new = "max_length", config.max_length, max(config.max_length - n, 1)
    else:
        return
    overrun = position_overrun(model, n, new)
    if overrun is None:
        return
    limit, room = overrun
    fix = (
        f"pass `max_new_tokens` {room} or less"
        if name == "max_new_tokens"
        else f"pass `max_length` {limit + 1} or less (or `max_new_tokens` {room} or less, which counts the new tokens "
        "alone)"
    )
    raise ValueError(
        f"`input_ids` ({n} tokens) and `{name}` {value}{_setting_source(model, generate_kwargs, name) or ''} run past "
        f"the {limit} positions of {type(model).__name__}'s learned position table (`max_position_embeddings`): "
        + (f"{fix}, or " if room >= 1 else "")
        + "shorten the prompt; nothing was generated."
    )


def _refuse_a_padding_id_the_model_cannot_run(
    model: nn.Module, config: GenerationConfig, generate_kwargs: dict, input_ids: torch.Tensor, eos: set[int]
) -> None:
    """`measure_sweeps`' padding id (`config`'s, as the call runs), refused before generating where it is not a token
    of the model and several rows run together: `generate` fills a row that ends before the others with it and runs
    it through the model, where it failed in the embedding, part way ("IndexError: index out of range in self"), as
    `generate_batch` refuses it. One row stops as it ends: the id is never run."""
    from .modeling import vocabulary_overrun

    pad = config.pad_token_id
    if pad is None or input_ids.shape[0] * (config.num_return_sequences or 1) < 2:
        return
    pad = int(pad)
    size = vocabulary_overrun(model, pad)
    if pad >= 0 and size is None:
        return
    if "pad_token_id" in generate_kwargs:
        where = "`pad_token_id`"
    elif getattr(generate_kwargs.get("generation_config"), "pad_token_id", None) is not None:
        where = "The `generation_config`'s `pad_token_id`"
    else:
        where = "The model's `generation_config.pad_token_id`"
    raise ValueError(
        f"{where}, {pad}, is not a token of {type(model).__name__}'s vocabulary"
        + (
            f" of {size} tokens (a padding token added to the tokenizer without resizing the model's embeddings?)"
            if size
            else ""
        )
        + ": `generate` fills the rows that end before the others with it and runs them through the model, where it "
        "would fail in the embedding. Pass `pad_token_id=` a token of the model"
        + (f" (its end-of-sequence id, {min(eos)}, as `generate` pads without one)" if eos else "")
        + "; nothing was generated."
    )


def measure_sweeps(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    assistant_model: nn.Module | None = None,
    prompt_lookup_num_tokens: int | None = None,
    max_new_tokens: int | None = None,
    **generate_kwargs,
) -> dict:
    """Run one `model.generate` call and report tokens, forward sweeps of `model` and tokens per sweep.

    Plain decoding gives 1.0 token per sweep per prompt (the prefill sweep yields the first token); a batch of B
    prompts gives up to B; speculative decoding gives 1 + the draft tokens accepted per verification. Greedy by
    default (`do_sample=False`), so speculative output equals plain output.

    Args:
        model (`transformers.PreTrainedModel`):
            The (streamed) model, the verifier when speculating.
        input_ids (`torch.LongTensor` of shape `(batch, length)`, or a 1-D tensor / list of ids for one prompt):
            Prompt ids; a batch must be left-padded (and should come with `attention_mask`). Ids the model cannot
            run (none, one past its vocabulary, a prompt and the length the call sets, `max_new_tokens` or
            `max_length` or a `generation_config`'s, past a learned position table) are refused.
        attention_mask (`torch.Tensor` or list, *optional*):
            Of the shape of `input_ids` (1-D for one prompt too). Defaults to what `generate` infers from the padding (`pad_token_id`), as for a plain `generate` call.
        assistant_model (`transformers.PreTrainedModel`, *optional*):
            A resident draft model with the same tokenizer (assisted generation; batch size 1). Not with
            `stop_strings`, which transformers passes on to the draft's own `generate`, where they fail; a
            `StopStringCriteria` in `stopping_criteria` works, the output cut where plain decoding stops.
        prompt_lookup_num_tokens (`int`, *optional*):
            Prompt-lookup decoding with this many candidate tokens (batch size 1).
        max_new_tokens (`int`, *optional*):
            Tokens to generate per prompt: defaults to those a `generation_config` given sets (`max_new_tokens`, else
            `max_length`), or a `max_length` given, else 32.
        **generate_kwargs:
            Passed to `model.generate` (e.g. `min_new_tokens`, `pad_token_id`).

    Returns:
        `dict` with `tokens` (generated, summed over the sequences returned; the padding after a row's end, by an
        end-of-sequence token, a stop string or a stopping criterion, excluded), `sweeps`, `tokens_per_sweep`,
        `seconds`, `tokens_per_s`, `batch_size` (the prompts), `sequences` (the sequences returned: `batch_size`
        times `num_return_sequences`, which each sweep generates together as it does a batch's prompts), `mode`
        (`"plain"`, `"assisted"`, `"prompt_lookup"`, `"early_exit"` or `"mtp"`: the speculative decoding `generate`
        ran, none under beam search) and `output_ids` (the generated ids of each sequence, as lists: one per
        prompt, or `num_return_sequences` per prompt in its order).
    """
    _require_model(model)
    given = _given_generation_config(generate_kwargs)
    if generate_kwargs.get("cache_implementation") == "paged":
        # (transformers' continuous batching: its results came back otherwise, counted as 0 tokens without a word)
        raise ValueError(
            "`cache_implementation='paged'` makes `generate` run transformers' continuous batching, which returns its "
            "results otherwise and is not measured here: drop it (a batch of prompts shares each sweep of the weights "
            "already), or call `model.generate_batch(...)` yourself."
        )
    # (a length the call sets otherwise is kept: 32 in its place gave another number of tokens, without a word)
    length_given = "max_length" in generate_kwargs or any(
        getattr(given, name, None) is not None for name in ("max_new_tokens", "max_length")
    )
    if max_new_tokens is None and not length_given:
        max_new_tokens = 32
    # (NumPy's integers too, taken as Python's)
    # (a wrong type is a TypeError, a value of the right type out of range a ValueError)
    if max_new_tokens is not None:
        if not _is_int(max_new_tokens):
            raise TypeError(
                f"`max_new_tokens` must be a positive int, got {type(max_new_tokens).__name__} {max_new_tokens!r}."
            )
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be a positive int, got {max_new_tokens!r}.")
        max_new_tokens = int(max_new_tokens)
    if prompt_lookup_num_tokens is not None:
        if not _is_int(prompt_lookup_num_tokens):
            raise TypeError(
                "`prompt_lookup_num_tokens` must be a positive int (e.g. 10) or None, got "
                f"{type(prompt_lookup_num_tokens).__name__} {prompt_lookup_num_tokens!r}."
            )
        if prompt_lookup_num_tokens < 1:
            raise ValueError(
                f"`prompt_lookup_num_tokens` must be a positive int (e.g. 10) or None, got {prompt_lookup_num_tokens!r}."
            )
        prompt_lookup_num_tokens = int(prompt_lookup_num_tokens)
    input_ids = _as_tensor("input_ids", input_ids)
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        # (it failed in the embedding: "Expected tensor for argument #1 'indices' to have one of the following scalar
        # types: Long, Int")
        raise TypeError(
            f"`input_ids` must hold integer token ids, got a tensor of {input_ids.dtype}: pass the tokenizer's ids "
            "as they are (`tokenizer(prompt, return_tensors='pt').input_ids`), or `input_ids.long()`."
        )
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must have shape (batch, length), got {tuple(input_ids.shape)}.")
    if attention_mask is not None:
        # (taken as `input_ids` is: a list, or a 1-D mask of one prompt)
        attention_mask = _as_tensor("attention_mask", attention_mask)
        if attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` must have the shape of `input_ids`, {tuple(input_ids.shape)}, got "
                f"{tuple(attention_mask.shape)}."
            )
    _refuse_what_the_model_cannot_run(model, input_ids, max_new_tokens)
    device = model.device
    input_ids = input_ids.to(device)
    # (none given: `generate` infers it from `pad_token_id`, as for a plain call; all ones attended to the padding)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    settings = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    if "do_sample" not in generate_kwargs and getattr(given, "do_sample", None) is None:
        settings["do_sample"] = False  # greedy by default; a `do_sample` given either way is kept
    if prompt_lookup_num_tokens is not None:
        settings["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
    kwargs = _with_settings(generate_kwargs, **settings)
    if assistant_model is not None:
        kwargs["assistant_model"] = assistant_model
    config = _generation_config(model, kwargs)
    named = {**generate_kwargs, **settings} if prompt_lookup_num_tokens is not None else generate_kwargs
    _refuse_lookup_settings(model, config, named)  # (its own argument checked above)
    if max_new_tokens is None:  # (the call sets the length otherwise; its own argument is checked above)
        _refuse_a_length_past_the_table(model, input_ids.shape[1], config, named)
    # (prompt lookup, early exit and multi-token prediction set in a generation config, given or the model's, count
    # as given here; as in `generate`, none of them under beam search, which ignores them with a warning)
    speculative = config.get_generation_mode(assistant_model) == GenerationMode.ASSISTED_GENERATION
    if speculative and input_ids.shape[0] != 1:
        raise ValueError(
            f"Speculative decoding in transformers handles one prompt at a time; `input_ids` has batch size "
            f"{input_ids.shape[0]}. Measure one prompt (`input_ids[:1]`) or drop `assistant_model` / "
            "`prompt_lookup_num_tokens` / `assistant_early_exit` / `use_mtp`."
        )
    _refuse_what_drafting_fails_on(model, config, kwargs)
    eos = eos_token_ids(model, None, kwargs)
    if config.pad_token_id is None and eos:
        kwargs = _with_settings(kwargs, pad_token_id=min(eos))
    _refuse_a_padding_id_the_model_cannot_run(model, _generation_config(model, kwargs), generate_kwargs, input_ids, eos)
    stops = _StopWatch(config, kwargs)
    kwargs = stops.criteria(input_ids.shape[1], kwargs, input_ids.shape[0])

    with count_sweeps(model) as counter, torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
        seconds = time.perf_counter() - t0
    sequences = out.sequences if hasattr(out, "sequences") else out
    new = sequences[:, input_ids.shape[1] :].cpu().tolist()
    counts = count_new_tokens(new, eos, stops.stopped_at(new))
    tokens = sum(counts)
    sweeps = counter.sweeps
    # (the candidate generator `generate` picks, in its order)
    if not speculative:
        mode = "plain"
    elif config.assistant_early_exit is not None:
        mode = "early_exit"
    elif config.prompt_lookup_num_tokens is not None:
        mode = "prompt_lookup"
    elif config.use_mtp:
        mode = "mtp"
    else:
        mode = "assisted"
    return {
        "mode": mode,
        "batch_size": int(input_ids.shape[0]),
        "sequences": len(new),  # (`num_return_sequences` per prompt: `tokens` counts them all)
        "tokens": tokens,
        "sweeps": sweeps,
        "tokens_per_sweep": tokens / sweeps if sweeps else None,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "output_ids": [row[:n] for row, n in zip(new, counts)],
    }


def configure_draft(
    draft_model: nn.Module,
    *,
    num_assistant_tokens: int = 8,
    schedule: str = "heuristic",
    confidence_threshold: float | None = 0.0,
) -> nn.Module:
    """Tune a draft model's proposal length for a streamed verifier, in place; returns the same model.

    A verification sweep of a streamed model reads every streamed layer from disk or host memory, so it costs
    about as much for 8 candidate tokens as for 1, while the resident draft is cheap: a full block of draft tokens
    per sweep pays even at a modest acceptance rate. transformers' defaults (up to 20 tokens, a `"constant"`
    schedule, and drafting stops as soon as the draft's confidence in a token falls below 0.4, a threshold it then
    tunes) are made for an in-memory verifier, where a rejected token costs verification time: with them a weak
    draft often proposes only a token or two per sweep. Here drafting is never cut short by the draft's confidence,
    and the `"heuristic"` schedule grows the block while drafts are accepted and shrinks it while they are not.

    Args:
        draft_model (`transformers.PreTrainedModel`):
            The assistant model passed to `generate(assistant_model=...)`.
        num_assistant_tokens (`int`, defaults to 8):
            Draft tokens proposed per verification (the starting value under the `"heuristic"` schedule).
        schedule (`str`, defaults to `"heuristic"`):
            `"constant"`, `"heuristic"` (+2 after a fully accepted block, -1 otherwise) or `"heuristic_transient"`.
        confidence_threshold (`float`, *optional*, defaults to 0.0):
            Stop drafting early when the draft's probability of its token falls below this; 0 or `None` never stops.
            A draft with a tokenizer of its own (`assistant_tokenizer=`, greedy decoding) fails inside transformers
            with 0, and [`measure_sweeps`] and the batch functions refuse it: give it transformers' default there.

    Returns:
        The same `draft_model`.
    """
    # (a wrong type is a TypeError, a value of the right type out of range a ValueError)
    if not _is_int(num_assistant_tokens):
        raise TypeError(
            f"`num_assistant_tokens` must be a positive int (e.g. 8), got {type(num_assistant_tokens).__name__} "
            f"{num_assistant_tokens!r}."
        )
    if num_assistant_tokens < 1:
        raise ValueError(f"`num_assistant_tokens` must be a positive int (e.g. 8), got {num_assistant_tokens!r}.")
    schedules = ("constant", "heuristic", "heuristic_transient")
    if not isinstance(schedule, str):
        raise TypeError(f"`schedule` must be one of {schedules} (a str), got {type(schedule).__name__} {schedule!r}.")
    if schedule not in schedules:
        raise ValueError(f"`schedule` must be one of {schedules}, got {schedule!r}.")
    if confidence_threshold is not None and (
        not isinstance(confidence_threshold, numbers.Real) or isinstance(confidence_threshold, bool)
    ):
        raise TypeError(
            f"`confidence_threshold` must be a number in [0, 1) or None, got {type(confidence_threshold).__name__} "
            f"{confidence_threshold!r}."
        )
    if confidence_threshold is not None and not 0.0 <= confidence_threshold < 1.0:
        raise ValueError(f"`confidence_threshold` must be in [0, 1) or None, got {confidence_threshold!r}.")
    config = getattr(draft_model, "generation_config", None)
    if config is None:
        raise TypeError(
            f"`draft_model` must be a transformers model with a `generation_config`, got {type(draft_model).__name__}."
        )
    # (as Python's numbers: the config is saved as JSON)
    settings = {
        "num_assistant_tokens": int(num_assistant_tokens),
        "num_assistant_tokens_schedule": schedule,
        "assistant_confidence_threshold": float(confidence_threshold or 0.0),
    }
    # a generation config takes any attribute: one transformers renamed would be set and silently ignored
    missing = [name for name in settings if not hasattr(type(config)(), name)]
    if missing:
        raise RuntimeError(
            f"This transformers release's generation config has no {missing}: cannot configure the draft."
        )
    for name, value in settings.items():
        setattr(config, name, value)
    return draft_model
