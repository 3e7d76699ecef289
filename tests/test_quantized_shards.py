"""Quantized shard directories end to end: sizes, fidelity, scheme in the manifest, streaming + compression."""

from __future__ import annotations

import json

import _models
import pytest
import torch
from conftest import shaped_shard_dir, streamed_model

from hf_layerstream import (
    ShardDirectory,
    ShardDirError,
    disable_layer_streaming,
    get_streaming_state,
    split_checkpoint,
)
from hf_layerstream.cli import main

# hidden size >= 256 so that quantization error behaves as on real models
FIDELITY_CONFIG = {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4, "num_key_value_heads": 2}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    config = _models.make_config("llama", **FIDELITY_CONFIG)
    ckpt = _models.save_tiny_checkpoint(config, root / "ckpt", dtype=torch.bfloat16, max_shard_size="1MB")
    dirs = {
        c: split_checkpoint(ckpt, root / f"shards-{c}", compression=None if c == "none" else c, progress=False)
        for c in ("none", "8bit", "4bit")
    }
    return ckpt, dirs


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _through_the_codec(ckpt, quantized: set[str], scheme) -> torch.nn.Module:
    """The checkpoint loaded at bfloat16 (what `dtype="auto"` loads it at) with each weight named in `quantized`
    replaced by its decoding under `scheme`: what a streamed model of its split must equal, bit for bit."""
    from hf_layerstream.quant import dequantize_tensor, quantize_tensor

    reference = _models.load_reference(ckpt, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name in quantized:
                param.copy_(dequantize_tensor(*quantize_tensor(param, scheme)))
    return reference


@pytest.mark.parametrize("compression,min_cosine", [("8bit", 0.995), ("4bit", 0.95)])
def test_fidelity_against_full_precision(bf16_checkpoint, compression, min_cosine):
    ckpt, dirs = bf16_checkpoint
    ref = _models.load_reference(ckpt, dtype=torch.bfloat16)
    ids = torch.randint(4, 120, (2, 48), generator=torch.Generator().manual_seed(0))
    expected = _logits(ref, ids)
    model = streamed_model(ckpt, dirs[compression], max_memory={"cpu": 0})
    got = _logits(model, ids)
    cos = _cosine(got, expected)
    assert cos >= min_cosine, f"{compression}: cosine {cos:.5f}"
    assert not torch.equal(got, expected)  # it really is the quantized weights that ran
    # the full-precision shards of the same checkpoint are exact
    assert torch.equal(_logits(streamed_model(ckpt, dirs["none"], max_memory={"cpu": 0}), ids), expected)


@pytest.mark.parametrize("compression,max_ratio", [("4bit", 0.30), ("8bit", 0.55)])
def test_layer_shards_are_smaller(bf16_checkpoint, compression, max_ratio):
    _, dirs = bf16_checkpoint
    full = ShardDirectory(dirs["none"])
    packed = ShardDirectory(dirs[compression])
    for i in range(full.num_layers):
        ratio = packed.unit(f"layers.{i}").size / full.unit(f"layers.{i}").size
        assert ratio <= max_ratio, f"layer {i}: {ratio:.3f}"
    # norms and biases stay in full precision; embeddings and lm_head too by default
    layer = packed.unit("layers.0").tensors
    assert layer["model.layers.0.input_layernorm.weight"].quant is None
    assert layer["model.layers.0.mlp.down_proj.weight"].quant["bits"] == int(compression[0])
    assert all(t.quant is None for t in packed.unit("resident").tensors.values())


def test_manifest_records_the_scheme_and_loading_needs_no_flag(bf16_checkpoint):
    ckpt, dirs = bf16_checkpoint
    m = json.loads((dirs["4bit"] / "manifest.json").read_text())
    assert m["compression"]["bits"] == 4 and m["compression"]["quant_type"] == "nf4"
    model = streamed_model(ckpt, dirs["4bit"])
    assert get_streaming_state(model).shard_dir.compression["bits"] == 4


def test_compression_and_prefetch_work_together(bf16_checkpoint):
    """Every plan over the same 4-bit shards gives the same bits: dequantization happens in the loader."""
    ckpt, dirs = bf16_checkpoint
    ids = torch.randint(4, 120, (1, 20), generator=torch.Generator().manual_seed(1))
    resident = _logits(streamed_model(ckpt, dirs["4bit"]), ids)
    for prefetch in (0, 1, 2):  # (3 layers: at most 2 ahead; prefetch 3 in test_dequantize_per_module)
        model = streamed_model(ckpt, dirs["4bit"], max_memory={"cpu": 0}, prefetch=prefetch)
        state = get_streaming_state(model)
        assert state.plan.streamed == [0, 1, 2] and state.loader.prefetch == prefetch
        assert torch.equal(_logits(model, ids), resident)


def test_streamed_4bit_weights_are_decoded_into_buffers_reused_from_sweep_to_sweep(tmp_path):
    """CPU: the 4-bit weights of streamed layers are decoded into buffers the loader allocates once and reuses as
    each layer is released (bitsandbytes' CPU `dequantize_4bit` allocated every weight afresh at every sweep, and
    glibc's heaps kept the freed ones: a 4-bit, double-quantized warm run of the README's demo model peaked up to
    1.1 GB over its baseline against the 0.61 GB its plan allows). Every sweep computes the same bits as with
    every layer kept, at prefetch 0 to 3 and with the compute on one thread or two; at most the weights of the
    `prefetch + 1` layers in flight are ever decoded into buffers of their own; a weight the caller keeps from a pass
    keeps its values (its buffer is not reused)."""
    config = _models.make_config("llama", num_hidden_layers=5, **FIDELITY_CONFIG)  # (prefetch 3 needs 5 streamed)
    ckpt = _models.save_tiny_checkpoint(config, tmp_path / "ckpt", dtype=torch.bfloat16, max_shard_size="1MB")
    shards = split_checkpoint(ckpt, tmp_path / "dq", compression="4bit", double_quant=True, progress=False)
    per_layer = sum(t.quant is not None for t in ShardDirectory(shards).unit("layers.0").tensors.values())
    ids = torch.randint(4, 120, (1, 20), generator=torch.Generator().manual_seed(1))
    expected = _kept_logits(ckpt, shards, ids)
    threads = torch.get_num_threads()
    try:
        for num_threads in (1, 2):
            torch.set_num_threads(num_threads)
            for prefetch in (0, 1, 2, 3):
                model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=prefetch)
                loader = get_streaming_state(model).loader
                assert loader.prefetch == prefetch
                for _ in range(4):
                    assert torch.equal(_logits(model, ids), expected), (num_threads, prefetch)
                loader.wait_idle()  # (the next sweep's first layers, decoded as the head ran)
                # the weights of the layers in flight at once, at most: 5 layers a sweep made 140 without reuse
                assert 0 < loader._decoded.made <= (prefetch + 1) * per_layer, (num_threads, prefetch)
                disable_layer_streaming(model)
    finally:
        torch.set_num_threads(threads)

    # layer 1's down_proj weight, kept from the first pass; checked as each layer's down_proj runs after it (the
    # layers' weights of that size are decoded into the same few buffers)
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=1)
    kept, unchanged = [], []

    def keep_or_check(module, args, output):
        if kept:
            unchanged.append(torch.equal(*kept))
        elif module is model.model.layers[1].mlp.down_proj:
            kept.extend([module.weight, module.weight.clone()])

    handles = [layer.mlp.down_proj.register_forward_hook(keep_or_check) for layer in model.model.layers]
    for _ in range(4):
        assert torch.equal(_logits(model, ids), expected)
    for handle in handles:
        handle.remove()
    assert len(unchanged) == 5 * 4 - 2 and all(unchanged)
    disable_layer_streaming(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_streamed_8bit_weights_are_decoded_into_buffers_reused_from_sweep_to_sweep(tmp_path, dtype):
    """CPU: the 8-bit weights of streamed layers are decoded into the loader's reused buffers too (bitsandbytes' CPU
    `dequantize_blockwise` allocates every weight afresh): every sweep computes the same bits as with every layer
    kept, at prefetch 0 and 2, and at most the weights of the `prefetch + 1` layers in flight are ever decoded into
    buffers of their own."""
    config = _models.make_config("llama", num_hidden_layers=4, **FIDELITY_CONFIG)
    ckpt = _models.save_tiny_checkpoint(config, tmp_path / "ckpt", dtype=dtype, max_shard_size="1MB")
    shards = split_checkpoint(ckpt, tmp_path / "q8", compression="8bit", progress=False)
    per_layer = sum(t.quant is not None for t in ShardDirectory(shards).unit("layers.0").tensors.values())
    ids = torch.randint(4, 120, (1, 12), generator=torch.Generator().manual_seed(2))
    expected = _kept_logits(ckpt, shards, ids)
    for prefetch in (0, 2):
        model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=prefetch)
        loader = get_streaming_state(model).loader
        assert loader.prefetch == prefetch
        for _ in range(3):
            assert torch.equal(_logits(model, ids), expected), prefetch
        loader.wait_idle()  # (the next sweep's first layers, decoded as the head ran)
        # the weights of the layers in flight at once, at most: 4 layers a sweep made 3 * 4 * 7 without reuse
        assert 0 < loader._decoded.made <= (prefetch + 1) * per_layer, prefetch
        disable_layer_streaming(model)


