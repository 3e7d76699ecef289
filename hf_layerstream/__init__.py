"""hf_layerstream: run causal LMs larger than your GPU (or RAM) by streaming decoder layers from disk.

The user keeps the native transformers model: build it on the meta device, add one line.

```python
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM
from hf_layerstream import split_checkpoint, enable_layer_streaming

split_checkpoint("meta-llama/Meta-Llama-3-8B-Instruct", "llama3-8b.layers")   # once
with init_empty_weights():
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("llama3-8b.layers"))
enable_layer_streaming(model, "llama3-8b.layers")
```
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

# what each public name is imported from, when first used (PEP 562): `import hf_layerstream` and the CLI's parser
# (`hf-layerstream --help`) take no torch or transformers import, and Ctrl-C during those imports reaches the CLI's
# handler, not an import traceback
_SOURCES = {
    "generate_batch": "batch",
    "generate_jsonl": "batch",
    "LayerLoadError": "errors",
    "ShardDirError": "errors",
    "ShardDirOccupiedError": "errors",
    "ShardFileError": "errors",
    "ShardDirectory": "shard_dir",
    "SweepCounter": "speculative",
    "configure_draft": "speculative",
    "count_sweeps": "speculative",
    "measure_sweeps": "speculative",
    "split_checkpoint": "split",
    "StreamingState": "stream",
    "attaching_adapters": "stream",
    "disable_layer_streaming": "stream",
    "enable_layer_streaming": "stream",
    "get_streaming_state": "stream",
}

if TYPE_CHECKING:
    from .batch import generate_batch, generate_jsonl
    from .errors import LayerLoadError, ShardDirError, ShardDirOccupiedError, ShardFileError
    from .shard_dir import ShardDirectory
    from .speculative import SweepCounter, configure_draft, count_sweeps, measure_sweeps
    from .split import split_checkpoint
    from .stream import (
        StreamingState,
        attaching_adapters,
        disable_layer_streaming,
        enable_layer_streaming,
        get_streaming_state,
    )


def __getattr__(name: str):
    import importlib
    import importlib.util

    if name not in _SOURCES:
        # a submodule (`hf_layerstream.errors.ShardDirError`, as the eager imports made them attributes before)
        if not name.startswith("_") and importlib.util.find_spec(f".{name}", __name__) is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value  # (looked up directly from now on)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))


__all__ = [
    "__version__",
    "split_checkpoint",
    "enable_layer_streaming",
    "disable_layer_streaming",
    "attaching_adapters",
    "get_streaming_state",
    "generate_batch",
    "generate_jsonl",
    "count_sweeps",
    "SweepCounter",
    "measure_sweeps",
    "configure_draft",
    "StreamingState",
    "ShardDirectory",
    "ShardDirError",
    "ShardDirOccupiedError",
    "ShardFileError",
    "LayerLoadError",
]
