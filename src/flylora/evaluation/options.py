"""`flylora eval` options: silently ignored ones are errors, and the split defaults to what the
adapters were trained for (carved-test for carved-train adapters, with their carve). The choices of
--split and --loglik-norm are here too, so that `flylora eval --help` imports nothing heavy."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

EVAL_SPLITS = ("test", "carved-test", "carved-val")  # carved-val: selection only (tasks/base.py)
LOGLIK_NORMS = ("none", "char", "token")


def check_ignored(task, *, mode: str, scoring_mode: str | None, max_new_tokens: int | None = None,
                  limit: int | None = None, limit_seed: int | None = None, batch_size: int = 8,
                  num_samples: int = 1, temperature: float = 0.0, top_p: float = 1.0, **_) -> None:
    """Options that would be silently ignored (or silently replaced by a default) are errors."""
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens} (leave it unset for the task's default)")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit} (leave it unset for all rows)")
    if limit_seed is not None and limit is None:
        raise ValueError("limit_seed only picks which rows a limit keeps; give a limit too")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mode == "loglik":
        for key, value, default in (("max_new_tokens", max_new_tokens, None), ("temperature", temperature, 0.0),
                                    ("top_p", top_p, 1.0), ("num_samples", num_samples, 1),
                                    ("scoring_mode", scoring_mode, None)):
            if value != default:
                raise ValueError(f"{key}={value!r} is not used in mode 'loglik' (it scores choices, "
                                 "nothing is generated)")
    elif num_samples != 1 and not getattr(task, "multi_sample", False):
        raise ValueError(f"num_samples={num_samples} applies to sampled code tasks (humaneval) only, "
                         f"not to {task.name!r}")


def training_splits(adapters: list[str]) -> dict[str, dict]:
    """{adapter spec: its training data settings} from the run.json (or merge.json) beside it."""
    out = {}
    for spec in adapters:
        path = Path(spec.partition("=")[2] or spec)
        for run_json in (path / "run.json", path.parent / "run.json"):
            if run_json.is_file():
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    info = json.loads(run_json.read_text())
                    data = info.get("recipe", {}).get("data", {})
                    out[spec] = {"split": info["data"]["split"], "carve_seed": data.get("carve_seed", 0),
                                 "carve_fraction": data.get("carve_fraction", 0.5)}
                break
        else:
            merge_json = path / "merge.json"
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                splits = {i.get("train_split") for i in json.loads(merge_json.read_text())["inputs"]}
                if len(splits) == 1 and None not in splits:
                    out[spec] = {"split": splits.pop()}
    return out


def default_split(args: argparse.Namespace) -> None:
    """--split / --carve-seed / --carve-fraction defaults from the adapters' training data:
    adapters trained on carved-train (or carved-fit) are evaluated on carved-test with the same
    carve, never silently on `test`, which contains their training rows."""
    info = training_splits(args.adapter)
    carved = {k: v for k, v in info.items() if v["split"] in ("carved-train", "carved-fit")}
    if args.split is None:
        if carved and len(carved) != len(args.adapter):
            raise ValueError(f"adapters {sorted(carved)} were trained on carved-train and the others were not; "
                             "pass --split test or --split carved-test")
        args.split = "carved-test" if carved else "test"
        if carved:
            print(f"note: the adapters were trained on {next(iter(carved.values()))['split']}: evaluating on "
                  "carved-test (pass --split test to override)", file=sys.stderr)
    elif carved and args.split == "test":
        print("warning: the adapters were trained on carved-train, whose rows are part of the test split; "
              "--split carved-test evaluates on held-out rows", file=sys.stderr)
    for key, default in (("carve_seed", 0), ("carve_fraction", 0.5)):
        if getattr(args, key) is None:
            values = {v[key] for v in carved.values() if key in v}
            if len(values) > 1:
                raise ValueError(f"the adapters were carved with different {key}s {sorted(values)}; "
                                 f"pass --{key.replace('_', '-')}")
            setattr(args, key, values.pop() if values else default)
