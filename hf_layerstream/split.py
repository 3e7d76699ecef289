"""`split_checkpoint`: turn a transformers checkpoint into a shard directory, once."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shlex
import shutil
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from . import __version__
from ._safetensors import (
    _MAX_HEADER,
    _TAGS,
    atomic_write_bytes,
    atomic_write_safetensors,
    dtype_to_str,
    fsync_dir,
    read_header,
    remove_stale_tmp_files,
    sample_digest,
    sha256_file,
    source_fix,
    str_to_dtype,
)
from .engine import size_text
from .errors import ShardDirError, ShardDirOccupiedError, ShardFileError
from .modeling import (
    RESIDENT,
    architecture_fingerprint,
    auto_class_for,
    build_as,
    check_flag,
    check_path,
    conversion_record,
    convert_unit,
    created_dtypes,
    dtype_configs,
    expected_tensors,
    kept_in_float32,
    layer_unit,
    plan_conversion,
    require_layer_stack,
    resolve_dtype,
    unit_index,
)
from .quant import _BNB_DTYPES, all_finite
from .shard_dir import (
    _CHAT_TEMPLATE_DIR,
    _LICENSE_FILE,
    FORMAT_VERSION,
    LOAD_DTYPE_KEY,
    LOCK_NAME,
    MANIFEST_NAME,
    MODEL_CARD_NAME,
    RESIDENT_FILE,
    SPLIT_KEY,
    TENSORS_KEY,
    Manifest,
    ShardDirectory,
    TensorEntry,
    UnitEntry,
    _is_newer_format,
    _load_dtype_differs,
    check_revision,
    check_token,
    config_digest,
    hub_cache_of,
    hub_download_of,
    hub_repo_of,
    layer_file,
    lists_tensors,
    read_adapter_record,
    read_side_files,
    recorded_otherwise,
    redownload_command,
    side_file_damage,
    warn_hub_only,
)

logger = logging.getLogger(__name__)

PROGRESS_NAME = ".progress.json"
_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",  # (WordPiece tokenizers)
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",  # (T5, GPT-SW3, CPM: also found by `_tokenizer_files`, unless sentencepiece is missing here)
    "tiktoken.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    # a vision-language model's processor (`AutoProcessor.from_pretrained(shard_dir)`)
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
)
_TOKENIZER_FILES = (  # (any of them: the source has a tokenizer)
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tiktoken.model",
)
_SAMPLE = 64 * 1024  # bytes read at each end of a local weight file for the source's identity
# safetensors files the split holds open at most (safetensors 0.9 holds a file descriptor for each): the least recently
# read is closed first, and opened again (its header read) when read again (see `_Source._open`)
_MAX_OPEN = 64
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
# transformers' order (`_get_resolved_checkpoint_files`): safetensors before pickled `.bin`, each single file before
# its index (a folder holding both, with other weights, loads the single file)
_PREFERENCE = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# config.json's key naming the weights `from_pretrained` loads in place of `_PREFERENCE`'s (`_Source._explicit_weights`)
_EXPLICIT_WEIGHTS_KEY = "transformers_weights"
_EXPLICIT_SUFFIXES = (".safetensors", ".safetensors.index.json")


# --- sources -----------------------------------------------------------------------------------------------------


def missing_local_folder(source: str | os.PathLike) -> bool:
    """Whether `source` names a local path, not a hub repo id, and no folder is there: a path object, or text
    starting with `.`, `/` or `~`, with more than one `/`, naming something that exists (a file:
    `llama/config.json` read as a repo id went to the hub, and offline failed with a connection error), or that
    huggingface_hub refuses as a repo id (`models\\llama`, `my models/llama`, `llama/`: its message, about repo ids,
    was the error of a misspelt folder)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = str(source)
    local = Path(text).expanduser()
    if local.is_dir():
        return False
    # (`lexists`: a dangling symlink, such as one to a disk not mounted, is a path too)
    if (
        isinstance(source, os.PathLike)
        or text.startswith((".", "/", "~"))
        or text.count("/") > 1
        or os.path.lexists(local)
    ):
        return True
    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return False


