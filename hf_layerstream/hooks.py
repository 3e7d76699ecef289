"""The accelerate hooks: one on each decoder layer, and on the resident modules kept in host RAM on a small GPU."""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from operator import attrgetter, getitem, is_, setitem

import torch
import torch.utils._pytree as pytree
from accelerate.hooks import ModelHook
from accelerate.utils import send_to_device
from torch import nn
from transformers import PreTrainedModel

from .engine import renew_after_fork
from .modeling import layer_unit

# how transformers names turning it off: `activation_checkpointing_disable` where it has it (5.24 does, and warns at
# the older `gradient_checkpointing_disable`)
_CHECKPOINTING_OFF = (
    "activation_checkpointing_disable"
    if hasattr(PreTrainedModel, "activation_checkpointing_disable")
    else "gradient_checkpointing_disable"
)


# what a slot holds, read at each pass: (dtype, on meta or the device, requires_grad). The hook's per-pass work runs
# for every decoder layer at every token, and a GPU at batch 1 waits for it (a layer's kernel launches take about a
# millisecond there): its loops over a layer's tensors run in C (`map`), not in Python
_KIND_META = attrgetter("dtype", "is_meta", "requires_grad")
_KIND = attrgetter("dtype", "device", "requires_grad")


def _sync(device: torch.device) -> None:
    """Profiling only: wait for the work queued on a GPU, so the times taken are real."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def autocast_cache_off(device: torch.device) -> bool:
    """Inside `torch.autocast` for `device`'s type, with its cache on: turn the cache off (the calling thread's), and
    say so (the caller turns it on again as its pass ends). Autocast keeps the low-precision cast of every weight (a
    leaf tensor requiring grad, as ours do without gradients too, see `_wants_grad`) it casts, until its block ends,
    for the next use of the same tensor: a loaded model's weights are cast once, but a streamed layer's are new
    tensors at every pass, and every pass added a copy of each (`generate` under autocast to bfloat16 grew by a copy
    of the streamed layers per token, and kept them to the block's end). Off during such a pass, nothing of it is
    kept; the casts kept of other tensors stay (clearing the cache instead had the caller's own weights cast again at
    their next use: their gradients then summed in float32, where the loaded model's single cast sums them in
    bfloat16)."""
    if torch.is_autocast_cache_enabled() and torch.is_autocast_enabled(device.type):
        torch.set_autocast_cache_enabled(False)
        return True
    return False


def autocast_cache_back(hook) -> None:
    """Autocast's cache on again where `hook` turned it off for its pass (`hook._cache_off`, see
    `autocast_cache_off`): as the pass ends, or as one that raised is put back."""
    if hook._cache_off:
        hook._cache_off = False
        torch.set_autocast_cache_enabled(True)


def _in_functorch() -> bool:
    """Whether a `torch.func` transform (`grad`, `vmap`, ...) runs the calling code."""
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def _in_grad_transform() -> bool:
    """Whether a `torch.func` transform that differentiates (`grad`, `vjp`, `jacrev`, `jvp`, ...) runs the calling
    code: there `torch.matmul` takes a weight not lifted into it as frozen. (`vmap` alone lifts no weight: the flag
    counts there as outside.)"""
    stack = getattr(getattr(torch._C, "_functorch", None), "get_interpreter_stack", None)
    interpreters = stack() if stack is not None else None
    return bool(interpreters) and any(i.key().name in ("Grad", "Jvp") for i in interpreters)


def _wants_grad(requires_grad: bool, value: torch.Tensor) -> bool:
    """Whether a streamed weight swapped in for a forward pass run without gradients (`no_grad`, `inference_mode`:
    `generate`, `pipeline`) requires grad: as the parameter it stands in for does (all of them, in a model as
    `from_pretrained` loads it, unless the caller froze some). No graph is recorded either way, but some kernels
    depend on it: `torch.matmul` folds a batched input that needs a copy into one matrix product only for a weight
    that requires grad, and takes a batched product otherwise (other bits; Mamba's mixers call `x_proj` so). With
    gradients on, streamed weights require grad only in a pass with gradients to its inputs (see
    `_no_weight_gradient`); in any other, an autograd graph would hold every layer's weights."""
    return requires_grad and (value.is_floating_point() or value.is_complex())


def _drop_gradient(weight: torch.Tensor) -> None:
    weight.grad = None


def mark_loaded(value: torch.Tensor) -> torch.Tensor:
    """`value`, marked as `from_pretrained` marks each weight it loads (transformers' `_is_hf_initialized`): the init
    functions a model's `_init_weights` calls (`transformers.initialization`) leave it as it is, as they leave the
    loaded model's. (`model.apply(model._init_weights)`, a no-op on the loaded model, re-initialised the resident
    weights and a kept layer's held ones, silently, or the embeddings before it refused a streamed layer's
    placeholder.) Placeholders carry the mark as a class attribute."""
    value._is_hf_initialized = True
    return value


def _no_weight_gradient(value: torch.Tensor) -> nn.Parameter:
    """`value` as a weight that requires grad, as the loaded model's, in a pass with gradients to its inputs (a
    backward to them: saliency, prompt tuning), whose gradient goes nowhere: the kernels that pick by it are the
    loaded model's (`torch.matmul`'s fold, see `_wants_grad`: Jamba's and FalconMamba's `dt_proj.weight @ x` gave
    input gradients 1e-5 off), and no `.grad` is kept (each is computed, as the loaded model computes them, and let
    go at once). A leaf parameter, as the loaded model's: a hook writing it in place under `torch.no_grad()` works as
    there, and one writing it with gradients on is refused with the loaded model's error (an identity
    `autograd.Function` made it a view, which autograd refuses to write in place either way)."""
    weight = nn.Parameter(value.detach(), requires_grad=True)
    weight.register_post_accumulate_grad_hook(_drop_gradient)
    return weight


_requires_grad = attrgetter("requires_grad")


def _requires_grad_out(output) -> bool:
    """Whether a decoder layer's output (a tensor, or a tuple starting with one) requires grad."""
    first = output[0] if isinstance(output, (tuple, list)) and output else output
    return isinstance(first, torch.Tensor) and first.requires_grad


def _an_input_requires_grad(args, kwargs) -> bool:
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in pytree.tree_leaves((args, kwargs)))


