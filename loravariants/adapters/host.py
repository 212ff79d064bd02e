"""The host: replaces a frozen module in the model and runs its named adapters.

``host(x) = base(x) + sum_{active adapters a} a.update(x, ctx)``; the frozen computation runs
once for all adapters (see :mod:`loravariants.adapters.base` for the adapter layer's side),
and :func:`route_rows` says which batch rows each adapter applies to.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["AdapterHost", "route_rows", "rows_by_adapter"]


# The routings `route_rows` set, innermost last, as ``(host ids or None for every model, rows)``.
# A ContextVar, not a module global: each thread (and asyncio task) sees only its own, so two
# threads routing different rows, through one model or two, never read each other's.
_ROUTES: contextvars.ContextVar[tuple[tuple[frozenset[int] | None, dict], ...]] = (
    contextvars.ContextVar("loravariants_route_rows", default=())
)


_PEFT_REFUSAL = (
    "peft cannot wrap a module that already carries loravariants adapters: use one library "
    "per model (train LoRA with lv.attach(model, LoRAConfig(...)); lv.save_adapter(model, "
    "path, format='peft') writes peft's format), or remove ours first with "
    "lv.merge_and_unload(model) or lv.detach(model)"
)


class AdapterHost(nn.Module):
    """Holds one frozen module and any number of named adapter layers for it.

    ``host(x) = base(x) + sum_a update_a(x)``; with :func:`route_rows` active, adapter ``a``
    only updates its own batch rows. The frozen computation runs once for the whole batch.

    Attributes:
        base_layer: the frozen module (registered here, once).
        adapters: ``nn.ModuleDict`` adapter name -> :class:`AdapterLayer`.
        active_adapters: names applied in forward (default: all).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] | None = None  # None = all

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # submodules live here: base_layer, adapters
        except AttributeError:
            # peft's get_peft_model on a module we already wrap: it probes attributes a host
            # lacks (first `_hf_tp_plan`) and, failing, raises deep in its dispatch with the
            # whole module tree in the message. A probe from peft's code gets one line instead.
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller == "peft" or caller.startswith("peft."):
                raise ValueError(_PEFT_REFUSAL) from None
            raise

    def add(self, name: str, layer: nn.Module) -> None:
        """Host ``layer`` (an :class:`~loravariants.adapters.base.AdapterLayer`) as ``name``."""
        if name in self.adapters:
            raise ValueError(f"adapter name {name!r} already attached here")
        if self.adapters:
            first = next(iter(self.adapters.values()))
            if type(first).base_forward is not type(layer).base_forward:
                raise ValueError(
                    f"{type(layer).__name__} cannot share a module with {type(first).__name__}"
                )
        self.adapters[name] = layer
        self._tell_shared()

    def _tell_shared(self) -> None:
        shared = len(self.adapters) > 1
        for layer in self.adapters.values():
            layer.set_shared(shared)

    def _running(self) -> list[str]:
        names = list(self.adapters) if self.active_adapters is None else self.active_adapters
        return [n for n in names if n in self.adapters and not self.adapters[n].merged]

    def _routing(self) -> Mapping[str, slice | torch.Tensor] | None:
        """The innermost :func:`route_rows` of this thread that covers this host, if any."""
        for scope, rows in reversed(_ROUTES.get()):
            if scope is None or id(self) in scope:
                return rows
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows_of = self._routing()
        if rows_of is not None and any(layer.merged for layer in self.adapters.values()):
            merged = [n for n, layer in self.adapters.items() if layer.merged]
            raise ValueError(
                f"adapters {merged} are merged into the weights; unmerge to route rows"
            )
        running = self._running()
        if rows_of is not None:
            running = [n for n in running if n in rows_of]
        for name, layer in self.adapters.items():
            if name not in running:
                layer.on_skipped_forward()
        if not running or args or kwargs:
            if running and (args or kwargs):
                raise TypeError("adapter hosts take one input tensor")
            return self.base_layer(x, *args, **kwargs)
        layer0 = self.adapters[running[0]]
        out, ctx = layer0.base_forward(self.base_layer, x)
        if rows_of is None:
            for name in running:
                out = out + self.adapters[name].update(x, ctx)
            return out
        routed = [(rows_of[n], n) for n in running if n in rows_of]
        if all(isinstance(r, slice) and r.step in (None, 1) for r, _ in routed):
            return out + self._sliced_updates(x, ctx, layer0, routed)
        out = out.clone()
        for rows, name in routed:
            sub = layer0.select_rows(ctx, rows)
            out[rows] = out[rows] + self.adapters[name].update(x[rows], sub)
        return out

    def _sliced_updates(self, x, ctx, layer0, routed) -> torch.Tensor:
        """Updates for contiguous row blocks, concatenated in row order (zeros in the gaps):
        one addition, no copy of the output and no index assignment in the autograd graph."""
        pieces, cursor, n = [], 0, x.shape[0]
        for rows, name in sorted(routed, key=lambda item: item[0].indices(n)[0]):
            start, stop, _ = rows.indices(n)
            if start < cursor:
                raise ValueError("route_rows: row blocks of different adapters overlap")
            update = self.adapters[name].update(x[start:stop], layer0.select_rows(ctx, rows))
            if start > cursor:
                pieces.append(update.new_zeros((start - cursor, *update.shape[1:])))
            pieces.append(update)
            cursor = stop
        if not pieces:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        if cursor < n:
            pieces.append(pieces[-1].new_zeros((n - cursor, *pieces[-1].shape[1:])))
        return torch.cat(pieces)

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}"


def rows_by_adapter(adapter_per_row: Sequence[str | None]) -> dict[str, torch.Tensor]:
    """peft-style ``adapter_names`` (an adapter name, or None for the base model, per batch row)
    to the ``{name: row indices}`` mapping :func:`route_rows` uses."""
    out: dict[str, list[int]] = {}
    for i, name in enumerate(adapter_per_row):
        if name is not None:
            out.setdefault(name, []).append(i)
    return {name: torch.tensor(rows) for name, rows in out.items()}


@contextlib.contextmanager
def route_rows(
    rows: Mapping[str, slice | torch.Tensor] | Sequence[str | None],
    model: nn.Module | None = None,
) -> Iterator[None]:
    """Within the block, adapter ``name`` updates only batch rows ``rows[name]``.

    ``rows`` is either ``{adapter name: slice or index tensor}`` or, like peft's
    ``adapter_names``, one adapter name (or None) per batch row. Rows not given to any adapter
    get the frozen model's output. Merged adapters are part of the weights and cannot be
    routed: unmerge first.

    The routing belongs to the calling thread (and asyncio task): other threads, routing other
    rows through the same model or another, are not affected. With ``model`` given it applies
    to that model's adapters only, so another model run inside the block (a reference model)
    is not routed; without it, to every model. Nested blocks: the innermost one applies.

    Example::

        with lv.route_rows({"lora": slice(0, 4), "mix": slice(4, 8)}):
            logits = model(input_ids).logits   # rows 0-3 through "lora", 4-7 through "mix"
        with lv.route_rows(["lora", None, "mix"]):  # one name per row; None = base model
            logits = model(input_ids).logits
    """
    if not isinstance(rows, Mapping):
        rows = rows_by_adapter(rows)
    scope = None
    if model is not None:
        scope = frozenset(id(m) for m in model.modules() if isinstance(m, AdapterHost))
    token = _ROUTES.set((*_ROUTES.get(), (scope, dict(rows))))
    try:
        yield
    finally:
        _ROUTES.reset(token)
