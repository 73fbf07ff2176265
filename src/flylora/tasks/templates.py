"""Prompt templates. A template turns (instruction, input) into the prompt; the training target
is appended directly after the prompt (nothing in between), exactly as alpaca-lora's Prompter
does: `full_text = prompt + target`.

Sources: FlyLoRA `templates/{alpaca,alpaca_mmlu,alpaca_cot,meta}.json` (spec flylora.md §5),
LLM-Adapters/TopLoRA (toplora.md §4), MoELoRA-Riemannian (moelora-riemannian.md §6).
"""
from __future__ import annotations

from dataclasses import dataclass

_ALPACA_HEAD = ("Below is an instruction that describes a task, paired with an input that provides "
                "further context. Write a response that appropriately completes the request.\n\n")
_ALPACA_HEAD_NO_INPUT = ("Below is an instruction that describes a task. "
                         "Write a response that appropriately completes the request.\n\n")
_COT = "Please think step by step and then answer the specific number."


@dataclass(frozen=True)
class Template:
    name: str
    with_input: str      # uses {instruction} and {input}
    no_input: str        # uses {instruction}
    response_split: str  # the marker after which the model's answer starts
    doc: str = ""

    def render(self, instruction: str, input: str = "") -> str:
        if input:
            return self.with_input.format(instruction=instruction, input=input)
        return self.no_input.format(instruction=instruction)


TEMPLATES: dict[str, Template] = {}


def _add(t: Template) -> None:
    TEMPLATES[t.name] = t


_add(Template(
    "alpaca",
    _ALPACA_HEAD + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    _ALPACA_HEAD_NO_INPUT + "### Instruction:\n{instruction}\n\n### Response:\n",
    "### Response:", "alpaca-lora's standard template (FlyLoRA templates/alpaca.json)."))

_add(Template(
    "alpaca_mmlu",
    "Carefully read the following question and select the most correct answer from the given "
    "choices. You must output ONLY a single number between 0 and 3 corresponding to the option "
    "index. Do not include any other text.\n\n### Question:\n{instruction}\n\n### Options:\n{input}"
    "\n\n### Answer Index:",
    "Carefully read the following question and select the most correct answer from the given "
    "choices. You must output ONLY a single number between 0 and 3 corresponding to the option "
    "index. Do not include any other text.\n\n### Question:\n{instruction}\n\n### Answer Index:",
    "### Answer Index:",
    "FlyLoRA templates/alpaca_mmlu.json (prompt_input). {input} is str(choices). The label follows "
    "the colon directly. The official `if label:` bug (answer 0 dropped) is fixed in tasks/base.py, "
    "which always appends the target. The no-input variant is ours (MMLU always has options)."))

_add(Template(
    "alpaca_cot",
    _ALPACA_HEAD + "### Instruction:\n{instruction} " + _COT + "\n\n### Input:\n{input}\n\n### Response:\n",
    _ALPACA_HEAD_NO_INPUT + "### Instruction:\n{instruction} " + _COT + "\n\n### Response:\n",
    "### Response:", "Alpaca plus FlyLoRA's chain-of-thought sentence (templates/alpaca_cot.json); "
    "we place the sentence after the instruction."))

_add(Template("cloze", "{input}\nQuestion: {instruction}\nAnswer:", "Question: {instruction}\nAnswer:", "Answer:",
              "lm-eval-harness's question/answer cloze prompt; the target is \" <option text>\"."))

_add(Template("meta", "{instruction}\n\n{input}\n\n", "{instruction}\n\n", "",
              "FlyLoRA templates/meta.json: bare instruction and input."))

# LLM-Adapters: one prompt for training and evaluation. The official code trains with the lines
# indented by 16 spaces (two spaces after 'request.') but evaluates with 12 spaces (one space),
# so the model is tested on a prompt it never saw (toplora.md §6.4); we use the clean Alpaca
# text for both and do not reproduce the mismatch.
_add(Template(
    "llm_adapters",
    _ALPACA_HEAD + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    _ALPACA_HEAD_NO_INPUT + "### Instruction:\n{instruction}\n\n### Response:\n",
    "### Response:", "LLM-Adapters Alpaca prompt, identical for training and evaluation."))

# MoELoRA-Riemannian's multiple-choice QA prompt (CommonsenseQA; we use it for OBQA and SIQA too).
_add(Template(
    "qa_choice",
    "Below is a question followed by several possible answers. Please choose the correct answer."
    "\n\n### Question and Possible Answers:\n\n{instruction}\n\n{input}\n\n### Correct Answer:\n",
    "Below is a question followed by several possible answers. Please choose the correct answer."
    "\n\n### Question and Possible Answers:\n\n{instruction}\n\n### Correct Answer:\n",
    "### Correct Answer:", "MoELoRA-Riemannian CommonsenseQA template."))

# Raw continuation: the prompt is the text itself (HumanEval function header, base models).
_add(Template("plain", "{instruction}{input}", "{instruction}", "", "The text itself, no wrapper."))


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; allowed: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def apply_chat_template(tokenizer, prompt: str) -> str:
    """Wrap a rendered prompt as one user turn of the tokenizer's chat template, ending with the
    assistant header so the model answers next. The target is then appended as the reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
                         "drop the chat-template option")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
