"""The MixLoRA ecosystem's adapter format (MoE-PEFT and the `mixlora` package).

A directory with two files:

* ``adapter_config.json``::

      {"peft_type": "MIXLORA", "routing_strategy": "mixlora", "num_experts": 8, "top_k": 2,
       "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
       "target_modules": ["q_proj", ..., "gate_proj", "up_proj", "down_proj"],
       "act_fn": "silu", "expert_lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05},
       "router_aux_loss_coef": 0.01, "router_init_range": 0.02, "jitter_noise": 0.0,
       "base_model_name_or_path": "meta-llama/Llama-2-7b-hf", ...}

  ``target_modules`` lists the attention projections (plain LoRA) *and* the FFN projections
  that carry experts, as the reference code writes it. The reference loaders check types:
  ``r`` and ``lora_alpha`` are ints (an integral alpha is written as one), the dropouts, the
  coefficient, the init range and the jitter are floats, and ``base_model_name_or_path`` is a
  string (``save_mixlora(..., base_model_name_or_path=...)``, else the model's
  ``name_or_path``).
* ``adapter_model.bin``: ``torch.save`` of a flat dict of tensors::

      mixlora.layers.{i}.mlp.moe_gate.weight                        (E, hidden)
      mixlora.layers.{i}.mlp.{proj}.experts.{e}.lora_A.weight       (r, in)
      mixlora.layers.{i}.mlp.{proj}.experts.{e}.lora_B.weight       (out, r)
      mixlora.layers.{i}.self_attn.{proj}.lora_A.weight / lora_B.weight

  ``lora_B`` is stored unscaled (scaling ``lora_alpha / r``), as in peft. ``i`` is the decoder
  layer index found in the module path (``...layers.{i}...``); what follows it in the path is
  kept (``self_attn.q_proj``, ``mlp``).

Reading uses ``torch.load(weights_only=True)``: tensors only, nothing is unpickled beyond them.

Compatibility note: both reference loaders refuse ``lora_dropout == 0`` (the `mixlora`
package's ``LoraLinear`` and MoE-PEFT's ``Lora`` assert ``lora_dropout > 0``). We write the
adapter's real dropout and warn when it is 0; ``save_mixlora(..., loader_dropout=0.05)`` writes
that value instead, on request only. The `mixlora` package keeps its experts in plain dicts, so
``model.eval()`` does not reach their dropout: it applies dropout at inference unless it is
switched off there (docs/methods/mixlora.md shows how).
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..adapters.base import AdapterConfig, AdapterFormat, AdapterLayer, register_format
from ..inject import adapter_config, adapter_names, iter_adapters
from ..utils import atomic_directory
from .common import (
    PEFT_CONFIG,
    attach_for_loading,
    bytes_present,
    check_adapter_replaceable,
    check_factors,
    check_json_ints,
    check_kinds,
    check_present,
    check_tensors,
    json_number,
    peft_type_of,
    read_json,
    reading_variant,
    rollback_on_error,
    tensor_bytes,
)

__all__ = ["save_mixlora", "load_mixlora", "read_mixlora_factors"]

CONFIG_FILE = PEFT_CONFIG
WEIGHTS_FILE = "adapter_model.bin"
# the format's name in loravariants (save_adapter(format=...)), and MoE-PEFT's peft_type
FORMAT, PEFT_TYPE = "mixlora", "MIXLORA"
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def _file_prefix(module_path: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``mixlora.layers.3.self_attn.q_proj``."""
    m = _LAYER_RE.search(module_path)
    if m is None:
        raise ValueError(
            f"{module_path}: the MixLoRA format needs module paths with a layer index "
            "(...layers.<i>...)"
        )
    return f"mixlora.layers.{m.group(1)}.{m.group(2)}"


def _layer_tensors(path: str, layer: AdapterLayer) -> dict[str, torch.Tensor]:
    """The file's tensors for one adapter layer (its :meth:`AdapterLayer.format_tensors`),
    keyed as the format names them."""
    prefix = _file_prefix(path)
    try:
        named = layer.format_tensors(FORMAT)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return {f"{prefix}.{key}": t for key, t in named.items()}


