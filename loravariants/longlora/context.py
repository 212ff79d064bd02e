"""Context extension for LongLoRA: RoPE position interpolation plus trainable embed/norm.

Linear position interpolation (Chen et al. 2023) divides every position by
``factor = target_length / original_length``, so a model trained on ``L`` tokens sees
positions ``0 .. L`` again when it reads ``factor * L`` tokens::

    rotary angle(p) = p * inv_freq          ->   (p / factor) * inv_freq

LongLoRA's scripts round the factor up to an integer (``math.ceil(target / original)`` in
``fine-tune.py``, so 256 -> 1000 tokens gives 4.0, not 3.90625); ``factor_rounding="ceil"``
does the same, the default ``"exact"`` keeps ``target / original``.

transformers expresses this in ``config.rope_parameters`` (``rope_type="linear"``,
``factor``); NTK-aware ``"dynamic"`` and ``"yarn"`` use the same field. LongLoRA also trains the
input embeddings and every norm layer ("LoRA+"); :func:`extend_context` marks them with
:func:`loravariants.inject.mark_trainable` so they are trained and saved with the adapter.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable
from typing import Any

from torch import nn

from ..inject import mark_trainable
from ..validation import check_range

METHODS = ("linear", "dynamic", "yarn")
TRAINABLE = ("embed", "norm")
#: ``"exact"``: factor = target / L; ``"ceil"``: rounded up to an integer, as LongLoRA does.
FACTOR_ROUNDINGS = ("exact", "ceil")

__all__ = [
    "FACTOR_ROUNDINGS",
    "METHODS",
    "TRAINABLE",
    "MAX_FACTOR",
    "apply_extension",
    "check_extension",
    "describe_extension",
    "extend_context",
    "trainable_module_names",
    "validate_extension",
]


def _rope_dicts(config: Any) -> list[dict]:
    """The RoPE parameter dict(s) of a config: one, or one per layer type."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        raise ValueError(
            f"{type(config).__name__} has no rope_parameters: extend_context needs a RoPE model"
        )
    if "rope_type" in params:
        return [params]
    nested = [p for p in params.values() if isinstance(p, dict) and "rope_type" in p]
    if not nested:
        raise ValueError(f"unrecognised rope_parameters {params!r}")
    return nested


def _original_length(config: Any, params: dict) -> tuple[int, float]:
    """(pre-training context length, current scaling factor) read from a RoPE dict.

    Assumes transformers' convention: with a ``"linear"`` factor set,
    ``max_position_embeddings`` is the already-extended length, so ``L = max_pos / factor``.
    """
    rope_type = params.get("rope_type", "default")
    length = config.max_position_embeddings
    if rope_type == "default":
        return length, 1.0
    if rope_type == "linear":
        factor = float(params["factor"])
        return round(length / factor), factor
    if rope_type == "dynamic":  # transformers' dynamic NTK reads max_position_embeddings as L
        return length, float(params["factor"])
    if rope_type == "yarn":
        return int(params["original_max_position_embeddings"]), float(params["factor"])
    raise ValueError(
        f"rope_parameters['rope_type'] is {rope_type!r}; extend_context handles models with "
        f"'default' RoPE or one of {METHODS}"
    )


