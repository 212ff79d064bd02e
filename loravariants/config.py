"""Experiment configuration: YAML files in ``configs/``, ``key.sub=value`` overrides.

An experiment combines a base model, data, a context extension, a training budget, evaluation
settings and a list of runs, each run naming an adapter spec from ``adapters/`` (or ``none``
for the evaluation-only baseline rows). Every field is validated on load; an invalid value
raises ``ValueError`` naming the key path, which the CLI prints as one line (exit 2).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .adapters.base import VARIANTS, AdapterConfig
from .train import MAX_SEED, TrainConfig
from .utils import check_not_precious
from .validation import check_range

__all__ = [
    "ExperimentConfig",
    "DataConfig",
    "ContextConfig",
    "EvalConfig",
    "RunSpec",
    "load_experiment",
    "apply_overrides",
    "load_adapter_spec",
    "ADAPTER_SPEC_DIR",
]


def _data_dir(installed: str, checkout: str) -> Path:
    """A data folder: inside the installed package, else the checkout's top-level folder."""
    here = Path(__file__).resolve().parent
    return here / installed if (here / installed).is_dir() else here.parent / checkout


#: the built-in adapter specs (the repository's top-level ``adapters/``, shipped in the package)
ADAPTER_SPEC_DIR = _data_dir("specs", "adapters")
#: the built-in experiment configs (the repository's ``configs/``)
CONFIG_DIR = _data_dir("configs", "configs")
TRAINABLE_CHOICES = ("embed", "norm")
# `trainable: [all]`: every base parameter trains (full fine-tuning, with `adapter: none`)
FULL_FINETUNE = "all"
# s2_attn_noshift: S2-Attn's groups without the shifted half of the heads (LongLoRA Table 1)
ATTENTION_CHOICES = ("s2_attn", "s2_attn_noshift", "sdpa", "eager")
TRAIN_LENGTH_CHOICES = ("target", "native")
# the share of documents held out for learning-rate selection when `lr_grid` is set
DEFAULT_SELECTION_FRACTION = 0.05
# a row name becomes a folder name (runs/<name>/seed<s>): no separators, no `..`, no hidden name
ROW_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}")
# a parsed YAML document may hold at most this many values once aliases are expanded (an alias
# bomb is a few lines that expand to billions of values when the config is written out)
MAX_YAML_NODES = 100_000
# ... and nest at most this deep (a deeper one is a hostile file: Python's recursion limit)
MAX_YAML_DEPTH = 64
# the largest YAML file read (an experiment is a few KB)
MAX_YAML_BYTES = 1 << 20


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (two ``train:``
    blocks): PyYAML keeps the last one silently. Keys a ``<<`` merge brings in may still be
    overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                except TypeError:  # unhashable: the base constructor names it
                    continue
                if repeated:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, where: str) -> Any:
    """One YAML document, strictly: a key given twice, more than :data:`MAX_YAML_NODES` values
    (aliases expanded) or nesting deeper than :data:`MAX_YAML_DEPTH` is an error.

    Raises:
        ValueError: one line naming ``where``.
    """
    try:
        value = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise ValueError(f"{where}: nested more than {MAX_YAML_DEPTH} levels deep") from None
    check_yaml_size(value, where)
    return value


def _check_str(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: take a string that spells a number as
    that number (as ``train.lr`` does); anything else is left for the range check to name."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _int_list(name: str, value: Any, low: int) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of integers >= {low}, got {value!r}")
    for n in value:
        check_range(f"{name}[]", n, low=low, integer=True)
    return list(value)


