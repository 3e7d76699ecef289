"""`ShardDirectory`: cheap checks at every load, full checksums on request, `verify` lists every problem, and
loading never writes (a read-only shard directory works)."""

from __future__ import annotations

import builtins
import io
import json
import os
import re
import shlex
import shutil
import stat
from pathlib import Path

import _models
import pytest
import torch
from conftest import streamed_model

from hf_layerstream import (
    ShardDirectory,
    ShardDirError,
    ShardFileError,
    disable_layer_streaming,
    enable_layer_streaming,
    get_streaming_state,
    split_checkpoint,
)
from hf_layerstream import _safetensors as st_mod
from hf_layerstream._safetensors import (
    DATA_ALIGN,
    SAMPLE_BYTES,
    atomic_write_safetensors,
    read_header,
    sample_digest,
    serialize,
    sha256_file,
)
from hf_layerstream.cli import main

STREAM_ALL = {"max_memory": {"cpu": 0}, "prefetch": 1}


@pytest.fixture
def shard_copy(checkpoints, tmp_path):
    ckpt, shards = checkpoints("llama")
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    return ckpt, copy


def _flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    assert len(data) > 2 * SAMPLE_BYTES + 16, "the file must be larger than the sampled head and tail"
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_written_tensors_start_on_cache_lines(tmp_path):
    """The data region starts at a multiple of DATA_ALIGN bytes, and so does every tensor whose size is a multiple
    of it, whatever sizes and dtypes come mixed (the odd-sized ones are written after them); each tensor stays
    aligned to its element size; the official reader gives back every value."""
    from safetensors.torch import load

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.odd32": torch.randn(3, generator=g),  # 12 bytes
        "b.matrix32": torch.randn(16, 16, generator=g),
        "c.odd16": torch.randn(5, generator=g).bfloat16(),  # 10 bytes
        "d.matrix16": torch.randn(8, 64, generator=g).bfloat16(),
        "e.bytes": torch.arange(100, dtype=torch.uint8),
        "f.odd64": torch.arange(3, dtype=torch.int64),  # 24 bytes
        "g.vector64": torch.arange(8, dtype=torch.int64),
    }
    for metadata in (None, {"unit": "layers.0"}, {"unit": "x" * 37}):
        data = bytes(serialize(tensors, metadata))
        path = tmp_path / "t.safetensors"
        path.write_bytes(data)
        header = read_header(path)
        assert header.data_offset % DATA_ALIGN == 0
        for name, info in header.tensors.items():
            start = header.data_offset + info.begin
            assert start % tensors[name].element_size() == 0, name
            if tensors[name].nbytes % DATA_ALIGN == 0:
                assert start % DATA_ALIGN == 0, name
        back = load(data)
        assert sorted(back) == sorted(tensors)
        assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())


def test_a_header_longer_than_safetensors_reads_is_refused_naming_the_file(tmp_path):
    """A header the file holds but longer than the safetensors library reads (100,000,000 bytes): the bound was
    100 MiB, and the library then refused such a source file with "header too large", naming no file. (A sparse
    file: nothing past the length is written.)"""
    from safetensors import safe_open

    path = tmp_path / "big_header.safetensors"
    length = 100_000_008
    with open(path, "wb") as f:
        f.write(length.to_bytes(8, "little"))
        f.truncate(8 + length + 64)
    with pytest.raises(ShardFileError, match="100000008-byte header, more than the 100000000 bytes") as info:
        read_header(path)
    assert str(path) in str(info.value)
    with pytest.raises(Exception, match="(?i)header too large"):  # (the library's own bound: the same)
        safe_open(str(path), "pt")


def test_a_unit_file_is_written_one_tensor_at_a_time(tmp_path, monkeypatch):
    """`atomic_write_safetensors` writes `serialize`'s bytes (and reports their size and digests) without holding the
    file in memory: with `consume`, each tensor is released before the next one is written, so splitting a 70B
    model's 4 GiB of embeddings and head holds them once, not three times."""
    import weakref

    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(300 + i, 70, generator=g).bfloat16() for i in range(4)}
    tensors["odd"] = torch.arange(5, dtype=torch.int64)
    tensors["empty"] = torch.zeros(0)
    tensors["strided"] = torch.randn(40, 30, generator=g).t()  # not contiguous
    expected = bytes(serialize(tensors, {"unit": "layers.0"}))
    alive = [weakref.ref(t) for t in tensors.values()]
    real_write_all = st_mod._write_all
    held_at_each_write = []

    def write_all(fd, data):
        held_at_each_write.append(sum(r() is not None for r in alive))
        return real_write_all(fd, data)

    monkeypatch.setattr(st_mod, "_write_all", write_all)
    path = tmp_path / "unit.safetensors"
    size, sha256, sample = atomic_write_safetensors(path, tensors, {"unit": "layers.0"}, consume=True)
    assert path.read_bytes() == expected
    assert (size, sha256, sample) == (len(expected), sha256_file(path), sample_digest(path))
    assert tensors == {}
    # the header with every tensor held, then one write per tensor, each dropped from `tensors` as it is written (its
    # bytes then live only in the view being written)
    assert held_at_each_write == [7, 6, 5, 4, 3, 2, 1, 0]
    assert all(r() is None for r in alive)
    assert [p.name for p in tmp_path.iterdir()] == ["unit.safetensors"]  # no temporary file left


def test_a_unit_files_tensors_are_freed_as_they_are_written(tmp_path, monkeypatch):
    """The memory of each tensor (its storage, not only the Python object, which `_tensor_bytes`' views outlive) is
    freed once it is written: when a tensor is written, only it and those after it are still held."""
    import weakref

    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(300 + i, 70, generator=g).bfloat16() for i in range(4)}
    tensors["odd"] = torch.arange(5, dtype=torch.int64)
    tensors["strided"] = torch.randn(40, 30, generator=g).t()  # not contiguous: a copy is written
    storages = {k: weakref.ref(v.untyped_storage()) for k, v in tensors.items()}
    _, order, _ = st_mod._layout(tensors, None)
    real_write_all = st_mod._write_all
    alive_at_each_write = []

    def write_all(fd, data):
        alive_at_each_write.append({k for k, r in storages.items() if r() is not None})
        return real_write_all(fd, data)

    monkeypatch.setattr(st_mod, "_write_all", write_all)
    atomic_write_safetensors(tmp_path / "unit.safetensors", tensors, consume=True)
    assert alive_at_each_write[0] == set(order)  # the header
    for i, name in enumerate(order, 1):
        assert alive_at_each_write[i] <= set(order[i - 1 :]), (name, alive_at_each_write[i])
    assert all(r() is None for r in storages.values())


def test_sound_directory_passes_every_check(shard_copy, capsys):
    _, shards = shard_copy
    assert ShardDirectory(shards, checksums=True).verify() == []
    assert main(["verify", str(shards)]) == 0
    assert "all 4 files match the manifest" in capsys.readouterr().out


def test_verify_reads_config_json_once(shard_copy, monkeypatch):
    """`verify` read and parsed config.json three times (its own checks, again before building the model from it,
    and again for the manifest's `load_dtype`): it reads it once for all three (transformers' `AutoConfig` reads it
    for the model it builds)."""
    _, shards = shard_copy
    reads = []
    read_text = Path.read_text  # (as transformers reads it: UTF-8 text)

    def counted(self, *args, **kwargs):
        if self.name == "config.json":
            reads.append(self)
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    assert ShardDirectory(shards, check_files=False).verify(checksums=False) == []
    assert reads == [shards / "config.json"]
    reads.clear()
    assert main(["verify", str(shards), "--quick"]) == 0
    assert reads == [shards / "config.json"]


def test_checksums_catch_what_the_cheap_checks_cannot(shard_copy):
    """A flipped byte in the middle of a file: same size, same header, same sampled head and tail."""
    _, shards = shard_copy
    target = shards / "layers" / "00001.safetensors"
    _flip_middle_byte(target)
    ShardDirectory(shards)  # the cheap checks cannot see it
    with pytest.raises(ShardDirError, match=r"00001\.safetensors does not match its SHA-256"):
        ShardDirectory(shards, checksums=True)
    assert ShardDirectory(shards).verify(checksums=False) == []
    [problem] = ShardDirectory(shards).verify()
    assert str(target) in problem and "SHA-256" in problem


def test_a_file_damaged_within_is_repaired_as_its_error_says(shard_copy, capsys):
    """The checksum error said "re-run the same split to repair", which takes a file damaged within (same size, same
    header and sample digest) for sound and does nothing. It says to delete the files named first; done so, the same
    split writes them again, the bytes they had."""

    ckpt, shards = shard_copy
    target = shards / "layers" / "00001.safetensors"
    sound = target.read_bytes()
    _flip_middle_byte(target)
    with pytest.raises(ShardDirError, match=r"delete the files it names and re-run the same `split_checkpoint`"):
        ShardDirectory(shards, checksums=True)
    assert main(["verify", str(shards)]) == 1
    assert "delete the files named and re-run the same split" in capsys.readouterr().err
    split_checkpoint(ckpt, shards, progress=False)  # (alone: nothing to do, as the message says)
    assert target.read_bytes() != sound
    target.unlink()
    split_checkpoint(ckpt, shards, progress=False)
    assert target.read_bytes() == sound and ShardDirectory(shards, checksums=True).verify() == []


def test_a_full_digest_that_differs_where_the_cheap_checks_pass_names_both_causes(shard_copy, capsys):
    """A unit's `sha256` edited in the manifest, its file as the split wrote it: `verify` called the file "corrupted or
    replaced". Its size, header and sample digest are as recorded (a replaced file fails those), so either it is
    damaged within, past the bytes the sample reads, or the manifest's digest was changed: the two cannot be told
    apart without hashing against another record, and it names both; the fix given (delete the file, run the same split
    again) mends either. A file that fails the cheap checks, hashed unchecked, stays "corrupted or replaced"."""
    ckpt, shards = shard_copy
    manifest = shards / "manifest.json"
    edited = json.loads(manifest.read_text())
    _unit_json(edited, "layers.1")["sha256"] = "0" * 64
    manifest.write_text(json.dumps(edited, indent=1))
    target = shards / "layers" / "00001.safetensors"
    both = (
        f"{target} does not match its SHA-256 in the manifest, though its size, header and sample digest (its first "
        "and last 64 KiB) do: it is damaged within, or the manifest's `sha256` of it was changed since the split"
    )
    assert ShardDirectory(shards).verify() == [both]
    with pytest.raises(ShardDirError, match=re.escape(both) + r"\. Run `hf-layerstream verify` for the full list"):
        ShardDirectory(shards, checksums=True)
    assert main(["verify", str(shards)]) == 1
    assert "delete the files named and re-run the same split" in capsys.readouterr().err
    target.unlink()  # (as the fix says)
    split_checkpoint(ckpt, shards, progress=False)
    assert ShardDirectory(shards, checksums=True).verify() == []
    os.truncate(target, 1000)
    assert ShardDirectory(shards, check_files=False)._checksum_problems(["layers.1"]) == [
        f"{target} does not match its SHA-256 in the manifest (corrupted or replaced)"
    ]


