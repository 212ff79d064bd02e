"""peft's LoRA format: what ``peft.PeftModel.from_pretrained`` reads.

``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``, extra trainable modules
through ``modules_to_save``. Each layer writes its :meth:`AdapterLayer.peft_factors` (a
variant's own layers as trained, or the one LoRA of rank ``sum(r)`` its factors give: exact for
the merged update), and the config adds its :meth:`AdapterConfig.format_fields` (peft's
``use_rslora``). A peft file reads back as the variant that declares ``file_type = "LORA"``
(peft's ``peft_type``), built from the file's fields under that config's names.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.base import AdapterConfig, AdapterFormat, register_format
from ..inject import extra_trainable_modules, iter_adapters
from .common import (
    PEFT_CONFIG,
    PEFT_CONTEXT_KEY,
    PEFT_PREFIX,
    WEIGHTS,
    base_name,
    check_factors,
    check_json_ints,
    describe_extension,
    extra_candidates,
    extra_tensors,
    json_number,
    json_str_list,
    load_safetensors_adapter,
    peft_type_of,
    read_json,
    read_safetensors,
    reading_variant,
    saved_extension,
    write_safetensors_adapter,
)

# peft's peft_type of its LoRA format (a schema value of peft's, not a variant name of ours)
PEFT_TYPE = "LORA"


def peft_payload(model: nn.Module, name: str, config: AdapterConfig):
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path, _, layer in iter_adapters(model, name):
        if not layer.mergeable:
            raise ValueError(
                f"{type(layer).__name__} at {path} has no peft LoRA form; "
                'save it with format="native" or format="mixlora"'
            )
        # LoRA as trained; COLA chain / MultiLoRA: their exact factors with alpha = r
        B, A, ranks[path], alphas[path] = layer.peft_factors()
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = A.contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = B.contiguous().cpu()
    tensors.update(extra_tensors(model, PEFT_PREFIX))
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # most common rank
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    meta = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if hasattr(model, "generate") else None,
        "base_model_name_or_path": base_name(model),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(getattr(config, "dropout", 0.0)),
        # factors with their scaling folded in (alpha = r) scale plainly; a variant whose
        # layers are written as trained says how they scale (format_fields, below)
        "use_rslora": False,
        "target_modules": sorted(ranks),
        "rank_pattern": {_anchor(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {_anchor(p): v for p, v in alphas.items() if v != alpha},
        "modules_to_save": extra_trainable_modules(model) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
    }
    meta.update(config.format_fields("peft", model))
    extension = describe_extension(model)
    if extension:  # an extra key: peft ignores it (with a warning) and loads the rest
        meta[PEFT_CONTEXT_KEY] = extension
    return tensors, meta


def _anchor(module_path: str) -> str:
    # peft matches pattern keys as `(.*\.)?key$`; an escaped full path matches that module only
    return "^" + module_path.replace(".", r"\.")


def config_from_peft(meta: Mapping[str, Any], file: Path) -> AdapterConfig:
    """The config a peft LoRA ``adapter_config.json`` holds: peft's fields under our names
    (``lora_alpha`` -> ``alpha``, ...), checked as JSON, given to the variant that reads peft's
    ``peft_type`` (:meth:`AdapterConfig.from_format`)."""
    unsupported = {
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_qalora": False,
    }
    for key, ok in unsupported.items():
        value = meta.get(key)
        # `is`/type, not ==: 0 is not false (a number is not a boolean, nor the reverse)
        if value is not None and (type(value) is not type(ok) or value != ok):
            raise ValueError(f"{file}: {key}={value!r:.60} is not supported (only {ok!r})")
    for key in ("layers_to_transform", "layer_replication"):
        if meta.get(key) is not None:  # peft reads 0 as "layer 0 only"
            raise ValueError(f"{file}: {key}={meta[key]!r:.60} is not supported (only null)")
    check_json_ints(meta, ("r",), file)
    try:
        target = _or(meta.get("target_modules"), ["q_proj", "v_proj"])
        alpha_pattern = _or(meta.get("alpha_pattern"), {})
        if not isinstance(alpha_pattern, dict):
            raise ValueError(f"alpha_pattern must be a mapping, got {alpha_pattern!r}")
        use_rslora = meta.get("use_rslora", False)
        if not isinstance(use_rslora, bool):
            raise ValueError(f"use_rslora must be true or false, got {use_rslora!r}")
        # no int()/float() coercion: `r: 4.7` or `r: "4"` is a broken file, not a rank of 4
        fields = {
            "r": meta.get("r", 8),
            "alpha": json_number(meta.get("lora_alpha", 8), "lora_alpha"),
            "dropout": json_number(_or(meta.get("lora_dropout"), 0.0), "lora_dropout"),
            "use_rslora": use_rslora,
            "target_modules": sorted(target) if isinstance(target, (list, tuple)) else target,
            "rank_pattern": _or(meta.get("rank_pattern"), {}),
            "alpha_pattern": {
                k: json_number(v, f"alpha_pattern[{k}]") for k, v in alpha_pattern.items()
            },
        }
        return reading_variant(PEFT_TYPE, file).from_format("peft", fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: invalid LoRA config ({e})") from e


def _or(value: Any, default: Any) -> Any:
    """``default`` for an absent (null) value only: ``false`` or ``""`` is not a number."""
    return default if value is None else value


def peft_tensors(
    tensors: dict[str, torch.Tensor], config: AdapterConfig, file: Path, skip_embeddings=False
):
    """Rename peft keys to ours and target exactly the modules present in the file.

    peft's ``target_modules`` may also match modules it skipped (e.g. ``layers_pattern``); the
    weights file is the truth about which modules carry an adapter. Embedding LoRA
    (``lora_embedding_A/B``) is refused, or with ``skip_embeddings`` left out with a warning.
    """
    embedding = sorted(
        {
            k.rsplit(".lora_embedding_", 1)[0][len(PEFT_PREFIX) :]
            for k in tensors
            if ".lora_embedding_" in k
        }
    )
    if embedding:
        message = (
            f"{file}: embedding LoRA (lora_embedding_A/B on {embedding}) is not supported: "
            "loravariants adapts nn.Linear layers only"
        )
        if not skip_embeddings:
            raise ValueError(message)
        warnings.warn(message + "; those modules are left out", stacklevel=3)
        tensors = {k: v for k, v in tensors.items() if ".lora_embedding_" not in k}
    out: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    for key, t in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{file}: unexpected key {key!r:.80} (expected {PEFT_PREFIX}...)")
        if not t.is_floating_point():  # peft's LoRA files hold weights only, no buffers
            raise ValueError(f"{file}: tensor {key!r:.80} is {t.dtype}, not floating point")
        rest = key[len(PEFT_PREFIX) :]
        for part in ("lora_A", "lora_B"):
            tail = f".{part}.weight"
            if rest.endswith(tail):
                module = rest[: -len(tail)]
                out[f"{PEFT_PREFIX}{module}.{part}"] = t
                if part == "lora_A":
                    modules.append(module)
                break
        else:
            out[key] = t  # modules_to_save tensor
    if not modules:
        raise ValueError(f"{file}: no lora_A/lora_B tensors found")
    fields = config.to_dict()
    fields.pop("variant")
    fields["target_modules"] = sorted(modules)
    return out, type(config)(**fields)


def read_peft_config(directory: Path, name: str | None) -> tuple[dict, AdapterConfig, str, list]:
    """``(meta, config, adapter name, modules_to_save)`` from a peft LoRA directory."""
    meta = read_json(directory / PEFT_CONFIG)
    config = config_from_peft(meta, directory / PEFT_CONFIG)
    extra = json_str_list(meta, "modules_to_save", directory / PEFT_CONFIG)
    return meta, config, name or "default", extra


def read_peft_factors(directory: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (s·B, A)}`` with peft's scaling (alpha / r, rsLoRA alpha / sqrt(r), after
    ``rank_pattern`` / ``alpha_pattern``); embedding LoRA left out."""
    tensors = read_safetensors(directory / WEIGHTS)
    config = config_from_peft(read_json(directory / PEFT_CONFIG), directory / PEFT_CONFIG)
    tensors, config = peft_tensors(tensors, config, directory / WEIGHTS, True)
    pairs = {
        m: (tensors[f"{PEFT_PREFIX}{m}.lora_B"], tensors[f"{PEFT_PREFIX}{m}.lora_A"])
        for m in config.target_modules
    }
    out = {}
    for module, (B, A) in check_factors(pairs, directory / WEIGHTS).items():
        r, alpha = config.rank_for(module)
        # peft's rule (peft.tuners.lora.layer): rsLoRA scales by alpha / sqrt(r)
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        out[module] = (B.float() * scale, A.float())
    return out


