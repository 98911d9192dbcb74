"""Built-in verifiable tasks (answers checked by independent code), rewards, user tasks."""

from __future__ import annotations

import random

import pytest

from dsv3.tasks import (Arithmetic, Brackets, Mixed, Sort, UserTask, load_task, parse_completion, problems,
                             read_prompts)

EOS = "<｜end▁of▁sentence｜>"


def balanced_by_erasure(s: str) -> bool:
    """Independent check: erase adjacent () and [] pairs until nothing changes."""
    while "()" in s or "[]" in s:
        s = s.replace("()", "").replace("[]", "")
    return s == ""


def test_arithmetic_answers_match_python():
    for p in problems(Arithmetic(max_value=50), 200, 1):
        expr = p.prompt.removeprefix("What is ").removesuffix("?")
        assert p.answer == str(eval(expr))           # noqa: S307 -- digits and +/- only
        assert p.reasoning.endswith("= " + p.answer)


def test_sort_answers_match_sorted():
    for p in problems(Sort(min_len=2, max_len=7, max_value=99), 200, 2):
        xs = [int(t) for t in p.prompt.split(":")[1].split()]
        assert 2 <= len(xs) <= 7
        assert p.answer.split() == [str(x) for x in sorted(xs)]


def test_brackets_answers_match_erasure_and_both_occur():
    answers = []
    for p in problems(Brackets(), 300, 3):
        s = p.prompt.removeprefix("Balanced? ")
        assert p.answer == ("yes" if balanced_by_erasure(s) else "no")
        answers.append(p.answer)
    assert 0.3 < answers.count("yes") / len(answers) < 0.8


def test_problems_are_seeded():
    assert [p.prompt for p in problems(Sort(), 20, 5)] == [p.prompt for p in problems(Sort(), 20, 5)]
    assert [p.prompt for p in problems(Sort(), 20, 5)] != [p.prompt for p in problems(Sort(), 20, 6)]


@pytest.mark.parametrize("completion, reward, correct", [
    ("3 + 4 = 7</think>7" + EOS, 1.1, True),     # right answer, well formed: accuracy 1 + format 0.1
    ("3 + 4 = 7</think> 7 ", 1.1, True),          # surrounding whitespace is not part of the answer
    ("3 + 4 = 8</think>8", 0.1, False),           # wrong answer, well formed
    ("7", 0.0, False),                            # no </think>: no answer at all
    ("</think>7</think>7", 0.0, False),           # two </think>
    ("<think>x</think>7", 0.0, False),            # a stray <think>
    ("x</think>", 0.0, False),                    # empty answer
    ("x</think>7<｜User｜>", 0.0, False),         # a special token inside the answer
])
def test_arithmetic_reward_hand_cases(completion, reward, correct):
    task = Arithmetic()
    assert task.reward("What is 3 + 4?", completion) == pytest.approx(reward)
    assert task.correct("What is 3 + 4?", completion) is correct


def test_parse_completion():
    assert parse_completion("think</think> 2 5 9" + EOS) == (True, "2 5 9")
    assert parse_completion("no tags") == (False, "")


def test_mixed_scores_each_prompt_with_its_own_task():
    task = Mixed([Arithmetic(), Sort(), Brackets()])
    assert task.reward("Sort: 3 1 2", "s</think>1 2 3") == pytest.approx(1.1)
    assert task.reward("Balanced? ([)]", "s</think>no") == pytest.approx(1.1)
    assert task.reward("What is 10 - 12?", "s</think>-2") == pytest.approx(1.1)
    assert {type(task.sample(random.Random(i))).__name__ for i in range(30)} == {"Problem"}
    with pytest.raises(ValueError, match="recognizes"):
        task.reward("Hello", "x</think>y")


def test_bad_prompts_are_rejected():
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        Arithmetic().answer_of("What is 2 * 3?")
    with pytest.raises(ValueError, match="not a brackets prompt"):
        Brackets().answer_of("Balanced? (a)")
    with pytest.raises(ValueError):
        Arithmetic(max_value=0)


def test_user_task_from_file_and_prompts(tmp_path):
    f = tmp_path / "mytask.py"
    f.write_text("prompts = ['say hi', 'say bye']\n"
                 "def reward(prompt, completion):\n    return float(prompt.split()[1] in completion)\n"
                 "def strict(prompt, completion):\n    return 2.0 if completion == 'hi' else 0.0\n")
    task = load_task(str(f))
    assert isinstance(task, UserTask) and task.name == "mytask"
    assert task.sample(random.Random(0)).prompt in ("say hi", "say bye")
    assert task.reward("say hi", "well hi there") == 1.0 and task.correct("say hi", "hi")
    assert not task.correct("say bye", "hi")
    assert load_task(f"{f}:strict").reward("p", "hi") == 2.0
    pf = tmp_path / "prompts.jsonl"
    pf.write_text('{"prompt": "say yo"}\n{"messages": [{"role": "user", "content": "say ok"}]}\n')
    assert read_prompts(pf) == ["say yo", "say ok"]
    assert load_task(str(f), prompts_file=pf).prompts == ["say yo", "say ok"]
    with pytest.raises(ValueError, match="no function nope"):
        load_task(f"{f}:nope")
    with pytest.raises(ValueError, match="built-in task"):
        load_task("arithmetic", prompts_file=pf)
    with pytest.raises(ValueError, match="not a built-in task"):
        load_task("no_such_module_xyz")
    with pytest.raises(FileNotFoundError):
        load_task(str(tmp_path / "missing.py"))
    bad = tmp_path / "noprompts.py"
    bad.write_text("def reward(p, c):\n    return 'high'\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_task(str(bad))
    with pytest.raises(TypeError, match="not a number"):
        load_task(str(bad), prompts_file=pf).reward("p", "c")


def test_sft_record_renders_in_thinking_mode():
    p = Arithmetic().sample(random.Random(0))
    rec = p.sft_record()
    assert rec["thinking"] is True and rec["messages"][-1]["content"] == p.answer
    assert rec["messages"][-1]["reasoning_content"] == p.reasoning
