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

from .batch import generate_batch, generate_jsonl  # noqa: E402
from .errors import LayerLoadError, ShardDirError, ShardDirOccupiedError, ShardFileError  # noqa: E402
from .shard_dir import ShardDirectory  # noqa: E402
from .speculative import SweepCounter, configure_draft, count_sweeps, measure_sweeps  # noqa: E402
from .split import split_checkpoint  # noqa: E402
from .stream import StreamingState, disable_layer_streaming, enable_layer_streaming, get_streaming_state  # noqa: E402

__all__ = [
    "__version__",
    "split_checkpoint",
    "enable_layer_streaming",
    "disable_layer_streaming",
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
