"""ScienceQA, text-only questions (rows without an image), as in MixLoRA/FlyLoRA and
MoELoRA-Riemannian: instruction "Context: {hint or N/A}\\nQuestion: {q}\\nOptions: (A) .. (B) ..",
target "Answer: The answer is {X}.", Alpaca prompt. Not shipped offline: give the HF parquet
files/folder (derek-thomas/ScienceQA) or the original problems.json (id -> problem, with a
`split` field, filtered to the requested split).
"""
from __future__ import annotations

from .base import ChoiceTask, check_choices
from .sources import Hub, Loaded, RowError

_LETTERS = "ABCDEFGH"
_SPLIT_NAMES = {"train": ("train",), "test": ("test",)}


class ScienceQA(ChoiceTask):
    name = "scienceqa"
    family = "flylora"
    description = "ScienceQA text-only, generative, 'The answer is X.'"
    default_template = "alpaca"
    max_new_tokens = 32
    labels = tuple(_LETTERS)
    local_split_names = _SPLIT_NAMES
    expected_format = "question, choices, answer (index), hint, image (null for text-only rows)"

    def hub(self, split):
        return Hub("derek-thomas/ScienceQA", None, split)

    def normalize(self, raw):
        if raw.get("image") not in (None, "", {}):
            return None  # image question: outside the text-only benchmark
        q, choices, answer = check_choices(raw["question"], raw["choices"], raw["answer"], _LETTERS)
        hint = raw.get("hint") or ""
        if not isinstance(hint, str):
            raise RowError(f"hint must be a string, got {hint!r}")
        return {"id": str(raw.get("id", "")), "question": q, "choices": choices, "answer": answer,
                "hint": hint, "split": raw.get("split")}

    def load_real(self, split, path=None):
        data = super().load_real(split, path)
        # problems.json holds every split in one file, marked per row
        wanted = {"train": {"train"}, "test": {"test"}}[split]
        if any(r.get("split") for r in data.rows):
            data.rows = [r for r in data.rows if r.get("split") in wanted]
        return Loaded(data.rows, data.source, data.split, data.notes)

    def prompt_fields(self, ex):
        options = " ".join(f"({_LETTERS[i]}) {c}" for i, c in enumerate(ex["choices"]))
        return (f"Context: {ex['hint'] or 'N/A'}\nQuestion: {ex['question']}\nOptions: {options}\n", "")

    def target(self, ex):
        return f"Answer: The answer is {_LETTERS[ex['answer']]}."
