"""The public API: shard directory layout and naming, sources, clear errors before any hook, disable."""

from __future__ import annotations

import ast
import copy
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path

import _models
import pytest
import torch
from conftest import build_meta_model, run_python, streamed_model
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from hf_layerstream import (
    ShardDirectory,
    ShardDirError,
    ShardDirOccupiedError,
    ShardFileError,
    disable_layer_streaming,
    enable_layer_streaming,
    get_streaming_state,
    split_checkpoint,
)


def _tree_digest(path):
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
            h.update(str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


# --- layout -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_neox", "gpt2", "phi3"])
def test_shards_hold_the_models_own_names_and_values(checkpoints, arch):
    """Tensors are stored under the model's parameter names, exactly as from_pretrained loads them.

    Mixtral/Qwen3-MoE experts are fused into 3-D `mlp.experts.gate_up_proj`, GPT-NeoX's `embed_out` becomes
    `lm_head`; on disk the source checkpoint has other keys (see tests/_models.py).
    """
    ckpt, shards = checkpoints(arch)
    ref_sd = _models.load_reference(ckpt).state_dict()
    tied = {"lm_head.weight"} if arch == "gpt2" else set()
    manifest = json.loads((shards / "manifest.json").read_text())
    stored = {}
    for unit in manifest["units"]:
        with safe_open(shards / unit["file"], framework="pt") as f:
            for key in f.keys():
                stored[key] = f.get_tensor(key)
    assert set(stored) == set(ref_sd) - tied
    for name, value in stored.items():
        assert torch.equal(value, ref_sd[name]), name
    if arch in ("mixtral", "qwen3_moe"):
        assert stored["model.layers.0.mlp.experts.gate_up_proj"].dim() == 3
        assert not any(".experts.0." in k for k in stored)
    if arch == "gpt_neox":
        assert "lm_head.weight" in stored and "embed_out.weight" not in stored


def test_one_file_per_layer_and_manifest(checkpoints):
    ckpt, shards = checkpoints("llama")
    layer_files = sorted(p.name for p in (shards / "layers").iterdir())
    assert layer_files == ["00000.safetensors", "00001.safetensors", "00002.safetensors"]
    m = json.loads((shards / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["num_layers"] == 3 and m["layers_prefix"] == "model.layers"
    assert m["source"]["kind"] == "local" and m["dtype"] == "float32" and m["compression"] is None
    assert len(m["fingerprint"]) == 64
    for unit in m["units"]:
        data = (shards / unit["file"]).read_bytes()
        assert unit["size"] == len(data)
        assert unit["sha256"] == hashlib.sha256(data).hexdigest()
    resident = next(u for u in m["units"] if u["name"] == "resident")
    assert set(resident["tensors"]) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    # side files make the directory usable on its own
    assert AutoConfig.from_pretrained(shards).num_hidden_layers == 3
    assert len(AutoTokenizer.from_pretrained(shards)) == len(AutoTokenizer.from_pretrained(ckpt))
    assert not (shards / ".progress.json").exists()
    assert ShardDirectory(shards).verify() == []


@pytest.mark.parametrize("name", ["vocab.txt", "sentencepiece.bpe.model", "tiktoken.model"])
def test_split_copies_other_tokenizers_files(tmp_path, name):
    """WordPiece (`vocab.txt`), XLM-R-style SentencePiece and tiktoken files travel with the split too, so
    `AutoTokenizer.from_pretrained(shard_dir)` finds them."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    (ckpt / name).write_bytes(b"a tokenizer's file\n")
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    assert (shards / name).read_bytes() == b"a tokenizer's file\n"


def test_the_checkpoints_generation_config_is_the_streamed_models_as_from_pretrained_loads_it(tmp_path):
    """`generation_config.json` (an extra end-of-turn id, sampling defaults: what instruct models keep there only)
    applies to the streamed model as `from_pretrained` applies it: `generate` with no settings of its own gives the
    same tokens. A generation config the caller changed stays, and disabling streaming puts the model's back."""
    from transformers import GenerationConfig

    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    GenerationConfig(bos_token_id=1, eos_token_id=[2, 90], pad_token_id=0, repetition_penalty=1.3).save_pretrained(ckpt)
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    ref = _models.load_reference(ckpt)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    expected = ref.generate(ids, max_new_tokens=8, do_sample=False)
    model = build_meta_model(AutoConfig.from_pretrained(shards))
    own = model.generation_config
    config_only = ref.generate(ids, generation_config=own, max_new_tokens=8)
    assert not torch.equal(config_only, expected)  # (the premise: the file's settings change the tokens)
    enable_layer_streaming(model, shards, device="cpu", max_memory={"cpu": 0})
    assert model.generation_config.eos_token_id == [2, 90] and model.generation_config.repetition_penalty == 1.3
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), expected)
    disable_layer_streaming(model)
    assert model.generation_config is own
    own.max_new_tokens = 3  # the caller's change: kept
    enable_layer_streaming(model, shards, device="cpu", max_memory={"cpu": 0})
    assert model.generation_config is own and own.repetition_penalty is None
    disable_layer_streaming(model)


@pytest.mark.parametrize("changed", [False, True], ids=["unchanged", "changed"])
def test_the_checkpoints_generation_config_applies_without_transformers_private_marks(tmp_path, changed):
    """transformers marks the generation config `from_config` derives (`_from_model_config`, `_original_object_hash`):
    in a release without those private marks, one equal to the config's own is still taken as unchanged and the
    checkpoint's `generation_config.json` applies (it was dropped silently: other tokens than `from_pretrained`'s
    model), and one the caller changed still stays."""
    from transformers import GenerationConfig

    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    GenerationConfig(bos_token_id=1, eos_token_id=[2, 90], pad_token_id=0, repetition_penalty=1.3).save_pretrained(ckpt)
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    model = build_meta_model(AutoConfig.from_pretrained(shards))
    own = model.generation_config
    for mark in ("_from_model_config", "_original_object_hash"):
        own.__dict__.pop(mark, None)
    assert not hasattr(own, "_original_object_hash")
    if changed:
        own.max_new_tokens = 3
    enable_layer_streaming(model, shards, device="cpu", max_memory={"cpu": 0})
    if changed:
        assert model.generation_config is own and own.repetition_penalty is None
    else:
        assert model.generation_config.eos_token_id == [2, 90] and model.generation_config.repetition_penalty == 1.3
    disable_layer_streaming(model)
    assert model.generation_config is own


def test_an_unreadable_generation_config_leaves_the_models_own_with_a_warning(tmp_path, caplog):
    """A shard directory's `generation_config.json` that is not valid JSON (a torn copy, an edit gone wrong) is what
    `from_pretrained` falls back from, logging it: the model keeps the generation config made from its config, and the
    warning names the file, instead of `enable_layer_streaming` failing."""
    import logging

    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    (shards / "generation_config.json").write_text('{"eos_token_id": [2, 90],')  # cut short
    model = build_meta_model(AutoConfig.from_pretrained(shards))
    own = model.generation_config
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        enable_layer_streaming(model, shards, device="cpu", max_memory={"cpu": 0})
    try:
        assert model.generation_config is own
        assert str(shards / "generation_config.json") in caplog.text and "could not be read" in caplog.text
        ids = torch.tensor([[1, 5, 7, 9, 11]])
        assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 9)
    finally:
        disable_layer_streaming(model)
    assert model.generation_config is own


def test_split_copies_the_files_its_tokenizer_class_reads_and_named_chat_templates(tmp_path, monkeypatch):
    """Files a tokenizer's class reads beyond the usual names (GPT-NeoX-Japanese's `emoji.json`, named in its
    `vocab_files_names`) and the named chat templates in `additional_chat_templates/` travel with the split too, from a
    local folder and from the hub cache: `AutoTokenizer.from_pretrained(shard_dir)` raised for the first before, and
    lost the second."""
    from huggingface_hub import constants
    from transformers import GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM, GPTNeoXJapaneseTokenizer

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    words = ["<|endoftext|>", "<|startoftext|>", "<|padding|>", "<|byte0|>", *"abcdefghijklmnopqrstuvwxyz ", "世界"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    (tmp_path / "emoji.json").write_text(json.dumps({"emoji": {}, "emoji_inv": {}}))
    tok = GPTNeoXJapaneseTokenizer(str(tmp_path / "vocab.txt"), str(tmp_path / "emoji.json"))
    tok.chat_template = {"default": "{{ messages[0].content }}", "tool_use": "tool: {{ messages[0].content }}"}
    tok.save_pretrained(ckpt)
    assert (ckpt / "emoji.json").is_file() and (ckpt / "additional_chat_templates" / "tool_use.jinja").is_file()
    config = GPTNeoXJapaneseConfig(
        vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_multiple_size=2
    )
    torch.manual_seed(0)
    GPTNeoXJapaneseForCausalLM(config).save_pretrained(ckpt)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _fake_hub_cache(tmp_path / "cache", "tiny-org/neox-ja", ckpt)
    for i, source in enumerate((ckpt, "tiny-org/neox-ja")):
        shards = split_checkpoint(source, tmp_path / f"shards{i}", cache_dir=tmp_path / "cache", progress=False)
        assert (shards / "emoji.json").read_bytes() == (ckpt / "emoji.json").read_bytes()
        loaded = AutoTokenizer.from_pretrained(shards)
        assert type(loaded) is GPTNeoXJapaneseTokenizer
        assert loaded("世界 abc").input_ids == tok("世界 abc").input_ids
        assert loaded.chat_template == tok.chat_template
    # a copy killed half way leaves its temporary file beside the templates: the next split takes it away, as it does
    # in the shard directory itself and in `layers/` (it was left there for good)
    from hf_layerstream._safetensors import TMP_MARKER

    stale = shards / "additional_chat_templates" / f".tool_use.jinja{TMP_MARKER}12345"
    stale.write_text("half")
    split_checkpoint(ckpt, shards, progress=False, overwrite=True)
    assert not stale.exists() and (shards / "additional_chat_templates" / "tool_use.jinja").is_file()


def test_split_copies_the_versioned_tokenizer_file_that_tokenizer_config_names(tmp_path, monkeypatch):
    """A tokenizer_config.json listing `fast_tokenizer_files` has transformers read `tokenizer.<version>.json` instead
    of `tokenizer.json`: the split copies those files, from a local folder and from the hub cache. Without them the
    shard directory's tokenizer loaded without complaint and encoded text to no ids."""
    from huggingface_hub import constants

    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    _models.save_metaspace_tokenizer(ckpt)
    (ckpt / "tokenizer.json").rename(ckpt / "tokenizer.4.0.0.json")
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["fast_tokenizer_files"] = ["tokenizer.4.0.0.json", "../tokenizer.9.json"]  # (names only are copied)
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.9.json").write_text("{}")  # (what the path names, next to the checkpoint)
    expected = AutoTokenizer.from_pretrained(ckpt)("hello world").input_ids
    assert len(expected) > 2
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _fake_hub_cache(tmp_path / "cache", "tiny-org/versioned-tok", ckpt)
    for i, source in enumerate((ckpt, "tiny-org/versioned-tok")):
        shards = split_checkpoint(source, tmp_path / f"out{i}" / "shards", cache_dir=tmp_path / "cache", progress=False)
        assert (shards / "tokenizer.4.0.0.json").read_bytes() == (ckpt / "tokenizer.4.0.0.json").read_bytes()
        assert not (shards.parent / "tokenizer.9.json").exists()
        assert AutoTokenizer.from_pretrained(shards)("hello world").input_ids == expected


def test_split_never_modifies_the_source_and_shows_progress(tmp_path, capsys, monkeypatch):
    from hf_layerstream import split as split_mod

    ckpt = _models.save_tiny_checkpoint("qwen2", tmp_path / "ckpt")
    before = _tree_digest(ckpt)
    monkeypatch.setattr(split_mod, "_bars_disabled", lambda: False)  # conftest silences HF progress bars
    split_checkpoint(ckpt, tmp_path / "shards", progress=True)
    assert _tree_digest(ckpt) == before
    assert "Splitting" in capsys.readouterr().err
    split_checkpoint(ckpt, tmp_path / "quiet", progress=False)
    assert "Splitting" not in capsys.readouterr().err
    # a second run finds the directory complete and does nothing
    stamp = (tmp_path / "shards" / "manifest.json").stat().st_mtime_ns
    split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    assert (tmp_path / "shards" / "manifest.json").stat().st_mtime_ns == stamp


def test_a_folder_that_holds_no_shard_directory_is_not_written_over_unless_asked(tmp_path):
    """A non-empty folder that is no shard directory (another model's checkpoint, here): the split wrote its
    `config.json` and tokenizer files over the checkpoint's, which then said another model. Refused before anything is
    written, naming what is there; `overwrite=True` writes the split there, leaving the files of other names."""
    from hf_layerstream import ShardDirOccupiedError

    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    other = _models.save_tiny_checkpoint("gpt2", tmp_path / "other")
    before = _tree_digest(other)
    with pytest.raises(
        ShardDirOccupiedError, match=r"is not empty and holds no shard directory \(chat_template\.jinja, config\.json, "
    ):
        split_checkpoint(ckpt, other, progress=False)
    assert _tree_digest(other) == before
    # an empty folder, one left with our lock only (a split killed as it began), or with hidden files only, is taken
    (tmp_path / "empty").mkdir()
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / ".lock").touch()
    (tmp_path / "locked" / ".DS_Store").touch()
    for folder in ("empty", "locked"):
        split_checkpoint(ckpt, tmp_path / folder, progress=False)
        assert ShardDirectory(tmp_path / folder).num_layers == _models.NUM_HIDDEN_LAYERS
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.txt").write_text("mine")
    with pytest.raises(ShardDirOccupiedError, match=r"\(README\.txt\)"):
        split_checkpoint(ckpt, notes, progress=False)
    split_checkpoint(ckpt, notes, progress=False, overwrite=True)
    assert (notes / "README.txt").read_text() == "mine" and ShardDirectory(
        notes
    ).num_layers == _models.NUM_HIDDEN_LAYERS


def test_interrupted_split_resumes_without_redoing_layers(tmp_path, monkeypatch):
    from hf_layerstream import split as split_mod

    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", num_hidden_layers=4)
    real_write = split_mod._write_unit
    calls = []

    def failing_write(shard_dir, unit, *args, **kwargs):
        if unit == "layers.2":
            raise KeyboardInterrupt  # the user pressed Ctrl-C in the middle
        calls.append(unit)
        return real_write(shard_dir, unit, *args, **kwargs)

    monkeypatch.setattr(split_mod, "_write_unit", failing_write)
    with pytest.raises(KeyboardInterrupt):
        split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    assert calls == ["layers.0", "layers.1"]
    with pytest.raises(
        ShardDirError, match=r"directory; it holds an unfinished split: run the same split again to finish it\.$"
    ):
        ShardDirectory(tmp_path / "shards")
    calls.clear()
    monkeypatch.setattr(split_mod, "_write_unit", lambda *a, **k: calls.append(a[1]) or real_write(*a, **k))
    split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    assert calls == ["layers.2", "layers.3", "resident"]
    ref = _models.load_reference(ckpt)
    model = streamed_model(ckpt, tmp_path / "shards")
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def _interrupt_at(monkeypatch, unit):
    """Make the split raise KeyboardInterrupt as it is about to write `unit`; returns the function that undoes it."""
    from hf_layerstream import split as split_mod

    real_write = split_mod._write_unit

    def failing_write(shard_dir, name, *args, **kwargs):
        if name == unit:
            raise KeyboardInterrupt
        return real_write(shard_dir, name, *args, **kwargs)

    monkeypatch.setattr(split_mod, "_write_unit", failing_write)
    return lambda: monkeypatch.setattr(split_mod, "_write_unit", real_write)


def test_a_checkpoint_saved_again_in_place_is_not_resumed_into(tmp_path, monkeypatch):
    """A split interrupted, then the source folder overwritten by another checkpoint of the same architecture (a
    newer fine-tune saved to the same path: same file names, sizes and headers): resuming would mix two models'
    layers. It is refused, naming the fix; the same checkpoint resumes."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", num_hidden_layers=4)
    restore = _interrupt_at(monkeypatch, "layers.2")
    with pytest.raises(KeyboardInterrupt):
        split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    restore()
    _models.save_tiny_checkpoint("llama", ckpt, num_hidden_layers=4, seed=1)  # other weights, same shapes
    with pytest.raises(ShardDirError, match="unfinished split of another model, another source checkpoint"):
        split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    split_checkpoint(ckpt, tmp_path / "shards", progress=False, overwrite=True)
    assert _exact(ckpt, tmp_path / "shards")


def test_a_refused_split_says_what_differs_from_the_one_there(tmp_path, monkeypatch):
    """A split refused because the folder holds another one (finished or not) said "another model, another source
    checkpoint or with other options" and no more: which one was for the user to guess (a copy of the source at
    another path, `--dtype float32` given for a float32 split made without it). It names what differs."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    out = tmp_path / "shards"
    split_checkpoint(ckpt, out, progress=False)
    copy = shutil.copytree(ckpt, tmp_path / "copy")
    wider = _models.save_tiny_checkpoint("llama", tmp_path / "wider", num_hidden_layers=4)
    cases = [
        ({"source": copy}, f"(what differs: the source: {ckpt} there, {copy} given)."),
        ({"dtype": "float32"}, "(what differs: `dtype` not given (the checkpoint's) there, float32 asked)."),
        ({"compression": "8bit"}, "(what differs: compression none there, 8-bit blockwise, blocks of 256 asked)."),
        (
            {"source": wider},
            "(what differs: the model's architecture (other layers, tensor names or shapes); the source",
        ),
    ]
    for kwargs, difference in cases:
        source = kwargs.pop("source", ckpt)
        with pytest.raises(ShardDirOccupiedError) as refused:
            split_checkpoint(source, out, progress=False, **kwargs)
        assert "already holds a split of another model" in str(refused.value)
        assert difference in refused.value.problem, refused.value.problem
    cast = split_checkpoint(ckpt, tmp_path / "cast", progress=False, dtype="bfloat16")
    with pytest.raises(
        ShardDirOccupiedError, match=r"\(what differs: `dtype` bfloat16 there, not given \(the checkpoint"
    ):
        split_checkpoint(ckpt, cast, progress=False)
    # the source saved again in place (other weights, same shapes): only the digest of the options tells
    _models.save_tiny_checkpoint("llama", ckpt, seed=1)
    with pytest.raises(
        ShardDirOccupiedError, match=r"\(what differs: the source's weight files \(another checkpoint at"
    ):
        split_checkpoint(ckpt, out, progress=False)
    # an unfinished one: its progress record keeps every option
    restore = _interrupt_at(monkeypatch, "layers.1")
    with pytest.raises(KeyboardInterrupt):
        split_checkpoint(ckpt, tmp_path / "half", progress=False)
    restore()
    with pytest.raises(
        ShardDirOccupiedError, match=r"unfinished split .*\(what differs: `dtype` not given .* float16 asked\)"
    ):
        split_checkpoint(ckpt, tmp_path / "half", progress=False, dtype="float16")
    with pytest.raises(
        ShardDirOccupiedError, match=rf"unfinished split .*\(what differs: the source: {re.escape(str(ckpt))} there"
    ):
        split_checkpoint(copy, tmp_path / "half", progress=False)


