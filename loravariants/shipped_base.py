"""Shipped base models: a built base as package files, verified by hash before every use.

A base built once (on any machine, for as long as its recipe asks) can travel with the package,
so that every machine runs on the same weights instead of rebuilding them (bases built on two
machines differ; docs/data.md). A shipped base is a folder::

    loravariants/bases/<name>/
        manifest.json            name, recipe, config, measured figures, sha256 of every file
        config.json  generation_config.json  tokenizer.json  tokenizer_config.json
        model.safetensors        (or model-0000k-of-0000n.safetensors, each <= 16 MiB)

Two hashes, two purposes:

* ``files``: the sha256 of each file. :func:`verify_shipped_base` recomputes them all before the
  folder is used; one missing, extra or changed file refuses the folder with a one-line
  :class:`ShippedBaseError` (a ``ValueError``). A damaged base is never used silently.
* ``weights_sha256`` (:func:`weights_hash`): one sha256 over the tensors themselves (name, dtype,
  shape and bytes, sorted by name), independent of how they are split into files. The same
  figure computed on a locally built folder says whether it holds bit-identical weights; the
  comparison report prints it for whatever base it ran on.

:func:`export_shipped_base` writes such a folder from a built base (``build_base_model``'s
output) atomically; it can store the weights in float32 (bit-identical to the build), bfloat16
or float16 (half the bytes; the manifest says which, and figures measured in float32 then no
longer apply exactly).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .utils import atomic_directory

__all__ = [
    "MANIFEST",
    "MAX_FILE_BYTES",
    "SHIPPED_DIR",
    "ShippedBaseError",
    "base_weights_sha256",
    "export_shipped_base",
    "find_shipped_base",
    "is_shipped_base",
    "verify_shipped_base",
    "weights_hash",
]

#: the manifest's file name; its presence marks a folder as a shipped base
MANIFEST = "manifest.json"
#: the largest file a shipped base may hold (what one GPU-machine run can bring back)
MAX_FILE_BYTES = 16 * 2**20
#: where the package's own shipped bases live (absent or empty: none shipped)
SHIPPED_DIR = Path(__file__).resolve().parent / "bases"
MANIFEST_VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ShippedBaseError(ValueError):
    """A shipped base whose files do not match its manifest (or no valid manifest)."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".safetensors" and p.is_file())


def weights_hash(folder: str | os.PathLike) -> str:
    """sha256 over a model folder's tensors: for each tensor, sorted by name, its name, dtype,
    shape and bytes. Independent of the split into files, so a sharded copy and a single file
    of the same weights hash alike.

    Raises:
        FileNotFoundError: the folder has no ``*.safetensors`` file.
    """
    from safetensors import safe_open

    folder = Path(folder)
    files = _weight_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights to hash")
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                where[name] = file
    digest = hashlib.sha256()
    for name in sorted(where):
        with safe_open(str(where[name]), framework="pt") as f:
            tensor = f.get_tensor(name).contiguous()
        header = f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|"
        digest.update(header.encode())
        digest.update(tensor.view(torch.uint8).flatten().numpy().tobytes())
    return digest.hexdigest()