@dataclass
class DataConfig:
    """Training and validation text.

    Attributes:
        source: ``stdlib`` (the Python standard library's source, default), a local file or
            folder (text or JSONL), or ``hf:<dataset name>`` (Hugging Face hub, downloads).
        text_field: JSONL/dataset field holding the text.
        max_documents: cap on documents read (None: all).
        validation_fraction: share of documents held out for evaluation, in (0, 1).
        passkey_fraction: share of training blocks replaced by a passkey prompt and its answer
            (``data/retrieval.py``), in [0, 1); the same blocks for every row and seed.
        kv_fraction: share replaced by key-value lookups spread through code, in [0, 1).
        selection_fraction: share of documents held out for ``lr_grid`` selection, in (0, 1),
            disjoint from the validation documents and from the training documents (None:
            :data:`DEFAULT_SELECTION_FRACTION` when ``lr_grid`` is set, else none held out).
    """

    source: str = "stdlib"
    text_field: str = "text"
    max_documents: int | None = None
    validation_fraction: float = 0.05
    passkey_fraction: float = 0.0
    kv_fraction: float = 0.0
    selection_fraction: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"data.source must be a non-empty string, got {self.source!r}")
        _check_str("data.text_field", self.text_field)
        if self.max_documents is not None:
            check_range("data.max_documents", self.max_documents, low=1, integer=True)
        check_range(
            "data.validation_fraction",
            self.validation_fraction,
            low=0,
            high=1,
            low_open=True,
            high_open=True,
        )
        for name in ("passkey_fraction", "kv_fraction"):
            check_range(f"data.{name}", getattr(self, name), low=0, high=1, high_open=True)
        if self.selection_fraction is not None:
            check_range(
                "data.selection_fraction",
                self.selection_fraction,
                low=0,
                high=1,
                low_open=True,
                high_open=True,
            )
            if self.validation_fraction + self.selection_fraction >= 1:
                raise ValueError(
                    "data.validation_fraction + data.selection_fraction must be below 1 (the "
                    f"rest trains), got {self.validation_fraction} + {self.selection_fraction}"
                )
        if self.passkey_fraction + self.kv_fraction >= 1:
            raise ValueError(
                f"data.passkey_fraction + data.kv_fraction must be below 1, got "
                f"{self.passkey_fraction} + {self.kv_fraction}"
            )


@dataclass
class ContextConfig:
    """Context extension and training attention (LongLoRA).

    Attributes:
        target_length: training context in tokens; ``None`` keeps the native context.
        method: position interpolation: ``linear`` (LongLoRA), ``dynamic`` or ``yarn``.
        attention: training attention: ``s2_attn`` (LongLoRA), ``s2_attn_noshift`` (its
            groups without the shifted half, LongLoRA Table 1), ``sdpa`` or ``eager`` (full).
        group_size_ratio: S2-Attn group size as a share of the sequence, in (0, 1].
        factor_rounding: ``exact`` (factor = target / native) or ``ceil`` (rounded up to an
            integer, as LongLoRA's scripts do: 256 -> 1000 gives 4, not 3.90625).
    """

    target_length: int | None = None
    method: str = "linear"
    attention: str = "s2_attn"
    group_size_ratio: float = 0.25
    factor_rounding: str = "exact"

    def __post_init__(self) -> None:
        if self.target_length is not None:
            check_range("context.target_length", self.target_length, low=2, integer=True)
        if not isinstance(self.method, str) or self.method not in ("linear", "dynamic", "yarn"):
            raise ValueError(
                f"context.method must be one of ['linear', 'dynamic', 'yarn'], got {self.method!r}"
            )
        if not isinstance(self.attention, str) or self.attention not in ATTENTION_CHOICES:
            raise ValueError(
                f"context.attention must be one of {list(ATTENTION_CHOICES)}, "
                f"got {self.attention!r}"
            )
        check_range("context.group_size_ratio", self.group_size_ratio, low=0, high=1, low_open=True)
        if self.factor_rounding not in ("exact", "ceil"):
            raise ValueError(
                "context.factor_rounding must be one of ['exact', 'ceil'], "
                f"got {self.factor_rounding!r}"
            )


