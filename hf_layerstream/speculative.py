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
`num_assistant_tokens_schedule`, `assistant_confidence_threshold`). transformers' defaults are tuned for a verifier
that is cheap to run; when every verification is a sweep over the disk, proposing more tokens usually pays: see
[`configure_draft`].
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["SweepCounter", "count_sweeps", "measure_sweeps", "configure_draft", "count_new_tokens"]


def _sweep_module(model: nn.Module) -> nn.Module:
    """The module whose forward marks one sweep: the first decoder layer (the model itself when there is none)."""
    from .modeling import find_layer_stack
    from .stream import get_streaming_state

    state = get_streaming_state(model)
    stack = state.stack if state is not None else find_layer_stack(model)
    if stack is None or len(stack.layers) == 0:
        return model
    return stack.layers[0]


class SweepCounter:
    """Counts the forward sweeps of a model over its decoder layers while active.

    A forward pre-hook on the first decoder layer counts one sweep per forward pass of the model: a prefill, a
    decoding step, or the verification of a block of draft tokens. The draft model of assisted generation is a
    different module and is not counted. Use it as a context manager (see [`count_sweeps`]) or call
    [`~SweepCounter.start`] / [`~SweepCounter.stop`].

    Args:
        model (`torch.nn.Module`):
            The model to watch, streamed or not.

    Attributes:
        sweeps (`int`): Forward sweeps seen since the counter started (or was [`~SweepCounter.reset`]).
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module (a transformers model), got {type(model).__name__}.")
        self.model = model
        self.sweeps = 0
        self._handle = None

    def _hook(self, module, args):
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
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SweepCounter(model={type(self.model).__name__}, sweeps={self.sweeps}, active={self.active})"


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


def count_new_tokens(new_tokens: torch.Tensor | Sequence[Sequence[int]], eos_ids: Iterable[int]) -> list[int]:
    """Generated tokens per row, up to and including the first end-of-sequence token (the padding after it excluded).

    Args:
        new_tokens (`torch.Tensor` or list of lists):
            The generated part of `generate`'s output, one row per prompt.
        eos_ids (iterable of `int`):
            End-of-sequence token ids.

    Returns:
        `list[int]`: the count for each row.
    """
    eos = set(eos_ids)
    rows = new_tokens.tolist() if isinstance(new_tokens, torch.Tensor) else new_tokens
    counts = []
    for row in rows:
        n = len(row)
        for i, t in enumerate(row):
            if t in eos:
                n = i + 1
                break
        counts.append(n)
    return counts


def measure_sweeps(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    assistant_model: nn.Module | None = None,
    prompt_lookup_num_tokens: int | None = None,
    max_new_tokens: int = 32,
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
            Prompt ids; a batch must be left-padded and come with `attention_mask`.
        attention_mask (`torch.Tensor`, *optional*):
            Defaults to all ones.
        assistant_model (`transformers.PreTrainedModel`, *optional*):
            A resident draft model with the same tokenizer (assisted generation; batch size 1).
        prompt_lookup_num_tokens (`int`, *optional*):
            Prompt-lookup decoding with this many candidate tokens (batch size 1).
        max_new_tokens (`int`, defaults to 32):
            Tokens to generate per prompt.
        **generate_kwargs:
            Passed to `model.generate` (e.g. `min_new_tokens`, `pad_token_id`).

    Returns:
        `dict` with `tokens` (generated, summed over the batch, padding excluded), `sweeps`, `tokens_per_sweep`,
        `seconds`, `tokens_per_s`, `batch_size`, `mode` (`"plain"`, `"assisted"` or `"prompt_lookup"`) and
        `output_ids` (the generated ids of each prompt, as lists).
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a positive int, got {max_new_tokens!r}.")
    if prompt_lookup_num_tokens is not None and (
        not isinstance(prompt_lookup_num_tokens, int) or prompt_lookup_num_tokens < 1
    ):
        raise ValueError(
            f"`prompt_lookup_num_tokens` must be a positive int (e.g. 10) or None, got {prompt_lookup_num_tokens!r}."
        )
    if assistant_model is not None and prompt_lookup_num_tokens is not None:
        raise ValueError(
            "Pass either `assistant_model` or `prompt_lookup_num_tokens`, not both: transformers uses one candidate "
            "generator per call."
        )
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor(input_ids, dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must have shape (batch, length), got {tuple(input_ids.shape)}.")
    speculative = assistant_model is not None or prompt_lookup_num_tokens is not None
    if speculative and input_ids.shape[0] != 1:
        raise ValueError(
            f"Speculative decoding in transformers handles one prompt at a time; `input_ids` has batch size "
            f"{input_ids.shape[0]}. Measure one prompt (`input_ids[:1]`) or drop `assistant_model` / "
            "`prompt_lookup_num_tokens`."
        )
    device = model.device
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    kwargs = {"do_sample": False, **generate_kwargs, "max_new_tokens": max_new_tokens}
    if assistant_model is not None:
        kwargs["assistant_model"] = assistant_model
    if prompt_lookup_num_tokens is not None:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
    if "pad_token_id" not in kwargs and getattr(model.generation_config, "pad_token_id", None) is None:
        eos = eos_token_ids(model, None, kwargs)
        if eos:
            kwargs["pad_token_id"] = min(eos)

    with count_sweeps(model) as counter, torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
        seconds = time.perf_counter() - t0
    sequences = out.sequences if hasattr(out, "sequences") else out
    new = sequences[:, input_ids.shape[1] :].cpu()
    counts = count_new_tokens(new, eos_token_ids(model, None, kwargs))
    tokens = sum(counts)
    sweeps = counter.sweeps
    mode = "assisted" if assistant_model is not None else "prompt_lookup" if prompt_lookup_num_tokens else "plain"
    return {
        "mode": mode,
        "batch_size": int(input_ids.shape[0]),
        "tokens": tokens,
        "sweeps": sweeps,
        "tokens_per_sweep": tokens / sweeps if sweeps else None,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "output_ids": [row[:n] for row, n in zip(new.tolist(), counts)],
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
    about as much for 8 candidate tokens as for 1, while the resident draft is cheap: proposing more tokens per
    sweep pays even at a modest acceptance rate. transformers' defaults (5 tokens, and drafting stops as soon as
    the draft's confidence falls below 0.4) are tuned for an in-memory verifier.

    Args:
        draft_model (`transformers.PreTrainedModel`):
            The assistant model passed to `generate(assistant_model=...)`.
        num_assistant_tokens (`int`, defaults to 8):
            Draft tokens proposed per verification (the starting value under the `"heuristic"` schedule).
        schedule (`str`, defaults to `"heuristic"`):
            `"constant"`, `"heuristic"` (+2 after a fully accepted block, -1 otherwise) or `"heuristic_transient"`.
        confidence_threshold (`float`, *optional*, defaults to 0.0):
            Stop drafting early when the draft's probability of its token falls below this; 0 or `None` never stops.

    Returns:
        The same `draft_model`.
    """
    if not isinstance(num_assistant_tokens, int) or isinstance(num_assistant_tokens, bool) or num_assistant_tokens < 1:
        raise ValueError(f"`num_assistant_tokens` must be a positive int (e.g. 8), got {num_assistant_tokens!r}.")
    schedules = ("constant", "heuristic", "heuristic_transient")
    if schedule not in schedules:
        raise ValueError(f"`schedule` must be one of {schedules}, got {schedule!r}.")
    if confidence_threshold is not None and not 0.0 <= confidence_threshold < 1.0:
        raise ValueError(f"`confidence_threshold` must be in [0, 1) or None, got {confidence_threshold!r}.")
    config = getattr(draft_model, "generation_config", None)
    if config is None:
        raise TypeError(
            f"`draft_model` must be a transformers model with a `generation_config`, got {type(draft_model).__name__}."
        )
    settings = {
        "num_assistant_tokens": num_assistant_tokens,
        "num_assistant_tokens_schedule": schedule,
        "assistant_confidence_threshold": confidence_threshold or 0.0,
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
