"""Put adapters into a model, find them again, merge them, and run their training hooks.

Works on any ``nn.Module``: a Hugging Face model or a hand-written one. Adapter state lives in
:class:`~loravariants.adapters.base.AdapterHost` modules that replace the targeted modules in
place; the model's own classes are never patched.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from . import training_hooks
from .adapters.base import (
    AdapterConfig,
    AdapterHost,
    AdapterLayer,
    iter_frozen_modules,
    match_target,
    model_state,
    modules_inside_hosts,
)

__all__ = [
    "attach",
    "detach",
    "adapter_layers",
    "adapter_names",
    "adapter_config",
    "iter_adapters",
    "merge",
    "merge_and_unload",
    "save_merged",
    "unmerge",
    "aux_loss",
    "on_step_end",
    "reset_optimizer_state",
    "set_active_adapters",
    "mark_trainable",
    "extra_trainable_modules",
    "trainable_parameters",
    "TrainableSummary",
]

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
# names an nn.ModuleDict already has as attributes (keys, items, training, forward, ...): a
# host's dict of adapters cannot take them as keys
_RESERVED_NAMES = frozenset(dir(nn.ModuleDict()))


def _configs(model: nn.Module) -> dict[str, AdapterConfig]:
    return model_state(model, create=False).configs


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters attached to ``model``, in attach order."""
    return list(_configs(model))


def adapter_config(model: nn.Module, name: str | None = None) -> AdapterConfig:
    """The config adapter ``name`` was attached with (the only one when ``name`` is None)."""
    return _configs(model)[_resolve_name(model, name)]


def _resolve_name(model: nn.Module, name: str | None) -> str:
    names = adapter_names(model)
    if name is None:
        if len(names) == 1:
            return names[0]
        if not names:
            raise ValueError("the model has no adapters; call loravariants.attach first")
        raise ValueError(f"the model has several adapters {names}: name one")
    if name not in names:
        raise ValueError(f"no adapter named {name!r}; attached: {names}")
    return name


def attach(model: nn.Module, config: AdapterConfig, name: str = "default") -> nn.Module:
    """Wrap the modules ``config`` targets with adapter layers, in place; freeze the rest.

    Several adapters (of any variants) may be attached under different names; all adapter
    parameters stay trainable, every other parameter is frozen except modules marked with
    :func:`mark_trainable`.

    Args:
        model: any ``nn.Module``.
        config: an :class:`~loravariants.adapters.base.AdapterConfig` subclass instance.
        name: adapter name (letters, digits, ``_`` or ``-``; not starting with a digit).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: bad name, name taken, or no module matches ``config.target_modules``.
    """
    _check_new_adapter(model, config, name)
    _wrap_targets(model, config, name, _targets(model, config))
    model_state(model).configs[name] = config
    _refresh_requires_grad(model)
    _refresh_model_hooks(model)
    return model


