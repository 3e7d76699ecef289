"""The shard directory: one safetensors file per decoder layer plus one for the resident parts, and a manifest.

```
llama.layers/
  manifest.json            # what makes the directory valid (written last, atomically)
  config.json              # the model config, so `AutoConfig.from_pretrained(shard_dir)` works
  tokenizer*.json, generation_config.json ...   # copied from the source when present
  resident.safetensors     # embeddings, final norm, lm_head, ...
  layers/00000.safetensors # decoder layer 0, tensors under the model's own names
  ...
```

Quantized tensors are stored as `"<name>::<part>"` entries and described in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._safetensors import Header, read_header, sample_digest, sha256_file, str_to_dtype
from .errors import NOT_DAMAGE, ShardDirError, ShardFileError, unreadable
from .modeling import RESIDENT, check_flag, check_path, layer_unit

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MODEL_CARD_NAME = "README.md"
# a checkpoint's license and notice files, copied into the split (it is the model's weights, to be shared so): no code
_LICENSE_FILE = re.compile(r"(?i)(licen[cs]e|notice|use_policy|copying)([-_.][\w.-]*)?(?<!\.py)")
FORMAT_NAME = "hf_layerstream.shards"
FORMAT_VERSION = 1


def _is_newer_format(version) -> bool:
    """Whether a manifest's `format_version` is one a newer hf_layerstream wrote (an int above `FORMAT_VERSION`)."""
    return isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION


def layer_file(index: int) -> str:
    return f"layers/{index:05d}.safetensors"


RESIDENT_FILE = "resident.safetensors"


LOCK_NAME = ".lock"  # what a split holds while it writes (see `split._locked`)
# a unit file's metadata key holding its tensors' records, as the manifest lists them (`TensorEntry.to_json`)
TENSORS_KEY = "hf_layerstream.tensors"
# a unit file's metadata key holding the digest of its split's options (model, source, dtype, compression, adapters),
# which the manifest records as `split_options`: what tells a unit of another split of the same architecture
SPLIT_KEY = "hf_layerstream.split"
# a unit file's metadata key holding the dtype the split records for loading (the manifest's `load_dtype`): what tells
# an edit of it where config.json names no dtype to compare with
LOAD_DTYPE_KEY = "hf_layerstream.load_dtype"


def _split_running(path: Path) -> bool:
    """Whether a split holds the lock of the folder `path` now: asked without waiting (a shared lock, let go at once)."""
    try:
        import fcntl

        fd = os.open(path / LOCK_NAME, os.O_RDONLY)
    except (ImportError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


@dataclass
class TensorEntry:
    shape: tuple[int, ...]
    dtype: torch.dtype  # logical dtype (after dequantization)
    quant: dict[str, Any] | None = None  # codec metadata when stored quantized

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def stored_nbytes(self) -> int | None:
        """Bytes of its stored parts when quantized (`None` for a tensor stored as it is)."""
        if self.quant is None:
            return None
        total = 0
        for spec in self.quant.get("parts", {}).values():
            n = 1
            for s in spec["shape"]:
                n *= s
            total += n * str_to_dtype(spec["dtype"]).itemsize
        return total

    def to_json(self) -> dict:
        d: dict[str, Any] = {"shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch.")}
        if self.quant is not None:
            # (its keys sorted, at any depth: as a unit file's metadata holds them, from which a resumed split adopts
            # a unit written before a kill; its manifest then ends byte-identical to an uninterrupted split's)
            d["quant"] = json.loads(json.dumps(self.quant, sort_keys=True))
        return d

    @classmethod
    def from_json(cls, d: dict, name: str = "a tensor") -> TensorEntry:
        if not isinstance(d, dict) or not _is_shape(d.get("shape")):
            # (a number read on to an AttributeError at open, and in the split's repair, naming no file; a shape `"64"`
            # was read as [6, 4], and `[64.5]` as [64])
            raise TypeError(
                f"tensor {name!r} has a record {json.dumps(d)[:120]} that is not an object of its `shape` (a list of "
                "ints) and `dtype`"
            )
        quant = d.get("quant")
        if quant is not None and not _is_quant_record(quant):
            # (streaming read it on: an AttributeError at open, not a manifest named as damaged)
            raise TypeError(
                f"tensor {name!r} has a `quant` record {json.dumps(quant)[:120]} that is not an object whose `parts` "
                "map each part to its `shape` (a list of ints) and `dtype`"
            )
        if quant is not None and quant.get("shape", d["shape"]) != d["shape"]:
            # (a weight is decoded to its record's shape: it failed in the model's matmul at the first pass, naming
            # nothing, where the checks compare the tensor's own with the model's)
            raise ValueError(
                f"tensor {name!r} has a `quant` record of shape {json.dumps(quant['shape'])[:120]}, not its own "
                f"{d['shape']}"
            )
        return cls(tuple(int(s) for s in d["shape"]), str_to_dtype(d["dtype"]), quant)


def _is_shape(shape) -> bool:
    """Whether `shape` has the form of a tensor's shape in the manifest: a list of ints, as the split writes it."""
    return isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in shape)


def _is_quant_record(quant) -> bool:
    """Whether `quant` has the form of a quantized tensor's record (`TensorEntry.quant`): an object whose `parts`, if
    any, map each stored part's name to its `shape` (a list of ints) and a dtype's name."""
    parts = quant.get("parts", {}) if isinstance(quant, dict) else None
    if not isinstance(parts, dict):
        return False
    for spec in parts.values():
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("shape"), list)
            or not isinstance(spec.get("dtype"), str)
        ):
            return False
        if not _is_shape(spec["shape"]):
            return False
        try:
            str_to_dtype(spec["dtype"])
        except ValueError:
            return False
    return True


