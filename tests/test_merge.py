"""A PEFT adapter merged as the checkpoint is split (`split_checkpoint(..., adapter=...)`): the streamed model is the
loaded model with the adapter merged by PEFT's `merge_and_unload`, bit for bit, with no adapter weights in memory; the
manifest records the adapter, a split with another adapter is another split, and what cannot be merged into a shard
directory is refused before anything is written."""

from __future__ import annotations

import json
import logging
import os
import re
import signal

import _models
import pytest
import torch
from conftest import returns_within, streamed_model

from hf_layerstream import ShardDirectory, ShardDirOccupiedError, attaching_adapters, split_checkpoint
from hf_layerstream.cli import main

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 5, 9, 17, 33, 60, 7, 12], [1, 40, 41, 42, 43, 44, 45, 46]])
GEN = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}

KINDS = {
    "lora": lambda: peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    "dora": lambda: peft.LoraConfig(
        r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False, use_dora=True
    ),
    "ia3": lambda: peft.IA3Config(
        target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
    ),
    "loha": lambda: peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
    # the head adapted and the embeddings replaced whole (PEFT saves both whole), new rows for two tokens
    "head, modules_to_save": lambda: peft.LoraConfig(
        r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False, modules_to_save=["embed_tokens"]
    ),
    "trainable tokens": lambda: peft.LoraConfig(
        r=4, target_modules=["v_proj"], init_lora_weights=False, trainable_token_indices=[3, 5]
    ),
}


def _save_adapter(ckpt, folder, config, dtype=torch.float32):
    """An adapter made on the loaded model, initialised at random (every weight PEFT trains, also the whole modules
    it saves), so that it changes the output."""
    torch.manual_seed(1)
    model = peft.get_peft_model(_models.load_reference(ckpt, dtype), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name or "trainable_tokens" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return folder


def _merged_reference(ckpt, folder, dtype=torch.float32):
    """The loaded model, the adapter attached by PEFT and merged (`merge_and_unload`), and its outputs."""
    model = peft.PeftModel.from_pretrained(_models.load_reference(ckpt, dtype), folder).merge_and_unload()
    with torch.no_grad():
        return model, (model(IDS).logits, model.generate(IDS, **GEN))


def _outputs(model):
    with torch.no_grad():
        return model(IDS).logits, model.generate(IDS, **GEN)


def _unit(shards, unit):
    """The tensors of one unit file of a shard directory, as stored."""
    from safetensors.torch import load_file

    return load_file(shards / ShardDirectory(shards).unit(unit).file)


def _assert_same(got, expected):
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_split_merges_the_adapter_as_merge_and_unload_does(checkpoints, tmp_path, kind):
    """Each kind of adapter PEFT merges, merged into the weights as they are written: the streamed model, every layer
    streamed or kept, gives the merged loaded model's logits and greedy tokens, bit for bit; the manifest records the
    adapter, and the merge leaves a weight it does not adapt as it was."""
    ckpt, plain = checkpoints("llama")
    folder = _save_adapter(ckpt, tmp_path / "adapter", KINDS[kind]())
    _, expected = _merged_reference(ckpt, folder)
    base = _outputs(_models.load_reference(ckpt))
    assert not torch.equal(base[0], expected[0])  # (the adapter changes the output)
    shards = split_checkpoint(ckpt, tmp_path / "shards", adapter=folder, progress=False)
    for plan in ({}, {"max_memory": {"cpu": 0}}):
        _assert_same(_outputs(streamed_model(ckpt, shards, **plan)), expected)
    record = ShardDirectory(shards).manifest.adapter
    assert record["id"] == str(folder.resolve())
    assert record["peft_type"] == KINDS[kind]().peft_type.value
    assert set(record["sha256"]) == {"adapter_config.json", "adapter_model.safetensors"}
    norm = "model.layers.0.input_layernorm.weight"  # (a weight no adapter here adapts)
    assert torch.equal(_unit(shards, "layers.0")[norm], _unit(plain, "layers.0")[norm])


def test_the_biases_an_adapter_saves_of_modules_it_does_not_adapt_are_stored(checkpoints, tmp_path):
    """LoRA with `bias="all"` saves every bias, also of the modules it does not adapt, and PEFT loads them into the
    loaded model: the split stores the adapter's (it kept the checkpoint's for a trained bias of an unadapted
    `k_proj`: logits 0.1 off, silently)."""
    ckpt, _ = checkpoints("qwen2")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], bias="all", init_lora_weights=False)
    model = peft.get_peft_model(_models.load_reference(ckpt), config)
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.k_proj.bias.add_(1.0)
    model.save_pretrained(tmp_path / "adapter")
    _, expected = _merged_reference(ckpt, tmp_path / "adapter")
    shards = split_checkpoint(ckpt, tmp_path / "shards", adapter=tmp_path / "adapter", progress=False)
    _assert_same(_outputs(streamed_model(ckpt, shards, max_memory={"cpu": 0})), expected)