def hub_unreachable_error(
    repo_id: str,
    filename: str,
    role: str,
    what: str = "checkpoint folder",
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> FileNotFoundError:
    """The error for a file of the hub repo `repo_id` (given as `role`, e.g. "`source`") that could not be fetched:
    the hub cannot be reached and the file is not in the hub cache. For the first file fetched (config.json,
    adapter_config.json, a shard directory's manifest.json, a tokenizer's tokenizer_config.json), it says that no
    local folder has that name either (a misspelt folder name reads as a hub repo id, and meets this first). `what`: what a local `role` is (a checkpoint
    folder, an adapter folder); `revision`: the one asked for, named; `cache_dir`: the hub cache given, where the
    download it names goes."""
    no_folder = ""
    at, option = (f" at revision {revision!r}", f" --revision {revision}") if revision is not None else ("", "")
    if cache_dir is not None:
        option += f" --cache-dir {shlex.quote(str(cache_dir))}"
    if filename in ("config.json", "adapter_config.json", "manifest.json", "tokenizer_config.json"):
        no_folder = (
            f"{role} {repo_id!r} is no local folder ({Path(repo_id).absolute()} does not exist), and as a hub repo: "
        )
    # a short commit hash: the hub resolves it, the hub cache knows its snapshots by the full hash only
    commits = []
    if revision is not None and 4 <= len(revision) < 40 and all(c in "0123456789abcdef" for c in revision):
        from huggingface_hub import constants

        snapshots = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
        commits = sorted(p.name for p in snapshots.glob(f"{revision}*") if len(p.name) == 40)
    if commits:
        return FileNotFoundError(
            f"{no_folder}Cannot fetch {filename} of {repo_id!r}{at}: the hub cannot be reached "
            f"({unreachable_reason()}) to resolve that short commit hash, and the hub cache names commits by their "
            f"full hash: give it whole (its snapshot of {repo_id!r} there: {' or '.join(commits)})."
        )
    return FileNotFoundError(
        f"{no_folder}Cannot fetch {filename} of {repo_id!r}{at}: the hub cannot be reached ({unreachable_reason()}) "
        f"and it is not in the hub cache. Download it once with network access (`hf download {repo_id}{option}`) or pass "
        f"a local {what} as {role}."
    )


def unreachable_reason() -> str:
    """Why the hub cannot be reached, as a message says it: offline mode (HF_HUB_OFFLINE, with the value it is set to),
    else the network or the hub (it said "offline, HF_HUB_OFFLINE=0" there, the variable unset)."""
    if not _is_offline():
        return "no network, or the hub is down"
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # (huggingface_hub reads either)
        value = os.environ.get(variable, "")
        if value.strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"offline, {variable}={value}"
    return "offline, huggingface_hub.constants.HF_HUB_OFFLINE set"  # (set in the program, not by the variable)


def fetch_hub_file(
    repo_id: str,
    filename: str,
    role: str,
    *,
    token: str | bool | None = None,
    cache_dir=None,
    what: str = "checkpoint folder",
    revision: str | None = None,
) -> Path | None:
    """`filename` of the hub repo `repo_id` (given as `role`), fetched or found in the hub cache (`revision`, `token`,
    `cache_dir`: `hf_hub_download`'s); `None` where the repo has no such file.

    Raises:
        `FileNotFoundError`: The hub cannot be reached and the file is not in the hub cache (`hub_unreachable_error`,
            naming a local `what` as the other way), or the hub has no such repo (`no_such_repo_error`) or revision.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        cache_only = cannot_reach_hub(repo_id, filename, revision) is not None
        return Path(
            hf_hub_download(
                repo_id, filename, revision=revision, token=token, cache_dir=cache_dir, local_files_only=cache_only
            )
        )
    except LocalEntryNotFoundError as e:  # (a subclass of EntryNotFoundError: first)
        raise hub_unreachable_error(repo_id, filename, role, what, revision, cache_dir) from e
    except EntryNotFoundError:
        return None
    except GatedRepoError as e:  # (a subclass of RepositoryNotFoundError: first)
        raise gated_repo_error(repo_id, role, e) from e
    except RepositoryNotFoundError as e:
        raise no_such_repo_error(repo_id, role) from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(
            f"{role} {repo_id!r} has no revision {revision!r} on the hub (a branch, tag or commit of the repo)."
        ) from e


def gated_repo_error(repo_id: str, role: str, error: Exception) -> PermissionError:
    """The error for a gated hub repo (given as `role`) this user has no access to, with the hub's own message (which
    names the page to ask for access on)."""
    return PermissionError(
        f"{role} {repo_id!r} is a gated hub repo that this user cannot access: ask for access on its page, then log in "
        f"(`hf auth login`) or set HF_TOKEN, or pass a `token` where one is taken. The hub said: {error}"
    )


def no_such_repo_error(repo_id: str, role: str) -> FileNotFoundError:
    """The error for a hub repo id (given as `role`) the hub does not know (or that is gated without a token)."""
    return FileNotFoundError(
        f"{role} {repo_id!r} is not a local folder and the hub has no such repo (or it is gated and no `token` was "
        "given)."
    )


class _Source:
    """A checkpoint to read from, local or on the hub. The keys come from the weight files, as transformers loads them
    (see `_keys_of_files`); a hub repo's files the split reads are fetched into the hub cache before it writes a
    layer (`read_keys_of_files`)."""

    def __init__(self, source: str | os.PathLike, *, revision: str | None, token: str | bool | None, cache_dir):
        self.description = str(source)
        self.revision = revision
        self._token = token
        self._cache_dir = cache_dir
        local = Path(source).expanduser()
        self.local_dir: Path | None = local if local.is_dir() else None
        if self.local_dir is not None:
            # (`token`: by `split_checkpoint`, where no `adapter` is a hub one, which it serves too)
            warn_hub_only(local, "split as it is", revision=revision)
            self.revision = None  # (nor recorded: a later run without it is the same split)
        if self.local_dir is None:
            if local.is_file():
                # (it was "neither an existing local checkpoint folder nor a hub repo id", though it exists)
                raise FileNotFoundError(
                    f"`source` {source} is a file, not a checkpoint folder: pass the folder that holds config.json and "
                    f"the weight files ({local.parent}, if it is this file's)."
                )
            if missing_local_folder(source):
                raise FileNotFoundError(
                    f"`source` {source} is neither an existing local checkpoint folder nor a hub repo id "
                    "(`organization/name`). Pass the folder that holds config.json and the weight files."
                )
            self.repo_id = str(source)
        self._handles: dict[str, Any] = {}
        # set when a file the checkpoint may lack could not be fetched for want of the hub (see `fetch`)
        self.hub_unreachable = False
        self.index_metadata: dict = {}  # the checkpoint index's `metadata` (transformers reads a `dtype` there)
        self.files: list[str] = []  # the weight files, in the order transformers loads them
        self._listed: dict[str, set[str]] = {}  # (see `_keys_of_files`)
        # a hub repo's safetensors file not on this machine -> its tensors' dtypes, from its header read over the
        # network (`_find`, and `read_keys_of_files` with `headers_only`)
        self._remote: dict[str, dict[str, torch.dtype]] = {}
        self._remote_shapes: dict[str, dict[str, tuple[int, ...]]] = {}  # (their shapes, from the same headers)
        self.headers_only = False  # (`remove_from_cache`: see `read_keys_of_files`)
        self._weight_map: dict = {}
        self.config_path = self.fetch("config.json", required=True)
        self.keys = self._list_keys()

    def fetch(self, filename: str, *, required: bool = False) -> Path | None:
        if self.local_dir is not None:
            path = self.local_dir / filename
            if path.is_file():
                return path
            if required and filename == "config.json":
                raise FileNotFoundError(
                    f"`source` {self.local_dir} has no {filename}; it is not a transformers checkpoint folder."
                )
            if required:  # (a weight file its checkpoint index names)
                raise FileNotFoundError(
                    f"`source` {self.local_dir} has no {filename}, which its checkpoint index names: the download or "
                    "copy of the checkpoint looks incomplete. Finish it and run the split again."
                )
            return None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

        down = cannot_reach_hub(self.repo_id, filename, self.revision)
        try:
            path = Path(
                hf_hub_download(
                    self.repo_id,
                    filename,
                    revision=self.revision,
                    token=self._token,
                    cache_dir=self._cache_dir,
                    # once the hub was found unreachable, a file the checkpoint may lack is looked up in the cache
                    # only: huggingface_hub retries each lookup of a file it has not cached for about 20 s (every
                    # file, where one connection did not reach the hub: `cannot_reach_hub`)
                    local_files_only=self.hub_unreachable and not required or down is not None,
                )
            )
        except LocalEntryNotFoundError as e:
            # (a subclass of EntryNotFoundError: must come first) the hub unreachable (HF_HUB_OFFLINE, no network, the
            # hub down) and the file not in the hub cache
            if not required:
                # taken as absent, whatever HF_HUB_OFFLINE says, as `from_pretrained` takes it (transformers'
                # `cached_file(..., _raise_exceptions_for_connection_errors=False)`): a repo all in the cache splits
                # from it when the hub cannot be reached
                if not self.hub_unreachable and not _is_offline():  # (HF_HUB_OFFLINE=1 asked for it)
                    logger.warning(
                        "The hub cannot be reached (%s); splitting %r from the hub cache, where files it does not "
                        "hold (such as %s) are taken as absent from the repo",
                        down or type(e.__cause__ or e).__name__,
                        self.repo_id,
                        filename,
                    )
                self.hub_unreachable = True
                return None
            raise hub_unreachable_error(
                self.repo_id, filename, "`source`", revision=self.revision, cache_dir=self._cache_dir
            ) from e
        except EntryNotFoundError:
            if required:
                raise FileNotFoundError(f"The hub repo {self.repo_id!r} has no {filename}.") from None
            return None
        except RepositoryNotFoundError as e:
            raise no_such_repo_error(self.repo_id, "`source`") from e
        if self.revision is None or len(self.revision) != 40:
            # cache layout: .../snapshots/<commit>/<filename>
            commit = path.parent.name
            if len(commit) == 40:
                self.revision = commit
        return path

    def _cache_only(self) -> bool:
        """Whether the hub repo is read from the hub cache only: offline mode, or the hub found unreachable (a file it
        could not fetch, or `cannot_reach_hub`'s one connection; listing the repo's files retried for 23 s)."""
        down = self.hub_unreachable or _is_offline()
        return down or cannot_reach_hub(self.repo_id, "config.json", self.revision) is not None

    def chat_templates(self) -> list[str]:
        """The file names in the checkpoint's `additional_chat_templates/` folder (`*.jinja`), which
        `AutoTokenizer.from_pretrained` loads as named chat templates; on the hub, listed with transformers'
        `list_repo_templates` (the hub cache's when the hub cannot be reached). Empty where it cannot tell."""
        if self.local_dir is not None:
            folder = self.local_dir / _CHAT_TEMPLATE_DIR
            names = [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
        else:
            try:
                from transformers.utils.hub import list_repo_templates

                names = list_repo_templates(
                    self.repo_id,
                    local_files_only=self._cache_only(),
                    revision=self.revision,
                    cache_dir=self._cache_dir,
                    token=self._token,
                )
            except Exception as e:  # noqa: BLE001 - the templates are optional
                logger.warning("Cannot list %s/ of %r (%s); not copied", _CHAT_TEMPLATE_DIR, self.repo_id, e)
                return []
        # (listed online with their `.jinja`, from the cache without it, as transformers does)
        names = {n.removesuffix(".jinja") + ".jinja" for n in names if isinstance(n, str)}
        return sorted(n for n in names if "/" not in n and "\\" not in n and not n.startswith("."))

    def license_files(self) -> list[str]:
        """The names of the checkpoint's license and notice files (`LICENSE`, `LICENSE.txt`, `NOTICE`, Llama's
        `USE_POLICY.md`, DeepSeek's `LICENSE-MODEL`...: `_LICENSE_FILE`), at its top level, which a shared split
        must carry; on the hub, listed with `HfApi.list_repo_files` (the hub cache's snapshot where the hub cannot be
        reached). Empty where it cannot tell."""
        if self.local_dir is not None:
            names = [p.name for p in self.local_dir.iterdir() if p.is_file()]
        elif self._cache_only():
            names = [p.name for p in self.config_path.parent.iterdir() if p.is_file()]
        else:
            try:
                from huggingface_hub import HfApi

                names = HfApi().list_repo_files(self.repo_id, revision=self.revision, token=self._token)
            except Exception as e:  # noqa: BLE001 - the files are copied where they can be listed
                logger.warning("Cannot list the files of %r (%s); its license files are not copied", self.repo_id, e)
                return []
        return sorted(n for n in names if _LICENSE_FILE.fullmatch(n))

    def _explicit_weights(self) -> str | None:
        """config.json's `transformers_weights`: the one weight file (`.safetensors`) or index
        (`.safetensors.index.json`) `from_pretrained` loads, whatever else the folder holds
        (`_get_resolved_checkpoint_files`' `transformers_explicit_filename`), checked as it checks it: such a name
        (or `adapter_model.bin`), inside the checkpoint's folder (a subfolder too). `None` where config.json names
        none."""
        data = _read_json(self.config_path)
        name = data.get(_EXPLICIT_WEIGHTS_KEY) if isinstance(data, dict) else None
        if name is None:
            return None
        where = self.local_dir or self.repo_id
        if not isinstance(name, str) or not (name.endswith(_EXPLICIT_SUFFIXES) or name == "adapter_model.bin"):
            raise ValueError(
                f"`source` {where}: config.json's `{_EXPLICIT_WEIGHTS_KEY}` {name!r} is neither a safetensors file "
                "(*.safetensors) nor a safetensors index file (*.safetensors.index.json); `from_pretrained` refuses it "
                "too."
            )
        if not _inside_name(name):
            raise ValueError(
                f"`source` {where}: config.json's `{_EXPLICIT_WEIGHTS_KEY}` must name a file inside the checkpoint's "
                f"folder, got {name!r}"
            )
        return name

    def _find(self, filename: str) -> bool:
        """Whether the source has the weight file `filename` (`fetch`'s `None`: it has not). A hub repo's safetensors
        file not in the hub cache is not downloaded for this: its header is read from the hub (its keys and dtypes
        kept in `_remote`), so that the split downloads it only once its checks passed (the disk space's counts it),
        when the first unit reads it. Where the header cannot be read so, the file is fetched, as before."""
        if (
            self.local_dir is None
            and filename.endswith(".safetensors")
            and self._local_weight_file(filename) is None
            and not self._cache_only()
        ):
            try:
                self._read_remote_header(filename)
                return True
            except FileNotFoundError:  # (the hub says the repo has no such file)
                return False
            except OSError as e:  # (the hub unreachable, a proxy refusing range requests: `fetch` says or serves)
                logger.info("Could not read the header of %s from the hub (%s); fetching it", filename, e.__cause__)
        return self.fetch(filename) is not None

    def _list_keys(self) -> dict[str, str]:
        explicit = self._explicit_weights()
        if explicit is not None and not self._find(explicit):
            where = self.local_dir or self.repo_id
            cache = " in the hub cache, and the hub cannot be reached" if self.hub_unreachable else ""
            raise FileNotFoundError(
                f"`source` {where} has no {explicit}{cache}: the weights its config.json names "
                f"(`{_EXPLICIT_WEIGHTS_KEY}`), which `from_pretrained` loads instead of any other weight file."
            )
        # the file config.json names, else transformers' preference (see `_PREFERENCE`)
        for name in _PREFERENCE if explicit is None else (explicit,):
            if name in _SINGLE_FILES or name == explicit and not name.endswith(".index.json"):
                if self._find(name):
                    self.files, self._listed = [name], {}
                    if name in self._remote and self._local_weight_file(name) is None:  # (its header, from the hub)
                        return dict.fromkeys(self._remote[name], name)
                    return dict.fromkeys(self._open(name).keys(), name)
                continue
            index = self.fetch(name)
            if index is not None:
                try:
                    data = json.loads(index.read_text())
                    weight_map = data["weight_map"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ShardFileError(index, f"is not a valid checkpoint index ({e})") from e
                if isinstance(data.get("metadata"), dict):
                    self.index_metadata = data["metadata"]
                if not isinstance(weight_map, dict):
                    raise ShardFileError(index, "is not a valid checkpoint index (`weight_map` is not an object)")
                names = {filename: _check_plain_name(index, filename) for filename in set(weight_map.values())}
                return self._keys_of_files({key: names[filename] for key, filename in weight_map.items()})
        where = self.local_dir or self.repo_id
        if self.hub_unreachable:
            raise FileNotFoundError(
                f"`source` {where} has no weights in the hub cache, and the hub cannot be reached "
                f"({unreachable_reason()}) to fetch them: expected one of {', '.join(_PREFERENCE)}. "
                "Download the repo once with network access (`hf download REPO`) or pass a local checkpoint folder "
                "as `source`."
            )
        if self.fetch(MANIFEST_NAME) is not None:  # (a shard directory: its weights are in `layers/`)
            raise FileNotFoundError(
                f"`source` {where} is a shard directory (it holds {MANIFEST_NAME}), not a checkpoint: stream it as it "
                "is, or split the checkpoint it was made from (`manifest.json` names it) to make another."
            )
        raise FileNotFoundError(f"`source` {where} has no weights: expected one of {', '.join(_PREFERENCE)}.")

    def _keys_of_files(self, weight_map: dict) -> dict[str, str]:
        """Checkpoint key -> the weight file transformers loads it from. `from_pretrained` takes only the file list
        from an index and loads every tensor each file holds, in sorted order, a later file's over an earlier one's
        (`merged_state_dict.update`), whatever `weight_map` says of the key. So does this, from the headers of the
        files on this machine (a `.bin` file's pickle, mapped); a hub file not downloaded yet is taken as the index
        lists it (in `_listed`) until `read_keys_of_files` fetches it."""
        self._weight_map = weight_map
        self.files = sorted(set(weight_map.values()))
        self._listed = {}
        keys: dict[str, str] = {}
        for filename in self.files:
            path = self._local_weight_file(filename)
            if path is None and filename in self._remote:
                names = list(self._remote[filename])
            elif path is None:
                names = self._listed[filename] = {str(k) for k, f in weight_map.items() if f == filename}
            elif filename.endswith(".safetensors"):
                names = read_header(path, source=True).tensors
            else:
                names = [k for k, v in self._open(filename).items() if isinstance(v, torch.Tensor)]
                del self._handles[filename]  # (read again when needed: a pre-1.6 pickle is read whole)
            keys.update(dict.fromkeys(names, filename))
        return keys

    def read_keys_of_files(self, files: set[str], *, download: bool = True) -> bool:
        """Fetch those of `files` (the weight files the split reads, by the index) not on this machine yet and take the
        keys from them, as transformers does (see `_keys_of_files`); all of the index's files where one of them does
        not hold what the index lists for it. Returns whether a key then comes from another file than planned.

        With `headers_only` (`remove_from_cache`), a safetensors file is not downloaded: its header is read from the
        hub (a range request), which lists its keys and dtypes. A `.bin` file is downloaded (its keys are in its
        pickle), unless `download=False`: it is then taken as the index lists it, for now."""
        if not self._listed:  # (every file's own keys known: a local folder, a repo in the hub cache)
            return False
        listed = dict(self._listed)
        self._take_keys(sorted(files & listed.keys()), download)
        keys = self._keys_of_files(self._weight_map)
        if any(f not in self._listed and {k for k, g in keys.items() if g == f} != v for f, v in listed.items()):
            self._take_keys(sorted(self._listed), download)
            keys = self._keys_of_files(self._weight_map)
        moved, self.keys = keys != self.keys, keys
        return moved

    def _take_keys(self, filenames: list[str], download: bool) -> None:
        """Fetch `filenames`, or read their headers from the hub (see `read_keys_of_files`)."""
        heads = [f for f in filenames if self._reads_headers() and f.endswith(".safetensors") and f not in self._remote]
        if heads:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(8, len(heads))) as pool:
                list(pool.map(self._read_remote_header, heads))  # (each into `_remote` and `_remote_shapes`)
        for filename in filenames:
            if filename not in heads and (download or filename.endswith(".safetensors")):
                self.fetch(filename, required=True)

    def _reads_headers(self) -> bool:
        """Whether a hub file's keys are read from its header on the hub, not downloaded (`headers_only`): not where
        the hub cannot be reached (the download then says what is wrong, or the cache serves)."""
        return self.headers_only and self.local_dir is None and not self._cache_only()

    def _read_remote_header(self, filename: str) -> None:
        """Read the header of `filename`, a safetensors file of this hub repo, on the hub, into `_remote` (the dtypes of
        its tensors, as `read_header` lists them: sub-byte dtypes are not; a dtype it does not know fails when the file
        is read) and `_remote_shapes` (their shapes)."""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import EntryNotFoundError

        from ._safetensors import _SOURCE_DTYPES

        try:
            meta = HfApi().parse_safetensors_file_metadata(
                self.repo_id, filename, revision=self.revision, token=self._token
            )
        except EntryNotFoundError:
            raise FileNotFoundError(
                f"The hub repo {self.repo_id!r} has no {filename}, which its index names."
            ) from None
        except Exception as e:  # noqa: BLE001 - re-raised naming the file and what to do
            raise OSError(
                f"Could not read the header of {filename} of the hub repo {self.repo_id!r} ({type(e).__name__}: {e}). "
                "`remove_from_cache` reads the weight files' headers from the hub before it downloads them; check the "
                "network, or split without it."
            ) from e
        # (the shapes too, for `stored_shapes`: a checkpoint that does not match its config is refused before the
        # file is downloaded)
        self._remote_shapes[filename] = {k: tuple(i.shape) for k, i in meta.tensors.items()}
        self._remote[filename] = {
            k: _SOURCE_DTYPES[i.dtype] for k, i in meta.tensors.items() if i.dtype in _SOURCE_DTYPES
        }

    def remove_from_cache(self, files: set[str]) -> None:
        """Delete `files`, weight files of this hub repo, from the hub cache (`remove_from_cache`): each one's entry in
        the snapshot, and the blob it links to unless another snapshot of the repo links to it too (another revision
        holding the same file). A file not in the cache is skipped; one that cannot be deleted is warned about."""
        snapshots = self.config_path.parents[1]
        blobs = Path(os.path.realpath(snapshots.parent / "blobs"))
        for filename in sorted(files):
            self._handles.pop(filename, None)
            path = self._local_weight_file(filename)
            if path is None:
                continue
            blob = Path(os.path.realpath(path)) if path.is_symlink() else None
            if blob is not None and blob.parent != blobs:  # (a link the user made to a file elsewhere: only the link)
                blob = None
            try:
                path.unlink()
                if blob is not None and not any(
                    link.is_symlink() and Path(os.path.realpath(link)) == blob for link in snapshots.rglob("*")
                ):
                    blob.unlink()
            except OSError as e:  # (Windows: a file still mapped)
                logger.warning("Could not remove %s from the hub cache (%s); it stays there", path, e)
            else:
                logger.info("Removed %s from the hub cache, its tensors written into the split", filename)

    def _open(self, filename: str):
        if filename in self._handles:
            handle = self._handles[filename] = self._handles.pop(filename)  # (last: the most recently read)
            return handle
        if not _inside_name(filename):  # (checked where the names are read too: `_check_plain_name`)
            raise ShardFileError(filename, "is named by the checkpoint index but is not a file in the checkpoint")
        path = self.fetch(filename, required=True)
        if filename.endswith(".safetensors"):
            from safetensors import safe_open

            read_header(path, source=True)  # a clear error for a truncated / hostile header before safetensors sees it
            # (a unit reading more files than the limit on open files, a layer stored an expert per file, failed with
            # "Too many open files" under safetensors 0.9 before its first tensor was written; `release` keeps the
            # count down across units)
            held = [f for f in self._handles if f.endswith(".safetensors")]
            for least_recent in held[: max(len(held) + 1 - _MAX_OPEN, 0)]:
                del self._handles[least_recent]
            handle = safe_open(path, framework="pt", device="cpu")
        else:
            import pickle
            import zipfile

            # weights_only=True refuses pickles that would run code; mmap keeps memory at one unit. torch can map
            # only the zip format (torch.save's since torch 1.6): a file in the older format is read whole, as
            # transformers' `load_state_dict` reads it (it passes mmap only for a zip file too).
            mmap = zipfile.is_zipfile(path)
            try:
                with _ctrl_c_noted():
                    handle = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except pickle.UnpicklingError as e:  # (what weights_only raises for what it refuses to unpickle)
                raise ShardFileError(
                    path,
                    f"cannot be loaded safely with torch.load(weights_only=True): {type(e).__name__}: {e}",
                    "Only load checkpoints you trust; convert it to safetensors, or use the original publisher's files.",
                ) from e
            except Exception as e:  # noqa: BLE001 - re-raised with the file name
                _interrupted_inside(e)
                raise ShardFileError(
                    path, f"cannot be read by torch.load: {type(e).__name__}: {e}", source_fix(path)
                ) from e
            if not isinstance(handle, dict):
                raise ShardFileError(path, "does not hold a state dict", source_fix(path))
        self._handles[filename] = handle
        return handle

    def to_download(self, files: set[str]) -> tuple[dict[str, int], Path] | None:
        """Those of `files` (weight files the split reads) a hub repo's cache lacks, which the split is to download,
        with their sizes in bytes (as the hub lists them), and the hub cache folder they go to; `None` for a local
        folder, where none is to be downloaded, or where the hub cannot tell the sizes (unreachable: nothing is
        downloaded then, the split stops at the first file it lacks)."""
        if self.local_dir is None:
            missing = sorted(f for f in files if self._local_weight_file(f) is None)
        if self.local_dir is not None or not missing or self._cache_only():
            return None
        try:
            from huggingface_hub import HfApi

            listed = HfApi().get_paths_info(self.repo_id, missing, revision=self.revision, token=self._token)
            sizes = {info.path: info.size for info in listed if isinstance(getattr(info, "size", None), int)}
        except Exception as e:  # noqa: BLE001 - only a check of the disk space; the download says what is wrong
            logger.info("Could not list the sizes of %s's weight files (%s: %s)", self.repo_id, type(e).__name__, e)
            return None
        # (the snapshot folder of config.json: on the disk the blobs are downloaded to, beside it in the repo's folder)
        return {f: sizes.get(f, 0) for f in missing}, self.config_path.parent

    def missing_files(self, files: set[str]) -> list[str]:
        """Those of `files` a local folder lacks (a hub repo's are fetched when first needed)."""
        if self.local_dir is None:
            return []
        return sorted(f for f in files if not (self.local_dir / f).is_file())

    def _local_weight_file(self, filename: str) -> Path | None:
        """The weight file if it is on this machine already (local folder or hub cache); never downloads."""
        if self.local_dir is not None:
            path = self.local_dir / filename
            return path if path.is_file() else None
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(self.repo_id, filename, cache_dir=self._cache_dir, revision=self.revision)
        except Exception:  # noqa: BLE001 - only an optimisation
            return None
        return Path(cached) if isinstance(cached, str) else None

    def identity(self, files: set[str] | None = None, *, legacy: bool = False) -> dict[str, Any]:
        """What the split is made from, recorded with it, so that resuming or re-running it from *another* checkpoint
        of the same architecture (same shapes, other weights) is refused instead of mixing two models' layers.

        A hub repo: its id, the commit and the weight files' names (the commit fixes every file; what the hub cache
        happens to hold must not count: a sharded repo's files are fetched during the split, and a later run would
        find them cached). A local folder: its path, every weight file's name and, for each of `files` (those the
        split reads: they hold a tensor the model needs, and `split_checkpoint` refuses a folder that lacks one),
        its size, safetensors header and first and last 64 KiB (a checkpoint saved again in place, with the same
        shapes, differs there). The other files hold only tensors the model does not use, so the split does not
        depend on them: they count by name only, and may be absent (a download of what a text-only split needs) or
        arrive later without the split being taken for another source's. Counting whatever was present made it
        depend on how far a download had got: a split resumed after the download completed was refused.

        `files=None`: the content of every weight file found on this machine, as the identity was recorded before
        (a split finished then is still recognized as this one). `legacy`: as hf_layerstream 0.1.0 recorded it
        (sizes and headers of the files found on this machine, hub or local, no samples); likewise recognized.
        """
        import hashlib

        h = hashlib.sha256()
        for filename in self.files:
            h.update(filename.encode() + b"\0")
            if self.local_dir is None and not legacy:
                continue
            if files is not None and not legacy and filename not in files:
                continue
            path = self._local_weight_file(filename)
            if path is None:  # (legacy, `files=None`: a file not downloaded yet)
                continue
            size = path.stat().st_size
            h.update(str(size).encode() + b"\0")
            with open(path, "rb") as f:
                if filename.endswith(".safetensors"):
                    prefix = f.read(8)
                    if len(prefix) == 8:
                        h.update(f.read(min(int.from_bytes(prefix, "little"), _MAX_HEADER)))
                if not legacy:
                    h.update(f.read(_SAMPLE))
                    f.seek(max(size - _SAMPLE, 0))
                    h.update(f.read(_SAMPLE))
        return {
            "id": self.description if self.local_dir is None else str(self.local_dir.resolve()),
            "revision": self.revision,
            "weights": h.hexdigest(),
        }

    def stored_dtypes(self) -> dict[str, torch.dtype]:
        """Checkpoint key -> dtype as stored, from the safetensors headers (no tensor data is read).

        Only files already on this machine are looked at (a hub file is not downloaded for this); `.bin` files are
        opened with `weights_only=True` and memory-mapped, which reads the pickle but not the tensor data (a file in
        torch's pre-1.6 format, which cannot be mapped, is read whole).
        """
        out: dict[str, torch.dtype] = {}
        for filename in self.files:
            path = self._local_weight_file(filename)
            if path is None:
                out.update(self._remote.get(filename, {}))
                continue
            if filename.endswith(".safetensors"):
                header = read_header(path, source=True)
                out.update({k: info.dtype for k, info in header.tensors.items()})
            else:
                handle = self._open(filename)
                out.update({k: v.dtype for k, v in handle.items() if isinstance(v, torch.Tensor)})
        return out

    def stored_shapes(self, keys: set[str]) -> dict[str, tuple[int, ...]]:
        """Checkpoint key -> shape as stored, for those of `keys` whose file is on this machine (its safetensors
        header, or a `.bin` file's pickle, mapped as `stored_dtypes` reads it: no tensor data is read) or whose header
        was read from the hub; a file not fetched yet tells none (it is looked at again once fetched)."""
        out: dict[str, tuple[int, ...]] = {}
        for filename in sorted({self.keys[k] for k in keys}):
            path = self._local_weight_file(filename)
            if path is None:
                shapes = self._remote_shapes.get(filename, {})
            elif filename.endswith(".safetensors"):
                shapes = {k: info.shape for k, info in read_header(path, source=True).tensors.items()}
            else:
                shapes = {k: tuple(v.shape) for k, v in self._open(filename).items() if isinstance(v, torch.Tensor)}
            # (a key several files hold is loaded from the last one, as `self.keys` says)
            out.update({k: shapes[k] for k in keys if self.keys[k] == filename and k in shapes})
        return out

    def first_floating_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating-point tensor (not fp8/fp4) of the first weight file, keys in the order
        transformers reads them: what `from_pretrained(dtype="auto")` loads at when the config names no dtype."""
        filename = self.files[0] if self.files else None
        if filename is None:
            return None
        remote = filename.endswith(".safetensors") and self._local_weight_file(filename) is None
        if remote and (filename in self._remote or self._reads_headers()):
            if filename not in self._remote:  # (not downloaded for this)
                self._read_remote_header(filename)
            dtypes = [self._remote[filename][k] for k in sorted(self._remote[filename])]
        elif filename.endswith(".safetensors"):
            header = read_header(self.fetch(filename, required=True), source=True)
            dtypes = [header.tensors[k].dtype for k in sorted(header.tensors)]
        else:
            dtypes = [v.dtype for v in self._open(filename).values() if isinstance(v, torch.Tensor)]
        low = ("float8_", "float4_")
        return next((d for d in dtypes if d.is_floating_point and not str(d).startswith(low, 6)), None)

    def load(self, key: str) -> torch.Tensor:
        filename = self.keys[key]
        handle = self._open(filename)
        if isinstance(handle, dict):
            return handle[key]
        try:
            with _ctrl_c_noted():
                return handle.get_tensor(key)
        except Exception as e:  # noqa: BLE001
            _interrupted_inside(e)
            path = self.fetch(filename)
            raise ShardFileError(path, f"cannot provide tensor {key!r}: {e}", source_fix(path)) from e

    def release(self, later: set[str], following: set[str]) -> None:
        """Close the files no unit still to write reads (`later`: the files those units read), and the safetensors
        files the next unit does not read (`following`), opened again (their header read) when a later unit reads
        them: safetensors 0.9 holds a file descriptor for each open file, and a checkpoint whose files each hold
        tensors of early and late layers (a file per expert across the layers, tensors dealt out across the files)
        kept one open for each file, past the limit on open files (macOS: 256 by default) with as many files. A
        `.bin` file stays open while a later unit reads it: its pickle would be read again (its map holds no file
        descriptor)."""
        for filename in list(self._handles):
            if filename not in (following if filename.endswith(".safetensors") else later):
                del self._handles[filename]


# Ctrl-C while torch's C code runs: the KeyboardInterrupt that Python's handler raises inside a call torch makes
# back into Python is cleared there, and the call fails with another error (safetensors' `get_tensor`: "ValueError:
# could not determine the shape of object type 'torch.storage.UntypedStorage'"), which a read wrapped as a damaged
# file (a ShardFileError saying to re-create it), the Ctrl-C lost (an adapter's read, by PEFT: as an adapter that
# cannot be loaded onto the model, `merge.AdapterMerge`). The SIGINTs of such a read are noted (in the main
# thread, the only one Python's handlers run in, where the handler is a Python function), and its error is then the
# KeyboardInterrupt.
_ctrl_c = threading.local()  # (`seen`: whether a SIGINT arrived in this thread's last read noting them)


@contextmanager
def _ctrl_c_noted():
    """Note the SIGINTs that arrive inside the block, for `_interrupted_inside` (nothing else changes: the handler
    in place still runs). A block in another thread, or under a handler that is not a Python function, notes none."""
    _ctrl_c.seen = False
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return

    def noted(signum, frame):
        _ctrl_c.seen = True
        return previous(signum, frame)

    try:
        # (in the `try`: `signal.signal` runs Python code after the change, where a Ctrl-C pending is handled, and
        # raised; without, the handler stayed noting for good, one more wrapper at each such Ctrl-C)
        signal.signal(signal.SIGINT, noted)
        yield
    finally:
        try:  # (one set inside the block stays)
            if signal.getsignal(signal.SIGINT) is noted:
                signal.signal(signal.SIGINT, previous)
        finally:  # (a Ctrl-C handled, and raised, in `getsignal`'s Python code, before the handler was put back)
            if signal.getsignal(signal.SIGINT) is noted:
                signal.signal(signal.SIGINT, previous)


def _interrupted_inside(error: Exception) -> None:
    """Raise `KeyboardInterrupt` for `error`, the error of a `_ctrl_c_noted` block, where a Ctrl-C arrived inside it:
    the error is what torch's C code made of the KeyboardInterrupt it cleared (see `_ctrl_c`)."""
    seen, _ctrl_c.seen = getattr(_ctrl_c, "seen", False), False
    if seen:
        raise KeyboardInterrupt from error


def _inside_name(filename) -> bool:
    """A weight file name a checkpoint index (or config.json's `transformers_weights`) may give: relative, in the
    checkpoint's folder or a subfolder of it (`weights/model-00001-of-00002.safetensors`), as transformers allows
    (`_check_shard_filenames_stay_in_model_dir`: no absolute path, no `..`), so nothing outside the source is read."""
    if not isinstance(filename, str) or not filename or "\\" in filename or "\x00" in filename:
        return False
    parts = filename.split("/")
    return not filename.startswith("/") and all(part not in ("", ".", "..") for part in parts)


def _check_plain_name(index: Path, filename) -> str:
    """A checkpoint index may only name weight files in its folder or a subfolder: nothing outside the source.
    Returns the name without `.` parts (`./model-00001-of-00002.safetensors`, which `from_pretrained` loads as its
    path resolves: the file in the index's folder)."""
    plain = filename
    if isinstance(filename, str) and not filename.startswith("/"):  # (an absolute name is refused below)
        plain = "/".join(part for part in filename.split("/") if part != ".")
    if not _inside_name(plain) or not plain.endswith((".safetensors", ".bin")):
        raise ShardFileError(
            index,
            f"names the weight file {filename!r}, which is not a .safetensors/.bin file in the index's folder (or a "
            "subfolder of it)",
            "Only split checkpoints you trust; fix or re-download the index.",
        )
    return plain


def _tokenizer_files(tokenizer_config: Path | None, config) -> list[str]:
    """Files the checkpoint's tokenizer reads that `_SIDE_FILES` does not name (GPT-NeoX-Japanese's `emoji.json`),
    to copy so that `AutoTokenizer.from_pretrained(shard_dir)` finds them: the `vocab_files_names` of each class
    `AutoTokenizer` may pick (tokenizer_config.json's `tokenizer_class`, the config's, the one transformers registers
    for its model type), looked up as transformers looks them up, and the versioned `tokenizer.json` files that
    tokenizer_config.json's `fast_tokenizer_files` lists (transformers reads the newest one not newer than itself
    instead of `tokenizer.json`: without it the shard directory's tokenizer encoded text to nothing). A class it
    cannot find or load here (remote code, a missing dependency) adds nothing; a name the checkpoint lacks is not
    copied."""
    data = _read_json(tokenizer_config) if tokenizer_config is not None else None
    names: set[str] = set()
    versioned = data.get("fast_tokenizer_files") if isinstance(data, dict) else None
    if isinstance(versioned, list):
        names.update(f for f in versioned if _plain_name(f))
    try:
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name
    except ImportError:
        return sorted(names - set(_SIDE_FILES))
    classes = [
        data.get("tokenizer_class") if isinstance(data, dict) else None,
        getattr(config, "tokenizer_class", None),
        TOKENIZER_MAPPING_NAMES.get(getattr(config, "model_type", None) or ""),
    ]
    for class_name in classes:
        if not isinstance(class_name, str):
            continue
        for candidate in {class_name, class_name.removesuffix("Fast")}:  # (as AutoTokenizer retries a `...Fast`)
            try:  # (a class whose dependency is missing is a placeholder that raises when asked anything)
                files = getattr(tokenizer_class_from_name(candidate), "vocab_files_names", None)
            except Exception:  # noqa: BLE001 - nothing to add
                continue
            if isinstance(files, dict):
                names.update(f for f in files.values() if _plain_name(f))
    return sorted(names - set(_SIDE_FILES))


def _plain_name(name) -> bool:
    """A file name of the checkpoint's top folder (no path: a name from a config file is copied as it is)."""
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def _is_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001
        return False


# the hub's hosts -> (when one connection to it was tried, `cannot_reach_hub`'s answer then): asked again after
# `_HUB_ANSWER_SECONDS` (the network may be back, or gone)
_HUB_ANSWERS: dict[str, tuple[float, str | None]] = {}
_HUB_ANSWER_SECONDS = 60.0
# the errors of a connection that did not reach the host (no network, its name not resolved, refused, timed out, a
# proxy refusing it), by name: httpx's in huggingface_hub 1.x, httpx2's in 2.x
_NOT_CONNECTED = frozenset({"ConnectError", "ConnectTimeout", "ProxyError"})


def cannot_reach_hub(repo_id: str, filename: str, revision: str | None = None) -> str | None:
    """Why the hub cannot be reached, found by one connection to it (a HEAD request for `filename` of the hub repo
    `repo_id` at `revision`, without retries, through huggingface_hub's session: its proxies, its endpoint): the name
    of the error where it did not connect (`ConnectError`: no network, the host's name not resolved, refused), else
    `None` (it answered, whatever it answered; or offline mode, where huggingface_hub connects to nothing).

    huggingface_hub tries a file it has not cached 7 times where a connection fails, waiting 23 s in all between the
    tries (`http_backoff`): a hub id not in the hub cache failed after about 27 s without network, and a split from
    the cache waited as long on the first file the repo lacks. Where this says unreachable, the hub cache alone is asked
    (`local_files_only=True`): at once, with the same errors. The answer is kept a minute per host: one connection
    per command. A hub that answers with an error (5xx) is retried by huggingface_hub as before."""
    if _is_offline():
        return None
    import time
    from urllib.parse import urlsplit

    from huggingface_hub import constants, get_session, hf_hub_url

    url = hf_hub_url(repo_id, filename, revision=revision)
    host = urlsplit(url).netloc
    asked = _HUB_ANSWERS.get(host)
    if asked is not None and time.monotonic() - asked[0] < _HUB_ANSWER_SECONDS:
        return asked[1]
    try:
        get_session().head(url, timeout=constants.HF_HUB_ETAG_TIMEOUT, follow_redirects=False)
        why = None
    except Exception as e:  # noqa: BLE001 - any other error: huggingface_hub's request says what is wrong, as before
        why = type(e).__name__ if _NOT_CONNECTED & {c.__name__ for c in type(e).__mro__} else None
    _HUB_ANSWERS[host] = (time.monotonic(), why)
    return why


# --- locking & progress ---------------------------------------------------------------------------------------------


# `flock` errors of a filesystem that has no locks (rather than a lock held elsewhere)
_NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS})


