"""Tests for the block-wise quantization codec (`hf_layerstream.quant`)."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("bitsandbytes")

from hf_layerstream.quant import (  # noqa: E402
    QUANT_SUFFIX_SEP,
    QuantScheme,
    dequantize_tensor,
    join_parts,
    packed_nbytes,
    quantize_tensor,
    resolve_compression,
    should_quantize,
    split_parts,
)

NF4 = QuantScheme(4, "nf4", 64)
FP4 = QuantScheme(4, "fp4", 64)
INT8 = QuantScheme(8, "blockwise", 256)
SCHEMES = {"nf4": NF4, "fp4": FP4, "8bit": INT8}

# Cosine similarity floors, set just under what bitsandbytes measures on N(0, 1) data over 10 seeds (min / mean):
#   >= 1000 elements: nf4 0.9953 / 0.9958, fp4 0.9918 / 0.9926, 8-bit 0.99993 / 0.99994
#   35 elements:      nf4 0.9941 / 0.9960, fp4 0.9892 / 0.9936, 8-bit 0.99992 / 0.99996
COS_FLOOR_LARGE = {"nf4": 0.995, "fp4": 0.991, "8bit": 0.9999}
COS_FLOOR_SMALL = {"nf4": 0.993, "fp4": 0.988, "8bit": 0.9998}

# Largest gap between neighbouring code values (of the map normalised to [-1, 1]); the nearest-code rounding error is
# at most half of it times the block's absmax.
MAX_CODE_GAP = {"nf4": 0.30381, "fp4": 1 / 3, "8bit": 0.014063}
# relative rounding of the output dtype (round to nearest: half an ulp)
OUT_EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}

SHAPES = [(64, 128), (100, 129), (7, 5), (1000,), (4, 96, 64), (1,)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def _randn(shape, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _code_table(key: str) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    if key == "8bit":
        return bnbf.create_dynamic_map().float()
    return bnbf.get_4bit_type(key, device="cpu").float()


def _reference_decode(parts, meta, key: str) -> torch.Tensor:
    """Pure-torch decoder of the documented layout (fp32): code[idx] * absmax of the element's flat block."""
    numel = math.prod(meta["shape"])
    q = parts["qdata"].long()
    if meta["bits"] == 4:
        idx = torch.stack([q >> 4, q & 0xF], dim=1).reshape(-1)[:numel]  # high nibble first
    else:
        idx = q
    blocks = torch.arange(numel) // meta["blocksize"]
    return (_code_table(key)[idx] * parts["absmax"][blocks]).reshape(meta["shape"])


