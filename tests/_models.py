"""Tiny, offline Hugging Face checkpoints for the ``hf_layerstream`` test-suite.

This module builds *real* transformers architectures at toy size, gives them
random (but deterministic) weights, and saves them as sharded safetensors
checkpoints together with a small offline tokenizer, so tests can compare a
layer-streamed model against the fully loaded reference without any network
access.

Public helpers
--------------
``ARCHITECTURES``
    Maps a short name (``"llama"``, ``"mixtral"``, ...) to a zero-argument
    callable returning a tiny config of that architecture (3 decoder layers,
    hidden size 64, vocabulary 128, 256 positions).
``make_config(name, num_hidden_layers=3, **overrides)``
    Same as ``ARCHITECTURES[name]()`` but with a different depth and/or
    arbitrary config overrides (``layer_types`` is recomputed for the new depth).
``make_tokenizer()``
    A small BPE tokenizer (vocabulary <= 120, ids 0..3 are
    ``<pad> <s> </s> <unk>``) with a chat template.
``save_tiny_checkpoint(name_or_config, path, ...)``
    Random-initialises the model, saves it in several shards plus
    ``model.safetensors.index.json`` and saves the tokenizer next to it.
``build_tiny_model(name_or_config, ...)``
    The in-memory random model that ``save_tiny_checkpoint`` saves.
``load_reference(path, dtype)``
    ``AutoModelForCausalLM.from_pretrained`` in eval mode.
``disk_keys(path)``
    Tensor name -> shard file of a saved checkpoint.

Notes on transformers 5 behaviour that matter for callers
---------------------------------------------------------
* ``save_pretrained`` reverts load-time weight conversions, so the keys on disk
  are not always the keys of ``model.state_dict()`` (use :func:`disk_keys`):

  - Mixtral: in memory ``model.layers.{l}.mlp.experts.gate_up_proj`` ``[E, 2*I, H]``
    (= ``cat(w1, w3)`` per expert), ``mlp.experts.down_proj`` ``[E, H, I]`` (= ``w2``) and
    ``mlp.gate.weight``; on disk ``block_sparse_moe.experts.{e}.w1/w2/w3.weight`` and
    ``block_sparse_moe.gate.weight``.
  - Qwen3-MoE: same fused in-memory layout; on disk
    ``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`` (router ``mlp.gate.weight`` unchanged).
  - GPT-NeoX: ``lm_head.weight`` in memory, ``embed_out.weight`` on disk.
  - Tied output embeddings (gemma, gemma2, starcoder2, gpt2, opt, falcon):
    ``lm_head.weight`` is not written at all.
* All configs use ``attn_implementation="eager"`` (the only implementation with
  Gemma-2's attention-logit softcapping) so ``from_config`` and ``from_pretrained``
  run the same attention code. ``config.json`` does not persist it: a plain
  ``from_pretrained`` picks ``"sdpa"`` (Gemma-2: eager), ~1e-7 away from eager, so
  :func:`load_reference` passes it explicitly. MoE experts use the transformers
  default (``"grouped_mm"``) in both paths.
* Build models in the target dtype (``from_config(config, dtype=...)``, as
  ``from_pretrained(dtype=...)`` does): ``model.to(torch.bfloat16)`` also casts the
  rotary ``inv_freq`` buffers, which changes the logits.
"""

from __future__ import annotations

import copy
import json
import pathlib
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from hf_layerstream.testing import (  # noqa: F401 - re-exported for tests
    BOS_TOKEN_ID,
    CHAT_TEMPLATE,
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    SAMPLE_PROMPTS,
    TOKENIZER_VOCAB_SIZE,
    UNK_TOKEN_ID,
    init_random_weights,
    make_tokenizer,
)

__all__ = [
    "ARCHITECTURES",
    "ATTN_IMPLEMENTATION",
    "BOS_TOKEN_ID",
    "CHAT_TEMPLATE",
    "DEFAULT_MAX_SHARD_SIZE",
    "EOS_TOKEN_ID",
    "HIDDEN_SIZE",
    "MAX_POSITIONS",
    "NUM_HIDDEN_LAYERS",
    "PAD_TOKEN_ID",
    "SAMPLE_PROMPTS",
    "TOKENIZER_VOCAB_SIZE",
    "UNK_TOKEN_ID",
    "VOCAB_SIZE",
    "build_tiny_model",
    "disk_keys",
    "init_random_weights",
    "load_reference",
    "make_config",
    "make_tokenizer",
    "save_tiny_checkpoint",
]

# --------------------------------------------------------------------------- #
# Sizes and special tokens                                                     #
# --------------------------------------------------------------------------- #

