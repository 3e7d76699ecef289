"""Exceptions raised by hf_layerstream. All derive from the built-in type a user would expect to catch."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class ShardDirError(ValueError):
    """A shard directory is missing pieces, inconsistent, or does not match the model it is used with."""


class ShardDirOccupiedError(ShardDirError):
    """`split_checkpoint` refused a `shard_dir` that holds another split (another model, source or options; an
    unfinished one; a newer format's) or files but no shard directory, leaving it as it is: `overwrite=True` would
    write the split there. `problem` states what the directory holds, `fix` what to do."""

    def __init__(self, problem: str, fix: str):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} {fix}")

    def __reduce__(self):  # (pickled or copied: the same message)
        return (type(self), (self.problem, self.fix))


class ShardFileError(ShardDirError):
    """One file of a shard directory (or of a source checkpoint) is unreadable, truncated or malformed."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str | None = None):
        self.path = Path(path)
        self.problem = problem
        self.fix = fix  # (as given: `None` for the default below)
        if fix is None:
            from .shard_dir import redownload_advice  # (here: shard_dir imports this module)

            # a file of a hub repo's download in the hub cache (through its folder: the file may be a link to a blob,
            # or missing): downloaded again, as `verify` says
            again = redownload_advice(self.path.parent)
            if again is not None:
                fix = f"{again}, or run `hf-layerstream verify` to list every damaged file."
        fix = fix or (
            "Re-create the shard directory with `split_checkpoint(...)` / `hf-layerstream split`, or run "
            "`hf-layerstream verify` to list every damaged file."
        )
        super().__init__(f"{self.path} {problem}. {fix}")

    def __reduce__(self):  # (pickled, as from a worker process, or copied: the same message, its fix included)
        return (type(self), (self.path, self.problem, self.fix))


class LayerLoadError(RuntimeError):
    """Loading a decoder layer failed in the background loader; raised in the thread that needed the layer."""


# what the fixes for a file that could not be read, but is not damaged, say (verify's summary looks for it)
NOT_DAMAGE = "the file itself may be sound"
UNREADABLE_BY_THIS_USER = (
    f"This user may not read it: {NOT_DAMAGE}. Make it readable (`chmod a+r`, by its owner) or run as a user who can "
    "read it."
)
_LIMIT_FIXES = {
    errno.EMFILE: f"This process has as many files open as its limit allows (`ulimit -n`, RLIMIT_NOFILE): {NOT_DAMAGE}. "
    "On CPU each layer file mapped holds one while streaming is enabled (its map is kept): raise the limit above the "
    "number of layers plus what else the process opens (e.g. `ulimit -n 4096`).",
    errno.ENFILE: f"The system has as many files open as it allows (`fs.file-max`): {NOT_DAMAGE}. Raise it, or close "
    "files elsewhere.",
    errno.ENOMEM: f"No memory map could be made: {NOT_DAMAGE}. The process is at its limit of maps "
    "(`sysctl vm.max_map_count`), of address space (`ulimit -v`: on CPU every layer file stays mapped while streaming "
    "is enabled, so it must hold the whole model's files) or of memory: raise the limit at fault.",
}


def unreadable(path: str | os.PathLike, error: OSError) -> ShardFileError:
    """A file that cannot be read, with the fix its error calls for: permissions and the process's limits (open
    files, maps, address space) are not damage to repair."""
    denied = error.errno in (errno.EACCES, errno.EPERM)
    fix = UNREADABLE_BY_THIS_USER if denied else _LIMIT_FIXES.get(error.errno)
    return ShardFileError(path, f"cannot be read: {error.strerror or error}", fix)
