"""What each variant supports under accelerate's strategies, checked before any work.

    accelerate launch --config_file configs/accelerate/ddp.yaml  ...   -> strategy "ddp"
    accelerate launch --config_file configs/accelerate/fsdp.yaml ...   -> strategy "fsdp"
    python ... (no launcher)                                           -> strategy "single"

:data:`SUPPORT` is the one table the check, the docs (docs/distributed.md) and the tests read.
A pair that is not supported is refused by :func:`check_supported` (called by ``train()`` right
after accelerate has read the launch configuration, before the output folder is touched or the
model is wrapped), naming the strategies that variant supports.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import nn

__all__ = ["STRATEGIES", "SUPPORT", "strategy_of", "check_supported", "statistics_context"]

#: the strategies a run can have; "single" is one process (no launcher, or one process)
STRATEGIES = ("single", "ddp", "fsdp", "deepspeed")

_UNTESTED_DS = (
    "DeepSpeed is not tested with loravariants (the deepspeed package is not part of the "
    "tested setup); the training loop's gradient-accumulation, clipping and checkpoint code is "
    "accelerate's plain path"
)

#: variant -> strategy -> None (supported) or the reason it is not.
SUPPORT: dict[str, dict[str, str | None]] = {
    "lora": {"single": None, "ddp": None, "fsdp": None, "deepspeed": _UNTESTED_DS},
    "cola": {
        "single": None,
        # equal-rank restarts re-initialise the same parameters in place; every rank draws the
        # new link from the same seeded generator, so DDP's replicas stay equal
        "ddp": None,
        "fsdp": (
            "COLA folds each finished link into the frozen weight and redraws its link in "
            "place; FSDP shards those weights, so the fold would touch one shard only"
        ),
        "deepspeed": _UNTESTED_DS,
    },
    "multilora": {
        "single": None,
        "ddp": None,
        "fsdp": "MultiLoRA under FSDP is not tested",
        "deepspeed": _UNTESTED_DS,
    },
    "mixlora": {
        "single": None,
        # unrouted experts: find_unused_parameters; balance loss: data_parallel_statistics
        "ddp": None,
        "fsdp": (
            "MixLoRA routes each token to a data-dependent subset of experts; FSDP gathers "
            "parameters per wrapped block and is not tested with experts that get no gradient"
        ),
        "deepspeed": _UNTESTED_DS,
    },
}


def strategy_of(accelerator: Any) -> str:
    """The strategy of an ``accelerate.Accelerator``: one of :data:`STRATEGIES`, or the name of
    accelerate's ``DistributedType`` for one loravariants knows nothing about (e.g. ``xla``)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind == DistributedType.NO:
        return "single"
    if str(kind.value).startswith("MULTI_"):  # MULTI_GPU, MULTI_CPU, MULTI_XPU, ...
        return "ddp" if accelerator.num_processes > 1 else "single"
    return str(kind.value).lower()


def supported_strategies(variant: str) -> list[str]:
    """The strategies ``variant`` supports, in :data:`STRATEGIES` order."""
    table = SUPPORT.get(variant, {})
    return [s for s in STRATEGIES if s in table and table[s] is None]


def check_supported(model: nn.Module, strategy: str) -> None:
    """Refuse to train ``model``'s adapters under ``strategy`` when a pair is not supported.

    Args:
        model: a model with adapters attached (not yet wrapped by accelerate).
        strategy: from :func:`strategy_of`.

    Raises:
        ValueError: one line naming the variant, the strategy, why, and the strategies that
            variant supports.
    """
    from .inject import adapter_config, adapter_names

    for name in adapter_names(model):
        config = adapter_config(model, name)
        variant = config.variant
        reason = SUPPORT.get(variant, {}).get(strategy, f"the strategy {strategy!r} is unknown")
        if reason is None and variant == "cola" and strategy != "single":
            ranks = getattr(config, "link_ranks", None) or []
            if len(set(ranks)) > 1:
                reason = (
                    f"link_ranks={ranks} steps the rank down, which resizes the link's "
                    "parameters in place; DDP's gradient buckets keep the old sizes"
                )
                others = "single (one process), or equal link_ranks under ddp"
                raise ValueError(
                    f"adapter {name!r} (cola) cannot train under {strategy}: {reason}; "
                    f"supported: {others}"
                )
        if reason is not None:
            others = ", ".join(supported_strategies(variant)) or "none"
            raise ValueError(
                f"adapter {name!r} ({variant}) cannot train under {strategy}: {reason}; "
                f"supported strategies for {variant}: {others} (see docs/distributed.md)"
            )


def statistics_context(accelerator: Any) -> AbstractContextManager:
    """The context a data-parallel training loop runs in: MixLoRA's balance loss and router
    statistics over the global batch (:func:`loravariants.adapters.mixlora.
    data_parallel_statistics`); nothing for one process."""
    if accelerator.num_processes == 1:
        return nullcontext()
    from .adapters.mixlora import data_parallel_statistics

    reduce: Callable = lambda t: accelerator.reduce(t, reduction="sum")  # noqa: E731
    return data_parallel_statistics(reduce)
