"""How long `flylora --help` takes (issue 14: target < 1.5 s), measured, not asserted.

    python -m flylora.bench.startup            # also part of `flylora bench` (key "cli_startup")

Each repetition is a fresh process (interpreter start included), as a user types it: the console
script next to this interpreter when installed, else `python -m flylora`. Reported: median, min
and max wall seconds of `--help`, and of `train --help` (which imports the command's module).
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 1.5


def _command() -> list[str]:
    script = Path(sys.executable).with_name("flylora")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("flylora")
    return [found] if found else [sys.executable, "-m", "flylora"]


def _time(argv: list[str], reps: int) -> dict:
    walls = []
    for _ in range(reps):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        walls.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-500:]}")
    return {"median_s": round(statistics.median(walls), 3), "min_s": round(min(walls), 3),
            "max_s": round(max(walls), 3), "reps": reps}


def cli_startup(reps: int = 5, train_help: bool = True) -> dict:
    """{"help": {...}, "train_help": {...} or None, "command": [...], "target_s": 1.5, "meets_target": bool}."""
    cmd = _command()
    result = {"command": cmd, "help": _time([*cmd, "--help"], reps),
              "train_help": _time([*cmd, "train", "--help"], max(2, reps // 2)) if train_help else None,
              "target_s": TARGET_S}
    result["meets_target"] = result["help"]["median_s"] < TARGET_S
    return result


def format_line(r: dict) -> str:
    h, t = r["help"], r["train_help"]
    return (f"`flylora --help`: median {h['median_s']:.2f} s (min {h['min_s']:.2f}, max {h['max_s']:.2f}, "
            f"{h['reps']} runs; target < {r['target_s']} s: {'met' if r['meets_target'] else 'NOT met'})"
            + (f"; `flylora train --help`: median {t['median_s']:.2f} s" if t else ""))


if __name__ == "__main__":
    print(format_line(cli_startup(int(sys.argv[1]) if len(sys.argv) > 1 else 5)))
