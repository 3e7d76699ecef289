"""Block-wise weight quantization codec built on `bitsandbytes.functional`.

Shards written with `compression="4bit"` / `"8bit"` store each large weight as a few plain tensors ("parts") plus a
small JSON-able metadata dict kept in the shard manifest:

* `"{name}::qdata"`: `uint8`, flat. 4-bit: two codes per byte (`ceil(numel / 2)` bytes, high nibble first);
  8-bit: one code per byte (`numel` bytes).
* `"{name}::absmax"`: `float32`, one scale per block of `blocksize` consecutive elements of the flattened tensor
  (`ceil(numel / blocksize)` values).

With `double_quant` (4-bit), the scales are stored as bitsandbytes' nested state: `absmax` is then `uint8`, the
scales less their mean (`offset` in the metadata) coded with the 8-bit dynamic map in blocks of `nested_blocksize`
(256), and `"{name}::absmax2"` is `float32`, one scale per such block.

The code tables (NF4 / FP4 / the 8-bit dynamic map) are constants of bitsandbytes and are rebuilt at load time
rather than stored with every tensor; the 8-bit map's fingerprint is recorded in the metadata so that a future
bitsandbytes with a different default map is detected instead of silently decoding garbage.

Tensors are always flattened before quantization and the logical shape is kept in the metadata: blocks therefore
run over the flat tensor, so any shape (rows not a multiple of the block size, odd element counts, 3-D fused expert
tensors) round-trips the same way on every device.

`bitsandbytes` is imported lazily inside the functions, so `import hf_layerstream` works without it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import math
import numbers
import re
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

QUANT_SUFFIX_SEP = "::"
"""Separator between a parameter name and a part name in stored tensor names (`"x.weight::qdata"`)."""

CODEC_NAME = "bnb-blockwise"
CODEC_VERSION = 1

SUPPORTED_BITS = (4, 8)
QUANT_TYPES: dict[int, tuple[str, ...]] = {4: ("nf4", "fp4"), 8: ("blockwise",)}
# What bitsandbytes accepts for each mode on both CPU and CUDA. `quantize_4bit` / `dequantize_4bit` accept 32..4096;
# the CUDA `quantize_blockwise` kernel rejects 32 (the CPU one accepts anything), so 8-bit starts at 64.
BLOCKSIZES: dict[int, tuple[int, ...]] = {
    4: (32, 64, 128, 256, 512, 1024, 2048, 4096),
    8: (64, 128, 256, 512, 1024, 2048, 4096),
}
# Defaults chosen by measurement on synthetic gaussian, Student-t and outlier-column weights: nf4/64 is the QLoRA
# setting (0.281x of bf16, cos ~0.9958 on gaussian weights); 8-bit at 256 costs 0.508x of bf16 with cos >= 0.9999 and a
# relative L2 error of 1.1-1.3% on all three, while 64 would cost 0.531x (4.6% more bytes to read per token) to bring
# that error down to 0.9-1.0%.
DEFAULT_QUANT_TYPE: dict[int, str] = {4: "nf4", 8: "blockwise"}
DEFAULT_BLOCKSIZE: dict[int, int] = {4: 64, 8: 256}

# A tensor must span at least this many blocks to be worth quantizing (smaller ones save little and cost a kernel
# launch per token).
MIN_BLOCKS_TO_QUANTIZE = 16

_FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# dtypes bitsandbytes can quantize from / dequantize to directly
_BNB_DTYPES = frozenset(_FLOAT_DTYPES.values())

_COMPRESSION_ALIASES: dict[str, tuple[int, str | None]] = {
    "4bit": (4, None),
    "nf4": (4, "nf4"),
    "fp4": (4, "fp4"),
    "8bit": (8, None),
    "int8": (8, None),
}

# name components that mark input embeddings / output heads (kept full precision unless asked otherwise)
_EMBEDDING_COMPONENTS = frozenset(
    {"lm_head", "wte", "wpe", "embed_out", "shared", "word_embeddings", "position_embeddings", "token_type_embeddings"}
)
# MoE routers: small, and rounding them can flip expert choices. "gate" alone (Mixtral/Qwen/DeepSeek routers) is not
# "gate_proj" / "gate_up_proj" (the expert MLPs, which are quantized).
_ROUTER_RE = re.compile(r"^(gate|router|shared_expert_gate|.*_router)$")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # (NumPy's integers too)


@dataclass(frozen=True)
class QuantScheme:
    """How weights are quantized in a shard directory.

    Args:
        bits (`int`):
            4 or 8.
        quant_type (`str`, *optional*):
            4-bit: `"nf4"` (default) or `"fp4"`. 8-bit: `"blockwise"` (bitsandbytes' dynamic 8-bit map, as used by
            `quantize_blockwise`). `None` (the default) picks the default for `bits`, so `QuantScheme(4)` is
            nf4 / 64 and `QuantScheme(8)` is blockwise / 256.
        blocksize (`int`, *optional*):
            Elements per scale. 4-bit: 32, 64 (default), 128, ..., 4096. 8-bit: 64, 128, 256 (default), ..., 4096.
            `None` picks the default for `bits`.
        quantize_embeddings (`bool`, *optional*, defaults to `False`):
            Also quantize input embeddings and the output head (kept in full precision by default).
        double_quant (`bool`, *optional*, defaults to `False`):
            4-bit only: quantize the block scales too (QLoRA's double quantization, transformers'
            `bnb_4bit_use_double_quant`): each block's float32 scale becomes one byte, plus a float32 per 256 blocks.
            At nf4 / 64 a weight takes 0.258x of its bf16 bytes instead of 0.281x (8% less to read per token), with
            the same error to a few parts in 10,000.

    Raises:
        `TypeError`: A field has the wrong type (`bits` or `blocksize` not an int, a bool being none here;
            `quant_type` not a str; `quantize_embeddings` or `double_quant` not a bool).
        `ValueError`: A field has a bad value; the message names the field, the value and what is accepted.
    """

    bits: int
    quant_type: str | None = None
    blocksize: int | None = None
    quantize_embeddings: bool = False
    double_quant: bool = False

    def __post_init__(self) -> None:
        # (a wrong type is a TypeError, as for every argument of the public API: "4", True and blocksize="64" were a
        # ValueError; a bool is no int here. `from_dict` reads a stored dict, where it is a bad value: a ValueError)
        if not _is_int(self.bits):
            raise TypeError(
                f"`bits` must be an int, one of {list(SUPPORTED_BITS)}, got {type(self.bits).__name__} {self.bits!r}."
            )
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"`bits` must be one of {list(SUPPORTED_BITS)}, got {self.bits!r}.")
        # (NumPy's integers are taken, as `prefetch` is, and made Python's: the manifest stores `to_dict()` as JSON)
        object.__setattr__(self, "bits", int(self.bits))
        accepted_types = QUANT_TYPES[self.bits]
        if self.quant_type is not None and not isinstance(self.quant_type, str):
            raise TypeError(
                f"`quant_type` must be a str, one of {list(accepted_types)} for bits={self.bits} (or None for "
                f"{DEFAULT_QUANT_TYPE[self.bits]!r}), got {type(self.quant_type).__name__} {self.quant_type!r}."
            )
        quant_type = DEFAULT_QUANT_TYPE[self.bits] if self.quant_type is None else self.quant_type
        if quant_type not in accepted_types:
            raise ValueError(
                f"`quant_type` must be one of {list(accepted_types)} for bits={self.bits}, got {self.quant_type!r}."
            )
        accepted_sizes = BLOCKSIZES[self.bits]
        if self.blocksize is not None and not _is_int(self.blocksize):
            raise TypeError(
                f"`blocksize` must be an int, one of {list(accepted_sizes)} for bits={self.bits} (or None for "
                f"{DEFAULT_BLOCKSIZE[self.bits]}), got {type(self.blocksize).__name__} {self.blocksize!r}."
            )
        blocksize = DEFAULT_BLOCKSIZE[self.bits] if self.blocksize is None else self.blocksize
        if blocksize not in accepted_sizes:
            raise ValueError(
                f"`blocksize` must be one of {list(accepted_sizes)} for bits={self.bits}, got {self.blocksize!r}."
            )
        for field in ("quantize_embeddings", "double_quant"):
            value = getattr(self, field)
            if not isinstance(value, bool):
                raise TypeError(f"`{field}` must be True or False, got {value!r}.")
        if self.double_quant and self.bits != 4:
            # (bitsandbytes' 8-bit scales are one float32 per 256 values at the default block: little to save)
            raise ValueError(
                f"`double_quant` applies to 4-bit quantization only, got bits={self.bits}: pass bits=4 with it, or "
                "double_quant=False."
            )
        # frozen dataclass: fill the resolved defaults in place (equality and hashing see concrete values)
        object.__setattr__(self, "quant_type", quant_type)
        object.__setattr__(self, "blocksize", int(blocksize))

    def to_dict(self) -> dict[str, Any]:
        """The scheme as a JSON-able dict (stored in the shard manifest).

        Returns:
            `dict`: `{"bits", "quant_type", "blocksize", "quantize_embeddings"}`, and `"double_quant": True` where
            it is (not written otherwise: the shard directories of a scheme without it read as before, by earlier
            versions too).
        """
        out = {
            "bits": self.bits,
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "quantize_embeddings": self.quantize_embeddings,
        }
        if self.double_quant:
            out["double_quant"] = True
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantScheme:
        """Rebuild a scheme written by [`QuantScheme.to_dict`].

        Args:
            d (`Mapping[str, Any]`): The stored dict.

        Returns:
            [`QuantScheme`]: The validated scheme.

        Raises:
            `ValueError`: `d` is not a mapping, lacks `bits`, has unknown keys or a bad value, one of the wrong type
                too (the message names the field): `d` is stored data, such as a shard manifest's.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"QuantScheme.from_dict expects a dict, got {type(d).__name__}: {d!r}.")
        known = ("bits", "quant_type", "blocksize", "quantize_embeddings", "double_quant")
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(
                f"QuantScheme.from_dict got unknown field(s) {unknown}; accepted fields are {list(known)}. "
                "The shard directory may have been written by a newer hf_layerstream."
            )
        if "bits" not in d:
            raise ValueError(f"QuantScheme.from_dict: field 'bits' is missing from {dict(d)!r}.")
        try:
            return cls(
                bits=d["bits"],
                quant_type=d.get("quant_type"),
                blocksize=d.get("blocksize"),
                quantize_embeddings=d.get("quantize_embeddings", False),
                double_quant=d.get("double_quant", False),
            )
        except TypeError as e:  # (a field of the wrong type in stored data: a bad value of the dict, as JSON's are)
            raise ValueError(*e.args) from None