def test_verify_reports_each_problem(shard_copy, capsys):
    _, shards = shard_copy
    (shards / "layers" / "00000.safetensors").unlink()
    _flip_middle_byte(shards / "layers" / "00001.safetensors")
    from safetensors.torch import load_file

    path = shards / "layers" / "00002.safetensors"
    tensors = load_file(path)
    tensors["model.layers.2.mlp.down_proj.weight"] = tensors["model.layers.2.mlp.down_proj.weight"].half()
    path.write_bytes(bytes(serialize(tensors, {"unit": "layers.2"})))
    with open(shards / "resident.safetensors", "r+b") as f:
        f.truncate(100)

    problems = ShardDirectory(shards, check_files=False).verify()
    assert len(problems) == 4, problems
    joined = "\n".join(problems)
    for name in ("00000.safetensors", "00001.safetensors", "00002.safetensors", "resident.safetensors"):
        assert name in joined
    assert "is missing" in joined and "SHA-256" in joined and "100 bytes but the manifest records" in joined
    assert main(["verify", str(shards)]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 4 and "4 problem(s) in 4 files" in captured.err
    assert main(["verify", "--quick", str(shards)]) == 1  # sizes and headers: 3 of the 4


@pytest.mark.parametrize("rel", ["config.json", "resident.safetensors", "layers/00001.safetensors", "layers"])
def test_a_folder_or_file_in_the_way_of_the_split_is_named_with_the_fix(shard_copy, tmp_path, rel):
    """A folder where the split writes a file (config.json, a unit file): opening the directory said to run the same
    split again, "which writes the file again", and that split failed with the bare `IsADirectoryError` of its rename
    (naming its temporary file); a file `layers`, with the bare `FileExistsError` of its `mkdir`. Opening names what is
    there and the fix (move it away, then the same split), and so does the split; done so, the split writes the files
    back, and what was moved away is left as it was."""
    ckpt, shards = shard_copy
    path = shards / rel
    if rel == "layers":  # (a file where the split makes a folder)
        shutil.rmtree(path)
        path.write_text("notes")
    else:
        path.unlink()
        path.mkdir()
        (path / "notes.txt").write_text("notes")
    with pytest.raises(ShardFileError) as info:
        ShardDirectory(shards)
    if rel != "layers":  # (its files are named missing, the default fix: the same split, whose error then names it)
        opened = str(info.value)
        assert opened.startswith(f"{path} is not a"), opened
        assert "It is no file the split wrote: move it away, then run the same split again" in opened, opened
    written = "config.json" if rel == "config.json" else "layers/00000.safetensors" if rel == "layers" else rel
    with pytest.raises(OSError) as info:
        split_checkpoint(ckpt, shards, progress=False)
    there = (
        f"a folder is at {path}, where the split writes a file" if rel != "layers" else f"a file is at {path}, where"
    )
    message = str(info.value)
    assert f"] Writing {written} into {shards} failed: " in message and there in message, message
    assert "move it away) and run the same split again to resume" in message, message
    shutil.move(path, tmp_path / "moved")
    split_checkpoint(ckpt, shards, progress=False)
    assert ShardDirectory(shards, checksums=True).verify() == []
    assert (tmp_path / "moved" / ("notes.txt" if rel != "layers" else "")).read_text() == "notes"


def test_a_lost_config_json_is_named_and_written_again_by_the_same_split(shard_copy, capsys):
    """`config.json`, which the model is built from, deleted: `verify` said every file matched, a re-run of the split
    found nothing to do, and `generate` failed with transformers' "Should have a `model_type` key". Opening the
    directory names the file and the fix, `verify` lists it, and the same split writes it again."""

    ckpt, shards = shard_copy
    config = shards / "config.json"
    before = config.read_bytes()
    config.unlink()
    with pytest.raises(ShardDirError, match=r"config\.json is missing .* Run the same split again"):
        ShardDirectory(shards)
    problems = ShardDirectory(shards, check_files=False).verify(checksums=False)
    assert len(problems) == 1 and "config.json is missing" in problems[0]
    assert main(["verify", "--quick", str(shards)]) == 1
    assert main(["generate", str(shards), "hi"]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    split_checkpoint(ckpt, shards, progress=False)
    assert config.read_bytes() == before and ShardDirectory(shards, checksums=True).verify() == []


def test_verify_advises_what_the_same_split_writes_back_without_deleting_it(shard_copy, capsys):
    """`verify`'s summary said to delete the files named and re-run the split whatever they were: config.json (edited,
    damaged) and a missing side file are written back by the same split run as they are, deleted or not, so it says
    so, and to delete only the unit files named (one damaged within passes the re-run's checks). Each advice done,
    the directory verifies."""
    ckpt, shards = shard_copy
    config = shards / "config.json"
    edited = json.loads(config.read_text())
    edited["num_hidden_layers"] += 1
    config.write_text(json.dumps(edited))
    (shards / "tokenizer.json").unlink()
    assert main(["verify", str(shards)]) == 1
    err = capsys.readouterr().err
    assert (
        "re-run the same split (`hf-layerstream split SOURCE SHARD_DIR`), which writes config.json, tokenizer.json"
        in err
    )
    assert "back (nothing to delete)" in err and "delete the files named" not in err
    split_checkpoint(ckpt, shards, progress=False)
    assert main(["verify", str(shards)]) == 0
    # with a unit file damaged within: that one deleted, config.json left as it is
    config.write_text("{")
    target = shards / "layers" / "00001.safetensors"
    _flip_middle_byte(target)
    assert main(["verify", str(shards)]) == 1
    err = capsys.readouterr().err
    assert "delete the files named except config.json and re-run the same split" in err
    assert "which writes them again and config.json back" in err
    target.unlink()
    split_checkpoint(ckpt, shards, progress=False)
    assert main(["verify", str(shards)]) == 0


def test_verify_names_a_side_file_the_manifest_lists_that_is_missing(shard_copy, capsys, caplog):
    """A side file the manifest lists, deleted: `verify` said every file matched (exit 0), and the directory's
    tokenizer failed or tokenized otherwise, and `generate` ran with other generation settings. A tokenizer file,
    chat template, generation or processor config missing (a symlink to nothing too) is a problem now, named with
    what reads it and that the same split writes it back, which it does; a license file or the model card, which the
    model runs without, is a warning (exit 0), the summary saying which are missing."""
    import logging

    ckpt, shards = shard_copy
    names = ["generation_config.json", "tokenizer.json", "README.md"]
    assert set(names) <= set(ShardDirectory(shards).manifest.side_files)
    before = {name: (shards / name).read_bytes() for name in names}
    for name in names:
        (shards / name).unlink()
    (shards / "tokenizer.json").symlink_to(shards / "elsewhere.json")
    with caplog.at_level(logging.WARNING, logger="hf_layerstream.shard_dir"):
        problems = ShardDirectory(shards).verify(checksums=False)
    again = "the split wrote it, and the manifest lists it): running the same split again writes it back"
    assert problems == [
        f"{shards / 'generation_config.json'} is missing (the generation settings streaming gives the model: "
        f"end-of-sequence ids, sampling defaults; {again}",
        f"{shards / 'tokenizer.json'} is missing (a file of the tokenizer: `AutoTokenizer.from_pretrained` of the "
        f"directory fails or tokenizes otherwise; {again}",
    ]
    assert f"{shards} lacks README.md, which its split wrote (the model runs without" in caplog.text
    assert "running the same split again writes it back" in caplog.text
    assert main(["verify", "--quick", str(shards)]) == 1
    captured = capsys.readouterr()
    listed = len(ShardDirectory(shards).manifest.side_files)
    assert captured.out.count("is missing") == 2 and f"2 problem(s) in 4 files and {listed} side files" in captured.err
    # `inspect` says so too (it said nothing)
    assert main(["inspect", str(shards), "--device", "cpu"]) == 0
    assert (
        "warning          side files its split wrote are missing: README.md, generation_config.json, tokenizer.json"
        in capsys.readouterr().out
    )
    assert main(["inspect", str(shards), "--device", "cpu", "--json"]) == 0
    assert sorted(json.loads(capsys.readouterr().out)["missing_side_files"]) == sorted(names)
    split_checkpoint(ckpt, shards, progress=False)
    assert {name: (shards / name).read_bytes() for name in names} == before
    assert not (shards / "tokenizer.json").is_symlink() and ShardDirectory(shards, checksums=True).verify() == []
    assert main(["inspect", str(shards), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["missing_side_files"] == []

    (shards / "README.md").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_layerstream.shard_dir"):
        assert main(["verify", "--quick", str(shards)]) == 0
    assert "lacks README.md, which its split wrote" in caplog.text
    assert capsys.readouterr().out.endswith(
        "all 4 files match the manifest (sizes, headers and sample digests), and "
        f"{listed - 1} of the {listed} side files it lists are there (README.md missing: see the warning)\n"
    )


def test_verify_names_a_side_files_list_it_cannot_check(shard_copy, capsys):
    """The manifest's `side_files` edited into something other than a list of the directory's file names (a string, or
    a name out of the directory): it was taken for a split made before the list was kept, or the name dropped, and
    `verify` said every file matched without checking them. It names the record, with the fix; the same split run
    again lists them again where the record was no list."""
    ckpt, shards = shard_copy
    manifest = shards / "manifest.json"
    sound = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**sound, "side_files": "tokenizer.json"}, indent=1))
    assert ShardDirectory(shards).verify(checksums=False) == [
        f'{manifest} records "side_files": "tokenizer.json", which is not a list of file names (the split lists the '
        "files it wrote beside the units, which `verify` checks): run the same split again (`split_checkpoint` / "
        "`hf-layerstream split`, same source and options), which lists them again"
    ]
    assert main(["verify", "--quick", str(shards)]) == 1
    assert "fix manifest.json as its message says" in capsys.readouterr().err
    split_checkpoint(ckpt, shards, progress=False)
    assert json.loads(manifest.read_text())["side_files"] == sound["side_files"]
    assert ShardDirectory(shards).verify(checksums=False) == []
    manifest.write_text(json.dumps({**sound, "side_files": [*sound["side_files"], "../elsewhere.json"]}, indent=1))
    assert ShardDirectory(shards).verify(checksums=False) == [
        f"{manifest} lists the side files ['../elsewhere.json'], which are not files of the directory (a path out of "
        "it, or into another folder than additional_chat_templates/): the manifest was changed since the split; "
        'remove them from its "side_files"'
    ]


def test_verify_names_a_conversion_record_damaged(shard_copy, capsys):
    """The manifest's `conversion` record (transformers' release and its converters' digest at split time) edited into
    another form: it was taken for none, streaming skipped its check without a word, and `verify` passed. It names
    the record, with the fix; the model still streams."""
    ckpt, shards = shard_copy
    manifest = shards / "manifest.json"
    sound = json.loads(manifest.read_text())
    assert set(sound["conversion"]) == {"transformers", "converters"}
    for damaged in ("5.25.0", {**sound["conversion"], "converters": 5}, {"transformers": "5.25.0"}):
        manifest.write_text(json.dumps({**sound, "conversion": damaged}, indent=1))
        assert ShardDirectory(shards).verify(checksums=False) == [
            f'{manifest} records "conversion": {json.dumps(damaged)}, which is not the form the split writes (the '
            'transformers release and a digest of how it converted the checkpoint\'s tensors, {"transformers": ..., '
            '"converters": ...}): the manifest was changed since the split, and streaming skips the check that this '
            'release converts them as that one did. Remove "conversion" from the manifest to stream without the check '
            "(as a split made before it was recorded), or split again with `overwrite=True` (`--overwrite`) "
            "(`split_checkpoint` / `hf-layerstream split`, same source and options), which records it"
        ]
    assert main(["verify", "--quick", str(shards)]) == 1
    assert "fix manifest.json as its message says" in capsys.readouterr().err
    streamed_model(ckpt, shards)  # (loading keeps working)
    manifest.write_text(json.dumps({k: v for k, v in sound.items() if k != "conversion"}, indent=1))
    assert ShardDirectory(shards).verify(checksums=False) == []


def test_a_manifests_source_or_architectures_of_another_form_is_read_as_the_split_writes_them(shard_copy, capsys):
    """The manifest's `source` (what `inspect` shows) edited into another form than an object: the directory streamed
    and passed `verify`, but `hf-layerstream inspect` failed with a bare AttributeError (`'str' object has no attribute
    'get'`). It is read as no record, as a split made before one was kept. Its `architectures` (the class the shards
    were split for) edited into a string was read as its letters: a model of another class was told to be built as
    'L'. The manifest is named as malformed."""
    ckpt, shards = shard_copy
    manifest = shards / "manifest.json"
    sound = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**sound, "source": "meta-llama/Llama-3.2-1B"}, indent=1))
    assert main(["inspect", str(shards), "--device", "cpu"]) == 0
    assert "source           None" in capsys.readouterr().out
    streamed_model(ckpt, shards)
    manifest.write_text(json.dumps({**sound, "architectures": "LlamaForCausalLM"}, indent=1))
    with pytest.raises(ShardFileError, match=r"malformed \(TypeError: `architectures` \"LlamaForCausalLM\" is not a"):
        ShardDirectory(shards)


def test_verify_names_a_units_size_or_sample_digest_edited_in_the_manifest(shard_copy, capsys):
    """A unit's `size` or `sample_sha256` edited in the manifest: `verify` called the file damaged, the fix to delete
    it and split again. Where the file matches the manifest's SHA-256 in full (the file the split wrote), it names the
    manifest's edit, with the file's values to put back; `--quick` (no full digest) and a file that does not match it
    stay damaged files. The same split run again writes the manifest again."""
    ckpt, shards = shard_copy
    manifest = shards / "manifest.json"
    sound = json.loads(manifest.read_text())
    edited = json.loads(manifest.read_text())
    first, second = edited["units"][0], edited["units"][1]
    size, sample = first["size"], second["sample_sha256"]
    first["size"] += 1
    second["sample_sha256"] = "0" * 64
    manifest.write_text(json.dumps(edited, indent=1))
    directory = ShardDirectory(shards, check_files=False)
    fix = (
        "(changed since the split). Put back the file's value, or run the same split again (`split_checkpoint` / "
        "`hf-layerstream split`, same source and options), which writes that unit and the manifest again"
    )
    assert directory.verify() == [
        f"{manifest} records unit {first['name']!r} otherwise than its file {shards / first['file']}, which matches the "
        f"manifest's SHA-256 (the file the split wrote): size {size + 1} (the file: {size}) {fix}",
        f"{manifest} records unit {second['name']!r} otherwise than its file {shards / second['file']}, which matches "
        f"the manifest's SHA-256 (the file the split wrote): sample_sha256 {'0' * 64!r} (the file: {sample!r}) {fix}",
    ]
    assert main(["verify", str(shards)]) == 1
    assert "fix manifest.json as its message says" in capsys.readouterr().err
    # (without the full digest, or with it edited too: the file may be damaged, as before)
    quick = directory.verify(checksums=False)
    assert len(quick) == 2 and not any(p.startswith(str(manifest)) for p in quick)
    first["sha256"] = "0" * 64
    manifest.write_text(json.dumps(edited, indent=1))
    problems = ShardDirectory(shards, check_files=False).verify()
    assert problems[0].startswith(f"{shards / first['file']} ") and problems[1].startswith(str(manifest))
    split_checkpoint(ckpt, shards, progress=False)
    assert json.loads(manifest.read_text()) == sound
    assert ShardDirectory(shards, checksums=True).verify() == []


