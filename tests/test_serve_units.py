"""The server's parts in-process: the engine's logits-processor hook, xgrammar constraints on a random
model (the output must parse and validate whatever the model prefers), and the incremental reply
parser (reasoning / content / tool calls, however the tokens are grouped into steps)."""

from __future__ import annotations

import json
import random
import re
import time

import pytest
import torch
from conftest import far_from_ties_, tiny_config
from pydantic import BaseModel, Field

import dsv3
from dsv3.engine import LLM, SamplingParams
from dsv3.engine.sequence import Sequence
from dsv3.serve.grammar import BanTokens, GrammarBackend
from dsv3.serve.protocol import APIError, ChatCompletionRequest, parse_body
from dsv3.serve.tools import ChatOutputParser, check_tools, tool_choice_of
from dsv3.tokenizer import (EOS_TOKEN, THINK_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END,
                            TOOL_SEP, parse_tool_calls, train_tokenizer)

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = ("the engine reads a prompt and writes one token at a time {\"key\": [1, 2.5, true, null]}\n" * 40
        + "def step(self, batch):\n    return batch\n" * 20)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([TEXT], vocab_size=320)


@pytest.fixture(scope="module")
def llm(tok):
    cfg = tiny_config(vocab_size=tok.vocab_size + 8, max_position_embeddings=2048)   # padded vocab, like V2/V3
    torch.manual_seed(0)
    model = far_from_ties_(dsv3.Transformer(cfg))
    return LLM(model, tokenizer=tok, max_model_len=2048, max_num_seqs=8)


@pytest.fixture(scope="module")
def grammar(tok, llm):
    return GrammarBackend(tok, llm.config.vocab_size)


class Item(BaseModel):
    name: str = Field(max_length=10)
    count: int = Field(ge=0, le=99)
    tags: list[str] = Field(max_length=3)
    ok: bool


ITEM_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10}, "count": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3}, "ok": {"type": "boolean"}},
    "required": ["name", "count", "tags", "ok"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "make_item", "parameters": ITEM_SCHEMA}},
         {"type": "function", "function": {"name": "ping", "parameters": {
             "type": "object", "properties": {"host": {"type": "string", "maxLength": 6}}, "required": ["host"]}}}]


# ------------------------------------------------------------------------------------ engine hook
def test_logits_processor_restricts_tokens(llm):
    allowed = [40, 41, 42]

    def only(output_ids, logits):
        keep = torch.full_like(logits, float("-inf"))
        keep[allowed] = logits[allowed]
        return keep

    prompt = [llm.tokenizer.bos_id] + llm.tokenizer.encode("the engine")
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6))[0]
    outs = llm.generate([prompt, prompt], [SamplingParams(temperature=0, max_tokens=6, logits_processors=[only]),
                                           SamplingParams(temperature=0, max_tokens=6)])
    assert set(outs[0].token_ids) <= set(allowed) and len(outs[0].token_ids) == 6
    assert outs[1].token_ids == plain.token_ids            # its batch neighbour is untouched
    banned = plain.token_ids[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, logits_processors=[BanTokens([banned])]))
    assert out[0].token_ids[0] != banned


def test_processors_switch_off_speculation(tok, llm):
    spec = LLM(llm.model, tokenizer=tok, max_model_len=256, max_num_seqs=2, speculative="mtp")
    seen = []

    def spy(output_ids, logits):
        seen.append(len(output_ids))
        return logits

    spec.generate([[tok.bos_id, 50, 51]], SamplingParams(temperature=0, max_tokens=5, logits_processors=[spy]))
    assert spec.spec_stats["drafted"] == 0 and seen == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------ grammars
@pytest.mark.parametrize("seed", range(4))
def test_json_schema_output_validates(llm, grammar, seed):
    prompt = [llm.tokenizer.bos_id] + llm.tokenizer.encode("the engine")
    c = grammar.json_constraint(ITEM_SCHEMA)
    out = llm.generate([prompt], SamplingParams(temperature=1.5, seed=seed, max_tokens=150,
                                                logits_processors=[c]))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == llm.tokenizer.eos_id and not c.failed
    text = llm.tokenizer.decode(out.token_ids[:-1])
    Item.model_validate(json.loads(text))                   # strict json, then pydantic's validation