def _check_new_adapter(model: nn.Module, config: AdapterConfig, name: str) -> None:
    """A config object, a free and valid name, and no target inside a module a host wraps.

    Raises:
        TypeError: ``config`` is not an :class:`AdapterConfig`.
        ValueError: a bad or taken name, or a target inside another adapter's whole module.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"adapter name must match {_NAME_RE.pattern} (no dots), got {name!r}")
    if name in _RESERVED_NAMES:
        raise ValueError(
            f"adapter name {name!r} is reserved (an attribute of nn.ModuleDict); choose another"
        )
    if name in _configs(model):
        raise ValueError(f"an adapter named {name!r} is already attached")
    hidden = [p for p in modules_inside_hosts(model) if match_target(p, config.target_modules)]
    if hidden:
        raise ValueError(
            f"target_modules={config.target_modules!r} matches {hidden[0]!r}, which is inside a "
            "module another adapter already wraps as a whole (MixLoRA's FFN); a module and its "
            "submodules cannot both carry adapters"
        )


def _targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """``config.select(model)``; none found is an error that names what the model has.

    Raises:
        ValueError: no module matches (naming the matches that are not ``nn.Linear``, or the
            model's linear layers, with a hint when a regex was meant as a name).
    """
    targets = config.select(model)
    if targets:
        return targets
    other = [
        f"{p} ({type(m).__name__})"
        for p, m in iter_frozen_modules(model)
        if p and match_target(p, config.target_modules) and not isinstance(m, nn.Linear)
    ]
    if other:
        raise ValueError(
            f"target_modules={config.target_modules!r} matches only modules that are not "
            f"nn.Linear, e.g. {other[:3]}; adapters wrap nn.Linear layers only "
            "(GPT-2's Conv1D is not supported)"
        )
    linears = [p for p, m in iter_frozen_modules(model) if isinstance(m, nn.Linear)]
    linear_names = sorted({p.rsplit(".", 1)[-1] for p in linears})
    hint = ""
    if isinstance(config.target_modules, str):
        hint = (
            " (a string is a regular expression that must match the whole module name, "
            f"as in peft, e.g. {(linears or [''])[0]!r}; to match by name pass a list: "
            f"[{config.target_modules!r}])"
        )
    raise ValueError(
        f"target_modules={config.target_modules!r} matches no module of "
        f"{type(model).__name__}; its linear layers are named {linear_names}{hint}"
    )


def _wrap_targets(
    model: nn.Module, config: AdapterConfig, name: str, targets: list[tuple[str, nn.Module]]
) -> None:
    """Host one new layer per target under ``name`` (a module not yet hosted gets a host in
    its place), then ``config.on_attached``; any failure (an allocation, a bad layer, Ctrl-C)
    leaves the model as it was."""
    layers: dict[str, AdapterLayer] = {}
    hosts: list[tuple[str, AdapterHost]] = []  # every host touched, to undo a failed attach
    try:
        for path, module in targets:
            # a new layer follows the model's mode, so dropout is off when attached in eval()
            layer = config.create_layer(path, module).train(module.training)
            host = model.get_submodule(path) if path else model
            if not isinstance(host, AdapterHost):
                if not path:
                    raise ValueError("cannot wrap the model itself; target one of its submodules")
                host = AdapterHost(module)
                parent_path, _, child = path.rpartition(".")
                parent = model.get_submodule(parent_path) if parent_path else model
                setattr(parent, child, host)
            hosts.append((path, host))
            host.add(name, layer)
            layers[path] = layer
        config.on_attached(layers)
    except BaseException:
        for path, host in reversed(hosts):
            if name in host.adapters:
                _remove_from_host(model, path, host, name)
            else:
                _unwrap_if_empty(model, path, host)
        raise


# the writer of an attached model's save_pretrained: loravariants.io.save_pretrained, which
# registers itself on import (io imports this module, not the other way round)
SAVE_PRETRAINED: list = []


class _SavePretrained:
    """``model.save_pretrained`` while adapters are attached: the adapters, as peft's models do
    (:func:`loravariants.io.save_pretrained`; a merged plain checkpoint: :func:`save_merged`).

    An object holding its model, not a closure: ``copy.deepcopy`` and pickling give the copy
    one that saves the copy.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory, **kwargs) -> None:
        SAVE_PRETRAINED[0](self.model, save_directory, **kwargs)


# the tensor that marks a Trainer-resumable file (io.save_pretrained writes it)
RESUME_SENTINEL = "loravariants.adapter_checkpoint"


def _refresh_model_hooks(model: nn.Module) -> None:
    """Per instance, never the class: ``save_pretrained`` writes the adapters while any are
    attached; ``load_state_dict`` takes a file with :data:`RESUME_SENTINEL` (what Trainer's
    resume feeds it); the training-hook watch (:mod:`.training_hooks`) is up to date."""
    names = adapter_names(model)
    if names and callable(getattr(type(model), "save_pretrained", None)):
        model.__dict__["save_pretrained"] = _SavePretrained(model)
    else:
        model.__dict__.pop("save_pretrained", None)
    state = model_state(model)
    if names and not state.resume_hooks:
        pre = getattr(model, "register_load_state_dict_pre_hook", None)  # torch >= 2.5
        if pre is not None:
            pre(_resume_pre_hook)
        else:
            model._register_load_state_dict_pre_hook(_resume_pre_hook, with_module=True)
        model.register_load_state_dict_post_hook(_resume_post_hook)
        state.resume_hooks = True  # once per model (copies keep hooks and flag)
    training_hooks.refresh_watch(model, list(iter_adapters(model)) if names else [])