def test_an_overwrite_leaves_no_side_file_of_the_split_it_replaces(tmp_path):
    """`overwrite=True` from a source without a chat template or generation config into a directory holding a split
    of one with them: the replaced split's copies go too (the tokenizer would load the old chat template, and
    streaming the old generation config)."""
    with_them = _models.save_tiny_checkpoint("llama", tmp_path / "a", num_hidden_layers=2)
    tok = _models.make_tokenizer()
    tok.chat_template = {"default": "{{ messages[0].content }}", "tool_use": "tool: {{ messages[0].content }}"}
    tok.save_pretrained(with_them)
    without = _models.save_tiny_checkpoint("llama", tmp_path / "b", num_hidden_layers=2, seed=1)
    for name in ("chat_template.jinja", "generation_config.json"):
        (without / name).unlink(missing_ok=True)
    (with_them / "tokenizer.4.0.0.json").write_bytes((with_them / "tokenizer.json").read_bytes())
    config = json.loads((with_them / "tokenizer_config.json").read_text())
    (with_them / "tokenizer_config.json").write_text(
        json.dumps({**config, "fast_tokenizer_files": ["tokenizer.4.0.0.json"]})
    )
    shards = split_checkpoint(with_them, tmp_path / "shards", progress=False)
    assert (shards / "generation_config.json").is_file() and (shards / "tokenizer.4.0.0.json").is_file()
    assert (shards / "additional_chat_templates" / "tool_use.jinja").is_file()
    split_checkpoint(without, shards, progress=False, overwrite=True)
    gone = ("chat_template.jinja", "generation_config.json", "additional_chat_templates/tool_use.jinja")
    for name in (*gone, "tokenizer.4.0.0.json"):
        assert not (shards / name).exists(), name
    assert not AutoTokenizer.from_pretrained(shards).chat_template
    assert (shards / "tokenizer.json").is_file()
    assert _exact(without, shards)


@pytest.mark.parametrize("recorded", ["0.1.0", "every present file"])
def test_a_split_finished_by_0_1_0_is_recognized(tmp_path, monkeypatch, recorded):
    """0.1.0 recorded a local source without samples of its files, and later versions sampled every weight file
    present, one that holds only tensors the model does not use too: running a split either finished again finds it
    done (refusing it as "another model" would break every script that splits before it streams)."""
    from hf_layerstream import split as split_mod

    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    _add_unused_weight_file(ckpt)
    identity = split_mod._Source.identity
    legacy = recorded == "0.1.0"
    monkeypatch.setattr(split_mod._Source, "identity", lambda self, files=None, **_: identity(self, legacy=legacy))
    split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    monkeypatch.setattr(split_mod._Source, "identity", identity)
    stamp = (tmp_path / "shards" / "manifest.json").stat().st_mtime_ns
    split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    assert (tmp_path / "shards" / "manifest.json").stat().st_mtime_ns == stamp
    # damaged, it is repaired as that split: the units written again carry the digest its manifest records, as the
    # units kept do (opening refuses a unit carrying another digest than the manifest's: another split's)
    recorded_digest = json.loads((tmp_path / "shards" / "manifest.json").read_text())["split_options"]
    (tmp_path / "shards" / "layers" / "00001.safetensors").unlink()
    split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["split_options"] == recorded_digest
    assert ShardDirectory(tmp_path / "shards").verify() == [] and _exact(ckpt, tmp_path / "shards")


# --- sources ------------------------------------------------------------------------------------------------------


def _exact(ckpt, shards):
    ref = _models.load_reference(ckpt)
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0})
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        return torch.equal(model(ids).logits, ref(ids).logits)


def test_single_safetensors_source(tmp_path):
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", max_shard_size="1GB")
    assert (ckpt / "model.safetensors").exists() and not (ckpt / "model.safetensors.index.json").exists()
    assert _exact(ckpt, split_checkpoint(ckpt, tmp_path / "shards", progress=False))


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_a_single_weight_file_beside_an_index_is_read_as_transformers_reads_it(tmp_path, kind):
    """A folder holding a single weight file and an index with shards, of other weights: transformers loads the single
    file (`_get_resolved_checkpoint_files`); the split read the index, and streamed other logits, silently."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", seed=1)  # (sharded, with its index)
    other = _models.build_tiny_model("llama", seed=2)
    state = {k: v.clone().contiguous() for k, v in other.state_dict().items()}
    if kind == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    else:  # the same in pickled files: two shards of the first weights with their index, and a single file
        for f in ckpt.glob("model*.safetensors*"):
            f.unlink()
        first = _models.build_tiny_model("llama", seed=1).state_dict()
        names = sorted(first)
        weight_map = {}
        for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
            file = f"pytorch_model-0000{i + 1}-of-00002.bin"
            torch.save({n: first[n].clone() for n in part}, ckpt / file)
            weight_map.update(dict.fromkeys(part, file))
        (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        torch.save(state, ckpt / "pytorch_model.bin")
    assert _exact(ckpt, split_checkpoint(ckpt, tmp_path / "shards", progress=False))


@pytest.mark.parametrize(
    "named", ["file beside model.safetensors", "index beside model.safetensors", "file alone", "index, hub cache"]
)
def test_the_weights_config_json_names_are_split_as_from_pretrained_loads_them(tmp_path, monkeypatch, named):
    """config.json's `transformers_weights` names the weight file (or index) `from_pretrained` loads, whatever else
    the folder holds (`_get_resolved_checkpoint_files`). The split ignored it: beside `model.safetensors` of other
    weights it split those (other logits, silently), and with only the named file it found "no weights". The shard
    directory's config.json does not keep the name (its weights are not there; `save_pretrained` drops it too)."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", seed=1, max_shard_size="1GB")
    other = _models.save_tiny_checkpoint("llama", tmp_path / "other", seed=2)  # (sharded, with its index)
    if named.startswith("index"):
        name = "custom.safetensors.index.json"
        shutil.move(other / "model.safetensors.index.json", ckpt / name)
        for f in other.glob("model-*.safetensors"):
            shutil.move(f, ckpt / f.name)
    else:
        name = "weights/custom.safetensors"  # (in a subfolder: transformers allows it)
        (ckpt / "weights").mkdir()
        from safetensors.torch import save_file

        state = _models.build_tiny_model("llama", seed=2).state_dict()
        save_file({k: v.clone().contiguous() for k, v in state.items()}, str(ckpt / name), metadata={"format": "pt"})
    if named == "file alone":
        (ckpt / "model.safetensors").unlink()
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config | {"transformers_weights": name}))
    source = ckpt
    if named.endswith("hub cache"):  # (a hub repo, as fetched into the hub cache)
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        _fake_hub_cache(tmp_path / "cache", "tiny-org/tiny-llama", ckpt)
        source = "tiny-org/tiny-llama"
    shards = split_checkpoint(source, tmp_path / "shards", cache_dir=tmp_path / "cache", progress=False)
    assert _exact(ckpt, shards)
    assert "transformers_weights" not in json.loads((shards / "config.json").read_text())


@pytest.mark.parametrize("name", ["weights.bin", "../other/model.safetensors", "/abs/model.safetensors"])
def test_a_transformers_weights_name_from_pretrained_refuses_is_refused(tmp_path, name):
    """A `transformers_weights` that `from_pretrained` refuses (neither `.safetensors` nor `.safetensors.index.json`,
    or outside the checkpoint's folder) is refused by the split too: it split `model.safetensors` instead."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", max_shard_size="1GB")
    _models.save_tiny_checkpoint("llama", tmp_path / "other", max_shard_size="1GB")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config | {"transformers_weights": name}))
    with pytest.raises(ValueError, match="transformers_weights"):
        split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    assert not (tmp_path / "shards").exists()


def test_generation_settings_kept_in_config_json_are_the_streamed_models_as_from_pretrained_gives_them(tmp_path):
    """An older checkpoint keeps its generation settings in config.json, with no generation_config.json:
    `from_pretrained` builds the model's generation config from them. The split's config.json (written from the
    config object) lost them and it wrote no generation_config.json, so the streamed model generated with
    transformers' defaults: other lengths and tokens. A checkpoint with no such settings gets no file."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", seed=1, max_shard_size="1GB")
    (ckpt / "generation_config.json").unlink()
    plain = split_checkpoint(ckpt, tmp_path / "plain", progress=False)
    assert not (plain / "generation_config.json").exists()
    config = json.loads((ckpt / "config.json").read_text())
    legacy = {"max_length": 9, "no_repeat_ngram_size": 2, "repetition_penalty": 1.3, "do_sample": False}
    (ckpt / "config.json").write_text(json.dumps(config | legacy))
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    ref = _models.load_reference(ckpt)
    model = build_meta_model(AutoConfig.from_pretrained(shards))
    enable_layer_streaming(model, shards, device="cpu", max_memory={"cpu": 0})
    assert model.generation_config.to_dict() == ref.generation_config.to_dict()
    assert model.generation_config.max_length == 9 and model.generation_config.no_repeat_ngram_size == 2
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    assert torch.equal(model.generate(ids), ref.generate(ids))


@pytest.mark.parametrize(
    ("arch", "key", "dtype"),
    [("llama", "attn_implementation", torch.float32), ("mixtral", "experts_implementation", torch.bfloat16)],
)
def test_config_jsons_attention_and_experts_implementation_stay_in_the_shard_dirs_config(tmp_path, arch, key, dtype):
    """`attn_implementation` / `experts_implementation` in config.json choose the kernels `from_pretrained` and
    `from_config(AutoConfig.from_pretrained(source))` run. The split wrote config.json from the config object, which
    drops them: the model built from the shard directory's config ran sdpa attention / grouped_mm experts where
    `from_pretrained` runs eager ones (logits 1e-7 apart in float32, 4e-3 in bfloat16)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    ckpt = _models.save_tiny_checkpoint(arch, tmp_path / "ckpt", dtype=dtype, max_shard_size="1GB")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config | {key: "eager"}))
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    assert json.loads((shards / "config.json").read_text())[key] == "eager"
    ref = _models.load_reference(ckpt, dtype, attn_implementation=None)  # (the config's choice)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shards)).eval()
    assert getattr(model.config, f"_{key}") == getattr(ref.config, f"_{key}") == "eager"
    enable_layer_streaming(model, shards, device="cpu", max_memory={"cpu": 0})
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_a_config_without_dtype_splits_without_transformers_deprecation_warning(tmp_path, monkeypatch):
    """A config.json without `dtype`: the split read the config's deprecated `torch_dtype` property, and transformers
    printed "`torch_dtype` is deprecated! Use `dtype` instead!", which `from_pretrained` does not print. A config
    object that has its own `torch_dtype` attribute (a class from before `dtype`) is still read."""
    import logging
    from types import SimpleNamespace

    from hf_layerstream.split import _config_dtype

    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", max_shard_size="1GB")
    config = json.loads((ckpt / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (ckpt / "config.json").write_text(json.dumps(config))
    said = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: said.append(str(msg)), raising=False)
    assert _exact(ckpt, split_checkpoint(ckpt, tmp_path / "shards", progress=False))
    assert not [m for m in said if "torch_dtype" in m]
    assert _config_dtype(SimpleNamespace(dtype=None, torch_dtype="bfloat16")) == torch.bfloat16


@pytest.mark.parametrize("fault", ["key left out", "key listed with another file", "key in two files"])
def test_the_weight_files_keys_count_not_the_index_s_as_transformers_reads_them(tmp_path, fault):
    """transformers takes only the file list from a checkpoint index and loads every tensor each file holds, a later
    file's over an earlier one's (`merged_state_dict.update`). The split looked tensors up by the index's
    `weight_map`: a tensor it left out was "missing" (the split refused a checkpoint `from_pretrained` loads), one it
    listed with the wrong file was not found, and one held by two files was read from the one the index named, not
    the one transformers loads: other logits, silently."""
    from safetensors.torch import load_file, save_file

    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", seed=1)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    files = sorted(set(weight_map.values()))
    assert len(files) >= 2
    first = next(k for k in weight_map if weight_map[k] == files[0] and ".layers." in k)
    if fault == "key left out":
        del weight_map[first]
    elif fault == "key listed with another file":
        weight_map[first] = files[-1]
    else:  # the last file holds other values under the same name; the index names the first
        last = load_file(str(ckpt / files[-1]))
        last[first] = torch.randn_like(load_file(str(ckpt / files[0]))[first])
        save_file(last, str(ckpt / files[-1]), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    assert _exact(ckpt, split_checkpoint(ckpt, tmp_path / "shards", progress=False))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "pre-1.6"])
def test_pytorch_bin_source_loaded_with_weights_only(tmp_path, legacy):
    """Both formats `torch.save` writes: the zip one (torch >= 1.6) and the older one many hub checkpoints still
    hold, which torch cannot memory-map (the split passed `mmap=True` for it and refused it as unsafe to load;
    transformers maps only a zip file)."""
    model = _models.build_tiny_model("llama")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    model.config.save_pretrained(ckpt)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state, ckpt / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    ref = model
    streamed = streamed_model(ckpt, shards)
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, ref(ids).logits)


def test_a_damaged_pytorch_bin_source_is_named_unreadable_not_unsafe(tmp_path):
    """A truncated `.bin` file (an interrupted download) is reported as a source file to fetch again, not as one
    `weights_only=True` refused to load safely: that message is for pickles that would run code."""
    model = _models.build_tiny_model("llama")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    model.config.save_pretrained(ckpt)
    path = ckpt / "pytorch_model.bin"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ShardFileError, match="cannot be read by torch.load") as info:
        split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    message = str(info.value)
    assert str(path) in message and "re-download it" in message and "safely" not in message


def test_a_damaged_or_missing_source_file_of_a_hub_download_names_the_command_that_downloads_it_again(tmp_path):
    """A source checkpoint that is a hub repo's download in the hub cache (its snapshot given by its path, or the repo
    split by its id): a damaged file of it was told to "re-download it", with no command, where a shard directory's
    files name it (`redownload_command`), and a missing one `hf download REPO --local-dir DIR`, which downloads
    elsewhere. Both name the command now; a local checkpoint's are told as before."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    cache = tmp_path / "cache"
    snapshot = _models.hub_snapshot(ckpt, cache, repo="org--model")
    command = f"`hf download org/model --cache-dir {cache} --force-download`"
    name = "model-00002-of-00006.safetensors"
    blob = (snapshot / name).resolve()
    data = blob.read_bytes()
    blob.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardFileError) as info:
        split_checkpoint(snapshot, tmp_path / "shards", progress=False)
    message = str(info.value)
    assert str(snapshot / name) in message and "re-download it" not in message
    assert (
        f"It is a download in the hub cache: download it again ({command}), then run the same split again." in message
    )
    blob.unlink()
    with pytest.raises(FileNotFoundError) as info:
        split_checkpoint(snapshot, tmp_path / "shards2", progress=False)
    assert f"looks incomplete: finish it ({command}) and run the split again" in str(info.value)
    # a .bin file torch.load fails on
    bin_ckpt = tmp_path / "bin"
    bin_ckpt.mkdir()
    model = _models.build_tiny_model("llama")
    model.config.save_pretrained(bin_ckpt)
    torch.save(model.state_dict(), bin_ckpt / "pytorch_model.bin")
    snapshot = _models.hub_snapshot(bin_ckpt, cache, repo="org--bin")
    blob = (snapshot / "pytorch_model.bin").resolve()
    blob.write_bytes(blob.read_bytes()[:100])
    with pytest.raises(ShardFileError, match="cannot be read by torch.load") as info:
        split_checkpoint(snapshot, tmp_path / "shards3", progress=False)
    assert f"(`hf download org/bin --cache-dir {cache} --force-download`)" in str(info.value)
    # (a local checkpoint: no command; a file this user may not read: no download mends it)
    local = tmp_path / "local"
    shutil.copytree(ckpt, local)
    (local / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardFileError, match="re-download it, or save the checkpoint again"):
        split_checkpoint(local, tmp_path / "shards4", progress=False)


def test_a_source_file_this_user_may_not_read_is_not_told_to_be_downloaded_again(tmp_path, monkeypatch):
    """A source safetensors file that could not be opened for a permission (or a limit of the process) was told
    to be re-downloaded, the fix `unreadable` gives it replaced; it keeps that fix."""
    from hf_layerstream.errors import UNREADABLE_BY_THIS_USER

    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    denied = str(ckpt / "model-00002-of-00006.safetensors")
    real_open = os.open

    def refusing_open(path, *args, **kwargs):
        if os.fspath(path) == denied:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(ShardFileError) as info:
        split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    assert str(info.value) == f"{denied} cannot be read: Permission denied. {UNREADABLE_BY_THIS_USER}"


def test_a_tied_pair_stored_under_the_heads_name_only(tmp_path):
    """`safetensors.torch.save_model` keeps one name of each shared tensor: for GPT-2's tied embeddings and head,
    `lm_head.weight`. `from_pretrained` ties it the other way; the split takes the embeddings from there too (it
    refused the checkpoint, lacking `transformer.wte.weight`)."""
    from safetensors.torch import load_file, save_file

    ckpt = _models.save_tiny_checkpoint("gpt2", tmp_path / "ckpt", max_shard_size="1GB")
    state = load_file(ckpt / "model.safetensors")
    state["lm_head.weight"] = state.pop("transformer.wte.weight")
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    assert _exact(ckpt, split_checkpoint(ckpt, tmp_path / "shards", progress=False))