def test_json_object_and_bad_schema(llm, grammar):
    prompt = [llm.tokenizer.bos_id] + llm.tokenizer.encode("def")
    for seed in range(2):
        out = llm.generate([prompt], SamplingParams(temperature=1.0, seed=seed, max_tokens=120,
                                                    logits_processors=[grammar.json_constraint(None)]))[0]
        text = llm.tokenizer.decode([t for t in out.token_ids if t != llm.tokenizer.eos_id])
        if out.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert text.startswith("{")
    with pytest.raises(APIError, match="schema"):
        grammar.json_constraint({"type": "object", "properties": {"a": {"type": "no-such-type"}}})


@pytest.mark.parametrize("thinking", [False, True])
def test_forced_tool_calls_parse_and_validate(llm, grammar, tok, thinking):
    prompt = tok.render_chat([{"role": "user", "content": "go"}], thinking=thinking, tools=TOOLS)
    think_end = tok.token_id(THINK_END)

    def end_thinking_at_3(output_ids, logits):      # a model that reasons for three tokens
        if len(output_ids) != 3:
            return logits
        return torch.full_like(logits, float("-inf")).index_fill(0, torch.tensor([think_end]), 0.0)

    for seed in range(2):
        c = grammar.tool_constraint(TOOLS, parallel=True, thinking=thinking, max_calls=3)
        procs = [end_thinking_at_3, c] if thinking else [c]
        out = llm.generate([prompt], SamplingParams(temperature=1.0, seed=seed, max_tokens=300,
                                                    logits_processors=procs))[0]
        text = tok.decode(out.token_ids)
        if thinking:
            assert out.token_ids[3] == think_end and tok.eos_id not in out.token_ids[:3]
            text = tok.decode(out.token_ids[4:])
        assert out.finish_reason == "stop" and not c.failed
        assert text.startswith(TOOL_CALLS_BEGIN) and text.endswith(TOOL_CALLS_END + EOS_TOKEN)
        content, calls = parse_tool_calls(text)
        assert content == "" and 1 <= len(calls) <= 3
        for call in calls:
            args = json.loads(call["arguments"])
            if call["name"] == "make_item":
                Item.model_validate(args)
            else:
                assert call["name"] == "ping" and set(args) == {"host"} and len(args["host"]) <= 6


def test_named_tool_without_parallel_calls_once(llm, grammar, tok):
    prompt = tok.render_chat([{"role": "user", "content": "go"}], tools=TOOLS)
    c = grammar.tool_constraint([TOOLS[1]], parallel=False)
    out = llm.generate([prompt], SamplingParams(temperature=1.0, seed=0, max_tokens=200, logits_processors=[c]))[0]
    _, calls = parse_tool_calls(tok.decode(out.token_ids))
    assert [c["name"] for c in calls] == ["ping"]


# ------------------------------------------------------------------------------------ reply parser
def _reply_ids(tok, reasoning: str, content: str, calls: list[tuple[str, str]]) -> list[int]:
    ids = tok.encode(reasoning) + [tok.token_id(THINK_END)] + tok.encode(content)
    if calls:
        ids.append(tok.token_id(TOOL_CALLS_BEGIN))
        for name, args in calls:
            ids += [tok.token_id(TOOL_CALL_BEGIN), *tok.encode("function"), tok.token_id(TOOL_SEP),
                    *tok.encode(f"{name}\n```json\n{args}\n```"), tok.token_id(TOOL_CALL_END)]
        ids.append(tok.token_id(TOOL_CALLS_END))
    return ids + [tok.eos_id]


def _feed(parser, ids, cuts, stop_cut=None):
    reasoning = content = ""
    calls = []
    bounds = [0, *cuts, len(ids)]
    for a, b in zip(bounds, bounds[1:]):
        d = parser.update(ids[:b], final=b == len(ids), cut=stop_cut if b == len(ids) else None)
        reasoning += d.reasoning
        content += d.content
        calls += d.tool_calls
    return reasoning, content, calls


