"""Scoring rules on hand-written cases, including the tricky ones."""
from __future__ import annotations

import math
from itertools import combinations

import pytest

from flylora.tasks import get_task
from flylora.tasks import scoring as S

MMLU_LABELS = ["0", "1", "2", "3"]
LETTERS = {"A": 0, "B": 1, "C": 2, "D": 3}


@pytest.mark.parametrize("response, expected", [
    ("2", 2), ("2.", 2), ("\n1\n\n### Explanation: 3 is wrong", 1), ("Answer: 2", 2),
    ("Answer Index: 3", 3), ("The answer is (B)", 1), ("(B) Paris", 1), ("B) Paris", 1),
    ("B. Paris", 1), ("**C**", 2), ("The correct answer is C.", 2),
    ("I think the answer is 1, not 3", 1), ("Option 2 is wrong; the answer is 3", 3),
    ("The correct option is C", 2), ("Answer: option B", 1),
    # not answers
    ("3 options: 0, 1, 2", None), ("A cat is an animal", None), ("answer is 23", None), ("", None),
    ("The answer is 8.", None),
])
def test_mmlu_strict_first_answer(response, expected):
    assert S.extract_choice(response, MMLU_LABELS, LETTERS) == expected


def test_choice_text_match_and_earliest_evidence():
    texts = ["London", "Paris", "Rome", "Oslo"]
    assert S.extract_choice("Paris.", MMLU_LABELS, LETTERS, texts) == 1
    assert S.extract_choice("paris", MMLU_LABELS, LETTERS, texts) == 1
    assert S.extract_choice("Paris is lovely", MMLU_LABELS, LETTERS, texts) is None
    # a leading answer beats a later marker
    assert S.extract_choice("2\nThe answer is 0", MMLU_LABELS, LETTERS) == 2
    # a bare label that is also an option's text is read as the label
    assert S.extract_choice("\n1\n", MMLU_LABELS, LETTERS, ["1", "3", "5", "7"]) == 1


def test_mmlu_legacy_any_digit_is_lenient():
    assert all(S.legacy_any_digit_correct("3 options: 0, 1, 2", g) for g in range(4))
    assert not S.legacy_any_digit_correct("Answer: 2", 1)
    mmlu = get_task("mmlu")
    ex = {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 0, "subject": ""}
    strict = mmlu.score([ex], ["3 options: 0, 1, 2"])
    legacy = mmlu.score([ex], ["3 options: 0, 1, 2"], "legacy_any_digit")
    assert strict.metrics["accuracy"] == 0.0 and legacy.metrics["accuracy"] == 1.0
    assert legacy.metrics["scoring"] == "legacy_any_digit"


@pytest.mark.parametrize("text, expected", [
    ("$1,234.50", 1234.5), ("#### $1,234.50 total", 1234.5), ("The answer is 18.", 18.0),
    ("so 5-3=2 apples", 2.0), ("It is -7 degrees", -7.0), ("#### 72\n#### 5", 72.0),
    ("1,234,567.8 apples", 1234567.8), ("He had 1, 2, 3 and then 4", 4.0),
    ("18 dollars", 18.0), ("####\nno number there, but 4 later", 4.0), ("no numbers", None),
])
def test_gsm8k_final_number(text, expected):
    assert S.extract_gsm8k_answer(text) == expected


def test_gsm8k_task_scores_numbers_not_strings():
    task = get_task("gsm8k")
    ex = {"question": "q", "solution": "s", "answer": 1234.0}
    res = task.score([ex, ex, ex], ["So $1,234.00 in total.", "#### 1234", "it costs 1235"])
    assert [r["correct"] for r in res.records] == [True, True, False]
    assert res.metrics["accuracy"] == pytest.approx(2 / 3)


