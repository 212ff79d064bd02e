"""MultiLoRA: n parallel LoRA branches with learnable scales (Wang et al. 2023, arXiv 2311.11501).

::

          x ──────────────► W0 (frozen, out x in) ─────────────────────────┐
          │                                                                 ▼
          ├─► dropout ─► A_1 (r x in) ─► B_1 (out x r) ─► * s_1 ──┐        (+) ─► h
          ├─► dropout ─► A_2 (r x in) ─► B_2 (out x r) ─► * s_2 ──┼─► * alpha/r ─┘
          └─►   ...         A_n              B_n              s_n  ──┘

    h = W0 x + (alpha / r) sum_{i=1..n} s_i ⊙ (B_i A_i x)

``s_i`` is one scalar per branch (``scale_shape="scalar"``) or one value per output channel
(``"channel"``; the paper leaves this open). The paper's initialisation draws ``A_i`` and
``B_i`` kaiming-uniform and sets ``s_i = 0``: the update starts at zero while every branch is
already diverse.

The sum is one rank ``n·r`` LoRA, ``B_cat = [s_1 ⊙ B_1 ... s_n ⊙ B_n]``, ``A_cat = [A_1; ...;
A_n]``, and that is how it is computed: two matmuls over the stacked factors, no loop over
branches (the scales are folded into ``B`` first, an ``n·out·r`` product per forward).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import check_range
from .base import AdapterConfig, AdapterLayer, register_variant

__all__ = ["MultiLoRAConfig", "MultiLoRALinear"]

SCALE_SHAPES = ("scalar", "channel")
MULTILORA_INITS = ("paper", "lora")


@register_variant
@dataclass
class MultiLoRAConfig(AdapterConfig):
    """MultiLoRA.

    Attributes:
        num_branches: n, the number of parallel LoRA branches, >= 1. Default 4 (our choice:
            the paper does not fix one value).
        r: rank of each branch, >= 1 (the whole update has rank <= n·r). Default 8.
        alpha: scaling numerator, > 0; the update is scaled by ``alpha / r``. Default 16.
        dropout: dropout on the adapter's input, in [0, 1). Default 0.
        scale_shape: ``"scalar"`` (one s_i per branch) or ``"channel"`` (s_i of shape
            ``(out,)``). Default ``"scalar"``.
        init: ``"paper"`` (A and B kaiming-uniform, scales 0) or ``"lora"`` (A kaiming, B 0,
            scales 1). Default ``"paper"``.
        target_modules: module names (list, suffix match) or one regex (full match).
    """

    variant: ClassVar[str] = "multilora"
    output_fields: ClassVar[tuple[str, ...]] = ("alpha",)
    formats: ClassVar[tuple[str, ...]] = ("native", "peft")
    num_branches: int = 4
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    scale_shape: str = "scalar"
    init: str = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("num_branches", self.num_branches, low=1, integer=True)
        check_range("r", self.r, low=1, integer=True)
        check_range("alpha", self.alpha, low=0, low_open=True)
        check_range("dropout", self.dropout, low=0, high=1, high_open=True)
        if self.scale_shape not in SCALE_SHAPES:
            raise ValueError(
                f"scale_shape must be one of {list(SCALE_SHAPES)}, got {self.scale_shape!r}"
            )
        if self.init not in MULTILORA_INITS:
            raise ValueError(f"init must be one of {list(MULTILORA_INITS)}, got {self.init!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def create_layer(self, path: str, module: nn.Module) -> MultiLoRALinear:
        return MultiLoRALinear(module, self)

    @classmethod
    def describe_rank(cls, fields: Mapping[str, Any]) -> str:
        """``4 x r=8``: branches and their rank."""
        return f"{fields.get('num_branches')} x r={fields.get('r')}"


class MultiLoRALinear(AdapterLayer):
    """MultiLoRA update of one frozen ``nn.Linear``.

    ``update(x) = (alpha/r) · B_cat A_cat dropout(x)`` with ``B_cat = [s_1 ⊙ B_1 ... s_n ⊙ B_n]``.

    Args:
        base: the frozen ``nn.Linear`` (in_features -> out_features).
        config: a :class:`MultiLoRAConfig`.

    Parameters (fp32):
        lora_A: ``(n, r, in)``.
        lora_B: ``(n, out, r)``.
        scales: ``(n,)`` (scalar) or ``(n, out)`` (channel).
    """

    def __init__(self, base: nn.Module, config: MultiLoRAConfig) -> None:
        super().__init__(base, config)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"MultiLoRALinear wraps nn.Linear, got {type(base).__name__}")
        n, r = config.num_branches, config.r
        out_f, in_f = base.out_features, base.in_features
        device = base.weight.device
        self.num_branches, self.r, self.alpha = n, r, config.alpha
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.empty(n, r, in_f, device=device))
        self.lora_B = nn.Parameter(torch.empty(n, out_f, r, device=device))
        scale_shape = (n,) if config.scale_shape == "scalar" else (n, out_f)
        self.scales = nn.Parameter(torch.empty(scale_shape, device=device))
        self.reset_parameters()
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise following ``config.init`` (per branch: kaiming needs each branch's fan-in)."""
        for i in range(self.num_branches):  # init only; the forward has no branch loop
            nn.init.kaiming_uniform_(self.lora_A[i], a=math.sqrt(5))
            if self.config.init == "paper":
                nn.init.kaiming_uniform_(self.lora_B[i], a=math.sqrt(5))
        if self.config.init == "paper":
            self.scales.zero_()
        else:
            self.lora_B.zero_()
            self.scales.fill_(1.0)

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``B_cat (out, n·r)`` with the scales folded in and ``A_cat (n·r, in)``; autograd-live."""
        n, out_f, r = self.lora_B.shape
        s = self.scales[:, None, None] if self.scales.dim() == 1 else self.scales[:, :, None]
        B_cat = (s * self.lora_B).permute(1, 0, 2).reshape(out_f, n * r)
        A_cat = self.lora_A.reshape(n * r, -1)
        return B_cat, A_cat

    def update(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        """``(alpha/r) sum_i s_i ⊙ B_i A_i dropout(x)``; x: ``(..., in)`` -> ``(..., out)``."""
        B_cat, A_cat = self._stacked()
        h = self.dropout(x.to(A_cat.dtype))
        return (F.linear(F.linear(h, A_cat), B_cat) * self.scaling).to(x.dtype)

    def components(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{"branch<b>": ((alpha/r) s_b ⊙ B_b, A_b)}``: the columns / rows of :meth:`factors`
        that belong to each branch."""
        B_cat, A_cat = self.factors()
        r = A_cat.shape[0] // self.num_branches
        return {
            f"branch{b}": (B_cat[:, b * r : (b + 1) * r], A_cat[b * r : (b + 1) * r])
            for b in range(self.num_branches)
        }

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact rank ``n·r`` form: ``((alpha/r) B_cat, A_cat)``, detached fp32."""
        with torch.no_grad():
            B_cat, A_cat = self._stacked()
        return B_cat.detach().float() * self.scaling, A_cat.detach().float()

    def extra_repr(self) -> str:
        return (
            f"num_branches={self.num_branches}, r={self.r}, alpha={self.alpha}, "
            f"scale_shape={self.config.scale_shape}"
        )
