"""Adapter variants, one file each; every one usable on its own on any ``nn.Module``."""

from .base import (
    VARIANTS,
    AdapterConfig,
    AdapterHost,
    AdapterLayer,
    match_target,
    register_variant,
    route_rows,
)
from .cola import COLAConfig, COLALinear
from .lora import LoRAConfig, LoRALinear
from .mixlora import MixLoRAConfig, MixLoRAFFN
from .multilora import MultiLoRAConfig, MultiLoRALinear

__all__ = [
    "VARIANTS",
    "AdapterConfig",
    "AdapterHost",
    "AdapterLayer",
    "COLAConfig",
    "COLALinear",
    "LoRAConfig",
    "LoRALinear",
    "MixLoRAConfig",
    "MixLoRAFFN",
    "MultiLoRAConfig",
    "MultiLoRALinear",
    "match_target",
    "register_variant",
    "route_rows",
]
