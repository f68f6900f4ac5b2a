"""One registry of multiple-choice data sets: loading (local release files or the hub), prompts, answers.

>>> task = get_task("arc_easy")
>>> examples = task.load("validation", limit=100)
>>> prompt, answers = task.letter_prompt(examples[0])      # published letter-choice prompt, (" A", .., " D")
>>> pairs = task.cloze_pairs(examples[0])                  # [(context, continuation)] per choice

Data folder: see :func:`resolve_data_dir`.
Your own data: ``get_task("jsonl:train=a.jsonl,validation=b.jsonl")``.
"""

from varlora.tasks._base import (
    DATA_DIR_ENV,
    IGNORE_SHARED_ENV,
    SPLITS,
    DataFormatError,
    Example,
    Split,
    Task,
    resolve_data_dir,
    shared_dir,
    subsample,
)
from varlora.tasks.registry import (
    BOOLQ_LOCAL_TRAIN_ROWS,
    MMLU_SUBJECTS,
    JsonlTask,
    LocalSplit,
    ReleaseTask,
    get_task,
    jsonl_task,
    list_tasks,
    register_task,
)
from varlora.tasks.templates import TEMPLATES, PromptTemplate

__all__ = [
    "BOOLQ_LOCAL_TRAIN_ROWS",
    "DATA_DIR_ENV",
    "IGNORE_SHARED_ENV",
    "MMLU_SUBJECTS",
    "SPLITS",
    "TEMPLATES",
    "DataFormatError",
    "Example",
    "JsonlTask",
    "LocalSplit",
    "PromptTemplate",
    "ReleaseTask",
    "Split",
    "Task",
    "get_task",
    "jsonl_task",
    "list_tasks",
    "register_task",
    "resolve_data_dir",
    "shared_dir",
    "subsample",
]
