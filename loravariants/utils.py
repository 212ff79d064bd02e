"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_directory"]


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Write a directory atomically: yield a temporary sibling, rename it into place on success.

    A failure (or a killed process) inside the block leaves ``path`` as it was: either the old
    directory or nothing. The temporary directory sits next to ``path`` so the final rename
    stays on one file system.

    Args:
        path: the directory to create or replace.
        overwrite: replace an existing directory; when False an existing ``path`` is an error.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False, or it is a file.
    """
    target = Path(path)
    if target.exists() and (not overwrite or not target.is_dir()):
        raise FileExistsError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            # Two renames: the old directory is moved aside before the new one takes its
            # place, so a reader never sees a mix of old and new files.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            old.rmdir()
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