def test_verify_names_a_side_file_damaged_and_the_same_split_writes_it_back(
    shard_copy, tmp_path, capsys, caplog, monkeypatch
):
    """A JSON side file the manifest lists, cut short or corrupted: `verify` checked only that it was there, said
    every file matched (exit 0), and the tokenizer then failed to load with an error naming no file, and a re-run of
    the same split said there was nothing to do. It is a problem now, named with what reads it, and the same split
    writes it back from the source, as it writes back one missing."""
    import logging

    ckpt, shards = shard_copy
    names = ["generation_config.json", "tokenizer.json"]
    assert set(names) <= set(ShardDirectory(shards).manifest.side_files)
    before = {name: (shards / name).read_bytes() for name in names}
    for name in names:
        (shards / name).write_bytes(before[name][: len(before[name]) // 2])
    problems = ShardDirectory(shards).verify(checksums=False)
    again = "the split wrote it, and the manifest lists it): running the same split again writes it back"
    assert [p.split(" (", 1)[0] for p in problems] == [f"{shards / name} is not readable JSON" for name in names]
    assert all(p.endswith(again) for p in problems), problems
    assert "(a file of the tokenizer: `AutoTokenizer.from_pretrained` of the directory" in problems[1]
    assert main(["verify", "--quick", str(shards)]) == 1
    err = capsys.readouterr().err
    assert f"which writes {', '.join(names)} back (nothing to delete)" in err, err
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        split_checkpoint(ckpt, shards, progress=False)
    assert "generation_config.json (there, but not readable JSON)" in caplog.text
    assert {name: (shards / name).read_bytes() for name in names} == before
    assert ShardDirectory(shards).verify(checksums=False) == []
    # a hub cache download's blob cut short: downloaded again (a split refuses to write into the hub cache)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # (the default one: no --cache-dir)
    snapshot = _models.hub_snapshot(shards, tmp_path / "cache", repo="someorg--layers")
    blob = Path(os.path.realpath(snapshot / "tokenizer.json"))
    os.chmod(blob, 0o644)
    blob.write_bytes(before["tokenizer.json"][:10])
    [problem] = ShardDirectory(snapshot).verify(checksums=False)
    assert problem.startswith(f"{snapshot / 'tokenizer.json'} is not readable JSON"), problem
    assert problem.endswith(
        "this download of the hub repo holds it damaged: download it again "
        "(`hf download someorg/layers --force-download`)"
    ), problem


@pytest.mark.parametrize("content", [b"[]", b"3", b'"text"'])
def test_a_json_side_file_that_is_not_an_object_is_named_as_damaged(shard_copy, capsys, caplog, content):
    """A generation_config.json (or tokenizer_config.json) that is readable JSON but not an object: `verify` passed it
    (exit 0), and enabling streaming warned only "('list' object is not a mapping)", the model generating with its
    config's settings, not the checkpoint's. It is damage, named as a torn one is (with what reads it and the fix),
    enabling streaming says what is wrong and the fix, and the same split writes it back."""
    import logging

    ckpt, shards = shard_copy
    before = {name: (shards / name).read_bytes() for name in ("generation_config.json", "tokenizer_config.json")}
    for name in before:
        (shards / name).write_bytes(content)
    problems = ShardDirectory(shards).verify(checksums=False)
    assert [p.split(" (", 1)[0] for p in problems] == [f"{shards / n} is not a JSON object" for n in sorted(before)]
    assert all(p.endswith("running the same split again writes it back") for p in problems), problems
    assert main(["verify", "--quick", str(shards)]) == 1
    capsys.readouterr()
    # (`generate` of the CLI failed with transformers' AttributeError: "'list' object has no attribute 'get'")
    assert main(["generate", str(shards), "hello", "--max-new-tokens", "1", "--device", "cpu"]) == 2
    assert f"{shards / 'tokenizer_config.json'} is not a JSON object" in capsys.readouterr().err
    (shards / "tokenizer_config.json").write_bytes(before["tokenizer_config.json"])
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        model = streamed_model(ckpt, shards, **STREAM_ALL)
    disable_layer_streaming(model)
    assert f"{shards / 'generation_config.json'} could not be read: it is not a JSON object" in caplog.text
    assert "Running the same split again writes it back" in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        split_checkpoint(ckpt, shards, progress=False)
    assert "generation_config.json (there, but not a JSON object)" in caplog.text, caplog.text
    assert {name: (shards / name).read_bytes() for name in before} == before
    assert ShardDirectory(shards).verify(checksums=False) == []


def test_a_json_side_file_with_a_byte_order_mark_is_named_as_damaged(shard_copy, capsys):
    """A JSON side file saved with a byte-order mark (an editor's UTF-8 with BOM) passed `verify` (exit 0: the check
    read it from bytes, which JSON takes with a BOM, and UTF-16 too), and transformers, which reads it as UTF-8 text,
    refused it (`AutoTokenizer`: "Unexpected UTF-8 BOM", naming no file; `GenerationConfig`: "not a valid JSON
    file"). `verify` names it as the reader does; the same split writes it back."""
    ckpt, shards = shard_copy
    names = ("generation_config.json", "tokenizer_config.json")
    before = {name: (shards / name).read_bytes() for name in names}
    for name in names:
        (shards / name).write_bytes(b"\xef\xbb\xbf" + before[name])
    problems = ShardDirectory(shards).verify(checksums=False)
    assert [p.split(" (", 1)[0] for p in problems] == [f"{shards / n} is not readable JSON" for n in names]
    assert all("Unexpected UTF-8 BOM" in p for p in problems), problems
    assert main(["verify", "--quick", str(shards)]) == 1
    capsys.readouterr()
    split_checkpoint(ckpt, shards, progress=False)
    assert {name: (shards / name).read_bytes() for name in names} == before
    assert ShardDirectory(shards).verify(checksums=False) == []


def test_a_folder_at_a_side_files_path_is_named(shard_copy, tmp_path, capsys):
    """A folder where the split wrote a side file the manifest lists (the tokenizer's `tokenizer.json`): `verify`
    passed it as there (exit 0), and `generate` said the directory held no tokenizer that loads for another cause
    ("You need to have sentencepiece or tiktoken installed ..."). `verify` names it, with what reads it and the fix,
    and so does `generate`; moved away, the same split writes the file back."""
    ckpt, shards = shard_copy
    before = (shards / "tokenizer.json").read_bytes()
    (shards / "tokenizer.json").unlink()
    (shards / "tokenizer.json").mkdir()
    named = f"{shards / 'tokenizer.json'} is not a file (move what is there away) (a file of the tokenizer: "
    [problem] = ShardDirectory(shards).verify(checksums=False)
    assert problem.startswith(named) and problem.endswith("running the same split again writes it back"), problem
    assert main(["verify", "--quick", str(shards)]) == 1
    capsys.readouterr()
    assert main(["generate", str(shards), "hello", "--max-new-tokens", "1", "--device", "cpu"]) == 2
    assert named in capsys.readouterr().err
    shutil.move(shards / "tokenizer.json", tmp_path / "moved")
    split_checkpoint(ckpt, shards, progress=False)
    assert (shards / "tokenizer.json").read_bytes() == before
    assert ShardDirectory(shards).verify(checksums=False) == []


@pytest.mark.parametrize(
    "damage", ["torn", "not_an_object", "another_model", "unknown_dtype", "integer_dtype", "byte_order_mark"]
)
def test_a_damaged_config_json_is_named_and_written_again_by_the_same_split(shard_copy, capsys, damage):
    """Only a missing `config.json` was caught: a torn one (or another model's) passed `ShardDirectory`, `verify` and
    `hf-layerstream verify` (exit 0), a re-run of the split found nothing to do, and the model could not be built.
    It must be a JSON object of the manifest's model_type; the same split writes it again. So must its `dtype` name a
    floating-point dtype: "foo" or "int8" passed `verify` (exit 0: building the model failed, "not damage found"), and
    `hf-layerstream generate` died with torch's traceback ("module 'torch' has no attribute 'foo'") or said the model
    "cannot be instantiated under `dtype=torch.int8`", naming no file. One with a byte-order mark (an editor's UTF-8
    with BOM) passed all three too (the check read it from bytes, which JSON takes with a BOM), and transformers, which
    reads it as UTF-8 text, refused it: "It looks like the config file ... is not a valid JSON file"."""

    ckpt, shards = shard_copy
    config = shards / "config.json"
    before = config.read_bytes()
    damaged = {
        "torn": before[: len(before) // 2],
        "not_an_object": b"[]",
        "another_model": before.replace(b'"model_type": "llama"', b'"model_type": "gpt2"'),
        "unknown_dtype": before.replace(b'"dtype": "float32"', b'"dtype": "foo"'),
        "integer_dtype": before.replace(b'"dtype": "float32"', b'"torch_dtype": "int8"'),
        "byte_order_mark": b"\xef\xbb\xbf" + before,
    }[damage]
    assert damaged != before
    config.write_bytes(damaged)
    message = {
        "torn": "is not readable JSON",
        "not_an_object": "is not a JSON object",
        "another_model": "has model_type 'gpt2'",
        "unknown_dtype": 'records "dtype": "foo", which is no floating-point dtype',
        "integer_dtype": 'records "torch_dtype": "int8", which is no floating-point dtype',
        "byte_order_mark": r"is not readable JSON \(Unexpected UTF-8 BOM",
    }[damage]
    with pytest.raises(ShardDirError, match=rf"config\.json {message}.* Run the same split again"):
        ShardDirectory(shards)
    problems = ShardDirectory(shards, check_files=False).verify(checksums=False)
    assert len(problems) == 1 and re.search(rf"config\.json {message}", problems[0]), problems
    assert main(["verify", "--quick", str(shards)]) == 1
    capsys.readouterr()
    split_checkpoint(ckpt, shards, progress=False)
    assert config.read_bytes() == before and ShardDirectory(shards, checksums=True).verify() == []


def test_a_manifests_model_type_edited_is_named_as_the_manifests_edit(shard_copy):
    """The manifest's `model_type` edited ("mistral"), config.json as the split wrote it: the error blamed config.json
    ("config.json has model_type 'llama', not 'mistral' as the manifest records"), the file the split wrote. Where
    config.json is the split's (its digest is the one the manifest records), the manifest is named, with the value to
    put back; the same split run again writes the manifest again."""
    ckpt, shards = shard_copy
    manifest_path = shards / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "model_type": "mistral"}))
    named = f'{manifest_path} records "model_type": "mistral", but config.json, as the split wrote it'
    with pytest.raises(ShardFileError, match=re.escape(named)) as info:
        ShardDirectory(shards)
    assert 'Set "model_type" back to "llama"' in str(info.value)
    [problem] = ShardDirectory(shards, check_files=False).verify(checksums=False)
    assert problem.startswith(named), problem
    split_checkpoint(ckpt, shards, progress=False)
    assert ShardDirectory(shards, checksums=True).verify() == []


def test_a_config_json_edited_keeping_every_shape_is_warned_about_not_refused(shard_copy, caplog, capsys, monkeypatch):
    """An edit of config.json that keeps every tensor shape (`rms_norm_eps`, rope parameters, `hidden_act`) went unseen:
    a model built from it computed otherwise than the split's source, `verify` clean. The manifest records a digest of
    the config the split wrote (`config_sha256`): opening the directory and `verify` warn, once per process and edit
    (`hf-layerstream generate`, which opens it twice, said it twice), naming the file, how to put the split's back and
    how to keep the edit without the warning; they do not refuse it (the user's to edit). Its form (indentation, key
    order), the kernel choices (`attn_implementation`) and `transformers_version` do not count; a directory split
    before the digest was recorded has nothing to compare with."""
    import logging

    from hf_layerstream import shard_dir as shard_dir_mod

    ckpt, shards = shard_copy
    config, manifest_path = shards / "config.json", shards / "manifest.json"
    before = config.read_bytes()
    manifest = json.loads(manifest_path.read_text())
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["config_sha256"])

    def warnings(open_it, *, fresh: bool = True) -> list[str]:
        """The warnings of an edit `open_it()` logs (`fresh`: as a process that has said none yet)."""
        if fresh:
            monkeypatch.setattr(shard_dir_mod, "_CONFIG_EDITS_WARNED", set())
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
            assert open_it() is not False
        return [r.getMessage() for r in caplog.records if "config.json was edited since the split" in r.getMessage()]

    values = json.loads(before)
    values |= {"attn_implementation": "eager", "transformers_version": "4.0.0"}
    config.write_text(json.dumps(values, indent=4, sort_keys=False))
    assert warnings(lambda: ShardDirectory(shards).verify(checksums=False)) == []
    values["rms_norm_eps"] = 0.5
    config.write_text(json.dumps(values))
    said = warnings(lambda: ShardDirectory(shards).verify(checksums=False))  # (open and `verify`: said once)
    assert len(said) == 1 and str(config) in said[0]
    assert "delete config.json and run the same split again" in said[0]
    assert warnings(lambda: ShardDirectory(shards), fresh=False) == []  # (said in this process already)
    assert len(warnings(lambda: ShardDirectory(shards, check_files=False).verify(checksums=False))) == 1
    assert ShardDirectory(shards, check_files=False).verify(checksums=False) == []  # (not a problem: not refused)
    assert len(warnings(lambda: main(["verify", "--quick", str(shards)]) == 0)) == 1
    generate = ["generate", str(shards), "hello", "--max-new-tokens", "1", "--device", "cpu"]
    assert len(warnings(lambda: main(generate) == 0)) == 1
    capsys.readouterr()
    values["rms_norm_eps"] = 0.25  # (another edit: said again)
    config.write_text(json.dumps(values))
    said = warnings(lambda: ShardDirectory(shards), fresh=False)
    assert len(said) == 1
    digest = re.search(r'set "config_sha256" in manifest\.json to "([0-9a-f]{64})"', said[0]).group(1)
    assert len(warnings(lambda: split_checkpoint(ckpt, shards, progress=False))) == 1  # (a re-run keeps the edit)
    assert json.loads(config.read_text())["rms_norm_eps"] == 0.25
    # the edit kept, as the warning says: silent from then on
    manifest_path.write_text(json.dumps(manifest | {"config_sha256": digest}, indent=1))
    assert warnings(lambda: ShardDirectory(shards).verify(checksums=False)) == []
    # a directory split before the digest was recorded: nothing to compare with, nothing said
    manifest_path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "config_sha256"}, indent=1))
    assert warnings(lambda: ShardDirectory(shards).verify(checksums=False)) == []
    # the split's put back as the warning says: config.json deleted, the same split run again
    manifest_path.write_text(json.dumps(manifest, indent=1))
    config.unlink()
    split_checkpoint(ckpt, shards, progress=False)
    assert config.read_bytes() == before
    assert warnings(lambda: ShardDirectory(shards).verify(checksums=False)) == []