def _set_config(ckpt, **changes):
    config = json.loads((ckpt / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (ckpt / "config.json").write_text(json.dumps(config))


def _untied_checkpoint(path, *, same_values: bool):
    """A Llama checkpoint whose config ties the head to the embeddings and which stores both, with different values
    (or the same ones)."""
    from safetensors.torch import load_file, save_file

    ckpt = _models.save_tiny_checkpoint(
        _models.make_config("llama", tie_word_embeddings=False), path, max_shard_size="1GB"
    )
    if same_values:
        state = load_file(ckpt / "model.safetensors")
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    _set_config(ckpt, tie_word_embeddings=True)
    return ckpt


def test_a_head_stored_apart_from_the_embeddings_it_is_tied_to_is_refused_with_the_fix(tmp_path):
    """The config ties the head to the embeddings, the checkpoint stores both with different values:
    `from_pretrained` leaves them untied (it warns), a model built from the config ties them. The split refused
    nothing: it dropped the head and streaming tied it (logits off by up to 1.2). Now it refuses, naming the fix, and
    the fix (the config saying what the checkpoint holds) streams what `from_pretrained` of the original loads."""
    ckpt = _untied_checkpoint(tmp_path / "ckpt", same_values=False)
    ref = _models.load_reference(ckpt)
    assert ref.lm_head.weight.data_ptr() != ref.model.embed_tokens.weight.data_ptr()
    before = _tree_digest(ckpt)
    with pytest.raises(ShardDirError, match=r"'lm_head.weight' and 'model.embed_tokens.weight' with different values"):
        split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    assert _tree_digest(ckpt) == before and not (tmp_path / "shards" / "manifest.json").exists()
    # the fix the message names: a copy of the folder (weight files as symlinks) whose config does not tie them
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    for p in ckpt.iterdir():
        (fixed / p.name).symlink_to(p) if p.name != "config.json" else shutil.copy(p, fixed / p.name)
    _set_config(fixed, tie_word_embeddings=False)
    model = streamed_model(fixed, split_checkpoint(fixed, tmp_path / "shards", progress=False), max_memory={"cpu": 0})
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    disable_layer_streaming(model)


def test_a_head_stored_equal_to_the_embeddings_it_is_tied_to_is_tied(tmp_path):
    """Both stored with equal values (as `.bin` checkpoints of tied models hold them): `from_pretrained` ties them,
    and so does streaming."""
    ckpt = _untied_checkpoint(tmp_path / "ckpt", same_values=True)
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    assert "lm_head.weight" not in ShardDirectory(shards).unit("resident").tensors
    assert _exact(ckpt, shards)


def _to_block_fp8(ckpt, block=32):
    """Rewrite a checkpoint as block-FP8 (DeepSeek-V3's / Qwen3-FP8's layout): float8 `*proj.weight` and their
    `*proj.weight_scale_inv`, `quantization_config` in config.json."""
    from safetensors.torch import load_file, save_file

    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for f in sorted(ckpt.glob("*.safetensors")):
        out = {}
        for k, v in load_file(f).items():
            if k.endswith("proj.weight"):
                r, c = v.shape
                blocks = v.float().view(r // block, block, c // block, block)
                scale = blocks.abs().amax(dim=(1, 3)) / 448.0
                out[k] = (blocks / scale[:, None, :, None]).view(r, c).to(torch.float8_e4m3fn)
                out[k + "_scale_inv"] = scale
                index["weight_map"][k + "_scale_inv"] = f.name
            else:
                out[k] = v
        save_file(out, f, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [block, block]}
    _set_config(ckpt, quantization_config=quant)


@pytest.mark.parametrize(
    "quant",
    [
        None,  # block-FP8 weights and scales
        {"quant_method": "gptq", "bits": 4, "group_size": 128},
        {"quant_method": "awq", "bits": 4, "group_size": 128},
        {"quant_method": "bitsandbytes", "load_in_4bit": True},
        {"quant_method": "mxfp4"},
    ],
    ids=["fp8", "gptq", "awq", "bitsandbytes", "mxfp4"],
)
def test_a_pre_quantized_checkpoint_is_refused_naming_its_method_and_what_to_do(tmp_path, quant):
    """A checkpoint stored quantized (its config has a `quantization_config`) holds codes and scales, not weights:
    the split stored the fp8 codes as weights and dropped the scales as unused keys, and streaming them gave garbage
    (cosine -0.03 to the model's logits) or failed. Now it is refused before anything is written."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", dtype=torch.bfloat16)
    if quant is None:
        _to_block_fp8(ckpt)
    else:
        _set_config(ckpt, quantization_config=quant)
    method = "fp8" if quant is None else quant["quant_method"]
    before = _tree_digest(ckpt)
    with pytest.raises(ShardDirError, match=rf"pre-quantized.*quant_method '{method}'.*original-precision") as info:
        split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    assert "compression='4bit'" in str(info.value) and "dequantize" in str(info.value)
    assert _tree_digest(ckpt) == before
    assert not (tmp_path / "shards").exists() or not list((tmp_path / "shards").rglob("*.safetensors"))


@pytest.mark.parametrize("config_dtype", ["bfloat16", None], ids=["config-dtype", "no-config-dtype"])
def test_a_checkpoint_stored_in_mixed_dtypes_streams_as_from_pretrained_auto_loads_it(tmp_path, config_dtype):
    """bf16 matrices and float32 norms on disk: `from_pretrained(dtype="auto")` loads every floating weight at the
    config's dtype (without one, at the first floating tensor's of the first file): bf16. Streaming with the default
    dtype streamed each tensor at its stored dtype and failed (float32 norm output into a bf16 matmul). The split
    keeps the tensors as stored and records that dtype; streaming casts to it: the logits are bit for bit."""
    from safetensors.torch import load_file, save_file

    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", dtype=torch.bfloat16)
    for f in ckpt.glob("*.safetensors"):
        state = {k: v.float() if "norm" in k else v for k, v in load_file(f).items()}
        save_file(state, f, metadata={"format": "pt"})
    _set_config(ckpt, dtype=config_dtype)
    ref = _models.load_reference(ckpt, dtype="auto")
    assert ref.model.norm.weight.dtype == torch.bfloat16
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    directory = ShardDirectory(shards)
    assert directory.unit("resident").tensors["model.norm.weight"].dtype == torch.float32  # kept as stored
    ids = torch.tensor([[1, 5, 17, 33, 9, 44, 12]])
    for dtype in (None, "auto"):  # (the default, and "auto" as `from_pretrained` takes it)
        model = enable_layer_streaming(
            build_meta_model(AutoConfig.from_pretrained(ckpt)), shards, device="cpu", dtype=dtype, max_memory={"cpu": 0}
        )
        assert model.model.norm.weight.dtype == torch.bfloat16
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
        disable_layer_streaming(model)
    assert directory.manifest.load_dtype == "bfloat16"


def test_a_revision_or_token_for_a_local_folder_is_ignored_with_a_warning(tmp_path, caplog):
    """`token` too (it was ignored silently: `split --token T` of a folder looked as if it had been used)."""
    import logging

    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        split_checkpoint(ckpt, tmp_path / "shards", revision="main", token="hf_abc", progress=False)
    assert "`revision` 'main' applies to hub repos" in caplog.text
    assert f"`token` applies to hub repos; {ckpt} is a local folder, read without it." in caplog.text
    assert "hf_abc" not in caplog.text  # (a token is never logged)
    stamp = (tmp_path / "shards" / "manifest.json").stat().st_mtime_ns
    split_checkpoint(ckpt, tmp_path / "shards", progress=False)  # the same split: nothing to do
    assert (tmp_path / "shards" / "manifest.json").stat().st_mtime_ns == stamp


def test_a_cache_dir_for_a_local_folder_is_ignored_with_a_warning(tmp_path, caplog):
    """`cache_dir` is where a hub repo's files are downloaded; with a local folder as `source` (and no hub adapter,
    which it serves too) nothing is downloaded, and it was taken without a word, as `revision` and `token` were."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        split_checkpoint(ckpt, tmp_path / "shards", cache_dir=tmp_path / "cache", progress=False)
    assert (
        f"`cache_dir` applies to hub repos (the hub cache they are downloaded into, for `source` and `adapter`); "
        f"{ckpt} is a local folder, split as it is." in caplog.text
    )
    assert not (tmp_path / "cache").exists()  # (nothing was written there)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        split_checkpoint(ckpt, tmp_path / "shards", progress=False)  # (without it: nothing said)
    assert "cache_dir" not in caplog.text


def test_safetensors_are_preferred_to_pickled_shards(tmp_path):
    """A folder with sharded `.bin` files (and their index) and a single `model.safetensors`, as some hub repos hold:
    the safetensors file is split, as transformers would load it (the `.bin` index was taken first before)."""
    model = _models.build_tiny_model("llama")
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt, max_shard_size="1GB")
    assert (ckpt / "model.safetensors").exists()
    other = _models.build_tiny_model("llama", seed=1).state_dict()  # other weights in the pickled shards
    torch.save({k: v.clone() for k, v in other.items()}, ckpt / "pytorch_model-00001-of-00001.bin")
    index = {"metadata": {}, "weight_map": dict.fromkeys(other, "pytorch_model-00001-of-00001.bin")}
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    streamed = streamed_model(ckpt, shards)
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, model(ids).logits)


def test_streaming_warns_when_transformers_converts_the_checkpoint_otherwise(checkpoints, caplog, monkeypatch):
    """A split records transformers' release and how it converts the model's checkpoint tensors (Mixtral's experts
    fused into `gate_up_proj`). Streaming with the same conversion says nothing; a release whose conversion differs
    (here a fused dimension changed) would load an older split's layout silently wrong, so it is warned about."""
    import logging

    import transformers
    import transformers.conversion_mapping as conversion_mapping

    ckpt, shards = checkpoints("mixtral")
    recorded = ShardDirectory(shards).manifest.conversion
    assert recorded["transformers"] == transformers.__version__ and len(recorded["converters"]) == 16
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        disable_layer_streaming(streamed_model(ckpt, shards))
    assert "converted this model's checkpoint tensors" not in caplog.text

    original = conversion_mapping.get_model_conversion_mapping

    def changed(model, *args, **kwargs):
        mapping = [copy.deepcopy(t) for t in original(model, *args, **kwargs)]
        for t in mapping:
            for op in getattr(t, "operations", []):
                if type(op).__name__ == "Concatenate":
                    op.dim = 0
        return mapping

    monkeypatch.setattr(conversion_mapping, "get_model_conversion_mapping", changed)
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        disable_layer_streaming(streamed_model(ckpt, shards))
    assert f"split with transformers {transformers.__version__}, which converted" in caplog.text
    assert "split the checkpoint again" in caplog.text