class LayerStreamingHook(ModelHook):
    """Makes one decoder layer's weights present for its forward pass, and releases them afterwards.

    One hook per decoder layer (not per leaf module): `pre_forward` asks the loader for the layer's tensors and
    swaps them into the layer's modules in place of the meta placeholders; `post_forward` puts the placeholders
    back and tells the loader the memory can go. Swapping `_parameters` entries is a pointer update: no copy.
    """

    def __init__(
        self, index: int, loader, slots: list[tuple[nn.Module, str, str, bool]], profile=None, prefix: str | None = None
    ):
        self.index = index
        self.loader = loader
        # (module, attribute, name relative to the layer, is_parameter)
        self.slots = slots
        # each slot's dict (the module's `_parameters` or `_buffers`) and key: the swap is an item assignment there
        self.entries = [(m._parameters if p else m._buffers, a) for m, a, _, p in slots]
        self._dicts = [entry for entry, _ in self.entries]
        self._keys = [a for _, a in self.entries]
        self.names = [rel for _, _, rel, _ in slots]
        # what the slots hold outside the layer's forward: a meta tensor of the model's (`init_empty_weights()`) gives
        # way to a `Streamed` one, which refuses a computation with real tensors (the model's own go back at disable)
        self.placeholders = [
            _streamed(entry[a], index, rel, p, self._stored(prefix, rel)) if entry[a].is_meta else entry[a]
            for (entry, a), (_, _, rel, p) in zip(self.entries, slots)
        ]
        for entry, a, placeholder in zip(self._dicts, self._keys, self.placeholders):
            entry[a] = placeholder
        self.modules = list({id(m): m for m, _, _, _ in slots}.values())  # (those holding its tensors, once each)
        # what the placeholders are (a cast or move since is refused): their dtypes, and their devices, which for meta
        # placeholders (a model built with `init_empty_weights()`) only need to stay meta
        self._dtypes = [p.dtype for p in self.placeholders]
        self._devices = [p.device for p in self.placeholders]
        self._on_meta = all(p.is_meta for p in self.placeholders)
        self._casts_seen = -1  # (`Streamed.casts` when the slots were last checked)
        # whether each pass computes with tensors of its own (a streamed layer; one decoded module by module), not the
        # same ones as the last (see `autocast_cache_off`), and whether autocast's cache is off for the pass running
        self._fresh_each_pass: bool | None = None
        self._cache_off = False
        # whether the layer's shards hold quantized weights (see `_to_inputs`)
        self._quantized: bool | None = None
        self._kind = _KIND_META if self._on_meta else _KIND
        # a layer the plan keeps on the device: the values its last passes swapped in, made once for its kept tensors,
        # as (those tensors, {grad off: (the slots' kinds they were made for, see `pre_forward`; values)}).
        # Making a `nn.Parameter` for each weight at every pass was most of this hook's work, which a GPU at batch 1
        # sees beside a layer's 0.8 ms of kernel launches: `pre_forward` + `post_forward` of a kept Llama layer took
        # 20.6 us, now 4.9 (CPU, best of 9 x 5000); a forward pass of a 16-layer tiny Llama, every layer kept, built
        # as `generate` builds it: 46-47 us a layer over the loaded model's, now 1-30 (10th percentile of 300 passes,
        # two and four runs on a shared 2-core machine)
        self._kept_values: tuple[dict, dict[bool, tuple[list | None, list]]] | None = None
        # where the layer holds its kept values between passes run without gradients (`hold_between_passes`): whether
        # it may, and whether it does now
        self.holds_between = False
        self._installed = False
        self._held: list = []  # the values it holds then (or last held), one per slot
        # (`PassGuard`'s once it takes the hook: its lock serializes taking the held weights out with passes)
        self.guard: PassGuard | _NoGuard = _NoGuard()
        self.profile = profile
        self._t0 = 0.0
        # slots whose weight the loader hands over packed (see `ModuleDequantizer`): their `Packed` placeholder
        # while the layer is loaded, and, during its forward pass, the packed weight
        self.packed_placeholders: dict[int, nn.Parameter] = {}
        self.packed: dict = {}
        # during a forward pass, the weights its `ModuleDequantizer`s put in those slots (by slot), dequantized
        self.dequantized_values: dict[int, nn.Parameter] = {}
        # during a forward pass (not held after it): the values it put in the slots, whether each required grad then,
        # and whether the pass records an autograd graph on them (see `_swap_out`)
        self._swapped: list | None = None
        self._flags: list[bool] = []
        self._graph = False
        self.dequantized = 0.0  # profiling: seconds spent dequantizing in this forward pass (not compute)

    def init_hook(self, module):
        return module

    def pre_forward(self, module, *args, **kwargs):
        self.guard.running = self  # (until `post_forward`: a cast of its modules from inside its forward waits)
        if self in self.guard.under_way:  # (run by a pass from inside its own forward: on the weights in already)
            return args, kwargs
        if self._installed:  # (a kept layer holding its weights since its last pass)
            # (`dict.get`: a slot the caller removed since, `torch.nn.utils.prune`, is refused below)
            if not torch.is_grad_enabled() and all(map(is_, map(dict.get, self._dicts, self._keys), self._held)):
                self.loader.kept_runs(self.index)
                if self.profile is not None:
                    self._profile_begins()
                return args, kwargs
            # gradients on (its weights swapped in below without them, see `_wants_grad`), or a slot was given another
            # value since (`module.weight = ...`: left there, and refused below as a placeholder cast or moved is)
            self._take_out()
        if getattr(module, "gradient_checkpointing", False) and module.training and torch.is_grad_enabled():
            raise RuntimeError(
                "Gradient checkpointing is enabled on a streamed model: the backward pass would run each decoder "
                f"layer again after streaming has let go of its weights. Call `model.{_CHECKPOINTING_OFF}()` (or "
                "`model.eval()`); the streamed weights are frozen, and gradients with respect to the inputs work "
                "without it."
            )
        if self.loader.holds(self.index):
            # the layer's last forward raised, in a call of the layer itself (a pass that raised was put back by
            # `PassGuard`): its weights are still in; out first, so they are not taken for a cast below
            self._unload()
        if self._held:
            # values it held, put back in a slot since it took them out (`torch.func.functional_call` restores what
            # it found; a weight saved, replaced and restored by the caller): its own, so its placeholder again (whose
            # `requires_grad` stays: the model's since, which that value, out of the model, did not follow)
            self._placeholders_over(self._held, carry=False)
        # each slot's kind: a dtype or device other than its placeholder's is a cast since enable (`_apply` casts a
        # parameter in place), refused; without gradients a weight requires grad as its placeholder does, which the
        # caller may have changed since the kept values were made (`model.requires_grad_(False)`: reused, they kept
        # the old flags, and a Mamba model then gave other bits than the loaded model frozen alike). Kept values are
        # reused for the kinds they were made for, which were checked then.
        try:
            kinds = list(map(self._kind, map(getitem, self._dicts, self._keys)))
        except KeyError:
            raise self._removed() from None
        no_grad = not torch.is_grad_enabled()
        # with gradients on, and an input that requires them: weights that require grad too (see
        # `_no_weight_gradient`), new at every such pass
        to_inputs = not no_grad and self._to_inputs(args, kwargs)
        kept = self._kept_values
        made = kept[1].get(no_grad) if kept is not None and not to_inputs else None
        if made is None or made[0] != kinds:
            made = None
            self._check(kinds)
        elif self._casts_seen != Streamed.casts:  # (a placeholder cast since: maybe back, to the kinds made for)
            self._check(kinds)
        tensors = self.loader.acquire(self.index)
        if made is not None and kept[0] is tensors:
            values = made[1]
        else:
            values = self._values(tensors, no_grad, kinds, to_inputs)
        # (first: what `_swap_out` finds of them in the slots, after the pass, is taken out, with a `requires_grad`
        # set meanwhile; another value put in a slot meanwhile stays, and is refused at the next pass)
        self._swapped, self._flags, self._graph = values, list(map(_requires_grad, values)), to_inputs
        for _ in map(setitem, self._dicts, self._keys, values):  # (the swap: no loop in Python, nor a deque to make)
            pass
        if no_grad and self.holds_between:  # (they stay in after the pass: the loader holds them anyway)
            self._held = values  # (first: a Ctrl-C between the two leaves nothing installed that `_held` misses)
            self._installed = True
            self._swapped = None
            self.loader.release(self.index)
        if self._fresh_each_pass is None:
            self._fresh_each_pass = bool(self.packed_placeholders) or self.loader.plan.tier(self.index) != "device"
        if self._fresh_each_pass:
            self._cache_off = autocast_cache_off(self.loader.device)
        if self.profile is not None:
            self._profile_begins()
        return args, kwargs

    def _stored(self, prefix: str | None, rel: str) -> tuple[str, str, bool] | None:
        """Where the layer's tensor `rel` is stored (named `prefix + rel` in the manifest): its shard file, its name
        there and whether it is stored quantized, for its placeholder's refusals; `None` where not known (no prefix
        given)."""
        unit = layer_unit(self.index)
        entry = self.loader.shards.unit(unit).tensors.get(prefix + rel) if prefix is not None else None
        if entry is None:
            return None
        return str(self.loader.shards.files[unit]), prefix + rel, entry.quant is not None

    def _to_inputs(self, args, kwargs) -> bool:
        """A pass with gradients on: whether its weights require grad (see `_no_weight_gradient`): where an input
        requires grad, outside a `torch.func` transform (which refuses `requires_grad_` inside it; its weights stay
        frozen there, as before), and for a layer of full-precision weights (a quantized one's, decoded whole or
        module by module, stay frozen: the two ways give the same bits, as without gradients)."""
        if self._quantized is None:
            unit = self.loader.shards.unit(layer_unit(self.index))
            self._quantized = any(t.quant is not None for t in unit.tensors.values())
        return not self._quantized and _an_input_requires_grad(args, kwargs) and not _in_functorch()

    def _profile_begins(self) -> None:
        if self.index == 0:
            self.profile.begin()
        self.dequantized = 0.0
        self._t0 = time.perf_counter()

    def _values(self, tensors: dict, no_grad: bool, kinds: list[tuple], to_inputs: bool = False) -> list:
        """What each slot holds during this pass: the loaded tensors, weights as `nn.Parameter`s (requiring grad as
        the slot's kind says, without gradients), a packed weight's `Packed` placeholder (the weight itself in
        `self.packed`, dequantized as its module runs). Kept for the next passes where the layer is kept on the
        device and none of its weights is packed, with the kinds they were made for."""
        values = []
        for k, (_, _, rel, is_param) in enumerate(self.slots):
            value = tensors[rel]
            if k in self.packed_placeholders and not isinstance(value, torch.Tensor):
                self.packed[k] = value
                value = self.packed_placeholders[k]
                # as the weight dequantized whole would (`_wants_grad`): code of the layer computing with it outside
                # its module (Jamba's and FalconMamba's `dt_proj.weight @ x`) gets `torch.matmul`'s kernel by it, so
                # `dequantize="module"` gave other bits than "layer" for a batched input
                value.requires_grad_(no_grad and _wants_grad(kinds[k][2], value))
            elif is_param and to_inputs and _wants_grad(kinds[k][2], value):
                value = _no_weight_gradient(value)
            elif is_param:
                value = nn.Parameter(value, requires_grad=no_grad and _wants_grad(kinds[k][2], value))
            values.append(value)
        if not self.packed_placeholders and self.loader.plan.tier(self.index) == "device" and not to_inputs:
            kept = self._kept_values
            if kept is None or kept[0] is not tensors:
                kept = self._kept_values = (tensors, {})
            kept[1][no_grad] = (kinds, list(map(mark_loaded, values)))  # (held between passes, see `mark_loaded`)
        return values

    def _check(self, kinds: list[tuple]) -> None:
        casts = Streamed.casts
        for k, (dtype, where, _) in enumerate(kinds):
            if dtype != self._dtypes[k] or (where is not True if self._on_meta else where != self._devices[k]):
                raise self._moved(k)
        for k, value in enumerate(map(getitem, self._dicts, self._keys)):
            if getattr(value, "cast", False):
                raise self._cast_back(k)
        self._casts_seen = casts

    def _cast_back(self, k: int) -> RuntimeError:
        return RuntimeError(
            f"Decoder layer {self.index}'s {self.names[k]} was cast to another dtype while streaming and back to "
            f"{self._dtypes[k]} (e.g. `model.model.half()`, then `.float()`), which the streamed weights do not "
            "follow: the loaded model's would keep the rounding. To compute at another dtype, call "
            "`disable_layer_streaming(model)`, then `enable_layer_streaming(model, shard_dir, dtype=...)`."
        )

    def _removed(self) -> RuntimeError:
        k = next(k for k, (entry, key) in enumerate(zip(self._dicts, self._keys)) if key not in entry)
        return RuntimeError(
            f"Decoder layer {self.index}'s {self.names[k]} was taken out of its module while streaming (e.g. by "
            "`torch.nn.utils.prune` or `torch.nn.utils.parametrize`): the layer computes with the weights of the shard "
            "directory, as they are stored. To prune or reparametrize them, do it on the loaded model, save it and "
            "split that."
        )

    def _moved(self, k: int) -> RuntimeError:
        current = self._dicts[k][self._keys[k]]
        name = f"Decoder layer {self.index}'s {self.names[k]}"
        if self._on_meta and not current.is_meta:  # (a cast or move of a meta tensor gives a meta tensor)
            return RuntimeError(
                f"{name} was replaced by another tensor ({current.dtype} on {current.device}) while streaming (e.g. "
                "`module.weight = ...`, `torch.func.functional_call`): the layer computes with the weights of the shard "
                "directory. To compute with other weights, save the model with them and split it again."
            )
        return RuntimeError(
            f"{name} was cast or moved to {current.dtype} on {current.device} while streaming (e.g. by "
            "`model.model.half()`), which the streamed weights do not follow. To change them, call "
            "`disable_layer_streaming(model)`, then `enable_layer_streaming(model, shard_dir, device=..., dtype=...)`."
        )

    def post_forward(self, module, output):
        self.guard.running = None
        if self in self.guard.under_way:  # (the pass its forward runs goes on with them: see `pre_forward`)
            return output
        if self.profile is not None:
            _sync(self.loader.device)
            elapsed = time.perf_counter() - self._t0
            self.profile.add(self.index, compute=elapsed - self.dequantized, dequantize=self.dequantized)
        if not self._installed:
            if not self._graph and torch.is_grad_enabled() and _requires_grad_out(output):
                # (an autograd graph through the layer, though none of its inputs required grad: a tensor inside
                # it does, a prefix or an adapter being trained; its weights may be saved for the backward)
                self._graph = True
            self._swap_out()
        autocast_cache_back(self)
        return output

    def hold_between_passes(self) -> list:
        """Let this layer, which the plan keeps on the device (none of its weights packed, no module of it another
        layer's too), hold its kept weights in its modules between passes run without gradients, as a loaded model
        holds its weights: its hook's work at each pass is then a flag read, not a swap in and out of every tensor.
        A GPU at batch 1 waits for the Python launching its kernels: there the default plan (every layer kept) took
        1.08x the whole model's time a token, and a 16-layer tiny Llama on a CPU, as Python-bound, 1.07-1.09x, with
        held weights 1.02-1.05x (`hf-layerstream bench --paired-calls`). What the placeholders guarded between passes is
        kept: a cast or move (`_apply`: `half()`, `to()`) and `load_state_dict` of a module holding the weights first
        put the placeholders back (they are cast, or loaded into, as before, and the next pass checks them; from
        another thread, after the pass running, see `_MethodGuard`); a pass with gradients takes them out too, and a
        weight put over a held one (`module.weight = ...`) is refused at the next pass. Returns the handles that undo
        it (`.remove()`)."""
        self.holds_between = True
        return [_MethodGuard(m, name, self) for m in self.modules for name in ("_apply", "_load_from_state_dict")]

    def _take_out(self) -> None:
        """The held weights out of the modules, the placeholders back in (a slot given another value since keeps
        it: the next pass refuses it, as a placeholder cast or moved); a `requires_grad` set on a weight since
        (`model.requires_grad_(False)`) goes to its placeholder, which the next pass reads, and the kept values are
        made anew then (they no longer are what the kinds they were made for say)."""
        self._installed = False
        self._placeholders_over(self._held)

    def _placeholders_over(self, values: list, carry: bool = True) -> None:
        for k, (entry, key, p) in enumerate(zip(self._dicts, self._keys, self.placeholders)):
            v = entry.get(key)  # (`None` for a slot taken out since: left out)
            if v is not values[k] or v is p:
                continue
            if carry and isinstance(p, nn.Parameter) and v.requires_grad != p.requires_grad:
                p.requires_grad_(v.requires_grad)
                self._kept_values = None
            entry[key] = p

    def _swap_out(self):
        """The placeholders back in the slots, and the layer's tensors let go. A slot the caller gave another value
        during the pass (`module.weight = nn.Parameter(...)` in a hook) keeps it, as a loaded model would, and the
        next pass refuses it (see `_moved`: the layer computes with the shard directory's weights), as for a layer
        holding its weights between passes (it was put back silently, and the next pass computed without it); a
        slot the caller emptied (`torch.nn.utils.prune`) stays empty (refused too). A `requires_grad` the caller set
        on a weight during the pass goes to its placeholder, as it stays on a loaded model's weight."""
        self._installed = False
        if self.packed:
            self.packed = {}
        swapped, self._swapped = self._swapped, None
        graph, self._graph = self._graph, False
        if swapped is None or (
            all(map(is_, map(dict.get, self._dicts, self._keys), swapped))
            and list(map(_requires_grad, swapped)) == self._flags
        ):  # (every slot holds what the pass put there, as it was: the swap back, no loop in Python)
            for _ in map(setitem, self._dicts, self._keys, self.placeholders):
                pass
        else:
            dequantized = self.dequantized_values
            for k, (entry, key, p) in enumerate(zip(self._dicts, self._keys, self.placeholders)):
                v = entry.get(key)
                if v is None or v is p:
                    continue
                if v is swapped[k] or v is dequantized.get(k):
                    if isinstance(p, nn.Parameter) and v is swapped[k] and v.requires_grad != self._flags[k]:
                        p.requires_grad_(v.requires_grad)
                        self._kept_values = None
                    entry[key] = p
        # (none of its values alive here as the layer is let go: a value is a view of a read buffer, which the pool
        # drops instead of reusing while one is, and a new buffer was allocated for every layer read)
        swapped = v = None  # noqa: F841
        self.dequantized_values.clear()
        self.loader.release(self.index, graph)

    def _unload(self):
        """Out of a forward that did not reach `post_forward` (it raised; or streaming is disabled). A kept layer's
        values are made anew at its next pass: the model held them meanwhile, and a cast made then (`layer.half()`
        after a direct call of the layer raised) reached them, which every later pass would have reused."""
        autocast_cache_back(self)  # (as `post_forward` does)
        if self._installed:
            self._take_out()  # (a `requires_grad` set on a held weight stays with the model)
        self._held = []
        removed = [(entry, key) for entry, key in zip(self._dicts, self._keys) if key not in entry]
        self._swap_out()
        for entry, key in removed:  # (taken out by the caller, `torch.nn.utils.prune`: left so, as the caller made it)
            entry.pop(key, None)
        self._kept_values = None

    @property
    def weights_map(self) -> Mapping[str, torch.Tensor]:
        """Where transformers' `save_pretrained` reads an offloaded layer's weights from, as from accelerate's offload
        hooks: name relative to the layer -> the tensor in host memory, read from the shard file (dequantized from
        quantized shards: the weights the model computes with)."""
        return _LayerWeights(self)

    def detach_hook(self, module):
        self._unload()  # (the kept values go too, as the kept tensors go with the loader's)
        return module

    def __repr__(self) -> str:
        return (
            f"LayerStreamingHook(layer={self.index}, tier={self.loader.plan.tier(self.index)}, "
            f"device={self.loader.device}, tensors={len(self.slots)})"
        )


