"""lm-evaluation-harness with flylora adapters (issue 12): `flylora lm-eval ...` registers the
methods and hands its arguments to lm-eval's own CLI; and our log-likelihood `char`
normalisation is lm-eval's `acc_norm` (both divide by the option text's length, not counting the
" " that joins it to the prompt)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import flylora.tuners  # noqa: F401  (registers the methods)
from helpers import perturb

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "tasks"))
from tiny_lm import save_tiny_llama  # noqa: E402

pytest.importorskip("lm_eval")

ROWS = [  # canonical cloze rows (question, choices, answer), options of very different lengths
    {"question": "Which gas do plants absorb?", "choices": ["carbon dioxide", "oxygen", "helium", "neon"], "answer": 0},
    {"question": "What is frozen water called?", "choices": ["steam", "ice"], "answer": 1},
    {"question": "Which planet is closest to the sun?", "choices": ["Mercury", "Mars", "Jupiter"], "answer": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "ten", "four"], "answer": 1},
    {"question": "What do bees make?", "choices": ["a", "honey from the nectar of many flowers"], "answer": 1},
]

# the cloze prompt of flylora's cloze:* tasks (template `cloze`), as an lm-eval task
TASK_YAML = """task: flylora_tiny_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {rows}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def test_char_length_is_lm_evals_acc_norm_length():
    """lm-eval's acc_norm: argmax_i ll_i / len(choice_i); our continuation is " " + choice."""
    from flylora.tasks.scoring import char_length, choose_by_loglik

    assert char_length(" carbon dioxide") == len("carbon dioxide") and char_length("B") == 1
    lls, choices = [-4.0, -40.0], ["a", "honey from bees"]  # lm-eval: -4/1 < -40/15 -> option 1
    conts = [" " + c for c in choices]
    assert choose_by_loglik(lls, [char_length(c) for c in conts]) == 1
    assert choose_by_loglik(lls, [len(c) for c in conts]) == 0  # the old len(" " + choice): -4/2 > -40/16


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lm-eval")
    base = save_tiny_llama(root / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           flylora.tuners.FlyLoraConfig(r=8, k=2, projection_seed=3))
    perturb(model, std=0.5)
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(str(root / "adapter"))
    return root, base, root / "adapter"


def test_flylora_lm_eval_runs_lm_evals_cli_on_a_local_task(tiny_adapter, monkeypatch, capsys):
    """`flylora lm-eval --model hf --model_args pretrained=…,peft=<flylora adapter> --include_path …`
    runs lm-eval itself (plain `lm_eval` fails with KeyError: 'FLYLORA' without the registration).
    Its per-option log-likelihoods equal ours (flylora eval --mode loglik) and its acc / acc_norm
    picks equal our `none` / `char` picks on every row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flylora.cli import main as cli_main
    from flylora.evaluation.evaluate import evaluate_task
    from flylora.loading import load_adapter
    from flylora.tasks import get_task

    from lm_eval.tasks import TaskManager

    root, base, adapter = tiny_adapter
    init = TaskManager.__init__
    # test speed only: index just --include_path, not lm-eval's thousands of built-in task YAMLs
    # (~30 s on a loaded 2-core machine); the CLI, model loading and scoring are untouched
    monkeypatch.setattr(TaskManager, "__init__",
                        lambda self, *a, **kw: init(self, *a, **{**kw, "include_defaults": False}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # lm-eval asks the hub for model SHAs; keep it local
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "tasks").mkdir(exist_ok=True)
    (root / "tasks" / "tiny.yaml").write_text(TASK_YAML.format(rows=rows))
    out = root / "out"
    rc = cli_main(["lm-eval", "--model", "hf", "--model_args", f"pretrained={base},peft={adapter},dtype=float32",
                   "--tasks", "flylora_tiny_cloze", "--include_path", str(root / "tasks"), "--device", "cpu",
                   "--batch_size", "4", "--output_path", str(out), "--log_samples"])
    assert rc == 0
    assert "flylora_tiny_cloze" in capsys.readouterr().out  # lm-eval's own results table
    (results,) = out.glob("*/results_*.json")
    (samples,) = out.glob("*/samples_flylora_tiny_cloze_*.jsonl")
    theirs = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(theirs) == len(ROWS)
    metrics = json.loads(results.read_text())["results"]["flylora_tiny_cloze"]

    model = load_adapter(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).eval()
    tok = AutoTokenizer.from_pretrained(str(base))
    summary, records = evaluate_task(get_task("cloze:arc_e"), model, tok, data_path=str(rows), mode="loglik",
                                     loglik_norm="char", progress=False, batch_size=4)
    theirs.sort(key=lambda s: s["doc_id"])
    diff = max(abs(float(resp[0][0]) - lp) for s, rec in zip(theirs, records)
               for resp, lp in zip(s["resps"], rec["logprobs"]))
    assert diff < 1e-4, f"lm-eval vs flylora log-likelihoods differ by {diff}"
    for s, rec, ex in zip(theirs, records, ROWS):
        lls = rec["logprobs"]
        ours_char = max(range(len(lls)), key=lambda i: lls[i] / len(ex["choices"][i]))
        ours_none = max(range(len(lls)), key=lambda i: lls[i])
        assert s["acc_norm"] == float(ours_char == ex["answer"]) and s["acc"] == float(ours_none == ex["answer"])
    assert metrics["acc,none"] == pytest.approx(summary["metrics"]["accuracy_norm_none"])
    assert metrics["acc_norm,none"] == pytest.approx(summary["metrics"]["accuracy_norm_char"])


def test_embedded_names_in_model_args_resolve(monkeypatch):
    from flylora.interop import lm_eval as entry

    monkeypatch.setattr("flylora.models.resolve_model_path", lambda name: f"/cache/{name.split(':')[1]}")
    argv = ["--model", "hf", "--model_args", "pretrained=embedded:smollm2-135m-instruct,peft=a/b",
            "--model_args=tokenizer=embedded:smollm2-135m-instruct", "--tasks", "x"]
    assert entry.resolve_model_args(argv) == [
        "--model", "hf", "--model_args", "pretrained=/cache/smollm2-135m-instruct,peft=a/b",
        "--model_args=tokenizer=/cache/smollm2-135m-instruct", "--tasks", "x"]


def test_lm_eval_help_is_lm_evals(capsys):
    from flylora.cli import main as cli_main

    assert cli_main(["lm-eval", "--", "--help"]) == 0
    assert "Language Model Evaluation Harness" in capsys.readouterr().out