def test_parser_any_chunking(tok):
    calls = [("make_item", '{"name": "é", "count": 3}'), ("ping", '{"host": "a.b"}')]
    ids = _reply_ids(tok, "let me think ✓", "calling now", calls)
    rng = random.Random(0)
    groupings = [list(range(1, len(ids))), []]              # token by token; everything in one step
    groupings += [sorted(rng.sample(range(1, len(ids)), k)) for k in (2, 5, 9)]
    for cuts in groupings:
        parser = ChatOutputParser(tok, thinking=True, tool_names=["make_item", "ping"])
        reasoning, content, got = _feed(parser, ids, cuts)
        assert reasoning == "let me think ✓" and content == "calling now"
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in got] == calls
        assert [c["index"] for c in got] == [0, 1] and len({c["id"] for c in got}) == 2


def _engine_stop(tok, ids, stops, prompt_len=1):
    """The ids the engine emits and its stop_text_len, as LLM runs them (Sequence.match_stop)."""
    seq = Sequence(0, [tok.bos_id] * prompt_len, SamplingParams(stop=stops))
    for i in ids:
        seq.output.append(i)
        if seq.match_stop(tok):
            break
    return seq.output, seq.stop_text_len


def test_parser_stop_string_is_never_streamed(tok):
    """The engine finds the stop string; the parser cuts where it says and, while streaming, holds
    back the text that could still begin one."""
    ids, cut = _engine_stop(tok, tok.encode("the engine reads STOP and writes") + [tok.eos_id], ["STOP", "zzz"])
    for cuts in (list(range(1, len(ids))), []):
        parser = ChatOutputParser(tok, stop=["STOP", "zzz"])
        _, content, _ = _feed(parser, ids, cuts, cut)
        assert content == "the engine reads " and parser.stopped


def test_parser_stop_string_after_reasoning_and_in_a_tool_call(tok):
    """With thinking, the engine's text is reasoning then content: a cut in the content keeps the
    reasoning whole; a stop string inside a tool-call block leaves the calls completed before it."""
    ids = tok.encode("let me think") + [tok.token_id(THINK_END)] + tok.encode("the engine reads STOP and writes")
    ids, cut = _engine_stop(tok, ids, ["STOP"])
    for cuts in (list(range(1, len(ids))), []):
        parser = ChatOutputParser(tok, thinking=True, stop=["STOP"])
        reasoning, content, _ = _feed(parser, ids, cuts, cut)
        assert (reasoning, content) == ("let me think", "the engine reads ") and parser.stopped
    calls = [("ping", '{"host": "a.b"}'), ("ping", '{"host": "STOP"}')]
    ids, cut = _engine_stop(tok, _reply_ids(tok, "", "calling", calls), ["STOP"])
    parser = ChatOutputParser(tok, tool_names=["ping"], stop=["STOP"])
    _, content, got = _feed(parser, ids, list(range(1, len(ids))), cut)
    assert content == "calling" and [c["function"]["arguments"] for c in got] == ['{"host": "a.b"}']


def test_parser_plain_text_with_partial_utf8(tok):
    ids = tok.encode("naïve ✓ café")                        # byte-level: multi-byte chars span tokens
    parser = ChatOutputParser(tok)
    _, content, _ = _feed(parser, ids, list(range(1, len(ids))))
    assert content == "naïve ✓ café"


# ------------------------------------------------------------------------------------ request checks
def test_request_validation_names_the_field():
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert parse_body(json.dumps(body).encode(), ChatCompletionRequest).n == 1
    for bad, field in [({"n": "2"}, "n"), ({"top_p": 0}, "top_p"), ({"stop": [1]}, "stop"),
                       ({"presence_penalty": -3}, "presence_penalty"), ({"messages": []}, "messages")]:
        with pytest.raises(APIError) as e:
            parse_body(json.dumps({**body, **bad}).encode(), ChatCompletionRequest)
        assert e.value.status == 400 and e.value.param == field and field in e.value.message
    with pytest.raises(APIError, match="name must match"):
        check_tools([{"type": "function", "function": {"name": "bad name"}}])
    with pytest.raises(APIError, match="not in tools"):
        tool_choice_of({"type": "function", "function": {"name": "other"}}, check_tools(TOOLS))


# ------------------------------------------------------------------------------------ CLI and bench helpers
def test_serve_cli_user_errors(tmp_path, capsys):
    from dsv3.cli import main
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", str(tmp_path / "missing")])
    assert e.value.code == 2 and "no such model directory" in capsys.readouterr().err


