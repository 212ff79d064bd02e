"""The adapter interface every variant implements.

Two pieces, kept apart on purpose:

* :class:`AdapterConfig` — a validated dataclass. It knows which modules of a model it targets
  (:meth:`AdapterConfig.select`) and how to build one adapter layer for such a module
  (:meth:`AdapterConfig.create_layer`).
* :class:`AdapterLayer` — the trainable update for *one* frozen module and *one* adapter name.
  It never owns the frozen module: the :class:`AdapterHost` that replaces the module in the
  model owns it, once, and asks each named adapter for its additive update::

      host(x) = base(x) + sum_{active adapters a} a.update(x, ctx)

  ``ctx`` carries whatever the frozen computation produced that an adapter may reuse (MixLoRA
  reuses the frozen gate/up projections), so the frozen work runs once per host whatever the
  number of adapters. Several named adapters — of any mix of variants — can therefore share one
  frozen module, and :func:`route_rows` says which batch rows each adapter applies to (fused
  multi-adapter training, mixed-adapter inference).

An adapter layer is also usable on its own: ``LoRALinear(linear, config)(x)`` returns
``linear(x) + update(x)``; the frozen module is referenced, not registered, so it is never
copied nor saved twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .host import AdapterHost, route_rows, rows_by_adapter

__all__ = [
    "AdapterConfig",
    "AdapterFormat",
    "AdapterHost",
    "AdapterLayer",
    "AdapterState",
    "add_into_",
    "iter_frozen_modules",
    "match_target",
    "model_state",
    "route_rows",
    "rows_by_adapter",
    "reference_variant",
    "register_format",
    "register_variant",
    "format_class",
    "variant_class",
    "variant_for_file_type",
    "FORMATS",
    "VARIANTS",
]

#: variant name -> config class; filled by :func:`register_variant`.
VARIANTS: dict[str, type[AdapterConfig]] = {}


def register_variant(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make a config class known by its ``variant`` name (for I/O and YAML).

    Registration is explicit (``adapters/__init__.py`` imports every built-in variant; a
    variant of your own is registered when its module is imported).

    Raises:
        TypeError: ``cls`` sets no ``variant`` name, or another class already holds the name.
    """
    if not cls.variant:
        raise TypeError(f"{cls.__name__} must set the class attribute `variant`")
    held = VARIANTS.get(cls.variant)
    same = held is not None and (held.__module__, held.__qualname__) == (
        cls.__module__,
        cls.__qualname__,
    )
    if held is not None and not same:
        # the same class re-registered (its module reloaded) is fine; two classes are not
        raise TypeError(
            f"variant name {cls.variant!r} is already registered by "
            f"{held.__module__}.{held.__qualname__}"
        )
    VARIANTS[cls.variant] = cls
    return cls


def reference_variant() -> str | None:
    """The registered variant every other is measured against (the one whose config sets
    ``is_reference``: plain LoRA); ``None`` when no registered variant does."""
    # a class's own declaration only: COLA and MixLoRA inherit LoRAConfig but are not the reference
    return next((name for name, cls in VARIANTS.items() if vars(cls).get("is_reference")), None)


def variant_class(variant: str) -> type[AdapterConfig]:
    """The config class registered as ``variant``.

    Raises:
        ValueError: no such variant (the message lists the registered ones).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    return VARIANTS[variant]


def match_target(module_path: str, target_modules: str | Sequence[str]) -> bool:
    """peft's matching rule for ``target_modules``.

    A string is a regular expression that must match the whole qualified module name; a list
    matches a module whose qualified name equals an entry or ends with ``"." + entry``.
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module_path) is not None
    return any(module_path == t or module_path.endswith("." + t) for t in target_modules)


def variant_for_file_type(file_type: str) -> type[AdapterConfig] | None:
    """The registered config class that declares :attr:`AdapterConfig.file_type` ``file_type``
    itself (the ``peft_type`` of a foreign adapter file: peft's ``"LORA"``), or None. Only the
    class's own declaration counts: a subclass of LoRA is not what a peft file holds."""
    found = [cls for cls in VARIANTS.values() if vars(cls).get("file_type") == file_type]
    return found[0] if found else None