@torch.no_grad()
def _resume_pre_hook(module, state_dict, prefix, *_args) -> None:
    """``model.load_state_dict(file)`` of a file :func:`loravariants.io.save_pretrained` wrote:
    each adapter layer takes its tensors through ``load_adapter_state`` (COLA's chain changes
    shape and is folded into the frozen weight there, which plain loading cannot do); marked
    modules (embeddings, norms) load the plain way. Anything else loads as torch does."""
    if prefix + RESUME_SENTINEL not in state_dict:
        return
    del state_dict[prefix + RESUME_SENTINEL]
    for path, name, layer in iter_adapters(module):
        start = f"{prefix}{path}.adapters.{name}."
        keys = [k for k in state_dict if k.startswith(start)]
        if not keys:
            raise ValueError(
                f"the checkpoint holds no tensors for adapter {name!r} at {path}: it was saved "
                "from a model with other adapters; attach the ones it was trained with"
            )
        layer.load_adapter_state({k[len(start) :]: state_dict.pop(k) for k in keys})
    model_state(module).resuming = True


def _resume_post_hook(module, incompatible_keys) -> None:
    """The frozen base is not in an adapter checkpoint: not a missing key."""
    state = model_state(module, create=False)
    if state.resuming:
        state.resuming = False
        incompatible_keys.missing_keys.clear()


def _remove_from_host(model: nn.Module, path: str, host: AdapterHost, name: str) -> None:
    """Drop adapter ``name`` from the host at ``path``; a host left empty gives its frozen
    module back to the model."""
    del host.adapters[name]
    host._tell_shared()
    _unwrap_if_empty(model, path, host)


def _unwrap_if_empty(model: nn.Module, path: str, host: AdapterHost) -> None:
    """A host that holds no adapter gives its frozen module back to the model at ``path``."""
    if not host.adapters:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, host.base_layer)


def detach(model: nn.Module, name: str | None = None) -> nn.Module:
    """Remove adapter ``name`` (unmerging it first); a host left empty gives its module back."""
    name = _resolve_name(model, name)
    for path, host in list(_hosts(model)):
        if name not in host.adapters:
            continue
        layer = host.adapters[name]
        if layer.merged:
            layer.unmerge()
        layer.on_detach()
        _remove_from_host(model, path, host, name)
    del _configs(model)[name]
    _refresh_requires_grad(model)
    _refresh_model_hooks(model)
    return model


def _hosts(model: nn.Module) -> Iterator[tuple[str, AdapterHost]]:
    for path, module in model.named_modules():
        if isinstance(module, AdapterHost):
            yield path, module


def iter_adapters(
    model: nn.Module, name: str | None = None
) -> Iterator[tuple[str, str, AdapterLayer]]:
    """Yield ``(module name, adapter name, layer)`` for every adapter layer (of ``name`` only,
    when given).

    Raises:
        ValueError: ``name`` is not attached (so ``merge``/``aux_loss`` of a typo fail loudly).
    """
    if name is not None:
        _resolve_name(model, name)
    for path, host in _hosts(model):
        for adapter_name, layer in host.adapters.items():
            if name is None or adapter_name == name:
                yield path, adapter_name, layer


def adapter_layers(model: nn.Module, name: str | None = None) -> dict[str, AdapterLayer]:
    """``{module name: adapter layer}``.

    With ``name`` given, or when only one adapter is attached, the keys are the names of the
    wrapped modules (``"model.layers.0.self_attn.q_proj"``). With several adapters and no
    ``name``, every layer is listed under its own qualified name
    (``"model.layers.0.self_attn.q_proj.adapters.<name>"``).
    """
    if name is None and len(adapter_names(model)) > 1:
        return {f"{p}.adapters.{n}": layer for p, n, layer in iter_adapters(model)}
    name = _resolve_name(model, name) if adapter_names(model) else None
    return {p: layer for p, _, layer in iter_adapters(model, name)}


def set_active_adapters(model: nn.Module, names: str | Iterable[str] | None) -> None:
    """Apply only ``names`` in forward (``None`` = all attached, ``[]`` = none: the base)."""
    if isinstance(names, str):
        names = [names]
    if names is not None:
        names = list(names)
        for n in names:
            _resolve_name(model, n)
    for _, host in _hosts(model):
        host.active_adapters = names


