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
        fix = fix or (
            "Re-create the shard directory with `split_checkpoint(...)` / `hf-layerstream split`, or run "
            "`hf-layerstream verify` to list every damaged file."
        )
        super().__init__(f"{self.path} {problem}. {fix}")

    def __reduce__(self):  # (pickled, as from a worker process, or copied: the same message, its fix included)
        return (type(self), (self.path, self.problem, self.fix))


class LayerLoadError(RuntimeError):
    """Loading a decoder layer failed in the background loader; raised in the thread that needed the layer."""


UNREADABLE_BY_THIS_USER = (
    "This user may not read it: the file itself may be sound. Make it readable (`chmod a+r`, by its owner) or run as a "
    "user who can read it."
)


def unreadable(path: str | os.PathLike, error: OSError) -> ShardFileError:
    """A file that cannot be read, with the fix its error calls for: permissions are not damage to repair."""
    denied = error.errno in (errno.EACCES, errno.EPERM)
    return ShardFileError(
        path, f"cannot be read: {error.strerror or error}", UNREADABLE_BY_THIS_USER if denied else None
    )