# --- round trips ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(SCHEMES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_round_trip(key, dtype, shape):
    scheme = SCHEMES[key]
    x = _randn(shape, dtype, seed=zlib.crc32(f"{key}{shape}".encode()) % 1000)
    parts, meta = quantize_tensor(x, scheme)

    assert set(parts) == {"qdata", "absmax"}
    for t in parts.values():
        assert t.device.type == "cpu" and t.is_contiguous() and t.dim() == 1
    assert meta["shape"] == list(shape)
    assert meta["dtype"] == str(dtype).removeprefix("torch.")
    assert (meta["bits"], meta["quant_type"], meta["blocksize"]) == (scheme.bits, scheme.quant_type, scheme.blocksize)
    json.dumps(meta)  # JSON-able

    y = dequantize_tensor(parts, meta)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous() and y.device.type == "cpu"
    assert torch.isfinite(y).all()

    if x.numel() > 1:
        floors = COS_FLOOR_LARGE if x.numel() >= 1000 else COS_FLOOR_SMALL
        assert _cos(x, y) >= floors[key], _cos(x, y)

    # elementwise: nearest-code rounding within the element's block, plus the output dtype's rounding (bitsandbytes'
    # CPU 8-bit kernel rounds values lying within float error of a midpoint either way: measured 1.002x half a gap)
    numel = x.numel()
    absmax = parts["absmax"][torch.arange(numel) // scheme.blocksize].reshape(shape)
    bound = absmax * (MAX_CODE_GAP[key] / 2 * 1.01) + y.float().abs() * OUT_EPS[dtype] + 1e-6
    err = (x.float() - y.float()).abs()
    assert (err <= bound).all(), float((err - bound).max())

    # the stored layout is exactly what the docs say (and what the CPU kernel decodes)
    ref = _reference_decode(parts, meta, key)
    assert torch.equal(dequantize_tensor(parts, meta, dtype=torch.float32), ref)


@pytest.mark.parametrize("key", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(
    "shape", [(64, 128), (100, 129), (7, 5), (4, 96, 64), (300, 257)], ids=lambda s: "x".join(map(str, s))
)
def test_double_quant_round_trip(key, dtype, shape):
    """`double_quant=True`: the block scales stored as bitsandbytes' nested state (a byte each, less their mean, and a
    float32 per 256 of them), decoded bit for bit as bitsandbytes decodes its own nested state, and as the documented
    layout says; the weight's error is the single-quantized one's, give or take a few parts in 10,000."""
    import bitsandbytes.functional as bnbf

    scheme = QuantScheme(4, key, 64, double_quant=True)
    x = _randn(shape, dtype, seed=zlib.crc32(f"dq{key}{shape}".encode()) % 1000)
    parts, meta = quantize_tensor(x, scheme)
    blocks = math.ceil(x.numel() / 64)
    assert {k: (v.dtype, v.numel()) for k, v in parts.items()} == {
        "qdata": (torch.uint8, (x.numel() + 1) // 2),
        "absmax": (torch.uint8, blocks),
        "absmax2": (torch.float32, math.ceil(blocks / 256)),
    }
    assert meta["double_quant"] is True and meta["nested_blocksize"] == 256 and isinstance(meta["offset"], float)
    meta = json.loads(json.dumps(meta))  # (as the manifest gives it back)

    y = dequantize_tensor(parts, meta)
    assert y.shape == x.shape and y.dtype == dtype
    # bitsandbytes' own quantization and decoding of the same tensor, nested state and all
    packed, state = bnbf.quantize_4bit(x.reshape(-1), blocksize=64, quant_type=key, compress_statistics=True)
    assert torch.equal(packed.reshape(-1), parts["qdata"]) and torch.equal(state.absmax, parts["absmax"])
    if x.numel() % 2 == 0:  # (bitsandbytes' CPU kernel takes an even count only: see `dequantize_tensor`)
        assert torch.equal(y.reshape(-1), bnbf.dequantize_4bit(packed, state).reshape(-1))
    # the documented layout: the scales are dynamic_map[absmax] * absmax2[of its 256-block] + offset
    code8 = bnbf.create_dynamic_map().float()
    scales = code8[parts["absmax"].long()] * parts["absmax2"][torch.arange(blocks) // 256] + meta["offset"]
    ref = _reference_decode({"qdata": parts["qdata"], "absmax": scales}, meta, key)
    assert torch.equal(dequantize_tensor(parts, meta, dtype=torch.float32), ref)

    single = dequantize_tensor(*quantize_tensor(x, QuantScheme(4, key, 64)))
    if x.numel() >= 1000:
        assert _cos(x, y) >= COS_FLOOR_LARGE[key] and abs(_cos(x, y) - _cos(x, single)) < 3e-4
    if blocks > 1:  # (one block: its byte and its float32 take more than its float32 scale)
        assert packed_nbytes(parts) < packed_nbytes(quantize_tensor(x, QuantScheme(4, key, 64))[0])


def test_double_quant_of_scales_averaging_past_float32_is_refused():
    """bitsandbytes' offset (the block scales' mean, taken in float32) of finite scales summing past float32's range
    is inf: the tensor was quantized to parts no decoding takes. Refused as a NonFiniteError (the split stores such
    a weight unquantized), naming the cause and the fix; without double_quant it quantizes."""
    from hf_layerstream.quant import NonFiniteError

    x = torch.full((64 * 300,), 3e37)
    with pytest.raises(NonFiniteError, match=r"average past float32's range .* without double_quant"):
        quantize_tensor(x, QuantScheme(4, double_quant=True))
    assert torch.isfinite(dequantize_tensor(*quantize_tensor(x, QuantScheme(4)))).all()


def _decode_in_three_threads(decode) -> list:
    """`decode(i)` (True where weight `i` decoded as expected) run 20 times over weights 0, 1 and 2 in each of three
    threads at once, each in its own order: the weights that did not, and the errors raised."""
    import threading

    errors = []

    def decode_many(order):
        try:
            for _ in range(20):
                errors.extend(i for i in order if not decode(i))
        except BaseException as e:  # noqa: BLE001 - reported by the caller's assertion
            errors.append(e)

    threads = [threading.Thread(target=decode_many, args=(order,)) for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_double_quant_scales_decode_into_reused_per_thread_buffers():
    """On CPU a double-quantized weight's float32 block scales are decoded into buffers each decoding thread keeps
    and reuses (bitsandbytes allocates them afresh for every weight: freed and allocated again between the decoded
    weights, those scales left glibc's heaps holding twice the streamed layers' memory in a streaming run). A
    smaller weight decoded after a larger one reuses the larger one's buffer, and threads decoding at once each
    get their own weights' scales: every result is bitsandbytes' own decoding of the nested state."""
    import threading

    import bitsandbytes.functional as bnbf

    from hf_layerstream import quant

    scheme = QuantScheme(4, double_quant=True)
    weights = [_randn(shape, torch.bfloat16, seed=i) for i, shape in enumerate([(512, 300), (64, 66), (256, 257)])]
    packed = [quantize_tensor(x, scheme) for x in weights]

    def bnb_decode(parts, meta):
        numel = math.prod(meta["shape"])
        nested = bnbf.QuantState(
            absmax=parts["absmax2"], code=bnbf.create_dynamic_map(), blocksize=256, dtype=torch.float32
        )
        state = bnbf.QuantState(
            absmax=parts["absmax"],
            shape=torch.Size([numel + (numel & 1)]),
            dtype=torch.bfloat16,
            blocksize=64,
            quant_type="nf4",
            offset=meta["offset"],
            state2=nested,
        )
        return bnbf.dequantize_4bit(parts["qdata"], state).reshape(-1)[:numel].view(meta["shape"])

    expected = [bnb_decode(*p) for p in packed]
    seen = {}

    def decode_in_order():  # (in a thread of its own: this one's buffers may be sized by earlier tests)
        seen["equal"] = [torch.equal(dequantize_tensor(*p), e) for p, e in zip(packed, expected)]
        buffer = quant._scratch.scales
        seen["size"] = buffer.numel()
        # smaller ones after it: no new buffer
        seen["again"] = [torch.equal(dequantize_tensor(*p), e) for p, e in zip(packed[::-1], expected[::-1])]
        seen["reused"] = quant._scratch.scales is buffer

    thread = threading.Thread(target=decode_in_order)
    thread.start()
    thread.join()
    assert seen == {
        "equal": [True] * 3,
        "size": math.ceil(512 * 300 / 64),  # the largest weight's scales (decoded first)
        "again": [True] * 3,
        "reused": True,
    }

    def decode(i):
        return torch.equal(dequantize_tensor(*packed[i]), expected[i])

    assert _decode_in_three_threads(decode) == []


def _bnb_4bit(parts, meta, dtype) -> torch.Tensor:
    """bitsandbytes' own `dequantize_4bit` of stored 4-bit parts (its nested state for double-quantized scales), at
    `dtype`, over the even count `dequantize_tensor` decodes, cut to the weight's elements."""
    import bitsandbytes.functional as bnbf

    numel = math.prod(meta["shape"])
    nested = offset = None
    if meta.get("double_quant"):
        nested = bnbf.QuantState(
            absmax=parts["absmax2"],
            code=bnbf.create_dynamic_map(),
            blocksize=meta["nested_blocksize"],
            dtype=torch.float32,
        )
        offset = meta["offset"]
    state = bnbf.QuantState(
        absmax=parts["absmax"],
        shape=torch.Size([numel + (numel & 1)]),
        dtype=dtype,
        blocksize=meta["blocksize"],
        quant_type=meta["quant_type"],
        offset=offset,
        state2=nested,
    )
    return bnbf.dequantize_4bit(parts["qdata"], state).reshape(-1)[:numel].view(meta["shape"])


def _decode_twice_into(pool, parts, meta, dtype, expected, native: bool, where: tuple) -> None:
    """Decode a weight into `pool` twice, giving the buffer back between (filled with NaN, which the second decode
    must not show): `expected` both times, in a buffer of the pool where bitsandbytes' native kernel serves (`native`:
    made at most the first time, the same one the second), else in bitsandbytes' own tensor."""
    addresses = []
    for again in range(2):
        made = pool.made
        y = dequantize_tensor(parts, meta, dtype=dtype, buffers=pool)
        assert y.dtype == dtype and y.shape == expected.shape and torch.equal(y, expected), (*where, again)
        addresses.append(y.untyped_storage().data_ptr())
        assert (addresses[-1] in pool._lent) == native, (*where, again)
        assert pool.made - made <= (native and not again), (*where, again)
        y.fill_(float("nan"))
        y = None
        pool.give(addresses[-1:])
    if native:
        assert addresses[0] == addresses[1], where


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("key", ["nf4", "fp4"])
def test_4bit_decoded_into_reused_buffers_is_bitsandbytes_own_decoding(key, double_quant):
    """CPU, `buffers=`: a 4-bit weight is decoded into a buffer of the pool by bitsandbytes' native kernel (called
    with our output pointer, where `dequantize_4bit` allocates a tensor for every weight): bit for bit what
    `dequantize_4bit` gives, at every block size and compute dtype, with scales nested or not, an odd element count
    too, into a fresh buffer and into one given back holding another weight's values. At blocks of 2048 or more
    on an AVX-512 CPU bitsandbytes decodes with torch instead (its kernel is not trusted there): so is it here."""
    from hf_layerstream import quant

    pool = quant.DecodeBuffers()
    for blocksize in quant.BLOCKSIZES[4]:
        scheme = QuantScheme(4, key, blocksize, double_quant=double_quant)
        for shape in [(96, 1000), (7, 5)]:
            x = _randn(shape, torch.bfloat16, seed=zlib.crc32(f"{key}{blocksize}{shape}".encode()) % 1000) * 3
            parts, meta = quantize_tensor(x, scheme)
            for dtype in DTYPES:
                expected = _bnb_4bit(parts, meta, dtype)
                native = quant._native_4bit(key, dtype, blocksize) is not None
                _decode_twice_into(pool, parts, meta, dtype, expected, native, (key, blocksize, shape, dtype))
    assert pool.made > 0


def _bnb_8bit(parts, meta, dtype) -> torch.Tensor:
    """bitsandbytes' own `dequantize_blockwise` of stored 8-bit parts, at `dtype`."""
    import bitsandbytes.functional as bnbf

    state = bnbf.QuantState(
        absmax=parts["absmax"], code=bnbf.create_dynamic_map(), blocksize=meta["blocksize"], dtype=dtype
    )
    return bnbf.dequantize_blockwise(parts["qdata"].reshape(-1), state).view(meta["shape"])


def test_8bit_decoded_into_reused_buffers_is_bitsandbytes_own_decoding():
    """CPU, `buffers=`: an 8-bit weight is decoded into a buffer of the pool by bitsandbytes' native kernel (called
    with our output pointer, where `dequantize_blockwise` allocates a tensor for every weight): bit for bit what
    `dequantize_blockwise` gives, at every block size and compute dtype, an odd element count too (a last block cut
    short), into a fresh buffer and into one given back holding another weight's values."""
    from hf_layerstream import quant

    pool = quant.DecodeBuffers()
    for blocksize in quant.BLOCKSIZES[8]:
        scheme = QuantScheme(8, blocksize=blocksize)
        for shape in [(96, 1000), (7, 5)]:
            x = _randn(shape, torch.bfloat16, seed=zlib.crc32(f"8bit{blocksize}{shape}".encode()) % 1000) * 3
            parts, meta = quantize_tensor(x, scheme)
            for dtype in DTYPES:
                expected = _bnb_8bit(parts, meta, dtype)
                native = quant._native_8bit(dtype) is not None
                _decode_twice_into(pool, parts, meta, dtype, expected, native, (blocksize, shape, dtype))
    assert pool.made > 0


@pytest.mark.parametrize("bits", [4, 8])
def test_a_native_kernel_that_decodes_otherwise_than_bitsandbytes_is_not_used(bits, monkeypatch, caplog):
    """bitsandbytes' native kernel is called with our output pointer as its op calls it, arguments in its order: a
    release calling it otherwise (another order, another meaning) would decode other values, silently. Each kernel is
    tried once on a small weight against bitsandbytes' own op; one that disagrees (here: our call made to write
    zeros) is not used, with a warning naming it, and the weight is decoded by bitsandbytes' op, in no buffer."""
    import logging

    from hf_layerstream import quant

    scheme = QuantScheme(bits) if bits == 4 else QuantScheme(8, blocksize=256)
    packed = quantize_tensor(_randn((64, 256), torch.bfloat16), scheme)
    expected = (_bnb_4bit if bits == 4 else _bnb_8bit)(*packed, torch.bfloat16)
    call = "_call_4bit" if bits == 4 else "_call_8bit"
    real = getattr(quant, call)

    def zeros(kernel, *args):
        real(kernel, *args)
        args[-2].zero_()  # (the output)

    for finder in (quant._native_4bit, quant._native_8bit):
        finder.cache_clear()
    monkeypatch.setattr(quant, call, zeros)
    try:
        pool = quant.DecodeBuffers()
        with caplog.at_level(logging.WARNING, logger="hf_layerstream.quant"):
            y = dequantize_tensor(*packed, dtype=torch.bfloat16, buffers=pool)
        assert torch.equal(y, expected) and pool.made == 0
        assert "does not decode as bitsandbytes' own" in caplog.text, caplog.text
    finally:
        for finder in (quant._native_4bit, quant._native_8bit):
            finder.cache_clear()


def test_decode_buffers_are_reused_only_once_nothing_views_them():
    """A buffer given back while a tensor still views it (a weight kept by its caller, a view of it) is not reused:
    the kept weight keeps its values; the next decode of that size takes a new buffer, and once given back without
    holders a buffer is taken again. Threads decoding at once into one pool each get their own weights."""

    from hf_layerstream import quant

    scheme = QuantScheme(4, double_quant=True)
    packed = [quantize_tensor(_randn((256, 300), torch.bfloat16, seed=i), scheme) for i in range(3)]
    expected = [_bnb_4bit(*p, torch.bfloat16) for p in packed]
    pool = quant.DecodeBuffers()
    kept = dequantize_tensor(*packed[0], buffers=pool).t()  # (a view of it, its tensor dropped)
    pool.give([kept.untyped_storage().data_ptr()])
    other = dequantize_tensor(*packed[1], buffers=pool)
    assert pool.made == 2 and torch.equal(kept.t(), expected[0]) and torch.equal(other, expected[1])
    address = other.untyped_storage().data_ptr()
    other = None
    pool.give([address])
    again = dequantize_tensor(*packed[2], buffers=pool)
    assert pool.made == 2 and again.untyped_storage().data_ptr() == address and torch.equal(again, expected[2])
    assert torch.equal(kept.t(), expected[0])

    def decode(i):
        y = dequantize_tensor(*packed[i], buffers=pool)
        equal = torch.equal(y, expected[i])
        address, y = y.untyped_storage().data_ptr(), None
        pool.give([address])
        return equal

    assert _decode_in_three_threads(decode) == []
    assert pool.made <= 2 + 3 and torch.equal(kept.t(), expected[0])


@pytest.mark.parametrize("bits", [4, 8])
def test_decode_buffers_lend_nothing_to_a_weight_cast_after_decoding(bits):
    """A 4-bit or 8-bit weight asked for at a dtype bitsandbytes does not decode to (float64: decoded to float32, then cast)
    takes no buffer of the pool: the cast is a new tensor, so a buffer taken for the float32 step would never come
    back (the loader gives back the buffers its layer's tensors view), and every sweep would leave one more."""
    from hf_layerstream import quant

    packed = quantize_tensor(_randn((64, 256), torch.bfloat16), QuantScheme(bits))
    decode = _bnb_4bit if bits == 4 else _bnb_8bit
    pool = quant.DecodeBuffers()
    for _ in range(3):
        y = dequantize_tensor(*packed, dtype=torch.float64, buffers=pool)
        assert y.dtype == torch.float64 and torch.equal(y, decode(*packed, torch.float32).double())
        pool.give([y.untyped_storage().data_ptr()])
    assert pool.made == 0 and pool._lent == {}


def test_double_quant_metadata_and_parts_are_checked():
    x = _randn((64, 128), torch.bfloat16)
    parts, meta = quantize_tensor(x, QuantScheme(4, double_quant=True))
    for key, value, match in (
        ("offset", None, "'offset'"),
        ("offset", "0.5", "'offset'"),
        ("offset", float("nan"), "'offset'"),
        ("nested_blocksize", 100, "'nested_blocksize'"),
        ("double_quant", "yes", "'double_quant'"),
        ("code", "dynamic-0000000000000000", "block scales were quantized with code table"),
    ):
        with pytest.raises(ValueError, match=match):
            dequantize_tensor(parts, {**meta, key: value})
    with pytest.raises(ValueError, match="'double_quant' must be true at 4 bits"):
        p8, m8 = quantize_tensor(x, INT8)
        dequantize_tensor(p8, {**m8, "double_quant": True, "offset": 0.0, "nested_blocksize": 256})
    with pytest.raises(ValueError, match="missing part 'absmax2'"):
        dequantize_tensor({k: v for k, v in parts.items() if k != "absmax2"}, meta)
    with pytest.raises(ValueError, match="'absmax2' should be float32 with 1 elements"):
        dequantize_tensor({**parts, "absmax2": torch.zeros(2)}, meta)
    with pytest.raises(ValueError, match="'absmax' should be uint8 with 128 elements"):
        dequantize_tensor({**parts, "absmax": parts["absmax"].float()}, meta)
    # single-quantized scales read as before: float32 ones, no `absmax2`
    with pytest.raises(ValueError, match="'absmax' should be float32"):
        dequantize_tensor(parts, {k: v for k, v in meta.items() if k != "double_quant"})


def test_absmax_is_per_flat_block():
    # one huge value must only widen the scale of its own block
    x = torch.full((64, 130), 0.01)
    x[10, 7] = 100.0
    for key, scheme in SCHEMES.items():
        parts, meta = quantize_tensor(x, scheme)
        absmax = parts["absmax"]
        assert absmax.numel() == math.ceil(x.numel() / scheme.blocksize)
        hot = (10 * 130 + 7) // scheme.blocksize
        assert absmax[hot] == 100.0
        assert torch.allclose(torch.cat([absmax[:hot], absmax[hot + 1 :]]), torch.tensor(0.01))
        y = dequantize_tensor(parts, meta)
        assert y[10, 7] == 100.0
        assert _cos(x, y) > 0.9999, key


def test_zeros_round_trip():
    x = torch.zeros(128, 64, dtype=torch.bfloat16)
    for scheme in SCHEMES.values():
        parts, meta = quantize_tensor(x, scheme)
        assert torch.equal(dequantize_tensor(parts, meta), x)


def test_odd_numel_avoids_compiled_fallback():
    # bitsandbytes' CPU 4-bit kernel only takes an even last dimension; otherwise it falls back to a torch.compile'd
    # function that compiles for seconds on every new shape. The codec decodes an even count instead.
    import time

    for shape in [(13, 11), (1, 2049)]:
        parts, meta = quantize_tensor(_randn(shape, torch.bfloat16), NF4)
        t0 = time.perf_counter()
        y = dequantize_tensor(parts, meta)
        assert time.perf_counter() - t0 < 1.0
        assert y.shape == shape


def test_dequantize_to_other_dtype():
    x = _randn((256, 96), torch.bfloat16)
    for key, scheme in SCHEMES.items():
        parts, meta = quantize_tensor(x, scheme)
        native = dequantize_tensor(parts, meta)
        f32 = dequantize_tensor(parts, meta, dtype=torch.float32)
        f16 = dequantize_tensor(parts, meta, dtype=torch.float16)
        f64 = dequantize_tensor(parts, meta, dtype=torch.float64)
        assert (native.dtype, f32.dtype, f16.dtype, f64.dtype) == (
            torch.bfloat16,
            torch.float32,
            torch.float16,
            torch.float64,
        )
        for t in (f32, f16, f64):
            assert t.shape == x.shape and t.is_contiguous()
        # decoding is done in fp32 and rounded once to the requested dtype
        assert torch.equal(f32.to(torch.bfloat16), native), key
        assert torch.equal(f32.to(torch.float16), f16), key
        assert torch.equal(f64, f32.double()), key


def test_sizes_realistic_matrix():
    x = _randn((512, 1408), torch.bfloat16)
    dense = x.numel() * x.element_size()
    p4, _ = quantize_tensor(x, NF4)
    p8, _ = quantize_tensor(x, INT8)
    # 4 bits + one fp32 scale per 64 -> 0.28125x; 8 bits + one fp32 scale per 256 -> 0.5078x
    assert packed_nbytes(p4) == x.numel() // 2 + 4 * (x.numel() // 64)
    assert packed_nbytes(p8) == x.numel() + 4 * (x.numel() // 256)
    assert packed_nbytes(p4) <= 0.30 * dense
    assert packed_nbytes(p8) <= 0.55 * dense
    assert packed_nbytes(p4.values()) == packed_nbytes(p4)


def test_safetensors_round_trip_bit_exact(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {
        "model.layers.0.mlp.down_proj.weight": _randn((300, 129), torch.bfloat16),
        "model.layers.0.mlp.experts.gate_up_proj": _randn((4, 96, 64), torch.float16, seed=1),
        "model.layers.0.self_attn.o_proj.weight": _randn((7, 5), torch.float32, seed=2),
    }
    for key, scheme in SCHEMES.items():
        flat: dict[str, torch.Tensor] = {"model.norm.weight": torch.ones(16)}
        metas, before = {}, {}
        for name, t in tensors.items():
            parts, meta = quantize_tensor(t, scheme)
            metas[name] = json.loads(json.dumps(meta))  # as it comes back from the manifest
            before[name] = dequantize_tensor(parts, meta)
            flat.update(join_parts(name, parts))
        path = tmp_path / f"{key}.safetensors"
        save_file(flat, str(path))
        plain, quantized = split_parts(load_file(str(path)))
        assert set(plain) == {"model.norm.weight"}
        assert set(quantized) == set(tensors)
        for name in tensors:
            after = dequantize_tensor(quantized[name], metas[name])
            assert after.dtype == before[name].dtype
            assert torch.equal(after, before[name]), (key, name)


def test_split_and_join_parts():
    a, b, c = torch.zeros(2), torch.ones(3), torch.zeros(1)
    flat = {"x.weight": a, **join_parts("y.weight", {"qdata": b, "absmax": c})}
    assert set(flat) == {"x.weight", f"y.weight{QUANT_SUFFIX_SEP}qdata", "y.weight::absmax"}
    plain, quantized = split_parts(flat)
    assert plain == {"x.weight": a}
    assert quantized == {"y.weight": {"qdata": b, "absmax": c}}
    with pytest.raises(ValueError, match="Malformed"):
        split_parts({"::qdata": a})
    with pytest.raises(ValueError, match="Malformed"):
        split_parts({"y.weight::": a})


# --- input checking ------------------------------------------------------------------------------------------------


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="int32"):
        quantize_tensor(torch.zeros(64, 64, dtype=torch.int32), NF4)
    with pytest.raises(ValueError, match="float64"):
        quantize_tensor(torch.zeros(64, 64, dtype=torch.float64), NF4)
    with pytest.raises(ValueError, match="empty"):
        quantize_tensor(torch.zeros(0, 64), NF4)
    with pytest.raises(ValueError, match="meta"):
        quantize_tensor(torch.empty(64, 64, device="meta"), NF4)
    from hf_layerstream.quant import NonFiniteError

    for value, scheme in [(float("nan"), INT8), (float("inf"), NF4), (float("-inf"), INT8)]:
        bad = torch.zeros(64, 64)
        bad[3, 3] = value
        with pytest.raises(NonFiniteError, match="NaN or Inf"):  # (a ValueError, which the split tells apart)
            quantize_tensor(bad, scheme)
    with pytest.raises(ValueError) as other:
        quantize_tensor(torch.zeros(0, 64), NF4)
    assert not isinstance(other.value, NonFiniteError)


def test_quantize_rejects_wrong_types_with_type_error():
    """A wrong type is a TypeError (as in the rest of the public API), not a ValueError, and says what to pass."""
    for tensor, scheme, match in [
        ([[1.0, 2.0]], NF4, "expects a torch.Tensor, got list"),
        (np.zeros((64, 64), dtype=np.float32), NF4, "expects a torch.Tensor, got ndarray"),
        (torch.zeros(64, 64), "4bit", "expects a QuantScheme, got str"),
        (torch.zeros(64, 64), {"bits": 4}, "expects a QuantScheme, got dict"),
    ]:
        with pytest.raises(TypeError, match=match):
            quantize_tensor(tensor, scheme)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite_finds_one_nan_or_inf_anywhere(dtype):
    """`all_finite` (one `aminmax`, not a boolean tensor of the weight's size) says what `torch.isfinite(t).all()`
    says: one NaN, inf or -inf at any place of a tensor of any shape (the vectorized body and the tail of the
    reduction), in a transposed view too; an empty tensor is finite."""
    from hf_layerstream.quant import all_finite

    gen = torch.Generator().manual_seed(0)
    for shape in [(1,), (7,), (33,), (1000,), (64, 129), (3, 5, 17)]:
        x = torch.randn(shape, generator=gen).to(dtype)
        assert all_finite(x) and all_finite(x.T if x.dim() == 2 else x)
        for value in (float("nan"), float("inf"), float("-inf")):
            for place in {0, x.numel() // 2, x.numel() - 1, int(torch.randint(x.numel(), (), generator=gen))}:
                bad = x.clone()
                bad.view(-1)[place] = value
                assert not all_finite(bad) and not all_finite(bad.T if bad.dim() == 2 else bad), (shape, value, place)
                assert all_finite(bad) == bool(torch.isfinite(bad).all())
    assert not all_finite(torch.full((100,), float("nan"), dtype=dtype))
    assert all_finite(torch.zeros(0, 4, dtype=dtype))
    if dtype == torch.float16:  # (float8, which `aminmax` does not take on the CPU: as `isfinite` says)
        e5m2 = torch.tensor([1.0, float("inf"), 2.0]).to(torch.float8_e5m2)
        assert not all_finite(e5m2) and all_finite(e5m2[::2])


@pytest.mark.parametrize("scheme", [NF4, INT8, QuantScheme(4, "fp4", 128, double_quant=True)], ids=str)
@pytest.mark.parametrize("shape", [(128, 64), (3, 100, 77), (4096, 33)])
def test_stored_layout_is_what_quantize_tensor_stores(scheme, shape):
    """`_stored_layout` (the split's disk-space estimate counts each part and the metadata's record from it) gives the
    parts `quantize_tensor` stores, and its metadata's fields, its JSON at least as long."""
    from hf_layerstream.quant import _stored_layout

    parts, meta = quantize_tensor(_randn(shape, torch.bfloat16), scheme)
    layout, template = _stored_layout(shape, torch.bfloat16, scheme)
    assert {p: (list(t.shape), t.dtype) for p, t in parts.items()} == layout
    assert sorted(template) == sorted(meta) and template["parts"] == meta["parts"]
    assert {k: v for k, v in template.items() if k not in ("offset", "code")} == {
        k: v for k, v in meta.items() if k not in ("offset", "code")
    }
    assert len(json.dumps(template)) >= len(json.dumps(meta))


def test_dequantize_rejects_mismatched_parts():
    parts, meta = quantize_tensor(_randn((128, 64), torch.bfloat16), NF4)
    with pytest.raises(ValueError, match="qdata"):
        dequantize_tensor({"qdata": parts["qdata"][:-1], "absmax": parts["absmax"]}, meta)
    with pytest.raises(ValueError, match="absmax"):
        dequantize_tensor({"qdata": parts["qdata"], "absmax": parts["absmax"].half()}, meta)
    with pytest.raises(ValueError, match="absmax"):
        dequantize_tensor({"qdata": parts["qdata"]}, meta)
    with pytest.raises(ValueError, match="shape"):
        dequantize_tensor(parts, {k: v for k, v in meta.items() if k != "shape"})
    with pytest.raises(ValueError, match="blocksize"):
        dequantize_tensor(parts, {**meta, "blocksize": 100})
    with pytest.raises(ValueError, match="dtype"):
        dequantize_tensor(parts, {**meta, "dtype": "int8"})
    # metadata fields of the wrong type are malformed metadata, a ValueError as the rest (a list was a bare TypeError,
    # "unhashable type: 'list'")
    for field, value in (("bits", "4"), ("bits", [4]), ("bits", True), ("quant_type", 4), ("blocksize", "64")):
        with pytest.raises(ValueError, match=f"`{field}` must be") as info:
            dequantize_tensor(parts, {**meta, field: value})
        assert not isinstance(info.value, TypeError)
    p8, m8 = quantize_tensor(_randn((128, 64), torch.bfloat16), INT8)
    with pytest.raises(ValueError, match="code table"):
        dequantize_tensor(p8, {**m8, "code": "dynamic-0000000000000000"})


# --- should_quantize -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shape, dtype, expected",
    [
        ("model.layers.0.self_attn.q_proj.weight", (512, 512), torch.bfloat16, True),
        ("model.layers.0.mlp.down_proj.weight", (512, 1408), torch.float16, True),
        ("model.layers.0.mlp.gate_proj.weight", (1408, 512), torch.float32, True),
        ("model.layers.0.mlp.experts.gate_up_proj", (8, 512, 2816), torch.bfloat16, True),
        ("model.layers.0.mlp.experts.down_proj", (8, 1408, 512), torch.bfloat16, True),
        ("model.layers.0.input_layernorm.weight", (512,), torch.bfloat16, False),
        ("model.layers.0.self_attn.q_proj.bias", (512,), torch.bfloat16, False),
        ("model.layers.0.self_attn.q_proj.weight", (512, 512), torch.int8, False),
        ("model.layers.0.self_attn.q_proj.weight", (512, 512), torch.float64, False),
        ("model.layers.0.self_attn.q_proj.weight", (512, 512), torch.float8_e4m3fn, False),
        ("model.layers.0.self_attn.q_proj.weight", (16, 32), torch.bfloat16, False),  # tiny
        ("model.layers.0.conv.weight", (64, 64, 3, 3), torch.bfloat16, False),  # 4-D
        ("model.layers.0.mlp.gate.weight", (64, 2048), torch.bfloat16, False),  # MoE router
        ("model.layers.0.mlp.router.weight", (64, 2048), torch.bfloat16, False),
        ("model.embed_tokens.weight", (1000, 512), torch.bfloat16, False),
        ("lm_head.weight", (1000, 512), torch.bfloat16, False),
        ("transformer.wte.weight", (1000, 512), torch.bfloat16, False),
    ],
)
def test_should_quantize(name, shape, dtype, expected):
    for device in ("cpu", "meta"):  # only shape and dtype are read
        t = torch.empty(shape, dtype=dtype, device=device)
        assert should_quantize(name, t, NF4) is expected
        assert should_quantize(name, t, INT8) is expected


def test_should_quantize_knowing_the_module_quantizes_what_transformers_bitsandbytes_path_does():
    """Given the module holding a weight, 2-D weights are quantized only in linear layers (`nn.Linear`, GPT-2's
    `Conv1D`) and experts modules, and 3-D ones only in experts modules; biases and routers never. (By name alone, Mamba's
    `A_log` (2-D, in the mixer itself) and gpt-oss's 2-D expert biases were quantized, and routers held in a linear
    under a router module (DBRX's `ffn.router.layer`, Hunyuan's `mlp.gate.wg`) too.)"""
    from transformers.pytorch_utils import Conv1D

    def quantized(name, shape, owner):
        t = torch.empty(shape, dtype=torch.bfloat16, device="meta")
        return should_quantize(name, t, NF4, owner=owner)

    class MixtralExperts(torch.nn.Module):  # (transformers names every module of fused experts so)
        pass

    class DbrxExpertGLU(torch.nn.Module):
        pass

    mixer, experts = torch.nn.Module(), MixtralExperts()
    linear, conv = torch.nn.Linear(2, 2, device="meta"), torch.nn.Conv1d(4, 4, 3, groups=4, device="meta")
    assert quantized("model.layers.0.self_attn.q_proj.weight", (512, 512), linear)
    assert quantized("transformer.h.0.attn.c_attn.weight", (512, 1536), Conv1D(1536, 512))
    assert quantized("model.layers.0.mlp.experts.gate_up_proj", (8, 512, 2816), experts)
    # DBRX's experts are 2-D ([experts x ffn, d_model]); a 3-D tensor outside experts is not theirs (Zamba's `A_log`)
    assert quantized("transformer.blocks.0.ffn.experts.mlp.w1", (16 * 10752, 6144), DbrxExpertGLU())
    assert not quantized("model.layers.0.mamba.A_log", (2, 3712, 16), mixer)

    class ErgoExpertNorm(torch.nn.Module):  # (a norm weight per expert, [experts, hidden])
        pass

    assert not quantized("model.layers.0.mlp.experts.norm.weight", (256, 8192), ErgoExpertNorm())
    assert not quantized("backbone.layers.0.mixer.A_log", (8192, 16), mixer)
    assert not quantized("backbone.layers.0.mixer.conv1d.weight", (8192, 4, 4), conv)
    assert not quantized("model.layers.0.mlp.experts.gate_up_proj_bias", (32, 5760), experts)
    assert not quantized("transformer.blocks.0.ffn.router.layer.weight", (16, 6144), linear)
    assert not quantized("model.layers.0.mlp.gate.wg.weight", (64, 4096), linear)
    # the name alone still keeps biases and routers under a router module
    for name in ("model.layers.0.mlp.experts.down_proj_bias", "transformer.blocks.0.ffn.router.layer.weight"):
        assert not should_quantize(name, torch.empty(64, 4096, dtype=torch.bfloat16, device="meta"), NF4)


def test_modules_left_unconverted_match_transformers_rule_also_without_its_function(monkeypatch):
    """`_not_converted` asks transformers' own rule (`should_convert_module`: which modules its bitsandbytes path
    leaves out for `llm_int8_skip_modules`); a transformers that moved or renamed it gets that rule as of 5.24 (what
    transformers from 5.24 answers), not an ImportError at split time."""
    import sys
    import types

    import transformers
    from packaging import version

    from hf_layerstream.quant import _not_converted

    cases = [
        ("model.layers.1.mlp.down_proj", ["model.layers.1"]),
        ("model.layers.11.mlp.down_proj", ["model.layers.1"]),
        ("model.layers.11.mlp.down_proj", ["model.layers.*"]),
        ("model.layers.0.mlp.gate", ["mlp.gate"]),
        ("model.layers.0.mlp.gate_proj", ["mlp.gate"]),
        ("model.decoder.layers.23.fc1", ["fc1"]),
        ("model.layers.0.self_attn.q_proj", ["lm_head", "k_proj"]),
        ("lm_head", ["lm_head"]),
    ]
    rule_5_24 = [
        True,
        False,
        True,
        True,
        False,
        True,
        False,
        True,
    ]  # (5.24's rule; 5.15's matched "layers.1" in "layers.11")
    if version.parse(transformers.__version__) >= version.parse("5.24"):
        assert [_not_converted(name, patterns) for name, patterns in cases] == rule_5_24  # (transformers' own)
    monkeypatch.setitem(sys.modules, "transformers.quantizers.quantizers_utils", types.ModuleType("moved"))
    assert [_not_converted(name, patterns) for name, patterns in cases] == rule_5_24


def test_should_quantize_embeddings_opt_in():
    emb = torch.empty(1000, 512, dtype=torch.bfloat16, device="meta")
    with_emb = QuantScheme(4, quantize_embeddings=True)
    assert not should_quantize("model.embed_tokens.weight", emb, NF4)
    assert should_quantize("model.embed_tokens.weight", emb, with_emb)
    assert should_quantize("lm_head.weight", emb, with_emb)
    # the caller's flag wins over a name that does not look like an embedding
    assert not should_quantize("model.custom_table.weight", emb, NF4, is_embedding=True)
    assert should_quantize("model.custom_table.weight", emb, with_emb, is_embedding=True)
    assert should_quantize("model.custom_table.weight", emb, NF4)


# --- QuantScheme / resolve_compression -----------------------------------------------------------------------------


def test_scheme_defaults_and_dict_round_trip():
    assert QuantScheme(4) == QuantScheme(4, "nf4", 64)
    assert QuantScheme(8) == QuantScheme(8, "blockwise", 256)
    for scheme in (NF4, FP4, INT8, QuantScheme(4, "fp4", 4096, quantize_embeddings=True), QuantScheme(8, None, 64)):
        d = json.loads(json.dumps(scheme.to_dict()))
        assert QuantScheme.from_dict(d) == scheme
    assert QuantScheme.from_dict({"bits": 8}) == INT8
    assert len({NF4, QuantScheme(4)}) == 1  # hashable, defaults resolved


def test_double_quant_scheme():
    dq = QuantScheme(4, double_quant=True)
    assert dq != NF4 and dq.to_dict() == {**NF4.to_dict(), "double_quant": True}
    assert QuantScheme.from_dict(json.loads(json.dumps(dq.to_dict()))) == dq
    # without it, the scheme's record is what it was (shard directories read by earlier versions as before)
    assert "double_quant" not in NF4.to_dict() and QuantScheme.from_dict(NF4.to_dict()) == NF4
    assert resolve_compression("nf4", double_quant=True) == dq
    assert resolve_compression("4bit", quant_type="fp4", double_quant=True) == QuantScheme(4, "fp4", double_quant=True)
    assert resolve_compression("4bit", double_quant=False) == NF4
    # (the compression asked for and the way out named: it said "got bits=8", an argument never passed, and no fix)
    for compression in ("8bit", "int8"):
        with pytest.raises(ValueError) as info:
            resolve_compression(compression, double_quant=True)
        assert str(info.value) == (
            f"`double_quant` applies to 4-bit quantization only, got compression={compression!r} (8-bit): pass "
            "compression='4bit' with it, or drop it to quantize to 8 bits."
        )
    with pytest.raises(ValueError, match=r"only, got bits=8: pass bits=4 with it, or double_quant=False\.$"):
        QuantScheme(8, double_quant=True)
    with pytest.raises(
        ValueError, match=r"double_quant=True only applies to quantized shards; pass compression='4bit'"
    ):
        resolve_compression(None, double_quant=True)
    with pytest.raises(ValueError, match=r"double_quant=True cannot be combined with a QuantScheme"):
        resolve_compression(NF4, double_quant=True)
    with pytest.raises(TypeError, match=r"`double_quant` must be True or False, got 'yes'"):
        QuantScheme(4, double_quant="yes")
    # (a wrong type is a TypeError, as for the public API's other arguments; `split_checkpoint` checks it so first)
    for value in ("yes", None, 1):
        with pytest.raises(TypeError, match=rf"`double_quant` must be True or False, got {value!r}"):
            resolve_compression("4bit", double_quant=value)


@pytest.mark.parametrize(
    "kwargs, field, shown",
    [
        ({"bits": 3}, "bits", "3"),
        ({"bits": 4, "quant_type": "int4"}, "quant_type", "'int4'"),
        ({"bits": 8, "quant_type": "nf4"}, "quant_type", "'nf4'"),
        ({"bits": 4, "blocksize": 100}, "blocksize", "100"),
        ({"bits": 4, "blocksize": 16}, "blocksize", "16"),
        ({"bits": 8, "blocksize": 32}, "blocksize", "32"),
    ],
)
def test_scheme_validation(kwargs, field, shown):
    with pytest.raises(ValueError) as exc:
        QuantScheme(**kwargs)
    msg = str(exc.value)
    assert field in msg and shown in msg and "must be" in msg
    with pytest.raises(ValueError, match=field):
        QuantScheme.from_dict(kwargs)


@pytest.mark.parametrize(
    "kwargs, field, shown",
    [
        ({"bits": "4"}, "bits", "str '4'"),
        ({"bits": True}, "bits", "bool True"),
        ({"bits": 4.0}, "bits", "float 4.0"),
        ({"bits": None}, "bits", "NoneType None"),
        ({"bits": 4, "quant_type": 4}, "quant_type", "int 4"),
        ({"bits": 4, "blocksize": "64"}, "blocksize", "str '64'"),
        ({"bits": 4, "blocksize": 64.0}, "blocksize", "float 64.0"),
        ({"bits": 4, "blocksize": True}, "blocksize", "bool True"),
        ({"bits": 4, "quantize_embeddings": "yes"}, "quantize_embeddings", "'yes'"),
        ({"bits": 4, "quantize_embeddings": 0}, "quantize_embeddings", "0"),
        ({"bits": 4, "double_quant": 1}, "double_quant", "1"),
    ],
)
def test_scheme_wrong_types_are_type_errors(kwargs, field, shown):
    """A field of the wrong type is a TypeError, as for every argument of the public API (`resolve_compression` and
    the rest): `QuantScheme("4")`, `QuantScheme(True)` or `blocksize="64"` were a ValueError (a bool is no int here).
    `from_dict` reads a stored dict, the shard manifest's: a field of the wrong type there is a bad value of the dict,
    a ValueError as before (what the manifest checks report as the manifest's damage)."""
    with pytest.raises(TypeError) as exc:
        QuantScheme(**kwargs)
    msg = str(exc.value)
    assert f"`{field}` must be" in msg and f"got {shown}" in msg, msg
    with pytest.raises(ValueError) as from_dict:
        QuantScheme.from_dict(kwargs)
    assert not isinstance(from_dict.value, TypeError) and str(from_dict.value) == msg


def test_scheme_from_dict_errors():
    with pytest.raises(ValueError, match="bits"):
        QuantScheme.from_dict({"quant_type": "nf4"})
    with pytest.raises(ValueError, match="block_size"):
        QuantScheme.from_dict({"bits": 4, "block_size": 64})
    with pytest.raises(ValueError, match="dict"):
        QuantScheme.from_dict(["bits", 4])


def test_resolve_compression():
    assert resolve_compression(None) is None
    assert resolve_compression("4bit") == QuantScheme(4, "nf4", 64)
    assert resolve_compression("4bit", quant_type="fp4", blocksize=128) == QuantScheme(4, "fp4", 128)
    assert resolve_compression("nf4") == QuantScheme(4, "nf4", 64)
    assert resolve_compression("fp4", blocksize=32) == QuantScheme(4, "fp4", 32)
    assert resolve_compression("8bit") == QuantScheme(8, "blockwise", 256)
    assert resolve_compression("int8", blocksize=64) == QuantScheme(8, "blockwise", 64)
    assert resolve_compression(" INT8 ") == QuantScheme(8, "blockwise", 256)
    # NumPy's integers are taken, as `prefetch` takes them (refused, naming a size it accepts), and made Python's: the
    # manifest stores the scheme as JSON
    scheme = resolve_compression("4bit", blocksize=np.int64(128))
    assert scheme == QuantScheme(4, "nf4", 128) and type(scheme.blocksize) is int
    assert json.loads(json.dumps(QuantScheme(np.int32(8)).to_dict())) == QuantScheme(8).to_dict()
    assert resolve_compression(NF4) is NF4


def test_resolve_compression_errors():
    with pytest.raises(ValueError, match="compression") as exc:
        resolve_compression(None, quant_type="nf4")
    assert "quant_type='nf4'" in str(exc.value)
    with pytest.raises(ValueError, match="blocksize=64"):
        resolve_compression(None, blocksize=64)
    # only the compression that takes the value is named (the other one was refused next)
    with pytest.raises(ValueError, match=r"pass compression='8bit' as well"):
        resolve_compression(None, quant_type="blockwise")
    with pytest.raises(ValueError, match=r"pass compression='4bit' as well"):
        resolve_compression(None, blocksize=32)
    with pytest.raises(ValueError) as exc:
        resolve_compression("2bit")
    assert "'2bit'" in str(exc.value) and all(a in str(exc.value) for a in ("4bit", "8bit", "nf4", "fp4", "int8"))
    with pytest.raises(TypeError, match="compression"):
        resolve_compression(4)
    with pytest.raises(ValueError, match="quant_type"):
        resolve_compression("nf4", quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type"):
        resolve_compression("8bit", quant_type="nf4")
    # a code of the other compression names it (a 4-bit one with '8bit' named no way out; 'blockwise' with 'nf4' was
    # sent to '4bit', which refused it next)
    with pytest.raises(ValueError, match=r"got 'fp4', a 4-bit code: pass compression='4bit' with it"):
        resolve_compression("int8", quant_type="FP4")
    with pytest.raises(ValueError, match=r"got 'blockwise', an 8-bit code: pass compression='8bit' with it"):
        resolve_compression("4bit", quant_type="blockwise")
    with pytest.raises(ValueError, match=r"use compression='8bit' with quant_type='blockwise' instead"):
        resolve_compression("nf4", quant_type="blockwise")
    with pytest.raises(ValueError, match="blocksize"):
        resolve_compression("8bit", blocksize=32)


def test_bitsandbytes_is_imported_lazily():
    # `import hf_layerstream` must work without bitsandbytes: no module-level import of it in the codec
    import hf_layerstream.quant as quant

    tree = ast.parse(Path(quant.__file__).read_text())
    for node in tree.body:  # top-level statements only; imports inside functions are fine
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "bitsandbytes" for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] != "bitsandbytes"


# --- CUDA ----------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("key", list(SCHEMES))
def test_cuda_dequant_matches_cpu(key):
    scheme = SCHEMES[key]
    for shape, dtype in [((300, 129), torch.bfloat16), ((4, 96, 64), torch.float16), ((7, 5), torch.float32)]:
        x = _randn(shape, dtype)
        parts, meta = quantize_tensor(x, scheme)
        for out_dtype in (None, torch.float32):
            cpu = dequantize_tensor(parts, meta, dtype=out_dtype)
            gpu = dequantize_tensor(parts, meta, device="cuda", dtype=out_dtype)
            assert gpu.device.type == "cuda" and gpu.shape == cpu.shape and gpu.dtype == cpu.dtype
            assert gpu.is_contiguous()
            # both decode code[idx] * absmax in fp32; allow one rounding step of the output dtype
            eps = OUT_EPS[cpu.dtype] * 2 if cpu.dtype != torch.float32 else 1e-5
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=eps, atol=1e-6)

        # pinned host parts take the non_blocking path
        pinned = {k: v.pin_memory() for k, v in parts.items()}
        gpu = dequantize_tensor(pinned, meta, device=torch.device("cuda"))
        torch.cuda.synchronize()
        torch.testing.assert_close(gpu.cpu(), dequantize_tensor(parts, meta), rtol=OUT_EPS[dtype] * 2, atol=1e-6)

        # quantizing on the GPU yields CPU parts of the same layout that decode to (nearly) the same weights
        gparts, gmeta = quantize_tensor(x.cuda(), scheme)
        assert all(t.device.type == "cpu" for t in gparts.values())
        assert {k: v.shape for k, v in gparts.items()} == {k: v.shape for k, v in parts.items()}
        assert _cos(dequantize_tensor(gparts, gmeta), x) >= COS_FLOOR_SMALL[key]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_double_quant_dequant_matches_cpu():
    for shape, dtype in [((300, 129), torch.bfloat16), ((4, 96, 64), torch.float16)]:
        x = _randn(shape, dtype)
        parts, meta = quantize_tensor(x, QuantScheme(4, double_quant=True))
        cpu = dequantize_tensor(parts, meta, dtype=torch.float32)
        pinned = {k: v.pin_memory() for k, v in parts.items()}  # (the non_blocking path, `absmax2` too)
        gpu = dequantize_tensor(pinned, meta, device="cuda", dtype=torch.float32)
        torch.cuda.synchronize()
        assert gpu.device.type == "cuda" and gpu.shape == cpu.shape
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)


# the 4-bit code tables shards are written with (bitsandbytes 0.50; NF4 as in the QLoRA paper): decoding takes the
# installed bitsandbytes' tables, so a release that changed them would decode existing shards wrong, silently
NF4_TABLE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip
FP4_TABLE = [
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
]  # fmt: skip


@pytest.mark.parametrize("key, table", [("nf4", NF4_TABLE), ("fp4", FP4_TABLE)])
def test_the_4bit_code_tables_are_the_ones_shards_were_written_with(key, table):
    assert _code_table(key).tolist() == table


_IMPORT_AND_LOG = """
import logging, sys
logging.basicConfig(format="%(name)s: %(message)s")
if sys.argv[1] == "ours":
    from hf_layerstream.quant import load_backend
    load_backend()
elif sys.argv[1] == "peft":  # (peft imports bitsandbytes: `generate --adapter`, `split --adapter`)
    from hf_layerstream.merge import import_peft
    import_peft("this")
elif sys.argv[1] == "quantize":  # (the codec called directly, without `load_backend` first)
    import torch
    from hf_layerstream.quant import QuantScheme, quantize_tensor
    quantize_tensor(torch.ones(128), QuantScheme(bits=int(sys.argv[2])))
elif sys.argv[1] == "dequantize":
    import torch
    from hf_layerstream.quant import dequantize_tensor
    meta = {"bits": 4, "quant_type": "nf4", "blocksize": 64, "shape": [128], "dtype": "float32"}
    dequantize_tensor({"qdata": torch.zeros(64, dtype=torch.uint8), "absmax": torch.ones(2)}, meta)
else:
    import bitsandbytes.functional
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a later notice")
"""


def test_importing_bitsandbytes_leaves_out_its_hub_kernel_notice():
    """bitsandbytes looks for a hub kernel for its CPU 4-bit matmul as it is imported (AVX512-BF16 CPUs, with the
    `kernels` package transformers installs) and warns where it cannot load one, advising `pip install kernels`:
    every quantized split or decode printed that, for an op streaming never calls. The notice is left out (others
    from that logger, later, are not), and so is `kernels'` notice, offline, that it did not check that kernel's
    publisher; also where peft imports bitsandbytes (`generate --adapter`, and `split --adapter`, which printed it),
    and where the codec is called directly (`quantize_tensor`, `dequantize_tensor`: they imported bitsandbytes
    themselves, and printed it)."""
    import os
    import subprocess
    import sys

    def stderr(*way: str) -> str:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        args = [sys.executable, "-c", _IMPORT_AND_LOG, *way]
        run = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stderr
        return run.stderr

    plain = stderr("plain")
    if "gemm_4bit_forward" not in plain:
        pytest.skip("bitsandbytes gives no hub-kernel notice here (no AVX512-BF16, or no `kernels` package)")
    ways = [("ours",), ("quantize", "4"), ("quantize", "8"), ("dequantize",)]
    ways += [("peft",)] if importlib.util.find_spec("peft") is not None else []
    for way in ways:
        ours = stderr(*way)
        assert "gemm_4bit_forward" not in ours and "a later notice" in ours, (way, ours)
        assert "Skipping publisher trust check" not in ours, (way, ours)