class _MethodGuard:
    """On a module of a layer holding its kept weights between passes (`LayerStreamingHook.hold_between_passes`):
    its `_apply` (what `half()`, `to()`, `cuda()` call, also from a module above it) or `_load_from_state_dict`
    (`load_state_dict`) first puts the placeholders back, so a cast or load reaches them, as between passes before,
    and not the kept weights every later pass uses. It holds the lock passes run under: a cast from another thread
    waits for a pass running, which would otherwise lose its weights part way. An instance attribute, as
    accelerate's `forward`; `remove` takes it off. A copy of the module (`copy.deepcopy`, `pickle`) gets an inert one
    (the copy is a plain module, no layer's).
    """

    def __init__(self, module: nn.Module, name: str, hook: LayerStreamingHook | None, own=None):
        self.module = module
        self.name = name
        self.hook = hook
        # an instance attribute the module had, if any: called through
        self.own = vars(module).get(name) if hook is not None else own
        if hook is not None:
            setattr(module, name, self.call)

    def call(self, *args, **kwargs):
        hook = self.hook
        if hook is None:
            return self._through(*args, **kwargs)
        guard = hook.guard
        if guard.running is hook and guard.owner == threading.get_ident():
            # from inside this layer's own forward (a hook in it; the lock is this thread's): out as the pass ends
            guard.deferred.add(hook)
            return self._through(*args, **kwargs)
        with guard.lock:
            if hook._installed:
                hook._take_out()
            return self._through(*args, **kwargs)

    def _through(self, *args, **kwargs):
        if self.own is not None:
            return self.own(*args, **kwargs)
        return getattr(type(self.module), self.name)(self.module, *args, **kwargs)

    def remove(self) -> None:
        if vars(self.module).get(self.name) == self.call:  # (one set over it since stays)
            if self.own is None:
                delattr(self.module, self.name)
            else:
                setattr(self.module, self.name, self.own)

    def __reduce__(self):  # (`copy.deepcopy` too)
        return _MethodGuard, (self.module, self.name, None, self.own)


