"""LoRA: a frozen linear map plus a trainable low-rank update (Hu et al. 2021, arXiv 2106.09685).

::

          x ──────────────► W0 (frozen, out x in) ──────────────┐
          │                                                      ▼
          └─► dropout ─► A (r x in) ─► B (out x r) ─► * s ───►  (+) ─► h

    h = W0 x + s · B A x,   s = alpha / r   (rsLoRA: s = alpha / sqrt(r))

``A`` starts kaiming-uniform (a = sqrt(5)) and ``B`` at zero, so the adapted model starts
exactly at the frozen one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import check_range
from .base import AdapterConfig, AdapterLayer, register_variant

__all__ = ["LoRAConfig", "LoRALinear", "lora_scaling"]

LORA_INITS = ("kaiming", "gaussian", "random")


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@register_variant
@dataclass
class LoRAConfig(AdapterConfig):
    """Plain LoRA.

    Attributes:
        r: rank, >= 1. Default 8.
        alpha: scaling numerator, > 0. Default 16 (s = alpha / r = 2).
        dropout: dropout on the adapter's input, in [0, 1). Default 0.
        target_modules: module names (list, suffix match) or one regex (full match).
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        init: ``"kaiming"`` (A kaiming-uniform, B zero: the paper), ``"gaussian"`` (A normal
            with std 1/r, B zero: peft's "gaussian"), or ``"random"`` (both random: a non-zero
            update from the start, for tests and analysis).
        rank_pattern: per-module rank overrides, ``{pattern: r}`` (peft's rule: the pattern
            matches the end of the module name: ``(.*[.])?pattern$``).
        alpha_pattern: per-module alpha overrides, same matching.
    """

    variant: ClassVar[str] = "lora"
    output_fields: ClassVar[tuple[str, ...]] = ("alpha", "use_rslora", "alpha_pattern")
    formats: ClassVar[tuple[str, ...]] = ("native", "peft")
    is_reference: ClassVar[bool] = True  # the method every variant extends
    file_type: ClassVar[str | None] = "LORA"  # peft's peft_type: a peft LoRA file reads as LoRA
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("r", self.r, low=1, integer=True)
        check_range("alpha", self.alpha, low=0, low_open=True)
        check_range("dropout", self.dropout, low=0, high=1, high_open=True)
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be true or false, got {self.use_rslora!r}")
        if self.init not in LORA_INITS:
            raise ValueError(f"init must be one of {list(LORA_INITS)}, got {self.init!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name)
            if pattern is None:  # `rank_pattern: null` in YAML: no overrides
                setattr(self, name, {})
            elif not isinstance(pattern, dict):
                raise ValueError(f"{name} must be a mapping module name -> value, got {pattern!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, name):
                _check_pattern_key(name, key)
        for key, value in self.rank_pattern.items():
            check_range(f"rank_pattern[{key!r}]", value, low=1, integer=True)
        for key, value in self.alpha_pattern.items():
            check_range(f"alpha_pattern[{key!r}]", value, low=0, low_open=True)

    def format_fields(self, fmt: str, model: nn.Module) -> dict[str, Any]:
        """peft's scaling rule (``fmt == "peft"``): LoRA's layers are written as trained, so
        the file says whether they scale by ``alpha / sqrt(r)``."""
        return {"use_rslora": self.use_rslora} if fmt == "peft" else {}

    def rank_for(self, path: str) -> tuple[int, float]:
        """``(r, alpha)`` for the module named ``path``, after the pattern overrides."""
        return (
            _pattern_value(self.rank_pattern, path, self.r),
            _pattern_value(self.alpha_pattern, path, self.alpha),
        )

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    def create_layer(self, path: str, module: nn.Module) -> LoRALinear:
        r, alpha = self.rank_for(path)
        return LoRALinear(module, self, r=r, alpha=alpha)


def _check_pattern_key(field: str, key: Any) -> None:
    """A pattern key is a regular expression (peft's rule wraps it as ``(.*\\.)?(key)$``)."""
    if not isinstance(key, str):
        raise ValueError(f"{field} keys must be strings, got {key!r:.60}")
    try:
        re.compile(rf"(.*\.)?({key})$")
    except re.error as e:
        raise ValueError(f"{field}[{key!r:.60}] is not a valid regular expression ({e})") from e


def _pattern_value(pattern: dict, path: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def init_lora_(A: torch.Tensor, B: torch.Tensor, init: str) -> None:
    """Initialise ``A`` (r, in) and ``B`` (out, r) in place, following ``init``."""
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / A.shape[0])
        else:
            # Same as nn.Linear's default; peft's "kaiming" default too.
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init == "random":
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)


class LoRALinear(AdapterLayer):
    """LoRA update of one frozen ``nn.Linear``: ``update(x) = s · B A dropout(x)``.

    Args:
        base: the frozen ``nn.Linear`` (in_features -> out_features).
        config: a :class:`LoRAConfig`.
        r: rank override (a peft adapter saved with ``rank_pattern``); defaults to ``config.r``.
        alpha: alpha override; defaults to ``config.alpha``.

    Parameters (fp32 regardless of the base dtype, as in peft's autocast_adapter_dtype):
        lora_A: ``(r, in_features)``.
        lora_B: ``(out_features, r)``.
    """

    def __init__(
        self,
        base: nn.Module,
        config: LoRAConfig,
        r: int | None = None,
        alpha: float | None = None,
    ) -> None:
        super().__init__(base, config)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        self.r = config.r if r is None else r
        self.alpha = config.alpha if alpha is None else alpha
        self.scaling = lora_scaling(self.r, self.alpha, config.use_rslora)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, self.r, device=device))
        init_lora_(self.lora_A, self.lora_B, config.init)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def update(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        """``s · B A dropout(x)``; x: ``(..., in)`` -> ``(..., out)`` in x's dtype."""
        h = self.dropout(x.to(self.lora_A.dtype))
        return (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling).to(x.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s · B, A)``: ``(out, r)`` and ``(r, in)``, detached fp32."""
        return (self.lora_B.detach().float() * self.scaling, self.lora_A.detach().float())

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """Written as trained: the same ``B``, ``A``, rank and alpha, so peft continues
        training it exactly."""
        return self.lora_B.detach(), self.lora_A.detach(), self.r, self.alpha

    def format_tensors(self, fmt: str) -> dict[str, torch.Tensor]:
        """peft's names, which foreign formats share (MoE-PEFT's attention LoRA):
        ``lora_A.weight`` ``(r, in)`` and ``lora_B.weight`` ``(out, r)``, B unscaled."""
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"
