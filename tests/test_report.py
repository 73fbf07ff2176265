"""`flylora report` and the experiment runner: table arithmetic on hand-made results, the CLI,
spec validation, and one tiny end-to-end experiment (train -> evaluate -> merge -> evaluate -> report)."""
from __future__ import annotations

import json

import pytest
import yaml

from pipeline_child import tiny_model_dir, tiny_recipe

PNG = b"\x89PNG\r\n\x1a\n"


def hand_results() -> dict:
    """2 methods × 2 tasks × 2 seeds, numbers chosen so means/stds are easy to check by hand."""
    return {
        "flylora_results_version": 1, "name": "hand", "model": "m", "tasks": ["a", "b"], "seeds": [0, 1],
        "methods": ["flylora", "lora_r8"], "merges": ["weight_average", "routed_union"],
        "eval": {"split": "carved-test", "limit": 10, "mode": "loglik"}, "metric": {"a": "accuracy", "b": "accuracy"},
        "base": {"a": 25.0, "b": 50.0},
        "params": {"flylora": {"activated_pct": 0.1372, "trainable_pct": 0.5484},
                   "lora_r8": {"activated_pct": 0.2612, "trainable_pct": 0.2612}},
        "single": {"flylora": {"a": {"0": 40.0, "1": 42.0}, "b": {"0": 60.0, "1": 60.0}},
                   "lora_r8": {"a": {"0": 38.0, "1": 40.0}, "b": {"0": 58.0, "1": 62.0}}},
        "merged": {"flylora": {"weight_average": {"a": {"0": 30.0, "1": 32.0}, "b": {"0": 55.0, "1": 59.0}},
                               "routed_union": {"a": {"0": 39.0, "1": 41.0}, "b": {"0": 60.0, "1": 62.0}}},
                   "lora_r8": {"weight_average": {"a": {"0": 20.0, "1": 20.0}, "b": {"0": 50.0, "1": 54.0}}}},
        "skipped": {"lora_r8": {"routed_union": "not selected (only:)"}},
    }


def test_tables_follow_the_paper_layout_with_hand_computed_cells():
    from flylora.pipeline.summaries import mean_std, merge_drops
    from flylora.report import table1, table2

    assert mean_std([40.0, 42.0]) == (41.0, pytest.approx(2 ** 0.5))  # sample std, n − 1
    assert mean_std([5.0]) == (5.0, None) and mean_std([]) == (None, None)
    t1 = table1(hand_results()).splitlines()
    assert t1[0] == "| Method | Trainable(%) | Param(%) | a | b |"
    assert t1[2] == "| base model (no adapter) | – | – | 25.00 | 50.00 |"
    assert t1[3] == "| flylora | 0.55 | 0.14 | 41.00 ± 1.41 | 60.00 ± 0.00 |"
    assert t1[4] == "| lora_r8 | 0.26 | 0.26 | 39.00 ± 1.41 | 60.00 ± 2.83 |"
    t2 = table2(hand_results())
    assert "| flylora | 31.00 ± 1.41 (-10.00) | 57.00 ± 2.83 (-3.00) |" in t2
    assert "| lora_r8 | 20.00 ± 0.00 (-19.00) | 52.00 ± 2.83 (-8.00) |" in t2
    assert "| flylora | 40.00 ± 1.41 (-1.00) | 61.00 ± 1.41 (+1.00) |" in t2
    assert t2.index("**weight_average**") < t2.index("**routed_union**")
    assert "lora_r8 | 40.00" not in t2.split("**routed_union**")[1]  # skipped: no row
    drops = merge_drops(hand_results())
    assert drops["weight_average"]["lora_r8"] == {"a": -19.0, "b": -8.0}
    assert drops["routed_union"] == {"flylora": {"a": -1.0, "b": 1.0}}