def _rotary_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every rotary-embedding module.

    A rotary module has a ``rope_type`` and an ``inv_freq`` buffer, or one ``<layer
    type>_inv_freq`` buffer per layer type (Gemma3-style per-layer-type RoPE).
    """
    return [
        (name, module)
        for name, module in model.named_modules()
        if hasattr(module, "rope_type")
        and any(
            b == "inv_freq" or b.endswith("_inv_freq")
            for b, _ in module.named_buffers(recurse=False)
        )
    ]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def _rebuild_rotary(model: nn.Module, rotaries: list[tuple[str, nn.Module]]) -> None:
    """Re-create each rotary module from its (updated) config, on its device."""
    fresh = []
    for name, module in rotaries:
        device = next(module.buffers(recurse=False)).device
        fresh.append((name, type(module)(config=module.config).to(device)))
    for name, module in fresh:
        _set_submodule(model, name, module)


def trainable_module_names(model: nn.Module, trainable: Iterable[str]) -> list[str]:
    """Qualified names of the input embedding (not lm_head) and/or every norm module."""
    wanted = set(trainable)
    unknown = wanted - set(TRAINABLE)
    if unknown:
        raise ValueError(
            f"trainable must be a subset of {TRAINABLE}, got unknown {sorted(unknown)}"
        )
    names = []
    if "embed" in wanted:
        embed = model.get_input_embeddings()
        names += [n for n, m in model.named_modules() if m is embed][:1]
    if "norm" in wanted:
        names += [
            n
            for n, m in model.named_modules()
            if "norm" in type(m).__name__.lower() and any(True for _ in m.parameters(recurse=False))
        ]
    return names


def extend_context(
    model: nn.Module,
    target_length: int,
    method: str = "linear",
    trainable: Iterable[str] = TRAINABLE,
    original_length: int | None = None,
    factor_rounding: str = "exact",
) -> nn.Module:
    """Extend a RoPE model's context to ``target_length`` tokens, in place.

    Sets ``config.rope_parameters`` to ``method`` with ``factor = target_length / L``
    (``L``: the pre-training context; ``factor_rounding="ceil"``: ``ceil(target_length / L)``,
    LongLoRA's rounding), sets ``max_position_embeddings = L · factor`` (``= target_length``
    unrounded; ``"dynamic"`` keeps ``L`` there: transformers' dynamic NTK reads it as the
    pre-training length and scales beyond it), rebuilds the rotary embedding modules so the
    change takes effect, and marks the input embeddings and/or all norm modules trainable
    (LongLoRA's "LoRA+"; lm_head stays frozen). Per-layer-type RoPE (Gemma3: one dict per
    layer type in ``rope_parameters``) is supported; every layer type gets the same factor.

    ``L`` is read from the config unless ``original_length`` is given. The convention assumed
    is transformers': for an unscaled model ``L = max_position_embeddings``; with a
    ``"linear"`` factor set, ``max_position_embeddings`` is the already-extended length, so
    ``L = max_position_embeddings / factor`` (``"dynamic"``: ``L = max_position_embeddings``;
    ``"yarn"``: ``L = original_max_position_embeddings``). Calling it again on a model it
    extended therefore re-scales from ``L``. Checkpoints extended like LongLoRA's
    ``fine-tune.py`` (linear factor set, ``max_position_embeddings`` left at ``L``) break this
    convention: pass ``original_length=L`` for them.

    Args:
        model: a transformers RoPE model (Llama, Mistral, Qwen2, Gemma3, ...).
        target_length: new context length in tokens; must exceed the current context.
        method: ``"linear"`` (position interpolation, LongLoRA's choice), ``"dynamic"``
            (NTK-aware) or ``"yarn"``.
        trainable: any of ``"embed"``, ``"norm"``; ``()`` marks nothing.
        original_length: the model's native (pre-training) context ``L``; ``None`` reads it
            from the config as described above. Also required when the layer types'
            RoPE parameters imply different ``L``.
        factor_rounding: ``"exact"`` (default): ``factor = target_length / L``; ``"ceil"``:
            rounded up to an integer, as LongLoRA's scripts do (``fine-tune.py``:
            ``math.ceil(model_max_length / orig_ctx_len)``); the model then covers
            ``L · factor >= target_length`` positions, and ``max_position_embeddings`` says so.

    Returns:
        The same model.

    Raises:
        ValueError: unknown ``method``/``trainable``/``factor_rounding``, ``target_length`` not
            above the
            current context, ``original_length`` below 1, a model without RoPE parameters or
            rotary module, or layer types with different ``L`` and no ``original_length``.
            Nothing is changed on any error (the config is restored if rebuilding fails).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if factor_rounding not in FACTOR_ROUNDINGS:
        raise ValueError(
            f"factor_rounding must be one of {FACTOR_ROUNDINGS}, got {factor_rounding!r}"
        )
    if isinstance(trainable, str):
        trainable = (trainable,)
    trainable = tuple(trainable)
    names = trainable_module_names(model, trainable)  # validates before anything changes
    if isinstance(target_length, bool) or not isinstance(target_length, int):
        raise ValueError(f"target_length must be an int, got {target_length!r}")
    if original_length is not None:
        check_range("original_length", original_length, low=1, integer=True)
    config = model.config.get_text_config(decoder=True)
    dicts = _rope_dicts(config)
    readings = [_original_length(config, params) for params in dicts]
    original = original_length if original_length is not None else _one_length(model, readings)
    current = max(round(original * factor) for _, factor in readings)
    if target_length <= current:
        raise ValueError(
            f"target_length must exceed the current context of {current} tokens, "
            f"got {target_length}"
        )
    rotaries = _rotary_modules(model)
    if not rotaries:
        raise ValueError(f"no rotary embedding module found in {type(model).__name__}")
    factor, extended = _scale(target_length, original, factor_rounding)
    _set_rope(model, dicts, rotaries, method, factor, original, extended)
    if names:
        mark_trainable(model, names)
    return model