def base_model_name(model: nn.Module) -> str | None:
    """The model's ``name_or_path`` (transformers), or ``None`` for a model built from a config."""
    name = getattr(model, "name_or_path", None)
    if not isinstance(name, str) or not name:
        cfg = getattr(model, "config", None)
        name = getattr(cfg, "_name_or_path", None)
    return name if isinstance(name, str) and name else None


def _config_json(
    config: AdapterConfig,
    model: nn.Module,
    dropout: float | None,
    base_model_name_or_path: str | None,
) -> dict[str, Any]:
    """The variant's MoE-PEFT config (:meth:`AdapterConfig.format_fields`), with the dropout
    the reference loaders accept (``dropout``, for a 0 only), the base model and our version."""
    meta = config.format_fields(FORMAT, model)
    expert = meta.get("expert_lora") or {}
    if dropout is not None:
        meta["lora_dropout"] = meta.get("lora_dropout") or dropout
        expert["lora_dropout"] = expert.get("lora_dropout") or dropout
    elif meta.get("lora_dropout") == 0 or expert.get("lora_dropout") == 0:
        warnings.warn(
            "writing lora_dropout 0: the `mixlora` package and MoE-PEFT assert lora_dropout > 0 "
            "and will refuse the file (loravariants accepts it); pass loader_dropout=... for them",
            stacklevel=3,
        )
    meta["base_model_name_or_path"] = base_model_name_or_path
    meta["loravariants_version"] = __version__  # ours; the reference loaders ignore it
    return meta


