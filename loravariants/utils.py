"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from ._version import __version__

__all__ = [
    "config_differences",
    "default_cache_dir",
    "atomic_directory",
    "check_replaceable",
    "recover_directory",
    "recover_folder",
    "output_lock",
    "make_dirs",
    "ADAPTER_FILES",
    "atomic_write",
    "OUTPUT_MARKER",
    "claim_output_dir",
    "check_output_dir",
    "check_not_precious",
    "printable",
]

# the files a save of ours writes (native, peft and MixLoRA formats): an adapter folder that
# holds only these, and our mark (loravariants.io.common.check_adapter_replaceable), may be
# replaced by a save; not a README.md (peft writes one, we never do: it is the user's)
ADAPTER_FILES = {
    "loravariants_config.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_dirs(path: str | os.PathLike) -> Path:
    """``mkdir -p`` (the umask applies, as for any folder a user creates)."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def _sibling(target: Path, kind: str) -> Path:
    """A new empty hidden folder ``.<name>.<kind>-<pid>-<random>`` beside ``target``.

    The pid tells a later save or load whether its writer is still alive (see
    :func:`recover_directory`). ``mkdtemp`` makes it 0700; it gets the umask's mode instead, so
    the folder renamed into place has the permissions a plain ``mkdir`` would give.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}-", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the system or file system cannot (the caller then falls back to two
    renames, whose window :func:`recover_directory` repairs).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except (OverflowError, ValueError):
        return False  # not a possible pid
    return True


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^.]+$")


def _leftovers(folder: Path, name: str | None = None) -> dict[str, dict[str, list[Path]]]:
    """``{target name: {"tmp"|"old": [folders]}}`` left in ``folder`` by dead writers, newest
    first (``name``: that target only)."""
    found: dict[str, dict[str, list[Path]]] = {}
    if not folder.is_dir():
        return found
    pattern = f".{glob.escape(name)}.*-*" if name is not None else ".*-*"
    for p in folder.glob(pattern):
        m = _LEFTOVER.match(p.name)
        if not m or (name is not None and m["name"] != name) or _pid_alive(int(m["pid"])):
            continue
        found.setdefault(m["name"], {"tmp": [], "old": []})[m["kind"]].append(p)
    for kinds in found.values():
        for paths in kinds.values():
            paths.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
    return found


def _recover(folder: Path, name: str | None) -> None:
    try:
        for target_name, kinds in _leftovers(folder, name).items():
            olds, target = kinds["old"], folder / target_name
            if olds and not target.exists():
                os.replace(olds.pop(0), target)
            for p in olds + kinds["tmp"]:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:  # a temporary file of :func:`atomic_write`
                    p.unlink(missing_ok=True)
    except OSError:
        pass


def recover_folder(folder: str | os.PathLike) -> None:
    """:func:`recover_directory` for every target in ``folder`` at once."""
    _recover(Path(folder), None)


