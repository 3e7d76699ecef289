"""`enable_layer_streaming` / `disable_layer_streaming`: wire a shard directory into a native transformers model."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import numbers
import os
import re
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace

import torch
from accelerate.hooks import add_hook_to_module, remove_hook_from_module
from torch import nn
from transformers import GenerationConfig

try:
    from transformers.utils import GENERATION_CONFIG_NAME
except ImportError:  # (a constant transformers may move)
    GENERATION_CONFIG_NAME = "generation_config.json"

from .engine import (
    _NO_COPY,
    LayerLoader,
    Profile,
    ResidencyPlan,
    _device_key,
    _over_budget,
    budget_warnings,
    check_device,
    check_max_memory,
    check_reserve,
    check_reserve_fits,
    check_reserve_within,
    deepen_prefetch,
    default_device_budget,
    empty_allocator_caches,
    fit_prefetch,
    plan_residency,
    size_text,
)
from .errors import ShardDirError
from .hooks import (
    DISABLED_DURING_CALL,
    HostResident,
    HostResidentHook,
    LayerStreamingHook,
    ModuleDequantizer,
    Packed,
    PassGuard,
    Streamed,
    _in_grad_transform,
    _Placeholder,
    host_state_dict_hook,
    kept_state_dict_hook,
    mark_loaded,
    streamed_state_dict_hook,
)
from .modeling import (
    RESIDENT,
    LayerStack,
    buffers_as_loaded,
    buffers_built_at,
    check_flag,
    dtype_configs,
    expected_tensors,
    get_submodule_attr,
    layer_unit,
    repair_meta_buffers,
    require_layer_stack,
    resolve_dtype,
    tied_targets,
)
from .modeling import stand_in as make_stand_in
from .shard_dir import ShardDirectory, hub_shard_files, local_shard_dir, redownload_advice, side_file_damage

logger = logging.getLogger(__name__)

_STATE_ATTR = "_layerstream_state"
# chosen by measurement: the bench model (16 layers of 86 MB, bf16), every layer streamed, alternating `generate` calls
# in one process (8 tokens, median step): from a cold page cache, 0.757 / 0.624 / 0.579 / 0.581 s per token for
# prefetch 0 / 1 / 2 / 3 (4 rounds); dropping each layer after use, 0.718 / 0.633 / 0.612 / 0.680 (6 rounds); warm,
# 0.103 / 0.106 / 0.105 / 0.110 (6 rounds: no difference beyond the noise). Each step of prefetch costs one layer of
# memory (the RSS bound is resident + (prefetch + 1) layers).
DEFAULT_PREFETCH = 2
# CPU with full-precision shards: one more. Two map threads read two layers from the disk at once (see
# `engine.MAP_STREAMS`); with a third layer scheduled, each starts its next read as soon as one ends. Measured the same
# way as above, with those threads: from a cold page cache prefetch 2 took 1.12x the step time of 3 (medians of
# per-round ratios, two runs of 10 rounds), warm 1.08x (10 rounds); with 4-bit shards 0.99x (8 rounds, cold), for
# 60 MB more peak RSS, so quantized shards keep 2.
DEFAULT_PREFETCH_CPU = 3


# CUDA: as many layers ahead as hold `CUDA_AHEAD_BYTES` of stored weights, at least `DEFAULT_PREFETCH` and at most
# `CUDA_MAX_PREFETCH`. Between two sweeps (the head, sampling, `generate`'s own work, the next token's embeddings: a few
# ms of Python at batch 1) the loader can copy no further than `prefetch` layers ahead, and small layers copy in less
# time than that: the H200 here (55 GB/s pinned host-to-device), every layer of the bench model (16 layers of 90 MB)
# from pinned host RAM, took 31.0 / 34.2 ms a token at prefetch 2 and 27.2 at 4 (one sweep's copies alone: 26.5 ms;
# prefetch 1: 35.4), in a call where the whole model took 20-21 ms; where it took 12-17 ms (a faster phase of that
# shared machine: a shorter gap) 2 and 4 both gave 28-30 ms. Layers of 160 MB or more get 2, as before. A plan starts
# from at most 2, fitted to the budget (`fit_prefetch`), and reads further ahead only where that keeps the same layers
# (`engine.deepen_prefetch`): with layers of one size, only when it keeps none (a device budget of 0).
CUDA_AHEAD_BYTES = 320 * 2**20
CUDA_MAX_PREFETCH = 8


def base_prefetch(device: torch.device, default: int) -> int:
    """The `prefetch` a default plan starts from: on CUDA at most `DEFAULT_PREFETCH`, raised towards the default by
    layer size only where that keeps as many layers (`engine.deepen_prefetch`); on CPU the default itself."""
    return default if device.type == "cpu" else min(default, DEFAULT_PREFETCH)


def default_prefetch(device: torch.device, shards: ShardDirectory) -> int:
    """The `prefetch` used when none is given: on CPU `DEFAULT_PREFETCH_CPU` with full-precision shards, else
    `DEFAULT_PREFETCH`; on CUDA by the size of the layers (`CUDA_AHEAD_BYTES`)."""
    if device.type == "cpu":
        return DEFAULT_PREFETCH_CPU if shards.compression is None else DEFAULT_PREFETCH
    biggest = max((shards.unit(layer_unit(i)).size for i in range(shards.num_layers)), default=0)
    if not biggest:
        return DEFAULT_PREFETCH
    return max(DEFAULT_PREFETCH, min(CUDA_MAX_PREFETCH, -(-CUDA_AHEAD_BYTES // biggest)))


@dataclass
class StreamingState:
    """What `enable_layer_streaming` attached to a model: the plan, the loader, the profile, and how to undo it."""

    shard_dir: ShardDirectory
    device: torch.device
    stack: LayerStack
    plan: ResidencyPlan
    loader: LayerLoader
    profile: Profile | None
    hooks: list[LayerStreamingHook]
    originals: list[tuple[nn.Module, str, bool, object]] = field(default_factory=list)
    had_device_map: bool = False
    old_device_map: object = None
    last_profile: dict | None = None
    compute_dtypes: frozenset = frozenset()  # the floating-point dtypes the streamed weights arrive in
    shadowed: dict = field(default_factory=dict)  # instance attributes our wrappers replaced (restored on disable)
    installed: dict = field(default_factory=dict)  # name -> the wrapper we set as an instance attribute (`_shadow`)
    disabled: bool = False  # `disable_layer_streaming` began (a call running in another thread then fails clearly)
    compile_vetoed: bool = False  # `generate` asked to compile the forward pass, and was told not to (logged once)
    handles: list = field(default_factory=list)  # torch hook handles (removed on disable)
    runner: nn.Module | None = None  # the module whose forward runs the decoder layers
    guard: PassGuard | None = None  # wraps its forward: one pass at a time, clean-up after one that raised
    runner_forward: object = None  # the instance attribute `forward` the runner had before, if any
    host_modules: list = field(default_factory=list)  # resident modules kept in host RAM (`HostResidentHook`)
    model_forward: object = None  # the instance attribute `forward` the model had before, if any (see `wrap_model`)
    generation_config: object = None  # the shard directory's, set by enable (see `_load_generation_config`)
    own_generation_config: object = None  # the model's before it (put back by disable)
    # [(the output head or an outer linear, its own weight before enable)]: disable gives that one the `requires_grad`
    # the caller set since (see `_HeadGrad`, `_outer_linears`)
    head_weights: list = field(default_factory=list)
    # (config or sub-config, its dtype before): where enable's `dtype=` set the dtype on them (put back by disable)
    config_dtypes: list = field(default_factory=list)
    # the storages of adapter weights `attaching_adapters` saw attached, {(device, address): bytes} (outside the plan)
    adapter_storages: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        # (the default showed the layer stack and every parameter: megabytes for a real model, in a notebook's output)
        status = ", disabled" if self.disabled else ""
        return (
            f"StreamingState(shard_dir={str(self.shard_dir.path)!r}, {self.shard_dir.num_layers} layers, "
            f"device={self.device}, plan: {len(self.plan.device_layers)} on the device, {len(self.plan.host_layers)} "
            f"in host RAM, {len(self.plan.streamed)} streamed, prefetch={self.plan.prefetch}, "
            f"profile={'on' if self.profile is not None else 'off'}{status})"
        )


def _require_module(model) -> None:
    """`model` of `disable_layer_streaming`, `attaching_adapters` and `get_streaming_state`: something else than a model
    (None, the shard directory's path, a `pipeline`) was told "Layer streaming is not enabled on this model", a
    ValueError for a wrong type (`get_streaming_state` returned `None`, as for a model not streaming)."""
    if not isinstance(model, nn.Module):
        # (a `pipeline` holds the model: named, as the object to pass)
        held = "; pass its `.model`" if isinstance(getattr(model, "model", None), nn.Module) else ""
        raise TypeError(f"`model` must be a transformers model (a torch.nn.Module), got {type(model).__name__}{held}.")


def get_streaming_state(model: nn.Module) -> StreamingState | None:
    """The [`StreamingState`] of a model with layer streaming enabled, else `None`.

    Raises:
        `TypeError`: `model` is not a model (a `torch.nn.Module`): a `pipeline`'s is its `.model`.
    """
    _require_module(model)
    return getattr(model, _STATE_ATTR, None)


# --- adapters (PEFT) -------------------------------------------------------------------------------------------------

_ATTACH_FIX = (
    "enable streaming on the model without adapters (a `PeftModel`'s: `model.unload()`), then attach them inside "
    "`with hf_layerstream.attaching_adapters(model):` (e.g. `model = PeftModel.from_pretrained(model, adapter_dir)` "
    "or `model.load_adapter(adapter_dir)` there)"
)


def _adapter_modules(model: nn.Module):
    """(name, module) of the PEFT adapter layers in `model` (its tuner layers: `lora.Linear` and the like)."""
    for name, module in model.named_modules():
        if type(module).__module__.startswith("peft.") and hasattr(module, "base_layer"):
            yield name, module


def _refuse_adapters(model: nn.Module) -> None:
    """At enable: a model holding adapter layers (a `PeftModel`, or one an adapter was loaded into) is refused, naming
    the order that works. (Its shard directory holds the base model's weights, named without PEFT's `base_layer`, so
    the match failed as "a different model"; and an adapter attached to a model built on the meta device has no
    values: PEFT leaves them there.)"""
    found = next(_adapter_modules(model), None)
    if found is not None or type(model).__module__.startswith("peft."):
        where = f" (`{found[0]}`)" if found is not None else ""
        raise ValueError(f"The model holds PEFT adapter layers{where}: {_ATTACH_FIX}.")


# modules and parameters registered anywhere in this process since the first adapter check (torch's global
# registration hooks, installed then): an adapter added, or deleted and added again under the same name, registers
# new ones, and `_adapter_check` looks at the adapters again
_REGISTERED = [0]
_COUNTING: list = []


def _count_registration(*args) -> None:
    _REGISTERED[0] += 1


def _count_registrations() -> bool:
    """Whether registrations are counted (torch's global registration hooks: torch 2.0 on), installed once."""
    if not _COUNTING:
        from torch.nn.modules import module

        hooks = [getattr(module, f"register_module_{kind}_registration_hook", None) for kind in ("module", "parameter")]
        _COUNTING.extend(hook(_count_registration) if hook is not None else None for hook in hooks)
    return None not in _COUNTING


def _adapter_weight_problem(stack, *, finite: bool) -> str | None:
    """What is wrong with the adapters' weights in the decoder layers, if anything: one on the meta device, or (with
    `finite`) one holding inf or NaN."""
    from .quant import all_finite

    for name, module in _adapter_modules(stack.layers):
        for rel, t in module.named_parameters():
            if isinstance(t, _Placeholder):
                continue
            parts = rel.split(".")
            adapter = parts[1] if len(parts) > 2 and parts[0] in getattr(module, "adapter_layer_names", ()) else None
            full = f"`{stack.prefix}.{name}.{rel}`"
            if t.is_meta:
                again = f" (`model.delete_adapter({adapter!r})`)" if adapter is not None else ""
                return (
                    f"The adapter weight {full} is on the meta device: the adapter was attached to the streaming model "
                    "outside `hf_layerstream.attaching_adapters(model)` (`load_adapter`, `get_peft_model`, "
                    "`add_weighted_adapter` and the like), so PEFT put it beside the streamed weight's placeholder, "
                    f"with no values. Delete that adapter{again} and attach it again inside the block; or build the "
                    f"model again and {_ATTACH_FIX}."
                )
            if finite and t.is_floating_point() and not all_finite(t):
                return (
                    f"The adapter weight {full} holds inf or NaN after `attaching_adapters`: its initialisation read "
                    "the base weights, which the block stands in for without values (DoRA's magnitude, PiSSA, "
                    "OLoRA, LoftQ: made anew, or loaded without the saved values, as transformers' `load_adapter` "
                    "loads DoRA). Load a saved adapter with `PeftModel.from_pretrained`, or make it on the loaded "
                    "model and save it."
                )
    return None


def _adapter_check(model: nn.Module, stack) -> Callable[[], None]:
    """What the pass guard calls at each pass: where the model has PEFT adapters (its `peft_config`, which PEFT and
    transformers' `load_adapter` set on it) and modules or parameters were registered since the last check (an
    adapter added, or deleted and added again), none of their weights in the decoder layers may be on the meta
    device. Attached outside `attaching_adapters`, PEFT puts them on the device of the weight each adapts, which for
    a streamed weight is its meta placeholder: the layers then computed on memory never written (NaN or noise,
    silently)."""
    model_ref = weakref.ref(model)
    checked: list = [None]

    def check() -> None:
        model = model_ref()
        config = vars(model).get("peft_config") if model is not None else None
        if not isinstance(config, dict):
            return
        # (without the hooks: every pass)
        seen = (tuple(config), _REGISTERED[0] if _count_registrations() else object())
        if seen == checked[0]:
            return
        problem = _adapter_weight_problem(stack, finite=False)
        if problem is not None:
            raise RuntimeError(problem)
        checked[0] = seen

    return check


@contextlib.contextmanager
def attaching_adapters(model: nn.Module):
    """Attach PEFT adapters (LoRA and the like) to a model streaming its layers, inside this block:

    ```python
    enable_layer_streaming(model, shard_dir)
    with attaching_adapters(model):
        model = PeftModel.from_pretrained(model, adapter_dir)  # or model.load_adapter(adapter_dir)
    ```

    PEFT puts an adapter's weights on the device and in the dtype of the weight each adapts; a streamed weight is a
    meta placeholder between passes. Inside the block, each such weight stands in as a tensor of its dtype and shape
    on the device the model computes on (one NaN, broadcast: no memory), and `model.hf_device_map` is hidden (a map
    naming "disk" or "cpu" sends `PeftModel.from_pretrained` to re-dispatch the model, which removes the streaming
    hooks, and transformers' `load_adapter` to leave the weights there). The placeholders are back as the block ends.
    The base weights still stream, adapted as the loaded model's are: the output equals the loaded model with the
    same adapter, bit for bit in fp32 (tested for LoRA; DoRA, IA3, LoHa, LoKr, VeRA, OFT and AdaLoRA were seen
    exact). Everything that creates adapters goes inside the block (`load_adapter`, `get_peft_model`,
    `add_weighted_adapter`); attached outside it, the next pass raises, naming the weight. The adapter weights stay in
    memory on that device, outside the plan's budget: their bytes are logged as the block ends, with a warning where
    with them the model holds more there than the budget (`ResidencyPlan.planned_use` and theirs).

    Refused as the block ends, naming the weight: an initialisation that reads the base weights (DoRA's magnitude
    made anew, PiSSA, OLoRA, LoftQ: their adapter weights come out NaN) or writes them (PiSSA's residual); load a
    saved adapter, or make it on the loaded model. A forward pass inside the block is refused (run it after); passes
    from other threads wait for the block to end. The streamed weights cannot be merged (`merge_and_unload`): split
    with the adapter merged instead (`split_checkpoint(..., adapter=adapter_dir)`), which streams at the base model's
    speed with no adapter weights in memory. On a shard directory split with an adapter merged, a warning names it:
    an adapter attached adds to the merged one.
    """
    _require_module(model)
    state = get_streaming_state(model)
    if state is None:
        raise ValueError(
            "Layer streaming is not enabled on this model: attach adapters to it as to any model, or enable streaming "
            "first and attach them inside this block."
        )
    merged = state.shard_dir.manifest.adapter
    if merged is not None:  # (attached again, it would count twice)
        several = isinstance(merged, list)
        logger.warning(
            "The shard directory %s holds the adapter%s %s merged into its weights (split with `adapter=`): an adapter "
            "attached now adds to %s.",
            state.shard_dir.path,
            "s" if several else "",
            ", ".join(str(r.get("id")) for r in merged) if several else merged.get("id"),
            "them" if several else "it",
        )
    with state.guard.lock, _model_lock(model):
        device = state.loader.device
        stand_ins, written, hidden = [], [], _NONE
        held = _held_storages(model)  # (what the model holds before: the adapters' weights are what it holds after)
        try:
            state.guard.attaching = True
            hidden = vars(model).pop("hf_device_map", _NONE)
            for hook in state.hooks:
                for entry, key, p, name in zip(hook._dicts, hook._keys, hook.placeholders, hook.names):
                    if entry.get(key) is p and p.is_meta:
                        stand_in = make_stand_in(p, device=device)
                        if isinstance(p, nn.Parameter):
                            stand_in = nn.Parameter(stand_in, requires_grad=p.requires_grad)
                        stand_ins.append((entry, key, p, stand_in, stand_in.data_ptr(), hook.index, name))
                        entry[key] = stand_in
            try:
                yield model
            except RuntimeError as e:  # (a stand-in written in place, OLoRA; its NaN decomposed, PiSSA's SVD)
                if "single memory location" not in str(e) and "non-finite values" not in str(e):
                    raise
                raise RuntimeError(
                    "An adapter initialisation read or wrote a decoder layer's weights inside `attaching_adapters` "
                    "(OLoRA, PiSSA, LoftQ: torch's error follows), where they are stand-ins without values: the "
                    "streamed weights are the shard directory's. Load a saved adapter, or make it on the loaded "
                    "model and save it."
                ) from e
        finally:
            state.guard.attaching = False
            for entry, key, p, stand_in, address, index, name in stand_ins:
                current = entry.get(key)
                if current is not stand_in or stand_in.data_ptr() != address or any(stand_in.stride()):
                    written.append(f"decoder layer {index}'s {name}")
                if current is not None:  # (the placeholder back, whatever the block put there)
                    # with the `requires_grad` the block set on its stand-in: PEFT freezes the weights it adapts
                    # (`get_peft_model`, `PeftModel.from_pretrained(..., is_trainable=True)`), and the placeholder
                    # kept the flag it had, so the base weights counted as trainable (`print_trainable_parameters`,
                    # an optimizer over `requires_grad` parameters) and required grad in a pass with gradients to
                    # the inputs, where the loaded model's do not
                    if isinstance(p, nn.Parameter) and isinstance(current, torch.Tensor):
                        p.requires_grad_(current.requires_grad)
                    entry[key] = p
            if hidden is not _NONE:
                model.hf_device_map = hidden
        if written:
            raise RuntimeError(
                f"{written[0]} was replaced inside `attaching_adapters`"
                f"{f' (and {len(written) - 1} more)' if len(written) > 1 else ''} (an adapter initialisation that "
                "changes the base weights, as PiSSA's residual does): the streamed weights are the shard directory's, "
                "and the change is dropped. Load a saved adapter, or make it on the loaded model and save it."
            )
        problem = _adapter_weight_problem(state.stack, finite=True)
        if problem is not None:
            raise RuntimeError(problem)
        now = _held_storages(model)
        new = {key: size for key, size in now.items() if key not in held}
        if new:
            # (those of earlier blocks that the model still holds count too: an adapter deleted since does not)
            state.adapter_storages = {k: v for k, v in {**state.adapter_storages, **new}.items() if k in now}
            _note_adapter_memory(state.plan, new, state.adapter_storages)


_NONE = object()


def _held_storages(model: nn.Module) -> dict[tuple[str, int], int]:
    """The memory the model's parameters and buffers hold (streamed weights' placeholders, on meta, hold none), by
    storage: {(device, address): bytes}."""
    held = {}
    for t in (*model.parameters(), *model.buffers()):
        if t.is_meta or isinstance(t, _Placeholder):
            continue
        storage = t.untyped_storage()
        held[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return held


_MERGE_INSTEAD = (
    "merge the adapter into the shards as you split (`split_checkpoint(..., adapter=...)`, `hf-layerstream split "
    "--adapter`: the base model's speed, no adapter weights in memory)"
)


def _note_adapter_memory(plan, new: dict, attached: dict) -> None:
    """The adapters one `attaching_adapters` block attached hold the storages `new` ({(device, address): bytes}), and
    with those of earlier blocks the model still holds, `attached`; the plan counted none of them. Logged, and a
    warning where those on the device it computes on take what it holds there past that device's budget (a budget of
    0 asks for every layer streamed, not for a limit; one already short of what the plan needs was warned about as
    streaming was enabled)."""
    device = str(plan.device)
    budget, use = plan.budgets.get(str(_device_key(plan.device))), plan.planned_use()
    here = sum(size for (where, _), size in attached.items() if where == device)
    by_device = Counter()
    for (where, _), size in new.items():
        by_device[where] += size
    held = " and ".join(f"{size_text(size)} on {where}" for where, size in sorted(by_device.items()))
    earlier = f"; {size_text(here)} on {device} with those attached before" if len(attached) > len(new) else ""
    if not budget:
        counted = "every layer streamed, as a budget of 0 asks"
    else:
        counted = f"it plans {size_text(use)} of the budget of {device}, {size_text(budget)}"
    logger.info(
        "The adapters attached hold %s%s, which the residency plan does not count (%s).", held, earlier, counted
    )
    if not budget or use + here <= budget:
        return
    if use > budget:
        logger.warning(
            "The adapters attached add %s on %s to a budget (%s) already short of what the plan holds there (%s; "
            "warned as streaming was enabled). To leave their memory out, %s.",
            size_text(here),
            device,
            size_text(budget),
            size_text(use),
            _MERGE_INSTEAD,
        )
        return
    logger.warning(
        "The adapters attached hold %s on %s, which the residency plan did not count: with them, what it holds there "
        "(%s) passes its budget (%s). Enable streaming with a `max_memory` lower by theirs before attaching them, or "
        "%s.",
        size_text(here),
        device,
        size_text(use + here),
        size_text(budget),
        _MERGE_INSTEAD,
    )


def _check_conversion(model: nn.Module, shards: ShardDirectory) -> None:
    """Warn where transformers now converts this model's checkpoints otherwise than when the shards were split (a
    release that changed a fused layout keeps names and shapes: the shards would load, silently wrong)."""
    from .modeling import conversion_record

    then = shards.manifest.conversion
    if not then:
        return
    try:
        now = conversion_record(model)
    except Exception as e:  # noqa: BLE001 - only a check
        logger.warning("Could not check how transformers converts this model's checkpoints (%s).", e)
        return
    if now["converters"] != then.get("converters"):
        logger.warning(
            "%s was split with transformers %s, which converted this model's checkpoint tensors (fused experts, "
            "merged projections) otherwise than transformers %s does. If the layout changed, the shards hold the "
            "old one: split the checkpoint again with this release.",
            shards.path,
            then.get("transformers", "?"),
            now["transformers"],
        )


def _check_match(model: nn.Module, stack: LayerStack, shards: ShardDirectory) -> None:
    """Raise before touching the model when the shard directory was not made from this model's architecture. Where the
    directory's own `config.json` no longer builds the model its shards hold (edited since the split), the error says
    so: a model built from it (`hf-layerstream generate`, the model card's code) is refused, and splitting into a new
    directory, which the error names otherwise, would not help; running the same split again writes it back. Where
    config.json builds the model the manifest's fingerprint records but the manifest says otherwise (its layers
    edited), the error names the manifest's edit."""
    try:
        _check_match_manifest(model, stack, shards)
    except ShardDirError as e:
        try:
            edited, manifest = shards.model_problems()
        except Exception:  # noqa: BLE001 - the refusal stands as it is
            edited = manifest = None
        if manifest is not None and edited is None:  # (the manifest's layers edited: config.json builds this model)
            raise ShardDirError(f"{e} Note: its own {shards.manifest_path.name} {manifest}.") from None
        if edited is None:
            raise
        raise ShardDirError(
            f"{e} Note: its own config.json {edited}. If it was edited, run the same split again "
            "(`split_checkpoint` / `hf-layerstream split` with the same source and options), which writes it back, "
            "and build the model from it."
        ) from None


def _check_match_manifest(model: nn.Module, stack: LayerStack, shards: ShardDirectory) -> None:
    m = shards.manifest
    where = f"`shard_dir` {shards.path}"
    fix = "Split this model's checkpoint into a new directory with `split_checkpoint` / `hf-layerstream split`."
    split_for = m.architectures[0] if m.architectures else None
    if split_for and split_for != type(model).__name__:
        # e.g. a Llama-4 checkpoint (split as AutoModelForCausalLM's text-only class) built as the vision-language one
        fix = (
            f"The shard directory was split for {split_for} and the model is a {type(model).__name__}: build the model "
            f"as {split_for} (a vision-language checkpoint that `AutoModelForCausalLM` takes, such as Llama-4's, is "
            "split as that class, text only, unless split with `model_class='AutoModelForImageTextToText'`), or split "
            "this model's checkpoint into a new directory with `split_checkpoint` / `hf-layerstream split`."
        )
    if m.num_layers != len(stack):
        raise ShardDirError(
            f"{where} holds {m.num_layers} decoder layers but the model has {len(stack)} ({stack.prefix}); the shards "
            f"were made from a different model. {fix}"
        )
    if m.layers_prefix != stack.prefix:
        raise ShardDirError(
            f"{where} stores decoder layers under {m.layers_prefix!r} but the model's are under {stack.prefix!r}. {fix}"
        )
    expected = expected_tensors(model, stack)
    for unit, tensors in expected.items():
        stored = shards.unit(unit).tensors
        missing = sorted(set(tensors) - set(stored))
        extra = sorted(set(stored) - set(tensors))
        if missing or extra:
            raise ShardDirError(
                f"{where} does not match the model in unit {unit!r}: missing {missing[:3]}, unexpected {extra[:3]}. "
                f"The shards were made from a different model. {fix}"
            )
        for name, (shape, dtype) in tensors.items():
            entry = stored[name]
            if entry.shape != shape:
                raise ShardDirError(
                    f"{where} stores {name!r} with shape {list(entry.shape)} but the model expects {list(shape)}. {fix}"
                )
            if entry.dtype.is_floating_point != dtype.is_floating_point:
                raise ShardDirError(f"{where} stores {name!r} as {entry.dtype} but the model expects {dtype}. {fix}")


def _layers_run(runner: nn.Module, n: int):
    """For `PassGuard`: how many decoder layers a pass of `runner` beginning now runs. transformers' early-exit
    drafting (`assistant_early_exit`) lowers `config.num_hidden_layers` for its drafts, and the decoder loop runs
    `self.layers[: self.config.num_hidden_layers]`. Only a value lowered below the one the config held when streaming
    was enabled counts (`None` otherwise: every layer), so a config whose `num_hidden_layers` means something else
    changes nothing."""
    config = getattr(runner, "config", None)
    enabled = getattr(config, "num_hidden_layers", None)

    def layers_run() -> int | None:
        k = getattr(config, "num_hidden_layers", None)
        lowered = isinstance(k, int) and isinstance(enabled, int) and 0 < k < min(enabled, n)
        return k if lowered else None

    return layers_run


class _HeadGrad:
    """The output head's weight requires grad as the loaded model's does: as the model's own parameter did when
    streaming was enabled (True, unless the caller froze it), and then as the caller sets it (`model.requires_grad_
    (False)`). `torch.matmul` chooses its kernel for the prompt pass's input by it (see `_fold_head_input`): a frozen
    loaded head multiplies a batch-sized copy of its weight, and gives other bits from batch 2 on, which the streamed
    head must give too. The `nn.Linear`s a model runs after its base model (`_outer_linears`: BERT's head transform)
    require grad as loaded too, with no alias; the other resident weights are loaded not requiring grad.

    With gradients on, the head's weight takes no part in autograd (README, Limits: no weight gets a gradient, and
    an input's backward pass holds none, but for those outer linears): each module holding the head's weight (the
    input embeddings too, where tied) swaps in an alias of it that does not require grad for its forward, put back
    as the forward leaves (by `post`, an always-call hook, which torch skips for an exception that is not an
    `Exception`: a Ctrl-C in the head's forward left the alias in for good, so the model's call puts back what its
    thread swapped in, `unwind`)."""

    def __init__(self, weight: nn.Parameter):
        self.weight = weight
        # id(module) -> [the weight it held, the forwards with gradients on under way with the alias in, the module],
        # while one is in: the head runs outside `PassGuard`, and a call from another thread meeting the alias leaves
        # it in until the last one leaves (put back by the first to leave, the other's forward read the weight itself:
        # a graph held it and its backward gave it a gradient)
        self.swapped: dict[int, list] = {}
        self.lock = threading.Lock()
        self.counted = threading.local()  # (`of`: id(module) -> the forwards of this thread counted there)

    def __reduce__(self):
        # a copy of a module it hooks (`copy.deepcopy(model.lm_head)`, `torch.save` of it) gets an inert one, for no
        # weight (the copy's is not this one): a plain module, as the loaded head's copy is (its lock and thread-local
        # counts made either fail with "cannot pickle '_thread.lock' object")
        return _HeadGrad, (None,)

    def pre(self, module: nn.Module, args):
        if not torch.is_grad_enabled():
            return
        with self.lock:
            entry = self.swapped.get(id(module))
            if entry is None:
                weight = module._parameters.get("weight")
                if weight is not self.weight or not weight.requires_grad:
                    return
                entry = self.swapped[id(module)] = [weight, 0, module]
                alias = nn.Parameter(weight.detach(), requires_grad=False)
                alias.stands_for = weight  # (what `_fold_head_input` and `_disable` read the flag of)
                module._parameters["weight"] = alias
            entry[1] += 1
        counted = self.counted.__dict__.setdefault("of", {})
        counted[id(module)] = counted.get(id(module), 0) + 1

    def post(self, module: nn.Module, args, output):
        counted = getattr(self.counted, "of", {})
        if not counted.get(id(module)):
            return  # (gradients off, or a frozen head: this forward swapped nothing in)
        counted[id(module)] -= 1
        self._leave(id(module), 1)

    def _leave(self, key: int, forwards: int) -> None:
        with self.lock:
            entry = self.swapped[key]
            entry[1] -= forwards
            if not entry[1]:
                del self.swapped[key]
                entry[2]._parameters["weight"] = entry[0]

    def counts(self) -> dict:
        """This thread's forwards under way with the alias in, by module (`unwind`'s mark)."""
        return dict(getattr(self.counted, "of", {}))

    def unwind(self, mark: dict) -> None:
        """A call that raised: the forwards of this thread it began and `post` did not see leave (a Ctrl-C: torch
        runs always-call hooks on an `Exception` only) put their weight back, down to the counts of `mark`."""
        counted = getattr(self.counted, "of", {})
        for key, n in list(counted.items()):
            left = n - mark.get(key, 0)
            if left > 0:
                counted[key] = n - left
                self._leave(key, left)


def _follow_head_grad(model: nn.Module, head: nn.Module, wants_grad: bool, handles: list) -> _HeadGrad | None:
    """See `_HeadGrad`: the head's weight, as resident on the device (a weight kept in host RAM has its placeholder
    there, which `HostResidentHook` follows), made to require grad as `wants_grad`, and the modules holding it
    hooked; the `_HeadGrad` hooking them, if any."""
    weight = head._parameters.get("weight")
    if not isinstance(weight, nn.Parameter) or not (weight.is_floating_point() or weight.is_complex()):
        return None
    weight.requires_grad_(wants_grad)
    if isinstance(weight, HostResident):
        return None
    swap = _HeadGrad(weight)
    for module in model.modules():
        if module._parameters.get("weight") is weight:
            handles.append(module.register_forward_pre_hook(swap.pre))
            handles.append(module.register_forward_hook(swap.post, always_call=True))
    return swap


@functools.lru_cache(maxsize=64)
def _source_of(forward) -> str | None:
    """The source of a model class's `forward`, `None` where it cannot be read: read once for each function (a few
    milliseconds, its modeling file's lines tokenized), where every enable of a model of its class asked for it. Keyed
    by the function, not the class: a forward the class is given since is read in turn."""
    try:
        return inspect.getsource(forward)
    except (OSError, TypeError):
        return None


def _outer_linears(model: nn.Module, head) -> list[nn.Module]:
    """The `nn.Linear`s of a model outside its base model that its forward runs after the base model, the head aside:
    the BERT family's head transform (BERT's `cls.predictions.transform.dense`, RoBERTa's and ModernBERT-decoder's
    `lm_head.dense`, ELECTRA's `generator_predictions.dense`), which takes the slice of the last positions `generate`
    keeps, as the head does: `matmul` chooses its kernel for it by the weight's flag (see `_fold_head_input`), and
    frozen it gave logits 1e-7 off for a batch of prompts. Their weights require grad as the loaded model's (as the
    model's own did when streaming was enabled), with the head's pre-hook; unlike the head's, no alias stands in for
    them with gradients on: they take part in autograd, and get gradients, as the loaded ones do (a small graph from
    the base model's output on). "After": the model's forward names the module's top-level attribute only after its
    first call of the base model (`self.bert(`), read in its source. One named before may feed the base model (the
    Gemma-4 assistants' `pre_projection`): requiring grad, it made a plain forward pass with gradients on record a
    graph through every layer. Those, the ones inside the base model (a vision-language model's projector) and all
    of a model whose forward's source cannot be read are loaded frozen, as the other resident weights."""
    base = getattr(model, "base_model", model)
    prefix = getattr(model, "base_model_prefix", None)
    if not isinstance(base, nn.Module) or base is model or not isinstance(prefix, str) or not prefix:
        return []
    try:
        source = _source_of(type(model).forward)
    except TypeError:  # (a forward that is no function, and unhashable: no source either)
        return []
    if source is None:
        return []
    call = re.search(rf"\bself\.{re.escape(prefix)}\(", source)
    if call is None:
        return []
    inside = {id(m) for m in base.modules()}
    outer = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head and id(module) not in inside:
            first = re.search(rf"\bself\.{re.escape(name.split('.')[0])}\b", source)
            if first is not None and first.start() > call.start():
                outer.append(module)
    return outer


def _set_tensor(module: nn.Module, attr: str, value: torch.Tensor, is_param: bool) -> None:
    if is_param:
        module._parameters[attr] = mark_loaded(nn.Parameter(value, requires_grad=False))
    else:
        module._buffers[attr] = mark_loaded(value)


def _foldable(x: torch.Tensor) -> bool:
    """Whether `torch.matmul` folds `x` (3-D or more) into a matrix by a view, as torch's `should_fold` checks up to
    torch 2.13 (from 2.14 it skips size-1 dimensions too: it folds more, never less)."""
    return all(x.stride(i) == x.stride(i + 1) * x.size(i + 1) for i in range(x.dim() - 2))


def _fold_head_input(module: nn.Module, args: tuple):
    """Forward pre-hook of the output head (and of the linears a model runs after its base model, `_outer_linears`):
    give it its input in strides `matmul` folds into a matrix.

    `generate` feeds the head `hidden_states[:, -1:, :]` in the prompt pass. For a weight that requires grad (every
    weight `from_pretrained` loads), `matmul` folds that into a matrix (`reshape(-1, hidden)`, a view) and calls
    `mm`; for one that does not (ours), torch up to 2.13 folds only inputs whose strides say so (2.14 skips size-1
    dimensions, so it folds this slice too), and calls `bmm` on the weight expanded to the batch and copied
    otherwise: 0.3-0.4 s per prompt pass for a 131 MB head on this machine instead of 6 ms, batch times the head's
    memory, and other bits in bf16 logits from batch 2 on. The strides of size-1
    dimensions address nothing: set so that the fold check passes, the head takes the fully loaded model's path,
    `mm` on the same view. Inputs that cannot be folded by a view are copied, as `reshape` copies them there (for a
    module with a bias, see `_folding_copy`).
    The head's weight requires grad as the loaded model's does (see `_HeadGrad`), so a head the caller froze is
    left to the path the loaded model takes then.
    """
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() < 3 or _foldable(x):
        return None
    weight = module._parameters.get("weight")
    weight = getattr(weight, "stands_for", weight)  # (another thread's forward with gradients on has an alias in)
    if isinstance(weight, torch.Tensor) and not weight.requires_grad:
        return None  # (the caller froze the head, as `model.requires_grad_(False)` does: the loaded one's `bmm` then)
    if _in_grad_transform():
        return None  # (inside `torch.func.grad` a weight not lifted into the transform counts as frozen for `matmul`)
    try:  # (where `reshape` would view it as a matrix, as the loaded head's `matmul` does: the same addresses)
        row = x.view(-1, x.size(-1)).stride(0)
    except RuntimeError:
        row = None
    if row is not None:
        strides, n = list(x.stride()), 1
        for i in range(x.dim() - 2, -1, -1):
            strides[i] = row * n
            n *= x.size(i)
        strides[-1] = x.stride(-1)
    else:
        strides = list(x.stride())
        for i in range(x.dim() - 2):
            if x.size(i + 1) == 1:
                strides[i + 1] = strides[i]
    folded = x.as_strided(x.shape, strides, x.storage_offset())
    if not _foldable(folded):
        biased = isinstance(module._parameters.get("bias"), torch.Tensor)
        if biased and x.is_contiguous():
            return None  # (`F.linear` takes it to its fused `addmm` whatever the weight's flag: so does the loaded one)
        folded = _folding_copy(x) if biased else x.clone(memory_format=torch.contiguous_format)
    return (folded, *args[1:])


def _folding_copy(x: torch.Tensor) -> torch.Tensor:
    """A copy of `x` that `torch.matmul` folds into a matrix by a view and that is not contiguous: each row of its last
    dimension padded by 64 bytes (the rows start where the contiguous copy's do, modulo 64 bytes). `F.linear` sends a
    contiguous 3-D input with a bias to a fused `addmm`, where the loaded model's input (the slice of several last
    positions, `logits_to_keep` > 1, of a batch) goes to `matmul`, which copies it (`reshape`), calls `mm` and adds
    the bias after: other bits in bfloat16 and float16 (Phi's and GPT-J's biased heads gave 0.002 off). This one goes
    to `matmul` too, which multiplies the same rows by `mm` (checked bit for bit on this machine in float32, float16
    and bfloat16; a padding of one element gave other float32 bits)."""
    pad = max(64 // x.element_size(), 1)  # (out of place: under `torch.func.vmap` too)
    return torch.nn.functional.pad(x, (0, pad))[..., : x.shape[-1]]


def _load_dtype(shards: ShardDirectory, dtype: torch.dtype | None) -> torch.dtype | None:
    """`dtype`, else the one `from_pretrained(dtype="auto")` loads the checkpoint at (see `_target_dtypes`)."""
    from ._safetensors import str_to_dtype

    auto = shards.manifest.load_dtype
    return dtype or (str_to_dtype(auto) if auto is not None else None)


def _target_dtypes(shards: ShardDirectory, dtype: torch.dtype | None, model: nn.Module) -> dict[str, torch.dtype]:
    """The dtypes the model will compute in, for floating tensors: `dtype`, else the one `from_pretrained(dtype="auto")`
    loads the checkpoint at (the manifest's `load_dtype`: the config's dtype, whatever each tensor is stored in; the
    stored ones for a directory split before it was recorded); float32, as `from_pretrained` loads them, for the
    weights the model keeps in float32 at that dtype (see `kept_in_float32`), and their own dtype for those the
    model creates in another one (see `created_dtypes`)."""
    from .modeling import created_dtypes, kept_in_float32

    kept = {d: kept_in_float32(model, d) for d in (torch.float16, torch.bfloat16)}
    load = _load_dtype(shards, dtype)
    created = created_dtypes(model, load) if load is not None else {}
    out = {}
    for unit in shards.manifest.units.values():
        for name, entry in unit.tensors.items():
            target = entry.dtype
            if entry.dtype.is_floating_point:
                target = load or entry.dtype
                pattern = kept.get(target)
                if pattern is not None and pattern.search(name):
                    target = torch.float32
                elif load is not None:
                    target = created.get(name, target)
            out[name] = target
    return out


def host_candidates(shards: ShardDirectory, dtype: torch.dtype | None = None) -> list[tuple[str, int, int]]:
    """The resident parts a GPU plan may keep in host RAM (`plan_residency`'s `host_candidates`), as
    `enable_layer_streaming` finds them, from the model the shard directory's config builds (without weights): what
    `hf-layerstream inspect` plans with."""
    model = _skeleton(shards)
    parts = _host_parts(model, require_layer_stack(model), shards, _target_dtypes(shards, dtype, model))
    return [p.candidate for p in parts]


def _skeleton(shards: ShardDirectory) -> nn.Module:
    """The model the shard directory's config builds, without weights."""
    from transformers import AutoConfig

    from .modeling import build_for_shards

    return build_for_shards(shards.manifest, AutoConfig.from_pretrained(shards.path))


def _check_options(
    dtype, prefetch, keep_in_page_cache, dequantize
) -> tuple[torch.dtype | None, int | None, str | None]:
    """`enable_layer_streaming`'s (and `plan_shard_dir`'s) options checked; the dtype as a `torch.dtype` (or `None`),
    `prefetch` as an `int` (or `None`): NumPy's integers are taken, as `max_memory`'s sizes are (they were refused
    as not an int), and made Python's, so the plan's `to_dict()` stays JSON; and `dequantize` in lower case (or
    `None`): it is case-insensitive, as `compression` is ("Module" was refused)."""
    dtype = resolve_dtype(dtype)
    # (a wrong type is a TypeError, as for `verify` and the paths; a value of the right type out of range a ValueError)
    if prefetch is not None:
        if not isinstance(prefetch, numbers.Integral) or isinstance(prefetch, bool):
            raise TypeError(f"`prefetch` must be a non-negative int, got {type(prefetch).__name__} {prefetch!r}.")
        if prefetch < 0:
            raise ValueError(f"`prefetch` must be a non-negative int, got {prefetch!r}.")
        prefetch = int(prefetch)
    if keep_in_page_cache is not None and not isinstance(keep_in_page_cache, bool):
        raise TypeError(f"`keep_in_page_cache` must be True, False or None (automatic), got {keep_in_page_cache!r}.")
    if dequantize is not None:
        if not isinstance(dequantize, str):
            raise TypeError(f"`dequantize` must be 'layer', 'module' or None (automatic), got {dequantize!r}.")
        if dequantize.strip().lower() not in DEQUANTIZE_MODES:
            raise ValueError(f"`dequantize` must be 'layer', 'module' or None (automatic), got {dequantize!r}.")
        dequantize = dequantize.strip().lower()
    return dtype, prefetch, dequantize


def plan_shard_dir(
    shards: ShardDirectory,
    device: torch.device,
    *,
    dtype: torch.dtype | str | None = None,
    prefetch: int | None = None,
    dequantize: str | None = None,
    max_memory: dict | None = None,
    keep_in_page_cache: bool | None = None,
    reserve: int | str | None = None,
) -> ResidencyPlan:
    """The plan `enable_layer_streaming` would make for the shard directory's model with these arguments, from a
    skeleton built from its config (what `hf-layerstream inspect` shows; `device` may be one this machine lacks, given
    a budget for it in `max_memory`). The arguments are checked as `enable_layer_streaming` checks them."""
    dtype, prefetch, dequantize = _check_options(dtype, prefetch, keep_in_page_cache, dequantize)
    reserve = check_reserve(reserve)
    model = _skeleton(shards)
    stack = require_layer_stack(model)
    target_dtypes = _target_dtypes(shards, dtype, model)
    parts = _host_parts(model, stack, shards, target_dtypes) if device.type == "cuda" else []
    return plan_streaming(
        shards,
        device,
        target_dtypes=target_dtypes,
        prefetch=prefetch,
        dequantize=dequantize,
        deferrable=deferrable_weights(model, stack, shards),
        max_memory=max_memory,
        keep_in_page_cache=keep_in_page_cache,
        host_candidates=[p.candidate for p in parts],
        reserve=reserve,
    )


DEQUANTIZE_MODES = ("layer", "module")


def deferrable_weights(model: nn.Module, stack: LayerStack, shards: ShardDirectory) -> frozenset[str]:
    """The quantized layer weights that can be dequantized one module at a time (`dequantize="module"`): the weights
    of `nn.Linear` modules (whose forward pass computes with them; any other use during the layer's pass gets the
    weight dequantized for that operation, see `hooks.Packed`), not shared with another module; their full names."""
    owners: dict[int, int] = {}
    for _, p in stack.layers.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    out: set[str] = set()
    # (the layers both have: `inspect` plans a model whose config.json has more layers than the manifest, and warns)
    for i, layer in enumerate(list(stack.layers)[: shards.num_layers]):
        prefix = stack.layer_prefix(i)
        for name, entry in shards.unit(layer_unit(i)).tensors.items():
            if entry.quant is None or not name.startswith(prefix):
                continue
            module, attr = get_submodule_attr(layer, name[len(prefix) :])
            weight = module._parameters.get(attr) if isinstance(module, nn.Linear) else None
            if attr == "weight" and weight is not None and owners.get(id(weight)) == 1:
                out.add(name)
    return frozenset(out)


def plan_streaming(
    shards: ShardDirectory,
    device: torch.device,
    *,
    target_dtypes: dict[str, torch.dtype],
    prefetch: int | None,
    dequantize: str | None,
    deferrable: Collection[str] = (),
    max_memory: dict | None = None,
    keep_in_page_cache: bool | None = None,
    host_candidates: list[tuple[str, int, int]] | None = None,
    reserve: int | None = None,
) -> ResidencyPlan:
    """The residency plan `enable_layer_streaming` (and `hf-layerstream inspect`) runs with.

    `prefetch=None`: the default, lowered until the device's budget holds it (on CPU, a `max_memory["cpu"]` given;
    on a GPU, its budget and a `max_memory["cpu"]` given, for the pinned staging buffers; `fit_prefetch`).
    `dequantize=None`: "layer" unless the shards are quantized and a GPU's budget cannot keep every layer on it
    dequantized: then "module" (the layers in flight and kept on the GPU are held packed, about a quarter of their
    size at 4 bits, so more fit; each weight is dequantized as its module runs: a memory-bound kernel there, against
    the copy over PCIe). On CPU dequantizing is slow (about 2 GB/s of output here), so the loader does it
    ahead of the compute there unless asked.
    `reserve` (bytes, checked by `check_reserve`): on a GPU, the room left free for activations and the KV cache
    (`None`: the default, see `plan_residency`); on CPU ignored, with a warning where it is not 0.
    """
    if reserve and device.type == "cpu":
        logger.warning(
            "`reserve` (%s) is room kept free on a GPU for activations and the KV cache; the model streams on the "
            "CPU, where they take host RAM and the plan keeps none: ignored. Pass device='cuda' to stream on a GPU.",
            size_text(reserve),
        )
    n = shards.num_layers
    chosen = prefetch is not None
    if prefetch is None:
        prefetch = default_prefetch(device, shards)
    elif prefetch > max(n - 1, 0):
        # (the plan takes at most n - 1, as the loader reads it, `plan_residency`: a `prefetch` given beyond that was
        # lowered without a word, where `inspect` and the plan showed another number than the one asked)
        logger.warning(
            "`prefetch` (%d) is more layers than can be read ahead of the compute, at most one fewer than the model's "
            "%d layers: the plan reads %d ahead. Pass prefetch=%d or less.",
            prefetch,
            n,
            max(n - 1, 0),
            max(n - 1, 0),
        )

    def fitted(deferred: frozenset) -> ResidencyPlan:
        scratch = max(
            (
                entry.numel * target_dtypes.get(name, entry.dtype).itemsize
                for i in range(n)
                for name, entry in shards.unit(layer_unit(i)).tensors.items()
                if name in deferred
            ),
            default=0,
        )
        plan_for = functools.partial(
            plan_residency,
            shards,
            device,
            dtype_size={i: shards.unit(layer_unit(i)).nbytes_as(target_dtypes, deferred) for i in range(n)},
            resident_size=shards.unit(RESIDENT).nbytes_as(target_dtypes),
            max_memory=max_memory,
            keep_in_page_cache=keep_in_page_cache,
            host_candidates=host_candidates,
            dequantize="module" if deferred else "layer",
            scratch=scratch,
            reserve=reserve,
        )
        if chosen:
            return plan_for(prefetch=prefetch)
        plan = fit_prefetch(lambda p: plan_for(prefetch=p), base_prefetch(device, prefetch), max_memory)
        return deepen_prefetch(plan, lambda p: plan_for(prefetch=p), prefetch)

    deferrable = frozenset(deferrable)
    if dequantize == "module" and not deferrable:  # (taken as "layer", and said so)
        logger.warning(
            "`dequantize='module'`: %s; its layers are dequantized whole, as with 'layer'.",
            f"{shards.path} holds full-precision layers (nothing to dequantize)"
            if shards.compression is None
            else "no quantized weight of its layers is an `nn.Linear`'s (GPT-2's `Conv1D`) to dequantize as it runs",
        )
    if dequantize == "module" or not deferrable:
        plan = fitted(deferrable if dequantize == "module" else frozenset())
    else:
        plan = fitted(frozenset())
        if dequantize is None and device.type == "cuda" and len(plan.device_layers) < n:
            plan = fitted(deferrable)
    if reserve is not None:  # (against the budget the plan was made with: the default one, a share of free memory)
        check_reserve_fits(plan, max_memory)
    return plan


@dataclass
class _HostPart:
    """A resident module that may be kept in host RAM (see `plan_residency`'s `host_candidates`)."""

    name: str  # "input_embeddings" or "output_embeddings"
    module: nn.Module
    module_name: str
    tensors: list[str]  # its parameters' full names in the resident unit
    size: int  # their bytes at the model's dtypes
    copied: int  # bytes copied to the device for each forward pass when it is kept in host RAM

    @property
    def candidate(self) -> tuple[str, int, int]:
        """As `plan_residency` takes it: `(name, bytes, bytes copied for each forward pass)`."""
        return self.name, self.size, self.copied


def _host_parts(model: nn.Module, stack: LayerStack, shards: ShardDirectory, target_dtypes: dict) -> list[_HostPart]:
    """The input embeddings, then the output head (unless tied to them: then the embeddings' host tensor serves the
    head too, copied to the device for each pass), where they are modules of their own with parameters in the
    resident unit."""
    names = {id(m): n for n, m in model.named_modules()}
    unit = shards.unit(RESIDENT).tensors
    tied = tied_targets(model)

    def nbytes(names: list[str]) -> int:  # at the model's dtypes
        return sum(unit[n].numel * target_dtypes.get(n, unit[n].dtype).itemsize for n in names)

    parts: list[_HostPart] = []
    for kind, getter in (("input_embeddings", "get_input_embeddings"), ("output_embeddings", "get_output_embeddings")):
        try:
            module = getattr(model, getter)() if hasattr(model, getter) else None
        except (NotImplementedError, AttributeError):
            module = None
        if not isinstance(module, nn.Module) or id(module) not in names:
            continue
        prefix = names[id(module)] + "." if names[id(module)] else ""
        own = [prefix + n for n, _ in module.named_parameters()]
        tensors = [n for n in own if n in unit and stack.unit_of(n) == RESIDENT]
        size = nbytes(tensors)
        if kind == "output_embeddings":
            if parts and any(tied.get(n) in parts[0].tensors for n in own):  # tied to the embeddings
                embeddings = parts[0]
                sources = [tied[n] for n in own if tied.get(n) in embeddings.tensors]
                embeddings.copied = nbytes(sources)
            if not tensors:
                continue
            parts.append(_HostPart(kind, module, names[id(module)], tensors, size, size))
        elif tensors:
            parts.append(_HostPart(kind, module, names[id(module)], tensors, size, 0))
    return parts


def _dequantize_per_module(
    hook: LayerStreamingHook,
    prefix: str,
    deferred: frozenset[str],
    target_dtypes: dict,
    device: torch.device,
    handles: list,
) -> None:
    """Give a layer hook's slots of packed weights their `Packed` placeholders, and their modules the hooks that
    dequantize them as they run (`ModuleDequantizer`)."""
    per_module: dict[int, tuple[nn.Module, list]] = {}
    for k, (module, attr, rel, _) in enumerate(hook.slots):
        name = prefix + rel
        if name not in deferred:
            continue
        shape = module._parameters[attr].shape
        placeholder = Packed(name, shape, target_dtypes[name], device)
        placeholder._hook, placeholder.slot = weakref.ref(hook), k  # (kept by `nn.Parameter`'s detach: `Packed._copy`)
        hook.packed_placeholders[k] = nn.Parameter(placeholder, requires_grad=False)
        per_module.setdefault(id(module), (module, []))[1].append((attr, k))
    for module, slots in per_module.values():
        dequantizer = ModuleDequantizer(hook, slots)
        handles.append(module.register_forward_pre_hook(dequantizer.pre))
        handles.append(module.register_forward_hook(dequantizer.post, always_call=True))


def _put_back_host(hook: HostResidentHook, module: nn.Module, args, output) -> None:
    hook._unload()


def _keep_on_host(model: nn.Module, parts: list[_HostPart], values: dict, loader: LayerLoader, handles: list):
    """Hook the resident modules the plan keeps in host RAM (after `tie_weights`: a tied head holds the embeddings'
    placeholder and is hooked too, copying the host tensor to the device)."""
    host = {n: values[n] for part in parts for n in part.tensors}
    device, copy_stream = loader.device, loader.copy_stream
    hooked = []
    for module in model.modules():
        slots = []
        for attr, p in module._parameters.items():
            if isinstance(p, HostResident):
                slots.append((module, attr, True, host[p.source]))
        if not slots:
            continue
        on_host = any(module is part.module and part.name == "input_embeddings" for part in parts)
        if on_host:  # buffers go to the host for the pass too (Gemma's `embed_scale` is multiplied in there)
            slots += [(module, attr, False, b.to("cpu")) for attr, b in module._buffers.items() if b is not None]
        hook = HostResidentHook(
            slots,
            device,
            on_host=on_host,
            copy_stream=copy_stream,
            profile=loader.profile,
            before_copy=loader.wait_released_passed,
        )
        _attach(module, hook)
        handles.append(_CopyRefusal(module))  # (its shallow copy shared the hook: see `_CopyRefusal`)
        handles.append(module.register_state_dict_post_hook(host_state_dict_hook))
        # a call of the module itself that raises (e.g. `model.get_output_embeddings()(x)` out of memory) never reaches
        # accelerate's post-forward: put the placeholders back as it leaves (after one that returned, again: a no-op)
        handles.append(module.register_forward_hook(functools.partial(_put_back_host, hook), always_call=True))
        hooked.append(module)
    return hooked


def enable_layer_streaming(
    model: nn.Module,
    shard_dir: str | os.PathLike,
    *,
    device: str | int | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    max_memory: dict | None = None,
    reserve: int | str | None = None,
    prefetch: int | None = None,
    profile: bool = False,
    verify: bool = False,
    keep_in_page_cache: bool | None = None,
    dequantize: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> nn.Module:
    """Stream a model's decoder layers from a shard directory, in place; returns the same model.

    The model must be built without weights (`accelerate.init_empty_weights()` or `torch.device("meta")` around
    `AutoModelForCausalLM.from_config`). The resident parts (embeddings, final norm, head) are loaded on `device`;
    each decoder layer gets a hook that makes its weights present just before its forward pass and releases them
    after. `model.generate`, `pipeline(...)`, streamers and assisted decoding work unchanged. As `from_pretrained`
    does, the model is put in evaluation mode (`from_config` builds it in training mode, with dropout on); call
    `model.train()` afterwards to have dropout. And as it does, the checkpoint's `generation_config.json` (copied
    into the shard directory by the split: extra end-of-sequence ids, sampling defaults) becomes the model's
    `generation_config`, unless the model has one other than the one derived from its config, or changed it
    (disabling streaming puts the model's own back).

    Args:
        model (`transformers.PreTrainedModel`):
            A causal LM built on the meta device.
        shard_dir (`str` or `os.PathLike`):
            A shard directory made by [`split_checkpoint`], or the id of a hub repo holding one (`"org/name"`, where
            no folder of that name is here): its manifest is fetched and checked against the model, then its files
            are downloaded into the hub cache, as `from_pretrained` downloads a model.
        device (`str`, `int` or `torch.device`, *optional*):
            Execution device; defaults to CUDA when available, else CPU.
        dtype (`torch.dtype` or `str`, *optional*):
            Compute dtype for floating-point weights (a `torch.dtype` or its name, `"auto"` for the default, as
            `from_pretrained` takes it); defaults to the one `from_pretrained(dtype="auto")` loads the
            checkpoint at (the config's dtype, recorded by the split; the stored dtypes for a directory split before
            it was recorded). As `from_pretrained` does, the weights the model keeps in float32 at float16/bfloat16
            (`_keep_in_fp32_modules(_strict)`, e.g. DeepSeek-V3's router) stay float32, and those it creates in
            another dtype (Mamba's and Olmo-Hybrid's `A_log`) keep it. Given, it is set on the model's config and
            sub-configs too, as `from_pretrained(dtype=...)` sets it (disabling streaming puts theirs back).
        max_memory (`dict`, *optional*):
            Memory budget in accelerate's convention, e.g. `{0: "4GiB", "cpu": "16GiB"}`: layers that fit stay on
            the device or in host RAM, the rest are streamed from disk. Defaults to a safe share of free memory
            (half of the available host memory, 80% of free device memory). The available host memory is
            MemAvailable, or the room left under the memory limit of the process's cgroup where that is less (in a
            container, a Kubernetes pod, a Slurm job). On CPU every layer that fits is kept (as a zero-copy file
            map), which is what makes decoding from a warm page cache run at in-memory speed.
            Keys as accelerate takes them: GPU indices, `"cpu"`, `"disk"` (ignored: the shards are the disk);
            any other key, or a value that is not a size, raises `ValueError` (a key or value of another type than
            those, `TypeError`). A GPU budget that cannot hold the resident parts with the layers in flight keeps
            the input embeddings, then the output head, in host RAM (looked up there; copied to the GPU for each
            pass), with placeholders on the GPU between passes.
        reserve (`int` or `str`, *optional*):
            On a GPU: the part of its budget left free for activations and the KV cache, which the plan does not
            fill with layers, as bytes or a size as `max_memory` takes them (`"3GiB"`). Defaults to a tenth of the
            device budget, at most 2 GiB; a long context or a large batch needs more, a small GPU may do with less
            (0: none). Counted wherever the plan is fitted to the budget (the layers kept, the resident parts moved
            to host RAM, the default `prefetch` lowered) and in the warning of a budget too small. One larger than
            the device budget (other than 0) raises `ValueError`, as does a value that is not a size (a bool, a
            list: `TypeError`). A budget of 0 (every layer streamed, no limit) leaves it unused; on CPU it is
            ignored, with a warning (activations take host RAM there, outside the plan).
        prefetch (`int`, *optional*):
            How many streamed layers are read ahead of the compute, at most one fewer than the layers (one given
            beyond that is lowered to it, with a warning). Default on CPU: 3 with full-precision shards, 2 with
            quantized ones (the fastest from a cold page cache in our measurements); on CUDA: as many layers as
            hold 320 MiB as stored, from 2 to 8, where that gives up no layer the plan would keep on the GPU at 2
            (else 2). Each one more holds one more layer in memory. On a GPU whose budget cannot hold the resident
            parts and that many layers in flight, the default is lowered until it can (down to 0); on CPU, until
            they fit in `max_memory["cpu"]`, when given and not 0.
        profile (`bool`, defaults to `False`):
            Record per-layer timings; see [`get_streaming_state`]`(model).profile`, and `.last_profile`: the last
            `generate` call's (its own, where calls run at once from several threads).
        keep_in_page_cache (`bool`, *optional*):
            CPU: whether streamed layers' file pages stay in the page cache after use, so later sweeps read them
            from RAM. By default they stay while they fit in 80% of the available memory together with the kept
            layers; streamed layers beyond that are dropped after use (`POSIX_FADV_DONTNEED`), since a sweep over
            more than fits would evict each one before its next use anyway. `False` drops every streamed layer
            after use (nothing of the model is left cached: what a model far larger than RAM gets); `True` leaves
            all to the kernel.
        dequantize (`str`, *optional*):
            Quantized shards: `"layer"` dequantizes a layer's weights as the loader brings it in, ahead of the
            compute; `"module"` holds layers packed (kept and in flight) and dequantizes each `nn.Linear` weight on
            the device as its module runs, so a layer takes about its packed size in memory (plus the largest weight
            dequantized), not its full size. The output is the same, bit for bit. Default: `"layer"` on CPU, where
            dequantizing is slow and overlaps the compute in the loader; on a GPU `"module"` when its budget cannot
            keep every layer on it dequantized, else `"layer"`. Ignored for full-precision shards.
        verify (`bool`, defaults to `False`):
            Hash every shard file in full and compare with the manifest before loading. Sizes, headers and a
            sample digest of every file are always checked.
        revision (`str`, *optional*):
            For a hub repo `shard_dir`: the branch, tag or commit to stream (default: its default branch), as
            `from_pretrained` takes it. Every file comes from the commit its manifest was fetched at.
        token (`str` or `bool`, *optional*):
            For a hub repo `shard_dir`: the token to download with (a private or gated repo; default: the one
            huggingface_hub finds, `hf auth login` or HF_TOKEN).

    Returns:
        The same `model`, ready to run.

    Example:
    ```python
    >>> from accelerate import init_empty_weights
    >>> from transformers import AutoConfig, AutoModelForCausalLM
    >>> from hf_layerstream import enable_layer_streaming
    >>> with init_empty_weights():
    ...     model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("llama3-8b.layers"))
    >>> model = enable_layer_streaming(model, "llama3-8b.layers")
    >>> model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=20)
    ```
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(
            f"`model` must be a transformers PreTrainedModel (built with AutoModelForCausalLM.from_config), got "
            f"{type(model).__name__}."
        )
    with _model_lock(model):  # (two threads enabling one model at once: the second is refused, as one after the other)
        return _enable(
            model,
            shard_dir,
            device,
            dtype,
            max_memory,
            prefetch,
            profile,
            verify,
            keep_in_page_cache,
            dequantize,
            revision,
            token,
            reserve,
        )


# a lock per model for enabling and disabling it: two threads enabling one model at once both went on (the state is
# set at the end), and one's loader, its threads and maps, lived on unclosed
_MODEL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def _model_lock(model: nn.Module) -> threading.RLock:
    with _MODEL_LOCKS_GUARD:
        try:
            return _MODEL_LOCKS.setdefault(model, threading.RLock())
        except TypeError:  # (a model that cannot be a weak key: unhashable; not shared then)
            return threading.RLock()


def _enable(
    model,
    shard_dir,
    device,
    dtype,
    max_memory,
    prefetch,
    profile,
    verify,
    keep_in_page_cache,
    dequantize,
    revision,
    token,
    reserve=None,
) -> nn.Module:
    if get_streaming_state(model) is not None:
        raise ValueError(
            "Layer streaming is already enabled on this model; call `disable_layer_streaming(model)` first."
        )
    device = check_device(device)
    dtype, prefetch, dequantize = _check_options(dtype, prefetch, keep_in_page_cache, dequantize)
    profile, verify = check_flag("profile", profile), check_flag("verify", verify)
    reserve = check_reserve(reserve)
    # (`max_memory`'s type, keys and sizes, as the plan checks them, before a hub repo's layers download: they were
    # checked as the plan was made, after the download, unless `reserve` was given)
    check_max_memory(max_memory)
    # (checked before a hub repo's layers download, against the budget given, or the default one, a share of the free
    # memory, which the plan reads again)
    if reserve is not None and device.type != "cpu":
        check_reserve_within(reserve, device, max_memory, functools.partial(default_device_budget, device))
    _refuse_adapters(model)
    stack = require_layer_stack(model)
    if not callable(getattr(model, "generate", None)):
        # (an encoder, a masked LM: `BertForMaskedLM` holds the tensors of a BERT causal LM's split, passed every check
        # against it and failed as streaming wrapped `generate`, with transformers' AttributeError)
        raise TypeError(
            f"`model` is a {type(model).__name__}, which has no `generate`: layer streaming runs causal LMs and "
            "vision-language models (their decoder layers). Build the model the shard directory was split for: "
            "`AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shard_dir))` under `init_empty_weights()` "
            "(`AutoModelForImageTextToText` for a vision-language one)."
        )
    _refuse_weights_changed_by_forward(model)
    for name, module in model.named_modules():
        if isinstance(getattr(module, "_hf_hook", None), (LayerStreamingHook, HostResidentHook)):
            raise ValueError(
                f"Module {name or type(model).__name__!r} holds a hook of an `enable_layer_streaming` that failed part "
                "way and could not undo itself. Build the model again (under `init_empty_weights()`) and enable "
                "streaming on it."
            )
        if hasattr(module, "_hf_hook"):
            raise ValueError(
                f"Module {name or type(model).__name__!r} already has an accelerate hook (the model was dispatched with "
                "a `device_map`). Build the model with `init_empty_weights()` and no device_map, then enable streaming."
            )
    local = local_shard_dir(shard_dir, weights=False, revision=revision, token=token)
    if local is not shard_dir:  # (a hub repo: checked against the model by its manifest before its layers download)
        _check_match(model, stack, ShardDirectory(local, check_files=False))
        shard_dir = hub_shard_files(shard_dir, local, token=token)
    shards = ShardDirectory(shard_dir, checksums=verify)
    chosen = prefetch is not None
    default = default_prefetch(device, shards)
    _check_match(model, stack, shards)
    _check_conversion(model, shards)
    if shards.compression is not None:
        from .quant import load_backend

        load_backend()  # a missing bitsandbytes fails here, before any hook; its slow import stays off the hot path
    # (the whole model's: a model loaded with `from_pretrained` holds its embeddings and head too, replaced as well;
    # and kept, as every original is, for `disable_layer_streaming` to give back: not freed by it)
    loaded = sum(p.numel() for p in model.parameters() if not p.is_meta)
    if loaded:
        logger.warning(
            "The model already holds %d loaded parameters; streaming computes with the shard directory's weights "
            "instead, and keeps the loaded ones for `disable_layer_streaming` to put back, so they stay in memory, "
            "unused, as long as the model. Build the model under `init_empty_weights()` to save that memory.",
            loaded,
        )

    target_dtypes = _target_dtypes(shards, dtype, model)

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = head._parameters.get("weight") if isinstance(head, nn.Module) else None
    head_wants_grad = isinstance(head_weight, torch.Tensor) and head_weight.requires_grad  # (see `_HeadGrad`)
    outer = [(m, m._parameters.get("weight")) for m in _outer_linears(model, head)]  # (their own weights before)
    originals: list[tuple[nn.Module, str, bool, object]] = []
    for module in model.modules():
        for attr, p in module._parameters.items():
            originals.append((module, attr, True, p))
        for attr, b in module._buffers.items():
            originals.append((module, attr, False, b))

    layer_prefixes = [stack.layer_prefix(i) for i in range(len(stack))]
    host_parts = _host_parts(model, stack, shards, target_dtypes)
    deferrable = deferrable_weights(model, stack, shards)
    plan = plan_streaming(
        shards,
        device,
        target_dtypes=target_dtypes,
        prefetch=prefetch,
        dequantize=dequantize,
        deferrable=deferrable,
        max_memory=max_memory,
        keep_in_page_cache=keep_in_page_cache,
        host_candidates=[p.candidate for p in host_parts],
        reserve=reserve,
    )
    base = base_prefetch(device, default)
    # (the plan reads at most n - 1 layers ahead, whatever the default: not a budget's lowering)
    if not chosen and plan.prefetch < min(base, max(len(plan.layer_bytes) - 1, 0)):
        key = "cpu" if device.type == "cpu" else str(device.index)
        name = "max_memory['cpu']" if device.type == "cpu" else "the device budget"
        what = "the resident parts and more layers in flight"
        if plan.reserve:  # (counted as `fit_prefetch` counts it)
            what += f" beside the `reserve` for activations and the KV cache ({size_text(plan.reserve)})"
        # (on a GPU, a `max_memory["cpu"]` lowers it too, for the pinned staging buffers: `fit_prefetch`)
        if device.type != "cpu" and not _over_budget(replace(plan, prefetch=plan.prefetch + 1)):
            key, name, what = "cpu", "max_memory['cpu']", "the pinned staging buffers of more layers in flight"
        room = f"{name} ({size_text(plan.budgets[key])})"
        logger.info(
            "prefetch lowered to %d from the default %d: %s cannot hold %s. Pass `prefetch=` to choose it.",
            plan.prefetch,
            base,
            room,
            what,
        )
    prefetch = plan.prefetch
    deferred = deferrable if plan.dequantize == "module" else frozenset()
    host_parts = [p for p in host_parts if p.name in plan.host_resident]
    for warning in budget_warnings(plan, max_memory):
        logger.warning(warning)
    prof = Profile() if profile else None
    handles: list = []
    loader = LayerLoader(
        shards,
        device,
        plan,
        target_dtypes=target_dtypes,
        layer_prefixes=layer_prefixes,
        prefetch=prefetch,
        profile=prof,
        deferred=deferred,
    )
    try:
        load = _load_dtype(shards, dtype)
        for name, value in (buffers_built_at(model, load) if load is not None else {}).items():
            module, attr = get_submodule_attr(model, name)
            module._buffers[attr] = value
        repair_meta_buffers(model, load)
        for name, value in buffers_as_loaded(model).items():  # (their values, as `from_pretrained` computes them)
            module, attr = get_submodule_attr(model, name)
            module._buffers[attr] = value
        # resident parts on the device, then re-tie (GPT-2's lm_head <- wte), as from_pretrained does
        params = dict(model.named_parameters(remove_duplicate=False))
        on_host = {n for p in host_parts for n in p.tensors}
        copied = {n for p in host_parts if p.copied for n in p.tensors}
        resident = loader.load_resident(on_host=on_host, pinned=copied)
        for name, value in resident.items():
            module, attr = get_submodule_attr(model, name)
            if name in on_host:
                value = HostResident(name, value.shape, value.dtype, device)
            _set_tensor(module, attr, value, name in params)
        if tied_targets(model) or getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        for module in model.modules():
            for attr, b in list(module._buffers.items()):
                if b is not None and not b.is_meta and b.device != device:
                    module._buffers[attr] = b.to(device)
        for name, p in model.named_parameters():
            if p.is_meta and stack.unit_of(name) == RESIDENT:
                raise ShardDirError(f"`shard_dir` {shards.path} provides no value for the model's {name!r}.")
        host_modules = _keep_on_host(model, host_parts, resident, loader, handles) if host_parts else []

        hooks = []
        for i, layer in enumerate(stack.layers):
            slots = []
            prefix = layer_prefixes[i]
            unit = shards.unit(layer_unit(i))
            for rel_name in (n[len(prefix) :] for n in unit.tensors):
                module, attr = get_submodule_attr(layer, rel_name)
                is_param = attr in module._parameters
                held = (module._parameters if is_param else module._buffers)[attr]
                want = target_dtypes.get(prefix + rel_name)
                if held is not None and held.is_meta and want is not None and held.dtype != want:
                    # its placeholder says the dtype the layer computes in, as the loaded model's weight does (the
                    # model's own, of the dtype it was built at, comes back at disable): `parameters()`, memory
                    # footprints and a cast to that dtype (a no-op) read it
                    value = held.to(want)
                    if is_param:
                        value = nn.Parameter(value, requires_grad=held.requires_grad)
                    (module._parameters if is_param else module._buffers)[attr] = value
                slots.append((module, attr, rel_name, is_param))
            hook = LayerStreamingHook(i, loader, slots, prof, prefix=prefix)
            _dequantize_per_module(hook, prefix, deferred, target_dtypes, device, handles)
            _attach(layer, hook)
            handles.append(_CopyRefusal(layer))
            kept = plan.tier(i) == "device"
            handles.append(
                layer.register_state_dict_post_hook(kept_state_dict_hook if kept else streamed_state_dict_hook)
            )
            hooks.append(hook)
        # kept layers hold their weights between passes, except where a module holding some is another layer's too
        # (the same object in two layers: each swaps its own weights in at each pass)
        owners = Counter(id(m) for hook in hooks for m in hook.modules)
        for i, hook in enumerate(hooks):
            if plan.tier(i) == "device" and not hook.packed_placeholders:
                if all(owners[id(m)] == 1 for m in hook.modules):
                    handles += hook.hold_between_passes()
    except BaseException:

        def detach() -> None:
            for module in list(model.modules()):
                _detach(module, (LayerStreamingHook, HostResidentHook))

        # (the hooks' removal twice: a second try once the loader's memory is free, where the first failed half way)
        _undo_each(
            loader.close, *(handle.remove for handle in handles), detach, detach, lambda: _restore(model, originals)
        )
        raise

    state = StreamingState(shards, device, stack, plan, loader, prof, hooks, originals)
    state.handles += handles
    state.host_modules = host_modules
    state.had_device_map = hasattr(model, "hf_device_map")
    state.old_device_map = getattr(model, "hf_device_map", None)
    try:  # (all or nothing: an interruption here, Ctrl-C, undoes what was done, as `disable_layer_streaming` does)
        # the module whose forward runs the layers: its forward is wrapped (see `PassGuard`)
        state.runner = model.get_submodule(stack.prefix.rpartition(".")[0])
        state.guard = PassGuard(
            hooks, loader, [m._hf_hook for m in host_modules], _layers_run(state.runner, len(stack))
        )
        state.guard.check_adapters = _adapter_check(model, stack)
        # an instance attribute it had (another wrapper), if any
        state.runner_forward = vars(state.runner).get("forward")
        state.runner.forward = state.guard.wrap(state.runner.forward)
        if state.runner is not model:  # (the head runs after the pass over the layers: see `wrap_model`)
            state.model_forward = vars(model).get("forward")
            model.forward = state.guard.wrap_model(model.forward)
        if isinstance(head, nn.Module):  # (the module looked up before loading: tying replaces its weight, not it)
            state.handles.append(head.register_forward_pre_hook(_fold_head_input))  # (first: it reads the flag)
            state.guard.head_grad = _follow_head_grad(model, head, head_wants_grad, state.handles)
            state.guard.head_weight = head._parameters.get("weight")
            state.head_weights.append((head, head_weight))
        for module, own in outer:  # (see `_outer_linears`)
            weight = module._parameters.get("weight")
            if isinstance(weight, nn.Parameter) and weight.is_floating_point() and not isinstance(weight, HostResident):
                weight.requires_grad_(isinstance(own, torch.Tensor) and own.requires_grad)
                state.handles.append(module.register_forward_pre_hook(_fold_head_input))
                state.head_weights.append((module, own))
        state.compute_dtypes = frozenset(d for d in target_dtypes.values() if d.is_floating_point)
        dev = device.index if device.type == "cuda" else "cpu"
        # pipeline() reads the first value as the device (and then does not call model.to); generate() sees the
        # streamed layers as "disk" offload, which keeps it from auto-compiling a graph around our hooks
        device_map: dict[str, object] = {"": dev}
        # (layers kept in host RAM for a GPU are "cpu", as accelerate names CPU offload: that vetoes compiling too)
        device_map.update({f"{stack.prefix}.{i}": "cpu" for i in plan.host_layers})
        device_map.update({f"{stack.prefix}.{i}": "disk" for i in plan.streamed})
        device_map.update({p.module_name: "cpu" for p in host_parts})
        model.hf_device_map = device_map
        _load_generation_config(model, shards, state)
        # the config and its sub-configs say the dtype the model computes in (`load`, above), as
        # `from_pretrained(dtype=...)` sets them, and `from_pretrained(dtype="auto")` (the model may have been built at
        # another: see `buffers_built_at`)
        for cfg in dtype_configs(getattr(model, "config", None)):
            if load is not None and cfg.dtype != load:
                state.config_dtypes.append((cfg, cfg.dtype))
                cfg.dtype = load
        setattr(model, _STATE_ATTR, state)
        _wrap_generate(model, state)
        _no_auto_compile(model, state)
        _guard_moves(model, state)
        _refuse(model, state)
        model.eval()
        loader.start()
        if logger.isEnabledFor(logging.INFO):  # (inside: interrupted there, the enable is undone too)
            logger.info("Layer streaming enabled from %s: %s", shards.path, plan.summary())
    except BaseException:
        with contextlib.suppress(Exception):  # (the first error is the one to see)
            _disable(model, state)
        raise
    return model


def _undo_each(*steps: Callable[[], object]) -> None:
    """An enable that failed part way undoes each of its steps, whatever the others raise: at a tight memory limit
    (`ulimit -v`) one raised `MemoryError` in turn and the rest were skipped, leaving hooks on the model, which the
    next enable took for a `device_map`'s. The caller raises the first error."""
    for step in steps:
        try:
            step()
        except Exception:  # noqa: BLE001 - the error that failed the enable is the one to see
            logger.debug("A step undoing a failed enable raised", exc_info=True)


def _refuse_weights_changed_by_forward(model: nn.Module) -> None:
    """A model whose own forward changes its decoder layers' weights in place: refused, naming the way. RWKV rescales
    its blocks' output weights at its first pass in eval mode (`config.rescale_every`) and halves the hidden states
    to match; the streamed layers' weights, brought in at each pass, never took the rescale (logits off by ~1e-2)."""
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if hasattr(module, "_rescale_layers") and getattr(config, "rescale_every", 0) > 0:
            raise ValueError(
                f"{type(module).__name__} ({name or 'the model'}) rescales its decoder layers' weights in place at its "
                f"first forward pass (`config.rescale_every` = {config.rescale_every}), which layers streamed in at "
                "each pass do not take: the output would be wrong. Set `model.config.rescale_every = 0` before "
                "enabling streaming (the loaded model with the same setting gives the same output)."
            )


def _load_generation_config(model: nn.Module, shards: ShardDirectory, state: StreamingState) -> None:
    """The shard directory's `generation_config.json`, as `from_pretrained` loads a checkpoint's, where the model's
    `generation_config` is the one `from_config` derived from its config and unchanged since (the hash transformers
    records for that check); a model given another keeps it. (A file transformers cannot read is warned about.)"""
    own = getattr(model, "generation_config", None)
    path = shards.path / GENERATION_CONFIG_NAME
    if own is None or not path.is_file():
        return
    derived, marked = getattr(own, "_from_model_config", None), getattr(own, "_original_object_hash", None)
    if derived is not None and not derived:  # (one the caller gave, not derived from the config)
        return
    if derived is None or marked is None:
        # (transformers' private marks gone in a release: unchanged if it equals the one its config derives)
        try:
            if own != GenerationConfig.from_model_config(model.config):
                return
        except Exception as e:  # noqa: BLE001 - streaming works without it
            logger.warning("Could not tell whether the model's generation config is its config's (%s).", e)
            return
    elif marked != hash(own):
        return
    try:
        damage = side_file_damage(path)
    except OSError:  # (this user may not read it: `from_pretrained` says so below)
        damage = None
    if damage is not None:  # (a list's error read "'list' object is not a mapping", naming neither file nor fix)
        again = redownload_advice(shards.path)
        logger.warning(
            "%s could not be read: it %s; the model keeps the generation settings of its config (end-of-sequence "
            "ids, sampling defaults). "
            "%s.",
            path,
            damage,
            again if again is not None else "Running the same split again writes it back",
        )
        return
    try:
        loaded = GenerationConfig.from_pretrained(shards.path)
    except Exception as e:  # noqa: BLE001 - streaming works without it
        logger.warning("%s could not be read (%s); the model keeps the generation settings of its config.", path, e)
        return
    state.own_generation_config, state.generation_config = own, loaded
    model.generation_config = loaded


def _shadow(model: nn.Module, state: StreamingState, name: str, wrapper) -> None:
    """Set an instance attribute over a method, remembering it and any instance attribute it hides."""
    if name in vars(model):
        state.shadowed[name] = vars(model)[name]
    state.installed[name] = wrapper
    setattr(model, name, wrapper)


# methods that move or cast a module's tensors, and what each asks for: (device, dtype)
_MOVES = {
    "cpu": lambda *a, **k: (torch.device("cpu"), None),
    "half": lambda *a, **k: (None, torch.float16),
    "float": lambda *a, **k: (None, torch.float32),
    "bfloat16": lambda *a, **k: (None, torch.bfloat16),
    "double": lambda *a, **k: (None, torch.float64),
    "to": lambda *a, **k: torch._C._nn._parse_to(*a, **k)[:2],
    "type": lambda dst_type, *a, **k: _type_target(dst_type),
}
for _other in ("cuda", "xpu", "mtia", "ipu"):  # (the accelerators' moves, where this torch has them)
    if hasattr(nn.Module, _other):
        _MOVES[_other] = lambda device=None, *a, _kind=_other, **k: (
            torch.device(_kind, device) if isinstance(device, int) else torch.device(device or _kind),
            None,
        )

# `module.type(...)`'s legacy tensor type names -> dtype (their module says the device: `torch.cuda.HalfTensor`)
_TENSOR_TYPES = {
    "FloatTensor": torch.float32,
    "DoubleTensor": torch.float64,
    "HalfTensor": torch.float16,
    "BFloat16Tensor": torch.bfloat16,
}


def _type_target(dst_type) -> tuple[torch.device | None, object]:
    """What `module.type(dst_type)` asks for: (device or `None`, dtype; one no model streams in for anything but a
    floating tensor type)."""
    if isinstance(dst_type, torch.dtype):
        return None, dst_type
    name = dst_type if isinstance(dst_type, str) else f"{getattr(dst_type, '__module__', '')}.{dst_type.__name__}"
    module, _, base = name.rpartition(".")
    return torch.device("cuda" if module.endswith("cuda") else "cpu"), _TENSOR_TYPES.get(base, dst_type)


def _same_device(asked: torch.device, device: torch.device) -> bool:
    if asked.type != device.type:
        return False
    if asked.type == "cpu":  # ("cpu:0" is the CPU too)
        return True
    if asked.type == "cuda" and asked.index is None:
        return device.index == torch.cuda.current_device()
    return asked.index is None or asked.index == device.index


def _guard_moves(model: nn.Module, state: StreamingState) -> None:
    """`model.to(...)`, `.cuda()`, `.half()`... on a streamed model: when it asks for the device and dtype the model
    already streams to, what the plain method would do (cast floating buffers such as rotary frequencies), else a
    clear error before anything moves. (The plain methods would fail half way on the meta tensors of the streamed
    layers, leaving the resident parts moved or cast and the layers not.)"""
    for name, parse in _MOVES.items():
        original = getattr(model, name)

        def moved(*args, _name=name, _parse=parse, **kwargs):
            device, dtype = _parse(*args, **kwargs)
            if device is not None:
                device = torch.device(device)
            same_device = device is None or _same_device(device, state.device)
            same_dtype = dtype is None or state.compute_dtypes == {dtype}
            if same_device and same_dtype:
                if dtype is not None:  # what the plain method does to the tensors present: cast floating buffers
                    model._apply(lambda t: t.to(dtype) if t.is_floating_point() and not t.is_meta else t)
                return model
            dtypes = ", ".join(sorted(str(d) for d in state.compute_dtypes)) or "its stored dtypes"
            raise RuntimeError(
                f"`model.{_name}(...)` cannot move or cast a model with layer streaming enabled (it streams its decoder "
                f"layers to {state.device} in {dtypes}). To change them, call `disable_layer_streaming(model)`, then "
                f"`enable_layer_streaming(model, shard_dir, device=..., dtype=...)`."
            )

        _shadow(model, state, name, functools.wraps(original)(moved))


# methods refused while streaming, and why (what each would do to a model whose weights come from the shard directory)
_REFUSED = {
    # it resized the resident embeddings and head in memory, the shard directory keeping the old ones, and
    # `disable_layer_streaming` put the model back on meta without it: it seemed to work, then was lost
    "resize_token_embeddings": "the embeddings and head come from the shard directory, which keeps their size. Resize "
    "the fully loaded model, `save_pretrained` it, and split that (`split_checkpoint(..., overwrite=True)`).",
    # torch's "_share_fd_: only available on CPU" from a placeholder, after sharing the resident parts
    "share_memory": "the decoder layers are read from the shard directory by this process's loader, not held in "
    "memory another process could share. Enable streaming in each process (their reads share the page cache).",
    # it put uninitialized memory in the resident parts, and the next pass refused the layers as replaced
    "to_empty": "it would put uninitialized memory in place of the weights loaded from the shard directory. To "
    "stream to another device, call `disable_layer_streaming(model)`, then `enable_layer_streaming(model, shard_dir, "
    "device=...)`.",
}


def _refuse(model: nn.Module, state: StreamingState) -> None:
    """The methods of `_REFUSED` on a streamed model: refused before anything changes, naming the way."""
    for name, why in _REFUSED.items():
        original = getattr(model, name, None)
        if original is None:
            continue

        def refused(*args, _name=name, _why=why, **kwargs):
            raise RuntimeError(f"`model.{_name}(...)` is not supported with layer streaming enabled: {_why}")

        _shadow(model, state, name, functools.wraps(original)(refused))

    # `copy.deepcopy` refused by the model itself: the loader's own refusal (`LayerLoader.__deepcopy__`) came after
    # whatever the copy reached first, and a weight kept in host RAM (a small GPU's plan) was reached first, refusing
    # with its own fix ("read it from `model.state_dict()`, or give the GPU more `max_memory`"), not the one here
    def no_deepcopy(memo=None):
        raise TypeError(_NO_COPY)

    _shadow(model, state, "__deepcopy__", no_deepcopy)

    # `copy.copy` too (it reduces the model, found on the instance; `pickle` too, which the loader refused anyway): a
    # shallow copy shared the hooks, the loader and the state, and `disable_layer_streaming` of either left the other
    # enabled on meta weights, its passes giving meta outputs without an error
    _shadow(model, state, "__reduce_ex__", _refuse_copy)


def _refuse_copy(protocol=None):
    """A streamed model's, or decoder layer's, `__reduce_ex__`, an instance attribute: what `copy.copy` and `pickle`
    call (found on the instance, as `copy.deepcopy` finds `__deepcopy__`)."""
    raise TypeError(_NO_COPY)


class _CopyRefusal:
    """`copy.copy` of a streamed decoder layer (`model.model.layers[0]`), or of a resident module kept in host RAM (a
    small GPU's embeddings or head), refused as its `copy.deepcopy` and `pickle` are (their copy of its hook reaches
    the loader, which refuses them; a host-resident weight's placeholder refuses its clone): the shallow copy shared
    the module's hook and accelerate's forward, which ran the module itself, and once streaming was disabled it failed
    ("AttributeError: _hf_hook"). Set on the module as it is hooked; `remove` (a handle of the state's, as torch's
    hooks are) takes it off at `disable_layer_streaming`, where it is still ours."""

    def __init__(self, module: nn.Module):
        self.module = module
        module.__reduce_ex__ = _refuse_copy

    def remove(self) -> None:
        if vars(self.module).get("__reduce_ex__") is _refuse_copy:
            del self.module.__reduce_ex__


def _wrap_generate(model: nn.Module, state: StreamingState) -> None:
    """`generate`: a profile per call (`profile=True`), and a clear error where `disable_layer_streaming` ran in another
    thread during the call (its next pass found the layers back on the meta device). A call made inside another in the
    same thread (an early-exit draft: transformers drafts with the model's own `generate`) is part of the outer
    call's profile: it neither restarts it nor ends it. Calls at once from several threads each get their own
    (`Profile.follow`: the passes of its thread) as `last_profile`; the model's `profile` restarts at a call made
    while none is under way, and covers the calls under way together."""
    original = model.generate
    calls = threading.local()  # (`depth`: the calls of this thread under way)

    @functools.wraps(original)
    def generate(*args, **kwargs):
        _refuse_mtp(model, args, kwargs)
        outer = not getattr(calls, "depth", 0)
        # this call's profile (restarting the model's where no other call is under way)
        own = state.profile.follow() if outer and state.profile is not None else None
        calls.depth = getattr(calls, "depth", 0) + 1
        try:
            return original(*args, **kwargs)
        except Exception as e:
            if state.disabled:
                raise RuntimeError(DISABLED_DURING_CALL) from e
            raise
        finally:
            calls.depth -= 1
            if own is not None:
                state.profile.unfollow()  # (the last call under way: the model's profile stops with it)
                state.last_profile = own.to_dict()
                logger.info("hf_layerstream profile of the last generate call:\n%s", own.summary())

    _shadow(model, state, "generate", generate)


# `use_mtp=True`: transformers drafts with the checkpoint's multi-token-prediction layers, which it loads by themselves
# from the files at `config.name_or_path` onto the device of the last decoder layer's weights. A shard directory holds
# no such files and `split_checkpoint` leaves those layers out (the model's forward does not use them), and a streamed
# layer's weights are on the meta device: it failed with "no file named model.safetensors found in directory" (the
# config read from the shard directory), or read the original checkpoint's files to load them on the meta device.
NO_MTP = (
    "`use_mtp=True` is not supported with layer streaming enabled: transformers drafts with the checkpoint's "
    "multi-token-prediction (MTP) layers, loaded by themselves from the original checkpoint's files onto the device of "
    "the last decoder layer's weights, and `split_checkpoint` leaves them out of the shard directory (the model's "
    "forward does not use them). Draft with `assistant_model=` (a small model sharing the tokenizer), "
    "`prompt_lookup_num_tokens=` or `assistant_early_exit=` instead, or drop `use_mtp`."
)


def _refuse_mtp(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """`generate(..., use_mtp=True)` (or a generation config asking for it): refused, see `NO_MTP`."""
    if "use_mtp" in kwargs:
        asked = kwargs["use_mtp"]
    else:  # (`generate(inputs, generation_config, ...)`: its unset values are the model's generation config's)
        config = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
        asked = getattr(config, "use_mtp", None)
        if asked is None:
            asked = getattr(model.generation_config, "use_mtp", None)
    if asked:
        raise ValueError(NO_MTP)


def _no_auto_compile(model: nn.Module, state: StreamingState) -> None:
    """Keep `generate` from compiling the forward pass by itself (on a GPU with a static cache): the hooks swap each
    layer's weights in at every pass, so `torch.compile` would recompile for each layer (51 s for 5 tokens of a
    3-layer test model on CPU). The "disk"/"cpu" entries of `hf_device_map` veto it already unless every layer is kept
    on the device; this covers that plan too. (A method transformers may rename: then this shadows nothing.)"""
    original = getattr(model, "_valid_auto_compile_criteria", None)
    if original is None:
        return

    @functools.wraps(original)
    def criteria(*args, **kwargs):
        if original(*args, **kwargs) and not state.compile_vetoed:
            state.compile_vetoed = True  # (said once per enable)
            logger.warning(
                "`generate` would compile the forward pass of this streamed model; not compiling it (its hooks swap "
                "the layers' weights in at every pass, so it would recompile for each layer)."
            )
        return False

    _shadow(model, state, "_valid_auto_compile_criteria", criteria)


def _restore(model: nn.Module, originals) -> None:
    for module, attr, is_param, value in originals:
        entry = module._parameters if is_param else module._buffers
        if attr not in entry:  # taken out by the caller while streaming (`torch.nn.utils.prune`): left so
            continue
        current = entry.get(attr)
        if isinstance(current, Streamed) and isinstance(value, torch.Tensor) and current is not value:
            _set_requires_grad(value, current.requires_grad)  # (a decoder layer's meta weight: as set while streaming)
        entry[attr] = value


def _set_requires_grad(tensor: torch.Tensor, flag: bool) -> None:
    """`tensor.requires_grad_(flag)` for a weight of the model as it was, where it changed; in inference mode for one
    made there: a model built under `torch.inference_mode()` holds inference tensors, and torch refuses
    `requires_grad_(True)` on one outside it, even one requiring grad already (every `disable_layer_streaming`
    raised that, and the model stayed enabled)."""
    if tensor.requires_grad != flag:
        with torch.inference_mode(tensor.is_inference()):
            tensor.requires_grad_(flag)


def disable_layer_streaming(model: nn.Module) -> nn.Module:
    """Detach every streaming hook, stop the loader and put the model back as it was (weights on meta).

    Returns:
        The same `model`.
    """
    _require_module(model)
    state = get_streaming_state(model)
    if state is None:
        raise ValueError("Layer streaming is not enabled on this model.")
    # a wrapper that finds the state through the model it wraps (a `PeftModel` made inside `attaching_adapters`, which
    # hands attributes on to it: `model = PeftModel.from_pretrained(model, ...)`, as README shows): the model streaming
    # was enabled on is disabled (the wrapper's own attributes failed half way: "no attribute 'hf_device_map'")
    streamed = next((m for m in model.modules() if vars(m).get(_STATE_ATTR) is state), model)
    # a pass running in another thread ends first; then, one enable or disable of the model at a time (in this order:
    # a disable from a callback inside a pass holds the pass's lock already)
    with state.guard.lock, _model_lock(streamed):
        if get_streaming_state(streamed) is not state:  # (disabled meanwhile, by another thread)
            raise ValueError("Layer streaming is not enabled on this model.")
        _disable(streamed, state)
    return model


def _half_detached(module: nn.Module) -> bool:
    """Whether accelerate's `remove_hook_from_module` was interrupted on `module` (Ctrl-C): it deletes `_hf_hook`, then
    puts the forward back from `_old_forward`. Left so, the next `add_hook_to_module` takes accelerate's wrapper for
    the module's own forward, and the wrapper then calls itself at every pass (a `RecursionError`)."""
    wrapper = vars(module).get("forward")
    return (
        "_hf_hook" not in vars(module)
        and "_old_forward" in vars(module)
        and isinstance(wrapper, functools.partial)
        and getattr(wrapper.func, "__name__", None) == "new_forward"
    )


def _remove_hook(module: nn.Module) -> None:
    """`remove_hook_from_module`, then the module as it was before: accelerate puts the forward back as an instance
    attribute, the module's own method bound to it, which the next `add_hook_to_module` then wrapped after `_hf_hook`
    in the module's attributes, so `pickle` of a model enabled a second time reached that wrapper (a local function:
    "Can't pickle local object") before the loader, which refuses naming the fix."""
    remove_hook_from_module(module)
    forward = vars(module).get("forward")
    if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward:
        del module.forward


def _attach(module: nn.Module, hook) -> None:
    """`add_hook_to_module`, after finishing a removal interrupted there (see `_half_detached`): its own forward back."""
    if _half_detached(module):
        _remove_hook(module)
    add_hook_to_module(module, hook)


def _detach(module: nn.Module, kinds) -> None:
    """Take our hook off `module`, or finish taking it off where that was interrupted (see `_half_detached`)."""
    if isinstance(getattr(module, "_hf_hook", None), kinds) or _half_detached(module):
        _remove_hook(module)


def _disable(model: nn.Module, state: StreamingState) -> None:
    state.disabled = True
    for layer in state.stack.layers:
        _detach(layer, LayerStreamingHook)
    for module in state.host_modules:
        _detach(module, HostResidentHook)
    for handle in state.handles:
        handle.remove()
    state.loader.close()
    for module, own in state.head_weights:  # (frozen while streaming: the model's own weight is frozen too)
        current = module._parameters.get("weight")
        current = getattr(current, "stands_for", current)  # (a head running in another thread, gradients on)
        if isinstance(own, torch.Tensor) and isinstance(current, torch.Tensor) and own.is_floating_point():
            _set_requires_grad(own, current.requires_grad)
    _restore(model, state.originals)
    for name, wrapper in state.installed.items():  # (only ours: an instance attribute set over it since stays)
        if vars(model).get(name) is wrapper:
            delattr(model, name)
            if name in state.shadowed:
                setattr(model, name, state.shadowed[name])
    state.installed.clear()  # (our wrappers refer to the state: no cycle left for the garbage collector)
    state.shadowed.clear()
    if state.had_device_map:
        model.hf_device_map = state.old_device_map
    elif hasattr(model, "hf_device_map"):
        del model.hf_device_map
    if state.generation_config is not None and getattr(model, "generation_config", None) is state.generation_config:
        model.generation_config = state.own_generation_config  # (one the caller set since stays)
    for cfg, old_dtype in state.config_dtypes:
        cfg.dtype = old_dtype
    # the forward wrappers go last: a call beginning while the rest is taken apart goes through them, waits for the
    # lock held here and raises `DISABLED_DURING_CALL`, instead of running on a model half taken apart
    guard, runner = state.guard, state.runner  # (`None` where an enable interrupted undoes itself before them)
    if guard is not None and runner is not None and guard.guarded is not None:
        if vars(runner).get("forward") is guard.guarded:  # (if something wrapped it since, left in place, inert)
            if state.runner_forward is None:
                del runner.forward
            else:
                runner.forward = state.runner_forward
    if guard is not None and guard.model_guarded is not None and vars(model).get("forward") is guard.model_guarded:
        if state.model_forward is None:
            del model.forward
        else:
            model.forward = state.model_forward
    if guard is not None:
        guard.close()
    if state.loader.is_cuda:  # the weights are gone: what the allocators cached of them goes back too
        empty_allocator_caches(state.loader.device)
    # last: a disable interrupted before here (Ctrl-C) is finished by calling it again (every step above repeats)
    if vars(model).get(_STATE_ATTR) is state:
        delattr(model, _STATE_ATTR)