def test_the_same_split_repairing_a_unit_keeps_an_edited_config_json(shard_copy, caplog, monkeypatch):
    """A re-run of the same split keeps an edited config.json (README: the user's to edit, rope scaling for longer
    contexts), but one that repaired a damaged unit wrote the split's over it, silently. It is kept there too, where it
    is sound and builds the split's model (a damaged one, or one of another model, is written again: the tests
    above), and still warned about as edited."""
    import logging

    from hf_layerstream import shard_dir as shard_dir_mod

    ckpt, shards = shard_copy
    config, layer = shards / "config.json", shards / "layers" / "00001.safetensors"
    values = json.loads(config.read_text())
    values["rms_norm_eps"] = 0.5
    config.write_text(json.dumps(values, indent=2))
    edited, before = config.read_bytes(), layer.read_bytes()
    layer.write_bytes(before[:-10])
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        split_checkpoint(ckpt, shards, progress=False)
    assert "is damaged" in caplog.text and "repairing it" in caplog.text
    assert layer.read_bytes() == before and config.read_bytes() == edited
    caplog.clear()
    monkeypatch.setattr(shard_dir_mod, "_CONFIG_EDITS_WARNED", set())  # (as a process that said nothing yet)
    with caplog.at_level(logging.WARNING, logger="hf_layerstream"):
        assert ShardDirectory(shards, checksums=True).verify() == []
    assert "config.json was edited since the split" in caplog.text


@pytest.mark.parametrize("edit", ["num_hidden_layers", "more layers", "intermediate_size"])
def test_a_config_json_describing_another_model_is_named_and_written_again_by_the_same_split(shard_copy, capsys, edit):
    """A `config.json` edited since the split to another number of layers or other sizes, with the same model_type:
    `verify` said every file matched (exit 0), a re-run of the split found nothing to do, and the model built from it
    failed at enable. `verify` names it now (exit 1), and the same split writes it again. (`inspect` of one with more
    layers than the shards failed with a KeyError for the first layer they lack.)"""

    ckpt, shards = shard_copy
    config = shards / "config.json"
    before = config.read_bytes()
    edited = json.loads(before)
    more = edit == "more layers"
    edit = "num_hidden_layers" if more else edit
    edited[edit] = edited[edit] + (1 if more else -1) if edit == "num_hidden_layers" else edited[edit] * 2
    config.write_text(json.dumps(edited))
    ShardDirectory(shards)  # (opening it does not build the model: enable compares the model given with the manifest)
    problems = ShardDirectory(shards, check_files=False).verify(checksums=False)
    message = "decoder layers, where the shards hold" if edit == "num_hidden_layers" else "other tensor names or shapes"
    assert len(problems) == 1 and "config.json describes another model than the split's" in problems[0]
    assert message in problems[0]
    assert main(["verify", "--quick", str(shards)]) == 1
    assert message in capsys.readouterr().out
    # `inspect` says so too, and the model built from it is refused saying so: it said the shards were made from a
    # different model, and to split into a new directory (the re-run below is the fix)
    assert main(["inspect", str(shards), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "warning          config.json describes another model than the split's" in out and message in out
    assert main(["inspect", str(shards), "--device", "cpu", "--json"]) == 0
    assert message in json.loads(capsys.readouterr().out)["config_problem"]
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shards))
    with pytest.raises(ShardDirError) as info:
        enable_layer_streaming(model, shards)
    assert "Note: its own config.json describes another model than the split's" in str(info.value)
    assert "run the same split again" in str(info.value)
    split_checkpoint(ckpt, shards, progress=False)
    assert config.read_bytes() == before and ShardDirectory(shards, checksums=True).verify() == []
    assert main(["inspect", str(shards), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config_problem"] is None
    # a model of another shape, given a sound directory: no note (the directory's config builds its shards)
    other = AutoConfig.from_pretrained(shards)
    setattr(other, edit, edited[edit])
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(other)
    with pytest.raises(ShardDirError) as info:
        enable_layer_streaming(model, shards)
    assert "Note:" not in str(info.value)


def _unit_json(manifest: dict, unit: str) -> dict:
    return next(u for u in manifest["units"] if u["name"] == unit)


@pytest.mark.parametrize(
    "edit, problem",
    [
        (
            lambda m: _unit_json(m, "layers.1")["tensors"]["model.layers.1.mlp.down_proj.weight"]["quant"].update(
                quant_type="fp4"
            ),
            "records tensor 'model.layers.1.mlp.down_proj.weight' of unit 'layers.1' otherwise than the file "
            "{shards}/layers/00001.safetensors, written with it, does: quant.quant_type 'fp4' (the file: 'nf4')",
        ),
        (
            lambda m: m.update(compression=None),
            'records "compression": null, but 21 of its tensors are stored quantized',
        ),
        (
            lambda m: m["compression"].update(blocksize=128),
            'records "compression" with "blocksize": 128, but its 21 quantized tensors are stored with 64',
        ),
        (
            lambda m: m["compression"].pop("blocksize"),
            'records "compression" without "blocksize", but its 21 quantized tensors are stored with 64',
        ),
        (
            lambda m: m["compression"].update(quantize_embeddings=True),
            'records "compression" with "quantize_embeddings": true, but none of its resident unit (the embeddings and '
            "head) is stored quantized, where a split with it stores 'lm_head.weight' ([128, 64] float32) quantized",
        ),
        (
            lambda m: m.update(dtype="bfloat16"),
            'records "dtype": "bfloat16", but its floating-point tensors are mostly float32',
        ),
        (
            lambda m: m.update(load_dtype="bfloat16"),
            'records "load_dtype": "bfloat16" (the dtype streaming computes in by default), but its unit files, '
            'written with it, record "float32"',
        ),
    ],
    ids=["a tensor's code", "compression", "block size", "no block size", "embeddings", "dtype", "load_dtype"],
)
def test_a_manifest_changed_since_the_split_is_named_by_what_its_files_record(
    checkpoints, tmp_path, capsys, edit, problem
):
    """The manifest's record of a quantized tensor's code, or its `compression` or `dtype`, edited by hand or by a
    tool: every check passed (the manifest has no digest of its own), and streaming decoded the layer by the edited
    code. Each tensor's record is checked against the one its file carries (the split writes both), and the manifest's
    `compression` and `dtype` against the tensors' records, at load and by `verify`; the same split run again writes
    the manifest back where it takes the directory for its own."""
    ckpt, made = checkpoints("llama", compression="4bit")
    shards = shutil.copytree(made, tmp_path / "shards")
    manifest = shards / "manifest.json"
    sound = json.loads(manifest.read_text())
    edited = json.loads(manifest.read_text())
    edit(edited)
    manifest.write_text(json.dumps(edited, indent=1))
    problem = problem.format(shards=shards)
    with pytest.raises(ShardFileError, match="^" + re.escape(f"{manifest} {problem}")):
        ShardDirectory(shards)
    [found] = ShardDirectory(shards, check_files=False).verify(checksums=False)
    assert found.startswith(f"{manifest} {problem}"), found
    assert main(["verify", str(shards)]) == 1
    captured = capsys.readouterr()
    assert problem in captured.out and "fix manifest.json as its message says" in captured.err
    if edited["compression"] == sound["compression"]:  # (taken for its own split: repaired)
        split_checkpoint(ckpt, shards, compression="4bit", progress=False)
        assert json.loads(manifest.read_text()) == sound and ShardDirectory(shards, checksums=True).verify() == []


@pytest.mark.parametrize(
    "compression, problem",
    [
        (
            {"bits": 4, "quant_type": "nf4", "blocksize": 64, "quantize_embeddings": False},
            'records "compression": {"bits": 4, "quant_type": "nf4", "blocksize": 64, "quantize_embeddings": false}, '
            "but none of its tensors is stored quantized, where a split with it stores "
            "'model.layers.0.mlp.down_proj.weight' ([64, 128] float32) quantized: the split was made without "
            "compression",
        ),
        (
            "8bit",
            'records "compression": "8bit", but none of its tensors is stored quantized, and it is no compression '
            "scheme a split writes: the split was made without compression",
        ),
        (
            # (a field of the wrong type: `QuantScheme` raises TypeError for it, `from_dict` a ValueError, the record's)
            {"bits": "4", "quant_type": "nf4", "blocksize": 64, "quantize_embeddings": False},
            'records "compression": {"bits": "4", "quant_type": "nf4", "blocksize": 64, "quantize_embeddings": '
            "false}, but none of its tensors is stored quantized, and it is no compression scheme a split writes: the "
            "split was made without compression",
        ),
    ],
    ids=["4bit", "not a scheme", "bits a string"],
)
def test_a_manifest_claiming_compression_of_a_full_precision_split_is_named(
    checkpoints, tmp_path, capsys, caplog, compression, problem
):
    """A full-precision split whose manifest was edited to record a compression passed every check: the tensors'
    records are the files' own, and the summary was checked against quantized tensors only. Streaming then required
    bitsandbytes and planned its read-ahead as for quantized layers. It is named at load and by `verify`, with the
    value to put back; a split with a compression that quantizes none of the weights (a block size too large for the
    model, which the split warns of) is sound."""
    ckpt, made = checkpoints("llama")
    shards = shutil.copytree(made, tmp_path / "shards")
    manifest = shards / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "compression": compression}, indent=1))
    fix = 'The manifest was changed since the split: set "compression" back to null.'
    with pytest.raises(ShardFileError, match="^" + re.escape(f"{manifest} {problem}. {fix}")):
        ShardDirectory(shards)
    [found] = ShardDirectory(shards, check_files=False).verify(checksums=False)
    assert found == f"{manifest} {problem}. {fix}", found
    assert main(["verify", str(shards)]) == 1
    captured = capsys.readouterr()
    assert problem in captured.out and "fix manifest.json as its message says" in captured.err
    with caplog.at_level("WARNING"):
        nothing = split_checkpoint(ckpt, tmp_path / "nothing", compression="4bit", blocksize=4096, progress=False)
    assert "quantizes none of this model's weights" in caplog.text
    assert ShardDirectory(nothing).verify(checksums=False) == []


def test_a_manifest_saying_its_embeddings_are_not_quantized_where_they_are_is_named(checkpoints, tmp_path):
    """A split with `quantize_embeddings=True` is sound; its manifest edited to say false (its embeddings and head,
    which the split quantizes only with it true, stored quantized) is named at load and by `verify`."""
    from hf_layerstream.quant import QuantScheme

    ckpt, _ = checkpoints("llama")
    scheme = QuantScheme(4, quantize_embeddings=True)
    shards = split_checkpoint(ckpt, tmp_path / "shards", compression=scheme, progress=False)
    assert ShardDirectory(shards).verify(checksums=False) == []
    manifest = shards / "manifest.json"
    edited = json.loads(manifest.read_text())
    edited["compression"]["quantize_embeddings"] = False
    manifest.write_text(json.dumps(edited, indent=1))
    problem = (
        f'{manifest} records "compression" with "quantize_embeddings": false, but \'lm_head.weight\' of its resident '
        "unit (the embeddings and head) is stored quantized. The manifest was changed since the split: set its "
        '"quantize_embeddings" back to true.'
    )
    with pytest.raises(ShardFileError, match="^" + re.escape(problem) + "$"):
        ShardDirectory(shards)
    assert ShardDirectory(shards, check_files=False).verify(checksums=False) == [problem]


