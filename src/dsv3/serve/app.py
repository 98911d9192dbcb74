"""The OpenAI-compatible HTTP API: ``create_app(llm, ...)`` -> a FastAPI app.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (``suffix``
makes it fill-in-the-middle in the model's PSM format), ``GET /health``, ``GET /metrics``
(Prometheus). Streaming is server-sent events (``data: {...}`` chunks, then ``data: [DONE]``).

All requests share one :class:`EngineLoop`, so concurrent requests are batched together by the
engine (continuous batching). A request is checked completely before it reaches the engine: JSON,
types, ranges, the model name, the context length, tools and schemas; anything wrong is a 4xx in
OpenAI's error format naming the problem, never a 5xx. A full queue is a 429 with ``Retry-After``; a
client that disconnects has its sequences aborted (their cache blocks freed).

With ``api_key`` set, every endpoint except ``/health`` needs ``Authorization: Bearer <key>`` (401).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine_loop import Delta, EngineLoop, Generation, QueueFull
from .grammar import BanTokens, GrammarBackend
from .metrics import ServerMetrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_body
from .tools import ChatOutputParser, check_tools, normalize_messages, tool_choice_of

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_PENDING = 256
# While a handler waits for tokens it looks this often (seconds) whether its client is still there.
DISCONNECT_POLL_S = 0.25


class ClientGone(Exception):
    """The client closed the connection before the reply was complete."""


def create_app(llm, model_name: str, *, api_key: str | None = None, max_pending: int = DEFAULT_MAX_PENDING,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, thinking: bool = False,
               retry_after: int = 1) -> FastAPI:
    """The server for one :class:`dsv3.LLM` (which must have a tokenizer).

    Args:
        llm: the engine; its ``max_model_len`` is the context limit the server enforces.
        model_name: the id served in ``/v1/models`` and required in requests' ``model`` field.
        api_key: require ``Authorization: Bearer api_key`` on every endpoint but ``/health``.
        max_pending: sequences accepted and unfinished, at most; beyond it requests get 429.
        max_body_bytes: larger request bodies get 413.
        thinking: the default of chat requests' ``chat_template_kwargs.thinking``.
        retry_after: seconds put in the ``Retry-After`` header of a 429.
    """
    if llm.tokenizer is None:
        raise ValueError("the server needs an LLM with a tokenizer")
    metrics = ServerMetrics()
    engine = EngineLoop(llm, metrics, max_pending=max_pending, retry_after=retry_after)
    server = _Server(llm, engine, metrics, model_name, thinking)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="dsv3", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").body(),
                            status_code=500)

    # A plain ASGI middleware (not @app.middleware): it leaves `receive` alone, so handlers still see
    # the client's disconnect, and it counts streamed responses once they are over.
    app.add_middleware(_AuthAndCount, api_key=api_key, metrics=metrics)

    @app.get("/health")
    async def health():
        alive = engine._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        server.check_model(model_id)
        return server.model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _read_body(request, max_body_bytes)
        req = parse_body(body, ChatCompletionRequest)
        return await server.chat(req, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _read_body(request, max_body_bytes)
        req = parse_body(body, CompletionRequest)
        return await server.completions(req, request)

    return app


class _AuthAndCount:
    """Checks ``Authorization: Bearer <key>`` (every path but /health) and counts requests by status."""

    KNOWN = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self.KNOWN else "other"
        if self.api_key is not None and path != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                self.metrics.requests.labels(endpoint, "401").inc()
                err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               "authentication_error", code="invalid_api_key")
                response = JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        status = {"code": 500}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes, announced or not."""
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"the request body is larger than the server's limit of {limit} bytes",
                       code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Server:
    """Request handling shared by the endpoints (one per app)."""

    def __init__(self, llm, engine: EngineLoop, metrics: ServerMetrics, model_name: str, thinking: bool):
        self.llm, self.engine, self.metrics = llm, engine, metrics
        self.tok = llm.tokenizer
        self.model_name, self.default_thinking = model_name, thinking
        self.created = int(time.time())
        self.grammar = GrammarBackend(self.tok, llm.config.vocab_size)

    # ------------------------------------------------------------------ checks
    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "dsv3",
                "max_model_len": self.llm.max_model_len}

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           "not_found_error", param="model", code="model_not_found")

    def budget(self, prompt_len: int, max_tokens: int | None, param: str) -> int:
        """``max_tokens`` checked against the context (``None``: all the room left)."""
        limit = self.llm.max_model_len
        if max_tokens is None:
            max_tokens = limit - prompt_len
        if prompt_len + max_tokens > limit or max_tokens < 1:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, but {prompt_len + max_tokens}"
                                f" were requested ({prompt_len} in the prompt, {max_tokens} to generate); "
                                f"shorten the prompt or lower {param}", param=param, code="context_length_exceeded")
        return max_tokens

    def sampling(self, req, max_tokens: int, stops: list[str], logprobs: int | None, index: int,
                 processors: list, stop_token_ids: tuple[int, ...] = ()):
        from ..engine import SamplingParams
        fields = dict(max_tokens=max_tokens, stop=tuple(stops), logprobs=logprobs, ignore_eos=req.ignore_eos,
                      seed=None if req.seed is None else req.seed + index, logits_processors=tuple(processors),
                      stop_token_ids=stop_token_ids)
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(req, name)
            if value is not None:
                fields[name] = value
        try:
            return SamplingParams(**fields)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    # ------------------------------------------------------------------ running
    def submit(self, gens: list[Generation]) -> None:
        try:
            self.engine.submit(gens)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except ValueError as e:          # more sequences (n x prompts) than the queue can ever hold
            raise APIError(400, str(e), param="n") from None
        self.metrics.prompt_tokens.inc(sum(len(g.prompt_ids) for g in gens))

    async def deltas(self, gens: list[Generation], out: asyncio.Queue, request: Request
                     ) -> AsyncIterator[tuple[int, Delta]]:
        """Deltas of all ``gens`` until each has finished; aborts them all if the client leaves."""
        open_ = len(gens)
        done = False
        checked = time.monotonic()
        try:
            while open_:
                # Tokens may arrive every few ms for ever (ignore_eos): look at the connection by the clock.
                if time.monotonic() - checked > DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        raise ClientGone()
                try:
                    tag, delta = await asyncio.wait_for(out.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    continue
                if delta.finish_reason is not None:
                    open_ -= 1
                yield tag, delta
            done = True
        finally:
            if not done:
                self.engine.cancel(gens)

    # ------------------------------------------------------------------ chat
    async def chat(self, req: ChatCompletionRequest, request: Request):
        self.check_model(req.model)
        messages = normalize_messages(req.messages)
        tools = check_tools(req.tools)
        choice = tool_choice_of(req.tool_choice, tools)
        kwargs = req.chat_template_kwargs or {}
        thinking = kwargs.get("thinking", kwargs.get("enable_thinking", self.default_thinking))
        if not isinstance(thinking, bool):
            raise APIError(400, f"chat_template_kwargs.thinking must be a boolean, got {thinking!r}",
                           param="chat_template_kwargs")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        fmt = _response_format(req.response_format)
        if fmt not in (None, "text") and (choice == "required" or isinstance(choice, dict)):
            raise APIError(400, "response_format and a forced tool_choice can't both constrain the reply",
                           param="response_format")
        try:
            prompt = self.tok.render_chat(messages, add_generation_prompt=True, thinking=thinking, tools=tools or None)
        except (TypeError, ValueError, KeyError) as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.budget(len(prompt), req.max_completion_tokens or req.max_tokens, param)
        stops = req.stop_list()

        def processors() -> list:       # constraints hold per-sequence state: one set per choice
            if fmt not in (None, "text"):
                return [self.grammar.json_constraint(fmt or None, thinking, max_tokens)]
            if choice == "required" or isinstance(choice, dict):
                offered = [choice["tool"]] if isinstance(choice, dict) else tools
                return [self.grammar.tool_constraint(offered, req.parallel_tool_calls, thinking,
                                                     max_tokens=max_tokens)]
            if choice == "none" and tools:
                return [BanTokens([self.tok.token_id("<｜tool▁calls▁begin｜>")])]
            return []

        procs = await asyncio.to_thread(lambda: [processors() for _ in range(req.n)])   # grammars compile here
        # A model that starts the next user turn is done with its reply (as `dsv3 chat` does).
        user_id = (self.tok.token_id("<｜User｜>"),)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = [self.sampling(req, max_tokens, stops, logprobs, i, procs[i], user_id) for i in range(req.n)]
        parsers = [ChatOutputParser(self.tok, thinking, parse_tools=choice != "none", stop=stops) for _ in params]
        out: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        gens = [Generation(prompt, p, loop, out, tag=i) for i, p in enumerate(params)]
        self.submit(gens)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._chat_stream(gens, out, request, parsers, rid, created, len(prompt),
                                                       include_usage, thinking),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._chat_full(gens, out, request, parsers, rid, created, len(prompt), thinking)

    def _logprob_entries(self, delta: Delta) -> list[dict]:
        def entry(tok: int, lp: float) -> dict:
            text = self.tok.decode([tok])
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
        rows = []
        for tok, lp, top in zip(delta.token_ids, delta.logprobs, delta.top_logprobs):
            rows.append({**entry(tok, lp), "top_logprobs": [entry(t, v) for t, v in (top or [])]})
        return rows

    async def _chat_full(self, gens, out, request, parsers, rid, created, prompt_len, thinking):
        ids = [[] for _ in gens]
        lps: list[list] = [[] for _ in gens]
        finish: list[str | None] = [None] * len(gens)
        try:
            async for tag, delta in self.deltas(gens, out, request):
                _raise_engine_error(delta)
                ids[tag] += delta.token_ids
                lps[tag] += self._logprob_entries(delta) if gens[tag].params.logprobs is not None else []
                finish[tag] = delta.finish_reason
        except ClientGone:
            return Response(status_code=499)
        choices = []
        for i, parser in enumerate(parsers):
            parser.update(ids[i], final=True)
            message: dict[str, Any] = {"role": "assistant", "content": parser.content}
            if thinking:
                message["reasoning_content"] = parser.reasoning
            reason = finish[i]
            if parser.tool_calls:
                message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in parser.tool_calls]
                message["content"] = parser.content or None
                reason = "tool_calls" if reason == "stop" else reason
            choices.append({"index": i, "message": message, "finish_reason": reason,
                            "logprobs": {"content": lps[i]} if gens[i].params.logprobs is not None else None})
        completion = sum(len(x) for x in ids)
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": choices, "system_fingerprint": None,
                "usage": {"prompt_tokens": prompt_len, "completion_tokens": completion,
                          "total_tokens": prompt_len + completion}}

    async def _chat_stream(self, gens, out, request, parsers, rid, created, prompt_len, include_usage, thinking):
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                "system_fingerprint": None}
        ids = [[] for _ in gens]
        for i in range(len(gens)):
            yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
        try:
            async for tag, delta in self.deltas(gens, out, request):
                if delta.error:
                    yield _sse(APIError(500, delta.error, "server_error").body())
                    break
                ids[tag] += delta.token_ids
                final = delta.finish_reason is not None
                part = parsers[tag].update(ids[tag], final=final)
                d: dict[str, Any] = {}
                if part.reasoning:
                    d["reasoning_content"] = part.reasoning
                if part.content:
                    d["content"] = part.content
                if part.tool_calls:
                    d["tool_calls"] = part.tool_calls
                logprobs = None
                if gens[tag].params.logprobs is not None and delta.token_ids:
                    logprobs = {"content": self._logprob_entries(delta)}
                if d or logprobs:
                    yield _sse({**head, "choices": [{"index": tag, "delta": d, "logprobs": logprobs,
                                                     "finish_reason": None}]})
                if final:
                    reason = delta.finish_reason
                    if parsers[tag].tool_calls and reason == "stop":
                        reason = "tool_calls"
                    yield _sse({**head, "choices": [{"index": tag, "delta": {}, "logprobs": None,
                                                     "finish_reason": reason}]})
        except ClientGone:
            return
        if include_usage:
            completion = sum(len(x) for x in ids)
            yield _sse({**head, "choices": [], "usage": {"prompt_tokens": prompt_len, "completion_tokens": completion,
                                                         "total_tokens": prompt_len + completion}})
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ completions
    def _prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            items: list = [p]
        elif p and all(isinstance(x, int) for x in p):
            items = [p]
        else:
            items = list(p)
        if not items:
            raise APIError(400, "prompt must not be empty", param="prompt")
        vocab = self.llm.config.vocab_size
        out = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                if req.suffix is not None:      # fill-in-the-middle, PSM: prefix, hole, suffix, end
                    out.append([self.tok.bos_id] + self.tok.format_fim(item, req.suffix))
                else:
                    out.append([self.tok.bos_id] + self.tok.encode(item))
            else:
                if req.suffix is not None:
                    raise APIError(400, "suffix works with text prompts only", param="suffix")
                if not item or any(not 0 <= t < vocab for t in item):
                    raise APIError(400, f"prompt[{i}]: token ids must be a non-empty list of ints in [0, {vocab})",
                                   param="prompt")
                out.append(list(item))
        return out

    async def completions(self, req: CompletionRequest, request: Request):
        self.check_model(req.model)
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported (only best_of == n)", param="best_of")
        if req.echo and req.suffix is not None:
            raise APIError(400, "echo and suffix can't be combined", param="echo")
        prompts = self._prompts(req)
        stops = req.stop_list()
        max_tokens = [self.budget(len(p), req.max_tokens, "max_tokens") for p in prompts]
        gens, parsers, out, loop = [], [], asyncio.Queue(), asyncio.get_running_loop()
        for k, prompt in enumerate(prompts):
            for j in range(req.n):
                params = self.sampling(req, max_tokens[k], stops, req.logprobs, j, [])
                gens.append(Generation(prompt, params, loop, out, tag=len(gens)))
                parsers.append(ChatOutputParser(self.tok, stop=stops))
        self.submit(gens)
        echo = [self.tok.decode(prompts[g.tag // req.n], skip_special_tokens=True) if req.echo else "" for g in gens]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._completion_stream(gens, out, request, parsers, echo, rid, created,
                                                             prompt_tokens, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        ids = [[] for _ in gens]
        lps = [self._completion_logprobs() for _ in gens]
        finish: list[str | None] = [None] * len(gens)
        try:
            async for tag, delta in self.deltas(gens, out, request):
                _raise_engine_error(delta)
                ids[tag] += delta.token_ids
                self._add_completion_logprobs(lps[tag], delta)
                finish[tag] = delta.finish_reason
        except ClientGone:
            return Response(status_code=499)
        choices = []
        for i, parser in enumerate(parsers):
            parser.update(ids[i], final=True)
            choices.append({"index": i, "text": echo[i] + parser.content, "finish_reason": finish[i],
                            "logprobs": lps[i] if req.logprobs is not None else None})
        completion = sum(len(x) for x in ids)
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": choices, "system_fingerprint": None,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}

    @staticmethod
    def _completion_logprobs() -> dict:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _add_completion_logprobs(self, lp: dict, delta: Delta) -> None:
        offset = (lp["text_offset"][-1] + len(lp["tokens"][-1])) if lp["tokens"] else 0
        for tok, value, top in zip(delta.token_ids, delta.logprobs, delta.top_logprobs):
            text = self.tok.decode([tok])
            lp["tokens"].append(text)
            lp["token_logprobs"].append(value)
            lp["top_logprobs"].append({self.tok.decode([t]): v for t, v in (top or [])})
            lp["text_offset"].append(offset)
            offset += len(text)

    async def _completion_stream(self, gens, out, request, parsers, echo, rid, created, prompt_tokens, include_usage):
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "system_fingerprint": None}
        ids = [[] for _ in gens]
        sent_echo = [False] * len(gens)
        try:
            async for tag, delta in self.deltas(gens, out, request):
                if delta.error:
                    yield _sse(APIError(500, delta.error, "server_error").body())
                    break
                ids[tag] += delta.token_ids
                final = delta.finish_reason is not None
                text = parsers[tag].update(ids[tag], final=final).content
                if not sent_echo[tag]:
                    text, sent_echo[tag] = echo[tag] + text, True
                lp = None
                if gens[tag].params.logprobs is not None and delta.token_ids:
                    lp = self._completion_logprobs()
                    self._add_completion_logprobs(lp, delta)
                if text or lp or final:
                    yield _sse({**head, "choices": [{"index": tag, "text": text, "logprobs": lp,
                                                     "finish_reason": delta.finish_reason}]})
        except ClientGone:
            return
        if include_usage:
            completion = sum(len(x) for x in ids)
            yield _sse({**head, "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                         "completion_tokens": completion,
                                                         "total_tokens": prompt_tokens + completion}})
        yield "data: [DONE]\n\n"


def _raise_engine_error(delta: Delta) -> None:
    if delta.error:
        raise APIError(500, delta.error, "server_error")


def _response_format(fmt: dict | None) -> dict | str | None:
    """``None`` (free text), ``"text"``, or the JSON schema to enforce (``{}`` stands for any object)."""
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return "text"
    if kind == "json_object":
        return {}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise APIError(400, "response_format.json_schema must be an object with a 'schema' object",
                           param="response_format")
        return spec.get("schema") or {"type": "object"}
    raise APIError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                   param="response_format")