class _LayerWeights(Mapping):
    def __init__(self, hook: LayerStreamingHook):
        self.hook = hook

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.hook.names:
            raise KeyError(name)
        return self.hook.loader.host_tensor(self.hook.index, name)

    def __contains__(self, name) -> bool:  # (not through `__getitem__`: that reads the tensor)
        return name in self.hook.names

    def __iter__(self):
        return iter(self.hook.names)

    def __len__(self) -> int:
        return len(self.hook.names)


ATTACHING = (
    "A forward pass ran inside `attaching_adapters`, where the streamed weights are stand-ins without values (for "
    "PEFT to see their device and dtype): run it after the block."
)
DISABLED_DURING_CALL = (
    "disable_layer_streaming(model) ran during this call (in another thread, or in a callback of this one: a "
    "streamer, a stopping criterion): the model's decoder layers are back on the meta device. Let calls end before "
    "disabling streaming (it waits for a forward pass running, not for a whole `generate`)."
)

NO_TRAINING = (
    "hf_layerstream: this loss was computed by a model with layer streaming enabled, whose weights get no gradients "
    "(layer streaming is for inference: README, Limits), so a backward pass from it has nothing to train. Fine-tune "
    "the fully loaded model (`from_pretrained`) and split the result, or merge an adapter trained on it as you split "
    "(`split_checkpoint(..., adapter=...)`); a PEFT adapter made trainable inside `attaching_adapters` gets "
    "gradients here too. A backward pass to the inputs works: pass `inputs_embeds` that require grad."
)


class _NoWeightGrads(torch.autograd.Function):
    """The loss a streamed model's forward computed with gradients on (`labels`), as it is, requiring grad where the
    loaded model's does; its backward raises `NO_TRAINING`. No weight of the pass requires grad (README, Limits), so
    that loss required none, and a training loop's `loss.backward()` (or `accelerator.backward(loss)`) failed with
    torch's "element 0 of tensors does not require grad and does not have a grad_fn", naming no cause."""

    @staticmethod
    def forward(loss, anchor):
        return loss.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(NO_TRAINING)


def refuse_backward(out, head_weight: torch.Tensor | None):
    """`out` (a model's output), its `loss` made to say why a backward pass from it cannot train (`_NoWeightGrads`),
    where gradients are on, the loss requires none, and the loaded model's would: `head_weight`, the output head's
    weight, requires grad (as the loaded model's: a model the caller froze, `requires_grad_(False)`, gets torch's own
    error, as loaded). With `return_dict=False` the output is a tuple, its loss first where there is one: the one
    element of it with no dimensions (logits have some)."""
    if isinstance(out, dict):
        loss = out.get("loss")
    elif type(out) is tuple and out:
        loss = out[0] if isinstance(out[0], torch.Tensor) and out[0].dim() == 0 else None
    else:
        loss = None
    if (
        isinstance(loss, torch.Tensor)
        and loss.is_floating_point()
        and not loss.requires_grad
        and torch.is_grad_enabled()
        and head_weight is not None
        and head_weight.requires_grad
    ):
        loss = _NoWeightGrads.apply(loss, loss.new_zeros((), requires_grad=True))
        if isinstance(out, dict):
            out["loss"] = loss
        else:
            out = (loss, *out[1:])
    return out


# `torch.compile` of a streamed model (or of its forward): the pass reads each layer's weights in at every call, which
# a graph cannot hold. Dynamo traced into it and recompiled each layer's forward up to its recompile limit, and
# `fullgraph=True` failed with "Unsupported context manager", naming no cause. The wrappers are left out of any graph:
# the pass runs eagerly (what the rest of the model compiles to around it is dynamo's), and `fullgraph=True` says this.
NOT_COMPILED = (
    "hf_layerstream: with layer streaming enabled the decoder layers' weights are read in from the shard directory "
    "at every pass, which a compiled graph cannot hold, so the pass runs eagerly: drop `fullgraph=True`, or call "
    "`disable_layer_streaming(model)` and compile the fully loaded model (`from_pretrained`)"
)


@functools.lru_cache(maxsize=4)
def _takes_reason(disable: Callable) -> bool:
    """Whether `disable` (`torch.compiler.disable`) takes `reason` (torch 2.8 on): read once per function, not at every
    enable (keyed by the function: one put in its place, as a test does, is read anew)."""
    return "reason" in inspect.signature(disable).parameters


def _not_compiled(fn: Callable) -> Callable:
    """`fn`, run eagerly (with what it calls) where `torch.compile` traces it: see `NOT_COMPILED`. (Called through a
    plain function: `torch.compile` of a function `torch.compiler.disable` returned compiles the function it wraps.)
    Before torch 2.8 (the package takes 2.5 on) `torch.compiler.disable` takes no `reason`, and every enable failed
    with a TypeError: there `fullgraph=True` fails with dynamo's own message."""
    if _takes_reason(torch.compiler.disable):
        eager = torch.compiler.disable(fn, reason=NOT_COMPILED)
    else:
        eager = torch.compiler.disable(fn)

    @functools.wraps(fn)
    def not_compiled(*args, **kwargs):
        return eager(*args, **kwargs)

    return not_compiled


class _NoGuard:
    """A hook's guard before `PassGuard` takes it (no pass runs then)."""

    def __init__(self):
        self.running = self.owner = None
        self.under_way = ()
        self.lock = contextlib.nullcontext()


def _no_check() -> None:
    pass