@contextmanager
def _locked(shard_dir: Path, *, wait: bool):
    import fcntl

    lock_path = shard_dir / LOCK_NAME
    try:  # (0o666: the umask decides, as for the files `save_pretrained` writes)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        # a folder this user cannot write (a read-only mount, a group's folder whose `.lock` another user made):
        # `flock` works on a read-only descriptor, so re-running a finished split there still only checks it
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except FileNotFoundError:  # (nor can it be created: no split writes here, this one included)
            fd = None
    try:
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise ShardDirError(
                f"Another process is splitting into {shard_dir} right now (it holds {lock_path}). Wait for it to "
                "finish, or pass `wait=True` (`--wait`) to block until it does."
            ) from None
        except OSError as e:
            # a filesystem without `flock` (some NFS, FUSE and SMB mounts): the split runs unlocked, as where no
            # lock file can be made, since its own files are still written atomically
            if e.errno not in _NO_FLOCK:
                raise
            logger.warning(
                "The filesystem of %s does not support file locks (%s): splitting without one, so another split "
                "into the same folder at the same time is not prevented.",
                shard_dir,
                os.strerror(e.errno),
            )
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _foreign_entries(shard_dir: Path) -> list[str]:
    """The names in `shard_dir` that a split would write over or beside, sorted, where it holds neither a shard
    directory nor an unfinished split (whose own checks apply). Hidden names are left out: the lock and temporary
    files of a killed split are ours, and a file manager's or version control's (`.DS_Store`, `.git`) harm nothing."""
    if not shard_dir.is_dir() or (shard_dir / MANIFEST_NAME).exists() or (shard_dir / PROGRESS_NAME).exists():
        return []
    return sorted(p.name for p in shard_dir.iterdir() if not p.name.startswith("."))


def _options_key(
    fingerprint: str,
    dtype: torch.dtype | None,
    compression: dict | None,
    source: dict | None = None,
    adapter: dict | None = None,
) -> dict:
    """Everything a unit file depends on: two runs with equal keys write byte-identical files. (`adapter`, the merged
    one's identity, only where there is one: the splits without keep their digests.)"""
    return {
        "fingerprint": fingerprint,
        "dtype": None if dtype is None else dtype_to_str(dtype),
        "compression": compression,
        "source": source,
        **({"adapter": adapter} if adapter is not None else {}),
    }


