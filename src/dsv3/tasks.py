"""Verifiable tasks for GRPO and evaluation, generated on the fly, and user tasks.

Shared by post-training (``dsv3.post``: SFT data, GRPO rewards) and evaluation (``dsv3.eval``:
``dsv3 eval --task``, the lm-eval export), so it lives beside both rather than in either.

A task makes problems (a user message, its exact answer, a worked reasoning for SFT data) and
scores a completion with ``reward(prompt, completion) -> float`` -- a pure function of the two
strings, so user tasks have the same interface. The model answers in thinking mode: the prompt is
the chat template's generation prompt ending in ``<think>``, and a well-formed completion is
``REASONING</think>ANSWER`` (then EOS). Rewards, as in DeepSeek-R1's rule-based RL:

* **accuracy**: 1 when the text after ``</think>`` (stripped) equals the exact answer;
* **format**: ``format_weight`` when the completion has exactly one ``</think>``, no ``<think>``,
  and a non-empty answer after it.

Built-in tasks (difficulty via constructor arguments): ``arithmetic`` (integer ``a + b`` / ``a - b``),
``sort`` (sort a list of integers ascending), ``brackets`` (is a string of ``()[]`` balanced:
``yes`` / ``no``), and ``mixed`` (all three in turn). User tasks: ``--task FILE.py`` or
``--task package.module`` (optionally ``:function``) naming a ``reward(prompt, completion)``
function; prompts come from the module's ``prompts`` list or ``sample_prompt(rng)`` function, or
from a prompts file.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from .tokenizer import EOS_TOKEN, SPECIAL_TOKENS, THINK_BEGIN, THINK_END

FORMAT_WEIGHT = 0.1      # R1-style format reward, small next to the accuracy reward of 1


@dataclass
class Problem:
    """One problem: the user message, the exact expected answer and a worked reasoning (the
    latter two are ``None`` for user tasks that only know how to score)."""

    prompt: str
    answer: str | None = None
    reasoning: str | None = None

    def messages(self) -> list[dict]:
        """The conversation asking the problem (for the chat template)."""
        return [{"role": "user", "content": self.prompt}]

    def sft_record(self) -> dict:
        """A chat JSONL record answering it (thinking mode), for ``dsv3 sft``."""
        if self.answer is None:
            raise ValueError("this problem has no reference answer to train on")
        return {"messages": [*self.messages(), {"role": "assistant", "reasoning_content": self.reasoning or "",
                                                "content": self.answer}], "thinking": True}


class Task(Protocol):
    name: str

    def sample(self, rng: random.Random) -> Problem: ...

    def reward(self, prompt: str, completion: str) -> float: ...

    def correct(self, prompt: str, completion: str) -> bool: ...


def parse_completion(completion: str) -> tuple[bool, str]:
    """(well_formed, answer) of a thinking-mode completion ``REASONING</think>ANSWER[EOS]``.

    Well-formed: exactly one ``</think>``, no ``<think>``, a non-empty answer with no other special
    token. The answer is the text after ``</think>``, stripped, without a trailing EOS.
    """
    text = completion.removesuffix(EOS_TOKEN)
    if text.count(THINK_END) != 1 or THINK_BEGIN in text:
        return False, ""
    answer = text.split(THINK_END, 1)[1].strip()
    ok = bool(answer) and not any(s in answer for s in SPECIAL_TOKENS)
    return ok, answer


def completion_text(tokenizer, ids: list[int]) -> str:
    """A completion's token ids as the reward sees them: special tokens spelled out (``</think>``
    matters), without the final stop token (:meth:`~dsv3.tokenizer.Tokenizer.stop_ids`)."""
    if ids and ids[-1] in tokenizer.stop_ids():
        ids = ids[:-1]
    return tokenizer.decode(ids)


class _BuiltinTask:
    """Shared reward logic: accuracy from :meth:`answer_of` plus the format reward."""

    name = "builtin"

    def __init__(self, format_weight: float = FORMAT_WEIGHT):
        self.format_weight = format_weight

    def answer_of(self, prompt: str) -> str:
        raise NotImplementedError

    def correct(self, prompt: str, completion: str) -> bool:
        ok, answer = parse_completion(completion)
        return ok and answer == self.answer_of(prompt)

    def reward(self, prompt: str, completion: str) -> float:
        ok, _ = parse_completion(completion)
        return float(self.correct(prompt, completion)) + (self.format_weight if ok else 0.0)


class Arithmetic(_BuiltinTask):
    """``What is A + B?`` / ``What is A - B?`` with integers in ``[0, max_value]``; answer the result."""

    name = "arithmetic"
    _RE = re.compile(r"What is (\d+) ([+-]) (\d+)\?\Z")

    def __init__(self, max_value: int = 20, ops: str = "+-", format_weight: float = FORMAT_WEIGHT):
        super().__init__(format_weight)
        if max_value < 1 or not ops or set(ops) - {"+", "-"}:
            raise ValueError(f"arithmetic needs max_value >= 1 and ops from '+-', got {max_value}, {ops!r}")
        self.max_value, self.ops = max_value, ops

    def sample(self, rng: random.Random) -> Problem:
        a, b, op = rng.randint(0, self.max_value), rng.randint(0, self.max_value), rng.choice(self.ops)
        prompt = f"What is {a} {op} {b}?"
        answer = self.answer_of(prompt)
        return Problem(prompt, answer, f"{a} {op} {b} = {answer}")

    def answer_of(self, prompt: str) -> str:
        m = self._RE.match(prompt)
        if not m:
            raise ValueError(f"not an arithmetic prompt: {prompt!r}")
        a, op, b = int(m[1]), m[2], int(m[3])
        return str(a + b if op == "+" else a - b)


class Sort(_BuiltinTask):
    """``Sort: 5 2 9`` with ``min_len..max_len`` integers in ``[0, max_value]``; answer ``2 5 9``."""

    name = "sort"
    _PREFIX = "Sort: "

    def __init__(self, min_len: int = 3, max_len: int = 5, max_value: int = 9, format_weight: float = FORMAT_WEIGHT):
        super().__init__(format_weight)
        if not 1 <= min_len <= max_len or max_value < 0:
            raise ValueError(f"sort needs 1 <= min_len <= max_len and max_value >= 0, got {min_len}, {max_len}, "
                             f"{max_value}")
        self.min_len, self.max_len, self.max_value = min_len, max_len, max_value

    def sample(self, rng: random.Random) -> Problem:
        xs = [rng.randint(0, self.max_value) for _ in range(rng.randint(self.min_len, self.max_len))]
        prompt = self._PREFIX + " ".join(map(str, xs))
        answer = self.answer_of(prompt)
        # Worked reasoning: pick the smallest remaining number each time.
        return Problem(prompt, answer, "smallest first: " + answer)

    def answer_of(self, prompt: str) -> str:
        if not prompt.startswith(self._PREFIX):
            raise ValueError(f"not a sort prompt: {prompt!r}")
        try:
            xs = [int(t) for t in prompt[len(self._PREFIX):].split()]
        except ValueError:
            raise ValueError(f"not a sort prompt: {prompt!r}") from None
        return " ".join(map(str, sorted(xs)))


class Brackets(_BuiltinTask):
    """``Balanced? ([)]`` over ``()[]`` of length ``min_len..max_len``; answer ``yes`` / ``no``.

    Half the problems are balanced by construction, so always answering one way scores 50%.
    """

    name = "brackets"
    _PREFIX = "Balanced? "
    _PAIRS = {")": "(", "]": "["}

    def __init__(self, min_len: int = 2, max_len: int = 8, format_weight: float = FORMAT_WEIGHT):
        super().__init__(format_weight)
        if not 1 <= min_len <= max_len:
            raise ValueError(f"brackets needs 1 <= min_len <= max_len, got {min_len}, {max_len}")
        self.min_len, self.max_len = min_len, max_len

    def _balanced_string(self, rng: random.Random, n_pairs: int) -> str:
        out, stack = [], []
        opens_left = n_pairs
        while opens_left or stack:
            if opens_left and (not stack or rng.random() < 0.5):
                ch = rng.choice("([")
                out.append(ch)
                stack.append(ch)
                opens_left -= 1
            else:
                out.append(")" if stack.pop() == "(" else "]")
        return "".join(out)

    def sample(self, rng: random.Random) -> Problem:
        n = rng.randint(self.min_len, self.max_len)
        if rng.random() < 0.5:
            s = self._balanced_string(rng, max(1, n // 2))
        else:
            s = "".join(rng.choice("()[]") for _ in range(n))
        prompt = self._PREFIX + s
        return Problem(prompt, self.answer_of(prompt), self._trace(s))

    def _trace(self, s: str) -> str:
        """The stack after every character (``-`` for empty) as the worked reasoning."""
        stack, states = [], []
        for ch in s:
            if ch in "([":
                stack.append(ch)
            elif stack and stack[-1] == self._PAIRS[ch]:
                stack.pop()
            else:
                states.append("x")
                break
            states.append("".join(stack) or "-")
        return "stack: " + " ".join(states)

    def answer_of(self, prompt: str) -> str:
        if not prompt.startswith(self._PREFIX) or set(prompt[len(self._PREFIX):]) - set("()[]"):
            raise ValueError(f"not a brackets prompt: {prompt!r}")
        stack = []
        for ch in prompt[len(self._PREFIX):]:
            if ch in "([":
                stack.append(ch)
            elif not stack or stack.pop() != self._PAIRS[ch]:
                return "no"
        return "no" if stack else "yes"


class Mixed:
    """Problems from several tasks, chosen uniformly; each prompt is scored by the task that owns it."""

    name = "mixed"

    def __init__(self, tasks: list[_BuiltinTask]):
        self.tasks = tasks

    def _owner(self, prompt: str) -> _BuiltinTask:
        for t in self.tasks:
            try:
                t.answer_of(prompt)
                return t
            except ValueError:
                continue
        raise ValueError(f"no task of {[t.name for t in self.tasks]} recognizes the prompt {prompt!r}")

    def sample(self, rng: random.Random) -> Problem:
        return rng.choice(self.tasks).sample(rng)

    def reward(self, prompt: str, completion: str) -> float:
        return self._owner(prompt).reward(prompt, completion)

    def correct(self, prompt: str, completion: str) -> bool:
        return self._owner(prompt).correct(prompt, completion)


BUILTIN_TASKS: dict[str, Callable[[], Task]] = {
    "arithmetic": Arithmetic,
    "sort": Sort,
    "brackets": Brackets,
    "mixed": lambda: Mixed([Arithmetic(), Sort(), Brackets()]),
}


# --------------------------------------------------------------------------------------- user tasks
class UserTask:
    """A task from user code: ``reward(prompt, completion) -> float`` plus a source of prompts.

    ``correct`` (the accuracy in evaluations) is ``reward >= success_reward``.
    """

    def __init__(self, name: str, reward_fn: Callable[[str, str], float], prompts: list[str] | None = None,
                 sample_prompt: Callable[[random.Random], str] | None = None, success_reward: float = 1.0):
        if not prompts and sample_prompt is None:
            raise ValueError(f"task {name}: no prompts -- define `prompts` (a list of str) or "
                             "`sample_prompt(rng)` in the module, or pass a prompts file")
        self.name, self._reward, self.prompts = name, reward_fn, prompts
        self._sample_prompt, self.success_reward = sample_prompt, success_reward

    def sample(self, rng: random.Random) -> Problem:
        if self._sample_prompt is not None:
            return Problem(str(self._sample_prompt(rng)))
        return Problem(rng.choice(self.prompts))

    def reward(self, prompt: str, completion: str) -> float:
        value = self._reward(prompt, completion)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TypeError(f"task {self.name}: reward() returned {value!r}, not a number") from None

    def correct(self, prompt: str, completion: str) -> bool:
        return self.reward(prompt, completion) >= self.success_reward


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: JSONL rows with ``prompt`` (or ``messages``' last user turn), or plain
    text with one prompt per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file")
    prompts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if isinstance(row.get("prompt"), str):
                prompts.append(row["prompt"])
            elif isinstance(row.get("messages"), list):
                users = [m.get("content") for m in row["messages"] if m.get("role") == "user"]
                if not users:
                    raise ValueError(f"{path}:{lineno}: 'messages' has no user turn")
                prompts.append(users[-1])
            else:
                raise ValueError(f"{path}:{lineno}: a JSON row needs 'prompt' or 'messages'")
        else:
            prompts.append(line.rstrip("\n"))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _import_module(spec: str):
    if spec.endswith(".py") or "/" in spec or Path(spec).suffix == ".py":
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"--task {spec}: no such file")
        mod_spec = importlib.util.spec_from_file_location(f"dsv3_user_task_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(spec)
    except ImportError as e:
        raise ValueError(f"--task {spec}: not a built-in task ({', '.join(BUILTIN_TASKS)}), a .py file, "
                         f"or an importable module ({e})") from None


def load_task(spec: str, prompts_file: str | Path | None = None) -> Task:
    """A built-in task by name, or a user task ``FILE.py[:function]`` / ``module[:function]`` whose
    function (default ``reward``) is ``reward(prompt, completion) -> float``."""
    if spec in BUILTIN_TASKS:
        if prompts_file is not None:
            raise ValueError(f"--prompts is for user tasks; the built-in task {spec!r} makes its own problems")
        return BUILTIN_TASKS[spec]()
    target, sep, fn_name = spec.rpartition(":")
    if not sep:
        target, fn_name = spec, "reward"
    module = _import_module(target)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"--task {spec}: the module has no function {fn_name}(prompt, completion)")
    prompts = read_prompts(prompts_file) if prompts_file else getattr(module, "prompts", None)
    if prompts is not None and (not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts)):
        raise ValueError(f"--task {spec}: `prompts` must be a list of strings")
    return UserTask(Path(target).stem if target.endswith(".py") else target, fn, list(prompts) if prompts else None,
                    getattr(module, "sample_prompt", None))


def problems(task: Task, n: int, seed: int) -> list[Problem]:
    """``n`` problems of ``task`` from a seeded generator (same seed, same problems)."""
    rng = random.Random(seed)
    return [task.sample(rng) for _ in range(n)]