HIDDEN_SIZE = 64
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS
INTERMEDIATE_SIZE = 128
NUM_HIDDEN_LAYERS = 3
VOCAB_SIZE = 128
MAX_POSITIONS = 256
NUM_EXPERTS = 4
NUM_EXPERTS_PER_TOK = 2
MOE_INTERMEDIATE_SIZE = 32
GEMMA2_SLIDING_WINDOW = 16


ATTN_IMPLEMENTATION = "eager"
#: Several shards for every architecture; a decoder layer usually spans shards.
DEFAULT_MAX_SHARD_SIZE = "100KB"

# --------------------------------------------------------------------------- #
# Configs                                                                      #
# --------------------------------------------------------------------------- #

_TOKEN_IDS: dict[str, int] = {
    "pad_token_id": PAD_TOKEN_ID,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
}

_LLAMA_LIKE: dict[str, Any] = {
    "hidden_size": HIDDEN_SIZE,
    "intermediate_size": INTERMEDIATE_SIZE,
    "num_attention_heads": NUM_HEADS,
    "num_key_value_heads": NUM_KV_HEADS,
    "max_position_embeddings": MAX_POSITIONS,
}

#: Per-architecture overrides on top of the library defaults (besides depth, vocab and token ids).
_ARCH_KWARGS: dict[str, dict[str, Any]] = {
    "llama": {**_LLAMA_LIKE},
    "mistral": {**_LLAMA_LIKE, "head_dim": HEAD_DIM, "sliding_window": None},
    "qwen2": {**_LLAMA_LIKE, "use_sliding_window": False},
    "qwen3": {**_LLAMA_LIKE, "head_dim": HEAD_DIM, "use_sliding_window": False},
    "gemma": {**_LLAMA_LIKE, "head_dim": HEAD_DIM},
    "gemma2": {
        **_LLAMA_LIKE,
        "head_dim": HEAD_DIM,
        "query_pre_attn_scalar": HEAD_DIM,
        "sliding_window": GEMMA2_SLIDING_WINDOW,
    },
    "phi3": {**_LLAMA_LIKE, "original_max_position_embeddings": MAX_POSITIONS},
    "granite": {
        **_LLAMA_LIKE,
        # Non-trivial multipliers so a re-implementation that forgets one is caught.
        "embedding_multiplier": 4.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 1.0 / HEAD_DIM,
        "logits_scaling": 2.0,
    },
    "olmo2": {**_LLAMA_LIKE},
    "starcoder2": {**_LLAMA_LIKE},
    "gpt2": {
        "n_embd": HIDDEN_SIZE,
        "n_head": NUM_HEADS,
        "n_inner": INTERMEDIATE_SIZE,
        "n_positions": MAX_POSITIONS,
        "tie_word_embeddings": True,
    },
    "gpt_neox": {
        "hidden_size": HIDDEN_SIZE,
        "num_attention_heads": NUM_HEADS,
        "intermediate_size": INTERMEDIATE_SIZE,
        "max_position_embeddings": MAX_POSITIONS,
    },
    "opt": {
        "hidden_size": HIDDEN_SIZE,
        "word_embed_proj_dim": HIDDEN_SIZE,
        "num_attention_heads": NUM_HEADS,
        "ffn_dim": INTERMEDIATE_SIZE,
        "max_position_embeddings": MAX_POSITIONS,
        "dropout": 0.0,
    },
    "falcon": {
        # Falcon-40B/180B style ("new decoder architecture"): grouped KV heads, two parallel layernorms.
        "hidden_size": HIDDEN_SIZE,
        "num_attention_heads": NUM_HEADS,
        "num_kv_heads": NUM_KV_HEADS,
        "new_decoder_architecture": True,
        "multi_query": False,
        "parallel_attn": True,
        "ffn_hidden_size": INTERMEDIATE_SIZE,
        "max_position_embeddings": MAX_POSITIONS,
    },
    "mixtral": {
        **_LLAMA_LIKE,
        "num_local_experts": NUM_EXPERTS,
        "num_experts_per_tok": NUM_EXPERTS_PER_TOK,
    },
    "qwen3_moe": {
        **_LLAMA_LIKE,
        "head_dim": HEAD_DIM,
        "num_experts": NUM_EXPERTS,
        "num_experts_per_tok": NUM_EXPERTS_PER_TOK,
        "moe_intermediate_size": MOE_INTERMEDIATE_SIZE,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "use_sliding_window": False,
    },
}

#: Config attribute holding the depth (``n_layer`` is an alias for GPT-2, but be explicit).
_DEPTH_KEY: dict[str, str] = {"gpt2": "n_layer"}


