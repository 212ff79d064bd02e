"""Save and load adapters: our native format, peft's LoRA format, and (MixLoRA) its own format.

One module per format, on what they share:

* :mod:`.common` — file names, strict readers, pre-allocation checks, the rollback of a
  failed load;
* :mod:`.native` — ``loravariants_config.json`` + ``adapter_model.safetensors``, lossless for
  every variant;
* :mod:`.peft` — what ``peft.PeftModel.from_pretrained`` reads (the LoRA family);
* :mod:`.mixlora` — the MixLoRA ecosystem's ``adapter_config.json`` + ``adapter_model.bin``.

A variant says which formats hold it (``AdapterConfig.formats``). Every write goes to a
temporary directory renamed into place. Reads never unpickle: safetensors, JSON, and
``torch.load(weights_only=True)`` for MixLoRA's ``.bin``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .._version import __version__
from ..adapters.base import FORMATS, format_class
from ..inject import (
    RESUME_SENTINEL,
    SAVE_PRETRAINED,
    adapter_config,
    adapter_names,
    extra_trainable_modules,
    iter_adapters,
)
from ..longlora.context import apply_extension
from ..utils import make_dirs

# each format module registers its format on import, in this order (native first: it is the
# default, and the first asked whether a folder is its own); the package dispatches through
# the registry and names no format beyond that default
# isort: off
from . import native, peft, mixlora  # noqa: F401  (registration)

# isort: on
from .common import (
    NATIVE_CONFIG,
    PEFT_CONFIG,
    WEIGHTS,
    attach_for_loading,
    check_allocation,
    check_json_ints,
    check_same_output_fields,
    detect_format,
    read_json,
)

__all__ = [
    "FORMATS",
    "apply_saved_context",
    "attach_for_loading",
    "check_allocation",
    "check_json_ints",
    "check_same_output_fields",
    "detect_format",
    "load_adapter",
    "read_factors",
    "save_adapter",
    "saved_variant",
    "save_pretrained",
]

# what transformers' Trainer loads on resume (model.load_state_dict of this file, strict=False)
RESUME_WEIGHTS = "model.safetensors"


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "native",
    name: str | None = None,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Save adapter ``name`` (the only one when None) of ``model`` to directory ``path``.

    Args:
        model: a model with adapters attached.
        path: target directory; replaced atomically if it exists (only when it holds
            nothing but adapter files).
        format: a registered format (:data:`FORMATS`): ``"native"`` (every variant), or one
            the variant lists in its ``formats`` (peft's LoRA format, MoE-PEFT's).
        name: adapter name.
        base_model_name_or_path: written as the config's ``base_model_name_or_path`` (the
            base model peft and the MixLoRA loaders load); ``None``: the model's own.

    Returns:
        The directory written.

    Raises:
        ValueError: unknown format, a variant the format cannot hold, or ``path`` is a
            folder with other files in it.
    """
    fmt = format_class(format)  # ValueError listing the registered formats
    if not adapter_names(model):
        raise ValueError("the model has no adapters to save; call loravariants.attach first")
    config = adapter_config(model, name)
    if format not in config.formats:
        raise ValueError(
            f"format {format!r} cannot hold a {config.variant} adapter; "
            f"save it as one of {list(config.formats)}"
        )
    name = name or adapter_names(model)[0]
    return fmt.save(model, Path(path), name, config, base_model_name_or_path)


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Load an adapter directory written by :func:`save_adapter`, or any peft LoRA adapter.

    If no adapter named ``name`` is attached, it is attached from the saved config first;
    otherwise the saved weights replace the attached adapter's (shapes must agree).

    Args:
        model: the base model (with or without adapters).
        path: the adapter directory.
        name: adapter name (default: the saved name for native, else ``"default"``).

    Returns:
        ``model``.

    Raises:
        FileNotFoundError: missing directory or files (named).
        ValueError: corrupt files, or weights that do not fit the model (file named).
    """
    directory = Path(path)
    return FORMATS[detect_format(directory)].load(model, directory, name)


def apply_saved_context(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Give ``model`` the context extension the adapter in ``path`` was trained with.

    :func:`load_adapter` does this itself; call this before loading one of our peft-format
    adapters with ``peft.PeftModel.from_pretrained``, which does not read the extension.

    Raises:
        ValueError: the model carries a different extension (one line saying what to do).
    """
    directory = Path(path)
    extension = FORMATS[detect_format(directory)].saved_extension(model, directory)
    if extension:
        apply_extension(model, extension, str(directory))
    return model


