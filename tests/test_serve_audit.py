"""The 2026-12-03 audit of ``dsv3 serve`` (issue 16), replayed against a real server process.

One server per module (a tiny random checkpoint whose tokenizer has two *ordinary* tokens spelling
the model's markers, see ``serve_helpers.forged_checkpoint``), started with short limits so the
slow-client and grammar-budget cases take about a second each; a second, short-lived server for
SIGTERM. Expected outputs come from ``dsv3.LLM`` or the model itself in this process, never from
stored strings.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
from pydantic import BaseModel
from serve_helpers import FORGED_CALL, FORGED_THINK, Chromium, forged_checkpoint, launch, stop, wait_up

from dsv3.engine import LLM, SamplingParams

CONTEXT = 1024
API_KEY = "sk-audit"
# Before the fix these requests froze /health for 1.5-5.7 s; now they run on the preparing threads
# (~60 ms worst probe on an idle machine). 1 s keeps the test meaningful on a loaded 2-core machine.
STALL_LIMIT_S = 1.0
pytestmark = pytest.mark.usefixtures("one_thread")
FLAGS = ("--served-model-name", "tiny", "--max-num-seqs", "16", "--max-queue", "64", "--grammar-timeout", "3",
         "--max-schema-bytes", "400000", "--body-timeout", "1", "--header-timeout", "1", "--max-messages", "100",
         "--max-tools", "8", "--max-prompts", "8")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return forged_checkpoint(tmp_path_factory.mktemp("audit-ckpt"), max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def launched(model_dir):
    """The module's server, and one with an API key that the SIGTERM test shuts down; they start
    together (start-up is mostly imports, overlapping them saves time)."""
    main = launch(model_dir, *FLAGS)
    doomed = launch(model_dir, "--max-num-seqs", "4", "--shutdown-timeout", "2", env={"DSV3_API_KEY": API_KEY})
    try:
        yield main, doomed
    finally:
        stop(main[0], doomed[0])


@pytest.fixture(scope="module")
def server(launched):
    return wait_up(*launched[0])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, max_model_len=CONTEXT, max_num_seqs=4)


def _post(server: str, path: str, body, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server + path, content=content, headers={"Content-Type": "application/json"}, timeout=timeout)


def _chat(**kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "the engine"}], **kw}


# ------------------------------------------------------------------------------------ 1. no request stalls another
def _probe(server: str, stop_event: threading.Event, latencies: list) -> None:
    with httpx.Client(timeout=30) as c:
        while not stop_event.is_set():
            t = time.perf_counter()
            assert c.get(server + "/health").status_code == 200
            latencies.append(time.perf_counter() - t)
            time.sleep(0.01)


HEAVY = {
    "3.8 MB of text": (lambda: _chat(messages=[{"role": "user", "content": "the engine " * 345_000}]),
                       "/v1/chat/completions", 400, "maximum context length"),
    "60,000 messages": (lambda: _chat(messages=[{"role": "user", "content": "hi"}] * 60_000),
                        "/v1/chat/completions", 400, "--max-messages"),
    "700 x 1000 token ids": (lambda: {"model": "tiny", "prompt": [[5] * 1000] * 700, "max_tokens": 1},
                             "/v1/completions", 400, "--max-prompts"),
    "9,000 tools": (lambda: _chat(tools=[{"type": "function", "function": {
        "name": f"f{i}", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}}
        for i in range(9000)]), "/v1/chat/completions", 400, "--max-tools"),
    "a 20,000-value enum": (lambda: _chat(response_format={"type": "json_schema", "json_schema": {
        "name": "e", "schema": {"type": "object", "properties": {
            "v": {"enum": [f"value_{i}_x" for i in range(20_000)]}}}}}),
        "/v1/chat/completions", 400, "--grammar-timeout"),
}


@pytest.mark.parametrize("case", list(HEAVY))
def test_heavy_request_does_not_stall_the_server(server, case):
    make, path, status, needle = HEAVY[case]
    body = json.dumps(make()).encode()
    assert len(body) < 4 * 1024 * 1024
    stop_event, latencies = threading.Event(), []
    probe = threading.Thread(target=_probe, args=(server, stop_event, latencies))
    probe.start()
    try:
        time.sleep(0.1)
        t = time.perf_counter()
        r = _post(server, path, body)
        took = time.perf_counter() - t
        time.sleep(0.1)
    finally:
        stop_event.set()
        probe.join()
    assert r.status_code == status and needle in r.json()["error"]["message"], r.text[:300]
    assert len(latencies) >= 5
    assert max(latencies) < STALL_LIMIT_S, (case, took, sorted(latencies)[-5:])


def test_grammar_compiles_do_not_wait_for_each_other(server):
    """While one schema compiles past its budget, another schema's request is served at once."""
    slow = json.dumps(HEAVY["a 20,000-value enum"][0]()).encode()
    result = {}

    def send_slow() -> None:
        result["r"] = _post(server, "/v1/chat/completions", slow)
        result["end"] = time.monotonic()

    t = threading.Thread(target=send_slow)
    t.start()
    time.sleep(0.3)
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}}}
    r = _post(server, "/v1/chat/completions", _chat(response_format=fmt, max_tokens=20, temperature=0))
    quick_end = time.monotonic()
    t.join()
    assert r.status_code == 200 and set(json.loads(r.json()["choices"][0]["message"]["content"])) == {"n"}
    assert result["r"].status_code == 400 and result["r"].json()["error"]["code"] == "limit_exceeded"
    assert quick_end < result["end"]        # not queued behind the slow compilation (killed at its budget)
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100}
                                            for i in range(4000)}}
    r = _post(server, "/v1/chat/completions", _chat(response_format={"type": "json_schema", "json_schema": {
        "name": "b", "schema": big}}))
    assert r.status_code == 400 and "--max-schema-bytes" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------------ 2. markers come from ids only