def make_config(name: str, num_hidden_layers: int = NUM_HIDDEN_LAYERS, **overrides: Any) -> PretrainedConfig:
    """Return a tiny config for architecture ``name`` with ``num_hidden_layers`` decoder layers.

    ``overrides`` are passed to the config constructor last. ``layer_types`` is left
    to the config class so it always matches ``num_hidden_layers`` (pass it explicitly
    to override).
    """
    if name not in _ARCH_KWARGS:
        raise KeyError(f"unknown architecture {name!r}; choose from {sorted(_ARCH_KWARGS)}")
    kwargs: dict[str, Any] = {
        **_ARCH_KWARGS[name],
        _DEPTH_KEY.get(name, "num_hidden_layers"): num_hidden_layers,
        "vocab_size": VOCAB_SIZE,
        **_TOKEN_IDS,
        **overrides,
    }
    config = CONFIG_MAPPING[name](**kwargs)
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config


def _factory(name: str) -> Callable[[], PretrainedConfig]:
    def factory() -> PretrainedConfig:
        return make_config(name)

    factory.__name__ = f"tiny_{name}_config"
    factory.__doc__ = f"Tiny {name} config ({NUM_HIDDEN_LAYERS} layers, hidden {HIDDEN_SIZE}, vocab {VOCAB_SIZE})."
    return factory


ARCHITECTURES: dict[str, Callable[[], PretrainedConfig]] = {name: _factory(name) for name in _ARCH_KWARGS}


def _with_depth(config: PretrainedConfig, num_hidden_layers: int) -> PretrainedConfig:
    """Copy ``config`` with a new depth, recomputing ``layer_types`` if the class has it."""
    data = config.to_dict()
    data["num_hidden_layers"] = num_hidden_layers
    if "n_layer" in data:
        data["n_layer"] = num_hidden_layers
    if data.get("layer_types") is not None:
        data["layer_types"] = None
    for key in ("model_type", "transformers_version"):
        data.pop(key, None)
    new = type(config)(**data)
    new._attn_implementation = config._attn_implementation
    return new


# --------------------------------------------------------------------------- #
# Weights and checkpoints                                                      #
# --------------------------------------------------------------------------- #


def _resolve_config(name_or_config: str | PretrainedConfig, num_hidden_layers: int | None) -> PretrainedConfig:
    if isinstance(name_or_config, str):
        return make_config(name_or_config, num_hidden_layers or NUM_HIDDEN_LAYERS)
    config = copy.deepcopy(name_or_config)
    if num_hidden_layers is not None and num_hidden_layers != config.num_hidden_layers:
        config = _with_depth(config, num_hidden_layers)
    return config


