"""`flylora <command>`: a thin dispatcher. Each command lives in its own room and exposes
`add_arguments(parser)` and `run(args) -> int`; this file only parses and calls."""
from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("flylora.demo", "the main job: the multi-task FlyLoRA vs LoRA experiment (train, merge, report) on CPU"),
    "eval": ("flylora.evaluate", "evaluate a model (+ adapters) on tasks"),
    "train": ("flylora.train", "train an adapter from a YAML recipe"),
    "merge": ("flylora.merge.cli", "merge task adapters (exact in delta-W space)"),
    "report": ("flylora.report.cli", "tables and plots from results JSON"),
    "bench": ("flylora.bench", "speed / memory benchmark against PEFT LoRA and the frozen base"),
}


def _available() -> dict[str, object]:
    mods = {}
    for name, (module, _) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:  # a room not built yet: hide its command
            if e.name and (e.name == module or module.startswith(e.name + ".")):
                continue
            raise
        if hasattr(mod, "add_arguments") and hasattr(mod, "run"):
            mods[name] = mod
    return mods


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flylora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    mods = _available()
    for name, mod in mods.items():
        p = sub.add_parser(name, help=COMMANDS[name][1], description=COMMANDS[name][1])
        mod.add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(mods[args.command].run(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:
        # user errors are one clear line, not a traceback
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"flylora {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
