"""Save and load adapters: our native format, peft's LoRA format, and (MixLoRA) its own format.

Formats
-------
``"native"`` — a directory with ``loravariants_config.json`` (library version, variant, every
config field, adapter name, wrapped modules, extra trainable modules) and
``adapter_model.safetensors`` (every adapter tensor as ``adapter.<module>.<tensor>``, whole
extra trainable modules as ``extra.<module>.<tensor>``). Lossless for every variant.

``"peft"`` — what ``peft.PeftModel.from_pretrained`` reads: ``adapter_config.json`` and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` /
``lora_B.weight``, extra trainable modules through ``modules_to_save``. LoRA is written as is;
COLA and MultiLoRA are written as the one LoRA of rank ``sum(r)`` their :meth:`factors` give
(exact for the merged update). MixLoRA has no peft form.

``"mixlora"`` — the MixLoRA ecosystem's ``adapter_config.json`` + ``adapter_model.bin``
(see :mod:`loravariants.io_mixlora`).

Every write goes to a temporary directory renamed into place. Reads never unpickle: safetensors,
JSON, and ``torch.load(weights_only=True)`` for MixLoRA's ``.bin``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .adapters.base import AdapterConfig
from .adapters.lora import LoRAConfig, lora_scaling
from .inject import (
    _restore_trainable_modules,
    adapter_config,
    adapter_names,
    attach,
    detach,
    extra_trainable_modules,
    iter_adapters,
    mark_trainable,
)
from .utils import ADAPTER_FILES, atomic_directory, check_replaceable, recover_directory

__all__ = ["save_adapter", "load_adapter", "apply_saved_context", "read_factors", "FORMATS"]

FORMATS = ("native", "peft", "mixlora")
NATIVE_CONFIG = "loravariants_config.json"
PEFT_CONFIG = "adapter_config.json"
# the context extension an adapter was trained with, in adapter_config.json (peft ignores it)
PEFT_CONTEXT_KEY = "loravariants_context_extension"
WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------


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
        format: ``"native"``, ``"peft"`` (LoRA family) or ``"mixlora"`` (MixLoRA).
        name: adapter name.
        base_model_name_or_path: written as the config's ``base_model_name_or_path`` (the
            base model peft and the MixLoRA loaders load); ``None``: the model's own.

    Returns:
        The directory written.

    Raises:
        ValueError: unknown format, a variant the format cannot hold, or ``path`` is a
            folder with other files in it.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if not adapter_names(model):
        raise ValueError("the model has no adapters to save; call loravariants.attach first")
    config = adapter_config(model, name)
    if format not in config.formats:
        raise ValueError(
            f"format {format!r} cannot hold a {config.variant} adapter; "
            f"save it as one of {list(config.formats)}"
        )
    name = name or adapter_names(model)[0]
    if format == "mixlora":
        from .io_mixlora import save_mixlora

        return save_mixlora(model, path, name=name, base_model_name_or_path=base_model_name_or_path)
    check_replaceable(path, ADAPTER_FILES, "an adapter's")
    if format == "peft":
        tensors, meta = _peft_payload(model, name, config)
        config_file = PEFT_CONFIG
    else:
        tensors, meta = _native_payload(model, name, config)
        config_file = NATIVE_CONFIG
    if base_model_name_or_path is not None:
        meta["base_model_name_or_path"] = base_model_name_or_path
    # provenance goes into the weights' metadata: peft warns about unknown config keys
    provenance = {"format": "pt", "loravariants_version": __version__, "variant": config.variant}
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata=provenance)
        (tmp / config_file).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(path)


def _extra_tensors(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for module_name in extra_trainable_modules(model):
        for key, t in model.get_submodule(module_name).state_dict().items():
            out[f"{prefix}{module_name}.{key}"] = t.detach().contiguous().cpu()
    return out


def _base_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None) or None


def _native_payload(model: nn.Module, name: str, config: AdapterConfig):
    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    for path, _, layer in iter_adapters(model, name):
        modules[path] = _module_spec(layer.base)
        for key, t in layer.adapter_state().items():
            tensors[f"adapter.{path}.{key}"] = t.detach().contiguous().cpu()
    tensors.update(_extra_tensors(model, "extra."))
    meta = {
        "library": "loravariants",
        "library_version": __version__,
        "format": "native",
        "adapter_name": name,
        "config": config.to_dict(),
        "modules": modules,
        "extra_trainable": extra_trainable_modules(model),
        "base_model_name_or_path": _base_name(model),
        "context_extension": _describe_extension(model),
    }
    return tensors, meta


def _describe_extension(model: nn.Module) -> dict[str, Any] | None:
    from .longlora.context import describe_extension

    return describe_extension(model)


def _peft_payload(model: nn.Module, name: str, config: AdapterConfig):
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
        tensors[f"{_PEFT_PREFIX}{path}.lora_A.weight"] = A.contiguous().cpu()
        tensors[f"{_PEFT_PREFIX}{path}.lora_B.weight"] = B.contiguous().cpu()
    tensors.update(_extra_tensors(model, _PEFT_PREFIX))
    # only plain LoRA is written as trained (with its own scaling rule); the others' factors
    # carry their scaling already
    use_rslora = type(config) is LoRAConfig and config.use_rslora
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # most common rank
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    meta = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if hasattr(model, "generate") else None,
        "base_model_name_or_path": _base_name(model),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(getattr(config, "dropout", 0.0)),
        "use_rslora": use_rslora,
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
    extension = _describe_extension(model)
    if extension:  # an extra key: peft ignores it (with a warning) and loads the rest
        meta[PEFT_CONTEXT_KEY] = extension
    return tensors, meta


def _anchor(module_path: str) -> str:
    # peft matches pattern keys as `(.*\.)?key$`; an escaped full path matches that module only
    return "^" + module_path.replace(".", r"\.")


def _module_spec(module: nn.Module) -> dict[str, Any]:
    """Shape of a frozen module, enough to rebuild a stand-in for :func:`read_factors`."""
    if isinstance(module, nn.Linear):
        return {"type": "linear", "in": module.in_features, "out": module.out_features}
    children = {
        n: {"in": c.in_features, "out": c.out_features}
        for n, c in module.named_children()
        if isinstance(c, nn.Linear)
    }
    return {"type": type(module).__name__, "linears": children}


def _check_spec(config: AdapterConfig, path: str, spec: Any, state) -> None:
    """The shapes a saved module spec implies, checked on meta tensors against the saved
    tensors before a real layer is built (a spec of 10^9 features would allocate)."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"module spec must be a mapping, got {spec!r}")
    dims = [spec.get("in"), spec.get("out")] if spec.get("type") == "linear" else []
    for shape in (spec.get("linears") or {}).values() if not dims else ():
        dims += [shape.get("in"), shape.get("out")] if isinstance(shape, Mapping) else [None]
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in dims):
        raise ValueError(f"module spec sizes must be positive integers, got {spec!r}")
    layer = config.create_layer(path, config.stand_in(spec))
    asked = sum(t.numel() for t in layer.adapter_state().values())
    held = sum(t.numel() for t in state.values())
    if asked > 2 * held + 2**20:
        raise ValueError(f"module spec {spec!r} asks for {asked:,} values, the file holds {held:,}")