class PassGuard:
    """Wraps the forward of the module that runs the decoder layers (e.g. `LlamaModel`): one pass over the layers.

    * Passes run one at a time. The hooks swap each layer's weights into modules every pass shares, so two passes at
      once (`generate` called from two threads, as a server's worker threads do) would put a layer's placeholders
      back under the other's feet (errors, or a wrong output); a second caller waits for the pass running.
    * A pass that raised inside a decoder layer (Ctrl-C, out of memory, an error in code hooked on a layer) never
      reached that layer's `post_forward`: its weights are put back at once, and the layers read ahead for the rest
      of that pass are let go as the next pass begins (`LayerLoader.sweep_begins`).
    * After `disable_layer_streaming` (`close`) the wrapper, if still called (something wrapped the forward after it),
      calls straight through, holding nothing of the streaming state; a call that was waiting for the lock while
      streaming was disabled raises, saying so.
    """

    def __init__(
        self,
        hooks: list[LayerStreamingHook],
        loader,
        host_hooks: list | None = None,
        layers_run: Callable[[], int | None] | None = None,
    ):
        self.hooks = hooks
        for hook in hooks:
            hook.guard = self
        self.loader = loader
        # how many decoder layers a pass beginning now runs (`None`: all), told to the loader (`pass_runs`)
        self.layers_run = layers_run or (lambda: None)
        # the resident modules kept in host RAM (`HostResidentHook`): the head runs after the pass over the layers,
        # and a VLM's embeddings before it, so with those the model's own forward is wrapped too (`wrap_model`)
        self.host_hooks = host_hooks or []
        # the output head's `_HeadGrad` (stream.py), if any: a call that raised puts back what its thread swapped in
        self.head_grad = None
        # the output head's weight, if any: whether the loaded model's loss would require grad (`refuse_backward`)
        self.head_weight: torch.Tensor | None = None
        # called at each pass: PEFT adapters attached since have values (stream.py's `_adapter_check`)
        self.check_adapters: Callable[[], None] = _no_check
        self.attaching = False  # inside `attaching_adapters` (stream.py): a pass is refused
        self.lock = threading.RLock()
        self.guarded = None  # the wrapper `wrap` made
        self.model_guarded = None  # the wrapper `wrap_model` made
        self._raised = False  # the last pass raised part way
        # the thread running a pass (`None`: none), the layer whose forward runs in it (between its hook's
        # `pre_forward` and `post_forward`), and the layers whose held weights a cast or load from inside their own
        # forward (a hook in it) asked out: out as the pass ends, not under their feet
        self.owner: int | None = None
        self.running: LayerStreamingHook | None = None
        self.deferred: set = set()
        # the layers whose forward runs further up the thread running a pass, which runs a pass of the model from
        # inside them (a hook in a layer evaluating the model): they keep their weights through it (see `wrap`)
        self.under_way: list[LayerStreamingHook] = []
        renew_after_fork(self)

    def _after_fork(self) -> None:
        self.lock = threading.RLock()  # (a child forked while another thread ran a pass: that thread is not there)
        if self.owner != threading.get_ident():  # (forked by the thread running the pass, which goes on in the child)
            self.owner = None

    def _put_back(self) -> None:
        for index in self.loader.in_use():
            if self.hooks[index] not in self.under_way:
                self.hooks[index]._unload()

    def _take_out_deferred(self) -> None:
        """The held weights a cast or load from inside their own layer's forward asked out: out now, as that pass
        ended, and the kept values made anew at the next pass (the cast reached those the layer held while it ran, as
        it reached the weights in during a pass before, and not the placeholders: it is not followed)."""
        deferred, self.deferred = self.deferred, set()
        for hook in deferred:
            if hook._installed:
                hook._take_out()
            hook._kept_values = None

    def _put_back_host(self) -> None:
        """Placeholders back in the host-resident modules (a pass that raised inside one: the head's copy on the
        device goes now, not at the next pass, which on a small GPU may need that memory)."""
        for hook in self.host_hooks:
            hook._unload()

    def close(self) -> None:
        """Streaming is disabled (called with the lock held)."""
        if self.head_grad is not None:
            # the frames of a call that raised hold it (`guarded`'s local), and so does the error's traceback, kept
            # by the caller or by IPython (`sys.last_value`): the head's weight, a view of the resident file's map,
            # kept that file mapped and open after disable. Its hooks are off: nothing reads it any more (a forward
            # under way with the alias in puts back the weight its entry holds)
            self.head_grad.weight = None
        self.hooks, self.loader, self.host_hooks, self.head_grad, self.head_weight = [], None, [], None, None

    def wrap_model(self, forward):
        """Wrap the model's own forward (where the runner is not the model itself): the head, and a vision-language
        model's embeddings, run outside the runner's pass, so calls run one at a time there as well, and
        `disable_layer_streaming` from another thread waits for the whole call: it put the model's meta head weight
        back while a call went from the pass over the layers to the head, which computed on it (torch on a CPU reads
        memory never written) and returned that, silently. Where resident modules are kept in host RAM, they swap
        weights into modules every call shares too; a call that raised puts their placeholders back."""

        @functools.wraps(forward)
        def guarded(*args, **kwargs):
            was_open = self.loader is not None
            with self.lock:
                if self.loader is None:
                    if was_open:  # (it waited for the lock while streaming was disabled: see `wrap`)
                        raise RuntimeError(DISABLED_DURING_CALL)
                    return forward(*args, **kwargs)
                head_grad = self.head_grad
                mark = head_grad.counts() if head_grad is not None else None
                try:
                    return refuse_backward(forward(*args, **kwargs), self.head_weight)
                except BaseException:
                    self._put_back_host()
                    if mark is not None:
                        head_grad.unwind(mark)
                    raise

        self.model_guarded = guarded = _not_compiled(guarded)
        return guarded

    def wrap(self, forward):
        @functools.wraps(forward)
        def guarded(*args, **kwargs):
            was_open = self.loader is not None
            with self.lock:
                if self.loader is None:
                    if was_open:  # it waited for the lock while streaming was disabled: the layers are meta now
                        raise RuntimeError(DISABLED_DURING_CALL)  # (a pass on them may even "succeed", on meta)
                    return forward(*args, **kwargs)
                if self.attaching:
                    raise RuntimeError(ATTACHING)
                owner, self.owner = self.owner, threading.get_ident()
                running, self.running = self.running, None  # (a pass inside a layer's forward: back to it after)
                # a pass from inside that layer's forward, in the thread running it: the layer keeps its weights, and
                # the inner pass runs it on them
                inside = running if owner == self.owner and running is not None else None
                if inside is not None:
                    self.under_way.append(inside)
                head_grad = self.head_grad
                mark = head_grad.counts() if head_grad is not None else None
                try:
                    self._put_back()  # (a layer called on its own, outside a pass, that raised)
                    if self._raised:
                        self.loader.sweep_begins()  # (interrupted there too: the next pass lets go of the rest)
                        self._raised = False
                    self.loader.check_kept_files()
                    self.check_adapters()
                    self.loader.pass_runs(self.layers_run())
                    out = forward(*args, **kwargs)
                    if self.loader is None:  # disabled from inside the pass: what came after ran on meta weights
                        raise RuntimeError(DISABLED_DURING_CALL)
                    return out
                except BaseException as e:
                    self._raised = True
                    if mark is not None:  # (a tied input embedding's alias, whose forward the pass runs)
                        head_grad.unwind(mark)
                    if self.loader is not None:  # (`None`: disabled from inside the pass)
                        self._put_back()
                        self._put_back_host()
                    elif isinstance(e, Exception) and str(e) != DISABLED_DURING_CALL:
                        # (a plain call raised torch's "Tensor on device cpu is not on the expected device meta!", or
                        # accelerate's missing `_hf_hook`, where `generate` names the cause)
                        raise RuntimeError(DISABLED_DURING_CALL) from e
                    raise
                finally:
                    self.owner, self.running = owner, running
                    if inside is not None:
                        self.under_way.pop()
                    if owner is None and self.deferred:
                        self._take_out_deferred()

        self.guarded = guarded = _not_compiled(guarded)
        return guarded