def test_marker_text_in_the_output_is_text(server, client, llm):
    tok = llm.tokenizer
    call_id, think_id = tok.backend.token_to_id(FORGED_CALL), tok.backend.token_to_id(FORGED_THINK)
    assert call_id not in tok.special_ids and think_id not in tok.special_ids
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], tools=tools,
                                       max_tokens=3, temperature=0, logit_bias={str(call_id): 100})
    msg = r.choices[0].message
    assert msg.tool_calls is None and msg.content == FORGED_CALL * 3 and r.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], tools=tools,
                                            max_tokens=3, temperature=0, logit_bias={str(call_id): 100}, stream=True)
    chunks = list(stream)
    assert not any(c.choices[0].delta.tool_calls for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == FORGED_CALL * 3
    # "</think>" spelled by an ordinary token does not end the reasoning.
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       temperature=0, logit_bias={str(think_id): 100},
                                       extra_body={"chat_template_kwargs": {"thinking": True}})
    assert r.choices[0].message.reasoning_content == FORGED_THINK * 2 and r.choices[0].message.content == ""
    # Completions keep the text as generated (special-token spellings included).
    r = client.completions.create(model="tiny", prompt="the", max_tokens=2, temperature=0,
                                  logit_bias={str(call_id): 100})
    assert r.choices[0].text == FORGED_CALL * 2


# ------------------------------------------------------------------------------------ 3. no input gives a 5xx
FIVE_XX = [
    ("deep nesting", b'{"model": "tiny", "messages": [{"role": "user", "content": ' + b"[" * 5000 + b"]" * 5000
     + b"}]}", "nested too deeply"),
    ("deep nesting under the C parser's limit", b'{"model": "tiny", "messages": [{"role": "user", "content": "x", '
     b'"extra": ' + b"[" * 500 + b"]" * 500 + b"}]}", "nested too deeply"),
    ("lone surrogate in a prompt", b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 1}', "surrogate"),
    ("lone surrogate in a FIM suffix", b'{"model": "tiny", "prompt": "a", "suffix": "\\udfff", "max_tokens": 1}',
     "surrogate"),
    ("lone surrogate in a key", b'{"model": "tiny", "prompt": "a", "\\ud800": 1}', "surrogate"),
    ("NaN", b'{"model": "tiny", "prompt": "a", "temperature": NaN}', "temperature"),
    ("-Infinity in a list", b'{"model": "tiny", "prompt": "a", "stop": ["x", -Infinity]}', "stop[1]"),
    ("a float that overflows", b'{"model": "tiny", "prompt": "a", "top_p": 1e999}', "top_p"),
    ("an integer of 5,000 digits", b'{"model": "tiny", "prompt": "a", "seed": ' + b"9" * 5000 + b"}", "number"),
    ("a huge integer", b'{"model": "tiny", "prompt": "a", "n": 123456789012345678901234567890}', "n"),
    ("a huge token id", b'{"model": "tiny", "prompt": [1, 99999999999999999999], "max_tokens": 1}', "token ids"),
    ("logit_bias key that is no id", b'{"model": "tiny", "prompt": "a", "logit_bias": {"x1": 5}}', "logit_bias"),
    ("logit_bias id outside the vocabulary", b'{"model": "tiny", "prompt": "a", "logit_bias": {"999999": 5}}',
     "vocabulary"),
    ("invalid UTF-8", b'{"model": "tiny", "prompt": "\xff\xfe"}', "UTF-8"),
    ("a tool schema that is no schema", json.dumps(_chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 7}}}}}])).encode(), "type"),
    ("messages that are not objects", b'{"model": "tiny", "messages": [1]}', "messages"),
]