def test_report_cli_writes_markdown_and_plots(tmp_path, capsys):
    from flylora.cli import main

    (tmp_path / "results.json").write_text(json.dumps(hand_results()))
    assert main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "## Single task (Table 1 layout)" in md and "(-10.00)" in md
    assert "Not applicable: lora_r8 × routed_union: not selected (only:)" in md
    for png in ("merge_drops.png", "merge_drops_weight_average.png", "merge_drops_routed_union.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG
    assert "| flylora | 0.55 | 0.14 | 41.00 ± 1.41 |" in capsys.readouterr().out


def test_report_errors_are_one_line(tmp_path, capsys):
    from flylora.cli import main

    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"flylora report: error: {tmp_path}: no results.json (run an experiment first)"
    (tmp_path / "results.json").write_text("{}")
    assert main(["report", str(tmp_path / "results.json")]) == 2
    assert "not an experiment results.json" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, "unknown key spec.bogus (allowed:"),
    ({"eval": {"mode": "vibes"}}, "spec.eval.mode: 'vibes' is not allowed"),
    ({"merges": {"m": {"method": "average"}}}, "spec.merges.m.method: 'average' is not allowed"),
    ({"merges": {"m": {"method": "ties", "density": "high"}}}, "spec.merges.m.density: expected float, got 'high'"),
    ({"methods": {"x": {"train.lr": "fast"}}}, "spec.methods.x: recipe.train.lr: expected float, got 'fast'"),
    ({"tasks": ["no_such_task"]}, "unknown task 'no_such_task'"),
    ({"task_overrides": {"glue:rte": {}}}, "spec.task_overrides: ['glue:rte'] are not among spec.tasks"),
])
def test_bad_experiment_specs_fail_before_training(tmp_path, change, message):
    from flylora.pipeline.experiment import load_spec

    spec = {"name": "x", "recipe": {"data": {"split": "carved-train"}}, "methods": {"f": {}},
            "tasks": ["glue:sst2"], **change}
    with pytest.raises(ValueError) as e:
        load_spec(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_tiny_experiment_end_to_end_and_cached_rerun(tmp_path, capsys):
    """train 2 methods × 2 tasks -> evaluate each on its task -> weight average, TIES (full weights,
    deleted after evaluation) and routed union (FlyLoRA only) -> evaluate on both tasks -> report."""
    from flylora.cli import main

    model_dir = tiny_model_dir(tmp_path / "model")
    base = tiny_recipe(model_dir, "unused", train={"max_steps": 2})
    base.pop("name")
    spec = {"name": "tiny", "recipe": base, "tasks": ["glue:sst2", "commonsense:boolq"], "seeds": [0],
            "methods": {"flylora": {"method.name": "flylora", "method.config": {"r": 8, "k": 2, "lora_alpha": 16}},
                        "lora": {"method.name": "lora", "method.config": {"r": 4, "lora_alpha": 8}}},
            "eval": {"limit": 4, "mode": "loglik", "batch_size": 8, "bf16_autocast": False},
            "merges": {"weight_average": {"method": "weight_average"}, "ties": {"method": "ties", "density": 0.5},
                       "routed_union": {"method": "routed_union", "only": ["flylora"]}},
            "analysis": ["weight_average"], "analysis_prompts": 4, "output_dir": str(tmp_path / "exp")}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["report", "--experiment", str(path), "--no-progress"]) == 0
    out = tmp_path / "exp"
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"] == ["glue:sst2", "commonsense:boolq"] and res["methods"] == ["flylora", "lora"]
    for label in ("flylora", "lora"):
        for task in res["tasks"]:
            assert 0.0 <= res["single"][label][task]["0"] <= 100.0
            assert 0.0 <= res["merged"][label]["weight_average"][task]["0"] <= 100.0
    assert set(res["merged"]["flylora"]) == {"weight_average", "ties", "routed_union"}
    assert set(res["merged"]["lora"]) == {"weight_average", "ties"}
    assert res["skipped"] == {"lora": {"routed_union": "not selected (only:)"}}
    assert res["params"]["flylora"]["activated"] * 4 == res["params"]["flylora"]["trainable"]  # k/r = 2/8
    run = json.loads((out / "train" / "flylora" / "seed0" / "glue-sst2" / "run.json").read_text())
    assert run["data"]["split"] == "carved-train" and res["eval"]["split"] == "carved-test"
    ties_dir = out / "merge" / "flylora" / "seed0" / "ties"
    assert json.loads((ties_dir / "merge.json").read_text())["kind"] == "full"
    assert not list(ties_dir.glob("*.safetensors"))  # big full weights removed after evaluation
    assert (out / "merge" / "flylora" / "seed0" / "routed_union" / "routed_union.json").is_file()
    interference = json.loads((out / "merge" / "flylora" / "seed0" / "weight_average" / "analysis"
                               / "interference.json").read_text())
    assert set(interference["cka"]) == {"glue:sst2", "commonsense:boolq"}
    md = (out / "report.md").read_text()
    assert "| flylora |" in md and "**routed_union**" in md and "# Interference analysis" in (out / "interference.md").read_text()
    assert (out / "merge_drops.png").read_bytes()[:8] == PNG

    # every stage is cached: a rerun trains, merges and evaluates nothing and reports the same numbers
    capsys.readouterr()
    assert main(["report", "--experiment", str(path), "--no-progress"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["timing"]["train_s"] == again["timing"]["eval_s"] == again["timing"]["merge_s"] == 0.0
    assert again["single"] == res["single"] and again["merged"] == res["merged"]
