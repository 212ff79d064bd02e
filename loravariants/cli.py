"""The ``loravariants`` command.

Each subcommand is a function ``<name>_main(argv) -> exit status`` here: it parses the
arguments and calls the library. The library's modules are imported inside those functions,
on use, so that ``loravariants --help`` stays fast and a missing optional piece (an extra)
only affects its own command. A user error (bad config value, missing file) prints one line and
exits with status 2; a bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ._version import __version__
from .real_models import MissingExtraError


def _print_summary(out) -> int:
    report = Path(out) / "report.md"
    data = json.loads((Path(out) / "results.json").read_text())
    failed = [r for r in data["runs"] if r.get("status") != "ok"]
    table = [ln for ln in report.read_text().splitlines() if ln.startswith("|")]
    print("\n".join(table))
    print(f"\nreport: {report}")
    if failed:
        print(f"{len(failed)} run(s) failed; see the table and runs/*/error.txt")
    metric_errors = [r for r in data["runs"] if r.get("metric_errors")]
    for r in metric_errors:
        print(f"{r['key']}: run kept, but metric(s) failed: {r['metric_errors']}")
    if metric_errors:
        print("rerun the same command to compute the failed metrics again")
    # the exit status: a failed run (or metric) must not look like success
    return 1 if failed or metric_errors else 0


def _add_workers_argument(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--workers",
        default=default,
        metavar="N|auto",
        help=f"run the grid in N local processes of cores/N torch threads each, then merge "
        f"(auto: one per core, at most 4, on a CPU; 1 on a GPU); default {default}",
    )


def _run_grid(config, config_file, overrides: Sequence[str], workers: int | str, quiet: bool):
    """The comparison in this process, or in ``--workers`` processes (compare/workers.py);
    ``workers`` as :func:`~loravariants.compare.workers.parse_workers` gives it."""
    from .compare import compare
    from .compare.workers import default_workers, run_workers

    count = workers
    if count == "auto":
        count = default_workers(config)
    if count == 1:
        return compare(config, progress=not quiet)
    return run_workers(config, config_file, overrides, count, progress=not quiet)


def compare_main(argv: Sequence[str]) -> int:
    """``loravariants compare --config FILE [key.sub=value ...]``."""
    from .compare import compare
    from .compare.shard import (
        add_shard_arguments,
        merge_shards,
        merge_summary,
        parse_shard,
        shard_summary,
    )
    from .compare.workers import parse_workers
    from .config import load_experiment

    parser = argparse.ArgumentParser(prog="loravariants compare")
    parser.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="key.sub=value (YAML values)")
    # a grid over a job array (compare/shard.py, docs/distributed.md)
    add_shard_arguments(parser)
    _add_workers_argument(parser, default="1")
    args = parser.parse_args(argv)
    workers = parse_workers(args.workers)
    if workers != 1 and (args.shard is not None or args.merge):
        raise ValueError("--workers runs (and merges) every shard itself: drop --shard/--merge")
    shard = parse_shard(args.shard) if args.shard is not None else None
    config = load_experiment(args.config, args.overrides)
    if args.merge:
        out = merge_shards(config)
        return merge_summary(out, config, _print_summary(out))
    if shard is not None:
        out = compare(config, progress=not args.quiet, shard=shard)
        return shard_summary(out, config, shard)
    out = _run_grid(config, args.config, args.overrides, workers, args.quiet)
    return _print_summary(out)


QUICK_OVERRIDES = [
    # a tiny built-in base (cached separately, a few seconds to build) so the end-to-end check
    # fits in well under a minute on a 2-core CPU (18 s measured idle, base build included)
    "base_model_config={num_layers: 2, hidden_size: 128, num_heads: 4, num_kv_heads: 2, "
    "intermediate_size: 256, vocab_size: 1024, steps: 30, batch_size: 8, "
    "tokenizer_chars: 400000, max_documents: 120}",
    "data.max_documents=80",
    "context.target_length=512",
    "train.max_steps=3",
    "train.batch_size=1",
    "train.warmup_steps=1",
    "eval.max_tokens=1024",
    "eval.passkey_lengths=[200]",
    "eval.passkey_trials=1",
    "seeds=[0]",
    # MixLoRA's smallest adapter on that base (r = 1): LoRA / COLA r 12, MultiLoRA r 3 within 4%
    "match_params=22272",
]
GPU_OVERRIDES = [
    "train.max_steps=200",
    "train.batch_size=8",
    "seeds=[0,1,2]",
    "eval.max_tokens=65536",
    "eval.passkey_trials=10",
]


def quickstart_main(argv: Sequence[str]) -> int:
    """The main job on the built-in defaults (``configs/quickstart.yaml``)."""
    import torch

    from .compare.workers import parse_workers
    from .config import CONFIG_DIR, load_experiment

    parser = argparse.ArgumentParser(prog="loravariants quickstart")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=(
            "a tiny budget (one seed, 3 steps, a tiny base): an end-to-end check, under a "
            "minute on 2 CPU cores"
        ),
    )
    parser.add_argument("--output", default=None, help="output folder (default runs/quickstart)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_workers_argument(parser, default="1")
    parser.add_argument("overrides", nargs="*", help="key.sub=value (YAML values)")
    args = parser.parse_args(argv)
    overrides = []
    if args.quick:
        overrides += [*QUICK_OVERRIDES, "output_dir=runs/quickstart-quick"]
    elif torch.cuda.is_available():
        overrides += GPU_OVERRIDES  # a GPU affords more steps, seeds and evaluation tokens
    if args.output:
        overrides.append(f"output_dir={args.output}")
    overrides += args.overrides  # the user's last: they win over the presets
    config_file = CONFIG_DIR / "quickstart.yaml"
    config = load_experiment(config_file, overrides)
    out = _run_grid(config, config_file, overrides, parse_workers(args.workers), args.quiet)
    return _print_summary(out)


def train_main(argv: Sequence[str]) -> int:
    """``loravariants train --config FILE --run NAME [--seed S] [key=value ...]``.

    Under ``accelerate launch`` / ``torchrun`` (DDP or FSDP2) the row trains over every
    process (:func:`_train_launched`); the main process records it as one process would.
    """
    from dataclasses import replace

    from .compare import compare
    from .compare.records import run_folder
    from .config import load_experiment

    parser = argparse.ArgumentParser(prog="loravariants train")
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--run", default=None, help="row name (default: the first trained row)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: the first)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="key.sub=value (YAML values)")
    args = parser.parse_args(argv)
    config = load_experiment(args.config, args.overrides)
    rows = [r for r in config.runs if (r.name == args.run if args.run else r.trains)]
    if not rows:
        raise ValueError(
            f"no run named {args.run!r} in {args.config}; rows: {[r.name for r in config.runs]}"
        )
    if not rows[0].trains:
        raise ValueError(f"row {rows[0].name!r} trains nothing (adapter: none); use eval")
    seed = config.seeds[0] if args.seed is None else args.seed
    if seed not in config.seeds:
        config = replace(config, seeds=[*config.seeds, seed])
    from .distributed import launch_strategy

    if launch_strategy() != "single":  # accelerate launch / torchrun: every process trains
        out = _train_launched(config, rows[0], seed, progress=not args.quiet)
        if out is None:
            return 0  # not the main process: it trained its share; the main one records it
    else:
        # the run lands in the experiment's folder, and the report keeps covering every row
        out = compare(config, progress=not args.quiet, only=[(rows[0].name, seed)])
    _print_summary(out)
    run_dir = run_folder(out, rows[0].name, seed)
    runs = json.loads((out / "results.json").read_text())["runs"]
    record = next((r for r in runs if r.get("key") == f"{rows[0].name}/seed{seed}"), {})
    # this run's record decides: an adapter left by an earlier attempt is not a success
    if record.get("status") != "ok" or not (run_dir / "adapter").is_dir():
        print(f"the run failed; see {run_dir / 'error.txt'}", file=sys.stderr)
        return 1
    print(f"adapter: {run_dir / 'adapter'}")
    return 0


def _train_launched(config, row, seed: int, progress: bool):
    """``loravariants train`` as one of several processes (``accelerate launch --config_file
    configs/accelerate/{ddp,fsdp}.yaml`` or ``torchrun``): the row trains over every process,
    ``train.batch_size`` rows per process per micro-batch; the main process writes the adapter
    into the row's usual folder, evaluates it and records it as a one-process run would.

    Returns:
        The output folder on the main process, None on the others.

    Raises:
        ValueError: the launch strategy does not support the row's adapter (before any work).
    """
    import os

    import torch
    from accelerate import PartialState

    from .compare import compare
    from .compare.env import load_environment
    from .compare.run import follow_launched_run
    from .config import load_adapter_spec
    from .distributed import launch_strategy, supported_strategies

    strategy = launch_strategy()
    adapter = load_adapter_spec(row.adapter, config.adapter_overrides(row), config.spec_dir)
    reason = adapter.unsupported_strategy(strategy)
    if reason is not None:  # train() would refuse it too, but after the base model loaded
        raise ValueError(
            f"row {row.name!r} ({adapter.variant}) cannot train under {strategy}: {reason}; "
            f"supported strategies for it: {', '.join(supported_strategies(adapter))} "
            "(docs/distributed.md)"
        )
    if torch.cuda.is_available():  # "cuda" below means this process's own GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.is_main_process:
        # the main process loads (and, the first time, builds) the base model and data first
        env = load_environment(config, progress)
        state.wait_for_everyone()
        return compare(config, progress=progress, env=env, only=[(row.name, seed)], launched=True)
    state.wait_for_everyone()
    follow_launched_run(config, row, seed, load_environment(config, progress=False))
    return None


def eval_main(argv: Sequence[str]) -> int:
    """``loravariants eval [--config FILE] [--adapter DIR] [key.sub=value ...]``.

    Without ``--config``: the built-in base, stdlib validation text, and the lengths given;
    an adapter trained with an extended context brings its extension (saved with it) and is
    evaluated up to that context. With it: the experiment's base model, data, context
    extension (applied before the adapter is loaded; an adapter trained with another
    extension is refused) and evaluation settings.

    ``--lm-eval TASKS`` (or the config's ``eval.lm_eval``) runs lm-eval tasks on the model,
    its adapter attached; their names are checked before anything loads. With tasks,
    perplexity runs only when ``--lengths`` is given.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .base_model import resolve_base_model
    from .compare.feasible import check_feasible
    from .compare.plan import eval_lengths
    from .config import DataConfig, EvalConfig, ExperimentConfig, RunSpec, load_experiment
    from .data import load_validation_tokens
    from .evaluate import passkey_accuracy, perplexity_at_lengths
    from .io import load_adapter
    from .longlora.context import describe_extension, extend_context

    parser = argparse.ArgumentParser(prog="loravariants eval")
    parser.add_argument(
        "--config", default=None, help="experiment YAML (base, data, context, eval)"
    )
    parser.add_argument(
        "--model", default=None, help="base model (default: the config's, or built-in)"
    )
    parser.add_argument("--adapter", default=None, help="adapter directory (ours or peft)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="context lengths")
    parser.add_argument("--passkey", type=int, nargs="*", default=None, help="passkey lengths")
    _add_lm_eval_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="key.sub=value for the experiment YAML")
    args = parser.parse_args(argv)
    if args.config:
        config = load_experiment(args.config, args.overrides)
    else:
        if args.overrides:
            raise ValueError("key=value overrides need --config")
        config = ExperimentConfig(runs=[RunSpec(name="eval")], data=DataConfig(), eval=EvalConfig())
    lm_tasks = _lm_eval_settings(args, config.eval)  # names checked before any work
    if args.model:
        config.base_model, config.base_model_config = args.model, None
    check_feasible(config, rows=False)  # what this machine cannot hold: before the base loads
    path, tokenizer = resolve_base_model(config.base_model, config=config.builtin_base())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    native = int(model.config.max_position_embeddings)
    target = config.context.target_length
    if target and target > native:
        extend_context(
            model,
            target,
            method=config.context.method,
            trainable=(),
            factor_rounding=config.context.factor_rounding,
        )
    if args.adapter:
        load_adapter(model, args.adapter)  # applies the context extension it was trained with
        extension = describe_extension(model)
        if extension and not (target and target > native):  # evaluate up to its context too
            config.context.target_length = extension["target_length"]
            native = extension["original_length"]
    result: dict = {}
    if not lm_tasks or args.lengths:
        lengths = args.lengths or eval_lengths(config, native)
        tokens = load_validation_tokens(config.data, tokenizer, config.eval.max_tokens)
        result["perplexity"] = perplexity_at_lengths(
            model, tokens, lengths, stride_ratio=config.eval.stride_ratio, progress=True
        )
    if lm_tasks:
        from .integrations.lm_eval import evaluate_tasks

        e = config.eval
        result["lm_eval"], result["lm_eval_metrics"] = evaluate_tasks(
            model, tokenizer, lm_tasks, e.lm_eval_include, e.lm_eval_limit, e.lm_eval_batch_size
        )
    passkey = config.eval.passkey_lengths if args.passkey is None else args.passkey
    if passkey:
        pk = passkey_accuracy(model, tokenizer, passkey, config.eval.passkey_trials)
        result["passkey"] = {n: r.accuracy for n, r in pk.items()}
    print(json.dumps(result, indent=2))
    return 0


def _add_lm_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lm-eval",
        action="append",
        default=None,
        metavar="TASKS",
        help="lm-eval task names, comma-separated (e.g. arc_easy,gsm8k); the [eval] extra",
    )
    parser.add_argument(
        "--lm-eval-include", default=None, metavar="DIR", help="a folder of your own task YAMLs"
    )
    parser.add_argument(
        "--lm-eval-limit", type=int, default=None, metavar="N", help="documents per task"
    )