def test_llm_adapters_rules():
    assert S.extract_last_number("There are 3 boxes of 4, so 12.") == 12.0
    assert S.numbers_match(12.0005, 12.0, tol=1e-3) and not S.numbers_match(12.01, 12.0, tol=1e-3)
    assert S.extract_keyword("the correct answer is solution2", ["solution1", "solution2"]) == 1
    assert S.extract_keyword("Answer2 then answer1", ["answer1", "answer2"]) == 1
    assert S.extract_keyword("the answer is true", ["true", "false"]) == 0
    assert S.extract_keyword("untrue", ["true", "false"]) is None  # whole words only
    assert S.first_capital_letter("Assume x = 3. The answer is B") == 0  # why the legacy rule is brittle
    aqua = get_task("math:aqua")
    ex = {"instruction": "i", "input": "", "output": "o", "answer": 1, "choices": list("ABCDE")}
    assert aqua.predict("Assume x = 3. The answer is B", ex) == 1
    assert aqua.predict("Assume x = 3. The answer is B", ex, "legacy_first_capital") == 0


def test_commonsense_task_scoring():
    task = get_task("commonsense:piqa")
    ex = {"instruction": "...", "input": "", "output": "the correct answer is solution2",
          "options": ["solution1", "solution2"], "answer": 1}
    res = task.score([ex, ex, ex], ["the correct answer is solution2", "solution1", "I don't know"])
    assert [r["prediction"] for r in res.records] == [1, 0, None]
    assert res.metrics["no_answer_rate"] == pytest.approx(1 / 3)


def test_lettered_qa_tasks():
    ex = {"question": "q", "choices": ["x", "y", "z"], "answer": 2, "hint": ""}
    for name in ("scienceqa", "qa:csqa"):
        task = get_task(name)
        res = task.score([ex] * 3, [task.target(ex), "The answer is (C).", "Answer: The answer is A."])
        assert [r["correct"] for r in res.records] == [True, True, False]


# ----------------------------------------------------------------------------- metrics
def test_binary_metrics_against_hand_computed_values():
    pred, gold = [1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0]
    # TP=2 TN=2 FP=1 FN=1
    assert S.f1_binary(pred, gold) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert S.matthews_corrcoef(pred, gold) == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    assert S.matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # an empty margin
    assert S.accuracy([True, False, True, True]) == 0.75


def test_correlations():
    assert S.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert S.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(S.pearson([1, 1, 1], [1, 2, 3]))
    # ties share their mean rank: ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]
    assert S.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(S.pearson([1, 2.5, 2.5, 4], [1, 3, 2, 4]))
    assert S.spearman([1, 5, 10], [2, 3, 100]) == pytest.approx(1.0)


def test_glue_metrics_count_missing_answers_as_wrong():
    cola = get_task("glue:cola")
    exs = [{"sentence": "s", "answer": g, "id": ""} for g in (1, 0, 1, 0)]
    res = cola.score(exs, ["The answer is yes.", "no", "I cannot say", "yes"])
    assert [r["prediction"] for r in res.records] == [1, 0, None, 1]
    # the missing answer is scored as the opposite class: pred [1, 0, 0, 1] vs gold [1, 0, 1, 0]
    assert res.metrics["mcc"] == pytest.approx(S.matthews_corrcoef([1, 0, 0, 1], [1, 0, 1, 0]))
    stsb = get_task("glue:stsb")
    exs = [{"sentence1": "a", "sentence2": "b", "answer": g, "bucket": round(g), "id": ""} for g in (4.8, 0.2, 3.6)]
    res = stsb.score(exs, ["The answer is 5.", "The answer is 0", "no idea"])
    assert res.metrics["pearson"] == pytest.approx(S.pearson([5, 0, 2.5], [4.8, 0.2, 3.6]))


def test_pass_at_k_is_the_unbiased_estimator():
    def exact(n, c, k):  # 1 - C(n-c, k) / C(n, k), by enumerating the k-subsets
        subsets = list(combinations(range(n), k))
        return sum(any(i < c for i in s) for s in subsets) / len(subsets)

    n, cs = 6, [0, 1, 3, 6]
    for k in (1, 2, 5):
        assert S.pass_at_k([n] * 4, cs, k) == pytest.approx(sum(exact(n, c, k) for c in cs) / 4)
    assert S.pass_at_k([1, 1], [1, 0], 1) == 0.5
    with pytest.raises(ValueError, match="pass@5 needs at least 5 samples"):
        S.pass_at_k([3], [1], 5)


def test_choose_by_loglik():
    assert S.choose_by_loglik([-3.0, -2.0, -4.0], [1, 1, 1]) == 1
    # normalised by length, the long continuation wins
    assert S.choose_by_loglik([-3.0, -4.0], [3, 8]) == 1
