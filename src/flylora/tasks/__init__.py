"""Tasks: data sources, prompt templates, training tokenization and scoring.

    from flylora.tasks import get_task
    task = get_task("mmlu")
    data = task.load("test", limit=50)           # Loaded(rows, source, split)
    prompt = task.build_prompt(data.rows[0])
    features = task.tokenize(data.rows[0], tokenizer, cutoff_len=128)
    result = task.score(data.rows, responses)     # ScoreResult(records, metrics)

See docs/evaluation.md for every task, source, template and scoring rule.
"""
from .base import SPLITS, ScoreResult, Task, carve
from .registry import expand, get_task, groups, list_tasks
from .sources import Loaded
from .templates import TEMPLATES, get_template

__all__ = ["SPLITS", "TEMPLATES", "Loaded", "ScoreResult", "Task", "carve", "expand", "get_task",
           "get_template", "groups", "list_tasks"]
