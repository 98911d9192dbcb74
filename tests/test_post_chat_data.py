"""Chat SFT data: assistant-only loss masks, packing, resumable batches, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from post_fixtures import tiny_tokenizer

from dsv3.post.chat_data import (ChatDataError, Example, RowBatches, pack, read_chat_jsonl, render_example,
                                 split_examples)

EOS = "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def masked_runs(tok, ids, mask) -> list[str]:
    """Decoded maximal runs of masked-in tokens (an independent reading of the mask)."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


TOOL_CONV = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!", "reasoning_content": "dropped from history"},
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": "Let me check.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."},
]}


def test_assistant_only_mask_with_tool_calls(tok):
    ex = render_example(tok, TOOL_CONV)
    assert len(ex.ids) == len(ex.mask)
    # Spelled out by hand from the chat format (DESIGN.md): what the assistant generates, nothing else.
    assert masked_runs(tok, ex.ids, ex.mask) == [
        "Hello!" + EOS,
        "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        "```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>" + EOS,
        "It is sunny." + EOS,
    ]
    unmasked = tok.decode([i for i, m in zip(ex.ids, ex.mask) if not m])
    assert unmasked == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜></think><｜User｜>Weather?"
                        "<｜Assistant｜></think><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny"
                        "<｜tool▁output▁end｜><｜tool▁outputs▁end｜><｜Assistant｜></think>")
    # the whole sequence is the chat template's rendering
    assert tok.decode(ex.ids) == tok.render_chat_text(TOOL_CONV["messages"], add_generation_prompt=False)


def test_thinking_mask_covers_reasoning_not_the_opening_tag(tok):
    record = {"messages": [{"role": "user", "content": "What is 2 + 3?"},
                           {"role": "assistant", "reasoning_content": "2 + 3 = 5", "content": "5"}]}
    ex = render_example(tok, record)          # thinking inferred from the reasoning
    assert masked_runs(tok, ex.ids, ex.mask) == ["2 + 3 = 5</think>5" + EOS]
    assert tok.decode(ex.ids).endswith("<｜Assistant｜><think>2 + 3 = 5</think>5" + EOS)
    no_think = render_example(tok, {**record, "thinking": False})
    assert masked_runs(tok, no_think.ids, no_think.mask) == ["5" + EOS]


def test_pack_keeps_examples_whole_and_shifts_the_mask(tok):
    exs = [Example(list(range(3, 3 + n)), [j % 2 == 1 for j in range(n)]) for n in (5, 7, 3, 9, 4)]
    seq_len = 11                                            # rows of 12 tokens
    packed = pack(exs, seq_len, pad_id=tok.pad_id)
    assert packed.tokens.shape[1] == seq_len + 1 and packed.targets_mask.shape[1] == seq_len
    # greedy: [5, 7] | [3, 9]? 3+9 = 12 fits | [4]
    assert packed.tokens.shape[0] == 3
    at = {0: 0, 1: 0, 2: 0}
    placement = [(0, 0), (0, 5), (1, 0), (1, 3), (2, 0)]
    for ex, (r, start) in zip(exs, placement):
        n = len(ex)
        assert packed.tokens[r, start:start + n].tolist() == ex.ids
        for j in range(1, n):                               # token j is the target of input j - 1
            assert bool(packed.targets_mask[r, start + j - 1]) == ex.mask[j]
        at[r] = start + n
    for r, end in at.items():                               # padding never carries loss
        assert (packed.tokens[r, end:] == tok.pad_id).all()
        assert not packed.targets_mask[r, max(end - 1, 0):].any()
    assert packed.num_target_tokens == sum(sum(ex.mask[1:]) for ex in exs)


def test_pack_truncates_long_examples(tok):
    packed = pack([Example(list(range(3, 23)), [True] * 20)], seq_len=7, pad_id=tok.pad_id)
    assert packed.num_truncated == 1 and packed.tokens[0].tolist() == list(range(3, 11))


def test_row_batches_resume_exactly(tok):
    exs = [Example([0] + [5 + i] * (2 + i % 4), [False] + [True] * (2 + i % 4)) for i in range(13)]
    packed = pack(exs, seq_len=6, pad_id=tok.pad_id)
    a = RowBatches(packed, batch_size=3, seed=7)
    for _ in range(4):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))          # survives JSON
    expected = [next(a)["tokens"] for _ in range(5)]
    b = RowBatches(packed, batch_size=3, seed=0)
    b.load_state_dict(state)
    for want in expected:
        assert torch.equal(next(b)["tokens"], want)
    other = pack(exs[:-3], seq_len=6, pad_id=tok.pad_id)
    with pytest.raises(ChatDataError, match="packed rows"):
        RowBatches(other, 3).load_state_dict(state)


def test_split_is_stable_and_never_empty(tok):
    exs = [Example([0, 1], [False, True], source=f"rec{i}") for i in range(200)]
    train, val = split_examples(exs, 0.1)
    assert 5 < len(val) < 40 and len(train) + len(val) == 200
    assert [e.source for e in split_examples(exs, 0.1)[1]] == [e.source for e in val]
    train1, val1 = split_examples(exs[:1], 1.0)
    assert len(train1) == 1 and val1 == []


def test_read_jsonl_errors_name_file_and_line(tok, tmp_path):
    f = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    f.write_text(good + "\n\n{not json\n")
    with pytest.raises(ChatDataError, match=r"chat.jsonl:3: malformed JSON"):
        read_chat_jsonl(f, tok)
    f.write_text(good + "\n" + json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n")
    with pytest.raises(ChatDataError, match=r"chat.jsonl:2: no assistant message"):
        read_chat_jsonl(f, tok)
    f.write_text(json.dumps({"text": "plain"}) + "\n")
    with pytest.raises(ChatDataError, match=r"chat.jsonl:1: record needs a non-empty 'messages'"):
        read_chat_jsonl(f, tok)
    f.write_text(json.dumps({"messages": [{"role": "narrator", "content": "x"},
                                          {"role": "assistant", "content": "b"}]}) + "\n")
    with pytest.raises(ChatDataError, match="unknown message role 'narrator'"):
        read_chat_jsonl(f, tok)
    with pytest.raises(ChatDataError, match="no such chat data file"):
        read_chat_jsonl(tmp_path / "missing.jsonl", tok)


def test_teacher_records_use_the_teacher_tokens(tok):
    rec = {"messages": [], "teacher": {"prompt_ids": [0, 5, 6], "completion_ids": [7, 8, 1],
                                       "top_logprobs": [[[7, -0.1], [9, -2.5]], [[8, -0.2]], [[1, -0.3]]],
                                       "tokenizer_fingerprint": tok.fingerprint()}}
    ex = render_example(tok, rec)
    assert ex.ids == [0, 5, 6, 7, 8, 1] and ex.mask == [False] * 3 + [True] * 3
    assert ex.teacher[3] == ([7, 9], [-0.1, -2.5]) and set(ex.teacher) == {3, 4, 5}
    packed = pack([ex], seq_len=8, pad_id=tok.pad_id)
    # target index 2 predicts token 3 (the first completion token): its teacher row is there
    assert packed.teacher_valid[0].tolist()[:6] == [False, False, True, True, True, False]
    assert packed.teacher_ids[0, 2].tolist() == [7, 9] and packed.teacher_logprobs[0, 3, 1] == float("-inf")
    with pytest.raises(ChatDataError, match="different tokenizer"):
        render_example(tok, {"teacher": {**rec["teacher"], "tokenizer_fingerprint": "0" * 64}})
