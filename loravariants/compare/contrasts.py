"""The contrasts a comparison answers, their Holm families, and what else their rows differ in.

Every contrast is ``a - b``: a row against its *comparator*, the row that differs from it only
in the factor under test. Rows that declare ``comparator:`` give the contrasts (and
``question:`` their wording). Without any declaration the study's default contrasts are
used, found by what the rows are, not by their names (LongLoRA's ablation, Tables 2-3, and the
variants against plain LoRA)::

    question                                   contrast (a - b)
    does interpolation alone help at 4x?       base-PI   - base-noPI
    does fine-tuning help over interpolation?  longlora  - base-PI
    do trainable embed + norm help LoRA?       longlora  - lora
    does S2-Attn cost anything?                longlora  - longlora-fullattn
    does a variant differ from LoRA?           <variant> - lora        (every other trained row)

The roles: the untrained rows without and with context extension, the plain LoRA row (the
reference variant of the variant contract, ``AdapterConfig.is_reference``, without overrides
or anything else trainable), and the LoRA rows that also train embeddings and norms with the
experiment's attention (LongLoRA) or with another one (its full-attention control). A
contrast whose rows a config lacks is left out.

Holm families: ``families: {name: [row, ...]}`` puts each listed row's contrast in that family;
by default every contrast is in one family, ``planned``.

:func:`definition_differences` lists what two contrasted rows differ in (adapter, target
modules, dropout, parameter count, trainable modules, attention, context extension, training
length, learning rate unless an ``lr_grid`` chose it); more than one kind is a confound the
report warns about.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..adapters.base import reference_variant
from .plan import row_variant
from .summary import PARAM_MATCH_TOLERANCE, describe_targets, row_lr

__all__ = [
    "DEFAULT_FAMILY",
    "Contrast",
    "contrast_families",
    "declared_contrasts",
    "definition_differences",
    "planned_contrasts",
]

DEFAULT_FAMILY = "planned"
# contrasts a config declares no family for, when it declares some
UNDECLARED_FAMILY = "undeclared"


@dataclass(frozen=True)
class Contrast:
    """One planned comparison ``a - b``.

    Attributes:
        a, b: row names (``b``: the comparator).
        question: what the contrast asks, in a few words.
    """

    a: str
    b: str
    question: str


def _roles(config) -> dict[str, Any]:
    runs = list(config.runs)
    default_attention = config.context.attention

    def attention(row) -> str:
        return row.attention or default_attention

    untrained = [r for r in runs if not r.trains]
    reference = reference_variant()
    loras = [
        r
        for r in runs
        if r.trains
        and not r.overrides
        and r.extend_context
        and reference is not None
        and row_variant(config, r) == reference
    ]
    embed_norm = [r for r in loras if set(r.trainable) == {"embed", "norm"}]

    def first(rows) -> str | None:
        return rows[0].name if rows else None

    plain = [r for r in loras if not r.trainable and attention(r) == default_attention]
    return {
        "base_nopi": first([r for r in untrained if not r.extend_context]),
        "base_pi": first([r for r in untrained if r.extend_context]),
        "plain_lora": first(plain),
        "longlora": first([r for r in embed_norm if attention(r) == default_attention]),
        "longlora_fullattn": first([r for r in embed_norm if attention(r) != default_attention]),
        "trained": [r.name for r in runs if r.trains],
    }


def declared_contrasts(config) -> list[Contrast]:
    """The contrasts the rows declare (``comparator:``), in row order; empty without any."""
    by_name = {row.name: row for row in config.runs}
    out = []
    for row in config.runs:
        if row.comparator:
            question = row.question or _derived_question(config, row, by_name.get(row.comparator))
            out.append(Contrast(row.name, row.comparator, question))
    return out


def _derived_question(config, a, b) -> str:
    if b is None:
        return "against its comparator"
    kinds = definition_differences(config, {}, a.name, b.name)
    return ("differs in " + ", ".join(kinds)) if kinds else "no declared difference"


def planned_contrasts(config) -> list[Contrast]:
    """The comparison's contrasts: the declared ones (rows with a ``comparator``), else the
    study's default contrasts among the rows ``config`` has (see the module docstring).

    Args:
        config: an ``ExperimentConfig`` (its ``runs`` and ``context.attention`` are read).
    """
    declared = declared_contrasts(config)
    if declared:
        return declared
    roles = _roles(config)
    out: list[Contrast] = []

    def add(a: str | None, b: str | None, question: str) -> None:
        if a and b and a != b and not any({a, b} == {c.a, c.b} for c in out):
            out.append(Contrast(a, b, question))

    add(roles["base_pi"], roles["base_nopi"], "interpolation alone, no training")
    add(roles["longlora"], roles["base_pi"], "fine-tuning after interpolation (trained vs not)")
    add(roles["longlora"], roles["plain_lora"], "trainable embeddings + norms on top of LoRA")
    add(roles["longlora"], roles["longlora_fullattn"], "S2-Attn vs full attention in training")
    for name in roles["trained"]:
        add(name, roles["plain_lora"], "against plain LoRA")
    return out


def contrast_families(config, contrasts: list[Contrast]) -> dict[Contrast, str]:
    """Each contrast's Holm family: the first declared family that lists its row ``a``;
    ``planned`` for every contrast when the config declares none; ``undeclared`` for one that
    no declared family lists."""
    families: Mapping[str, list[str]] | None = config.families
    if not families:
        return {c: DEFAULT_FAMILY for c in contrasts}
    out = {}
    for c in contrasts:
        out[c] = next((name for name, rows in families.items() if c.a in rows), UNDECLARED_FAMILY)
    return out


def _row_definition(
    config, results: Mapping[str, Mapping[str, Any]], name: str
) -> dict[str, Any] | None:
    """What a row is, for comparing two rows: from the config, and from its first finished
    record where the run decides it (adapter config, parameter count, learning rate)."""
    row = next((r for r in config.runs if r.name == name), None)
    if row is None:
        return None
    ok = [r for r in results.values() if r.get("row") == name and r.get("status") == "ok"]
    first = ok[0] if ok else {}
    adapter_config = first.get("adapter_config") or {}
    params = [r["adapter_params"] for r in ok if isinstance(r.get("adapter_params"), int | float)]
    definition: dict[str, Any] = {
        "trains": row.trains,
        "full_finetune": row.full_finetune,
        "extend_context": row.extend_context,
    }
    # a rate the lr_grid chose for this row is the protocol's tuning of each method, not a
    # confound: only fixed rates (the row's `lr`, or one train.lr for all) are compared
    selected = bool(config.lr_grid) and row.lr is None
    if row.trains:
        definition.update(
            {
                "adapter": row_variant(config, row) or row.adapter,
                "target modules": describe_targets(adapter_config) if adapter_config else None,
                "dropout": adapter_config.get("dropout"),
                "adapter params": sum(params) / len(params) if params else None,
                "trainable": tuple(sorted(row.trainable)),
                "attention": row.attention or config.context.attention,
                "train_length": row.train_length,
                "lr": None if selected else row_lr(config, row, ok),
            }
        )
    return definition


def _params_differ(a: float | None, b: float | None) -> bool:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return False
    return max(a, b) > (1 + PARAM_MATCH_TOLERANCE) * max(min(a, b), 1)


def definition_differences(
    config, results: Mapping[str, Mapping[str, Any]], a: str, b: str
) -> list[str]:
    """The kinds of difference between rows ``a`` and ``b``, in a fixed order.

    Trained against untrained counts as one kind, ``training`` (its adapter, modules,
    dropout, size, attention and rate are what training is), plus ``extend_context`` when
    that differs too; full fine-tuning against an adapter is one kind, ``full fine-tuning``
    (adapter, modules, dropout, size and trainable modules), plus attention, training length
    and rate when they differ. Adapter parameter counts differ when they are more than 10% apart
    (:data:`~loravariants.compare.summary.PARAM_MATCH_TOLERANCE`); fields a record decides
    (target modules, dropout, parameter count, learning rate) are compared only once both
    rows have one.

    Returns:
        e.g. ``["adapter", "target modules"]``; empty for a row not in ``config``.
    """
    da, db = _row_definition(config, results, a), _row_definition(config, results, b)
    if da is None or db is None:
        return []
    kinds = []
    if da["trains"] != db["trains"]:
        kinds.append("training")
    if da["extend_context"] != db["extend_context"]:
        kinds.append("extend_context")
    if not (da["trains"] and db["trains"]):
        return kinds
    fields = ["attention", "train_length", "lr"]
    if da["full_finetune"] != db["full_finetune"]:
        kinds.append("full fine-tuning")  # its adapter, modules and size are what it is
    else:
        fields = ["adapter", "target modules", "dropout", "adapter params", "trainable", *fields]
    for field in fields:
        x, y = da[field], db[field]
        if field == "adapter params":
            differ = _params_differ(x, y)
        elif field in ("target modules", "dropout", "lr") and (x is None or y is None):
            differ = False  # not known before both rows ran
        else:
            differ = x != y
        if differ:
            kinds.append(field)
    return kinds