def test_the_merge_is_at_the_dtype_the_shards_stream_at(checkpoints, tmp_path):
    """Split with `dtype=torch.bfloat16`, the adapter merges into the bfloat16 weights as PEFT merges it into the
    model loaded in bfloat16 (its float32 change added to each weight and rounded once: `safe_merge`'s change rounded
    first gave other bits): the same logits and tokens, bit for bit."""
    ckpt, _ = checkpoints("llama")
    folder = _save_adapter(ckpt, tmp_path / "adapter", KINDS["head, modules_to_save"]())
    _, expected = _merged_reference(ckpt, folder, torch.bfloat16)
    shards = split_checkpoint(ckpt, tmp_path / "shards", adapter=folder, dtype=torch.bfloat16, progress=False)
    _assert_same(_outputs(streamed_model(ckpt, shards, dtype=torch.bfloat16, max_memory={"cpu": 0})), expected)


def test_compressed_shards_hold_the_merged_weights_quantized(checkpoints, tmp_path):
    """`compression` quantizes the merged weights: the shard files are those of the merged model saved and split,
    byte for byte."""
    pytest.importorskip("bitsandbytes")
    ckpt, _ = checkpoints("llama")
    folder = _save_adapter(ckpt, tmp_path / "adapter", KINDS["lora"]())
    merged, _ = _merged_reference(ckpt, folder)
    merged.save_pretrained(tmp_path / "merged")
    ours = split_checkpoint(ckpt, tmp_path / "ours", adapter=folder, compression="4bit", progress=False)
    theirs = split_checkpoint(tmp_path / "merged", tmp_path / "theirs", compression="4bit", progress=False)
    for unit in ["layers.0", "layers.2", "resident"]:
        a, b = _unit(ours, unit), _unit(theirs, unit)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_tied_head_merges_with_its_embeddings_and_one_replaced_alone_is_refused(checkpoints, tmp_path):
    """Gemma ties its head to its embeddings, stored once: LoRA on the head merges into that one tensor, as PEFT's
    merge changes both (bit for bit); `modules_to_save` on the head would make the two differ (`merge_and_unload`
    unties them), which a shard directory of this config cannot hold: refused before anything is written."""
    ckpt, _ = checkpoints("gemma")
    folder = _save_adapter(
        ckpt, tmp_path / "lora", peft.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False)
    )
    _, expected = _merged_reference(ckpt, folder)
    shards = split_checkpoint(ckpt, tmp_path / "shards", adapter=folder, progress=False)
    _assert_same(_outputs(streamed_model(ckpt, shards, max_memory={"cpu": 0})), expected)

    config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    folder = _save_adapter(ckpt, tmp_path / "mts", config)
    with pytest.raises(ValueError, match=r"replaces lm_head \(`modules_to_save`\), whose weight the model ties"):
        split_checkpoint(ckpt, tmp_path / "refused", adapter=folder, progress=False)
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())


def test_another_adapter_is_another_split(checkpoints, tmp_path, caplog):
    """The adapter's identity (its files' digests) is one of the split's options: the same split again does nothing,
    one with another adapter or none is refused into the same folder without `overwrite`, and made with it."""
    ckpt, _ = checkpoints("llama")
    first = _save_adapter(ckpt, tmp_path / "a", KINDS["lora"]())
    torch.manual_seed(2)
    second = _save_adapter(ckpt, tmp_path / "b", KINDS["ia3"]())
    shards = split_checkpoint(ckpt, tmp_path / "shards", adapter=first, progress=False)
    files = {p: p.stat().st_mtime_ns for p in (shards / "layers").iterdir()}
    with caplog.at_level(logging.INFO, logger="hf_layerstream"):
        split_checkpoint(ckpt, shards, adapter=first, progress=False)
    assert "already holds this split" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in (shards / "layers").iterdir()} == files
    for other in (second, None):
        named = "and none was given" if other is None else "a moved or copied adapter counts as another"
        with pytest.raises(
            ShardDirOccupiedError, match=rf"the adapter {re.escape(str(first.resolve()))} merged.*{named}"
        ):
            split_checkpoint(ckpt, shards, adapter=other, progress=False)
    split_checkpoint(ckpt, shards, adapter=second, overwrite=True, progress=False)
    _, expected = _merged_reference(ckpt, second)
    _assert_same(_outputs(streamed_model(ckpt, shards)), expected)
    assert ShardDirectory(shards).manifest.adapter["peft_type"] == "IA3"


def _sequential_reference(ckpt, folders):
    """The loaded model with each adapter merged in turn, onto the weights the one before left
    (`PeftModel.from_pretrained(model, folder).merge_and_unload()`, then the next), and its outputs."""
    model = _models.load_reference(ckpt)
    for folder in folders:
        model = peft.PeftModel.from_pretrained(model, folder).merge_and_unload()
    return _outputs(model)