@dataclass
class EvalConfig:
    """Evaluation (always full attention).

    Attributes:
        lengths: context lengths for perplexity; ``None``: native, 2x and 4x... up to the
            training context.
        max_tokens: validation tokens scored at every length (same tokens for all lengths);
            ``None``: the whole validation split.
        stride_ratio: sliding-window stride as a share of the length, in (0, 1).
        passkey_lengths: prompt lengths for passkey retrieval (empty: skipped).
        passkey_trials: prompts per length.
        lm_eval: lm-eval task, group or tag names run on every row (the ``[eval]`` extra;
            empty: none); each task's first metric is recorded as ``lm_eval@<task>``.
        lm_eval_include: a folder of task YAMLs of your own (None: lm-eval's tasks only).
        lm_eval_limit: documents per task, >= 1 (None: all).
        lm_eval_batch_size: requests per forward, >= 1.
    """

    lengths: list[int] | None = None
    max_tokens: int | None = 16384
    stride_ratio: float = 0.5
    passkey_lengths: list[int] = field(default_factory=list)
    passkey_trials: int = 10
    lm_eval: list[str] = field(default_factory=list)
    lm_eval_include: str | None = None
    lm_eval_limit: int | None = None
    lm_eval_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.lengths is not None:
            self.lengths = _int_list("eval.lengths", self.lengths, low=2)
        if self.max_tokens is not None:
            check_range("eval.max_tokens", self.max_tokens, low=2, integer=True)
        check_range(
            "eval.stride_ratio", self.stride_ratio, low=0, high=1, low_open=True, high_open=True
        )
        self.passkey_lengths = _int_list("eval.passkey_lengths", self.passkey_lengths, low=16)
        check_range("eval.passkey_trials", self.passkey_trials, low=1, integer=True)
        if isinstance(self.lm_eval, str):  # `lm_eval: arc_easy` means [arc_easy]
            self.lm_eval = [self.lm_eval]
        if not isinstance(self.lm_eval, (list, tuple)) or not all(
            isinstance(t, str) and t and "@" not in t for t in self.lm_eval
        ):
            raise ValueError(
                f"eval.lm_eval must be a list of lm-eval task names, got {self.lm_eval!r}"
            )
        self.lm_eval = list(self.lm_eval)
        _check_str("eval.lm_eval_include", self.lm_eval_include, optional=True)
        if self.lm_eval_limit is not None:
            check_range("eval.lm_eval_limit", self.lm_eval_limit, low=1, integer=True)
        check_range("eval.lm_eval_batch_size", self.lm_eval_batch_size, low=1, integer=True)
        if self.lm_eval:
            from .integrations.lm_eval import require_lm_eval

            require_lm_eval()  # names are checked by check_lm_eval_tasks (an index to build)