def test_bench_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    from dsv3.bench.serve import _percentile
    rng = random.Random(1)
    for n in (1, 2, 7, 64):
        xs = [rng.random() for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert _percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert _percentile([], 50) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_json_constraint_on_cuda(llm, tok):
    cuda = LLM(llm.model.to("cuda"), tokenizer=tok, max_model_len=512, max_num_seqs=2)
    try:
        backend = GrammarBackend(tok, cuda.config.vocab_size)
        params = SamplingParams(temperature=1.0, seed=0, max_tokens=150,
                                logits_processors=[backend.json_constraint(ITEM_SCHEMA)])
        out = cuda.generate([[tok.bos_id, 40, 41]], params)
        assert out[0].finish_reason == "stop"
        Item.model_validate(json.loads(tok.decode(out[0].token_ids[:-1])))
    finally:
        llm.model.to("cpu")


@pytest.mark.parametrize("thinking", [False, True])
def test_unbounded_schemas_still_finish_within_max_tokens(llm, grammar, tok, thinking):
    """No maxLength anywhere: a random model would write strings for ever; the budget steering ends them."""
    schema = {"type": "object", "properties": {"text": {"type": "string"}, "more": {"type": "array",
              "items": {"type": "string"}}}, "required": ["text", "more"]}
    tools = [{"type": "function", "function": {"name": "note", "parameters": schema}}]
    prompt = tok.render_chat([{"role": "user", "content": "go"}], thinking=thinking, tools=tools)
    for seed in range(2):
        c = grammar.json_constraint(schema, thinking, max_tokens=90)
        out = llm.generate([prompt], SamplingParams(temperature=1.0, seed=seed, max_tokens=90,
                                                    logits_processors=[c]))[0]
        text = tok.decode(out.token_ids[:-1])
        assert out.finish_reason == "stop", text
        assert set(json.loads(text.split(THINK_END)[-1])) == {"text", "more"}
        c = grammar.tool_constraint(tools, parallel=True, thinking=thinking, max_tokens=120)
        out = llm.generate([prompt], SamplingParams(temperature=1.0, seed=seed, max_tokens=120,
                                                    logits_processors=[c]))[0]
        text = tok.decode(out.token_ids)
        assert out.finish_reason == "stop", text
        _, calls = parse_tool_calls(text.split(THINK_END)[-1])
        assert calls and all(set(json.loads(x["arguments"])) == {"text", "more"} for x in calls)


# ------------------------------------------------------------------------------------ issue 16: bodies, ids, limits
def _random_json(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 5 or r < 0.4:
        return rng.choice([1, -3, 2.5, "x", "é✓ \u2028", True, False, None, "", 10 ** 20, 1e-7, "\U0001F600"])
    if r < 0.7:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {f"k{i}": _random_json(rng, depth + 1) for i in range(rng.randint(0, 4))}


@pytest.mark.parametrize("c_bytes", [None, 0])
def test_body_parser_matches_json_loads(monkeypatch, c_bytes):
    """Same values as the standard library, whether the C decoder gets the whole body or only the
    values below the Python-parsed top levels (c_bytes=0)."""
    from dsv3.serve import body
    if c_bytes is not None:
        monkeypatch.setattr(body, "C_PARSE_BYTES", c_bytes)
    rng = random.Random(0)
    for _ in range(300):
        value = {"model": "m", "messages": [_random_json(rng) for _ in range(3)], "x": _random_json(rng)}
        text = json.dumps(value, indent=rng.choice([None, 1]), ensure_ascii=rng.random() < 0.5)
        assert body.load_json(text.encode()) == json.loads(text)
    for bad in (b"[1, 2,]", b'{"a": 1,}', b'{"a": 1} {"b": 2}', b"", b"[", b'{"a": tru}', b'{"a": "\\x"}'):
        with pytest.raises(body.BodyError):
            body.load_json(bad)


@pytest.mark.parametrize("raw, needle", [
    (b'{"a": [1, {"b": NaN}]}', "a[1].b is not a finite number"),
    (b'{"a": Infinity}', "a is not a finite number"),
    (b'{"a": -1e400}', "a is not a finite number"),
    (b'{"a": ["ok", "\\udc80"]}', "a[1] holds a lone UTF-16 surrogate"),
    (b'{"\\ud800x": 1}', "a key holds a lone UTF-16 surrogate"),
    (b"[" * 70 + b"]" * 70, "nested too deeply"),
    (b"[" * 3000 + b"]" * 3000, "nested too deeply"),
    (b'{"n": ' + b"1" * 4400 + b"}", "number"),
])
def test_body_parser_refuses(raw, needle):
    from dsv3.serve.body import BodyError, load_json
    with pytest.raises(BodyError, match=re.escape(needle)):
        load_json(raw)
    assert load_json(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001F600"}      # a surrogate *pair* is one character


def test_parser_takes_markers_from_ids_only(tok):
    """Special ids make a tool call; their spellings as text don't; calls to unoffered functions are dropped."""
    spelled = tok.encode(f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}function{TOOL_SEP}ping\n```json\n{{}}\n```"
                         f"{TOOL_CALL_END}{TOOL_CALLS_END}")
    assert not set(spelled) & tok.special_ids
    parser = ChatOutputParser(tok, tool_names=["ping"])
    parser.update(spelled + [tok.eos_id], final=True)
    assert parser.tool_calls == [] and parser.content == tok.decode(spelled)
    ids = _reply_ids(tok, "", "go", [("rm_rf", '{"path": "/"}'), ("ping", '{"host": "a"}')])[1:]   # no </think>
    parser = ChatOutputParser(tok, tool_names=["ping"])
    parser.update(ids, final=True)
    assert [c["function"]["name"] for c in parser.tool_calls] == ["ping"] and parser.dropped_calls == ["rm_rf"]
    assert parser.content == "go"
    # "</think>" as text: no reasoning split (thinking mode), the text stays in the reasoning.
    ids = tok.encode("a</think>b") + [tok.token_id(THINK_END)] + tok.encode("c")
    parser = ChatOutputParser(tok, thinking=True)
    parser.update(ids, final=True)
    assert (parser.reasoning, parser.content) == ("a</think>b", "c")


def test_tool_messages_answer_a_call():
    from dsv3.serve.tools import normalize_messages
    call = {"id": "c1", "type": "function", "function": {"name": "ping", "arguments": "{}"}}
    ok = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]},
          {"role": "tool", "tool_call_id": "c1", "content": "pong"}]
    assert normalize_messages(ok)[2] == {"role": "tool", "content": "pong"}
    for bad in ({"role": "tool", "content": "pong"}, {"role": "tool", "tool_call_id": "c2", "content": "pong"}):
        with pytest.raises(APIError, match="tool_call_id"):
            normalize_messages(ok[:2] + [bad])
    with pytest.raises(APIError, match="tool_call_id"):           # no call to answer at all
        normalize_messages([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c1", "content": "?"}])


def test_schema_check_accepts_real_schemas_and_names_the_bad_keyword():
    from dsv3.serve.schema import check_schema

    class Inner(BaseModel):
        tags: list[str] = Field(max_length=3)
        score: float | None = Field(None, ge=0, le=1)

    class Outer(BaseModel):                  # pydantic writes the schema: $defs, $ref, anyOf, null types
        name: str = Field(pattern="^[a-z]+$")
        inner: Inner
        items: list[Inner] = []

    for schema in (ITEM_SCHEMA, Outer.model_json_schema(), TOOLS[1]["function"]["parameters"], {}, True):
        check_schema(schema, "s", "tools")
    for bad, where in [({"type": "strin"}, "s is not"), ({"properties": {"a": {"type": 5}}}, "s.properties.a"),
                       ({"items": {"minLength": -1}}, "s.items"), ({"anyOf": []}, "anyOf"),
                       ({"required": "a"}, "required"), ({"$defs": {"x": {"enum": []}}}, "s.$defs.x"),
                       ({"allOf": [{"maximum": "3"}]}, "s.allOf[0]"), ([1], "s must be")]:
        with pytest.raises(APIError, match=re.escape(where)):
            check_schema(bad, "s", "tools")


def test_sampling_params_come_from_requests_by_field_name():
    """Issue 15's rule: every SamplingParams field is either a same-named request field or set by the
    server itself (with the reason), so a new sampling parameter can't be silently dropped."""
    import dataclasses

    from dsv3.serve.prepare import SAMPLED_BY_NAME, SERVER_SET, sampling_fields
    from dsv3.serve.protocol import CompletionRequest, ResponsesRequest
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    assert SERVER_SET.keys() <= names and all(isinstance(why, str) and why for why in SERVER_SET.values())
    assert SAMPLED_BY_NAME == names - SERVER_SET.keys()
    for model in (ChatCompletionRequest, CompletionRequest, ResponsesRequest):
        missing = names - SERVER_SET.keys() - set(model.model_fields)
        assert not missing, f"{model.__name__} lacks {missing}"
    req = parse_body(json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_k": 5,
                                 "logit_bias": {"7": -2}, "ignore_eos": True}).encode(), ChatCompletionRequest)
    assert sampling_fields(req) == {"top_k": 5, "logit_bias": {7: -2.0}, "ignore_eos": True}
    resp = parse_body(b'{"model": "m", "input": "x", "temperature": 0.5, "top_p": 0.9}', ResponsesRequest)
    assert sampling_fields(resp) == {"temperature": 0.5, "top_p": 0.9, "ignore_eos": False}


