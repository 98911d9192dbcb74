"""The OpenAI-compatible HTTP API: ``create_app(llm, ...)`` -> a FastAPI app.

Endpoints: ``GET /`` (a chat page), ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (``suffix`` makes it fill-in-the-middle in the model's PSM format; ``echo``
with ``logprobs`` scores the prompt), ``POST /v1/responses`` (the Responses API), ``GET /health``,
``GET /metrics`` (Prometheus), ``GET /openapi.json``. Streaming is server-sent events
(``data: {...}`` chunks, then ``data: [DONE]``).

A handler does three things: read the body (with a deadline), hand it to the
:class:`~dsv3.serve.prepare.Preparer`'s threads (validation, rendering, tokenizing, grammars: never
on the event loop, so no request can stall another's stream), then submit the sequences to the one
:class:`EngineLoop` (continuous batching) and turn their deltas into the reply. Anything wrong with
a request is a 4xx in OpenAI's error format naming the problem; a 500 says only that something
broke (the details go to the server log). A full queue is a 429 with ``Retry-After``; a client that
disconnects has its sequences aborted (their cache blocks freed).

With ``api_key`` set, every endpoint except ``/health`` needs ``Authorization: Bearer <key>`` (or
HTTP Basic with the key as password, which is how a browser opens the chat page); 401 otherwise.

On shutdown (:meth:`Server.drain`, called on SIGTERM by :mod:`.transport`) new requests get 503 and
running ones may finish until the deadline; then streams end with an error event and ``[DONE]``
and waiting non-streamed requests get a 503.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import gc
import hmac
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine_loop import Delta, EngineLoop, Generation, QueueFull, Scores, Scoring
from .limits import Limits
from .metrics import ServerMetrics
from .prepare import ChatJob, CompletionJob, Preparer
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, ResponsesRequest
from .responses import ResponsesAPI
from .streaming import ClientGone, ShuttingDown, json_reply, log, raise_engine_error, shutting_down, sse

DEFAULT_MAX_PENDING = 256
# While a handler waits for tokens it looks this often (seconds) whether its client is still there
# and whether the server is past its shutdown deadline.
DISCONNECT_POLL_S = 0.25

# Request models per endpoint, for the OpenAPI document (the handlers read raw bodies themselves).
REQUEST_MODELS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
                  "/v1/responses": ResponsesRequest}


def create_app(llm, model_name: str, *, api_key: str | None = None, max_pending: int = DEFAULT_MAX_PENDING,
               thinking: bool = False, retry_after: int = 1, limits: Limits | None = None,
               max_body_bytes: int | None = None) -> FastAPI:
    """The server for one :class:`dsv3.LLM` (which must have a tokenizer).

    Args:
        llm: the engine; its ``max_model_len`` is the context limit the server enforces.
        model_name: the id served in ``/v1/models`` and required in requests' ``model`` field.
        api_key: require ``Authorization: Bearer api_key`` on every endpoint but ``/health``.
        max_pending: sequences accepted and unfinished, at most; beyond it requests get 429.
        thinking: the default of chat requests' ``chat_template_kwargs.thinking``.
        retry_after: seconds put in the ``Retry-After`` header of a 429.
        limits: per-request limits and timeouts (:class:`~dsv3.serve.limits.Limits`; defaults if None).
        max_body_bytes: overrides ``limits.max_body_bytes`` (larger bodies get 413).
    """
    if llm.tokenizer is None:
        raise ValueError("the server needs an LLM with a tokenizer")
    limits = limits or Limits()
    if max_body_bytes is not None:
        from dataclasses import replace
        limits = replace(limits, max_body_bytes=max_body_bytes)
    metrics = ServerMetrics()
    engine = EngineLoop(llm, metrics, max_pending=max_pending, retry_after=retry_after)
    server = Server(llm, engine, metrics, Preparer(llm, model_name, limits, thinking), model_name, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Everything alive now (model, tokenizer, modules) lives as long as the server: take it out of
        # the garbage collector's view. A full collection otherwise walks millions of objects with the
        # GIL held, and a request that allocates a lot (a big body) would trigger one: a stall of
        # about half a second for every stream.
        gc.collect()
        gc.freeze()
        engine.start()
        yield
        engine.stop()
        server.prep.close()

    app = FastAPI(title="dsv3", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.server = server
    app.openapi = lambda: _openapi(app)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind).body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))   # 405 keeps Allow

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):
        ref = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s", ref, request.method, request.url.path, exc_info=e)
        return JSONResponse(APIError(500, f"internal server error (reference {ref}; the details are in the "
                                          "server log)", "server_error").body(), status_code=500)

    # A plain ASGI middleware (not @app.middleware): it leaves `receive` alone, so handlers still see
    # the client's disconnect, and it counts streamed responses once they are over.
    app.add_middleware(_Gate, api_key=api_key, metrics=metrics, server=server)

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(_page_html(), headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        if server.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        alive = engine.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        server.prep.check_model(model_id)
        return server.model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        raw = await server.read_body(request)
        req, job = await server.prep.run(server.prep.chat_request, raw)
        return await server.chat(req, job, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await server.read_body(request)
        req, job = await server.prep.run(server.prep.completion_request, raw)
        return await server.completions(req, job, request)

    @app.post("/v1/responses")
    async def responses(request: Request):
        raw = await server.read_body(request)
        req, job = await server.prep.run(server.responses.prepare, raw)
        return await server.responses.respond(req, job, request)

    return app


@functools.lru_cache(maxsize=1)
def _page_html() -> str:
    return resources.files("dsv3.serve").joinpath("page.html").read_text(encoding="utf-8")


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, with the request bodies it can't see (the handlers parse them) put in from
    the request models."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description="OpenAI-compatible API of dsv3 serve")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for path, model in REQUEST_MODELS.items():
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(js.pop("$defs", {}))
        schemas[model.__name__] = js
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        doc["paths"][path]["post"]["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
    app.openapi_schema = doc
    return doc


class _Gate:
    """Authentication (every path but /health), 503 while shutting down, requests counted by status."""

    KNOWN = ("/", "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models", "/health", "/metrics",
             "/openapi.json")

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics, server: "Server"):
        self.app, self.api_key, self.metrics, self.server = app, api_key, metrics, server

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        scheme, token = scheme.lower(), token.strip()
        if scheme == "basic":            # a browser: any user name, the key as password
            try:
                token = base64.b64decode(token, validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        elif scheme != "bearer":
            return False
        return hmac.compare_digest(token.encode("utf-8", "surrogateescape"), self.api_key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self.KNOWN else "other"
        if self.api_key is not None and path != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not self._authorized(given):
                self.metrics.requests.labels(endpoint, "401").inc()
                err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               "authentication_error", code="invalid_api_key")
                # The page is opened by browsers, which ask for a password on a Basic challenge.
                challenge = 'Basic realm="dsv3", charset="UTF-8"' if path == "/" else "Bearer"
                response = JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": challenge})
                return await response(scope, receive, send)
        if self.server.draining and path != "/health":
            self.metrics.requests.labels(endpoint, "503").inc()
            err = APIError(503, "the server is shutting down", "server_error", code="shutting_down")
            response = JSONResponse(err.body(), status_code=503, headers={"Connection": "close"})
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


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Server:
    """Request handling shared by the endpoints (one per app)."""

    def __init__(self, llm, engine: EngineLoop, metrics: ServerMetrics, prep: Preparer, model_name: str,
                 limits: Limits):
        self.llm, self.engine, self.metrics, self.prep, self.limits = llm, engine, metrics, prep, limits
        self.tok = llm.tokenizer
        self.model_name = model_name
        self.created = int(time.time())
        self.deadline: float | None = None          # monotonic time when running requests are ended
        self.responses = ResponsesAPI(self)

    # ------------------------------------------------------------------ lifecycle
    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def drain(self, timeout: float) -> None:
        """Stop taking requests; the running ones have ``timeout`` seconds left."""
        if self.deadline is None:
            self.deadline = time.monotonic() + timeout

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "dsv3",
                "max_model_len": self.llm.max_model_len}

    async def read_body(self, request: Request) -> bytes:
        """The request body, refusing (413) anything over the limit, announced or not, and (408) a
        client that takes longer than ``body_timeout`` to send it."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        too_big = APIError(413, f"the request body is larger than the server's limit of {limit} bytes "
                                "(set by --max-body-bytes)", code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks: list[bytes] = []

        async def read() -> None:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_big
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.limits.body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.limits.body_timeout:g} s (the "
                                "server's limit, set by --body-timeout)", code="request_timeout",
                           headers={"Connection": "close"}) from None
        return b"".join(chunks)

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

    def start(self, prompt: list[int] | list[list[int]], params: list, per_prompt: int | None = None
              ) -> tuple[list[Generation], asyncio.Queue]:
        """Submit one sequence per params (``per_prompt``: params are prompt-major over several prompts)."""
        out: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        gens = []
        for i, p in enumerate(params):
            ids = prompt if per_prompt is None else prompt[i // per_prompt]
            gens.append(Generation(ids, p, loop, out, tag=i))
        self.submit(gens)
        return gens, out

    async def _wait(self, out: asyncio.Queue, request: Request):
        """The next item of ``out``; raises ClientGone / ShuttingDown while waiting."""
        while True:
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise ShuttingDown()
            try:
                return await asyncio.wait_for(out.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ClientGone() from None

    async def deltas(self, gens: list[Generation], out: asyncio.Queue, request: Request
                     ) -> AsyncIterator[tuple[int, Delta]]:
        """Deltas of all ``gens`` until each has finished; aborts them all if the client leaves or the
        shutdown deadline passes."""
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
                tag, delta = await self._wait(out, request)
                if delta.finish_reason is not None:
                    open_ -= 1
                yield tag, delta
            done = True
        finally:
            if not done:
                self.engine.cancel(gens)

    async def scores(self, prompts: list[list[int]], top: int, request: Request) -> list[Scores]:
        """Prompt log-probabilities of every prompt (engine thread, chunk by chunk)."""
        out: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        jobs = [Scoring(p, top, loop, out, tag=i) for i, p in enumerate(prompts)]
        self.engine.score(jobs)
        results: list[Scores | None] = [None] * len(jobs)
        try:
            for _ in jobs:
                tag, scores = await self._wait(out, request)
                if scores.error:
                    raise RuntimeError(f"scoring failed: {scores.error}")
                results[tag] = scores
        finally:
            if any(r is None for r in results):
                self.engine.cancel(jobs)
        return results

    @staticmethod
    def stream_end_error() -> str:
        """What a stream sends when the server stops before it is complete: an error event, [DONE]."""
        return sse(shutting_down().body()) + "data: [DONE]\n\n"

    def logprob_entries(self, delta: Delta) -> list[dict]:
        def entry(tok: int, lp: float) -> dict:
            text = self.tok.decode([tok])
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
        rows = []
        for tok, lp, top in zip(delta.token_ids, delta.logprobs, delta.top_logprobs):
            rows.append({**entry(tok, lp), "top_logprobs": [entry(t, v) for t, v in (top or [])]})
        return rows

    # ------------------------------------------------------------------ chat
    async def chat(self, req: ChatCompletionRequest, job: ChatJob, request: Request):
        gens, out = self.start(job.prompt, job.params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._chat_stream(gens, out, request, job, rid, created, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._chat_full(gens, out, request, job, rid, created)

    async def _chat_full(self, gens, out, request, job: ChatJob, rid, created):
        ids = [[] for _ in gens]
        lps: list[list] = [[] for _ in gens]
        finish: list[str | None] = [None] * len(gens)
        cuts: list[int | None] = [None] * len(gens)           # where the engine found a stop string
        try:
            async for tag, delta in self.deltas(gens, out, request):
                raise_engine_error(delta)
                ids[tag] += delta.token_ids
                lps[tag] += self.logprob_entries(delta) if gens[tag].params.logprobs is not None else []
                finish[tag], cuts[tag] = delta.finish_reason, delta.stop_text_len
        except ClientGone:
            return Response(status_code=499)
        except ShuttingDown:
            raise shutting_down() from None
        choices = []
        for i, parser in enumerate(job.parsers):
            parser.update(ids[i], final=True, cut=cuts[i])
            message: dict[str, Any] = {"role": "assistant", "content": parser.content}
            if job.thinking:
                message["reasoning_content"] = parser.reasoning
            reason = finish[i]
            if parser.tool_calls:
                message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in parser.tool_calls]
                message["content"] = parser.content or None
                reason = "tool_calls" if reason == "stop" else reason
            choices.append({"index": i, "message": message, "finish_reason": reason,
                            "logprobs": {"content": lps[i]} if gens[i].params.logprobs is not None else None})
        completion = sum(len(x) for x in ids)
        return await json_reply({"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                                 "choices": choices, "system_fingerprint": None,
                                 "usage": usage(len(job.prompt), completion)})

    async def _chat_stream(self, gens, out, request, job: ChatJob, rid, created, include_usage):
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                "system_fingerprint": None}
        if include_usage:
            head["usage"] = None          # OpenAI: null on every chunk but the last
        ids = [[] for _ in gens]
        for i in range(len(gens)):
            yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
        try:
            async for tag, delta in self.deltas(gens, out, request):
                if delta.error:
                    log.error("engine error in a stream: %s", delta.error)
                    yield sse(APIError(500, "internal server error", "server_error").body())
                    break
                ids[tag] += delta.token_ids
                final = delta.finish_reason is not None
                part = job.parsers[tag].update(ids[tag], final=final, cut=delta.stop_text_len)
                d: dict[str, Any] = {}
                if part.reasoning:
                    d["reasoning_content"] = part.reasoning
                if part.content:
                    d["content"] = part.content
                if part.tool_calls:
                    d["tool_calls"] = part.tool_calls
                logprobs = None
                if gens[tag].params.logprobs is not None and delta.token_ids:
                    logprobs = {"content": self.logprob_entries(delta)}
                if d or logprobs:
                    yield sse({**head, "choices": [{"index": tag, "delta": d, "logprobs": logprobs,
                                                    "finish_reason": None}]})
                if final:
                    reason = delta.finish_reason
                    if job.parsers[tag].tool_calls and reason == "stop":
                        reason = "tool_calls"
                    yield sse({**head, "choices": [{"index": tag, "delta": {}, "logprobs": None,
                                                    "finish_reason": reason}]})
        except ClientGone:
            return
        except ShuttingDown:
            yield self.stream_end_error()
            return
        if include_usage:
            completion = sum(len(x) for x in ids)
            yield sse({**head, "choices": [], "usage": usage(len(job.prompt), completion)})
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ completions
    @staticmethod
    def _completion_logprobs() -> dict:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _add_logprobs(self, lp: dict, token_ids: list[int], values: list, tops: list) -> None:
        special = self.tok.special_ids
        offset = lp.pop("_offset", 0)
        for tok, value, top in zip(token_ids, values, tops):
            text = self.tok.decode([tok])
            lp["tokens"].append(text)
            lp["token_logprobs"].append(value)
            lp["top_logprobs"].append(None if top is None else {self.tok.decode([t]): v for t, v in top})
            lp["text_offset"].append(offset)
            if tok not in special:           # the text skips special tokens
                offset += len(text)
        lp["_offset"] = offset

    def _prompt_logprobs(self, prompt: list[int], scores: Scores) -> dict:
        lp = self._completion_logprobs()
        self._add_logprobs(lp, prompt, scores.logprobs, scores.top_logprobs)
        return lp

    async def completions(self, req: CompletionRequest, job: CompletionJob, request: Request):
        gens, out = self.start(job.prompts, job.params, per_prompt=req.n) if job.generate else ([], None)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(p) for p in job.prompts)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._completion_stream(req, job, gens, out, request, rid, created,
                                                             prompt_tokens, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        n = len(job.params)
        ids = [[] for _ in range(n)]
        lps = [self._completion_logprobs() for _ in range(n)]
        finish: list[str | None] = ["length"] * n
        cuts: list[int | None] = [None] * n                   # where the engine found a stop string
        try:
            if job.score:
                scores = await self.scores(job.prompts, req.logprobs, request)
                lps = [self._prompt_logprobs(job.prompts[i // req.n], scores[i // req.n]) for i in range(n)]
            if job.generate:
                async for tag, delta in self.deltas(gens, out, request):
                    raise_engine_error(delta)
                    ids[tag] += delta.token_ids
                    self._add_logprobs(lps[tag], delta.token_ids, delta.logprobs, delta.top_logprobs)
                    finish[tag], cuts[tag] = delta.finish_reason, delta.stop_text_len
        except ClientGone:
            if gens:
                self.engine.cancel(gens)
            return Response(status_code=499)
        except ShuttingDown:
            if gens:
                self.engine.cancel(gens)
            raise shutting_down() from None
        choices = []
        for i, parser in enumerate(job.parsers):
            parser.update(ids[i], final=True, cut=cuts[i])
            lps[i].pop("_offset", None)
            choices.append({"index": i, "text": job.echo[i] + parser.content, "finish_reason": finish[i],
                            "logprobs": lps[i] if req.logprobs is not None else None})
        completion = sum(len(x) for x in ids)
        return await json_reply({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                                 "choices": choices, "system_fingerprint": None,
                                 "usage": usage(prompt_tokens, completion)})

    async def _completion_stream(self, req, job: CompletionJob, gens, out, request, rid, created, prompt_tokens,
                                 include_usage):
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "system_fingerprint": None}
        if include_usage:
            head["usage"] = None
        n = len(job.params)
        ids = [[] for _ in range(n)]
        offsets = [{} for _ in range(n)]           # running text offsets of each choice's logprobs
        try:
            if job.echo[0] or job.score:           # the prompt part first: echo text and its logprobs
                scores = await self.scores(job.prompts, req.logprobs, request) if job.score else None
                for i in range(n):
                    lp = None
                    if scores is not None:
                        lp = self._prompt_logprobs(job.prompts[i // req.n], scores[i // req.n])
                        offsets[i]["_offset"] = lp.pop("_offset")
                    done = not job.generate
                    yield sse({**head, "choices": [{"index": i, "text": job.echo[i], "logprobs": lp,
                                                    "finish_reason": "length" if done else None}]})
            if job.generate:
                async for tag, delta in self.deltas(gens, out, request):
                    if delta.error:
                        log.error("engine error in a stream: %s", delta.error)
                        yield sse(APIError(500, "internal server error", "server_error").body())
                        break
                    ids[tag] += delta.token_ids
                    final = delta.finish_reason is not None
                    text = job.parsers[tag].update(ids[tag], final=final, cut=delta.stop_text_len).content
                    lp = None
                    if req.logprobs is not None and delta.token_ids:
                        lp = {**self._completion_logprobs(), **offsets[tag]}
                        self._add_logprobs(lp, delta.token_ids, delta.logprobs, delta.top_logprobs)
                        offsets[tag]["_offset"] = lp.pop("_offset")
                    if text or lp or final:
                        yield sse({**head, "choices": [{"index": tag, "text": text, "logprobs": lp,
                                                        "finish_reason": delta.finish_reason}]})
        except ClientGone:
            if gens:
                self.engine.cancel(gens)
            return
        except ShuttingDown:
            if gens:
                self.engine.cancel(gens)
            yield self.stream_end_error()
            return
        if include_usage:
            completion = sum(len(x) for x in ids)
            yield sse({**head, "choices": [], "usage": usage(prompt_tokens, completion)})
        yield "data: [DONE]\n\n"