def _lm_eval_settings(args: argparse.Namespace, eval_config) -> list[str]:
    """The lm-eval tasks to run (the command line's, else the config's), written into
    ``eval_config``; every name checked now, before any model loads."""
    from .integrations.lm_eval import task_manager

    if args.lm_eval:
        eval_config.lm_eval = [t.strip() for a in args.lm_eval for t in a.split(",") if t.strip()]
    if args.lm_eval_include is not None:
        eval_config.lm_eval_include = args.lm_eval_include
    if args.lm_eval_limit is not None:
        eval_config.lm_eval_limit = args.lm_eval_limit
    eval_config.__post_init__()  # the fields' checks (a limit >= 1, a list of names)
    if eval_config.lm_eval:
        task_manager(eval_config.lm_eval, eval_config.lm_eval_include)
    return list(eval_config.lm_eval)


def pretrain_base_main(argv: Sequence[str]) -> int:
    """``loravariants pretrain-base [--recipe cpu|gpu | --config FILE] [--device cpu|cuda|auto]
    [--cache-dir DIR] [--force] [--quiet] [--export DIR [--export-dtype D]] [key.sub=value
    ...]``: print the path. ``--config`` takes an experiment YAML and builds the base its
    ``base_model_config`` describes; ``--recipe`` names one of ``base_model.RECIPES`` (default
    ``cpu``, the default base); ``--export`` also writes it as a shipped base
    (``shipped_base.py``)."""
    from .base_model import (
        RECIPES,
        BaseModelConfig,
        base_model_path,
        build_base_model,
        default_cache_dir,
        recipe_config,
        resolve_device,
    )
    from .compare.feasible import check_feasible
    from .config import load_experiment

    parser = argparse.ArgumentParser(
        prog="loravariants pretrain-base",
        description="Build (or reuse) the built-in base model and print its folder.",
    )
    parser.add_argument(
        "--cache-dir", default=None, help=f"cache root (default {default_cache_dir()})"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--config", default=None, help="experiment YAML (its base_model_config)")
    parser.add_argument(
        "--recipe",
        default=None,
        choices=sorted(RECIPES),
        help="a named recipe (default cpu: the default base; gpu: sized for a few GPU minutes)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda", "auto"),
        help="where to pretrain (default cpu; a cuda build is cached under its own key)",
    )
    parser.add_argument(
        "--export",
        default=None,
        metavar="DIR",
        help="also write the base as a shipped base (manifest + hashes, files <= 16 MiB) to DIR",
    )
    parser.add_argument(
        "--export-dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="weights dtype of --export (default float32: bit-identical to the build)",
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value for the experiment YAML")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)  # before any work: --device cuda without CUDA
    config = BaseModelConfig()
    if args.export and Path(args.export).exists():  # before minutes of pretraining
        raise ValueError(f"--export {args.export} already exists; name a new folder")
    if args.recipe and args.config:
        raise ValueError("give --recipe or --config, not both")
    if args.recipe:
        config = recipe_config(args.recipe)
    elif args.config:
        experiment = load_experiment(args.config, args.overrides)
        check_feasible(experiment, rows=False)  # a base this machine cannot hold: refused now
        config = experiment.builtin_base()
        if config is None:
            raise ValueError(f"{args.config}: base_model is not the built-in one")
    elif args.overrides:
        raise ValueError("key=value overrides need --config")
    cached = (base_model_path(config, args.cache_dir, device) / "build_info.json").is_file()
    if not cached or args.force:
        print(f"pretraining the base model on {device} (a few minutes) ...", file=sys.stderr)
    path = build_base_model(
        config,
        args.cache_dir,
        force=args.force,
        progress=not args.quiet,
        device=device,
        recipe=args.recipe,
        acceptance_prompts=100,  # the acceptance figures (issue 28) on every explicit build
    )
    metrics = json.loads((path / "build_info.json").read_text())["metrics"]
    print(
        f"{'reused' if cached and not args.force else 'built'}: final train loss "
        f"{metrics['final_train_loss']:.3f}, validation perplexity "
        f"{metrics['validation_perplexity']:.2f}, {metrics['train_seconds']:.0f} s training",
        file=sys.stderr,
    )
    acceptance = metrics.get("acceptance")
    if acceptance:  # builds from before the acceptance figures existed have none
        figures = ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in acceptance.items()
            if k.startswith(("passkey", "ppl"))
        )
        verdict = "accepted" if acceptance["accepted"] else "not accepted"
        print(
            f"acceptance ({acceptance['prompts']} prompts): {figures}: {verdict}", file=sys.stderr
        )
    if args.export:
        from .shipped_base import export_shipped_base

        # the recipe a build used ("cpu" when neither --recipe nor --config named one)
        name = args.recipe or ("custom" if args.config else "cpu")
        manifest = export_shipped_base(path, args.export, name=name, dtype=args.export_dtype)
        print(
            f"exported to {args.export}: {len(manifest['files'])} files, weights sha256 "
            f"{manifest['weights_sha256']}",
            file=sys.stderr,
        )
    print(path)
    return 0