@pytest.mark.parametrize("name, body, needle", FIVE_XX, ids=[c[0] for c in FIVE_XX])
def test_no_input_is_a_server_error(server, name, body, needle):
    path = "/v1/chat/completions" if b'"messages"' in body else "/v1/completions"
    r = _post(server, path, body)
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"
    assert "Traceback" not in r.text and "Error:" not in err["message"]     # no internal exception text


def test_protocol_details(server, client):
    r = httpx.get(server + "/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    doc = httpx.get(server + "/openapi.json").json()
    assert doc["paths"]["/v1/responses"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert {"ChatCompletionRequest", "CompletionRequest", "ResponsesRequest"} <= set(doc["components"]["schemas"])
    assert "logit_bias" in doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    # Integer-valued floats are integers; other floats are not.
    r = _post(server, "/v1/completions", {"model": "tiny", "prompt": "the", "max_tokens": 3.0, "n": 1.0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert _post(server, "/v1/completions", {"model": "tiny", "prompt": "the", "max_tokens": 2.5}).status_code == 400
    # usage: null on every chunk but the last when usage is asked for.
    with httpx.stream("POST", server + "/v1/chat/completions", timeout=60,
                      json=_chat(max_tokens=4, stream=True, stream_options={"include_usage": True})) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert all("usage" in e and e["usage"] is None for e in events[:-1])
    assert events[-1]["usage"]["completion_tokens"] >= 1 and events[-1]["choices"] == []


def test_tool_messages_and_named_tool_choice(server, client):
    tools = [{"type": "function", "function": {"name": "ping", "parameters": {
        "type": "object", "properties": {"host": {"type": "string", "maxLength": 6}}, "required": ["host"]}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "ping", "arguments": '{"host": "a"}'}}
    base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    for tool_msg, needle in [({"role": "tool", "content": "ok"}, "tool_call_id"),
                             ({"role": "tool", "tool_call_id": "call_2", "content": "ok"}, "call_2")]:
        with pytest.raises(openai.BadRequestError, match=needle):
            client.chat.completions.create(model="tiny", messages=base + [tool_msg], tools=tools, max_tokens=2)
    r = client.chat.completions.create(model="tiny", messages=base + [{"role": "tool", "tool_call_id": "call_1",
                                                                       "content": "ok"}], tools=tools, max_tokens=2)
    assert r.choices[0].finish_reason
    # A named function is called exactly once, even with parallel calls allowed.
    for seed in range(2):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], tools=tools,
                                           tool_choice={"type": "function", "function": {"name": "ping"}},
                                           parallel_tool_calls=True, temperature=1.0, seed=seed, max_tokens=120)
        assert [c.function.name for c in r.choices[0].message.tool_calls] == ["ping"]


# ------------------------------------------------------------------------------------ logit_bias, prompt scoring
def test_logit_bias_matches_engine(client, llm):
    tok = llm.tokenizer
    prompt = [tok.bos_id] + tok.encode("the engine")
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6))[0]
    bias = {plain.token_ids[0]: -100.0, plain.token_ids[1]: 3.0}
    exp = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, logit_bias=bias))[0]
    r = client.completions.create(model="tiny", prompt="the engine", max_tokens=6, temperature=0,
                                  logit_bias={str(k): v for k, v in bias.items()})
    assert r.choices[0].text == exp.text and exp.token_ids[0] != plain.token_ids[0]


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_scores_the_prompt_like_the_model(server, llm, max_tokens):
    """lm-eval's loglikelihood request (echo, logprobs, max_tokens 1; or 0): the prompt's token
    logprobs equal a full forward of the model here (the server scores chunk by chunk)."""
    tok = llm.tokenizer
    prompts = [tok.encode("the engine reads a prompt and writes one token " * 12), tok.encode("def step(self")]
    r = _post(server, "/v1/completions", {"model": "tiny", "prompt": prompts, "max_tokens": max_tokens,
                                         "logprobs": 1, "echo": True, "temperature": 0})
    assert r.status_code == 200, r.text
    for ids, choice in zip(prompts, r.json()["choices"]):
        with torch.no_grad():
            logp = llm.model(torch.tensor([ids]))[0].float().log_softmax(-1)
        want = [logp[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + max_tokens and lp["token_logprobs"][0] is None
        assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-4)
        for t in range(1, len(ids)):                     # lm-eval's is_greedy test reads top_logprobs
            top = lp["top_logprobs"][t]
            greedy = int(logp[t - 1].argmax()) == ids[t]
            assert (lp["token_logprobs"][t] == max(top.values())) == greedy
        assert choice["text"].startswith(tok.decode(ids))
        assert choice["finish_reason"] == "length"


# ------------------------------------------------------------------------------------ 5. slow clients
def test_slow_headers_and_stalled_body_are_cut_off(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:      # headers never finish
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        t = time.monotonic()
        assert s.recv(1024) == b""                                        # closed by the server
        assert time.monotonic() - t < 5
    with socket.create_connection((host, int(port)), timeout=10) as s:      # says nothing at all
        t = time.monotonic()
        assert s.recv(1024) == b"" and time.monotonic() - t < 5
    with socket.create_connection((host, int(port)), timeout=10) as s:      # body stalls
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": ")
        t = time.monotonic()
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"--body-timeout" in reply and time.monotonic() - t < 5
    assert httpx.get(server + "/health").status_code == 200


def test_sigterm_lets_streams_end_properly(launched):
    proc, base = launched[1]
    auth = {"Authorization": f"Bearer {API_KEY}"}
    wait_up(proc, base, headers=auth)
    # (This server has a key: the chat page asks a browser for it with a Basic challenge.)
    r = httpx.get(base + "/")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    basic = base64.b64encode(f"me:{API_KEY}".encode()).decode()
    assert httpx.get(base + "/", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    name = httpx.get(base + "/v1/models", headers=auth).json()["data"][0]["id"]
    results: dict[int, list[str]] = {}
    started = [threading.Event() for _ in range(3)]

    def stream(i: int, max_tokens: int) -> None:
        body = {"model": name, "prompt": "the", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        lines = results[i] = []
        try:
            with httpx.stream("POST", base + "/v1/completions", timeout=30, headers=auth, json=body) as s:
                for line in s.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        started[i].set()
        finally:
            started[i].set()

    threads = [threading.Thread(target=stream, args=(i, m)) for i, m in enumerate((900, 900, 8))]
    for t in threads:
        t.start()
    for event in started:                  # every stream is running (or, the short one, may be done)
        assert event.wait(timeout=30)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    for t in threads:
        t.join(timeout=20)
    assert proc.wait(timeout=20) in (0, -signal.SIGTERM)       # uvicorn re-raises the signal once done
    assert time.monotonic() - t0 < 10
    for i in (0, 1):              # cut at the deadline: an error event, then [DONE]
        assert results[i][-1] == "data: [DONE]"
        assert json.loads(results[i][-2][6:])["error"]["code"] == "shutting_down"
        assert len(results[i]) > 3                                 # it was streaming until then
    assert results[2][-1] == "data: [DONE]" and "error" not in results[2][-2]      # finished in time
    with pytest.raises(httpx.ConnectError):
        httpx.get(base + "/health")


# ------------------------------------------------------------------------------------ 6. the Responses API
class Answer(BaseModel):
    n: int
    ok: bool


ANSWER_SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                                  "ok": {"type": "boolean"}},
                 "required": ["n", "ok"], "additionalProperties": False}
PING = {"type": "function", "name": "ping", "description": "reach a host", "strict": True, "parameters": {
    "type": "object", "properties": {"host": {"type": "string", "maxLength": 6}}, "required": ["host"],
    "additionalProperties": False}}


def test_responses_text_matches_chat(client):
    kw = dict(model="tiny", instructions="be brief", input="the engine", max_output_tokens=8, temperature=0)
    r = client.responses.create(**kw)
    chat = client.chat.completions.create(model="tiny", max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "the engine"}])
    assert r.status in ("completed", "incomplete") and r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    events = list(client.responses.create(**kw, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in (
        "response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].response.output_text == r.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_function_tool_round_trip(client):
    r = client.responses.create(model="tiny", input="ping the engine", tools=[PING], tool_choice="required",
                                temperature=0.8, max_output_tokens=150)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) >= 1 and calls[0].name == "ping" and set(json.loads(calls[0].arguments)) == {"host"}
    # The tool's output goes back as a function_call_output item; the model answers in text.
    follow = client.responses.create(model="tiny", tools=[PING], max_output_tokens=6, temperature=0, input=[
        {"role": "user", "content": "ping the engine"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "ping", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "pong"}], tool_choice="none")
    assert isinstance(follow.output_text, str) and not [o for o in follow.output if o.type == "function_call"]
    with pytest.raises(openai.BadRequestError, match="call_id|tool_call_id"):
        client.responses.create(model="tiny", tools=[PING], max_output_tokens=2, input=[
            {"role": "user", "content": "x"}, {"type": "function_call_output", "call_id": "nope", "output": "?"}])
    # Streamed: the call arrives as output_item.added, arguments delta/done and output_item.done.
    events = list(client.responses.create(model="tiny", input="ping", tools=[PING], stream=True, temperature=0.8,
                                          tool_choice={"type": "function", "name": "ping"}, max_output_tokens=150))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and set(json.loads(done[0].arguments)) == {"host"}
    final = events[-1].response
    assert [o.type for o in final.output] == ["function_call"] and final.output[0].arguments == done[0].arguments


def test_responses_json_schema_and_reasoning(client):
    fmt = {"format": {"type": "json_schema", "name": "answer", "schema": ANSWER_SCHEMA, "strict": True}}
    for seed in range(2):
        r = client.responses.create(model="tiny", input="answer", text=fmt, temperature=1.0, max_output_tokens=60,
                                    extra_body={"seed": seed})
        Answer.model_validate_json(r.output_text)
    events = list(client.responses.create(model="tiny", input="answer", text=fmt, stream=True, temperature=0,
                                          max_output_tokens=60))
    Answer.model_validate_json("".join(e.delta for e in events if e.type == "response.output_text.delta"))
    r = client.responses.create(model="tiny", input="think", reasoning={"effort": "low"}, max_output_tokens=12,
                                temperature=0)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "think"}], max_tokens=12,
                                          temperature=0, extra_body={"chat_template_kwargs": {"thinking": True}})
    reasoning = [o for o in r.output if o.type == "reasoning"]
    text = reasoning[0].content[0].text if reasoning else ""
    assert text == chat.choices[0].message.reasoning_content
    assert r.output_text == (chat.choices[0].message.content or "")
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model="tiny", input="x", previous_response_id="resp_123")


