"""The post-training commands end to end on a tiny model: `dsv3 grpo` and `dsv3 experiment post-train`."""

from __future__ import annotations

import json

import pytest
from post_fixtures import tiny_chat_model

from dsv3.cli import main


def test_cli_grpo_and_demo(tmp_path, capsys):
    base, _ = tiny_chat_model(tmp_path / "base", seed=5, head_scale=10.0)
    assert main(["grpo", "--model", str(base), "--task", "sort", "--out", str(tmp_path / "g"), "--steps", "1",
                 "--prompts-per-step", "1", "--group-size", "2", "--max-new-tokens", "3", "--eval-problems", "2",
                 "--save-every", "0", "--no-progress"]) == 0
    assert "greedy acc" in capsys.readouterr().out
    evals = [json.loads(ln) for ln in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()
             if '"kind": "eval"' in ln]
    assert [e["step"] for e in evals] == [0, 1]
    with pytest.raises(SystemExit):
        main(["grpo", "--model", str(base), "--group-size", "1", "--out", str(tmp_path / "g1"), "--no-progress"])
    assert "group_size must be >= 2" in capsys.readouterr().err

    out = tmp_path / "demo"
    assert main(["experiment", "post-train", "--base", str(base), "--out", str(out), "--sft-examples", "12",
                 "--sft-steps", "1", "--grpo-steps", "1", "--grpo-prompts", "1", "--grpo-group", "2",
                 "--eval-problems", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "after SFT" in text and "after GRPO" in text
    r = json.loads((out / "post_train_results.json").read_text())
    assert set(r["accuracy"]) == {"base", "sft", "grpo"}
    assert (out / "sft" / "final" / "config.json").is_file() and (out / "grpo" / "final" / "config.json").is_file()
    with pytest.raises(SystemExit):
        main(["experiment", "post-train", "--base", str(tmp_path / "nothing"), "--out", str(out)])
    assert "make demo" in capsys.readouterr().err
