"""Prompt templates and training tokenization."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flylora.tasks import get_task, get_template
from flylora.tasks.code import completion_from_response, truncate_at, CODEX_STOP

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "tasks"))
from tiny_lm import CharTokenizer, neox_tokenizer  # noqa: E402

MMLU_EX = {"question": "What is 2 + 2?", "choices": ["4", "3", "5", "6"], "answer": 0, "subject": ""}


def test_alpaca_mmlu_prompt_and_answer_zero_is_kept():
    task = get_task("mmlu")
    prompt = task.build_prompt(MMLU_EX)
    assert prompt.endswith("### Question:\nWhat is 2 + 2?\n\n### Options:\n['4', '3', '5', '6']\n\n### Answer Index:")
    assert prompt.startswith("Carefully read the following question")
    # the official `if label:` dropped answer 0; we always append it
    assert task.target(MMLU_EX) == "0"
    tok = CharTokenizer()
    feats = task.tokenize(MMLU_EX, tok, cutoff_len=1000)
    assert feats["input_ids"][-2:] == [ord("0") + 10, tok.eos_token_id]


def test_tokenize_labels_eos_and_masking():
    task, tok = get_task("mmlu"), CharTokenizer()
    prompt = task.build_prompt(MMLU_EX)
    n_prompt = len(prompt) + 1  # + BOS
    on = task.tokenize(MMLU_EX, tok, cutoff_len=1000, train_on_inputs=True)
    off = task.tokenize(MMLU_EX, tok, cutoff_len=1000, train_on_inputs=False)
    assert on["input_ids"] == off["input_ids"] and len(on["input_ids"]) == n_prompt + 2
    assert on["labels"] == on["input_ids"] and on["attention_mask"] == [1] * (n_prompt + 2)
    assert off["labels"] == [-100] * n_prompt + on["input_ids"][n_prompt:]
    no_eos = task.tokenize(MMLU_EX, tok, cutoff_len=1000, add_eos=False)
    assert no_eos["input_ids"] == on["input_ids"][:-1]


def test_truncation_keeps_the_answer_by_default():
    task, tok = get_task("mmlu"), CharTokenizer()
    keep = task.tokenize(MMLU_EX, tok, cutoff_len=20, train_on_inputs=False)
    assert len(keep["input_ids"]) == 20
    assert keep["input_ids"][0] == tok.bos_token_id                 # BOS survives
    assert keep["input_ids"][-2:] == [ord("0") + 10, tok.eos_token_id]  # answer + EOS survive
    assert keep["labels"][-2:] == keep["input_ids"][-2:] and keep["labels"][:18] == [-100] * 18
    right = task.tokenize(MMLU_EX, tok, cutoff_len=20, truncation="right")
    assert len(right["input_ids"]) == 20 and tok.eos_token_id not in right["input_ids"]  # official: answer lost
    with pytest.raises(ValueError, match="truncation must be one of"):
        task.tokenize(MMLU_EX, tok, truncation="middle")


def test_real_tokenizer_prompt_tokens_are_a_prefix():
    # the prompt is tokenized on its own, exactly as generation will see it
    task, tok = get_task("gsm8k"), neox_tokenizer()
    ex = {"question": "Tom has 3 apples and buys 2. How many?", "solution": "3 + 2 = 5.\n#### 5", "answer": 5.0}
    feats = task.tokenize(ex, tok, cutoff_len=512)
    prompt_ids = tok(task.build_prompt(ex))["input_ids"]
    assert feats["input_ids"][:len(prompt_ids)] == prompt_ids
    assert tok.decode(feats["input_ids"][len(prompt_ids):]) == "3 + 2 = 5.\n#### 5<|endoftext|>"


def test_chat_template_wraps_the_prompt():
    tok = neox_tokenizer()
    task = get_task("glue:sst2")
    ex = {"sentence": "great movie", "answer": 1, "id": "0"}
    with pytest.raises(ValueError, match="has no chat template"):
        task.build_prompt(ex, tokenizer=tok, chat=True)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    prompt = task.build_prompt(ex, tokenizer=tok, chat=True)
    assert prompt.startswith("<|user|>Below is an instruction") and prompt.endswith("<|assistant|>")
    feats = task.tokenize(ex, tok, chat=True)
    assert tok.decode(feats["input_ids"]).endswith("<|assistant|>The answer is positive.<|endoftext|>")


def test_templates_render_exact_text():
    assert get_template("alpaca").render("Do X.") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nDo X.\n\n### Response:\n")
    assert get_template("alpaca").render("Do X.", "on Y").endswith("### Instruction:\nDo X.\n\n### Input:\non Y\n\n### Response:\n")
    assert get_template("alpaca_cot").render("Add 2 and 3.").endswith(
        "### Instruction:\nAdd 2 and 3. Please think step by step and then answer the specific number.\n\n### Response:\n")
    # LLM-Adapters: one prompt for train and eval
    assert get_template("llm_adapters").render("Q") == get_template("alpaca").render("Q")
    with pytest.raises(ValueError, match="unknown template 'nope'"):
        get_template("nope")


def test_task_prompts():
    piqa = get_task("commonsense:piqa").normalize({"goal": "Open a jar", "sol1": "Twist the lid", "sol2": "Eat the lid", "label": 0})
    assert piqa["instruction"] == ("Please choose the correct solution to the question: Open a jar\n\nSolution1: Twist the lid"
                                   "\n\nSolution2: Eat the lid\n\nAnswer format: solution1/solution2")
    assert get_task("commonsense:piqa").target(piqa) == "the correct answer is solution1"
    boolq = get_task("commonsense:boolq").normalize({"question": "is the sky blue", "answer": True, "passage": "p"})
    assert boolq["instruction"].endswith("question: is the sky blue?\n\nAnswer format: true/false") and boolq["answer"] == 0
    csqa = get_task("qa:csqa")
    ex = csqa.normalize({"question": "Where?", "choices": {"label": ["A", "B"], "text": ["bank", "mall"]}, "answerKey": "B"})
    assert csqa.build_prompt(ex).endswith("### Question and Possible Answers:\n\nWhere?\n(A). bank\n(B). mall\n\n### Correct Answer:\n")
    assert csqa.target(ex) == "The correct answer is B."
    rte = get_task("glue:rte")
    ex = rte.normalize({"sentence1": "A dog runs.", "sentence2": "An animal moves.", "label": 0, "idx": 3})
    assert rte.build_prompt(ex).endswith("### Input:\nSentence 1: A dog runs.\nSentence 2: An animal moves.\n\n### Response:\n")
    assert rte.target(ex) == "The answer is yes."
    sqa = get_task("scienceqa")
    ex = sqa.normalize({"question": "Which is a mammal?", "choices": ["shark", "whale"], "answer": 1, "hint": "", "image": None})
    assert "### Instruction:\nContext: N/A\nQuestion: Which is a mammal?\nOptions: (A) shark (B) whale\n" in sqa.build_prompt(ex)
    assert sqa.target(ex) == "Answer: The answer is B."


def test_humaneval_prompt_styles_and_code_extraction():
    he = get_task("humaneval")
    prob = he.load("test", limit=1).rows[0]
    assert he.build_prompt(prob, "plain") == prob["prompt"]
    assert "### Instruction:\nComplete the following Python function.\n\n### Input:\nfrom typing import List" in he.build_prompt(prob)
    assert truncate_at("    return 1\n\ndef other():\n    pass", CODEX_STOP) == "    return 1\n"
    full = "Here you go:\n```python\ndef has_close_elements(numbers, threshold):\n    return False\n```\nDone."
    assert completion_from_response(full, prob) == "\ndef has_close_elements(numbers, threshold):\n    return False\n"
    assert completion_from_response("return False", prob) == "    return False"
    assert completion_from_response("    return True\n", prob) == "    return True\n"