@dataclass
class RunSpec:
    """One row of the comparison.

    Attributes:
        name: row label (unique).
        adapter: path of an adapter spec YAML (relative paths: the experiment file's folder,
            then the built-in ``adapters/``), a built-in spec name (``lora``, ``cola``,
            ``multilora``, ``mixlora``), or ``none`` for an evaluation-only baseline.
        overrides: adapter fields changed from the spec.
        trainable: whole modules trained with the adapter: any of ``embed``, ``norm``; or
            ``[all]`` with ``adapter: none``: full fine-tuning, every base parameter trains.
        extend_context: apply the experiment's context extension (False: native positions).
        attention: training attention for this row (default: the experiment's).
        comparator: the row this one is contrasted against (``this - comparator``): the row
            that differs from it only in the factor under test. Report only: no run changes.
        question: what that contrast asks, a few words (None: derived). Report only.
        lr: this row's learning rate (None: ``train.lr``, or the ``lr_grid`` selection's).
        train_length: ``target`` (the experiment's context) or ``native``: train at the base's
            native length on the same tokens (the batch scaled by target / native), without
            position interpolation -- the "more in-domain training" control for LongLoRA.
    """

    name: str
    adapter: str = "none"
    overrides: dict[str, Any] = field(default_factory=dict)
    trainable: list[str] = field(default_factory=list)
    extend_context: bool = True
    attention: str | None = None
    comparator: str | None = None
    question: str | None = None
    lr: float | None = None
    train_length: str = "target"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not ROW_NAME.fullmatch(self.name):
            raise ValueError(
                f"runs[].name must be 1-100 letters, digits or _ . + - (not starting with . "
                f"+ -; it names a folder), got {self.name!r}"
            )
        if not isinstance(self.adapter, str) or not self.adapter:
            raise ValueError(
                f"runs[{self.name}].adapter must be a spec name or path, got {self.adapter!r}"
            )
        if self.overrides is None:
            self.overrides = {}
        if not isinstance(self.overrides, Mapping):
            raise ValueError(
                f"runs[{self.name}].overrides must be a mapping of adapter fields, "
                f"got {self.overrides!r}"
            )
        if isinstance(self.trainable, str):  # `trainable: embed` means [embed]
            self.trainable = [self.trainable]
        if not isinstance(self.trainable, (list, tuple)):
            raise ValueError(
                f"runs[{self.name}].trainable must be a list of {list(TRAINABLE_CHOICES)}, "
                f"got {self.trainable!r}"
            )
        if not isinstance(self.extend_context, bool):
            raise ValueError(
                f"runs[{self.name}].extend_context must be true or false, "
                f"got {self.extend_context!r}"
            )
        self.trainable = list(self.trainable)
        if FULL_FINETUNE in self.trainable:
            if self.trainable != [FULL_FINETUNE]:
                raise ValueError(
                    f"runs[{self.name}].trainable: [all] trains every parameter and takes no "
                    f"other entry, got {self.trainable}"
                )
            if self.adapter != "none":
                raise ValueError(
                    f"runs[{self.name}].trainable: [all] is full fine-tuning, which trains no "
                    f"adapter: set adapter: none (got {self.adapter!r})"
                )
        else:
            bad = sorted(set(self.trainable) - set(TRAINABLE_CHOICES))
            if bad:
                raise ValueError(
                    f"runs[{self.name}].trainable must be a subset of "
                    f"{list(TRAINABLE_CHOICES)}, or [all], got {bad}"
                )
        if self.attention is not None and (
            not isinstance(self.attention, str) or self.attention not in ATTENTION_CHOICES
        ):
            raise ValueError(
                f"runs[{self.name}].attention must be one of {list(ATTENTION_CHOICES)}, "
                f"got {self.attention!r}"
            )
        for key in ("comparator", "question"):
            _check_str(f"runs[{self.name}].{key}", getattr(self, key), optional=True)
        if self.comparator == self.name:
            raise ValueError(f"runs[{self.name}].comparator names the row itself")
        if self.question is not None and self.comparator is None:
            raise ValueError(
                f"runs[{self.name}].question needs a comparator (the row the question is about)"
            )
        if self.lr is not None:
            self.lr = _yaml_number(self.lr)
            check_range(f"runs[{self.name}].lr", self.lr, low=0, low_open=True)
            if not self.trains:
                raise ValueError(
                    f"runs[{self.name}].lr is set, but the row trains nothing (adapter: none)"
                )
        if not isinstance(self.train_length, str) or self.train_length not in (
            TRAIN_LENGTH_CHOICES
        ):
            raise ValueError(
                f"runs[{self.name}].train_length must be one of {list(TRAIN_LENGTH_CHOICES)}, "
                f"got {self.train_length!r}"
            )
        if self.train_length == "native":
            if self.extend_context:
                raise ValueError(
                    f"runs[{self.name}].train_length: native trains without position "
                    "interpolation: set extend_context: false"
                )
            if not self.trains:
                raise ValueError(
                    f"runs[{self.name}].train_length: native is set, but the row trains nothing"
                )

    @property
    def full_finetune(self) -> bool:
        """Every base parameter trains (``adapter: none``, ``trainable: [all]``)."""
        return self.trainable == [FULL_FINETUNE]

    @property
    def has_adapter(self) -> bool:
        return self.adapter != "none"

    @property
    def trains(self) -> bool:
        """The row trains: an adapter, or (full fine-tuning) the whole base."""
        return self.has_adapter or self.full_finetune