def test_every_sampled_field_reaches_the_engine(llm):
    """Each SamplingParams field taken by name, set in a chat, completions or Responses request, is in
    the SamplingParams the engine gets."""
    from dsv3.serve.limits import Limits
    from dsv3.serve.prepare import SAMPLED_BY_NAME, Preparer
    from dsv3.serve.protocol import ResponsesRequest
    from dsv3.serve.responses import chat_spec
    values = {"temperature": 0.5, "top_k": 2, "top_p": 0.5, "min_p": 0.25, "presence_penalty": 1.0,
              "frequency_penalty": -1.0, "repetition_penalty": 1.5, "ignore_eos": True, "logit_bias": {"3": 1.5}}
    assert set(values) == SAMPLED_BY_NAME, f"give {SAMPLED_BY_NAME ^ set(values)} a request value here"
    prep = Preparer(llm, "m", Limits())
    try:
        chat = prep.chat_request(json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                             "max_tokens": 4, **values}).encode())[1]
        comp = prep.completion_request(json.dumps({"model": "m", "prompt": "x", "max_tokens": 4, **values}).encode())[1]
        resp = prep.chat_job(chat_spec(parse_body(json.dumps({"model": "m", "input": "x", "max_output_tokens": 4,
                                                               **values}).encode(), ResponsesRequest)))
    finally:
        prep.close()
    for job in (chat, comp, resp):
        for name, value in values.items():
            assert getattr(job.params[0], name) == ({3: 1.5} if name == "logit_bias" else value), name


