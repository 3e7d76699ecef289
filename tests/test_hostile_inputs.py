"""Hostile or broken inputs: each is refused with an error that names the file, and nothing is changed.

Shard-directory cases are checked twice, by `ShardDirectory` and by `enable_layer_streaming` (what users call);
source-checkpoint cases by `split_checkpoint`. Every case snapshots the directories before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import struct
from pathlib import Path

import _models
import pytest
import torch
from conftest import streamed_model

from hf_layerstream import ShardDirectory, ShardDirError, ShardFileError, split_checkpoint
from hf_layerstream._safetensors import read_header, sample_digest, serialize
from hf_layerstream.shard_dir import TENSORS_KEY

LEDGER = {"tried": 0, "rejected": 0}
LAYER = "layers/00001.safetensors"


def snapshot(*roots: Path) -> dict:
    """Names, sizes, mtimes and content digests of everything under `roots` (symlinks recorded, never followed)."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames]:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    out[p] = ("link", os.readlink(p))
                elif stat.S_ISREG(st.st_mode):
                    out[p] = (st.st_size, st.st_mtime_ns, hashlib.sha256(Path(p).read_bytes()).hexdigest())
                else:
                    out[p] = ("dir", st.st_mtime_ns)
    return out


def manifest(shards: Path) -> dict:
    return json.loads((shards / "manifest.json").read_text())


def write_manifest(shards: Path, m: dict) -> None:
    (shards / "manifest.json").write_text(json.dumps(m, indent=1))


def unit_json(m: dict, file: str) -> dict:
    return next(u for u in m["units"] if u["file"] == file)


def replace_file(shards: Path, rel: str, data: bytes, *, update_manifest: bool = True) -> None:
    """Write `data` as `rel`; with `update_manifest`, record its size and digests, so only deeper checks can object."""
    (shards / rel).write_bytes(data)
    if update_manifest:
        m = manifest(shards)
        u = unit_json(m, rel)
        u["size"] = len(data)
        u["sha256"] = hashlib.sha256(data).hexdigest()
        u["sample_sha256"] = sample_digest(shards / rel)
        write_manifest(shards, m)


def rewrite_header(data: bytes, edit, *, grow: bool = False) -> bytes:
    """Apply `edit` to the parsed header of a safetensors file and keep its length (pad with spaces); with `grow`,
    a longer header where the edit needs one (the data's offsets are relative to its end)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    size = max(n, len(raw) + (-len(raw) % 8)) if grow else n
    assert len(raw) <= size
    return struct.pack("<Q", size) + raw + b" " * (size - len(raw)) + data[8 + n :]


def resave(data_path: Path, change, meta: dict | None = None) -> bytes:
    from safetensors.torch import load_file

    tensors = load_file(data_path)
    meta = read_header(data_path).metadata if meta is None else meta
    change(tensors)
    return bytes(serialize(tensors, meta))


# --- the cases ---------------------------------------------------------------------------------------------------


def truncated_file(shards, tmp):
    data = (shards / LAYER).read_bytes()
    replace_file(shards, LAYER, data[: len(data) // 2], update_manifest=False)
    return LAYER, "bytes but the manifest records"


def truncated_header(shards, tmp):
    replace_file(shards, LAYER, (shards / LAYER).read_bytes()[:40])
    return LAYER, "header"


def too_short(shards, tmp):
    replace_file(shards, LAYER, b"\x01\x02\x03")
    return LAYER, "too short"


def garbage_header(shards, tmp):
    data = (shards / LAYER).read_bytes()
    replace_file(shards, LAYER, os.urandom(len(data)))
    return LAYER, "header"


def header_not_json(shards, tmp):
    data = (shards / LAYER).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    replace_file(shards, LAYER, data[:8] + b"{not json" + b"\xff" * (n - 9) + data[8 + n :])
    return LAYER, "not valid JSON"


def _point_past_the_end(h):
    """The last tensor's end offset -> 99...9 (same number of digits, so the header keeps its length)."""
    name = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
    begin, end = h[name]["data_offsets"]
    h[name]["data_offsets"] = [begin, int("9" * len(str(end)))]


def offsets_outside_file(shards, tmp):
    edit = _point_past_the_end

    replace_file(shards, LAYER, rewrite_header((shards / LAYER).read_bytes(), edit))
    return LAYER, "data region"


def _first_tensor_edit(field, change):
    """An edit of the first tensor's `field` ("shape" or "data_offsets") by `change` (a list -> a list)."""

    def edit(h):
        name = next(k for k in h if k != "__metadata__")
        h[name][field] = change(h[name][field])

    return edit


