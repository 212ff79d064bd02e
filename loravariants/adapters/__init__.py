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
from .lora import LoRAConfig, LoRALinear

__all__ = [
    "VARIANTS",
    "AdapterConfig",
    "AdapterHost",
    "AdapterLayer",
    "LoRAConfig",
    "LoRALinear",
    "match_target",
    "register_variant",
    "route_rows",
]
