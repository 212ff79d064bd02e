"""What each variant supports under accelerate's strategies, checked before any work.

    accelerate launch --config_file configs/accelerate/ddp.yaml ...   -> strategy "ddp"
    accelerate launch with an FSDP / DeepSpeed config             -> "fsdp" / "deepspeed"
    python ... (no launcher, or one process)                      -> strategy "single"

:data:`SUPPORT` is the one table the check, the docs (docs/distributed.md) and the tests read.
A pair that is not supported is refused by :func:`check_supported` (called first by
``train()``, with :func:`launch_strategy`: before accelerate is set up, the output folder
touched or the model wrapped), naming the strategies that variant supports.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import nn

__all__ = [
    "STRATEGIES",
    "SUPPORT",
    "launch_strategy",
    "refuse_launched",
    "check_supported",
    "statistics_context",
]

#: the strategies a run can have; "single" is one process (no launcher, or one process)
STRATEGIES = ("single", "ddp", "fsdp", "deepspeed")

_NO_FSDP = (
    "FSDP is not supported yet: accelerate enables it on GPUs only (a CPU launch silently "
    "falls back to DDP), so it is untested here, and the adapter saving and checkpoints read "
    "unsharded parameters; adapters are small, so DDP's full replica of them costs little"
)
_UNTESTED_DS = (
    "DeepSpeed is not tested with loravariants (the deepspeed package is not part of the "
    "tested setup); the training loop's gradient-accumulation, clipping and checkpoint code is "
    "accelerate's plain path"
)

#: variant -> strategy -> None (supported) or the reason it is not.
SUPPORT: dict[str, dict[str, str | None]] = {
    "lora": {"single": None, "ddp": None, "fsdp": _NO_FSDP, "deepspeed": _UNTESTED_DS},
    "cola": {
        "single": None,
        # equal-rank restarts re-initialise the same parameters in place; every rank draws the
        # new link from the same seeded generator, so DDP's replicas stay equal
        "ddp": None,
        # and beyond _NO_FSDP: the fold writes into the frozen weight, which FSDP shards
        "fsdp": _NO_FSDP,
        "deepspeed": _UNTESTED_DS,
    },
    "multilora": {
        "single": None,
        "ddp": None,
        "fsdp": _NO_FSDP,
        "deepspeed": _UNTESTED_DS,
    },
    "mixlora": {
        "single": None,
        # unrouted experts: find_unused_parameters; balance loss: data_parallel_statistics
        "ddp": None,
        "fsdp": _NO_FSDP,
        "deepspeed": _UNTESTED_DS,
    },
}


def launch_strategy() -> str:
    """The strategy this process was launched with, from what ``accelerate launch`` (or
    ``torchrun``) puts in the environment: ``fsdp`` / ``deepspeed`` when the launch config asks
    for them, ``ddp`` for several processes, else ``single``.

    Read from the request rather than from an ``Accelerator``: on a machine without GPUs
    accelerate turns an FSDP launch into multi-CPU DDP without a word, and building an
    Accelerator for a DeepSpeed launch fails when the package is missing; the refusal must come
    first, and name the real reason.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    return "ddp" if world > 1 else "single"


def refuse_launched(command: str) -> None:
    """``compare`` (and ``train --run``) run in one process: under a multi-process launch every
    process would run the whole grid, and all but one would find the output folder locked.

    Raises:
        ValueError: launched as one of several processes, naming what to do instead.
    """
    strategy = launch_strategy()
    if strategy != "single":
        raise ValueError(
            f"{command} runs in one process, but this one was launched for {strategy} "
            f"(WORLD_SIZE={os.environ.get('WORLD_SIZE', '?')}); spread a comparison over "
            "processes or machines with --shard i/N, or train one model over several "
            "processes with loravariants.train.train() under accelerate launch "
            "(docs/distributed.md)"
        )


def supported_strategies(variant: str) -> list[str]:
    """The strategies ``variant`` supports, in :data:`STRATEGIES` order."""
    table = SUPPORT.get(variant, {})
    return [s for s in STRATEGIES if s in table and table[s] is None]


def check_supported(model: nn.Module, strategy: str) -> None:
    """Refuse to train ``model``'s adapters under ``strategy`` when a pair is not supported.

    Args:
        model: a model with adapters attached (not yet wrapped by accelerate).
        strategy: one of :data:`STRATEGIES` (:func:`launch_strategy`).

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