def resolve_compression(
    compression: str | QuantScheme | None,
    *,
    quant_type: str | None = None,
    blocksize: int | None = None,
    double_quant: bool = False,
) -> QuantScheme | None:
    """Turn the user-facing `compression=` option into a [`QuantScheme`].

    Args:
        compression (`str` or [`QuantScheme`], *optional*):
            `None` (no quantization), `"4bit"` (nf4 unless `quant_type` says otherwise), `"nf4"`, `"fp4"`, `"8bit"` or
            `"int8"` (case-insensitive). A [`QuantScheme`] is returned as is.
        quant_type (`str`, *optional*):
            Overrides the 4-bit type (`"nf4"` or `"fp4"`, case-insensitive); for 8-bit only `"blockwise"` is
            accepted.
        blocksize (`int`, *optional*):
            Overrides the block size (default 64 for 4-bit, 256 for 8-bit).
        double_quant (`bool`, *optional*, defaults to `False`):
            4-bit: quantize the block scales too (see [`QuantScheme`]).

    Returns:
        [`QuantScheme`] or `None`.

    Raises:
        `TypeError`: `compression` neither a str nor a [`QuantScheme`], `quant_type` not a str, `blocksize` not an
            int, `double_quant` not a bool.
        `ValueError`: Unknown `compression`, or `quant_type` / `blocksize` / `double_quant` that do not fit it.
    """
    # (a wrong type is a TypeError, as for every argument of the public API: 4 and '64' were a ValueError)
    if compression is not None and not isinstance(compression, (str, QuantScheme)):
        raise TypeError(
            f"compression must be None or one of {sorted(_COMPRESSION_ALIASES)} (a str), got "
            f"{type(compression).__name__} {compression!r}."
        )
    if quant_type is not None and not isinstance(quant_type, str):
        raise TypeError(f"`quant_type` must be a str ('nf4', 'fp4' or 'blockwise') or None, got {quant_type!r}.")
    if blocksize is not None and not _is_int(blocksize):
        raise TypeError(f"`blocksize` must be an int (e.g. 64) or None, got {type(blocksize).__name__} {blocksize!r}.")
    if not isinstance(double_quant, bool):
        raise TypeError(f"`double_quant` must be True or False, got {double_quant!r}.")
    options = (("quant_type", quant_type), ("blocksize", blocksize), ("double_quant", double_quant))
    given = [f"{k}={v!r}" for k, v in options if v is not None and v is not False]  # (False: double_quant's default)
    if compression is None:
        if given:
            # (only the compressions that take them: a 4-bit code takes 4 bits, 'blockwise' 8, a block of 32 4 bits;
            # the other was refused next. Where none takes them, both: the next message names the value refused)
            code = quant_type.strip().lower() if isinstance(quant_type, str) else quant_type
            fits = [
                f"'{bits}bit'"
                for bits in SUPPORTED_BITS
                if (code is None or code in QUANT_TYPES[bits])
                and (blocksize is None or blocksize in BLOCKSIZES[bits])
                and (double_quant is False or bits == 4)
            ] or [f"'{bits}bit'" for bits in SUPPORTED_BITS]
            which = "compression=" + " or ".join(fits)
            raise ValueError(
                f"{' and '.join(given)} only {'apply' if len(given) > 1 else 'applies'} to quantized shards; pass "
                f"{which} as well (or drop {'them' if len(given) > 1 else 'it'} to store weights in full precision)."
            )
        return None
    if isinstance(compression, QuantScheme):
        if given:
            raise ValueError(
                f"{', '.join(given)} cannot be combined with a QuantScheme; set quant_type / blocksize / double_quant "
                "on the scheme."
            )
        return compression
    accepted = sorted(_COMPRESSION_ALIASES)
    if compression.strip().lower() not in _COMPRESSION_ALIASES:
        raise ValueError(f"compression must be None or one of {accepted}, got {compression!r}.")
    bits, implied_type = _COMPRESSION_ALIASES[compression.strip().lower()]
    if isinstance(quant_type, str):  # case-insensitive, as `compression` is ("NF4" is nf4)
        quant_type = quant_type.strip().lower()
    # (the compression a known code takes: 'blockwise' was sent to '4bit', and 'nf4' / 'fp4' with '8bit' were refused
    # naming no way out)
    code_bits = next((b for b in SUPPORTED_BITS if quant_type in QUANT_TYPES[b]), None)
    if implied_type is not None and quant_type is not None and quant_type != implied_type:
        raise ValueError(
            f"compression={compression!r} implies quant_type={implied_type!r}, but quant_type={quant_type!r} was "
            f"given; use compression='{code_bits or 4}bit' with quant_type={quant_type!r} instead."
        )
    if code_bits is not None and code_bits != bits:
        raise ValueError(
            f"`quant_type` must be one of {list(QUANT_TYPES[bits])} for bits={bits}, got {quant_type!r}, "
            f"{'an' if code_bits == 8 else 'a'} {code_bits}-bit code: pass compression='{code_bits}bit' with it (or "
            f"no `quant_type`, for {bits}-bit's own)."
        )
    if double_quant and bits != 4:
        # (the scheme's own message named `bits=8`, an argument the caller never passed, and no way out)
        raise ValueError(
            f"`double_quant` applies to 4-bit quantization only, got compression={compression!r} ({bits}-bit): pass "
            "compression='4bit' with it, or drop it to quantize to 8 bits."
        )
    return QuantScheme(
        bits,
        quant_type if quant_type is not None else (implied_type or DEFAULT_QUANT_TYPE[bits]),
        blocksize if blocksize is not None else DEFAULT_BLOCKSIZE[bits],
        double_quant=double_quant,
    )