def _one_length(model: nn.Module, readings: list[tuple[int, float]]) -> int:
    """The pre-training length ``L`` the layer types' RoPE parameters agree on."""
    lengths = sorted({length for length, _ in readings})
    if len(lengths) > 1:
        raise ValueError(
            f"{type(model).__name__}: the layer types' rope_parameters imply different "
            f"pre-training lengths {lengths}; pass original_length= to rescale all from one"
        )
    return lengths[0]


def _scale(target_length: int, original: int, factor_rounding: str) -> tuple[float, int]:
    """``(factor, positions covered)`` from ``original`` to ``target_length`` tokens."""
    if factor_rounding == "ceil":  # LongLoRA: float(math.ceil(target / original))
        factor = float(math.ceil(target_length / original))
        return factor, round(original * factor)
    return target_length / original, target_length


def _set_rope(
    model: nn.Module,
    dicts: list[dict],
    rotaries: list[tuple[str, nn.Module]],
    method: str,
    factor: float,
    original: int,
    extended: int,
) -> None:
    """Write ``method`` x ``factor`` into every RoPE dict of the text config (keeping its
    ``rope_theta`` and ``partial_rotary_factor``) and rebuild the rotary modules; on any error
    the config and modules are put back as they were."""
    config = model.config.get_text_config(decoder=True)
    saved = [copy.deepcopy(params) for params in dicts]
    saved_max = config.max_position_embeddings
    try:
        for params in dicts:
            theta = params.get("rope_theta")
            partial = params.get("partial_rotary_factor")
            params.clear()
            params.update(rope_type=method, factor=factor)
            if theta is not None:
                params["rope_theta"] = theta
            if partial is not None:
                params["partial_rotary_factor"] = partial
            if method == "yarn":
                params["original_max_position_embeddings"] = original
        config.max_position_embeddings = original if method == "dynamic" else extended
        _rebuild_rotary(model, rotaries)
    except BaseException:
        for params, old in zip(dicts, saved, strict=True):
            params.clear()
            params.update(old)
        config.max_position_embeddings = saved_max
        for name, module in rotaries:
            _set_submodule(model, name, module)
        raise


# ---------------------------------------------------------------------------------------------
# the extension an adapter was trained with, saved next to it
# ---------------------------------------------------------------------------------------------


