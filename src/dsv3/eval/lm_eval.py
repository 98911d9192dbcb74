"""EleutherAI lm-evaluation-harness against a running ``dsv3 serve``, with a local task (no download).

lm-eval evaluates OpenAI-compatible servers with its ``local-chat-completions`` (and
``local-completions``) model types; ``dsv3 serve`` is one. What lm-eval cannot get without a
download is a task, so :func:`write_lm_eval_task` writes one: a JSONL of seeded problems of a
built-in verifiable task and a YAML task definition (``generate_until``, exact match on the answer)
that lm-eval loads with ``--include_path DIR``. The exact command is in ``docs/post-training.md``::

    dsv3 eval --lm-eval-task lm_tasks --task arithmetic --num 100
    dsv3 serve --model runs/post-train/grpo/final --reasoning &
    lm_eval --model local-chat-completions --apply_chat_template --include_path lm_tasks \\
        --tasks dsv3_arithmetic --model_args model=dsv3,base_url=http://127.0.0.1:8000/v1/chat/completions

With ``--reasoning`` the server answers in thinking mode and returns only the text after
``</think>`` as ``content``, which is what the task compares with the answer -- the same
exact-match rule as ``dsv3 eval --task``, so the two numbers agree for greedy decoding.
lm-eval itself is an optional extra (``pip install lm-eval``), not a dependency of dsv3.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_lm_eval_task(directory: str | Path, task, n: int = 100, seed: int = 0, max_gen_toks: int = 48) -> list[str]:
    """Write ``dsv3_<task>.jsonl`` (``prompt``, ``answer`` per line) and ``dsv3_<task>.yaml`` into
    ``directory``; returns the two paths. Needs a task with reference answers (a built-in one)."""
    from ..tasks import problems

    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    probs = problems(task, n, seed)
    if any(p.answer is None for p in probs):
        raise ValueError(f"task {task.name} has no reference answers; lm-eval's exact match needs them")
    name = f"dsv3_{task.name}"
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in probs),
                    encoding="utf-8")
    # JSON is valid YAML: no YAML library needed, no quoting pitfalls with the regexes.
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": max_gen_toks, "do_sample": False,
                              "temperature": 0.0},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "regexes_to_ignore": ["^\\s+", "\\s+$"]}],
        "metadata": {"version": 1.0, "dsv3_seed": seed, "num_problems": n},
    }
    yaml_file = directory / f"{name}.yaml"
    yaml_file.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return [str(yaml_file), str(data)]
