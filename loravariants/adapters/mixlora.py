"""MixLoRA: a top-k router over LoRA experts that share one frozen FFN (TUDB-Labs,
arXiv 2404.15159), plus one plain LoRA per attention projection.

::

                 ┌──────────────► router R (E x hidden, fp32) ─► softmax ─► top-k ─► w (renorm.)
                 │
          x ─────┼─► W_gate x = G ─┐   (frozen, computed once for all tokens)
                 └─► W_up   x = U ─┤
                                   ▼   per expert e, on its routed tokens only:
                     g_e = G + s B_ge A_ge x,   u_e = U + s B_ue A_ue x,   a_e = act(g_e) * u_e
                     y_e = W_down a_e + s B_de A_de a_e

    h = sum_{e in top-k(x)} w_e(x) · y_e(x),        sum_e w_e = 1

    balance loss = coef · E · sum_i f_i P_i    (f_i: fraction of tokens routed to expert i,
                                                P_i: mean router probability of expert i)

with ``f`` and ``P`` taken over the real (non-padding) tokens of *all* the adapter's MixLoRA
layers at once, as MoE-PEFT computes it (``balance_loss_aggregation="global"``, the default),
or per layer and then averaged over the layers (``"per_layer"``).

Padding. The adapter only sees hidden states, so the attention mask reaches it through
:func:`token_mask`: attaching MixLoRA installs a forward pre-hook on the model that records the
``attention_mask`` argument of each call (a 2-D ``(batch, seq)`` mask, 1 = real token) for the
duration of that call; ``with token_mask(mask): ...`` sets it by hand for other call styles.
The mask travels with the frozen FFN's context, so :func:`~loravariants.adapters.base.route_rows`
hands each adapter the mask rows of its own batch rows.

The global loss is not a sum of per-layer losses, yet ``lv.aux_loss(model)`` sums the layers'
``aux_loss()``. With ``C_i = sum_l c_{l,i}`` (assignments to expert i over all layers, no
gradient), ``S_{l,i}`` (layer l's summed probabilities of expert i) and ``N`` (real tokens over
all layers), each layer returns ``coef · E · sum_i C_i S_{l,i} / N^2``; these shares add up to the
global loss exactly, value and gradient.

How it is computed. The host adds ``update(x) = h - base(x)`` to the frozen FFN's output
``base(x) = W_down a_0`` with ``a_0 = act(G) * U``. Because the weights sum to one and
``W_down`` is linear,

    h - base(x) = W_down [sum_e w_e (a_e - a_0)] + sum_e w_e s B_de A_de a_e

so each (token, slot) pair contributes one intermediate-space difference and its down-LoRA
term; the frozen down projection then runs once over all tokens instead of once per pair. The
experts' factors are stacked and every pair is computed at once (:func:`_expert_block`): no
loop over the experts, no gather of the frozen projections, no host sync; a custom autograd
Function (:class:`_Experts`) recomputes each block of tokens in the backward instead of keeping
the per-pair intermediates (docs/benchmarks.md measures both).
"""

# Over 500 lines on purpose: one readable file per method (the config, the routing, the
# balance loss, the padding mask and the layer), so MixLoRA can be read in one place.

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import check_range
from .base import (
    AdapterConfig,
    AdapterHost,
    AdapterLayer,
    iter_frozen_modules,
    match_target,
    model_state,
    register_variant,
)
from .lora import LoRAConfig, LoRALinear

__all__ = [
    "MixLoRAConfig",
    "MixLoRAFFN",
    "FFN_PROJECTIONS",
    "AGGREGATIONS",
    "ffn_activation_name",
    "record_attention_mask",
    "token_mask",
    "data_parallel_statistics",
]

#: the frozen FFN projections MixLoRA knows (Llama, Mistral, Qwen2, Gemma naming).
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_FUSED = ("gate_up_proj",)  # Phi-3: not supported (clear error)
#: how the balance loss combines the layers: MoE-PEFT's all-layers-at-once, or a per-layer mean.
AGGREGATIONS = ("global", "per_layer")