class AdapterFormat:
    """A file format adapters are saved in, registered like a variant (:func:`register_format`).

    ``loravariants.io`` names no format beyond its default: ``save_adapter(format=...)`` looks
    the name up here, ``load_adapter`` and ``read_factors`` ask each format whether a folder is
    its own (:meth:`detect`). Which variants a format holds is the variant's to say
    (:attr:`AdapterConfig.formats`); what a variant writes into, and reads back from, a foreign
    format's config is its own too (:meth:`AdapterConfig.format_fields`,
    :meth:`AdapterConfig.from_format`, :meth:`AdapterLayer.format_tensors`).
    """

    name: ClassVar[str] = ""

    def detect(self, directory: Path) -> bool:
        """Whether ``directory`` (an existing folder) holds an adapter in this format."""
        raise NotImplementedError

    def save(
        self,
        model: nn.Module,
        path: Path,
        name: str,
        config: AdapterConfig,
        base_model_name_or_path: str | None,
    ) -> Path:
        """Write adapter ``name`` of ``model`` (attached with ``config``) to ``path``,
        atomically; returns the folder."""
        raise NotImplementedError

    def load(self, model: nn.Module, directory: Path, name: str | None) -> nn.Module:
        """Attach (or fill) adapter ``name`` of ``model`` from ``directory``; a failure
        leaves the model as it was."""
        raise NotImplementedError

    def read_factors(self, directory: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module: (B, A)}`` with the scaling folded in, from the files only."""
        raise NotImplementedError

    def saved_variant(self, directory: Path) -> str:
        """The variant name the folder's config holds (``""`` if it says none)."""
        raise NotImplementedError

    def saved_extension(self, model: nn.Module, directory: Path) -> dict[str, Any] | None:
        """The context extension the folder records, checked against ``model`` (None: none)."""
        return None


#: format name -> the registered format; filled by :func:`register_format`.
FORMATS: dict[str, AdapterFormat] = {}


def register_format(cls: type[AdapterFormat]) -> type[AdapterFormat]:
    """Class decorator: register (an instance of) a format under its ``name``.

    Raises:
        TypeError: no ``name``, or another class holds it.
    """
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set the class attribute `name`")
    held = FORMATS.get(cls.name)
    if held is not None and (type(held).__module__, type(held).__qualname__) != (
        cls.__module__,
        cls.__qualname__,
    ):
        raise TypeError(f"format name {cls.name!r} is already registered by {type(held)}")
    FORMATS[cls.name] = cls()
    return cls


def format_class(name: str) -> AdapterFormat:
    """The format registered as ``name``.

    Raises:
        ValueError: no such format (the message lists the registered ones).
    """
    if name not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {name!r}")
    return FORMATS[name]


@dataclass
class AdapterState:
    """Everything loravariants keeps about one model beyond its modules, in one object.

    Kept by :mod:`loravariants.inject` (``attach`` and the rest). The layers themselves live in
    the model (its :class:`AdapterHost` modules, so ``.to()``,
    ``state_dict()`` and optimizers see them); this holds the rest, per model, as peft keeps it
    on its ``PeftModel``: one plain attribute of the model (``model.__dict__``, not a
    submodule nor a buffer), so ``copy.deepcopy`` and pickling carry it and a second model has
    its own. The routing of :func:`~loravariants.adapters.host.route_rows` is per call, not per
    model, and belongs to the calling thread instead.

    Attributes:
        configs: adapter name -> the config it was attached with, in attach order.
        extra_trainable: module names trained and saved with the adapters
            (:func:`mark_trainable`: LongLoRA's embeddings and norms).
        resume_hooks: the Trainer-resume load hooks are registered on this model.
        resuming: a resume file is being loaded (between the pre and the post hook).
        model_hooks: the model-level hooks variants installed, by name, once per model
            (MixLoRA's attention-mask recorder).
    """

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    extra_trainable: list[str] = field(default_factory=list)
    resume_hooks: bool = False
    resuming: bool = False
    model_hooks: set[str] = field(default_factory=set)


