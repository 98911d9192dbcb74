"""Distillation: the teacher's tokens and top-k log-probs are right, and the data trains in `dsv3 sft`."""

from __future__ import annotations

import json

import pytest
import torch
from post_fixtures import tiny_chat_model

from dsv3.checkpoint import load_pretrained
from dsv3.cli import main
from dsv3.post.chat_data import pack, read_chat_jsonl
from dsv3.post.distill import distill, read_conversations, reply_message


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("distill") / "teacher", seed=2, head_scale=10.0)


def test_teacher_logprobs_match_its_training_forward_and_round_trip(teacher, tmp_path):
    path, tok = teacher
    convs = [[{"role": "user", "content": "What is 2 + 3?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: 3 1 2"}]]
    out = tmp_path / "data.jsonl"
    s = distill(path, convs, out, thinking=True, max_new_tokens=6, temperature=1.0, top_logprobs=3,
                seed=0, keep_truncated=True)
    assert s["written"] == 2
    records = [json.loads(ln) for ln in out.read_text().splitlines()]
    model = load_pretrained(path)
    for conv, rec in zip(convs, records):
        t = rec["teacher"]
        assert t["prompt_ids"] == tok.render_chat(conv, add_generation_prompt=True, thinking=True)
        assert len(t["top_logprobs"]) == len(t["completion_ids"]) and all(len(r) == 3 for r in t["top_logprobs"])
        # independent: the training forward's log-softmax at the position before each completion token
        ids = torch.tensor([t["prompt_ids"] + t["completion_ids"]])
        with torch.no_grad():
            logp = model(ids[:, :-1])[0].double().log_softmax(-1)
        for j, row in enumerate(t["top_logprobs"]):
            want = logp[len(t["prompt_ids"]) - 1 + j].topk(3)
            assert [i for i, _ in row] == want.indices.tolist()
            assert [lp for _, lp in row] == pytest.approx(want.values.tolist(), abs=1e-4)
        assert rec["messages"][:-1] == conv and rec["messages"][-1]["role"] == "assistant"
    # round trip: SFT examples are exactly the teacher's tokens, with the teacher rows on the completion
    examples = read_chat_jsonl(out, tok)
    for ex, rec in zip(examples, records):
        t = rec["teacher"]
        assert ex.ids == t["prompt_ids"] + t["completion_ids"]
        assert sum(ex.mask) == len(t["completion_ids"]) and len(ex.teacher) == len(t["completion_ids"])
    packed = pack(examples, seq_len=64, pad_id=tok.pad_id)
    assert int((packed.teacher_valid & packed.targets_mask).sum()) == sum(len(r["teacher"]["completion_ids"])
                                                                         for r in records)


def test_reply_message_splits_reasoning_and_tool_calls():
    text = ("think hard</think>Calling.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n"
            "```json\n{\"a\": 1}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
    msg = reply_message(text, thinking=True)
    assert msg == {"role": "assistant", "content": "Calling.", "reasoning_content": "think hard",
                   "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}
    assert reply_message("plain", thinking=False) == {"role": "assistant", "content": "plain"}


def test_read_conversations(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text('hello\n{"prompt": "hi"}\n{"messages": [{"role": "user", "content": "yo"}]}\n\n')
    assert read_conversations(f) == [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "hi"}],
                                     [{"role": "user", "content": "yo"}]]
    f.write_text('{"messages": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(ValueError, match="p.txt:1: the conversation must end with a user"):
        read_conversations(f)


def test_cli_distill_into_sft_with_kl(teacher, tmp_path, capsys):
    path, _ = teacher
    data = tmp_path / "d.jsonl"
    assert main(["distill", "--teacher", str(path), "--task", "arithmetic", "--num", "6", "--out", str(data),
                 "--think", "--max-tokens", "5", "--top-logprobs", "4", "--keep-truncated"]) == 0
    assert "6 records" in capsys.readouterr().out
    run = tmp_path / "student"
    assert main(["sft", "--model", str(path), "--data", str(data), "--out", str(run), "--max-steps", "2",
                 "--batch-size", "2", "--seq-len", "48", "--val-fraction", "0", "--save-every", "0",
                 "--no-progress"]) == 0
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["distill_kl"] > 0 for r in recs if "kind" not in r)
    assert (run / "final" / "model.safetensors").is_file()