@register_variant
@dataclass
class MixLoRAConfig(AdapterConfig):
    """MixLoRA: E LoRA experts on the FFN behind a top-k router, LoRA on attention.

    Attributes:
        num_experts: E, >= 1. Default 8 (paper and reference code).
        top_k: experts per token, in [1, E]. Default 2 (paper and reference code).
        r: attention LoRA rank, >= 1. Default 8.
        alpha: attention LoRA scaling numerator, > 0. Default 16.
        dropout: attention LoRA dropout, in [0, 1). Default 0.05 (the `mixlora` package's
            loader refuses 0).
        expert_r / expert_alpha / expert_dropout: the experts' LoRA; ``None`` = the attention
            LoRA's value. Default ``None``.
        router_aux_loss_coef: balance-loss coefficient, >= 0. Default 0.01: the MixLoRA
            README's example (the reference code's default is 0.001); 0 switches it off.
        balance_loss_aggregation: ``"global"`` (default, MoE-PEFT): ``f`` and ``P`` over the
            real tokens of all MixLoRA layers at once; ``"per_layer"``: the loss of each layer,
            averaged over the layers. Padding is excluded in both (see :func:`token_mask`).
        router_init_range: std of the router's normal init, > 0. Default 0.02.
        jitter_noise: eps of the multiplicative U(1-eps, 1+eps) noise on the router input,
            training only, in [0, 1). Default 0.
        target_modules: attention projections given one plain LoRA. Default q, k, v, o;
            ``[]`` = no attention LoRA, FFN experts only. As in MixLoRA / MoE-PEFT configs, FFN
            names (``gate_proj``, ``up_proj``, ``down_proj``) may be listed here too: they are
            taken out and become ``ffn_projections``.
        ffn_projections: FFN projections given per-expert LoRA, a non-empty subset of
            ``gate_proj, up_proj, down_proj``. Default ``None``: the FFN names listed in
            ``target_modules``, or all three when it lists none. Given together with FFN names
            in ``target_modules``, both must name the same projections.
    """

    variant: ClassVar[str] = "mixlora"
    empty_targets_ok: ClassVar[bool] = True
    output_fields: ClassVar[tuple[str, ...]] = ("alpha", "expert_lora_alpha", "top_k")
    # match_params sets the attention LoRA's and the experts' rank alike
    rank_fields: ClassVar[tuple[str, ...]] = ("r", "expert_r")
    formats: ClassVar[tuple[str, ...]] = ("native", "mixlora")
    file_type: ClassVar[str | None] = "MIXLORA"  # MoE-PEFT's peft_type (loravariants.io.mixlora)
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    num_experts: int = 8
    top_k: int = 2
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    expert_r: int | None = None
    expert_alpha: float | None = None
    expert_dropout: float | None = None
    router_aux_loss_coef: float = 0.01
    router_init_range: float = 0.02
    jitter_noise: float = 0.0
    ffn_projections: list[str] | None = None
    balance_loss_aggregation: str = "global"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("num_experts", self.num_experts, low=1, integer=True)
        check_range("top_k", self.top_k, low=1, high=self.num_experts, integer=True)
        check_range("r", self.r, low=1, integer=True)
        check_range("alpha", self.alpha, low=0, low_open=True)
        check_range("dropout", self.dropout, low=0, high=1, high_open=True)
        if self.expert_r is not None:
            check_range("expert_r", self.expert_r, low=1, integer=True)
        if self.expert_alpha is not None:
            check_range("expert_alpha", self.expert_alpha, low=0, low_open=True)
        if self.expert_dropout is not None:
            check_range("expert_dropout", self.expert_dropout, low=0, high=1, high_open=True)
        check_range("router_aux_loss_coef", self.router_aux_loss_coef, low=0)
        check_range("router_init_range", self.router_init_range, low=0, low_open=True)
        check_range("jitter_noise", self.jitter_noise, low=0, high=1, high_open=True)
        if self.balance_loss_aggregation not in AGGREGATIONS:
            raise ValueError(
                f"balance_loss_aggregation must be one of {list(AGGREGATIONS)}, "
                f"got {self.balance_loss_aggregation!r}"
            )
        # MixLoRA / MoE-PEFT list the FFN projections in target_modules: read them as experts
        named_ffn: list[str] = []
        if isinstance(self.target_modules, list):
            fused = [t for t in self.target_modules if t in _FUSED]
            if fused:
                raise ValueError(
                    f"target_modules: {fused} is a fused FFN projection (Phi-3 style); MixLoRA "
                    f"supports FFNs with separate {list(FFN_PROJECTIONS)}"
                )
            named_ffn = [p for p in FFN_PROJECTIONS if p in self.target_modules]
            self.target_modules = [t for t in self.target_modules if t not in FFN_PROJECTIONS]
        fp = self.ffn_projections
        if fp is None:
            fp = named_ffn or list(FFN_PROJECTIONS)
        if (
            not isinstance(fp, (list, tuple))
            or not fp
            or len(set(fp)) != len(fp)
            or any(p not in FFN_PROJECTIONS for p in fp)
        ):
            raise ValueError(
                f"ffn_projections must be a non-empty subset of {list(FFN_PROJECTIONS)} "
                f"without repeats, got {fp!r}"
            )
        if named_ffn and set(named_ffn) != set(fp):
            raise ValueError(
                f"target_modules names the FFN projections {named_ffn} but ffn_projections is "
                f"{list(fp)}: name the expert projections in one place, or the same in both"
            )
        self.ffn_projections = list(fp)

    # -- resolved expert settings -------------------------------------------------------------
    @property
    def expert_rank(self) -> int:
        return self.r if self.expert_r is None else self.expert_r

    @property
    def expert_lora_alpha(self) -> float:
        return self.alpha if self.expert_alpha is None else self.expert_alpha

    @property
    def expert_lora_dropout(self) -> float:
        return self.dropout if self.expert_dropout is None else self.expert_dropout

    def attention_lora(self) -> LoRAConfig:
        """The plain LoRA config of the attention projections."""
        tm = self.target_modules
        return LoRAConfig(
            r=self.r,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=tm if isinstance(tm, str) else list(tm),
        )

    # -- what to wrap -------------------------------------------------------------------------
    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Attention linears matching ``target_modules`` and every FFN block.

        An FFN block is a module with ``gate_proj``, ``up_proj`` and ``down_proj`` linears and
        an ``act_fn`` (Llama, Mistral, Qwen2, Gemma).

        Raises:
            ValueError: a module looks like an FFN but is not one MixLoRA knows (fused
                ``gate_up_proj`` as in Phi-3, missing projection or activation, a projection
                already wrapped by another adapter), or the model has no FFN at all.
        """
        ffns: list[tuple[str, nn.Module]] = []
        for path, module in iter_frozen_modules(model):
            children = dict(module.named_children())
            if any(n in children for n in FFN_PROJECTIONS + _FUSED):
                check_ffn(module, path)
                ffns.append((path, module))
        if not ffns:
            raise ValueError(
                f"MixLoRA found no feed-forward block in {type(model).__name__}: it needs a "
                f"module with {list(FFN_PROJECTIONS)} linears and an act_fn"
            )
        # the balance loss excludes padding: record the attention mask of each model call
        record_attention_mask(model)
        inside = tuple(p + "." for p, _ in ffns)
        attention = [
            (path, module)
            for path, module in iter_frozen_modules(model)
            if isinstance(module, nn.Linear)
            and not path.startswith(inside)
            and match_target(path, self.target_modules)
        ]
        return attention + ffns

    def create_layer(self, path: str, module: nn.Module) -> AdapterLayer:
        if isinstance(module, nn.Linear):
            layer: AdapterLayer = LoRALinear(module, self.attention_lora())
        else:
            layer = MixLoRAFFN(module, self)
        return layer

    def on_attached(self, layers: Mapping[str, AdapterLayer]) -> None:
        """Make this adapter's MixLoRA layers one balance-loss group (their loss is computed
        over all of them: ``"global"``, or averaged: ``"per_layer"``)."""
        moe = [layer for layer in layers.values() if isinstance(layer, MixLoRAFFN)]
        group = _BalanceGroup(moe)
        for layer in moe:
            layer.aux_loss_weight = 1.0 / len(moe)
            layer._group = group

    # -- the variant contract -----------------------------------------------------------------
    @classmethod
    def describe_rank(cls, fields: Mapping[str, Any]) -> str:
        """``attn r=8; 8 experts r=8 top-2``."""
        r = fields.get("r")
        expert_r = fields.get("expert_r") or r
        return (
            f"attn r={r}; {fields.get('num_experts')} experts r={expert_r} "
            f"top-{fields.get('top_k')}"
        )

    @classmethod
    def describe_targets(cls, fields: Mapping[str, Any]) -> str:
        """The attention targets, then the FFN projections given experts."""
        targets = super().describe_targets(fields)
        return f"{targets}; FFN {','.join(fields.get('ffn_projections') or [])}"

    def stand_in(self, spec: Mapping[str, Any]) -> nn.Module:
        """A saved FFN's shape-only stand-in also needs an ``act_fn`` (never run: the
        layer built on it only holds tensors)."""
        module = super().stand_in(spec)
        if spec.get("type") != "linear":
            module.act_fn = nn.SiLU()
        return module

    # -- the MixLoRA ecosystem's file format (MoE-PEFT, the `mixlora` package) -----------------
    # loravariants.io.mixlora writes and reads the files; the config's side is here.
    def format_fields(self, fmt: str, model: nn.Module) -> dict[str, Any]:
        """MoE-PEFT's ``adapter_config.json`` for this config (``fmt == "mixlora"``; ``{}`` for
        another format). Its ``target_modules`` lists the attention projections and the FFN
        projections that carry experts, as the reference code writes it; ``lora_alpha`` is an
        int when integral (the reference loaders assert one).

        Raises:
            ValueError: a regex ``target_modules`` (the format lists names).
        """
        if fmt != "mixlora":
            return {}
        tm = self.target_modules
        if isinstance(tm, str):
            raise ValueError(
                "the MixLoRA format lists target_modules by name; a regex target_modules "
                f"({tm!r}) cannot be written"
            )
        alpha, expert_alpha = _int_if_integral(self.alpha), _int_if_integral(self.expert_lora_alpha)
        if not (isinstance(alpha, int) and isinstance(expert_alpha, int)):
            warnings.warn(
                f"writing lora_alpha {self.alpha} / expert lora_alpha {self.expert_lora_alpha}: "
                "the `mixlora` package and MoE-PEFT assert an int lora_alpha and will refuse "
                "the file",
                stacklevel=4,
            )
        return {
            "peft_type": self.file_type,
            "routing_strategy": "mixlora",
            "task_type": "CAUSAL_LM",
            "bias": "none",
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "r": int(self.r),
            "lora_alpha": alpha,
            "lora_dropout": float(self.dropout),
            "target_modules": list(tm) + list(self.ffn_projections),
            "act_fn": ffn_activation_name(model),
            "expert_lora": {
                "r": int(self.expert_rank),
                "lora_alpha": expert_alpha,
                "lora_dropout": float(self.expert_lora_dropout),
            },
            "router_aux_loss_coef": float(self.router_aux_loss_coef),
            "router_init_range": float(self.router_init_range),
            "jitter_noise": float(self.jitter_noise),
            # ours only; the ecosystem's loaders read their keys by name and ignore it
            "balance_loss_aggregation": self.balance_loss_aggregation,
        }

    @classmethod
    def from_format(cls, fmt: str, fields: Mapping[str, Any]) -> MixLoRAConfig:
        """The config of a MoE-PEFT ``adapter_config.json`` (its own keys; the format checked
        their JSON types). Absent keys take the reference code's defaults (coefficient 0.001,
        init range 0.02, no jitter); FFN names in ``target_modules`` become
        ``ffn_projections``."""
        targets = fields["target_modules"]
        expert = fields.get("expert_lora") or {}
        ffn = [t for t in targets if t in FFN_PROJECTIONS]

        def value(meta: Mapping[str, Any], key: str, default: float | None) -> float | None:
            return default if meta.get(key) is None else float(meta[key])

        return cls(
            num_experts=fields["num_experts"],
            top_k=fields["top_k"],
            r=fields["r"],
            alpha=float(fields["lora_alpha"]),
            dropout=value(fields, "lora_dropout", 0.0),
            expert_r=expert.get("r"),
            expert_alpha=value(expert, "lora_alpha", None),
            expert_dropout=value(expert, "lora_dropout", None),
            router_aux_loss_coef=value(fields, "router_aux_loss_coef", 0.001),
            router_init_range=value(fields, "router_init_range", 0.02),
            jitter_noise=value(fields, "jitter_noise", 0.0),
            target_modules=[t for t in targets if t not in FFN_PROJECTIONS],
            ffn_projections=ffn or list(FFN_PROJECTIONS),
            balance_loss_aggregation=fields.get("balance_loss_aggregation", "global"),
        )


def _int_if_integral(value: float) -> int | float:
    """``16.0 -> 16``: the reference loaders assert an int ``lora_alpha``."""
    value = float(value)
    return int(value) if value.is_integer() else value


def check_ffn(module: nn.Module, path: str = "") -> None:
    """Raise a ``ValueError`` naming ``path`` unless ``module`` is an FFN MixLoRA supports."""
    where = f"{path or 'module'} ({type(module).__name__})"
    children = dict(module.named_children())
    if any(n in children for n in _FUSED):
        raise ValueError(
            f"{where} has a fused gate_up_proj (Phi-3 style); MixLoRA supports FFNs with "
            f"separate {list(FFN_PROJECTIONS)}"
        )
    for name in FFN_PROJECTIONS:
        child = children.get(name)
        if isinstance(child, AdapterHost):
            raise ValueError(
                f"{where}.{name} is already wrapped by another adapter; MixLoRA needs the "
                "FFN's projections unwrapped"
            )
        if not isinstance(child, nn.Linear):
            raise ValueError(
                f"{where} is not an FFN MixLoRA knows: it needs {list(FFN_PROJECTIONS)} "
                f"as nn.Linear, {name} is {'missing' if child is None else type(child).__name__}"
            )
    if not callable(getattr(module, "act_fn", None)):
        raise ValueError(f"{where} is not an FFN MixLoRA knows: it has no act_fn")


def ffn_activation_name(model: nn.Module) -> str:
    """The FFN activation's name as the `mixlora` package writes it (``"silu"``, ...).

    Read from the model config (``hidden_act``, Gemma's ``hidden_activation``).

    Raises:
        ValueError: the model has no such config entry.
    """
    cfg = getattr(model, "config", None)
    for key in ("hidden_act", "hidden_activation"):
        value = getattr(cfg, key, None)
        if isinstance(value, str):
            return value
    raise ValueError(
        f"cannot tell the FFN activation of {type(model).__name__}: its config has no hidden_act"
    )


# ---------------------------------------------------------------------------------------------
# the attention mask, for a balance loss without padding
# ---------------------------------------------------------------------------------------------

# The masks of the forwards under way, innermost last, read by every MixLoRA layer. A
# ContextVar, as `route_rows` keeps its routing: each thread (and asyncio task) has its own, so
# two threads running MixLoRA models on different batches never read each other's mask.
_TOKEN_MASKS: contextvars.ContextVar[tuple[torch.Tensor | None, ...]] = contextvars.ContextVar(
    "loravariants_token_masks", default=()
)


def _current_mask() -> torch.Tensor | None:
    masks = _TOKEN_MASKS.get()
    return masks[-1] if masks else None


_MASK_HOOK = "mixlora.attention_mask"  # its name in the model's AdapterState.model_hooks


@contextlib.contextmanager
def token_mask(mask: torch.Tensor | None) -> Iterator[None]:
    """Within the block, MixLoRA's balance loss and router statistics count only real tokens.

    A model with MixLoRA attached records the ``attention_mask`` it is called with by itself
    (:func:`record_attention_mask`); use this for a model called without one (``inputs_embeds``
    and a separate mask, a hand-written model) or for a standalone :class:`MixLoRAFFN`.

    Args:
        mask: ``(batch, seq)``, non-zero = real token, 0 = padding; or ``None`` (every token
            counts). Its shape must match the FFN input's leading dimensions ``(batch, seq)``;
            a longer ``seq`` (generation with a KV cache) is read from the right, as
            transformers does.

    Example::

        with token_mask(attention_mask):
            out = model(inputs_embeds=embeds)
        loss = lm_loss + lv.aux_loss(model)
    """
    token = _TOKEN_MASKS.set((*_TOKEN_MASKS.get(), mask))
    try:
        yield
    finally:
        _TOKEN_MASKS.reset(token)


# ---------------------------------------------------------------------------------------------
# data parallelism: the balance loss of the global batch
# ---------------------------------------------------------------------------------------------

# The sum over data-parallel processes while a training loop runs under DDP, else None.
_REDUCE: list[Callable[[torch.Tensor], torch.Tensor] | None] = [None]


@contextlib.contextmanager
def data_parallel_statistics(reduce: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, the balance loss and router statistics count every process's tokens.

    The balance loss ``coef · E · sum_i f_i P_i`` is not a mean of per-process losses: ``f`` and
    ``P`` are fractions of the global batch. Inside this block each layer sums its expert
    assignments ``c`` and real-token count ``n`` over the processes (one ``reduce`` per adapter
    and forward, in :meth:`MixLoRAFFN.aux_loss`; no gradient flows through counts) and returns
    its *process share* ``coef · E · sum_i C_i S_i / N^2``, with ``C``, ``N`` global and ``S``
    (summed router probabilities, which carry the gradient) local. The shares of all processes
    add up to the one-process loss of the global batch, value and gradient; so the training loop
    scales the share by the number of processes before DDP averages gradients, and logs the
    sum of the shares. :meth:`MixLoRAFFN.router_stats` then gives the global routing.

    Every process must call ``lv.aux_loss`` after each forward in the same order (the training
    loop does), since the reduction is a collective.

    Args:
        reduce: sums a tensor over the data-parallel processes and returns the sum (e.g.
            ``lambda t: accelerator.reduce(t, reduction="sum")``); it must not modify its input.
    """
    previous = _REDUCE[0]
    _REDUCE[0] = reduce
    try:
        yield
    finally:
        _REDUCE[0] = previous


def record_attention_mask(model: nn.Module) -> None:
    """Make ``model`` hand its ``attention_mask`` argument to MixLoRA layers, call by call.

    Installs (once per model) a forward pre-hook that reads ``attention_mask`` from the call's
    keyword or positional arguments and, when it is a 2-D ``(batch, seq)`` tensor, sets it as
    the :func:`token_mask` for the duration of the call (a forward hook that always runs puts
    the previous one back). Other masks (``None``, a 4-D custom mask) leave the current one in
    place. ``attach`` calls this for every MixLoRA adapter; it never changes the model's output.
    """
    hooks = model_state(model).model_hooks
    if _MASK_HOOK in hooks:
        return
    position = None
    try:
        names = list(inspect.signature(model.forward).parameters)
        position = names.index("attention_mask")
    except (TypeError, ValueError):  # no signature, or no attention_mask parameter
        pass
    recorder = _MaskRecorder(position)
    model.register_forward_pre_hook(recorder.before, with_kwargs=True)
    model.register_forward_hook(recorder.after, with_kwargs=True, always_call=True)
    hooks.add(_MASK_HOOK)


class _MaskRecorder:
    """The two hooks of :func:`record_attention_mask` (methods of a module-level class, so a
    model carrying them can still be pickled). They push and pop the calling thread's masks
    (:data:`_TOKEN_MASKS`), so they keep no state of their own."""

    def __init__(self, position: int | None) -> None:
        self.position = position  # of attention_mask among forward's positional parameters

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and self.position is not None and len(args) > self.position:
            mask = args[self.position]
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            mask = _current_mask()  # another kind of mask (or none) leaves the current one
        _TOKEN_MASKS.set((*_TOKEN_MASKS.get(), mask))

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        _TOKEN_MASKS.set(_TOKEN_MASKS.get()[:-1])


def _real_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(*x.shape[:-1])`` fp32: 1 for a real token, 0 for padding (all ones without a mask).

    Raises:
        ValueError: the current mask does not fit ``x``.
    """
    lead = x.shape[:-1]
    mask = _current_mask()
    if mask is None:
        return torch.ones(lead, dtype=torch.float32, device=x.device)
    if tuple(mask.shape) != tuple(lead):
        if len(lead) == 2 and mask.dim() == 2 and mask.shape[0] == lead[0] >= 1:
            if mask.shape[1] >= lead[1]:  # KV cache: the mask covers past and new tokens
                mask = mask[:, mask.shape[1] - lead[1] :]
        elif mask.numel() == math.prod(lead):
            mask = mask.reshape(lead)
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(
            f"the attention mask has shape {tuple(mask.shape)} but the MixLoRA FFN input is "
            f"{tuple(x.shape)}: it needs a (batch, seq) mask of the input's leading dimensions "
            "(see loravariants.adapters.mixlora.token_mask)"
        )
    return (mask != 0).to(device=x.device, dtype=torch.float32)


class _BalanceGroup:
    """The MixLoRA layers of one adapter: the global balance loss is computed over all of them.

    ``totals()`` sums, over the layers that ran in the last forward, the (no-gradient) expert
    assignment counts ``C (E,)`` and the real-token count ``N``; cached until a layer runs again.
    Inside :func:`data_parallel_statistics` every layer's counts are first summed over the
    processes (one collective for the whole group) and kept in ``global_counts``.
    """

    def __init__(self, layers: list[MixLoRAFFN]) -> None:
        self.layers = layers
        self._key: tuple = ()
        self._totals: tuple[torch.Tensor, torch.Tensor] | None = None
        # layer -> (assignments (E,), real tokens) over all processes, for the last forward
        self.global_counts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        stats = tuple(layer._balance for layer in self.layers)
        if (
            self._totals is None
            or len(stats) != len(self._key)
            or any(a is not b for a, b in zip(stats, self._key, strict=True))
        ):
            ran = [
                (layer, st) for layer, st in zip(self.layers, stats, strict=True) if st is not None
            ]
            counts = [(st[0], st[2]) for _, st in ran]
            self.global_counts = {}
            if _REDUCE[0] is not None:
                # float64: counts stay exact integers far past float32's 2**24
                flat = torch.cat([torch.cat([c, n[None]]) for c, n in counts]).double()
                summed = _REDUCE[0](flat).to(counts[0][0].dtype).split(len(counts[0][0]) + 1)
                counts = [(t[:-1], t[-1]) for t in summed]
                self.global_counts = {
                    id(layer): c for (layer, _), c in zip(ran, counts, strict=True)
                }
            total_counts = torch.stack([c for c, _ in counts]).sum(0)
            tokens = torch.stack([n for _, n in counts]).sum()
            self._key, self._totals = stats, (total_counts, tokens)
        return self._totals

    def counts_of(self, layer: MixLoRAFFN) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``layer``'s all-process counts ``(assignments (E,), real tokens)``, or ``None`` when
        they were not summed for the forward that set its balance statistics (this group's
        cache key)."""
        if layer._balance is None or id(layer) not in self.global_counts:
            return None
        if not any(st is layer._balance for st in self._key):
            return None
        return self.global_counts[id(layer)]


# ---------------------------------------------------------------------------------------------
# the expert computation: every (token, slot) pair at once, experts' factors stacked
# ---------------------------------------------------------------------------------------------

#: The experts work on blocks of tokens of about this many (pair, intermediate) elements per
#: temporary: on the CPU small enough to stay in cache and be reused by the allocator instead
#: of page-faulted afresh (docs/benchmarks.md); elsewhere, to bound what the backward holds
#: while it recomputes one block.
_BLOCK_ELEMENTS = {"cpu": 1 << 19}
_DEFAULT_BLOCK_ELEMENTS = 1 << 23


@dataclass
class _Plan:
    """What the expert computation needs beside its tensors (fixed for one forward).

    ``proj``: the adapted projections; ``dropout``: the experts' LoRA dropout module when it
    applies (training), else ``None``; ``block``: tokens per block.
    """

    act: Callable[[torch.Tensor], torch.Tensor]
    num_experts: int
    r: int
    proj: tuple[str, ...]
    dropout: nn.Module | None
    block: int


class _Scratch:
    """Buffers that the no-grad expert forward reuses, one per per-pair temporary.

    A fresh tensor of a few MiB is a fresh mapping on the CPU: writing it first costs a page
    fault per 4 KiB page, which measured costlier than the arithmetic (docs/benchmarks.md). So
    the no-grad forward takes every per-pair temporary from here, and the blocks reuse it. On
    the CPU one scratch per thread is kept between calls (:func:`_scratch`): a block holds
    about ``_BLOCK_ELEMENTS`` elements per temporary whatever the model, so that is two
    buffers of 2 MiB (float32) in all, faulted in once instead of once per layer and forward.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous ``shape`` tensor of ``like``'s dtype and device, uninitialised."""
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if (
            buf is None
            or buf.numel() < numel
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


_THREAD_SCRATCH = threading.local()


def _scratch(device: torch.device) -> _Scratch:
    """This thread's kept scratch on the CPU; a new one elsewhere (the caching allocator of an
    accelerator reuses memory by itself, and one block there can be large)."""
    if device.type != "cpu":
        return _Scratch()
    scratch = getattr(_THREAD_SCRATCH, "scratch", None)
    if scratch is None:
        scratch = _THREAD_SCRATCH.scratch = _Scratch()
    return scratch


def _act_(act: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """``act(t)``, in ``t``'s memory for the activations that have an in-place form (SiLU,
    ReLU), else a new tensor."""
    if isinstance(act, nn.SiLU):
        return F.silu(t, inplace=True)
    if isinstance(act, nn.ReLU):
        return t.relu_()
    return act(t)


def _expert_block(
    plan: _Plan,
    x: torch.Tensor,
    G: torch.Tensor,
    U: torch.Tensor,
    a0: torch.Tensor | None,
    w: torch.Tensor,
    experts: torch.Tensor,
    W_down: torch.Tensor,
    mats: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scratch: _Scratch | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``update(x)`` of a block of tokens (see the module docstring), every pair at once.

    The experts' factors are stacked, ``A (E·r, in)`` and ``s·B^T (E·r, out)``. ``x @ A^T``
    gives every expert's code ``z (E·r)`` of a token; masked to the pair's expert (zero
    elsewhere), ``z @ s·B^T`` is exactly that expert's LoRA term. These dense products do E
    times the arithmetic of per-expert ones (cheap at ``E·r = 64`` columns) but need no sort,
    no gather or scatter of per-pair rows, no host sync and no loop over the experts. The pairs
    are laid out slot-major, ``(k, n, ·)``: slot j's rows are contiguous, so the frozen G and U
    broadcast over the slots and ``frozen + z @ s·B^T`` is one fused ``baddbmm`` (the addition
    costs no pass of its own).

    With ``scratch`` (the no-grad forward of :class:`_Experts`) every per-pair temporary lives
    in its reused buffers and is updated in place, and the result is written into ``out``;
    without it (under autograd: the backward's recomputation) everything is out of place.

    Args:
        plan: the forward's :class:`_Plan`.
        x: ``(n, hidden)``; G, U, a0: ``(n, inter)`` frozen gate, up, ``act(G) * U`` (``None``:
            computed here from G and U).
        w: ``(n, k)`` routing weights (sum to one); experts: ``(n, k)`` the chosen experts.
        W_down: ``(hidden, inter)`` frozen down projection.
        mats: ``{proj: (A (E·r, in), s·B^T (E·r, out))}``.
        scratch: buffers for the no-grad forward, or ``None``.
        out: ``(n, hidden)`` to write the result into (with ``scratch`` only), or ``None``.

    Returns:
        ``(n, hidden)`` in the compute dtype (x's): ``out`` when given.
    """
    inplace = scratch is not None
    if a0 is None:
        a0 = plan.act(G) * U
    (n, k), E = experts.shape, plan.num_experts
    r, dtype, drop = plan.r, x.dtype, plan.dropout
    select = F.one_hot(experts.T, E).to(dtype)[..., None]  # (k, n, E, 1), slot-major
    wk = w.to(dtype).T[..., None]  # (k, n, 1)

    def masked(proj: str, h: torch.Tensor) -> torch.Tensor:
        """``(k, n, E·r)``: each pair's code, zero outside its expert's ``r`` entries; ``h``
        per token ``(n, in)`` or per pair ``(k, n, in)``."""
        A = mats[proj][0].to(dtype)
        if drop is not None:
            if h.dim() == 2:  # a mask per pair, as each expert's own dropout draws it
                h = h.expand(k, n, h.shape[-1])
            h = drop(h)
        z = (h @ A.T).view(-1, n, E, r)  # (1 or k, n, E, r)
        return (z * select).view(k, n, E * r)

    def lora_plus(proj: str, frozen: torch.Tensor) -> torch.Tensor:
        """``frozen + s B_e A_e x`` for every pair, ``(k, n, inter)``: one fused product."""
        sBt = mats[proj][1].to(dtype)
        args = (frozen[None], masked(proj, x), sBt.expand(k, *sBt.shape))
        if scratch is None:
            return torch.baddbmm(*args)
        return torch.baddbmm(*args, out=scratch.get(proj, (k, n, sBt.shape[-1]), x))

    gate_up = [q for q in ("gate_proj", "up_proj") if q in plan.proj]
    down = None
    if gate_up:
        g = lora_plus("gate_proj", G) if "gate_proj" in gate_up else G[None]
        u = lora_plus("up_proj", U) if "up_proj" in gate_up else U[None]
        if inplace and "gate_proj" in gate_up:
            a = _act_(plan.act, g).mul_(u)  # (k, n, inter), in g's buffer
        else:
            a = plan.act(g) * u
        del g, u
        if "down_proj" in plan.proj:
            down = masked("down_proj", a) * wk
        # the weights sum to one: W_down sum_e w_e a_e - W_down a0 = W_down sum_e w_e (a_e - a0);
        # differences keep the update exact next to a large a0 in low precision
        if inplace:
            diff = a.sub_(a0)
            inter = diff[0].mul_(wk[0])
            for j in range(1, k):
                inter.addcmul_(diff[j], wk[j])
        else:
            diff = a - a0
            inter = diff[0] * wk[0]
            for j in range(1, k):
                inter = inter + diff[j] * wk[j]
        W = W_down.T.to(dtype)
        base = torch.matmul(inter, W, out=out) if out is not None else inter @ W
    else:  # experts on down_proj only: every expert reads a0
        down = masked("down_proj", a0) * wk
        base = None
    if down is not None:
        # the k slots' weighted codes sum into one (E·r) code per token: one small matmul
        sBd = mats["down_proj"][1].to(dtype)
        if base is None:
            base = torch.matmul(down.sum(0), sBd, out=out) if out is not None else down.sum(0) @ sBd
        elif inplace:
            base = base.addmm_(down.sum(0), sBd)
        else:
            base = base + down.sum(0) @ sBd
    return base


class _Experts(torch.autograd.Function):
    """The experts' update, blocks of tokens at a time; the backward recomputes each block.

    Only the inputs are kept for the backward (x and the frozen projections G and U, which the
    frozen FFN's own backward keeps anyway, the routing and the stacked factors): the per-pair
    intermediates of one block live only while that block is computed or differentiated, so
    training memory stays near plain LoRA's at the price of one more expert forward. ``a0`` is
    not kept either: the backward recomputes it from G and U (it is ``act(G) * U``), so its
    gradient reaches G and U directly and the one for the ``a0`` input is ``None``.
    """

    @staticmethod
    def forward(ctx, plan, x, G, U, a0, w, experts, W_down, *flat):  # noqa: D417
        mats = _unflatten(plan, flat)
        # the dropout masks of a recomputation are the forward's: the same draws, in the same
        # order, from the generator's state at this point (as torch.utils.checkpoint does)
        ctx.rng = _rng_state(x.device) if plan.dropout is not None else None
        scratch = _scratch(x.device)
        out = x.new_empty(x.shape[0], W_down.shape[0])
        for sl in _blocks(plan, x):
            _expert_block(
                plan,
                x[sl],
                G[sl],
                U[sl],
                a0[sl],
                w[sl],
                experts[sl],
                W_down,
                mats,
                scratch,
                out[sl],
            )
        ctx.plan = plan
        ctx.save_for_backward(x, G, U, w, experts, W_down, *flat)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        plan = ctx.plan
        x, G, U, w, experts, W_down, *flat = ctx.saved_tensors
        need = ctx.needs_input_grad[1:]  # x, G, U, a0, w, experts, W_down, *flat
        need = (need[0] or need[3], need[1] or need[3], need[2] or need[3], *need[4:])
        per_token = [x, G, U, w]
        grads: list[torch.Tensor | None] = [
            torch.zeros_like(t) if need[i] else None for i, t in enumerate(per_token)
        ]
        shared = [W_down, *flat]
        shared_need = [need[5], *need[6:]]
        shared_grads: list[torch.Tensor | None] = [None] * len(shared)
        with _replayed_rng(ctx.rng, x.device):
            for sl in _blocks(plan, x):
                _backward_block(
                    plan,
                    sl,
                    grad_out,
                    per_token,
                    need,
                    shared,
                    shared_need,
                    experts,
                    grads,
                    shared_grads,
                )
        gx, gG, gU, gw = grads
        return (None, gx, gG, gU, None, gw, None, *shared_grads)


def _backward_block(
    plan, sl, grad_out, per_token, need, shared, shared_need, experts, grads, shared_grads
) -> None:
    """Recompute one block under autograd and add its gradients to ``grads`` (per token, the
    block's rows) and ``shared_grads`` (W_down and the stacked factors, summed over blocks)."""
    with torch.enable_grad():
        leaves = [t[sl].detach().requires_grad_(need[i]) for i, t in enumerate(per_token)]
        params = [t.detach().requires_grad_(q) for t, q in zip(shared, shared_need, strict=True)]
        x_b, G_b, U_b, w_b = leaves
        mats = _unflatten(plan, params[1:])
        out = _expert_block(plan, x_b, G_b, U_b, None, w_b, experts[sl], params[0], mats)
        wanted = [t for t in leaves + params if t.requires_grad]
        if not wanted:
            return
        got = iter(torch.autograd.grad(out, wanted, grad_out[sl], allow_unused=True))
    for i, t in enumerate(leaves):
        if t.requires_grad and (g := next(got)) is not None:
            grads[i][sl] = g
    for i, t in enumerate(params):
        if t.requires_grad and (g := next(got)) is not None:
            shared_grads[i] = g if shared_grads[i] is None else shared_grads[i] + g


def _blocks(plan: _Plan, x: torch.Tensor) -> Iterator[slice]:
    """The row slice of each block of tokens, in order."""
    n = x.shape[0]
    step = max(1, min(n, plan.block))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU generator's state, and the device's when it has its own."""
    accelerator = None
    if device.type == "cuda":
        accelerator = torch.cuda.get_rng_state(device)
    return torch.get_rng_state(), accelerator


@contextlib.contextmanager
def _replayed_rng(state, device: torch.device) -> Iterator[None]:
    """Within the block the generators start from ``state`` (a :func:`_rng_state`); after it,
    they are where they were before (``None``: nothing changes)."""
    if state is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _unflatten(plan: _Plan, flat) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {proj: (flat[2 * i], flat[2 * i + 1]) for i, proj in enumerate(plan.proj)}


class _LoRAExpert(nn.Module):
    """One expert: a LoRA (A, B) per adapted FFN projection.

    Parameters: ``lora_A[proj]`` ``(r, in)``, ``lora_B[proj]`` ``(out, r)``, fp32; LoRA init
    (A kaiming-uniform, B zero).
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int]], r: int, device) -> None:
        super().__init__()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for proj, (in_f, out_f) in shapes.items():
            A = nn.Parameter(torch.empty(r, in_f, device=device))
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            self.lora_A[proj] = A
            self.lora_B[proj] = nn.Parameter(torch.zeros(out_f, r, device=device))


class MixLoRAFFN(AdapterLayer):
    """MixLoRA update of one frozen FFN block (see the module docstring for the equations).

    Args:
        base: the frozen FFN: ``gate_proj``, ``up_proj``, ``down_proj`` (``nn.Linear``) and
            ``act_fn``.
        config: a :class:`MixLoRAConfig`.

    Parameters (fp32):
        router: ``(E, hidden)``, bias-free, normal(0, router_init_range).
        experts: ``nn.ModuleList`` of E experts, each with ``lora_A[proj]`` / ``lora_B[proj]``
            for every ``proj`` in ``config.ffn_projections``.

    After a forward, :meth:`aux_loss` holds that forward's balance loss (``None`` before the
    first forward) and :meth:`router_stats` its routing counts. Both are kept from every
    forward, training or eval, so routing can be inspected at evaluation time; a training loop
    adds ``lv.aux_loss(model)`` right after its forward.
    """

    mergeable: ClassVar[bool] = False
    # a step may route no token to some expert: those get a zero gradient from the stacked
    # factors; an FFN skipped by route_rows gives its experts none at all
    sparse_gradients: ClassVar[bool] = True

    @classmethod
    def data_parallel_statistics(
        cls, reduce: Callable[[torch.Tensor], torch.Tensor]
    ) -> contextlib.AbstractContextManager:
        # the balance loss and router statistics of the global batch (see the function)
        return data_parallel_statistics(reduce)

    def __init__(self, base: nn.Module, config: MixLoRAConfig) -> None:
        super().__init__(base, config)
        check_ffn(base)
        hidden = base.gate_proj.in_features
        device = base.gate_proj.weight.device
        self.num_experts, self.top_k = config.num_experts, config.top_k
        self.r, self.alpha = config.expert_rank, config.expert_lora_alpha
        self.scaling = self.alpha / self.r
        self.projections = list(config.ffn_projections)
        shapes = {
            p: (getattr(base, p).in_features, getattr(base, p).out_features)
            for p in self.projections
        }
        self.router = nn.Parameter(torch.empty(config.num_experts, hidden, device=device))
        nn.init.normal_(self.router, mean=0.0, std=config.router_init_range)
        self.experts = nn.ModuleList(
            _LoRAExpert(shapes, self.r, device) for _ in range(config.num_experts)
        )
        p = config.expert_lora_dropout  # on each expert's LoRA inputs, a mask per pair
        self.dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        self.jitter_noise = config.jitter_noise
        self.aux_loss_coef = config.router_aux_loss_coef
        self.aggregation = config.balance_loss_aggregation
        self.aux_loss_weight = 1.0  # 1 / number of MixLoRA layers, set by on_attached
        self._group = _BalanceGroup([self])  # this adapter's MixLoRA layers, set by on_attached
        # last forward: (assignments per expert (E,) no grad, summed probabilities (E,), tokens)
        self._balance: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None  # (assigned (E,), tokens)

    # -- frozen part, shared by every adapter on this FFN -------------------------------------
    @staticmethod
    def base_forward(base: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Frozen FFN once for all tokens.

        Returns:
            ``base(x)`` and the context ``(G, U, a_0, real)``: gate and up projections and
            ``act(G) * U``, each ``(..., intermediate)``, and ``real (...)`` fp32, 1 for a real
            token and 0 for padding (from :func:`token_mask`; all ones without a mask).
        """
        G = base.gate_proj(x)
        U = base.up_proj(x)
        act = base.act_fn(G)
        # without autograd, the product goes into the activation's memory: one large
        # temporary less per layer
        in_place = not torch.is_grad_enabled() and act.data_ptr() != G.data_ptr()
        a0 = act.mul_(U) if in_place else act * U
        return base.down_proj(a0), (G, U, a0, _real_tokens(x))

    @staticmethod
    def select_rows(ctx: Any, rows: slice | torch.Tensor) -> Any:
        return tuple(t[rows] for t in ctx)

    # -- routing ------------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities and top-k choice for tokens ``x`` ``(T, hidden)``.

        Returns:
            ``probs (T, E)`` fp32 softmax over all experts, ``weights (T, k)`` renormalised to
            sum to one, ``experts (T, k)`` long indices.
        """
        h = x.float()
        if self.training and self.jitter_noise > 0:
            # a new tensor: the caller's x is never modified
            eps = self.jitter_noise
            h = h * torch.empty_like(h).uniform_(1.0 - eps, 1.0 + eps)
        probs = torch.softmax(F.linear(h, self.router.float()), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights, experts

    def stacked_factors(self) -> list[torch.Tensor]:
        """Every expert's factors stacked, in the graph: ``[A_p, s·B_p^T]`` for each projection
        ``p`` in order, ``A_p (E·r, in)`` (expert e's rows ``e·r .. e·r + r``), ``s·B_p^T (E·r,
        out)``. A copy of ``E·r·(in + out)`` numbers per projection, made per forward: the
        parameters stay per expert (state-dict names, export format and optimizers unchanged)."""
        flat = []
        for proj in self.projections:
            flat.append(torch.cat([ex.lora_A[proj] for ex in self.experts]))
            flat.append(torch.cat([ex.lora_B[proj].T for ex in self.experts]) * self.scaling)
        return flat

    def update(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        """``sum_e w_e y_e - base(x)``; x: ``(..., hidden)`` -> ``(..., hidden)`` in x's dtype.

        Args:
            x: FFN input.
            ctx: ``(G, U, a_0, real)`` from :meth:`base_forward` (computed here when ``None``).
        """
        base = self.base
        if ctx is None:
            _, ctx = self.base_forward(base, x)
        G, U, a0 = (t.reshape(-1, t.shape[-1]) for t in ctx[:3])
        real = ctx[3].reshape(-1)
        xt = x.reshape(-1, x.shape[-1])
        E, k = self.num_experts, self.top_k
        probs, weights, experts = self.route(xt)

        # balance-loss statistics over the real tokens: c_i counts each (token, expert)
        # assignment (so sum_i c_i = k · tokens), S_i sums the router probabilities. The same
        # operations run with or without a mask (a recomputing checkpoint sees the same graph).
        flat = experts.reshape(-1)
        assigned = torch.bincount(flat, weights=real.repeat_interleave(k), minlength=E)
        real_tokens = real.sum()
        self._balance = (assigned.float(), (probs * real[:, None]).sum(dim=0), real_tokens)
        self._group._totals = None
        # kept as tensors: no host sync in the forward (router_stats converts)
        self._stats = (assigned.detach(), real_tokens.detach())

        # every token, padding included, is computed: the output does not depend on the mask
        drop = self.dropout if self.training and not isinstance(self.dropout, nn.Identity) else None
        budget = _BLOCK_ELEMENTS.get(xt.device.type, _DEFAULT_BLOCK_ELEMENTS)
        block = max(1, budget // (k * G.shape[-1]))
        if xt.device.type != "cpu" and not torch.is_grad_enabled():
            block = xt.shape[0]  # no backward to bound: one block, no Python loop at all
        plan = _Plan(
            act=base.act_fn,
            num_experts=E,
            r=self.r,
            proj=tuple(self.projections),
            dropout=drop,
            block=block,
        )
        W_down = base.down_proj.weight
        out = _Experts.apply(plan, xt, G, U, a0, weights, experts, W_down, *self.stacked_factors())
        return out.to(x.dtype).reshape(x.shape)

    # -- training hooks and inspection --------------------------------------------------------
    def aux_loss(self) -> torch.Tensor | None:
        """This layer's share of the balance loss of the last forward (``None`` before one).

        With ``c_i`` / ``S_i`` / ``n`` this layer's assignments to expert i, summed router
        probabilities of expert i and real tokens, and ``C_i`` / ``N`` the sums of ``c_i`` / ``n``
        over the adapter's MixLoRA layers that ran:

        * ``"global"``: ``coef · E · sum_i C_i S_i / N^2``; summed over the layers this is
          ``coef · E · sum_i f_i P_i`` with ``f_i = C_i / N`` and ``P_i = sum_l S_{l,i} / N``
          (MoE-PEFT's loss over all layers' router logits at once).
        * ``"per_layer"``: ``coef · E · sum_i (c_i / n)(S_i / n) / L`` (L: number of layers).

        A forward with no real token gives 0.
        """
        if self._balance is None:
            return None
        assigned, prob_sum, tokens = self._balance
        scale = self.aux_loss_coef * self.num_experts
        all_assigned, all_tokens = self._group.totals()
        if id(self) in self._group.global_counts:  # data parallel: this process's share
            assigned, tokens = self._group.global_counts[id(self)]
        if self.aggregation == "per_layer":
            n = tokens.clamp(min=1.0)
            return scale * ((assigned / n) * (prob_sum / n)).sum() * self.aux_loss_weight
        return scale * (all_assigned * prob_sum).sum() / all_tokens.clamp(min=1.0) ** 2

    def on_skipped_forward(self) -> None:
        self._balance = None  # the last forward did not route through this adapter

    def report_stats(self) -> dict[str, Any]:
        """``{"router_tokens_per_expert": [tokens routed to each expert]}`` of the last
        training step's forward (empty before any forward)."""
        stats = self.router_stats()
        if stats is None:
            return {}
        counts = stats["tokens_per_expert"].flatten().tolist()
        return {"router_tokens_per_expert": [int(x) for x in counts]}

    def metrics(self) -> dict[str, float]:
        """``{"router_load/expert_<i>": share of the last forward's routed tokens}`` (the
        shares sum to 1; ``1 / num_experts`` each when balanced), for trackers."""
        stats = self.router_stats()
        if stats is None:
            return {}
        counts = stats["tokens_per_expert"].flatten().float()
        shares = (counts / counts.sum().clamp(min=1.0)).tolist()
        return {f"router_load/expert_{i}": share for i, share in enumerate(shares)}

    def router_stats(self) -> dict[str, Any] | None:
        """Routing of the last forward over its real tokens (padding excluded, see
        :func:`token_mask`): ``{"tokens_per_expert": (E,) long, "num_tokens": T}``.

        A token routed to k experts counts once for each; ``None`` before any forward. Inside
        :func:`data_parallel_statistics`, once the balance loss of the forward was computed:
        the routing of every process's tokens.
        """
        counts = self._group.counts_of(self)
        if counts is not None:
            assigned, tokens = counts
            return {
                "tokens_per_expert": assigned.detach().round().long(),
                "num_tokens": int(tokens.round()),
            }
        if self._stats is None:
            return None
        assigned, tokens = self._stats
        return {"tokens_per_expert": assigned.round().long(), "num_tokens": int(tokens.round())}

    # -- the update as matrices ---------------------------------------------------------------
    def expert_factors(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """``{proj: [(s · B_e, A_e) for each expert e]}``, detached fp32 (``dW_e = B @ A``)."""
        return {
            proj: [
                (
                    ex.lora_B[proj].detach().float() * self.scaling,
                    ex.lora_A[proj].detach().float(),
                )
                for ex in self.experts
            ]
            for proj in self.projections
        }

    def components(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{"<proj>.expert<e>": (s · B_e, A_e)}`` for every expert of every projection."""
        return {
            f"{proj}.expert{e}": pair
            for proj, pairs in self.expert_factors().items()
            for e, pair in enumerate(pairs)
        }

    def named_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every expert's ``(s · B_e, A_e)`` as ``".<proj>.experts.<e>"``."""
        return {
            f".{proj}.experts.{e}": pair
            for proj, pairs in self.expert_factors().items()
            for e, pair in enumerate(pairs)
        }

    def format_tensors(self, fmt: str) -> dict[str, torch.Tensor]:
        """MoE-PEFT's names (``fmt == "mixlora"``): ``moe_gate.weight`` (the router,
        ``(E, hidden)``) and ``<proj>.experts.<e>.lora_A.weight`` ``(r, in)`` /
        ``lora_B.weight`` ``(out, r)``, B unscaled."""
        if fmt != "mixlora":
            return super().format_tensors(fmt)
        out = {"moe_gate.weight": self.router}
        for e, expert in enumerate(self.experts):
            for proj in self.projections:
                out[f"{proj}.experts.{e}.lora_A.weight"] = expert.lora_A[proj]
                out[f"{proj}.experts.{e}.lora_B.weight"] = expert.lora_B[proj]
        return out

    def delta_weight(self) -> torch.Tensor:
        raise ValueError(
            "MixLoRA has no single delta weight: its update depends on the routing; use "
            "expert_factors() for each expert's (B, A)"
        )

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise ValueError(
            "MixLoRA has no single low-rank update: use expert_factors() for each expert's (B, A)"
        )

    def merge(self) -> None:
        raise ValueError(
            "MixLoRA's FFN experts cannot be merged: which experts apply depends on the input "
            "(merge(model, skip_unmergeable=True) merges the attention LoRA only)"
        )

    def unmerge(self) -> None:
        if self.merged:  # never true: merge refuses
            raise ValueError("MixLoRA layers are never merged")

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, r={self.r}, "
            f"alpha={self.alpha}, projections={self.projections}"
        )
