"""Markdown report of an lr sweep (flylora.pipeline.sweep results.json): the validation grid,
then the test-carve scores at each method's own best lr, single-task and merged, beside an
optional earlier run at one shared lr. Scores are points (100 × accuracy); "mean ± std" over seeds
(sample std, n − 1); the `mean` column averages the per-task means."""
from __future__ import annotations

from .summaries import mean_std


def _cell(values: list) -> str:
    m, s = mean_std(values)
    if m is None:
        return "–"
    return f"{m:.2f}" if s is None else f"{m:.2f} ± {s:.2f}"


def _task_means(by_task: dict, tasks: list[str]) -> float | None:
    means = [mean_std(list(by_task.get(t, {}).values()))[0] for t in tasks]
    return None if any(m is None for m in means) else sum(means) / len(means)


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def validation_table(res: dict) -> str:
    tasks, sel = res["tasks"], res["select"]
    lines = ["| Method | lr | " + " | ".join(tasks) + " | mean |", "|" + "---|" * (len(tasks) + 3)]
    for m in res["methods"]:
        for lr in res["lrs"]:
            row = sel["scores"][m][f"{lr:g}"]
            cells = [_fmt(row["tasks"].get(t)) for t in tasks] + [_fmt(row["mean"])]
            if lr == res["best_lr"][m]:
                cells = [f"**{c}**" for c in cells]
            lines.append(f"| {m} | {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def scores_table(res: dict, kind: str, merge: str | None = None) -> str:
    """kind 'single' or 'merged' (then `merge` names the merge); the earlier run's rows follow."""
    tasks, fin, cmp = res["tasks"], res["final"], res.get("compare")
    extra = " mean Δ (merged − single) |" if kind == "merged" else ""
    lines = ["| Method | lr | seeds | " + " | ".join(tasks) + " | mean |" + extra,
             "|" + "---|" * (len(tasks) + 4 + bool(extra))]
    if kind == "single" and fin.get("base"):
        lines.append("| base model (no adapter) | – | – | " + " | ".join(_fmt(fin["base"].get(t)) for t in tasks)
                     + f" | {_fmt(sum(fin['base'][t] for t in tasks) / len(tasks))} |")

    def rows(src: dict, lr_of, seeds, tag: str) -> None:
        for m in res["methods"]:
            data = src["single"].get(m) if kind == "single" else src["merged"].get(m, {}).get(merge)
            if not data:
                continue
            cells = [_cell(list(data.get(t, {}).values())) for t in tasks]
            mean = _task_means(data, tasks)
            row = f"| {m}{tag} | {lr_of(m):g} | {len(seeds)} | " + " | ".join(cells) + f" | {_fmt(mean)} |"
            if kind == "merged":
                single = _task_means(src["single"].get(m) or {}, tasks)
                row += f" {_fmt(None if mean is None or single is None else mean - single)} |"
            lines.append(row)

    rows(fin, lambda m: res["best_lr"][m], fin["seeds"], " (own best lr)")
    if res.get("reference"):
        rows(res["reference"], lambda m: res["reference"]["lr"], fin["seeds"], " (shared lr)")
    if cmp:
        rows(cmp, lambda m: cmp["lr"].get(m) or float("nan"), cmp["seeds"] or [], f" ({cmp['name']})")
    return "\n".join(lines) + "\n"


def markdown(res: dict) -> str:
    fin, sel, cmp, tm = res["final"], res["select"], res.get("compare"), res["timing"]
    merges = sorted({k for m in res["methods"] for k in fin["merged"].get(m, {})})
    out = [f"# lr sweep: {res['name']} ({res['model']})", "", res.get("description") or "", "",
           f"Learning rates {', '.join(f'{lr:g}' for lr in res['lrs'])} for each method. Training on carved-fit "
           f"(carved-train minus carved-val). Selection: {sel['criterion']} on carved-val "
           f"({sel['limit']} questions per task, seeds {sel['seeds']}); the test carve is not looked at. "
           f"Test: carved-test ({fin['limit']} questions per task), seeds {fin['seeds']}, mean ± std.", "",
           "## Validation (selects the lr; best in bold)", "", validation_table(res),
           "## Test carve, single task, each method at its own best lr", "", scores_table(res, "single")]
    for mg in merges:
        out += [f"## Test carve, merged ({mg}), each method at its own best lr", "", scores_table(res, "merged", mg)]
    if res.get("reference"):
        out += [f"Rows marked (shared lr): every method at lr {res['reference']['lr']:g}, the same carved-fit data, "
                "seeds and test questions (the untuned yardstick).", ""]
    if cmp:
        out += [f"Rows marked ({cmp['name']}) come from {cmp['path']}: one lr for every method, trained on "
                f"{cmp['train_split']} (carved-fit plus carved-val), same carved-test questions.", ""]
    inv = tm["invocations"]
    out += [f"Wall time: {tm['wall_s_all_invocations']:.1f} s over {len(inv)} invocation(s) "
            f"(last: selection {inv[-1]['select_s']:.1f} s, final {inv[-1]['final_s']:.1f} s; cached stages count 0).",
            ""]
    return "\n".join(out)