def read_factors(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (B, A)}`` with the scaling folded in (``dW = B @ A``), from files only.

    Reads any directory :func:`save_adapter` writes and any peft LoRA directory, without
    building a model. MixLoRA experts appear as ``"<ffn module>.<proj>.experts.<e>"``.
    """
    directory = Path(path)
    return FORMATS[detect_format(directory)].read_factors(directory)


def saved_variant(path: str | os.PathLike) -> str:
    """The variant name an adapter directory holds (``""`` when its config names none), from
    its config file only."""
    directory = Path(path)
    return FORMATS[detect_format(directory)].saved_variant(directory)


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    format: str = "native",
    is_main_process: bool = True,
    push_to_hub: bool = False,
    **ignored,
) -> Path:
    """What ``model.save_pretrained`` does while adapters are attached (as a peft model's does:
    the adapters only, never the frozen base).

    Writes into ``save_directory`` (created if needed; other files in it are kept, since
    ``Trainer.save_model`` puts the tokenizer and its arguments there too):

    * the adapter in ``format`` (``native``: every variant, lossless; ``peft``: the LoRA
      family, for ``peft.PeftModel.from_pretrained``), read back by :func:`load_adapter`; with
      several adapters attached, each in ``save_directory/<name>/``;
    * ``model.safetensors``: the same adapter tensors (and marked modules) under the model's
      own ``state_dict`` names, marked with a sentinel tensor. It is what Trainer's
      ``resume_from_checkpoint`` and ``load_best_model_at_end`` load (with
      ``model.load_state_dict``), and what the model's load hook turns back into the adapters
      (COLA's chain position included). No ``config.json`` is written, so
      ``from_pretrained`` never takes it for a full model.

    Each file is written to a temporary name and renamed into place.

    Args:
        model: a model with adapters attached.
        save_directory: the output directory.
        format: ``"native"`` or ``"peft"``.
        is_main_process: ``False`` writes nothing (the other processes of a distributed run).
        push_to_hub: not supported here (``Trainer(push_to_hub=True)`` uploads the folder).
        **ignored: other ``save_pretrained`` arguments (``state_dict``, ``safe_serialization``,
            ``max_shard_size``): the adapters are small, always saved whole, as safetensors.

    Returns:
        The directory.

    Raises:
        ValueError: ``push_to_hub``, a format the variant cannot hold, or a
            ``model.safetensors`` in the folder that is not ours (a real model: not replaced).
    """
    if push_to_hub:
        raise ValueError(
            "save_pretrained(push_to_hub=True) is not supported with loravariants adapters "
            "attached; save, then upload the folder with huggingface_hub.upload_folder"
        )
    if format not in ("native", "peft"):
        raise ValueError(f"format must be 'native' or 'peft', got {format!r}")
    target = Path(save_directory)
    if not is_main_process:
        return target
    resume_file = target / RESUME_WEIGHTS
    if resume_file.exists() and not _is_resume_file(resume_file):
        raise ValueError(
            f"{resume_file} exists and is not a loravariants adapter checkpoint; save the "
            "adapters into another folder (a full model is never overwritten)"
        )
    names = adapter_names(model)
    make_dirs(target)
    tmp = Path(tempfile.mkdtemp(prefix=".loravariants-save-", dir=target))
    try:
        moves: list[tuple[Path, Path]] = []
        config_file = NATIVE_CONFIG if format == "native" else PEFT_CONFIG
        other_config = PEFT_CONFIG if format == "native" else NATIVE_CONFIG
        # the other format's config from an earlier save of ours would shadow the new one
        stale = [
            out / other_config
            for out in ([target] if len(names) == 1 else [target / n for n in names])
            if (out / other_config).is_file() and _written_by_us(out / other_config)
        ]
        for name in names:
            out = target if len(names) == 1 else target / name
            written = save_adapter(model, tmp / name, format=format, name=name)
            # weights before the config: a reader that sees the new config sees new weights
            files = sorted(written.iterdir(), key=lambda f: f.name == config_file)
            moves.extend((f, out / f.name) for f in files)
        tensors = _resume_tensors(model)
        meta = {"format": "pt", "loravariants_version": __version__, "loravariants": "resume"}
        save_file(tensors, str(tmp / RESUME_WEIGHTS), metadata=meta)
        moves.append((tmp / RESUME_WEIGHTS, resume_file))
        for src, dst in moves:
            make_dirs(dst.parent)
            os.replace(src, dst)
        for file in stale:
            file.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resume_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor and every marked module's tensor, by the model's state_dict name."""
    tensors = {RESUME_SENTINEL: torch.ones(1, dtype=torch.int8)}
    for path, name, layer in iter_adapters(model):
        for key, t in layer.adapter_state().items():
            tensors[f"{path}.adapters.{name}.{key}"] = t.detach().cpu().clone().contiguous()
    for module_name in extra_trainable_modules(model):
        for key, t in model.get_submodule(module_name).state_dict().items():
            tensors[f"{module_name}.{key}"] = t.detach().cpu().clone().contiguous()
    return tensors


def _is_resume_file(file: Path) -> bool:
    try:
        with safe_open(str(file), framework="pt") as f:
            return (f.metadata() or {}).get("loravariants") == "resume"
    except Exception:  # not a safetensors file at all: not ours
        return False


def _written_by_us(config_file: Path) -> bool:
    """A config file of one of our saves (native: library field; peft: our weights' metadata)."""
    try:
        if config_file.name == NATIVE_CONFIG:
            return read_json(config_file).get("library") == "loravariants"
        with safe_open(str(config_file.parent / WEIGHTS), framework="pt") as f:
            return "loravariants_version" in (f.metadata() or {})
    except Exception:
        return False


SAVE_PRETRAINED[:] = [
    save_pretrained
]  # what model.save_pretrained calls while adapters are attached
