"""``dsv3 serve`` as a real server process on a loopback port, driven by the official ``openai`` client.

One server per module (a tiny random checkpoint with a ~300-id BPE tokenizer) for the API tests, and
a second small one (API key, queue of one sequence) for authentication, overload and disconnects.
Expected texts come from ``dsv3.LLM`` run in this process on the same checkpoint (greedy), so the
tests check the HTTP layer against the engine, not against stored outputs.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import openai
import pytest
from conftest import CHAT_WORDS, chat_checkpoint
from pydantic import BaseModel, Field
from serve_helpers import launch, stop, wait_up

from dsv3.engine import LLM, SamplingParams
from dsv3.tokenizer import THINK_END

CONTEXT = 1024
API_KEY = "sk-test-123"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return chat_checkpoint(tmp_path_factory.mktemp("serve-ckpt"), max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def launched(model_dir):
    """Both servers start together (their start-up is mostly imports; overlapping them saves time)."""
    main = launch(model_dir, "--max-queue", "128", "--max-num-seqs", "64", "--served-model-name", "tiny")
    # API key from the environment, one sequence at a time, a queue of one, thinking by default.
    small = launch(model_dir, "--max-queue", "1", "--max-num-seqs", "1", "--reasoning",
                   env={"DSV3_API_KEY": API_KEY})
    try:
        yield main, small
    finally:
        stop(main[0], small[0])


@pytest.fixture(scope="module")
def server(launched):
    return wait_up(*launched[0])


@pytest.fixture(scope="module")
def small_server(launched):
    return wait_up(*launched[1])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, max_model_len=CONTEXT, max_num_seqs=64)


def _expected(llm, prompts: list[list[int]], max_tokens: int, **kw) -> list:
    return llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, **kw))


def _metrics(base: str, headers: dict | None = None) -> dict[str, float]:
    """Prometheus text -> {"name" or "name{labels}": value}."""
    text = httpx.get(base + "/metrics", headers=headers or {}).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# ------------------------------------------------------------------------------------ basics
def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    m = _metrics(server)
    assert "dsv3_queue_depth" in m and "dsv3_cache_usage" in m and "dsv3_generation_tokens_per_second" in m


def test_chat_matches_engine_streamed_or_not(client, llm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the engine"}]
    ids = llm.tokenizer.render_chat(messages, add_generation_prompt=True)
    user = llm.tokenizer.token_id("<｜User｜>")
    exp = _expected(llm, [ids], 12, stop_token_ids=(user,), logprobs=2)[0]
    kw = dict(model="tiny", messages=messages, temperature=0, max_tokens=12, logprobs=True, top_logprobs=2)
    r = client.chat.completions.create(**kw)
    text = llm.tokenizer.decode([t for t in exp.token_ids if t not in llm.tokenizer.special_ids])
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == exp.finish_reason
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(exp.token_ids)
    lps = r.choices[0].logprobs.content
    assert [e.logprob for e in lps] == pytest.approx(exp.logprobs, abs=1e-4)
    assert [t.logprob for e in lps for t in e.top_logprobs] == \
        pytest.approx([v for top in exp.top_logprobs for _, v in top], abs=1e-4)
    assert [len(e.top_logprobs) for e in lps] == [2] * len(lps)
    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    streamed_lps = [e.logprob for c in chunks if c.choices and c.choices[0].logprobs
                    for e in c.choices[0].logprobs.content]
    assert streamed_lps == pytest.approx(exp.logprobs, abs=1e-4)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == exp.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_completions_n_seed_logprobs(client, llm):
    exp = _expected(llm, [[llm.tokenizer.bos_id] + llm.tokenizer.encode("def step(")], 6, logprobs=2)[0]
    r = client.completions.create(model="tiny", prompt="def step(", max_tokens=6, temperature=0, logprobs=2)
    assert r.choices[0].text == exp.text
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(exp.logprobs, abs=1e-4)
    assert [len(t) for t in lp.top_logprobs] == [2] * len(exp.token_ids)
    streamed = client.completions.create(model="tiny", prompt="def step(", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == exp.text
    # n samples with a seed: reproducible, and the choices differ from one another.
    kw = dict(model="tiny", prompt="the", max_tokens=8, temperature=1.0, n=3, seed=11)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1 and a.usage.completion_tokens > 3


def test_stop_and_penalties_match_engine(client, llm):
    prompt = [llm.tokenizer.bos_id] + llm.tokenizer.encode("the engine")
    free = _expected(llm, [prompt], 12)[0].text
    stop = next(ch for ch in free[1:] if ch.isascii() and ch.isprintable())   # the greedy reply contains it
    exp = _expected(llm, [prompt], 12, stop=(stop,))[0]
    r = client.completions.create(model="tiny", prompt="the engine", max_tokens=12, temperature=0, stop=stop)
    assert r.choices[0].text == exp.text == free[: free.index(stop)] and r.choices[0].finish_reason == "stop"
    exp = _expected(llm, [prompt], 12, presence_penalty=1.5, frequency_penalty=1.0)[0]
    r = client.completions.create(model="tiny", prompt="the engine", max_tokens=12, temperature=0,
                                  presence_penalty=1.5, frequency_penalty=1.0)
    assert r.choices[0].text == exp.text


def test_fim_suffix_uses_psm(client, llm):
    tok = llm.tokenizer
    prefix, suffix = "def step(self, batch):\n    ", "\n    return batch\n"
    psm = [tok.bos_id, tok.token_id("<｜fim▁begin｜>"), *tok.encode(prefix), tok.token_id("<｜fim▁hole｜>"),
           *tok.encode(suffix), tok.token_id("<｜fim▁end｜>")]
    exp = _expected(llm, [psm], 8)[0]
    r = client.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=8, temperature=0)
    assert r.choices[0].text == exp.text and r.usage.prompt_tokens == len(psm)


# ------------------------------------------------------------------------------------ tools, JSON, thinking
class Weather(BaseModel):
    city: str = Field(max_length=12)
    days: int = Field(ge=1, le=7)
    unit: str = Field(json_schema_extra={"enum": ["c", "f"]})


WEATHER_SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city", "days", "unit"],
    "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "forecast",
                                           "parameters": WEATHER_SCHEMA}},
         {"type": "function", "function": {"name": "search", "parameters": {
             "type": "object", "properties": {"q": {"type": "string", "maxLength": 8}}, "required": ["q"]}}}]


def _check_weather(arguments: str) -> None:
    w = Weather.model_validate_json(arguments)           # pydantic is the independent validator
    assert w.unit in ("c", "f") and set(json.loads(arguments)) == {"city", "days", "unit"}


def test_tool_call_round_trip(client, llm):
    messages = [{"role": "user", "content": "weather in the engine?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0, max_tokens=200,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    _check_weather(call.function.arguments)
    # The tool's answer goes back as a tool message and the model replies to it.
    history = messages + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r2 = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, tool_choice="none",
                                        temperature=0, max_tokens=10)
    rendered = llm.tokenizer.render_chat(
        [messages[0], {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
         {"role": "tool", "content": "sunny, 21 C"}], add_generation_prompt=True, tools=TOOLS)
    assert r2.usage.prompt_tokens == len(rendered)
    assert "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny, 21 C<｜tool▁output▁end｜>" in \
        llm.tokenizer.decode(rendered)
    assert r2.choices[0].message.tool_calls is None and isinstance(r2.choices[0].message.content, str)


def test_tool_required_streamed(client):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "go"}], tools=TOOLS,
                                            tool_choice="required", temperature=0.9, seed=5, max_tokens=300,
                                            stream=True, response_format={"type": "text"})
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert reasons[-1] == "tool_calls" and calls
    for entry in calls.values():
        assert entry["name"] in ("get_weather", "search")
        if entry["name"] == "get_weather":
            _check_weather(entry["arguments"])
        else:
            assert set(json.loads(entry["arguments"])) == {"q"}


def test_json_schema_and_json_object(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER_SCHEMA}}
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "json please"}],
                                       response_format=fmt, temperature=1.0, seed=1, n=3, max_tokens=200)
    for c in r.choices:
        assert c.finish_reason == "stop"
        _check_weather(c.message.content)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "json"}], max_tokens=300,
                                       response_format={"type": "json_object"}, temperature=0)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:   # a random model may write one long string: it must still be a JSON prefix
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")


def test_thinking_split(client, llm):
    tok = llm.tokenizer
    messages = [{"role": "user", "content": "think"}]
    ids = tok.render_chat(messages, add_generation_prompt=True, thinking=True)
    exp = _expected(llm, [ids], 40, stop_token_ids=(tok.token_id("<｜User｜>"),))[0].token_ids
    end = tok.token_id(THINK_END)
    cut = exp.index(end) if end in exp else len(exp)

    def visible(part):
        return tok.decode([t for t in part if t not in tok.special_ids])

    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=40,
                                       extra_body={"chat_template_kwargs": {"thinking": True}})
    msg = r.choices[0].message
    assert msg.reasoning_content == visible(exp[:cut])
    assert msg.content == visible(exp[cut + 1:])


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}), 400,
     "temperature"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 3}), 400,
     "temperature"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 0}), 400, "n"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "seed": 2 ** 70}), 400, "seed"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": NaN}', 400, "top_p"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "repetition_penalty": Infinity}', 400,
     "repetition_penalty"),
    (json.dumps({"model": "tiny", "messages": "hello"}), 400, "messages"),
    (json.dumps({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}), 400, "role"),
    (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}), 404, "gpt-9"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x " * 1200}]}), 400,
     "maximum context length"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 6}), 400,
     "max_tokens"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}), 400,
     "tool_choice"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                 "response_format": {"type": "xml"}}), 400, "response_format"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 50,
                 "logprobs": True}), 400, "top_logprobs"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"y" * (5 << 20) + b'"}]}', 413, "limit"),
])
def test_bad_requests_are_4xx(server, body, status, needle):
    r = httpx.post(server + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]


def test_completion_errors_and_unknown_route(client, server):
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model="tiny", prompt=[[1, 2, 10 ** 6]], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny", prompt="x", max_tokens=CONTEXT)
    assert httpx.get(server + "/v1/nothing").status_code == 404


# ------------------------------------------------------------------------------------ load
def test_64_concurrent_streams(server, llm):
    tok = llm.tokenizer
    prompts = [" ".join(CHAT_WORDS[i % len(CHAT_WORDS): i % len(CHAT_WORDS) + 1 + i % 5]) for i in range(64)]
    expected = _expected(llm, [[tok.bos_id] + tok.encode(p) for p in prompts], 6)
    client = openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(prompt: str) -> str:
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                                 stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def run():
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await client.close()

    before = _metrics(server)
    texts = asyncio.run(run())
    assert texts == [e.text for e in expected]
    after = _metrics(server)
    key = 'dsv3_requests_total{endpoint="/v1/completions",status="200"}'
    assert after[key] - before.get(key, 0) == 64
    generated = sum(len(e.token_ids) for e in expected)
    assert after["dsv3_generation_tokens_total"] - before["dsv3_generation_tokens_total"] == generated
    assert after["dsv3_time_to_first_token_seconds_count"] - before["dsv3_time_to_first_token_seconds_count"] == 64


# ------------------------------------------------------------------------------------ key, overload, disconnect
def test_api_key_required(small_server, model_dir):
    assert httpx.get(small_server + "/health").status_code == 200          # health is open
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.get(small_server + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(small_server + "/metrics").status_code == 401
    bad = openai.OpenAI(base_url=small_server + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=os.path.basename(model_dir), messages=[{"role": "user", "content": "x"}])
    good = openai.OpenAI(base_url=small_server + "/v1", api_key=API_KEY, max_retries=0)
    assert good.models.list().data[0].id == os.path.basename(model_dir)
    # --reasoning: thinking mode unless the request says otherwise.
    msg = good.chat.completions.create(model=os.path.basename(model_dir), messages=[{"role": "user", "content": "x"}],
                                       max_tokens=3, temperature=0).choices[0].message
    assert isinstance(msg.reasoning_content, str)
    msg = good.chat.completions.create(model=os.path.basename(model_dir), messages=[{"role": "user", "content": "x"}],
                                       max_tokens=3, temperature=0,
                                       extra_body={"chat_template_kwargs": {"thinking": False}}).choices[0].message
    assert getattr(msg, "reasoning_content", None) is None
    with pytest.raises(openai.BadRequestError, match="queue holds 1"):      # n=2 can never fit a queue of 1
        good.completions.create(model=os.path.basename(model_dir), prompt="x", max_tokens=2, n=2)


def test_overload_429_and_disconnect_frees_blocks(small_server, model_dir):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    name = os.path.basename(model_dir)
    client = openai.OpenAI(base_url=small_server + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    stream = client.completions.create(model=name, prompt="the engine", max_tokens=1000, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it), next(it)                                     # the request is running
    assert _metrics(small_server, auth)["dsv3_cache_blocks_used"] > 0
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=name, prompt="x", max_tokens=2)
    assert int(e.value.response.headers["retry-after"]) >= 1
    stream.close()                                         # the client goes away mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = _metrics(small_server, auth)
        if m["dsv3_pending_sequences"] == 0 and m["dsv3_cache_blocks_used"] == 0:
            break
        time.sleep(0.1)
    assert m["dsv3_pending_sequences"] == 0 and m["dsv3_cache_blocks_used"] == 0
    assert m["dsv3_aborted_sequences_total"] == 1 and m["dsv3_running_sequences"] == 0
    # A non-streaming client that gives up is noticed too (the server polls the connection).
    with pytest.raises(httpx.TimeoutException):
        httpx.post(small_server + "/v1/completions", headers=auth, timeout=0.5,
                   json={"model": name, "prompt": "the", "max_tokens": 1000, "ignore_eos": True})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _metrics(small_server, auth)["dsv3_aborted_sequences_total"] < 2:
        time.sleep(0.1)
    m = _metrics(small_server, auth)
    assert m["dsv3_aborted_sequences_total"] == 2 and m["dsv3_cache_blocks_used"] == 0
    # The server takes work again.
    assert client.completions.create(model=name, prompt="x", max_tokens=2).choices[0].finish_reason
