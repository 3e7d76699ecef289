"""A PEFT adapter (LoRA and the like) merged into the weights as `split_checkpoint` writes them, one unit at a time.

The merge is PEFT's own (`merge_and_unload`'s steps, module by module), on the weights at the dtype the shard
directory streams at: the streamed model equals the loaded model with the adapter merged, bit for bit (without
compression), and it streams
at the base model's speed, with no adapter weights in memory (and can be compressed).
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ._safetensors import sha256_file
from .modeling import build_skeleton, created_dtypes, kept_in_float32, resolve_model_class, tied_targets
from .modeling import stand_in as make_stand_in
from .quant import all_finite
from .shard_dir import is_commit_hash
from .split import _ctrl_c_noted, _interrupted_inside

logger = logging.getLogger(__name__)

_CONFIG = "adapter_config.json"
# what `torch.load(weights_only=True)` raises for a damaged `adapter_model.bin` (besides RuntimeError, for a zip cut
# short): the unpickler's own errors
_DAMAGED_PICKLE = (pickle.UnpicklingError, EOFError, IndexError)
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def import_peft(use: str):
    """peft, imported without bitsandbytes' hub-kernel notice (peft imports it where installed: see
    `quant.load_backend`); `use` names what needs it in the error where it is missing."""
    from .quant import quiet_hub_kernel_notice

    with quiet_hub_kernel_notice():
        try:
            import peft
        except ImportError:
            raise ImportError(f"{use} needs the peft package: `pip install peft`.") from None
    return peft


def resolve_adapter(
    adapter: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None, cache_dir=None
) -> Path:
    """The local folder of `adapter`: a folder holding `adapter_config.json` and the adapter's weights, or a hub repo
    id, whose config and weights are fetched (or found in the hub cache) at `revision` (default: the repo's default
    branch) with `token` and `cache_dir`. `revision` with a local folder is warned about and not used.

    Raises:
        `ValueError`: the folder or repo holds no `adapter_config.json` or no adapter weights.
        `FileNotFoundError`: a hub repo the hub cannot be reached for (offline) and that is not in the hub cache, or
            one the hub does not have; a path that is a file, or neither an existing folder nor a hub repo id.
    """
    from .shard_dir import warn_hub_only
    from .split import fetch_hub_file, missing_local_folder

    text = str(adapter)
    local = Path(text).expanduser()
    if local.is_dir():
        folder = local
        warn_hub_only(text, "used as it is", revision=revision, revision_name="`adapter_revision`")
    elif local.is_file():
        raise FileNotFoundError(f"`adapter` {text} is a file: pass the adapter's folder ({local.parent}).")
    elif missing_local_folder(adapter):
        raise FileNotFoundError(
            f"`adapter` {text} is neither an existing folder nor a hub repo id (`organization/name`). Pass the folder "
            f"that holds the adapter's {_CONFIG} and weights (what PEFT's `save_pretrained` writes)."
        )
    else:
        hub = {"token": token, "cache_dir": cache_dir, "what": "adapter folder", "revision": revision}
        config = fetch_hub_file(text, _CONFIG, "`adapter`", **hub)
        if config is None:
            at = f" at revision {revision!r}" if revision is not None else ""
            raise ValueError(f"`adapter` {text!r}{at} holds no {_CONFIG}: it is not a PEFT adapter.")
        errors = []
        for name in _WEIGHTS:  # (a repo of the older format holds only the second; offline, the cache may too)
            try:
                if fetch_hub_file(text, name, "`adapter`", **hub):
                    break
            except FileNotFoundError as e:
                errors.append(e)
        else:
            if errors:
                raise errors[0]
        folder = config.parent
    if not (folder / _CONFIG).is_file():
        # (PEFT's `save_pretrained` writes an adapter named otherwise than "default" into a subfolder of its name)
        named = sorted(p.parent for p in folder.glob(f"*/{_CONFIG}") if p.is_file())
        if named:
            raise ValueError(
                f"`adapter` {folder} holds no {_CONFIG} but adapters PEFT saved by name in its subfolders: pass one of "
                f"them ({', '.join(str(p) for p in named)})."
            )
        raise ValueError(f"`adapter` {folder} holds no {_CONFIG}: it is not a PEFT adapter's folder.")
    if _weights_file(folder) is None:
        raise ValueError(f"`adapter` {folder} holds no adapter weights ({' or '.join(_WEIGHTS)}).")
    return folder


def _weights_file(folder: Path) -> Path | None:
    """The weights file PEFT loads from an adapter's folder (safetensors first)."""
    return next((folder / name for name in _WEIGHTS if (folder / name).is_file()), None)


