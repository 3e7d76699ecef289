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

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._safetensors import Header, read_header, sha256_file, str_to_dtype
from .errors import ShardDirError, ShardFileError
from .modeling import RESIDENT, layer_unit

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "hf_layerstream.shards"
FORMAT_VERSION = 1


def layer_file(index: int) -> str:
    return f"layers/{index:05d}.safetensors"


RESIDENT_FILE = "resident.safetensors"


@dataclass
class TensorEntry:
    shape: tuple[int, ...]
    dtype: torch.dtype  # logical dtype (after dequantization)
    quant: dict[str, Any] | None = None  # codec metadata when stored quantized

    def to_json(self) -> dict:
        d: dict[str, Any] = {"shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch.")}
        if self.quant is not None:
            d["quant"] = self.quant
        return d

    @classmethod
    def from_json(cls, d: dict) -> TensorEntry:
        return cls(tuple(int(s) for s in d["shape"]), str_to_dtype(d["dtype"]), d.get("quant"))


@dataclass
class UnitEntry:
    name: str  # "resident" or "layers.<i>"
    file: str  # relative path inside the shard dir
    size: int
    sha256: str
    tensors: dict[str, TensorEntry]

    @property
    def logical_nbytes(self) -> int:
        """Bytes once dequantized, at the stored logical dtype."""
        total = 0
        for t in self.tensors.values():
            n = 1
            for s in t.shape:
                n *= s
            total += n * t.dtype.itemsize
        return total

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "file": self.file,
            "size": self.size,
            "sha256": self.sha256,
            "tensors": {k: v.to_json() for k, v in self.tensors.items()},
        }

    @classmethod
    def from_json(cls, d: dict) -> UnitEntry:
        return cls(
            d["name"], d["file"], int(d["size"]), d["sha256"], {k: TensorEntry.from_json(v) for k, v in d["tensors"].items()}
        )


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
        }

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        units = [UnitEntry.from_json(u) for u in d["units"]]
        return cls(
            source=d.get("source") or {},
            model_type=d.get("model_type"),
            architectures=list(d.get("architectures") or []),
            layers_prefix=d["layers_prefix"],
            num_layers=int(d["num_layers"]),
            fingerprint=d["fingerprint"],
            dtype=d["dtype"],
            compression=d.get("compression"),
            units={u.name: u for u in units},
            library_version=d.get("library_version", ""),
        )


def _inside(root: Path, rel: str, manifest_path: Path) -> Path:
    """Resolve `rel` inside `root`, refusing absolute paths, `..` and symlinks that leave the directory."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise ShardFileError(manifest_path, f"names the path {rel!r}, which is not a relative path inside the directory")
    path = root / rel
    try:
        resolved = path.resolve(strict=False)
    except (OSError, RuntimeError) as e:  # symlink loop
        raise ShardFileError(path, f"cannot be resolved ({e})") from e
    if not resolved.is_relative_to(root.resolve()):
        raise ShardFileError(manifest_path, f"names {rel!r}, which resolves outside the directory to {resolved}")
    return path


class ShardDirectory:
    """A validated shard directory (read-only: opening it never writes).

    Opening checks the manifest and, cheaply, that every file exists with the recorded size and a header that
    matches the manifest; `verify(checksums=True)` also hashes every file.
    """

    def __init__(self, path: str | os.PathLike, *, check_files: bool = True):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"`shard_dir` must be a str or os.PathLike, got {type(path).__name__}.")
        self.path = Path(path)
        fix = "create it with `split_checkpoint(source, shard_dir)` or `hf-layerstream split SOURCE SHARD_DIR`"
        if not self.path.exists():
            raise FileNotFoundError(f"`shard_dir` {self.path} does not exist; {fix}.")
        if not self.path.is_dir():
            raise ShardDirError(f"`shard_dir` {self.path} is not a directory; {fix}.")
        manifest_path = self.path / MANIFEST_NAME
        if not manifest_path.is_file():
            partial = (self.path / ".progress.json").exists()
            hint = " It holds an unfinished split: run the same split again to finish it." if partial else ""
            raise ShardDirError(f"`shard_dir` {self.path} has no {MANIFEST_NAME}, so it is not a shard directory;{hint} {fix}.")
        try:
            raw = json.loads(manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShardFileError(manifest_path, f"is not readable JSON ({e})") from e
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            raise ShardFileError(manifest_path, f"is not an hf_layerstream manifest (format {raw.get('format')!r})" if isinstance(raw, dict) else "is not a JSON object")
        if raw.get("format_version") != FORMAT_VERSION:
            raise ShardFileError(
                manifest_path,
                f"has format version {raw.get('format_version')!r}, this library reads version {FORMAT_VERSION}",
                "Re-split the checkpoint with this version of hf_layerstream.",
            )
        try:
            self.manifest = Manifest.from_json(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise ShardFileError(manifest_path, f"is malformed ({type(e).__name__}: {e})") from e
        self.manifest_path = manifest_path
        expected = {RESIDENT} | {layer_unit(i) for i in range(self.manifest.num_layers)}
        if set(self.manifest.units) != expected:
            missing = sorted(expected - set(self.manifest.units))
            extra = sorted(set(self.manifest.units) - expected)
            raise ShardFileError(manifest_path, f"lists the wrong units (missing {missing[:5]}, unexpected {extra[:5]})")
        self.files: dict[str, Path] = {u: _inside(self.path, e.file, manifest_path) for u, e in self.manifest.units.items()}
        self._headers: dict[str, Header] = {}
        if check_files:
            for unit in self.manifest.units:
                self.header(unit)

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
            raise ShardFileError(path, "is missing")
        header = read_header(path, expected_size=entry.size)
        stored = _stored_layout(entry)
        if set(header.tensors) != set(stored):
            diff = sorted(set(header.tensors) ^ set(stored))
            raise ShardFileError(path, f"holds different tensors than the manifest records (e.g. {diff[:3]})")
        for name, (shape, dtype) in stored.items():
            info = header.tensors[name]
            if shape is not None and (info.shape != shape or info.dtype != dtype):
                raise ShardFileError(
                    path,
                    f"stores {name!r} as {list(info.shape)} {info.dtype} but the manifest records {list(shape)} {dtype}",
                )
        self._headers[unit] = header
        return header

    def verify(self, *, checksums: bool = True) -> list[str]:
        """Check every file against the manifest; return a list of problems (empty when the directory is sound)."""
        problems = []
        for unit, entry in self.manifest.units.items():
            self._headers.pop(unit, None)
            try:
                self.header(unit)
                if checksums and sha256_file(self.files[unit]) != entry.sha256:
                    problems.append(f"{self.files[unit]}: checksum does not match the manifest (corrupted)")
            except ShardDirError as e:
                problems.append(str(e))
        return problems


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