def test_load_dtype_is_checked_without_refusing_a_split_as_made(tmp_path):
    """The manifest's `load_dtype` (the dtype streaming computes in by default) is checked against config.json's
    `dtype` and the tensors' records: a split made with and without `dtype`, with and without compression, of a model
    that keeps weights in float32 at float16 (gpt-oss's norms), of a config naming no dtype, and one made with `dtype`
    by an earlier hf_layerstream (config.json left at the checkpoint's dtype) are sound; `load_dtype` edited to a
    dtype neither config.json nor any tensor has is named (it was not: streaming computed in it)."""
    from test_architectures import _config

    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "llama")
    plain = _models.save_tiny_checkpoint("llama", tmp_path / "plain")
    config = json.loads((plain / "config.json").read_text())
    del config["dtype"]  # (the split takes the first tensor's: nothing to check against)
    (plain / "config.json").write_text(json.dumps(config))
    gpt_oss = _models.save_tiny_checkpoint(_config("gpt_oss"), tmp_path / "gpt_oss")
    splits = {
        (source.name, dtype, compression): split_checkpoint(
            source,
            tmp_path / f"{source.name}-{dtype}-{compression}",
            dtype=dtype,
            compression=compression,
            progress=False,
        )
        for source in (ckpt, gpt_oss)
        for dtype in (None, "float16")
        for compression in (None, "4bit")
    }
    splits["plain", None, None] = split_checkpoint(plain, tmp_path / "plain-shards", progress=False)
    earlier = splits["gpt_oss", "float16", None]
    config = json.loads((earlier / "config.json").read_text())
    assert (
        config["dtype"] == "float16" and json.loads((earlier / "manifest.json").read_text())["load_dtype"] == "float16"
    )
    (earlier / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))  # (as split before it was set)
    for key, shards in splits.items():
        assert ShardDirectory(shards).verify(checksums=False) == [], key
    kept = ShardDirectory(earlier).manifest.units["layers.0"].tensors["model.layers.0.input_layernorm.weight"]
    assert kept.dtype == torch.float32
    # edited: to a dtype nothing is stored in, named, whichever of the two the other was; to float32 where only the
    # tensors the split keeps in float32 are (gpt-oss's norms at float16), named too
    for key, edit in [
        (("llama", None, "4bit"), "float16"),
        (("gpt_oss", None, None), "bfloat16"),
        (("gpt_oss", "float16", "4bit"), "float32"),
        (("plain", None, None), "bfloat16"),
    ]:
        manifest = splits[key] / "manifest.json"
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "load_dtype": edit}))
        problems = ShardDirectory(splits[key], check_files=False).verify(checksums=False)
        assert f'records "load_dtype": "{edit}"' in "".join(problems), (key, problems)