def _layers_to_merge(model: nn.Module, name: str | None, skip_unmergeable: bool):
    layers = [(p, layer) for p, _, layer in iter_adapters(model, name)]
    bad = [p for p, layer in layers if not layer.mergeable]
    if bad and not skip_unmergeable:
        raise ValueError(
            f"{len(bad)} adapter layer(s) cannot be merged because their update depends on the "
            f"input (e.g. {bad[0]}); pass skip_unmergeable=True to merge the others"
        )
    return [layer for _, layer in layers if layer.mergeable]


def merge(model: nn.Module, name: str | None = None, skip_unmergeable: bool = False) -> nn.Module:
    """Fold mergeable adapters (all, or ``name``) into the frozen weights: ``W <- W + dW``.

    The adapters stay attached (and are skipped in forward) so :func:`unmerge` can undo it.
    In bf16/fp16 each merge and unmerge rounds ``W``, so merge/unmerge cycles drift the frozen
    weights (about 1e-3 after five bf16 cycles); a warning says so. For an export use
    :func:`save_merged`, which restores the exact weights afterwards.
    """
    layers = _layers_to_merge(model, name, skip_unmergeable)
    low = sorted(
        {
            str(layer.base.weight.dtype)
            for layer in layers
            if not layer.merged and layer.base.weight.dtype in (torch.bfloat16, torch.float16)
        }
    )
    if low:
        warnings.warn(
            f"merging into {'/'.join(low)} weights rounds them: merge/unmerge cycles drift the "
            "frozen weights; keep a float32 copy, or use lv.save_merged for an export",
            stacklevel=2,
        )
    for layer in layers:
        layer.merge()
    return model


