"""Our native format: ``loravariants_config.json`` (library version, variant, every config
field, adapter name, wrapped modules, extra trainable modules, context extension) and
``adapter_model.safetensors`` (every adapter tensor as ``adapter.<module>.<tensor>``, whole
extra trainable modules as ``extra.<module>.<tensor>``). Lossless for every variant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..adapters.base import AdapterConfig, AdapterFormat, AdapterLayer, register_format
from ..inject import extra_trainable_modules, iter_adapters
from .common import (
    NATIVE_CONFIG,
    WEIGHTS,
    base_name,
    check_size_fields,
    check_spec,
    describe_extension,
    extra_candidates,
    extra_tensors,
    json_str,
    json_str_list,
    layer_from_state,
    load_safetensors_adapter,
    module_spec,
    read_json,
    read_safetensors,
    saved_extension,
    tensor_bytes,
    write_safetensors_adapter,
)

TENSOR_PREFIX, EXTRA_PREFIX = "adapter.", "extra."


def native_payload(model: nn.Module, name: str, config: AdapterConfig):
    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    for path, _, layer in iter_adapters(model, name):
        modules[path] = module_spec(layer.base)
        for key, t in layer.adapter_state().items():
            tensors[f"adapter.{path}.{key}"] = t.detach().contiguous().cpu()
    tensors.update(extra_tensors(model, "extra."))
    meta = {
        "library": "loravariants",
        "library_version": __version__,
        "format": "native",
        "adapter_name": name,
        "config": config.to_dict(),
        "modules": modules,
        "extra_trainable": extra_trainable_modules(model),
        "base_model_name_or_path": base_name(model),
        "context_extension": describe_extension(model),
    }
    return tensors, meta


def read_native_config(directory: Path, name: str | None) -> tuple[dict, AdapterConfig, str, list]:
    """``(meta, config, adapter name, extra trainable modules)`` from a native directory."""
    meta = read_json(directory / NATIVE_CONFIG)
    config = _saved_config(meta, directory)
    if not isinstance(meta.get("modules", {}), dict):  # read by read_factors only, but ours
        raise ValueError(f"{directory / NATIVE_CONFIG}: modules must be a mapping")
    name = name or json_str(meta, "adapter_name", directory / NATIVE_CONFIG) or "default"
    return meta, config, name, json_str_list(meta, "extra_trainable", directory / NATIVE_CONFIG)


def _saved_config(meta: dict[str, Any], directory: Path) -> AdapterConfig:
    try:
        return AdapterConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{directory / NATIVE_CONFIG}: invalid adapter config ({e})") from e


def read_native_factors(directory: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each saved layer rebuilt through its class on a stand-in frozen module
    (:meth:`AdapterConfig.stand_in`); its :meth:`AdapterLayer.named_factors`."""
    tensors = read_safetensors(directory / WEIGHTS)
    meta = read_json(directory / NATIVE_CONFIG)
    config = _saved_config(meta, directory)
    modules = meta.get("modules") or {}
    if not isinstance(modules, dict):
        raise ValueError(f"{directory / NATIVE_CONFIG}: modules must be a mapping")
    check_size_fields(config, tensor_bytes(tensors), directory / NATIVE_CONFIG)
    out = {}
    for module, spec in modules.items():
        state = {
            k[len(f"{TENSOR_PREFIX}{module}.") :]: v
            for k, v in tensors.items()
            if k.startswith(f"{TENSOR_PREFIX}{module}.")
        }
        try:
            check_spec(config, module, spec, state)
            layer: AdapterLayer = layer_from_state(config, module, spec, state, directory / WEIGHTS)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{directory / WEIGHTS}: cannot rebuild {module} ({e})") from e
        out.update({module + suffix: pair for suffix, pair in layer.named_factors().items()})
    return out


@register_format
class NativeFormat(AdapterFormat):
    """``loravariants_config.json`` + ``adapter_model.safetensors``: every variant, lossless."""

    name = "native"

    def detect(self, directory: Path) -> bool:
        return (directory / NATIVE_CONFIG).is_file()

    def save(self, model, path, name, config, base_model_name_or_path) -> Path:
        tensors, meta = native_payload(model, name, config)
        return write_safetensors_adapter(
            path, tensors, meta, NATIVE_CONFIG, config, base_model_name_or_path
        )

    def load(self, model: nn.Module, directory: Path, name: str | None) -> nn.Module:
        meta, config, name, extra = read_native_config(directory, name)
        config_file = directory / NATIVE_CONFIG
        extension = saved_extension(model, meta, _CONTEXT_KEY, config_file)  # before any read
        tensors = read_safetensors(directory / WEIGHTS)
        extra_modules = extra_candidates(model, extra, directory / WEIGHTS)
        return load_safetensors_adapter(
            model,
            directory,
            name,
            config,
            tensors,
            extra_modules,
            (TENSOR_PREFIX, EXTRA_PREFIX),
            extension,
            config_file,
        )

    def read_factors(self, directory: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return read_native_factors(directory)

    def saved_variant(self, directory: Path) -> str:
        return str((read_json(directory / NATIVE_CONFIG).get("config") or {}).get("variant", ""))

    def saved_extension(self, model: nn.Module, directory: Path) -> dict[str, Any] | None:
        file = directory / NATIVE_CONFIG
        return saved_extension(model, read_json(file), _CONTEXT_KEY, file)


_CONTEXT_KEY = "context_extension"