_STATE_ATTR = "_loravariants_state"


def model_state(model: nn.Module, create: bool = True) -> AdapterState:
    """The model's :class:`AdapterState`; a model without one gets one (with ``create=False``:
    an empty one that is not kept, so a read never changes the model)."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        state = AdapterState()
        if create:
            model.__dict__[_STATE_ATTR] = state
    return state


#: why a launch strategy is refused by default (AdapterConfig.unsupported_strategy); the ones
#: missing here (single, ddp, fsdp) are supported. FSDP2 needs nothing of a variant: its
#: adapter modules stay whole (left out of the sharding) and a write into a sharded frozen
#: weight goes through :func:`add_into_` (each process adds its own rows).
UNSUPPORTED_STRATEGIES: dict[str, str] = {
    "deepspeed": (
        "DeepSpeed is not supported (its engine steps and clips inside backward and keeps "
        "flat per-rank optimizer partitions, which the loop's gradient accumulation, COLA's "
        "optimizer reset and the checkpoints do not follow); FSDP2 is the supported sharded "
        "path (configs/accelerate/fsdp.yaml)"
    ),
}


def add_into_(weight: torch.Tensor, delta: torch.Tensor) -> None:
    """``weight += delta`` in place, also when ``weight`` is sharded (an FSDP2 ``DTensor``).

    Each process then adds the rows of ``delta`` it holds, cut from the full ``delta`` as the
    weight is cut (``distribute_tensor`` without communication): the gathered result equals
    the one-process ``weight + delta`` bit for bit.

    Args:
        weight: ``(out, in)``, a tensor or a DTensor.
        delta: ``(out, in)`` full-size, the same on every process, in ``weight``'s dtype.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(weight, DTensor):
        mine = distribute_tensor(
            delta.to(weight.device), weight.device_mesh, weight.placements, src_data_rank=None
        )
        weight.to_local().add_(mine.to_local())
    else:
        weight += delta