def merge_and_unload(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold adapters (all, or ``name``) into the frozen weights and remove them (peft's name).

    The model is left as a plain model: each wrapped module is back in its place with
    ``W0 + dW`` as its weight (``dW``: the layer's whole :meth:`delta_weight`, COLA's chain
    included), so ``save_pretrained`` writes a checkpoint transformers loads without
    loravariants. Modules trained with the adapter (embeddings, norms) keep their trained
    weights; a context extension stays in the config. In bf16/fp16 the sum is rounded once.

    Raises:
        ValueError: an adapter layer cannot be merged (MixLoRA routes per token); nothing is
            changed then.
    """
    names = [_resolve_name(model, name)] if name is not None else adapter_names(model)
    for n in names:
        _layers_to_merge(model, n, skip_unmergeable=False)  # refuse before any change
    with torch.no_grad():
        for n in names:
            for path, host in list(_hosts(model)):
                if n not in host.adapters:
                    continue
                layer = host.adapters[n]
                if layer.merged:
                    layer.unmerge()
                delta = layer.delta_weight()  # the whole update (COLA: every link)
                layer.on_detach()  # W back to W0 (COLA takes its folded links out)
                W = layer.base.weight
                W += delta.to(device=W.device, dtype=W.dtype)
                _remove_from_host(model, path, host, n)
            del _configs(model)[n]
    _refresh_requires_grad(model)
    _refresh_model_hooks(model)
    return model


def save_merged(model: nn.Module, path, **save_kwargs):
    """Write a plain transformers checkpoint of ``model`` with every adapter merged in.

    Works on a copy (the model keeps its adapters and exact weights; the copy needs the
    model's memory once more: for a model that does not fit twice, call
    :func:`merge_and_unload` and then ``save_pretrained``). Load the result with
    ``AutoModelForCausalLM.from_pretrained(path)``; neither loravariants nor peft is needed.

    Args:
        model: a transformers model whose adapters are all mergeable (not MixLoRA).
        path: the output directory.
        **save_kwargs: passed to ``save_pretrained``.

    Returns:
        ``path``.

    Raises:
        ValueError: an unmergeable adapter, or a model without ``save_pretrained``.
    """
    if not callable(getattr(type(model), "save_pretrained", None)):
        raise ValueError(f"{type(model).__name__} has no save_pretrained; use torch.save")
    _layers_to_merge(model, None, skip_unmergeable=False)
    plain = merge_and_unload(copy.deepcopy(model))
    plain.save_pretrained(path, **save_kwargs)
    return path


def unmerge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Undo :func:`merge`: ``W <- W - dW`` for every merged adapter layer."""
    for _, _, layer in iter_adapters(model, name):
        if layer.merged:
            layer.unmerge()
    return model


def aux_loss(model: nn.Module, name: str | None = None) -> torch.Tensor:
    """Sum of the adapters' extra losses from the last forward (MixLoRA's balance loss).

    Returns a scalar tensor; ``0.`` when no adapter has one.

    Raises:
        RuntimeError: called with autograd on, for a layer in training mode with trainable
            parameters whose last forward ran without autograd. That is what reentrant
            gradient checkpointing (``use_reentrant=True``) does: the forward runs under
            ``no_grad`` and is recomputed only during backward, so the loss would silently add
            nothing to the gradient. Non-reentrant checkpointing works.
    """
    total: torch.Tensor | None = None
    training_hooks.saw_aux_loss(model, name)
    for path, _, layer in iter_adapters(model, name):
        loss = layer.aux_loss()
        if loss is None:
            continue
        if (
            torch.is_grad_enabled()
            and not loss.requires_grad
            and layer.training
            and any(p.requires_grad for p in layer.parameters())
        ):
            raise RuntimeError(
                f"the balance loss of {path} has no gradient: its forward ran without autograd "
                "(reentrant gradient checkpointing, or torch.no_grad). Use non-reentrant "
                "checkpointing: model.gradient_checkpointing_enable("
                'gradient_checkpointing_kwargs={"use_reentrant": False})'
            )
        total = loss if total is None else total + loss
    return torch.zeros(()) if total is None else total


def on_step_end(
    model: nn.Module,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    name: str | None = None,
) -> list[nn.Parameter]:
    """Run every adapter layer's ``on_step_end(step)`` after an optimizer step.

    Parameters the layers return (a COLA link just restarted) get their optimizer state reset
    when ``optimizer`` is given.

    Returns:
        The parameters whose state was (or must be) reset.
    """
    reset: list[nn.Parameter] = []
    training_hooks.saw_step_end(model, name)
    for _, _, layer in iter_adapters(model, name):
        params = layer.on_step_end(step)
        if params:
            reset.extend(params)
    if optimizer is not None and reset:
        reset_optimizer_state(optimizer, reset)
    return reset


def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
    """Forget the optimizer's state (Adam moments, step count) for ``params``."""
    for p in params:
        optimizer.state.pop(p, None)


def mark_trainable(model: nn.Module, module_names: Iterable[str]) -> list[str]:
    """Make whole modules trainable and save them with the adapters (LongLoRA's embed/norm).

    Args:
        model: the model.
        module_names: qualified module names (e.g. ``"model.embed_tokens"``).

    Returns:
        All module names marked so far.
    """
    extra = list(model_state(model).extra_trainable)
    for module_name in module_names:
        try:
            model.get_submodule(module_name)
        except AttributeError as e:
            raise ValueError(f"no module named {module_name!r} in {type(model).__name__}") from e
        if module_name not in extra:
            extra.append(module_name)
    model_state(model).extra_trainable = extra
    _refresh_requires_grad(model)
    return extra


def _restore_trainable_modules(model: nn.Module, module_names: list[str]) -> None:
    """Set the marked modules back to exactly ``module_names`` (a failed load's rollback)."""
    model_state(model).extra_trainable = list(module_names)
    _refresh_requires_grad(model)


def extra_trainable_modules(model: nn.Module) -> list[str]:
    """Module names marked with :func:`mark_trainable`."""
    return list(model_state(model, create=False).extra_trainable)


def _refresh_requires_grad(model: nn.Module) -> None:
    """Adapter parameters and marked modules train; everything else is frozen."""
    trainable: set[int] = set()
    for _, _, layer in iter_adapters(model):
        trainable.update(id(p) for p in layer.parameters())
    for module_name in extra_trainable_modules(model):
        trainable.update(id(p) for p in model.get_submodule(module_name).parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


@dataclass(frozen=True)
class TrainableSummary:
    """Trainable vs total parameter counts."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} "
            f"|| trainable%: {self.percent:.4f}"
        )


def trainable_parameters(model: nn.Module) -> TrainableSummary:
    """Count trainable and all parameters (each shared tensor once)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return TrainableSummary(trainable, total)