def _options_digest(options: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()


def _recorded_adapter(manifest) -> dict | list[dict] | None:
    """The adapter a finished split's manifest (its JSON, read or not) records (a list: several, merged in that
    order): `None` for none, and for a damaged record (as `Manifest.from_json` reads it)."""
    return read_adapter_record(manifest.get("adapter") if isinstance(manifest, dict) else None)


def _adapter_key(record: dict | list[dict] | None) -> dict | list[dict] | None:
    """An adapter's record as splits compare them: without the hub commit the manifest notes beside it (the same files
    at another commit are the same adapter; splits made before noted none); several, each so, in order."""
    if isinstance(record, list):
        return [_adapter_key(r) for r in record]
    return None if record is None else {k: v for k, v in record.items() if k != "revision"}


def _options_difference(
    recorded: dict, options: dict, recorded_source: dict | None, source: dict, *, fingerprint_edited: bool = False
) -> str:
    """What differs between the options a split there was made with (`recorded`: an unfinished one's progress record,
    or what a finished one's manifest shows of them, `_recorded_options`) and those asked (`options`, `_options_key`),
    for a refusal; `recorded_source` and `source`: the sources' ids and revisions; `fingerprint_edited`: the
    manifest's units list the model's tensors, its fingerprint differing nonetheless (`_fingerprint_edited`). Empty
    where nothing it can name differs (the adapters are `_adapter_difference`'s)."""
    differs = []
    if recorded.get("fingerprint") != options["fingerprint"] and fingerprint_edited:
        differs.append(
            f"the architecture fingerprint: {recorded.get('fingerprint')!r} there, this model's "
            f"{options['fingerprint']!r}, though the manifest lists this model's decoder layers, tensor names and "
            "shapes (its `fingerprint` was changed since the split: set it back to the second)"
        )
    elif recorded.get("fingerprint") != options["fingerprint"]:
        differs.append("the model's architecture (other layers, tensor names or shapes)")
    if recorded.get("compression") != options["compression"]:
        there, asked = _scheme_text(recorded.get("compression")), _scheme_text(options["compression"])
        differs.append(f"compression {there} there, {asked} asked")
    if "dtype" in recorded and recorded["dtype"] != options["dtype"]:
        there, asked = (
            d if d is not None else "not given (the checkpoint's)" for d in (recorded["dtype"], options["dtype"])
        )
        differs.append(f"`dtype` {there} there, {asked} asked")
    if recorded_source is not None and recorded_source.get("id") != source.get("id"):
        differs.append(f"the source: {recorded_source.get('id')} there, {source.get('id')} given")
    elif recorded_source is not None and recorded_source.get("revision") != source.get("revision"):
        differs.append(f"the source's commit: {recorded_source.get('revision')} there, {source.get('revision')} now")
    elif "source" in recorded and recorded["source"] != options["source"]:
        differs.append("the source's weight files (another checkpoint at that path, or its files changed since)")
    elif "source" not in recorded and not differs:  # (a finished split whose digest matched no `dtype` option)
        differs.append(
            "the source's weight files (another checkpoint at that path, or its files changed since) or the `dtype` "
            "option"
        )
    return f" (what differs: {'; '.join(differs)})" if differs else ""


def _fingerprint_edited(manifest_json: dict, fingerprint: str, model: torch.nn.Module, stack) -> bool:
    """Whether a finished split's manifest records another architecture fingerprint than `fingerprint` (`model`'s)
    though it lists `model`'s type, decoder layers, tensor names and shapes, the fingerprint's whole content: its
    `fingerprint` was changed since the split (`shard_dir.lists_tensors`)."""
    if manifest_json.get("fingerprint") == fingerprint:
        return False
    try:
        manifest = Manifest.from_json(manifest_json)
    except (KeyError, TypeError, ValueError):
        return False
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if (manifest.model_type, manifest.layers_prefix, manifest.num_layers) != (model_type, stack.prefix, len(stack)):
        return False
    return lists_tensors(manifest.units, expected_tensors(model, stack))


def _scheme_text(compression: dict | None) -> str:
    if not compression:
        return "none"
    return f"{compression.get('bits')}-bit {_scheme_detail(compression)}"


def _scheme_detail(compression: dict) -> str:
    """A compression's code, block size and whether it takes the embeddings, as messages and the model card say it."""
    blocks = f", blocks of {compression['blocksize']}" if compression.get("blocksize") else ""
    embeddings = ", the embeddings too" if compression.get("quantize_embeddings") else ""
    # (no parentheses: the model card says it within its own, "(nf4, blocks of 64, double-quantized scales; lossy)")
    scales = ", double-quantized scales" if compression.get("double_quant") else ""
    return f"{compression.get('quant_type') or 'int8'}{blocks}{scales}{embeddings}"


def _recorded_options(manifest: dict, options: dict) -> dict:
    """A finished split's manifest as `_options_difference` compares it: with the `dtype` option it was made with
    where its options digest shows it (the same model, compression, source and adapters, at some `dtype`: only their
    digest is recorded), else with neither that nor the source's identity known."""
    recorded = {k: manifest.get(k) for k in ("fingerprint", "compression")}
    for dtype in (None, "float32", "bfloat16", "float16", "float64"):
        candidate = options | {"dtype": dtype}
        if manifest.get("split_options") == _options_digest(candidate):
            return recorded | {"dtype": dtype, "source": options["source"]}
    return recorded


def _manifest_source(src) -> dict:
    """The source as a manifest records it."""
    return {
        "id": src.description if src.local_dir is None else str(src.local_dir.resolve()),
        "kind": "local" if src.local_dir is not None else "hub",
        "revision": src.revision,
    }


def _adapter_difference(recorded: dict | list[dict] | None, given: dict | list[dict] | None) -> str:
    """Why the adapters a split records are not the ones given, for a refusal (empty where they are the same)."""
    if _adapter_key(recorded) == _adapter_key(given):
        return ""
    recorded, given = _as_list(recorded), _as_list(given)
    if not recorded:
        return " (it has no adapter merged)"
    ids = ", ".join(_ids(recorded))
    named = f"the adapter {ids} merged" if len(recorded) == 1 else f"the adapters {ids} merged, in that order"
    if not given:
        return f" ({named}, and none was given)"
    if _ids(recorded) == _ids(given):
        # the same adapters in the same order: one's files differ
        n, r, g = next(
            (n, r, g) for n, (r, g) in enumerate(zip(recorded, given), 1) if _adapter_key(r) != _adapter_key(g)
        )
        one = named if len(recorded) == 1 else f"{named}; adapter {n} of {len(recorded)}, {r.get('id')}"
        if r.get("revision") and g.get("revision") and r["revision"] != g["revision"]:
            return f" ({one} at commit {r['revision']}, whose files differ from those at {g['revision']})"
        return f" ({one}, whose files have changed since)"
    if len(recorded) == len(given) == 1:
        return f" ({named}; a moved or copied adapter counts as another)"
    others = ", ".join(_ids(given))
    if sorted(_ids(recorded)) == sorted(_ids(given)):
        return f" ({named}; given in another order: {others})"
    # (a path it does not record among those given: maybe one of its own, moved)
    moved = "; a moved or copied adapter counts as another" if set(_ids(given)) - set(_ids(recorded)) else ""
    return f" ({named}, not {others}{moved})"


def _ids(records: list[dict]) -> list[str]:
    return [str(r.get("id")) for r in records]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _as_list(record: dict | list[dict] | None) -> list[dict]:
    return [] if record is None else record if isinstance(record, list) else [record]


def _adapters_given(adapter, adapter_revision) -> list[tuple[str | os.PathLike, str | None]]:
    """`split_checkpoint`'s `adapter` and `adapter_revision` as (adapter, revision) pairs, in merge order (none for
    no adapter). Raises `TypeError` for an adapter or revision of another type, `ValueError` for what cannot be paired
    so (before anything is read)."""
    if adapter is None:
        if adapter_revision is not None:
            raise ValueError("`adapter_revision` is the revision of a hub `adapter`: pass the `adapter` too.")
        return []
    revisions = adapter_revision
    if revisions is not None and not isinstance(revisions, (str, list, tuple)):
        raise TypeError(
            f"`adapter_revision` is {revisions!r}: pass a branch, tag or commit (a string), or a list of them, one per "
            "adapter."
        )
    if isinstance(adapter, (str, os.PathLike)):
        adapters = [adapter]
    elif isinstance(adapter, (list, tuple)):
        adapters = list(adapter)
        if not adapters:
            raise ValueError("`adapter` is an empty list: pass one adapter or more, or `None` for none.")
        for i, a in enumerate(adapters):
            if not isinstance(a, (str, os.PathLike)):
                raise TypeError(f"`adapter` [{i}] is {a!r}: each adapter is a folder or a hub repo id (a string).")
    else:
        raise TypeError(
            f"`adapter` is {adapter!r}: pass a folder or hub repo id, or a list of them (merged in that order)."
        )
    if revisions is None or isinstance(revisions, str):
        if isinstance(revisions, str) and len(adapters) > 1:
            raise ValueError(
                f"`adapter_revision` {revisions!r} with {len(adapters)} adapters: pass a list, one revision per adapter "
                "(`None` for a default branch or a local folder)."
            )
        return [(a, revisions) for a in adapters]
    revisions = list(revisions)
    if len(revisions) != len(adapters):
        raise ValueError(
            f"`adapter_revision` lists {_count(len(revisions), 'revision')} for {_count(len(adapters), 'adapter')}: "
            "pass one revision per adapter (`None` for a default branch or a local folder)."
        )
    for i, r in enumerate(revisions):
        if r is not None and not isinstance(r, str):
            raise TypeError(f"`adapter_revision` [{i}] is {r!r}: a revision is a branch, tag or commit (a string).")
    return list(zip(adapters, revisions))


def _quantization_rule(model: torch.nn.Module) -> Callable[..., bool]:
    """Whether the split stores a tensor of `model` quantized: `rule(name, tensor, scheme, *, is_embedding=False)`,
    decided knowing the module that holds each weight (a linear layer's, an expert's: `quant.should_quantize`); a
    buffer (MiniMax's lightning-attention decays) never, as `from_pretrained` keeps it."""
    from .quant import modules_to_not_convert, parameter_owners, should_quantize

    owners, not_converted = parameter_owners(model), modules_to_not_convert(model)

    def rule(name, tensor, scheme, *, is_embedding=False):
        if name not in owners:
            return False
        return should_quantize(
            name, tensor, scheme, is_embedding=is_embedding, owner=owners[name], not_converted=not_converted
        )

    return rule


def _estimate_unit_bytes(
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], scheme, unit: str, quantizes: Callable[..., bool] | None
) -> int:
    """Bytes of one unit file: tensor data (quantized where the codec would be used, `quantizes`: see
    `_quantization_rule`) plus header and metadata."""
    from .quant import _stored_layout

    total = 1024  # length prefix, `__metadata__`, padding
    layouts = {}  # name -> the parts and metadata of a quantized weight
    for name, (shape, dtype) in shapes.items():
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        overhead = 2 * len(name) + 120  # the header entry and the tensor's entry in the embedded unit record
        if scheme is not None and numel and len(shape) >= 2 and dtype.is_floating_point:
            meta = torch.empty(shape, dtype=dtype, device="meta")
            if quantizes(name, meta, scheme, is_embedding=unit == RESIDENT):
                # its parts as the codec stores them (double-quantized: a byte per block, a float32 per 256 blocks)
                layouts[name] = _stored_layout(shape, dtype, scheme)
                nbytes = sum(math.prod(s) * d.itemsize for s, d in layouts[name][0].values())
                overhead = 0  # (counted below, from the parts)
        total += nbytes + overhead
    # a quantized weight's header bytes: an entry per part, its two offsets at most as long as the file's data bytes
    # (`total` so far), and its record in the unit record the header embeds (JSON in a JSON string: quotes escaped)
    digits = len(str(total))
    for name, (parts, meta) in layouts.items():
        for part, (part_shape, part_dtype) in parts.items():
            entry = {f"{name}::{part}": {"dtype": _TAGS[part_dtype], "shape": part_shape, "data_offsets": [0, 0]}}
            # (less its braces, with its comma: "0,0" written with up to `digits` digits each)
            total += len(json.dumps(entry, separators=(",", ":"))) - 2 + 1 + 2 * (digits - 1)
        shape, dtype = shapes[name]
        record = json.dumps({name: TensorEntry(tuple(shape), dtype, meta).to_json()}, sort_keys=True)[1:-1] + ", "
        total += len(json.dumps(record)) - 2
    return total


def estimate_split_bytes(
    model: torch.nn.Module,
    stack,
    plan,
    stored_dtypes: dict[str, torch.dtype],
    *,
    dtype: torch.dtype | None = None,
    scheme=None,
    units: list[str] | None = None,
    fallback_dtype: torch.dtype | None = None,
) -> int:
    """Bytes the unit files of `units` (default: all) will take on disk.

    Uses the dtypes the checkpoint really stores (from its safetensors headers): a bf16 checkpoint needs half the
    room of the fp32 skeleton it is converted through. `dtype` (the split's cast) wins over them; quantized
    tensors are counted at their packed size.
    """
    estimates = _estimate_units_bytes(
        model, stack, plan, stored_dtypes, dtype=dtype, scheme=scheme, units=units, fallback_dtype=fallback_dtype
    )
    return sum(estimates.values())


def _estimate_units_bytes(
    model: torch.nn.Module,
    stack,
    plan,
    stored_dtypes: dict[str, torch.dtype],
    *,
    dtype: torch.dtype | None = None,
    scheme=None,
    units: list[str] | None = None,
    fallback_dtype: torch.dtype | None = None,
    quantizes: Callable[..., bool] | None = None,
) -> dict[str, int]:
    """`estimate_split_bytes` unit by unit: unit -> bytes of its file. `quantizes`: the model's
    `_quantization_rule`, where the caller has it already."""
    all_units = [layer_unit(i) for i in range(len(stack))] + [RESIDENT]
    units = all_units if units is None else units
    # the dtype each model tensor will be written in: that of the checkpoint tensor it is converted from
    target_dtype: dict[str, torch.dtype] = {}
    unit_dtype: dict[str, torch.dtype] = {}
    for unit, entries in plan.units.items():
        for key, renamed, _pattern in entries:
            if key in stored_dtypes:
                target_dtype.setdefault(renamed, stored_dtypes[key])
                unit_dtype.setdefault(unit, stored_dtypes[key])
    shapes: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {u: {} for u in units}
    for name, t in model.state_dict(keep_vars=True).items():
        unit = stack.unit_of(name)
        if unit not in shapes:
            continue
        if not t.dtype.is_floating_point:
            stored = t.dtype
        elif dtype is not None:
            stored = dtype
        else:
            # a converter's extra targets (q/k/v out of one qkv tensor) share their unit's checkpoint dtype
            stored = target_dtype.get(name) or unit_dtype.get(unit) or fallback_dtype or t.dtype
        shapes[unit][name] = (tuple(t.shape), stored)
    if scheme is not None and quantizes is None:
        quantizes = _quantization_rule(model)
    return {u: _estimate_unit_bytes(shapes[u], scheme, u, quantizes) for u in units}


def _space_needed(shard_dir: Path, estimates: dict[str, int]) -> tuple[int, int]:
    """Disk space that writing the unit files of `estimates` (unit -> bytes) takes beyond what `shard_dir` holds, and
    how many of the files there it replaces are held open (see below).

    Each file is written beside the file of the same unit a previous split left (a re-split, `overwrite=True`) and
    renamed over it, one unit at a time: the old file's bytes are freed as its replacement takes its place, so only
    growth counts, plus the largest old file, which still exists while its replacement is being written. Counting
    every unit as new refused a re-split that fits (a disk holding one split and one more layer). A file that is a
    symlink or has other hard links frees nothing when replaced, and neither does one a process holds open or mapped
    (a model streaming from the directory): its bytes stay on the disk until that process lets it go, and the split
    ran out of space part way, its manifest removed.
    """
    import stat

    grown, beside, held = 0, 0, 0
    for unit, new in estimates.items():
        path = shard_dir / _unit_file(unit)
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        old = st.st_size if st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink == 1 else 0
        if old and _held_open(path):
            held += 1
            old = 0
        grown += max(new - old, 0)
        beside = max(beside, old)
    return grown + beside, held


def _files_read(plan, src: _Source, units: list[str] | None = None, *, tied: bool = True) -> set[str]:
    """The weight files writing `units` reads (`None`: every unit), and with `tied` those the checks of tied pairs
    before the first unit read."""
    files = {src.keys[k] for u, entries in plan.units.items() if units is None or u in units for k, _, _ in entries}
    return files | ({src.keys[k] for k in plan.tied_stored.values()} if tied else set())


def _most_held(sizes: dict[str, int], reads: list[set[str]]) -> int:
    """The most bytes of the files of `sizes` held at once when each is downloaded as the first of the units (`reads`:
    the files each one reads, in order) reading it is written, and removed once the last one is."""
    span = {f: [i for i, files in enumerate(reads) if f in files] for f in sizes}
    span = {f: (i[0], i[-1]) for f, i in span.items() if i}
    return max((sum(sizes[f] for f, (a, b) in span.items() if a <= i <= b) for i in range(len(reads))), default=0)


def _same_disk(a: Path, b: Path) -> bool:
    """Whether the existing paths `a` and `b` lie on the same filesystem (taken so where that cannot be told)."""
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return True