def test_a_conversion_record_transformers_internals_refuse_does_not_fail_the_split(
    checkpoints, tmp_path, caplog, monkeypatch
):
    """The conversion record reads transformers' conversion internals, written last in a split: a release whose
    operations keep their state in `__slots__` (no `__dict__`) is described by their slots, and one the record cannot
    read at all leaves it out with a warning, instead of failing the split after every layer was written (no
    manifest: every re-run failed the same way). The model streams exactly."""
    import logging

    import transformers.conversion_mapping as conversion_mapping

    from hf_layerstream import split as split_module
    from hf_layerstream.modeling import _attributes, conversion_record

    class Slotted:
        __slots__ = ("dim", "unset")

        def __init__(self):
            self.dim = 1

    assert _attributes(Slotted()) == {"dim": 1}
    ckpt, _ = checkpoints("mixtral")
    model = build_meta_model(AutoConfig.from_pretrained(ckpt))
    original = conversion_mapping.get_model_conversion_mapping

    def slotted(model, *args, **kwargs):  # (each operation's state in slots: `vars()` raised TypeError on them)
        mapping = [copy.deepcopy(t) for t in original(model, *args, **kwargs)]
        for t in mapping:
            for k, op in enumerate(getattr(t, "operations", [])):
                kind = type(type(op).__name__, (), {"__slots__": tuple(vars(op))})
                t.operations[k] = kind()
                for name, value in vars(op).items():
                    setattr(t.operations[k], name, value)
        return mapping

    want = conversion_record(model)["converters"]
    monkeypatch.setattr(conversion_mapping, "get_model_conversion_mapping", slotted)
    assert conversion_record(model)["converters"] == want  # (the same state, read from the slots)
    monkeypatch.undo()
    monkeypatch.setattr(split_module, "conversion_record", lambda model: {}["changed in a release"])
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    assert "Could not record how transformers converts this model's checkpoints (KeyError" in caplog.text
    assert ShardDirectory(shards).manifest.conversion is None
    monkeypatch.undo()
    ref = _models.load_reference(ckpt)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    model = streamed_model(ckpt, shards)
    assert torch.equal(model(ids).logits, ref(ids).logits)
    disable_layer_streaming(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_our_calls_make_transformers_log_no_deprecation(arch, tmp_path):
    """transformers announces many deprecations with `logger.warning_once` (accelerate with its logger), which
    pytest's warning filters do not see: a split, enable, `generate` (greedy, sampled), a loss, `save_pretrained` and
    disable log none of them (the early warning of a break in their next releases). (Not `pipeline`: transformers
    5.15's passes its generation config with the caller's arguments, and logs that as deprecated, whatever the
    model.)"""
    import logging

    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.warning_once.cache_clear()  # (each message once per process: not only to this test)
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("transformers", "accelerate", "huggingface_hub")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        ckpt = _models.save_tiny_checkpoint(arch, tmp_path / "ckpt")
        shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
        model = build_meta_model(AutoConfig.from_pretrained(shards))
        enable_layer_streaming(model, shards, device="cpu", max_memory={"cpu": 0})
        tok = AutoTokenizer.from_pretrained(shards)
        ids = tok(_models.SAMPLE_PROMPTS[0], return_tensors="pt").input_ids
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        model.generate(ids, max_new_tokens=3, do_sample=True, top_p=0.9, pad_token_id=tok.pad_token_id)
        model(ids, labels=ids).loss.item()
        model.save_pretrained(tmp_path / "saved")
        disable_layer_streaming(model)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    said = [f"{r.name}: {r.getMessage()}" for r in records if "deprecat" in r.getMessage().lower()]
    assert said == []


def test_a_transformers_whose_conversion_internals_changed_is_named_by_the_split(tmp_path, monkeypatch):
    """A split uses transformers' conversion internals (`get_model_conversion_mapping`, `rename_source_key`), which
    changed shape in earlier releases without a deprecation: one gone, or returning another shape, fails the split
    with an error naming the transformers release and the ones supported, not a bare `ImportError` or "too many values
    to unpack"."""
    import transformers
    import transformers.conversion_mapping as conversion_mapping
    import transformers.core_model_loading as core_model_loading

    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    real = core_model_loading.rename_source_key
    monkeypatch.setattr(core_model_loading, "rename_source_key", lambda *a, **k: (*real(*a, **k), None))
    with pytest.raises(RuntimeError, match=r"transformers \S+ changed \(`rename_source_key` returned tuple") as e:
        split_checkpoint(ckpt, tmp_path / "a", progress=False)
    assert f"transformers {transformers.__version__} changed" in str(e.value)
    assert re.search(r"it supports \(transformers[<>=,.0-9]+\)", str(e.value))  # (this package's requirement)
    monkeypatch.undo()
    monkeypatch.delattr(conversion_mapping, "get_model_conversion_mapping")
    with pytest.raises(ImportError, match=r"get_model_conversion_mapping.*Install a transformers release it supports"):
        split_checkpoint(ckpt, tmp_path / "b", progress=False)


def _fake_hub_cache(cache_dir, repo_id, ckpt, commit="a" * 40):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    root = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for p in ckpt.iterdir():
        (shutil.copytree if p.is_dir() else shutil.copy)(p, snap / p.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return commit


def test_hub_repo_id_from_the_hub_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    commit = _fake_hub_cache(tmp_path / "cache", "tiny-org/tiny-llama", ckpt)
    shards = split_checkpoint("tiny-org/tiny-llama", tmp_path / "shards", cache_dir=tmp_path / "cache", progress=False)
    m = json.loads((shards / "manifest.json").read_text())
    assert m["source"] == {"id": "tiny-org/tiny-llama", "kind": "hub", "revision": commit}
    assert _exact(ckpt, shards)


_SOURCE_CARD = """---
license: llama3.1
language:
- en
- de
tags:
- facebook
- transformers
extra_gated_prompt: Agree to the license.
---
# Tiny Llama

The original card.
"""


def _card_code(shards) -> str:
    """The Python block of a shard directory's model card, with its REPO the directory."""
    text = (shards / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    return code.replace('"REPO"', repr(str(shards)))


def test_a_split_carries_the_source_s_license_and_a_model_card(tmp_path):
    """A split is the model's weights, made to be shared (on the hub too): it had neither the source's license
    files nor a model card. It copies the license and notice files at the source's top level (not code, not a
    subfolder's) and writes README.md, a hub model card carrying the source card's license and languages (not its
    tags, gating or text), tagged `hf-layerstream`, whose code streams the split, exact. A card edited since is kept
    by a re-run; a split replacing another (`overwrite=True`) drops the other source's license files and card."""
    from huggingface_hub import ModelCard

    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    (ckpt / "README.md").write_text(_SOURCE_CARD)
    licenses = {"LICENSE": "the license", "USE_POLICY.md": "the policy", "NOTICE-model.txt": "the notice"}
    for name, text in licenses.items():
        (ckpt / name).write_text(text)
    (ckpt / "license_check.py").write_text("print(1)")
    (ckpt / "extra").mkdir()
    (ckpt / "extra" / "LICENSE").write_text("another")
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    for name, text in licenses.items():
        assert (shards / name).read_text() == text
    assert not (shards / "license_check.py").exists() and not (shards / "extra").exists()
    card = ModelCard.load(shards / "README.md")
    assert card.data.to_dict() == {"license": "llama3.1", "language": ["en", "de"], "tags": ["hf-layerstream"]}
    assert "The checkpoint `ckpt` split by hf_layerstream" in card.text and "at full precision" in card.text
    assert "The license of the original model applies (llama3.1)" in card.text
    assert "LICENSE, NOTICE-model.txt, USE_POLICY.md" in card.text and "The original card" not in card.text
    namespace: dict = {}
    exec(_card_code(shards), namespace)
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        reference = _models.load_reference(ckpt, attn_implementation=None)  # (as `from_pretrained` loads it)
        assert torch.equal(namespace["model"](ids).logits, reference(ids).logits)
    assert namespace["tokenizer"].decode([20, 30]) == AutoTokenizer.from_pretrained(ckpt).decode([20, 30])

    (shards / "README.md").write_text("my card")
    split_checkpoint(ckpt, shards, progress=False)
    assert (shards / "README.md").read_text() == "my card"
    other = _models.save_tiny_checkpoint("gpt2", tmp_path / "gpt2")
    split_checkpoint(other, shards, progress=False, overwrite=True, dtype=torch.bfloat16)
    assert not any((shards / name).exists() for name in licenses)
    card = ModelCard.load(shards / "README.md")
    assert card.data.to_dict() == {"tags": ["hf-layerstream"]} and "## License" not in card.text
    assert "The checkpoint `gpt2`" in card.text and "its weights cast to bfloat16" in card.text
    assert "model = AutoModelForCausalLM.from_config(config)" in card.text


@pytest.mark.parametrize("source", ["local", "hub"])
def test_a_finished_split_run_again_writes_the_side_files_gone_since(tmp_path, monkeypatch, caplog, source):
    """A finished split whose tokenizer, chat template, generation config, license or model card was deleted: running
    the split again said it had nothing to do and left them missing (`AutoTokenizer.from_pretrained(shard_dir)`
    failed for good, short of `overwrite=True`). It writes those the split recorded writing again, from the source (a
    local folder, or the hub cache offline); files still there, edited or not, are kept, and the units and manifest
    are untouched. A directory that cannot be written to says what it lacks. (A split made before the record was
    kept: `test_a_split_made_before_its_manifest_listed_the_side_files_gets_them_back`.)"""
    from huggingface_hub import constants

    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    (ckpt / "README.md").write_text(_SOURCE_CARD)
    (ckpt / "LICENSE").write_text("the license")
    (ckpt / "USE_POLICY.md").write_text("the policy")  # (after README.md in order: the card, written last, names it)
    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.chat_template = {"default": "{{ messages[0].content }}", "tool_use": "tool: {{ messages[0].content }}"}
    tok.save_pretrained(ckpt)
    given = ckpt
    if source == "hub":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        _fake_hub_cache(tmp_path / "cache", "tiny-org/tiny-llama", ckpt)
        given = "tiny-org/tiny-llama"
    out = tmp_path / "shards"
    split_checkpoint(given, out, cache_dir=tmp_path / "cache", progress=False)
    gone = [
        "tokenizer.json",
        "chat_template.jinja",
        "additional_chat_templates/tool_use.jinja",
        "generation_config.json",
        "LICENSE",
        "README.md",
        "USE_POLICY.md",
    ]
    before = {name: (out / name).read_bytes() for name in gone}
    assert b"LICENSE, USE_POLICY.md" in before["README.md"]
    recorded = json.loads((out / "manifest.json").read_text())["side_files"]
    assert set(gone) <= set(recorded)
    manifest = (out / "manifest.json").read_bytes()
    units = {p.name: p.stat().st_mtime_ns for p in (out / "layers").iterdir()}
    for name in gone:
        (out / name).unlink()
    edited = (out / "tokenizer_config.json").read_text().replace("{", '{"my_key": 1, ', 1)
    (out / "tokenizer_config.json").write_text(edited)
    with caplog.at_level(logging.INFO, logger="hf_layerstream.split"):
        split_checkpoint(given, out, cache_dir=tmp_path / "cache", progress=False)
    assert "nothing to do" not in caplog.text and "but lacked" in caplog.text
    assert {name: (out / name).read_bytes() for name in gone} == before
    assert (out / "tokenizer_config.json").read_text() == edited
    assert (out / "manifest.json").read_bytes() == manifest
    assert {p.name: p.stat().st_mtime_ns for p in (out / "layers").iterdir()} == units
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded("hello world").input_ids == tok("hello world").input_ids and loaded.chat_template == tok.chat_template
    assert _exact(ckpt, out)

    # run again with nothing gone: nothing to do
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_layerstream.split"):
        split_checkpoint(given, out, cache_dir=tmp_path / "cache", progress=False)
    assert "nothing to do" in caplog.text

    # a directory this user cannot write to: what it lacks is named, nothing written, no error
    (out / "LICENSE").unlink()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == out else real_access(path, mode))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_layerstream.split"):
        split_checkpoint(given, out, cache_dir=tmp_path / "cache", progress=False)
    assert "lacks LICENSE, which its split wrote; the directory cannot be written to" in caplog.text
    assert not (out / "LICENSE").exists()
    monkeypatch.setattr(os, "access", real_access)

    # a hub source whose file the hub cache lacks now, the hub unreachable: said so, not that the source lacks it
    if source == "hub":
        cached = next((tmp_path / "cache").glob("models--*/snapshots/*"))
        (cached / "LICENSE").unlink()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hf_layerstream.split"):
            split_checkpoint(given, out, cache_dir=tmp_path / "cache", progress=False)
        assert (
            "lacks LICENSE, which its split copied from tiny-org/tiny-llama; the hub cannot be reached" in caplog.text
        )
        assert not (out / "LICENSE").exists()


def test_a_split_made_before_its_manifest_listed_the_side_files_gets_them_back(tmp_path, monkeypatch, caplog):
    """A finished split whose manifest has no `side_files` (made before the list was kept), its tokenizer, generation
    config, license or model card deleted: running the same split again said it had nothing to do and left them
    missing (only `overwrite=True` wrote them). It writes those a split of the source writes that the folder lacks
    (files still there, edited or not, are kept) and lists them in the manifest, as the split writes it (the other
    entries as they were), so that a later run writes again what is deleted after; the units are untouched. A
    directory that cannot be written to says what it lacks, and its manifest is left as it is."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    (ckpt / "README.md").write_text(_SOURCE_CARD)
    (ckpt / "LICENSE").write_text("the license")
    out = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    made = (out / "manifest.json").read_bytes()
    record = json.loads(made)
    gone = ["tokenizer.json", "generation_config.json", "LICENSE", "README.md"]
    assert set(gone) <= set(record["side_files"])
    before = {name: (out / name).read_bytes() for name in gone}
    units = {p.name: p.stat().st_mtime_ns for p in (out / "layers").iterdir()}
    del record["side_files"]  # (as a split made before the list was kept wrote its manifest)
    (out / "manifest.json").write_text(json.dumps(record, indent=1))
    for name in gone:
        (out / name).unlink()
    edited = (out / "tokenizer_config.json").read_text().replace("{", '{"my_key": 1, ', 1)
    (out / "tokenizer_config.json").write_text(edited)

    # a directory that cannot be written to: what it lacks is named, nothing written, the manifest as it was
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == out else real_access(path, mode))
    with caplog.at_level(logging.INFO, logger="hf_layerstream.split"):
        split_checkpoint(ckpt, out, progress=False)
    assert f"lacks LICENSE, README.md, generation_config.json, tokenizer.json, which a split of {ckpt} writes" in (
        caplog.text
    )
    assert not any((out / name).exists() for name in gone) and "side_files" not in json.loads(
        (out / "manifest.json").read_text()
    )
    monkeypatch.setattr(os, "access", real_access)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_layerstream.split"):
        split_checkpoint(ckpt, out, progress=False)
    assert "nothing to do" not in caplog.text and "but lacked" in caplog.text
    assert f"which a split of {ckpt} writes (its manifest, made before" in caplog.text
    assert {name: (out / name).read_bytes() for name in gone} == before
    assert (out / "tokenizer_config.json").read_text() == edited
    assert (out / "manifest.json").read_bytes() == made  # (the list, written as the split writes it)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "layers").iterdir()} == units
    assert ShardDirectory(out, checksums=True).verify() == [] and _exact(ckpt, out)

    # listed now: a file deleted later is written again as for a split made now
    (out / "LICENSE").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_layerstream.split"):
        split_checkpoint(ckpt, out, progress=False)
    assert "lacked LICENSE: written again from the source" in caplog.text
    assert (out / "LICENSE").read_bytes() == before["LICENSE"] and (out / "manifest.json").read_bytes() == made


@pytest.mark.parametrize(
    "front, license_text, data",
    [
        ("license: [mit, apache-2.0]\nlanguage: en", "(mit, apache-2.0)", {"license": ["mit", "apache-2.0"]}),
        # `other` is named by its `license_name`; a link to a file the split does not carry is left out
        ("license: other\nlicense_name: llama3\nlicense_link: LICENSE", "(llama3)", {"license_name": "llama3"}),
        (
            "license: 5\nlanguage: {a: 1}\nlicense_link: https://example.com/l",
            None,
            {"license_link": "https://example"},
        ),
    ],
    ids=["list", "other", "odd"],
)
def test_the_model_card_takes_what_the_hub_reads_of_the_source_card(tmp_path, front, license_text, data):
    """A review's cases: a license given as a list is named as one, `other` by its name; values that are not text
    (a number, a mapping) are left out, and a relative `license_link` to a file the split does not copy."""
    from huggingface_hub import ModelCard

    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    (ckpt / "README.md").write_text(f"---\n{front}\n---\nThe card.\n")
    card = ModelCard.load(split_checkpoint(ckpt, tmp_path / "shards", progress=False) / "README.md")
    metadata = card.data.to_dict()
    for key, value in data.items():
        assert str(metadata[key]).startswith(str(value)) if isinstance(value, str) else metadata[key] == value
    assert "license_link" not in metadata or "://" in metadata["license_link"]
    assert "license" not in metadata or isinstance(metadata["license"], (str, list))
    assert "language" not in metadata or metadata["language"] == "en"
    if license_text is None:
        assert "## License" not in card.text
    else:
        assert f"The license of the original model applies {license_text}." in card.text


def test_a_split_of_a_hub_repo_names_it_as_its_base_model(tmp_path, monkeypatch):
    """From the hub: the card's `base_model` is the repo (its relation `quantized` for a compressed split), linked
    with the commit split; its license files are those the hub lists (here, offline, those the hub cache holds)."""
    from huggingface_hub import ModelCard, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    (ckpt / "README.md").write_text(_SOURCE_CARD)
    (ckpt / "LICENSE").write_text("the license")
    commit = _fake_hub_cache(tmp_path / "cache", "tiny-org/tiny-llama", ckpt)
    shards = split_checkpoint(
        "tiny-org/tiny-llama", tmp_path / "shards", cache_dir=tmp_path / "cache", progress=False, compression="4bit"
    )
    assert (shards / "LICENSE").read_text() == "the license"
    card = ModelCard.load(shards / "README.md")
    assert card.data.to_dict() == {
        "license": "llama3.1",
        "language": ["en", "de"],
        "base_model": "tiny-org/tiny-llama",
        "base_model_relation": "quantized",
        "tags": ["hf-layerstream"],
    }
    assert f"[tiny-org/tiny-llama](https://huggingface.co/tiny-org/tiny-llama) (commit {commit[:7]}) split" in card.text
    assert "quantized to 4 bits with bitsandbytes (nf4, blocks of 64; lossy)" in card.text
    assert "See [the original model card](https://huggingface.co/tiny-org/tiny-llama)" in card.text


def test_hub_repo_id_from_the_hub_cache_when_the_hub_cannot_be_reached(tmp_path, monkeypatch, caplog):
    """HF_HUB_OFFLINE unset and the hub unreachable (no network, the hub down), the repo in the hub cache: the split is
    made from the cache, as `from_pretrained` loads it. Files the repo lacks (a single-file repo's index, tokenizer
    files it does not have) are taken as absent; the first such lookup raised before, the hub being unreachable.
    huggingface_hub retries each lookup of a file it has not cached for ~20 s: after the first, the split looks in the
    cache only. A repo whose weights are not in the cache says that the hub could not be reached."""
    import logging
    import socket
    import time

    import huggingface_hub.utils._http as hub_http
    from huggingface_hub import constants

    class NoSleep:  # huggingface_hub's backoff, timed instead of waited for
        slept = 0.0

        def sleep(self, seconds):
            self.slept += seconds

        def __getattr__(self, name):
            return getattr(time, name)

    closed = socket.socket()  # bound, never listening: a connection to it is refused at once
    closed.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hub_http, "time", NoSleep())
    try:
        ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", max_shard_size="1GB")
        assert not (ckpt / "model.safetensors.index.json").exists() and not (ckpt / "tokenizer.model").exists()
        commit = _fake_hub_cache(tmp_path / "cache", "tiny-org/single", ckpt)
        with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
            shards = split_checkpoint(
                "tiny-org/single", tmp_path / "shards", cache_dir=tmp_path / "cache", progress=False
            )
        assert "The hub cannot be reached (ConnectError)" in caplog.text
        assert json.loads((shards / "manifest.json").read_text())["source"]["revision"] == commit
        assert (shards / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
        assert hub_http.time.slept < 30  # one lookup's retries (1 + 2 + 4 + 8 + 8 s), not one per absent file
        assert _exact(ckpt, shards)

        config_only = tmp_path / "config-only"
        config_only.mkdir()
        shutil.copy(ckpt / "config.json", config_only)
        _fake_hub_cache(tmp_path / "cache", "tiny-org/config-only", config_only)
        with pytest.raises(FileNotFoundError, match=r"has no weights in the hub cache, and the hub cannot be reached"):
            split_checkpoint("tiny-org/config-only", tmp_path / "none", cache_dir=tmp_path / "cache", progress=False)
    finally:
        closed.close()


def test_an_index_naming_shards_in_a_subfolder_is_split_as_transformers_loads_it(tmp_path):
    """An index whose `weight_map` names its shards in a subfolder (`weights/model-00001-of-00006.safetensors`), or
    with `./` parts: transformers loads it (it refuses only absolute names and `..`); the split refused every name with
    a `/`. Split now, with the loaded model's logits; a name that leaves the folder is still refused."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    (ckpt / "weights").mkdir()
    for name in set(index["weight_map"].values()):
        (ckpt / name).rename(ckpt / "weights" / name)
    index["weight_map"] = {k: f"weights/{v}" for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    assert _exact(ckpt, split_checkpoint(ckpt, tmp_path / "shards", progress=False))
    # `./` parts, as a path resolves them (transformers loads such an index; the split refused it, saying the file
    # was not in the index's folder)
    index["weight_map"] = {k: f"./weights/./{v.split('/')[1]}" for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    assert _exact(ckpt, split_checkpoint(ckpt, tmp_path / "dotted", progress=False))
    key = next(iter(index["weight_map"]))
    for name in ("weights/../../outside.safetensors", "./", "/etc/model.safetensors", "weights//x.safetensors"):
        index["weight_map"][key] = name
        index_path.write_text(json.dumps(index))
        with pytest.raises(ShardFileError, match="which is not a .safetensors/.bin file in the index's folder"):
            split_checkpoint(ckpt, tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()


def _dealt_out(ckpt, files: int) -> dict[str, str]:
    """Store the sharded checkpoint `ckpt`'s tensors dealt out across `files` safetensors files, in the model's order
    (the i-th in file i % files): each file holds tensors of early and late layers. Returns its weight map."""
    from safetensors.torch import load_file, save_file

    index_path = ckpt / "model.safetensors.index.json"
    state = {}
    for name in sorted(set(json.loads(index_path.read_text())["weight_map"].values())):
        state.update(load_file(str(ckpt / name)))
        (ckpt / name).unlink()
    layer = re.compile(r"\.layers\.(\d+)\.")
    keys = sorted(state, key=lambda k: (int(m[1]) if (m := layer.search(k)) else -1, k))
    weight_map = {k: f"model-{i % files + 1:05d}-of-{files:05d}.safetensors" for i, k in enumerate(keys)}
    for name in sorted(set(weight_map.values())):
        save_file({k: state[k] for k in keys if weight_map[k] == name}, str(ckpt / name), metadata={"format": "pt"})
    index_path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def _count_held_safetensors(monkeypatch) -> list[int]:
    """A list the split's `_Source._open` appends to, at each call, the safetensors files the source holds open."""
    from hf_layerstream import split as split_mod

    held = []
    real_open = split_mod._Source._open

    def _open(self, filename):
        handle = real_open(self, filename)
        held.append(sum(f.endswith(".safetensors") for f in self._handles))
        return handle

    monkeypatch.setattr(split_mod._Source, "_open", _open)
    return held


def test_a_split_holds_open_the_safetensors_files_of_the_layer_it_writes_and_the_next_only(tmp_path, monkeypatch):
    """safetensors 0.9 holds a file descriptor for each file open with `safe_open` (0.8: a map only). The split kept
    every source file open that a unit still to write reads: one for each file of a checkpoint whose files each hold
    tensors of early and late layers (a tiny Llama of 80 layers dealt out across 300 files: 276 open at once, and
    "Too many open files" under macOS's default limit of 256). It keeps open those the unit it writes and the next
    one read, the others opened again when read; the same layers."""

    layers = 12
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", num_hidden_layers=layers)
    weight_map = _dealt_out(ckpt, 40)
    reads = [{f for k, f in weight_map.items() if f".layers.{i}." in k} for i in range(layers)]
    reads.append({f for k, f in weight_map.items() if ".layers." not in k})  # (the resident unit, written last)
    bound = max(len(a | b) for a, b in zip(reads, reads[1:]))
    held = _count_held_safetensors(monkeypatch)
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    assert held and max(held) <= bound < len(set(weight_map.values())), (max(held), bound)
    assert _exact(ckpt, shards)


def test_a_split_holds_open_at_most_its_cap_of_safetensors_files_where_one_layer_reads_more(tmp_path, monkeypatch):
    """A unit reading more files than the limit on open files (a layer stored an expert per file) failed under
    safetensors 0.9 (a file descriptor for each open file) whatever the split closed between units: the split holds
    `_MAX_OPEN` open at most, the least recently read closed first (here the cap is 3 and each layer reads 9 files);
    the same layers."""
    from hf_layerstream import split as split_mod

    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", num_hidden_layers=2)
    weight_map = _dealt_out(ckpt, 40)
    per_layer = min(len({f for k, f in weight_map.items() if f".layers.{i}." in k}) for i in range(2))
    cap = 3
    monkeypatch.setattr(split_mod, "_MAX_OPEN", cap)
    held = _count_held_safetensors(monkeypatch)
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    assert per_layer > cap and held and max(held) == cap, (per_layer, max(held))
    assert _exact(ckpt, shards)


def test_a_split_of_many_files_each_holding_early_and_late_layers_fits_a_low_open_files_limit(tmp_path):
    """The split under a limit of 48 open files (`ulimit -n`, in a child process) of a checkpoint dealt out across 64
    files (see the test above): with safetensors 0.9, which holds a file descriptor per open file, it failed with
    "Too many open files", holding one for each of them."""
    resource = pytest.importorskip("resource")
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", num_hidden_layers=16)
    _dealt_out(ckpt, 64)
    limit, hard = 48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip("the hard limit on open files is below the one set")
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[3]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "from hf_layerstream import split_checkpoint\n"
        "split_checkpoint(sys.argv[1], sys.argv[2], progress=False)\n"
    )
    shards = tmp_path / "shards"
    out = run_python(code, ckpt, shards, limit)
    assert out.returncode == 0, out.stderr[-2000:]
    assert _exact(ckpt, shards)


def _lazy_hub_repo(monkeypatch, remote, cache_dir, repo_id, commit, *, interrupt_at=None, held=None):
    """A hub repo holding the checkpoint folder `remote`, none of it in the hub cache yet: each file is copied into the
    cache as `hf_hub_download` fetches it, as huggingface_hub stores it (a blob, and a symlink to it in the commit's
    snapshot; the first fetch of `interrupt_at` raises KeyboardInterrupt instead). The hub lists the files' sizes and
    gives their headers, as its API does. `held`, a list: each fetch appends the weight files in the cache then.
    Returns the list of the files fetched, as they are."""
    import huggingface_hub
    import transformers.utils.hub
    from huggingface_hub.errors import EntryNotFoundError
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import SafetensorsFileMetadata, TensorInfo

    import hf_layerstream.split

    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    fetched, interrupted = [], []

    def hf_hub_download(repo_id, filename, revision=None, token=None, cache_dir=None, **kwargs):
        if not (remote / filename).is_file():
            raise EntryNotFoundError(f"{filename} not found")
        if not (snapshot / filename).exists():
            if filename == interrupt_at and interrupt_at not in interrupted:
                interrupted.append(filename)
                raise KeyboardInterrupt
            fetched.append(filename)
            blob = repo / "blobs" / hashlib.sha256((remote / filename).read_bytes()).hexdigest()
            shutil.copy(remote / filename, blob)
            (snapshot / filename).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / filename).unlink(missing_ok=True)  # (a dangling link: its blob was removed)
            (snapshot / filename).symlink_to(os.path.relpath(blob, (snapshot / filename).parent))
            if held is not None and filename.endswith(".safetensors"):
                held.append(sorted(p.name for p in snapshot.glob("*.safetensors") if p.exists()))
        return str(snapshot / filename)

    def get_paths_info(self, repo_id, paths, *, revision=None, token=None, **kwargs):
        assert revision == commit  # (the commit config.json was fetched at, not a branch that may have moved since)
        return [RepoFile(path=p, size=(remote / p).stat().st_size, oid="0" * 40) for p in paths]

    def parse_safetensors_file_metadata(self, repo_id, filename, *, revision=None, token=None, **kwargs):
        assert revision == commit
        if not (remote / filename).is_file():
            raise EntryNotFoundError(f"{filename} not found")
        data = (remote / filename).read_bytes()
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        return SafetensorsFileMetadata(
            metadata=header.pop("__metadata__", {}),
            tensors={
                k: TensorInfo(dtype=v["dtype"], shape=v["shape"], data_offsets=tuple(v["data_offsets"]))
                for k, v in header.items()
            },
        )

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "get_paths_info", get_paths_info)
    monkeypatch.setattr(huggingface_hub.HfApi, "parse_safetensors_file_metadata", parse_safetensors_file_metadata)
    monkeypatch.setattr(  # (the hub's listing of the repo's files, for its license files)
        huggingface_hub.HfApi,
        "list_repo_files",
        lambda self, *args, **kwargs: [str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file()],
    )
    # (the hub's listing of `additional_chat_templates/`: this repo has none)
    monkeypatch.setattr(transformers.utils.hub, "list_repo_templates", lambda *args, **kwargs: [])
    monkeypatch.setattr(hf_layerstream.split, "cannot_reach_hub", lambda *args: None)  # (the hub answers)
    return fetched


@pytest.mark.parametrize("fault", ["key in two files", "key left out"])
def test_a_hub_repo_s_files_count_not_its_index_as_transformers_reads_them(tmp_path, monkeypatch, fault):
    """A hub repo not in the cache is planned from its index (no header is on this machine yet); once the files the
    split reads are fetched, it is planned from what they hold, as transformers loads them: here a tensor the index
    gives the first file is held by the last one too, with other values, which transformers loads; or the index
    leaves out a tensor its file holds (the split refused the repo as lacking it, before fetching anything)."""
    from safetensors.torch import load_file, save_file

    remote = _models.save_tiny_checkpoint("llama", tmp_path / "remote", seed=1)
    index_path = remote / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    files = sorted(set(weight_map.values()))
    name = next(k for k in weight_map if weight_map[k] == files[0] and ".layers." in k)
    if fault == "key in two files":
        last = load_file(str(remote / files[-1]))
        last[name] = torch.randn_like(load_file(str(remote / files[0]))[name])
        save_file(last, str(remote / files[-1]), metadata={"format": "pt"})
    else:
        del weight_map[name]
        index_path.write_text(json.dumps(index))
    fetched = _lazy_hub_repo(monkeypatch, remote, tmp_path / "cache", "tiny-org/lazy", "c" * 40)
    split_checkpoint("tiny-org/lazy", tmp_path / "shards", cache_dir=tmp_path / "cache", progress=False)
    assert sorted(f for f in fetched if f.endswith(".safetensors")) == files
    assert _exact(remote, tmp_path / "shards")


def test_compression_of_a_hub_repo_stored_in_float64_is_refused_once_its_files_are_fetched(tmp_path, monkeypatch):
    """A hub repo whose weights are stored in float64 under a config saying bfloat16, not in the cache: its stored
    dtypes are known only once the files are fetched, and `compression` without `dtype` left them unquantized under a
    manifest saying 4-bit. Refused then, before a layer is written, as a local folder is."""
    pytest.importorskip("bitsandbytes")
    remote = _models.save_tiny_checkpoint("llama", tmp_path / "remote", dtype=torch.float64)
    config = json.loads((remote / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (remote / "config.json").write_text(json.dumps(config))
    fetched = _lazy_hub_repo(monkeypatch, remote, tmp_path / "cache", "tiny-org/f64", "d" * 40)
    with pytest.raises(ValueError, match=r"stores weights in float64, which it would leave unquantized"):
        split_checkpoint("tiny-org/f64", tmp_path / "shards", cache_dir=tmp_path / "cache", compression="4bit")
    assert any(f.endswith(".safetensors") for f in fetched)
    assert not list((tmp_path / "shards").glob("layers/*")) and not (tmp_path / "shards" / "manifest.json").exists()


@pytest.mark.parametrize("remove_from_cache", [False, True])
def test_a_hub_repo_of_other_shapes_than_its_config_is_refused_before_a_layer_is_written(
    tmp_path, monkeypatch, remove_from_cache
):
    """A hub repo not in the cache whose config.json says other sizes than its weights have: its shapes are known
    only once the files are fetched (or, with `remove_from_cache`, their headers read from the hub). The split wrote
    it, to be refused only when a model streamed it; now it is refused then, before the progress record or a layer,
    as a local folder is (before anything), and with `remove_from_cache` before a weight file is downloaded."""
    remote = _models.save_tiny_checkpoint("llama", tmp_path / "remote")
    config = json.loads((remote / "config.json").read_text())
    config["intermediate_size"] *= 2
    (remote / "config.json").write_text(json.dumps(config))
    fetched = _lazy_hub_repo(monkeypatch, remote, tmp_path / "cache", "tiny-org/wide", "e" * 40)
    out = tmp_path / "shards"
    with pytest.raises(ShardDirError, match=r"stores 9 tensors in another shape .* does not match its config.json"):
        split_checkpoint(
            "tiny-org/wide", out, cache_dir=tmp_path / "cache", progress=False, remove_from_cache=remove_from_cache
        )
    assert any(f.endswith(".safetensors") for f in fetched) != remove_from_cache
    assert not list(out.glob("layers/*")) and not (out / ".progress.json").exists()
    assert not (out / "manifest.json").exists()


def test_hub_repo_fetched_during_the_split_resumes_and_reruns(tmp_path, monkeypatch):
    """A sharded hub repo not in the cache: the weight files the split reads are fetched before it writes a layer. A
    split interrupted while fetching them, then one interrupted while writing, resume, and running the finished split
    again finds it done, although the cache now holds files it did not hold the first time (that changed the
    recorded source before, and both were refused)."""
    remote = _models.save_tiny_checkpoint("llama", tmp_path / "remote", num_hidden_layers=4)
    files = sorted(set(json.loads((remote / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(files) >= 2
    commit = "c" * 40
    fetched = _lazy_hub_repo(monkeypatch, remote, tmp_path / "cache", "tiny-org/lazy", commit, interrupt_at=files[1])
    out = tmp_path / "shards"
    with pytest.raises(KeyboardInterrupt):
        split_checkpoint("tiny-org/lazy", out, cache_dir=tmp_path / "cache", progress=False)
    assert files[0] in fetched and files[1] not in fetched
    restore = _interrupt_at(monkeypatch, "layers.2")
    with pytest.raises(KeyboardInterrupt):
        split_checkpoint("tiny-org/lazy", out, cache_dir=tmp_path / "cache", progress=False)
    restore()
    assert json.loads((out / ".progress.json").read_text())["units"]  # (layers 0 and 1)
    split_checkpoint("tiny-org/lazy", out, cache_dir=tmp_path / "cache", progress=False)  # resumes
    stamp = (out / "manifest.json").stat().st_mtime_ns
    split_checkpoint("tiny-org/lazy", out, cache_dir=tmp_path / "cache", progress=False)  # done: nothing to do
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "manifest.json").read_text())["source"]["revision"] == commit
    assert sorted(f for f in fetched if f.endswith(".safetensors")) == files  # (each once)
    assert _exact(remote, out)


def test_the_disk_space_check_counts_the_download_of_a_hub_repo(tmp_path, monkeypatch):
    """A hub repo's weight files not in the hub cache are downloaded there before a layer is written, and kept:
    huggingface_hub only warns when they do not fit. The check of the free space counted only what the split writes,
    so a disk with room for the split or the download, not both, passed it, and the split ran out of space after
    the download. Now the download counts where the hub cache is on the disk of `shard_dir` (it is refused before a
    file is fetched, saying why); on another disk, that disk must hold the download."""
    import errno

    from hf_layerstream import split as split_mod

    remote = _models.save_tiny_checkpoint("llama", tmp_path / "remote", num_hidden_layers=4)
    files = sorted(set(json.loads((remote / "model.safetensors.index.json").read_text())["weight_map"].values()))
    download = sum((remote / f).stat().st_size for f in files)
    free = {}  # the free space each check is told of, by the folder it asks about: the hub cache's, or another

    def told(path):
        cached = Path(path).resolve().is_relative_to((tmp_path / "cache").resolve())
        return type("U", (), {"free": free["cache" if cached else "shards"]})()

    monkeypatch.setattr(split_mod.shutil, "disk_usage", told)
    # what the split itself needs, as the check counts it for the same checkpoint in a local folder
    free["cache"] = free["shards"] = 0
    with pytest.raises(OSError, match="needs about") as local:
        split_checkpoint(remote, tmp_path / "local", progress=False)
    needs = float(re.search(r"needs about ([\d.]+) MiB more and", str(local.value)).group(1)) * 2**20
    assert download > 2**18  # (the test's premise: half the download and the margin below are less than all of it)

    fetched = _lazy_hub_repo(monkeypatch, remote, tmp_path / "cache", "tiny-org/lazy", "c" * 40)
    out = tmp_path / "shards"
    free["cache"] = free["shards"] = int(needs + 2**16 + download // 2)  # room for the split, not the download too
    with pytest.raises(OSError) as refused:
        split_checkpoint("tiny-org/lazy", out, cache_dir=tmp_path / "cache", progress=False)
    assert refused.value.errno == errno.ENOSPC
    cache = tmp_path / "cache" / "models--tiny-org--lazy" / "snapshots" / ("c" * 40)
    assert re.fullmatch(
        rf"Not enough disk space in {re.escape(str(out))}: the split needs about [\d.]+ MiB more, "
        rf"{re.escape(split_mod.size_text(download))} of it to download the {len(files)} weight files of tiny-org/lazy "
        rf"it reads that the hub cache lacks, into the cache there \({re.escape(str(cache))}\), and [\d.]+ MiB are "
        r"free\. Free some space or choose another `shard_dir`, or point the hub cache to another disk \(`cache_dir`, "
        r"or the HF_HUB_CACHE variable\); nothing was written",
        refused.value.strerror,
    )
    assert not [f for f in fetched if f.endswith(".safetensors")]  # (refused before the download)
    assert not list(out.glob("layers/*")) and not (out / "manifest.json").exists()

    # the hub cache on another disk: that disk must hold the download, the split's disk only the split
    monkeypatch.setattr(split_mod, "_same_disk", lambda a, b: False)
    free["cache"], free["shards"] = download - 1, int(needs + 2**16)
    with pytest.raises(OSError) as refused:
        split_checkpoint("tiny-org/lazy", out, cache_dir=tmp_path / "cache", progress=False)
    assert refused.value.strerror.startswith(
        f"Not enough disk space in the hub cache {cache} to download the {len(files)} weight files of tiny-org/lazy "
        f"the split reads that it lacks: they take {split_mod.size_text(download)} and "
        f"{split_mod.size_text(download - 1)} are free there."
    )
    assert not [f for f in fetched if f.endswith(".safetensors")]
    free["cache"] = download
    split_checkpoint("tiny-org/lazy", out, cache_dir=tmp_path / "cache", progress=False)
    assert sorted(f for f in fetched if f.endswith(".safetensors")) == files
    assert _exact(remote, out)


def test_a_single_file_hub_repo_is_downloaded_after_the_disk_space_check(tmp_path, monkeypatch):
    """A hub repo of one `model.safetensors` (transformers 5 saves up to 50 GB in one file): the split fetched it to
    learn that it is there and which tensors it holds, before the disk-space check, which then did not count it. Its
    header is read from the hub instead: the check counts the download, and refuses before it."""
    from hf_layerstream import split as split_mod

    remote = _models.save_tiny_checkpoint("llama", tmp_path / "remote", max_shard_size="1GB")
    assert (remote / "model.safetensors").is_file() and not (remote / "model.safetensors.index.json").exists()
    size = (remote / "model.safetensors").stat().st_size
    needs = _split_needs(monkeypatch, remote, tmp_path)
    fetched = _lazy_hub_repo(monkeypatch, remote, tmp_path / "cache", "tiny-org/single", "c" * 40)
    free = {"bytes": int(needs + 2**16 + size // 2)}
    monkeypatch.setattr(split_mod.shutil, "disk_usage", lambda p: type("U", (), {"free": free["bytes"]})())
    with pytest.raises(OSError, match=rf"{re.escape(split_mod.size_text(size))} of it to download the 1 weight file "):
        split_checkpoint("tiny-org/single", tmp_path / "a", cache_dir=tmp_path / "cache", progress=False)
    assert "model.safetensors" not in fetched
    free["bytes"] = int(needs + 2**16 + size)
    split_checkpoint("tiny-org/single", tmp_path / "a", cache_dir=tmp_path / "cache", progress=False)
    assert fetched.count("model.safetensors") == 1 and _exact(remote, tmp_path / "a")


def _split_needs(monkeypatch, ckpt, tmp_path) -> float:
    """The disk space (bytes, to about 5 KiB) the check counts for splitting the local checkpoint `ckpt`."""
    from hf_layerstream import split as split_mod

    with monkeypatch.context() as m:
        m.setattr(split_mod.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
        with pytest.raises(OSError, match="needs about") as refused:
            split_checkpoint(ckpt, tmp_path / "needs", progress=False)
    return float(re.search(r"needs about ([\d.]+) MiB more and", str(refused.value)).group(1)) * 2**20


def test_remove_from_cache_downloads_each_file_when_read_and_removes_it_once_written(tmp_path, monkeypatch):
    """`remove_from_cache=True`: the split is planned from the hub files' headers, read from the hub; each weight file
    is downloaded when a unit first reads it and deleted from the hub cache (its snapshot link and its blob) once
    every unit reading it is written, so the cache holds a few of them at a time, not the whole repo beside the
    split. The output is the same split; the disk-space check counts the most they take at once (without the
    option, all of them), and a blob another revision's snapshot links to stays."""
    import huggingface_hub

    from hf_layerstream import split as split_mod

    remote = _models.save_tiny_checkpoint("llama", tmp_path / "remote", num_hidden_layers=6)
    files = sorted(set(json.loads((remote / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(files) >= 6
    needs = _split_needs(monkeypatch, remote, tmp_path)
    held = []
    fetched = _lazy_hub_repo(monkeypatch, remote, tmp_path / "cache", "tiny-org/lazy", "c" * 40, held=held)
    repo = tmp_path / "cache" / "models--tiny-org--lazy"
    snapshot = repo / "snapshots" / ("c" * 40)
    # the first file is in the cache already, and another revision holds it too (the same blob)
    huggingface_hub.hf_hub_download("tiny-org/lazy", files[0])
    (repo / "snapshots" / ("e" * 40)).mkdir()
    (repo / "snapshots" / ("e" * 40) / files[0]).symlink_to(os.readlink(snapshot / files[0]))
    held.clear()

    free = {"bytes": 2**40}
    monkeypatch.setattr(split_mod.shutil, "disk_usage", lambda p: type("U", (), {"free": free["bytes"]})())
    out = split_checkpoint("tiny-org/lazy", tmp_path / "a", cache_dir=tmp_path / "cache", remove_from_cache=True)
    assert _exact(remote, out)
    assert sorted(f for f in fetched if f.endswith(".safetensors")) == files  # (each once)
    assert not [p for p in snapshot.glob("*.safetensors")]  # (links and blobs gone: only the side files' are left)
    assert {p.name for p in (repo / "blobs").iterdir()} == {
        os.path.basename(os.readlink(p)) for p in [*snapshot.iterdir(), repo / "snapshots" / ("e" * 40) / files[0]]
    }
    assert (repo / "snapshots" / ("e" * 40) / files[0]).read_bytes() == (remote / files[0]).read_bytes()
    most = max(sum((remote / f).stat().st_size for f in h) for h in held)
    total = sum((remote / f).stat().st_size for f in files)
    assert len(max(held, key=len)) <= len(files) // 2 and most < total / 2

    # the check counts what the cache holds at once: `most`; all the files without the option
    free["bytes"] = int(needs + 2**16 + most)
    split_checkpoint("tiny-org/lazy", tmp_path / "b", cache_dir=tmp_path / "cache", remove_from_cache=True)
    assert _exact(remote, tmp_path / "b")
    free["bytes"] = int(needs - 2**16 + most)
    with pytest.raises(OSError) as refused:
        split_checkpoint("tiny-org/lazy", tmp_path / "c", cache_dir=tmp_path / "cache", remove_from_cache=True)
    assert (
        f"more, {split_mod.size_text(most)} of it for the {len(files)} weight files of tiny-org/lazy it reads that "
        f"the hub cache lacks, downloaded into the cache there ({snapshot}) and removed as it goes (the most it holds "
        "at once), and "
    ) in refused.value.strerror
    free["bytes"] = int(needs + 2**16 + most)
    with pytest.raises(OSError, match=rf"{re.escape(split_mod.size_text(total))} of it to download the 11 weight"):
        split_checkpoint("tiny-org/lazy", tmp_path / "c", cache_dir=tmp_path / "cache")


def test_remove_from_cache_resumes_an_interrupted_split_and_frees_a_finished_one(tmp_path, monkeypatch):
    """A split with `remove_from_cache` interrupted part way leaves in the cache the files the units still to write
    read: the run that resumes it downloads only the others, each once in all, and removes every one. Run on a
    finished split whose repo the cache holds, it removes the files and writes nothing."""
    remote = _models.save_tiny_checkpoint("llama", tmp_path / "remote", num_hidden_layers=6)
    files = sorted(set(json.loads((remote / "model.safetensors.index.json").read_text())["weight_map"].values()))
    fetched = _lazy_hub_repo(monkeypatch, remote, tmp_path / "cache", "tiny-org/lazy", "c" * 40)
    snapshot = tmp_path / "cache" / "models--tiny-org--lazy" / "snapshots" / ("c" * 40)
    out = tmp_path / "shards"
    restore = _interrupt_at(monkeypatch, "layers.3")
    with pytest.raises(KeyboardInterrupt):
        split_checkpoint("tiny-org/lazy", out, cache_dir=tmp_path / "cache", remove_from_cache=True, progress=False)
    restore()
    left = {p.name for p in snapshot.glob("*.safetensors") if p.exists()}
    assert files[0] in left and files[-1] not in left and 0 < len(left) < len(files)
    split_checkpoint("tiny-org/lazy", out, cache_dir=tmp_path / "cache", remove_from_cache=True, progress=False)
    assert sorted(f for f in fetched if f.endswith(".safetensors")) == files
    assert not list(snapshot.glob("*.safetensors")) and _exact(remote, out)

    # interrupted at the last unit: only the files it reads are left, and a resume reads no other (offline, where
    # the others cannot be fetched, or online without the option, which fetched them all again and kept them)
    from huggingface_hub import constants

    for resumed, offline, option in [("r1", True, True), ("r2", False, False)]:
        restore = _interrupt_at(monkeypatch, "resident")
        with pytest.raises(KeyboardInterrupt):
            split_checkpoint("tiny-org/lazy", tmp_path / resumed, cache_dir=tmp_path / "cache", remove_from_cache=True)
        restore()
        left = {p.name for p in snapshot.glob("*.safetensors") if p.exists()}
        assert left == {files[0], files[-1]}  # (the embeddings', the head's)
        count = len(fetched)
        with monkeypatch.context() as m:
            m.setattr(constants, "HF_HUB_OFFLINE", offline)
            split_checkpoint(
                "tiny-org/lazy", tmp_path / resumed, cache_dir=tmp_path / "cache", remove_from_cache=option
            )
        assert len(fetched) == count and _exact(remote, tmp_path / resumed)
        assert {p.name for p in snapshot.glob("*.safetensors") if p.exists()} == (set() if option else left)

    split_checkpoint("tiny-org/lazy", tmp_path / "kept", cache_dir=tmp_path / "cache", progress=False)
    assert {p.name for p in snapshot.glob("*.safetensors")} == set(files)  # (without the option: all kept)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    split_checkpoint("tiny-org/lazy", out, cache_dir=tmp_path / "cache", remove_from_cache=True, progress=False)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp and not list(snapshot.glob("*.safetensors"))
    assert _exact(remote, tmp_path / "kept")


def _to_bin(ckpt):
    """Store the sharded checkpoint `ckpt`'s weights in pickled files instead (as many, with their index)."""
    from safetensors.torch import load_file

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    weight_map = {}
    for i, f in enumerate(files):
        state = load_file(str(ckpt / f))
        name = f"pytorch_model-{i + 1:05d}-of-{len(files):05d}.bin"
        torch.save(state, ckpt / name)
        weight_map.update(dict.fromkeys(state, name))
        (ckpt / f).unlink()
    (ckpt / "model.safetensors.index.json").unlink()
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sorted(set(weight_map.values()))


def test_remove_from_cache_removes_only_the_hub_caches_files_and_reads_only_what_it_needs(tmp_path, monkeypatch):
    """A snapshot entry the user made a link to a file of theirs outside the hub cache: the link goes, the file stays
    (it was deleted as if a blob). A file the index names that the split does not read, absent from the hub: not
    looked at, as without the option (its header was read, and the split failed on a 404). A repo of `.bin` files:
    each is downloaded before the first unit (its keys are in its pickle), which the disk-space check counts, and
    removed as the split goes."""
    from hf_layerstream import split as split_mod

    remote = _models.save_tiny_checkpoint("llama", tmp_path / "remote", num_hidden_layers=4)
    reference = shutil.copytree(remote, tmp_path / "reference")  # (loadable: without the file the hub lacks)
    _add_unused_weight_file(remote, write=False)
    files = sorted(f for f in set(_models.disk_keys(remote).values()) if f != "model-unused.safetensors")
    fetched = _lazy_hub_repo(monkeypatch, remote, tmp_path / "cache", "tiny-org/lazy", "c" * 40)
    snapshot = tmp_path / "cache" / "models--tiny-org--lazy" / "snapshots" / ("c" * 40)
    mine = tmp_path / "mine" / files[0]
    mine.parent.mkdir()
    shutil.copy(remote / files[0], mine)
    (snapshot / files[0]).symlink_to(mine)
    out = split_checkpoint("tiny-org/lazy", tmp_path / "a", cache_dir=tmp_path / "cache", remove_from_cache=True)
    assert _exact(reference, out) and sorted(f for f in fetched if f.endswith(".safetensors")) == files[1:]
    assert not os.path.lexists(snapshot / files[0]) and mine.read_bytes() == (remote / files[0]).read_bytes()
    assert not list(snapshot.glob("*.safetensors"))

    remote = _models.save_tiny_checkpoint("llama", tmp_path / "remote-bin", num_hidden_layers=4)
    files = _to_bin(remote)
    total = sum((remote / f).stat().st_size for f in files)
    needs = _split_needs(monkeypatch, remote, tmp_path)
    fetched = _lazy_hub_repo(monkeypatch, remote, tmp_path / "cache-bin", "tiny-org/bin", "d" * 40)
    snapshot = tmp_path / "cache-bin" / "models--tiny-org--bin" / "snapshots" / ("d" * 40)
    free = {"bytes": int(needs + total - 2**16)}
    monkeypatch.setattr(split_mod.shutil, "disk_usage", lambda p: type("U", (), {"free": free["bytes"]})())
    with pytest.raises(OSError, match=rf"more, {re.escape(split_mod.size_text(total))} of it for the {len(files)} "):
        split_checkpoint("tiny-org/bin", tmp_path / "b", cache_dir=tmp_path / "cache-bin", remove_from_cache=True)
    assert not fetched or not any(f.endswith(".bin") for f in fetched)
    free["bytes"] = int(needs + total + 2**16)
    split_checkpoint("tiny-org/bin", tmp_path / "b", cache_dir=tmp_path / "cache-bin", remove_from_cache=True)
    assert _exact(remote, tmp_path / "b") and sorted(f for f in fetched if f.endswith(".bin")) == files
    assert not list(snapshot.glob("*.bin"))


def test_remove_from_cache_refuses_a_local_folder(tmp_path):
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    before = sorted(p.name for p in ckpt.iterdir())
    with pytest.raises(ValueError, match=r"`source` .* is a local folder, which the split never modifies"):
        split_checkpoint(ckpt, tmp_path / "shards", remove_from_cache=True, progress=False)
    assert not (tmp_path / "shards").exists() and sorted(p.name for p in ckpt.iterdir()) == before


def test_hub_repo_id_offline_and_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"HF_HUB_OFFLINE.*not in the hub cache") as raised:
        split_checkpoint("nobody/nothing", tmp_path / "shards", cache_dir=tmp_path / "empty", progress=False)
    assert not (tmp_path / "shards").exists()
    # a name that may be a misspelt folder as well: the error says no such folder exists, where it looked
    assert str(raised.value).startswith(
        f"`source` 'nobody/nothing' is no local folder ({Path.cwd() / 'nobody' / 'nothing'} does not exist), and as a hub repo: Cannot fetch config.json"
    )
    # the download it names is of this repo, into the hub cache given (it said `hf download REPO`: into the default
    # cache, where the split does not look)
    assert f"(`hf download nobody/nothing --cache-dir {tmp_path / 'empty'}`)" in str(raised.value)


def _add_unused_weight_file(ckpt, *, write=True, name="model-unused.safetensors"):
    """Name in the checkpoint's index a weight file that holds only a tensor the model does not use (as a
    vision-language checkpoint's vision shards are to a text-only split); returns its path."""
    from safetensors.torch import save_file

    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    path = ckpt / name
    index["weight_map"]["vision_tower.unused.weight"] = path.name
    index_path.write_text(json.dumps(index))
    if write:
        save_file({"vision_tower.unused.weight": torch.ones(4, 4)}, path)
    return path


def test_a_local_checkpoint_lacking_a_weight_file_is_refused_before_anything_is_written(tmp_path):
    """A sharded checkpoint whose index names a file the folder lacks (a download or copy not finished): refused up
    front, naming the file and the cause. The split found it missing only as it reached the file, layers already
    written, and called the folder "not a transformers checkpoint folder"; once the download was completed, the run
    that should resume was refused as a split of another source (the identity had left the file out)."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", num_hidden_layers=4)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    late = index["weight_map"]["model.layers.2.mlp.down_proj.weight"]
    assert late != index["weight_map"]["model.layers.0.mlp.down_proj.weight"]
    (ckpt / late).rename(tmp_path / late)
    out = tmp_path / "shards"
    with pytest.raises(FileNotFoundError, match="looks incomplete") as info:
        split_checkpoint(ckpt, out, progress=False)
    assert late in str(info.value) and "not a transformers checkpoint" not in str(info.value)
    assert not out.exists()
    (tmp_path / late).rename(ckpt / late)  # the download completed
    split_checkpoint(ckpt, out, progress=False)
    assert _exact(ckpt, out)


def test_the_first_weight_file_read_for_the_dtype_named_when_absent(tmp_path):
    """With no dtype in config.json or the index, the dtype `from_pretrained(dtype="auto")` loads at is read from
    the first weight file, which may hold only unused tensors: absent, it is named as a download not finished (the
    folder was called "not a transformers checkpoint folder")."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    del config["dtype"]
    (ckpt / "config.json").write_text(json.dumps(config))
    _add_unused_weight_file(ckpt, write=False, name="model-00000-unused.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00000-unused.safetensors, which its checkpoint index names"):
        split_checkpoint(ckpt, tmp_path / "shards", progress=False)


def test_a_weight_file_holding_only_unused_tensors_may_be_absent_or_arrive_later(tmp_path, monkeypatch):
    """The split does not read a file that holds only tensors the model does not use, so it may be absent, and its
    arrival changes nothing: the interrupted split resumes and the finished one is found done (its content counted
    in the source's identity once present, and the resume was refused as another source's)."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", num_hidden_layers=4)
    unused = _add_unused_weight_file(ckpt, write=False)
    out = tmp_path / "shards"
    restore = _interrupt_at(monkeypatch, "layers.2")
    with pytest.raises(KeyboardInterrupt):
        split_checkpoint(ckpt, out, progress=False)
    restore()
    _add_unused_weight_file(ckpt)
    assert unused.is_file()
    split_checkpoint(ckpt, out, progress=False)  # resumes
    assert _exact(ckpt, out)  # (`from_pretrained` needs every file the index names)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    unused.unlink()
    split_checkpoint(ckpt, out, progress=False)  # done: nothing to do
    assert (out / "manifest.json").stat().st_mtime_ns == stamp


def test_a_shard_directory_given_as_the_source_is_named_so(checkpoints, tmp_path):
    """Splitting a shard directory (a user re-splitting with other options) said it had no weights, expecting
    `model.safetensors` and the rest: it says what the folder is, and nothing is written."""
    _, shards = checkpoints("llama")
    with pytest.raises(FileNotFoundError, match=r"is a shard directory \(it holds manifest\.json\), not a checkpoint"):
        split_checkpoint(shards, tmp_path / "again", progress=False)
    assert not (tmp_path / "again").exists()


def test_a_source_without_a_tokenizer_is_split_with_a_warning(tmp_path, caplog):
    """A checkpoint without tokenizer files split without a word, and the split's use failed later with
    transformers' unrelated "needs sentencepiece or tiktoken" text: the split warns, naming the way out."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    with caplog.at_level(logging.WARNING, logger="hf_layerstream.split"):
        split_checkpoint(ckpt, tmp_path / "with", progress=False)
    assert "has no tokenizer files" not in caplog.text
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (ckpt / name).unlink()
    with caplog.at_level(logging.WARNING, logger="hf_layerstream.split"):
        shards = split_checkpoint(ckpt, tmp_path / "without", progress=False)
    assert f"{ckpt} has no tokenizer files: the split has none either" in caplog.text
    assert "`--tokenizer` for `hf-layerstream generate`" in caplog.text
    assert _exact(ckpt, shards)


def test_missing_local_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing local checkpoint folder"):
        split_checkpoint(tmp_path / "nope", tmp_path / "shards")
    # a file of a checkpoint (its weights, its config.json) was "neither an existing local checkpoint folder nor a hub
    # repo id", though it exists: named as a file, with its folder to pass, as an `adapter` file is
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    for name in ("config.json", "model.safetensors.index.json"):
        with pytest.raises(FileNotFoundError) as refused:
            split_checkpoint(ckpt / name, tmp_path / "shards")
        assert str(refused.value) == (
            f"`source` {ckpt / name} is a file, not a checkpoint folder: pass the folder that holds config.json and "
            f"the weight files ({ckpt}, if it is this file's)."
        )
    assert not (tmp_path / "shards").exists()


# --- errors before any hook -----------------------------------------------------------------------------------------


def _untouched(model):
    return all(p.is_meta for p in model.parameters()) and not any(hasattr(m, "_hf_hook") for m in model.modules())


def _llama_model():
    return build_meta_model(_models.make_config("llama"))


def test_a_relative_shard_dir_keeps_working_after_the_working_directory_changes(checkpoints, monkeypatch):
    """The layer files are opened as they are needed: a shard directory given relative to the working directory
    still streams after the process changed it (a server, a notebook's `%cd`)."""
    ckpt, shards = checkpoints("llama")
    ref = _models.load_reference(ckpt)
    ids = torch.tensor([[1, 5, 9, 22, 40]])
    monkeypatch.chdir(shards.parent)
    model = streamed_model(ckpt, shards.name, max_memory={"cpu": 0}, prefetch=0)  # (every layer from its file)
    monkeypatch.chdir("/")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    disable_layer_streaming(model)


def test_a_shard_dir_under_home_is_found_as_the_split_wrote_it(checkpoints, monkeypatch, tmp_path):
    """`split_checkpoint(src, "~/m.layers")` writes under the home folder; `enable_layer_streaming(model, "~/m.layers")`
    said that path did not exist (it looked for a folder named `~`), and so did `ShardDirectory`."""
    ckpt, shards = checkpoints("llama")
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(shards, tmp_path / "m.layers")
    assert ShardDirectory("~/m.layers").path == tmp_path / "m.layers"
    model = streamed_model(ckpt, "~/m.layers", max_memory={"cpu": 0}, prefetch=0)
    ids = torch.tensor([[1, 5, 9, 22, 40]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, _models.load_reference(ckpt)(ids).logits)
    disable_layer_streaming(model)


def test_error_shard_dir_missing(tmp_path):
    model = _llama_model()
    with pytest.raises(FileNotFoundError, match=r"does not exist; create it with `split_checkpoint"):
        enable_layer_streaming(model, tmp_path / "missing")
    assert _untouched(model)


def test_error_not_a_shard_dir(tmp_path):
    model = _llama_model()
    with pytest.raises(ShardDirError, match=r"has no manifest.json, so it is not a shard directory"):
        enable_layer_streaming(model, tmp_path)
    assert _untouched(model)


def test_error_shards_of_another_model_layer_count(checkpoints):
    _, shards = checkpoints("llama")
    model = build_meta_model(_models.make_config("llama", num_hidden_layers=5))
    with pytest.raises(ShardDirError, match=r"holds 3 decoder layers but the model has 5"):
        enable_layer_streaming(model, shards)
    assert _untouched(model)


def test_error_shards_of_another_model_names(checkpoints):
    _, shards = checkpoints("mistral")
    model = build_meta_model(_models.make_config("qwen3"))  # same depth, q_norm/k_norm extra
    with pytest.raises(ShardDirError, match=r"does not match the model .*missing"):
        enable_layer_streaming(model, shards)
    assert _untouched(model)


def test_error_shards_of_another_model_shapes(checkpoints):
    _, shards = checkpoints("llama")
    model = build_meta_model(_models.make_config("llama", intermediate_size=96))
    with pytest.raises(ShardDirError, match=r"with shape \[128, 64\] but the model expects \[96, 64\]"):
        enable_layer_streaming(model, shards)
    assert _untouched(model)


def test_error_shards_of_another_model_dtype(checkpoints):
    """A float tensor stored where the model has an integer buffer (or the reverse) is another model's."""
    from hf_layerstream.stream import _check_match

    _, shards = checkpoints("llama")
    model = _llama_model()
    sd = ShardDirectory(shards)
    sd.manifest.units["layers.1"].tensors["model.layers.1.mlp.up_proj.weight"].dtype = torch.int8
    from hf_layerstream.modeling import find_layer_stack

    with pytest.raises(ShardDirError, match=r"stores 'model.layers.1.mlp.up_proj.weight' as torch.int8"):
        _check_match(model, find_layer_stack(model), sd)


def test_error_model_without_decoder_layers(checkpoints):
    _, shards = checkpoints("llama")

    class NoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = _models.make_config("llama")
            self.proj = torch.nn.Linear(4, 4, device="meta")

    with pytest.raises(ValueError, match="Found no decoder-layer stack in NoLayers"):
        enable_layer_streaming(NoLayers(), shards)
    model = NoLayers()  # (layers of a class transformers does not mark: named, CTRL's and GPT-1's were not)
    model.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4, device="meta") for _ in range(3))
    with pytest.raises(ValueError, match="Its `blocks` holds 3 `Linear`, a class transformers marks neither way"):
        enable_layer_streaming(model, shards)


def test_error_not_a_model(checkpoints):
    _, shards = checkpoints("llama")
    with pytest.raises(TypeError, match="must be a transformers PreTrainedModel"):
        enable_layer_streaming("not a model", shards)


def test_error_truncated_shard_names_the_file(checkpoints, tmp_path):
    _, shards = checkpoints("llama")
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    victim = copy / "layers" / "00001.safetensors"
    victim.write_bytes(victim.read_bytes()[:-100])
    model = _llama_model()
    with pytest.raises(ShardFileError, match=r"00001.safetensors has \d+ bytes but the manifest records"):
        enable_layer_streaming(model, copy)
    assert _untouched(model)


def test_error_bad_arguments(checkpoints):
    _, shards = checkpoints("llama")
    model = _llama_model()
    with pytest.raises(ValueError, match="`prefetch` must be a non-negative int"):
        enable_layer_streaming(model, shards, prefetch=-1)
    with pytest.raises(TypeError, match="`keep_in_page_cache` must be True, False or None"):
        enable_layer_streaming(model, shards, keep_in_page_cache="yes")
    with pytest.raises(ValueError, match="`max_memory` got the size 'lots'"):
        enable_layer_streaming(model, shards, max_memory={"cpu": "lots"})
    with pytest.raises(ValueError, match="not a valid torch device"):
        enable_layer_streaming(model, shards, device="gpu0")
    with pytest.raises(ValueError, match="`dtype` 'fp16' is not a torch dtype name"):
        enable_layer_streaming(model, shards, dtype="fp16")
    # (named as given, with the values taken)
    for dtype, shown in ((torch.int8, "torch.int8"), ("int8", "'int8'"), ("torch.bool", "'torch.bool'")):
        with pytest.raises(ValueError) as info:
            enable_layer_streaming(model, shards, dtype=dtype)
        assert str(info.value) == (
            f"`dtype` {shown} is not a floating-point dtype: pass float32, bfloat16, float16 or float64 (for 8-bit or "
            "4-bit weights, `compression`)."
        )
    with pytest.raises(TypeError, match="`dtype` must be a floating-point torch.dtype or its name"):
        enable_layer_streaming(model, shards, dtype=16)
    # (floating, but no model is built at them: transformers' default dtype refused them with a TypeError)
    for dtype in (torch.float8_e4m3fn, "float8_e5m2"):
        with pytest.raises(ValueError, match=r"`dtype` float8_e\w+ is not a dtype a model is built at: pass float32"):
            enable_layer_streaming(model, shards, dtype=dtype)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here; pass device='cpu'"):
            enable_layer_streaming(model, shards, device="cuda")
    assert _untouched(model)


def test_an_argument_of_another_type_is_a_type_error_and_a_bad_value_of_its_type_a_value_error(checkpoints, tmp_path):
    """Python's convention, which the flags and paths followed and the other arguments did not: another type than an
    argument takes is a `TypeError` (`keep_in_page_cache="yes"`, `prefetch="3"`, `dtype=16`, `adapter=5` were a
    `ValueError`), a value of its type out of range a `ValueError` (`prefetch=-1`). Not a class that is both."""
    from hf_layerstream import attaching_adapters, configure_draft, generate_batch, measure_sweeps

    ckpt, shards = checkpoints("llama")
    model = _llama_model()
    wrong_types = {
        "device": (1.5, True, [0]),
        "dtype": (16, [torch.float32]),
        "max_memory": ({"cpu": [1]}, {"cpu": True}, {None: "1GiB"}, {1.5: "1GiB"}, {True: "1GiB"}),
        "reserve": (True, [1]),
        "prefetch": ("3", 2.0, True),
        "keep_in_page_cache": ("yes", 1),
        "dequantize": (5, True),
    }
    for name, values in wrong_types.items():
        for value in values:
            with pytest.raises(TypeError, match=f"`{name}`") as e:
                enable_layer_streaming(model, shards, **{"device": "cpu", name: value})
            assert not isinstance(e.value, ValueError), (name, value)
    for name, value in (("prefetch", -1), ("dequantize", "rows"), ("dtype", "int8"), ("device", "gpu0")):
        with pytest.raises(ValueError) as e:
            enable_layer_streaming(model, shards, **{"device": "cpu", name: value})
        assert not isinstance(e.value, TypeError), (name, value)
    assert _untouched(model)
    for kwargs in (
        {"compression": 4},
        {"compression": "4bit", "quant_type": 5},
        {"compression": "4bit", "blocksize": "64"},
        {"blocksize": 64.0},
        {"dtype": 16},
        {"model_class": 5},
        {"adapter": 5},
        {"adapter": [5]},
        {"adapter": "a", "adapter_revision": 5},
        {"adapter": ["a"], "adapter_revision": [5]},
    ):
        with pytest.raises(TypeError) as e:
            split_checkpoint(ckpt, tmp_path / "split", progress=False, **kwargs)
        assert not isinstance(e.value, ValueError) and not (tmp_path / "split").exists(), kwargs
    tok = AutoTokenizer.from_pretrained(shards)
    for call in (
        lambda: measure_sweeps(model, [[1, 2]], max_new_tokens="4"),
        lambda: measure_sweeps(model, [[1, 2]], prompt_lookup_num_tokens=True),
        lambda: configure_draft(model, num_assistant_tokens=8.0),
        lambda: configure_draft(model, schedule=5),
        lambda: configure_draft(model, confidence_threshold="0.5"),
        lambda: generate_batch(model, tok, ["Hi"], batch_size="8", progress=False),
        lambda: disable_layer_streaming(str(shards)),
        lambda: attaching_adapters(None).__enter__(),
    ):
        with pytest.raises(TypeError) as e:
            call()
        assert not isinstance(e.value, ValueError)


def test_get_streaming_state_of_something_else_than_a_model_is_a_type_error(checkpoints):
    """`get_streaming_state` took anything and returned `None`, as for a model not streaming: passed a `pipeline` (or
    the shard directory's path), the caller read "streaming is not enabled", where the other public functions raise
    `TypeError` for a `model` of another type. A model not streaming still gives `None`."""
    from types import SimpleNamespace

    _, shards = checkpoints("llama")
    model = _llama_model()
    for value, name in ((None, "NoneType"), (str(shards), "str"), (shards, type(shards).__name__)):
        with pytest.raises(
            TypeError, match=rf"^`model` must be a transformers model \(a torch.nn.Module\), got {name}\.$"
        ):
            get_streaming_state(value)
    pipe = SimpleNamespace(model=model)  # (what a `pipeline` holds the model as)
    with pytest.raises(TypeError, match=r"got SimpleNamespace; pass its `\.model`\.$"):
        get_streaming_state(pipe)
    with pytest.raises(TypeError, match=r"pass its `\.model`"):
        disable_layer_streaming(pipe)
    assert get_streaming_state(model) is None
    enable_layer_streaming(model, shards, device="cpu")
    assert get_streaming_state(model) is not None and get_streaming_state(model).shard_dir.path == shards
    disable_layer_streaming(model)
    assert get_streaming_state(model) is None


def test_reprs_of_the_state_plan_profile_and_shard_directory_are_short(checkpoints):
    """`repr(get_streaming_state(model))` was the dataclass's: the layer stack and every parameter (11.6 KB for a
    3-layer test model, a notebook cell's output of megabytes for a real one). The state, its plan, its profile and
    its shard directory now show a line each, the same length whatever the depth, naming what their users need."""
    reprs = {}
    for layers in (2, 6):
        _, shards = checkpoints("llama", num_hidden_layers=layers)
        model = build_meta_model(_models.make_config("llama", num_hidden_layers=layers))
        enable_layer_streaming(model, shards, device="cpu", max_memory={"cpu": 0}, prefetch=1, profile=True)
        state = get_streaming_state(model)
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
        reprs[layers] = {
            "state": repr(state),
            "plan": repr(state.plan),
            "profile": repr(state.profile),
            "shards": repr(state.shard_dir),
        }
        r = reprs[layers]
        assert r["state"].startswith("StreamingState(") and str(shards) in r["state"]
        assert f"{layers} layers" in r["state"] and "device=cpu" in r["state"] and "prefetch=1" in r["state"]
        assert "profile=on" in r["state"] and "Parameter" not in r["state"] and "Linear" not in r["state"]
        assert (
            r["plan"].startswith("ResidencyPlan(") and f"streamed={layers}" in r["plan"] and "prefetch=1" in r["plan"]
        )
        assert r["profile"].startswith("Profile(") and "forward_calls=2" in r["profile"]
        assert r["shards"] == f"ShardDirectory({str(shards)!r}, num_layers={layers})"
        assert repr(state.shard_dir.manifest).count("\n") == 0 and len(repr(state.shard_dir.manifest)) < 300
        disable_layer_streaming(model)
        assert "disabled" in repr(state)
    for name in ("state", "plan", "profile"):  # (the paths differ in length: the rest does not grow with depth)
        short, deep = (len(reprs[n][name]) - (len(str(shards)) if name == "state" else 0) for n in (2, 6))
        assert deep - short <= 2 and deep < 400, (name, reprs[6][name])


def test_an_empty_path_is_refused_not_read_as_the_current_directory(checkpoints, tmp_path, monkeypatch):
    """pathlib reads "" as "." (an unset variable's path): `split_checkpoint(source, "", overwrite=True)` wrote its
    config.json and layers into the current directory, and `enable_layer_streaming(model, "")` said the current
    directory "has no manifest.json". Refused, naming the argument, as `open("")` refuses it."""
    ckpt, shards = checkpoints("llama")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    message = "is an empty string, which names no path"
    with pytest.raises(ValueError, match=f"`shard_dir` {message}"):
        split_checkpoint(ckpt, "", overwrite=True, progress=False)
    with pytest.raises(ValueError, match=f"`source` {message}"):
        split_checkpoint("", tmp_path / "split", progress=False)
    with pytest.raises(ValueError, match=f"`cache_dir` {message}"):
        split_checkpoint(ckpt, tmp_path / "split", cache_dir="", progress=False)
    assert sorted(p.name for p in cwd.iterdir()) == ["notes.txt"] and not (tmp_path / "split").exists()
    model = _llama_model()
    with pytest.raises(ValueError, match=f"`shard_dir` {message}"):
        enable_layer_streaming(model, "", device="cpu")
    with pytest.raises(ValueError, match=f"`shard_dir` {message}"):
        ShardDirectory("")
    assert _untouched(model)


def test_a_path_or_revision_of_another_type_is_refused_naming_the_argument(checkpoints, tmp_path):
    """`split_checkpoint`'s `source`, `shard_dir` and `cache_dir` given something else than a path (None, an int,
    bytes) failed in pathlib, naming none of them ("expected str, bytes or os.PathLike object, not NoneType"), and a
    `revision` that is no string failed in huggingface_hub ("expected string or bytes-like object, got 'int'"), as
    it did through `enable_layer_streaming`: each is refused first, by name, as `ShardDirectory` refuses its path."""
    ckpt, shards = checkpoints("llama")
    out = tmp_path / "out"
    for value in (None, 5, str(ckpt).encode()):
        name = type(value).__name__
        with pytest.raises(TypeError, match=rf"^`source` must be a str or os.PathLike, got {name}\.$"):
            split_checkpoint(value, out, progress=False)
        with pytest.raises(TypeError, match=rf"^`shard_dir` must be a str or os.PathLike, got {name}\.$"):
            split_checkpoint(ckpt, value, progress=False)
        if value is not None:
            with pytest.raises(TypeError, match=rf"^`cache_dir` must be a str or os.PathLike or None, got {name}\.$"):
                split_checkpoint(ckpt, out, cache_dir=value, progress=False)
    for revision in (5, b"main"):
        refused = rf"^`revision` must be a branch, tag or commit \(a str\) or None, got {re.escape(repr(revision))}\.$"
        with pytest.raises(TypeError, match=refused):
            split_checkpoint("tiny-org/tiny", out, revision=revision, progress=False)
        with pytest.raises(TypeError, match=refused):
            enable_layer_streaming(_llama_model(), "tiny-org/tiny.layers", revision=revision)
    # a `token` that is no str, bool or None: passed to huggingface_hub for a hub repo, taken silently for a folder
    for token in (5, {"token": "hf_x"}):
        refused = rf"^`token` must be a str, True, False or None, got {type(token).__name__}\.$"
        for source in ("tiny-org/tiny", ckpt):
            with pytest.raises(TypeError, match=refused):
                split_checkpoint(source, out, token=token, progress=False)
        for where in ("tiny-org/tiny.layers", shards):
            with pytest.raises(TypeError, match=refused):
                enable_layer_streaming(_llama_model(), where, token=token)
    assert not out.exists()


def test_a_flag_given_anything_but_true_or_false_is_refused(checkpoints, tmp_path):
    """The public API's on/off options take True or False only: `verify="no"` and `profile="no"` (a string, truthy)
    were taken as True, hashing every file and recording a profile; `split_checkpoint(progress="no")` showed its bar,
    `overwrite="no"` wrote over another split. None, 0 and 1 and NumPy's bools are refused too, as
    `keep_in_page_cache` refuses them (None left a flag off whose default is on: `progress`)."""
    import numpy as np

    ckpt, shards = checkpoints("llama")
    model = _llama_model()
    odd = ("no", "False", None, 0, 1, np.bool_(True))
    for name in ("profile", "verify"):
        for value in odd:
            with pytest.raises(TypeError, match=rf"^`{name}` must be True or False, got {re.escape(repr(value))}\.$"):
                enable_layer_streaming(model, shards, **{name: value})
    assert _untouched(model)
    out = tmp_path / "out"
    for name in ("overwrite", "wait", "progress", "remove_from_cache", "double_quant"):
        for value in odd:
            with pytest.raises(TypeError, match=rf"^`{name}` must be True or False, got {re.escape(repr(value))}\.$"):
                split_checkpoint(ckpt, out, **{name: value})
    assert not out.exists()  # (refused before anything was written)
    for name in ("check_files", "checksums"):
        with pytest.raises(TypeError, match=rf"^`{name}` must be True or False, got 'no'\.$"):
            ShardDirectory(shards, **{name: "no"})
    # (what is taken still works)
    assert enable_layer_streaming(model, shards, profile=True, verify=False) is model
    assert get_streaming_state(model).profile is not None
    disable_layer_streaming(model)


def test_a_gpu_index_of_numpys_is_taken_as_an_int(monkeypatch):
    """`device=np.int64(0)` (an index from an array, as `prefetch` and `max_memory` take NumPy's integers) went to
    `torch.device` itself, and on a machine without CUDA was refused as "not a valid torch device", where 0 is told
    CUDA is not available here; it is GPU 0, as 0 is. (A one-GPU machine stood in for: this one may have none.)"""
    import numpy as np

    from hf_layerstream.engine import check_device

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="`device` is cuda:0 but CUDA is not available here; pass device='cpu'"):
            check_device(np.int64(0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert check_device(np.int64(0)) == torch.device("cuda", 0) and check_device(np.uint8(0)) == check_device(0)
    with pytest.raises(ValueError, match=r"`device` is cuda:1 but this machine has 1 CUDA device \(cuda:0\)"):
        check_device(np.int32(1))


def test_a_gpu_index_past_the_machines_gpus_is_refused(monkeypatch, checkpoints, capsys):
    """`device="cuda:1"` on a machine with one GPU: a clear `ValueError` naming the GPUs there (the plan's
    `mem_get_info`, or the loader's stream, failed with CUDA's "invalid device ordinal"); `inspect` plans for it
    from its budget, as for any GPU this machine lacks. (A one-GPU machine stood in for: this one may have none.)"""
    from hf_layerstream.cli import main
    from hf_layerstream.engine import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert check_device("cuda:0") == torch.device("cuda", 0) and check_device(0) == torch.device("cuda", 0)
    assert check_device("cuda") == torch.device("cuda", 0)
    for device in ("cuda:1", 1, torch.device("cuda", 3)):
        with pytest.raises(ValueError, match=r"`device` is cuda:\d but this machine has 1 CUDA device \(cuda:0\)"):
            check_device(device)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"has 2 CUDA devices \(cuda:0 to cuda:1\)"):
        check_device("cuda:2")
    _, shards = checkpoints("llama")
    assert main(["inspect", str(shards), "--device", "cuda:2", "--max-memory", "2=4GiB"]) == 0
    assert "plan on cuda:2   (not on this machine)" in capsys.readouterr().out


# --- enable / disable -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("enabled_there", [False, True], ids=["built_there", "built_and_enabled_there"])
def test_a_model_built_under_inference_mode_is_disabled_outside_it(checkpoints, enabled_there):
    """A script run under `torch.inference_mode()` builds the model's skeleton there: its weights are inference
    tensors, and every `disable_layer_streaming` outside that mode raised torch's "Setting requires_grad=True on
    inference tensor outside InferenceMode is not allowed" (putting back a weight's flag, unchanged), and the model
    stayed enabled: enable refused it as "already enabled". It is disabled, and enabled again, exact."""
    ckpt, shards = checkpoints("llama")
    ref = _models.load_reference(ckpt)
    with torch.inference_mode():
        model = build_meta_model(AutoConfig.from_pretrained(ckpt))
        if enabled_there:
            enable_layer_streaming(model, shards, device="cpu")
    if not enabled_there:
        enable_layer_streaming(model, shards, device="cpu")
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    for again in (False, True):
        if again:
            enable_layer_streaming(model, shards, device="cpu", max_memory={"cpu": 0})
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
        disable_layer_streaming(model)
        assert get_streaming_state(model) is None
        assert model.lm_head.weight.is_meta and model.lm_head.weight.requires_grad


def test_disable_restores_the_model_and_stops_the_loader(checkpoints):
    ckpt, shards = checkpoints("gpt2")

    def loader_threads():
        return {t for t in threading.enumerate() if t.name.startswith("hf_layerstream-loader")}

    before = loader_threads()
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0})
    assert model.device.type == "cpu" and model.hf_device_map[""] == "cpu"
    with pytest.raises(ValueError, match="already enabled"):
        enable_layer_streaming(model, shards)
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        first = model(ids).logits
    mine = loader_threads() - before
    assert mine  # this model's background reader
    assert disable_layer_streaming(model) is model
    assert _untouched(model)
    assert "forward" not in vars(model.transformer)  # the wrapper around the module running the layers is gone
    assert get_streaming_state(model) is None and not hasattr(model, "hf_device_map")
    assert not any(t.is_alive() for t in mine)
    with pytest.raises(ValueError, match="not enabled"):
        disable_layer_streaming(model)
    # and it can be enabled again, with the same result
    enable_layer_streaming(model, shards, device="cpu")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, first)
    disable_layer_streaming(model)


def test_a_loaded_model_streams_and_is_told_its_loaded_weights_stay_in_memory(checkpoints, caplog):
    """A model loaded whole (`from_pretrained`) rather than built on the meta device streams, with a warning. It
    counted the decoder layers' parameters only (the embeddings and head were loaded, and replaced, too) and said
    the loaded copies stay in memory "until `disable_layer_streaming`", which gives them back to the model: they stay
    as long as the model. Every loaded parameter is counted, and the message says where they go."""
    ckpt, shards = checkpoints("llama")
    model = _models.load_reference(ckpt)
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        expected = model(ids).logits
    own = {name: p for name, p in model.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        enable_layer_streaming(model, shards, device="cpu", max_memory={"cpu": 0})
    said = [r.getMessage() for r in caplog.records if "loaded" in r.getMessage()]
    assert len(said) == 1, said
    assert f"holds {sum(p.numel() for p in own.values())} loaded parameters" in said[0]
    assert "until `disable_layer_streaming`" not in said[0] and "as long as the model" in said[0]
    assert "init_empty_weights()" in said[0]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    disable_layer_streaming(model)
    assert all(p is own[name] for name, p in model.named_parameters())  # (its own back, as the warning says)


def test_the_model_is_put_in_evaluation_mode_as_from_pretrained_does(checkpoints):
    """`from_config` builds a model in training mode: GPT-2's dropout (0.1) would make greedy decoding random.
    Enabling streaming puts it in evaluation mode, as `from_pretrained` does; the logits equal the loaded model's."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    ckpt, shards = checkpoints("gpt2")
    config = AutoConfig.from_pretrained(ckpt, attn_implementation=_models.ATTN_IMPLEMENTATION)
    assert config.resid_pdrop > 0
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    assert model.training
    enable_layer_streaming(model, shards, device="cpu", max_memory={"cpu": 0})
    assert not any(m.training for m in model.modules())
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        expected = _models.load_reference(ckpt)(ids).logits
        assert torch.equal(model(ids).logits, expected) and torch.equal(model(ids).logits, expected)
    disable_layer_streaming(model)


def test_a_wrapper_added_over_ours_survives_disable_and_enable(checkpoints):
    """Something wraps the forward of the module running the layers after streaming was enabled (a profiler, an
    accelerate hook): disable leaves its wrapper, and ours under it, in place, ours inert and holding nothing of the
    old streaming state; enabled again, the model gives the same result through both."""
    import functools

    ckpt, shards = checkpoints("llama")
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0})
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        first = model(ids).logits
    runner, calls = model.model, []
    inner = runner.forward

    @functools.wraps(inner)
    def theirs(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    runner.forward = theirs
    guard = get_streaming_state(model).guard
    disable_layer_streaming(model)
    assert vars(runner)["forward"] is theirs
    assert guard.loader is None and guard.hooks == []
    enable_layer_streaming(model, shards, device="cpu", max_memory={"cpu": 0})
    with torch.no_grad():
        assert torch.equal(model(ids).logits, first)
    assert calls == [1]
    disable_layer_streaming(model)


def test_moving_or_casting_a_streamed_model(checkpoints):
    """`.to()` / `.cpu()` / `.float()` asking for what the model already streams: what the plain model does; any
    other device or dtype: a clear error, with nothing moved or cast (the plain methods would die half way on the
    streamed layers' meta tensors)."""
    ckpt, shards = checkpoints("llama", dtype=torch.bfloat16)
    ref = _models.load_reference(ckpt, torch.bfloat16)
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        inv_freq = model.model.rotary_emb.inv_freq
        assert inv_freq.dtype == torch.float32  # from_pretrained(dtype=bf16) keeps it in fp32, and so do we
        assert model.to("cpu") is model and model.cpu() is model and model.to(device="cpu") is model
        assert model.to("cpu:0") is model and model.to(torch.device("cpu", 0)) is model  # (the CPU too)
        assert model.model.rotary_emb.inv_freq is inv_freq
        # the plain model's `.to(torch.bfloat16)` casts the rotary frequencies too (changing the logits); so do we
        assert model.to(torch.bfloat16) is model and model.bfloat16() is model
        assert model.type(torch.bfloat16) is model and model.type("torch.BFloat16Tensor") is model
        ref.to(torch.bfloat16)
        assert model.model.rotary_emb.inv_freq.dtype == torch.bfloat16
        assert torch.equal(model(ids).logits, ref(ids).logits)
        before = {n: (t.device, t.dtype) for n, t in model.state_dict().items()}
        for move, what in [
            (lambda: model.to(torch.float32), "model.to"),
            (lambda: model.float(), "model.float"),
            (lambda: model.half(), "model.half"),
            (lambda: model.to("meta"), "model.to"),
            (lambda: model.to("cpu", torch.float16), "model.to"),
            # (`type` cast the resident parts and left the layers: the next pass refused them, half cast)
            (lambda: model.type(torch.float16), "model.type"),
            (lambda: model.type("torch.FloatTensor"), "model.type"),
            (lambda: model.type(torch.LongTensor), "model.type"),
        ]:
            with pytest.raises(RuntimeError, match=rf"`{what}\(...\)` cannot move or cast .* to cpu in torch.bfloat16"):
                move()
        assert {n: (t.device, t.dtype) for n, t in model.state_dict().items()} == before
        assert torch.equal(model(ids).logits, ref(ids).logits)
        # `resize_token_embeddings` resized the resident embeddings and head only, and `disable` lost it: refused
        embeddings = model.get_input_embeddings().weight
        with pytest.raises(
            RuntimeError, match=r"`model.resize_token_embeddings\(...\)` is not supported .* split that"
        ):
            model.resize_token_embeddings(embeddings.shape[0] + 8)
        assert model.get_input_embeddings().weight is embeddings
        # `share_memory` shared the resident parts, then died on a placeholder with torch's "_share_fd_: only
        # available on CPU"; `to_empty` put uninitialized memory in the resident parts, and the next pass named a
        # layer's weight replaced: both refused, nothing changed
        with pytest.raises(RuntimeError, match=r"`model.share_memory\(...\)` is not supported .* in each process"):
            model.share_memory()
        with pytest.raises(RuntimeError, match=r"`model.to_empty\(...\)` is not supported .* uninitialized memory"):
            model.to_empty(device="cpu")
        assert not embeddings.is_shared()
        assert {n: (t.device, t.dtype) for n, t in model.state_dict().items()} == before
        assert torch.equal(model(ids).logits, ref(ids).logits)
    disable_layer_streaming(model)
    assert not {"to", "half", "type", "resize_token_embeddings", "share_memory", "to_empty"} & set(vars(model))
    assert model.to(torch.float32) is model  # the plain method again (every weight is on meta)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_disable_leaves_attributes_it_did_not_set_and_frees_the_loader_without_gc(checkpoints):
    """`disable_layer_streaming` removes only the instance attributes streaming set: a `generate` wrapper the user set
    while streaming (without `profile`, streaming sets none) stays. Per module, the placeholders refer to their hook
    weakly: after disable, the closed loader goes as soon as the model lets go of it, with the garbage collector off."""
    import gc
    import weakref

    ckpt, shards = checkpoints("llama", compression="4bit")
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, dequantize="module")
    loader = weakref.ref(get_streaming_state(model).loader)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        model(ids)

    def mine(*args, **kwargs):
        return "mine"

    model.generate = mine
    gc.collect()
    gc.disable()
    try:
        disable_layer_streaming(model)
        assert loader() is None
    finally:
        gc.enable()
    assert vars(model).get("generate") is mine


def test_copying_or_pickling_a_streamed_model_is_refused_with_the_fix_named(checkpoints):
    """Also once enabled again after a disable: accelerate's removal of a hook left the module's own forward as an
    instance attribute, and `pickle` of the model (or of a layer) then reached the next enable's wrapper first,
    failing with "Can't pickle local object 'add_hook_to_module.<locals>.new_forward'"."""
    import pickle

    ckpt, shards = checkpoints("llama")
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0})
    for again in (False, True):
        if again:
            enable_layer_streaming(model, shards, device="cpu", max_memory={"cpu": 0})
        for copy_it in (copy.deepcopy, pickle.dumps):
            for what in (model, model.model.layers[0]):
                with pytest.raises(TypeError, match=r"call `disable_layer_streaming\(model\)` first"):
                    copy_it(what)
        disable_layer_streaming(model)
        assert "forward" not in vars(model.model.layers[0])  # (the module as it was before)
    twin = copy.deepcopy(model)  # (a meta model again: copied as any)
    enable_layer_streaming(twin, shards, device="cpu", max_memory={"cpu": 0})
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, _models.load_reference(ckpt)(ids).logits)
    disable_layer_streaming(twin)


def test_a_shallow_copy_of_a_streamed_model_is_refused_with_the_fix_named(checkpoints):
    """`copy.copy(model)` made a model sharing the original's hooks, loader and state: `disable_layer_streaming` of
    the copy left the original enabled on meta weights, its next pass giving a meta output without an error."""
    ckpt, shards = checkpoints("llama")
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0})
    for again in (False, True):
        if again:
            enable_layer_streaming(model, shards, device="cpu", max_memory={"cpu": 0})
        with pytest.raises(TypeError, match=r"call `disable_layer_streaming\(model\)` first"):
            copy.copy(model)
        disable_layer_streaming(model)
        assert "__reduce_ex__" not in vars(model)
        twin = copy.copy(model)  # (a meta model again: copied as any)
        assert twin is not model and get_streaming_state(twin) is None


def test_a_shallow_copy_of_a_streamed_layer_is_refused_as_its_deepcopy_is(checkpoints):
    """`copy.copy(model.model.layers[0])` made a layer sharing the original's hook and accelerate's forward (which ran
    the original layer): once streaming was disabled, calling it failed with "AttributeError: ... '_hf_hook'". It is
    refused as `copy.deepcopy` and `pickle` of a layer are, naming `disable_layer_streaming`; once disabled, the layer
    copies as any, and its copy runs."""
    import pickle

    ckpt, shards = checkpoints("llama")
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0})
    layer = model.model.layers[0]
    for again in (False, True):
        if again:
            enable_layer_streaming(model, shards, device="cpu", max_memory={"cpu": 0})
        messages = set()
        for copy_it in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match=r"call `disable_layer_streaming\(model\)` first") as info:
                copy_it(layer)
            messages.add(str(info.value))
        assert len(messages) == 1
        disable_layer_streaming(model)
        assert "__reduce_ex__" not in vars(layer)  # (the layer as it was before)
        twin = copy.copy(layer)
        hidden = torch.zeros(1, 3, model.config.hidden_size)
        position = [p.to("meta") for p in model.model.rotary_emb(hidden, torch.arange(3)[None])]
        hidden = hidden.to("meta")
        assert twin(hidden, position_embeddings=position).shape == hidden.shape  # (meta weights: a meta output)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_head_of_a_streamed_model_copies_and_saves_as_the_loaded_heads(checkpoints, arch):
    """`copy.deepcopy(model.lm_head)` or `torch.save` of it (GPT-2: its tied input embeddings too) failed with
    "cannot pickle '_thread.lock' object" (the hook that makes the head's weight require grad as loaded): a copy is
    a plain module with the loaded head's copy's outputs, gradients on and off."""
    import io

    ckpt, shards = checkpoints(arch)
    ref = _models.load_reference(ckpt)
    model = streamed_model(ckpt, shards)
    x = torch.randn(1, 3, model.config.hidden_size)
    ids = torch.tensor([[1, 5, 7]])
    for head_too, get in ((True, lambda m: m.get_output_embeddings()), (False, lambda m: m.get_input_embeddings())):
        buffer = io.BytesIO()
        torch.save(get(model), buffer)
        buffer.seek(0)
        for head in (copy.deepcopy(get(model)), torch.load(buffer, weights_only=False)):
            want = copy.deepcopy(get(ref))
            assert head.weight is not get(model).weight and torch.equal(head.weight, want.weight)
            given = x if isinstance(head, torch.nn.Linear) else ids
            out, expected = head(given), want(given)
            # (the head's weight requires grad as loaded; the other resident weights do not: README, Limits)
            assert torch.equal(out, expected) and (out.requires_grad == expected.requires_grad or not head_too)
            with torch.no_grad():
                assert torch.equal(head(given), want(given))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)  # (the model's own head as it was)
    disable_layer_streaming(model)


@pytest.mark.cuda
def test_moving_a_cuda_streamed_model(checkpoints):
    ckpt, shards = checkpoints("llama")
    model = build_meta_model(AutoConfig.from_pretrained(ckpt))
    enable_layer_streaming(model, shards, device="cuda:0", max_memory={0: 0, "cpu": 0})
    assert model.cuda() is model and model.to("cuda") is model and model.to(0) is model and model.cuda(0) is model
    with pytest.raises(RuntimeError, match=r"`model.cpu\(...\)` cannot move .* to cuda:0"):
        model.cpu()
    assert model.model.embed_tokens.weight.device.type == "cuda"
    ids = torch.tensor([[1, 5, 7, 9]], device="cuda")
    ref = _models.load_reference(ckpt).to("cuda")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    disable_layer_streaming(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])  # gpt2: tied head; mixtral: fused experts