def analyze_main(argv: Sequence[str] | None = None) -> int:
    """``loravariants analyze PATH [--base MODEL] [--out DIR]``.

    Prints one line per update and the means per layer type; with ``--out`` also writes
    ``analysis.csv``, ``analysis.json``, ``spectra.png`` and ``effective_rank.png``. A missing
    or corrupt adapter prints one line and returns 2.
    """
    from .analysis.plots import plot_effective_rank, plot_spectra
    from .analysis.report import analyze

    parser = argparse.ArgumentParser(
        prog="loravariants analyze",
        description="SVD analysis of a saved adapter (ours or any peft LoRA directory).",
    )
    parser.add_argument("path", help="adapter directory")
    parser.add_argument("--base", help="local base model path, for amplification and intruders")
    parser.add_argument("--out", help="directory for analysis.csv/.json and plots")
    parser.add_argument("--max-rows", type=int, default=None, help="print at most this many rows")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.max_rows is not None and args.max_rows < 1:
        _print_error("analyze", f"--max-rows must be >= 1, got {args.max_rows}")
        return 2
    out = Path(args.out) if args.out else None
    if out is not None and (out.is_file() or any(p.is_file() for p in out.parents)):
        _print_error("analyze", f"--out {out}: a file is in the way")
        return 2
    try:
        report = analyze(args.path, base=args.base)
    except (FileNotFoundError, ValueError, OSError) as e:
        _print_error("analyze", e)  # bounded and escaped, as every CLI error
        return 2
    print(report.table(args.max_rows))
    print()
    print(report.type_table())
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        report.to_csv(out / "analysis.csv")
        report.to_json(out / "analysis.json")
        plot_spectra({Path(args.path).name: report}, out / "spectra.png")
        plot_effective_rank({Path(args.path).name: report}, out / "effective_rank.png")
        print(f"\nwritten: {out}/analysis.csv, analysis.json, spectra.png, effective_rank.png")
    return 0