def test_logit_bias_in_sampling_matches_a_hand_computation():
    from dsv3.engine.sampling import probs_after_processing, sample
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    bias = {3: 5.0, 10: -100.0, 49: 2.5}
    greedy = SamplingParams(temperature=0, logit_bias=bias)
    hot = SamplingParams(temperature=0.7, logit_bias=bias)
    plain = SamplingParams(temperature=0)
    by_hand = logits.clone()
    for tok, b in bias.items():
        by_hand[:, tok] += b
    out = sample(logits, [greedy, plain, greedy], [None] * 3)
    assert out.token_ids.tolist() == [int(by_hand[0].argmax()), int(logits[1].argmax()), int(by_hand[2].argmax())]
    probs = probs_after_processing(logits, [hot, plain, hot])
    torch.testing.assert_close(probs[0], (by_hand[0] / 0.7).softmax(-1))
    assert float(probs[0, 10]) < 1e-30
    with pytest.raises(ValueError, match="vocabulary"):
        sample(logits, [SamplingParams(temperature=0, logit_bias={50: 1.0})] * 3, [None] * 3)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: float("nan")})


def test_grammar_budget_cache_and_forked_compiles(llm, tok):
    """Compiled in a forked child: a schema over the time budget is killed (400 naming the limit), the
    result of a normal one constrains decoding as an in-process compile does, the cache is bounded
    by bytes and a bad schema is remembered."""
    backend = GrammarBackend(tok, llm.config.vocab_size, compile_timeout=1.0, cache_bytes=200_000)
    slow = {"type": "object", "properties": {"v": {"enum": [f"value_{i}_x" for i in range(20_000)]}}}
    t = time.monotonic()
    with pytest.raises(APIError, match="--grammar-timeout") as e:
        backend.json_grammar(slow)
    assert e.value.code == "limit_exceeded" and time.monotonic() - t < 5
    c = backend.json_constraint(ITEM_SCHEMA)
    prompt = [tok.bos_id] + tok.encode("the engine")
    out = llm.generate([prompt], SamplingParams(temperature=1.5, seed=3, max_tokens=150, logits_processors=[c]))[0]
    Item.model_validate(json.loads(tok.decode(out.token_ids[:-1])))
    for i in range(6):
        backend.json_grammar({"type": "object", "properties": {f"k{j}": {"type": "integer"} for j in range(i + 1)}})
        assert backend.cached_bytes <= 200_000
    before = backend.compiles
    backend.json_grammar(ITEM_SCHEMA)               # recent enough to still be cached... or compiled once more
    for _ in range(2):
        with pytest.raises(APIError, match="schema"):
            backend.json_grammar({"type": "object", "properties": {"a": {"type": "no-such-type"}}})
    assert backend.compiles - before <= 2                      # the bad schema was compiled once


