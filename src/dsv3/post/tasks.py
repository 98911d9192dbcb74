"""The verifiable tasks moved to :mod:`dsv3.tasks` (evaluation uses them too); this name stays importable."""

from ..tasks import (BUILTIN_TASKS, FORMAT_WEIGHT, Arithmetic, Brackets, Mixed, Problem, Sort, Task,  # noqa: F401
                     UserTask, completion_text, load_task, parse_completion, problems, read_prompts)