def adapter_identity(folder: Path, adapter: str | os.PathLike) -> dict:
    """What the split records of the adapter, in its options (a changed adapter is another split) and manifest: the
    folder's absolute path (a hub id as given: the same files at another path are another adapter, as for the
    source), its kind, and the digests of the two files PEFT loads (its config and weights; another file there, or
    fetched into the hub cache since, does not count). The same files at another commit of a hub repo are the same
    adapter: the commit is recorded beside it in the manifest (`hub_commit`), for what it says."""
    digests = {path.name: sha256_file(path) for path in (folder / _CONFIG, _weights_file(folder))}
    local = Path(str(adapter)).expanduser()
    return {
        "id": str(local.resolve()) if local.is_dir() else str(adapter),
        "peft_type": _peft_type(folder),
        "sha256": digests,
    }


def hub_commit(folder: Path, adapter: str | os.PathLike) -> str | None:
    """The commit a hub `adapter` was fetched at (`resolve_adapter`'s folder in the hub cache is
    `.../snapshots/<commit>`); `None` for a local folder."""
    if Path(str(adapter)).expanduser().is_dir():
        return None
    return folder.name if is_commit_hash(folder.name) else None


def _stored_dtype(merged: torch.dtype, stored: torch.dtype) -> torch.dtype:
    """The dtype a merged weight is stored at: the checkpoint's, unless it merged at a wider one (a bfloat16
    checkpoint's router, merged in float32 as the loaded model keeps it: its bits kept)."""
    wider = merged.is_floating_point and stored.is_floating_point and merged.itemsize > stored.itemsize
    return merged if wider else stored


def _peft_type(folder: Path) -> str:
    """The `peft_type` an adapter's config names (for messages)."""
    import json

    try:
        return str(json.loads((folder / _CONFIG).read_text()).get("peft_type"))
    except (OSError, ValueError, AttributeError):
        return "of unknown type"