def test_long_texts_encode_the_same_without_the_gil(tok):
    from dsv3.tokenizer import USER_TOKEN
    text = ("the engine reads a prompt " + USER_TOKEN + " naïve ✓ ") * 400
    assert len(text) > 4096
    ids = tok.encode(text)
    assert ids == tok.backend.encode(text, add_special_tokens=False).ids and not set(ids) & tok.special_ids


def test_responses_input_becomes_a_chat():
    from dsv3.serve.protocol import ResponsesRequest
    from dsv3.serve.responses import chat_spec
    req = ResponsesRequest.model_validate({"model": "m", "instructions": "be brief", "reasoning": {"effort": "low"},
                                           "text": {"format": {"type": "json_schema", "name": "a", "schema": {}}},
                                           "tools": [{"type": "function", "name": "ping", "parameters": {}}],
                                           "tool_choice": {"type": "function", "name": "ping"}, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "calling"}]},
        {"type": "function_call", "call_id": "c1", "name": "ping", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "ping", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "pong"}]})
    spec = chat_spec(req)
    assert [m["role"] for m in spec.messages] == ["system", "user", "assistant", "tool"]
    assistant = spec.messages[2]
    assert assistant["reasoning_content"] == "hm" and [c["id"] for c in assistant["tool_calls"]] == ["c1", "c2"]
    assert spec.thinking is True and spec.tools[0]["function"]["name"] == "ping"
    assert spec.tool_choice == {"type": "function", "function": {"name": "ping"}}
    assert spec.response_format["type"] == "json_schema" and spec.max_tokens_param == "max_output_tokens"
    with pytest.raises(APIError, match="web_search"):
        chat_spec(ResponsesRequest.model_validate({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}))


def test_limit_flags_come_from_the_dataclass():
    import argparse
    from dataclasses import fields

    from dsv3.cli.serve import add_limit_args, limits_of
    from dsv3.serve.limits import Limits
    p = argparse.ArgumentParser()
    add_limit_args(p)
    assert limits_of(p.parse_args([])) == Limits()
    args = p.parse_args(["--max-messages", "7", "--grammar-timeout", "0.5"])
    assert limits_of(args).max_messages == 7 and limits_of(args).grammar_timeout == 0.5
    assert set(vars(p.parse_args([]))) == {f.name for f in fields(Limits)}
    with pytest.raises(SystemExit):
        p.parse_args(["--body-timeout", "0"])


def test_big_replies_encode_in_pieces_to_the_same_json():
    from dsv3.serve.streaming import dumps_in_pieces
    rng = random.Random(0)
    reply = {"id": "x", "choices": [{"text": "é" * 70_000, "logprobs": {
        "token_logprobs": [None] + [rng.uniform(-9, 0) for _ in range(20_000)],
        "top_logprobs": [None] + [{"a": -0.5, "\u2028b": -1.0}] * 20_000}}], "usage": {"total_tokens": 3}}
    for value in (reply, [reply, {"k": []}], "short", {"small": [1, 2]}):
        assert dumps_in_pieces(value) == json.dumps(value, ensure_ascii=False)