def test_a_layer_that_fails_to_decode_gives_back_the_buffers_it_took(tmp_path, monkeypatch):
    """A streamed layer whose decoding fails part way (here its third weight) gives back the buffers its first weights
    took: the pool lends none after the error (each would otherwise stay held by it, a layer's decoded weights lost at
    every failure), and the next pass, the failure gone, computes the kept model's bits."""
    from hf_layerstream import quant

    config = _models.make_config("llama", num_hidden_layers=3, **FIDELITY_CONFIG)
    ckpt = _models.save_tiny_checkpoint(config, tmp_path / "ckpt", dtype=torch.bfloat16, max_shard_size="1MB")
    shards = split_checkpoint(ckpt, tmp_path / "q4", compression="4bit", progress=False)
    ids = torch.randint(4, 120, (1, 12), generator=torch.Generator().manual_seed(3))
    expected = _kept_logits(ckpt, shards, ids)
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=0)
    loader = get_streaming_state(model).loader
    decode = quant.dequantize_tensor
    calls = []

    def fail_third(*args, **kwargs):
        calls.append(None)
        if len(calls) == 3:
            raise RuntimeError("a decode that fails")
        return decode(*args, **kwargs)

    monkeypatch.setattr(quant, "dequantize_tensor", fail_third)
    with pytest.raises(Exception, match="a decode that fails"):
        _logits(model, ids)
    loader.wait_idle()
    assert len(calls) >= 3 and loader._decoded._lent == {}
    monkeypatch.setattr(quant, "dequantize_tensor", decode)
    assert torch.equal(_logits(model, ids), expected)
    disable_layer_streaming(model)


