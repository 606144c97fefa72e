"""Tasks: built-in behaviours generated from templates, and user tasks from JSONL / CSV files.

Every task becomes a ``TokenizedTask`` (clean / corrupted ids of equal length, answer-token sets,
read positions). See ``docs/tasks.md``.
"""

from .base import TaskError, TokenizedTask
from .encoding import EncodedPair, PromptPair, assemble, pad_id_for, special_prefix
from .files import (
    TaskRow,
    load_task_file,
    read_task_rows,
    tokenize_rows,
    write_task_rows,
)
from .registry import available_tasks, make_task

__all__ = [
    "EncodedPair",
    "PromptPair",
    "TaskError",
    "TaskRow",
    "TokenizedTask",
    "assemble",
    "available_tasks",
    "load_task_file",
    "make_task",
    "pad_id_for",
    "read_task_rows",
    "special_prefix",
    "tokenize_rows",
    "write_task_rows",
]