def _components(name: str) -> list[str]:
    parts = name.split(".")
    if parts and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return parts


def is_embedding_name(name: str) -> bool:
    """Whether a parameter name looks like an input embedding or output head (`embed_tokens`, `lm_head`, `wte`, ...)."""
    for comp in _components(name):
        if comp in _EMBEDDING_COMPONENTS or comp.startswith("embed") or comp.endswith("embeddings"):
            return True
    return False


def is_router_name(name: str) -> bool:
    """Whether a parameter name looks like a MoE router (`mlp.gate.weight`, `mlp.router.weight`, and the linear
    inside a router module: DBRX's `ffn.router.layer.weight`, Hunyuan's `mlp.gate.wg.weight`)."""
    return any(_ROUTER_RE.match(comp) for comp in _components(name)[-2:])


def parameter_owners(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every parameter name of `model` (tied names included) -> the module that holds it, for `should_quantize`."""
    owners: dict[str, torch.nn.Module] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, _ in module.named_parameters(recurse=False):
            owners[f"{prefix}.{attr}" if prefix else attr] = module
    return owners


def modules_to_not_convert(model: torch.nn.Module) -> list[str]:
    """The module-name patterns whose weights transformers' bitsandbytes path leaves in full precision, for
    `should_quantize`: the model's `_keep_in_fp32_modules` (GLM-MoE-DSA's `indexer.weights_proj`, a linear layer),
    which its 4- and 8-bit quantizers add to `get_modules_to_not_convert` whatever the dtype. (Not
    `_keep_in_fp32_modules_strict`, which they do not read; the embeddings and head are `should_quantize`'s own rule.)"""
    return sorted(getattr(model, "_keep_in_fp32_modules", None) or ())


def _not_converted(module_name: str, patterns: list[str]) -> bool:
    """Whether transformers' bitsandbytes path skips the module `module_name` for `patterns`, by its own matching rule
    (`should_convert_module`; in 5.24 a pattern from the start up to a module boundary, as a regex, or a suffix).
    Where a later transformers moved or renamed it, that 5.24 rule."""
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:
        return any(re.match(rf"(?:{key}){_BOUNDARY}", module_name) or module_name.endswith(key) for key in patterns)
    return not should_convert_module(module_name, patterns)


_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"  # (after a dot, or before one or the end: a module boundary)


def _is_matrix_weight(name: str, tensor: torch.Tensor, owner: torch.nn.Module) -> bool:
    """Linear layers' weights: `nn.Linear` (and its subclasses, such as Falcon's `FalconLinear`) or GPT-2's `Conv1D`
    weights, and the fused expert weights of an experts module (3-D, or DBRX's 2-D). (transformers' own bitsandbytes
    path, 5.25, quantizes exactly `nn.Linear` and `Conv1D`: neither the subclasses nor the fused experts, which hold
    most of a MoE model's bytes.) Not: routers' or SSM parameters held as bare tensors (Mamba's 2-D `A_log`,
    Zamba's 3-D one), convolution kernels (Mamba's depthwise `conv1d`). (Biases, 2-D ones such as gpt-oss's
    `gate_up_proj_bias` too, `should_quantize` keeps before asking.)"""
    attr = name.rpartition(".")[2]
    if _experts(owner):  # (3-D, or DBRX's 2-D `w1`/`v1`/`w2` of [experts x ffn, d_model])
        return min(tensor.shape[1:]) > 1
    if tensor.dim() == 2:
        from transformers.pytorch_utils import Conv1D

        return attr == "weight" and isinstance(owner, (torch.nn.Linear, Conv1D))
    return False  # (3-D, not an expert module's: Zamba's `A_log`, RecurrentGemma's block-diagonal gates)


def _experts(owner: torch.nn.Module) -> bool:
    """Whether `owner` holds fused expert weights: transformers names every such module so (`MixtralExperts`,
    `JetMoeParallelExperts`, `DbrxExpertGLU`, ...; 100 kinds of 3-D weights in 5.25's causal LMs, all theirs)."""
    name = type(owner).__name__.lower()
    # (not a norm of each expert's: Ergo's `ErgoExpertNorm`, a weight per expert)
    return "expert" in name and "norm" not in name and not isinstance(owner, torch.nn.modules.conv._ConvNd)


def should_quantize(
    name: str,
    tensor: torch.Tensor,
    scheme: QuantScheme,
    *,
    is_embedding: bool = False,
    owner: torch.nn.Module | None = None,
    not_converted: list[str] | None = None,
) -> bool:
    """Whether a weight is stored quantized under `scheme`.

    Quantized: floating (`float32`/`float16`/`bfloat16`) 2-D weight matrices and 3-D fused expert tensors (e.g.
    `mlp.experts.gate_up_proj`) spanning at least `MIN_BLOCKS_TO_QUANTIZE` blocks. Kept as is: 1-D tensors (norms,
    biases), non-float or other float dtypes (e.g. fp8), small tensors, MoE routers, and embeddings / the output head
    unless `scheme.quantize_embeddings`. Only the tensor's shape and dtype are read, so meta tensors work. Given the
    module that holds the weight (`owner`, see `parameter_owners`), 2-D weights are quantized only when it is a linear
    layer or an experts module, and 3-D ones only when it is an experts module (see `_is_matrix_weight`), and given
    the model's
    `modules_to_not_convert`, none of a module they name, as transformers' bitsandbytes path quantizes;
    `split_checkpoint` passes both.

    Args:
        name (`str`): Full parameter name.
        tensor (`torch.Tensor`): The tensor (any device, including `meta`).
        scheme ([`QuantScheme`]): The scheme in use.
        is_embedding (`bool`, *optional*, defaults to `False`):
            The caller knows this is an embedding / head (names are also checked heuristically).
        owner (`torch.nn.Module`, *optional*):
            The module holding the weight; without it, the decision is made from the name and shape alone.
        not_converted (`list[str]`, *optional*):
            Module-name patterns the model keeps in full precision (`modules_to_not_convert(model)`), matched against
            the name of the module holding the weight (`name` less its last part) as transformers matches them.

    Returns:
        `bool`
    """
    if tensor.dtype not in _BNB_DTYPES or tensor.dim() not in (2, 3):
        return False
    if tensor.numel() < MIN_BLOCKS_TO_QUANTIZE * scheme.blocksize:
        return False
    if not_converted and _not_converted(name.rpartition(".")[0], not_converted):
        return False
    if is_embedding or is_embedding_name(name):
        return scheme.quantize_embeddings
    if is_router_name(name) or name.rpartition(".")[2].endswith("bias"):
        return False
    return owner is None or _is_matrix_weight(name, tensor, owner)


# --- code tables -------------------------------------------------------------------------------------------------

_DYNAMIC_CODE: dict[torch.device, torch.Tensor] = {}
_DYNAMIC_CODE_ID: list[str] = []


def _dynamic_code(device: torch.device) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map on `device` (cached)."""
    code = _DYNAMIC_CODE.get(device)
    if code is None:
        cpu = _DYNAMIC_CODE.get(torch.device("cpu"))
        if cpu is None:
            cpu = _functional().create_dynamic_map().to(torch.float32).contiguous()
            _DYNAMIC_CODE[torch.device("cpu")] = cpu
        code = cpu if device.type == "cpu" else cpu.to(device)
        _DYNAMIC_CODE[device] = code
    return code


def _dynamic_code_id() -> str:
    """Short fingerprint of the 8-bit dynamic map, stored in the metadata and checked when decoding."""
    if not _DYNAMIC_CODE_ID:
        code = _dynamic_code(torch.device("cpu"))
        _DYNAMIC_CODE_ID.append("dynamic-" + hashlib.sha256(code.numpy().tobytes()).hexdigest()[:16])
    return _DYNAMIC_CODE_ID[0]


# --- codec --------------------------------------------------------------------------------------------------------


def _owned_cpu(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that owns exactly its storage (safe to hand to safetensors)."""
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset() != 0:
        t = t.clone()
    return t


_MIN_MAX_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of a floating-point `tensor` is finite (no NaN, no inf): its least and greatest values are
    (`torch.aminmax` propagates NaN). One reduction, no boolean tensor of its size: 0.03 s for a 28672 x 8192
    bfloat16 weight here, where `torch.isfinite(t).all()` took 1.3 s; `quantize_tensor` of that weight went from 5.4-5.5
    s to 4.7-4.8 s, and merging a rank-16 LoRA into a 70B-shaped layer from 6.8-8.7 s to 5.1-6.0 s."""
    if tensor.numel() == 0:
        return True
    if tensor.dtype not in _MIN_MAX_DTYPES:  # (no `aminmax` of float8 on the CPU; `isfinite` of some of them)
        return bool(torch.isfinite(tensor).all())
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _base_meta(shape: Iterable[int], dtype: torch.dtype, scheme: QuantScheme) -> dict[str, Any]:
    """The metadata `quantize_tensor` records of every tensor, whatever its values."""
    return {
        "codec": CODEC_NAME,
        "version": CODEC_VERSION,
        "shape": [int(s) for s in shape],
        "dtype": _dtype_name(dtype),
        "bits": scheme.bits,
        "quant_type": scheme.quant_type,
        "blocksize": scheme.blocksize,
    }


# the longest JSON text of a float32 value (23 characters): a double-quantized tensor's `offset` at its longest
_LONGEST_FLOAT32_TEXT = -1.1754943508222875e-38


def _stored_layout(
    shape: Iterable[int], dtype: torch.dtype, scheme: QuantScheme
) -> tuple[dict[str, tuple[list[int], torch.dtype]], dict[str, Any]]:
    """What [`quantize_tensor`] stores for a tensor of `shape` and `dtype`, without quantizing anything: for the
    split's disk-space estimate, which counts each part's bytes and header entry, and the metadata's record.

    Args:
        shape (`Iterable[int]`): The tensor's shape.
        dtype (`torch.dtype`): Its dtype.
        scheme ([`QuantScheme`]): Bits, type, block size and double quantization.

    Returns:
        `tuple[dict, dict]`: `{part: (shape, dtype)}` (`qdata`, `absmax`, and `absmax2` double-quantized), and the
        metadata, `parts` included, with its value-dependent fields at their longest (double quantization's `offset`)
        or their length (`code`), so that its JSON is at least as long as that of any tensor so quantized.
    """
    meta = _base_meta(shape, dtype, scheme)
    numel = math.prod(meta["shape"])
    qbytes, blocks = _expected_sizes(numel, scheme.bits, scheme.blocksize)
    parts: dict[str, tuple[list[int], torch.dtype]] = {"qdata": ([qbytes], torch.uint8)}
    code = "dynamic-" + "0" * 16  # (`_dynamic_code_id`'s length, without importing bitsandbytes)
    if scheme.bits == 8:
        meta["code"] = code
    if scheme.double_quant:
        nested_blocksize = 256  # (bitsandbytes' nested state: `quantize_4bit` with `compress_statistics`)
        meta.update(double_quant=True, offset=_LONGEST_FLOAT32_TEXT, nested_blocksize=nested_blocksize, code=code)
        parts["absmax"] = ([blocks], torch.uint8)
        parts["absmax2"] = ([-(-blocks // nested_blocksize)], torch.float32)
    else:
        parts["absmax"] = ([blocks], torch.float32)
    meta["parts"] = {p: {"shape": list(s), "dtype": _dtype_name(d)} for p, (s, d) in parts.items()}
    return parts, meta


class NonFiniteError(ValueError):
    """`quantize_tensor` was given a tensor holding NaN or Inf, which block-wise scales cannot hold."""


def quantize_tensor(tensor: torch.Tensor, scheme: QuantScheme) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Quantize one weight block-wise (offline; runs on the tensor's device).

    Args:
        tensor (`torch.Tensor`): A `float32`, `float16` or `bfloat16` tensor of any shape, all values finite.
        scheme ([`QuantScheme`]): Bits, type and block size.

    Returns:
        `tuple[dict[str, torch.Tensor], dict]`: The parts (`{"qdata": uint8, "absmax": float32}`, contiguous CPU
        tensors that own their memory; with `double_quant`, `absmax` is `uint8` and `absmax2` is added) and JSON-able
        metadata: `codec`, `version`, `shape`, `dtype` (the input's), `bits`, `quant_type`, `blocksize`, `code` (8-bit
        map fingerprint), with `double_quant` also `double_quant`, `offset` and `nested_blocksize`, and `parts`
        (`{part: {"shape", "dtype"}}`).

    Raises:
        `TypeError`: `tensor` is not a `torch.Tensor` or `scheme` is not a [`QuantScheme`].
        `ValueError`: Unsupported dtype, empty tensor, meta tensor or non-finite values.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"quantize_tensor expects a torch.Tensor, got {type(tensor).__name__}; convert it first "
            "(torch.as_tensor(...))."
        )
    if not isinstance(scheme, QuantScheme):
        raise TypeError(
            f"quantize_tensor expects a QuantScheme, got {type(scheme).__name__}; build one "
            "(QuantScheme(4), QuantScheme.from_dict(...) or resolve_compression('4bit'))."
        )
    if tensor.dtype not in _BNB_DTYPES:
        raise ValueError(
            f"quantize_tensor supports {sorted(_FLOAT_DTYPES)} tensors, got {_dtype_name(tensor.dtype)}; "
            "keep such tensors unquantized (should_quantize() returns False for them)."
        )
    if tensor.numel() == 0:
        raise ValueError(f"quantize_tensor cannot quantize an empty tensor (shape {list(tensor.shape)}).")
    if tensor.device.type == "meta":
        raise ValueError("quantize_tensor needs real data, got a tensor on the meta device.")
    flat = tensor.detach().contiguous().reshape(-1)
    if not all_finite(flat):
        raise NonFiniteError(
            f"quantize_tensor: tensor of shape {list(tensor.shape)} contains NaN or Inf; block-wise quantization "
            "would corrupt its whole block. Keep it unquantized or fix the checkpoint."
        )

    bnbf = _functional()
    meta = _base_meta(tensor.shape, tensor.dtype, scheme)
    if scheme.bits == 4:
        packed, state = bnbf.quantize_4bit(
            flat,
            blocksize=scheme.blocksize,
            quant_type=scheme.quant_type,
            quant_storage=torch.uint8,
            compress_statistics=scheme.double_quant,
        )
        qdata = packed.reshape(-1)
    else:
        code = _dynamic_code(flat.device)
        qdata, state = bnbf.quantize_blockwise(flat, code=code, blocksize=scheme.blocksize)
        qdata = qdata.reshape(-1)
        meta["code"] = _dynamic_code_id()
    if scheme.double_quant:
        if not math.isfinite(float(state.offset)):
            # (bitsandbytes takes the scales' mean in float32: finite scales summing past its range give inf, and
            # parts that no decoding takes; the split stores such a weight unquantized)
            raise NonFiniteError(
                f"quantize_tensor: the block scales of tensor of shape {list(tensor.shape)} (values up to "
                f"{float(flat.abs().max()):.3g}) average past float32's range (bitsandbytes' offset, their mean, "
                "is inf); quantize it without double_quant or keep it unquantized."
            )
        nested = state.state2
        if not torch.equal(nested.code.to("cpu", torch.float32), _dynamic_code(torch.device("cpu"))):
            raise ValueError(  # (decoding rebuilds the map the fingerprint names, as for 8-bit)
                "bitsandbytes coded the 4-bit scales with another map than its 8-bit dynamic one; this version of "
                "bitsandbytes cannot be used with double_quant=True: quantize without it."
            )
        meta.update(
            double_quant=True,
            offset=float(state.offset),  # (a float32's value: JSON keeps it exactly)
            nested_blocksize=int(nested.blocksize),
            code=_dynamic_code_id(),
        )
        parts = {"qdata": _owned_cpu(qdata), "absmax": _owned_cpu(state.absmax), "absmax2": _owned_cpu(nested.absmax)}
    else:
        parts = {"qdata": _owned_cpu(qdata), "absmax": _owned_cpu(state.absmax.to(torch.float32))}
    _check_parts(parts, meta)  # guards against a bitsandbytes layout change
    meta["parts"] = {p: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for p, v in parts.items()}
    return parts, meta


def _expected_sizes(numel: int, bits: int, blocksize: int) -> tuple[int, int]:
    qbytes = (numel + 1) // 2 if bits == 4 else numel
    return qbytes, -(-numel // blocksize)


def _check_parts(
    parts: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`qdata`, `absmax` and, double-quantized, `absmax2` of `parts`, checked against `meta`."""
    nested = meta.get("double_quant") is True
    try:
        qdata = parts["qdata"]
        absmax = parts["absmax"]
        absmax2 = parts["absmax2"] if nested else None
    except KeyError as e:
        raise ValueError(f"Quantized tensor is missing part {e.args[0]!r}; got parts {sorted(parts)}.") from None
    numel = math.prod(meta["shape"])
    want_q, want_a = _expected_sizes(numel, meta["bits"], meta["blocksize"])
    if qdata.dtype != torch.uint8 or qdata.numel() != want_q:
        raise ValueError(
            f"Quantized part 'qdata' should be uint8 with {want_q} elements for shape {list(meta['shape'])} at "
            f"{meta['bits']} bits, got {_dtype_name(qdata.dtype)} with {qdata.numel()}."
        )
    scale_dtype = torch.uint8 if nested else torch.float32
    if absmax.dtype != scale_dtype or absmax.numel() != want_a:
        raise ValueError(
            f"Quantized part 'absmax' should be {_dtype_name(scale_dtype)} with {want_a} elements for shape "
            f"{list(meta['shape'])} and blocksize {meta['blocksize']}, got {_dtype_name(absmax.dtype)} with "
            f"{absmax.numel()}."
        )
    if nested:
        want_a2 = -(-want_a // meta["nested_blocksize"])
        if absmax2.dtype != torch.float32 or absmax2.numel() != want_a2:
            raise ValueError(
                f"Quantized part 'absmax2' should be float32 with {want_a2} elements for {want_a} block scales in "
                f"blocks of {meta['nested_blocksize']}, got {_dtype_name(absmax2.dtype)} with {absmax2.numel()}."
            )
    return qdata, absmax, absmax2


def _parse_meta(meta: Mapping[str, Any]) -> tuple[int, str, int, list[int], torch.dtype]:
    try:
        bits = meta["bits"]
        quant_type = meta["quant_type"]
        blocksize = meta["blocksize"]
        shape = meta["shape"]
        dtype_name = meta["dtype"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"Quantization metadata is missing field {e.args[0]!r}: {meta!r}.") from None
    if (
        not _is_int(bits)  # (first: a list's `in` raised a bare TypeError, "unhashable type")
        or bits not in QUANT_TYPES
        or quant_type not in QUANT_TYPES[bits]
        or not _is_int(blocksize)
        or blocksize not in BLOCKSIZES[bits]
    ):
        # re-validate through the scheme for a precise message (a field of the wrong type: malformed metadata too)
        try:
            QuantScheme(bits, quant_type, blocksize)
        except TypeError as e:
            raise ValueError(*e.args) from None
    orig = _FLOAT_DTYPES.get(dtype_name)
    if orig is None:
        raise ValueError(
            f"Quantization metadata field 'dtype' must be one of {sorted(_FLOAT_DTYPES)}, got {dtype_name!r}."
        )
    nested = meta.get("double_quant", False)
    if nested is not False:
        offset, nested_blocksize = meta.get("offset"), meta.get("nested_blocksize")
        if nested is not True or bits != 4:
            raise ValueError(f"Quantization metadata field 'double_quant' must be true at 4 bits or absent: {meta!r}.")
        if not isinstance(offset, float) or not math.isfinite(offset) or nested_blocksize not in BLOCKSIZES[8]:
            raise ValueError(
                "Quantization metadata of a double-quantized tensor needs a finite float 'offset' and a "
                f"'nested_blocksize' in {list(BLOCKSIZES[8])}, got {offset!r} and {nested_blocksize!r}."
            )
    if bits == 8 or nested:
        code_id = meta.get("code")
        if code_id is not None and code_id != _dynamic_code_id():
            what = "This 8-bit tensor was" if bits == 8 else "This 4-bit tensor's block scales were"
            raise ValueError(
                f"{what} quantized with code table {code_id!r}, but the installed bitsandbytes "
                f"provides {_dynamic_code_id()!r}; re-create the shard directory with this bitsandbytes version."
            )
    return bits, quant_type, blocksize, shape, orig


def dequantize_tensor(
    parts: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    buffers: DecodeBuffers | None = None,
) -> torch.Tensor:
    """Decode one weight on `device` (hot path: called once per weight per forward step).

    The (small) parts are moved to `device` first (`non_blocking` when they are in pinned memory; on CUDA the copy
    and the kernel are queued on the current stream, so keep the pinned source unmodified until that stream has
    reached them) and decoded there with bitsandbytes' native kernel.

    On CPU the native kernel releases the GIL (the Python around it needs it a few times per call) and is
    memory-bound: a 2048x5632 matrix decodes in ~11 ms (nf4 or 8-bit -> bf16, 2 cores; ~21 ms on one), about 7x a
    plain bf16 copy of the same matrix, and ~27 ms to float32. Fixed cost is ~60-80 us per call. Double-quantized
    scales are decoded on CPU into buffers the calling thread keeps and reuses (4 + 4 bytes per block of the largest
    weight it has decoded), not allocated for every weight. With `buffers` (the streaming loader passes its own), a
    4-bit or 8-bit weight itself is decoded into one of them by the same native function bitsandbytes'
    `dequantize_4bit` or `dequantize_blockwise` calls, with our output pointer: the same bits, without a tensor
    allocated per weight (nor, for one past glibc's mmap threshold, 32 MiB at most, such as 2048x5632 in float32, the
    page faults of new memory at every decode: about half the decode's time here, and 8-bit 2048x5632 to float32 took
    31 ms rather than 9).

    Args:
        parts (`Mapping[str, torch.Tensor]`): `{"qdata": ..., "absmax": ...}` (and `"absmax2"`, double-quantized) as
            written by [`quantize_tensor`].
        meta (`Mapping[str, Any]`): Its metadata (extra keys such as `"parts"` are ignored).
        device (`torch.device` or `str`, *optional*, defaults to `"cpu"`): Where to decode.
        dtype (`torch.dtype`, *optional*): Output dtype; defaults to the original dtype (`meta["dtype"]`).
        buffers ([`DecodeBuffers`], *optional*): On CPU, where a 4-bit or 8-bit weight is decoded (by the same
            native kernel, into a buffer taken from them instead of a tensor allocated for it): the result views that
            buffer until it is given back.

    Returns:
        `torch.Tensor`: Contiguous, of shape `meta["shape"]` and dtype `dtype`, on `device`.

    Raises:
        `ValueError`: Malformed metadata, or parts whose dtype/size do not match it.
    """
    bits, quant_type, blocksize, shape, orig = _parse_meta(meta)
    qdata, absmax, absmax2 = _check_parts(parts, meta)
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if qdata.device != device:
        qdata = qdata.to(device, non_blocking=qdata.is_pinned())
    if absmax.device != device:
        absmax = absmax.to(device, non_blocking=absmax.is_pinned())
    if absmax2 is not None and absmax2.device != device:
        absmax2 = absmax2.to(device, non_blocking=absmax2.is_pinned())
    want = orig if dtype is None else dtype
    out_dtype = want if want in _BNB_DTYPES else torch.float32
    numel = math.prod(shape)
    bnbf = _functional()
    if bits == 4:
        # Decode an even number of elements: the CPU kernel only handles an even last dimension and otherwise falls
        # back to a torch.compile'd path that compiles for seconds per new shape. The padding nibble is in qdata.
        n_even = numel + (numel & 1)
        nested = offset = None
        if absmax2 is not None and device.type == "cpu":
            absmax = _nested_scales_cpu(absmax, absmax2, meta["nested_blocksize"], meta["offset"])
        elif absmax2 is not None:  # (bitsandbytes adds the offset, a Python float here, to the decoded float32 scales)
            nested = bnbf.QuantState(
                absmax=absmax2, code=_dynamic_code(device), blocksize=meta["nested_blocksize"], dtype=torch.float32
            )
            offset = meta["offset"]
        state = bnbf.QuantState(
            absmax=absmax,
            shape=torch.Size([n_even]),
            dtype=out_dtype,
            blocksize=blocksize,
            quant_type=quant_type,
            offset=offset,
            state2=nested,
        )
        kernel = None
        # (not for a weight cast after: the cast is a new tensor, and the buffer would never be given back)
        if buffers is not None and device.type == "cpu" and nested is None and out_dtype == want:
            kernel = _native_4bit(quant_type, out_dtype, blocksize)
        if kernel is not None:
            out = buffers.take(n_even, out_dtype)
            _call_4bit(kernel, qdata, state.absmax, out, blocksize)
        else:
            out = bnbf.dequantize_4bit(qdata.reshape(-1), state)  # CPU returns (1, n_even), CUDA (n_even,)
        out = out.reshape(-1)
        if n_even != numel:
            out = out[:numel]
    else:
        state = bnbf.QuantState(absmax=absmax, code=_dynamic_code(device), blocksize=blocksize, dtype=out_dtype)
        kernel = None
        if buffers is not None and device.type == "cpu" and out_dtype == want:  # (as at 4 bits: no buffer for a cast)
            kernel = _native_8bit(out_dtype)
        if kernel is not None:
            out = buffers.take(numel, out_dtype)
            _call_8bit(kernel, qdata, absmax, state.code, out, blocksize)
        else:
            out = bnbf.dequantize_blockwise(qdata.reshape(-1), state)
    out = out.view(shape)
    if out.dtype != want:
        out = out.to(want)
    return out


_scratch = threading.local()


def _nested_scales_cpu(codes: torch.Tensor, absmax2: torch.Tensor, nested_blocksize: int, offset: float):
    """The float32 block scales of a double-quantized weight, decoded on CPU as bitsandbytes decodes its nested state
    (`code[codes] * absmax2[block] + offset`, in float32), into this thread's scratch buffers, which grow to the
    largest weight's and are reused: no allocation per weight."""
    n = codes.numel()
    idx = getattr(_scratch, "idx", None)
    if idx is None or idx.numel() < n:
        _scratch.idx = idx = torch.empty(n, dtype=torch.int32)
        _scratch.scales = torch.empty(n, dtype=torch.float32)
    scales = _scratch.scales[:n]
    idx = idx[:n]
    idx.copy_(codes.reshape(-1))
    torch.index_select(_dynamic_code(torch.device("cpu")), 0, idx, out=scales)
    full = n // nested_blocksize
    if full:
        scales[: full * nested_blocksize].view(full, nested_blocksize).mul_(absmax2[:full, None])
    if full * nested_blocksize < n:
        scales[full * nested_blocksize :].mul_(absmax2[full])
    scales.add_(offset)
    return scales


# bitsandbytes' CPU kernels by output dtype (`cdequantize_blockwise_cpu_{nf4,fp4}_{fp32,bf16,fp16}`)
_KERNEL_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _bnb_cpu_ops():
    """bitsandbytes' CPU backend module, whose ops call its native library's kernels (`ops.lib._lib`), or `None`
    where there is none to call: the backend not importable, or no native library (its mock stands in)."""
    try:
        from bitsandbytes.backends.cpu import ops
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary
    except ImportError:
        return None
    lib = getattr(ops, "lib", None)
    if lib is None or isinstance(lib, ErrorHandlerMockBNBNativeLibrary) or getattr(lib, "_lib", None) is None:
        return None
    return ops


@functools.cache
def _native_4bit(quant_type: str, dtype: torch.dtype, blocksize: int):
    """The native function bitsandbytes' CPU `dequantize_4bit` calls for these settings (it writes into an output
    pointer it is given), or `None` where that op computes otherwise, and is called instead: no native library, or
    its torch fallback (on an AVX-512 CPU at blocks of 2048 or more, where bitsandbytes does not trust its kernel's
    accuracy)."""
    ops = _bnb_cpu_ops()
    if ops is None or getattr(ops, "_has_avx512", True) and blocksize >= 2048:
        return None
    name = f"cdequantize_blockwise_cpu_{quant_type}_{_KERNEL_DTYPES[dtype]}"
    kernel = getattr(ops.lib._lib, name, None)

    def decode(bnbf, x):  # (ours, and bitsandbytes' op, of `x` quantized as its op quantizes it)
        qdata, state = bnbf.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
        out = torch.empty(x.numel(), dtype=dtype)
        _call_4bit(kernel, qdata, state.absmax, out, blocksize)
        return out, bnbf.dequantize_4bit(qdata, state).reshape(-1)

    return _agreeing(kernel, name, dtype, 2 * blocksize, decode)


def _agreeing(kernel, name: str, dtype: torch.dtype, numel: int, decode):
    """`kernel` where it decodes a small random weight (`numel` elements of `dtype`) bit for bit as bitsandbytes' own
    op does (`decode(bnbf, x)`: ours, then its op's), else `None`, with a warning: we call it with its op's arguments,
    in their order, and a release of bitsandbytes calling it otherwise would decode other values without a word (its
    op is then used, allocating every weight, as before the buffers)."""
    if kernel is None:
        return None
    try:
        ours, its = decode(_functional(), torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(dtype))
        agrees = torch.equal(ours, its)
    except Exception:  # noqa: BLE001 - any failure: its op, which says what is wrong where it fails too
        agrees = False
    if not agrees:
        logger.warning("bitsandbytes' native %s does not decode as bitsandbytes' own op does: the op is used", name)
        return None
    return kernel


def _call_4bit(kernel, qdata: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor, blocksize: int) -> None:
    """`kernel` (see `_native_4bit`) decoding `qdata` into `out` (flat, an even count), called as bitsandbytes' CPU
    `dequantize_4bit` calls it for a flat weight: one row of `out.numel()` elements."""
    qdata = qdata.reshape(-1).contiguous()
    absmax = absmax.reshape(-1).contiguous()
    if qdata.numel() * 2 != out.numel() or absmax.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("internal: 4-bit parts that do not fit the output buffer")
    kernel(
        ctypes.c_void_p(qdata.data_ptr()),
        ctypes.c_void_p(absmax.data_ptr()),
        ctypes.c_void_p(out.data_ptr()),
        ctypes.c_longlong(blocksize),
        ctypes.c_longlong(1),
        ctypes.c_longlong(out.numel()),
    )


@functools.cache
def _native_8bit(dtype: torch.dtype):
    """The native function bitsandbytes' CPU `dequantize_blockwise` calls for output `dtype`
    (`cdequantize_blockwise_cpu_{fp32,bf16,fp16}`, writing into an output pointer it is given), or `None` where that
    op computes otherwise, and is called instead: no native library (its op is then the default backend's, in torch)."""
    ops = _bnb_cpu_ops()
    if ops is None:
        return None
    name = f"cdequantize_blockwise_cpu_{_KERNEL_DTYPES[dtype]}"
    kernel = getattr(ops.lib._lib, name, None)

    def decode(bnbf, x):  # (ours, and bitsandbytes' op, of `x` quantized as its op quantizes it)
        qdata, state = bnbf.quantize_blockwise(x, blocksize=256)
        out = torch.empty(x.numel(), dtype=dtype)
        _call_8bit(kernel, qdata, state.absmax, state.code, out, 256)
        return out, bnbf.dequantize_blockwise(qdata, state).reshape(-1)

    return _agreeing(kernel, name, dtype, 512, decode)


def _call_8bit(
    kernel, qdata: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, out: torch.Tensor, blocksize: int
) -> None:
    """`kernel` (see `_native_8bit`) decoding `qdata` into `out` (flat, as many elements), with bitsandbytes' CPU
    `dequantize_blockwise`'s arguments: code table, codes, float32 block scales, output, block size, count."""
    qdata = qdata.reshape(-1).contiguous()
    absmax = absmax.reshape(-1).contiguous()
    code = code.contiguous()
    if (
        qdata.numel() != out.numel()
        or absmax.dtype != torch.float32
        or code.dtype != torch.float32
        or not out.is_contiguous()
    ):
        raise ValueError("internal: 8-bit parts that do not fit the output buffer")
    kernel(
        ctypes.c_void_p(code.data_ptr()),
        ctypes.c_void_p(qdata.data_ptr()),
        ctypes.c_void_p(absmax.data_ptr()),
        ctypes.c_void_p(out.data_ptr()),
        ctypes.c_longlong(blocksize),
        ctypes.c_longlong(out.numel()),
    )


def _storage_uses(t: torch.Tensor) -> int | None:
    """How many tensors (and other holders) reference `t`'s memory; `None` where this torch cannot tell."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else count(t.untyped_storage()._cdata)


class DecodeBuffers:
    """CPU memory that 4-bit and 8-bit weights are decoded into (`dequantize_tensor`'s `buffers`), allocated once and
    reused.

    bitsandbytes' CPU `dequantize_4bit` and `dequantize_blockwise` return a new tensor for every weight (they register
    no `out=` variant on CPU): a streaming run allocated and freed every layer's decoded weights at each sweep, from
    the loader thread, and glibc kept much of what was freed in that thread's heaps. Here the same native kernel writes into a buffer of
    ours (the same call, with our output pointer: the same bits). The loader takes buffers for a streamed layer's
    weights as it decodes them and gives them back as the layer is released; a buffer that something else still
    views then (a weight the caller kept, an autograd graph) is left to it, freed with it and never reused.
    Buffers are matched by their size in bytes: a model's layers repeat the same few weight sizes.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._free: dict[int, list[tuple[torch.Tensor, int]]] = {}  # bytes -> idle (buffer, its uses when idle)
        self._lent: dict[int, tuple[torch.Tensor, int]] = {}  # address -> the same, for a buffer taken
        self.made = 0  # buffers allocated in all

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat tensor of `numel` elements of `dtype` (its values undefined) in a buffer of this pool."""
        nbytes = max(numel * dtype.itemsize, 1)
        with self._lock:
            idle = self._free.get(nbytes)
            entry = idle.pop() if idle else None
        made = entry is None
        if made:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            entry = (buf, _storage_uses(buf))
        buf = entry[0]
        with self._lock:
            self._lent[buf.data_ptr()] = entry
            self.made += made
        return buf[: numel * dtype.itemsize].view(dtype)

    @staticmethod
    def addresses(tensors: Iterable) -> list[int]:
        """The addresses `give` takes: those of the memory `tensors` view (anything else among them is passed over),
        read while the caller still holds them."""
        return [t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)]

    def give(self, addresses: Iterable[int]) -> None:
        """Give back the buffers at `addresses` (those of tensors taken, or of views of them; others are ignored),
        once the caller holds no tensor viewing them: each one nothing else views either is reused."""
        with self._lock:
            for address in addresses:
                entry = self._lent.pop(address, None)
                if entry is None:
                    continue
                buf, idle_uses = entry
                uses = _storage_uses(buf)
                if uses is not None and uses == idle_uses:
                    self._free.setdefault(buf.numel(), []).append(entry)

    def clear(self) -> None:
        """Drop the idle buffers (those lent go with their tensors)."""
        with self._lock:
            self._free.clear()
            self._lent.clear()


class PackedWeight:
    """A quantized weight as stored (its parts, on the execution device), dequantized when its module runs.

    What the loader hands over, in place of the dequantized tensor, for the weights the hooks dequantize one module
    at a time (`enable_layer_streaming(dequantize="module")`): a layer in flight then takes its packed size in
    memory, plus one weight dequantized at a time, instead of its full size at the compute dtype.
    """

    __slots__ = ("parts", "meta", "dtype", "device")

    def __init__(self, parts: Mapping[str, torch.Tensor], meta: Mapping[str, Any], dtype: torch.dtype, device):
        self.parts = dict(parts)
        self.meta = meta
        self.dtype = dtype
        self.device = torch.device(device)

    def dequantize(self) -> torch.Tensor:
        """The weight at its compute dtype, on its device: what `dequantize_tensor` gives for the same parts."""
        return dequantize_tensor(self.parts, self.meta, device=self.device, dtype=self.dtype)

    def record_stream(self, stream) -> None:
        """CUDA: the parts, copied on the loader's stream, are used on `stream` (see `torch.Tensor.record_stream`)."""
        for part in self.parts.values():
            part.record_stream(stream)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.meta["shape"])

    def __repr__(self) -> str:
        return (
            f"PackedWeight(shape={list(self.meta['shape'])}, {self.meta['bits']}-bit, packed {packed_nbytes(self.parts)} "
            f"bytes, dtype={self.dtype}, device={self.device})"
        )


def load_backend(need: str = "This shard directory is quantized and decoding it") -> None:
    """Import bitsandbytes now (it takes seconds: it sets up torch.compile at import), not in the first decode.

    Args:
        need (`str`): What needs it, for the error (the sentence's subject).

    Raises:
        ImportError: bitsandbytes is missing, with the install command.
    """
    # bitsandbytes looks for a hub kernel for its CPU 4-bit matmul (`gemv_4bit`) as it is imported, on CPUs with
    # AVX512-BF16 and the `kernels` package (transformers 5.25 installs it), and warns where it cannot load one
    # (offline; a publisher `kernels` does not trust): "Failed to load CPU gemm_4bit_forward from kernels-community
    # ... Please make sure you already `pip install kernels`". Streaming never calls that op (it decodes the weights
    # whole, `dequantize_4bit` / `dequantize_blockwise`): the notice is left out.
    with quiet_hub_kernel_notice():
        try:
            import bitsandbytes.functional  # noqa: F401
        except ImportError as e:
            raise ImportError(f"{need} needs bitsandbytes: `pip install bitsandbytes`.") from e


def _functional():
    """`bitsandbytes.functional`, imported as `load_backend` imports it where it is not yet: the split and the loader
    import it so first, but `quantize_tensor` and `dequantize_tensor` called directly imported it themselves and
    printed bitsandbytes' hub-kernel notice, which those leave out (and, without bitsandbytes, failed with Python's
    bare ImportError instead of the install command)."""
    bnbf = sys.modules.get("bitsandbytes.functional")
    if bnbf is None:
        load_backend("Quantizing or dequantizing a weight")
        bnbf = sys.modules["bitsandbytes.functional"]
    return bnbf


@contextlib.contextmanager
def quiet_hub_kernel_notice():
    """Leave out bitsandbytes' notice that it could not load its hub kernel (see `load_backend`), and `kernels'`
    that it skipped checking that kernel's publisher offline, while importing it (directly, or through a package
    importing it: peft)."""
    loggers = [logging.getLogger(name) for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")]
    for notices in loggers:
        notices.addFilter(_no_hub_kernel_notice)
    try:
        yield
    finally:
        for notices in loggers:
            notices.removeFilter(_no_hub_kernel_notice)


def _no_hub_kernel_notice(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (
        message.startswith("Failed to load CPU gemm_4bit_forward")
        or (message.startswith("Skipping publisher trust check") and "quantization-bitsandbytes" in message)
    )


def packed_nbytes(parts: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> int:
    """Bytes taken by stored parts.

    Args:
        parts (`Mapping[str, torch.Tensor]` or iterable of tensors): The parts of one (or several) tensors.

    Returns:
        `int`
    """
    tensors = parts.values() if isinstance(parts, Mapping) else parts
    return sum(t.numel() * t.element_size() for t in tensors)


def join_parts(name: str, parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`{part: tensor}` of parameter `name` -> flat `{f"{name}::{part}": tensor}` for a safetensors file."""
    return {f"{name}{QUANT_SUFFIX_SEP}{part}": t for part, t in parts.items()}


def split_parts(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Split a loaded flat state dict into plain tensors and quantized parts.

    Args:
        state (`Mapping[str, torch.Tensor]`): Tensors as stored, quantized ones under `"{name}::{part}"` keys.

    Returns:
        `tuple[dict, dict]`: `({name: tensor}, {name: {part: tensor}})`.

    Raises:
        `ValueError`: A key has an empty name or part around the separator.
    """
    plain: dict[str, torch.Tensor] = {}
    quantized: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, sep, part = key.rpartition(QUANT_SUFFIX_SEP)
        if not sep:
            plain[key] = value
            continue
        if not name or not part:
            raise ValueError(f"Malformed quantized tensor name {key!r}; expected 'param.name{QUANT_SUFFIX_SEP}part'.")
        quantized.setdefault(name, {})[part] = value
    return plain, quantized


__all__ = [
    "QUANT_SUFFIX_SEP",
    "DecodeBuffers",
    "NonFiniteError",
    "PackedWeight",
    "QuantScheme",
    "dequantize_tensor",
    "is_embedding_name",
    "is_router_name",
    "parameter_owners",
    "join_parts",
    "modules_to_not_convert",
    "packed_nbytes",
    "quantize_tensor",
    "resolve_compression",
    "should_quantize",
    "split_parts",
]