def test_double_quant_shards_are_smaller_and_stream_exactly_their_weights(bf16_checkpoint, tmp_path, capsys):
    """`double_quant=True` (`--double-quant`): the block scales quantized too, the layer files about 8% smaller than
    plain 4-bit's; under every plan the streamed model computes exactly what the loaded model computes with each
    quantized weight replaced by its double-quantized decoding."""
    from hf_layerstream.quant import QuantScheme

    ckpt, dirs = bf16_checkpoint
    assert main(["split", str(ckpt), str(tmp_path / "dq"), "--compression", "4bit", "--double-quant", "--quiet"]) == 0
    shards, single = ShardDirectory(tmp_path / "dq"), ShardDirectory(dirs["4bit"])
    assert shards.compression == {**single.compression, "double_quant": True}
    # the model card says so, without parentheses nested in its own ("scales quantized too (double quantization)")
    card = (tmp_path / "dq" / "README.md").read_text()
    assert "with bitsandbytes (nf4, blocks of 64, double-quantized scales; lossy)" in card, card
    for i in range(shards.num_layers):
        ratio = shards.unit(f"layers.{i}").size / single.unit(f"layers.{i}").size
        assert 0.85 < ratio < 0.95, f"layer {i}: {ratio:.3f}"
    records = {n: t.quant for i in range(shards.num_layers) for n, t in shards.unit(f"layers.{i}").tensors.items()}
    quantized = {n for n, quant in records.items() if quant}
    assert quantized and all(records[n]["double_quant"] is True for n in quantized)

    reference = _through_the_codec(ckpt, quantized, QuantScheme(4, double_quant=True))
    ids = torch.randint(4, 120, (1, 20), generator=torch.Generator().manual_seed(1))
    expected = _logits(reference, ids)
    assert not torch.equal(expected, _logits(streamed_model(ckpt, dirs["4bit"]), ids))  # (not plain 4-bit's)
    for kwargs in ({}, {"max_memory": {"cpu": 0}, "prefetch": 0}, {"max_memory": {"cpu": 0}, "prefetch": 2}):
        assert torch.equal(_logits(streamed_model(ckpt, tmp_path / "dq", **kwargs), ids), expected), kwargs

    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "dq"), "--device", "cpu"]) == 0
    assert "double_quant=True" in capsys.readouterr().out
    # with 8-bit, or without compression, it is refused before anything is written
    with pytest.raises(ValueError, match="applies to 4-bit quantization only"):
        split_checkpoint(ckpt, tmp_path / "x", compression="8bit", double_quant=True, progress=False)
    with pytest.raises(ValueError, match="pass compression='4bit' as well"):
        split_checkpoint(ckpt, tmp_path / "y", double_quant=True, progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_manifest_edit_of_double_quant_is_named(bf16_checkpoint, tmp_path):
    """The manifest's `compression` says whether the scales are quantized as its tensors' records do: an edit either
    way is named at open (as one of `bits` or `blocksize` is), not read on."""
    from hf_layerstream.errors import ShardFileError

    ckpt, dirs = bf16_checkpoint
    dq = split_checkpoint(ckpt, tmp_path / "dq", compression="4bit", double_quant=True, progress=False)
    plain = split_checkpoint(ckpt, tmp_path / "plain", compression="4bit", progress=False)
    for shards, edit, stored in (
        (dq, lambda c: c.pop("double_quant"), "true"),
        (plain, lambda c: c.update(double_quant=True), "false"),
    ):
        manifest = json.loads((shards / "manifest.json").read_text())
        edit(manifest["compression"])
        (shards / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(
            ShardFileError, match=rf'quantized tensors are stored with {stored}.*"double_quant" back to {stored}'
        ):
            ShardDirectory(shards)


def test_default_prefetch_is_by_device_and_compression(bf16_checkpoint, capsys):
    """Without `prefetch`: 3 on CPU with full-precision shards (two map threads, one more layer queued), 2 with
    quantized shards; on CUDA as many layers as hold `CUDA_AHEAD_BYTES` as stored (what crosses to the device), from 2
    to `CUDA_MAX_PREFETCH`. `inspect` plans with the same default."""
    from hf_layerstream import disable_layer_streaming
    from hf_layerstream.stream import CUDA_AHEAD_BYTES, CUDA_MAX_PREFETCH, default_prefetch

    cuda = torch.device("cuda", 0)
    mib = 2**20
    assert CUDA_AHEAD_BYTES == 320 * mib and CUDA_MAX_PREFETCH == 8
    for stored, expected in ((90 * mib, 4), (80 * mib, 4), (79 * mib, 5), (160 * mib, 2), (2 * 2**30, 2), (mib, 8)):
        # (the largest layer counts: one of 1 MiB beside it changes nothing)
        shards = shaped_shard_dir(3, 4 * stored, 0, stored=stored)
        assert default_prefetch(cuda, shards) == expected, stored
        shards.unit("layers.1").size = mib
        assert default_prefetch(cuda, shards) == expected

    ckpt, dirs = bf16_checkpoint
    for compression, expected in (("none", 3), ("4bit", 2)):
        model = streamed_model(ckpt, dirs[compression], max_memory={"cpu": 0})
        state = get_streaming_state(model)
        assert default_prefetch(torch.device("cpu"), ShardDirectory(dirs[compression])) == expected
        # (3 layers: at most 2 are read ahead, and the plan says so, as it counts them)
        assert state.plan.prefetch == state.loader.prefetch == min(expected, 2)
        disable_layer_streaming(model)
        assert main(["inspect", str(dirs[compression]), "--json", "--device", "cpu", "--max-memory", "cpu=0"]) == 0
        assert json.loads(capsys.readouterr().out)["plan"]["prefetch"] == min(expected, 2)
        assert default_prefetch(cuda, ShardDirectory(dirs[compression])) == CUDA_MAX_PREFETCH  # (tiny layers)


def test_a_directory_of_one_scheme_is_never_taken_for_another(bf16_checkpoint, tmp_path):
    ckpt, _ = bf16_checkpoint
    target = split_checkpoint(ckpt, tmp_path / "d", compression="4bit", progress=False)
    with pytest.raises(ShardDirError, match="other options"):
        split_checkpoint(ckpt, target, compression="8bit", progress=False)
    with pytest.raises(ShardDirError, match="other options"):
        split_checkpoint(ckpt, target, progress=False)  # full precision requested, 4-bit present
    split_checkpoint(ckpt, target, compression="8bit", overwrite=True, progress=False)
    assert ShardDirectory(target).compression["bits"] == 8


def test_bad_compression_arguments(tmp_path, bf16_checkpoint):
    ckpt, _ = bf16_checkpoint
    with pytest.raises(ValueError, match="compression"):
        split_checkpoint(ckpt, tmp_path / "x", compression="3bit")
    with pytest.raises(ValueError, match="quant_type"):
        split_checkpoint(ckpt, tmp_path / "y", quant_type="nf4")  # without compression
    # (bitsandbytes quantizes float32/16 and bfloat16 only: the split stored every weight unquantized, named 4-bit)
    with pytest.raises(ValueError, match=r"`dtype` float64 would leave every weight unquantized"):
        split_checkpoint(ckpt, tmp_path / "z", compression="4bit", dtype="float64")
    assert not any((tmp_path / d).exists() for d in "xyz")


def test_compression_of_a_float64_checkpoint_is_refused_as_a_float64_dtype_is(tmp_path):
    """A checkpoint stored in float64 (its config says so), split with `compression` and no `dtype`: bitsandbytes
    quantizes none of its weights, and the split stored them all at full precision under a manifest saying 4-bit,
    silently (a `dtype="float64"` was refused); so were they under a config saying bfloat16. Refused alike, naming the
    fix; with `dtype` bfloat16 it quantizes."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", dtype=torch.float64)
    assert json.loads((ckpt / "config.json").read_text())["dtype"] == "float64"
    with pytest.raises(ValueError, match=r"the checkpoint's float64 would leave every weight unquantized\. Pass one"):
        split_checkpoint(ckpt, tmp_path / "4bit", compression="4bit")
    assert not (tmp_path / "4bit").exists()
    shards = ShardDirectory(split_checkpoint(ckpt, tmp_path / "4bit", compression="4bit", dtype="bfloat16"))
    assert any(t.quant for u in shards.manifest.units.values() for t in u.tensors.values())
    # stored in float64 under a config saying bfloat16 (what `from_pretrained` loads it at): refused alike, naming it
    config = json.loads((ckpt / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"stores weights in float64, which it would leave unquantized\. Pass `dtype`"):
        split_checkpoint(ckpt, tmp_path / "bf16-config", compression="4bit")
    assert not (tmp_path / "bf16-config").exists()


def test_moe_experts_are_quantized_and_run(tmp_path):
    """Fused 3-D expert tensors are quantized; the model still tracks full precision."""
    config = _models.make_config(
        "qwen3_moe", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=256
    )
    ckpt = _models.save_tiny_checkpoint(config, tmp_path / "ckpt", dtype=torch.bfloat16, max_shard_size="2MB")
    shards = split_checkpoint(ckpt, tmp_path / "shards", compression="8bit", progress=False)
    entry = ShardDirectory(shards).unit("layers.0").tensors["model.layers.0.mlp.experts.gate_up_proj"]
    assert entry.quant is not None and len(entry.shape) == 3
    ids = torch.randint(4, 120, (1, 32), generator=torch.Generator().manual_seed(2))
    ref = _logits(_models.load_reference(ckpt, dtype=torch.bfloat16), ids)
    got = _logits(streamed_model(ckpt, shards, max_memory={"cpu": 0}), ids)
    assert _cosine(got, ref) >= 0.995


def test_a_weight_with_inf_or_nan_is_stored_unquantized_with_a_warning(tmp_path, caplog):
    """Block-wise scales cannot hold inf / NaN: such a weight is stored as it is, with a warning naming it, and the
    split goes on (it stopped with an error advising to keep the tensor unquantized, which no option allowed)."""
    model = _models.build_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
        model.model.layers[2].self_attn.q_proj.weight[0, 1] = float("inf")
    model.save_pretrained(tmp_path / "ckpt")
    _models.make_tokenizer().save_pretrained(tmp_path / "ckpt")
    with caplog.at_level("WARNING", logger="hf_layerstream"):
        shards = split_checkpoint(tmp_path / "ckpt", tmp_path / "shards", compression="4bit", progress=False)
    assert "model.layers.1.mlp.up_proj.weight holds inf or NaN values; it is stored unquantized" in caplog.text
    assert "model.layers.2.self_attn.q_proj.weight holds inf or NaN values; it is stored unquantized" in caplog.text
    assert caplog.text.count("holds inf or NaN values") == 2
    layer = ShardDirectory(shards).unit("layers.1").tensors
    assert layer["model.layers.1.mlp.up_proj.weight"].quant is None
    assert layer["model.layers.1.mlp.down_proj.weight"].quant is not None
    assert ShardDirectory(shards).unit("layers.2").tensors["model.layers.2.self_attn.q_proj.weight"].quant is None
    caplog.clear()
    with caplog.at_level("INFO", logger="hf_layerstream"):  # (not taken for a split of an earlier rule)
        split_checkpoint(tmp_path / "ckpt", shards, compression="4bit", progress=False)
    assert "already holds this split; nothing to do" in caplog.text


def test_a_weight_made_inf_by_a_float16_cast_is_named_with_the_dtype_that_keeps_it(tmp_path, caplog):
    """A checkpoint of finite weights, one beyond float16's range: split at `dtype` float16, the cast makes it inf and
    it is stored unquantized. The warning said only that it "holds inf or NaN values", sending the user to look for
    them in a checkpoint that holds none; it names the cast and `dtype='bfloat16'`."""
    model = _models.build_tiny_model("llama", num_hidden_layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = 1e5
    model.save_pretrained(tmp_path / "ckpt")
    _models.make_tokenizer().save_pretrained(tmp_path / "ckpt")
    with caplog.at_level("WARNING", logger="hf_layerstream"):
        split_checkpoint(tmp_path / "ckpt", tmp_path / "shards", compression="4bit", dtype="float16", progress=False)
    assert "model.layers.1.mlp.up_proj.weight holds inf or NaN values; it is stored unquantized" in caplog.text
    assert "float16 holds values up to 65504" in caplog.text and "`dtype='bfloat16'`" in caplog.text, caplog.text


def test_a_weight_whose_scales_average_past_float32_is_stored_unquantized_with_double_quant(tmp_path, caplog):
    """Double quantization stores the block scales less their mean, which bitsandbytes takes in float32: a weight of
    finite values whose scales sum past float32's range (3e37 over 128 blocks) got an offset of inf. The split wrote
    it (`Infinity` in manifest.json, not JSON) and streaming failed at its layer, the record called damaged, where the
    loaded model runs. It is stored unquantized, with a warning naming it and why, as a weight holding inf is."""
    model = _models.build_tiny_model("llama", num_hidden_layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.fill_(3e37)
    model.save_pretrained(tmp_path / "ckpt")
    _models.make_tokenizer().save_pretrained(tmp_path / "ckpt")
    with caplog.at_level("WARNING", logger="hf_layerstream"):
        shards = split_checkpoint(
            tmp_path / "ckpt", tmp_path / "shards", compression="4bit", double_quant=True, progress=False
        )
    assert "model.layers.1.mlp.up_proj.weight: its block scales average past float32's range" in caplog.text
    assert "it is stored unquantized" in caplog.text and "holds inf or NaN" not in caplog.text
    layer = ShardDirectory(shards).unit("layers.1").tensors
    assert layer["model.layers.1.mlp.up_proj.weight"].quant is None
    assert layer["model.layers.1.mlp.down_proj.weight"].quant is not None
    assert "Infinity" not in (shards / "manifest.json").read_text()
    with torch.no_grad():
        streamed_model(tmp_path / "ckpt", shards)(torch.tensor([[5, 6, 7]]))  # (it failed at layer 1)
    caplog.clear()
    with caplog.at_level("INFO", logger="hf_layerstream"):  # (not taken for a split of an earlier rule)
        split_checkpoint(tmp_path / "ckpt", shards, compression="4bit", double_quant=True, progress=False)
    assert "already holds this split; nothing to do" in caplog.text


def test_weights_stored_in_another_dtype_than_loaded_are_quantized_as_loaded(tmp_path):
    """A checkpoint stored in float32 under a config saying bfloat16 (`from_pretrained(dtype="auto")` loads it at
    bfloat16, and streaming computes at that dtype by default): the split without `dtype` quantized the float32
    values, so the streamed model was not the loaded model with its weights quantized and dequantized (codes and
    scales of other values: logits 4e-2 off). Each weight is cast to the dtype it is loaded at first, as the loaded
    model holds it; the streamed logits then equal those of the loaded model whose quantized weights went through the
    codec, bit for bit, every layer kept, from the disk and per module."""
    from hf_layerstream import disable_layer_streaming
    from hf_layerstream.quant import QuantScheme

    ckpt = _models.save_tiny_checkpoint(_models.make_config("llama", **FIDELITY_CONFIG), tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["dtype"] = "bfloat16"  # (the weights stay float32 in the files)
    (ckpt / "config.json").write_text(json.dumps(config))
    shards = split_checkpoint(ckpt, tmp_path / "shards", compression="4bit", progress=False)
    directory = ShardDirectory(shards)
    scheme = QuantScheme.from_dict(directory.compression)
    quantized = {n for u in directory.manifest.units.values() for n, t in u.tensors.items() if t.quant is not None}
    assert quantized
    ref = _through_the_codec(ckpt, quantized, scheme)
    ids = torch.randint(4, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = _logits(ref, ids)
    for options in ({}, {"max_memory": {"cpu": 0}}, {"max_memory": {"cpu": 0}, "dequantize": "module"}):
        model = streamed_model(ckpt, shards, **options)
        assert torch.equal(_logits(model, ids), expected), options
        disable_layer_streaming(model)


def test_a_compression_that_quantizes_no_weight_says_so_before_the_split(tmp_path, caplog):
    """A small model at a large `blocksize`: no weight spans the 16 blocks a quantized one needs, so the split stores
    every weight at full precision under a manifest saying 8-bit, as large as without compression, without a word
    (`inspect` then showed the scheme and a ratio of 2x of bf16). It warns, naming the `blocksize` that would compress."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")  # (hidden size 64: 8192-value weights at most)
    with caplog.at_level("WARNING", logger="hf_layerstream"):
        shards = split_checkpoint(ckpt, tmp_path / "big", compression="8bit", blocksize=4096, progress=False)
    assert "`compression` 8-bit with blocks of 4096 quantizes none of this model's weights" in caplog.text
    assert "Pass a smaller `blocksize`" in caplog.text
    directory = ShardDirectory(shards)
    assert not any(t.quant for u in directory.manifest.units for t in directory.unit(u).tensors.values())
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_layerstream"):
        split_checkpoint(ckpt, tmp_path / "default", compression="8bit", progress=False)
    assert "quantizes none" not in caplog.text


def test_a_split_of_an_earlier_compression_rule_is_made_again_where_the_rule_changed(
    bf16_checkpoint, tmp_path, monkeypatch, caplog
):
    """A compressed split whose tensors an earlier hf_layerstream quantized otherwise (its rule stored MiniMax's decay
    buffers in 4 bits and DBRX's 2-D experts at full precision) was taken for the same split by a re-run: "nothing to
    do", and the model kept the old precision. The units the current rule stores otherwise are written again."""
    import hf_layerstream.split as split_mod

    ckpt, dirs = bf16_checkpoint
    current = split_mod._quantization_rule

    def earlier(model):  # another rule: layer 1's attention kept in full precision
        rule = current(model)
        return lambda name, *a, **k: False if name.startswith("model.layers.1.self_attn") else rule(name, *a, **k)

    monkeypatch.setattr(split_mod, "_quantization_rule", earlier)
    shards = split_checkpoint(ckpt, tmp_path / "s", compression="4bit", progress=False)
    assert ShardDirectory(shards).unit("layers.1").tensors["model.layers.1.self_attn.q_proj.weight"].quant is None
    files = {u: (shards / ShardDirectory(shards).unit(u).file).stat().st_mtime_ns for u in ("layers.0", "layers.1")}
    monkeypatch.setattr(split_mod, "_quantization_rule", current)
    writable = split_mod.os.access
    with monkeypatch.context() as m, caplog.at_level("INFO", logger="hf_layerstream"):  # a read-only mount: kept
        m.setattr(split_mod.os, "access", lambda p, mode: mode != split_mod.os.W_OK and writable(p, mode))
        split_checkpoint(ckpt, shards, compression="4bit", progress=False)
    assert "cannot be written to: its split is left as it is" in caplog.text
    assert ShardDirectory(shards).unit("layers.1").tensors["model.layers.1.self_attn.q_proj.weight"].quant is None
    caplog.clear()
    with caplog.at_level("INFO", logger="hf_layerstream"):
        split_checkpoint(ckpt, shards, compression="4bit", progress=False)
    assert "split under an earlier compression rule: 1 of" in caplog.text and "(layers.1)" in caplog.text
    assert "nothing to do" not in caplog.text
    again, fresh = ShardDirectory(shards), ShardDirectory(dirs["4bit"])
    for unit in fresh.manifest.units:
        assert again.unit(unit).sha256 == fresh.unit(unit).sha256, unit
    assert (shards / again.unit("layers.0").file).stat().st_mtime_ns == files["layers.0"]  # (kept, not rewritten)
    caplog.clear()
    with caplog.at_level("INFO", logger="hf_layerstream"):
        split_checkpoint(ckpt, shards, compression="4bit", progress=False)
    assert "already holds this split; nothing to do" in caplog.text


def test_a_compressed_split_without_bitsandbytes_fails_first_with_the_install_command(
    bf16_checkpoint, tmp_path, monkeypatch
):
    """bitsandbytes is an optional extra: a split asked to compress fails before writing anything, saying what to
    install (it failed in the first quantized tensor, a bare ModuleNotFoundError, leaving a lock and a progress
    record that `verify` then called an unfinished split)."""
    import sys

    ckpt, _ = bf16_checkpoint
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(
        ImportError, match=r"Splitting with `compression` needs bitsandbytes: `pip install bitsandbytes`"
    ):
        split_checkpoint(ckpt, tmp_path / "shards", compression="4bit", progress=False)
    assert not (tmp_path / "shards").exists()


def test_a_streamed_weights_refusal_names_where_its_values_can_be_read(bf16_checkpoint):
    """A streamed weight read outside its layer's pass (`.numpy()`, a computation, a move) is refused, saying where
    its values are. It said "from the layer's file in the shard directory (safetensors)" for a quantized split too,
    whose file holds the weight's packed parts (`...weight::qdata`, `::absmax`), not its values, and named neither the
    file nor the tensor: now the file and tensor where it is stored as it is computed with (a quantized split's
    norms), and for a weight stored quantized, `save_pretrained`, which writes it dequantized."""
    from safetensors import safe_open

    ckpt, dirs = bf16_checkpoint
    for compression in ("none", "4bit"):
        model = streamed_model(ckpt, dirs[compression], max_memory={"cpu": 0})
        layer = model.model.layers[1]
        file = dirs[compression] / "layers" / "00001.safetensors"
        with safe_open(file, "pt") as f:
            stored = set(f.keys())
        weight, norm = layer.mlp.down_proj.weight, layer.input_layernorm.weight
        for read in (lambda w: w.numpy(), lambda w: w + torch.ones(1), lambda w: w.to("cpu", copy=True).numpy()):
            for tensor, name in ((weight, "mlp.down_proj.weight"), (norm, "input_layernorm.weight")):
                key = f"model.layers.1.{name}"
                with pytest.raises((RuntimeError, NotImplementedError)) as info:
                    read(tensor)
                message = str(info.value)
                if key in stored:  # (its values, as streamed: named with its file)
                    assert f"tensor {key!r} of {file}" in message, message
                else:  # (packed parts only: not to be read as the weight)
                    assert compression == "4bit" and f"{key}::qdata" in stored
                    assert "layer's file" not in message and "of " + str(file) not in message, message
                    assert "`save_pretrained` writes it dequantized" in message, message
                    assert f"{file} stores it quantized" in message, message
        disable_layer_streaming(model)


def test_inspect_shows_scheme_and_ratio(bf16_checkpoint, capsys):
    _, dirs = bf16_checkpoint
    assert main(["inspect", str(dirs["4bit"]), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "bits=4" in out and "quant_type=nf4" in out
    ratio = float(out.split("ratio")[1].split("x")[0])
    assert 0.2 < ratio <= 0.30


# --- the map thread: a quantized layer's read from the disk overlaps the previous layer's decoding -------------------


def _record_stages(loader, monkeypatch, *, decode_s: float = 0.0, map_s: float = 0.0):
    """Record each map (thread, layer, start, end) and each decode (`_finish`: layer, start, end) of `loader`; each
    decode takes at least `decode_s`, each map at least `map_s` (a slow decoder or disk, so that overlap or its
    absence shows without timing luck)."""
    import threading
    import time

    maps, decodes = [], []
    real_map, real_finish = loader._map_file, loader._finish

    def map_file(header, index=-1):
        t0 = time.perf_counter()
        out = real_map(header, index)
        time.sleep(map_s)
        maps.append((threading.current_thread().name, index, t0, time.perf_counter()))
        return out

    def finish(unit, raw, index, *args, **kwargs):
        t0 = time.perf_counter()
        out = real_finish(unit, raw, index, *args, **kwargs)
        time.sleep(decode_s)
        decodes.append((index, t0, time.perf_counter()))
        return out

    monkeypatch.setattr(loader, "_map_file", map_file)
    monkeypatch.setattr(loader, "_finish", finish)
    return maps, decodes


def _streamed_from_disk(bf16_checkpoint, monkeypatch, compression="4bit"):
    """(model streaming every layer of the `compression` shards with prefetch 2, prompt ids, the logits with every
    layer kept), with the layer files taken as not in the page cache and as read from the disk by every map (a
    tmpfs, say, cannot drop anything), and the layers read ahead at enable time loaded (what is recorded afterwards
    starts with the next sweep's reads)."""
    from hf_layerstream import engine

    ckpt, dirs = bf16_checkpoint
    ids = torch.randint(4, 120, (1, 20), generator=torch.Generator().manual_seed(1))
    expected = _kept_logits(ckpt, dirs[compression], ids)
    monkeypatch.setattr(engine, "_known_cached", lambda header: False)
    monkeypatch.setattr(engine, "_read_from_disk", lambda before, after, size: True)
    model = streamed_model(ckpt, dirs[compression], max_memory={"cpu": 0}, prefetch=2)
    get_streaming_state(model).loader.wait_idle()
    return model, ids, expected


def _kept_logits(ckpt, shards, ids):
    """The logits with every layer kept (the reference), streaming disabled afterwards."""
    from hf_layerstream import disable_layer_streaming

    reference = streamed_model(ckpt, shards)
    logits = _logits(reference, ids)
    disable_layer_streaming(reference)
    return logits


def test_quantized_layers_are_read_while_the_previous_one_decodes(bf16_checkpoint, monkeypatch):
    """CPU, quantized shards not in the page cache: the map thread maps and reads layer i + 1 while the loader
    thread decodes layer i, and the output is the same bits as with every layer kept."""
    from hf_layerstream import disable_layer_streaming

    model, ids, expected = _streamed_from_disk(bf16_checkpoint, monkeypatch)
    loader = get_streaming_state(model).loader
    maps, decodes = _record_stages(loader, monkeypatch, decode_s=0.05)
    assert torch.equal(_logits(model, ids), expected)
    loader.wait_idle()
    assert maps and all(name.startswith("hf_layerstream-loader-map") for name, *_ in maps)
    assert len({name for name, *_ in maps}) == 1  # one map thread: two reads at once gain nothing while decoding
    assert {index for _, index, *_ in maps} == {0, 1, 2}
    # maps and decodes go in the same order (2, 0, 1 here: 0 and 1 of this sweep were read ahead at enable time)
    maps.sort(key=lambda m: m[2])
    decodes.sort(key=lambda d: d[1])
    assert [m[1] for m in maps] == [d[0] for d in decodes]
    overlapped = [m[1] for m, d in zip(maps[1:], decodes) if m[2] < d[2]]
    assert overlapped, f"no map began before the previous layer's decoding ended: maps {maps}, decodes {decodes}"
    threads = [t for mapper in loader._mappers for t in mapper._threads]
    disable_layer_streaming(model)
    assert threads and not [t for t in threads if t.is_alive()]


def _warm(monkeypatch, read_from_disk=lambda before, after, size: False):
    """Every layer file taken as in the page cache, and every map as having found it there (unless
    `read_from_disk` says otherwise): the test model's files are small, so the real checks could go either way."""
    from hf_layerstream import engine

    monkeypatch.setattr(engine, "_known_cached", lambda header: True)
    monkeypatch.setattr(engine, "_read_from_disk", read_from_disk)


@pytest.mark.parametrize(
    "compression, where", [("4bit", "hf_layerstream-loader_"), ("none", "MainThread")], ids=["4bit", "bf16"]
)
def test_layers_in_the_page_cache_are_mapped_where_they_are_used(bf16_checkpoint, monkeypatch, compression, where):
    """A layer already in the page cache is mapped just before its use, never ahead by a map thread (that would
    only make its pages resident earlier). Once its kept map has found it there: a quantized layer by the loader
    thread, which decodes it while the layer before computes; a layer whose tensors are its map's views as they are
    (bf16 shards, bf16 model) by the compute thread itself as its forward begins, with no hand-over, the same views
    at every use. The output stays exact."""
    ckpt, dirs = bf16_checkpoint
    ids = torch.randint(4, 120, (1, 20), generator=torch.Generator().manual_seed(1))
    expected = _kept_logits(ckpt, dirs[compression], ids)
    _warm(monkeypatch)
    model = streamed_model(ckpt, dirs[compression], max_memory={"cpu": 0}, prefetch=2)
    loader = get_streaming_state(model).loader
    loader.wait_idle()  # layers 0 and 1, read ahead at enable time, mapped by the loader thread
    asked = []
    real_ahead = loader._map_ahead
    monkeypatch.setattr(loader, "_map_ahead", lambda index, a=asked, r=real_ahead: a.append(index) or r(index))
    maps, _ = _record_stages(loader, monkeypatch)
    assert torch.equal(_logits(model, ids), expected)
    loader.wait_idle()
    assert asked == [2], asked  # only the layer not mapped before: the map thread found it in the page cache
    assert [(name[:22], index) for name, index, *_ in maps if index == 2] == [("hf_layerstream-loader_", 2)]
    del asked[:], maps[:]
    handed = []
    real_acquire = loader.acquire
    monkeypatch.setattr(loader, "acquire", lambda index: handed.append(real_acquire(index)) or handed[-1])
    for _ in range(2):
        assert torch.equal(_logits(model, ids), expected)
    loader.wait_idle()
    assert sorted(index for _, index, *_ in maps) == [0, 0, 1, 1, 2, 2] and not asked, asked
    assert all(name.startswith(where) for name, *_ in maps), maps
    if where == "MainThread":  # the kept map's own views, handed out as they are at every use
        views = {i: {t.data_ptr() for t in loader._maps[i].views.values()} for i in range(3)}
        assert [{t.data_ptr() for t in h.values()} for h in handed] == [views[i] for i in (0, 1, 2) * 2]
        assert all(handed[i] is handed[i + 3] for i in range(3))
    assert loader.reads["mapped"] >= 9


def test_layers_cast_or_dropped_after_use_are_not_mapped_in_place(bf16_checkpoint, monkeypatch):
    """Mapping in the compute thread is for layers whose map is the whole load: a layer cast to the model's dtype
    (bf16 shards, float32 model) is mapped and cast by the loader thread, ahead, as is a layer the plan drops from
    the page cache after each use (its next map reads it back from the disk). Both stay exact."""
    ckpt, dirs = bf16_checkpoint
    ids = torch.randint(4, 120, (1, 20), generator=torch.Generator().manual_seed(1))
    _warm(monkeypatch)
    for kwargs in ({"dtype": torch.float32}, {"keep_in_page_cache": False}):
        reference = streamed_model(ckpt, dirs["none"], dtype=kwargs.get("dtype"))
        expected = _logits(reference, ids)
        model = streamed_model(ckpt, dirs["none"], max_memory={"cpu": 0}, prefetch=2, **kwargs)
        loader = get_streaming_state(model).loader
        maps, _ = _record_stages(loader, monkeypatch)
        for _ in range(3):
            assert torch.equal(_logits(model, ids), expected)
        loader.wait_idle()
        assert len(maps) >= 6 and all(name.startswith("hf_layerstream-loader") for name, *_ in maps), (kwargs, maps)


def test_a_layer_mapped_in_place_from_the_disk_sends_the_sweep_back_to_the_map_threads(bf16_checkpoint, monkeypatch):
    """A layer mapped in the compute thread whose map had to read it from the disk (memory pressure dropped it from
    the page cache, likely with others) sends every layer back to the map threads, and the next ones are read ahead
    at once: the rest of the sweep does not read from the disk in the compute thread. Here `cachestat` finds them in
    the page cache, so the loader thread maps them, ahead; each map that finds its layer warm returns it to being
    mapped in place."""
    import threading

    ckpt, dirs = bf16_checkpoint
    ids = torch.randint(4, 120, (1, 20), generator=torch.Generator().manual_seed(1))
    expected = _kept_logits(ckpt, dirs["none"], ids)
    state = {"armed": False, "cold_thread": None}
    _warm(monkeypatch, lambda before, after, size: state["cold_thread"] == threading.get_ident())
    model = streamed_model(ckpt, dirs["none"], max_memory={"cpu": 0}, prefetch=2)
    loader = get_streaming_state(model).loader
    for _ in range(2):  # every layer mapped once, then in place
        assert torch.equal(_logits(model, ids), expected)
    loader.wait_idle()
    maps, _ = _record_stages(loader, monkeypatch)
    real_map = loader._map_file

    def map_file(header, index=-1):  # layer 1's next map reads it from the disk
        if state["armed"] and index == 1:
            state.update(armed=False, cold_thread=threading.get_ident())
        try:
            return real_map(header, index)
        finally:
            if state["cold_thread"] == threading.get_ident():
                state["cold_thread"] = None

    monkeypatch.setattr(loader, "_map_file", map_file)
    asked = []
    real_ahead = loader._map_ahead
    monkeypatch.setattr(loader, "_map_ahead", lambda index: asked.append(index) or real_ahead(index))
    state["armed"] = True
    sweeps = []
    for _ in range(3):
        del maps[:]
        assert torch.equal(_logits(model, ids), expected)
        loader.wait_idle()
        sweeps.append(sorted((index, name.rsplit("_", 1)[0]) for name, index, *_ in maps))  # (no worker number)
    main, loader_thread = "MainThread", "hf_layerstream-loader"
    # layer 1 read from the disk in place: 2, and 0 and 1 for the next sweep, read ahead from then on
    assert sweeps[0] == [(0, main), (0, loader_thread), (1, main), (1, loader_thread), (2, loader_thread)], sweeps
    assert sweeps[1] == [(2, main)], sweeps  # 0 and 1: the maps made ahead, which found them warm
    assert sweeps[2] == [(0, main), (1, main), (2, main)], sweeps
    assert sorted(asked) == [0, 1, 2]  # each went through a map thread once (which found it in the page cache)


def test_full_precision_layers_from_the_disk_are_read_two_at_once(bf16_checkpoint, monkeypatch):
    """CPU, full-precision layers not in the page cache: the map threads read two layers at once (the disk serves two
    files at once faster than one), and the output is the same bits as with every layer kept."""
    from hf_layerstream import disable_layer_streaming

    model, ids, expected = _streamed_from_disk(bf16_checkpoint, monkeypatch, "none")
    loader = get_streaming_state(model).loader
    maps, _ = _record_stages(loader, monkeypatch, map_s=0.1)
    for _ in range(2):
        assert torch.equal(_logits(model, ids), expected)
    loader.wait_idle()
    assert len(maps) == 6 and all(name.startswith("hf_layerstream-loader-map") for name, *_ in maps), maps
    assert len({name for name, *_ in maps}) == 2
    together = [(a[1], b[1]) for a in maps for b in maps if a is not b and a[2] <= b[2] < a[3]]
    assert together, f"no two maps were made at once: {maps}"
    disable_layer_streaming(model)


def test_a_layer_is_mapped_again_only_once_its_eviction_is_done(bf16_checkpoint, monkeypatch, tmp_path):
    """`keep_in_page_cache=False`, layers read by the map threads: a layer's eviction after use runs in the map thread
    that maps it next, before that map (pages still mapped would not be dropped)."""
    import shutil
    import threading
    import time

    from hf_layerstream import engine

    ckpt, dirs = bf16_checkpoint
    shards = shutil.copytree(dirs["none"], tmp_path / "shards")
    ids = torch.randint(4, 120, (1, 20), generator=torch.Generator().manual_seed(1))
    expected = _kept_logits(ckpt, shards, ids)
    monkeypatch.setattr(engine, "_known_cached", lambda header: False)
    monkeypatch.setattr(engine, "_read_from_disk", lambda before, after, size: True)
    evictions = []
    real_evict = engine._evict

    def slow_evict(path, *, whole=False):
        t0 = time.perf_counter()
        time.sleep(0.15)
        real_evict(path, whole=whole)
        evictions.append((str(path), threading.current_thread().name, t0, time.perf_counter()))

    monkeypatch.setattr(engine, "_evict", slow_evict)
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=2, keep_in_page_cache=False)
    loader = get_streaming_state(model).loader
    loader.wait_idle()
    maps, _ = _record_stages(loader, monkeypatch)
    for _ in range(2):
        assert torch.equal(_logits(model, ids), expected)
    loader.wait_idle()
    paths = {i: str(loader.shards.header(f"layers.{i}").path) for i in range(3)}
    later = 0
    for path, thread, began, evicted in evictions:
        index = next(i for i, p in paths.items() if p == path)
        assert {name for name, i, *_ in maps if i == index} == {thread}, (index, thread, maps)
        after = [start for _, i, start, _ in maps if i == index and start > began]  # (the maps after it was asked)
        assert all(start >= evicted for start in after), (index, evicted, after)
        later += len(after)
    assert len(evictions) >= 3 and later >= 3, (evictions, maps)


@pytest.mark.parametrize("failures, raises", [(1, False), (2, True)], ids=["retried", "raised"])
def test_a_failed_map_ahead_is_retried_then_names_the_layer(bf16_checkpoint, monkeypatch, failures, raises):
    """A map made ahead that failed (I/O error) is made again when the layer is needed; if that fails too, the
    caller gets the error naming the layer. Either way the next call gives the exact output."""
    from hf_layerstream import LayerLoadError
    from hf_layerstream.errors import ShardFileError

    model, ids, expected = _streamed_from_disk(bf16_checkpoint, monkeypatch)
    loader = get_streaming_state(model).loader
    real = loader._map_file
    left = {"n": failures}

    def flaky(header, index=-1):
        if index == 2 and left["n"]:
            left["n"] -= 1
            raise ShardFileError(header.path, "could not be read: Input/output error")
        return real(header, index)

    monkeypatch.setattr(loader, "_map_file", flaky)
    if raises:
        with pytest.raises(LayerLoadError, match=r"decoder layer 2 .*Input/output error"):
            _logits(model, ids)
    else:
        assert torch.equal(_logits(model, ids), expected)
    assert left["n"] == 0
    assert torch.equal(_logits(model, ids), expected)


def test_quantized_layers_leave_the_page_cache_when_the_plan_says_so(bf16_checkpoint, tmp_path):
    """`keep_in_page_cache=False` with 4-bit shards read from the disk by the map thread: the output is exact, a
    layer leaves the page cache after use (its eviction runs in the map thread), and once streaming is disabled no
    layer file is left there."""
    import shutil

    from _pagecache import cached_share, drop_from_page_cache, drop_or_skip

    from hf_layerstream import disable_layer_streaming

    ckpt, dirs = bf16_checkpoint
    shards = shutil.copytree(dirs["4bit"], tmp_path / "shards")
    files = sorted((shards / "layers").glob("*.safetensors"))
    ids = torch.randint(4, 120, (1, 20), generator=torch.Generator().manual_seed(1))
    expected = _kept_logits(ckpt, shards, ids)  # (disabled: its maps would keep the files in the page cache)
    drop_or_skip(files)
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=2, keep_in_page_cache=False)
    loader = get_streaming_state(model).loader
    for _ in range(2):
        drop_from_page_cache(files)  # (enabling read each small file's header, and read-ahead the rest of it)
        assert torch.equal(_logits(model, ids), expected)
    loader.wait_idle()
    for mapper in loader._mappers:
        mapper.submit(lambda: None).result()  # the evictions queued there before it are done
    assert loader.reads["mapped"] >= 6
    # the last layer was used and dropped; the first two are read ahead for the next call (and so still cached)
    assert loader.plan.streamed == [0, 1, 2] and cached_share(files[2]) == 0
    disable_layer_streaming(model)
    assert not any(cached_share(p) for p in files)


def test_where_layers_cannot_be_mapped_the_loader_reads_them_and_times_the_read(bf16_checkpoint, monkeypatch):
    """Mapping unavailable (as where `mmap` has no `MAP_POPULATE`): the map thread hands every layer back, the loader
    thread reads it into a buffer, and the profile's read time is that read's (not the map thread's few ms)."""
    import time

    from hf_layerstream import engine

    ckpt, dirs = bf16_checkpoint
    ids = torch.randint(4, 120, (1, 20), generator=torch.Generator().manual_seed(1))
    expected = _kept_logits(ckpt, dirs["4bit"], ids)
    monkeypatch.setattr(engine, "_known_cached", lambda header: False)
    model = streamed_model(ckpt, dirs["4bit"], max_memory={"cpu": 0}, prefetch=2, profile=True)
    state = get_streaming_state(model)
    loader = state.loader
    loader.wait_idle()
    monkeypatch.setattr(loader, "_map_file", lambda header, index=-1: None)
    real = loader._read_file

    def slow_read(header, buf, index):
        time.sleep(0.05)
        return real(header, buf, index)

    monkeypatch.setattr(loader, "_read_file", slow_read)
    assert torch.equal(_logits(model, ids), expected)  # (it uses layers 0 and 1 as mapped at enable time)
    loader.wait_idle()
    state.profile.reset()  # the next pass uses only layers read since the patches
    assert torch.equal(_logits(model, ids), expected)
    loader.wait_idle()
    assert loader.reads["page_cache"] + loader.reads["direct"] >= 3
    reads = {i: t.read for i, t in state.profile.layers.items()}
    assert all(reads[i] >= 0.05 for i in (0, 1, 2)), reads


def test_without_read_ahead_the_map_thread_is_not_used(bf16_checkpoint, tmp_path):
    """`prefetch=0` (also what a single streamed layer gets): nothing is mapped ahead, so a quantized layer's
    eviction runs in the loader thread, in order with its next map there; the map thread never starts."""
    import shutil

    from _pagecache import drop_from_page_cache

    ckpt, dirs = bf16_checkpoint
    shards = shutil.copytree(dirs["4bit"], tmp_path / "shards")
    files = sorted((shards / "layers").glob("*.safetensors"))
    ids = torch.randint(4, 120, (1, 20), generator=torch.Generator().manual_seed(1))
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=0, keep_in_page_cache=False)
    loader = get_streaming_state(model).loader
    drop_from_page_cache(files)
    _logits(model, ids)
    loader._executor.submit(lambda: None).result()  # the evictions queued there are done
    assert loader.reads["mapped"] == 3 and not [t for mapper in loader._mappers for t in mapper._threads]


