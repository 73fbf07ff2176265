"""flylora.pipeline.sweep (a learning rate per method): the validation carve is disjoint from the
test carve, the lr is the argmax of validation scores only, and a tiny sweep end to end (select
on carved-val, final runs on carved-test at the chosen lr only, seed-0 runs reused)."""
from __future__ import annotations

import json

import pytest
import yaml

from pipeline_child import tiny_model_dir, tiny_recipe


def _ids(rows: list[dict]) -> set[str]:
    return {json.dumps(r, sort_keys=True) for r in rows}


@pytest.mark.parametrize("task", ["cloze:sst2", "cloze:csqa"])
def test_val_carve_partitions_carved_train_and_never_touches_carved_test(task):
    """carved-fit ⊔ carved-val = carved-train (disjoint), |val| = round(0.2 · |stratum|) per label,
    and carved-val ∩ carved-test = ∅."""
    from flylora.tasks import get_task
    from flylora.tasks.base import VAL_FRACTION

    t = get_task(task)
    train, test = (_ids(t.load(s).rows) for s in ("carved-train", "carved-test"))
    fit_rows, val_rows = t.load("carved-fit").rows, t.load("carved-val").rows
    fit, val = _ids(fit_rows), _ids(val_rows)
    assert fit | val == train and not fit & val and not val & test and not fit & test
    assert len(val_rows) == len(val) and abs(len(val) - VAL_FRACTION * len(train)) <= 3  # one rounding per label
    labels = {r["answer"] for r in val_rows}
    assert len(labels) > 1  # stratified: every label is represented
    assert t.load("carved-val", seed=1).rows != val_rows  # the carve seed moves it


def test_select_lr_is_the_validation_argmax_with_ties_to_the_first():
    from flylora.pipeline.sweep import select_lr

    assert select_lr({1e-3: 50.0, 3e-3: 60.0, 3e-4: 40.0}, [3e-4, 1e-3, 3e-3]) == 3e-3
    assert select_lr({1e-3: 50.0, 3e-3: 50.0, 3e-4: None}, [3e-4, 1e-3, 3e-3]) == 1e-3
    with pytest.raises(ValueError, match="no validation score"):
        select_lr({1e-3: None}, [1e-3])


def test_bad_sweep_specs_are_one_line_errors(tmp_path):
    from flylora.pipeline.sweep import load_sweep

    exp = {"recipe": {"data": {"split": "train"}}, "methods": {}, "tasks": []}
    with pytest.raises(ValueError, match=r"sweep.lrs: needs at least 2"):
        load_sweep({"experiment": exp, "lrs": [1e-3]})
    with pytest.raises(ValueError, match=r"data.split: 'train' is not allowed"):
        load_sweep({"experiment": exp, "lrs": [1e-3, 1e-2]})
    with pytest.raises(ValueError, match=r"unknown key sweep.bogus"):
        load_sweep({"experiment": exp, "lrs": [1e-3, 1e-2], "bogus": 1})
    ok = {"recipe": {"data": {"split": "carved-train"}}, "tasks": ["a", "b"], "merges": {"wa": {}}}
    _, got, _ = load_sweep({"experiment": ok, "lrs": [1e-3, 1e-2], "overrides": {"tasks": ["a"]}})
    assert got["tasks"] == ["a"] and ok["tasks"] == ["a", "b"]  # applied to a copy
    with pytest.raises(ValueError, match=r"sweep.overrides: override recipe.data.split.x"):
        load_sweep({"experiment": ok, "lrs": [1e-3, 1e-2], "overrides": {"recipe.data.split.x": 1}})
    with pytest.raises(ValueError, match=r"sweep.final.merges: \['ties'\] are not among"):
        load_sweep({"experiment": ok, "lrs": [1e-3, 1e-2], "final": {"merges": ["ties"]}})
    bad_only = dict(ok, methods={"fly": {}}, merges={"ru": {"method": "routed_union", "only": ["flyy"]}})
    with pytest.raises(ValueError, match=r"sweep.experiment.merges.ru.only: unknown method labels \['flyy'\]"):
        load_sweep({"experiment": bad_only, "lrs": [1e-3, 1e-2]})  # before any training, not after selection
    with pytest.raises(FileNotFoundError, match=r"sweep.compare"):
        load_sweep({"experiment": ok, "lrs": [1e-3, 1e-2], "compare": str(tmp_path / "none.json")})


