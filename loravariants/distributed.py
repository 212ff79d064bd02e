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
from dataclasses import dataclass
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
    "is_sharded",
    "MemoryPlan",
    "memory_plan",
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
            "processes or machines with --shard i/N, or train one row over several "
            "processes with loravariants train --run ROW under accelerate launch "
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

    A parameter can have a gradient on one process and none on another (an adapter whose
    forward skips a parameter on some inputs; MixLoRA's dispatch does not: an expert no token
    of a process reached gets a zero gradient there, so all processes agree): it counts as
    zero there, so the mean is the one-process gradient, and no process waits for a reduction
    another one skips. One that no process has a gradient for keeps ``grad None``, as in one
    process (AdamW then skips it). Two
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


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one process holds at the peak of an FSDP2 training step (:func:`memory_plan`).

    Attributes:
        base_shard: the frozen base's share of this process (its rows of every weight).
        gathered: frozen weights all-gathered at once: the root unit (embeddings, lm_head and
            final norm, kept gathered through the step) and two decoder layers (the one
            computing and the next, prefetched).
        trainable: weights, gradients and the two AdamW moments of every trained parameter
            (adapters, and LongLoRA's embeddings / norms), fp32 and whole on every process.
        checkpoints: the decoder layers' inputs that gradient checkpointing keeps (without
            it: every layer's activations).
        layer_work: one decoder layer's activations, recomputed in its backward.
        logits: the lm_head output and the loss's fp32 copies (upcast, log-softmax).
    """

    base_shard: int
    gathered: int
    trainable: int
    checkpoints: int
    layer_work: int
    logits: int

    @property
    def total(self) -> int:
        return (
            self.base_shard
            + self.gathered
            + self.trainable
            + self.checkpoints
            + self.layer_work
            + self.logits
        )


def memory_plan(
    model_config: Any,
    adapter: AdapterConfig,
    seq_len: int,
    batch_size: int = 1,
    world: int = 8,
    trainable: tuple[str, ...] = (),
    weight_bytes: int = 2,
    activation_bytes: int = 2,
    gradient_checkpointing: bool = True,
    s2_attn: bool = True,
) -> MemoryPlan:
    """What one process of an FSDP2 run holds at the peak of a step, from the model's shapes.

    The parameter counts are exact: the model is built on the meta device from
    ``model_config`` (no memory), ``adapter`` attached and ``trainable`` marked, as training
    does. Activations are per token, what autograd saves in a decoder layer (measured on a
    tiny Llama, tests/test_fsdp.py): ``4h + 2kv + 3I + heads`` values (two norm outputs, q,
    k, v, the attention output and its projection's input, the softmax log-sum-exp per head;
    the MLP's gate, up and down inputs), plus ``2h`` when the norms train (their normalised
    inputs). MixLoRA's dispatch (one autograd Function that recomputes its experts in
    backward) adds per token the FFN input ``h`` (kept by the Function and the router; G and U
    are the frozen FFN's own), the router's fp32 input copy ``h`` (4 bytes each; none when
    activations are fp32), and, in bytes whatever the activation dtype, the fp32 router
    probabilities ``4E``, the top-k indices ``8k`` (int64), the top-k probabilities, their
    renormalised weights and their sum ``4(2k + 1)``; and once per layer its experts' factors
    stacked for the forward, ``4 E r (h + I)`` bytes per adapted FFN projection (fp32). The
    adapters' rank-``r`` codes are left out (``r << h``). Attention is assumed
    to run in a memory-efficient kernel (flash / SDPA), so no ``n x n`` score matrix; S2-Attn's
    shifted half of the heads adds ``(h + 2kv) / 2`` (an estimate, not measured). The logits
    cost ``2 + 4 + 4`` bytes per vocabulary entry (bf16 output, fp32 upcast, fp32
    log-softmax). Allocator slack, the CUDA context and
    communication buffers are not counted.

    Args:
        model_config: a transformers config of a Llama-like model (``hidden_size``,
            ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
            ``num_key_value_heads``, ``vocab_size``).
        adapter: the adapter trained.
        seq_len: tokens per sequence ``n``.
        batch_size: sequences per process ``b`` (``train.batch_size``).
        world: processes the base is sharded over.
        trainable: whole modules trained besides the adapter (``"embed"``, ``"norm"``).
        weight_bytes: bytes per frozen weight (2: bf16).
        activation_bytes: bytes per activation (2: bf16 autocast).
        gradient_checkpointing: keep only each layer's input (else every activation).
        s2_attn: training attention is S2-Attn (LongLoRA).

    Returns:
        A :class:`MemoryPlan`.
    """
    import transformers

    from .inject import attach, mark_trainable
    from .longlora.context import trainable_module_names

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(model_config)
    attach(model, adapter)
    if trainable:
        mark_trainable(model, trainable_module_names(model, trainable))
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = model.model.layers
    layer_frozen = sum(p.numel() for p in layers[0].parameters() if not p.requires_grad)
    root_frozen = frozen - sum(
        p.numel() for layer in layers for p in layer.parameters() if not p.requires_grad
    )
    h, inter = model_config.hidden_size, model_config.intermediate_size
    heads = model_config.num_attention_heads
    kv = (h // heads) * getattr(model_config, "num_key_value_heads", heads)
    per_token = 4 * h + 2 * kv + 3 * inter + heads
    if "norm" in trainable:  # a trained norm weight also keeps its normalised input
        per_token += 2 * h
    if s2_attn:
        per_token += (h + 2 * kv) // 2
    tokens = batch_size * seq_len
    n_layers = len(layers)
    layer_work = tokens * per_token * activation_bytes
    top_k = getattr(adapter, "top_k", 0)
    if top_k:  # MixLoRA: the routing (fp32 / int64 whatever the dtype) and the FFN input
        router_copy = 4 * h if activation_bytes != 4 else 0
        per_token_bytes = h * activation_bytes + router_copy
        per_token_bytes += 4 * adapter.num_experts + 8 * top_k + 4 * (2 * top_k + 1)
        stacked = 4 * adapter.num_experts * adapter.expert_rank * (h + inter)
        layer_work += tokens * per_token_bytes + stacked * len(adapter.ffn_projections)
    checkpoints = tokens * h * activation_bytes * n_layers
    if not gradient_checkpointing:
        checkpoints, layer_work = n_layers * layer_work, 0
    return MemoryPlan(
        base_shard=-(-frozen * weight_bytes // world),
        gathered=(root_frozen + 2 * layer_frozen) * weight_bytes,
        trainable=trained * 4 * 4,
        checkpoints=checkpoints,
        layer_work=layer_work,
        logits=tokens * model_config.vocab_size * (2 + 4 + 4),
    )


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 holds some of ``model``'s parameters as shards (DTensors): a forward pass
    then needs every process, and a full tensor a gather (``.full_tensor()``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