def test_an_edited_load_dtype_is_named_where_config_json_names_no_dtype(tmp_path, capsys):
    """A checkpoint whose config names no dtype: the split records as `load_dtype` the one `from_pretrained` loads it
    at (the index's, or the first weight's), and config.json names none. An edit of `load_dtype` had nothing to be
    checked against: opening and `verify` passed it (exit 0), and the model streamed at the dtype edited in (bfloat16
    logits for a float32 checkpoint). Each unit file records it too: the edit is named with the value to put back,
    removing it too (streamed as stored), and the same split writes the manifest again."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    del config["dtype"]
    (ckpt / "config.json").write_text(json.dumps(config))
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert "dtype" not in json.loads((shards / "config.json").read_text()) and manifest["load_dtype"] == "float32"
    want = streamed_model(ckpt, shards, **STREAM_ALL)(torch.tensor([[1, 5, 7]])).logits
    for edit in ("bfloat16", None):
        edited = {**manifest, "load_dtype": edit} if edit else {k: v for k, v in manifest.items() if k != "load_dtype"}
        (shards / "manifest.json").write_text(json.dumps(edited, indent=1))
        said = f'"{edit}"' if edit else "none"
        named = f'manifest.json records "load_dtype": {said} (the dtype streaming computes in by default), but its'
        with pytest.raises(ShardFileError, match=re.escape(named)) as info:
            ShardDirectory(shards)
        assert str(info.value).endswith('Set "load_dtype" back to "float32".'), str(info.value)
        with pytest.raises(ShardFileError, match=re.escape(named)):
            streamed_model(ckpt, shards, **STREAM_ALL)
        [problem] = ShardDirectory(shards, check_files=False).verify(checksums=False)
        assert named in problem, problem
        assert main(["verify", "--quick", str(shards)]) == 1
        capsys.readouterr()
    split_checkpoint(ckpt, shards, progress=False)
    assert json.loads((shards / "manifest.json").read_text()) == manifest
    got = streamed_model(ckpt, shards, **STREAM_ALL)(torch.tensor([[1, 5, 7]])).logits
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_an_edited_fingerprint_is_named_as_the_manifests_not_config_jsons(shard_copy, capsys):
    """The manifest's `fingerprint` changed since the split: `verify` and `inspect` said config.json "describes another
    model than the split's" (it builds the very model the shards hold), and the same split refused the directory as
    another model's ("the model's architecture"). They name the manifest's fingerprint now, and the value that, put
    back, makes the directory sound again."""
    from hf_layerstream.errors import ShardDirOccupiedError

    ckpt, shards = shard_copy
    manifest = shards / "manifest.json"
    sound = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**sound, "fingerprint": "0" * 64}, indent=1))
    [problem] = ShardDirectory(shards).verify(checksums=False)
    assert problem.startswith(f"{manifest} records the architecture fingerprint '{'0' * 64}'"), problem
    assert f"has {sound['fingerprint']!r}: the manifest's `fingerprint` was changed since the split" in problem
    assert "describes another model" not in problem
    assert main(["verify", "--quick", str(shards)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{manifest} records") and "fix manifest.json as its message says" in captured.err
    assert main(["inspect", str(shards), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "warning          manifest.json records the architecture fingerprint" in out
    assert "config.json describes" not in out
    with pytest.raises(ShardDirOccupiedError, match=r"`fingerprint` was changed since the split: set it back") as info:
        split_checkpoint(ckpt, shards, progress=False)
    assert sound["fingerprint"] in str(info.value) and "the model's architecture" not in str(info.value)
    manifest.write_text(json.dumps(sound, indent=1))  # (put back, as said)
    assert ShardDirectory(shards, checksums=True).verify() == []
    split_checkpoint(ckpt, shards, progress=False)


def test_a_manifest_with_its_last_layer_taken_out_is_named_and_written_again_by_the_same_split(shard_copy, capsys):
    """The manifest's `num_layers` lowered and its last layer's unit taken out: the directory opened, `verify` said
    every file matched (config.json builds the model whose fingerprint the manifest records, which was taken for
    sound), the same split said there was nothing to do, and streaming refused the model built from config.json as
    another model's. `verify`, `inspect` and that refusal name the manifest's edit, and the same split writes the
    manifest again."""
    from conftest import build_meta_model
    from transformers import AutoConfig

    ckpt, shards = shard_copy
    manifest = shards / "manifest.json"
    sound = json.loads(manifest.read_text())
    n = sound["num_layers"]
    units = [u for u in sound["units"] if u["name"] != f"layers.{n - 1}"]
    manifest.write_text(json.dumps({**sound, "num_layers": n - 1, "units": units}, indent=1))
    problem = (
        f"records `num_layers` {n - 1} (the model: {n}), where the model config.json builds has the architecture "
        "fingerprint it records (which hashes its decoder layers' number and names): the manifest was changed since "
        "the split"
    )
    [found] = ShardDirectory(shards).verify(checksums=False)
    assert found.startswith(f"{manifest} {problem}; run the same split again"), found
    assert main(["verify", "--quick", str(shards)]) == 1
    assert "fix manifest.json as its message says" in capsys.readouterr().err
    assert main(["inspect", str(shards), "--device", "cpu"]) == 0
    assert f"warning          manifest.json {problem}" in capsys.readouterr().out
    model = build_meta_model(AutoConfig.from_pretrained(shards))
    with pytest.raises(ShardDirError, match=re.escape(f"Note: its own manifest.json {problem}")):
        enable_layer_streaming(model, shards, device="cpu")
    split_checkpoint(ckpt, shards, progress=False)
    assert json.loads(manifest.read_text()) == sound
    assert ShardDirectory(shards, checksums=True).verify() == []


def test_a_config_json_this_machine_cannot_build_is_not_called_damaged(shard_copy, monkeypatch, caplog):
    """Building the model to compare it with the shards can fail for reasons of this machine (memory) or this
    transformers (a model type it lacks): `verify` said the file was damaged and to split again. It warns that it
    could not check instead. (The model is built on meta: nothing is allocated for a large one.)"""
    import logging

    import hf_layerstream.modeling as modeling

    _, shards = shard_copy
    built = []
    real = modeling.build_skeleton

    def build(*args, **kwargs):
        built.append(kwargs.get("meta"))
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling, "build_skeleton", build)
    assert ShardDirectory(shards, check_files=False).verify(checksums=False) == [] and built == [True]

    def fails(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(modeling, "build_skeleton", fails)
    with caplog.at_level(logging.WARNING, logger="hf_layerstream.shard_dir"):
        assert ShardDirectory(shards, check_files=False).verify(checksums=False) == []
    assert "Could not check" in caplog.text and "can't allocate memory" in caplog.text


def test_a_damaged_manifest_fails_verify_and_split_says_what_to_do(shard_copy, capsys):
    """A torn `manifest.json`: `hf-layerstream verify` exited 2 (an option refused) advising to run verify, and the
    same split said the directory held a split of another model. Now verify exits 1 naming the manifest, and the split
    says the manifest is damaged; `overwrite=True` splits again there."""
    from hf_layerstream.errors import ShardDirOccupiedError

    ckpt, shards = shard_copy
    manifest = shards / "manifest.json"
    manifest.write_bytes(manifest.read_bytes() + b"}")
    assert main(["verify", str(shards)]) == 1
    err = capsys.readouterr().err
    assert "manifest.json is not readable JSON" in err and "--overwrite" in err
    with pytest.raises(ShardDirOccupiedError, match=r"manifest\.json is damaged"):
        split_checkpoint(ckpt, shards, progress=False)
    split_checkpoint(ckpt, shards, progress=False, overwrite=True)
    assert ShardDirectory(shards, checksums=True).verify() == []


@pytest.mark.parametrize(
    "quant",
    ["nf4", {"parts": ["absmax", "codes"]}, {"parts": {"codes": {"shape": 64, "dtype": "uint8"}}}],
    ids=["a string", "parts a list", "a part's shape a number"],
)
def test_a_tensors_quant_record_of_another_form_is_named_as_a_damaged_manifest(shard_copy, capsys, quant):
    """A tensor's `quant` record in the manifest edited to another form than an object of parts: opening the directory
    and `verify` failed with a bare AttributeError or TypeError (`'str' object has no attribute 'get'`), naming no
    file. The manifest is named as malformed, with the tensor, and `verify` says it is damaged (exit 1)."""
    _, shards = shard_copy
    manifest = shards / "manifest.json"
    edited = json.loads(manifest.read_text())
    name = "model.layers.1.mlp.down_proj.weight"
    _unit_json(edited, "layers.1")["tensors"][name]["quant"] = quant
    manifest.write_text(json.dumps(edited, indent=1))
    problem = f"{manifest} is malformed (TypeError: tensor {name!r} has a `quant` record {json.dumps(quant)}"
    with pytest.raises(ShardFileError, match="^" + re.escape(problem)):
        ShardDirectory(shards)
    assert main(["verify", str(shards)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(problem) and f"The manifest of {shards} is damaged" in err, err


@pytest.mark.parametrize(
    "record",
    [5, "float32", {"shape": "64", "dtype": "float32"}, {"shape": [64.5], "dtype": "float32"}],
    ids=["a number", "a string", "shape a string", "a fractional dimension"],
)
def test_a_tensors_record_of_another_form_is_named_as_a_damaged_manifest(shard_copy, capsys, record):
    """A tensor's record in the manifest edited to another form than an object of its shape and dtype: a number failed
    opening the directory, `verify` and `inspect` with a bare AttributeError (`'int' object has no attribute 'get'`),
    naming no file, and so did the same split run again to repair it; a shape `"64"` was read as [6, 4] (named as the
    manifest recording shape [6, 4]) and `[64.5]` as [64] (passed). The manifest is named as malformed, with the
    tensor, `verify` says it is damaged (exit 1), and the same split run again writes it again."""
    ckpt, shards = shard_copy
    manifest = shards / "manifest.json"
    edited = json.loads(manifest.read_text())
    name = "model.layers.1.input_layernorm.weight"
    _unit_json(edited, "layers.1")["tensors"][name] = record
    manifest.write_text(json.dumps(edited, indent=1))
    problem = f"{manifest} is malformed (TypeError: tensor {name!r} has a record {json.dumps(record)}"
    with pytest.raises(ShardFileError, match="^" + re.escape(problem)):
        ShardDirectory(shards)
    assert main(["verify", str(shards)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(problem) and f"The manifest of {shards} is damaged" in err, err
    split_checkpoint(ckpt, shards, progress=False)
    assert ShardDirectory(shards, checksums=True).verify() == []


def test_a_manifest_whose_layer_count_does_not_fit_its_units_says_how_many_it_needs(shard_copy):
    """A manifest of 3 layers with a layer's unit deleted said "`num_layers` 3 does not fit the 3 units listed", which
    reads as if they fit: the resident unit is one of them. It now says how many units the count needs."""
    _, shards = shard_copy
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["num_layers"] == 3 and len(manifest["units"]) == 4
    manifest["units"] = [u for u in manifest["units"] if u["name"] != "layers.1"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardFileError, match="malformed") as info:
        ShardDirectory(shards, check_files=False)
    assert "`num_layers` 3 needs 4 units (the resident one and one per layer), and 3 are listed" in str(info.value)


def test_verify_fails_a_manifest_whose_layers_prefix_the_model_does_not_have(shard_copy, capsys):
    """A manifest whose `layers_prefix` is not where the model built from config.json keeps its decoder layers
    (edited, or damaged within valid JSON) passed `verify`, and streaming it then refused it ("stores decoder layers
    under 'model.blocks' but the model's are under 'model.layers'"). `verify` fails it now, naming both, as the
    manifest's edit (config.json builds the model whose fingerprint it records: it said config.json described another
    model); the same split run again repairs it."""
    ckpt, shards = shard_copy
    manifest = json.loads((shards / "manifest.json").read_text())
    (shards / "manifest.json").write_text(json.dumps({**manifest, "layers_prefix": "model.blocks"}))
    assert main(["verify", str(shards), "--quick"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(
        f"{shards / 'manifest.json'} records `layers_prefix` 'model.blocks' (the model: 'model.layers'), where the "
        "model config.json builds has the architecture fingerprint it records"
    ), captured.out
    assert "fix manifest.json as its message says" in captured.err
    split_checkpoint(ckpt, shards, progress=False)
    assert json.loads((shards / "manifest.json").read_text())["layers_prefix"] == "model.layers"
    assert ShardDirectory(shards, checksums=True).verify() == []


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_manifest_that_is_no_regular_file_is_named_so(shard_copy, kind):
    """A `manifest.json` that is a FIFO or a folder read as "has no manifest.json, so it is not a shard directory"."""

    ckpt, shards = shard_copy
    manifest = shards / "manifest.json"
    manifest.unlink()
    os.mkfifo(manifest) if kind == "fifo" else manifest.mkdir()
    with pytest.raises(ShardFileError, match=r"manifest\.json is not a regular file"):
        ShardDirectory(shards)
    with pytest.raises(ShardDirError, match=r"manifest\.json is damaged"):  # (a FIFO: it waited for a writer)
        split_checkpoint(ckpt, shards, progress=False)


def test_loading_never_writes(shard_copy, monkeypatch):
    """A read-only directory works: chmod -R a-w, and every write attempt during the load fails loudly.

    Tests run as root, which ignores permission bits, so writes are also trapped at `open`/`os.open`, and the
    directory's listing, sizes and mtimes are compared before and after.
    """
    ckpt, shards = shard_copy
    ref = _models.load_reference(ckpt)
    for p in [shards, *shards.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))

    def state():
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in [shards, *sorted(shards.rglob("*"))]}

    before = state()
    writes = []
    real_open, real_os_open = builtins.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file, mode="r", *args, **kwargs):
        if str(file).startswith(str(shards)) and any(c in mode for c in "wax+"):
            writes.append((file, mode))
            raise PermissionError(f"write to {file} during a load")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(shards)) and flags & write_flags:
            writes.append((path, flags))
            raise PermissionError(f"write to {path} during a load")
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    try:
        ShardDirectory(shards, checksums=True)
        assert ShardDirectory(shards).verify() == []
        model = streamed_model(ckpt, shards, **STREAM_ALL)
        ids = torch.tensor([[1, 20, 30, 40, 50]])
        try:
            with torch.no_grad():
                got = model(ids).logits
                generated = model.generate(ids, max_new_tokens=5, do_sample=False)
        finally:
            disable_layer_streaming(model)
    finally:
        monkeypatch.undo()
        for p in [shards, *shards.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert writes == []
    with torch.no_grad():
        assert torch.equal(got, ref(ids).logits)
        assert torch.equal(generated, ref.generate(ids, max_new_tokens=5, do_sample=False))
    after = {k: v for k, v in state().items()}
    assert after == before


def test_a_directory_made_by_a_newer_version_says_so_and_is_not_rewritten(shard_copy):
    """A manifest of a newer format version: the error said to re-split "with this version" (a downgrade), and the
    same split "repaired" the directory, rewriting its manifest at the older version. Now the error says it is newer
    and to upgrade, and the split leaves the directory alone unless asked to replace it (`overwrite=True`)."""

    from hf_layerstream import ShardFileError, split_checkpoint

    ckpt, shards = shard_copy
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["format_version"] = 2
    (shards / "manifest.json").write_text(json.dumps(manifest))
    before = {p: p.read_bytes() for p in sorted(shards.rglob("*")) if p.is_file()}
    with pytest.raises(ShardFileError, match=r"written by a newer hf_layerstream \(shard format version 2") as info:
        ShardDirectory(shards)
    assert "Upgrade hf_layerstream" in str(info.value) and "with this version of hf_layerstream" not in str(info.value)
    with pytest.raises(ShardDirError, match=r"made by a newer hf_layerstream.*Upgrade.*overwrite=True"):
        split_checkpoint(ckpt, shards, progress=False)
    assert {p: p.read_bytes() for p in sorted(shards.rglob("*")) if p.is_file()} == before
    split_checkpoint(ckpt, shards, overwrite=True, progress=False)
    assert json.loads((shards / "manifest.json").read_text())["format_version"] == 1
    assert ShardDirectory(shards, checksums=True).verify() == []


def test_a_format_version_of_another_type_is_named_so(shard_copy):
    """A manifest's `format_version` edited into a string ("1"): the error read "has format version '1', this library
    reads version 1", the same version to a reader. It names the type (a string where the split writes a number) and
    the value to set back; a missing one is named as missing."""
    _, shards = shard_copy
    manifest = json.loads((shards / "manifest.json").read_text())
    (shards / "manifest.json").write_text(json.dumps({**manifest, "format_version": "1"}))
    with pytest.raises(ShardFileError, match=r'records `format_version` "1", a string where the split writes a number'):
        ShardDirectory(shards)
    del manifest["format_version"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardFileError, match=r"records no `format_version`"):
        ShardDirectory(shards)


def test_a_folder_a_split_is_writing_is_named_so(tmp_path):
    """A folder a split is writing right now (it holds the lock): opening it said to run the same split again to
    finish it, which the lock then refused ("Another process is splitting into ..."); it now says to wait."""
    from hf_layerstream.split import _locked

    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / ".progress.json").write_text("{}")
    with _locked(folder, wait=False):
        with pytest.raises(ShardDirError, match="a split is writing it right now .* wait for that split to finish"):
            ShardDirectory(folder)
    with pytest.raises(ShardDirError, match="unfinished split: run the same split again to finish it"):
        ShardDirectory(folder)


LAYER = "layers/00001.safetensors"


def test_a_shard_directory_downloaded_from_the_hub_streams_from_the_hub_cache(shard_copy, tmp_path):
    """A shard directory uploaded to the hub and downloaded with `snapshot_download` (or `hf download`) is the hub
    cache's snapshot of the repo: symlinks to the repo's blobs, beside the snapshot. It was refused as resolving
    outside the directory; it streams, exact. A link there to anything else still is refused: a file elsewhere, or
    a blob of another repo of the cache."""
    ckpt, shards = shard_copy
    ref = _models.load_reference(ckpt)
    ids = torch.tensor([[1, 5, 9, 3]])
    snapshot = _models.hub_snapshot(shards, tmp_path / "cache")
    assert (snapshot / "manifest.json").is_symlink() and (snapshot / LAYER).is_symlink()
    model = streamed_model(ckpt, snapshot, **STREAM_ALL)
    assert torch.equal(model(ids).logits, ref(ids).logits)
    disable_layer_streaming(model)
    assert ShardDirectory(snapshot).verify() == []

    other = _models.hub_snapshot(shards, tmp_path / "cache", repo="org--other")
    for target in (shards / LAYER, os.path.realpath(other / LAYER)):
        (snapshot / LAYER).unlink()
        (snapshot / LAYER).symlink_to(target)
        with pytest.raises(
            ShardFileError, match=f"{LAYER} resolves outside the directory.*the manifest names '{LAYER}'"
        ):
            ShardDirectory(snapshot)


def test_a_hub_cache_download_missing_a_file_is_told_to_be_downloaded_again(shard_copy, tmp_path, capsys, monkeypatch):
    """A hub cache snapshot of a shard directory missing a layer file (an incomplete download) or whose link leads to
    a blob deleted: opening it said to re-create the shard directory with `split_checkpoint`, which refuses to write
    into the hub cache. It says to download it again, as `verify` does (at its revision, where not the default
    branch's); `verify` lists a link to a blob deleted among the files, not as a damaged manifest."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # (another is named: see the next test)
    _, shards = shard_copy
    snapshot = _models.hub_snapshot(shards, tmp_path / "cache", repo="someorg--layers")
    os.unlink(os.path.realpath(snapshot / LAYER))  # (the blob: the link dangles)
    with pytest.raises(ShardFileError) as raised:
        ShardDirectory(snapshot)
    assert str(raised.value) == (
        f"{snapshot / LAYER} is a dangling symlink (the manifest records unit 'layers.1' there). It is a download in "
        "the hub cache: download it again (`hf download someorg/layers --force-download`), or run `hf-layerstream "
        "verify` to list every damaged file."
    )
    # `verify` lists it (it said the manifest was damaged: the link was refused as it was read)
    capsys.readouterr()
    assert main(["verify", str(snapshot), "--quick"]) == 1
    out, err = capsys.readouterr()
    assert out == f"{snapshot / LAYER} is a dangling symlink (the manifest records unit 'layers.1' there)\n"
    assert "damaged" not in err and "download them again (`hf download someorg/layers --force-download`)" in err
    v2 = "c" * 40
    other = _models.hub_snapshot(shards, tmp_path / "cache", repo="someorg--layers", commit=v2, ref="v2")
    (other / LAYER).unlink()  # (the link: missing from the snapshot)
    with pytest.raises(ShardFileError, match=rf"is missing .*\(`hf download someorg/layers --revision {v2} --force"):
        ShardDirectory(other)
    # its config.json's blob deleted: downloaded again, not split again there
    config = _models.hub_snapshot(shards, tmp_path / "cache", repo="someorg--configless")
    os.unlink(os.path.realpath(config / "config.json"))
    with pytest.raises(ShardFileError) as raised:
        ShardDirectory(config)
    assert str(raised.value).endswith(
        "is missing (the split writes it beside the manifest; the model is built from it). It is a download in the "
        "hub cache: download it again (`hf download someorg/configless --force-download`)."
    )
    # a blob damaged within, found by `checksums=True` (`verify=True`): downloaded again, not split again there
    third = _models.hub_snapshot(shards, tmp_path / "cache", repo="someorg--damaged")
    blob = Path(os.path.realpath(third / LAYER))
    os.chmod(blob, 0o644)
    _flip_middle_byte(blob)
    with pytest.raises(ShardDirError, match="do not match their manifest checksum") as raised:
        ShardDirectory(third, checksums=True)
    assert str(raised.value).endswith(
        ". It is a download in the hub cache: download it again (`hf download someorg/damaged --force-download`)."
    )


def test_a_hub_cache_download_missing_a_tokenizer_file_names_the_download_command(
    shard_copy, tmp_path, capsys, monkeypatch
):
    """A hub cache snapshot of a shard directory missing its tokenizer.json (a download cut short, its blob deleted):
    `verify` and `generate` said to "download the repo again" with no command, where the other files of a download
    name it (`hf download REPO --force-download`, at its revision where not the default branch's). In a hub cache
    other than huggingface_hub's, the command names it (`--cache-dir`): without, it downloaded into that one, leaving
    this one as it was."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    _, shards = shard_copy
    snapshot = _models.hub_snapshot(shards, tmp_path / "cache", repo="someorg--tok")
    os.unlink(os.path.realpath(snapshot / "tokenizer.json"))  # (the blob: the link dangles)
    problem = (
        f"{snapshot / 'tokenizer.json'} is missing (a file of the tokenizer: `AutoTokenizer.from_pretrained` of the "
        "directory fails or tokenizes otherwise; the split wrote it, and the manifest lists it): this download of the "
        "hub repo lacks it: download the repo again (`hf download someorg/tok --force-download`), or, where the repo "
        "lacks it, run the same split again and upload it"
    )
    assert ShardDirectory(snapshot).verify() == [problem]
    assert main(["generate", str(snapshot), "Hello", "--max-new-tokens", "1", "--device", "cpu"]) == 2
    assert f"error: {problem}; or give a tokenizer with `--tokenizer`" in capsys.readouterr().err
    v2 = "c" * 40
    other = _models.hub_snapshot(shards, tmp_path / "cache", repo="someorg--tok", commit=v2, ref="v2")
    (other / "tokenizer.json").unlink()  # (the link: missing from the snapshot)
    assert "(`hf download someorg/tok --revision " + v2 + " --force-download`)" in ShardDirectory(other).verify()[0]
    elsewhere = _models.hub_snapshot(shards, tmp_path / "my cache", repo="someorg--tok")
    (elsewhere / "tokenizer.json").unlink()
    cache = shlex.quote(os.path.realpath(tmp_path / "my cache"))
    assert f"(`hf download someorg/tok --cache-dir {cache} --force-download`)" in ShardDirectory(elsewhere).verify()[0]


def test_a_hub_repo_holding_a_shard_directory_streams_by_its_id(shard_copy, tmp_path, monkeypatch, capsys):
    """`enable_layer_streaming(model, "org/name")`, `generate`, `inspect` and `verify` take the id of a hub repo holding
    a shard directory, as `from_pretrained` takes a model's: downloaded into the hub cache (here: found there,
    offline), exact. Its manifest is fetched first: a repo without one (a checkpoint) is refused before its weights
    are downloaded, saying to split it; a misspelt folder name offline says no such folder exists either."""
    import huggingface_hub
    from huggingface_hub import constants

    ckpt, shards = shard_copy
    ref = _models.load_reference(ckpt)
    ids = torch.tensor([[1, 5, 9, 3]])
    _models.hub_snapshot(shards, tmp_path / "cache", repo="someorg--llama-layers")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # (no folder named `someorg/llama-layers` here)
    model = streamed_model(ckpt, "someorg/llama-layers", **STREAM_ALL)
    assert torch.equal(model(ids).logits, ref(ids).logits)
    disable_layer_streaming(model)

    argv = ["--max-new-tokens", "4", "--device", "cpu", "--max-memory", "cpu=0"]
    assert main(["generate", str(shards), "Hello", *argv]) == 0
    expected = capsys.readouterr().out
    assert main(["generate", "someorg/llama-layers", "Hello", *argv]) == 0
    assert capsys.readouterr().out == expected
    assert main(["inspect", "someorg/llama-layers"]) == 0
    assert "models--someorg--llama-layers" in capsys.readouterr().out
    assert main(["verify", "someorg/llama-layers"]) == 0

    assert main(["generate", "someorg/llama-layerz", "Hello"]) == 2
    err = capsys.readouterr().err
    assert "`shard_dir` 'someorg/llama-layerz' is no local folder" in err and "Cannot fetch manifest.json" in err
    # a short commit hash offline: the hub cache names its snapshots by the full hash, so it is not found there (it
    # said to download it, held in the cache): named whole
    with pytest.raises(FileNotFoundError) as raised:
        streamed_model(ckpt, "someorg/llama-layers", revision="aaaaaaa", **STREAM_ALL)
    assert str(raised.value).endswith(
        "at revision 'aaaaaaa': the hub cannot be reached (offline, huggingface_hub.constants.HF_HUB_OFFLINE set) to "
        "resolve that short commit hash, and the hub cache names commits by their full hash: give it whole (its "
        f"snapshot of 'someorg/llama-layers' there: {'a' * 40})."
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    fetched = []

    def hf_hub_download(repo_id, filename, **kwargs):  # (a hub repo holding a checkpoint: no manifest.json)
        fetched.append(filename)
        raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not found")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded the repo"))
    with pytest.raises(ShardDirError, match=r"holds no manifest.json: it is no shard directory. If it is a checkpoint"):
        streamed_model(ckpt, "someorg/a-checkpoint", **STREAM_ALL)
    assert fetched == ["manifest.json"]


def test_a_hub_repo_is_checked_before_its_layers_are_downloaded(shard_copy, tmp_path, monkeypatch, capsys):
    """What can be refused without a hub repo's layers is refused before they are downloaded: a model that is not the
    one split, a command line's mistakes; `inspect` reads the manifest and config only. A shard directory in a folder
    of the snapshot streams too, and the split refuses to write into the hub cache. An id that cannot be a repo's
    (`x.layers/`) or a dangling symlink is a missing path, as before; a gated repo says so, with the hub's words; a
    damaged download is told to be downloaded again, not split."""
    import huggingface_hub
    from huggingface_hub import constants

    from hf_layerstream.shard_dir import local_shard_dir

    ckpt, shards = shard_copy
    snapshot = _models.hub_snapshot(shards, tmp_path / "cache", repo="someorg--llama-layers")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    # the hub, online: a file is fetched into the cache (here, found there); a download of the repo is recorded
    fetched, downloads = [], []

    def hf_hub_download(repo_id, filename, **kwargs):
        fetched.append(filename)
        assert repo_id == "someorg/llama-layers"
        return str(snapshot / filename)

    def snapshot_download(repo_id, **kwargs):
        downloads.append(kwargs.get("allow_patterns") or kwargs.get("ignore_patterns"))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    other = _models.save_tiny_checkpoint("llama", tmp_path / "deeper", num_hidden_layers=5)
    with pytest.raises(ShardDirError, match="layers"):
        streamed_model(other, "someorg/llama-layers", **STREAM_ALL)
    assert downloads == []
    assert main(["generate", "someorg/llama-layers", "Hi", "--max-new-tokens", "0"]) == 2
    assert main(["inspect", "someorg/llama-layers"]) == 0
    assert "hub repo         someorg/llama-layers: its manifest and config read" in capsys.readouterr().out
    assert downloads == []
    assert set(fetched) == {"manifest.json", "config.json"}
    assert main(["verify", "someorg/llama-layers", "--quick"]) == 0  # (downloads the files the manifest names)
    assert sorted(downloads[-1]) == sorted(str(p.relative_to(shards)) for p in shards.rglob("*.safetensors"))
    assert "*.safetensors" in downloads[-2]  # (the small files first, no weights)

    # a damaged download: downloaded again, not split again
    blob = os.path.realpath(snapshot / LAYER)
    os.chmod(blob, 0o644)
    _flip_middle_byte(Path(blob))
    capsys.readouterr()
    assert main(["verify", "someorg/llama-layers"]) == 1
    assert "download them again (`hf download someorg/llama-layers --force-download`)" in capsys.readouterr().err
    with pytest.raises(ShardDirError, match="is in the hub cache, a download of the repo 'someorg/llama-layers'"):
        split_checkpoint(ckpt, snapshot, overwrite=True, progress=False)
    assert (snapshot / LAYER).is_symlink()

    # a shard directory in a folder of a downloaded repo
    (tmp_path / "several").mkdir()
    shutil.copytree(shards, tmp_path / "several" / "fp32")
    nested = _models.hub_snapshot(tmp_path / "several", tmp_path / "cache", repo="someorg--several") / "fp32"
    ids = torch.tensor([[1, 5, 9, 3]])
    model = streamed_model(ckpt, nested, **STREAM_ALL)
    assert torch.equal(model(ids).logits, _models.load_reference(ckpt)(ids).logits)
    disable_layer_streaming(model)

    # paths, not repo ids
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.layers").symlink_to(tmp_path / "unmounted")
    for path in ("x.layers/", "C:/x", "out/x.layers"):
        assert local_shard_dir(path) == path
        with pytest.raises((FileNotFoundError, ShardDirError)) as raised:
            streamed_model(ckpt, path, **STREAM_ALL)
        assert "does not exist" in str(raised.value) or "dangling symlink" in str(raised.value)

    # a gated repo
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    gated = huggingface_hub.errors.GatedRepoError.__new__(huggingface_hub.errors.GatedRepoError)
    Exception.__init__(gated, "Access to model someorg/gated is restricted. Ask for access at its page.")

    def hf_hub_download(repo_id, filename, **kwargs):
        raise gated

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    with pytest.raises(PermissionError) as raised:
        streamed_model(ckpt, "someorg/gated", **STREAM_ALL)
    assert str(raised.value).startswith("`shard_dir` 'someorg/gated' is a gated hub repo that this user cannot access")
    assert str(raised.value).endswith(
        "The hub said: Access to model someorg/gated is restricted. Ask for access at its page."
    )


def test_a_max_memory_that_is_refused_is_refused_before_a_hub_repos_layers_download(shard_copy, tmp_path, monkeypatch):
    """`max_memory` was checked (its type, keys, sizes) only as the plan was made, after a hub repo's layer files were
    downloaded (a 70B model's 40 GB, then "key 'gpu' is not recognized"), unless `reserve` was given: refused first, as
    the other arguments are, with the plan's own message."""
    import huggingface_hub
    from huggingface_hub import constants

    ckpt, shards = shard_copy
    snapshot = _models.hub_snapshot(shards, tmp_path / "cache", repo="someorg--llama-layers")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    downloads = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, **kw: str(snapshot / filename))
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo_id, **kw: downloads.append(kw) or str(snapshot)
    )
    for max_memory, error, match in (
        ({"gpu": "4GiB"}, ValueError, "`max_memory` key 'gpu' is not recognized"),
        ({"cpu": "lots"}, ValueError, "`max_memory` got the size 'lots'"),
        ("4GiB", TypeError, "`max_memory` must be a dict such as"),
    ):
        with pytest.raises(error, match=match):
            streamed_model(ckpt, "someorg/llama-layers", max_memory=max_memory)
        assert downloads == [], max_memory
    model = streamed_model(ckpt, "someorg/llama-layers", **STREAM_ALL)  # (and a budget that is taken streams)
    assert downloads and get_streaming_state(model) is not None
    disable_layer_streaming(model)