def build_tiny_model(
    name_or_config: str | PretrainedConfig,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_hidden_layers: int | None = None,
) -> PreTrainedModel:
    """Return the in-memory random model that :func:`save_tiny_checkpoint` would save (eval mode).

    Built with ``AutoModelForCausalLM.from_config(config, dtype=dtype)`` under
    ``torch.manual_seed(seed)``. The model is created directly in ``dtype`` (rather than
    cast with ``.to(dtype)``) so non-persistent buffers such as rotary ``inv_freq`` stay
    float32, exactly as ``from_pretrained(..., dtype=dtype)`` builds them.
    """
    config = _resolve_config(name_or_config, num_hidden_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    init_random_weights(model)
    return model.eval()


def save_tiny_checkpoint(
    name_or_config: str | PretrainedConfig,
    path: str | pathlib.Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    num_hidden_layers: int | None = None,
) -> pathlib.Path:
    """Save a random tiny model sharded (safetensors + index) together with the tokenizer.

    The model comes from :func:`build_tiny_model` and is written with
    ``save_pretrained(path, max_shard_size=max_shard_size)`` (always safetensors in
    transformers 5); the default shard size gives several shards with decoder layers
    spanning shard boundaries. ``num_hidden_layers`` overrides the depth (of the named
    architecture or of the given config). Returns ``path`` as a :class:`pathlib.Path`.
    """
    path = pathlib.Path(path)
    model = build_tiny_model(name_or_config, seed=seed, dtype=dtype, num_hidden_layers=num_hidden_layers)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    make_tokenizer().save_pretrained(path)
    return path


def load_reference(
    path: str | pathlib.Path,
    dtype: torch.dtype = torch.float32,
    *,
    attn_implementation: str | None = ATTN_IMPLEMENTATION,
    auto_class: type = AutoModelForCausalLM,
) -> PreTrainedModel:
    """Fully load the checkpoint at ``path`` with ``auto_class.from_pretrained`` (eval mode, CPU), every weight in
    memory of its own. (``auto_class``: e.g. ``AutoModelForImageTextToText`` for a vision-language model.)

    ``config.json`` does not record the attention implementation, so it is passed
    explicitly (eager by default, like :func:`make_config`); ``None`` means the
    transformers default (``"sdpa"`` for most architectures, eager for Gemma-2).

    On CPU ``from_pretrained`` leaves weights of the checkpoint's dtype as views of the
    safetensors file map, wherever the file's header puts them: most of the tiny
    checkpoints' weights are not 16-byte aligned. A matrix-vector product (a decode
    step's ``F.linear`` on one token) gives results an ulp apart for such a weight, so
    such a model's own decode logits depend on how its checkpoint was written. Each
    weight is copied into memory torch allocates (64-byte aligned), as a model moved to
    a device or cast has it, and as streamed weights are (shard files put every tensor
    on a 64-byte line): the reference the streamed model must equal bit for bit.
    """
    # use_kernels=False: transformers' own modules, as the streamed model computes with (from 5.25, `from_pretrained`
    # swaps in hub kernels by default)
    kwargs: dict[str, Any] = {"dtype": dtype, "use_kernels": False}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = auto_class.from_pretrained(path, **kwargs)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    return model.eval()


def disk_keys(path: str | pathlib.Path) -> dict[str, str]:
    """Map every tensor name stored in the checkpoint at ``path`` to its shard file name."""
    path = pathlib.Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        return dict.fromkeys(handle.keys(), "model.safetensors")


def hub_cache(cache, repo: str, files: dict[str, bytes], ref: str = "main", commit: str = "a" * 40) -> None:
    """A hub cache (the layout huggingface_hub writes: `models--org--name/{refs/<ref>, snapshots/<commit>/...}`)
    holding `files` (name -> bytes) of the hub repo `repo` at `commit`, which `ref` (a branch or tag) names."""
    root = pathlib.Path(cache) / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    (root / "snapshots" / commit).mkdir(parents=True)
    for name, data in files.items():
        (root / "snapshots" / commit / name).write_bytes(data)


def hub_snapshot(folder, cache, repo="org--shards", commit="a" * 40, ref="main") -> pathlib.Path:
    """The folder `folder` laid out as huggingface_hub lays out a repo it downloaded into its cache `cache`
    (`snapshot_download`): each file a blob named by its hash in `models--REPO/blobs` (`repo` as `org--name`), and the
    snapshot `models--REPO/snapshots/COMMIT` of relative symlinks to them (its folders real ones), which `refs/REF`
    names (another commit of a repo already there: another snapshot beside the first). Returns the snapshot."""
    import hashlib
    import os
    import shutil

    folder = pathlib.Path(folder)
    root = pathlib.Path(cache) / f"models--{repo}"
    snapshot, blobs = root / "snapshots" / commit, root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            blob = blobs / hashlib.sha256(path.read_bytes()).hexdigest()
            shutil.copy(path, blob)
            link = snapshot / path.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snapshot


def save_metaspace_tokenizer(path):
    """A Llama-2-style tokenizer (SentencePiece pieces, `▁` for a space; decoding strips the text's first space) of
    the tiny models' 128 ids."""
    import string

    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3} | {c: 4 + i for i, c in enumerate(string.ascii_lowercase)}
    merges = [("▁", c) for c in string.ascii_lowercase]
    vocab |= {"▁" + c: len(vocab) + i for i, c in enumerate(string.ascii_lowercase)}
    for a in string.ascii_lowercase:
        for b in string.ascii_lowercase[: max(0, min(26, VOCAB_SIZE - len(vocab)))]:
            vocab["▁" + a + b] = len(vocab)
            merges.append(("▁" + a, b))
    LlamaTokenizer(vocab=vocab, merges=merges).save_pretrained(path)
    return path


def matmul_folds(x: torch.Tensor) -> bool:
    """Whether this torch's `matmul` folds `x` (3-D or more) into one matrix (`mm`) for a weight that does not require
    grad, rather than `bmm` a batch-sized copy of the weight. Up to torch 2.13 only inputs whose strides chain fold
    (`hf_layerstream.stream._foldable`); from 2.14 size-1 dimensions are skipped too (`hidden[:, -1:, :]` folds)."""
    from torch.profiler import profile

    w = torch.zeros(1, x.shape[-1], dtype=x.dtype)
    with profile() as prof:
        torch.nn.functional.linear(x.detach(), w)
    return "aten::bmm" not in {e.name for e in prof.events()}
