"""COLA, Chain of LoRA: train a LoRA link, fold it into the weight, start a fresh link
(Xia, Qin, Hazan 2024, arXiv 2401.04151).

::

    steps:   1 ........ tau_1 | tau_1+1 ....... tau_2 | tau_2+1 ........ T
    link:    B_0 A_0 (trains)  | B_1 A_1 (trains)      | B_2 A_2 (trains)
    knot:                  fold W += s_0 B_0 A_0   fold W += s_1 B_1 A_1

          x ──► W (frozen; already holds W0 + every folded link) ─────────┐
          │                                                                ▼
          └─► dropout ─► A_j (r_j x in) ─► B_j (out x r_j) ─► * s_j ───►  (+) ─► h

    h = W x + s_j · B_j A_j x,     W = W0 + sum_{i<j} s_i · B_i A_i,     s_i = alpha / r_i

At every knot ``tau_j`` the current link is folded into the frozen weight, a fresh link starts
(``B = 0``, ``A`` redrawn, so the model's function is unchanged) and its optimizer state is
reset. Chain length 1 is plain LoRA. The final update ``W_final - W0`` has rank up to
``sum_j r_j``; the folded links' factors are kept as small fp32 buffers (``chain_B``,
``chain_A``) so :meth:`COLALinear.factors` returns it exactly, for analysis and peft export.

Invariant: the frozen weight holds ``W0 + chain_B[:, :k] @ chain_A[:k]`` with ``k =
folded_rank``, and the layer adds the rest of the chain itself. While the layer is alone on its
frozen module every finished link is folded (``k`` = the whole chain: the paper's merge, no extra
compute). While other adapters share the module (several named adapters, concurrent training)
nothing is folded (``k = 0``): writing into the shared weight would change their base. Loading
saved COLA state unfolds the old chain and folds the saved one by the same rule, so a saved chain
loads correctly onto a fresh base model.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import check_range
from .base import AdapterLayer, add_into_, register_variant
from .host import AdapterHost
from .lora import LoRAConfig, init_lora_, lora_scaling

__all__ = [
    "COLAConfig",
    "COLALinear",
    "knots_from_chain_length",
    "knots_from_epochs",
    "restart",
]

_EXACT_DTYPES = (torch.float32, torch.float64)


def knots_from_chain_length(chain_length: int, total_steps: int) -> list[int]:
    """Knots that split ``total_steps`` optimizer steps into ``chain_length`` equal links.

    Example: ``knots_from_chain_length(3, 300) == [100, 200]`` (links train steps 1-100,
    101-200, 201-300).

    Raises:
        ValueError: ``chain_length`` < 1 or ``total_steps`` < ``chain_length``.
    """
    check_range("chain_length", chain_length, low=1, integer=True)
    check_range("total_steps", total_steps, low=chain_length, integer=True)
    return [round(j * total_steps / chain_length) for j in range(1, chain_length)]


def knots_from_epochs(
    steps_per_epoch: int, epochs: int, chain_length: int | None = None
) -> list[int]:
    """Knots on epoch boundaries (the paper's setting: 5 epochs, chains of 1-3 links).

    Args:
        steps_per_epoch: optimizer steps per epoch, >= 1.
        epochs: number of epochs, >= 1.
        chain_length: number of links; default one link per epoch. The links are spread as
            evenly as the epoch boundaries allow.

    Returns:
        Sorted step numbers (each a multiple of ``steps_per_epoch``).
    """
    check_range("steps_per_epoch", steps_per_epoch, low=1, integer=True)
    check_range("epochs", epochs, low=1, integer=True)
    if chain_length is None:
        chain_length = epochs
    check_range("chain_length", chain_length, low=1, high=epochs, integer=True)
    return [round(j * epochs / chain_length) * steps_per_epoch for j in range(1, chain_length)]


@register_variant
@dataclass
class COLAConfig(LoRAConfig):
    """COLA: LoRA fields plus the chain schedule.

    Give the knots either explicitly (``knots``) or as ``chain_length`` links spread evenly over
    ``total_steps``; with neither, no automatic restart happens (call :func:`restart` yourself).

    Attributes:
        knots: optimizer steps after which the current link is folded and a new one starts;
            strictly increasing, each >= 1. Default ``None``.
        chain_length: number of links, >= 1 (needs ``total_steps``). Default ``None``.
        total_steps: total optimizer steps of the run, >= ``chain_length``. Default ``None``.
        link_ranks: rank of link j (``link_ranks[j]``; later links keep the last entry), for
            the paper's rank step-down ablation. ``link_ranks[0]`` must equal ``r``; not
            combinable with ``rank_pattern``. Default ``None`` (every link has rank ``r``).
        reset_optimizer: reset the optimizer state of a new link (the paper). Default True.
            A link whose rank differs from the previous one always gets a fresh state.
        restart_lr_schedule: whether the training loop restarts its LR schedule at every knot
            (unconfirmed in the paper, so an option). Default False.
    """

    variant: ClassVar[str] = "cola"
    file_type: ClassVar[str | None] = None  # a peft LoRA file reads back as plain LoRA
    knots: list[int] | None = None
    chain_length: int | None = None
    total_steps: int | None = None
    link_ranks: list[int] | None = None
    reset_optimizer: bool = True
    restart_lr_schedule: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.knots is not None and self.chain_length is not None:
            raise ValueError("give knots or chain_length (with total_steps), not both")
        if self.knots is not None:
            if not isinstance(self.knots, (list, tuple)):
                raise ValueError(f"knots must be a list of step numbers, got {self.knots!r}")
            self.knots = list(self.knots)
            for i, k in enumerate(self.knots):
                check_range(f"knots[{i}]", k, low=1, integer=True)
            if any(b <= a for a, b in zip(self.knots, self.knots[1:], strict=False)):
                raise ValueError(f"knots must be strictly increasing, got {self.knots}")
        if self.chain_length is not None:
            check_range("chain_length", self.chain_length, low=1, integer=True)
            if self.total_steps is None:
                raise ValueError("chain_length needs total_steps (an integer >= chain_length)")
        if self.total_steps is not None:
            check_range("total_steps", self.total_steps, low=self.chain_length or 1, integer=True)
            if self.knots and self.knots[-1] >= self.total_steps:
                raise ValueError(
                    f"knots must be < total_steps={self.total_steps}, got {self.knots}"
                )
        if self.link_ranks is not None:
            if not isinstance(self.link_ranks, (list, tuple)) or not self.link_ranks:
                raise ValueError(
                    f"link_ranks must be a non-empty list of ranks, got {self.link_ranks!r}"
                )
            self.link_ranks = list(self.link_ranks)
            for i, r in enumerate(self.link_ranks):
                check_range(f"link_ranks[{i}]", r, low=1, integer=True)
            if self.link_ranks[0] != self.r:
                raise ValueError(
                    f"link_ranks[0] must equal r={self.r} (the first link's rank), "
                    f"got {self.link_ranks[0]}"
                )
            if self.rank_pattern:
                raise ValueError("link_ranks and rank_pattern cannot be combined")
            n_links = len(self.schedule()) + 1
            if self.schedule() and len(self.link_ranks) > n_links:
                raise ValueError(
                    f"link_ranks has {len(self.link_ranks)} entries for a chain of {n_links} links"
                )
        for flag in ("reset_optimizer", "restart_lr_schedule"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")

    def schedule(self) -> list[int]:
        """The knots (step numbers) this config restarts at; ``[]`` for no automatic restart."""
        if self.knots is not None:
            return list(self.knots)
        if self.chain_length is not None:
            return knots_from_chain_length(self.chain_length, self.total_steps)
        return []

    def link_rank(self, link: int, first_rank: int) -> int:
        """Rank of link number ``link`` (0 = first) for a module whose first link has
        ``first_rank`` (``r`` after ``rank_pattern``)."""
        if not self.link_ranks:
            return first_rank
        return self.link_ranks[min(link, len(self.link_ranks) - 1)]

    def create_layer(self, path: str, module: nn.Module) -> COLALinear:
        r, alpha = self.rank_for(path)
        return COLALinear(module, self, r=r, alpha=alpha, path=path)

    # -- the variant contract -----------------------------------------------------------------
    def with_rank(self, r: int) -> dict[str, Any]:
        fields = super().with_rank(r)
        if self.link_ranks:
            fields["link_ranks"] = [r] * len(self.link_ranks)
        return fields

    @classmethod
    def run_overrides(
        cls, values: Mapping[str, Any], overrides: Mapping[str, Any], max_steps: int
    ) -> dict[str, Any]:
        """A chain given by ``chain_length`` is spread over the run's ``max_steps`` (unless
        the row sets ``total_steps`` or ``knots`` itself)."""
        if values.get("chain_length") is not None and not {"total_steps", "knots"} & set(overrides):
            return {"total_steps": max_steps}
        return {}

    def restarts_lr_schedule(self) -> bool:
        return self.restart_lr_schedule

    def format_fields(self, fmt: str, model: nn.Module) -> dict[str, Any]:
        """None of LoRA's: the chain goes to peft as its folded factors (scaling in ``B``,
        ``alpha = r``), not as trained, so ``use_rslora`` must not be written."""
        return {}

    def unsupported_strategy(self, strategy: str) -> str | None:
        ranks = self.link_ranks or []
        if strategy == "ddp" and len(set(ranks)) > 1:
            # the step-down resizes a link's parameters in place mid-run; DDP's gradient
            # buckets keep the old sizes. FSDP2 leaves the adapters whole, out of its
            # sharding, and averages their gradients one tensor at a time: it follows the
            # resize (tests/test_fsdp.py). Equal-rank restarts are fine everywhere: every
            # process draws the new link from the same seeded generator.
            return (
                f"link_ranks={list(ranks)} steps the rank down, which resizes the link's "
                "parameters in place; DDP's gradient buckets keep the old sizes (use equal "
                "link_ranks, or one process)"
            )
        return super().unsupported_strategy(strategy)

    @classmethod
    def describe_rank(cls, fields: Mapping[str, Any]) -> str:
        """``r=8 x3 links`` (``r=8/4/2`` with ``link_ranks``)."""
        links = fields.get("link_ranks")
        knots = fields.get("knots")
        n = fields.get("chain_length") or (len(knots) + 1 if knots else None)
        text = f"r={'/'.join(map(str, links))}" if links else f"r={fields.get('r')}"
        return text + (f" x{n} links" if n else "")


def _resize_in_place(param: nn.Parameter, value: torch.Tensor) -> None:
    """Give ``param`` the shape and values of ``value`` while keeping the Python object.

    ``torch.utils.swap_tensors`` swaps the tensors behind the two objects, autograd metadata
    included (a plain ``param.data = value`` of another shape leaves autograd expecting the old
    shape). Optimizers keep training ``param``; its old optimizer state must be dropped.
    """
    torch.utils.swap_tensors(param, nn.Parameter(value, requires_grad=param.requires_grad))


class COLALinear(AdapterLayer):
    """A chain of LoRA links on one frozen ``nn.Linear``.

    ``update(x) = s_j · B_j A_j dropout(x)`` for the current link j only: earlier links live in
    the frozen weight.

    What each method reports (the chain is already in the weight, the current link is not):

    * :meth:`factors` / :meth:`delta_weight`: the whole chain, ``W_final - W0`` — folded links
      and the current one. This is what analysis and the peft export (onto the original base)
      need.
    * :meth:`merge` / :meth:`unmerge`: fold / unfold the *current link only*, since the others
      are in the weight already. After :meth:`merge` the weight holds ``W0 + delta_weight()``.

    Args:
        base: the frozen ``nn.Linear``.
        config: a :class:`COLAConfig`.
        r: rank of the first link (defaults to ``config.r``).
        alpha: scaling numerator (defaults to ``config.alpha``); link j scales by
            ``alpha / r_j``.
        path: the module's name in the model; seeds the draw of each new link's ``A``.

    Parameters and buffers (fp32):
        lora_A: ``(r_j, in)``, lora_B: ``(out, r_j)`` — the current link. The same Parameter
            objects are kept across restarts (re-initialised in place; resized with
            ``torch.utils.swap_tensors`` when the rank steps down), so an optimizer keeps
            training them; only their state needs resetting, which
            :func:`loravariants.on_step_end` does.
        chain_A: ``(K, in)``, chain_B: ``(out, K)`` — the folded links, scaling folded into
            ``chain_B``; ``K = sum of the folded ranks``.
        link_index: number of links folded so far (a 0-d long buffer).
    """

    def __init__(
        self,
        base: nn.Module,
        config: COLAConfig,
        r: int | None = None,
        alpha: float | None = None,
        path: str = "",
    ) -> None:
        super().__init__(base, config)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"COLALinear wraps nn.Linear, got {type(base).__name__}")
        self.path = path  # seeds the draws of later links (see _draw_new_link)
        self.first_r = config.r if r is None else r
        self.alpha = config.alpha if alpha is None else alpha
        self.knots = config.schedule()
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.first_r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, self.first_r, device=device))
        init_lora_(self.lora_A, self.lora_B, config.init)
        self.register_buffer("chain_A", torch.zeros(0, base.in_features, device=device))
        self.register_buffer("chain_B", torch.zeros(base.out_features, 0, device=device))
        self.register_buffer("link_index", torch.zeros((), dtype=torch.long, device=device))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # Rank of the chain prefix folded into the frozen weight. Finished links are folded
        # (the paper's merge) while this layer is alone on its frozen module; while the module
        # is shared with other adapters they stay a separate low-rank term of this layer.
        self.folded_rank = 0

    # -- the current link ---------------------------------------------------------------------
    @property
    def r(self) -> int:
        """Rank of the current link."""
        return self.lora_A.shape[0]

    @property
    def scaling(self) -> float:
        """Scaling of the current link: ``alpha / r_j`` (rsLoRA: ``alpha / sqrt(r_j)``)."""
        return lora_scaling(self.r, self.alpha, self.config.use_rslora)

    def update(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        """``s_j · B_j A_j dropout(x)`` plus the finished links not folded into the weight
        (no dropout on them: they act as frozen weights); x: ``(..., in)`` -> ``(..., out)``."""
        h = x.to(self.lora_A.dtype)
        out = F.linear(F.linear(self.dropout(h), self.lora_A), self.lora_B) * self.scaling
        k = self.folded_rank
        if self.chain_A.shape[0] > k:
            out = out + F.linear(F.linear(h, self.chain_A[k:]), self.chain_B[:, k:])
        return out.to(x.dtype)

    def _fold(self, sign: float, start: int, stop: int) -> None:
        """``W += sign * chain_B[:, start:stop] @ chain_A[start:stop]`` (skipped on meta); under
        FSDP2 each process adds the rows of the weight it holds (:func:`add_into_`)."""
        W = self.base.weight
        if stop > start and W.device.type != "meta":
            delta = sign * (self.chain_B[:, start:stop] @ self.chain_A[start:stop]).to(W.dtype)
            add_into_(W, delta)

    @torch.no_grad()
    def set_shared(self, shared: bool) -> None:
        """Shared frozen module: take the folded links back out (they become this layer's own
        term), so the other adapters see the original weight."""
        super().set_shared(shared)
        if shared and self.folded_rank:
            self._fold(-1.0, 0, self.folded_rank)
            self.folded_rank = 0

    def components(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{"link<j>": (B_j, A_j)}``: the folded links, then the current one (left out while
        its ``B`` is still zero, right after a restart)."""
        chain_B, chain_A = self.chain_B.float(), self.chain_A.float()
        ranks = [self.config.link_rank(link, self.first_r) for link in range(int(self.link_index))]
        if sum(ranks) != chain_A.shape[0]:
            raise ValueError(
                f"COLA chain of width {chain_A.shape[0]} does not split into links {ranks}"
            )
        out, start = {}, 0
        for link, r in enumerate(ranks):
            out[f"link{link}"] = (chain_B[:, start : start + r], chain_A[start : start + r])
            start += r
        B, A = self.link_factors()
        if bool(B.any()):
            out[f"link{len(ranks)}"] = (B, A)
        return out

    def link_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current link alone: ``(s_j · B_j, A_j)``, detached fp32."""
        return self.lora_B.detach().float() * self.scaling, self.lora_A.detach().float()

    # -- the whole chain ----------------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole chain ``W_final - W0`` as ``(B, A)``: ``(out, K + r_j)`` and ``(K + r_j, in)``.

        The concatenation ``[chain_B, s_j B_j]`` and ``[chain_A; A_j]``, detached fp32.
        """
        B, A = self.link_factors()
        return (
            torch.cat([self.chain_B.float(), B], dim=1),
            torch.cat([self.chain_A.float(), A], dim=0),
        )

    # -- merging: only the current link moves ------------------------------------------------
    def merge_delta(self) -> torch.Tensor:
        """:meth:`merge` folds the current link only: the finished links are either in the
        weight already or this layer's own term (see the module docstring)."""
        B, A = self.link_factors()
        return B @ A

    # -- the chain event ----------------------------------------------------------------------
    @torch.no_grad()
    def restart(self) -> list[nn.Parameter]:
        """Fold the current link into the weight and start a fresh one.

        ``W += s_j B_j A_j`` in the weight's dtype (a warning is issued when that dtype is not
        float32/float64: the fold is then rounded); the link's factors are appended to the
        chain buffers; the next link gets ``B = 0`` and a freshly drawn ``A`` of rank
        ``link_ranks[j + 1]``. The model's function is unchanged.

        Returns:
            ``[lora_A, lora_B]``: the same Parameter objects, re-initialised (resized when the
            rank changes). Their optimizer state must be reset; the gradient is cleared.

        Raises:
            ValueError: the link is merged (unmerge first).
        """
        if self.merged:
            raise ValueError("cannot restart a merged COLA link; unmerge it first")
        W = self.base.weight
        fold = not self.shares_base and self.folded_rank == self.chain_A.shape[0]
        if fold and W.dtype not in _EXACT_DTYPES:
            warnings.warn(
                f"COLA folds a link into a {W.dtype} weight: the fold is rounded to that dtype "
                "(keep the frozen weights in float32 for an exact chain)",
                stacklevel=2,
            )
        B, A = self.link_factors()
        self.chain_B = torch.cat([self.chain_B, B.to(self.chain_B.dtype)], dim=1)
        self.chain_A = torch.cat([self.chain_A, A.to(self.chain_A.dtype)], dim=0)
        if fold:
            self._fold(1.0, self.folded_rank, self.chain_A.shape[0])
            self.folded_rank = self.chain_A.shape[0]
        self.link_index += 1
        new_r = self.config.link_rank(int(self.link_index), self.first_r)
        for p, shape in ((self.lora_A, (new_r, W.shape[1])), (self.lora_B, (W.shape[0], new_r))):
            p.grad = None
            if tuple(p.shape) != shape:
                _resize_in_place(p, torch.empty(shape, dtype=p.dtype, device=p.device))
        self._draw_new_link()
        return [self.lora_A, self.lora_B]

    @torch.no_grad()
    def _draw_new_link(self) -> None:
        """``B = 0`` (whatever ``config.init`` says: the function must not change) and a new
        ``A`` drawn like LoRA's (kaiming-uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)), or
        normal(0, 1/r) for ``init="gaussian"``).

        ``A`` comes from its own generator seeded by the process seed
        (``torch.initial_seed()``), the module path and the link index: the same on every
        data-parallel rank and in a resumed run, whatever random numbers were used before.
        """
        key = f"{torch.initial_seed()}:{self.path}:{int(self.link_index)}".encode()
        gen = torch.Generator(device="cpu").manual_seed(zlib.crc32(key))
        r, in_f = self.lora_A.shape
        if self.config.init == "gaussian":
            A = torch.randn(r, in_f, generator=gen) / r
        else:
            bound = 1.0 / math.sqrt(in_f)
            A = torch.empty(r, in_f).uniform_(-bound, bound, generator=gen)
        self.lora_A.copy_(A)
        self.lora_B.zero_()

    def on_step_end(self, step: int) -> list[nn.Parameter] | None:
        """Restart at every knot reached by ``step`` (also catches up after a resume).

        Returns the new link's parameters when their optimizer state must be reset (always
        when ``reset_optimizer``; otherwise only when the rank changed), else ``None``.
        """
        due = sum(1 for k in self.knots if k <= step)
        reset: list[nn.Parameter] = []
        while int(self.link_index) < due:
            old_r = self.r
            params = self.restart()
            if self.config.reset_optimizer or self.r != old_r:
                reset = params
        return reset or None

    def metrics(self) -> dict[str, float]:
        """``{"link_index": links folded so far}``: the chain's position, for trackers."""
        return {"link_index": float(self.link_index)}

    def uses_step_end(self) -> bool:
        """Only a chain with knots restarts by itself; without knots :func:`restart` is manual."""
        return bool(self.knots)

    # -- saving -------------------------------------------------------------------------------
    @torch.no_grad()
    def load_adapter_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore a saved chain; ranks and chain length may differ from the current ones.

        The old chain is taken out of the frozen weight and the loaded one folded in, keeping
        the invariant (module docstring).

        Raises:
            ValueError: missing/unexpected names or shapes that do not fit the frozen module.
        """
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"missing tensors {missing}, unexpected tensors {unexpected}")
        out_f, in_f = self.base.out_features, self.base.in_features
        cA, cB, A, B = state["chain_A"], state["chain_B"], state["lora_A"], state["lora_B"]
        ok = (
            cA.dim() == 2
            and cB.dim() == 2
            and A.dim() == 2
            and B.dim() == 2
            and cA.shape[1] == in_f
            and cB.shape[0] == out_f
            and cA.shape[0] == cB.shape[1]
            and A.shape[1] == in_f
            and B.shape[0] == out_f
            and A.shape[0] == B.shape[1]
            and tuple(state["link_index"].shape) == ()
        )
        if not ok:
            shapes = {k: tuple(v.shape) for k, v in state.items()}
            raise ValueError(f"COLA tensors {shapes} do not fit a {in_f} -> {out_f} linear")
        was_merged = self.merged
        if was_merged:
            self.unmerge()
        self._fold(-1.0, 0, self.folded_rank)
        self.folded_rank = 0
        dev = self.chain_A.device
        self.chain_A = cA.detach().to(dev, torch.float32).clone()
        self.chain_B = cB.detach().to(dev, torch.float32).clone()
        self.link_index.copy_(state["link_index"])
        for p, t in ((self.lora_A, A), (self.lora_B, B)):
            p.grad = None
            if p.shape != t.shape:
                _resize_in_place(p, torch.empty(t.shape, dtype=p.dtype, device=p.device))
            p.copy_(t)
        if not self.shares_base:
            # link by link, as training folded them: one product over the whole chain rounds
            # differently, and a resumed run would drift from an uninterrupted one
            for start, stop in self._link_bounds():
                self._fold(1.0, start, stop)
            self.folded_rank = self.chain_A.shape[0]
        if was_merged:
            self.merge()

    def _link_bounds(self) -> list[tuple[int, int]]:
        """``[(start, stop)]`` of each folded link in the chain buffers (one span when the
        saved ranks do not follow this config's ``link_ranks``)."""
        total, bounds, start = self.chain_A.shape[0], [], 0
        for j in range(int(self.link_index)):
            stop = start + self.config.link_rank(j, self.first_r)
            bounds.append((start, stop))
            start = stop
        return bounds if start == total else [(0, total)]

    @torch.no_grad()
    def on_detach(self) -> None:
        """Take the folded links back out of the frozen weight (``lv.detach`` restores W0)."""
        self._fold(-1.0, 0, self.folded_rank)
        self.folded_rank = 0
        self.chain_A = self.chain_A[:0].clone()
        self.chain_B = self.chain_B[:, :0].clone()

    def extra_repr(self) -> str:
        return (
            f"link={int(self.link_index)}, r={self.r}, chain_rank={self.chain_A.shape[0]}, "
            f"alpha={self.alpha}, knots={self.knots}"
        )


def restart(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """Restart every COLA layer of ``model`` (of adapter ``name`` only, when given) now.

    Returns:
        The new links' parameters; reset their optimizer state, e.g. with
        :func:`loravariants.reset_optimizer_state`.

    Raises:
        ValueError: ``name`` is not attached.
    """
    # the hosts' own tables, not inject's walk: inject imports this package
    hosts = [m for m in model.modules() if isinstance(m, AdapterHost)]
    if name is not None:
        attached = list(dict.fromkeys(n for host in hosts for n in host.adapters))
        if name not in attached:
            raise ValueError(f"no adapter named {name!r}; attached: {attached}")
    params: list[nn.Parameter] = []
    for host in hosts:
        for adapter_name, layer in host.adapters.items():
            if isinstance(layer, COLALinear) and name in (None, adapter_name):
                params.extend(layer.restart())
    return params
