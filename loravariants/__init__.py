"""loravariants: LoRA, COLA, MultiLoRA and MixLoRA behind one adapter interface.

The public API is re-exported here; see README.md and docs/.
"""

from . import longlora  # noqa: F401  (registers the "s2_attn" attention implementation)
from ._version import __version__
from .adapters.base import route_rows
from .inject import (
    TrainableSummary,
    adapter_config,
    adapter_layers,
    adapter_names,
    attach,
    aux_loss,
    detach,
    extra_trainable_modules,
    iter_adapters,
    mark_trainable,
    merge,
    merge_and_unload,
    on_step_end,
    reset_optimizer_state,
    save_merged,
    set_active_adapters,
    trainable_parameters,
    unmerge,
)
from .io import apply_saved_context, load_adapter, save_adapter

__all__ = [
    "__version__",
    "TrainableSummary",
    "adapter_config",
    "adapter_layers",
    "adapter_names",
    "apply_saved_context",
    "attach",
    "aux_loss",
    "detach",
    "extra_trainable_modules",
    "iter_adapters",
    "load_adapter",
    "mark_trainable",
    "merge",
    "merge_and_unload",
    "on_step_end",
    "reset_optimizer_state",
    "route_rows",
    "save_adapter",
    "save_merged",
    "set_active_adapters",
    "trainable_parameters",
    "unmerge",
]