class _Placeholder(torch.Tensor):
    """A weight's stand-in with no storage: its shape, dtype and device (so code reading `.device` or `.dtype` sees
    what the model computes with), and any computation with it raises `_refusal`."""

    source: str  # the tensor's name in the shard directory
    _is_hf_initialized = True  # (a loaded weight's: see `mark_loaded`)

    @staticmethod
    def __new__(cls, source: str, shape, dtype: torch.dtype, device: torch.device):
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=False)
        t.source = source
        return t

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"{type(self).__name__}({self.source!r}, shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return args[0]._copy()
        return cls._compute(func, args, kwargs or {})

    @classmethod
    def _compute(cls, func, args, kwargs):
        """Any other operation on a placeholder: refused (`Packed` computes it with the weight dequantized)."""
        placeholder = next((a for a in args if isinstance(a, _Placeholder)), None)
        raise RuntimeError(placeholder._refusal(func) if placeholder is not None else f"`{func}` on a placeholder")

    def _copy(self) -> _Placeholder:
        return type(self)(self.source, self.shape, self.dtype, self.device)

    def _refusal(self, func) -> str:
        raise NotImplementedError

    def numpy(self, *args, **kwargs):
        raise RuntimeError(self._read_refusal("Tensor.numpy"))  # (torch's own: "not supported for tensor subclasses")

    def tolist(self):
        raise RuntimeError(self._read_refusal("Tensor.tolist"))  # (as `numpy`)

    def _read_refusal(self, func) -> str:
        """What `.numpy()` and `.tolist()` (reads of its values) are refused with: `_refusal`, unless its kind tells
        reads apart (`Streamed`'s, which `.item()` gets too)."""
        return self._refusal(func)


class Streamed(_Placeholder):
    """What a decoder layer's module holds in place of a weight outside its layer's forward pass, where the model was
    built on the meta device: a meta tensor (shape and dtype, no storage), as the model's own. An operation on meta
    tensors alone gives meta tensors, as on the model's own (a cast, a view: `half()` reaches it, and the layer's next
    pass refuses the cast); a computation with a real tensor raises, naming the weight. On the model's own meta tensor
    torch computes it as memory never written (`F.linear(x, meta_weight)` on a CPU, torch 2.13): a module of a layer
    not holding its weights, called by itself outside its layer's forward, returned that silently."""

    # how many times a placeholder was cast (`cast` set on it, see `data`): each layer's hook looks for such slots at
    # its next pass (`LayerStreamingHook._check`)
    casts = 0
    # where the weight's values are stored (its shard file, its name there, whether quantized), for the refusals: a
    # quantized one's file holds packed parts (`name::qdata`), which read as the weight are not its values
    stored: tuple[str, str, bool] | None = None

    @property
    def data(self):
        return _DATA.__get__(self)

    @data.setter
    def data(self, new: torch.Tensor) -> None:
        # `nn.Module._apply` (`half()`, `to(dtype)`, from any module above the layer's) casts a parameter in place, so:
        # a cast there and back left a placeholder as it was, and the layer computed with the shard directory's
        # weights where the loaded model keeps the rounding. Marked for good, and refused at the layer's next pass.
        if new.dtype != self.dtype or getattr(new, "cast", False):
            self.cast = True
            Streamed.casts += 1
        _DATA.__set__(self, new)

    @classmethod
    def _compute(cls, func, args, kwargs):
        leaves = pytree.tree_leaves((args, kwargs))
        holder = next(a for a in leaves if isinstance(a, Streamed))
        first = func._schema.arguments[0].alias_info if func._schema.arguments else None
        into = args and isinstance(args[0], Streamed) and first is not None and first.is_write
        if into and args[0].of_weight and _an_edit(func, args[1:], kwargs) and not _loading_state_dict():
            # an edit (`weight[:, :8] = 0`, `copy_`, `zero_`, an init function): on the model's own meta tensor it is
            # a no-op, but the loaded model's weights take it, and the layer's passes would not: it was dropped,
            # silently. `load_state_dict` copies into meta so, with torch's warning that it is a no-op: left so.
            raise RuntimeError(holder._write_refusal(func))
        if func is torch.ops.aten._to_copy.default and _to_a_device(kwargs):
            raise NotImplementedError(holder._move_refusal())  # (as torch's own: "Cannot copy out of meta tensor")
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError(holder._read_refusal(func))  # (torch's own: "cannot be called on meta tensors")
        if not into and any(isinstance(a, torch.Tensor) and not a.is_meta for a in leaves):
            raise RuntimeError(holder._refusal(func))
        plain_args, plain_kwargs = pytree.tree_map_only(Streamed, _plain_meta, (args, kwargs))
        out = func(*plain_args, **plain_kwargs)
        if into:
            return args[0]  # (in place: itself, as a meta tensor's in-place operation returns it)
        # a view of the weight (a slice, a transpose) is the weight to a write; a new tensor (`ones_like`, a product:
        # `prune` builds its mask so) is not
        view = isinstance(args[0], Streamed) and args[0].of_weight
        view = view and any(r.alias_info is not None for r in func._schema.returns)
        out = pytree.tree_map_only(torch.Tensor, lambda t: holder._like(t, view) if t.is_meta else t, out)
        if func is torch.ops.aten._to_copy.default and (out.dtype != holder.dtype or getattr(holder, "cast", False)):
            # (a cast: marked, as a slot it is swapped into, not set through `data`, under torch's
            # `set_swap_module_params_on_conversion`, must be refused too)
            out.cast = True
            Streamed.casts += 1
        return out

    @staticmethod
    def of(source: str, t: torch.Tensor, of_weight: bool = True) -> Streamed:
        """A `Streamed` named `source` with `t`'s shape, strides, dtype and device; `of_weight`: the placeholder of a
        weight, or a view of it (a write into it would be an edit of the weight, see `_write_refusal`)."""
        out = torch.Tensor._make_wrapper_subclass(
            Streamed, t.shape, strides=t.stride(), dtype=t.dtype, device=t.device, requires_grad=False
        )
        out.source = source
        out.of_weight = of_weight
        return out

    def _like(self, t: torch.Tensor, of_weight: bool) -> Streamed:
        out = Streamed.of(self.source, t, of_weight)
        out.stored = self.stored
        return out

    def _from_file(self) -> str | None:
        """Where the refusals say the weight's values can be read in the shard directory ("from ..."); `None` where its
        file stores it quantized (packed parts, not its values: `_saved` says so)."""
        if self.stored is None:
            return "from the layer's file in the shard directory (safetensors)"
        file, name, quantized = self.stored
        return None if quantized else f"from its shard file (tensor {name!r} of {file}, with safetensors)"

    def _saved(self) -> str:
        """What the refusals say of `save_pretrained`, which writes each weight as the model computes with it."""
        if self.stored is None or not self.stored[2]:
            return "`save_pretrained` writes each weight, read back from its shard file"
        file, name, _ = self.stored
        return (
            f"`save_pretrained` writes it dequantized: {file} stores it quantized, as packed parts ('{name}::...'), "
            "not its values"
        )

    def _copy(self) -> Streamed:
        out = self._like(self, self.of_weight)  # (`detach`, `alias`: the same weight)
        if getattr(self, "cast", False):  # (`nn.Parameter` over a cast, as torch's swap and overwrite paths make)
            out.cast = True
        return out

    def _refusal(self, func) -> str:
        if _in_a_hook_of_its_layer(self.source):
            return self._layer_hook_refusal(func)
        if _in_a_module_holding(self.source):
            return (
                f"{self.source} is brought in by layer streaming for its layer's forward pass only, but `{func}` ran "
                "on it with a real tensor outside that pass (a module of the layer called by itself?). Call the whole "
                "decoder layer (its hook brings its weights in) or the model."
            )
        # (no module holding it runs: code computing with its values, as `parameters_to_vector(model.parameters())`
        # or `sum(p.norm() for p in model.parameters())` do with the resident weights' values)
        where = self._from_file()
        return (
            f"{self.source} is brought in by layer streaming for its layer's forward pass only: outside that pass it "
            f"holds no values, but `{func}` computed with them and a real tensor (code reading the weights' values, "
            "as `parameters_to_vector(model.parameters())`?). Read or compute with them in a forward hook on its "
            f"module (inside the pass), {f'or read them {where}, ' if where else ''}or save the model "
            f"({self._saved()})."
        )

    def _write_refusal(self, func) -> str:
        return (
            f"{self.source} is brought in by layer streaming for its layer's forward pass only, read from the shard "
            f"directory: `{func}` writes into it outside that pass, which would not reach the weights the layer "
            "computes with. Edit the loaded model's weights, save it (`save_pretrained`) and split that (a PEFT "
            "adapter's merge: `split_checkpoint(..., adapter=...)` merges it as it splits); or change what the module "
            "computes with a forward hook on it."
        )

    def _move_refusal(self) -> str:
        return (
            f"{self.source} is brought in by layer streaming for its layer's forward pass only, onto the device it "
            "streams to: outside that pass it has no values to move or copy. To stream to another device, "
            "`disable_layer_streaming(model)`, then `enable_layer_streaming(model, shard_dir, device=...)`; to read "
            "its values, see a forward hook on its module (inside the pass), "
            + (f"or read them {where}" if (where := self._from_file()) else f"or save the model ({self._saved()})")
            + ". (Attaching a PEFT adapter, which moves the model to the device of its map? Attach it inside "
            "`with hf_layerstream.attaching_adapters(model):`.)"
        )

    def _layer_hook_refusal(self, func) -> str:
        return (
            f"{self.source} is brought in by layer streaming inside its decoder layer's forward only, but `{func}` "
            "used its values in a forward hook or pre-hook on that decoder layer itself, which torch runs outside the "
            "layer's forward (before its weights come in, or after they go). Register the hook on a module of the "
            "layer instead (`layer.self_attn`, `layer.mlp`, the weight's own module), whose hooks run inside it."
        )

    def _read_refusal(self, func) -> str:
        if _in_a_hook_of_its_layer(self.source):
            return self._layer_hook_refusal(func)
        where = self._from_file()
        return (
            f"{self.source} is brought in by layer streaming for its layer's forward pass only: outside that pass it "
            f"holds no values to read (`{func}`). Read it in a forward hook on its module (inside the pass), "
            + (
                f"or {where}, or save the model (`save_pretrained`)."
                if where
                else f"or save the model ({self._saved()})."
            )
        )