@pytest.mark.parametrize("options", [{"max_memory": {"cpu": 0}}, {}], ids=["streamed", "kept"])
def test_save_pretrained_of_a_streamed_model(checkpoints, tmp_path, arch, options):
    """`save_pretrained` on a streamed model writes the whole model, as it does for one offloaded by accelerate
    (each layer's weights read back from its shard file through the hook's `weights_map`; it raised an
    AttributeError before), and `from_pretrained` of that folder is the original model, tensor for tensor."""
    import warnings

    ckpt, shards = checkpoints(arch)
    model = streamed_model(ckpt, shards, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' note on saving offloaded modules
        model.save_pretrained(tmp_path / "saved")
    weights = get_streaming_state(model).hooks[0].weights_map
    assert next(iter(weights)) in weights and "no.such.weight" not in weights
    with pytest.raises(KeyError):
        weights["no.such.weight"]
    saved = _models.load_reference(tmp_path / "saved")
    original = _models.load_reference(ckpt)
    want = original.state_dict()
    got = saved.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    disable_layer_streaming(model)


@pytest.mark.parametrize("compression", [None, "4bit"])
def test_kept_layers_give_their_tensors_to_state_dict_and_save_without_offload_markers(
    checkpoints, tmp_path, compression
):
    """Layers the plan keeps on the device hand `state_dict()` their kept tensors (not the meta placeholders they hold
    between passes); streamed layers stay meta, as accelerate's offloaded ones. So `save_pretrained` works without a
    "cpu" or "disk" entry in `hf_device_map`, as on a GPU that keeps every layer (`{"": 0}`: it raised "Cannot copy
    out of meta tensor" there). Per module, kept packed weights are dequantized, as by layer."""
    import warnings

    ckpt, shards = checkpoints("llama", compression=compression)
    ref = _models.load_reference(ckpt)
    options = {"dequantize": "module"} if compression else {}
    mixed = {"max_memory": {"cpu": ShardDirectory(shards).unit("resident").logical_nbytes}}
    model = streamed_model(ckpt, shards, **options)  # every layer kept
    layered = streamed_model(ckpt, shards, dequantize="layer") if compression else None
    state = model.state_dict()
    names = [n for n in state if ".layers." in n]
    assert names and not any(state[n].is_meta for n in names)
    if compression is None:
        want = ref.state_dict()
        assert all(torch.equal(state[n], want[n]) for n in names)
    else:
        want = layered.state_dict()
        assert all(torch.equal(state[n], want[n]) for n in names)
        disable_layer_streaming(layered)
    model.hf_device_map = {"": 0}  # (what a GPU plan keeping every layer sets; nothing reads the device here)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "saved")
    saved = _models.load_reference(tmp_path / "saved").state_dict()
    assert all(torch.equal(saved[n], want[n]) for n in names)
    disable_layer_streaming(model)
    streamed = streamed_model(ckpt, shards, prefetch=0, **mixed, **options)
    assert get_streaming_state(streamed).plan.streamed  # streamed layers: meta, as accelerate's offloaded ones
    assert any(t.is_meta for n, t in streamed.state_dict().items() if ".layers." in n)
    disable_layer_streaming(streamed)


def test_save_pretrained_of_a_model_streamed_from_quantized_shards(checkpoints, tmp_path):
    """From quantized shards `save_pretrained` writes the weights the model computes with (dequantized): the saved
    model, loaded whole, gives the streamed model's logits bit for bit."""
    import warnings

    ckpt, shards = checkpoints("llama", compression="4bit")
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "saved")
    inputs = AutoTokenizer.from_pretrained(ckpt)(_models.SAMPLE_PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(_models.load_reference(tmp_path / "saved")(**inputs).logits, model(**inputs).logits)
    disable_layer_streaming(model)


def test_layer_weights_are_released_after_forward(checkpoints):
    ckpt, shards = checkpoints("llama")
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0})
    seen = []
    layer = model.model.layers[1]
    layer.mlp.register_forward_hook(lambda m, i, o: seen.append(m.up_proj.weight.device.type))
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert seen == ["cpu"]  # present during the forward pass
    assert layer.mlp.up_proj.weight.is_meta  # released afterwards
    assert repr(layer._hf_hook).startswith("LayerStreamingHook(layer=1, tier=disk")


