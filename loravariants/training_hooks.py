"""Notice a training loop that skips the adapters' training hooks, and say so once.

Two variants need the loop's help: a COLA chain restarts only when ``lv.on_step_end`` runs after
the optimizer step, and MixLoRA's balance loss trains only when ``lv.aux_loss(model)`` is added
to the loss. A loop that does neither (``transformers.Trainer`` without our callback) trains
something else, silently. This module makes that loud.

How it knows: torch's process-wide optimizer step hook
(``torch.optim.optimizer.register_optimizer_step_post_hook``, an official extension point, not
a patch) runs after every ``optimizer.step()`` of any optimizer, fused or not. When the stepped
optimizer holds a parameter of a model whose layers need a hook, it checks what happened since
the previous step: ``lv.aux_loss`` read at least once (MixLoRA), ``lv.on_step_end`` called
(COLA, checked at the next step, since it runs after this one). The models are held weakly; a
model without such layers is never looked at. The cost is one pass over the stepped
optimizer's parameter list per step.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["refresh_watch", "saw_aux_loss", "saw_step_end"]

_TRAINER_FIX = (
    "under transformers' Trainer or TRL pass "
    "callbacks=[loravariants.integrations.transformers.LoRAVariantsCallback()]"
)


@dataclass(eq=False)
class _Adapter:
    """What one adapter's layers need, and what the loop did since its last optimizer step."""

    label: str  # "adapter 'x' (cola)"
    step_end: bool = False
    aux: list[nn.Module] = field(default_factory=list)
    param_ids: set[int] = field(default_factory=set)
    aux_seen: bool = False
    step_end_seen: bool = False
    stepped: bool = False


@dataclass(eq=False)
class _Watch:
    """One model's adapters that need a hook (by name), and the warnings already given."""

    adapters: dict[str, _Adapter]
    warned: set[str] = field(default_factory=set)


# model -> its watch, outside the model (so pickling and deepcopy of a model are unaffected;
# a copy is not watched); weak keys: a model that is gone is dropped
_WATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_HOOK: list = []  # the one registered optimizer hook's handle


def refresh_watch(model: nn.Module, layers) -> None:
    """(Re)read which of ``model``'s adapter layers need a hook.

    Args:
        model: the model adapters are attached to.
        layers: ``(module path, adapter name, layer)`` for every adapter layer.
    """
    adapters: dict[str, _Adapter] = {}
    for _, name, layer in layers:
        needs_step_end, needs_aux = layer.uses_step_end(), layer.uses_aux_loss()
        if not (needs_step_end or needs_aux):
            continue
        variant = getattr(layer.config, "variant", type(layer).__name__)
        entry = adapters.setdefault(name, _Adapter(f"adapter {name!r} ({variant})"))
        entry.step_end = entry.step_end or needs_step_end
        if needs_aux:
            entry.aux.append(layer)
        entry.param_ids.update(id(p) for p in layer.parameters())
    old: _Watch | None = _WATCHED.get(model)
    if not adapters:
        _WATCHED.pop(model, None)
        return
    _WATCHED[model] = _Watch(adapters, old.warned if old is not None else set())
    if not _HOOK:
        _HOOK.append(register_optimizer_step_post_hook(_after_step))


def _entries(model: nn.Module, name: str | None) -> list[_Adapter]:
    watch = _WATCHED.get(model)
    if watch is None:
        return []
    return list(watch.adapters.values()) if name is None else [watch.adapters.get(name)]


def saw_aux_loss(model: nn.Module, name: str | None = None) -> None:
    """``lv.aux_loss(model, name)`` ran: the extra loss can reach this step."""
    for entry in _entries(model, name):
        if entry is not None:
            entry.aux_seen = True


def saw_step_end(model: nn.Module, name: str | None = None) -> None:
    """``lv.on_step_end(model, ..., name=name)`` ran."""
    for entry in _entries(model, name):
        if entry is not None:
            entry.step_end_seen = True


def _after_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    watches = list(_WATCHED.values())
    if not watches:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for watch in watches:
        for entry in watch.adapters.values():
            if not entry.param_ids & stepped:
                continue
            if entry.aux and not entry.aux_seen and _aux_matters(entry):
                _warn_once(
                    watch,
                    "aux",
                    f"{entry.label} has an extra loss that did not reach this optimizer step: "
                    f"add loravariants.aux_loss(model) to the loss, or {_TRAINER_FIX}",
                )
            if entry.step_end and entry.stepped and not entry.step_end_seen:
                _warn_once(
                    watch,
                    "step_end",
                    f"{entry.label} needs loravariants.on_step_end(model, step, optimizer) "
                    f"after every optimizer step, which did not run: call it, or {_TRAINER_FIX}",
                )
            entry.stepped, entry.aux_seen, entry.step_end_seen = True, False, False


def _aux_matters(entry: _Adapter) -> bool:
    """A zero extra loss (coefficient 0, or no forward yet) changes nothing: no warning."""
    with torch.no_grad():
        for layer in entry.aux:
            loss = layer.aux_loss()
            if loss is not None and float(loss) != 0.0:
                return True
    return False


def _warn_once(watch: _Watch, kind: str, message: str) -> None:
    if kind not in watch.warned:
        watch.warned.add(kind)
        warnings.warn(message, UserWarning, stacklevel=3)