def test_tiny_sweep_selects_on_validation_only(tmp_path, monkeypatch):
    """2 methods × 2 lrs on seed 0 (carved-val) -> each method at its best lr on seeds 0, 1
    (carved-test, single + weight average). Every evaluation call is recorded: carved-test is only
    ever scored for the chosen lr, so it cannot have entered the choice."""
    import flylora.pipeline.experiment as experiment
    from flylora.pipeline.sweep import lr_label, run_sweep

    calls: list[tuple[str, str | None]] = []
    real = experiment._evaluate

    def spy(tasks, model_name, out_dir, kwargs, **kw):
        calls.append((kwargs["split"], (kw.get("adapter") or (None, None))[0], kwargs["limit"]))
        return real(tasks, model_name, out_dir, kwargs, **kw)

    monkeypatch.setattr(experiment, "_evaluate", spy)
    model_dir = tiny_model_dir(tmp_path / "model")
    base = tiny_recipe(model_dir, "unused", train={"max_steps": 2})
    base.pop("name")
    exp = {"recipe": base, "tasks": ["glue:sst2"], "seeds": [0],
           "methods": {"fly": {"method.name": "flylora", "method.config": {"r": 8, "k": 2, "lora_alpha": 16}},
                       "lora": {"method.name": "lora", "method.config": {"r": 4, "lora_alpha": 8}}},
           "eval": {"limit": 4, "mode": "loglik", "batch_size": 8, "bf16_autocast": False},
           "merges": {"weight_average": {"method": "weight_average"},
                      "routed_union": {"method": "routed_union", "only": ["fly"]}}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    sweep = {"name": "tiny", "experiment": "exp.yaml", "lrs": [1e-3, 5e-2], "select": {"seeds": [0], "limit": 3},
             "final": {"seeds": [0, 1], "limit": 4, "reference_lr": 1e-3}, "output_dir": str(tmp_path / "sweep")}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    res = run_sweep(tmp_path / "sweep.yaml", progress=False)

    out = tmp_path / "sweep"
    sel = json.loads((out / "select" / "results.json").read_text())
    assert sel["eval"]["split"] == "carved-val" and sel["eval"]["limit"] == 3
    for m in ("fly", "lora"):
        scores = {lr: sel["single"][lr_label(m, lr)]["glue:sst2"]["0"] for lr in (1e-3, 5e-2)}
        best = max(scores, key=lambda lr: (scores[lr], -[1e-3, 5e-2].index(lr)))
        assert res["best_lr"][m] == best
        assert res["select"]["scores"][m][f"{best:g}"]["mean"] == scores[best]
    chosen = {lr_label(m, res["best_lr"][m]) for m in ("fly", "lora")}
    scored = chosen | {lr_label(m, 1e-3) for m in ("fly", "lora")}  # + the reference lr
    val_calls = {a for s, a, _ in calls if s == "carved-val"}
    test_calls = {a for s, a, _ in calls if s == "carved-test"}
    assert val_calls == {lr_label(m, lr) for m in ("fly", "lora") for lr in (1e-3, 5e-2)}
    assert test_calls == scored | {None, "merged"}  # base model, the merges
    assert {lim for s, _, lim in calls if s == "carved-val"} == {3}
    assert {s for s, _, _ in calls} == {"carved-val", "carved-test"}
    # all runs train on carved-fit in the shared folder; the final stage reuses the seed-0 runs
    runs = sorted((out / "train").glob("*/seed*/*/run.json"))
    assert len(runs) == 4 + len(scored)  # 2 methods × 2 lrs (seed 0) + seed 1 of each scored label
    assert {json.loads(p.read_text())["data"]["split"] for p in runs} == {"carved-fit"}
    fin = json.loads((out / "final" / "results.json").read_text())
    assert fin["timing"]["train_s"] > 0 and set(fin["seeds"]) == {0, 1}
    for m in ("fly", "lora"):
        assert set(res["final"]["single"][m]["glue:sst2"]) == {"0", "1"}
        assert set(res["final"]["merged"][m]["weight_average"]["glue:sst2"]) == {"0", "1"}
        assert set(res["reference"]["single"][m]["glue:sst2"]) == {"0", "1"}
    # `only: [fly]` follows the method to its lr labels: the routed union ran for FlyLoRA alone
    assert set(res["final"]["merged"]["fly"]["routed_union"]["glue:sst2"]) == {"0", "1"}
    assert "routed_union" not in res["final"]["merged"]["lora"]
    md = (out / "report.md").read_text()
    assert "## Validation" in md and "(own best lr)" in md and "(shared lr)" in md and "merged (weight_average)" in md
    assert "mean Δ (merged − single)" in md
    # the merged row's last cell is its mean minus the single-task mean (one task: seed means)
    merged_rows = md.split("merged (weight_average)")[1]
    row = next(line for line in merged_rows.splitlines() if line.startswith("| fly (own best lr)"))
    def seed_mean(d):
        return sum(d.values()) / len(d)
    want = seed_mean(res["final"]["merged"]["fly"]["weight_average"]["glue:sst2"]) - seed_mean(
        res["final"]["single"]["fly"]["glue:sst2"])
    assert row.rstrip(" |").split("|")[-1].strip() == f"{want:.2f}"
    assert (out / "lr_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flylora_sweep_command_gives_one_line_for_a_missing_spec(tmp_path, capsys):
    from flylora import cli

    assert cli.main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flylora sweep: error:") and "missing.yaml" in err[0]
