"""A fifth variant, defined here only: proof that the variant contract is all a variant needs.

GatedLoRA: LoRA whose update passes through one learnable gate per layer::

    h = W x + g · (alpha / r) · B A x        g: scalar, starts at 1; B starts at 0

One class pair (config + layer) and one spec (``tests/specs/toy.yaml``); nothing in the
package names it. Importing this module registers the variant ``"toy"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from loravariants.adapters import AdapterConfig, AdapterLayer, register_variant
from loravariants.validation import check_range

SPEC_DIR = Path(__file__).parent / "specs"


@register_variant
@dataclass
class GatedLoRAConfig(AdapterConfig):
    """Attributes:
    r: rank, >= 1. alpha: scaling numerator, > 0. gate_init: the gate's start value, > 0.
    """

    variant: ClassVar[str] = "toy"
    output_fields: ClassVar[tuple[str, ...]] = ("alpha",)
    formats: ClassVar[tuple[str, ...]] = ("native", "peft")
    r: int = 4
    alpha: float = 8.0
    gate_init: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("r", self.r, low=1, integer=True)
        check_range("alpha", self.alpha, low=0, low_open=True)
        check_range("gate_init", self.gate_init, low=0, low_open=True)

    def create_layer(self, path: str, module: nn.Module) -> GatedLoRALinear:
        return GatedLoRALinear(module, self)


class GatedLoRALinear(AdapterLayer):
    """Gated LoRA on one frozen ``nn.Linear``: ``A (r, in)``, ``B (out, r)``, gate ``()``."""

    def __init__(self, base: nn.Linear, config: GatedLoRAConfig) -> None:
        super().__init__(base, config)
        self.scaling = config.alpha / config.r
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(config.r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.r, device=device))
        self.gate = nn.Parameter(torch.full((), float(config.gate_init), device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def update(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        h = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return (h * (self.gate * self.scaling)).to(x.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        B = self.lora_B.detach().float() * (self.gate.detach().float() * self.scaling)
        return B, self.lora_A.detach().float()

    def report_stats(self) -> dict[str, Any]:
        return {"toy_gate": float(self.gate.detach())}