def test_several_adapters_merge_in_turn(checkpoints, tmp_path, caplog, capsys):
    """`adapter=[...]` (`--adapter` repeated) merges each adapter in turn, onto the weights the ones before left, as
    `merge_and_unload` of one, then of the next loaded onto that, gives: the streamed model equals that loaded model,
    bit for bit (a DoRA merge reads the weight it merges into: the order counts; an adapter replacing the embeddings
    whole comes last). The manifest records them in order; `inspect` names each. Another order is another split,
    refused naming both; a list of one is that adapter's split; revisions go one per adapter."""
    ckpt, _ = checkpoints("llama")
    folders = []
    for i, kind in enumerate(["lora", "dora", "head, modules_to_save"]):
        torch.manual_seed(10 + i)
        folders.append(_save_adapter(ckpt, tmp_path / kind.replace(", ", "-"), KINDS[kind]()))
    expected = _sequential_reference(ckpt, folders)
    shards = split_checkpoint(ckpt, tmp_path / "shards", adapter=folders, progress=False)
    for plan in ({}, {"max_memory": {"cpu": 0}}):
        _assert_same(_outputs(streamed_model(ckpt, shards, **plan)), expected)
    record = ShardDirectory(shards).manifest.adapter
    assert [r["id"] for r in record] == [str(f.resolve()) for f in folders]
    assert [r["peft_type"] for r in record] == ["LORA", "LORA", "LORA"]
    assert main(["inspect", str(shards), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "adapters         3, merged into the weights in this order:" in out
    assert all(f"  {n}. {f.resolve()} (LORA)" in out for n, f in enumerate(folders, 1))
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"), attaching_adapters(streamed_model(ckpt, shards)):
        pass
    assert f"holds the adapters {', '.join(str(f.resolve()) for f in folders)} merged into its weights" in caplog.text
    with caplog.at_level(logging.INFO, logger="hf_layerstream"):
        split_checkpoint(ckpt, shards, adapter=tuple(str(f) for f in folders), progress=False)
    assert "already holds this split" in caplog.text
    # the order counts: the DoRA merged before the LoRA gives other weights
    first_two, swapped = folders[:2], folders[1::-1]
    reversed_shards = split_checkpoint(ckpt, tmp_path / "swapped", adapter=swapped, progress=False)
    got = _outputs(streamed_model(ckpt, reversed_shards))
    _assert_same(got, _sequential_reference(ckpt, swapped))
    assert not torch.equal(got[0], _sequential_reference(ckpt, first_two)[0])
    with pytest.raises(
        ShardDirOccupiedError,
        match=rf"the adapters {re.escape(str(swapped[0].resolve()))}, {re.escape(str(swapped[1].resolve()))} merged, "
        rf"in that order; given in another order: {re.escape(str(first_two[0].resolve()))}, ",
    ):
        split_checkpoint(ckpt, reversed_shards, adapter=first_two, progress=False)
    with pytest.raises(ShardDirOccupiedError, match=rf"in that order, not {re.escape(str(folders[0].resolve()))}\)"):
        split_checkpoint(ckpt, reversed_shards, adapter=folders[0], progress=False)
    # a list of one is that adapter's split, recorded as one
    single = split_checkpoint(ckpt, tmp_path / "single", adapter=folders[0], progress=False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_layerstream"):
        split_checkpoint(ckpt, single, adapter=[folders[0]], adapter_revision=[None], progress=False)
    assert "already holds this split" in caplog.text
    assert ShardDirectory(single).manifest.adapter["id"] == str(folders[0].resolve())
    # the CLI: `--adapter` repeated, the same split unit by unit (`--adapter-revision ''`: none, for a local folder)
    caplog.clear()
    argv = [a for f in swapped for a in ("--adapter", str(f), "--adapter-revision", "")]
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        assert main(["split", str(ckpt), str(tmp_path / "cli"), *argv, "--quiet"]) == 0
    assert "applies to hub repos" not in caplog.text
    for unit in ["layers.0", "layers.2", "resident"]:
        a, b = _unit(tmp_path / "cli", unit), _unit(reversed_shards, unit)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    for argv, message in [
        (["--adapter-revision", "v1"], "give `--adapter-revision` once per `--adapter`"),
        (["--adapter-revision", "v1", "--adapter-revision", "v2", "--adapter-revision", "v3"], "once per `--adapter`"),
    ]:
        args = ["split", str(ckpt), str(tmp_path / "x"), "--adapter", str(folders[0]), "--adapter", str(folders[1])]
        assert main([*args, *argv]) == 2
        assert message in capsys.readouterr().err
    for adapter, revision, message, error in [
        ([], None, "`adapter` is an empty list", ValueError),
        (first_two, "v1", "one revision per adapter", ValueError),
        (first_two, ["v1"], "lists 1 revision for 2 adapters: pass one revision per adapter", ValueError),
        ([folders[0], 3], None, r"`adapter` \[1\] is 3", TypeError),  # (another type: TypeError)
        (folders[0], 3, r"`adapter_revision` is 3: pass a branch", TypeError),
    ]:
        with pytest.raises(error, match=message):
            split_checkpoint(ckpt, tmp_path / "x", adapter=adapter, adapter_revision=revision, progress=False)
    assert not (tmp_path / "x").exists()
    # the same adapter twice: merged twice, as asked, and said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        twice = split_checkpoint(ckpt, tmp_path / "twice", adapter=[folders[0], folders[0]], progress=False)
    assert f"Adapter 2, {folders[0].resolve()}, is an adapter given before it" in caplog.text
    _assert_same(_outputs(streamed_model(ckpt, twice)), _sequential_reference(ckpt, [folders[0], folders[0]]))


def test_the_refusal_says_how_the_adapters_differ():
    """What a refusal says of the adapters a split records against those given: which one's files changed (by its
    place, where an adapter comes twice), another order, others; a moved copy is named as a possible cause only
    where an adapter the split does not record is given."""
    from hf_layerstream.split import _adapter_difference

    def rec(name, digest="1", commit=None):
        return {"id": name, "peft_type": "LORA", "sha256": {"w": digest}} | ({"revision": commit} if commit else {})

    a, b, c, d = rec("a"), rec("b"), rec("c"), rec("d")
    assert _adapter_difference([a, b], [rec("a", commit="f" * 40), b]) == ""  # (the commit is noted, not compared)
    assert _adapter_difference([a, a], [a, rec("a", "2")]) == (
        " (the adapters a, a merged, in that order; adapter 2 of 2, a, whose files have changed since)"
    )
    assert _adapter_difference([a, rec("a", commit="1" * 40)], [a, rec("a", "2", commit="2" * 40)]).endswith(
        f"adapter 2 of 2, a at commit {'1' * 40}, whose files differ from those at {'2' * 40})"
    )
    assert (
        _adapter_difference([a, b], [b, a])
        == " (the adapters a, b merged, in that order; given in another order: b, a)"
    )
    assert _adapter_difference([a, b, d], [a, b, b]) == " (the adapters a, b, d merged, in that order, not a, b, b)"
    assert _adapter_difference([a, b], [a, c]).endswith("not a, c; a moved or copied adapter counts as another)")
    assert _adapter_difference([a, b], a) == " (the adapters a, b merged, in that order, not a)"
    assert (
        _adapter_difference(a, [a, b])
        == " (the adapter a merged, not a, b; a moved or copied adapter counts as another)"
    )
    assert _adapter_difference([a, b], None) == " (the adapters a, b merged, in that order, and none was given)"
    assert _adapter_difference(None, [a, b]) == " (it has no adapter merged)"
    assert _adapter_difference(a, c) == " (the adapter a merged; a moved or copied adapter counts as another)"


def test_an_adapter_that_cannot_be_merged_here_is_refused_before_anything_is_written(
    checkpoints, tmp_path, monkeypatch
):
    """A folder that is no adapter, an adapter of another model (other shapes), a prompt-learning adapter (nothing
    to merge), one PEFT makes from the weights it adapts (TinyLoRA's SVD met the stand-ins: it was refused as an
    adapter of another model), a damaged weights file (safetensors, and a `.bin` whose unpickler raised
    IndexError), the path of the adapter's config, and a hub id offline: each refused, naming the cause, and nothing
    written."""
    ckpt, _ = checkpoints("llama")
    wide = _models.make_config(
        "llama", hidden_size=_models.HIDDEN_SIZE * 2, intermediate_size=_models.INTERMEDIATE_SIZE
    )
    wide_ckpt = _models.save_tiny_checkpoint(wide, tmp_path / "wide")
    wrong = _save_adapter(wide_ckpt, tmp_path / "wrong", KINDS["lora"]())
    torch.manual_seed(0)
    prompt = tmp_path / "prompt"
    peft.get_peft_model(
        _models.load_reference(ckpt), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    ).save_pretrained(prompt)
    damaged, pickled = tmp_path / "damaged", tmp_path / "pickled"  # (their weights files cut short, and garbage)
    for folder, name, data in [
        (damaged, "adapter_model.safetensors", (wrong / "adapter_model.safetensors").read_bytes()[:100]),
        (pickled, "adapter_model.bin", b"\x80\x02}garbage"),  # (a pickle's protocol header, then no pickle)
    ]:
        folder.mkdir()
        (folder / "adapter_config.json").write_bytes((wrong / "adapter_config.json").read_bytes())
        (folder / name).write_bytes(data)
    tiny = tmp_path / "tiny"  # (TinyLoRA: made from an SVD of the weights it adapts, as PEFT loads it)
    peft.get_peft_model(_models.load_reference(ckpt), peft.TinyLoraConfig(target_modules=["q_proj"])).save_pretrained(
        tiny
    )
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cases = [
        (ckpt, ValueError, "holds no adapter_config.json"),
        (wrong, ValueError, "Cannot load the adapter .* onto this model"),
        (prompt, ValueError, "prompt-learning adapter"),
        (damaged, ValueError, "Cannot load the adapter .*damaged onto this model: SafetensorError"),
        (pickled, ValueError, "Cannot load the adapter .*pickled onto this model"),
        (wrong / "adapter_config.json", FileNotFoundError, r"is a file: pass the adapter's folder \(.*wrong\)"),
        (tiny, ValueError, r"\(TINYLORA\) reads the weights it adapts as PEFT loads it"),
        ("someorg/some-lora", FileNotFoundError, "Cannot fetch adapter_config.json of 'someorg/some-lora'"),
    ]
    for adapter, error, message in cases:
        with pytest.raises(error, match=message):
            split_checkpoint(ckpt, tmp_path / "out", adapter=adapter, progress=False)
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_folder_of_adapters_peft_saved_by_name_names_them(checkpoints, tmp_path):
    """PEFT's `save_pretrained` writes an adapter named otherwise than "default" into a subfolder of that name: the
    folder given was refused as "holds no adapter_config.json: it is not a PEFT adapter's folder", though PEFT wrote it,
    naming no fix. The adapters in its subfolders are named, to pass one of them; nothing is written."""
    ckpt, _ = checkpoints("llama")
    model = peft.get_peft_model(_models.load_reference(ckpt), KINDS["lora"](), adapter_name="mine")
    model.save_pretrained(tmp_path / "saved")
    message = (
        rf"^`adapter` {re.escape(str(tmp_path / 'saved'))} holds no adapter_config.json but adapters PEFT saved by "
        rf"name in its subfolders: pass one of them \({re.escape(str(tmp_path / 'saved' / 'mine'))}\)\.$"
    )
    with pytest.raises(ValueError, match=message):
        split_checkpoint(ckpt, tmp_path / "out", adapter=tmp_path / "saved", progress=False)
    assert not (tmp_path / "out").exists()


def test_attaching_an_adapter_to_a_merged_split_warns(checkpoints, tmp_path, caplog):
    """An adapter attached to a model streaming a split that has one merged adds to it: said, naming the merged one."""
    ckpt, _ = checkpoints("llama")
    folder = _save_adapter(ckpt, tmp_path / "adapter", KINDS["lora"]())
    shards = split_checkpoint(ckpt, tmp_path / "shards", adapter=folder, progress=False)
    model = streamed_model(ckpt, shards)
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"), attaching_adapters(model):
        pass
    assert f"holds the adapter {folder.resolve()} merged into its weights" in caplog.text


def test_verify_names_an_adapter_record_damaged_and_the_same_split_writes_it_again(checkpoints, tmp_path, caplog):
    """The manifest's `adapter` record edited into another form (a string, a list of one): it was taken for none,
    `info` and the warning on attaching one again named no adapter merged, `verify` passed, and the same split run
    again was refused as another one ("it has no adapter merged"). `verify` names the record, with the fix: the same
    split (its options' digest holds the adapters) writes the record again; a split without one removes it."""
    ckpt, _ = checkpoints("llama")
    folder = _save_adapter(ckpt, tmp_path / "adapter", KINDS["lora"]())
    shards = split_checkpoint(ckpt, tmp_path / "shards", adapter=folder, progress=False)
    manifest = shards / "manifest.json"
    sound = json.loads(manifest.read_text())
    files = {p: p.stat().st_mtime_ns for p in (shards / "layers").iterdir()}
    for damaged in ("lora", [sound["adapter"]]):
        manifest.write_text(json.dumps({**sound, "adapter": damaged}, indent=1))
        assert ShardDirectory(shards).verify(checksums=False) == [
            f'{manifest} records "adapter": {json.dumps(damaged)[:120]}, which is not the form the split writes (the '
            "PEFT adapter merged into the weights: an object, or a list of two or more in merge order): the manifest "
            "was changed since the split, and which adapter the weights hold is unknown (to `info`, and to the "
            "warning where one is attached again): run the same split again (`split_checkpoint` / `hf-layerstream "
            "split`, same source and options), its adapters included, which writes the record again"
        ]
        with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
            split_checkpoint(ckpt, shards, adapter=folder, progress=False)
        assert "its manifest's adapter record was damaged; it is written again" in caplog.text
        assert json.loads(manifest.read_text()) == sound
        assert ShardDirectory(shards).verify(checksums=False) == []
    assert {p: p.stat().st_mtime_ns for p in (shards / "layers").iterdir()} == files  # (nothing split again)
    # (another adapter, or none: another split's options, refused as before)
    manifest.write_text(json.dumps({**sound, "adapter": "lora"}, indent=1))
    with pytest.raises(ShardDirOccupiedError):
        split_checkpoint(ckpt, shards, progress=False)
    # a split without an adapter: the record added to it removed
    plain = split_checkpoint(ckpt, tmp_path / "plain", progress=False)
    without = json.loads((plain / "manifest.json").read_text())
    (plain / "manifest.json").write_text(json.dumps({**without, "adapter": "lora"}, indent=1))
    assert len(ShardDirectory(plain).verify(checksums=False)) == 1
    split_checkpoint(ckpt, plain, progress=False)
    assert json.loads((plain / "manifest.json").read_text()) == without


def test_cli_split_merges_the_adapter_and_inspect_names_it(checkpoints, tmp_path, capsys):
    ckpt, _ = checkpoints("llama")
    folder = _save_adapter(ckpt, tmp_path / "adapter", KINDS["lora"]())
    shards = tmp_path / "shards"
    assert main(["split", str(ckpt), str(shards), "--adapter", str(folder), "--quiet"]) == 0
    capsys.readouterr()
    _, expected = _merged_reference(ckpt, folder)
    _assert_same(_outputs(streamed_model(ckpt, shards)), expected)
    assert main(["inspect", str(shards), "--device", "cpu"]) == 0
    assert f"adapter          {folder.resolve()} (LORA), merged into the weights" in capsys.readouterr().out
    assert main(["inspect", str(shards), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter"]["peft_type"] == "LORA"


def test_a_hub_adapter_comes_from_the_hub_cache_offline(checkpoints, tmp_path, monkeypatch, caplog):
    """A hub id is fetched with the split's `cache_dir`, and offline from the cache: also an adapter of
    the older format, only `adapter_model.bin` (refused: the missing safetensors file was taken for a download that
    failed), which merges as the same adapter's folder does. `cache_dir` and `token` served the adapter: not warned
    about as unused for the local `source` (`token` was: "`token` applies to hub repos; ... read without it")."""
    from huggingface_hub import constants
    from safetensors.torch import load_file

    ckpt, _ = checkpoints("llama")
    folder = _save_adapter(ckpt, tmp_path / "adapter", KINDS["lora"]())
    config = (folder / "adapter_config.json").read_bytes()
    weights = load_file(folder / "adapter_model.safetensors")
    torch.save(weights, tmp_path / "adapter_model.bin")
    cache = tmp_path / "cache"
    _models.hub_cache(
        cache,
        "org/lora",
        {"adapter_config.json": config, "adapter_model.bin": (tmp_path / "adapter_model.bin").read_bytes()},
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        shards = split_checkpoint(
            ckpt, tmp_path / "shards", adapter="org/lora", cache_dir=cache, token="hf_abc", progress=False
        )
    assert "`cache_dir` applies to hub repos" not in caplog.text and "`token` applies to hub repos" not in caplog.text
    reference = split_checkpoint(ckpt, tmp_path / "reference", adapter=folder, progress=False)
    for unit in ["layers.0", "layers.2", "resident"]:
        a, b = _unit(shards, unit), _unit(reference, unit)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = ShardDirectory(shards).manifest.adapter
    assert record["id"] == "org/lora" and set(record["sha256"]) == {"adapter_config.json", "adapter_model.bin"}


def test_a_hub_adapter_at_a_revision(checkpoints, tmp_path, monkeypatch, caplog, capsys):
    """`adapter_revision` (`--adapter-revision`) fetches a hub adapter at that branch, tag or commit (here offline,
    from the hub cache, which holds another adapter at main, and the first again at a third commit): the manifest
    notes the commit a hub adapter came from. The same files are the same split however the commit is named, or at
    another commit; other files are another split, refused naming both commits. One not in the cache is named in the
    error; with a local folder it is warned about; without an adapter it is refused."""
    from huggingface_hub import constants

    ckpt, _ = checkpoints("llama")
    first = _save_adapter(ckpt, tmp_path / "a", KINDS["lora"]())
    torch.manual_seed(2)
    second = _save_adapter(ckpt, tmp_path / "b", KINDS["ia3"]())
    cache, main_commit, commit = tmp_path / "cache", "a" * 40, "b" * 40
    for folder, ref, at in ((first, "main", main_commit), (second, "v2", commit), (first, "again", "c" * 40)):
        files = {name: (folder / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
        _models.hub_cache(cache, "org/lora", files, ref=ref, commit=at)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # (the command line's: it takes no cache folder)
    shards = tmp_path / "shards"
    assert main(["split", str(ckpt), str(shards), "--adapter", "org/lora", "--adapter-revision", "v2", "--quiet"]) == 0
    reference = split_checkpoint(ckpt, tmp_path / "reference", adapter=second, progress=False)
    for unit in ["layers.0", "layers.2", "resident"]:
        a, b = _unit(shards, unit), _unit(reference, unit)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = ShardDirectory(shards).manifest.adapter
    assert (record["id"], record["revision"], record["peft_type"]) == ("org/lora", commit, "IA3")
    capsys.readouterr()
    assert main(["inspect", str(shards), "--device", "cpu"]) == 0
    assert f"adapter          org/lora at revision {commit} (IA3), merged" in capsys.readouterr().out
    with caplog.at_level(logging.INFO, logger="hf_layerstream"):
        split_checkpoint(ckpt, shards, adapter="org/lora", adapter_revision=commit, progress=False)
    assert "already holds this split" in caplog.text
    for revision in ("main", None):
        with pytest.raises(
            ShardDirOccupiedError,
            match=rf"org/lora merged at commit {commit}, whose files differ from those at {main_commit}\)",
        ):
            split_checkpoint(ckpt, shards, adapter="org/lora", adapter_revision=revision, progress=False)
    # a split of main: the same as main named, by its commit, or another commit holding the same files
    main_split = split_checkpoint(ckpt, tmp_path / "main", adapter="org/lora", progress=False)
    assert ShardDirectory(main_split).manifest.adapter["revision"] == main_commit
    for revision in ("main", main_commit, "again"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hf_layerstream"):
            split_checkpoint(ckpt, main_split, adapter="org/lora", adapter_revision=revision, progress=False)
        assert "already holds this split" in caplog.text, revision
    with pytest.raises(
        ShardDirOccupiedError,
        match=rf"org/lora merged at commit {main_commit}, whose files differ from those at {commit}\)",
    ):
        split_checkpoint(ckpt, main_split, adapter="org/lora", adapter_revision="v2", progress=False)
    with pytest.raises(FileNotFoundError, match=r"adapter_config.json of 'org/lora' at revision 'v3': the hub cannot"):
        split_checkpoint(ckpt, tmp_path / "v3", adapter="org/lora", adapter_revision="v3", progress=False)
    assert not (tmp_path / "v3").exists()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        local = split_checkpoint(ckpt, tmp_path / "local", adapter=first, adapter_revision="v2", progress=False)
    assert "`adapter_revision` 'v2' applies to hub repos" in caplog.text
    assert "revision" not in ShardDirectory(local).manifest.adapter
    with pytest.raises(ValueError, match="pass the `adapter` too"):
        split_checkpoint(ckpt, tmp_path / "none", adapter_revision="v2", progress=False)
    assert not (tmp_path / "none").exists()
    capsys.readouterr()
    assert main(["split", str(ckpt), str(tmp_path / "none"), "--adapter-revision", "v2", "--quiet"]) == 2
    assert "`--adapter-revision` only applies with `--adapter`" in capsys.readouterr().err


def test_a_rerun_of_a_finished_adapter_split_does_not_load_the_adapter(checkpoints, tmp_path, monkeypatch):
    """The same split again is done: it neither loads the adapter (4.4 s against 2.8 s, and peft needed) nor counts a
    file PEFT does not read (an `adapter_model.bin` beside the safetensors one was another adapter: refused)."""
    import hf_layerstream.merge

    ckpt, _ = checkpoints("llama")
    folder = _save_adapter(ckpt, tmp_path / "adapter", KINDS["lora"]())
    shards = split_checkpoint(ckpt, tmp_path / "shards", adapter=folder, progress=False)
    (folder / "adapter_model.bin").write_bytes(b"not read")

    def refuse(*args, **kwargs):
        raise AssertionError("the adapter was loaded")

    monkeypatch.setattr(hf_layerstream.merge, "AdapterMerge", refuse)
    assert split_checkpoint(ckpt, shards, adapter=folder, progress=False) == shards


@pytest.mark.parametrize("kept", ["_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"])
def test_a_weight_the_model_keeps_in_float32_merges_in_float32(checkpoints, tmp_path, monkeypatch, kept):
    """A weight `from_pretrained` keeps in float32 at a half dtype (a router; here Llama's `q_proj`, marked so) is
    merged in float32, as the loaded model merges it, and stored so: merged at the split's float16 it was 1e-4 off
    (`_keep_in_fp32_modules`, `dtype=torch.float16`), at a bfloat16 checkpoint's own dtype 8e-4 off
    (`_keep_in_fp32_modules_strict`, no `dtype`: stored as float32 now, where the checkpoint's bfloat16 would lose
    the merged bits)."""
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, kept, ["q_proj"])
    half = torch.float16 if kept == "_keep_in_fp32_modules" else torch.bfloat16
    ckpt, _ = checkpoints("llama", dtype=torch.float32 if half == torch.float16 else torch.bfloat16)
    folder = _save_adapter(ckpt, tmp_path / "adapter", KINDS["lora"](), half)
    merged = peft.PeftModel.from_pretrained(_models.load_reference(ckpt, half), folder).merge_and_unload()
    split_dtype = half if half == torch.float16 else None
    shards = split_checkpoint(ckpt, tmp_path / "shards", adapter=folder, dtype=split_dtype, progress=False)
    weights = _unit(shards, "layers.1")
    for name in ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.down_proj.weight"]:
        want = merged.get_parameter(f"model.layers.1.{name}").detach()
        assert want.dtype == (torch.float32 if "q_proj" in name else half)
        assert weights[f"model.layers.1.{name}"].dtype == want.dtype
        assert torch.equal(weights[f"model.layers.1.{name}"], want)


def test_an_interrupted_or_damaged_adapter_split_is_finished_merged(checkpoints, tmp_path, monkeypatch):
    """A split with an adapter interrupted after two units, run again with it, finishes as a clean split (the units
    written since are merged too; without the adapter, refused, naming it); a finished one with a damaged unit is
    repaired merged."""
    import hf_layerstream.split as split_module

    ckpt, _ = checkpoints("llama")
    folder = _save_adapter(ckpt, tmp_path / "adapter", KINDS["lora"]())
    clean = split_checkpoint(ckpt, tmp_path / "clean", adapter=folder, progress=False)
    write, calls = split_module._write_unit, []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return write(*args, **kwargs)

    monkeypatch.setattr(split_module, "_write_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        split_checkpoint(ckpt, tmp_path / "shards", adapter=folder, progress=False)
    monkeypatch.setattr(split_module, "_write_unit", write)
    with pytest.raises(ShardDirOccupiedError, match=r"unfinished split .*the adapter .* merged, and none was given"):
        split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    shards = split_checkpoint(ckpt, tmp_path / "shards", adapter=folder, progress=False)
    units = ["layers.0", "layers.1", "layers.2", "resident"]

    def same_as_clean():
        return all(
            (shards / ShardDirectory(shards).unit(u).file).read_bytes()
            == (clean / ShardDirectory(clean).unit(u).file).read_bytes()
            for u in units
        )

    assert same_as_clean()
    damaged = shards / ShardDirectory(shards).unit("layers.2").file
    data = bytearray(damaged.read_bytes())
    data[-10] ^= 0xFF
    damaged.write_bytes(bytes(data))
    split_checkpoint(ckpt, shards, adapter=folder, progress=False)
    assert same_as_clean()


@pytest.mark.parametrize("read", [0, 1], ids=["as PEFT loads it", "as it is read again"])
def test_ctrl_c_in_torchs_c_code_reading_the_adapter_is_a_keyboard_interrupt(checkpoints, tmp_path, monkeypatch, read):
    """A Ctrl-C while torch's C code ran inside safetensors' reading of the adapter's weights (its KeyboardInterrupt
    cleared there, the read failing with "ValueError: could not determine the shape of object type
    'torch.storage.UntypedStorage'", as a source's read does) was a ValueError, "Cannot load the adapter ... onto this
    model" (the CLI: "error: ...", exit 2) or the bare ValueError: it is the KeyboardInterrupt, the SIGINT handler in
    place is the same after, and the same split then finishes as an uninterrupted one."""
    import peft.utils.save_and_load as peft_io

    ckpt, _ = checkpoints("llama")
    folder = _save_adapter(ckpt, tmp_path / "adapter", KINDS["lora"]())
    clean = split_checkpoint(ckpt, tmp_path / "clean", adapter=folder, progress=False)
    real_load, reads = peft_io.safe_load_file, []
    handler = signal.getsignal(signal.SIGINT)

    def load_file(*args, **kwargs):
        reads.append(args)
        if len(reads) == read + 1:
            try:  # what torch's C code does: a call back into Python meets the Ctrl-C, and it clears the error
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt:
                pass
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")
        return real_load(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(peft_io, "safe_load_file", load_file)
        with pytest.raises(KeyboardInterrupt):
            split_checkpoint(ckpt, tmp_path / "shards", adapter=folder, progress=False)
    assert len(reads) == read + 1 and signal.getsignal(signal.SIGINT) is handler
    shards = split_checkpoint(ckpt, tmp_path / "shards", adapter=folder, progress=False)
    for unit in ["layers.0", "layers.1", "layers.2", "resident"]:
        got, want = (d / ShardDirectory(d).unit(unit).file for d in (shards, clean))
        assert got.read_bytes() == want.read_bytes()


def test_a_manifest_that_is_a_fifo_or_holds_a_damaged_adapter_record(checkpoints, tmp_path):
    """With an adapter given, a `manifest.json` that is a FIFO is refused as damaged (the adapter's check read it and
    waited for a writer, forever), and a finished split whose manifest's adapter record is no object is read as
    having none, as `ShardDirectory` reads it (the refusal raised AttributeError)."""
    ckpt, _ = checkpoints("llama")
    folder = _save_adapter(ckpt, tmp_path / "adapter", KINDS["lora"]())
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "manifest.json")
    with pytest.raises(ShardDirOccupiedError, match=r"manifest\.json is damaged"):
        returns_within(30, split_checkpoint, ckpt, fifo, adapter=folder, progress=False)
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    manifest = json.loads((shards / "manifest.json").read_text())
    for damaged in ("lost", [{"id": "a"}, "lost"], [{"id": "a"}]):  # (several are two or more records)
        (shards / "manifest.json").write_text(json.dumps({**manifest, "adapter": damaged}))
        assert ShardDirectory(shards).manifest.adapter is None
    assert split_checkpoint(ckpt, shards, progress=False) == shards
    with pytest.raises(ShardDirOccupiedError, match=r"\(it has no adapter merged\)"):
        split_checkpoint(ckpt, shards, adapter=folder, progress=False)


def test_without_peft_an_adapter_split_is_refused_and_the_rest_works(checkpoints, tmp_path, monkeypatch, capsys):
    """peft not installed: a split with an adapter says which package it needs, before anything is written (the CLI's
    message named `--adapter` twice); one without an adapter needs none."""
    import sys

    ckpt, _ = checkpoints("llama")
    folder = _save_adapter(ckpt, tmp_path / "adapter", KINDS["lora"]())
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"^Merging an adapter into the split needs the peft package"):
        split_checkpoint(ckpt, tmp_path / "shards", adapter=folder, progress=False)
    assert not (tmp_path / "shards").exists()
    assert main(["split", str(ckpt), str(tmp_path / "shards"), "--adapter", str(folder), "--quiet"]) != 0
    assert "needs the peft package: `pip install peft`" in capsys.readouterr().err
    assert split_checkpoint(ckpt, tmp_path / "plain", progress=False) == tmp_path / "plain"