def test_disable_while_maps_are_made_ahead(bf16_checkpoint, monkeypatch):
    """Disabling streaming while the map thread is reading layers ahead: it waits for them, stops both threads,
    releases every map, and enabling again gives the exact output."""
    import threading

    from hf_layerstream import disable_layer_streaming, enable_layer_streaming

    model, ids, expected = _streamed_from_disk(bf16_checkpoint, monkeypatch)
    loader = get_streaming_state(model).loader
    started, go = threading.Event(), threading.Event()
    real = loader._map_file

    def held_map(header, index=-1):  # the map thread is inside a map when streaming is disabled
        started.set()
        go.wait(5)
        return real(header, index)

    monkeypatch.setattr(loader, "_map_file", held_map)
    asked = []  # every map made ahead from here on
    for mapper in loader._mappers:
        submit = mapper.submit
        monkeypatch.setattr(mapper, "submit", lambda *a, s=submit, **k: asked.append(s(*a, **k)) or asked[-1])
    loader._schedule_after(0)  # as the forward pass over layer 0 does: layer 2 is read ahead (1 was at enable)
    assert started.wait(5)
    threading.Timer(0.2, go.set).start()
    disable_layer_streaming(model)  # returns once the held map has finished
    threads = [*loader._executor._threads, *(t for mapper in loader._mappers for t in mapper._threads)]
    assert threads and not [t for t in threads if t.is_alive()]
    assert not loader._maps and not loader._pending and asked and all(f.done() for f in asked)
    enable_layer_streaming(model, bf16_checkpoint[1]["4bit"], device="cpu", max_memory={"cpu": 0}, prefetch=2)
    assert torch.equal(_logits(model, ids), expected)
    disable_layer_streaming(model)