def describe_extension(model: nn.Module) -> dict[str, Any] | None:
    """The context extension a model carries, as saved with an adapter; None when unextended.

    Read from the config (so it also describes a checkpoint extended elsewhere): a RoPE of type
    ``"linear"``, ``"dynamic"`` or ``"yarn"`` gives ``{"method", "factor", "original_length",
    "target_length"}``; ``"default"`` RoPE, other RoPE types and models without RoPE give None.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return None
    config = config.get_text_config(decoder=True)
    try:
        params = _rope_dicts(config)[0]
    except ValueError:
        return None
    if params.get("rope_type") not in METHODS:
        return None
    original, factor = _original_length(config, params)
    return {
        "method": params["rope_type"],
        "factor": float(factor),
        "original_length": int(original),
        "target_length": int(round(original * factor)),
    }


def _phrase(ext: dict[str, Any] | None) -> str:
    if not ext:
        return "the native context (no extension)"
    return (
        f"context extended to {ext['target_length']} tokens ({ext['method']} x{ext['factor']:g} "
        f"from {ext['original_length']})"
    )


#: the largest context factor a saved extension may carry; LongLoRA goes to 32x (Llama-2 7B,
#: 4k -> 100k tokens: 25x) and YaRN reports up to 128x, so more is a broken file
MAX_FACTOR = 1024.0


_EXTENSION_KEYS = ("method", "factor", "original_length", "target_length")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_extension(saved: Any, source: str) -> dict[str, Any] | None:
    """A saved context extension (as :func:`describe_extension` writes it), checked.

    Args:
        saved: the value read from an adapter's config (None: not extended).
        source: the file it was read from, for messages.

    Returns:
        ``{"method", "factor", "original_length", "target_length"}`` with checked types, or
        None.

    Raises:
        ValueError: naming ``source``, the field and its value: not a mapping, a missing or
            unknown key, an unknown method, lengths that are not positive integers, a target
            not above the original (a shrinking "extension"), a factor outside
            ``(1, MAX_FACTOR]`` or one that does not give ``target_length``.
    """
    if saved is None:
        return None
    if not isinstance(saved, dict) or set(saved) != set(_EXTENSION_KEYS):
        raise ValueError(
            f"{source}: the saved context extension must be a mapping with exactly the keys "
            f"{list(_EXTENSION_KEYS)}, got {_short(saved)}"
        )
    method, factor = saved["method"], saved["factor"]
    original, target = saved["original_length"], saved["target_length"]
    if method not in METHODS:
        raise ValueError(
            f"{source}: context extension method must be one of {METHODS}, got {_short(method)}"
        )
    for key, value in (("original_length", original), ("target_length", target)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{source}: context extension {key} must be a positive integer, got {_short(value)}"
            )
    if target <= original:
        raise ValueError(
            f"{source}: context extension target_length {target} is not above "
            f"original_length {original}: an extension never shrinks the context"
        )
    if (
        isinstance(factor, bool)
        or not isinstance(factor, (int, float))
        or not 1.0 < factor <= MAX_FACTOR
        or round(original * factor) != target
    ):
        raise ValueError(
            f"{source}: context extension factor must be a number in (1, {MAX_FACTOR:g}] with "
            f"original_length x factor = target_length ({original} -> {target}), "
            f"got {_short(factor)}"
        )
    return {
        "method": method,
        "factor": float(factor),
        "original_length": original,
        "target_length": target,
    }


def check_extension(
    model: nn.Module, saved: Any, source: str, recorded: bool = True
) -> dict[str, Any] | None:
    """Compare an adapter's saved context extension with the model it is loaded into.

    Args:
        model: the model the adapter goes into.
        saved: :func:`describe_extension` of the model the adapter was trained on.
        source: the adapter file, for messages.
        recorded: False when the file predates the record (or comes from elsewhere); then an
            absent ``saved`` is not checked.

    Returns:
        The extension to apply with :func:`apply_extension` (model unextended, adapter
        extended), else None.

    Raises:
        ValueError: ``saved`` is malformed (:func:`validate_extension`), or the model carries
            a different extension than the adapter was trained with (or has another native
            context), in one line that says what to load it into.
    """
    saved = validate_extension(saved, source)
    current = describe_extension(model)
    if saved is None and not recorded:
        return None
    if saved is not None and current is None:
        native = _native_length(model)
        if native is not None and native != saved["original_length"]:
            raise ValueError(
                f"{source}: the adapter was trained with {_phrase(saved)}, but this model's "
                f"native context is {native} tokens; load it into the base it was trained on"
            )
        return saved
    same = (saved is None) == (current is None) and (
        saved is None
        or (
            saved["method"] == current["method"]
            and saved["original_length"] == current["original_length"]
            and abs(saved["factor"] - current["factor"]) <= 1e-6 * saved["factor"]
        )
    )
    if not same:
        raise ValueError(
            f"{source}: the adapter was trained with {_phrase(saved)}, but the model has "
            f"{_phrase(current)}; load it into the un-extended base model (the saved extension "
            "is then applied) or one extended the same way"
        )
    return None


def _native_length(model: nn.Module) -> int | None:
    """The context length of an unextended RoPE model (None: no such config)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return None
    length = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    return length if isinstance(length, int) else None


def apply_extension(model: nn.Module, saved: dict[str, Any], source: str = "adapter") -> None:
    """Apply a saved context extension to an unextended model (no module is marked trainable),
    with a warning that says so.

    Raises:
        ValueError: the extension is malformed or cannot be applied to ``model``, naming
            ``source``; the model is left unchanged (:func:`extend_context`).
    """
    saved = validate_extension(saved, source)
    try:
        extend_context(
            model,
            saved["target_length"],
            method=saved["method"],
            trainable=(),
            original_length=saved["original_length"],
        )
    except ValueError as e:
        raise ValueError(f"{source}: cannot apply the saved context extension ({e})") from e
    warnings.warn(
        f"{source}: applied the adapter's {_phrase(saved)} to the model, as in training",
        stacklevel=3,
    )