def test_the_split_refuses_a_folder_in_the_hub_cache_not_made_yet(shard_copy, tmp_path, monkeypatch, capsys):
    """`split` refuses to write into the hub cache, but it checked an existing snapshot folder only: a `shard_dir` not
    made yet there was made and written, in a folder of the source's own snapshot (`split org/ckpt SNAPSHOT/sub`), as
    a snapshot of a repo the cache holds none of (`models--org--new/snapshots/COMMIT`), or in a repo's `blobs/` or
    `refs/`. Now a folder there is refused whether it exists or not (also through a symlink), and so is a `shard_dir`
    holding a hub source's snapshot in the cache, as one holding a local source's folder was: before anything is
    written (no folder, no lock)."""
    from huggingface_hub import constants

    ckpt, shards = shard_copy
    cache = tmp_path / "cache"
    snapshot = _models.hub_snapshot(ckpt, cache, repo="someorg--ckpt")
    _models.hub_snapshot(shards, cache, repo="someorg--layers", commit="b" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    (tmp_path / "link").symlink_to(snapshot)

    def listing():
        return sorted((str(p), p.is_symlink()) for p in tmp_path.rglob("*") if not p.is_relative_to(tmp_path / "ok"))

    before = listing()
    refusal = "which the split must not write into: choose a folder outside the hub cache; nothing was written."
    for source, shard_dir, where in (
        ("someorg/ckpt", snapshot / "sub", "a download of the repo 'someorg/ckpt'"),
        ("someorg/ckpt", tmp_path / "link" / "sub", "a download of the repo 'someorg/ckpt'"),
        (ckpt, snapshot / "sub" / "deeper", "a download of the repo 'someorg/ckpt'"),
        (ckpt, cache / "models--someorg--new" / "snapshots" / ("c" * 40), "in the folder of the repo 'someorg/new'"),
        (ckpt, cache / "models--someorg--layers" / "blobs" / "x", "in the folder of the repo 'someorg/layers'"),
        (ckpt, cache / "models--someorg--layers" / "refs" / "v2", "in the folder of the repo 'someorg/layers'"),
    ):
        message = f"`shard_dir` {shard_dir} is in the hub cache, {where}, {refusal}"
        with pytest.raises(ShardDirError) as raised:
            split_checkpoint(source, shard_dir, progress=False, overwrite=True)
        assert str(raised.value) == message
        assert main(["split", str(source), str(shard_dir), "--quiet"]) == 2
        assert message in capsys.readouterr().err
        assert listing() == before
    # a `shard_dir` holding the hub source's snapshot: refused as one holding a local source's folder (the hub cache
    # itself as the hub cache: `test_the_split_refuses_a_folder_beside_the_repos_in_the_hub_cache`)
    with pytest.raises(ValueError, match=r"`shard_dir` must differ from `source`, and neither may be inside the "):
        split_checkpoint("someorg/ckpt", tmp_path, progress=False, overwrite=True)
    with pytest.raises(ShardDirError, match=r"cache is the hub cache, which the split must not write into"):
        split_checkpoint("someorg/ckpt", cache, progress=False, overwrite=True)
    assert listing() == before
    # outside the hub cache, as before
    split_checkpoint("someorg/ckpt", tmp_path / "ok" / "llama.layers", progress=False)
    assert ShardDirectory(tmp_path / "ok" / "llama.layers").num_layers == 3
    assert listing() == before


def test_the_split_refuses_a_folder_beside_the_repos_in_the_hub_cache(shard_copy, tmp_path, monkeypatch, capsys):
    """A `shard_dir` in the hub cache but in no repo's folder (`$HF_HUB_CACHE/llama.layers`, made yet or not) was
    written, with a local source: `hf cache ls` (huggingface_hub's `scan_cache_dir`) then reports it as an
    inconsistency of the cache, and `hf cache rm` cannot remove it. It is refused as a folder of a repo's there is,
    before anything is written: any folder of the hub cache (deeper too, through a symlink too), of a `cache_dir`
    given, and the cache itself; a split made there before is told to be moved out."""
    from huggingface_hub import constants, scan_cache_dir

    ckpt, shards = shard_copy
    cache = tmp_path / "cache"
    _models.hub_snapshot(ckpt, cache, repo="someorg--ckpt")
    shutil.copytree(shards, cache / "old.layers")  # (made there before)
    (tmp_path / "link").symlink_to(cache)
    other = tmp_path / "other-cache"
    other.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    [warning] = scan_cache_dir(cache).warnings  # (why: a folder there is taken for a damaged repo's)
    assert "old.layers" in str(warning)

    def listing():
        return sorted((str(p), p.is_symlink()) for p in tmp_path.rglob("*"))

    before = listing()
    why = (
        "which the split must not write into (`hf cache ls` reports what is there but a repo's folder as an "
        "inconsistency of the cache, and `hf cache rm` cannot remove it): choose a folder outside the hub cache"
    )
    for source, shard_dir, where, kwargs in (
        (ckpt, cache / "llama.layers", f"in the hub cache {cache}, in no repo's folder there", {}),
        (ckpt, cache / "splits" / "llama.layers", f"in the hub cache {cache}, in no repo's folder there", {}),
        (ckpt, tmp_path / "link" / "llama.layers", f"in the hub cache {cache}, in no repo's folder there", {}),
        ("someorg/ckpt", cache / "llama.layers", f"in the hub cache {cache}, in no repo's folder there", {}),
        (ckpt, cache, "the hub cache", {"overwrite": True}),
        (ckpt, other / "llama.layers", f"in the hub cache {other}, in no repo's folder there", {"cache_dir": other}),
    ):
        message = f"`shard_dir` {shard_dir} is {where}, {why}; nothing was written."
        with pytest.raises(ShardDirError) as raised:
            split_checkpoint(source, shard_dir, progress=False, **kwargs)
        assert str(raised.value) == message
        if not kwargs:
            assert main(["split", str(source), str(shard_dir), "--quiet"]) == 2
            assert message in capsys.readouterr().err
        assert listing() == before
    with pytest.raises(ShardDirError) as raised:
        split_checkpoint(ckpt, cache / "old.layers", progress=False)
    assert str(raised.value).endswith(
        f"{why}; to keep the split made there, move it out: it streams from any folder; nothing was written."
    )
    assert listing() == before


def test_a_hub_repo_in_the_hub_cache_without_a_manifest_is_named_so_offline(shard_copy, tmp_path, monkeypatch, capsys):
    """A hub repo in the hub cache without manifest.json (a checkpoint downloaded with `hf download`), given as the
    shard directory offline: it was said not to be in the hub cache, to be downloaded once with network access (it
    was), with "(offline, HF_HUB_OFFLINE=0)" where offline mode was set otherwise than by the variable, or not at all
    (the hub unreachable). Now a checkpoint in the cache is named so and told to be split, as the hub's answer online
    says; a snapshot holding neither a manifest nor a checkpoint is named as downloaded (part of a repo, maybe), the
    cache's record that the hub has no manifest as that answer; a revision not in the cache is still said to be
    missing, with the reason the hub cannot be reached as it is. Nothing is written."""
    import huggingface_hub
    from huggingface_hub import constants

    ckpt, shards = shard_copy
    cache = tmp_path / "cache"
    snapshot = _models.hub_snapshot(ckpt, cache, repo="someorg--ckpt")
    tagged = _models.hub_snapshot(ckpt, cache, repo="someorg--ckpt", commit="b" * 40, ref="v2")
    (tmp_path / "partial").mkdir()  # (a shard directory's config.json only, as `AutoConfig` downloads it)
    shutil.copy(shards / "config.json", tmp_path / "partial")
    partial = _models.hub_snapshot(tmp_path / "partial", cache, repo="someorg--layers")
    (cache / "models--someorg--said" / ".no_exist" / ("c" * 40)).mkdir(parents=True)  # (the hub's answer, recorded)
    (cache / "models--someorg--said" / ".no_exist" / ("c" * 40) / "manifest.json").touch()
    (cache / "models--someorg--said" / "refs").mkdir()
    (cache / "models--someorg--said" / "refs" / "main").write_text("c" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)

    def listing():
        return sorted((str(p), p.is_symlink()) for p in tmp_path.rglob("*"))

    before = listing()
    named = (
        f"`shard_dir` 'someorg/ckpt' is no local folder ({tmp_path / 'someorg' / 'ckpt'} does not exist), and the hub"
    )
    split = "(`split_checkpoint('someorg/ckpt', DIR)`, `hf-layerstream split someorg/ckpt DIR`) and stream DIR."
    checkpoint = "without manifest.json, holding a checkpoint (config.json and weights): it is no shard directory."
    for revision, folder in ((None, snapshot), ("v2", tagged)):
        at = f" at revision {revision!r}" if revision else ""
        message = f"{named} repo of that name is in the hub cache{at} ({folder}) {checkpoint} Split it first {split}"
        with pytest.raises(ShardDirError) as raised:
            streamed_model(ckpt, "someorg/ckpt", revision=revision, **STREAM_ALL)
        assert str(raised.value) == message
        option = ["--revision", revision] if revision else []
        for argv in (["inspect", "someorg/ckpt"], ["generate", "someorg/ckpt", "Hi", "--max-new-tokens", "1"]):
            assert main([*argv, *option]) == 2
            err = capsys.readouterr().err
            assert message in err and "Download it once" not in err
    # neither a manifest nor a checkpoint, as downloaded
    with pytest.raises(ShardDirError) as raised:
        streamed_model(ckpt, "someorg/layers", **STREAM_ALL)
    assert str(raised.value) == (
        f"`shard_dir` 'someorg/layers' is no local folder ({tmp_path / 'someorg' / 'layers'} does not exist), and the "
        f"hub repo of that name is in the hub cache ({partial}) without manifest.json or a checkpoint's config.json and "
        "weights: as downloaded, it is no shard directory, and the hub cannot be reached (offline, "
        "huggingface_hub.constants.HF_HUB_OFFLINE set) to say more. If the repo holds a shard directory, download it "
        "whole once with network access (`hf download someorg/layers`); if a checkpoint, split it first "
        "(`split_checkpoint('someorg/layers', DIR)`, `hf-layerstream split someorg/layers DIR`) and stream DIR."
    )
    # the hub said it has no manifest, as the cache records: the hub's answer
    with pytest.raises(ShardDirError, match=r"and the hub repo of that name holds no manifest.json: it is no shard "):
        streamed_model(ckpt, "someorg/said", **STREAM_ALL)
    # a revision the cache does not hold: not in the hub cache, the reason as it is
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as raised:
        streamed_model(ckpt, "someorg/ckpt", revision="v3", **STREAM_ALL)
    assert (
        "Cannot fetch manifest.json of 'someorg/ckpt' at revision 'v3': the hub cannot be reached (offline, "
        "HF_HUB_OFFLINE=1) and it is not in the hub cache. Download it once with network access (`hf download "
        "someorg/ckpt --revision v3`)" in str(raised.value)
    )
    # (transformers' variable, which huggingface_hub reads too: named as it is)
    from hf_layerstream.split import unreachable_reason

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert unreachable_reason() == "offline, TRANSFORMERS_OFFLINE=1"
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the hub unreachable, offline mode not set: not called offline (it said "offline, HF_HUB_OFFLINE=0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    real = huggingface_hub.hf_hub_download

    def unreachable(repo_id, filename, **kwargs):
        try:
            return real(repo_id, filename, **{**kwargs, "local_files_only": True})
        except huggingface_hub.errors.LocalEntryNotFoundError as e:
            raise huggingface_hub.errors.LocalEntryNotFoundError("the hub cannot be reached") from e

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(FileNotFoundError) as raised:
        streamed_model(ckpt, "someorg/nothing", **STREAM_ALL)
    assert "the hub cannot be reached (no network, or the hub is down) and it is not in the hub cache" in str(
        raised.value
    )
    with pytest.raises(ShardDirError, match="without manifest.json, holding a checkpoint"):
        streamed_model(ckpt, "someorg/ckpt", **STREAM_ALL)
    assert listing() == before


def test_a_hub_repo_streams_at_a_revision_with_a_token(shard_copy, tmp_path, monkeypatch, capsys, caplog):
    """`revision=` and `token=` (`--revision`, `--token` of `generate`, `inspect`, `verify` and `bench`) for a hub repo
    holding a shard directory, as `from_pretrained` takes them: only its default branch was streamed, and a private
    repo needed HF_TOKEN. Every file comes from the commit the manifest was fetched at (a push in between changes
    nothing), each request with the token; `generate` builds the model and streams at that commit, and the files it
    already fetched are not asked for again. A revision the repo lacks is named; for a local folder, both are
    ignored with a warning."""
    import logging

    import huggingface_hub
    from huggingface_hub import constants

    ckpt, shards = shard_copy
    ref = _models.load_reference(ckpt)
    ids = torch.tensor([[1, 5, 9, 3]])
    v2 = "b" * 40
    # the default branch holds another split (5 layers); the tag `v2` this one
    other = _models.save_tiny_checkpoint("llama", tmp_path / "deeper", num_hidden_layers=5)
    _models.hub_snapshot(
        split_checkpoint(other, tmp_path / "deeper.layers", progress=False), tmp_path / "cache", repo="someorg--layers"
    )
    snapshot = _models.hub_snapshot(shards, tmp_path / "cache", repo="someorg--layers", commit=v2, ref="v2")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    # the hub, online: each request recorded, then answered from the cache (as huggingface_hub resolves a branch or
    # a tag to its commit)
    requests = []
    real_file, real_snapshot = huggingface_hub.hf_hub_download, huggingface_hub.snapshot_download

    def hf_hub_download(repo_id, filename, **kwargs):
        requests.append((filename, kwargs.get("revision"), kwargs.get("token")))
        if kwargs.get("revision") == "nope":
            missing = huggingface_hub.errors.RevisionNotFoundError.__new__(huggingface_hub.errors.RevisionNotFoundError)
            Exception.__init__(missing, "Invalid rev id: nope")
            raise missing
        return real_file(repo_id, filename, **{**kwargs, "local_files_only": True})

    def snapshot_download(repo_id, **kwargs):
        requests.append(("snapshot", kwargs.get("revision"), kwargs.get("token")))
        return real_snapshot(repo_id, **{**kwargs, "local_files_only": True})

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)

    with pytest.raises(ShardDirError, match="layers"):  # (the default branch: another model)
        streamed_model(ckpt, "someorg/layers", **STREAM_ALL)
    requests.clear()
    model = streamed_model(ckpt, "someorg/layers", revision="v2", token="hf_secret", **STREAM_ALL)
    assert get_streaming_state(model).shard_dir.path == snapshot
    assert torch.equal(model(ids).logits, ref(ids).logits)
    disable_layer_streaming(model)
    assert requests == [
        ("manifest.json", "v2", "hf_secret"),
        ("config.json", v2, "hf_secret"),
        ("snapshot", v2, "hf_secret"),
        ("snapshot", v2, "hf_secret"),
    ]

    argv = ["Hello", "--max-new-tokens", "4", "--device", "cpu", "--max-memory", "cpu=0"]
    assert main(["generate", str(shards), *argv]) == 0
    expected = capsys.readouterr().out
    requests.clear()
    assert main(["generate", "someorg/layers", *argv, "--revision", "v2", "--token", "hf_secret"]) == 0
    assert capsys.readouterr().out == expected
    assert [r for r in requests if r[0] != "snapshot"] == [
        ("manifest.json", "v2", "hf_secret"),
        ("config.json", v2, "hf_secret"),
        ("manifest.json", v2, "hf_secret"),  # (the commit: found in the cache, not asked of the hub)
        ("config.json", v2, "hf_secret"),
    ]
    assert all(r[1:] == (v2, "hf_secret") for r in requests if r[0] == "snapshot")
    assert main(["inspect", "someorg/layers", "--revision", "v2"]) == 0
    assert f"shard directory  {snapshot}" in capsys.readouterr().out
    blob = os.path.realpath(snapshot / LAYER)
    os.chmod(blob, 0o644)
    _flip_middle_byte(Path(blob))
    assert main(["verify", "someorg/layers", "--revision", "v2"]) == 1
    assert f"download them again (`hf download someorg/layers --revision {v2} --force-download`)" in (
        capsys.readouterr().err
    )

    with pytest.raises(FileNotFoundError, match="`shard_dir` 'someorg/layers' has no revision 'nope' on the hub"):
        streamed_model(ckpt, "someorg/layers", revision="nope", **STREAM_ALL)
    with caplog.at_level(logging.WARNING, logger="hf_layerstream.shard_dir"):
        model = streamed_model(ckpt, shards, revision="v2", token="hf_secret", **STREAM_ALL)
    assert torch.equal(model(ids).logits, ref(ids).logits)
    assert "`revision` 'v2' applies to hub repos" in caplog.text and "`token` applies to hub repos" in caplog.text
    disable_layer_streaming(model)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_layerstream.shard_dir"):
        assert main(["generate", str(shards), *argv, "--revision", "v2", "--token", "hf_secret"]) == 0
    assert capsys.readouterr().out == expected
    assert caplog.text.count("applies to hub repos") == 2  # (once each)