# subcommand -> (function, one-line help). The library's modules are imported inside each
# function, on use, so that `loravariants --help` stays fast and a missing optional piece only
# affects its command.
COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "quickstart": (
        quickstart_main,
        "the main job: build the default base, extend it 4x with S2-Attn, compare all variants",
    ),
    "compare": (
        compare_main,
        "run an experiment config: every adapter x seed, then the report",
    ),
    "train": (
        train_main,
        "train one row of an experiment config (one seed) and save its adapter",
    ),
    "eval": (
        eval_main,
        "perplexity at several lengths (+ passkey, lm-eval tasks) of a base model with an "
        "optional adapter",
    ),
    "pretrain-base": (
        pretrain_base_main,
        "build (or reuse) the small default Llama-architecture base model",
    ),
    "analyze": (
        analyze_main,
        "SVD analysis of a saved adapter directory (ours or any peft LoRA)",
    ),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loravariants",
        description="LoRA variants behind one adapter interface, with a LongLoRA training loop.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


#: the most characters of an error message the CLI prints
ERROR_LIMIT = 600


def _one_line(error: BaseException | str, limit: int = ERROR_LIMIT) -> str:
    """An error as one line of bounded length, safe for a terminal: a hostile value can be
    huge, hold newlines, or carry ANSI escapes and NUL bytes (shown escaped, as ``\\x1b``)."""
    from .utils import printable

    return printable(" ".join(str(error).split()), limit=limit)


def _print_error(command: str, error: BaseException | str) -> None:
    """The one way the CLI reports a user error: ``loravariants CMD: error: ...`` on one
    bounded, escaped line of stderr."""
    print(f"loravariants {command}: error: {_one_line(error)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``loravariants`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        parser.print_usage(sys.stderr)
        shown = _one_line(repr(command), limit=60)
        print(
            f"loravariants: error: unknown command {shown}; choose from {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    func, _ = COMMANDS[command]
    try:
        return int(func(rest) or 0)
    except (ValueError, OSError) as e:  # a missing, unreadable or misplaced file or folder
        _print_error(command, e)
        return 2
    except MissingExtraError as e:  # an optional package a named base model needs
        _print_error(command, e)
        return 2
    except KeyboardInterrupt:
        print(f"loravariants {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