def infinite_dimension(shards, tmp):
    """`Infinity` (and `1e400`) parse as a JSON float; `int()` of it raised OverflowError, not the file's error."""
    edit = _first_tensor_edit("shape", lambda shape: [float("inf")] + shape[1:])
    replace_file(shards, LAYER, rewrite_header((shards / LAYER).read_bytes(), edit))
    return LAYER, "malformed header entry"


def dimension_as_text(shards, tmp):
    """`"64"` for 64: `int()` took it; the safetensors library does not (JSON integers only)."""
    edit = _first_tensor_edit("shape", lambda shape: [str(shape[0])] + shape[1:])
    replace_file(shards, LAYER, rewrite_header((shards / LAYER).read_bytes(), edit))
    return LAYER, "malformed header entry"


def fractional_offset(shards, tmp):
    """`64.9` for an offset: `int()` made it 64."""
    edit = _first_tensor_edit("data_offsets", lambda offsets: [offsets[0], offsets[1] + 0.9])
    replace_file(shards, LAYER, rewrite_header((shards / LAYER).read_bytes(), edit))
    return LAYER, "malformed header entry"


def metadata_not_text(shards, tmp):
    """A `__metadata__` value that is not a string (the format maps strings to strings)."""

    def edit(h):
        key = next(iter(h["__metadata__"]))
        h["__metadata__"][key] = 7

    replace_file(shards, LAYER, rewrite_header((shards / LAYER).read_bytes(), edit))
    return LAYER, "`__metadata__` value that is not a string"


def overlapping_tensors(shards, tmp):
    def edit(h):
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        a, b = next(
            (x, y)
            for x, y in zip(names, names[1:])
            if h[x]["shape"] == h[y]["shape"] and h[x]["dtype"] == h[y]["dtype"]
        )
        h[b]["data_offsets"] = list(h[a]["data_offsets"])  # two names, one set of bytes

    replace_file(shards, LAYER, rewrite_header((shards / LAYER).read_bytes(), edit))
    return LAYER, "overlaps|hole|after its last tensor"


def negative_dimension(shards, tmp):
    edit = _first_tensor_edit("shape", lambda shape: [-1] + shape[1:])
    replace_file(shards, LAYER, rewrite_header((shards / LAYER).read_bytes(), edit))
    return LAYER, "negative dimension"


def wrong_shape(shards, tmp):
    name = "model.layers.1.self_attn.q_proj.weight"
    replace_file(
        shards, LAYER, resave(shards / LAYER, lambda t: t.__setitem__(name, t[name].reshape(32, -1).contiguous()))
    )
    return (
        LAYER,
        "stores 'model.layers.1.self_attn.q_proj.weight' as \\[32, 128\\] float32 but the manifest records \\[64, 64\\]",
    )


def wrong_dtype(shards, tmp):
    name = "model.layers.1.mlp.down_proj.weight"
    replace_file(shards, LAYER, resave(shards / LAYER, lambda t: t.__setitem__(name, t[name].half())))
    return LAYER, "float16 but the manifest records"