def save_mixlora(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | None = None,
    *,
    loader_dropout: float | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write MixLoRA adapter ``name`` of ``model`` in the MixLoRA format, atomically.

    Args:
        model: a model with a :class:`MixLoRAConfig` adapter attached.
        path: target directory (replaced if it exists and holds only adapter files).
        name: adapter name (the only one when ``None``).
        loader_dropout: when given, written instead of a dropout of 0 (attention and experts)
            so the reference loaders, which assert ``lora_dropout > 0`` (the `mixlora` package
            and MoE-PEFT), accept the file. Off by default: the real value is written.
        base_model_name_or_path: the base model the reference loaders load (a hub id or a
            path). ``None``: the model's ``name_or_path``; a model built from a config has
            none, and the file then says ``null`` (with a warning: the reference loaders
            refuse it).

    Returns:
        The directory written.

    Raises:
        ValueError: the adapter is not MixLoRA, a regex ``target_modules``, or a module path
            without a layer index.
    """
    config = adapter_config(model, name)
    if FORMAT not in config.formats:
        raise ValueError(
            f"format {FORMAT!r} cannot hold a {config.variant} adapter; "
            f"save it as one of {list(config.formats)}"
        )
    name = name or adapter_names(model)[0]
    check_adapter_replaceable(path)
    if loader_dropout is not None and not loader_dropout > 0:
        raise ValueError(f"loader_dropout must be > 0, got {loader_dropout!r}")
    if base_model_name_or_path is None:
        base_model_name_or_path = base_model_name(model)
    elif not isinstance(base_model_name_or_path, str) or not base_model_name_or_path:
        raise ValueError(
            "base_model_name_or_path must be a non-empty string (a hub id or a path), "
            f"got {base_model_name_or_path!r}"
        )
    dropout = None if loader_dropout is None else float(loader_dropout)
    meta = _config_json(config, model, dropout, base_model_name_or_path)
    if base_model_name_or_path is None:
        warnings.warn(
            "writing base_model_name_or_path null (the model was built from a config): the "
            "`mixlora` package and MoE-PEFT need it; pass base_model_name_or_path=...",
            stacklevel=2,
        )
    tensors: dict[str, torch.Tensor] = {}
    for path_, _, layer in iter_adapters(model, name):
        for key, t in _layer_tensors(path_, layer).items():
            tensors[key] = t.detach().to("cpu").contiguous().clone()
    with atomic_directory(path) as tmp:
        torch.save(tensors, tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(path)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def _read_config(directory: Path) -> dict[str, Any]:
    file = directory / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: MixLoRA adapter config not found")
    meta = read_json(file)
    if meta.get("peft_type") != PEFT_TYPE:
        raise ValueError(f'{file}: not a MixLoRA adapter config (needs "peft_type": "MIXLORA")')
    strategy = meta.get("routing_strategy", "mixlora")
    if strategy != "mixlora":
        raise ValueError(
            f"{file}: routing_strategy {strategy!r:.60} is not supported (only 'mixlora', top-k)"
        )
    return meta


def _number(meta: dict[str, Any], key: str, default: float | None, field: str) -> float | None:
    """A float field: absent or null gives ``default``; a string or a boolean is refused
    (``"8"`` or ``true`` is a broken file, not alpha 8 or 1)."""
    value = meta.get(key)
    return default if value is None else json_number(value, field)


def _targets(meta: dict[str, Any]) -> list[str]:
    targets = meta["target_modules"]
    if isinstance(targets, dict):  # MoE-PEFT also writes {name: bool}
        if not all(isinstance(v, bool) for v in targets.values()):
            raise ValueError(f"target_modules must map names to true/false, got {targets!r:.60}")
        targets = [k for k, v in targets.items() if v]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"target_modules must be a list of module names, got {targets!r:.60}")
    return targets


def _config_from_json(meta: dict[str, Any], file: Path) -> AdapterConfig:
    """The variant that reads MoE-PEFT's ``peft_type`` builds its config from the file's keys
    (:meth:`AdapterConfig.from_format`), once their JSON types are checked here."""
    check_json_ints(meta, ("num_experts", "top_k", "r", "expert_lora.r"), file)
    try:
        fields = dict(meta, target_modules=_targets(meta))
        expert = meta.get("expert_lora") or {}
        if not isinstance(expert, dict):
            raise ValueError(f"expert_lora must be a mapping, got {expert!r:.60}")
        json_number(meta["lora_alpha"], "lora_alpha")
        for key in ("lora_dropout", "router_aux_loss_coef", "router_init_range", "jitter_noise"):
            _number(meta, key, None, key)
        for key in ("lora_alpha", "lora_dropout"):
            _number(expert, key, None, f"expert_lora.{key}")
        return reading_variant(PEFT_TYPE, file).from_format(FORMAT, fields)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{file}: invalid MixLoRA config ({e!r:.200})") from e


def _check_zip(file: Path) -> None:
    """What ``torch.load`` would inflate, checked before it runs: a torch zip archive whose
    entries are all stored uncompressed (``torch.save`` writes them so) and whose sizes are
    present on disk. A deflated entry lets a 1 MB file unpack to a GiB.

    Raises:
        ValueError: naming the file (and the entry).
    """
    try:
        with zipfile.ZipFile(file) as archive:
            entries = archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise ValueError(
            f"{file}: not a torch zip archive (torch.save's format; the legacy format is not "
            f"read) ({e})"
        ) from e
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED:
            raise ValueError(
                f"{file}: entry {entry.filename!r:.80} is compressed; torch.save stores its "
                "entries uncompressed, and a compressed one is refused unread"
            )
    with file.open("rb") as f:
        check_present(file, sum(e.file_size for e in entries), bytes_present(f.fileno()))


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    file = directory / WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: MixLoRA adapter weights not found")
    _check_zip(file)
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip/pickle, or a pickle that is more than tensors
        raise ValueError(f"{file}: not a readable tensor file ({e})") from e
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise ValueError(f"{file}: expected a dict of named tensors")
    for key, t in data.items():
        # a pickle may give a tensor zero strides over a tiny storage: 1e12 values from 4 bytes,
        # which any whole-tensor operation (the finite check, a cast) would allocate
        if t.numel() * t.element_size() > t.untyped_storage().nbytes():
            raise ValueError(
                f"{file}: tensor {key!r:.80} of shape {tuple(t.shape)} is a view larger than the "
                f"{t.untyped_storage().nbytes():,} bytes it stores; refused"
            )
    check_tensors(data, file)
    return data


def load_mixlora(model: nn.Module, path: str | os.PathLike, name: str = "default") -> nn.Module:
    """Load a MixLoRA-format directory into ``model``.

    Attaches adapter ``name`` from the file's config unless one by that name is attached (then
    the file's weights replace its weights; shapes must agree).

    Raises:
        FileNotFoundError: missing directory or files (named).
        ValueError: invalid or corrupt files, a different FFN activation, or weights that do
            not fit the model (file named).
    """
    directory = Path(path)
    meta = _read_config(directory)
    config_file, weights_file = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    config = _config_from_json(meta, config_file)
    act = meta.get("act_fn")
    if act is not None:
        try:  # what the model's FFN would be written with (its write-time warnings unwanted)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                own = config.format_fields(FORMAT, model).get("act_fn")
        except ValueError:
            own = None
        if own is not None and own != act:
            raise ValueError(f"{config_file}: act_fn {act!r:.60} but the model's FFN uses {own!r}")
    tensors = _read_weights(directory)
    with rollback_on_error(model, name, []):
        attach_for_loading(model, name, config, tensor_bytes(tensors), directory, config_file)
        _copy_tensors(model, name, tensors, weights_file)
    return model


def _copy_tensors(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], file: Path):
    """Copy the file's tensors into adapter ``name`` (unmerged meanwhile: a merged delta is
    the old one), checking names and shapes."""
    merged = [layer for _, _, layer in iter_adapters(model, name) if layer.merged]
    for layer in merged:
        layer.unmerge()
    used: set[str] = set()
    with torch.no_grad():
        for module_path, _, layer in iter_adapters(model, name):
            for key, param in _layer_tensors(module_path, layer).items():
                if key not in tensors:
                    raise ValueError(f"{file}: missing tensor {key!r}")
                t = tensors[key]
                check_kinds({key: t}, {key: param}, file)
                if tuple(t.shape) != tuple(param.shape):
                    raise ValueError(
                        f"{file}: {key} has shape {tuple(t.shape)}, the model needs "
                        f"{tuple(param.shape)}"
                    )
                param.copy_(t)
                used.add(key)
    leftover = sorted(set(tensors) - used)
    if leftover:
        raise ValueError(
            f"{file}: {len(leftover)} tensor(s) match no adapter module of this model, "
            f"e.g. {leftover[0]!r}"
        )
    for layer in merged:
        layer.merge()


_EXPERT_RE = re.compile(r"^mixlora\.(.+)\.experts\.(\d+)\.lora_([AB])\.weight$")
_LORA_RE = re.compile(r"^mixlora\.(.+)\.lora_([AB])\.weight$")


def read_mixlora_factors(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (B, A)}`` with the scaling folded in (``dW = B @ A``), from the files only.

    Keys use Llama-style module names: ``"model.layers.0.self_attn.q_proj"`` for an attention
    LoRA, ``"model.layers.0.mlp.gate_proj.experts.3"`` for expert 3 of a projection. The
    routers are not LoRA factors and are left out.
    """
    directory = Path(path)
    meta = _read_config(directory)
    config = _config_from_json(meta, directory / CONFIG_FILE)
    tensors = _read_weights(directory)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    scales: dict[str, float] = {}
    for key, t in tensors.items():
        m = _EXPERT_RE.match(key)
        if m:
            module = f"model.{m.group(1)}.experts.{m.group(2)}"
            scales[module] = config.expert_lora_alpha / config.expert_rank
            pairs.setdefault(module, {})[m.group(3)] = t
            continue
        m = _LORA_RE.match(key)
        if m:
            module = f"model.{m.group(1)}"
            scales[module] = config.alpha / config.r
            pairs.setdefault(module, {})[m.group(2)] = t
    out = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{directory / WEIGHTS_FILE}: {module} lacks lora_A or lora_B")
        out[module] = (ab["B"], ab["A"])
    return {
        module: (B.float() * scales[module], A.float())
        for module, (B, A) in check_factors(out, directory / WEIGHTS_FILE).items()
    }


@register_format
class MixLoRAFormat(AdapterFormat):
    """The MixLoRA ecosystem's format (MoE-PEFT, the `mixlora` package)."""

    name = FORMAT

    def detect(self, directory: Path) -> bool:
        return peft_type_of(directory) == PEFT_TYPE

    def save(self, model, path, name, config, base_model_name_or_path) -> Path:
        return save_mixlora(model, path, name=name, base_model_name_or_path=base_model_name_or_path)

    def load(self, model: nn.Module, directory: Path, name: str | None) -> nn.Module:
        return load_mixlora(model, directory, name=name or "default")

    def read_factors(self, directory: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return read_mixlora_factors(directory)

    def saved_variant(self, directory: Path) -> str:
        return reading_variant(PEFT_TYPE, directory / CONFIG_FILE).variant