@dataclass
class AdapterConfig:
    """Base configuration shared by every variant.

    Subclasses set the class attribute ``variant`` and implement :meth:`create_layer`; they
    validate their own fields in ``__post_init__`` after calling ``super().__post_init__()``.

    Attributes:
        target_modules: module names to wrap (peft rules: exact suffix list, or one regex).
    """

    # -- the variant contract: class attributes and hooks a variant may override -------------
    # (everything else in the package reads these; no code outside the variant's own module
    # names a variant. docs/adding-a-variant.md walks through them.)
    variant: ClassVar[str] = ""
    # a variant that wraps more than target_modules (MixLoRA: the FFN) may take an empty list
    empty_targets_ok: ClassVar[bool] = False
    # fields that change the adapter's output but show in no tensor shape: loading a file
    # into an attached adapter requires them to agree (io.check_same_output_fields)
    output_fields: ClassVar[tuple[str, ...]] = ()
    # the fields compare's `match_params` sets to one rank value (empty: cannot be matched)
    rank_fields: ClassVar[tuple[str, ...]] = ("r",)
    # save formats that can hold this variant ("native" holds every variant)
    formats: ClassVar[tuple[str, ...]] = ("native",)
    # the variant the others are measured against (compare: similarity to its subspace,
    # paired differences, the plain-LoRA contrasts); exactly one built-in variant sets it
    is_reference: ClassVar[bool] = False
    # the `peft_type` under which a foreign format's file reads back as this variant (peft's
    # "LORA": LoRA; MoE-PEFT's "MIXLORA": MixLoRA); None: no foreign file builds this variant
    file_type: ClassVar[str | None] = None
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self) -> None:
        tm = self.target_modules
        if isinstance(tm, (list, tuple)) and not tm and self.empty_targets_ok:
            self.target_modules = []
        elif isinstance(tm, str):
            try:
                re.compile(tm)
            except re.error as e:
                raise ValueError(f"target_modules is not a valid regular expression: {e}") from e
        elif isinstance(tm, (list, tuple)) and tm and all(isinstance(t, str) and t for t in tm):
            self.target_modules = list(tm)
        else:
            raise ValueError(
                "target_modules must be a non-empty list of module names or one regex string, "
                f"got {tm!r}"
            )

    # -- which modules, and what to put there -------------------------------------------------
    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Return ``(qualified name, frozen module)`` for every module this config wraps.

        The default takes every ``nn.Linear`` whose name matches ``target_modules``. A module
        already hosting another adapter is matched by the host's name (its frozen
        ``base_layer`` is returned), so several adapters can share it.
        """
        return [
            (path, module)
            for path, module in iter_frozen_modules(model)
            if isinstance(module, nn.Linear) and match_target(path, self.target_modules)
        ]

    def create_layer(self, path: str, module: nn.Module) -> AdapterLayer:
        """Build the adapter layer for the frozen ``module`` found at ``path``."""
        raise NotImplementedError

    def on_attached(self, layers: Mapping[str, AdapterLayer]) -> None:
        """Called once by ``attach`` with every layer it built (module name -> layer).

        A no-op by default; MixLoRA uses it to average its balance loss over its layers.
        """

    # -- run-level needs (compare, train) -------------------------------------------------------
    def with_rank(self, r: int) -> dict[str, Any]:
        """Overrides that give this adapter rank ``r`` everywhere (``match_params``).

        The default sets every :attr:`rank_fields` entry and every ``rank_pattern`` entry; a
        variant with more per-module or per-stage ranks (COLA's ``link_ranks``) extends it.
        """
        fields: dict[str, Any] = {f: r for f in self.rank_fields}
        if getattr(self, "rank_pattern", None):
            fields["rank_pattern"] = {k: r for k in self.rank_pattern}
        return fields

    @classmethod
    def run_overrides(
        cls, values: Mapping[str, Any], overrides: Mapping[str, Any], max_steps: int
    ) -> dict[str, Any]:
        """Fields a run sets on this adapter beyond the user's overrides (none by default).

        Args:
            values: the spec's fields with the row's overrides applied (not yet validated).
            overrides: the row's own overrides.
            max_steps: the run's optimizer steps.

        Returns:
            Extra overrides; COLA places a chain given by ``chain_length`` over ``max_steps``.
        """
        return {}

    def unsupported_strategy(self, strategy: str) -> str | None:
        """Why this adapter cannot train under a launch ``strategy``, or None when it can.

        Args:
            strategy: ``single`` (one process), ``ddp``, ``fsdp`` or ``deepspeed``
                (:func:`loravariants.distributed.launch_strategy`).

        Returns:
            None, or the reason in a few words. By default one process and DDP work (the loop
            undoes DDP's gradient mean and finds unused parameters of sparse layers) and so
            does FSDP2 (the adapters stay whole; frozen-weight writes use :func:`add_into_`);
            DeepSpeed is refused (docs/distributed.md). A variant overrides this for its own
            limits (COLA's rank step-down under DDP).
        """
        if strategy in ("single", "ddp", "fsdp"):
            return None
        return UNSUPPORTED_STRATEGIES.get(strategy, f"the strategy {strategy!r} is unknown")

    def restarts_lr_schedule(self) -> bool:
        """Whether the LR schedule starts a new cycle after every restart that
        :meth:`AdapterLayer.on_step_end` reports (COLA's ``restart_lr_schedule``)."""
        return False

    @classmethod
    def describe_rank(cls, fields: Mapping[str, Any]) -> str:
        """The rank column of the report for a saved config (:meth:`to_dict` output)."""
        r = fields.get("r")
        return f"r={r}" if r is not None else "—"

    @classmethod
    def describe_targets(cls, fields: Mapping[str, Any]) -> str:
        """The targets column of the report for a saved config (:meth:`to_dict` output)."""
        targets = fields.get("target_modules")
        if isinstance(targets, (list, tuple)):
            targets = ",".join(targets)
        return targets or "—"

    def stand_in(self, spec: Mapping[str, Any]) -> nn.Module:
        """A shape-only (meta-device) frozen module for a saved module spec.

        ``spec`` is what io records per wrapped module: ``{"type": "linear", "in", "out"}``
        or ``{"type": <class>, "linears": {child: {"in", "out"}}}``. Loading and
        :func:`~loravariants.io.read_factors` build layers on it without the real model; a
        variant that needs more than the linear children (MixLoRA: the FFN's activation)
        overrides this.
        """
        if spec.get("type") == "linear":
            return nn.Linear(spec["in"], spec["out"], bias=False, device="meta")
        module = nn.Module()
        for child, shape in (spec.get("linears") or {}).items():
            module.add_module(
                child, nn.Linear(shape["in"], shape["out"], bias=False, device="meta")
            )
        return module

    # -- foreign file formats (peft's, MoE-PEFT's): what the variant writes and reads ----------
    def format_fields(self, fmt: str, model: nn.Module) -> dict[str, Any]:
        """Fields of a foreign format's config (``fmt``: a name in :attr:`formats`) that come
        from this config, beyond what the format derives from the layers; none by default.

        LoRA: peft's ``use_rslora`` (its layers are written as trained); MixLoRA: the MoE-PEFT
        config (experts, top-k, ranks, router settings).
        """
        return {}

    @classmethod
    def from_format(cls, fmt: str, fields: Mapping[str, Any]) -> AdapterConfig:
        """The config a file of foreign format ``fmt`` holds (this class's :attr:`file_type`).

        ``fields`` are what the format read, under this config's field names (peft's format
        renames ``lora_alpha`` to ``alpha`` and so on) unless the variant reads the format's
        own keys (MixLoRA). The default builds ``cls(**fields)``.

        Raises:
            ValueError, TypeError, KeyError: the fields do not make a valid config (the format
                names its file in the message).
        """
        return cls(**fields)

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All fields plus ``variant``, JSON/YAML-ready."""
        out = {"variant": self.variant}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        """Inverse of :meth:`to_dict`; dispatches on ``variant`` when called on the base class.

        Raises:
            ValueError: unknown variant or unknown field (named in the message).
        """
        data = dict(data)
        variant = data.pop("variant", cls.variant)
        target_cls = cls
        if cls is AdapterConfig or (variant and variant != cls.variant):
            target_cls = variant_class(variant)
        names = {f.name for f in dataclasses.fields(target_cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"unknown field(s) {unknown} for {target_cls.__name__}; allowed: {sorted(names)}"
            )
        return target_cls(**data)


def iter_frozen_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every module of the *original* model.

    A module replaced by an :class:`AdapterHost` is reported under the host's name (the name it
    had before wrapping); the adapters' own submodules and the submodules of a hosted module
    (the projections inside a MixLoRA-wrapped FFN) are skipped: they cannot carry adapters of
    their own (see :func:`modules_inside_hosts`).
    """
    hosts: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(h + ".") for h in hosts):
            continue
        if isinstance(module, AdapterHost):
            hosts.append(path)
            yield path, module.base_layer
        else:
            yield path, module


def modules_inside_hosts(model: nn.Module) -> list[str]:
    """Original names of the submodules of wrapped modules (``"model.layers.0.mlp.down_proj"``
    inside a MixLoRA-wrapped ``mlp``): :func:`iter_frozen_modules` hides them."""
    out = []
    for path, module in model.named_modules():
        if isinstance(module, AdapterHost):
            out += [f"{path}.{sub}" for sub, _ in module.base_layer.named_modules() if sub]
    return out


class AdapterLayer(nn.Module):
    """The trainable update of one adapter on one frozen module.

    Subclasses implement :meth:`update`; mergeable ones (``mergeable = True``) also implement
    :meth:`delta_weight` and :meth:`factors`. Everything else has a working default.

    The frozen module is held by reference (``self.base``), not registered as a submodule.
    """

    #: whether the update is a fixed matrix that can be folded into the base weight.
    mergeable: ClassVar[bool] = True
    #: whether a step may leave some parameters without a gradient (MixLoRA's unrouted
    #: experts): distributed training must then look for unused parameters.
    sparse_gradients: ClassVar[bool] = False

    @classmethod
    def data_parallel_statistics(
        cls, reduce: Callable[[torch.Tensor], torch.Tensor]
    ) -> contextlib.AbstractContextManager:
        """The context a data-parallel training loop runs in, for statistics of this layer
        type that must cover the global batch (MixLoRA's balance loss); none by default.

        Args:
            reduce: sums a tensor over the data-parallel processes and returns the sum.
        """
        return contextlib.nullcontext()

    def __init__(self, base: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        # A one-element list keeps nn.Module from registering (and so saving, moving or
        # counting) the frozen module a second time; the host owns it.
        self._base_ref = [base]
        self.config = config
        self.merged = False
        self.shares_base = False  # set by the host: other adapters use the same frozen module

    @property
    def base(self) -> nn.Module:
        """The frozen module this adapter updates."""
        return self._base_ref[0]

    # -- forward ------------------------------------------------------------------------------
    @staticmethod
    def base_forward(base: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Run the frozen module once; return its output and a context for :meth:`update`.

        Hosts call this once for all their adapters; variants that reuse intermediate frozen
        results (MixLoRA) override it and return them in the context.
        """
        return base(x), None

    @staticmethod
    def select_rows(ctx: Any, rows: slice | torch.Tensor) -> Any:
        """Restrict a context from :meth:`base_forward` to some batch rows."""
        return ctx

    def update(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        """Additive update to the frozen module's output.

        Args:
            x: input, shape ``(..., in_features)``.
            ctx: what :meth:`base_forward` returned beside the output.

        Returns:
            Tensor of the frozen module's output shape and dtype.
        """
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standalone use: ``base(x) + update(x)`` (base alone once merged)."""
        out, ctx = self.base_forward(self.base, x)
        if self.merged:
            return out
        return out + self.update(x, ctx)

    # -- the update as a matrix ---------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """Dense update ``dW`` of shape ``(out_features, in_features)`` (fp32)."""
        B, A = self.factors()
        return B @ A

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-rank factors ``(B, A)`` with the scaling folded in: ``dW = B @ A``.

        Returns:
            ``B`` of shape ``(out, k)`` and ``A`` of shape ``(k, in)``, detached, fp32.
        """
        raise NotImplementedError(f"{type(self).__name__} has no single low-rank update")

    def named_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every low-rank component of the update, by a suffix to the module name.

        ``{"": factors()}`` for a mergeable layer; a layer with several components (MixLoRA:
        ``".<proj>.experts.<e>"``) lists them all. Analysis of saved files reads this.
        """
        return {"": self.factors()}

    def components(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The update's parts as ``{name: (B, A)}`` (scaling folded in), for analysis:
        ``{"update": factors()}`` by default; MultiLoRA's branches, COLA's links, MixLoRA's
        experts otherwise (:func:`loravariants.analysis.components`)."""
        return {"update": self.factors()}

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """``(B, A, r, lora_alpha)`` for peft's LoRA format (peft scales ``B @ A`` by
        ``lora_alpha / r``). The default writes :meth:`factors` (scaling folded into ``B``)
        with ``lora_alpha = r``: exact for the merged update of any mergeable layer."""
        B, A = self.factors()
        return B, A, A.shape[0], float(A.shape[0])

    def format_tensors(self, fmt: str) -> dict[str, torch.Tensor]:
        """The layer's trained tensors (the parameters themselves, not copies) under the names
        a foreign format ``fmt`` gives them below the module's prefix; the format writes them
        and copies a file's tensors back into them.

        Raises:
            ValueError: the layer has no form in ``fmt`` (the default).
        """
        raise ValueError(f"{type(self).__name__} has no {fmt}-format form")

    def report_stats(self) -> dict[str, Any]:
        """Per-layer statistics of the last training step for the comparison's record
        (``{record key: JSON-ready value}``); none by default (MixLoRA: tokens per expert)."""
        return {}

    def metrics(self) -> dict[str, float]:
        """Scalars of the last training step for experiment trackers (``train.report_to``):
        ``{name: value}``, averaged over the adapter's layers by the training loop; none by
        default (COLA: its link index; MixLoRA: the router's load per expert)."""
        return {}

    # -- merging ------------------------------------------------------------------------------
    def _check_mergeable(self) -> nn.Linear:
        if not self.mergeable:
            raise ValueError(
                f"{type(self).__name__} cannot be merged: its update depends on the input"
            )
        base = self.base
        if not isinstance(base, nn.Linear):
            raise ValueError(f"cannot merge into a {type(base).__name__}; only nn.Linear")
        return base

    def merge_delta(self) -> torch.Tensor:
        """What :meth:`merge` adds to the frozen weight: :meth:`delta_weight` by default."""
        return self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the frozen weight (``W += merge_delta()``). Idempotent."""
        base = self._check_mergeable()
        if self.merged:
            return
        add_into_(base.weight, self.merge_delta().to(base.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (``W -= merge_delta()``). Idempotent."""
        base = self._check_mergeable()
        if not self.merged:
            return
        add_into_(base.weight, -self.merge_delta().to(base.weight.dtype))
        self.merged = False

    # -- training hooks -----------------------------------------------------------------------
    def aux_loss(self) -> torch.Tensor | None:
        """Extra loss from the last forward (MixLoRA's balance loss), or ``None``."""
        return None

    def on_step_end(self, step: int) -> list[nn.Parameter] | None:
        """Called after every optimizer step (``step`` counts from 1).

        Returns the parameters whose optimizer state must be reset (COLA after a restart), or
        ``None``.
        """
        return None

    def uses_step_end(self) -> bool:
        """Whether training this layer needs :meth:`on_step_end` after every optimizer step
        (a loop that never calls it trains something else). Default: the method is overridden;
        a variant whose hook is a no-op for some configs (COLA without knots) says so."""
        return type(self).on_step_end is not AdapterLayer.on_step_end

    def uses_aux_loss(self) -> bool:
        """Whether training this layer needs :meth:`aux_loss` added to the loss (MixLoRA's
        balance loss). Default: the method is overridden."""
        return type(self).aux_loss is not AdapterLayer.aux_loss

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The parameters this adapter trains."""
        return [p for p in self.parameters()]

    def set_shared(self, shared: bool) -> None:
        """Told by the host whether other adapters share this frozen module.

        A layer that writes into the frozen weight as part of training (COLA's restarts) must
        stop doing so while shared, or it would change the other adapters' base.
        """
        self.shares_base = shared

    def on_skipped_forward(self) -> None:
        """Called when a forward of its module ran without this layer (inactive, merged, or no
        rows routed to it). A no-op by default; MixLoRA drops its balance loss, so
        ``aux_loss`` never hands back a loss from an older forward's graph."""

    def on_detach(self) -> None:
        """Called by ``lv.detach`` after unmerging, before the layer is dropped.

        A no-op by default; COLA takes its folded links back out of the frozen weight.
        """

    # -- saving -------------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Everything needed to restore this adapter (parameters and buffers), by name."""
        return dict(self.state_dict())

    @torch.no_grad()
    def load_adapter_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Inverse of :meth:`adapter_state`.

        Raises:
            ValueError: missing or unexpected names, or a shape that differs.
        """
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"missing tensors {missing}, unexpected tensors {unexpected}")
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(own[key].shape):
                raise ValueError(
                    f"{key} has shape {tuple(tensor.shape)}, expected {tuple(own[key].shape)}"
                )
        merged = self.merged  # the merged delta is the old one: take it out, put the new one in
        if merged:
            self.unmerge()
        self.load_state_dict(dict(state))
        if merged:
            self.merge()