def _layer_from_state(config: AdapterConfig, path: str, spec: Mapping[str, Any], state):
    """Rebuild one adapter layer from saved tensors on a shape-only stand-in base module."""
    layer = config.create_layer(path, config.stand_in(spec))
    layer.to_empty(device="cpu")
    layer.load_adapter_state(state)
    return layer


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a valid JSON file ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return data


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: adapter weights not found")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{file}: not a valid safetensors file ({e})") from e


def detect_format(path: str | os.PathLike) -> str:
    """``"native"``, ``"peft"`` or ``"mixlora"`` for an adapter directory.

    A save killed mid-replace is repaired first (:func:`~loravariants.utils.recover_directory`).
    """
    directory = Path(path)
    recover_directory(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such adapter directory")
    if (directory / NATIVE_CONFIG).is_file():
        return "native"
    if (directory / PEFT_CONFIG).is_file():
        peft_type = _read_json(directory / PEFT_CONFIG).get("peft_type")
        if peft_type == "LORA":
            return "peft"
        if peft_type == "MIXLORA":
            return "mixlora"
        raise ValueError(
            f"{directory / PEFT_CONFIG}: peft_type {peft_type!r} is not supported "
            "(LORA and MIXLORA are)"
        )
    raise ValueError(f"{directory}: neither {NATIVE_CONFIG} nor {PEFT_CONFIG} found")


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
    fmt = detect_format(directory)
    if fmt == "mixlora":
        from .io_mixlora import load_mixlora

        return load_mixlora(model, directory, name=name or "default")
    if fmt == "native":
        meta = _read_json(directory / NATIVE_CONFIG)
        try:
            config = AdapterConfig.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{directory / NATIVE_CONFIG}: invalid adapter config ({e})") from e
        name = name or _json_str(meta, "adapter_name", directory / NATIVE_CONFIG) or "default"
        prefix, extra_prefix = "adapter.", "extra."
        extra = _json_str_list(meta, "extra_trainable", directory / NATIVE_CONFIG)
    else:
        meta = _read_json(directory / PEFT_CONFIG)
        config = _lora_config_from_peft(meta, directory / PEFT_CONFIG)
        name = name or "default"
        prefix, extra_prefix = _PEFT_PREFIX, _PEFT_PREFIX
        extra = _json_str_list(meta, "modules_to_save", directory / PEFT_CONFIG)
    weights_file = directory / WEIGHTS
    tensors = _read_safetensors(weights_file)
    if fmt == "peft":
        tensors, config = _peft_tensors(tensors, config, weights_file)
    extra_modules = _extra_candidates(model, extra, fmt, weights_file)
    extension = _saved_extension(model, meta, fmt, directory / _config_name(fmt))
    with _rollback_on_error(model, name, extra_modules):
        attach_for_loading(model, name, config, directory, directory / _config_name(fmt))
        _load_extra(model, tensors, extra_modules, extra_prefix, weights_file)
        _load_layers(model, name, tensors, prefix, weights_file)
    if extension:
        from .longlora.context import apply_extension

        apply_extension(model, extension, str(directory))
    return model


def _saved_extension(model: nn.Module, meta: Mapping[str, Any], fmt: str, file: Path):
    """The saved context extension to apply to ``model`` (None: nothing to do).

    Raises:
        ValueError: the model carries another extension than the adapter was trained with.
    """
    from .longlora.context import check_extension

    key = "context_extension" if fmt == "native" else PEFT_CONTEXT_KEY
    return check_extension(model, meta.get(key), str(file), recorded=key in meta)


def apply_saved_context(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Give ``model`` the context extension the adapter in ``path`` was trained with.

    :func:`load_adapter` does this itself; call this before loading one of our peft-format
    adapters with ``peft.PeftModel.from_pretrained``, which does not read the extension.

    Raises:
        ValueError: the model carries a different extension (one line saying what to do).
    """
    directory = Path(path)
    fmt = detect_format(directory)
    if fmt == "mixlora":
        return model
    meta = _read_json(directory / _config_name(fmt))
    extension = _saved_extension(model, meta, fmt, directory / _config_name(fmt))
    if extension:
        from .longlora.context import apply_extension

        apply_extension(model, extension, str(directory))
    return model


@contextlib.contextmanager
def _rollback_on_error(model: nn.Module, name: str, extra_modules: list[str]):
    """A load that fails leaves the model as it was: no half-loaded adapter, no changed weights.

    Saves (cloned) the state and merge status of adapter ``name`` if already attached, and the
    state of the modules the file may overwrite; on any exception restores them (or detaches
    an adapter attached inside the block).
    """
    attached_before = name in adapter_names(model)
    layers_before = {}
    if attached_before:
        for path, _, layer in iter_adapters(model, name):
            state = {k: t.clone() for k, t in layer.adapter_state().items()}
            layers_before[path] = (state, layer.merged)
    extra_before = {
        m: {k: t.clone() for k, t in model.get_submodule(m).state_dict().items()}
        for m in extra_modules
    }
    marked_before = extra_trainable_modules(model)
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for m, state in extra_before.items():
                model.get_submodule(m).load_state_dict(state)
            if not attached_before and name in adapter_names(model):
                detach(model, name)
            for path, _, layer in iter_adapters(model, name) if attached_before else ():
                state, was_merged = layers_before[path]
                if layer.merged:
                    layer.unmerge()  # takes out the delta merged now, whatever it is
                layer.load_adapter_state(state)
                if was_merged:
                    layer.merge()
        _restore_trainable_modules(model, marked_before)
        raise


def attach_for_loading(
    model: nn.Module, name: str, config: AdapterConfig, directory: Path, config_file: Path
) -> None:
    """Attach the saved config under ``name``, or check the attached one can take the file."""
    if name in adapter_names(model):
        check_same_output_fields(model, name, config, config_file)
        return
    check_allocation(model, config, directory, config_file)
    try:
        attach(model, config, name=name)
    except ValueError as e:
        raise ValueError(f"{directory}: adapter does not fit this model ({e})") from e


# what a config may ask attach to allocate beyond what its adapter's files hold (bytes)
_ALLOCATION_SLACK = 64 * 2**20


def check_allocation(
    model: nn.Module, config: AdapterConfig, directory: Path, config_file: Path
) -> None:
    """Refuse a config whose sizes (r, rank_pattern, num_experts, expert r, ...) would make
    ``attach`` allocate far more than the adapter's files hold, before anything is allocated.

    The layers are built on shape-only (meta) copies of the modules they would wrap, so the
    count is exact and costs no memory. A real adapter's files hold all its tensors: twice
    their size (plus 64 MiB) is an upper bound no honest file exceeds.

    Raises:
        ValueError: naming the file, the bytes asked for and the bytes the files hold.
    """
    held = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    _check_size_fields(config, held, config_file)
    asked = 0
    try:
        for path, module in config.select(model):
            layer = config.create_layer(path, config.stand_in(_module_spec(module)))
            asked += sum(t.numel() * t.element_size() for t in layer.adapter_state().values())
            if asked > 2 * held + _ALLOCATION_SLACK:
                break
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"{config_file}: adapter does not fit this model ({e})") from e
    if asked > 2 * held + _ALLOCATION_SLACK:
        raise ValueError(
            f"{config_file}: its sizes (r, rank_pattern, num_experts, ...) ask for more than "
            f"{asked / 2**20:,.0f} MiB of adapter tensors on this model, but {directory} holds "
            f"{held / 2**20:,.1f} MiB; refused before allocating"
        )


# fields that set a rank (values per row) and fields that set a number of sub-modules
_RANK_FIELDS = ("r", "expert_r", "top_k")
_COUNT_FIELDS = ("num_experts", "num_branches")
_MAX_SUBMODULES = 65536


def _check_size_fields(config: AdapterConfig, held: int, config_file: Path) -> None:
    """Each unit of a size field stands for at least one stored value (>= 2 bytes) of the
    file, and each expert/branch for a few: bigger sizes are refused before even the
    shape-only layers are built (a million experts are a million Python objects)."""
    sizes = {f: getattr(config, f, None) for f in _RANK_FIELDS + _COUNT_FIELDS}
    for key in ("rank_pattern",):
        for k, v in (getattr(config, key, None) or {}).items():
            sizes[f"{key}[{k}]"] = v
    for i, v in enumerate(getattr(config, "link_ranks", None) or []):
        sizes[f"link_ranks[{i}]"] = v
    for field, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        bound = min(held // 8, _MAX_SUBMODULES) if field in _COUNT_FIELDS else held // 2
        if value > bound:
            raise ValueError(
                f"{config_file}: {field}={value:,} is more than the adapter's files "
                f"({held:,} bytes) can hold (at most {bound:,}); refused before allocating"
            )


def check_same_output_fields(
    model: nn.Module, name: str, config: AdapterConfig, file: Path
) -> None:
    """Loading into an attached adapter: the settings no tensor shape shows must agree.

    ``alpha`` (or MixLoRA's ``top_k``) is not in the weights: a file trained with another
    value would load without a shape error and compute something else.

    Raises:
        ValueError: another variant, or a differing field (named, both values).
    """
    current = adapter_config(model, name)
    if type(current) is not type(config):
        raise ValueError(
            f"{file}: a {config.variant} adapter cannot load into {name!r}, a {current.variant}"
        )
    for field in type(current).output_fields:
        mine, saved = getattr(current, field), getattr(config, field)
        if mine != saved:
            raise ValueError(
                f"{file}: saved with {field}={saved!r}, but adapter {name!r} has {field}={mine!r}; "
                "load into a model without it (the saved config is used) or match the field"
            )


def _config_name(fmt: str) -> str:
    return NATIVE_CONFIG if fmt == "native" else PEFT_CONFIG


def _lora_config_from_peft(meta: Mapping[str, Any], file: Path) -> LoRAConfig:
    unsupported = {
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_qalora": False,
    }
    for key, ok in unsupported.items():
        if meta.get(key, ok) not in (ok, None):
            raise ValueError(f"{file}: {key}={meta[key]!r} is not supported (only {ok!r})")
    if meta.get("layers_to_transform") or meta.get("layer_replication"):
        raise ValueError(f"{file}: layers_to_transform/layer_replication are not supported")
    check_json_ints(meta, ("r",), file)
    try:
        target = meta.get("target_modules") or ["q_proj", "v_proj"]
        alpha_pattern = meta.get("alpha_pattern") or {}
        if not isinstance(alpha_pattern, dict):
            raise ValueError(f"alpha_pattern must be a mapping, got {alpha_pattern!r}")
        use_rslora = meta.get("use_rslora", False)
        if not isinstance(use_rslora, bool):
            raise ValueError(f"use_rslora must be true or false, got {use_rslora!r}")
        # no int()/float() coercion: `r: 4.7` or `r: "4"` is a broken file, not a rank of 4
        return LoRAConfig(
            r=meta.get("r", 8),
            alpha=_number(meta.get("lora_alpha", 8), "lora_alpha"),
            dropout=_number(meta.get("lora_dropout", 0.0) or 0.0, "lora_dropout"),
            use_rslora=use_rslora,
            target_modules=sorted(target) if isinstance(target, (list, tuple)) else target,
            rank_pattern=dict(meta.get("rank_pattern") or {}),
            alpha_pattern={k: _number(v, f"alpha_pattern[{k}]") for k, v in alpha_pattern.items()},
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: invalid LoRA config ({e})") from e


def check_json_ints(meta: Mapping[str, Any], keys: tuple[str, ...], file: Path) -> None:
    """Fields of a JSON config that must be integers (``a.b``: key ``b`` of mapping ``a``),
    where present: ``4.7``, ``"4"`` or ``true`` is a broken file, not the integer 4.

    Raises:
        ValueError: naming the file, the field and the value.
    """
    for key in keys:
        node: Any = meta
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None and (isinstance(node, bool) or not isinstance(node, int)):
            raise ValueError(f"{file}: {key} must be an integer, got {node!r}")


def _json_str(meta: Mapping[str, Any], key: str, file: Path) -> str | None:
    value = meta.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{file}: {key} must be a string, got {value!r}")
    return value


def _json_str_list(meta: Mapping[str, Any], key: str, file: Path) -> list[str]:
    value = meta.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{file}: {key} must be a list of module names, got {value!r}")
    return list(value)


def _number(value: Any, field: str) -> float:
    """A JSON number (an int is fine) as float; strings, booleans and the rest are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a number, got {value!r}")
    return float(value)


def _peft_tensors(
    tensors: dict[str, torch.Tensor], config: LoRAConfig, file: Path, skip_embeddings=False
):
    """Rename peft keys to ours and target exactly the modules present in the file.

    peft's ``target_modules`` may also match modules it skipped (e.g. ``layers_pattern``); the
    weights file is the truth about which modules carry an adapter. Embedding LoRA
    (``lora_embedding_A/B``) is refused, or with ``skip_embeddings`` left out with a warning.
    """
    embedding = sorted(
        {
            k.rsplit(".lora_embedding_", 1)[0][len(_PEFT_PREFIX) :]
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
        import warnings

        warnings.warn(message + "; those modules are left out", stacklevel=3)
        tensors = {k: v for k, v in tensors.items() if ".lora_embedding_" not in k}
    out: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    for key, t in tensors.items():
        if not key.startswith(_PEFT_PREFIX):
            raise ValueError(f"{file}: unexpected key {key!r} (expected {_PEFT_PREFIX}...)")
        rest = key[len(_PEFT_PREFIX) :]
        for part in ("lora_A", "lora_B"):
            tail = f".{part}.weight"
            if rest.endswith(tail):
                module = rest[: -len(tail)]
                out[f"{_PEFT_PREFIX}{module}.{part}"] = t
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
    return out, LoRAConfig(**fields)


def _extra_candidates(model: nn.Module, extra: list[str], fmt: str, file: Path) -> list[str]:
    """The model's modules a file's saved whole modules (embed/norm) may go into."""
    names = {n for n, _ in model.named_modules() if n}
    out: list[str] = []
    for module_name in extra:
        if fmt == "peft":
            # peft's rule for modules_to_save: a plain suffix ("norm" also names
            # "input_layernorm"); only modules the file has weights for are taken
            out += [n for n in sorted(names) if n.endswith(module_name) and n not in out]
        elif module_name not in names:
            raise ValueError(
                f"{file}: saved module {module_name!r} does not exist in {type(model).__name__}"
            )
        elif module_name not in out:
            out.append(module_name)
    return out


def _load_extra(model, tensors, candidates: list[str], prefix, file) -> None:
    state_by_module: dict[str, dict[str, torch.Tensor]] = {}
    for full in candidates:
        module = model.get_submodule(full)
        state = {
            k: tensors[f"{prefix}{full}.{k}"]
            for k in module.state_dict()
            if f"{prefix}{full}.{k}" in tensors
        }
        if state:
            state_by_module[full] = state
    for full, state in state_by_module.items():
        module = model.get_submodule(full)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{file}: weights for {full} do not fit the model ({e})") from e
    if state_by_module:
        mark_trainable(model, list(state_by_module))


def _load_layers(model, name, tensors, prefix, file) -> None:
    used: set[str] = set()
    for path, _, layer in iter_adapters(model, name):
        expected = layer.adapter_state()
        state = {}
        for key in expected:
            full = f"{prefix}{path}.{key}"
            if full not in tensors:
                raise ValueError(f"{file}: missing tensor {full!r} for adapter {name!r}")
            state[key] = tensors[full]
            used.add(full)
        try:
            layer.load_adapter_state(state)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{file}: tensors for {path} do not fit ({e})") from e
    leftover = sorted(k for k in tensors if k.startswith(prefix) and k not in used)
    leftover = [k for k in leftover if not _is_extra_key(model, k, prefix)]
    if leftover:
        raise ValueError(
            f"{file}: {len(leftover)} tensor(s) match no adapter module of this model, "
            f"e.g. {leftover[0]!r}"
        )


def _is_extra_key(model, key: str, prefix: str) -> bool:
    """A tensor of a whole saved module (also a nested one: ``mlp.down_proj.weight``)."""
    rest = key[len(prefix) :]
    return any(rest.startswith(m + ".") for m in extra_trainable_modules(model))


# ---------------------------------------------------------------------------------------------
# factors straight from files (analysis without model classes)
# ---------------------------------------------------------------------------------------------


def read_factors(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (B, A)}`` with the scaling folded in (``dW = B @ A``), from files only.

    Reads any directory :func:`save_adapter` writes and any peft LoRA directory, without
    building a model. MixLoRA experts appear as ``"<ffn module>.<proj>.experts.<e>"``.
    """
    directory = Path(path)
    fmt = detect_format(directory)
    if fmt == "mixlora":
        from .io_mixlora import read_mixlora_factors

        return read_mixlora_factors(directory)
    tensors = _read_safetensors(directory / WEIGHTS)
    if fmt == "peft":
        meta = _read_json(directory / PEFT_CONFIG)
        config = _lora_config_from_peft(meta, directory / PEFT_CONFIG)
        tensors, config = _peft_tensors(tensors, config, directory / WEIGHTS, True)
        out = {}
        for module in config.target_modules:
            scale = lora_scaling(*config.rank_for(module), config.use_rslora)
            A = tensors[f"{_PEFT_PREFIX}{module}.lora_A"].float()
            B = tensors[f"{_PEFT_PREFIX}{module}.lora_B"].float()
            out[module] = (B * scale, A)
        return out
    # native: rebuild each layer's factors through its class on a stand-in frozen module
    meta = _read_json(directory / NATIVE_CONFIG)
    try:
        config = AdapterConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{directory / NATIVE_CONFIG}: invalid adapter config ({e})") from e
    from .adapters.base import AdapterLayer

    modules = meta.get("modules") or {}
    if not isinstance(modules, dict):
        raise ValueError(f"{directory / NATIVE_CONFIG}: modules must be a mapping")
    _check_size_fields(config, (directory / WEIGHTS).stat().st_size, directory / NATIVE_CONFIG)
    out = {}
    for module, spec in modules.items():
        state = {
            k[len(f"adapter.{module}.") :]: v
            for k, v in tensors.items()
            if k.startswith(f"adapter.{module}.")
        }
        try:
            _check_spec(config, module, spec, state)
            layer: AdapterLayer = _layer_from_state(config, module, spec, state)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{directory / WEIGHTS}: cannot rebuild {module} ({e})") from e
        out.update({module + suffix: pair for suffix, pair in layer.named_factors().items()})
    return out
