"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_directory", "check_replaceable", "ADAPTER_FILES"]

# what an adapter folder of any of our formats may hold and still be replaced by a save
# (native, peft and MixLoRA file names; peft also writes a README)
ADAPTER_FILES = {
    "loravariants_config.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "README.md",
}


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


def check_replaceable(path: str | os.PathLike, own_files: set[str], what: str) -> None:
    """Refuse to replace a directory that holds anything but ``own_files``.

    :func:`atomic_directory` replaces a directory as a whole; a user who points a save at a
    folder of their own (or at ``.``) must get an error, not lose their files.

    Raises:
        ValueError: ``path`` is the working directory or one of its parents, or holds other
            entries (named).
    """
    target = Path(path)
    if not target.is_dir():
        return
    if Path.cwd().resolve().is_relative_to(target.resolve()):
        raise ValueError(f"{target}: cannot replace the working directory; name a new folder")
    foreign = sorted(p.name for p in target.iterdir() if p.name not in own_files)
    if foreign:
        raise ValueError(
            f"{target} holds files that are not {what} ({foreign[:5]}); it would be replaced "
            "as a whole: save into a new or empty folder"
        )
