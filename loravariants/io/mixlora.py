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
from ..adapters.base import AdapterLayer
from ..adapters.lora import LoRALinear
from ..adapters.mixlora import FFN_PROJECTIONS, MixLoRAConfig, MixLoRAFFN, ffn_activation_name
from ..inject import adapter_config, adapter_names, iter_adapters
from ..utils import atomic_directory
from .common import (
    attach_for_loading,
    bytes_present,
    check_adapter_replaceable,
    check_factors,
    check_json_ints,
    check_kinds,
    check_present,
    check_tensors,
    json_number,
    read_json,
    rollback_on_error,
    tensor_bytes,
)

__all__ = ["save_mixlora", "load_mixlora", "read_mixlora_factors"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.bin"
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
    """The file's tensors for one adapter layer, keyed as the format names them."""
    prefix = _file_prefix(path)
    if isinstance(layer, MixLoRAFFN):
        out = {f"{prefix}.moe_gate.weight": layer.router}
        for e, expert in enumerate(layer.experts):
            for proj in layer.projections:
                out[f"{prefix}.{proj}.experts.{e}.lora_A.weight"] = expert.lora_A[proj]
                out[f"{prefix}.{proj}.experts.{e}.lora_B.weight"] = expert.lora_B[proj]
        return out
    if isinstance(layer, LoRALinear):
        return {f"{prefix}.lora_A.weight": layer.lora_A, f"{prefix}.lora_B.weight": layer.lora_B}
    raise ValueError(f"{path}: {type(layer).__name__} has no MixLoRA-format form")


def _int_if_integral(value: float) -> int | float:
    """``16.0 -> 16``: the reference loaders assert an int ``lora_alpha``."""
    value = float(value)
    return int(value) if value.is_integer() else value


def base_model_name(model: nn.Module) -> str | None:
    """The model's ``name_or_path`` (transformers), or ``None`` for a model built from a config."""
    name = getattr(model, "name_or_path", None)
    if not isinstance(name, str) or not name:
        cfg = getattr(model, "config", None)
        name = getattr(cfg, "_name_or_path", None)
    return name if isinstance(name, str) and name else None


def _config_json(
    config: MixLoRAConfig,
    model: nn.Module,
    dropout: float,
    expert_dropout: float,
    base_model_name_or_path: str | None,
):
    tm = config.target_modules
    if isinstance(tm, str):
        raise ValueError(
            "the MixLoRA format lists target_modules by name; a regex target_modules "
            f"({tm!r}) cannot be written"
        )
    alpha = _int_if_integral(config.alpha)
    expert_alpha = _int_if_integral(config.expert_lora_alpha)
    if not (isinstance(alpha, int) and isinstance(expert_alpha, int)):
        warnings.warn(
            f"writing lora_alpha {config.alpha} / expert lora_alpha {config.expert_lora_alpha}: "
            "the `mixlora` package and MoE-PEFT assert an int lora_alpha and will refuse the file",
            stacklevel=3,
        )
    return {
        "peft_type": "MIXLORA",
        "routing_strategy": "mixlora",
        "task_type": "CAUSAL_LM",
        "bias": "none",
        "num_experts": config.num_experts,
        "top_k": config.top_k,
        "r": int(config.r),
        "lora_alpha": alpha,
        "lora_dropout": float(dropout),
        "target_modules": list(tm) + list(config.ffn_projections),
        "act_fn": ffn_activation_name(model),
        "expert_lora": {
            "r": int(config.expert_rank),
            "lora_alpha": expert_alpha,
            "lora_dropout": float(expert_dropout),
        },
        "router_aux_loss_coef": float(config.router_aux_loss_coef),
        "router_init_range": float(config.router_init_range),
        "jitter_noise": float(config.jitter_noise),
        "base_model_name_or_path": base_model_name_or_path,
        # ours only; the ecosystem's loaders read their keys by name and ignore these
        "balance_loss_aggregation": config.balance_loss_aggregation,
        "loravariants_version": __version__,
    }


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
    if not isinstance(config, MixLoRAConfig):
        raise ValueError(
            f"format 'mixlora' holds MixLoRA adapters only, got variant {config.variant!r}"
        )
    name = name or adapter_names(model)[0]
    check_adapter_replaceable(path)
    dropout, expert_dropout = config.dropout, config.expert_lora_dropout
    if loader_dropout is not None:
        if not loader_dropout > 0:
            raise ValueError(f"loader_dropout must be > 0, got {loader_dropout!r}")
        dropout = dropout or float(loader_dropout)
        expert_dropout = expert_dropout or float(loader_dropout)
    elif dropout == 0 or expert_dropout == 0:
        warnings.warn(
            "writing lora_dropout 0: the `mixlora` package and MoE-PEFT assert lora_dropout > 0 "
            "and will refuse the file (loravariants accepts it); pass loader_dropout=... for them",
            stacklevel=2,
        )
    if base_model_name_or_path is None:
        base_model_name_or_path = base_model_name(model)
    elif not isinstance(base_model_name_or_path, str) or not base_model_name_or_path:
        raise ValueError(
            "base_model_name_or_path must be a non-empty string (a hub id or a path), "
            f"got {base_model_name_or_path!r}"
        )
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
    meta = _config_json(config, model, dropout, expert_dropout, base_model_name_or_path)
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
    if meta.get("peft_type") != "MIXLORA":
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


def _config_from_json(meta: dict[str, Any], file: Path) -> MixLoRAConfig:
    check_json_ints(meta, ("num_experts", "top_k", "r", "expert_lora.r"), file)
    try:
        targets = _targets(meta)
        expert = meta.get("expert_lora") or {}
        if not isinstance(expert, dict):
            raise ValueError(f"expert_lora must be a mapping, got {expert!r:.60}")
        ffn = [t for t in targets if t in FFN_PROJECTIONS]
        aggregation = meta.get("balance_loss_aggregation", "global")  # ours; MoE-PEFT: global
        return MixLoRAConfig(
            num_experts=meta["num_experts"],
            top_k=meta["top_k"],
            r=meta["r"],
            alpha=json_number(meta["lora_alpha"], "lora_alpha"),
            dropout=_number(meta, "lora_dropout", 0.0, "lora_dropout"),
            expert_r=expert.get("r"),
            expert_alpha=_number(expert, "lora_alpha", None, "expert_lora.lora_alpha"),
            expert_dropout=_number(expert, "lora_dropout", None, "expert_lora.lora_dropout"),
            # absent keys: the reference code's defaults (coef 0.001, range 0.02, no jitter)
            router_aux_loss_coef=_number(
                meta, "router_aux_loss_coef", 0.001, "router_aux_loss_coef"
            ),
            router_init_range=_number(meta, "router_init_range", 0.02, "router_init_range"),
            jitter_noise=_number(meta, "jitter_noise", 0.0, "jitter_noise"),
            target_modules=[t for t in targets if t not in FFN_PROJECTIONS],
            ffn_projections=ffn or list(FFN_PROJECTIONS),
            balance_loss_aggregation=aggregation,
        )
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
        try:
            own = ffn_activation_name(model)
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
