"""`flylora demo --quick` end to end on the embedded SmolLM2, then every number of its report
recomputed from the saved adapters by a second, independent path:

- single-task scores: one plain forward of prompt + choice per choice (no batching, no KV-cache
  sharing, no evaluate()), argmax of Σ log p(choice tokens);
- weight-average merges (paper Eq. 12): W0 + (1/T) Σ_i s_i B_i A_i written into the base weights
  by hand (not flylora.merge), then scored the same way;
- theory checks: cos(vec ΔW_i, vec ΔW_j) from dense ΔW's, and ‖A_iA_jᵀ‖_F / (p/(r√n)).
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from flylora.cli import main as cli_main

pytestmark = pytest.mark.xdist_group("demo")  # one module-scoped run, one worker


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli_main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "demo.json").read_text())


def _base():
    from flylora.models import load_model, resolve_model_path

    return load_model(resolve_model_path("embedded:smollm2-135m-instruct")).eval()


def _tokenizer():
    from flylora.models import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path("embedded:smollm2-135m-instruct"))


@torch.no_grad()
def direct_scores(model, tok, task_name: str, limit: int) -> tuple[float, int]:
    """(100 × accuracy, near ties) with one unbatched fp32 forward per (question, choice)."""
    from flylora.evaluation.evaluate import load_eval_data
    from flylora.tasks import get_task

    task = get_task(task_name)
    rows = load_eval_data(task, split="carved-test", limit=limit).rows
    correct, ties = 0, 0
    for ex in rows:
        prompt = task.build_prompt(ex)
        conts, gold = task.loglik_choices(ex)
        n_ctx = len(tok(prompt)["input_ids"])
        scores = []
        for cont in conts:
            ids = tok(prompt + cont)["input_ids"]
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            scores.append(sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids))))
        best = sorted(scores, reverse=True)
        ties += best[0] - best[1] < 1e-3
        correct += max(range(len(scores)), key=scores.__getitem__) == gold
    return 100.0 * correct / len(rows), ties


def _deltas(peft_model, name: str) -> dict[str, torch.Tensor]:
    """{module: s·B·A} read straight off the adapter tensors (routing ignored: Eq. 12's ΔW)."""
    out = {}
    for mod_name, m in peft_model.named_modules():
        if hasattr(m, "flylora_B") and name in m.flylora_B:
            out[mod_name] = m.scaling[name] * m.flylora_B[name].detach().double() @ m.flylora_A[name].double()
        elif hasattr(m, "lora_B") and name in m.lora_B:
            out[mod_name] = m.scaling[name] * m.lora_B[name].weight.detach().double() @ m.lora_A[name].weight.double()
    return out


def _load(results, label, seed=0):
    from peft import PeftModel

    runs = results["runs"][label][str(seed)]
    model = None
    for i, task in enumerate(results["train_tasks"]):
        path = f"{runs[task]}/adapter"
        model = PeftModel.from_pretrained(_base(), path, adapter_name=task) if i == 0 else model
        if i:
            model.load_adapter(path, adapter_name=task)
    return model.eval()


def _table_cells(md: str, row_label: str) -> list[str]:
    for line in md.splitlines():
        if line.startswith(f"| {row_label} |"):
            return [c.strip() for c in line.strip("|").split("|")][1:]
    raise AssertionError(f"no row {row_label!r} in the report")


def test_quick_demo_writes_its_report(demo):
    out, data = demo
    for name in ("report.md", "merge_drops.png", "routing_load.png", "demo.json", "results.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = data["results"]
    assert results["methods"] == ["flylora_r32_k8", "lora_r8", "lora_r32"]
    assert set(results["merged"]["flylora_r32_k8"]) == {"weight_average", "routed_union"}
    assert set(results["merged"]["lora_r8"]) == {"weight_average"}
    md = (out / "report.md").read_text()
    for heading in ("Single task (Table 1 layout)", "After merging (Table 2 layout", "Theory checks",
                    "What this run shows, and what it does not", "Wall time and machine"):
        assert heading in md
    assert data["wall_s"] > 0 and data["estimate_s"]["total_s"] > 0
    from flylora.pipeline.demo import demo_spec, estimate_seconds  # a rerun would reuse every stage

    assert estimate_seconds(demo_spec(quick=True, out=str(out)))["total_s"] == 0
    # activated share: FlyLoRA r32 k8 activates k/r of its B; LoRA r8 is the same size on these shapes
    p = results["params"]
    assert p["flylora_r32_k8"]["activated"] * 4 == p["flylora_r32_k8"]["trainable"]


def test_single_task_scores_recomputed_from_the_saved_adapters(demo):
    out, data = demo
    results = data["results"]
    tok, limit = _tokenizer(), results["eval"]["limit"]
    md = (out / "report.md").read_text()
    table1 = md.split("## Single task")[1].split("## After merging")[0]
    for label in results["methods"]:
        model = _load(results, label)
        cells = _table_cells(table1, label)
        for col, task in enumerate(results["tasks"]):
            model.set_adapter(task)
            score, ties = direct_scores(model, tok, task, limit)
            reported = results["single"][label][task]["0"]
            assert abs(score - reported) <= 100.0 * ties / limit, (label, task, score, reported)
            assert cells[col + 2] == f"{reported:.2f}"


def test_weight_average_merge_recomputed_by_hand(demo):
    out, data = demo
    results = data["results"]
    tok, limit, tasks = _tokenizer(), results["eval"]["limit"], results["tasks"]
    md = (out / "report.md").read_text()
    block = md.split("**weight_average**")[1].split("**")[0]
    for label in results["methods"]:
        peft_model = _load(results, label)
        deltas = [_deltas(peft_model, t) for t in results["train_tasks"]]
        merged = _base()
        weights = dict(merged.named_modules())
        with torch.no_grad():
            for mod_name in deltas[0]:
                target = weights[mod_name.replace("base_model.model.", "", 1).removesuffix(".base_layer")]
                avg = sum(d[mod_name] for d in deltas) / len(deltas)  # Eq. 12: (1/T) Σ s_i B_i A_i
                target.weight += avg.to(target.weight.dtype)
        cells = _table_cells(block, label)
        for col, task in enumerate(tasks):
            score, ties = direct_scores(merged, tok, task, limit)
            reported = results["merged"][label]["weight_average"][task]["0"]
            assert abs(score - reported) <= 100.0 * ties / limit, (label, task, score, reported)
            delta = reported - results["single"][label][task]["0"]
            assert cells[col] == f"{reported:.2f} ({delta:+.2f})"


def test_theory_checks_recomputed_from_dense_deltas(demo):
    _, data = demo
    results, theory = data["results"], data["theory"]["methods"]
    for label in results["methods"]:
        peft_model = _load(results, label)
        deltas = [_deltas(peft_model, t) for t in results["train_tasks"]]
        cos = [torch.nn.functional.cosine_similarity(deltas[i][k].flatten(), deltas[j][k].flatten(), dim=0)
               for k in deltas[0] for i in range(len(deltas)) for j in range(len(deltas)) if i != j]
        assert theory[label]["mean_offdiag_cos"] == pytest.approx(float(torch.stack(cos).mean()), abs=1e-6)
    # FlyLoRA's independent sparse A's: ‖A_iA_jᵀ‖_F against Theorem 3.4's p/(r√n)
    fly = _load(results, "flylora_r32_k8")
    t0, t1 = results["train_tasks"][:2]
    ratios = []
    for m in fly.modules():
        if hasattr(m, "flylora_A") and t0 in m.flylora_A:
            A0, A1 = m.flylora_A[t0].double(), m.flylora_A[t1].double()
            r, n = A0.shape
            p = float((A0 != 0).sum(1).double().mean())
            ratios.append(float(torch.linalg.matrix_norm(A0 @ A1.T)) / (p / (r * n ** 0.5)))
            assert not torch.equal(A0, A1)  # every task has its own A
    assert theory["flylora_r32_k8"]["cross_projection_ratio"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-4)
    assert 0.8 < theory["flylora_r32_k8"]["jl"]["mean"] < 1.25


def test_demo_spec_options_and_errors(capsys):
    from flylora.pipeline.demo import demo_spec

    spec = demo_spec(seeds=3, steps=7, limit=11, model="some/model")
    assert spec["seeds"] == [0, 1, 2] and spec["recipe"]["train"]["max_steps"] == 7
    assert spec["eval"]["limit"] == 11 and spec["recipe"]["model"]["name_or_path"] == "some/model"
    with pytest.raises(ValueError, match="--seeds must be >= 1, got 0"):
        demo_spec(seeds=0)
    assert cli_main(["demo", "--print-spec"]) == 0
    assert re.search(r"^name: demo$", capsys.readouterr().out, re.M)


def test_the_cpu_experiment_recipe_is_the_demo():
    from pathlib import Path

    from flylora.pipeline.demo import demo_spec
    from flylora.pipeline.recipe import read_yaml

    spec = read_yaml(Path(__file__).parent.parent / "recipes" / "cpu" / "experiment_smollm2.yaml")
    demo = demo_spec()
    for key in ("name", "output_dir", "description"):
        spec.pop(key), demo.pop(key)
    assert spec == demo