def recover_directory(path: str | os.PathLike) -> None:
    """Repair what a killed :func:`atomic_directory` left beside ``path``.

    A kill between the two renames of the fallback replace leaves ``path`` missing and the
    previous (complete) directory as ``.<name>.old-<pid>-*``: it is moved back. Temporary
    folders of dead writers (``.tmp-*``: unfinished, or the old directory after an atomic
    swap) and remaining ``.old-*`` folders are deleted. Folders of live processes are left
    alone. Best effort: a read-only parent leaves everything as it is.
    """
    target = Path(path)
    _recover(target.parent, target.name)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Write a directory atomically: yield a temporary sibling, swap it into place on success.

    A failure (or a killed process) at any point leaves ``path`` as the old directory or the
    new one, complete, never missing or mixed: the switch is one atomic exchange of the two
    folders where the system has it (Linux), else two renames whose gap
    :func:`recover_directory` (run by the next save or load) repairs. The temporary folder
    sits next to ``path`` so the switch stays on one file system; leftovers of killed writers
    are cleaned by the next save.

    Args:
        path: the directory to create or replace.
        overwrite: replace an existing directory; when False an existing ``path`` is an error.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False, or it is a file.
    """
    target = Path(path)
    recover_directory(target)
    if target.exists() and (not overwrite or not target.is_dir()):
        raise FileExistsError(f"{target} already exists")
    make_dirs(target.parent)
    tmp = _sibling(target, "tmp")
    try:
        yield tmp
        if not target.exists():
            os.replace(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
        else:
            old = _sibling(target, "old")
            old.rmdir()
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(file: str | os.PathLike, data: str | bytes) -> None:
    """Replace ``file`` by ``data`` in one step: the one way the library writes a file.

    The bytes go to a new temporary file beside ``file`` (``.<name>.tmp-<pid>-<random>``),
    created exclusively (``mkstemp``: ``O_CREAT | O_EXCL | O_NOFOLLOW``), so a link planted
    under a fixed temporary name can never redirect the write outside the folder; it is then
    renamed over ``file``, which replaces a link at ``file`` itself rather than the file it
    points to. A kill leaves ``file`` old or new, never cut; the temporary file of a dead writer
    is removed by :func:`recover_folder`. The file gets the umask's mode (not ``mkstemp``'s
    0600), as a plain ``open()`` would give it.

    Args:
        file: the file to create or replace.
        data: its whole content (``str`` is written as UTF-8).
    """
    target = Path(file)
    blob = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


#: the file that marks a folder as a loravariants output folder (written when ``compare``
#: creates or adopts it); a non-empty folder without it belongs to someone else
OUTPUT_MARKER = ".loravariants-output"


def check_not_precious(path: str | os.PathLike, what: str) -> None:
    """Refuse an output folder whose loss would be a disaster: ``/``, the working directory
    or one of its parents, the home folder or one of its parents.

    Raises:
        ValueError: naming ``what`` and the folder.
    """
    target = Path(path).expanduser().resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if cwd.is_relative_to(target) or home.is_relative_to(target):
        where = "the working directory or a folder above it"
        if home.is_relative_to(target) and not cwd.is_relative_to(target):
            where = "the home folder or a folder above it"
        raise ValueError(f"{what} {str(path)!r} is {where}; name a new folder for the output")


def _looks_like_our_records(folder: Path) -> bool:
    """A folder an older loravariants wrote before :data:`OUTPUT_MARKER` existed: its
    ``results.json`` (or a shard's records file) is a records store of ours."""
    files = [folder / "results.json", *sorted((folder / "shards").glob("shard-*-of-*.json"))]
    for file in files[:8]:
        try:
            if file.is_symlink() or not file.is_file() or file.stat().st_size > 1 << 28:
                continue
            data = json.loads(file.read_bytes())
        except (OSError, ValueError, RecursionError):
            continue
        if (
            isinstance(data, dict)
            and "schema_version" in data
            and isinstance(data.get("runs"), list)
        ):
            return True
    return False


_STEP = re.compile(r"^(step-\d+|\.step-.+|\.rng-.+)$")


def _looks_like_our_training(folder: Path) -> bool:
    """A ``train()`` output folder of an older loravariants: ``metrics.jsonl`` and
    ``checkpoints/step-*`` only."""
    entries = {p.name for p in folder.iterdir()}
    if not entries <= {"metrics.jsonl", "checkpoints"}:
        return False
    ckpts = folder / "checkpoints"
    if ckpts.is_symlink() or (ckpts.exists() and not ckpts.is_dir()):
        return False
    return not ckpts.is_dir() or all(_STEP.match(p.name) for p in ckpts.iterdir())


def check_output_dir(path: str | os.PathLike, what: str = "output_dir") -> None:
    """Refuse to write into a folder that is not ours; creates nothing.

    Ours: missing, empty, marked with :data:`OUTPUT_MARKER`, or holding the records of an
    older loravariants version. Anything else (a folder of the user's own, ``.``, ``/``) is
    refused, so no file of theirs is overwritten.

    Raises:
        ValueError: one line naming the folder and a few of its entries.
    """
    folder = Path(path)
    check_not_precious(folder, what)
    if folder.is_symlink() and not folder.exists():
        raise ValueError(f"{what} {folder} is a dangling link")
    if not folder.is_dir():
        return
    if (folder / OUTPUT_MARKER).is_file():
        return
    # (a kill while the marker was written leaves its temporary file: still ours)
    entries = sorted(
        p.name for p in folder.iterdir() if not p.name.startswith(f".{OUTPUT_MARKER}.tmp-")
    )
    if not entries or _looks_like_our_records(folder) or _looks_like_our_training(folder):
        return
    raise ValueError(
        f"{what} {folder} holds files loravariants did not write ({entries[:3]}) and no "
        f"{OUTPUT_MARKER} marker; choose a new or empty folder"
    )


def claim_output_dir(path: str | os.PathLike, what: str = "output_dir") -> Path:
    """Create (or adopt, after :func:`check_output_dir`) an output folder and mark it ours.

    Raises:
        ValueError: the folder is not ours (see :func:`check_output_dir`).
    """
    check_output_dir(path, what)
    folder = make_dirs(path)
    marker = folder / OUTPUT_MARKER
    if not marker.is_file():
        atomic_write(marker, f"written by loravariants {__version__}; do not delete\n")
    return folder


class OutputLocked(ValueError):
    """Another process writes to this output folder."""


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, shared: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on an existing folder: one writer per output folder.

    ``shared=True`` takes a shared lock instead: any number of shared holders (the shards of
    one comparison, ``compare.shard``), but none while an exclusive holder runs, and the other
    way round.

    An ``flock`` on the folder itself: no lock file to leave behind, and the lock goes with
    the process (a killed run never leaves a stale lock). No-op where ``fcntl`` is missing.

    Raises:
        OutputLocked: another process holds it.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLocked(
                f"{folder} is in use by another loravariants process; wait for it to finish, "
                "or choose another output folder"
            ) from None
        yield
    finally:
        os.close(fd)


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


def printable(text: Any, limit: int | None = None) -> str:
    """``text`` safe for a terminal: every non-printable character (ANSI escapes, NUL, a
    carriage return, bidi overrides) shown as its ``\\x..``/``\\u....`` escape, and at most
    ``limit`` characters (``...`` marks a cut). A hostile file name or value can then neither
    rewrite the screen nor flood it."""
    out = []
    for ch in str(text):
        out.append(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii"))
    shown = "".join(out)
    if limit is not None and len(shown) > limit:
        shown = shown[: max(limit - 3, 0)] + "..."
    return shown


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/loravariants`` when XDG_CACHE_HOME is set, else
    ``~/.cache/loravariants``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg else Path(os.path.expanduser("~")) / ".cache"
    return root / "loravariants"


def config_differences(
    saved: Mapping[str, Any],
    now: Mapping[str, Any],
    may_change: Collection[str],
    normalize: Callable[[Any], Any] = lambda value: value,
    show: Callable[[Any], str] = str,
) -> list[str]:
    """``"key: old -> new"`` for every setting of ``now`` that differs from ``saved``.

    The one check behind resuming a training run and resuming a comparison: settings in
    ``may_change`` (a longer budget, more seeds) are left out.

    Args:
        saved, now: the settings then and now.
        may_change: keys allowed to differ.
        normalize: applied to both values before comparing and showing them.
        show: how a value is written in the message.
    """
    return [
        f"{k}: {show(normalize(saved.get(k)))} -> {show(normalize(v))}"
        for k, v in now.items()
        if k not in may_change and normalize(saved.get(k)) != normalize(v)
    ]