def _held_open(path: Path) -> bool:
    """Whether some process holds `path` open or mapped: a write lease is granted only on a file nobody else has open
    (Linux; taken and given back at once). `False` where that cannot be told (another user's file, a filesystem
    without leases such as NFS, other systems)."""
    try:
        import fcntl
    except ImportError:  # (Windows)
        return False
    set_lease = getattr(fcntl, "F_SETLEASE", None)
    if set_lease is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.fcntl(fd, set_lease, fcntl.F_WRLCK)
    except OSError as e:
        return e.errno in (errno.EAGAIN, errno.EBUSY)
    else:
        fcntl.fcntl(fd, set_lease, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def _config_dtype(config) -> torch.dtype | None:
    # (a config whose class predates `dtype` keeps `torch_dtype` as an attribute of its own: read from the instance,
    # not through transformers' deprecated `torch_dtype` property, which warns)
    value = getattr(config, "dtype", None) or getattr(config, "__dict__", {}).get("torch_dtype")
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        try:
            return str_to_dtype(value)
        except ValueError:
            return None
    return None


# config.json keys the config object takes in but does not write back out (`to_json_string`), which
# `AutoConfig.from_pretrained` and so `from_pretrained` and `from_config` honour: the kernels the model runs
_IMPLEMENTATION_KEYS = ("attn_implementation", "experts_implementation")


def _config_json_sound(shard_dir: Path) -> bool:
    """Whether the config.json of the shard directory a repair finds damaged is sound (readable, of the manifest's
    model type and dtype form, with a `dtype` opening the directory takes beside its `load_dtype`, building the model
    the shards were split from), so the repair keeps it; a damaged manifest, or a config.json that fails any of those
    checks (which the repair would leave failing), is written again."""
    try:
        directory = ShardDirectory(shard_dir, check_files=False)
        config, error = directory._read_config()
        if error is not None or _load_dtype_differs(directory.manifest, config) is not None:
            return False
        return directory._model_problems((config, None))[0] is None
    except (ShardDirError, OSError):
        return False


def _shard_config_json(config, src: _Source) -> str:
    """The shard directory's config.json: the config's, as `save_pretrained` writes it (without `transformers_weights`,
    which names a weight file of the source: `save_pretrained` drops it too), with the source config.json's
    `attn_implementation` / `experts_implementation` put back where they were (top level, sub-config dicts): the
    config object drops them, and the model built from the shard directory's config ran other kernels than
    `from_pretrained(source)` (eager attention or experts taken for sdpa / grouped_mm)."""
    text = config.to_json_string()
    raw = _read_json(src.config_path)
    data = json.loads(text)
    changed = data.pop(_EXPLICIT_WEIGHTS_KEY, None) is not None

    def put_back(raw: dict, out: dict) -> bool:
        found = False
        for key, value in raw.items():
            if key in _IMPLEMENTATION_KEYS and value is not None and out.get(key) != value:
                out[key] = value
                found = True
            elif isinstance(value, dict) and isinstance(out.get(key), dict):
                found = put_back(value, out[key]) or found
        return found

    if isinstance(raw, dict):
        changed = put_back(raw, data) or changed
    return json.dumps(data, indent=2, sort_keys=True) + "\n" if changed else text


def _source_side_files(src: _Source, config) -> dict[str, Path | None]:
    """The side files a split of `src` copies (tokenizer files, those its class names too, chat templates, generation
    config, processor configs, license and notice files), each name with its file as fetched (`None`: the source has
    no such file)."""
    side = {name: src.fetch(name) for name in _SIDE_FILES}
    side |= {name: src.fetch(name) for name in _tokenizer_files(side["tokenizer_config.json"], config)}
    side |= {name: src.fetch(name) for name in (f"{_CHAT_TEMPLATE_DIR}/{n}" for n in src.chat_templates())}
    side |= {name: src.fetch(name) for name in src.license_files()}
    return side


def _generation_config_of_config_json(src: _Source, config) -> str | None:
    """For a source without generation_config.json: the generation config `from_pretrained` gives its model, built from
    the source's config.json (`GenerationConfig.from_pretrained(source, config_file_name="config.json",
    _from_model_config=True)`, i.e. `GenerationConfig.from_model_config` of its dict), as generation_config.json, where
    it holds other settings than the one a model built from the shard directory's config derives (older checkpoints
    keep `max_length`, `no_repeat_ngram_size`, `do_sample`... in config.json; the config object drops them, so the
    streamed model generated with transformers' defaults). `None` where they are the same."""
    from transformers import GenerationConfig

    raw = _read_json(src.config_path)
    if not isinstance(raw, dict):
        return None
    try:
        loaded = GenerationConfig.from_model_config(raw)
        derived = GenerationConfig.from_model_config(config)
    except Exception as e:  # noqa: BLE001 - the split is whole without it
        logger.warning("Cannot build a generation config from %s (%s); none written", src.config_path, e)
        return None
    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    keys = defaults().keys() if callable(defaults) else loaded.to_dict().keys()
    if all(getattr(loaded, k, None) == getattr(derived, k, None) for k in keys):
        return None
    return loaded.to_json_string(use_diff=True)


def _auto_dtype(config, src: _Source) -> torch.dtype | None:
    """The dtype `from_pretrained(dtype="auto")` loads the checkpoint's floating-point weights at (transformers'
    `_get_dtype`): the config's `dtype`, else the checkpoint index's `metadata.dtype`, else the dtype of the first
    floating-point tensor of the first weight file. `None` where none of them tells."""
    found = _config_dtype(config)
    if found is None and isinstance(src.index_metadata.get("dtype"), str):
        found = getattr(torch, src.index_metadata["dtype"], None)
    if found is None:
        found = src.first_floating_dtype()
    return found if isinstance(found, torch.dtype) and found.is_floating_point else None


def _refuse_unquantizable(plan, src: _Source, load_dtype: torch.dtype | None) -> None:
    """`compression` without `dtype` of weights stored in a dtype bitsandbytes does not quantize (float64), whatever the
    config says: they are stored as they are, and were left unquantized under a manifest saying 4-bit. Refused, from the
    files on this machine (a hub repo's are looked at again once fetched)."""
    read = {k for entries in plan.units.values() for k, _, _ in entries}
    odd = {d for k, d in src.stored_dtypes().items() if k in read and d.is_floating_point and d not in _BNB_DTYPES}
    if odd:
        load = (
            f"{dtype_to_str(load_dtype)!r}, the dtype `from_pretrained` loads them at" if load_dtype else "'bfloat16'"
        )
        raise ValueError(
            f"`compression` quantizes float32, float16 and bfloat16 weights; the checkpoint stores weights in "
            f"{', '.join(sorted(map(dtype_to_str, odd)))}, which it would leave unquantized. Pass `dtype` (e.g. "
            f"{load}) to cast them first."
        )


def _warn_if_nothing_quantized(model, rule: Callable[..., bool], scheme) -> None:
    """Warn, before anything is written, where `scheme` quantizes none of `model`'s weights (each spans fewer than
    `MIN_BLOCKS_TO_QUANTIZE` blocks: a small model at a large `blocksize`): the split stored every weight at full
    precision under a manifest saying 4-bit, as large as without compression, without a word."""
    from .quant import MIN_BLOCKS_TO_QUANTIZE

    for name, param in model.named_parameters():
        # (by shape: the skeleton's dtype may be one the checkpoint is not stored in)
        shaped = torch.empty(param.shape, dtype=torch.float32, device="meta") if param.is_floating_point() else param
        if rule(name, shaped, scheme):
            return
    logger.warning(
        "`compression` %d-bit with blocks of %d quantizes none of this model's weights (a weight is quantized where it "
        "spans at least %d blocks, %d values): every weight is stored at full precision. Pass a smaller `blocksize` "
        "to compress it.",
        scheme.bits,
        scheme.blocksize,
        MIN_BLOCKS_TO_QUANTIZE,
        MIN_BLOCKS_TO_QUANTIZE * scheme.blocksize,
    )


def _plan(model, stack, src: _Source, config=None, model_class=None):
    plan = plan_conversion(model, stack, src.keys)
    if plan.missing and src.read_keys_of_files(set(src.files)):
        # (a hub repo's index that leaves out a tensor one of its files holds: transformers loads it, so every file is
        # fetched and read before the checkpoint is taken to lack it)
        plan = plan_conversion(model, stack, src.keys)
    if plan.missing:
        raise ShardDirError(
            f"The checkpoint {src.description} lacks {len(plan.missing)} tensors that {type(model).__name__} needs "
            f"(e.g. {plan.missing[:4]}); it does not match its config.json.{_vision_language_hint(config, model_class)}"
        )
    _refuse_misshapen(model, plan, src)
    return plan


def _refuse_misshapen(model, plan, src: _Source) -> None:
    """Raise where the checkpoint stores a tensor in another shape than the model built from its config.json has
    (a config edited, or another checkpoint's weights beside it): `from_pretrained` refuses it (size mismatch), and
    the split wrote it, to be refused only when a model streamed it, advising a new split that did the same. Compared
    where a checkpoint tensor becomes the model's as it is (renamed at most); a converter's (experts fused into one
    3-D tensor, a fused qkv split) changes its shape, and is left to the conversion. From the headers of the files
    on this machine: a hub repo's are looked at again once fetched, before anything is written."""
    direct = {key: renamed for entries in plan.units.values() for key, renamed, pattern in entries if pattern is None}
    stored = src.stored_shapes(set(direct))
    # (a module's `_extra_state` is no tensor)
    expected = {k: tuple(t.shape) for k, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}
    wrong = [key for key in direct if key in stored and stored[key] != expected.get(direct[key], stored[key])]
    if wrong:
        shown = "; ".join(
            f"{key!r}{f' (loaded as {direct[key]!r})' if direct[key] != key else ''} with shape {list(stored[key])}, the "
            f"model's {list(expected[direct[key]])}"
            for key in wrong[:4]
        )
        raise ShardDirError(
            f"The checkpoint {src.description} stores {_count(len(wrong), 'tensor')} in another shape than "
            f"{type(model).__name__} built from its config.json has (e.g. {shown}); it does not match its "
            "config.json, and `from_pretrained` refuses it too (size mismatch). Split a checkpoint whose config.json "
            "is the one its weights were saved with; nothing was written."
        )


def _vision_language_hint(config, model_class) -> str:
    """Where the default class was a text-only causal LM's and the checkpoint's config is a vision-language model's too
    (Emu3): its checkpoint may be the vision-language model's, whose keys the text-only class does not take."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto import modeling_auto as auto

    if model_class is not None or type(config) not in auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        return ""
    if auto_class_for(config) is not AutoModelForCausalLM:  # (Llava's: the class it was split as already)
        return ""
    return (
        f" Its config is a vision-language model's too ({auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)].__name__}"
        "): if the checkpoint is that model's, split it with `model_class='AutoModelForImageTextToText'` "
        "(`--model-class AutoModelForImageTextToText`)."
    )


def _refuse_prequantized(config, src: _Source) -> None:
    """Raise where the checkpoint is stored quantized (its config has a `quantization_config`: block-FP8, MXFP4,
    GPTQ, AWQ, bitsandbytes...): its files hold codes and scales, not weights, which a split would store as weights."""
    for cfg in (config, config.get_text_config() if hasattr(config, "get_text_config") else None):
        quant = getattr(cfg, "quantization_config", None)
        if not quant:
            continue
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        method = getattr(method, "value", method)  # (a `QuantizationMethod` enum)
        raise ShardDirError(
            f"The checkpoint {src.description} is stored pre-quantized (its config.json has a `quantization_config`, "
            f"quant_method {method!r}): its weight files hold quantized codes and their scales, which hf_layerstream "
            "does not split or stream. Split the original-precision checkpoint instead (its publisher's bf16/fp16 "
            "release), or dequantize this one first (load it with `from_pretrained` where transformers can "
            "dequantize it and `save_pretrained` it in bf16); pass `compression='4bit'` or `'8bit'` "
            "(`--compression`) to have the split store its own block-quantized layers."
        )


def _refuse_untied_pairs(model, plan, src: _Source, dtype: torch.dtype | None) -> None:
    """Raise where the config ties a pair (`tie_word_embeddings`) that the checkpoint stores under both names with
    different values: `from_pretrained` leaves such a pair untied (it warns), while the model built from the config,
    which the shards are streamed into, ties it (equal values are tied by both, as before)."""
    from .modeling import tied_targets

    tied = tied_targets(model)
    for target, key in sorted(plan.tied_stored.items()):
        source = tied[target]
        entries = [e for entries in plan.units.values() for e in entries if e[1] == source]
        value = convert_unit(model, entries, src.load, plan.converters).get(source) if entries else None
        if value is None:
            continue
        stored = src.load(key)
        common = dtype or torch.promote_types(value.dtype, stored.dtype)
        if stored.shape == value.shape and torch.equal(stored.to(common), value.to(common)):
            continue
        stored_as = f" (as {key!r})" if key != target else ""
        raise ShardDirError(
            f"The checkpoint {src.description} stores {target!r}{stored_as} and {source!r} with different values, "
            f"but its config ties them (`tie_word_embeddings`: true). `from_pretrained` leaves the two untied then, "
            "while a model built from this config ties them, so hf_layerstream cannot stream it as `from_pretrained` "
            'loads it. Set `"tie_word_embeddings": false` in config.json (in a copy of the checkpoint folder; its '
            "weight files can be symlinks), split that copy, and build the model from its config (or the shard "
            "directory's)."
        )


# --- main entry point ----------------------------------------------------------------------------------------------


def split_checkpoint(
    source: str | os.PathLike,
    shard_dir: str | os.PathLike,
    *,
    compression: str | None = None,
    quant_type: str | None = None,
    blocksize: int | None = None,
    double_quant: bool = False,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    wait: bool = False,
    progress: bool = True,
    model_class: type | str | None = None,
    adapter: str | os.PathLike | list[str | os.PathLike] | None = None,
    adapter_revision: str | list[str | None] | None = None,
    remove_from_cache: bool = False,
) -> Path:
    """Split a transformers checkpoint into a shard directory: one file per decoder layer plus the resident parts.

    Tensors are stored under the model's own parameter names exactly as `from_pretrained` would load them (the
    checkpoint's keys go through transformers' conversion mapping: fused MoE experts, renamed heads, legacy names).
    Each file is written atomically; an interrupted split resumes where it stopped when run again, and the
    manifest, written last, is what makes the directory valid. The source is only read. Beside the weights: the
    config, the tokenizer and generation config, the source's license and notice files, and `README.md`, a hub model
    card with the source's license, its `base_model` (a hub source) and the code that streams the split (one there
    from an earlier run, perhaps edited, is kept).

    Args:
        source (`str` or `os.PathLike`):
            A local checkpoint folder (sharded or single `.safetensors`, or `.bin` loaded with `weights_only=True`)
            or a hub repo id, fetched one weight file at a time (honours `HF_HUB_OFFLINE` and the hub cache).
        shard_dir (`str` or `os.PathLike`):
            Where to write the shard directory (created if needed).
        compression (`str`, *optional*):
            `None` (full precision, lossless), `"4bit"` or `"8bit"` block-wise quantization with bitsandbytes (also
            by name: `"nf4"`, `"fp4"`, `"int8"`; case-insensitive).
        quant_type (`str`, *optional*):
            For 4-bit: `"nf4"` (default) or `"fp4"`.
        blocksize (`int`, *optional*):
            Quantization block size.
        double_quant (`bool`, defaults to `False`):
            For 4-bit: quantize the block scales too (transformers' `bnb_4bit_use_double_quant`), 8% less to read
            per token at nf4 / 64, for the same error to a few parts in 10,000 (see `QuantScheme`).
        dtype (`torch.dtype` or `str`, *optional*):
            Cast floating-point tensors to this dtype (default: keep the checkpoint's); the shard directory's config
            (and its sub-configs) then says it, as `from_pretrained(dtype=...)` sets it. Either way the manifest
            records the dtype they are streamed at by default: this one, else the one `from_pretrained(dtype="auto")`
            loads the checkpoint at.
        revision, token, cache_dir:
            Passed to `huggingface_hub.hf_hub_download` for a hub `source`; `token` and `cache_dir` for a hub
            `adapter` too (`revision` is the source's: `adapter_revision` is the adapter's). With a local folder as
            `source` each is warned about (`token` and `cache_dir` where no `adapter` is a hub one) and not used to
            read it.
        overwrite (`bool`, defaults to `False`):
            Replace an existing shard directory made with other options or from another model, or write into a
            non-empty folder that holds no shard directory (files of the names the split writes are replaced).
        wait (`bool`, defaults to `False`):
            If another process is splitting into `shard_dir`, wait for it instead of raising.
        progress (`bool`, defaults to `True`):
            Show a progress bar.
        model_class (`type` or `str`, *optional*):
            The class to build the model as, a transformers model class or auto class or its name (default:
            `AutoModelForCausalLM`'s, else `AutoModelForImageTextToText`'s). Llama-4's and Llama-3.2-Vision's
            checkpoints are split as the text-only class `AutoModelForCausalLM` loads them as; pass
            `"AutoModelForImageTextToText"` to split them with their vision weights, for images.
        adapter (`str` or `os.PathLike`, *optional*):
            A PEFT adapter of the model (LoRA, DoRA, IA3, LoHa, LoKr and the other kinds PEFT merges; a folder or a
            hub repo id, fetched with `token` and `cache_dir` at `adapter_revision`; needs the peft package), merged
            into the weights as they are written, as PEFT's `merge_and_unload` merges it into the loaded model: without
            `compression` the streamed model is that merged model, bit for bit (with it, the merged weights are
            quantized); it streams at the base model's speed and memory. The merge is at the dtype the shard
            directory streams at (`dtype`, else the one `from_pretrained(dtype="auto")` loads the checkpoint at;
            float32 for the weights `from_pretrained` keeps so, stored so). The manifest records the adapter; a split
            with another adapter, or none, is another split. A list of adapters merges each in turn, onto the weights
            the ones before left: as `PeftModel.from_pretrained(model, first).merge_and_unload()`, then the next
            loaded onto that model and merged, and so on (the order counts where a merge reads the weight it merges
            into, as DoRA's does, or an adapter replaces a module whole); a list of one is that adapter.
        adapter_revision (`str` or `list`, *optional*):
            The revision (branch, tag or commit) of a hub `adapter` (default: its default branch), as
            `PeftModel.from_pretrained(..., revision=...)` takes it; for a list of adapters, a list of as many (`None`
            for a default branch or a local folder). The manifest notes the commit a hub adapter was fetched at; the
            same files at another commit are the same adapter.
        remove_from_cache (`bool`, defaults to `False`):
            For a hub repo `source`: delete each weight file the split reads from the hub cache once every unit reading
            it is written (whoever downloaded it; another revision's copy of the same file stays), and download each
            one only when a unit first reads it (the split is planned from the files' headers, read from the hub):
            the disk then holds the split and a few of the repo's files at a time, not the whole repo beside it.
            Files a split interrupted before downloaded are removed by the run that finishes it. `from_pretrained` of
            the repo downloads them again. A repo of `.bin` files is downloaded whole before the first unit (their
            keys are in their pickles), then removed as the split goes. A file outside the hub cache that links to
            one of its blobs (a `--local-dir` download made by huggingface_hub before 0.23, whose files were such
            links) no longer opens once that blob is removed.

    Returns:
        `pathlib.Path`: the shard directory.

    Raises:
        [`ShardDirError`]: the checkpoint is stored pre-quantized (its config has a `quantization_config`), or its
            config ties a pair of weights it stores with different values; `shard_dir` holds another split, one
            made by a newer hf_layerstream, or files but no shard directory (pass `overwrite=True` to write there);
            `shard_dir` is in the hub cache (a folder of a repo's there, made yet or not, or any other folder of
            `HF_HUB_CACHE` or `cache_dir`, or the cache itself).
        `ImportError`: `adapter` given without peft installed.
        `TypeError`: an argument of another type than it takes (a path, `revision` or `adapter` that is no str, a
            `blocksize` that is no int, a flag that is not a bool), naming it.
        `ValueError`: `shard_dir` inside the source's folder (a local one, or a hub repo's snapshot in the hub cache)
            or holding it; `remove_from_cache` with a local folder as `source`; `adapter` holds no adapter, is of another
            model, damaged, prompt learning, made from the weights it adapts, or sets `modules_to_save` on a tied
            weight (before anything is written); `adapter_revision` without `adapter`, or not one per adapter.
        `PermissionError`: `source` or `adapter` is a gated hub repo this user cannot access.
        `FileNotFoundError`: `adapter` is neither a folder nor a hub repo id, is a file, or is a hub id offline and not
            in the hub cache.

    Example:
    ```python
    >>> from hf_layerstream import split_checkpoint
    >>> split_checkpoint("meta-llama/Meta-Llama-3-8B-Instruct", "llama3-8b.layers")
    ```
    """
    from transformers import AutoConfig

    # (a `revision` that is no string failed in huggingface_hub, naming no argument)
    check_path("source", source)
    check_path("shard_dir", shard_dir)
    check_path("cache_dir", cache_dir, optional=True)
    check_revision(revision)
    check_token(token)
    overwrite, wait = check_flag("overwrite", overwrite), check_flag("wait", wait)
    progress, remove_from_cache = check_flag("progress", progress), check_flag("remove_from_cache", remove_from_cache)
    double_quant = check_flag("double_quant", double_quant)
    adapters = _adapters_given(adapter, adapter_revision)
    scheme = None
    quantize_tensor = None
    if compression is not None or quant_type is not None or blocksize is not None or double_quant:
        from .quant import load_backend, quantize_tensor, resolve_compression

        scheme = resolve_compression(compression, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        load_backend("Splitting with `compression`")  # (before anything is written: not half way)
    dtype = resolve_dtype(dtype)
    shard_dir = Path(shard_dir).expanduser()  # (as `source` is: `~/x.layers` made a folder named `~`)
    if os.path.islink(shard_dir) and not shard_dir.exists():
        raise ShardDirError(
            f"`shard_dir` {shard_dir} is a dangling symlink (to {os.readlink(shard_dir)}): create the folder it points "
            "to, or pass another `shard_dir`."
        )
    if shard_dir.exists() and not shard_dir.is_dir():
        raise ShardDirError(f"`shard_dir` {shard_dir} exists and is not a directory.")
    # (a file on the way: the folder cannot be made, and mkdir's bare "[Errno 20] Not a directory" came once the source
    # was planned, naming no argument)
    above = next((p for p in shard_dir.absolute().parents if os.path.lexists(p)), None)
    if above is not None and not above.is_dir():
        raise ShardDirError(
            f"`shard_dir` {shard_dir} cannot be made: {above} is a file, not a folder; pass another `shard_dir`."
        )
    in_cache = hub_repo_of(shard_dir)  # (made yet or not)
    if in_cache is not None:
        # (a shard directory downloaded from the hub: the split replaced the cache's links with its own files; a folder
        # not made yet was not checked, and the split made it in the source's own snapshot, or a snapshot of its own)
        downloaded = hub_download_of(shard_dir) is not None
        mend = redownload_command(shard_dir) if downloaded and shard_dir.exists() else None
        raise ShardDirError(
            f"`shard_dir` {shard_dir} is in the hub cache, "
            + (f"a download of the repo {in_cache!r}" if downloaded else f"in the folder of the repo {in_cache!r}")
            + ", which the split must not write into: choose a folder outside the hub cache"
            + (f" (to mend that download, `{mend}`)." if mend is not None else "; nothing was written.")
        )
    cache = hub_cache_of(shard_dir, cache_dir)
    if cache is not None:
        # (made beside the repos' folders, `$HF_HUB_CACHE/llama.layers`, it was written: `hf cache ls` then reported it
        # as an inconsistency of the cache, and `hf cache rm` could not remove it)
        here = os.path.realpath(shard_dir) == os.path.realpath(cache)
        made = (shard_dir / MANIFEST_NAME).is_file()
        raise ShardDirError(
            f"`shard_dir` {shard_dir} is "
            + ("the hub cache" if here else f"in the hub cache {cache}, in no repo's folder there")
            + ", which the split must not write into (`hf cache ls` reports what is there but a repo's folder as an "
            "inconsistency of the cache, and `hf cache rm` cannot remove it): choose a folder outside the hub cache"
            + ("; to keep the split made there, move it out: it streams from any folder" if made and not here else "")
            + "; nothing was written."
        )
    if os.path.islink(shard_dir / "layers"):
        # (the split wrote through it, then every layer was refused as resolving outside the directory)
        raise ShardDirError(
            f"`shard_dir` {shard_dir} holds `layers` as a symlink (to {os.readlink(shard_dir / 'layers')}): a shard "
            "directory's files must lie inside it. Remove the symlink, or make the whole `shard_dir` the folder on "
            "the other disk (or a symlink to it)."
        )

    src = _Source(source, revision=revision, token=token, cache_dir=cache_dir)
    if src.local_dir is not None and all(Path(a).expanduser().is_dir() for a, _ in adapters):
        # (nothing is downloaded, a hub adapter aside, which `token` and `cache_dir` serve too: `token` was warned about
        # as unused where it fetched one; `cache_dir` was taken without a word, as `revision` and `token` were)
        warn_hub_only(src.local_dir, "split as it is", token=token, cache_dir=cache_dir)
    src.headers_only = remove_from_cache
    if remove_from_cache and src.local_dir is not None:
        raise ValueError(
            f"`remove_from_cache` deletes a hub repo's weight files from the hub cache as the split goes; `source` "
            f"{src.local_dir} is a local folder, which the split never modifies. Split without it; nothing was written."
        )
    if src.local_dir is not None:
        # (`overwrite=True` into a folder holding the source, `split(ckpt_dir / "layers", ckpt_dir)`, deleted its weight
        # files before they were read)
        inner, outer = shard_dir.resolve(), src.local_dir.resolve()
        if inner.is_relative_to(outer) or outer.is_relative_to(inner):
            raise ValueError(
                f"`shard_dir` must differ from `source`, and neither may be inside the other ({shard_dir}, "
                f"{src.local_dir}): the split would write into the source's folder, which it never modifies. Choose a "
                "`shard_dir` outside the checkpoint folder (and not holding it); nothing was written."
            )
    else:
        # (a hub repo's snapshot in the hub cache is the source's folder: a `shard_dir` holding the hub cache, with
        # `overwrite`, wrote among the repos there)
        snapshot = src.config_path.parent
        inner, outer = shard_dir.resolve(), snapshot.resolve()
        if inner.is_relative_to(outer) or outer.is_relative_to(inner):
            raise ValueError(
                f"`shard_dir` must differ from `source`, and neither may be inside the other ({shard_dir}, the hub "
                f"cache's snapshot of {src.repo_id!r}, {snapshot}): the split would write into the source's folder, "
                "which it never modifies. Choose a `shard_dir` outside the hub cache (and not holding it); nothing was "
                "written."
            )
    foreign = _foreign_entries(shard_dir)
    if foreign and not overwrite:
        raise ShardDirOccupiedError(
            f"`shard_dir` {shard_dir} is not empty and holds no shard directory ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}): the split would write its `config.json`, tokenizer files and "
            "`layers/` over what is there (a checkpoint's own, say).",
            "Choose a new or empty directory, or pass `overwrite=True` (`--overwrite`) to write the split there "
            "(files of the same names are replaced, the others left).",
        )
    config = AutoConfig.from_pretrained(src.config_path.parent)
    _refuse_prequantized(config, src)
    model = build_as(config, model_class)
    stack = require_layer_stack(model)
    should_quantize = _quantization_rule(model) if scheme is not None else None

    fingerprint = architecture_fingerprint(model, stack)
    plan = _plan(model, stack, src, config, model_class)
    # the weight files the split reads: checked before anything is written, not found missing half way through
    needed_files = _files_read(plan, src)
    absent = src.missing_files(needed_files)
    if absent:
        # (a hub repo's download in the hub cache, its snapshot given by its path: the command that downloads it
        # there, as a damaged file of it is told; `--local-dir DIR` downloads elsewhere)
        command = redownload_command(src.local_dir)
        finish = f"`{command}`" if command else "`hf download REPO --local-dir DIR` fetches what is missing"
        raise FileNotFoundError(
            f"`source` {src.local_dir} lacks {len(absent)} weight file(s) that its checkpoint index names and that "
            f"hold tensors {type(model).__name__} needs: {', '.join(absent[:8])}{', ...' if len(absent) > 8 else ''}. "
            f"The download or copy of the checkpoint looks incomplete: finish it ({finish}) and run the split again; "
            "nothing was written."
        )
    _refuse_untied_pairs(model, plan, src, dtype)
    if plan.unexpected:
        logger.warning(
            "Ignoring %d checkpoint keys the model does not use (e.g. %s)", len(plan.unexpected), plan.unexpected[:3]
        )
    # what streaming casts floating weights to by default, as `from_pretrained(dtype="auto")` loads them
    load_dtype = dtype or _auto_dtype(config, src)
    if scheme is not None and load_dtype is not None and load_dtype not in _BNB_DTYPES:
        # (bitsandbytes quantizes these only: the split stored every weight at full precision, named 4-bit)
        what = f"`dtype` {dtype_to_str(dtype)}" if dtype is not None else f"the checkpoint's {dtype_to_str(load_dtype)}"
        raise ValueError(
            f"`compression` quantizes float32, float16 and bfloat16 weights; {what} would leave every weight "
            "unquantized. Pass one of those as `dtype`" + (" (or none, for the checkpoint's)." if dtype else ".")
        )
    if scheme is not None and dtype is None:
        _refuse_unquantizable(plan, src, load_dtype)
    if scheme is not None:
        _warn_if_nothing_quantized(model, should_quantize, scheme)

    compression_dict = scheme.to_dict() if scheme is not None else None
    mergers: list = []  # an `AdapterMerge` for each adapter, in order
    adapter_folders, records, noted = [], [], []
    if adapters:
        from .merge import adapter_identity, hub_commit, resolve_adapter

        for given, revision in adapters:
            folder = resolve_adapter(given, revision=revision, token=token, cache_dir=cache_dir)
            adapter_folders.append(folder)
            records.append(adapter_identity(folder, given))
            commit = hub_commit(folder, given)
            # (the manifest notes the commit of a hub adapter beside it, for what it says; not compared: `_adapter_key`)
            noted.append(records[-1] | ({"revision": commit} if commit is not None else {}))
    for n, record in enumerate(records[1:], 2):
        if _adapter_key(record) in [_adapter_key(r) for r in records[: n - 1]]:
            logger.warning(
                "Adapter %d, %s, is an adapter given before it (the same files): it is merged again, as asked (its "
                "change applied twice).",
                n,
                record["id"],
            )
    # (one adapter is recorded as it always was, a list of one too: the splits made before keep their digests)
    adapter_record = None if not records else records[0] if len(records) == 1 else records
    adapter_noted = None if not noted else noted[0] if len(noted) == 1 else noted
    source_identity = src.identity(needed_files)
    options = _options_key(fingerprint, dtype, compression_dict, source_identity, adapter_record)
    # (a split finished before, which recorded the source otherwise, is this one too: see `_Source.identity`)
    earlier_digests = [
        _options_digest(_options_key(fingerprint, dtype, compression_dict, src.identity(legacy=legacy), adapter_record))
        for legacy in (False, True)
    ]
    units = [layer_unit(i) for i in range(len(stack))] + [RESIDENT]
    if adapter_folders and not os.path.lexists(shard_dir / MANIFEST_NAME):
        from .merge import AdapterMerge

        # (made before anything is written, the folder too, where there is no finished split to compare with first:
        # an adapter PEFT cannot load or merge is refused first)
        mergers = [AdapterMerge(folder, config, model_class, load_dtype) for folder in adapter_folders]
    try:
        shard_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # (mkdir's bare error named no argument: `/proc/x`, a folder this user cannot write in)
        raise ShardDirError(
            f"`shard_dir` {shard_dir} cannot be made ({e.strerror or e}: {e.filename}); pass another `shard_dir`."
        ) from e
    with _locked(shard_dir, wait=wait):
        # Only one split runs here at a time (the lock): anything temporary is a leftover of a killed run.
        try:
            for stale in remove_stale_tmp_files(shard_dir, ("layers", _CHAT_TEMPLATE_DIR)):
                logger.info("Removed %s, left by an interrupted split", stale)
        except OSError as e:  # (a folder this user cannot write: a finished split there is only checked)
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
        manifest_path = shard_dir / MANIFEST_NAME
        repaired: dict[str, UnitEntry] | None = None
        keep_config = False  # (a repair: config.json as it is, edited or not, where it is sound)
        # what each unit file carries (`SPLIT_KEY`) and the manifest records: where this split was recorded under an
        # earlier form of its source's identity, that one, which its units kept carry (opening the directory refuses a
        # unit carrying another digest than the manifest's: another split's)
        digest = _options_digest(options)
        if manifest_path.exists():
            existing = _read_json(manifest_path)
            version = existing.get("format_version") if isinstance(existing, dict) else None
            if _is_newer_format(version) and not overwrite:
                raise ShardDirOccupiedError(
                    f"`shard_dir` {shard_dir} was made by a newer hf_layerstream (shard format version {version}; "
                    f"this hf_layerstream {__version__} reads and writes version {FORMAT_VERSION}); it is left as it "
                    "is.",
                    "Upgrade hf_layerstream to use it, pass `overwrite=True` (`--overwrite`) to replace it with a "
                    "split made by this version, or choose another directory.",
                )
            # (a damaged adapter record, `verify` names it: a split whose options' digest, the adapters in it, is
            # this one's is this split, and its record is written again)
            adapter_damaged = (
                isinstance(existing, dict)
                and existing.get("adapter") is not None
                and _recorded_adapter(existing) is None
                and existing.get("split_options") in (_options_digest(options), *earlier_digests)
            )
            same = (
                isinstance(existing, dict)
                and existing.get("fingerprint") == fingerprint
                and existing.get("compression") == compression_dict
                and (adapter_damaged or _adapter_key(_recorded_adapter(existing)) == adapter_record)
                and (dtype is None or existing.get("dtype") == dtype_to_str(dtype))
                and existing.get("split_options") in (None, _options_digest(options), *earlier_digests)
            )
            if same and not overwrite:
                if existing.get("split_options") in earlier_digests:
                    digest = existing["split_options"]
                try:
                    directory = ShardDirectory(shard_dir)  # sizes, headers and sample digests
                    # (a config.json edited since: its side files are rewritten; the manifest's layers: it is too)
                    mismatch, edited = directory.model_problems()
                    if mismatch is not None:
                        raise ShardFileError(shard_dir / "config.json", mismatch)
                    if edited is not None:
                        raise ShardFileError(directory.manifest_path, edited)
                except ShardDirError as e:
                    logger.warning("%s holds this split but is damaged (%s); repairing it", shard_dir, e)
                    repaired = _sound_manifest_units(shard_dir, existing, digest)
                    keep_config = _config_json_sound(shard_dir)
                else:
                    keep_config = True  # (sound: the units of an earlier compression rule are written again)
                    ruled_otherwise = (
                        _units_of_another_rule(directory, should_quantize, scheme) if scheme is not None else []
                    )
                if repaired is None and ruled_otherwise:
                    # (an earlier hf_layerstream stored other tensors quantized: MiniMax's decay buffers, DBRX's 2-D
                    # experts; the split is made again where the current rule decides otherwise, the rest kept)
                    logger.warning(
                        "%s was split under an earlier compression rule: %d of %d units store other tensors "
                        "quantized than this hf_layerstream %s does (%s); writing those again",
                        shard_dir,
                        len(ruled_otherwise),
                        len(units),
                        __version__,
                        ", ".join(ruled_otherwise[:4]) + (", ..." if len(ruled_otherwise) > 4 else ""),
                    )
                    repaired = {u: directory.unit(u) for u in units if u not in ruled_otherwise}
                    if not os.access(shard_dir, os.W_OK):  # (a read-only mount: still usable, as it was)
                        logger.warning(
                            "%s cannot be written to: its split is left as it is (it runs; splitting to a writable "
                            "directory stores the tensors as this version does)",
                            shard_dir,
                        )
                        return shard_dir
                elif repaired is None:
                    stale = shard_dir / PROGRESS_NAME  # (an interrupted re-run's record; beside the manifest, unread)
                    if os.path.lexists(stale):  # (on a read-only mount an unlink fails, EROFS, even with no file)
                        try:
                            _remove(stale)
                        except OSError as e:
                            logger.info("could not remove %s (%s); it is ignored beside the manifest", stale, e)
                    # (a split made before its manifest listed them: those a split of this source writes, which the
                    # manifest lists from now on)
                    recorded = read_side_files(existing.get("side_files"))
                    side_files = recorded if recorded is not None else _side_files_of_a_split(src, config)
                    restored = _restore_side_files(
                        shard_dir,
                        side_files,
                        src,
                        config,
                        lambda: _model_card(
                            src,
                            src.fetch(MODEL_CARD_NAME),
                            shard_dir,
                            model,
                            config,
                            compression_dict,
                            adapter_noted,
                            dtype,
                        ),
                        recorded=recorded is not None,
                    )
                    if recorded is None:
                        existing = _record_side_files(shard_dir, existing, side_files)
                    if adapter_damaged:
                        _record_adapter(shard_dir, existing, adapter_noted)
                    if not restored:
                        logger.info("%s already holds this split; nothing to do", shard_dir)
                    if remove_from_cache:
                        src.remove_from_cache(needed_files)
                    return shard_dir
            elif not overwrite and not isinstance(existing, dict):
                raise ShardDirOccupiedError(
                    f"`shard_dir` {shard_dir} holds a split whose {MANIFEST_NAME} is damaged (not a readable JSON "
                    "object): which model, source and options it was made of is unknown.",
                    "Pass `overwrite=True` (`--overwrite`) to split again there, or choose another directory.",
                )
            elif not overwrite:
                # (what differs, where it can be told: the manifest records the source, model and compression, and
                # the digest of the options, which shows the `dtype` option where the rest is the same)
                difference = _adapter_difference(_recorded_adapter(existing), adapter_noted)
                if not difference:  # (other adapters: the digest tells nothing more)
                    recorded_source = existing.get("source") if isinstance(existing.get("source"), dict) else {}
                    recorded = _recorded_options(existing, options)
                    difference = _options_difference(
                        recorded,
                        options,
                        recorded_source,
                        _manifest_source(src),
                        fingerprint_edited=_fingerprint_edited(existing, fingerprint, model, stack),
                    )
                raise ShardDirOccupiedError(
                    f"`shard_dir` {shard_dir} already holds a split of another model, another source checkpoint or "
                    f"with other options{difference}.",
                    "Pass `overwrite=True` (`--overwrite`) to replace it, or choose another directory.",
                )
        if adapter_folders and not mergers:
            from .merge import AdapterMerge

            mergers = [AdapterMerge(folder, config, model_class, load_dtype) for folder in adapter_folders]
        # an interrupted `overwrite=True` run, resumed without it, still replaces the split it was replacing: the side
        # files and deeper layers of the model there before go too (the record says so)
        replacing = overwrite or _resumes_an_overwrite(shard_dir, options)
        done = _load_progress(shard_dir, options, digest, overwrite=overwrite)
        if repaired is not None:  # damaged units are rewritten, never adopted
            done.update({u: e for u, e in repaired.items() if u not in done})
        for unit in units if repaired is None and not overwrite else ():
            # finished by a run killed before it could record them: adopt, do not re-read the source
            if unit not in done:
                entry = _adopt_unit_file(shard_dir, unit, digest)
                if entry is not None:
                    done[unit] = entry
        if done:
            logger.info("Resuming the split in %s: %d of %d units already done", shard_dir, len(done), len(units))

        todo = [u for u in units if u not in done]
        # the weight files the units still to write read (and the checks of tied pairs): those a resumed split needs
        reading = _files_read(plan, src, todo) if todo else set()
        if remove_from_cache and src.read_keys_of_files(reading, download=False):
            # (the hub files' headers, read from the hub: a file holds other tensors than its index lists, and the
            # split is planned from what the files hold, as transformers loads them, before anything is downloaded)
            plan = _plan(model, stack, src, config, model_class)
            _refuse_untied_pairs(model, plan, src, dtype)
            needed_files = _files_read(plan, src)
            reading = _files_read(plan, src, todo)
        stored_dtypes = src.stored_dtypes() if dtype is None else {}
        estimates = _estimate_units_bytes(
            model,
            stack,
            plan,
            stored_dtypes,
            dtype=dtype,
            scheme=scheme,
            units=todo,
            fallback_dtype=_config_dtype(config),
            quantizes=should_quantize,
        )
        side = _source_side_files(src, config)  # (fetched first so their sizes count: a tokenizer.json takes MBs)
        if not any(side.get(name) is not None for name in _TOKENIZER_FILES):
            # (the split went through, and `generate` failed later with transformers' unrelated "needs sentencepiece
            # or tiktoken" text)
            logger.warning(
                "%s has no tokenizer files: the split has none either, so `AutoTokenizer.from_pretrained` of it fails. "
                "Load the tokenizer from elsewhere (`--tokenizer` for `hf-layerstream generate`), or copy its files "
                "into the shard directory.",
                src.description,
            )
        source_card = src.fetch(MODEL_CARD_NAME)  # (its license and language go into the split's own model card)
        needed, held = _space_needed(shard_dir, estimates)
        needed += sum(path.stat().st_size for path in side.values() if path is not None)
        needed += 4096 * len(units) + 2**20  # manifest, progress record and config
        free = shutil.disk_usage(shard_dir).free
        # the weight files of a hub repo not in the hub cache yet are downloaded there before a layer is written (and
        # kept): huggingface_hub only warns when they do not fit, and the split ran out of space after the download
        download = src.to_download(reading)
        download_text = ""
        if download is not None:
            sizes, cache = download
            files = f"{len(sizes)} weight file{'s' if len(sizes) > 1 else ''} of {src.repo_id}"
            download_bytes = sum(sizes.values())
            if remove_from_cache:
                # the most the files downloaded take at once, each when a unit first reads it and removed once the
                # last one is written; `.bin` files all before the first unit (their keys are in their pickles)
                bins = {f: n for f, n in sizes.items() if not f.endswith(".safetensors")}
                safetensors = {f: n for f, n in sizes.items() if f not in bins}
                reads = [_files_read(plan, src, [u], tied=False) for u in todo]
                download_bytes = sum(bins.values()) + _most_held(safetensors, reads)
            if _same_disk(cache, shard_dir):
                needed += download_bytes
                download_text = (
                    f", {size_text(download_bytes)} of it for the {files} it reads that the hub cache lacks, downloaded "
                    f"into the cache there ({cache}) and removed as it goes (the most it holds at once),"
                    if remove_from_cache
                    else f", {size_text(download_bytes)} of it to download the {files} it reads that the hub cache "
                    f"lacks, into the cache there ({cache}),"
                )
            elif download_bytes > (cache_free := shutil.disk_usage(cache).free):
                raise OSError(
                    errno.ENOSPC,
                    f"Not enough disk space in the hub cache {cache} to download the {files} the split reads that it "
                    f"lacks: they take {size_text(download_bytes)}{' at once at most' * remove_from_cache} and "
                    f"{size_text(cache_free)} are free there. Free "
                    "some space, or point the hub cache to a disk with room (`cache_dir`, or the HF_HUB_CACHE "
                    "variable), or download the repo to such a disk (`hf download REPO --local-dir DIR`) and split "
                    "from that folder; nothing was written",
                )
        if needed > free:
            held_text = (
                f" ({held} of the files it replaces {'is' if held == 1 else 'are'} held open by a process, such as a "
                "model streaming from this directory: their space is freed only once it lets them go, with "
                "`disable_layer_streaming` or its exit)"
                if held
                else ""
            )
            raise OSError(
                errno.ENOSPC,
                f"Not enough disk space in {shard_dir}: the split needs about {size_text(needed)} more{download_text} "
                f"and {size_text(free)} are free{held_text}. Free some space or choose another `shard_dir`"
                + (
                    ", or point the hub cache to another disk (`cache_dir`, or the HF_HUB_CACHE variable)"
                    * bool(download_text)
                )
                + "; nothing was written",
            )

        if todo and src.read_keys_of_files(reading):
            # (a hub file fetched just now holds other tensors than its index lists: planned from what the files hold,
            # as transformers loads them)
            plan = _plan(model, stack, src, config, model_class)  # (the shapes checked there too)
            _refuse_untied_pairs(model, plan, src, dtype)
        elif todo and src.local_dir is None:
            _refuse_misshapen(model, plan, src)  # (a hub repo's files, fetched by now; a folder's were, in `_plan`)
        if todo and scheme is not None and dtype is None:
            _refuse_unquantizable(plan, src, load_dtype)  # (a hub repo's files, fetched by now)

        # Only now, every check that can refuse passed: a refused run (`overwrite=True`, or the repair of a damaged
        # directory) leaves the split the directory holds as usable as it was.
        # The progress is recorded before the first unit, and before the manifest goes, so an interrupted directory
        # always says what it is and how to finish it (removed first, a run killed in between left neither, and the
        # same split refused the folder as holding no shard directory).
        with _write_errors_named(shard_dir, PROGRESS_NAME, f"{len(done)} of {len(units)} units are complete and kept"):
            _save_progress(shard_dir, options, {u: done[u] for u in units if u in done}, replacing=replacing)
        if manifest_path.exists():
            manifest_path.unlink()
            fsync_dir(shard_dir)
        if replacing:
            _remove_foreign_unit_files(shard_dir, {u: _unit_file(u) for u in units})

        kept = kept_in_float32(model, dtype) if dtype is not None else None
        created = created_dtypes(model, dtype) if dtype is not None else {}
        # compressed without `dtype`: a weight stored in another dtype than the one `from_pretrained` loads it at
        # (float32 files under a config saying bfloat16, a checkpoint of mixed dtypes) is cast to that one before it
        # is quantized, as the loaded model holds it: quantized from the stored values, its codes and scales were
        # others, and the streamed model was not the loaded one with its weights quantized (logits 4e-2 off)
        as_loaded = None
        if scheme is not None and dtype is None and load_dtype is not None:
            as_loaded = (kept_in_float32(model, load_dtype), created_dtypes(model, load_dtype))
        bar = progress_bar(progress, total=len(units), desc="Splitting", unit="layer")
        bar.update(len([u for u in units if u in done]))
        try:
            for unit in units:
                if unit in done:
                    continue
                entries = plan.units.get(unit, [])
                tensors = convert_unit(model, entries, src.load, plan.converters)
                tensors = {k: tensors[k] for k in sorted(tensors)}
                if dtype is not None:  # (what the model keeps in float32 or creates in another dtype keeps it)
                    for k in list(tensors):  # (one at a time: each source tensor is freed once cast)
                        if tensors[k].is_floating_point():
                            tensors[k] = tensors[k].to(_dtype_of(k, kept, created, dtype))
                for merger in mergers:  # (each onto what the ones before left)
                    merger.merge(tensors)
                if as_loaded is not None:  # (the weights quantized only: the others are cast as they stream)
                    for k, t in tensors.items():
                        to = _dtype_of(k, *as_loaded, load_dtype)
                        if t.dtype != to and should_quantize(k, t, scheme, is_embedding=unit == RESIDENT):
                            tensors[k] = t.to(to)
                with _write_errors_named(
                    shard_dir, _unit_file(unit), lambda: f"{len(done)} of {len(units)} units are complete and kept"
                ):
                    done[unit] = _write_unit(
                        shard_dir,
                        unit,
                        tensors,
                        scheme,
                        quantize_tensor,
                        should_quantize,
                        split_digest=digest,
                        load_dtype=load_dtype,
                    )
                    _save_progress(shard_dir, options, done, replacing=replacing)
                # keep only the source files the next units still need open (a safetensors file: the next unit)
                nxt = units[units.index(unit) + 1 :]
                upcoming = [u for u in nxt if u not in done]
                later = _files_read(plan, src, upcoming, tied=False)
                src.release(later, _files_read(plan, src, upcoming[:1], tied=False))
                if remove_from_cache:  # (and in the hub cache, those the units still to write read)
                    src.remove_from_cache(needed_files - later)
                bar.update(1)
        finally:
            bar.close()

        written = set()
        for name, path in side.items():
            data = _side_file_bytes(src, config, name, path)
            if data is not None:
                _write_file(shard_dir, name, data)
                written.add(name)
        if replacing:  # the replaced split's chat template or generation config would pass for the new source's
            _remove_foreign_side_files(shard_dir, written)
        if replacing or not os.path.lexists(shard_dir / MODEL_CARD_NAME):  # (a card edited since a split: kept)
            card = _model_card(src, source_card, shard_dir, model, config, compression_dict, adapter_noted, dtype)
            _write_file(shard_dir, MODEL_CARD_NAME, card.encode())
        if dtype is not None:
            # the weights were cast: the config says so, as `from_pretrained(dtype=...)` sets it on the config and its
            # sub-configs (a model built from the shard directory's config is then built at the dtype it streams at)
            for cfg in dtype_configs(config):
                cfg.dtype = dtype
        config_text = _shard_config_json(config, src)
        if not (keep_config and repaired is not None and not replacing):
            # (a repair keeps it, as a re-run of a sound split does: the user's to edit, rope scaling for longer
            # contexts; it was written over, silently. The manifest records the split's digest: an edit is warned of)
            _write_file(shard_dir, "config.json", config_text.encode())

        floating = [t.dtype for u in done.values() for t in u.tensors.values() if t.dtype.is_floating_point]
        main_dtype = max(set(floating), key=floating.count) if floating else torch.float32
        manifest = Manifest(
            source=_manifest_source(src),
            model_type=getattr(config, "model_type", None),
            architectures=[type(model).__name__],  # the class the files were laid out for
            layers_prefix=stack.prefix,
            num_layers=len(stack),
            fingerprint=fingerprint,
            dtype=dtype_to_str(main_dtype),
            compression=compression_dict,
            units={u: done[u] for u in units},
            library_version=__version__,
            split_options=digest,
            conversion=_conversion_record(model),
            load_dtype=None if load_dtype is None else dtype_to_str(load_dtype),
            adapter=adapter_noted,
            side_files=sorted(written | {MODEL_CARD_NAME}),
            config_sha256=config_digest(json.loads(config_text)),
        )
        _write_file(shard_dir, MANIFEST_NAME, json.dumps(manifest.to_json(), indent=1).encode())
        with _finishing_errors_named(shard_dir, f"removing the progress record {shard_dir / PROGRESS_NAME}"):
            _remove(shard_dir / PROGRESS_NAME)
        with _finishing_errors_named(shard_dir, f"syncing the directory {shard_dir} (to make the manifest durable)"):
            fsync_dir(shard_dir)
        if remove_from_cache:  # (those only the units written before read, or the checks before the first unit)
            src.remove_from_cache(needed_files)
    logger.info("Wrote %d layers to %s", len(stack), shard_dir)
    return shard_dir


def _bars_disabled() -> bool:
    try:
        from huggingface_hub.utils import are_progress_bars_disabled

        return are_progress_bars_disabled()
    except Exception:  # noqa: BLE001
        return False


class _NoBar:
    """A progress bar that shows nothing and takes no lock."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, **kwargs):
    """A `tqdm.auto` bar, or `_NoBar` when `enabled` is false or the hub's progress bars are disabled.

    Not `tqdm(disable=True)`: constructing even a disabled bar takes tqdm's global write lock and starts its monitor
    thread. Half of that lock is a multiprocessing semaphore shared by every process forked from the one that created
    it, so a relative SIGKILLed while holding it (or a fork taken while the monitor thread held it) leaves any later
    `tqdm()` there blocked forever; a split blocked there also keeps its directory locked.
    """
    if not enabled or _bars_disabled():
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


def _read_json(path: Path) -> Any:
    """`path`'s JSON, or `None` where it is not a readable JSON file (a FIFO too: reading it waited for a writer)."""
    try:
        if not path.is_file():
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _dtype_of(name: str, kept, created: dict, dtype: torch.dtype) -> torch.dtype:
    """The dtype `from_pretrained(dtype=dtype)` gives the weight `name`: float32 where the model keeps it so (`kept`, a
    `kept_in_float32` pattern or `None`), the dtype it creates it in where another (`created`), else `dtype`."""
    return torch.float32 if kept is not None and kept.search(name) else created.get(name, dtype)


_WRITE_ERRNOS = (
    *(errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM),
    *(errno.EISDIR, errno.EEXIST, errno.ENOTDIR),  # (something else where the split writes a file or makes a folder)
)


@contextmanager
def _write_errors_named(shard_dir: Path, name: str, kept: str | Callable[[], str]):
    """An error writing `name` into `shard_dir` that the user can fix (a full disk, a file too large for the
    filesystem, an I/O error) names the file, the free space, what is kept and the fix."""
    try:
        yield
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        free = shutil.disk_usage(shard_dir).free
        fix = "free disk space, check the device"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            # (the preflight counts a file the split replaces as freed: one a process still has open or mapped is not)
            fix += (
                "; a file the split replaced frees its space only once no process holds it: a model streaming "
                "from this directory keeps the old files until `disable_layer_streaming` or its exit"
            )
        elif e.errno == errno.EFBIG:  # (FAT32 holds files up to 4 GiB; `ulimit -f` caps the size of any file)
            fix = "split onto a filesystem that holds files this large, such as ext4 or NTFS, or raise `ulimit -f`"
        elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):  # (a temporary file's name alone said nothing)
            fix = "this folder cannot be written: make it writable, or choose another `shard_dir`"
        elif e.errno == errno.EISDIR:  # (the rename over it failed: the bare error named the temporary file)
            fix = f"a folder is at {shard_dir / name}, where the split writes a file: move it away"
        elif e.errno in (errno.EEXIST, errno.ENOTDIR):  # (`layers` a file: its `mkdir` failed, "File exists")
            fix = f"a file is at {(shard_dir / name).parent}, where the split makes a folder: move it away"
        raise OSError(
            e.errno,
            f"Writing {name} into {shard_dir} failed: {e.strerror or e} ({size_text(free)} free). "
            f"{kept() if callable(kept) else kept}; no partial file was left. Fix the cause ({fix}) and run the "
            "same split again to resume",
        ) from e


@contextmanager
def _finishing_errors_named(shard_dir: Path, step: str):
    """An error in the last steps of a split, once its manifest is in place (the progress record's removal, the
    directory's fsync), names the step and the path, and says the split is otherwise complete."""
    try:
        yield
    except OSError as e:
        raise OSError(
            e.errno,
            f"The split into {shard_dir} wrote every file and its manifest, but {step} failed: {e.strerror or e}. "
            "Fix the cause (check the device) and run the same split again: it checks the directory and finishes",
        ) from e


def _conversion_record(model) -> dict | None:
    """`conversion_record`, or `None` (no check when streaming, with a warning now) where transformers' conversion
    internals it reads changed shape in a release: the layers are written by then, and the split must not fail at
    its end for a check."""
    try:
        return conversion_record(model)
    except Exception as e:  # noqa: BLE001 - only a check
        logger.warning(
            "Could not record how transformers converts this model's checkpoints (%s: %s); streaming will not check "
            "it against the transformers release it runs with.",
            type(e).__name__,
            e,
        )
        return None


def _model_card(src, source_card, shard_dir, model, config, compression, adapters, dtype) -> str:
    """The split's README.md, a hub model card: what it is, how to stream it, and the source's license (the
    `license`, `license_name`, `license_link` and `language` of its own card, and its license files, copied beside),
    with `base_model` naming a hub source (`base_model_relation: quantized` where compressed), as a split uploaded to
    the hub is the source's weights shared."""
    from huggingface_hub import ModelCard, ModelCardData

    metadata: dict = {}
    if source_card is not None:
        try:
            metadata = ModelCard.load(source_card, ignore_metadata_errors=True).data.to_dict()
        except Exception as e:  # noqa: BLE001 - the card is written without them
            logger.warning(
                "Cannot read the model card of %s (%s); the split's card names no license", src.description, e
            )

    def text(value) -> bool:  # (a card's value as the hub takes it: a string, or a list of strings)
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))

    data = {k: metadata[k] for k in ("license", "license_name", "license_link", "language") if text(metadata.get(k))}
    data = {k: v for k, v in data.items() if v}
    link = data.get("license_link")
    if isinstance(link, str) and "://" not in link and not (shard_dir / link).is_file():
        del data["license_link"]  # (a file of the source's repo that the split does not carry: a broken link)
    if src.local_dir is None:
        data["base_model"] = src.repo_id
        if compression is not None and adapters is None:
            data["base_model_relation"] = "quantized"
    data["tags"] = ["hf-layerstream"]
    if src.local_dir is None:
        commit = f" (commit {src.revision[:7]})" if src.revision and len(src.revision) == 40 else ""
        what = f"[{src.repo_id}](https://huggingface.co/{src.repo_id}){commit}"
    else:
        what = f"The checkpoint `{src.local_dir.resolve().name}`"
    if compression is not None:
        precision = (
            f", the weights of its linear layers quantized to {compression.get('bits')} bits with bitsandbytes "
            f"({_scheme_detail(compression)}; lossy)"
        )
    elif dtype is not None:
        precision = f", its weights cast to {dtype_to_str(dtype)}"
    else:
        precision = ", at full precision (the checkpoint's weights, bit for bit)"
    if adapters is not None:
        names = [a.get("id") for a in (adapters if isinstance(adapters, list) else [adapters]) if isinstance(a, dict)]
        names = [Path(n).name if os.path.isabs(str(n)) else n for n in names]  # (a local folder: its name only)
        precision += ", with the PEFT adapter" + ("s " if len(names) > 1 else " ")
        precision += ", ".join(f"`{n}`" for n in names) + " merged into them"
    build, expression = _building(model, config)
    licenses = sorted(p.name for p in shard_dir.iterdir() if _LICENSE_FILE.fullmatch(p.name) and p.is_file())
    license_text = ""
    if data.get("license") or licenses:
        name = data.get("license_name") if data.get("license") == "other" else data.get("license")
        named = f" ({name if isinstance(name, str) else ', '.join(name)})" if name else ""
        copied = f" Its license files are copied here: {', '.join(licenses)}." if licenses else ""
        license_text = f"\n## License\n\nThe license of the original model applies{named}.{copied}\n"
    original = ""
    if src.local_dir is None:
        original = f"\nSee [the original model card](https://huggingface.co/{src.repo_id}) for the model itself.\n"
    # (of the source and options only: the same split in another folder is the same files)
    body = f"""# {src.repo_id.split("/")[-1] if src.local_dir is None else src.local_dir.resolve().name}, split for hf_layerstream

{what} split by hf_layerstream {__version__} into one file per decoder layer{precision}.
hf_layerstream streams the layers from disk as they run: a model larger than the machine's memory runs, on a GPU or
a CPU, with the output of this model loaded whole.

```bash
hf-layerstream generate REPO "Hello"   # REPO: this repo's id on the hub, or the folder's path
```

```python
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoTokenizer, {build}
from hf_layerstream import enable_layer_streaming

repo = "REPO"  # this repo's id on the hub, or the folder's path
config = AutoConfig.from_pretrained(repo)
with init_empty_weights():
    model = {expression}
enable_layer_streaming(model, repo)
tokenizer = AutoTokenizer.from_pretrained(repo)
```
{license_text}{original}"""
    return str(ModelCard(f"---\n{ModelCardData(**data).to_yaml()}\n---\n\n{body}"))


def _building(model, config) -> tuple[str, str]:
    """The transformers name to import and the expression that build `model`'s class from `config`: its auto class
    where that builds it, else the class."""
    try:
        auto = auto_class_for(config)
        if auto._model_mapping[type(config)] is type(model):
            return auto.__name__, f"{auto.__name__}.from_config(config)"
    except (ValueError, KeyError, AttributeError):
        pass
    return type(model).__name__, f"{type(model).__name__}(config)"


def _write_file(shard_dir: Path, name: str, data: bytes) -> None:
    """Write one of the small files the split writes after the units (config, tokenizer files, manifest)."""
    with _write_errors_named(shard_dir, name, "Every unit is complete and kept"):
        atomic_write_bytes(shard_dir / name, data)


def _side_file_bytes(src: _Source, config, name: str, path: Path | None) -> bytes | None:
    """What a split writes as the side file `name` of `src` (`path`: the source's, as fetched, `None` if it has none):
    its bytes; for a source without generation_config.json, the generation settings of an older checkpoint's
    config.json (`_generation_config_of_config_json`), where it has any."""
    if path is not None:
        return path.read_bytes()
    if name == "generation_config.json":
        generation = _generation_config_of_config_json(src, config)
        return generation.encode() if generation is not None else None
    return None


def _side_files_of_a_split(src: _Source, config) -> list[str]:
    """The names of the side files a split of `src` writes, as its manifest lists them (`_source_side_files` that the
    source has, generation_config.json where one is built from its config.json, and the model card)."""
    names = {name for name, path in _source_side_files(src, config).items() if path is not None}
    if "generation_config.json" not in names and _generation_config_of_config_json(src, config) is not None:
        names.add("generation_config.json")
    return sorted(names | {MODEL_CARD_NAME})


def _restore_side_files(shard_dir: Path, names: list[str], src, config, card, *, recorded: bool = True) -> list[str]:
    """A finished split run again: the side files it recorded writing (`names`: tokenizer, chat templates, generation
    config, license files, model card) that are gone since are written again from the source (`card()`: the model
    card's text), where splitting again said there was nothing to do and left, say, a split whose tokenizer was
    deleted unusable with `AutoTokenizer`. Files still there, edited or not, are kept (a symlink to nothing is not
    there), but for those damaged (`side_file_damage`: a JSON one not readable as JSON), which `verify` says the same
    split writes back. Not `recorded`: a split made before its manifest listed them, and `names` those a split of the
    source writes. Returns the names written."""

    def damage(name: str) -> str | None:
        try:
            return side_file_damage(shard_dir / name)
        except OSError:  # (this user may not read it: not damage, and not replaced)
            return None

    # (what is wrong with each, without its detail: "not readable JSON", "not a JSON object")
    broken = {name: found.removeprefix("is ").split(" (")[0] for name in names if (found := damage(name)) is not None}
    missing = [name for name in names if not os.path.exists(shard_dir / name) or name in broken]
    if not missing:
        return []
    wrote = "its split wrote" if recorded else f"a split of {src.description} writes"
    if not os.access(shard_dir, os.W_OK):
        logger.warning(
            "%s lacks %s, which %s; the directory cannot be written to, so they are not written again",
            shard_dir,
            ", ".join(missing),
            wrote,
        )
        return []
    written = []
    # (the model card last: it lists the license files there as it is written)
    for name in sorted(missing, key=lambda name: name == MODEL_CARD_NAME):
        if name == MODEL_CARD_NAME:
            data = card()
        else:
            data = _side_file_bytes(src, config, name, src.fetch(name))
        if data is None:
            why = (
                f"the hub cannot be reached ({unreachable_reason()}) and the hub cache lacks it"
                if src.hub_unreachable
                else "the source has it no more"
            )
            logger.warning("%s lacks %s, which its split copied from %s; %s", shard_dir, name, src.description, why)
            continue
        _write_file(shard_dir, name, data.encode() if isinstance(data, str) else data)
        written.append(name)
    if written and recorded:
        logger.warning(
            "%s holds this split, but lacked %s: written again from the source",
            shard_dir,
            ", ".join(f"{name} (there, but {broken[name]})" if name in broken else name for name in written),
        )
    elif written:
        logger.warning(
            "%s holds this split, but lacked %s, which a split of %s writes (its manifest, made before the split "
            "listed its side files, does not say which it wrote): written from the source",
            shard_dir,
            ", ".join(written),
            src.description,
        )
    return written


def _record_side_files(shard_dir: Path, manifest: dict, names: list[str]) -> dict:
    """A finished split run again whose manifest does not list its side files (made before it was kept, or the list
    damaged): `names` (`_side_files_of_a_split`) written into it, its other entries as they are, so that a later run
    writes again those deleted since, and `verify` names them, as for a split made now. Left as it is where the
    directory cannot be written to. Returns the manifest as written."""
    if not os.access(shard_dir, os.W_OK):
        return manifest
    manifest = manifest | {"side_files": names}
    _write_file(shard_dir, MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    logger.info("%s: its manifest lists its side files now (%s)", shard_dir, ", ".join(names))
    return manifest


def _record_adapter(shard_dir: Path, manifest: dict, noted: dict | list[dict] | None) -> None:
    """A finished split run again whose manifest's adapter record is damaged (`read_adapter_record` drops it), its
    options' digest, which holds the adapters, this run's: the record of this run's adapters (`noted`; none: the
    entry removed) written into it, its other entries as they are. Left as it is where the directory cannot be written
    to."""
    if not os.access(shard_dir, os.W_OK):
        return
    manifest = {k: v for k, v in manifest.items() if k != "adapter"} | ({"adapter": noted} if noted else {})
    _write_file(shard_dir, MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    logger.warning("%s: its manifest's adapter record was damaged; it is written again", shard_dir)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _unit_file(unit: str) -> str:
    index = unit_index(unit)
    return RESIDENT_FILE if index is None else layer_file(index)


def _remove_foreign_unit_files(shard_dir: Path, keep: dict[str, str]) -> None:
    """With `overwrite=True`: delete layer files a previous split of a deeper model left behind."""
    layers = shard_dir / "layers"
    if not layers.is_dir():
        return
    wanted = {shard_dir / f for f in keep.values()}
    for p in layers.iterdir():
        if p.suffix == ".safetensors" and p not in wanted and p.is_file():
            p.unlink()


def _remove_foreign_side_files(shard_dir: Path, keep: set[str]) -> None:
    """With `overwrite=True`: delete the side files (tokenizer, chat templates, generation config, license files) a
    previous split copied from its source that the new source lacks: the names every split may copy, versioned
    `tokenizer.*.json` files and named chat templates. (Files only a tokenizer class names, such as
    GPT-NeoX-Japanese's `emoji.json`, stay: not knowing the old source, a name could be a file of the user's.)"""
    names = set(_SIDE_FILES) | {p.name for p in shard_dir.glob("tokenizer.*.json")}
    names |= {p.name for p in shard_dir.iterdir() if _LICENSE_FILE.fullmatch(p.name)}
    templates = shard_dir / _CHAT_TEMPLATE_DIR
    if templates.is_dir():
        names |= {f"{_CHAT_TEMPLATE_DIR}/{p.name}" for p in templates.iterdir() if p.suffix == ".jinja"}
    for name in names - keep:
        path = shard_dir / name
        if path.is_file() and not path.is_symlink():
            path.unlink()


def _unit_file_sound(shard_dir: Path, entry: UnitEntry, digest: str) -> bool:
    """Cheap check that a recorded unit's file is still what was written, by this split (`digest`, where the file
    carries one: `SPLIT_KEY`): size, header, sample digest."""
    path = shard_dir / entry.file
    if entry.file != _unit_file(entry.name) or not path.is_file() or path.is_symlink():
        return False
    try:
        header = read_header(path, expected_size=entry.size)
        if header.metadata.get("unit", entry.name) != entry.name or recorded_otherwise(entry, header) is not None:
            return False  # (another unit's file, or the manifest's record of its tensors changed since: written again)
        if header.metadata.get(SPLIT_KEY, digest) != digest:
            return False  # (another split's, copied in with its record: it passed as this one's, and was kept)
        return entry.sample_sha256 is None or sample_digest(path) == entry.sample_sha256
    except (OSError, ShardDirError):
        return False


def _adopt_unit_file(shard_dir: Path, unit: str, digest: str) -> UnitEntry | None:
    """A unit file a killed run renamed into place but did not record yet: adopt it when it is ours and complete.

    Files are renamed into place only once complete and fsynced, and each carries its unit record and the digest of
    the split options in its safetensors metadata, so such a file needs hashing (a read of the output), not a
    re-read and re-conversion of the source.
    """
    rel = _unit_file(unit)
    path = shard_dir / rel
    if not path.is_file() or path.is_symlink():
        return None
    try:
        header = read_header(path)
        meta = header.metadata
        if meta.get("unit") != unit or meta.get(SPLIT_KEY) != digest:
            return None
        tensors = {k: TensorEntry.from_json(v) for k, v in json.loads(meta[TENSORS_KEY]).items()}
        entry = UnitEntry(unit, rel, path.stat().st_size, sha256_file(path), tensors, sample_digest(path))
    except (OSError, ShardDirError, KeyError, TypeError, ValueError):
        return None
    logger.info("Adopted %s, completed by an interrupted split", path)
    return entry


def _units_of_another_rule(directory, rule: Callable[..., bool], scheme) -> list[str]:
    """Units of a compressed split whose stored tensors the quantization `rule` (`_quantization_rule`) stores
    otherwise: quantized where it keeps full precision, or the other way round (a split made by an earlier
    hf_layerstream, whose rule differed). A tensor the rule quantizes stored as it is because it holds inf or NaN
    (see `_stored_form`) is not one."""
    from safetensors import safe_open

    out = []
    for unit in directory.manifest.units:
        entry = directory.unit(unit)
        for name, t in entry.tensors.items():
            if not t.dtype.is_floating_point:
                continue
            quantizes = rule(
                name, torch.empty(t.shape, dtype=t.dtype, device="meta"), scheme, is_embedding=unit == RESIDENT
            )
            if quantizes == (t.quant is not None):
                continue
            if quantizes:
                with safe_open(directory.path / entry.file, framework="pt") as f:
                    stored = f.get_tensor(name)
                if not all_finite(stored) or (scheme.double_quant and not _double_quantizes(stored, scheme)):
                    continue
            out.append(unit)
            break
    return out


def _double_quantizes(tensor: torch.Tensor, scheme) -> bool:
    """Whether `quantize_tensor` takes finite `tensor` under double-quantizing `scheme` (not where its block scales
    average past float32's range: `_stored_form` stores it unquantized then)."""
    from .quant import NonFiniteError, quantize_tensor

    try:
        quantize_tensor(tensor, scheme)
    except NonFiniteError:
        return False
    return True


def _sound_manifest_units(shard_dir: Path, manifest_json: dict, digest: str) -> dict[str, UnitEntry]:
    """Units of an existing (damaged) manifest whose files still pass the cheap checks, as this split's (`digest`)."""
    out = {}
    for unit_json in manifest_json.get("units") or []:
        try:
            entry = UnitEntry.from_json(unit_json)
        except (KeyError, TypeError, ValueError):
            continue
        if _unit_file_sound(shard_dir, entry, digest):
            out[entry.name] = entry
    return out


def _load_progress(shard_dir: Path, options: dict, digest: str, *, overwrite: bool) -> dict[str, UnitEntry]:
    """Units finished by an earlier, interrupted run with the same options (their files checked cheaply, as this
    split's: `digest`)."""
    progress = _read_json(shard_dir / PROGRESS_NAME)
    if not isinstance(progress, dict):
        return {}
    if progress.get("options") != options:
        if not overwrite:
            recorded = progress.get("options")
            difference = _adapter_difference(_recorded_adapter(recorded), options.get("adapter"))
            if not difference and isinstance(recorded, dict):
                sources = [o.get("source") if isinstance(o.get("source"), dict) else {} for o in (recorded, options)]
                difference = _options_difference(recorded, options, *sources)
            raise ShardDirOccupiedError(
                f"`shard_dir` {shard_dir} holds an unfinished split of another model, another source checkpoint or "
                f"with other options{difference}.",
                "Run the split with the same source and options to finish it, pass `overwrite=True` (`--overwrite`) "
                "to start over, or choose another directory.",
            )
        return {}
    done = {}
    for unit_json in progress.get("units", []):
        try:
            entry = UnitEntry.from_json(unit_json)
        except (KeyError, TypeError, ValueError):
            continue
        if _unit_file_sound(shard_dir, entry, digest):
            done[entry.name] = entry
        else:
            logger.warning("%s changed since an earlier run wrote it; writing it again", shard_dir / entry.file)
    return done


def _resumes_an_overwrite(shard_dir: Path, options: dict) -> bool:
    """Whether the directory's progress record is an interrupted `overwrite=True` run's with these options."""
    progress = _read_json(shard_dir / PROGRESS_NAME)
    return isinstance(progress, dict) and progress.get("options") == options and progress.get("replacing") is True


def _save_progress(shard_dir: Path, options: dict, done: dict[str, UnitEntry], *, replacing: bool) -> None:
    payload = {"options": options, "units": [u.to_json() for u in done.values()], "replacing": replacing}
    atomic_write_bytes(shard_dir / PROGRESS_NAME, json.dumps(payload).encode())


def _write_unit(
    shard_dir: Path,
    unit: str,
    tensors: dict[str, torch.Tensor],
    scheme,
    quantize_tensor: Callable,
    should_quantize: Callable,
    *,
    split_digest: str | None = None,
    load_dtype: torch.dtype | None = None,
) -> UnitEntry:
    """Serialize one unit and write it atomically; the file carries its own unit record (see `_adopt_unit_file`), and
    the dtype recorded for loading (`load_dtype`, the manifest's too: `ShardDirectory` checks the two agree).
    Consumes `tensors`: each one is dropped from it once stored, so a unit is held in memory about once."""

    index = unit_index(unit)
    rel = RESIDENT_FILE if index is None else layer_file(index)
    stored: dict[str, torch.Tensor] = {}
    entries: dict[str, TensorEntry] = {}
    for name in list(tensors):
        parts, entries[name] = _stored_form(name, tensors.pop(name), scheme, quantize_tensor, should_quantize, unit)
        stored.update(parts)
    metadata = {"format": "pt", "unit": unit}
    if split_digest is not None:
        metadata[SPLIT_KEY] = split_digest
        metadata[TENSORS_KEY] = json.dumps({k: v.to_json() for k, v in entries.items()}, sort_keys=True)
    if load_dtype is not None:
        metadata[LOAD_DTYPE_KEY] = dtype_to_str(load_dtype)
    size, sha256, sample = atomic_write_safetensors(shard_dir / rel, stored, metadata, consume=True)
    return UnitEntry(unit, rel, size, sha256, entries, sample)


def _stored_form(
    name: str, tensor: torch.Tensor, scheme, quantize_tensor: Callable, should_quantize: Callable, unit: str
) -> tuple[dict[str, torch.Tensor], TensorEntry]:
    """How one tensor of `unit` is stored: its file tensors (itself, or its quantized parts) and its record."""
    quantize = scheme is not None and should_quantize(name, tensor, scheme, is_embedding=unit == RESIDENT)
    parts = None
    if quantize:
        from .quant import NonFiniteError

        try:  # (quantize_tensor checks the values are finite: a second check here took about 6% of a 4-bit split)
            parts, meta = quantize_tensor(tensor, scheme)
        except NonFiniteError:  # block-wise scales cannot hold inf / NaN
            if all_finite(tensor):  # (finite values whose scales' mean, double quantization's offset, is not)
                logger.warning(
                    "%s: its block scales average past float32's range (values up to %.3g), which double "
                    "quantization cannot hold; it is stored unquantized",
                    name,
                    float(tensor.abs().max()),
                )
            else:
                # (at float16, most likely made so by the split's own `dtype` cast of a checkpoint holding none: the
                # warning then sent the user looking for inf in a checkpoint of finite weights)
                hint = (
                    " (float16 holds values up to 65504: where the checkpoint holds none, a `dtype` float16 cast made "
                    "larger ones inf, which `dtype='bfloat16'` keeps finite, and quantized)"
                    if tensor.dtype == torch.float16
                    else ""
                )
                logger.warning("%s holds inf or NaN values; it is stored unquantized%s", name, hint)
    if parts is None:
        return {name: tensor.contiguous()}, TensorEntry(tuple(tensor.shape), tensor.dtype)
    meta = dict(meta)
    meta["parts"] = {p: {"shape": list(v.shape), "dtype": dtype_to_str(v.dtype)} for p, v in parts.items()}
    stored = {f"{name}::{part}": value.contiguous() for part, value in parts.items()}
    return stored, TensorEntry(tuple(tensor.shape), tensor.dtype, meta)


__all__ = ["split_checkpoint", "sha256_file", "estimate_split_bytes"]