def test_verify_option_checks_full_checksums_before_any_hook(checkpoints, tmp_path):
    _, shards = checkpoints("llama")
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    victim = copy / "layers" / "00001.safetensors"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, outside the sampled head and tail: only a full hash sees it
    victim.write_bytes(bytes(data))
    model = _llama_model()
    with pytest.raises(ShardDirError, match=r"00001.safetensors does not match its SHA-256"):
        enable_layer_streaming(model, copy, verify=True)
    assert _untouched(model)


def test_generate_does_not_compile_a_streamed_model(checkpoints, caplog):
    """With a static cache on a GPU, `generate` compiles the forward pass by itself unless the model is offloaded;
    with every layer kept on the device nothing says so in `hf_device_map`, and the hooks swapping weights in at
    every pass would make it recompile for each layer. Streaming tells `generate` not to compile (logged once), and
    the output is the loaded model's. (`_compile_all_devices` lets `generate` compile on CPU: the GPU's case here.)"""
    import logging

    from transformers import CompileConfig, GenerationConfig, StaticCache

    ckpt, shards = checkpoints("llama")
    ref = _models.load_reference(ckpt)
    model = streamed_model(ckpt, shards)
    assert not get_streaming_state(model).plan.streamed  # every layer kept: no "disk" in `hf_device_map`
    config = GenerationConfig(
        max_new_tokens=4, do_sample=False, cache_implementation="static", compile_config=CompileConfig()
    )
    config.compile_config._compile_all_devices = True
    cache = StaticCache(config=model.config, max_cache_len=32)
    asked = {"cache": cache, "past_key_values": cache}  # (the key differs across transformers releases)
    assert ref._valid_auto_compile_criteria(asked, config)  # the loaded model would compile
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        assert not model._valid_auto_compile_criteria(asked, config)
        assert not model._valid_auto_compile_criteria(asked, config)
    assert caplog.text.count("not compiling it") == 1
    ids = torch.randint(4, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    plain = GenerationConfig(max_new_tokens=4, do_sample=False, cache_implementation="static")
    expected = ref.generate(ids, generation_config=plain)

    def compiled(*args, **kwargs):  # (however transformers comes to compile, it asks the model for its compiled call)
        raise AssertionError("generate compiled the streamed model")

    model.get_compiled_call = compiled
    assert torch.equal(model.generate(ids, generation_config=config), expected)
    del model.get_compiled_call
    disable_layer_streaming(model)
    assert "_valid_auto_compile_criteria" not in vars(model)


def test_torch_compile_of_a_streamed_model_runs_its_pass_eagerly_and_fullgraph_names_why(checkpoints):
    """`torch.compile(model)` (or of `model.forward`, as transformers' docs show): dynamo traced into the pass and
    its hooks, recompiling each decoder layer's forward (the weights swapped in at every pass) until its recompile
    limit, and `fullgraph=True` failed with "Unsupported context manager", naming no cause. The pass runs eagerly
    (the loaded model's output), and `fullgraph=True` says why and what to do."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    ckpt, shards = checkpoints("llama")
    ref = _models.load_reference(ckpt)
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=1)
    ids = torch.randint(4, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    kw = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    expected = ref.generate(ids, **kw)
    torch._dynamo.reset()
    counters.clear()
    model.forward = torch.compile(model.forward, backend="eager")
    try:
        assert torch.equal(model.generate(ids, **kw), expected)
    finally:
        del model.forward  # (the compiled wrapper: the streamed model's own wrapper is under it)
    assert not counters["stats"]["unique_graphs"], dict(counters["stats"])
    for compiled in (model, model.forward, model.model):
        with pytest.raises(torch._dynamo.exc.Unsupported, match=r"layer streaming .* drop `fullgraph=True`"):
            with torch.no_grad():
                torch.compile(compiled, backend="eager", fullgraph=True)(ids)
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch.equal(torch.compile(model, backend="eager")(ids).logits, ref(ids).logits)
    disable_layer_streaming(model)


def test_streaming_runs_on_a_torch_whose_compiler_disable_takes_no_reason(checkpoints, monkeypatch):
    """`torch.compiler.disable` takes `reason=` from torch 2.8 on; the package takes torch 2.5 on, where every
    `enable_layer_streaming` failed with "disable() got an unexpected keyword argument 'reason'". The pass is left
    out of graphs there too (dynamo's own message for `fullgraph=True`)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    def disable(fn=None, recursive=True):  # (torch 2.7's)
        return torch._dynamo.disable(fn, recursive)

    monkeypatch.setattr(torch.compiler, "disable", disable)
    ckpt, shards = checkpoints("llama")
    ref = _models.load_reference(ckpt)
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0}, prefetch=1)
    ids = torch.tensor([[1, 5, 7, 9]])
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        assert torch.equal(torch.compile(model, backend="eager")(ids).logits, ref(ids).logits)
    assert not counters["stats"]["unique_graphs"], dict(counters["stats"])
    torch._dynamo.reset()
    disable_layer_streaming(model)


