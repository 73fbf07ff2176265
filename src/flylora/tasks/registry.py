"""The task registry: name -> Task, plus groups that expand to several tasks."""
from __future__ import annotations

from functools import lru_cache

from .base import Task


@lru_cache(maxsize=None)
def _tasks() -> dict[str, Task]:
    from . import cloze, code, glue, gsm8k, llm_adapters, mmlu, qa, scienceqa

    tasks: list[Task] = [mmlu.MMLU(), scienceqa.ScienceQA(), gsm8k.GSM8K(), code.CodeAlpaca(),
                         code.HumanEval()]
    tasks += llm_adapters.build_tasks() + glue.build_tasks() + qa.build_tasks() + cloze.build_tasks()
    return {t.name: t for t in tasks}


def groups() -> dict[str, list[str]]:
    """`math`, `commonsense`, `glue`, `qa`, `cloze` (each family's eval tasks) and `flylora` (the paper's
    four benchmarks)."""
    names = list(_tasks())
    out = {fam: [n for n in names if n.startswith(fam + ":")]
           for fam in ("math", "commonsense", "glue", "qa", "cloze")}
    out["flylora"] = ["mmlu", "scienceqa", "gsm8k", "humaneval"]
    return out


def list_tasks() -> list[str]:
    return list(_tasks())


def get_task(name: str) -> Task:
    tasks = _tasks()
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(tasks)}; "
                         f"groups: {', '.join(groups())}")
    return tasks[name]


def expand(names: list[str] | str) -> list[str]:
    """Task names with groups expanded, duplicates dropped, order kept. Accepts a list or a
    comma-separated string."""
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for n in (x.strip() for item in names for x in item.split(",") if x.strip()):
        for t in groups().get(n, [n]):
            get_task(t)  # validates
            if t not in out:
                out.append(t)
    return out