@dataclass
class UnitEntry:
    name: str  # "resident" or "layers.<i>"
    file: str  # relative path inside the shard dir
    size: int
    sha256: str
    tensors: dict[str, TensorEntry]
    sample_sha256: str | None = None  # `sample_digest` of the file: checked at every load (absent in old manifests)

    @property
    def logical_nbytes(self) -> int:
        """Bytes once dequantized, at the stored logical dtype."""
        return self.nbytes_as()

    def nbytes_as(
        self, dtypes: dict[str, torch.dtype] | torch.dtype | None = None, packed: Collection[str] = ()
    ) -> int:
        """Bytes once dequantized, at `dtypes` (one dtype, or per tensor name; default: the stored dtype); the
        quantized tensors named in `packed` at their stored (packed) size."""
        total = 0
        for name, t in self.tensors.items():
            if t.quant is not None and name in packed:
                total += t.stored_nbytes
                continue
            dtype = dtypes.get(name, t.dtype) if isinstance(dtypes, dict) else (dtypes or t.dtype)
            total += t.numel * dtype.itemsize
        return total

    def to_json(self) -> dict:
        d = {
            "name": self.name,
            "file": self.file,
            "size": self.size,
            "sha256": self.sha256,
        }
        if self.sample_sha256 is not None:
            d["sample_sha256"] = self.sample_sha256
        d["tensors"] = {k: v.to_json() for k, v in self.tensors.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> UnitEntry:
        if not isinstance(d, dict):
            raise TypeError(f"a unit entry must be an object, got {type(d).__name__}")
        name, file, size, sha = d["name"], d["file"], d["size"], d["sha256"]
        sample = d.get("sample_sha256")
        if not isinstance(name, str) or not isinstance(file, str):
            raise TypeError(f"unit `name` and `file` must be strings, got {name!r} and {file!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"unit {name!r} has an invalid size {size!r}")
        for digest in (sha, sample):
            if digest is not None and not _is_sha256(digest):
                raise ValueError(f"unit {name!r} has an invalid SHA-256 {digest!r}")
        tensors = d["tensors"]
        if not isinstance(tensors, dict):
            raise TypeError(f"unit {name!r} has `tensors` that is not an object")
        entries = {str(k): TensorEntry.from_json(v, str(k)) for k, v in tensors.items()}
        return cls(name, file, size, sha, entries, sample)


def _floating_dtype_name(value) -> bool:
    """Whether `value` is the name of a floating-point torch dtype, as a config's `dtype` is written (`"bfloat16"`)."""
    try:
        return isinstance(value, str) and str_to_dtype(value).is_floating_point
    except ValueError:
        return False


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


@dataclass
class Manifest:
    source: dict[str, Any]
    model_type: str | None
    architectures: list[str]
    layers_prefix: str
    num_layers: int
    fingerprint: str
    dtype: str
    compression: dict[str, Any] | None
    units: dict[str, UnitEntry] = field(default_factory=dict)
    library_version: str = ""
    split_options: str | None = None  # digest of what the files depend on (model, source, dtype, compression)
    conversion: dict | None = None  # transformers' release and converters at split time (`conversion_record`)
    # the dtype `from_pretrained(dtype="auto")` loads the source's floating weights at (the split's `dtype` where
    # given): what they are streamed at by default. `None`: split before it was recorded (streamed as stored)
    load_dtype: str | None = None
    # the PEFT adapter merged into the weights at split time (`merge.adapter_identity`); a list: several, merged in turn
    adapter: dict | list[dict] | None = None
    # the files the split copied or wrote beside the units (tokenizer, chat templates, generation config, license
    # files, model card): a finished split run again writes those gone since again. `None`: split before they were
    # recorded
    side_files: list[str] | None = None
    # the digest of the config.json the split wrote (`config_digest`): what tells an edit of it that keeps every tensor
    # shape (`rms_norm_eps`, rope parameters), warned about at open. `None`: split before it was recorded
    config_sha256: str | None = None

    def __repr__(self) -> str:
        # (the default named every unit and tensor: a screenful per layer)
        return (
            f"Manifest(model_type={self.model_type!r}, num_layers={self.num_layers}, dtype={self.dtype!r}, "
            f"compression={self.compression!r})"
        )

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": self.library_version,
            "source": self.source,
            "model_type": self.model_type,
            "architectures": self.architectures,
            "layers_prefix": self.layers_prefix,
            "num_layers": self.num_layers,
            "fingerprint": self.fingerprint,
            "dtype": self.dtype,
            "compression": self.compression,
            "units": [u.to_json() for u in self.units.values()],
            **({"split_options": self.split_options} if self.split_options is not None else {}),
            **({"conversion": self.conversion} if self.conversion is not None else {}),
            **({"load_dtype": self.load_dtype} if self.load_dtype is not None else {}),
            **({"adapter": self.adapter} if self.adapter is not None else {}),
            # (before `side_files`, which a re-run of a split made before the list was kept adds last: as written)
            **({"config_sha256": self.config_sha256} if self.config_sha256 is not None else {}),
            **({"side_files": self.side_files} if self.side_files is not None else {}),
        }

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        if not isinstance(d["units"], list):
            raise TypeError("`units` must be a list")
        num_layers = d["num_layers"]
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers <= 0:
            raise ValueError(f"`num_layers` {num_layers!r} is not a positive int")
        if num_layers >= len(d["units"]):  # (units past it are named by `ShardDirectory`: "lists the wrong units")
            raise ValueError(
                f"`num_layers` {num_layers} needs {num_layers + 1} units (the resident one and one per layer), and "
                f"{len(d['units'])} are listed"
            )
        units = [UnitEntry.from_json(u) for u in d["units"]]
        if len({u.name for u in units}) != len(units):
            raise ValueError("a unit is listed twice")
        architectures = d.get("architectures") or []
        if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
            # (a string was read as its letters: a model of another class told to be built as 'L')
            raise TypeError(f"`architectures` {json.dumps(architectures)[:120]} is not a list of class names")
        load_dtype = d.get("load_dtype")
        if load_dtype is not None and not (isinstance(load_dtype, str) and str_to_dtype(load_dtype).is_floating_point):
            raise ValueError(f"`load_dtype` {load_dtype!r} is not a floating-point dtype")
        split_options = d.get("split_options")
        if split_options is not None and not isinstance(split_options, str):
            # (read as none recorded, a split made before it was: the check naming a unit file of another split, copied
            # in with its manifest entry, was off)
            raise TypeError(
                f"`split_options` {json.dumps(split_options)[:120]} is not a string (the digest of the split's options, "
                "which every unit file carries too)"
            )
        return cls(
            # (what `inspect` shows: one of another form, which `inspect` failed on, is no record, as before one was kept)
            source=d["source"] if isinstance(d.get("source"), dict) else {},
            model_type=d.get("model_type"),
            architectures=architectures,
            layers_prefix=d["layers_prefix"],
            num_layers=int(d["num_layers"]),
            fingerprint=d["fingerprint"],
            dtype=d["dtype"],
            compression=d.get("compression"),
            units={u.name: u for u in units},
            library_version=d.get("library_version", ""),
            split_options=split_options,
            conversion=read_conversion_record(d.get("conversion")),
            load_dtype=load_dtype,
            adapter=read_adapter_record(d.get("adapter")),
            side_files=read_side_files(d.get("side_files")),
            # (one of another form: no record, as before one was kept; the config is the user's to edit anyway)
            config_sha256=d["config_sha256"] if _is_sha256(d.get("config_sha256")) else None,
        )


def read_side_files(value) -> list[str] | None:
    """A manifest's side-file record as read: the names that are a file of the directory or of its chat templates'
    folder (no path out of it), else `None` (not recorded, or damaged)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return [v for v in value if _side_file_name(v)]


# what a config.json's digest leaves out: the kernels chosen (`split._shard_config_json` keeps the source's; the user's
# to set) and the release that wrote it (a `save_pretrained` of the config by another release): none changes the model
_UNDIGESTED_CONFIG_KEYS = ("attn_implementation", "experts_implementation", "transformers_version")


# (shard directory, digest of its config.json) of the edits warned about (`ShardDirectory._warn_if_config_edited`)
_CONFIG_EDITS_WARNED: set[tuple[Path, str]] = set()


def config_digest(config: dict) -> str:
    """The SHA-256 of a config.json's values (`config`, as read), as the manifest records them (`config_sha256`): of
    its JSON with sorted keys, so its form (indentation, key order) does not count, nor `_UNDIGESTED_CONFIG_KEYS` at
    any depth (a sub-config's too)."""

    def counted(value):
        if isinstance(value, dict):
            return {k: counted(v) for k, v in value.items() if k not in _UNDIGESTED_CONFIG_KEYS}
        if isinstance(value, list):
            return [counted(v) for v in value]
        return value

    text = json.dumps(counted(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def read_json_as_transformers(path: Path):
    """The JSON file at `path` read as transformers reads its configs and tokenizer files: UTF-8 text. JSON read from
    bytes takes a byte-order mark and UTF-16 or UTF-32 too, which transformers refuses ("Unexpected UTF-8 BOM", "not a
    valid JSON file"): an editor's UTF-8 with BOM passed the checks, and the model or tokenizer did not load. Raises
    `ValueError` (`UnicodeDecodeError`, `json.JSONDecodeError`) for what it cannot read, `OSError` as reading does."""
    return json.loads(path.read_text(encoding="utf-8"))


def side_file_damage(path: Path) -> str | None:
    """What makes the side file at `path` unusable where it is there, if anything: for a JSON one (tokenizer,
    generation and processor configs, chat templates), content that is not readable JSON (cut short or corrupted: the
    reader's own error named no file, and `verify` passed it as there), and for one its reader takes as an object
    (`_JSON_OBJECT_FILES`), JSON of another kind (`[]`, `3`: it passed `verify`, and enabling streaming warned only
    "'list' object is not a mapping", the model generating with its config's settings). `None` where it is sound,
    missing (`ShardDirectory.missing_side_files`) or no file. Raises `OSError` where it cannot be read."""
    if path.suffix == ".json" and path.is_file():
        try:
            content = read_json_as_transformers(path)
        except ValueError as e:  # (UnicodeDecodeError too)
            return f"is not readable JSON ({e})"
        if not isinstance(content, dict) and _json_object_file(path.name):
            return f"is not a JSON object (it holds {json.dumps(content)[:60]}, where its reader takes an object)"
    return None


# the JSON side files whose readers (transformers' `GenerationConfig`, `AutoTokenizer`, `AutoProcessor`) take an object
_JSON_OBJECT_FILES = ("tokenizer.json", "special_tokens_map.json", "added_tokens.json", "chat_template.json")


def _json_object_file(name: str) -> bool:
    """Whether the JSON side file `name` is one its reader takes as an object: the configs (generation, tokenizer,
    processor) and `_JSON_OBJECT_FILES` (a tokenizer's other files, `emoji.json`, are left to it)."""
    return name.endswith("config.json") or name in _JSON_OBJECT_FILES


def _side_file_name(name: str) -> bool:
    parts = name.split("/")
    plain = all(p and p not in (".", "..") and "\\" not in p and "\x00" not in p for p in parts)
    return plain and (len(parts) == 1 or (len(parts) == 2 and parts[0] == _CHAT_TEMPLATE_DIR))


_CHAT_TEMPLATE_DIR = "additional_chat_templates"  # a tokenizer's named chat templates besides the default one


def read_conversion_record(value) -> dict | None:
    """A manifest's conversion record as read (`modeling.conversion_record`: the transformers release and the digest
    of its converters, both strings), else `None` (not recorded, or damaged)."""
    if isinstance(value, dict) and all(isinstance(value.get(k), str) for k in ("transformers", "converters")):
        return value
    return None


def read_adapter_record(value) -> dict | list[dict] | None:
    """A manifest's adapter record as read: one adapter's (an object), several in merge order (a list of two or more
    objects), else `None` (none, or a damaged record)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, list) and len(value) > 1 and all(isinstance(v, dict) for v in value):
        return value
    return None


def _inside(root: Path, rel: str, manifest_path: Path) -> Path:
    """Resolve `rel` inside `root`, refusing absolute paths, `..`, symlink loops and symlinks that leave the directory."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise ShardFileError(
            manifest_path, f"names the path {rel!r}, which is not a relative path inside the directory"
        )
    path = root / rel
    try:
        resolved = path.resolve(strict=False)
        root_resolved = root.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # symlink loop (RuntimeError before Python 3.13, OSError ELOOP after)
        raise ShardFileError(path, f"cannot be resolved: a symlink loop or an unreadable path ({e})") from e
    if os.path.islink(path) and not os.path.exists(path) and resolved.parent != _hub_blobs(root_resolved):
        # (a link of a hub cache download to a blob deleted: a file missing, which the files' checks name as it is,
        # and `verify` among the others, not as a damaged manifest)
        raise ShardFileError(path, "is a dangling symlink or a symlink loop")
    if not resolved.is_relative_to(root_resolved) and resolved.parent != _hub_blobs(root_resolved):
        # (`rel` itself stays inside: a symlink on its way leads out, the user's (`layers` moved to another disk and
        # linked back), not damage of the manifest that a new split would repair)
        raise ShardFileError(
            path,
            f"resolves outside the directory to {resolved}, through a symlink (the manifest names {rel!r})",
            "A shard directory's files must lie inside it: put the file (or the folder linked) back in place of the "
            "symlink, or make the whole shard directory the folder on the other disk (or a symlink to it).",
        )
    return path


def _hub_snapshot(root: Path) -> Path | None:
    """The snapshot in the hub cache that holds `root` (resolved), where one does: a shard directory uploaded to the
    hub and downloaded with `snapshot_download` is `<cache>/models--org--name/snapshots/<commit>` (or a folder of it),
    whose entries are symlinks huggingface_hub made to the files it keeps in the repo's `blobs`, named by their
    content's hash. `None` where no `blobs` folder is beside it (as it is named, not resolved: one that is itself a
    link leads elsewhere)."""
    for folder in (root, *root.parents):
        if folder.parent.name == "snapshots":
            blobs = folder.parent.parent / "blobs"
            return folder if blobs.is_dir() and not blobs.is_symlink() else None
    return None


def _hub_blobs(root: Path) -> Path | None:
    """The folder of the blobs of the hub cache repo whose snapshot holds `root` (resolved), else `None`: those are
    the repo's files, so a link there is not one out of the directory (see `_hub_snapshot`)."""
    snapshot = _hub_snapshot(root)
    return None if snapshot is None else snapshot.parent.parent / "blobs"


_HUB_CACHE_KINDS = ("models--", "datasets--", "spaces--")  # (how the hub cache names a repo's folder, by its type)


def hub_repo_of(path: str | os.PathLike) -> str | None:
    """The id of the hub repo whose folder in a hub cache holds `path`, made yet or not (its symlinks resolved as far
    as it exists), else `None`: `path` lies in `<cache>/models--org--name/snapshots/` or in its `blobs/` (a
    downloaded snapshot, a folder of one, or one a download would make), or it is, or lies in, such a folder holding
    `snapshots/` or `blobs/` (`refs/`, the repo's folder itself). Only an existing snapshot was seen before: a folder
    not made yet, in the snapshot of the split's own source or in a repo's folder with no snapshot yet, was written."""
    full = Path(os.path.realpath(Path(path).expanduser()))
    for folder in (full, *full.parents):
        if not folder.name.startswith(_HUB_CACHE_KINDS) or not folder.name.split("--", 1)[1]:
            continue
        below = full.relative_to(folder).parts[:1]
        if below in (("snapshots",), ("blobs",)) or (folder / "snapshots").is_dir() or (folder / "blobs").is_dir():
            return folder.name.split("--", 1)[1].replace("--", "/")
    return None


def hub_cache_of(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The hub cache folder that is `path` or holds it (its symlinks resolved as far as it exists, as `hub_repo_of`
    resolves them), else `None`: huggingface_hub's (`HF_HUB_CACHE`, or HF_HOME's `hub`), or `cache_dir`, one named
    for a hub repo's files. (`hf cache ls` takes each folder there for a repo's: one of another layout is reported as
    an inconsistency of the cache, and `hf cache rm` cannot remove it.)"""
    from huggingface_hub import constants

    full = Path(os.path.realpath(Path(path).expanduser()))
    for cache in (constants.HF_HUB_CACHE, cache_dir):
        if cache is not None and full.is_relative_to(os.path.realpath(Path(cache).expanduser())):
            return Path(cache).expanduser()
    return None


def hub_download_of(path: str | os.PathLike) -> str | None:
    """The id of the hub repo whose downloaded snapshot in the hub cache holds `path` (the snapshot exists, with the
    repo's `blobs` beside it; `path` itself may not), else `None`."""
    snapshot = _hub_snapshot(Path(os.path.realpath(Path(path).expanduser())))
    return _repo_of_snapshot(snapshot) if snapshot is not None and snapshot.is_dir() else None


def _repo_of_snapshot(snapshot: Path | None) -> str | None:
    """The id of the hub repo whose snapshot in the hub cache `snapshot` is (`None`: none)."""
    name = snapshot.parent.parent.name if snapshot is not None else ""  # (`models--org--name`)
    return name.split("--", 1)[1].replace("--", "/") if name.startswith("models--") else None


def redownload_command(path: str | os.PathLike) -> str | None:
    """The command that downloads again the hub cache's snapshot holding `path` (`hf download REPO --force-download`,
    with `--revision COMMIT` where the snapshot is not the default branch's, and `--cache-dir DIR` where its cache is
    not huggingface_hub's: the download went to that one, leaving this one as it was), else `None`."""
    from huggingface_hub import constants

    snapshot = _hub_snapshot(Path(os.path.realpath(path)))
    repo = _repo_of_snapshot(snapshot)
    if repo is None:
        return None
    try:
        main = (snapshot.parent.parent / "refs" / "main").read_text().strip()
    except OSError:
        main = None
    option = f" --revision {snapshot.name}" if snapshot.name != main else ""
    cache = snapshot.parents[2]  # (`<cache>/models--org--name/snapshots/<commit>`)
    if str(cache) != os.path.realpath(Path(constants.HF_HUB_CACHE).expanduser()):
        option += f" --cache-dir {shlex.quote(str(cache))}"
    return f"hf download {repo}{option} --force-download"


def redownload_advice(path: str | os.PathLike) -> str | None:
    """The fix for a damaged or missing file of the hub cache's snapshot holding `path` (`redownload_command`; the
    split refuses to write there), without a final stop, else `None`."""
    command = redownload_command(path)
    return None if command is None else f"It is a download in the hub cache: download it again (`{command}`)"


# a shard directory's files that are no weights (config, tokenizer, chat templates, README): downloaded whole
_NOT_WEIGHTS = ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.msgpack", "*.onnx"]


def _read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def warn_hub_only(
    local, done: str, *, revision: str | None = None, token=None, revision_name: str = "`revision`", cache_dir=None
) -> None:
    """A hub repo's `revision` (or `token`, a string, or `split_checkpoint`'s `cache_dir`, the hub cache of its
    `source` and `adapter`) given with the local folder `local`: said, once each, to be ignored; `done` says what is
    done with the folder instead ("read as it is")."""
    if revision is not None:
        logger.warning("%s %r applies to hub repos; %s is a local folder, %s.", revision_name, revision, local, done)
    if isinstance(token, str):
        logger.warning("`token` applies to hub repos; %s is a local folder, read without it.", local)
    if cache_dir is not None:
        logger.warning(
            "`cache_dir` applies to hub repos (the hub cache they are downloaded into, for `source` and `adapter`); "
            "%s is a local folder, %s.",
            local,
            done,
        )


def check_revision(revision) -> None:
    """A hub `revision` as given: a branch, tag or commit (a str), or None. Another type failed in huggingface_hub,
    naming no argument ("expected string or bytes-like object, got 'int'")."""
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"`revision` must be a branch, tag or commit (a str) or None, got {revision!r}.")


def check_token(token) -> None:
    """A hub `token` as given: a str, a bool (huggingface_hub's: `False` sends none) or None. Another type (an int, a
    dict) was passed to huggingface_hub for a hub repo, failing there naming no argument, and taken without a word
    for a local folder."""
    if token is not None and not isinstance(token, (str, bool)):
        raise TypeError(f"`token` must be a str, True, False or None, got {type(token).__name__}.")


def local_shard_dir(shard_dir, *, weights: bool = True, revision: str | None = None, token: str | bool | None = None):
    """`shard_dir` as a folder on this machine: itself, or where it is a hub repo id (`org/name`, and nothing of that
    name here), that repo's snapshot in the hub cache at `revision` (a branch, tag or commit; default: its default
    branch), fetched with `token` (default: the one huggingface_hub finds, `hf auth login` or HF_TOKEN; offline,
    from the cache), as `from_pretrained` takes them. Its manifest is fetched first: a repo that is no shard
    directory (a checkpoint) is refused before anything else is downloaded. Then its config, at the commit the
    manifest came from, and with `weights` its other files (`hub_shard_files`). Without `weights` the snapshot holds
    the manifest and config only: open it with `check_files=False`, and pass it to `hub_shard_files` once what it
    allows to check is checked. For a local folder, `revision` and `token` are ignored, with a warning.

    Raises:
        `FileNotFoundError`: The hub cannot be reached and the repo is not in the hub cache, or there is no such repo
            (or revision).
        `PermissionError`: The repo is gated, and this user cannot access it.
        [`ShardDirError`]: The repo holds no manifest; the hub unreachable, the hub cache holds its snapshot without
            one (a checkpoint's download, or another folder as downloaded), or records that the hub has none.
    """
    check_revision(revision)
    check_token(token)
    if not _hub_repo_id(shard_dir):
        warn_hub_only(shard_dir, "read as it is", revision=revision, token=token)
        return shard_dir
    from huggingface_hub.errors import LocalEntryNotFoundError

    from .split import fetch_hub_file, unreachable_reason

    at = f" at revision {revision!r}" if revision is not None else ""
    named = f"`shard_dir` {shard_dir!r} is no local folder ({Path(shard_dir).absolute()} does not exist), and the hub"
    split = f"(`split_checkpoint({shard_dir!r}, DIR)`, `hf-layerstream split {shard_dir} DIR`) and stream DIR"
    try:
        manifest = fetch_hub_file(
            shard_dir, MANIFEST_NAME, "`shard_dir`", what="shard directory", revision=revision, token=token
        )
    except FileNotFoundError as e:
        # the hub unreachable and no manifest in the hub cache: where the cache holds the repo, that is said (it was
        # said not to be in the hub cache, to be downloaded once)
        snapshot = _cached_snapshot(shard_dir, revision) if isinstance(e.__cause__, LocalEntryNotFoundError) else None
        if snapshot is None:
            raise
        absent = (snapshot.parent.parent / ".no_exist" / snapshot.name / MANIFEST_NAME).is_file()
        cached = f"{named} repo of that name is in the hub cache{at} ({snapshot}) without {MANIFEST_NAME}"
        if snapshot.is_dir() and (snapshot / "config.json").exists() and _holds_checkpoint_weights(snapshot):
            raise ShardDirError(
                f"{cached}, holding a checkpoint (config.json and weights): it is no shard directory. Split it first "
                f"{split}."
            ) from None
        if not absent and not snapshot.is_dir():
            raise
        if not absent:
            option = f" --revision {revision}" if revision is not None else ""
            raise ShardDirError(
                f"{cached} or a checkpoint's config.json and weights: as downloaded, it is no shard directory, and the "
                f"hub cannot be reached ({unreachable_reason()}) to say more. If the repo holds a shard directory, "
                f"download it whole once with network access (`hf download {shard_dir}{option}`); if a checkpoint, "
                f"split it first {split}."
            ) from None
        manifest = None  # (as the hub said when it was asked, which the cache records)
    if manifest is None:
        raise ShardDirError(
            f"{named} repo of that name holds no {MANIFEST_NAME}{at}: it is no shard directory. If it is a checkpoint, "
            f"split it first {split}."
        )
    commit = snapshot_commit(manifest.parent)
    fetch_hub_file(shard_dir, "config.json", "`shard_dir`", what="shard directory", revision=commit, token=token)
    return hub_shard_files(shard_dir, manifest.parent, token=token) if weights else manifest.parent


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The hub cache's snapshot folder of the model repo `repo_id` at `revision` (a commit, or the branch or tag its
    `refs` name; default: the default branch), where the cache holds it or records a file of it absent (`.no_exist`,
    written as the hub answers that a file is not there), else `None`."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    commit = revision or constants.DEFAULT_REVISION
    if not is_commit_hash(commit):
        try:
            commit = (folder / "refs" / commit).read_text().strip()
        except (OSError, ValueError):  # (no such branch or tag in the cache)
            return None
    if not is_commit_hash(commit):
        return None
    snapshot = folder / "snapshots" / commit
    return snapshot if snapshot.is_dir() or (folder / ".no_exist" / commit).is_dir() else None


def is_commit_hash(text: str) -> bool:
    """Whether `text` is a full commit hash, as the hub cache names a snapshot folder by."""
    return len(text) == 40 and all(c in "0123456789abcdef" for c in text)


def _holds_checkpoint_weights(folder: Path) -> bool:
    """Whether `folder` holds a checkpoint's weights at its top level (a weight file or index `from_pretrained` reads,
    not a shard directory's `resident.safetensors` and `layers/`)."""
    if (folder / "layers").is_dir():
        return False
    names = [p.name for p in folder.iterdir() if p.name != RESIDENT_FILE]
    return any(n.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")) for n in names)


def _not_a_shard_dir_fix(path: Path, fix: str) -> str:
    """The fix for a `shard_dir` that is no shard directory (`fix`: split one there), where `path` is a file or folder
    of one (its `manifest.json`, its `layers`), one without its manifest, or a checkpoint's folder: splitting into it,
    as `fix` said, is refused (into a folder holding files, without `overwrite`; into a checkpoint, as the source's own
    folder)."""
    for folder in path.parents[:2]:
        if (folder / MANIFEST_NAME).is_file():
            return f"it is inside the shard directory {folder}: pass that folder"
    if (path / "config.json").is_file() and ((path / "layers").is_dir() or (path / RESIDENT_FILE).is_file()):
        # (a copy cut short: the manifest, written last, is not there; the same split refuses the folder as one
        # holding files. A split killed before it wrote config.json, just before the manifest, resumes: not this)
        return (
            f"it holds a shard directory's files but no {MANIFEST_NAME}, which a split writes last (a copy cut short, "
            "or the manifest deleted): copy the shard directory again whole, or split again there with "
            "`overwrite=True` (`--overwrite`)"
        )
    if path.is_dir() and (path / "config.json").is_file() and _holds_checkpoint_weights(path):
        return (
            f"it holds a checkpoint (config.json and weights): split it into another folder first "
            f"(`split_checkpoint({str(path)!r}, DIR)`, `hf-layerstream split {shlex.quote(str(path))} DIR`) and stream DIR"
        )
    return fix


def _hub_repo_id(shard_dir) -> bool:
    """Whether `shard_dir` is taken as a hub repo id: text `org/name` that can be one, naming no path here."""
    if not isinstance(shard_dir, str) or shard_dir.count("/") != 1 or os.path.lexists(Path(shard_dir).expanduser()):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .split import missing_local_folder

    try:
        validate_repo_id(shard_dir)
    except HFValidationError:  # (`C:/x`, `x.layers/`, `my models/x`: a path, missing)
        return False
    return not missing_local_folder(shard_dir)  # (`./org/name`, `~/x`: a path)


def snapshot_commit(snapshot: Path) -> str | None:
    """The commit a hub cache snapshot folder is named by (the files of the commit its manifest was fetched at)."""
    return snapshot.name if len(snapshot.name) == 40 else None


def hub_shard_files(repo_id: str, snapshot: Path, *, token: str | bool | None = None) -> Path:
    """The snapshot of the hub repo `repo_id` that `local_shard_dir(repo_id, weights=False)` returned, with the rest of
    the shard directory downloaded into it (with `token`), at its commit: the small files (tokenizer, chat templates),
    and the unit files its manifest names (nothing else: a repo may hold more). Offline, or where the hub cannot be
    reached, the snapshot as the hub cache holds it (a file it lacks is named when the directory is opened)."""
    from .split import _is_offline, cannot_reach_hub

    if _is_offline():
        return snapshot
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    units = _read_json_object(snapshot / MANIFEST_NAME).get("units")
    units = units if isinstance(units, list) else []  # (a damaged manifest: named so when the directory is opened)
    files = [u["file"] for u in units if isinstance(u, dict) and isinstance(u.get("file"), str)]
    revision = snapshot_commit(snapshot)
    # (the hub unreachable: the cache at once; huggingface_hub retried the listing for 23 s)
    hub = {"revision": revision, "token": token}
    hub["local_files_only"] = cannot_reach_hub(repo_id, MANIFEST_NAME, revision) is not None
    try:
        snapshot_download(repo_id, ignore_patterns=_NOT_WEIGHTS, **hub)
        return Path(snapshot_download(repo_id, allow_patterns=files or [MANIFEST_NAME], **hub))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:  # (the hub unreachable: the cache, as offline)
        logger.warning("Could not download %s (%s); streaming what the hub cache holds of it", repo_id, e)
        return snapshot


class ShardDirectory:
    """A validated shard directory (read-only: opening it never writes).

    Opening checks the manifest and, cheaply, that every file exists with the recorded size, a header that matches
    the manifest (tensor names, shapes, dtypes, offsets inside the file), the recorded sample digest (the first
    and last 64 KiB: a file from another split or another layer is caught), the digest of its split's options each
    file carries against the manifest's (a file of another split copied in with its manifest entry), and the
    manifest's record of the tensors, its `compression`, `dtype` and `load_dtype` against the records the files carry
    (the manifest has no digest of its own: an edit of what streaming reads the files by is caught so). A config.json
    holding other values than the split wrote (by the digest the manifest records of it, `config_sha256`) is warned
    about, not refused: it is the user's to edit. `checksums=True` also hashes every file in full at open;
    [`~ShardDirectory.verify`] lists every problem instead of raising at the first.

    Args:
        path (`str` or `os.PathLike`):
            The shard directory made by [`split_checkpoint`].
        check_files (`bool`, defaults to `True`):
            Check every file's size, header and sample digest at open (reads a few KiB per file).
        checksums (`bool`, defaults to `False`):
            Also compare every file's full SHA-256 with the manifest at open (reads the whole directory once).

    Raises:
        `FileNotFoundError`: `path` does not exist.
        [`ShardDirError`] / [`ShardFileError`]: the directory or one of its files is not sound; the message names
            the file, the problem and the fix.
    """

    def __init__(self, path: str | os.PathLike, *, check_files: bool = True, checksums: bool = False):
        check_path("shard_dir", path)
        check_files, checksums = check_flag("check_files", check_files), check_flag("checksums", checksums)
        # absolute: the files are opened as they are needed, and the process may change its working directory by
        # then (a server, a notebook's `%cd`); `~` expanded, as `split_checkpoint` expands it for the directory it
        # writes
        self.path = Path(path).expanduser().absolute()
        fix = "create it with `split_checkpoint(source, shard_dir)` or `hf-layerstream split SOURCE SHARD_DIR`"
        if not self.path.exists():
            if os.path.islink(self.path):
                raise ShardDirError(f"`shard_dir` {self.path} is a dangling symlink or a symlink loop; {fix}.")
            raise FileNotFoundError(f"`shard_dir` {self.path} does not exist; {fix}.")
        if not self.path.is_dir():
            raise ShardDirError(f"`shard_dir` {self.path} is not a directory; {_not_a_shard_dir_fix(self.path, fix)}.")
        manifest_path = self.path / MANIFEST_NAME
        if os.path.lexists(manifest_path):
            manifest_path = _inside(self.path, MANIFEST_NAME, manifest_path)
        if manifest_path.exists() and not manifest_path.is_file():  # (a folder, a FIFO: it read as "has no manifest")
            raise ShardFileError(manifest_path, "is not a regular file")
        if not manifest_path.is_file():
            if _split_running(self.path):  # (its advice to run the same split again was refused: the lock is held)
                fix = "a split is writing it right now (it holds its lock): wait for that split to finish"
            elif (self.path / ".progress.json").exists():
                fix = "it holds an unfinished split: run the same split again to finish it"
            else:
                fix = _not_a_shard_dir_fix(self.path, fix)
            raise ShardDirError(
                f"`shard_dir` {self.path} has no {MANIFEST_NAME}, so it is not a shard directory; {fix}."
            )
        try:
            raw = json.loads(manifest_path.read_text())
        except OSError as e:  # (this user may not read it, a limit of the process: not damage, as for a layer file)
            raise unreadable(manifest_path, e) from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShardFileError(manifest_path, f"is not readable JSON ({e})") from e
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            raise ShardFileError(
                manifest_path,
                f"is not an hf_layerstream manifest (format {raw.get('format')!r})"
                if isinstance(raw, dict)
                else "is not a JSON object",
            )
        if _is_newer_format(raw.get("format_version")):
            raise ShardFileError(
                manifest_path,
                f"was written by a newer hf_layerstream (shard format version {raw['format_version']}; this "
                f"hf_layerstream reads version {FORMAT_VERSION})",
                "Upgrade hf_layerstream to use this shard directory (or split the checkpoint again into another "
                "directory with this version).",
            )
        version = raw.get("format_version")
        if "format_version" not in raw or not isinstance(version, (int, float)) or isinstance(version, bool):
            # (edited: "has format version '1', this library reads version 1" read as the same version)
            kind = {str: "a string", list: "a list", dict: "an object", bool: "a boolean"}.get(type(version), "null")
            said = (
                "no `format_version`"
                if "format_version" not in raw
                else f"`format_version` {json.dumps(version)[:60]}, {kind} where the split writes a number"
            )
            raise ShardFileError(
                manifest_path,
                f"records {said} (this library reads version {FORMAT_VERSION})",
                f'Set "format_version" to {FORMAT_VERSION} (a number) if the manifest was edited, or re-split the '
                "checkpoint with this version of hf_layerstream (the same split run again repairs it).",
            )
        if version != FORMAT_VERSION:
            raise ShardFileError(
                manifest_path,
                f"has format version {version!r}, this library reads version {FORMAT_VERSION}",
                "Re-split the checkpoint with this version of hf_layerstream.",
            )
        try:
            self.manifest = Manifest.from_json(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise ShardFileError(manifest_path, f"is malformed ({type(e).__name__}: {e})") from e
        self.manifest_path = manifest_path
        # (as written: `verify` names one `read_side_files`, `read_conversion_record` or `read_adapter_record` dropped)
        self._records = {name: raw.get(name) for name in ("side_files", "conversion", "adapter")}
        expected = {RESIDENT} | {layer_unit(i) for i in range(self.manifest.num_layers)}
        if set(self.manifest.units) != expected:
            missing = sorted(expected - set(self.manifest.units))
            extra = sorted(set(self.manifest.units) - expected)
            raise ShardFileError(
                manifest_path, f"lists the wrong units (missing {missing[:5]}, unexpected {extra[:5]})"
            )
        self.files: dict[str, Path] = {
            u: _inside(self.path, e.file, manifest_path) for u, e in self.manifest.units.items()
        }
        seen: dict[Path, str] = {}
        for unit, file in self.files.items():
            key = file.resolve()
            if key in seen:
                raise ShardFileError(manifest_path, f"names the same file {file} for units {seen[key]!r} and {unit!r}")
            seen[key] = unit
        self._headers: dict[str, Header] = {}
        if check_files:
            config, error = self._read_config()
            if error is not None:
                raise error
            self._warn_if_config_edited(config)
            for unit in self.manifest.units:
                self.header(unit)
            # (after the tensors' records, checked against their files': those are what the summary is checked by)
            summary = _summary_otherwise(self.manifest) or _load_dtype_differs(self.manifest, config)
            if summary is not None:
                raise ShardFileError(manifest_path, *summary)
        if checksums:
            problems = self._checksum_problems()
            if problems:
                again = redownload_advice(self.path)
                raise ShardDirError(
                    f"`shard_dir` {self.path}: {len(problems)} file(s) do not match their manifest checksum: "
                    + "; ".join(problems[:3])
                    + (
                        f". {again}."
                        if again is not None
                        else ". Run `hf-layerstream verify` for the full list, delete the files it names and re-run "
                        "the same `split_checkpoint` (`hf-layerstream split`), which writes them again (a re-run alone "
                        "checks sizes, headers and sample digests only: it takes a file damaged within for sound)."
                    )
                )

    def __repr__(self) -> str:
        return f"ShardDirectory({str(self.path)!r}, num_layers={self.num_layers})"

    # ---------------------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.manifest.num_layers

    @property
    def compression(self) -> dict[str, Any] | None:
        return self.manifest.compression

    def unit(self, name: str) -> UnitEntry:
        return self.manifest.units[name]

    def header(self, unit: str) -> Header:
        """The validated header of a unit's file: size as recorded, names/shapes/dtypes as in the manifest."""
        if unit in self._headers:
            return self._headers[unit]
        entry = self.manifest.units[unit]
        path = self.files[unit]
        if not path.is_file():
            what = (
                "is a dangling symlink"
                if os.path.islink(path)
                else "is missing"
                if not path.exists()
                else "is not a file"
            )
            # (something else there, a folder: the same split run again, which the default fix named, failed renaming
            # its file over it)
            moved = what == "is not a file" and redownload_advice(self.path) is None  # (a download's: downloaded again)
            fix = f"It is no file the split wrote: move it away, then {_RERUN}." if moved else None
            raise ShardFileError(path, f"{what} (the manifest records unit {unit!r} there)", fix)
        header = read_header(path, expected_size=entry.size)
        stored = _stored_layout(entry)
        problems = []
        missing = sorted(set(stored) - set(header.tensors))
        extra = sorted(set(header.tensors) - set(stored))
        if missing:
            problems.append(f"lacks {len(missing)} tensor(s) the manifest records (e.g. {missing[:3]})")
        if extra:
            problems.append(f"holds {len(extra)} tensor(s) the manifest does not record (e.g. {extra[:3]})")
        for name, (shape, dtype) in stored.items():
            info = header.tensors.get(name)
            if info is not None and shape is not None and (info.shape != shape or info.dtype != dtype):
                problems.append(
                    f"stores {name!r} as {list(info.shape)} {dtype_name(info.dtype)} but the manifest records "
                    f"{list(shape)} {dtype_name(dtype)}"
                )
        tagged = header.metadata.get("unit")
        if tagged is not None and tagged != unit:
            problems.append(f"holds unit {tagged!r}, not {unit!r} (a file moved or copied from another place)")
        if problems:  # (a file whose content is the split's: the manifest's record of it was changed since)
            raise self._edited_record(unit, header) or ShardFileError(path, "; ".join(problems))
        if entry.sample_sha256 is not None:
            try:
                sample = sample_digest(path)
            except OSError as e:
                raise unreadable(path, e) from e
            if sample != entry.sample_sha256:
                raise ShardFileError(
                    path,
                    "has the recorded size and header but other content than the manifest records (a file from "
                    "another split or another model, or corrupted)",
                )
        edited = self._edited_record(unit, header)
        if edited is not None:
            raise edited
        foreign = other_split(self.manifest, header)
        if foreign is not None and self._carried_by_all(foreign):
            # (every unit's: the manifest's, not the files', was changed; a re-run of the split took it for another's)
            raise ShardFileError(
                self.manifest_path,
                f'records "split_options": {json.dumps(self.manifest.split_options)}, but every unit file carries the '
                f"split digest {foreign!r} (changed since the split)",
                f'Set "split_options" back to "{foreign}".',
            )
        if foreign is not None:
            # (copied in with its manifest entry, its size and digests are its own: every other check passed, and the
            # model streamed another model's layer)
            raise ShardFileError(
                path,
                f"was written by another split than the manifest records (its split digest {foreign[:12]}..., the "
                f"manifest's `split_options` {self.manifest.split_options[:12]}...: another source, other weights or "
                "other options), copied in with its manifest entry",
            )
        load = header.metadata.get(LOAD_DTYPE_KEY)
        if load is not None and load != self.manifest.load_dtype:
            # (config.json naming no dtype, `_load_dtype_differs` has nothing to compare it with: streaming computed in
            # the dtype edited in, silently)
            said = json.dumps(self.manifest.load_dtype) if self.manifest.load_dtype is not None else "none"
            raise ShardFileError(
                self.manifest_path,
                f'records "load_dtype": {said} (the dtype streaming computes in by default), but its unit files, '
                f'written with it, record "{load}" (the dtype `from_pretrained(dtype="auto")` loads the checkpoint at, '
                "as the split found it): the manifest was changed since the split",
                f'Set "load_dtype" back to "{load}".',
            )
        self._headers[unit] = header
        return header

    def _carried_by_all(self, digest: str) -> bool:
        """Whether every unit's file carries the split digest `digest` (`SPLIT_KEY`), read from their headers (a file
        unreadable or without one: not). Asked only where one carries another than the manifest's `split_options`."""
        for unit, path in self.files.items():
            try:
                header = self._headers.get(unit) or read_header(path)
            except (OSError, ShardDirError):
                return False
            if header.metadata.get(SPLIT_KEY) != digest:
                return False
        return True

    def _edited_record(self, unit: str, header: Header) -> ShardFileError | None:
        """The error of a manifest whose record of the tensors of `unit` differs from the one its file carries (see
        `recorded_otherwise`), where the file is the split's (its sample digest as recorded, or none recorded), else
        `None`: the manifest was changed since, and streaming would read the file by its record."""
        entry, path = self.manifest.units[unit], self.files[unit]
        edited = recorded_otherwise(entry, header)
        if edited is None:
            return None
        try:
            if entry.sample_sha256 is not None and sample_digest(path) != entry.sample_sha256:
                return None  # (another file: named so by the checks of its content)
        except OSError:
            return None
        return ShardFileError(
            self.manifest_path,
            f"records tensor {edited[0]!r} of unit {unit!r} otherwise than the file {path}, written with it, does: "
            f"{edited[1]} (changed since the split: streaming would read the file by the manifest's record)",
            f"Run the same split again {SAME_SPLIT}: it writes that unit and the manifest again.",
        )

    def _edited_digests(self, unit: str) -> str | None:
        """Where the file of `unit` failed the cheap checks (its size, or its sample digest) and yet matches the
        manifest's SHA-256 in full (it is the file the split wrote), the manifest's `size` or `sample_sha256` of it
        changed since, with the fix; `None` otherwise (the file damaged or replaced, or unreadable). The full digest
        itself edited cannot be told so from damage the sample misses: it is left to `_checksum_problems`."""
        entry, path = self.manifest.units[unit], self.files[unit]
        try:
            if not path.is_file() or sha256_file(path) != entry.sha256:
                return None
            file = {"size": path.stat().st_size, "sample_sha256": sample_digest(path)}
        except OSError:
            return None
        listed = {"size": entry.size, "sample_sha256": entry.sample_sha256}
        differ = [k for k in file if listed[k] is not None and listed[k] != file[k]]
        if not differ:
            return None
        return (
            f"records unit {unit!r} otherwise than its file {path}, which matches the manifest's SHA-256 (the file the "
            f"split wrote): {', '.join(f'{k} {listed[k]!r} (the file: {file[k]!r})' for k in differ)} (changed since "
            f"the split). Put back the file's value{'s' if len(differ) > 1 else ''}, or run the same split again "
            f"{SAME_SPLIT}, which writes that unit and the manifest again"
        )

    def _checksum_problems(self, units=None) -> list[str]:
        problems = []
        for unit in units if units is not None else self.manifest.units:
            path = self.files[unit]
            try:
                digest = sha256_file(path)
            except OSError as e:
                error = unreadable(path, e)
                problems.append(str(error) if error.fix else f"{path} {error.problem}")
                continue
            if digest == self.manifest.units[unit].sha256:
                continue
            if unit in self._headers and self.manifest.units[unit].sample_sha256 is not None:
                # (it passed the cheap checks, a replaced file fails: its content changed past the bytes the sample
                # reads, or the manifest's digest was edited, which nothing else records to tell apart; "corrupted or
                # replaced" named the file only. Deleting it and running the same split again mends either)
                problems.append(
                    f"{path} does not match its SHA-256 in the manifest, though its size, header and sample digest (its "
                    "first and last 64 KiB) do: it is damaged within, or the manifest's `sha256` of it was changed "
                    "since the split"
                )
            else:
                problems.append(f"{path} does not match its SHA-256 in the manifest (corrupted or replaced)")
        return problems

    def _config_problem(self, read: tuple[dict | None, ShardFileError | None] | None = None) -> str | None:
        """What is wrong with the directory's `config.json`, which the split writes beside the manifest and a model is
        built from (without it transformers' own error named no file: "Should have a `model_type` key"), if
        anything: with the fix where it is not damage (this user may not read it), as `verify` lists it. `read`:
        `_read_config()` as the caller read it (default: read here)."""
        error = (read or self._read_config())[1]
        if error is None:
            return None
        return f"{error.problem}. {error.fix}" if NOT_DAMAGE in (error.fix or "") else error.problem

    def _read_config(self) -> tuple[dict | None, ShardFileError | None]:
        """The directory's `config.json`, read once for the checks of an open: (its content, `None`), or (`None`, the
        error opening the directory raises), with its fix: the same split run again writes the file again (a hub
        cache download: downloaded again); a file this user may not read (or a limit of the process) is not
        damage."""
        path = self.path / "config.json"

        def error(problem: str) -> tuple[None, ShardFileError]:
            again = redownload_advice(self.path)
            rerun = (
                f"{again}."
                if again is not None
                else "Run the same split again (`split_checkpoint` / `hf-layerstream split`): it writes the file again."
            )
            return None, ShardFileError(path, problem, rerun)

        what = "the split writes it beside the manifest; the model is built from it"
        if path.exists() and not path.is_file() and redownload_advice(self.path) is None:
            # (the same split run again, the fix named, failed renaming its file over it)
            fix = f"It is no file the split wrote: move it away, then {_RERUN}."
            return None, ShardFileError(path, f"is not a regular file ({what})", fix)
        if not path.is_file():  # (a folder there read as "is missing")
            return error(f"is not a regular file ({what})" if path.exists() else f"is missing ({what})")
        # (a damaged one passed `verify` and the split's re-run, and failed only as the model was built)
        try:
            config = read_json_as_transformers(path)
        except OSError as e:  # (permissions: it was "not readable JSON", damage to re-split)
            found = unreadable(path, e)
            return (None, found) if found.fix is not None else error(found.problem)
        except ValueError as e:
            return error(f"is not readable JSON ({e})")
        if not isinstance(config, dict):
            return error("is not a JSON object")
        expected = self.manifest.model_type
        if expected is not None and config.get("model_type") != expected:
            found = config.get("model_type")
            if self.manifest.config_sha256 is not None and config_digest(config) == self.manifest.config_sha256:
                # (config.json is the one the split wrote: the manifest's record was edited, and the file was blamed)
                return None, ShardFileError(
                    self.manifest_path,
                    f'records "model_type": {json.dumps(expected)[:60]}, but config.json, as the split wrote it (its '
                    f"digest is the one the manifest records), has {json.dumps(found)[:60]}: the manifest was changed "
                    "since the split",
                    f'Set "model_type" back to {json.dumps(found)[:60]}, or run the same split again, which writes the '
                    "manifest again.",
                )
            return error(f"has model_type {found!r}, not {expected!r} as the manifest records")
        for key in ("dtype", "torch_dtype"):
            # (the model is built at it: "foo" passed `verify`, whose build failed as "not damage found", and
            # `generate` died with torch's AttributeError; "int8" with transformers' refusal, naming no file)
            value = config.get(key)
            if value is not None and not _floating_dtype_name(value):
                return error(
                    f"records {json.dumps(key)}: {json.dumps(value)[:60]}, which is no floating-point dtype torch has "
                    '(the split writes the one the weights load at, e.g. "bfloat16")'
                )
        return config, None

    def _warn_if_config_edited(self, config: dict | None) -> None:
        """Warn where config.json (`config`, as `_read_config` read it) holds other values than the one the split wrote,
        by the digest the manifest records (`config_sha256`; none recorded: split before it was, nothing to compare
        with): once per process for a directory and an edit (`hf-layerstream generate` opens it twice, and a notebook
        enabling streaming again need not be told again). An edit that keeps every tensor shape (`rms_norm_eps`, rope
        parameters, `hidden_act`) passes every other check, and a model built from the file computes otherwise than
        the split's source; not refused: the file is the user's to edit (rope scaling for longer contexts)."""
        recorded = self.manifest.config_sha256
        if recorded is None or not isinstance(config, dict):
            return
        digest = config_digest(config)
        if digest == recorded or (self.path, digest) in _CONFIG_EDITS_WARNED:
            return
        _CONFIG_EDITS_WARNED.add((self.path, digest))
        logger.warning(
            "%s was edited since the split (its values differ from those the split wrote, whose digest %s records): "
            "a model built from it (`hf-layerstream generate`, `AutoConfig.from_pretrained(shard_dir)`) computes "
            "otherwise than the split's source checkpoint where the edit changes what it computes (`rms_norm_eps`, "
            "rope parameters, `hidden_act`). To put the split's back, delete config.json and run the same split again "
            '%s; to keep the edit without this warning, set "config_sha256" in %s to "%s".',
            self.path / "config.json",
            MANIFEST_NAME,
            SAME_SPLIT,
            MANIFEST_NAME,
            digest,
        )

    def config_mismatch(self) -> str | None:
        """What differs between the model the directory's `config.json` builds and the one the shards were split from
        (another number of layers, other tensor shapes: the architecture fingerprint the manifest records), if
        anything; `None` also where `config.json` is unreadable (see `_config_problem`), and where the model it builds
        holds the tensors the manifest lists but the manifest's fingerprint differs, or has the fingerprint but not
        the manifest's number or names of decoder layers (`model_problems`: the manifest's, not config.json's). Builds the model without weights, which takes a moment for a large one:
        `verify` and a re-run split check it, opening the directory does not (enabling streaming compares the model
        given with the manifest anyway)."""
        return self._config_text(self._model_difference())

    def model_problems(self) -> tuple[str | None, str | None]:
        """`config_mismatch()`, and where the model the directory's `config.json` builds has the type, decoder layers,
        tensor names and shapes the manifest lists but not the architecture fingerprint it records, what is wrong with
        the manifest (its `fingerprint` was changed since the split: nothing else makes them differ), with the value
        to put back; or where the model has the fingerprint it records (which hashes its decoder layers' number and
        names) but not its `num_layers` or `layers_prefix`, those, with the fix; from one build of the model."""
        return self._model_problems(self._read_config())

    def _model_problems(self, read: tuple[dict | None, ShardFileError | None]) -> tuple[str | None, str | None]:
        """`model_problems()`, of config.json as `_read_config()` read it (`read`: `verify` reads it once)."""
        found = self._model_difference(read)
        return self._config_text(found), self._fingerprint_text(found) or self._layers_text(found)

    def _model_difference(
        self, read: tuple[dict | None, ShardFileError | None] | None = None
    ) -> tuple[str | None, str | None, list[str] | None] | None:
        """`_model_mismatch` of the model the directory's `config.json` builds; `None` where it is unreadable (`read`:
        `_read_config()` as the caller read it; default: read here) or building the model fails (logged: this machine
        or this transformers, not damage found)."""
        if self._config_problem(read) is not None:
            return None
        from transformers import AutoConfig

        try:
            return self._model_mismatch(AutoConfig.from_pretrained(self.path))
        except Exception as e:  # noqa: BLE001 - this machine or this transformers, not the file: not a damage found
            logger.warning(
                "Could not check %s against the shards: building its model failed (%s: %s)",
                self.path / "config.json",
                type(e).__name__,
                e,
            )
            return None

    @staticmethod
    def _config_text(found: tuple[str | None, str | None, list[str] | None] | None) -> str | None:
        if found is None or found[0] is None:
            return None
        return (
            f"describes another model than the split's: {found[0]} (it was changed since the split, or this "
            "transformers builds the model otherwise)"
        )

    def _layers_text(self, found: tuple[str | None, str | None, list[str] | None] | None) -> str | None:
        if found is None or found[2] is None:
            return None
        return (
            f"records {' and '.join(found[2])}, where the model config.json builds has the architecture fingerprint "
            "it records (which hashes its decoder layers' number and names): the manifest was changed since the "
            f"split; run the same split again {SAME_SPLIT}, which writes the manifest again"
        )

    def _fingerprint_text(self, found: tuple[str | None, str | None, list[str] | None] | None) -> str | None:
        if found is None or found[1] is None:
            return None
        return (
            f"records the architecture fingerprint {self.manifest.fingerprint!r}, but the model config.json builds, "
            "whose decoder layers, tensor names and shapes are those the manifest lists, has "
            f"{found[1]!r}: the manifest's `fingerprint` was changed since the split (or written by an hf_layerstream "
            "that computed it otherwise); set it back to the second (a split run again there takes the directory for "
            "another model's while it differs)"
        )

    def model_mismatch(self, config) -> str | None:
        """What differs between the model `config` builds (as the class the shards were split for) and the one the
        shards hold (the architecture fingerprint the manifest records): another number of decoder layers, other
        tensor names or shapes, or, where those are the ones the manifest lists, its fingerprint; `None` where nothing
        does. Builds it without weights (names and shapes only: on meta, buffers too, and what a model makes on the
        CPU first); raises what building it raises."""
        differs, fingerprint, edited = self._model_mismatch(config)
        if edited is not None:
            return (
                f"the architecture fingerprint the manifest records, which hashes its decoder layers' number and names, "
                f"but the manifest records {' and '.join(edited)} (changed since the split)"
            )
        if fingerprint is None:
            return differs
        return (
            "the decoder layers, tensor names and shapes the manifest lists, but another architecture fingerprint than "
            f"it records ({fingerprint!r}, where it records {self.manifest.fingerprint!r}: the manifest's "
            "`fingerprint` was changed since the split)"
        )

    def _model_mismatch(self, config) -> tuple[str | None, str | None, list[str] | None]:
        """`model_mismatch` as a triple: what differs in the model (`None`: nothing it holds), the model's fingerprint
        where only the manifest's differs from it (else `None`), and where the model has the manifest's fingerprint,
        the manifest's `num_layers` or `layers_prefix` that are not the model's, with the model's (else `None`)."""
        from .modeling import architecture_fingerprint, build_for_shards, expected_tensors, require_layer_stack

        model = build_for_shards(self.manifest, config, meta=True)
        stack = require_layer_stack(model)
        fingerprint = architecture_fingerprint(model, stack)
        m = self.manifest
        if fingerprint == m.fingerprint:
            # (the split's model: the number of its layers (a unit dropped or added) or their names otherwise than its
            # own are the manifest's edit)
            edited = [
                f"`num_layers` {m.num_layers} (the model: {len(stack)})" if len(stack) != m.num_layers else "",
                f"`layers_prefix` {m.layers_prefix!r} (the model: {stack.prefix!r})"
                if stack.prefix != m.layers_prefix
                else "",
            ]
            return None, None, [e for e in edited if e] or None
        if stack.prefix != m.layers_prefix:  # (streaming refuses it: `verify` passed it)
            return f"decoder layers under {stack.prefix!r}, where the manifest records {m.layers_prefix!r}", None, None
        if len(stack) != self.manifest.num_layers:
            return f"{len(stack)} decoder layers, where the shards hold {self.manifest.num_layers}", None, None
        model_type = getattr(config, "model_type", None)
        if self.manifest.model_type is not None and model_type != self.manifest.model_type:
            return f"model type {model_type!r}, where the shards hold {self.manifest.model_type!r}", None, None
        if not lists_tensors(self.manifest.units, expected_tensors(model, stack)):
            return "other tensor names or shapes than the shards hold", None, None
        return None, fingerprint, None

    def missing_side_files(self) -> list[str]:
        """The side files the manifest lists (what the split copied or wrote beside the weights: tokenizer, chat
        templates, generation config, processor configs, license files, model card) that the directory lacks (a
        symlink to nothing too); `[]` where the manifest lists none (a split made before they were listed)."""
        return [name for name in self.manifest.side_files or [] if not os.path.exists(self.path / name)]

    def _side_file_problems(self, *, content: bool = False, tokenizer: bool = False) -> list[str]:
        """`verify`'s problems of the side files the directory lacks: those a tokenizer, processor or `generate` reads
        (a tokenizer file gone, `AutoTokenizer.from_pretrained` of the directory fails or tokenizes otherwise). The
        license files and model card, which the model runs without, are a warning, logged. With `content`, also those
        there but damaged (`side_file_damage`: a JSON one that is not readable JSON), or that cannot be read.
        `tokenizer`: those of the tokenizer's files only (by their names), without the warning."""
        names = self.manifest.side_files or []
        if tokenizer:
            names = [n for n in names if not _informative(n) and _side_file_use(n) == _TOKENIZER_FILE_USE]
        missing = [n for n in self.missing_side_files() if n in names]
        # (a folder at its path: it passed as there, and `generate` then said the tokenizer did not load for another
        # cause, "You need to have sentencepiece or tiktoken installed")
        other = [n for n in names if n not in missing and not _informative(n) and not (self.path / n).is_file()]
        damaged = [(n, "is not a file (move what is there away)", None) for n in other]
        for name in names if content else []:
            if name in other:
                continue
            try:
                damage = side_file_damage(self.path / name)
            except OSError as e:
                error = unreadable(self.path / name, e)
                damaged.append((name, None, str(error) if error.fix else f"{error.path} {error.problem}"))
                continue
            if damage is not None:
                damaged.append((name, damage, None))
        if not missing and not damaged:
            return []
        downloaded = _hub_snapshot(Path(os.path.realpath(self.path))) is not None
        command = redownload_command(self.path) if downloaded else None
        again = f"download the repo again (`{command}`)" if command is not None else "download the repo again"

        def fix(it: str, *, damaged: bool = False) -> str:
            if downloaded and damaged:  # (its blob: downloaded again over it)
                return f"this download of the hub repo holds {it} damaged: download it again" + (
                    f" (`{command}`)" if command is not None else ""
                )
            if downloaded:  # (the uploader's split has it: a download cut short, or an upload without it)
                return (
                    f"this download of the hub repo lacks {it}: {again}, or, where the repo lacks {it}, run the same "
                    f"split again and upload {it}"
                )
            return f"running the same split again writes {it} back"

        informative = [name for name in missing if _informative(name)]
        if informative:
            logger.warning(
                "%s lacks %s, which its split wrote (the model runs without, but a copy shared on the hub should "
                "carry its model's license and card): %s",
                self.path,
                ", ".join(informative),
                fix("it" if len(informative) == 1 else "them"),
            )
        return [
            f"{self.path / name} is missing ({_side_file_use(name)}; the split wrote it, and the manifest lists it): "
            + fix("it")
            for name in missing
            if name not in informative
        ] + [
            problem
            or f"{self.path / name} {damage} ({_side_file_use(name)}; the split wrote it, and the manifest lists it): "
            + fix("it", damaged=True)
            for name, damage, problem in damaged
        ]

    def _side_files_problem(self) -> str | None:
        """What is wrong with the manifest's list of its side files, where `read_side_files` dropped it or some of its
        names (its side files then went unchecked), with the fix; `None` where it is sound or absent (a split made
        before the list was kept)."""
        record = self._records["side_files"]
        if record is None or record == self.manifest.side_files:
            return None
        if self.manifest.side_files is None:  # (a re-run of the split lists them again, as for a split made before)
            return (
                f'records "side_files": {json.dumps(record)[:120]}, which is not a list of file names (the split lists '
                f"the files it wrote beside the units, which `verify` checks): run the same split again {SAME_SPLIT}, "
                "which lists them again"
            )
        outside = [name for name in record if name not in self.manifest.side_files]
        return (
            f"lists the side files {outside}, which are not files of the directory (a path out of it, or into another "
            f"folder than {_CHAT_TEMPLATE_DIR}/): the manifest was changed since the split; remove them from its "
            '"side_files"'
        )

    def _records_problems(self) -> list[str]:
        """What is wrong with the manifest's `conversion` and `adapter` records, where `read_conversion_record` or
        `read_adapter_record` dropped one (streaming then runs as without it), with the fix."""
        problems = []
        record = self._records["conversion"]
        if record is not None and self.manifest.conversion is None:
            # (not written again by a re-run: what this release converts is not what the one of the split did)
            problems.append(
                f'records "conversion": {json.dumps(record)[:120]}, which is not the form the split writes (the '
                'transformers release and a digest of how it converted the checkpoint\'s tensors, {"transformers": '
                '..., "converters": ...}): the manifest was changed since the split, and streaming skips the check '
                'that this release converts them as that one did. Remove "conversion" from the manifest to stream '
                "without the check (as a split made before it was recorded), or split again with `overwrite=True` "
                f"(`--overwrite`) {SAME_SPLIT}, which records it"
            )
        record = self._records["adapter"]
        if record is not None and self.manifest.adapter is None:
            problems.append(
                f'records "adapter": {json.dumps(record)[:120]}, which is not the form the split writes (the PEFT '
                "adapter merged into the weights: an object, or a list of two or more in merge order): the manifest "
                "was changed since the split, and which adapter the weights hold is unknown (to `info`, and to the "
                f"warning where one is attached again): run the same split again {SAME_SPLIT}, its adapters "
                "included, which writes the record again"
            )
        return problems

    def verify(self, *, checksums: bool = True) -> list[str]:
        """Check every file against the manifest and return every problem found (empty when the directory is sound).

        Checks `config.json` (readable, and building the model the shards were split from; other values than the split
        wrote, by the manifest's `config_sha256`, are a warning, logged once per process and edit, as at open), the
        manifest's list of side files (a list of the directory's file names) and its `conversion` and `adapter` records
        (of the form the split writes), that the side files it lists are there and, a JSON one, readable JSON (a
        tokenizer file, chat template, generation or processor config missing or damaged is a problem; a license file or
        the model card missing, which the model runs without, is logged as a warning), each unit file's existence, size,
        safetensors header (offsets inside the file), tensor names, shapes and dtypes, the unit tag, the sample digest,
        the split digest (against the manifest's `split_options`), the manifest's record of its tensors (against the one
        the file carries) and its `load_dtype` (against the one the file records), then the manifest's `compression` and
        `dtype` (against its tensors' records) and `load_dtype` (against config.json's `dtype` and the tensors'
        records), and with `checksums=True` (the default) each file's full SHA-256. Files that pass the cheap checks are
        hashed; a file that fails them is reported once. Never writes.

        Args:
            checksums (`bool`, defaults to `True`):
                Hash every file in full (reads the whole directory).

        Returns:
            `list[str]`: one message per damaged file, naming the file and the problem.
        """
        checksums = check_flag("checksums", checksums)
        problems = []
        read = self._read_config()  # (once, for its own checks, the model's and `load_dtype`'s)
        config, fingerprint = self._model_problems(read)
        problem = self._config_problem(read) or config
        if problem is None:  # (a warning, not a problem: the file is the user's to edit)
            self._warn_if_config_edited(read[0])
        if problem is not None:  # (config.json's, or the manifest's where its record of the model type was edited)
            problems.append(f"{read[1].path if read[1] is not None else self.path / 'config.json'} {problem}")
        if fingerprint is not None:
            problems.append(f"{self.manifest_path} {fingerprint}")
        listed = self._side_files_problem()
        if listed is not None:
            problems.append(f"{self.manifest_path} {listed}")
        problems.extend(f"{self.manifest_path} {problem}" for problem in self._records_problems())
        problems.extend(self._side_file_problems(content=True))
        sound = []
        for unit in self.manifest.units:
            self._headers.pop(unit, None)
            try:
                self.header(unit)
                sound.append(unit)
            except ShardFileError as e:  # (the fix of a damaged file is the caller's: `verify`'s summary gives it)
                edited = self._edited_digests(unit) if checksums and e.path == self.files[unit] else None
                if edited is not None:
                    problems.append(f"{self.manifest_path} {edited}")
                elif str(e) not in problems:  # (the manifest's `split_options` edited: the same for every unit)
                    problems.append(str(e) if e.fix is not None else f"{e.path} {e.problem}")
            except ShardDirError as e:
                problems.append(str(e))
        summary = None
        if len(sound) == len(self.manifest.units):  # (and `load_dtype` against a config.json found sound)
            summary = _summary_otherwise(self.manifest) or (
                _load_dtype_differs(self.manifest, read[0]) if problem is None else None
            )
        if summary is not None:  # (the tensors' records all checked against their files': the summary was changed)
            problems.append(f"{self.manifest_path} {summary[0]}. {summary[1]}")
        if checksums:
            problems.extend(self._checksum_problems(sound))
        return problems


def lists_tensors(units: dict[str, UnitEntry], expected: dict[str, dict[str, tuple]]) -> bool:
    """Whether a manifest's `units` list the tensor names and shapes of `expected` (`modeling.expected_tensors` of a
    model), unit by unit. The architecture fingerprint hashes those, the model type and the layers' prefix and number:
    a model that matches them, of the manifest's type and layers, has the fingerprint the split recorded, and where
    the manifest records another, its `fingerprint` was changed since."""
    return set(units) == set(expected) and all(
        {name: t.shape for name, t in units[unit].tensors.items()} == {n: s for n, (s, _) in tensors.items()}
        for unit, tensors in expected.items()
    )


def other_split(manifest: Manifest, header: Header) -> str | None:
    """The digest of the split options a unit's file carries (`SPLIT_KEY`), where it is not the one the manifest
    records (`split_options`): the file is another split's (of another source or with other options), copied in, its
    manifest entry too. `None` where they agree or either is not recorded (a split made before it was, or a file not
    written by a split)."""
    carried = header.metadata.get(SPLIT_KEY)
    recorded = manifest.split_options
    if carried is None or not isinstance(recorded, str) or carried == recorded:
        return None
    return carried


def recorded_otherwise(entry: UnitEntry, header: Header) -> tuple[str, str] | None:
    """The first tensor the manifest records otherwise than the unit's file does, and how (`"quant.quant_type 'fp4'
    (the file: 'nf4')"`), if any: the split writes each tensor's record (shape, dtype, and a quantized one's code,
    block size and parts) into the file's metadata as well as into the manifest, and the file's is covered by its
    digests. `None` also where the file carries no record (not written by a split) or one unreadable."""
    try:
        own = json.loads(header.metadata[TENSORS_KEY])
    except (KeyError, ValueError):
        return None
    listed = {name: t.to_json() for name, t in entry.tensors.items()}
    if not isinstance(own, dict) or own == listed:
        return None
    for name in sorted(set(own) | set(listed)):
        if name not in listed or name not in own:
            return name, "listed in the file, not in the manifest" if name in own else "not listed in the file"
        if own[name] != listed[name]:
            return name, ", ".join(_differences(listed[name], own[name])[:3])
    return None


def _differences(mine, theirs, prefix: str = "") -> list[str]:
    """Where the JSON values `mine` (the manifest's) and `theirs` (a file's) differ, as `key 'mine' (the file:
    'theirs')`, the keys of nested objects dotted."""
    if not isinstance(mine, dict) or not isinstance(theirs, dict):
        return [f"{prefix.rstrip('.') or 'the record'} {mine!r} (the file: {theirs!r})"]
    out = []
    for key in sorted(set(mine) | set(theirs)):
        if mine.get(key) != theirs.get(key):
            out.extend(_differences(mine.get(key), theirs.get(key), f"{prefix}{key}."))
    return out


def _summary_otherwise(manifest: Manifest) -> tuple[str, str] | None:
    """What the manifest's `compression` or `dtype` say otherwise than its tensors' records (checked against the files
    as they are read), with the fix, if anything: the split derives both from the tensors it wrote (the scheme every
    quantized one records; the most common floating dtype), so a difference is an edit since. Streaming reads each
    tensor by its own record; these two set its defaults (the read-ahead depth) and what `inspect` shows."""
    units = manifest.units.values()
    quantized = [(n, t.quant) for u in units for n, t in u.tensors.items() if isinstance(t.quant, dict)]
    fix = "The manifest was changed since the split: set {} back to {}."  # (its keys as JSON has them: no options)
    scheme = manifest.compression
    if quantized and not isinstance(scheme, dict):
        name, quant = quantized[0]
        wanted = json.dumps({k: quant.get(k) for k in _SCHEME_KEYS if k in quant or k not in _SCHEME_DEFAULTS})
        return (
            f'records "compression": {json.dumps(scheme)}, but {len(quantized)} of its tensors are stored quantized '
            f"(e.g. {name!r}: {wanted})",
            fix.format('"compression"', f'{wanted[:-1]}, "quantize_embeddings": ...}} (as split)'),
        )
    if not quantized and scheme is not None:  # (the split of an fp checkpoint claimed compressed: refused without bnb)
        would = _quantized_under(manifest, scheme)
        if would is not None:
            name, entry, parsed = would
            how = (
                f"where a split with it stores {name!r} ({list(entry.shape)} {dtype_name(entry.dtype)}) quantized"
                if parsed
                else "and it is no compression scheme a split writes"
            )
            return (
                f'records "compression": {json.dumps(scheme)}, but none of its tensors is stored quantized, {how}: '
                "the split was made without compression",
                fix.format('"compression"', "null"),
            )
    for key in _SCHEME_KEYS if quantized else ():
        default = _SCHEME_DEFAULTS.get(key)  # (a key written only where it is not its default: as that default)
        stored = {json.dumps(quant.get(key, default)) for _, quant in quantized}
        recorded = scheme.get(key, default)
        # (tensors that differ among themselves: one's record changed, which its file's own record names)
        if len(stored) == 1 and (
            (key not in scheme and key not in _SCHEME_DEFAULTS) or json.dumps(recorded) not in stored
        ):
            said = f'with "{key}": {json.dumps(scheme[key])}' if key in scheme else f'without "{key}"'
            return (
                f'records "compression" {said}, but its {len(quantized)} quantized tensors are stored with '
                f"{next(iter(stored))}",
                fix.format(f'its "{key}"', next(iter(stored))),
            )
    resident = manifest.units.get(RESIDENT)
    if quantized and resident is not None:  # (its tensors, embeddings and head, are quantized only with it true)
        said = scheme.get("quantize_embeddings")
        embedded = [n for n, t in resident.tensors.items() if isinstance(t.quant, dict)]
        would = _quantized_under(manifest, scheme, [resident]) if said is True and not embedded else None
        if (embedded and said is not True) or (would is not None and would[2]):
            what = (
                f"{embedded[0]!r} of its resident unit (the embeddings and head) is stored quantized"
                if embedded
                else "none of its resident unit (the embeddings and head) is stored quantized, where a split with it "
                f"stores {would[0]!r} ({list(would[1].shape)} {dtype_name(would[1].dtype)}) quantized"
            )
            return (
                f'records "compression" with "quantize_embeddings": {json.dumps(said)}, but {what}',
                fix.format('its "quantize_embeddings"', json.dumps(bool(embedded))),
            )
    common, most, floating = _main_dtypes(manifest)
    if manifest.dtype not in common:
        return (
            f'records "dtype": {json.dumps(manifest.dtype)}, but its floating-point tensors are mostly '
            f"{' or '.join(common)} ({most} of {floating}), the dtype the split records",
            fix.format('"dtype"', json.dumps(common[0])),
        )
    return None


def _main_dtypes(manifest: Manifest) -> tuple[list[str], int, int]:
    """The floating dtypes most of the manifest's tensors are stored in (several where tied; `["float32"]` where none is
    floating), as the split records its `dtype`: with how many tensors each, and how many are floating in all."""
    units = manifest.units.values()
    floating = [dtype_name(t.dtype) for u in units for t in u.tensors.values() if t.dtype.is_floating_point]
    most = max((floating.count(d) for d in set(floating)), default=0)
    return sorted(d for d in set(floating) if floating.count(d) == most) or ["float32"], most, len(floating)


def _quantized_under(
    manifest: Manifest, scheme, units: Collection[UnitEntry] | None = None
) -> tuple[str, TensorEntry, bool] | None:
    """Of a manifest none of whose tensors (of `units`; default: all) is stored quantized, a tensor a split with the
    `compression` it records (`scheme`) stores quantized, by its name, shape and dtype (`quant.should_quantize`), and
    `True`; where `scheme` is no scheme a split writes, its first tensor and `False`; `None` where the split quantizes
    none (a model too small for its block size: the split warns so, and records the scheme). Without the model, a
    weight of another module than a linear layer's is taken by its name and shape, as the split decides only with
    the model."""
    from .quant import QuantScheme, should_quantize

    try:
        parsed = QuantScheme.from_dict(scheme)
    except (TypeError, ValueError):
        parsed = None
    for unit in manifest.units.values() if units is None else units:
        for name, t in unit.tensors.items():
            shaped = torch.empty(t.shape, dtype=t.dtype, device="meta")
            if parsed is None or should_quantize(name, shaped, parsed, is_embedding=unit.name == RESIDENT):
                return name, t, parsed is not None
    return None


def _load_dtype_differs(manifest: Manifest, config) -> tuple[str, str] | None:
    """What the manifest's `load_dtype` says otherwise than the shard directory's config.json (`config`, as read) and
    the tensors' records (checked against the files), with the fix, if anything. The split records as `load_dtype` the
    dtype `from_pretrained(dtype="auto")` loads at: the config's `dtype` where it names a floating-point one, which the
    split writes into config.json; with `dtype=`, that one, which it sets on the config too (an earlier hf_layerstream
    left config.json's there, but cast the tensors to it: most are in it). So a `load_dtype` that is neither
    config.json's `dtype` nor the dtype most floating-point tensors are stored in, nor, other than float32, that of
    any (float32: the split keeps norms or routers so at any dtype, and `load_dtype` edited to float32 passed by
    them), was changed since (or config.json's `dtype` was). Where config.json names none (the split then took the
    index's or the first tensor's), nothing is said here: cheap, and never wrong for a split as made (a split now
    records `load_dtype` in each unit file too, which `ShardDirectory.header` compares with the manifest's: an edit is
    named so wherever config.json names no dtype; a directory split before is left unchecked)."""
    if manifest.load_dtype is None or not isinstance(config, dict):
        return None
    value = config.get("dtype") or config.get("torch_dtype")  # (as the split read it: `split._config_dtype`)
    try:
        said = str_to_dtype(value) if isinstance(value, str) else None
    except ValueError:
        return None
    load = str_to_dtype(manifest.load_dtype)
    if said is None or not said.is_floating_point or load == said:
        return None
    common = _main_dtypes(manifest)[0]
    if dtype_name(load) in common:  # (an earlier split's, cast to it: most tensors are)
        return None
    # (a float32 tensor says nothing: the split keeps some in float32, norms or routers, whatever it casts the rest to)
    if load != torch.float32 and any(t.dtype == load for u in manifest.units.values() for t in u.tensors.values()):
        return None
    stored = (
        f"its tensors are mostly stored in {' or '.join(common)} (those in float32 are the ones the split keeps so)"
        if load == torch.float32
        else f"none of its tensors is stored in {manifest.load_dtype}"
    )
    return (
        f'records "load_dtype": {json.dumps(manifest.load_dtype)} (the dtype streaming computes in by default), but '
        f'config.json records "dtype": {json.dumps(dtype_name(said))}, and {stored}: one of the two was changed since '
        "the split (it records config.json's, or the dtype it cast the tensors to)",
        f"Run the same split again {SAME_SPLIT}: it writes both again.",
    )


SAME_SPLIT = "(`split_checkpoint` / `hf-layerstream split`, same source and options)"  # (what "the same split" is)
_RERUN = f"run the same split again {SAME_SPLIT}, which writes the file there"
_SCHEME_KEYS = ("bits", "quant_type", "blocksize", "double_quant")  # (what a quantized tensor records of the scheme)
_SCHEME_DEFAULTS = {"double_quant": False}  # (written only where true: by the scheme and its tensors alike)


def _informative(name: str) -> bool:
    """Whether the side file `name` is one the model runs without (a license file, the model card): a warning."""
    return name == MODEL_CARD_NAME or bool(_LICENSE_FILE.fullmatch(name))


def _side_file_use(name: str) -> str:
    """What reads the side file `name` of a shard directory (`verify`'s message of one missing)."""
    if name == "generation_config.json":
        return "the generation settings streaming gives the model: end-of-sequence ids, sampling defaults"
    if name.startswith(("chat_template.", f"{_CHAT_TEMPLATE_DIR}/")):
        return "a chat template of the tokenizer, which `apply_chat_template` reads"
    if name.endswith("processor_config.json"):
        return "`AutoProcessor.from_pretrained` of the directory reads it"
    return _TOKENIZER_FILE_USE  # (the rest: tokenizer.json, tokenizer_config.json, a vocabulary, special tokens)


_TOKENIZER_FILE_USE = (
    "a file of the tokenizer: `AutoTokenizer.from_pretrained` of the directory fails or tokenizes otherwise"
)


def dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.")


def _stored_layout(entry: UnitEntry) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype | None]]:
    """Stored tensor names -> (shape, dtype) as they must appear in the file (None: checked by the codec)."""
    out: dict[str, tuple[tuple[int, ...] | None, torch.dtype | None]] = {}
    for name, t in entry.tensors.items():
        if t.quant is None:
            out[name] = (t.shape, t.dtype)
        else:
            for part, spec in t.quant.get("parts", {}).items():
                out[f"{name}::{part}"] = (tuple(spec["shape"]), str_to_dtype(spec["dtype"]))
    return out