def missing_tensor(shards, tmp):
    replace_file(shards, LAYER, resave(shards / LAYER, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")))
    return LAYER, "lacks 1 tensor"


def edit_consistently(shards: Path, name: str, change, **record) -> None:
    """Tensor `name` of LAYER changed by `change` in its file, and `record` (its `shape` or `dtype`) written both in
    the manifest and in the file's own record of its tensors (its metadata, as the split writes it): all agree."""
    meta = read_header(shards / LAYER).metadata
    own = json.loads(meta[TENSORS_KEY])
    own[name].update(record)
    meta[TENSORS_KEY] = json.dumps(own, sort_keys=True)
    replace_file(shards, LAYER, resave(shards / LAYER, lambda t: t.__setitem__(name, change(t[name])), meta))
    m = manifest(shards)
    unit_json(m, LAYER)["tensors"][name].update(record)
    write_manifest(shards, m)


def consistent_but_wrong_shape_for_the_model(shards, tmp):
    """File and manifest agree, but not with the model: refused when streaming is enabled (stream.py's check)."""
    name = "model.layers.1.self_attn.q_proj.weight"
    edit_consistently(shards, name, lambda t: t.reshape(32, -1).contiguous(), shape=[32, 128])
    return None, "q_proj.weight.*shape \\[32, 128\\].*expects \\[64, 64\\]"


def consistent_but_integer_dtype(shards, tmp):
    name = "model.layers.1.input_layernorm.weight"
    edit_consistently(shards, name, lambda t: t.to(torch.int32), dtype="int32")
    return None, "input_layernorm.weight.*int32"


def manifest_tensor_record_edited(shards, tmp):
    """The manifest's record of a tensor changed (its dtype) where the file, its digests as recorded, holds it as the
    split wrote it: it passed every check, and streaming would have read the file's bytes by the manifest's record."""
    m = manifest(shards)
    unit_json(m, LAYER)["tensors"]["model.layers.1.mlp.down_proj.weight"]["dtype"] = "bfloat16"
    write_manifest(shards, m)
    return "manifest.json", "records tensor 'model.layers.1.mlp.down_proj.weight' of unit 'layers.1' otherwise than"


def shard_from_another_model(shards, tmp):
    other = tmp / "other"
    _models.save_tiny_checkpoint("llama", other / "ckpt", seed=1)
    split_checkpoint(other / "ckpt", other / "shards", progress=False)
    shutil.copy(other / "shards" / LAYER, shards / LAYER)  # same size, same tensor names, shapes and dtypes
    return LAYER, "another split or another model"


def shard_and_its_record_from_another_split(shards, tmp):
    """A layer file copied in from a split of the same architecture with other weights (another seed), its manifest
    entry with it (size, digests, tensors' records): every check passed, `verify` too, and the model streamed another
    model's layer. The file carries the digest of its split's options (source, dtype, compression), which the manifest
    records too."""
    other = tmp / "other"
    _models.save_tiny_checkpoint("llama", other / "ckpt", seed=1)
    split_checkpoint(other / "ckpt", other / "shards", progress=False)
    shutil.copy(other / "shards" / LAYER, shards / LAYER)
    m = manifest(shards)
    m["units"] = [unit_json(manifest(other / "shards"), LAYER) if u["file"] == LAYER else u for u in m["units"]]
    write_manifest(shards, m)
    return LAYER, "was written by another split than the manifest records"


def manifest_split_digest_edited(shards, tmp):
    """The manifest's `split_options` changed: every file carries the split's digest, which differs from it now. Named
    as the manifest's edit, with the value to put back (not as every file being another split's)."""
    m = manifest(shards)
    m["split_options"] = "0" * 64
    write_manifest(shards, m)
    return "manifest.json", 'records "split_options": "0{64}", but every unit file carries the split digest'


def manifest_split_digest_of_another_type(shards, tmp):
    """The manifest's `split_options` edited into another type than a string (a number), and a layer file of another
    split copied in with its manifest entry: a digest of another type was read as none recorded (a split made before
    it was), which turned off the check that names the copied file, and opening and `verify` passed. The manifest is
    named as malformed."""
    shard_and_its_record_from_another_split(shards, tmp)
    m = manifest(shards)
    m["split_options"] = 5
    write_manifest(shards, m)
    return "manifest.json", r"malformed \(TypeError: `split_options` 5 is not"


def layer_swapped_within_the_model(shards, tmp):
    shutil.copy(shards / "layers/00000.safetensors", shards / LAYER)
    return LAYER, "holds unit 'layers.0', not 'layers.1'"


def missing_file(shards, tmp):
    (shards / LAYER).unlink()
    return LAYER, "is missing"


def manifest_path_outside(shards, tmp):
    shutil.copy(shards / LAYER, tmp / "outside.safetensors")
    m = manifest(shards)
    unit_json(m, LAYER)["file"] = "../outside.safetensors"
    write_manifest(shards, m)
    return "manifest.json", "not a relative path inside the directory"


def manifest_absolute_path(shards, tmp):
    m = manifest(shards)
    unit_json(m, LAYER)["file"] = "/etc/passwd"
    write_manifest(shards, m)
    return "manifest.json", "not a relative path inside the directory"


def symlink_out_of_the_directory(shards, tmp):
    shutil.move(shards / LAYER, tmp / "elsewhere.safetensors")
    (shards / LAYER).symlink_to(tmp / "elsewhere.safetensors")
    return LAYER, "resolves outside the directory"


def symlink_loop(shards, tmp):
    (shards / LAYER).unlink()
    (shards / "layers" / "loop_a").symlink_to("loop_b")
    (shards / "layers" / "loop_b").symlink_to("loop_a")
    (shards / LAYER).symlink_to("loop_a")
    return LAYER, "symlink loop"


def self_symlink(shards, tmp):
    (shards / LAYER).unlink()
    (shards / LAYER).symlink_to("00001.safetensors")
    return LAYER, "symlink loop"


def manifest_not_json(shards, tmp):
    (shards / "manifest.json").write_bytes(b"\x00\xffnot json")
    return "manifest.json", "not readable JSON"


def manifest_huge_layer_count(shards, tmp):
    m = manifest(shards)
    m["num_layers"] = 10**12
    write_manifest(shards, m)
    return "manifest.json", "malformed"


def manifest_bad_dtype_name(shards, tmp):
    m = manifest(shards)
    unit_json(m, LAYER)["tensors"]["model.layers.1.mlp.up_proj.weight"]["dtype"] = "nn"
    write_manifest(shards, m)
    return "manifest.json", "malformed"


def manifest_same_file_twice(shards, tmp):
    m = manifest(shards)
    unit_json(m, LAYER)["file"] = "layers/00000.safetensors"
    write_manifest(shards, m)
    return "manifest.json", "same file"


SHARD_CASES = [
    truncated_file,
    truncated_header,
    too_short,
    garbage_header,
    header_not_json,
    offsets_outside_file,
    infinite_dimension,
    dimension_as_text,
    fractional_offset,
    metadata_not_text,
    overlapping_tensors,
    negative_dimension,
    wrong_shape,
    wrong_dtype,
    missing_tensor,
    consistent_but_wrong_shape_for_the_model,
    consistent_but_integer_dtype,
    manifest_tensor_record_edited,
    shard_from_another_model,
    shard_and_its_record_from_another_split,
    manifest_split_digest_edited,
    manifest_split_digest_of_another_type,
    layer_swapped_within_the_model,
    missing_file,
    manifest_path_outside,
    manifest_absolute_path,
    symlink_out_of_the_directory,
    symlink_loop,
    self_symlink,
    manifest_not_json,
    manifest_huge_layer_count,
    manifest_bad_dtype_name,
    manifest_same_file_twice,
]


@pytest.fixture
def shard_copy(checkpoints, tmp_path):
    ckpt, shards = checkpoints("llama")
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy, symlinks=True)
    return ckpt, copy


@pytest.mark.parametrize("case", SHARD_CASES, ids=lambda f: f.__name__)
def test_hostile_shard_directory(shard_copy, tmp_path, case):
    ckpt, shards = shard_copy
    LEDGER["tried"] += 1
    culprit, message = case(shards, tmp_path)
    before = snapshot(shards, tmp_path)
    if culprit is not None:
        with pytest.raises(ShardDirError, match=message) as info:
            ShardDirectory(shards)
        assert str(shards / culprit) in str(info.value), "the error must name the file"
        try:  # what `hf-layerstream verify` reports (a path that cannot be resolved is refused already at open)
            problems = ShardDirectory(shards, check_files=False).verify()
        except ShardDirError as e:
            problems = [str(e)]
        assert problems and any(str(shards / culprit) in p for p in problems)
    with pytest.raises(ShardDirError, match=message):
        streamed_model(ckpt, shards)
    assert snapshot(shards, tmp_path) == before, "a rejected load changed files"
    LEDGER["rejected"] += 1


def test_empty_directory(checkpoints, tmp_path):
    ckpt, _ = checkpoints("llama")
    LEDGER["tried"] += 1
    empty = tmp_path / "empty"
    empty.mkdir()
    for attempt in (lambda: ShardDirectory(empty), lambda: streamed_model(ckpt, empty)):
        with pytest.raises(ShardDirError, match=f"{empty} has no manifest.json.*split_checkpoint"):
            attempt()
    assert list(empty.iterdir()) == []
    LEDGER["rejected"] += 1


def test_shard_dir_is_a_symlink_loop(checkpoints, tmp_path):
    ckpt, _ = checkpoints("llama")
    LEDGER["tried"] += 1
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(ShardDirError, match="symlink loop"):
        ShardDirectory(loop)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ShardDirectory(tmp_path / "nothing")
    LEDGER["rejected"] += 1


def test_a_damaged_header_entry_is_named_without_its_whole_content(shard_copy):
    """A byte of `__metadata__` changed makes the metadata a tensor's entry: the error quoted that entry whole (the
    split's record of every tensor of the layer: kilobytes for a real model's). It says what the entry lacks, its
    values cut short."""
    _, shards = shard_copy
    LEDGER["tried"] += 1
    data = bytearray((shards / LAYER).read_bytes())
    data[data.index(b"__metadata__") + 10] = ord("X")
    replace_file(shards, LAYER, bytes(data))
    with pytest.raises(ShardDirError) as info:
        ShardDirectory(shards)
    message = str(info.value)
    assert (
        f"{shards / LAYER} has a malformed header entry for tensor '__metadataX_': it has no `dtype`, `shape`, "
        "`data_offsets` (its keys: ['format', 'hf_layerstream.load_dtype', 'hf_layerstream.split', 'hf_layerstream.... "
        "(97 characters))"
    ) in message
    assert "input_layernorm" not in message and len(message) < 500, message
    LEDGER["rejected"] += 1


# --- hostile sources -----------------------------------------------------------------------------------------------


class _RunsCode:
    """A pickle payload: unpickling it would create a marker file (it runs code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def malicious_pickle_bin(ckpt: Path, tmp: Path):
    marker = tmp / "pwned"
    for p in ckpt.glob("model*.safetensors*"):
        p.unlink()
    state = _models.build_tiny_model("llama").state_dict()
    state["model.embed_tokens.weight"] = _RunsCode(marker)
    torch.save(state, ckpt / "pytorch_model.bin")
    return "pytorch_model.bin", "weights_only=True", marker


def bin_without_a_state_dict(ckpt: Path, tmp: Path):
    """A `.bin` file holding no state dict: it said to re-create the shard directory (or verify it), for a file of
    the source; the fix is the source's."""
    for p in ckpt.glob("model*.safetensors*"):
        p.unlink()
    torch.save([torch.zeros(2)], ckpt / "pytorch_model.bin")
    return "pytorch_model.bin", r"does not hold a state dict\. It is a file of the source checkpoint: re-download", None


def truncated_source_shard(ckpt: Path, tmp: Path):
    path = sorted(ckpt.glob("model-*.safetensors"))[2]
    path.write_bytes(path.read_bytes()[:30])
    return path.name, "header|too short", None


def source_offsets_outside(ckpt: Path, tmp: Path):
    path = sorted(ckpt.glob("model-*.safetensors"))[1]
    path.write_bytes(rewrite_header(path.read_bytes(), _point_past_the_end))
    return path.name, "data region", None


def source_dimension_not_an_integer(ckpt: Path, tmp: Path):
    """A dimension written `64.0`: the safetensors library refuses the file, and so does the split (`int()` took
    it, and the shard files would have been made from a file `from_pretrained` cannot load)."""
    path = sorted(ckpt.glob("model-*.safetensors"))[1]
    edit = _first_tensor_edit("shape", lambda shape: [float(shape[0])] + shape[1:])
    path.write_bytes(rewrite_header(path.read_bytes(), edit, grow=True))
    return path.name, "malformed header entry", None


def source_index_escapes(ckpt: Path, tmp: Path):
    index = ckpt / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = next(iter(data["weight_map"]))
    data["weight_map"][key] = "../../etc/passwd"
    index.write_text(json.dumps(data))
    return "model.safetensors.index.json", "not a .safetensors/.bin file in the index's folder", None


def source_without_config(ckpt: Path, tmp: Path):
    (ckpt / "config.json").unlink()
    return None, "has no config.json", None


SOURCE_CASES = [
    malicious_pickle_bin,
    bin_without_a_state_dict,
    truncated_source_shard,
    source_offsets_outside,
    source_dimension_not_an_integer,
    source_index_escapes,
    source_without_config,
]


@pytest.mark.parametrize("case", SOURCE_CASES, ids=lambda f: f.__name__)
def test_hostile_source_checkpoint(tmp_path, case):
    LEDGER["tried"] += 1
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    culprit, message, marker = case(ckpt, tmp_path)
    before = snapshot(ckpt)
    shards = tmp_path / "shards"
    with pytest.raises((ShardFileError, FileNotFoundError), match=message) as info:
        split_checkpoint(ckpt, shards, progress=False)
    if culprit is not None:
        assert culprit in str(info.value), "the error must name the file"
    assert snapshot(ckpt) == before, "the source was modified"
    assert marker is None or not marker.exists(), "the pickle ran code"
    assert not (shards / "manifest.json").exists() and not list(shards.rglob("*.safetensors"))
    LEDGER["rejected"] += 1


@pytest.mark.parametrize("form", ["safetensors", "bin"])
def test_a_checkpoint_of_other_shapes_than_its_config_is_refused_before_writing(tmp_path, form):
    """A checkpoint whose config.json says other sizes than its weights have (`intermediate_size` doubled, the
    weights as saved): `from_pretrained` refuses it (size mismatch). The split wrote it and `verify` passed it, and a
    model streaming it was refused only then, advised to split the checkpoint again, which did the same. Now the
    split refuses it before anything is written, naming tensors with their shapes and the model's, from the
    safetensors headers or the `.bin` file's pickle, mapped (no tensor data read)."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    if form == "bin":
        state = _models.build_tiny_model("llama").state_dict()
        for p in ckpt.glob("model*.safetensors*"):
            p.unlink()
        torch.save(state, ckpt / "pytorch_model.bin")
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] *= 2
    (ckpt / "config.json").write_text(json.dumps(config))
    before = snapshot(ckpt)
    shards = tmp_path / "shards"
    big = config["intermediate_size"]
    message = (
        rf"stores 9 tensors in another shape than LlamaForCausalLM built from its config.json has \(e.g. "
        rf"'model.layers.0.mlp.down_proj.weight' with shape \[64, {big // 2}\], the model's \[64, {big}\]; "
        rf"'model.layers.0.mlp.gate_proj.weight' with shape \[{big // 2}, 64\], the model's \[{big}, 64\]; .*\); "
        r"it does not match its config.json"
    )
    with pytest.raises(ShardDirError, match=message):
        split_checkpoint(ckpt, shards, progress=False)
    assert not shards.exists(), "nothing is written, not even the lock"
    assert snapshot(ckpt) == before


def _write_unaligned(path: Path, tensors: dict[str, torch.Tensor], extra: dict[str, tuple[str, list, bytes]]) -> None:
    """A safetensors file as the format allows and early or third-party writers made them: `extra` raw entries
    (`name: (dtype tag, shape, bytes)`) first, then the tensors in name order, none aligned to its element size."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    tags = {torch.float32: "F32", torch.int64: "I64"}
    items = [(k, tag, shape, data) for k, (tag, shape, data) in extra.items()]
    items += [
        (k, tags[t.dtype], list(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
        for k, t in sorted(tensors.items())
    ]
    for name, tag, shape, data in items:
        header[name] = {"dtype": tag, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


# entries of dtypes the safetensors library reads (sizes of 1, 2 and 8 bytes put what follows off alignment)
_LIBRARY_DTYPES = {
    "aaa.c64": ("C64", [1], b"\0" * 8),
    "aab.fnuz": ("F8_E4M3FNUZ", [1], b"\0"),
    "aac.fnuz": ("F8_E5M2FNUZ", [2], b"\0\0"),
    "aad.e8m0": ("F8_E8M0", [1], b"\x7f"),
    "aae.f4": ("F4", [2], b"\0"),
}


def test_a_source_the_safetensors_library_reads_is_split(tmp_path):
    """The safetensors format does not require a tensor to start at a multiple of its element size, and the library
    reads dtypes our own files never hold (complex64, the FNUZ fp8 kinds, F8_E8M0, F4): `from_pretrained` loads such
    a checkpoint. The split refused it (`misaligned offset`, `malformed header entry`), calling the source file a
    damaged shard to re-create. Now it is split, and streams bit for bit what `from_pretrained` loads."""
    from safetensors.torch import load_file

    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt", max_shard_size="1GB")
    path = ckpt / "model.safetensors"
    _write_unaligned(path, load_file(path), _LIBRARY_DTYPES)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert json.loads(path.read_bytes()[8 : 8 + n])["model.norm.weight"]["data_offsets"][0] % 4  # (off alignment)
    ref = _models.load_reference(ckpt)
    shards = split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    model = streamed_model(ckpt, shards, max_memory={"cpu": 0})
    ids = torch.tensor([[1, 5, 17, 33, 9, 44, 12]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_our_own_files_keep_the_strict_checks(checkpoints, tmp_path):
    """A shard file laid out so (a byte first, every tensor off its alignment after it) is still refused: shard
    files are memory-mapped and their tensors used in place."""
    from safetensors.torch import load_file

    _, shards = checkpoints("llama")
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    path = tmp_path / "unaligned.safetensors"
    _write_unaligned(path, load_file(copy / LAYER), {"aaa": ("U8", [1], b"\0")})
    replace_file(copy, LAYER, path.read_bytes())
    with pytest.raises(ShardFileError, match="misaligned offset") as info:
        ShardDirectory(copy)
    assert LAYER in str(info.value) and "Re-create the shard directory" in str(info.value)


def test_a_quantized_tensors_record_of_another_shape_than_the_tensor_is_named(checkpoints, tmp_path):
    """A quantized tensor's record (in its file and in the manifest, which agree, its digests recorded) whose own
    shape is not the tensor's: streaming decodes the weight by the record's, and the first pass failed in the model's
    matmul naming nothing (`mat1 and mat2 shapes cannot be multiplied (3x128 and 64x128)`). Opening the directory, and
    so enabling streaming, names the tensor and both shapes."""
    ckpt, shards = checkpoints("llama", compression="4bit")
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    name = "model.layers.1.mlp.down_proj.weight"
    meta = read_header(copy / LAYER).metadata
    own = json.loads(meta[TENSORS_KEY])
    assert own[name]["shape"] == own[name]["quant"]["shape"] == [64, 128]
    own[name]["quant"]["shape"] = [128, 64]
    meta[TENSORS_KEY] = json.dumps(own, sort_keys=True)
    replace_file(copy, LAYER, resave(copy / LAYER, lambda t: None, meta))
    m = manifest(copy)
    unit_json(m, LAYER)["tensors"] = own
    write_manifest(copy, m)
    message = (
        rf"malformed \(ValueError: tensor '{name}' has a `quant` record of shape \[128, 64\], not its own \[64, 128\]"
    )
    with pytest.raises(ShardFileError, match=message):
        ShardDirectory(copy)
    with pytest.raises(ShardFileError, match=message):
        streamed_model(ckpt, copy, max_memory={"cpu": 0})(torch.tensor([[1, 5, 7]]))


def test_a_broken_source_file_is_named_as_the_sources(tmp_path):
    """A damaged source file is reported as the source's, with what to do about it (not as a damaged shard directory
    to re-create)."""
    ckpt = _models.save_tiny_checkpoint("llama", tmp_path / "ckpt")
    path = sorted(ckpt.glob("model-*.safetensors"))[1]
    path.write_bytes(rewrite_header(path.read_bytes(), _point_past_the_end))
    with pytest.raises(ShardFileError, match="data region") as info:
        split_checkpoint(ckpt, tmp_path / "shards", progress=False)
    message = str(info.value)
    assert path.name in message and "source checkpoint" in message and "Re-create the shard directory" not in message


def test_empty_source_directory(tmp_path):
    LEDGER["tried"] += 1
    (tmp_path / "src").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        split_checkpoint(tmp_path / "src", tmp_path / "shards", progress=False)
    assert list((tmp_path / "src").iterdir()) == []
    LEDGER["rejected"] += 1


def test_a_source_inside_the_shard_dir_or_holding_it_is_refused_untouched(tmp_path):
    """The only overlap refused was `shard_dir == source`: `split_checkpoint(d / "layers", d, overwrite=True)` deleted
    the source's weight files (as a replaced split's layer files) before reading them, and a `shard_dir` inside the
    source wrote into the source's folder. Both are refused before anything is touched."""
    LEDGER["tried"] += 1
    outer = tmp_path / "d"
    ckpt = _models.save_tiny_checkpoint("llama", outer / "layers")
    assert list(ckpt.glob("*.safetensors"))
    before = snapshot(tmp_path)
    for src, dest in ((ckpt, outer), (ckpt, ckpt / "shards"), (ckpt, ckpt / "a" / "b")):
        with pytest.raises(ValueError, match="neither may be inside the other"):
            split_checkpoint(src, dest, overwrite=True, progress=False)
        assert snapshot(tmp_path) == before, "the source was modified"
    LEDGER["rejected"] += 1


def test_layers_as_a_symlink_is_refused_before_writing(checkpoints, tmp_path):
    """`shard_dir/layers` a symlink to another disk: the split wrote through it and said it succeeded, then every
    layer was refused as resolving outside the directory, and re-running the split "repaired" it into the same state.
    It is refused at the start, saying what to do instead."""
    ckpt, _ = checkpoints("llama")
    LEDGER["tried"] += 1
    shards, elsewhere = tmp_path / "shards", tmp_path / "fast_disk"
    shards.mkdir()
    elsewhere.mkdir()
    (shards / "layers").symlink_to(elsewhere)
    before = snapshot(tmp_path)
    for overwrite in (True, False):
        with pytest.raises(ShardDirError, match="holds `layers` as a symlink") as info:
            split_checkpoint(ckpt, shards, overwrite=overwrite, progress=False)
        assert str(elsewhere) in str(info.value)
    assert snapshot(tmp_path) == before and not list(elsewhere.iterdir())
    LEDGER["rejected"] += 1


def test_shard_dir_paths_a_user_types(checkpoints, tmp_path, monkeypatch):
    """`~` was expanded in `source` but not in `shard_dir` (a folder named `~` appeared in the working directory),
    and a `shard_dir` that is a dangling symlink failed, after all the planning, with a bare FileExistsError."""
    ckpt, _ = checkpoints("llama")
    LEDGER["tried"] += 1
    link = tmp_path / "link.layers"
    link.symlink_to(tmp_path / "not_there_yet")
    with pytest.raises(ShardDirError, match="is a dangling symlink") as info:
        split_checkpoint(ckpt, link, progress=False)
    assert str(tmp_path / "not_there_yet") in str(info.value) and not (tmp_path / "not_there_yet").exists()
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert split_checkpoint(ckpt, "~/x.layers", progress=False) == home / "x.layers"
    ShardDirectory(home / "x.layers")
    assert list(cwd.iterdir()) == []
    LEDGER["rejected"] += 1


def test_a_shard_dir_that_cannot_be_made_is_refused_naming_it(checkpoints, tmp_path):
    """A `shard_dir` under a file (`model.safetensors/x.layers`), or where no folder can be made (`/proc/x`), failed
    with mkdir's bare "[Errno 20] Not a directory: '...'" ("[Errno 2] No such file or directory: '/proc/x'" for
    `/proc/x/y`), naming neither the argument nor a fix, once the source was planned (a hub one's files fetched).
    Refused naming `shard_dir`, what is wrong and the fix; the one under a file with the other checks of `shard_dir`,
    before that."""
    ckpt, _ = checkpoints("llama")
    LEDGER["tried"] += 1
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(ShardDirError) as info:
        split_checkpoint(ckpt, a_file / "sub" / "x.layers", progress=False)
    assert str(info.value) == (
        f"`shard_dir` {a_file / 'sub' / 'x.layers'} cannot be made: {a_file} is a file, not a folder; pass another "
        "`shard_dir`."
    )
    if os.path.isdir("/proc") and not os.path.exists("/proc/hf_layerstream_test"):
        with pytest.raises(ShardDirError) as info:
            split_checkpoint(ckpt, "/proc/hf_layerstream_test/x.layers", progress=False)
        assert str(info.value).startswith("`shard_dir` /proc/hf_layerstream_test/x.layers cannot be made (")
        assert str(info.value).endswith("); pass another `shard_dir`."), info.value
    LEDGER["rejected"] += 1


def test_a_checkpoint_or_a_shard_directorys_own_file_given_as_shard_dir_names_what_to_pass(checkpoints, tmp_path):
    """The checkpoint's folder given as `shard_dir` (the source, not its split), or a file or folder of a shard
    directory (its `manifest.json`, its `layers`): the error said to create a shard directory there with
    `split_checkpoint(source, shard_dir)`, which refuses each (the source's own folder; a folder holding files). It
    says to split the checkpoint into another folder, or names the shard directory to pass."""
    ckpt, shards = checkpoints("llama")
    LEDGER["tried"] += 1
    with pytest.raises(ShardDirError) as info:
        streamed_model(ckpt, ckpt)
    assert str(info.value).endswith(
        f"it holds a checkpoint (config.json and weights): split it into another folder first (`split_checkpoint("
        f"{str(ckpt)!r}, DIR)`, `hf-layerstream split {ckpt} DIR`) and stream DIR."
    ), info.value
    for inner in (shards / "manifest.json", shards / "layers", shards / LAYER):
        with pytest.raises(ShardDirError) as info:
            ShardDirectory(inner)
        assert str(info.value).endswith(f"it is inside the shard directory {shards}: pass that folder."), info.value
    LEDGER["rejected"] += 1


def test_a_shard_directory_without_its_manifest_names_the_fix_the_split_takes(checkpoints, tmp_path):
    """A shard directory copied without its manifest (written last by the split, so missing from a copy cut short):
    the error said to create a shard directory there with `split_checkpoint(source, shard_dir)`, which refuses a folder
    holding files without `overwrite=True`. It says what the folder holds, and to copy it again or split again there
    with `overwrite=True`, which the split then takes."""
    ckpt, shards = checkpoints("llama")
    LEDGER["tried"] += 1
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy, ignore=shutil.ignore_patterns("manifest.json"))
    fix = "which a split writes last (a copy cut short, or the manifest deleted): copy the shard directory again whole"
    with pytest.raises(
        ShardDirError,
        match=re.escape(
            f"{copy} has no manifest.json, so it is not a shard directory; "
            f"it holds a shard directory's files but no manifest.json, {fix}"
        ),
    ):
        streamed_model(ckpt, copy)
    with pytest.raises(ShardDirError, match="pass `overwrite=True`"):
        split_checkpoint(ckpt, copy, progress=False)
    split_checkpoint(ckpt, copy, progress=False, overwrite=True)
    assert ShardDirectory(copy, checksums=True).verify() == []
    LEDGER["rejected"] += 1


def test_summary():
    print("\nhostile-inputs summary: rejected cleanly {rejected} / tried {tried}".format(**LEDGER))
    assert LEDGER["rejected"] == LEDGER["tried"]


@pytest.mark.parametrize("fix", [None, "Do not modify a shard directory while a model streams from it."])
def test_a_file_error_keeps_its_message_when_pickled_or_copied(fix):
    """A `ShardFileError` raised in a worker process reaches the parent pickled, and `copy.copy` goes the same way:
    the message, the fix it names included, stays the one raised. (The fix was dropped: a file changed under a running
    model then told the user to re-create the shard directory.)"""
    import copy
    import pickle

    error = ShardFileError("/shards/layers/00003.safetensors", "changed on disk since it was opened", fix)
    for again in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert type(again) is ShardFileError and str(again) == str(error)
        assert (again.path, again.problem) == (error.path, error.problem)