@register_format
class PeftFormat(AdapterFormat):
    """peft's LoRA format: what ``peft.PeftModel.from_pretrained`` reads."""

    name = "peft"

    def detect(self, directory: Path) -> bool:
        return peft_type_of(directory) == PEFT_TYPE

    def save(self, model, path, name, config, base_model_name_or_path) -> Path:
        tensors, meta = peft_payload(model, name, config)
        return write_safetensors_adapter(
            path, tensors, meta, PEFT_CONFIG, config, base_model_name_or_path
        )

    def load(self, model: nn.Module, directory: Path, name: str | None) -> nn.Module:
        meta, config, name, extra = read_peft_config(directory, name)
        config_file, weights_file = directory / PEFT_CONFIG, directory / WEIGHTS
        extension = saved_extension(model, meta, PEFT_CONTEXT_KEY, config_file)  # first
        tensors, config = peft_tensors(read_safetensors(weights_file), config, weights_file)
        # peft's rule for modules_to_save: a plain suffix ("norm" also names "input_layernorm")
        extra_modules = extra_candidates(model, extra, weights_file, suffix_match=True)
        return load_safetensors_adapter(
            model,
            directory,
            name,
            config,
            tensors,
            extra_modules,
            (PEFT_PREFIX, PEFT_PREFIX),
            extension,
            config_file,
        )

    def read_factors(self, directory: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return read_peft_factors(directory)

    def saved_variant(self, directory: Path) -> str:
        return reading_variant(PEFT_TYPE, directory / PEFT_CONFIG).variant

    def saved_extension(self, model: nn.Module, directory: Path) -> dict[str, Any] | None:
        file = directory / PEFT_CONFIG
        return saved_extension(model, read_json(file), PEFT_CONTEXT_KEY, file)