# (`Tensor.data`'s getter and setter, as torch's C tensor defines it: a Python subclass's override is not called)
_DATA = getattr(torch._C, "TensorBase", torch.Tensor).data


def _to_a_device(kwargs: dict) -> bool:
    """Whether a `_to_copy` takes its tensor off the meta device (a cast keeps it there)."""
    device = kwargs.get("device")
    return device is not None and torch.device(device).type != "meta"


def _an_edit(func, rest, kwargs) -> bool:
    """Whether an in-place operation writes values into a weight: all do (from a real tensor, a number, another
    weight, or none: `zero_`, `normal_`), except `set_` to a placeholder (as `torch.nn.utils.parametrize` registers a
    weight over itself: a no-op, refused at the next pass as any weight taken out of its module)."""
    tensors = [a for a in pytree.tree_leaves((rest, kwargs)) if isinstance(a, torch.Tensor)]
    setting = func in (torch.ops.aten.set_.source_Tensor, torch.ops.aten.set_.default)
    return not (setting and tensors and all(isinstance(t, Streamed) for t in tensors))


def _loading_state_dict() -> bool:
    """Whether the calling thread is in an `nn.Module._load_from_state_dict` (which copies into each parameter)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is _LOAD_FROM_STATE_DICT:
            return True
        frame = frame.f_back
    return False


_LOAD_FROM_STATE_DICT = nn.Module._load_from_state_dict.__code__


def _in_a_module_holding(source: str) -> bool:
    """Whether the module whose call or `forward` the calling thread is innermost in holds the placeholder named
    `source` (a module of its layer called by itself), rather than code computing with the weight's values itself.
    (Innermost: the model's forward holds every weight too, and a forward hook on a module of a layer in its pass,
    reading the values of the model's weights there as `parameters_to_vector(model.parameters())`, runs inside it.)"""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is _CALL_IMPL or frame.f_code.co_name == "forward":
            module = frame.f_locals.get("self")
            if isinstance(module, nn.Module):
                return _holds(module, source)
        frame = frame.f_back
    return False


def _holds(module: nn.Module, source: str) -> bool:
    """Whether `module` (or a module of it) holds the placeholder named `source`."""
    return any(isinstance(t, Streamed) and t.source == source for t in (*module.parameters(), *module.buffers()))


def _in_a_hook_of_its_layer(source: str) -> bool:
    """Whether the calling thread is in a forward hook or pre-hook of the decoder layer holding the placeholder named
    `source`: in that layer's call (`nn.Module._call_impl`), whose forward, where its `LayerStreamingHook` brings its
    weights in, is not under way (torch runs the module's hooks around it)."""
    frame, forwards = sys._getframe(2), set()
    while frame is not None:
        module = frame.f_locals.get("self")
        if isinstance(module, nn.Module):
            if frame.f_code.co_name == "forward":
                forwards.add(id(module))
            elif frame.f_code is _CALL_IMPL and isinstance(getattr(module, "_hf_hook", None), LayerStreamingHook):
                # (the first decoder layer met: its hooks, unless its forward is in the frames inside this one)
                return id(module) not in forwards and _holds(module, source)
        frame = frame.f_back
    return False


_CALL_IMPL = nn.Module._call_impl.__code__


def _plain_meta(t: Streamed) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _streamed(
    value: torch.Tensor, index: int, rel: str, is_param: bool, stored: tuple[str, str, bool] | None = None
) -> torch.Tensor:
    """A `Streamed` stand-in for the meta tensor `value`, decoder layer `index`'s `rel` (a parameter requiring grad
    as `value` does, for a parameter); `stored`: where its values are (`LayerStreamingHook._stored`)."""
    placeholder = Streamed.of(f"Decoder layer {index}'s {rel}", value)
    placeholder.stored = stored
    return nn.Parameter(placeholder, requires_grad=value.requires_grad) if is_param else placeholder


class HostResident(_Placeholder):
    """What a resident module kept in host RAM holds between forward passes in place of its weight: shape, dtype and
    the execution device, no storage. `model.device` (its first parameter's device, often the input embeddings') still
    names the GPU, so inputs go there; any computation with it raises, naming what to do instead (a module's forward
    pass swaps the real host tensor in, see `HostResidentHook`); `state_dict()` gives the host tensor (see
    `host_state_dict_hook`)."""

    def _refusal(self, func) -> str:
        return (
            f"{self.source!r} is kept in host RAM by layer streaming (the GPU's `max_memory` could not hold it): its "
            f"module uses it in its forward pass, but `{func}` on it outside that pass cannot. Read it from "
            "`model.state_dict()`, or give the GPU more `max_memory`."
        )


class Packed(_Placeholder):
    """What a module whose weight is dequantized as it runs (`dequantize="module"`) holds during its layer's forward
    pass, outside its own: the weight's shape, compute dtype and device. Its forward pass swaps the dequantized weight
    in (see `ModuleDequantizer`). Code of the layer that computes with the weight elsewhere (Jamba's and Mamba's
    `self.dt_proj.weight @ x`, a fused MLP) gets it dequantized for that one operation: the same bits, decoded
    again at each such use, and dropped after it."""

    _hook: weakref.ref | None = None  # the layer hook holding this weight packed during its pass (weakly: no cycle)
    slot: int = -1  # and its slot there

    @property
    def hook(self) -> LayerStreamingHook | None:
        return self._hook() if self._hook is not None else None

    @classmethod
    def _compute(cls, func, args, kwargs):
        args, kwargs = pytree.tree_map(lambda a: _dequantized(a, func), (args, kwargs))
        return func(*args, **kwargs)

    def _copy(self) -> Packed:
        t = super()._copy()
        t._hook, t.slot = self._hook, self.slot
        return t

    def numpy(self, *args, **kwargs):
        # (torch's own refusal: "not supported for tensor subclasses"; in its layer's pass the weight's values, as any
        # operation there gets them)
        return _dequantized(self, "Tensor.numpy").numpy(*args, **kwargs)

    def tolist(self):
        return _dequantized(self, "Tensor.tolist").tolist()  # (as `numpy`)

    def _refusal(self, func) -> str:
        return (
            f"{self.source!r} is held packed (quantized) by layer streaming and dequantized for its layer's forward "
            f"pass only: outside that pass it holds no values, but `{func}` ran on it there (a reference kept from "
            "the pass?). Read or compute with the weight inside the pass (in a forward hook on its module, or on "
            "another module of its layer: each operation there gets it dequantized), or save the model "
            "(`save_pretrained` writes each weight dequantized)."
        )


def _dequantized(a, func):
    """`a`, or where it is a `Packed` placeholder, its weight dequantized (the layer's pass holds it packed) for
    `func`."""
    if not isinstance(a, Packed):
        return a
    hook = a.hook
    weight = hook.packed.get(a.slot) if hook is not None else None
    if weight is None:
        raise RuntimeError(a._refusal(func))
    if hook.profile is None:
        out = weight.dequantize()
    else:
        _sync(hook.loader.device)
        t0 = time.perf_counter()
        out = weight.dequantize()
        _sync(hook.loader.device)
        hook.dequantized += time.perf_counter() - t0
    if a.requires_grad and not torch.is_grad_enabled():
        # as the placeholder (see `LayerStreamingHook._values`): under `inference_mode` `torch.matmul` reaches the
        # placeholder whole, and computes on this tensor, which picks its kernel by it
        out.requires_grad_(True)
    return out


class ModuleDequantizer:
    """Forward hooks of a module (a `nn.Linear`) whose quantized weight its layer's hook leaves packed: the weight is
    dequantized on the execution device as the module's forward pass begins, and dropped as it ends (also when it
    raised), so a layer in flight takes its packed size plus one weight dequantized at a time."""

    def __init__(self, layer_hook: LayerStreamingHook, slots: list[tuple[str, int]]):
        self.layer_hook = layer_hook
        self.slots = slots  # (attribute, index of the layer hook's slot)

    def pre(self, module: nn.Module, args):
        packed = self.layer_hook.packed
        profile = self.layer_hook.profile
        if profile is not None:
            _sync(self.layer_hook.loader.device)
            t0 = time.perf_counter()
        for attr, k in self.slots:
            weight = packed.get(k)
            if weight is not None:  # (else the layer is not loaded: the module keeps its placeholder)
                value = weight.dequantize()
                wants = not torch.is_grad_enabled() and _wants_grad(
                    self.layer_hook.placeholders[k].requires_grad, value
                )
                # (noted first: a slot holding it is ours, for `_swap_out`, also if a Ctrl-C lands between the two)
                self.layer_hook.dequantized_values[k] = param = nn.Parameter(value, requires_grad=wants)
                module._parameters[attr] = param
        if profile is not None:
            _sync(self.layer_hook.loader.device)
            self.layer_hook.dequantized += time.perf_counter() - t0

    def post(self, module: nn.Module, args, output):
        packed, dequantized = self.layer_hook.packed, self.layer_hook.dequantized_values
        for attr, k in self.slots:
            # (another value the caller put there meanwhile stays, and is refused at the next pass: see `_swap_out`;
            # the note goes last: a Ctrl-C before it leaves the slot one `_swap_out` takes for ours)
            if k in packed and module._parameters.get(attr) is dequantized.get(k):
                module._parameters[attr] = self.layer_hook.packed_placeholders[k]
                dequantized.pop(k, None)
        return None


class HostResidentHook(ModelHook):
    """A resident module (the input embeddings, or the output head) whose weights live in host RAM because the GPU's
    budget could not hold them.

    `on_host=True` (the input embeddings): the forward pass runs on the host, with the host tensors swapped in and the
    inputs moved there; its output goes to the device (a lookup reads only the rows it needs). `on_host=False` (the
    head): the host tensors (pinned) are copied to the device for the pass, and the copies dropped after it.
    """

    def __init__(
        self,
        slots: list[tuple[nn.Module, str, bool, torch.Tensor]],
        device: torch.device,
        *,
        on_host: bool,
        copy_stream=None,
        profile=None,
        before_copy: Callable[[], None] | None = None,
    ):
        # (module, attribute, is_parameter, host tensor)
        self.slots = slots
        self.device = device
        self.on_host = on_host
        self.part = "input_embeddings" if on_host else "output_embeddings"
        self.profile = profile
        self._t0 = 0.0
        # CUDA: the loader's copy stream. The copies are allocated there, from the memory pool the streamed layers'
        # copies take theirs from, so the head's memory is reused by the next layers' and not cached beside them
        self.copy_stream = copy_stream
        self.before_copy = before_copy
        self.placeholders = [(m._parameters if p else m._buffers)[a] for m, a, p, _ in slots]
        self._cache_off = False  # (autocast's cache off for the pass running: the head's copy is new at every pass)

    def init_hook(self, module):
        return module

    def _copies(self) -> list[torch.Tensor]:
        if self.copy_stream is None:
            return [host.to(self.device, non_blocking=True) for _, _, _, host in self.slots]
        compute = torch.cuda.current_stream(self.device)
        if self.before_copy is not None:  # (the last layer's memory free again first: see `wait_released_passed`)
            self.before_copy()
        # under the model's device first: leaving a stream's block alone makes the device current at its start the
        # current one again, and in a thread that set none (the model on cuda:1) that would create a context on cuda:0
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_stream):
            values = [host.to(self.device, non_blocking=True) for _, _, _, host in self.slots]
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        compute.wait_event(done)
        for value in values:  # (used on the compute stream: its memory is reused once the compute has passed here)
            value.record_stream(compute)
        return values

    def pre_forward(self, module, *args, **kwargs):
        if self.profile is not None:
            _sync(self.device)
            t0 = time.perf_counter()
        values = [host for _, _, _, host in self.slots] if self.on_host else self._copies()
        if self.profile is not None:
            _sync(self.device)
            self._t0 = time.perf_counter()
            if not self.on_host:
                self.profile.add_host_resident(self.part, copy=self._t0 - t0)
        no_grad = not torch.is_grad_enabled()
        for (module_, attr, is_param, _), value, placeholder in zip(self.slots, values, self.placeholders):
            if is_param:
                # (as a layer's: the head's placeholder requires grad as the loaded head does, see `stream._HeadGrad`)
                wants = no_grad and _wants_grad(placeholder.requires_grad, value)
                module_._parameters[attr] = nn.Parameter(value, requires_grad=wants)
            else:
                module_._buffers[attr] = value
        self._cache_off = autocast_cache_off(self.device)
        if self.on_host:
            args, kwargs = send_to_device(args, "cpu"), send_to_device(kwargs, "cpu")
        return args, kwargs

    def post_forward(self, module, output):
        self._unload()
        if self.on_host:
            output = send_to_device(output, self.device)
        if self.profile is not None:
            _sync(self.device)
            self.profile.add_host_resident(self.part, compute=time.perf_counter() - self._t0, calls=1)
        return output

    def _unload(self):
        for (module_, attr, is_param, _), placeholder in zip(self.slots, self.placeholders):
            (module_._parameters if is_param else module_._buffers)[attr] = placeholder
        autocast_cache_back(self)

    def detach_hook(self, module):
        self._unload()
        return module

    def __repr__(self) -> str:
        where = "runs on the host" if self.on_host else f"copied to {self.device} for each pass"
        return f"HostResidentHook({len(self.slots)} tensors in host RAM, {where})"