def is_shipped_base(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` carries a shipped-base manifest (and must therefore verify)."""
    return (Path(folder) / MANIFEST).is_file()


def verify_shipped_base(folder: str | os.PathLike) -> dict[str, Any]:
    """Check every file of a shipped base against its manifest; return the manifest.

    Raises:
        ShippedBaseError: no readable manifest, a listed file missing or changed, an unlisted
            file present, or a file over :data:`MAX_FILE_BYTES` (one line naming the file).
    """
    folder = Path(folder)
    where = f"shipped base {folder}"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise TypeError("files must be a non-empty mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShippedBaseError(f"{where}: unreadable {MANIFEST} ({e}); refusing to use it") from e
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST}
    extra = sorted(present - set(files))
    if extra:
        raise ShippedBaseError(f"{where}: {extra[0]} is not in its manifest; refusing to use it")
    for name, expected in sorted(files.items()):
        file = folder / name
        if name not in present or file.is_symlink():
            raise ShippedBaseError(f"{where}: {name} is missing; refusing to use it")
        if file.stat().st_size > MAX_FILE_BYTES:
            raise ShippedBaseError(f"{where}: {name} is over {MAX_FILE_BYTES >> 20} MiB")
        actual = _sha256_file(file)
        if actual != expected:
            raise ShippedBaseError(
                f"{where}: {name} has sha256 {actual[:16]}..., its manifest says "
                f"{str(expected)[:16]}...: the file is damaged or was changed; refusing to use "
                f"it (reinstall the package, or build the base with `loravariants pretrain-base`)"
            )
    return manifest


def export_shipped_base(
    build: str | os.PathLike,
    out: str | os.PathLike,
    name: str,
    dtype: str = "float32",
    max_file_bytes: int = MAX_FILE_BYTES,
) -> dict[str, Any]:
    """Write the built base in ``build`` as a shipped base in the new folder ``out``.

    Args:
        build: a folder written by ``base_model.build_base_model`` (with ``build_info.json``).
        out: the shipped base's folder; must not exist yet (nothing is overwritten).
        name: the base's name in the manifest (e.g. ``"cpu-default"``).
        dtype: ``"float32"`` (bit-identical), ``"bfloat16"`` or ``"float16"``.
        max_file_bytes: the largest file allowed (weights are split into shards below it).

    Returns:
        The manifest written.

    Raises:
        ValueError: ``out`` exists, ``build`` is not a built base, an unknown ``dtype``, or a
            file over ``max_file_bytes``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build, out = Path(build), Path(out)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    if out.exists() or out.is_symlink():
        raise ValueError(f"{out} already exists; a shipped base is written to a new folder")
    info_file = build / "build_info.json"
    if not info_file.is_file():
        raise ValueError(f"{build} is not a built base (no build_info.json)")
    build_info = json.loads(info_file.read_text())
    model = AutoModelForCausalLM.from_pretrained(build, dtype=_DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(build)
    # shards a little below the limit: safetensors' header adds a few KiB to each file
    shard = max(1, max_file_bytes - (1 << 16))
    with atomic_directory(out, overwrite=False) as tmp:
        model.save_pretrained(tmp, max_shard_size=shard)
        tokenizer.save_pretrained(tmp)
        files = {}
        for file in sorted(tmp.iterdir()):
            if file.stat().st_size > max_file_bytes:
                raise ValueError(f"{file.name} is {file.stat().st_size:,} bytes, over the limit")
            files[file.name] = _sha256_file(file)
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "name": name,
            "recipe": build_info.get("recipe", "custom"),
            "device": build_info.get("device", "cpu"),
            "dtype": dtype,
            "config": build_info["config"],
            "build_key": build_info.get("key"),
            "build_versions": build_info.get("versions"),
            "metrics": build_info.get("metrics"),
            "weights_sha256": weights_hash(tmp),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def find_shipped_base(config: dict[str, Any], root: str | os.PathLike | None = None) -> Path | None:
    """The shipped base (under ``root``, default :data:`SHIPPED_DIR`) whose manifest's config
    equals ``config`` (a ``BaseModelConfig`` as a dict), or ``None``. Only the manifest is
    read here; the caller verifies the folder before it uses it."""
    root = Path(root) if root is not None else SHIPPED_DIR
    if not root.is_dir():
        return None
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            continue  # not a shipped base (verification would refuse it anyway)
        if isinstance(manifest, dict) and manifest.get("config") == config:
            return folder
    return None


def base_weights_sha256(path: str | os.PathLike | None) -> str | None:
    """The weights hash of the base a comparison ran on: a shipped base's manifest figure,
    else :func:`weights_hash` of a local model folder; ``None`` for a hub name (not local) or
    a folder without safetensors weights."""
    if path is None:
        return None
    folder = Path(path)
    if is_shipped_base(folder):
        return str(verify_shipped_base(folder)["weights_sha256"])
    if not folder.is_dir():
        return None
    files = _weight_files(folder)
    if not files:
        return None
    # the report is rewritten after every run: hash a folder's weights once while unchanged
    signature = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _cached_weights_hash(str(folder.resolve()), signature)


@functools.lru_cache(maxsize=8)
def _cached_weights_hash(folder: str, signature: tuple) -> str:
    return weights_hash(folder)
