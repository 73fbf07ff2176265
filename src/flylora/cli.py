"""`flylora <command>`: a thin, lazy dispatcher.

Each command lives in its own module, named in COMMANDS with its one-line help, and exposes
`add_arguments(parser)` and `run(args) -> int`. A module may set `TAKES_REMAINDER = True`: the
arguments the command does not know are then passed on in order as `args.remainder` (for a
wrapper such as `flylora lm-eval` that hands them to another program).

Only the module of the command being run is imported, so `flylora --help` imports nothing heavy.
Expected errors (bad values, missing files, unwritable folders, a busy folder) are one line on
stderr and exit 2; Ctrl-C is one line and exit 130. `--debug` (or FLYLORA_DEBUG=1) shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# command name -> (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("flylora.pipeline.demo", "the main job: the multi-task FlyLoRA vs LoRA experiment (train, merge, report) on CPU"),
    "eval": ("flylora.evaluation.cli", "evaluate a model (+ adapters) on tasks"),
    "train": ("flylora.pipeline.train", "train an adapter from a YAML recipe"),
    "merge": ("flylora.merge.cli", "merge task adapters (exact in delta-W space)"),
    "report": ("flylora.report.cli", "tables and plots from results JSON"),
    "sweep": ("flylora.pipeline.sweep", "a learning rate per method: select on a validation carve, report on the test carve"),
    "bench": ("flylora.bench.cli", "speed / memory benchmark against PEFT LoRA and the frozen base"),
    "convert": ("flylora.interop.convert_cli", "convert official FlyLoRA checkpoints to flylora adapters and back"),
    "lm-eval": ("flylora.interop.lm_eval", "run lm-evaluation-harness's CLI with the flylora methods registered"),
}

DESCRIPTION = ("FlyLoRA, TopLoRA, MoE-LoRA and their baselines as PEFT methods: train adapters from YAML "
               "recipes, evaluate, merge and report.")
EPILOG = ("Run `flylora <command> --help` for a command's options. Errors are one line; add --debug "
          "(or set FLYLORA_DEBUG=1) to see the traceback.")


def _module_exists(module: str) -> bool:
    """Is the command's module present? Checked on disk, without importing anything (a room not
    built yet hides its command)."""
    parts = module.split(".")
    if parts[0] != "flylora":
        import importlib.util

        return importlib.util.find_spec(parts[0]) is not None
    base = Path(__file__).resolve().parent.joinpath(*parts[1:])
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _available() -> dict[str, tuple[str, str]]:
    return {name: entry for name, entry in COMMANDS.items() if _module_exists(entry[0])}


def _import_command(name: str):
    module = COMMANDS[name][0]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:  # a room not built yet: say so in one line
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            return None
        raise
    return mod if hasattr(mod, "add_arguments") and hasattr(mod, "run") else None


def _parser(commands: dict[str, tuple[str, str]], chosen: str | None, mod) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flylora", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="store_true", help="print the flylora version and exit")
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for name, (_, help_) in commands.items():
        kwargs = {"help": help_, "description": help_}
        if name == chosen and getattr(mod, "TAKES_REMAINDER", False):
            kwargs["allow_abbrev"] = False  # never take a passed-on option for an abbreviation of ours
        p = sub.add_parser(name, **kwargs)
        if name == chosen and mod is not None:
            mod.add_arguments(p)  # only the command being run: the others stay unimported
    return parser


def _first_command(argv: list[str]) -> str | None:
    for a in argv:
        if a in ("--debug", "--version"):
            continue
        return a if not a.startswith("-") else None
    return None


def _one_line(e: BaseException) -> str:
    """The message of an expected error, on one line."""
    if isinstance(e, KeyError) and e.args:
        msg = str(e.args[0])
    elif isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.strerror:
        msg = f"{e.strerror}: {e.filename!r}" if e.filename else e.strerror
        if e.filename2:
            msg += f" -> {e.filename2!r}"
    else:
        msg = str(e) or type(e).__name__
    lines = [line.strip() for line in msg.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _expected(e: BaseException) -> bool:
    if isinstance(e, (ValueError, FileNotFoundError, KeyError, PermissionError, IsADirectoryError,
                      NotADirectoryError, FileExistsError)):
        return True
    if isinstance(e, OSError):  # ENOSPC, EROFS, EDQUOT, ... and transformers' "cannot find the model"
        return True
    try:
        import yaml

        return isinstance(e, yaml.YAMLError)
    except ImportError:  # pragma: no cover
        return False


# known third-party deprecation notices that say nothing about the user's run (transformers 5 renames
# and torch.jit internals reached through transformers/peft); the CLI keeps every other warning
_DEPRECATION_NOISE = (
    r"`is_gradient_checkpointing` is deprecated",
    r"`gradient_checkpointing_enable` is deprecated",
    r"`gradient_checkpointing` is deprecated",  # TRL's SFTConfig sets the transformers-4 name
    r"`past_key_values` is deprecated",
    r"`torch\.jit\.script_method` is deprecated",
)


def _quiet_known_deprecations() -> None:
    import warnings

    for message in _DEPRECATION_NOISE:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_known_deprecations()
    commands = _available()
    chosen = _first_command(argv)
    mod = None
    if chosen in commands:
        mod = _import_command(chosen)
        if mod is None:
            print(f"flylora: error: command {chosen!r} is not available in this installation", file=sys.stderr)
            return 2
    parser = _parser(commands, chosen, mod)
    if mod is not None and getattr(mod, "TAKES_REMAINDER", False):
        args, rest = parser.parse_known_args(argv)
        args.remainder = rest[1:] if rest[:1] == ["--"] else rest
    else:
        args = parser.parse_args(argv)
    if args.version:
        from flylora import __version__

        print(f"flylora {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("FLYLORA_DEBUG", "") not in ("", "0")
    try:
        return int(mod.run(args) or 0)
    except KeyboardInterrupt as e:
        if debug:
            raise
        kept = str(e).strip()
        print(f"flylora {args.command}: interrupted" + (f"; {kept}" if kept else ""), file=sys.stderr)
        return 130
    except Exception as e:
        if debug or not _expected(e):
            raise
        # user errors are one clear line, not a traceback
        print(f"flylora {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