def _openmp_max_threads():
    """`omp_get_max_threads` of the OpenMP runtime torch loaded (the same library: its per-thread settings), or `None`
    where none is found in this process's maps."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/libgomp" in line or "/libiomp" in line or "/libomp" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path).omp_get_max_threads
        except (OSError, AttributeError):
            continue
    return None


@pytest.mark.skipif("OMP_NUM_THREADS" in __import__("os").environ, reason="the OpenMP default is set by the env")
def test_the_loader_thread_decodes_with_torchs_number_of_threads(bf16_checkpoint):
    """bitsandbytes' CPU kernel runs OpenMP directly in the loader thread, where no op of torch's had set its threads:
    it took the OpenMP default (one thread per CPU) whatever `torch.set_num_threads` said, a team that spun beside the
    compute thread's (a 4-bit `generate` under `torch.set_num_threads(1)` on a loaded 2-core VM: 1.5 s against 0.33)."""
    import os

    max_threads = _openmp_max_threads()
    if max_threads is None or (os.cpu_count() or 1) < 2:
        pytest.skip("no OpenMP runtime found, or one CPU (its default is then one thread)")
    ckpt, dirs = bf16_checkpoint
    ids = torch.tensor([[1, 5, 6, 7]])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = streamed_model(ckpt, dirs["4bit"], max_memory={"cpu": 0})
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        loader = get_streaming_state(model).loader
        assert loader._executor.submit(max_threads).result() == 1  # (the thread that decoded the layers)
    finally:
        torch.set_num_threads(before)