def _readme_signatures() -> dict[str, str]:
    """The calls the README's API table shows (first column): name -> the text between its parentheses."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    shown = {}
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        for call in re.findall(r"`(\w+)\(([^`]*)\)(?: -> [^`]*)?`", row.split(" | ", 1)[0]):
            shown[call[0]] = call[1]
    return shown


def test_the_readmes_api_table_shows_each_function_as_it_is():
    """The README's API table gave `configure_draft` a positional `num_assistant_tokens` (keyword-only: calling it so
    raised TypeError) and left out two of its parameters, and `generate_jsonl`'s `progress`: each call shown there now
    has the real names, order, kinds (after `*`: keyword-only) and defaults; `...` stands for the rest."""
    import hf_layerstream

    shown = _readme_signatures()
    assert {"split_checkpoint", "enable_layer_streaming", "generate_jsonl", "configure_draft"} <= set(shown)
    for name, text in shown.items():
        real = inspect.signature(getattr(hf_layerstream, name))
        params = list(real.parameters.values())
        keyword_only, k = False, 0
        for part in (p.strip() for p in text.split(",") if p.strip()):
            if part == "...":
                break
            if part == "*":
                keyword_only = True
                continue
            assert k < len(params), f"{name}: the README shows {part!r} beyond the real parameters"
            param = params[k]
            k += 1
            if part.startswith("**"):
                assert param.kind is param.VAR_KEYWORD and param.name == part[2:], (name, part)
                continue
            shown_name, _, default = part.partition("=")
            assert param.name == shown_name, (name, part, param.name)
            assert (param.kind is param.KEYWORD_ONLY) == keyword_only, (name, part, param.kind)
            if default:
                assert param.default == ast.literal_eval(default), (name, part, param.default)
            else:
                assert param.default is param.empty, (name, part)
        else:
            assert k == len(params), f"{name}: the README leaves out {[p.name for p in params[k:]]}"


def test_tied_weights_and_initialized_marks_without_transformers_attributes(monkeypatch):
    """Two transformers internals a release may drop or add: without the `all_tied_weights_keys` attribute
    `post_init` fills, the tied names come from the method that fills it (they were taken as none: GPT-2's split
    lacked `lm_head.weight` and enabling named the shards as another model's); a parameter carrying transformers'
    `_is_hf_initialized` mark goes to meta keeping it (passed to the parameter's constructor, it raised
    `TypeError`, as accelerate's own swap did before it set the mark aside)."""
    from torch import nn

    from hf_layerstream.modeling import parameters_on_meta, tied_targets

    model = build_meta_model(_models.make_config("gpt2"))
    want = tied_targets(model)
    assert want == {"lm_head.weight": "transformer.wte.weight"}
    monkeypatch.delattr(model, "all_tied_weights_keys")
    assert tied_targets(model) == want

    class Marked(nn.Module):
        def __init__(self):
            super().__init__()
            weight = nn.Parameter(torch.ones(2))
            weight._is_hf_initialized = True
            self.weight = weight

    with parameters_on_meta():
        marked = Marked()
    assert marked.weight.is_meta and marked.weight.requires_grad and marked.weight._is_hf_initialized


def test_building_a_skeleton_leaves_other_threads_modules_as_they_are(checkpoints):
    """Enabling a model built under `torch.device("meta")` (or at another dtype), `split_checkpoint`, `inspect` build
    a skeleton of the model under accelerate's `init_empty_weights(include_buffers=False)`, which swaps
    `nn.Module.register_parameter` for the whole process: modules other threads built meanwhile (a `from_pretrained`
    in a server's other thread) got meta parameters, silently, and several enables at once could leave the swap in
    place for good. Now only the building thread's parameters go to meta."""
    from torch import nn

    from hf_layerstream.modeling import build_skeleton, parameters_on_meta

    pristine = nn.Module.register_parameter
    built = {}
    with parameters_on_meta():
        mine = nn.Linear(3, 3)
        other = threading.Thread(target=lambda: built.setdefault("other", nn.Linear(3, 3)))
        other.start()
        other.join()
    assert mine.weight.is_meta and mine.weight.requires_grad  # (requires_grad kept, as accelerate keeps it)
    assert not built["other"].weight.is_meta and nn.Module.register_parameter is pristine

    config = _models.make_config("llama")
    stop, on_meta, errors = threading.Event(), [], []
    inits = {name: getattr(torch.nn.init, name) for name in ("normal_", "zeros_", "kaiming_uniform_", "constant_")}

    def skeletons():
        try:
            for _ in range(5):
                model = build_skeleton(config)
                assert all(p.is_meta for p in model.parameters())
                assert not any(b.is_meta for b in model.buffers())  # (buffers real, as computed)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def plain_modules():
        while not stop.is_set():
            on_meta.append(nn.Linear(4, 4).weight.is_meta)

    watcher = threading.Thread(target=plain_modules)
    watcher.start()
    builders = [threading.Thread(target=skeletons) for _ in range(3)]
    for t in builders:
        t.start()
    for t in builders:
        t.join()
    stop.set()
    watcher.join()
    assert not errors, errors
    assert on_meta and not any(on_meta)  # (accelerate's swap: hundreds of meta Linears here)
    assert nn.Module.register_parameter is pristine and not nn.Linear(2, 2).weight.is_meta
    # (transformers swaps torch's init functions around each build for its own, which skip a weight marked as loaded:
    # two builds overlapping left its own there for good, `nn.init.normal_` a no-op on a loaded model's weights)
    assert {name: getattr(torch.nn.init, name) for name in inits} == inits

    # overlapping a user's `init_empty_weights` in another thread, which ends first (it put back the function it
    # found, taking ours out while our build went on)
    from accelerate import init_empty_weights

    entered, ours_in, user_out = threading.Event(), threading.Event(), threading.Event()

    def user():
        with init_empty_weights():
            entered.set()
            assert ours_in.wait(30)
        user_out.set()

    other = threading.Thread(target=user)
    other.start()
    assert entered.wait(30)
    with parameters_on_meta():
        ours_in.set()
        assert user_out.wait(30)
        late = nn.Linear(3, 3)
    other.join()
    assert late.weight.is_meta and not nn.Linear(2, 2).weight.is_meta
    assert nn.Module.register_parameter is pristine


def test_two_threads_enabling_one_model_at_once_are_taken_one_after_the_other(checkpoints, monkeypatch):
    """Both enables went on (the state is set at the end) and one's loader, its threads and maps, lived on after
    `disable_layer_streaming`. The second waits for the first now, and is refused as an enable after it is; a disable
    racing another is refused as one after it is."""
    from hf_layerstream import engine, stream

    ckpt, shards = checkpoints("llama")
    model = build_meta_model(AutoConfig.from_pretrained(ckpt))
    inside, go_on = threading.Event(), threading.Event()
    real = stream.ShardDirectory
    made = []

    def slow(*args, **kwargs):  # the first enable waits inside until the second has started
        if not inside.is_set():
            inside.set()
            assert go_on.wait(30)
        return real(*args, **kwargs)

    real_loader = engine.LayerLoader

    def loader(*args, **kwargs):
        made.append(real_loader(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(stream, "ShardDirectory", slow)
    monkeypatch.setattr(stream, "LayerLoader", loader)
    outcome = []

    def enable():
        try:
            enable_layer_streaming(model, shards, device="cpu", max_memory={"cpu": 0})
            outcome.append("enabled")
        except ValueError as e:
            outcome.append(str(e))

    first = threading.Thread(target=enable)
    first.start()
    assert inside.wait(30)
    second = threading.Thread(target=enable)
    second.start()
    second.join(0.5)
    assert second.is_alive()  # (waiting for the first)
    go_on.set()
    first.join(30)
    second.join(30)
    assert outcome[0] == "enabled" and "already enabled on this model" in outcome[1]
    assert len(made) == 1
    ids = torch.tensor([[1, 5, 9, 22, 40]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, _models.load_reference(ckpt)(ids).logits)
    results = []

    def disable():
        try:
            disable_layer_streaming(model)
            results.append("disabled")
        except ValueError as e:
            results.append(str(e))

    both = [threading.Thread(target=disable) for _ in range(2)]
    for t in both:
        t.start()
    for t in both:
        t.join(30)
    assert sorted(results) == ["Layer streaming is not enabled on this model.", "disabled"]
    assert not [t for t in made[0]._executor._threads if t.is_alive()]
