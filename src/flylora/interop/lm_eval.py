"""`flylora lm-eval ARGS...`: lm-evaluation-harness's own CLI, with the flylora methods registered.

lm-eval's HF model loads an adapter with `PeftModel.from_pretrained(model, peft)`, which only knows
FLYLORA, TOPLORA, ... after `import flylora`; plain `lm_eval --model hf --model_args
pretrained=…,peft=…` therefore fails with `KeyError: 'FLYLORA'`. This command imports flylora,
resolves `embedded:` model names inside `--model_args` (pretrained=, tokenizer=) to their local
folders, and hands every other argument unchanged to lm-eval's CLI (`lm_eval.__main__`):

    flylora lm-eval --model hf \\
        --model_args pretrained=embedded:smollm2-135m-instruct,peft=runs/arc/adapter \\
        --tasks arc_easy --limit 100 --device cpu --batch_size 8

lm-eval is the optional extra `flylora[lmeval]` (the Makefile installs it). lm-eval's own help:
`flylora lm-eval -- --help`.
"""
from __future__ import annotations

import argparse
import re
import sys

TAKES_REMAINDER = True  # cli.py passes the arguments we do not define on as args.remainder

_EMBEDDED_ARG = re.compile(r"(?<![\w.])((?:pretrained|tokenizer)=)(embedded:[\w.\-]+)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Run lm-evaluation-harness (lm_eval) with the flylora methods registered, so --model hf "
        "--model_args ...,peft=ADAPTER loads flylora adapters. Every argument is lm-eval's."
    )
    p.epilog = ("example: flylora lm-eval --model hf --model_args pretrained=embedded:smollm2-135m-instruct,"
                "peft=runs/x/adapter --tasks arc_easy --limit 50 --device cpu; lm-eval's options: "
                "flylora lm-eval -- --help")


def resolve_model_args(argv: list[str]) -> list[str]:
    """`pretrained=embedded:NAME` / `tokenizer=embedded:NAME` inside --model_args -> local folders."""
    from ..models import resolve_model_path

    def fix(value: str) -> str:
        return _EMBEDDED_ARG.sub(lambda m: m.group(1) + resolve_model_path(m.group(2)), value)

    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--model_args" and i + 1 < len(argv):
            out += [a, fix(argv[i + 1])]
            i += 2
            continue
        out.append(fix(a) if a.startswith("--model_args=") else a)
        i += 1
    return out


def run_lm_eval(argv: list[str]) -> int:
    """lm-eval's CLI on `argv` (without the program name) in this process; its exit status."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise ValueError("flylora lm-eval needs lm-evaluation-harness: pip install 'flylora[lmeval]' "
                         "(or lm-eval==0.4.13)") from None
    import flylora.tuners  # noqa: F401  (registers the methods with PEFT before lm-eval loads an adapter)

    old = sys.argv
    sys.argv = ["lm-eval", *resolve_model_args(list(argv))]
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse / lm-eval exit with a status; keep ours in step
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return 0


def run(args: argparse.Namespace) -> int:
    return run_lm_eval(getattr(args, "remainder", None) or ["--help"])
