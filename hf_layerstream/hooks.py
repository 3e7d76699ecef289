"""The accelerate hook attached to each decoder layer."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Mapping

import torch
from accelerate.hooks import ModelHook
from torch import nn

from .engine import renew_after_fork


class LayerStreamingHook(ModelHook):
    """Makes one decoder layer's weights present for its forward pass, and releases them afterwards.

    One hook per decoder layer (not per leaf module): `pre_forward` asks the loader for the layer's tensors and
    swaps them into the layer's modules in place of the meta placeholders; `post_forward` puts the placeholders
    back and tells the loader the memory can go. Swapping `_parameters` entries is a pointer update: no copy.
    """

    def __init__(self, index: int, loader, slots: list[tuple[nn.Module, str, str, bool]], profile=None):
        self.index = index
        self.loader = loader
        # (module, attribute, name relative to the layer, is_parameter)
        self.slots = slots
        self.placeholders = [(m._parameters if p else m._buffers)[a] for m, a, _, p in slots]
        self.names = [rel for _, _, rel, _ in slots]
        self.profile = profile
        self._t0 = 0.0

    def init_hook(self, module):
        return module

    def pre_forward(self, module, *args, **kwargs):
        tensors = self.loader.acquire(self.index)
        for module_, attr, rel, is_param in self.slots:
            value = tensors[rel]
            if is_param:
                module_._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                module_._buffers[attr] = value
        if self.profile is not None:
            if self.index == 0:
                self.profile.forward_calls += 1
            self._t0 = time.perf_counter()
        return args, kwargs

    def post_forward(self, module, output):
        if self.profile is not None:
            if self.loader.is_cuda:
                torch.cuda.current_stream(self.loader.device).synchronize()
            self.profile.add(self.index, compute=time.perf_counter() - self._t0)
        self._unload()
        return output

    def _unload(self):
        for (module_, attr, _, is_param), placeholder in zip(self.slots, self.placeholders):
            (module_._parameters if is_param else module_._buffers)[attr] = placeholder
        self.loader.release(self.index)

    @property
    def weights_map(self) -> Mapping[str, torch.Tensor]:
        """Where transformers' `save_pretrained` reads an offloaded layer's weights from, as from accelerate's offload
        hooks: name relative to the layer -> the tensor in host memory, read from the shard file (dequantized from
        quantized shards: the weights the model computes with)."""
        return _LayerWeights(self)

    def detach_hook(self, module):
        self._unload()
        return module

    def __repr__(self) -> str:
        return (
            f"LayerStreamingHook(layer={self.index}, tier={self.loader.plan.tier(self.index)}, "
            f"device={self.loader.device}, tensors={len(self.slots)})"
        )


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


class PassGuard:
    """Wraps the forward of the module that runs the decoder layers (e.g. `LlamaModel`): one pass over the layers.

    * Passes run one at a time. The hooks swap each layer's weights into modules every pass shares, so two passes at
      once (`generate` called from two threads, as a server's worker threads do) would put a layer's placeholders
      back under the other's feet (errors, or a wrong output); a second caller waits for the pass running.
    * A pass that raised inside a decoder layer (Ctrl-C, out of memory, an error in code hooked on a layer) never
      reached that layer's `post_forward`: its weights are put back at once, and the layers read ahead for the rest
      of that pass are let go as the next pass begins (`LayerLoader.sweep_begins`).
    * After `disable_layer_streaming` (`close`) the wrapper, if still called (something wrapped the forward after it,
      or a call was waiting for the lock), calls straight through, holding nothing of the streaming state.
    """

    def __init__(self, hooks: list[LayerStreamingHook], loader):
        self.hooks = hooks
        self.loader = loader
        self.lock = threading.RLock()
        self.guarded = None  # the wrapper `wrap` made
        self._raised = False  # the last pass raised part way
        renew_after_fork(self)

    def _after_fork(self) -> None:
        self.lock = threading.RLock()  # (a child forked while another thread ran a pass: that thread is not there)

    def _put_back(self) -> None:
        for index in self.loader.in_use():
            self.hooks[index]._unload()

    def close(self) -> None:
        """Streaming is disabled (called with the lock held)."""
        self.hooks, self.loader = [], None

    def wrap(self, forward):
        @functools.wraps(forward)
        def guarded(*args, **kwargs):
            with self.lock:
                if self.loader is None:
                    return forward(*args, **kwargs)
                self._put_back()  # (a layer called on its own, outside a pass, that raised)
                if self._raised:
                    self.loader.sweep_begins()  # (interrupted there too: the next pass lets go of the rest)
                    self._raised = False
                try:
                    return forward(*args, **kwargs)
                except BaseException:
                    self._raised = True
                    self._put_back()
                    raise

        self.guarded = guarded
        return guarded
