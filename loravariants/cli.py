"""The ``loravariants`` command.

Each subcommand is a function ``main(argv) -> exit status`` living next to the code it drives;
this file only dispatches. A user error (bad config value, missing file) prints one line and
exits with status 2; a bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, function, one-line help); modules are imported on use so that
# `loravariants --help` stays fast and a missing optional piece only affects its command.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "quickstart": (
        "loravariants.cli",
        "quickstart_main",
        "the main job: build the default base, extend it 4x with S2-Attn, compare all variants",
    ),
    "pretrain-base": (
        "loravariants.base_model",
        "pretrain_base_main",
        "build (or reuse) the small default Llama-architecture base model",
    ),
    "analyze": (
        "loravariants.analysis.report",
        "analyze_main",
        "SVD analysis of a saved adapter directory (ours or any peft LoRA)",
    ),
}


def quickstart_main(argv: Sequence[str]) -> int:
    """Placeholder until the comparison lands: says what the main job will do."""
    parser = argparse.ArgumentParser(prog="loravariants quickstart")
    parser.add_argument("--quick", action="store_true", help="a tiny budget, for CI (~2 min)")
    parser.parse_args(argv)
    print(
        "loravariants quickstart will: build (or reuse) the default base model, extend its\n"
        "context 4x with position interpolation and S2-Attn, train LoRA, COLA, MultiLoRA and\n"
        "MixLoRA on the same data and budget over several seeds, and write a report.\n"
        "The comparison is not implemented yet in this version; nothing was run."
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loravariants",
        description="LoRA variants behind one adapter interface, with a LongLoRA training loop.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``loravariants`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        parser.print_usage(sys.stderr)
        print(
            f"loravariants: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    module_name, func_name, _ = COMMANDS[command]
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        print(f"loravariants {command}: not available in this version ({e})", file=sys.stderr)
        return 2
    try:
        return int(func(rest) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"loravariants {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loravariants {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