def _seed_list(name: str, value: Any) -> list[int]:
    """``value`` as a list of seeds, each in ``[0, MAX_SEED]``; one line naming ``name`` if not.

    ``seeds: 3`` is refused, not read as ``[3]``: a user meaning "3 seeds" would get one.
    """
    if not isinstance(value, (list, tuple)) or not value:
        hint = f" (one seed: [{value}]; three: [0, 1, 2])" if isinstance(value, int) else ""
        raise ValueError(f"{name} must be a non-empty list of integers, got {value!r}{hint}")
    for s in value:
        check_range(f"{name}[]", s, low=0, high=MAX_SEED, integer=True)
    return list(value)


@dataclass
class ExperimentConfig:
    """A whole comparison (``configs/*.yaml``).

    Attributes:
        base_model: ``default`` (the built-in small Llama, built and cached on first use), a
            local checkpoint directory, or a hub name.
        base_model_config: fields of the built-in base changed from their defaults
            (``BaseModelConfig``; only with ``base_model: default``).
        data, context, train, eval: see their classes.
        runs: the rows to compare.
        seeds: one run per row and seed (evaluation-only rows run once).
        match_params: set every rank field of each adapter (one value for all of them) so
            its adapter parameters are as close as possible to this count (None: ranks as
            specified). A target no rank reaches within ``match_params_tolerance`` is refused.
        match_params_tolerance: the largest relative miss ``|achieved - target| / target``
            accepted (None: 0.10); raise it to accept a larger miss explicitly.
        concurrent: train all adapters of a seed together on one frozen base.
        output_dir: where results, report and plots go.
        spec_dir: folder the adapter specs are read from (default: the built-in ones).
        families: Holm families, ``{name: [row, ...]}``: each listed row's contrast (the row
            minus its ``comparator``) is corrected within that family. Report only. None: one
            family ``planned`` holding every row with a comparator.
        lr_grid: candidate learning rates; each trained row without its own ``lr`` trains at
            the one with the lowest perplexity on the selection split (``data.
            selection_fraction``, disjoint from validation and training). None: no selection.
        lr_grid_seeds: the seeds the selection trains on.
        lr_grid_steps: the selection's training steps (None: ``train.max_steps``).
    """

    base_model: str = "default"
    base_model_config: dict[str, Any] | None = None
    data: DataConfig = field(default_factory=DataConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runs: list[RunSpec] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    match_params: int | None = None
    match_params_tolerance: float | None = None
    concurrent: bool = False
    output_dir: str = "runs/experiment"
    spec_dir: str | None = None
    families: dict[str, list[str]] | None = None
    lr_grid: list[float] | None = None
    lr_grid_seeds: list[int] = field(default_factory=lambda: [0])
    lr_grid_steps: int | None = None

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("runs must list at least one row")
        names = [r.name for r in self.runs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"runs[].name must be unique, repeated: {dupes}")
        self.seeds = _seed_list("seeds", self.seeds)
        if self.match_params is not None:
            check_range("match_params", self.match_params, low=1, integer=True)
        if self.match_params_tolerance is not None:
            check_range("match_params_tolerance", self.match_params_tolerance, low=0.0)
        if not isinstance(self.concurrent, bool):
            raise ValueError(f"concurrent must be true or false, got {self.concurrent!r}")
        for key in ("output_dir", "base_model"):
            _check_str(key, getattr(self, key))
        # `~/exp` is the home folder's exp, as in a shell (not a folder named `~`)
        self.output_dir = os.path.expanduser(self.output_dir)
        check_not_precious(self.output_dir, "output_dir")
        self._check_eval_lengths()
        _check_str("spec_dir", self.spec_dir, optional=True)
        if self.base_model_config is not None and not isinstance(self.base_model_config, Mapping):
            raise ValueError(
                f"base_model_config must be a mapping, got {type(self.base_model_config).__name__}"
            )
        if not isinstance(self.runs, list) or not all(isinstance(r, RunSpec) for r in self.runs):
            raise ValueError("runs must be a list of mappings")
        if self.concurrent:
            self._check_concurrent()
        if self.base_model_config is not None:
            if self.base_model != "default":
                raise ValueError("base_model_config only applies to base_model: default")
            self.builtin_base()  # validates the fields
        self._check_contrasts()
        self._check_lr_grid()
        for row in self.runs:
            if row.train_length == "native" and self.context.target_length is None:
                raise ValueError(
                    f"runs[{row.name}].train_length: native needs context.target_length (the "
                    "length whose tokens it matches)"
                )

    def _check_contrasts(self) -> None:
        """Comparators and families name rows of this experiment (report-only fields, but a
        typo must still fail before any work)."""
        names = {r.name for r in self.runs}
        for row in self.runs:
            if row.comparator is not None and row.comparator not in names:
                raise ValueError(
                    f"runs[{row.name}].comparator {row.comparator!r} is not a row "
                    f"(rows: {sorted(names)})"
                )
        if self.families is None:
            return
        if not isinstance(self.families, Mapping) or not self.families:
            raise ValueError(
                f"families must be a non-empty mapping of name: [row, ...], got {self.families!r}"
            )
        with_comparator = {r.name for r in self.runs if r.comparator is not None}
        for name, rows in self.families.items():
            _check_str("families key", name)
            if isinstance(rows, str):  # `ablation: lora` means [lora]
                rows = [rows]
            if not isinstance(rows, (list, tuple)) or not rows:
                raise ValueError(f"families[{name}] must be a non-empty list of rows, got {rows!r}")
            unknown = [r for r in rows if r not in names]
            if unknown:
                raise ValueError(f"families[{name}] names unknown rows {unknown}")
            lonely = [r for r in rows if r not in with_comparator]
            if lonely:
                raise ValueError(
                    f"families[{name}] lists rows without a comparator {lonely} (a family "
                    "holds contrasts: give each row its comparator)"
                )
            if len(set(rows)) != len(rows):
                raise ValueError(f"families[{name}] lists a row twice: {list(rows)}")
            self.families[name] = list(rows)
        self.families = dict(self.families)

    def _check_lr_grid(self) -> None:
        """``lr_grid``: positive rates; its seeds and steps; the selection split it needs."""
        if self.lr_grid is None:
            if self.data.selection_fraction is not None:
                raise ValueError(
                    "data.selection_fraction holds documents out for lr_grid, which is not set"
                )
            return
        if isinstance(self.lr_grid, (int, float, str)) and not isinstance(self.lr_grid, bool):
            self.lr_grid = [self.lr_grid]  # `lr_grid: 1e-3` means [1e-3]
        if not isinstance(self.lr_grid, (list, tuple)) or not self.lr_grid:
            raise ValueError(
                f"lr_grid must be a non-empty list of positive learning rates, got {self.lr_grid!r}"
            )
        self.lr_grid = [_yaml_number(lr) for lr in self.lr_grid]
        for lr in self.lr_grid:
            check_range("lr_grid[]", lr, low=0, low_open=True)
        if len(set(self.lr_grid)) != len(self.lr_grid):
            raise ValueError(f"lr_grid lists a rate twice: {list(self.lr_grid)}")
        self.lr_grid = [float(lr) for lr in self.lr_grid]
        self.lr_grid_seeds = _seed_list("lr_grid_seeds", self.lr_grid_seeds)
        if self.lr_grid_steps is not None:
            check_range("lr_grid_steps", self.lr_grid_steps, low=1, integer=True)
        if self.data.selection_fraction is None:
            self.data.selection_fraction = DEFAULT_SELECTION_FRACTION
            if self.data.validation_fraction + self.data.selection_fraction >= 1:
                raise ValueError(
                    "data.validation_fraction leaves no documents for lr_grid's selection "
                    f"split ({DEFAULT_SELECTION_FRACTION}) and training; lower it"
                )

    def row_lr(self, row: RunSpec) -> float:
        """The learning rate ``row`` trains at without a selection: its own, else ``train.lr``."""
        return row.lr if row.lr is not None else self.train.lr

    def needs_lr_selection(self, row: RunSpec) -> bool:
        """``lr_grid`` chooses this row's rate: it trains and fixes none itself."""
        return self.lr_grid is not None and row.trains and row.lr is None

    def _check_eval_lengths(self) -> None:
        """Every scored length fits in the ``eval.max_tokens`` validation tokens (a longer one
        would be trained for, then fail its metric)."""
        lengths = self.eval.lengths or (
            [self.context.target_length] if self.context.target_length else []
        )
        if self.eval.max_tokens is None:  # the whole split: checked once it is read
            return
        too_long = [n for n in lengths if n > self.eval.max_tokens]
        if too_long:
            key = "eval.lengths" if self.eval.lengths else "context.target_length"
            raise ValueError(
                f"{key} {too_long} exceed eval.max_tokens={self.eval.max_tokens} (each length "
                "is scored over those validation tokens); raise eval.max_tokens or lower it"
            )

    def _check_concurrent(self) -> None:
        """Rows trained on one shared frozen base must agree on what that base is."""
        trained = [r for r in self.runs if r.trains]
        shared = {(r.extend_context, r.attention or self.context.attention) for r in trained}
        if len(shared) > 1:
            raise ValueError(
                "concurrent: true needs every trained row to share extend_context and attention"
            )
        if self.train.report_to or self.train.eval_every:
            raise ValueError(
                "concurrent: true does not support train.report_to or train.eval_every yet; "
                "drop them or set concurrent: false"
            )
        bad = [r.name for r in trained if r.trainable]
        if bad:
            raise ValueError(
                f"concurrent: true, but rows {bad} train base weights (embeddings/norms/all), "
                "which one frozen base cannot share; drop their `trainable` or set concurrent: "
                "false"
            )
        if self.lr_grid is not None or any(r.lr is not None for r in trained):
            raise ValueError(
                "concurrent: true trains every row in one step at train.lr; drop lr_grid and "
                "runs[].lr, or set concurrent: false"
            )
        native = [r.name for r in trained if r.train_length == "native"]
        if native:
            raise ValueError(
                f"concurrent: true, but rows {native} train at another length (train_length: "
                "native); set concurrent: false"
            )

    def check_adapter_specs(self) -> None:
        """Build every trained row's adapter config now: a typo in a spec name or an override
        is a config error before any work, not a failed run."""
        for row in self.runs:
            if row.has_adapter:
                try:
                    load_adapter_spec(row.adapter, self.adapter_overrides(row), self.spec_dir)
                except (FileNotFoundError, ValueError) as e:
                    raise ValueError(f"runs[{row.name}]: {e}") from e

    def check_lm_eval_tasks(self) -> None:
        """Every ``eval.lm_eval`` name known to lm-eval: a typo is a config error before any
        work (building lm-eval's index takes seconds, so this is not in ``__post_init__``)."""
        if self.eval.lm_eval:
            from .integrations.lm_eval import task_manager

            task_manager(self.eval.lm_eval, self.eval.lm_eval_include)

    def adapter_overrides(self, row: RunSpec) -> dict[str, Any]:
        """The row's adapter overrides, plus what the run itself decides
        (:meth:`run_overrides` over this experiment's ``train.max_steps``)."""
        return {**row.overrides, **self.run_overrides(row, self.train.max_steps)}

    def run_overrides(self, row: RunSpec, max_steps: int) -> dict[str, Any]:
        """What a run of ``max_steps`` optimizer steps sets on the row's adapter beyond its
        overrides (:meth:`AdapterConfig.run_overrides`: a COLA chain given by ``chain_length``
        is spread over ``max_steps``). A learning-rate selection run, shorter than the
        comparison's, asks with its own steps, so it trains the schedule the row will."""
        spec = read_yaml(resolve_spec_path(row.adapter, self.spec_dir))
        name = spec.get("variant")
        # an unknown or malformed name: load_adapter_spec names it when the row is built
        variant = VARIANTS.get(name) if isinstance(name, str) else None
        if variant is None:
            return {}
        return variant.run_overrides({**spec, **row.overrides}, row.overrides, max_steps)

    def builtin_base(self):
        """The built-in base model's config (``base_model_config`` applied), or None."""
        if self.base_model != "default":
            return None
        from .base_model import BaseModelConfig

        fields = dict(self.base_model_config or {})
        try:
            return BaseModelConfig(**fields)
        except TypeError as e:
            raise ValueError(f"base_model_config: {e}") from e
        except ValueError as e:
            raise ValueError(f"base_model_config.{e}") from e


_SECTIONS = {"data": DataConfig, "context": ContextConfig, "train": TrainConfig, "eval": EvalConfig}


def _build(cls, data: Mapping[str, Any], where: str):
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from e
    except ValueError as e:
        message = str(e)
        prefix = f"{where}." if where != "config" and not message.startswith(where) else ""
        raise ValueError(prefix + message) from e


def experiment_from_dict(data: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a parsed YAML mapping into an :class:`ExperimentConfig`."""
    data = copy.deepcopy(dict(data))
    for key, cls in _SECTIONS.items():
        if key in data:
            data[key] = _build(cls, data[key] or {}, key)
    if "runs" in data:
        runs = data["runs"]
        if not isinstance(runs, list):
            raise ValueError("runs must be a list of mappings")
        data["runs"] = [_build(RunSpec, r, f"runs[{i}]") for i, r in enumerate(runs)]
    return _build(ExperimentConfig, data, "config")


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested mapping."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, _, raw = item.partition("=")
        value = parse_yaml(raw, f"override {key.strip()}")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a mapping")
        node[parts[-1]] = value
    return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping from ``path``; errors name the file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such config file")
    if file.stat().st_size > MAX_YAML_BYTES:
        raise ValueError(f"{file}: larger than {MAX_YAML_BYTES >> 10} KiB, not a config file")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{file}: not a YAML config file (not UTF-8 text)") from None
    data = parse_yaml(text, str(file)) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a mapping at the top level")
    return data


def check_yaml_size(data: Any, where: str) -> None:
    """Refuse a document that expands to more than :data:`MAX_YAML_NODES` values, or nests
    deeper than :data:`MAX_YAML_DEPTH`.

    Counts values as they would be written out (an alias counted each time it is used),
    stopping at the limit: the check itself costs at most that many steps.

    Raises:
        ValueError: naming ``where``.
    """
    stack, seen = [(data, 0)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_YAML_NODES:
            raise ValueError(
                f"{where}: more than {MAX_YAML_NODES:,} values once YAML aliases are expanded "
                "(an alias bomb?)"
            )
        if depth > MAX_YAML_DEPTH:
            raise ValueError(f"{where}: nested more than {MAX_YAML_DEPTH} levels deep")
        if isinstance(node, Mapping):
            stack.extend((k, depth + 1) for k in node.keys())
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)


def load_experiment(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read, override and validate an experiment YAML."""
    data = apply_overrides(read_yaml(path), overrides)
    config = experiment_from_dict(data)
    if config.spec_dir is None:
        config.spec_dir = str(Path(path).resolve().parent)
    config.check_adapter_specs()
    config.check_lm_eval_tasks()
    return config


def resolve_spec_path(adapter: str, spec_dir: str | None) -> Path:
    """Find an adapter spec: a path, a path relative to ``spec_dir``, or a built-in name."""
    candidates = [Path(adapter)]
    if spec_dir:
        candidates.append(Path(spec_dir) / adapter)
    candidates.append(ADAPTER_SPEC_DIR / adapter)
    candidates.append(ADAPTER_SPEC_DIR / f"{adapter}.yaml")
    for c in candidates:
        if c.is_file():
            return c
    builtin = sorted(p.stem for p in ADAPTER_SPEC_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"adapter spec {adapter!r} not found (built-in specs: {builtin})")


def load_adapter_spec(
    adapter: str, overrides: Mapping[str, Any] | None = None, spec_dir: str | None = None
) -> AdapterConfig:
    """Build the adapter config a run names: spec file + overrides, validated."""
    path = resolve_spec_path(adapter, spec_dir)
    data = read_yaml(path)
    data.update(overrides or {})
    if "variant" not in data:
        raise ValueError(f"{path}: the spec must name its variant")
    try:
        return AdapterConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e
