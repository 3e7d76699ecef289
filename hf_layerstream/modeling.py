"""What we need to know about a transformers model: its decoder-layer stack, its streaming units, its buffers.

Everything here works on a model whose parameters live on the meta device, and relies on transformers' own
metadata (`_no_split_modules`, `GradientCheckpointingLayer`, `all_tied_weights_keys`, the checkpoint conversion
mapping) rather than on per-architecture tables, so a new architecture or release needs no change here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

RESIDENT = "resident"


def layer_unit(index: int) -> str:
    return f"layers.{index}"


@dataclass(frozen=True)
class LayerStack:
    """The decoder-layer `nn.ModuleList` of a model and its qualified name (e.g. `model.layers`)."""

    prefix: str
    layers: nn.ModuleList

    def __len__(self) -> int:
        return len(self.layers)

    def unit_of(self, name: str) -> str:
        """The streaming unit holding the parameter/buffer `name`: `layers.<i>` or `resident`."""
        if name.startswith(self.prefix + "."):
            rest = name[len(self.prefix) + 1 :]
            head = rest.split(".", 1)[0]
            if head.isdigit():
                return layer_unit(int(head))
        return RESIDENT

    def layer_prefix(self, index: int) -> str:
        return f"{self.prefix}.{index}."


# submodule names of the encoders of a multimodal model's inputs (transformers' names for them)
_ENCODER_PARTS = frozenset(
    {"vision_model", "vision_tower", "visual", "image_encoder", "vision_encoder", "audio_tower", "audio_encoder"}
)


def find_layer_stack(model: nn.Module) -> LayerStack | None:
    """Find the decoder-layer stack: the `nn.ModuleList` of decoder layers holding the most weights.

    Decoder layers are recognised by transformers' own markers: the class names in `_no_split_modules`, or the
    `GradientCheckpointingLayer` base class every modern decoder layer derives from.
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - very old transformers
        GradientCheckpointingLayer = ()  # noqa: N806
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    best: tuple[tuple[int, int], str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        # every child a decoder layer; hybrid models (Jamba) mix several kinds of them in one stack
        if all(type(c).__name__ in no_split or isinstance(c, GradientCheckpointingLayer) for c in module):
            # the stack holding the most weights: a vision-language model's language model, not its vision encoder
            # (which can have more layers: Qwen2.5-VL-7B's 32 against 28); a stack inside a vision or audio encoder
            # only where there is no other (GIT's image encoder holds more weights than its text decoder)
            tower = not _ENCODER_PARTS.isdisjoint(name.split("."))
            key = (not tower, sum(p.numel() for p in module.parameters()), len(module))
            if best is None or key > best[0]:
                best = (key, name, module)
    return None if best is None else LayerStack(best[1], best[2])


def require_layer_stack(model: nn.Module) -> LayerStack:
    """`find_layer_stack`, raising `ValueError` where the model cannot be streamed: no stack, or weights shared
    between a decoder layer and another part of the model (Zamba2's shared attention blocks): each layer's file holds
    its own weights, and a layer is swapped in alone."""
    stack = find_layer_stack(model)
    if stack is None:
        # the list of layers it may have, unmarked (CTRL's and GPT-1's `EncoderLayer`s, `Block`s): named
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
        lists = [(n, m) for n, m in lists if len({type(c) for c in m}) == 1]
        unmarked = ""
        if lists:
            name, layers = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
            unmarked = (
                f" Its `{name}` holds {len(layers)} `{type(layers[0]).__name__}`, a class transformers marks neither "
                "way (an older architecture's), so it is not taken for one."
            )
        raise ValueError(
            f"Found no decoder-layer stack in {type(model).__name__}: no nn.ModuleList of decoder layers "
            f"(classes in `_no_split_modules` or `GradientCheckpointingLayer`).{unmarked} hf_layerstream streams "
            "causal LMs built of repeated decoder layers that transformers marks so."
        )
    for target, source in tied_targets(model).items():
        units = {stack.unit_of(target), stack.unit_of(source)}
        if len(units) > 1 and units != {RESIDENT}:
            raise ValueError(
                f"{type(model).__name__} shares weights between decoder layers or with the resident parts "
                f"({target!r} is {source!r}); hf_layerstream streams each decoder layer from its own weights and "
                "cannot stream this model."
            )
    return stack


def dtype_configs(config) -> list:
    """`config` and its sub-configs (a vision-language model's `text_config`, `vision_config`): where
    `from_pretrained(dtype=...)` sets the dtype."""
    subs = (getattr(config, key, None) for key in getattr(config, "sub_configs", {}))
    return [c for c in (config, *subs) if c is not None and hasattr(c, "dtype")]


def resolve_dtype(dtype) -> torch.dtype | None:
    """A `dtype` argument as `from_pretrained` takes it: a floating-point `torch.dtype`, its name (`"bfloat16"`),
    or `None` / `"auto"` (the checkpoint's)."""
    if dtype is None or dtype == "auto":
        return None
    if not isinstance(dtype, (str, torch.dtype)):  # (another type: 16, a list; a dtype of another kind is a ValueError)
        raise TypeError(
            f"`dtype` must be a floating-point torch.dtype or its name (e.g. torch.bfloat16 or 'bfloat16'), got "
            f"{type(dtype).__name__} {dtype!r}."
        )
    given = dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"`dtype` {given!r} is not a torch dtype name (e.g. 'bfloat16', 'float16', 'float32').")
    if not dtype.is_floating_point:
        # (named as given, `--dtype int8` as typed: it said "got torch.int8", and to pass "a floating-point torch.dtype
        # or its name", naming none)
        raise ValueError(
            f"`dtype` {given!r} is not a floating-point dtype: pass float32, bfloat16, float16 or float64 (for 8-bit "
            "or 4-bit weights, `compression`)."
        )
    if dtype not in _MODEL_DTYPES:
        # (float8 and float4 ones: transformers builds the model at `dtype` as torch's default dtype, which refuses
        # them, "couldn't find storage object Float8_e4m3fnStorage", after a split had begun; `from_pretrained` too)
        raise ValueError(
            f"`dtype` {str(dtype).removeprefix('torch.')} is not a dtype a model is built at: pass float32, bfloat16, float16 or "
            "float64 (for 8-bit or 4-bit weights, `compression`)."
        )
    return dtype


_MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # (`torch.set_default_dtype`'s)


def check_flag(name: str, value) -> bool:
    """An on/off option of the public API (`verify`, `progress`, `overwrite`, ...) as given: True or False only. Its
    truth value was taken before, so `verify="no"` (a string, truthy) hashed every file; None, 0 and 1 and NumPy's
    bools are refused too, as `keep_in_page_cache` refuses them (None left off a flag whose default is on)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return value


def check_path(name: str, value, *, optional: bool = False) -> None:
    """A path argument of the public API as given: a str or `os.PathLike` (or None, where `optional`), not empty.
    Something else (None, an int, bytes) failed in pathlib, naming no argument: "expected str, bytes or os.PathLike
    object, not NoneType"."""
    if (value is not None or not optional) and not isinstance(value, (str, os.PathLike)):
        allowed = "a str or os.PathLike or None" if optional else "a str or os.PathLike"
        raise TypeError(f"`{name}` must be {allowed}, got {type(value).__name__}.")
    if isinstance(value, str) and not value:
        # (pathlib reads "" as ".": an unset variable's empty path was taken for the current directory, which
        # `split_checkpoint(..., overwrite=True)` wrote its config.json and layers into; `open("")` refuses it)
        raise ValueError(
            f"`{name}` is an empty string, which names no path: pass the path ('.' for the current directory)."
        )