class AdapterMerge:
    """The adapter at `folder`, attached to the model of `config` built on meta as `from_pretrained(dtype=dtype)`
    builds it; `merge(tensors)` merges it into one unit's tensors.

    Each weight of the skeleton stands in as one NaN broadcast to its shape (no memory), so that PEFT makes the adapter
    weights on the CPU and in the dtypes it makes them for the loaded model (`PeftModel.from_pretrained`, which upcasts
    half-precision adapters to float32). A unit's weights take the stand-ins' places while its adapted modules merge,
    as `merge_and_unload` merges each (the same steps, with `safe_merge=False` as `merge_and_unload()` defaults to:
    `safe_merge=True` rounds the change to the weight's dtype before adding it, which gives other bits in bfloat16); a
    merge that gives non-finite values is refused.
    """

    def __init__(self, folder: Path, config, model_class=None, dtype: torch.dtype | None = None):
        peft = import_peft("Merging an adapter into the split")
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

        model = build_skeleton(config, resolve_model_class(config, model_class), dtype)
        # each weight at the dtype the loaded model holds it in: `dtype`, but float32 where `from_pretrained` keeps
        # it so (a router, `_keep_in_fp32_modules`), and its own where the class creates it in another
        kept = kept_in_float32(model, dtype) if dtype is not None else None
        created = created_dtypes(model, dtype) if dtype is not None else {}
        # one stand-in for each weight, shared by the names tied to it (as the loaded model shares one tensor)
        tied = tied_targets(model)
        params = dict(model.named_parameters(remove_duplicate=False))
        stand_ins = {
            source: nn.Parameter(make_stand_in(params[source]), requires_grad=False) for source in tied.values()
        }
        slots: list[tuple[nn.Module, str, nn.Parameter]] = []
        self.names: dict[int, list[str]] = {}  # a weight (by id) -> its names (tied weights: several)
        for name, p in params.items():
            source = tied.get(name, name)
            if source not in stand_ins:
                at = p.dtype
                if p.is_floating_point():
                    at = torch.float32 if kept is not None and kept.search(source) else created.get(source, p.dtype)
                stand_ins[source] = nn.Parameter(make_stand_in(p, at), requires_grad=False)
            stand_in = stand_ins[source]
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            module._parameters[attr] = stand_in
            slots.append((module, attr, stand_in))
            self.names.setdefault(id(stand_in), []).append(name)
        try:
            # (a Ctrl-C while safetensors reads the adapter's weights through torch's C code made a ValueError of it,
            # which said the adapter could not be loaded onto this model: see `split._ctrl_c`)
            with warnings.catch_warnings(), _ctrl_c_noted():
                # (PEFT's notices on adapting a tied head: merged here into the one tensor, or refused below; and
                # transformers' deprecation of a method PEFT calls)
                warnings.filterwarnings("ignore", message=r".*tie_word_embeddings=True.*", category=UserWarning)
                warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
                wrapped = peft.PeftModel.from_pretrained(model, str(folder), low_cpu_mem_usage=True)
        except torch.linalg.LinAlgError as e:  # (before the others: a RuntimeError)
            _interrupted_inside(e)
            # (TinyLoRA, OSF: made from an SVD of the weights each adapts, which are stand-ins here)
            raise ValueError(
                f"The adapter {folder} ({_peft_type(folder)}) reads the weights it adapts as PEFT loads it, which the "
                f"split does not hold at that point ({type(e).__name__}: {e}). Merge it into the loaded model "
                "(`merge_and_unload`), save it and split that."
            ) from e
        except (ValueError, KeyError, TypeError, RuntimeError, OSError, SafetensorError, *_DAMAGED_PICKLE) as e:
            _interrupted_inside(e)
            # (an adapter of another model: other shapes or module names; a damaged weights file)
            raise ValueError(f"Cannot load the adapter {folder} onto this model: {type(e).__name__}: {e}") from e
        # A weight the adapter holds a copy of (PEFT saves an adapted embedding or head whole, and with `bias="all"`
        # every bias, of adapted modules or not) is that copy, as PEFT loads it into the loaded model's weight
        # (copied into it, tied ones too; here loaded with `assign`, in its place): the shard's is not used.
        self.given: set[int] = set()
        for module, attr, stand_in in slots:
            p = module._parameters.get(attr)
            if p is not None and p is not stand_in:
                stand_in.data = p.data.to(stand_in.dtype)
                module._parameters[attr] = stand_in
                self.given.add(id(stand_in))
        # Loaded with `low_cpu_mem_usage`, the adapter weights went through the base weights' dtype (bfloat16: rounded)
        # before PEFT's upcast; loaded again, into the weights as they are now, they hold the values the loaded model's
        # adapter holds (PEFT makes its weights, upcast, then loads the file into them).
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        try:
            with _ctrl_c_noted():
                weights = load_peft_weights(str(folder), device="cpu")
        except Exception as e:  # noqa: BLE001 - raised as it is, or as the Ctrl-C it was made of
            _interrupted_inside(e)
            raise
        set_peft_model_state_dict(wrapped, weights, adapter_name="default")
        self.peft_type = str(wrapped.peft_config["default"].peft_type.value)
        if wrapped.peft_config["default"].is_prompt_learning:
            raise ValueError(
                f"The adapter {folder} is a prompt-learning adapter ({self.peft_type}): it has no weights to merge. "
                "Attach it to the streaming model inside `attaching_adapters` instead."
            )
        try:
            wrapped.base_model._check_merge_allowed()
        except ValueError as e:
            raise ValueError(f"PEFT cannot merge the adapter {folder}: {e}") from e
        self.model = wrapped.base_model.model
        adapted = [
            k for k, m in self.model.named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))
        ]
        # the outermost adapted modules (a tuner layer's own parts are not merged on their own), as peft's unload walks
        self.modules = [k for k in adapted if not any(k.startswith(o + ".") for o in adapted)]
        self.owner: dict[str, list[str]] = {}  # a weight's name -> the adapted modules holding it (tied: several)
        for key in self.modules:
            module = self.model.get_submodule(key)
            for p in module.parameters():
                names = self.names.get(id(p), [])
                if len(names) > 1 and isinstance(module, ModulesToSaveWrapper):
                    raise ValueError(self._untied(key, names))
                for name in names:
                    self.owner.setdefault(name, []).append(key)
        for name, p in self.model.named_parameters():
            if id(p) in self.names:
                continue
            if p.is_meta:  # (a weight PEFT made for the adapter that its file does not hold)
                raise ValueError(f"The adapter {folder} holds no value for {name}: its weights file is incomplete.")
            if p.is_floating_point() and not all_finite(p):
                raise ValueError(f"The adapter {folder} holds non-finite values in {name}: its weights are damaged.")
        # the copies of weights of modules not adapted: stored as they are
        self.copies = {n: p for p in self.given_weights() for n in self.names[id(p)] if n not in self.owner}

    def merge(self, tensors: dict[str, torch.Tensor]) -> None:
        """Merge the adapter into the adapted modules whose weights `tensors` (one unit's, by the model's names) holds,
        in place of those tensors (each at its dtype, or at the wider one it merged at: `_stored_dtype`)."""
        from peft.utils import _get_submodules

        held = {k for n in tensors for k in self.owner.get(n, ())}
        keys = [k for k in self.modules if k in held]  # (in the model's order, as `merge_and_unload` goes)
        placed: dict[int, nn.Parameter] = {}
        stored: dict[str, list[str]] = {}  # a weight's name in `tensors` -> all its names (tied: several)
        for key in keys:
            for p in self.model.get_submodule(key).parameters():
                names = self.names.get(id(p), [])
                here = [n for n in names if n in tensors]
                if names and not here:  # (a weight stored in another unit)
                    raise ValueError(self._tied(key, names[0]))
                if here and id(p) not in placed:
                    if id(p) not in self.given:
                        p.data = tensors[here[0]].to(p.dtype, copy=True)  # (merged in place)
                    # (the unit's own goes now, its dtype and shape kept: one copy of each weight at a time)
                    tensors[here[0]] = tensors[here[0]].to("meta")
                    placed[id(p)] = p
                    stored[here[0]] = names
        for key in keys:
            parent, target, target_name = _get_submodules(self.model, key)
            if hasattr(target, "unload_and_optionally_merge_module"):
                merged = target.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
            else:
                target.merge(safe_merge=False)
                merged = target.get_base_layer()
            setattr(parent, target_name, merged)
            placed.update((id(p), p) for p in merged.parameters())
        for name, names in stored.items():
            value = self._value(name)
            if any(self._value(n) is not value for n in names):
                # (an adapted weight the model ties to another that the merge changed alone)
                raise ValueError(self._tied(self.owner[name][0], next(n for n in names if n != name)))
            if value.is_floating_point() and not all_finite(value):
                raise ValueError(
                    f"Merging the adapter into {self.owner[name][0]} gives non-finite values in {name}: the adapter is "
                    "not of this model, or its weights are damaged."
                )
            tensors[name] = value.detach().to(_stored_dtype(value.dtype, tensors[name].dtype))
        for name in [n for n in tensors if n in self.copies]:
            value = self.copies[name].detach()
            tensors[name] = value.to(_stored_dtype(value.dtype, tensors[name].dtype))
        for p in placed.values():  # (their memory goes with the unit)
            p.data = make_stand_in(p)

    def given_weights(self) -> list[nn.Parameter]:
        """The model's weights the adapter holds copies of (in their places)."""
        return [p for p in self.model.parameters() if id(p) in self.given]

    def _value(self, name: str) -> torch.Tensor:
        """The model's tensor of that name now (a tied head's weight may be its embeddings' tensor, not a parameter)."""
        module, _, attr = name.rpartition(".")
        return getattr(self.model.get_submodule(module), attr)

    @staticmethod
    def _untied(key: str, names: list[str]) -> str:
        return (
            f"The adapter replaces {key} (`modules_to_save`), whose weight the model ties to "
            f"another ({' and '.join(names)}): merged, the two differ, as `merge_and_unload` unties them, and the shard "
            "directory stores tied weights once. Merge the adapter into the loaded model (`merge_and_unload`), save "
            "it and split that."
        )

    @staticmethod
    def _tied(key: str, name: str) -> str:
        return (
            f"The adapter adapts {key}, whose weight {name} is tied to another that the shard directory stores "
            "in its place: merging it there is not supported. Merge the adapter into the loaded model "
            "(`merge_and_unload`), save it and split that."
        )