def host_state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """`state_dict` post-hook of a module holding `HostResident` placeholders: the host tensors instead (what
    `save_pretrained` writes)."""
    hook = getattr(module, "_hf_hook", None)
    if not isinstance(hook, HostResidentHook):
        return
    for module_, attr, _, host in hook.slots:
        if module_ is module and isinstance(state_dict.get(prefix + attr), HostResident):
            state_dict[prefix + attr] = host


def streamed_state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """`state_dict` post-hook of a decoder layer the plan does not keep on the device: plain meta tensors for its
    `Streamed` placeholders, as accelerate gives for offloaded weights (`torch.load(weights_only=True)` takes no other
    class; `keep_vars=True` gives the module's own, left as they are)."""
    hook = getattr(module, "_hf_hook", None)
    if not isinstance(hook, LayerStreamingHook):
        return
    for rel, placeholder in zip(hook.names, hook.placeholders):
        value = state_dict.get(prefix + rel)
        if isinstance(value, Streamed) and value is not placeholder:
            state_dict[prefix + rel] = _plain_meta(value)


def kept_state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """`state_dict` post-hook of a decoder layer the plan keeps on the device: its kept tensors instead of the meta
    placeholders it holds between passes (no copy; a weight held packed is dequantized into host memory).
    `save_pretrained` of a model whose every layer is kept on a GPU needs it: with no "cpu" or "disk" in
    `hf_device_map`, transformers reads no `weights_map` and would meet meta tensors."""
    hook = getattr(module, "_hf_hook", None)
    if not isinstance(hook, LayerStreamingHook) or hook.loader.plan.tier(hook.index) != "device":
        return
    tensors = None
    for _, _, rel, _ in hook.slots:
        value = state_dict.get(prefix + rel)
        if value is None or not value.is_meta:
            continue
        if tensors is None:
            tensors = hook.loader.kept(hook.index)
        kept = tensors[rel]
        state_dict[prefix + rel] = kept if isinstance(kept, torch.Tensor) else hook.loader.host_tensor(hook.index, rel)
