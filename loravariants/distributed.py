"""What each variant supports under accelerate's strategies, checked before any work.

    accelerate launch --config_file configs/accelerate/ddp.yaml ...   -> strategy "ddp"
    accelerate launch with an FSDP / DeepSpeed config             -> "fsdp" / "deepspeed"
    python ... (no launcher, or one process)                      -> strategy "single"

Each adapter's config decides what it supports (:meth:`AdapterConfig.unsupported_strategy`;
:func:`support_table` lists it for every registered variant, as docs/distributed.md does). A
pair that is not supported is refused by :func:`check_supported` (called first by ``train()``,
with :func:`launch_strategy`: before accelerate is set up, the output folder touched or the
model wrapped), naming the strategies that adapter supports.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, ExitStack
from typing import Any

import torch
from torch import nn

from .adapters.base import VARIANTS, AdapterConfig
from .inject import adapter_config, adapter_names, iter_adapters

__all__ = [
    "STRATEGIES",
    "support_table",
    "supported_strategies",
    "launch_strategy",
    "refuse_launched",
    "check_supported",
    "statistics_context",
    "fsdp_accelerator",
    "average_replicated_gradients",
]

#: the strategies a run can have; "single" is one process (no launcher, or one process)
STRATEGIES = ("single", "ddp", "fsdp", "deepspeed")


def support_table() -> dict[str, dict[str, str | None]]:
    """variant -> strategy -> None (supported) or the reason it is not, for every registered
    variant at its default config (:meth:`AdapterConfig.unsupported_strategy`; a config's own
    fields may refuse more, e.g. COLA's rank step-down under DDP)."""
    return {
        name: {strategy: cls().unsupported_strategy(strategy) for strategy in STRATEGIES}
        for name, cls in sorted(VARIANTS.items())
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


def supported_strategies(config: AdapterConfig) -> list[str]:
    """The strategies an adapter ``config`` supports, in :data:`STRATEGIES` order."""
    return [s for s in STRATEGIES if config.unsupported_strategy(s) is None]


def check_supported(model: nn.Module, strategy: str) -> None:
    """Refuse to train ``model``'s adapters under ``strategy`` when a pair is not supported.

    Each adapter's config decides (:meth:`AdapterConfig.unsupported_strategy`).

    Args:
        model: a model with adapters attached (not yet wrapped by accelerate).
        strategy: one of :data:`STRATEGIES` (:func:`launch_strategy`).

    Raises:
        ValueError: one line naming the adapter, its variant, the strategy, why, and the
            strategies that adapter supports.
    """
    for name in adapter_names(model):
        config = adapter_config(model, name)
        reason = config.unsupported_strategy(strategy)
        if reason is not None:
            others = ", ".join(supported_strategies(config)) or "none"
            raise ValueError(
                f"adapter {name!r} ({config.variant}) cannot train under {strategy}: {reason}; "
                f"supported strategies for it: {others} (see docs/distributed.md)"
            )


def statistics_context(accelerator: Any, model: nn.Module) -> AbstractContextManager:
    """The context a data-parallel training loop runs in: each adapter layer type in ``model``
    makes its statistics cover the global batch (:meth:`AdapterLayer.data_parallel_statistics`;
    MixLoRA's balance loss and router statistics); nothing for one process."""
    stack = ExitStack()
    if accelerator.num_processes == 1:
        return stack

    def reduce(t: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(t, reduction="sum")

    for layer_type in {type(layer) for _, _, layer in iter_adapters(model)}:
        stack.enter_context(layer_type.data_parallel_statistics(reduce))
    return stack


#: the distributed type accelerate gave this launch before FSDP was set (fsdp_accelerator)
_LAUNCH_TYPE: dict[str, Any] = {}


def fsdp_accelerator(model: nn.Module, **kwargs: Any) -> Any:
    """An ``Accelerator`` for an FSDP launch: FSDP2 with the launch config's ``fsdp_config``
    (read from the environment ``accelerate launch`` sets), on GPUs and on CPUs (gloo).

    FSDP2 shards the frozen base (what it saves over DDP); the modules holding trainable
    parameters (the adapters) are left out of it (``ignored_modules``) and stay whole on every
    process, as under DDP, so that saving, checkpoints and the returned model read ordinary
    tensors. Their gradients are averaged by :func:`average_replicated_gradients`.

    accelerate 1.15 turns FSDP on for GPU-like distributed types only; on CPU it quietly runs
    multi-CPU DDP. torch's FSDP2 itself runs on CPU with gloo, and accelerate's FSDP2 code
    (``prepare``, ``clip_grad_norm_``, ``no_sync``) does too once its state says FSDP, so that
    is set here as accelerate sets it on GPUs (``AcceleratorState.__init__``).

    Args:
        model: the model to be prepared (not yet wrapped).
        **kwargs: passed to ``Accelerator`` (not ``fsdp_plugin``).

    Raises:
        ValueError: the launch config asks for FSDP1 (``fsdp_version: 1``), or accelerate did
            not set up FSDP2.
    """
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    owners = [
        m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    plugin = FullyShardedDataParallelPlugin(ignored_modules=owners)  # + the FSDP_* environment
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"fsdp_version {plugin.fsdp_version} is not supported: loravariants trains under "
            "FSDP2 only; set fsdp_version: 2 in the accelerate config "
            "(configs/accelerate/fsdp.yaml)"
        )
    # A second train() in this process: the process state still says FSDP (set by the first
    # one, or by accelerate itself on GPUs), and accelerate then skips the branch that installs
    # the plugin. Put back the launch's own type so the plugin is installed again.
    PartialState(cpu=bool(kwargs.get("cpu", False)))  # the launch's processes (kept)
    shared = PartialState._shared_state
    if shared["distributed_type"] == DistributedType.FSDP:
        shared["distributed_type"] = _LAUNCH_TYPE.get("type", DistributedType.MULTI_CPU)
    else:
        _LAUNCH_TYPE["type"] = shared["distributed_type"]
    accelerator = Accelerator(fsdp_plugin=plugin, **kwargs)
    state = AcceleratorState()
    if state.distributed_type == DistributedType.MULTI_CPU:
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if not accelerator.is_fsdp2:
        raise ValueError(
            f"an FSDP launch, but accelerate set up {accelerator.distributed_type}; "
            "see docs/distributed.md"
        )
    return accelerator


def average_replicated_gradients(accelerator: Any, params: list[nn.Parameter]) -> None:
    """Average over processes the gradients of parameters FSDP left whole (the adapters,
    :func:`fsdp_accelerator`): FSDP reduces only the ones it shards.

    A parameter can have a gradient on one process and none on another (a MixLoRA expert that
    only the other process's tokens reached): it counts as zero there, so the mean is the
    one-process gradient, and no process waits for a reduction another one skips. One that no
    process reached keeps ``grad None``, as in one process (AdamW then skips it). Two
    collectives in all: which parameters have a gradient anywhere, then one flat buffer of
    them (fp32). Sharded parameters (DTensors) are left alone. Collective: every process calls
    it with the same ``params``.
    """
    from torch.distributed.tensor import DTensor

    whole = [p for p in params if not isinstance(p, DTensor)]
    if not whole:
        return
    device = whole[0].device
    has = torch.tensor([p.grad is not None for p in whole], dtype=torch.float32, device=device)
    has = accelerator.reduce(has, reduction="sum")
    reached = [p for p, h in zip(whole, has.tolist(), strict=True) if h > 0]
    if not reached:
        return
    flat = torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
            for p in reached
        ]
    )
    flat = accelerator.reduce(flat, reduction="mean")
    start = 0
    for p in reached:
        n = p.numel()
        p.grad = flat[start : start + n].view_as(p).to(p.dtype)
        start += n
