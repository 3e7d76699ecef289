"""Quantized shard directories end to end: sizes, fidelity, scheme in the manifest, streaming + compression."""

from __future__ import annotations

import json

import _models
import pytest
import torch
from conftest import streamed_model

from hf_layerstream import ShardDirectory, ShardDirError, get_streaming_state, split_checkpoint
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
    for prefetch in (0, 1, 3):
        model = streamed_model(ckpt, dirs["4bit"], max_memory={"cpu": 0}, prefetch=prefetch)
        assert get_streaming_state(model).plan.streamed == [0, 1, 2]
        assert torch.equal(_logits(model, ids), resident)


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
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


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


def test_inspect_shows_scheme_and_ratio(bf16_checkpoint, capsys):
    _, dirs = bf16_checkpoint
    assert main(["inspect", str(dirs["4bit"]), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "bits=4" in out and "quant_type=nf4" in out
    ratio = float(out.split("ratio")[1].split("x")[0])
    assert 0.2 < ratio <= 0.30