# ------------------------------------------------------------------------------------ 7. the chat page
def test_chat_page_is_served(server):
    r = httpx.get(server + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text and "<script" in r.text and "https://" not in r.text   # no CDN


@pytest.mark.skipif(Chromium.find() is None, reason="needs Chromium (Debian: apt-get install chromium)")
def test_chat_page_streams_in_a_browser(server, client, tmp_path):
    """Load the page in headless Chromium, send a message, see the streamed reply (thinking shown
    apart); it must equal the API's own reply to the same request."""
    browser = Chromium(Chromium.find(), str(tmp_path / "profile"))
    try:
        browser.open(server + "/")
        browser.wait_for("document.getElementById('model').textContent.includes('tiny')")
        browser.js("""(() => {
            document.getElementById('temperature').value = '0';
            document.getElementById('max-tokens').value = '24';
            document.getElementById('thinking').checked = true;
            document.getElementById('input').value = 'the engine reads a prompt';
            document.getElementById('send').click();
        })()""")
        browser.wait_for("(document.querySelector('.msg.assistant') || {dataset: {}}).dataset.done === '1'")
        shown = browser.js("""(() => {
            const m = document.querySelector('.msg.assistant');
            const t = m.querySelector('details.thinking .text');
            return {content: m.querySelector('.content').textContent, thinking: t ? t.textContent : '',
                    error: (m.querySelector('.error') || {}).textContent || null, finish: m.dataset.finish};
        })()""")
        shot = os.environ.get("DSV3_PAGE_SCREENSHOT") or str(tmp_path / "page.png")
        browser.screenshot(shot)
    finally:
        browser.close()
    want = client.chat.completions.create(model="tiny", temperature=0, max_tokens=24,
                                          messages=[{"role": "user", "content": "the engine reads a prompt"}],
                                          extra_body={"chat_template_kwargs": {"thinking": True}}).choices[0]
    assert shown["error"] is None and shown["finish"] == want.finish_reason
    assert shown["thinking"] == want.message.reasoning_content and shown["content"] == (want.message.content or "")
    assert shown["thinking"] or shown["content"]
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