def stand_in(like: torch.Tensor, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """One NaN (zero, for an integer dtype) broadcast to `like`'s shape, of `dtype` (default: `like`'s), on `device`
    (default: the CPU): a weight that holds no memory and no value, for PEFT to attach an adapter beside (see
    `stream.attaching_adapters`, `merge.AdapterMerge`)."""
    dtype = dtype or like.dtype
    value = float("nan") if dtype.is_floating_point or dtype.is_complex else 0
    return torch.full((), value, dtype=dtype, device=device).expand(like.shape)


def tied_targets(model: nn.Module) -> dict[str, str]:
    """Tied parameter names (target -> source), e.g. GPT-2's `{"lm_head.weight": "transformer.wte.weight"}`."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None:  # (the attribute `post_init` fills, gone in a release: the method that fills it)
        tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    return dict(tied)


def expected_tensors(model: nn.Module, stack: LayerStack) -> dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """The tensors a shard directory must hold for `model`, grouped by unit: `{unit: {name: (shape, dtype)}}`.

    That is the model's state dict (parameters and persistent buffers) minus tied duplicates, which are re-tied
    after loading as `from_pretrained` does.
    """
    tied = tied_targets(model)
    units: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]] = defaultdict(dict)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in tied:
            continue
        units[stack.unit_of(name)][name] = (tuple(tensor.shape), tensor.dtype)
    units.setdefault(RESIDENT, {})
    for i in range(len(stack)):
        units.setdefault(layer_unit(i), {})
    return dict(units)


def _attributes(obj) -> dict:
    """An object's attributes: its `__dict__`, or its slots' values for a class with `__slots__`."""
    found = getattr(obj, "__dict__", None)
    if found is not None:
        return found
    names = (
        n for cls in type(obj).__mro__ for n in getattr(cls, "__slots__", ()) if n not in ("__dict__", "__weakref__")
    )
    return {n: getattr(obj, n) for n in names if hasattr(obj, n)}


def architecture_fingerprint(model: nn.Module, stack: LayerStack) -> str:
    """A hash of what a shard directory must match: model type, layer stack, tensor names and shapes."""
    units = expected_tensors(model, stack)
    payload = {
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "layers": stack.prefix,
        "num_layers": len(stack),
        "tensors": {u: {n: list(s) for n, (s, _) in sorted(t.items())} for u, t in sorted(units.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def auto_class_for(config) -> type:
    """The transformers auto class that builds the model of `config`: `AutoModelForCausalLM`, else
    `AutoModelForImageTextToText` for a vision-language model whose config the first does not take (Llava,
    Qwen2-VL, PaliGemma). A vision-language model's language model is streamed, and its vision encoder stays with the
    resident parts.

    Where `AutoModelForCausalLM` takes a vision-language config, its (text-only) class is the one, as
    `AutoModelForCausalLM.from_pretrained` loads it: Llama-4's and Llama-3.2-Vision's checkpoints are split as
    `Llama4ForCausalLM` and `MllamaForCausalLM`, without their vision weights.

    Raises:
        `ValueError`: `config` is neither a causal LM's nor a vision-language model's (e.g. T5's).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto import modeling_auto as auto

    for auto_class, mapping in (
        (AutoModelForCausalLM, auto.MODEL_FOR_CAUSAL_LM_MAPPING),
        (AutoModelForImageTextToText, auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING),
    ):
        if type(config) in mapping:
            return auto_class
    raise ValueError(
        f"{type(config).__name__} ({getattr(config, 'model_type', None)!r}) is the config of neither a causal LM "
        "(`AutoModelForCausalLM`) nor a vision-language model (`AutoModelForImageTextToText`): hf_layerstream streams "
        "the decoder layers of those."
    )


def model_from_config(config) -> nn.Module:
    """The model of `config`, built by `auto_class_for(config).from_config(config)` (in turn: see `_BUILDING`)."""
    with _BUILDING:
        return auto_class_for(config).from_config(config)


def resolve_model_class(config, model_class: type | str | None = None) -> type:
    """The class to build the model of `config` as: `model_class` (a transformers model class or auto class, or its
    name, e.g. `"AutoModelForImageTextToText"` or `"MllamaForConditionalGeneration"`), else `auto_class_for(config)`.

    Raises:
        `TypeError`: `model_class` is neither a class nor a str.
        `ValueError`: `model_class` names no class of transformers that builds a model from a config.
    """
    if model_class is None:
        return auto_class_for(config)
    if isinstance(model_class, str):
        import transformers

        try:
            found = getattr(transformers, model_class, None)
        except (ImportError, RuntimeError):  # (a lazily imported class whose module fails to import)
            found = None
        if found is None:
            raise ValueError(
                f"`model_class` {model_class!r} is not a class of transformers: pass an auto class such as "
                "'AutoModelForImageTextToText', or a model class such as 'MllamaForConditionalGeneration'."
            )
        model_class = found
    if not isinstance(model_class, type):
        raise TypeError(
            f"`model_class` must be a transformers model class or auto class, or its name (a str), got "
            f"{type(model_class).__name__} {model_class!r}."
        )
    if not (hasattr(model_class, "_from_config") or hasattr(model_class, "from_config")):
        raise ValueError(f"`model_class` {model_class!r} is not a model class or auto class of transformers.")
    return model_class


def build_as(config, model_class: type | str | None = None) -> nn.Module:
    """The model of `config` built on meta as `model_class` (see `resolve_model_class`; default: `auto_class_for`),
    what `split_checkpoint` builds.

    Raises:
        `ValueError`: `model_class` is no class of transformers, does not build from `config` (another
            architecture's: `GPT2LMHeadModel` for a Llama config), or builds a model that cannot generate (a base
            model without its language-model head, such as `LlamaModel`).
    """
    cls = resolve_model_class(config, model_class)
    if model_class is None:
        return build_skeleton(config, cls)
    try:
        model = build_skeleton(config, cls)
    except (AttributeError, TypeError, KeyError, ValueError) as e:
        mapping = getattr(cls, "_model_mapping", None)
        if mapping is not None and type(config) not in mapping:
            # (an auto class of another kind, `AutoModelForSeq2SeqLM`: transformers' error lists every config it has a
            # model for, on a second line)
            why = f"{cls.__name__} has no model for {type(config).__name__}"
        else:  # (on one line, as the command's errors are)
            why = f"{type(e).__name__}: {' '.join(str(e).split()).rstrip('.')}"
        try:
            instead = f" ('{auto_class_for(config).__name__}' builds it)"
        except ValueError:  # (neither a causal LM's config nor a vision-language model's)
            instead = ""
        raise ValueError(
            f"`model_class` {cls.__name__} does not build from this checkpoint's config ({type(config).__name__}, "
            f"model type {getattr(config, 'model_type', None)!r}): {why}. Pass the class of its architecture"
            f"{instead}, or leave `model_class` out."
        ) from e
    if not callable(getattr(model, "generate", None)):
        raise ValueError(
            f"`model_class` {cls.__name__} builds {type(model).__name__}, which cannot generate (no language-model "
            "head): pass a class such as 'AutoModelForCausalLM' or 'AutoModelForImageTextToText', or leave "
            "`model_class` out."
        )
    return model


def build_for_shards(manifest, config, *, meta: bool = False) -> nn.Module:
    """The model (parameters on meta) of a shard directory: built as the class it was split for, its manifest's
    `architectures` (e.g. `MllamaForConditionalGeneration`, split with `model_class`), when transformers has that
    class and it gives the directory's architecture fingerprint (a directory split before the class was recorded
    holds the config's `architectures`, not always the class built), else as `auto_class_for(config)` builds it:
    what `hf-layerstream generate` and `inspect` build."""
    import transformers

    model = build_skeleton(config, meta=meta)
    names = getattr(manifest, "architectures", None) or []
    if not names or type(model).__name__ == names[0]:
        return model
    try:
        split_for = getattr(transformers, names[0], None)
        if isinstance(split_for, type) and hasattr(split_for, "_from_config"):
            other = build_skeleton(config, split_for, meta=meta)
            if architecture_fingerprint(other, require_layer_stack(other)) == manifest.fingerprint:
                return other
    except (ImportError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        logger.debug("could not build %s for %s: %s", names[0], getattr(manifest, "path", "the shard directory"), e)
    return model


def build_skeleton(
    config, model_class: type | None = None, dtype: torch.dtype | None = None, *, meta: bool = False
) -> nn.Module:
    """The model built with `init_empty_weights()`: parameters on meta, buffers (rotary `inv_freq`) real on CPU.
    `model_class`: a model class or auto class (default: `auto_class_for(config)`). `dtype`: the dtype to build it at
    (default: the config's, as `from_config` does), on a copy of `config` (`from_config` records it there). `meta`:
    under `torch.device("meta")`, buffers too, and tensors a model creates on the CPU before it moves them (some MoE
    experts: a Llama-4-Maverick-sized config took 20 GiB the other way), for names and shapes only."""
    kwargs = {}
    if dtype is not None:
        config, kwargs = deepcopy(config), {"dtype": dtype}
    with _BUILDING, torch.device("meta") if meta else parameters_on_meta():
        if model_class is not None and hasattr(model_class, "_from_config"):
            return model_class._from_config(config, **kwargs)
        if model_class is not None:
            return model_class.from_config(config, **kwargs)
        return auto_class_for(config).from_config(config, **kwargs)


# transformers swaps torch's init functions (`torch.nn.init.normal_`, ...) for its own around each build (its
# `guard_torch_init_functions`), saving and putting back what it finds: two builds overlapping in two threads (several
# enables at once, in a server) put back each other's, leaving its own there for good, which skip a weight marked as
# loaded (`nn.init.normal_` of a loaded model's head, to train it anew, did nothing). Our builds take turns.
_BUILDING = threading.RLock()
_ON_META = threading.local()  # `depth`: how many `parameters_on_meta` the thread is in
_INSTALLING = threading.Lock()


def _install_register_parameter() -> None:
    """Put in `nn.Module.register_parameter` a function that calls the one there and, in a thread inside
    `parameters_on_meta`, moves the parameter to the meta device; once, for good (elsewhere it changes nothing). A
    swap made and undone around each build, as accelerate's `init_empty_weights` does, is the whole process's while it
    lasts, and undone out of order where two overlap (another thread's `init_empty_weights` of the user's): left in
    place for good, it put every module built after on meta. Installed as hf_layerstream is imported, and again where
    something replaced it since."""
    with _INSTALLING:
        inner = nn.Module.register_parameter
        if getattr(inner, "_hf_layerstream_meta", False):
            return

        def register_parameter(module, name, param):
            inner(module, name, param)
            if param is not None and getattr(_ON_META, "depth", 0):  # (as accelerate's `register_empty_parameter`)
                made = module._parameters[name]
                kwargs = dict(made.__dict__)
                # (not a constructor's argument: transformers' mark of an initialized weight, put back after)
                marks = {k: kwargs.pop(k) for k in ("_is_hf_initialized",) if k in kwargs}
                kwargs["requires_grad"] = param.requires_grad
                module._parameters[name] = type(made)(made.to("meta"), **kwargs)
                module._parameters[name].__dict__.update(marks)

        register_parameter._hf_layerstream_meta = True
        nn.Module.register_parameter = register_parameter


# at import: before a user's `init_empty_weights` (whose swap then saves and puts back this one), not in the middle
# of one in another thread (whose end would take this one out while a build needs it)
_install_register_parameter()


@contextmanager
def parameters_on_meta():
    """accelerate's `init_empty_weights(include_buffers=False)` for the calling thread only: the parameters of the
    modules it builds go to the meta device, their buffers stay real. accelerate's swaps `nn.Module.register_parameter`
    for the whole process while it lasts: the modules other threads built meanwhile (a `from_pretrained` in a
    server's other thread while a model was enabled) got meta parameters, silently, and two at once could put back
    each other's function, so that every module built in the process after got them (see
    `_install_register_parameter`)."""
    _install_register_parameter()
    _ON_META.depth = getattr(_ON_META, "depth", 0) + 1
    try:
        yield
    finally:
        _ON_META.depth -= 1


def non_persistent_buffers(model: nn.Module) -> Iterable[tuple[nn.Module, str, str]]:
    """(module, attribute, qualified name) for every buffer that is not saved in a checkpoint."""
    for mod_name, module in model.named_modules():
        for attr in getattr(module, "_non_persistent_buffers_set", ()):
            if module._buffers.get(attr) is not None:
                yield module, attr, f"{mod_name}.{attr}" if mod_name else attr


def learned_position_limit(model: nn.Module) -> int | None:
    """How many positions a model with a learned table of absolute positions (GPT-2's `wpe`, OPT's `embed_positions`:
    an embedding of `max_position_embeddings` rows, OPT's with 2 more) can run: past its end the loaded model ends in a
    torch `IndexError` (`index out of range in self`), once it got that far. `None` for a model without one (rotary or
    ALiBi models go on past `max_position_embeddings`)."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    words = model.get_input_embeddings()
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m is not words and limit <= m.num_embeddings <= limit + 2:
            return limit
    return None


def position_overrun(model: nn.Module, prompt_tokens: int, max_new_tokens: int) -> tuple[int, int] | None:
    """(the learned position table's size, the most new tokens that fit after the prompt) where a prompt of
    `prompt_tokens` and `max_new_tokens` new tokens run past the table (see `learned_position_limit`), else `None`.
    The last new token is not run through the model and needs no position: a prompt of P tokens takes up to
    `limit - P + 1` (0 or less: the prompt alone runs past it)."""
    limit = learned_position_limit(model)
    if limit is None or prompt_tokens + max_new_tokens - 1 <= limit:
        return None
    return limit, limit - prompt_tokens + 1


def vocabulary_overrun(model: nn.Module, largest_id: int) -> int | None:
    """The size of `model`'s vocabulary (its input embedding table's rows, else its config's `vocab_size`) where a
    prompt's largest token id `largest_id` runs past it (a tokenizer of another model: torch's "IndexError: index out
    of range in self" traceback, on a GPU a device-side assert), else `None` (also where the size is not known)."""
    try:
        size = getattr(model.get_input_embeddings(), "num_embeddings", None)
    except (AttributeError, NotImplementedError):
        size = None
    size = size or getattr(model.config.get_text_config(), "vocab_size", None)
    return size if isinstance(size, int) and largest_id >= size else None


def buffers_built_at(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The non-persistent floating-point buffers `model`'s class computes as it is built (Gemma's `embed_scale`, XGLM's
    sinusoidal position table) in another dtype at `dtype` than `model` holds them: as a skeleton built at `dtype`
    holds them, the way `from_pretrained(dtype=dtype)` builds them. Empty where `model` was built at `dtype` (most of
    its floating-point weights are in it: `_built_at`)."""
    held = {n: m._buffers[a] for m, a, n in non_persistent_buffers(model)}
    held = {n: b for n, b in held.items() if b.is_floating_point() and not b.is_meta}
    if not held or _built_at(model, dtype):
        return {}
    fresh = dict(build_skeleton(model.config, type(model), dtype).named_buffers())
    return {n: fresh[n] for n, b in held.items() if n in fresh and not fresh[n].is_meta and fresh[n].dtype != b.dtype}


def repair_meta_buffers(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Give real values to non-persistent buffers left on meta (model built under `torch.device("meta")`).

    Non-persistent buffers (rotary `inv_freq`, causal masks) are computed in `__init__` and never stored in a
    checkpoint; a skeleton built with `init_empty_weights()` computes them the same way, so we copy them over. `dtype`:
    the dtype to build it at (default: the config's), as `from_pretrained(dtype=...)` builds them (Gemma's
    `embed_scale` was at the config's). Returns the names repaired.
    """
    meta = [(m, a, n) for m, a, n in non_persistent_buffers(model) if m._buffers[a].is_meta]
    if not meta:
        return []
    skeleton = build_skeleton(model.config, type(model), dtype)
    fresh = dict(skeleton.named_buffers())
    repaired = []
    for module, attr, name in meta:
        if name not in fresh or fresh[name].is_meta:
            raise ValueError(
                f"The model's non-persistent buffer {name!r} is on the meta device and could not be rebuilt from the "
                "config. Build the model with `accelerate.init_empty_weights()` instead of `torch.device('meta')`."
            )
        module._buffers[attr] = fresh[name].clone()
        repaired.append(name)
    return repaired


def buffers_as_loaded(model: nn.Module) -> dict[str, torch.Tensor]:
    """The non-persistent floating-point buffers whose values `from_pretrained` computes otherwise than `model` holds
    them, by name, with those values. `from_pretrained` builds the model inside its dtype context, then (outside it, at
    the default dtype) gives non-persistent buffers their values with the `_init_weights` of the model class they
    belong to, copied into the buffers of the dtype they were built at; `from_config` (and `__init__`) compute them
    inside it. Where the arithmetic follows the default dtype, they differ: GPT-J's and CodeGen's sinusoidal position
    table, whose frequencies were rounded to bfloat16 in a model built at bfloat16 (logits off by ~2e-3). A module
    whose `_init_weights` fails on a copy of it keeps its buffers."""
    from transformers import PreTrainedModel

    owners: list[tuple[str, nn.Module, Callable]] = []

    def walk(prefix: str, module: nn.Module, init: Callable) -> None:
        for name, child in module.named_children():
            walk(f"{prefix}{name}.", child, child._init_weights if isinstance(child, PreTrainedModel) else init)
        if any(
            b is not None and b.is_floating_point() and not b.is_meta
            for a, b in module._buffers.items()
            if a in module._non_persistent_buffers_set
        ):
            owners.append((prefix, module, init))

    if not isinstance(model, PreTrainedModel):
        return {}
    walk("", model, model._init_weights)
    out = {}
    for prefix, module, init in owners:
        try:
            twin = deepcopy(module)  # (its parameters are on meta: the copy costs its buffers only)
            for b in twin.buffers(recurse=False):
                if hasattr(b, "_is_hf_initialized"):
                    del b._is_hf_initialized
            init(twin)
        except Exception as e:  # noqa: BLE001 - an initializer that needs real weights: the buffers stay as built
            logger.debug(
                "Not recomputing the buffers of %s (%s: %s)", prefix.rstrip(".") or "the model", type(e).__name__, e
            )
            continue
        for attr in module._non_persistent_buffers_set:
            held, fresh = module._buffers.get(attr), twin._buffers.get(attr)
            if held is None or fresh is None or not held.is_floating_point() or held.is_meta or fresh.is_meta:
                continue
            if fresh.dtype != held.dtype or fresh.shape != held.shape or not torch.equal(fresh, held):
                out[prefix + attr] = fresh
    return out


def get_submodule_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


# --- checkpoint key conversion (split time) -------------------------------------------------------------------


@dataclass
class ConversionPlan:
    """How the checkpoint's keys become the model's tensors, grouped by streaming unit.

    Built with transformers' own conversion machinery (`get_model_conversion_mapping` + `rename_source_key`, the
    same calls `from_pretrained` makes), so fused experts, renamed heads and legacy names come out exactly as
    `from_pretrained` would load them.
    """

    # unit -> list of (checkpoint key, renamed target key, converter source pattern or None)
    units: dict[str, list[tuple[str, str, str | None]]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    converters: dict[str, object] = field(default_factory=dict)  # source pattern -> WeightConverter
    # tied target -> the checkpoint key that stores it too, where its source is stored under its own name as well
    # (`from_pretrained` ties such a pair only if the two hold equal values: see `split_checkpoint`)
    tied_stored: dict[str, str] = field(default_factory=dict)


def unsupported_transformers(detail: str) -> str:
    """The message for a transformers release whose internals a split uses have changed: names it, the releases this
    hf_layerstream supports (its requirement), and what to do."""
    import transformers

    from . import __version__

    try:
        from importlib.metadata import requires

        wanted = next((r for r in requires("hf_layerstream") or [] if r.startswith("transformers")), None)
    except Exception:  # noqa: BLE001 - (not installed as a distribution)
        wanted = None
    return (
        f"hf_layerstream {__version__} splits checkpoints with transformers' own conversion internals, which "
        f"transformers {transformers.__version__} changed ({detail}). Install a transformers release it supports"
        f"{f' ({wanted})' if wanted else ''}, or an hf_layerstream release made for this one."
    )


def _conversion_internals():
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    except ImportError as e:
        raise ImportError(unsupported_transformers(str(e))) from e
    return get_model_conversion_mapping, WeightConverter, WeightRenaming, dot_natural_key, rename_source_key


def plan_conversion(model: nn.Module, stack: LayerStack, checkpoint_keys: Iterable[str]) -> ConversionPlan:
    internals = _conversion_internals()
    get_model_conversion_mapping, WeightConverter, WeightRenaming, dot_natural_key, _rename = internals  # noqa: N806

    def rename_source_key(*args) -> tuple[str, str | None]:
        found = _rename(*args)
        if not (isinstance(found, tuple) and len(found) == 2):
            raise RuntimeError(
                unsupported_transformers(f"`rename_source_key` returned {type(found).__name__} {found!r:.80}")
            )
        return found

    weight_mapping = get_model_conversion_mapping(model)
    renamings = [t for t in weight_mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in weight_mapping if isinstance(t, WeightConverter)]
    pattern_to_converter = {p: c for c in converters for p in c.source_patterns}
    meta_sd = model.state_dict()
    prefix = model.base_model_prefix
    tied = tied_targets(model)

    plan = ConversionPlan(converters=pattern_to_converter)
    found: set[str] = set()
    tied_keys: dict[str, str] = {}  # tied target -> the checkpoint key holding it
    for key in sorted(checkpoint_keys, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_sd)
        if renamed not in meta_sd and key in meta_sd:
            renamed, pattern = rename_source_key(key, [], [], prefix, meta_sd)
        if renamed in tied and pattern is None:
            tied_keys[renamed] = key
        if renamed not in meta_sd or renamed in tied:
            plan.unexpected.append(key)
            continue
        plan.units.setdefault(stack.unit_of(renamed), []).append((key, renamed, pattern))
        found.add(renamed)
        if pattern is not None:
            # a converter with several targets (qkv -> q, k, v) produces all of them from the first one
            conv = pattern_to_converter[pattern]
            first = conv.target_patterns[0]
            for other in conv.target_patterns[1:]:
                found.add(renamed.replace(first, other))
    # a tied pair stored under the target's name only (`safetensors.torch.save_model` keeps one name of each
    # shared tensor, the first in order: `lm_head.weight`): the source is read from there, as `from_pretrained`
    # ties it the other way
    for target, source in tied.items():
        key = tied_keys.get(target)
        if source not in found and key is not None and source in meta_sd:
            plan.units.setdefault(stack.unit_of(source), []).append((key, source, None))
            plan.unexpected.remove(key)
            found.add(source)
        elif key is not None and source in found:
            plan.tied_stored[target] = key
    expected = {n for unit in expected_tensors(model, stack).values() for n in unit}
    non_persistent = {n for _, _, n in non_persistent_buffers(model)}
    plan.missing = sorted(expected - found - non_persistent)
    return plan


def convert_unit(
    model: nn.Module,
    entries: list[tuple[str, str, str | None]],
    load: Callable[[str], torch.Tensor],
    converters: dict[str, object],
) -> dict[str, torch.Tensor]:
    """Materialize one unit's tensors under the model's names, running transformers' conversion ops."""
    WeightRenaming = _conversion_internals()[2]  # noqa: N806

    mappings: dict[str, object] = {}
    for key, renamed, pattern in entries:
        if pattern is not None:
            mapping = mappings.setdefault(renamed, deepcopy(converters[pattern]))
        else:
            mapping = mappings.setdefault(renamed, WeightRenaming(key, renamed))
            pattern = key
        mapping.add_tensor(renamed, key, pattern, lambda key=key: load(key))
    out: dict[str, torch.Tensor] = {}
    for first, mapping in mappings.items():
        converted = mapping.convert(first, model=model, config=getattr(model, "config", None))
        for name, value in converted.items():
            value = value[0] if isinstance(value, list) else value
            out[name] = value.contiguous()
    return out


_LAYER_RE = re.compile(r"^layers\.(\d+)$")


def unit_index(unit: str) -> int | None:
    m = _LAYER_RE.match(unit)
    return int(m.group(1)) if m else None


def kept_in_float32(model: nn.Module, dtype: torch.dtype) -> re.Pattern | None:
    """The weights `from_pretrained(..., dtype=dtype)` keeps in float32 for `model`: its `_keep_in_fp32_modules`
    (at float16) and `_keep_in_fp32_modules_strict` (at float16 and bfloat16), e.g. DeepSeek-V3's router
    (`gate.weight`) and `e_score_correction_bias`. Matched as transformers matches them: each name searched anywhere
    in a weight's full name, `*` standing for any characters. `None` where nothing is kept."""
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    plan = getattr(model, "_get_dtype_plan", None)
    if plan is not None:
        names = [n for n, d in plan(dtype).items() if d == torch.float32]
    else:  # (transformers releases without it)
        names = list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
        if dtype == torch.float16:
            names += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if not names:
        return None
    return re.compile("|".join(f"(?:{n.replace('*', '.*')})" for n in sorted(names)))


def _built_at(model: nn.Module, dtype: torch.dtype) -> bool:
    """Whether `model` was built at `dtype`: most of its floating-point weights are in it."""
    sizes: dict[torch.dtype, int] = defaultdict(int)
    for t in model.state_dict(keep_vars=True).values():
        if t.is_floating_point():
            sizes[t.dtype] += t.numel()
    return bool(sizes) and max(sizes, key=sizes.get) == dtype


def created_dtypes(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The floating-point weights (parameters and persistent buffers) that `model`'s class creates in another dtype
    than `dtype` when built at `dtype`, and theirs: e.g. Olmo-Hybrid's `linear_attn.A_log` and Mamba's `A_log`,
    created float32. `from_pretrained(dtype=dtype)` loads each weight at the dtype of the parameter it loads into, so
    those keep theirs. Read off `model` where it was built at `dtype` (most of its floating-point weights are in it),
    else off a skeleton built at `dtype`."""

    def other(m: nn.Module) -> dict[str, torch.dtype]:
        sd = m.state_dict(keep_vars=True)
        return {n: t.dtype for n, t in sd.items() if t.is_floating_point() and t.dtype != dtype}

    if _built_at(model, dtype):
        return other(model)
    return other(build_skeleton(model.config, type(model), dtype))


def conversion_record(model: nn.Module) -> dict:
    """How transformers converts this model's checkpoint tensors into its own (fused experts, split or merged
    projections: `WeightConverter`s and their operations), and the transformers release: recorded by a split, checked
    when streaming, because a release that changed a layout without changing names or shapes would load an older
    split's tensors silently wrong. Renamings are left out: a changed name fails the shard check loudly."""
    import transformers

    get_model_conversion_mapping, WeightConverter = _conversion_internals()[:2]  # noqa: N806
    described = []
    for t in get_model_conversion_mapping(model):
        if not isinstance(t, WeightConverter):
            continue
        ops = [[type(o).__name__, sorted((k, repr(v)) for k, v in _attributes(o).items())] for o in t.operations]
        described.append([list(t.source_patterns), list(t.target_patterns), ops])
    digest = hashlib.sha256(json.dumps(sorted(described, key=repr)).encode()).hexdigest()[:16]
    return {"transformers": transformers.__version__, "converters": digest}
