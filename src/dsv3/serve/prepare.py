"""From request bytes to what the engine runs: validation, rendering, tokenizing, grammars.

Everything here can take time in proportion to the request (parsing a 4 MB body, rendering 1,000
messages, tokenizing a long prompt, compiling a schema's grammar), so it never runs on the event
loop: :class:`Preparer` runs it on a small pool of threads (:meth:`Preparer.run`), with a bound on
the requests waiting for one (429 beyond). Sizes are checked before the work they bound: list
lengths on the raw JSON, text length against the context before tokenizing (a text of more than
``context x longest token`` characters can't fit), schema sizes before compiling.

The result is a :class:`ChatJob` or :class:`CompletionJob`: prompt ids, one
:class:`dsv3.engine.SamplingParams` per sequence and the reply parsers. ``SamplingParams`` are
built from the request by field name (:func:`sampling_fields`), so a new sampling parameter needs
a field of the same name in the request model and nothing here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from ..engine import SamplingParams
from ..tokenizer import TOOL_CALLS_BEGIN
from .body import json_size_at_most
from .grammar import BanTokens, GrammarBackend, JSONConstraint
from .limits import Limits
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, limit_error, parse_body
from .schema import check_schema
from .tools import ChatOutputParser, check_tools, normalize_messages, tool_choice_of

# SamplingParams fields the server sets itself, and why; every other field is taken from the request
# by name (:func:`sampling_fields`), and the tests hold each request model to having it.
SERVER_SET = {
    "max_tokens": "checked against the context; max_completion_tokens and max_output_tokens name it too",
    "stop": "a string or a list in the request; the reply parsers hold back text by its lengths",
    "stop_token_ids": "the chat's end-of-turn ids, from the tokenizer",
    "logprobs": "logprobs plus top_logprobs in chat, logprobs=N in completions",
    "seed": "seed + choice index, so the n choices of one request differ",
    "logits_processors": "the grammar of response_format or a forced tool_choice",
}
SAMPLED_BY_NAME = frozenset(f.name for f in dataclasses.fields(SamplingParams)) - SERVER_SET.keys()


def sampling_fields(req: Any) -> dict:
    """The request's values of the :class:`SamplingParams` fields in :data:`SAMPLED_BY_NAME`
    (``None`` values left out, so the engine's defaults apply)."""
    return {n: getattr(req, n) for n in SAMPLED_BY_NAME if n in type(req).model_fields and getattr(req, n) is not None}


@dataclass
class ChatSpec:
    """A chat request in the server's terms (built from chat completions or Responses requests)."""

    messages: list[dict]
    sampling: dict                            # SamplingParams fields by name
    tools: list[dict] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    response_format: dict | None = None       # the chat-completions form
    thinking: bool | None = None              # None: the server's default
    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None               # alternatives per token (None: no logprobs)


@dataclass
class ChatJob:
    """A prepared chat request."""

    prompt: list[int]
    params: list[SamplingParams]
    parsers: list[ChatOutputParser]
    thinking: bool
    tool_choice: Any
    max_tokens: int


@dataclass
class CompletionJob:
    """A prepared completions request: one sequence per (prompt, choice)."""

    prompts: list[list[int]]
    params: list[SamplingParams]               # len(prompts) * n, prompt-major
    parsers: list[ChatOutputParser]
    echo: list[str]                            # per sequence: the echoed prompt text ("" without echo)
    score: bool                                # echo with logprobs: the prompt tokens' logprobs too
    generate: bool                             # max_tokens > 0


def response_format_of(fmt: dict | None, max_schema_bytes: int) -> dict | str | None:
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
        schema = spec.get("schema") or {"type": "object"}
        if json_size_at_most(schema, max_schema_bytes) is None:
            raise limit_error(f"response_format.json_schema.schema is larger than {max_schema_bytes} bytes",
                              "--max-schema-bytes", param="response_format")
        check_schema(schema, "response_format.json_schema.schema", "response_format")
        return schema
    raise APIError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                   param="response_format")


class Preparer:
    """Turns request bodies into jobs, on its own threads.

    Args:
        llm: the engine (its tokenizer, config and ``max_model_len``).
        model_name: the id requests must name.
        limits: the server's :class:`~dsv3.serve.limits.Limits`.
        default_thinking: the default of ``chat_template_kwargs.thinking``.
    """

    def __init__(self, llm, model_name: str, limits: Limits, default_thinking: bool = False):
        self.llm, self.tok, self.model_name, self.limits = llm, llm.tokenizer, model_name, limits
        self.default_thinking = default_thinking
        self.vocab = llm.config.vocab_size
        self.grammar = GrammarBackend(self.tok, self.vocab, cache_bytes=limits.grammar_cache_mb << 20,
                                      compile_timeout=limits.grammar_timeout)
        self._pool = ThreadPoolExecutor(max_workers=limits.prepare_threads, thread_name_prefix="dsv3-prepare")
        self._waiting = 0
        self._lock = threading.Lock()
        # No token's text is longer than this many characters: a text with more than
        # context x this can't fit whatever it holds, and is refused before it is tokenized.
        self.max_token_chars = max(len(piece) for piece in self.tok.backend.get_vocab(with_added_tokens=True))
        # The engine stops at EOS itself (unless ignore_eos); the chat's other stop ids are added per request.
        self.stop_ids = self.tok.stop_ids(eos=False)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn: Callable, *args) -> Any:
        """``fn(*args)`` on a preparing thread; 429 when too many requests are waiting already."""
        with self._lock:
            if self._waiting >= self.limits.max_preparing:
                raise APIError(429, f"the server is preparing {self._waiting} requests already (its limit, set by "
                                    "--max-preparing); retry shortly", "rate_limit_error", code="too_many_requests",
                               headers={"Retry-After": "1"})
            self._waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            with self._lock:
                self._waiting -= 1

    # ------------------------------------------------------------------ shared checks
    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           "not_found_error", param="model", code="model_not_found")

    def budget(self, prompt_len: int, max_tokens: int | None, param: str, allow_zero: bool = False) -> int:
        """``max_tokens`` checked against the context (``None``: all the room left)."""
        limit = self.llm.max_model_len
        if max_tokens is None:
            max_tokens = limit - prompt_len
        if prompt_len + max_tokens > limit or (max_tokens < 1 and not (allow_zero and prompt_len <= limit)):
            raise self.too_long(prompt_len, max_tokens, param)
        return max_tokens

    def too_long(self, prompt_len: int | None, max_tokens: int, param: str) -> APIError:
        limit = self.llm.max_model_len
        if prompt_len is None:
            what = "the prompt's text alone is longer than the context can hold"
        else:
            what = (f"{prompt_len + max_tokens} were requested ({prompt_len} in the prompt, "
                    f"{max_tokens} to generate)")
        return APIError(400, f"this model's maximum context length is {limit} tokens, but {what}; shorten the "
                             f"prompt or lower {param}", param=param, code="context_length_exceeded")

    def check_text_fits(self, chars: int, param: str) -> None:
        """Refuse, before tokenizing, text that needs more tokens than the context has."""
        if chars > self.llm.max_model_len * self.max_token_chars:
            raise self.too_long(None, 0, param)

    def params(self, fields: dict, max_tokens: int, stops: list[str], logprobs: int | None, seed: int | None,
               index: int, processors: list, stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:
        bias = fields.get("logit_bias")
        if bias and max(bias) >= self.vocab:
            raise APIError(400, f"logit_bias: token id {max(bias)} is not in the vocabulary (size {self.vocab})",
                           param="logit_bias")
        try:
            return SamplingParams(**fields, max_tokens=max_tokens, stop=tuple(stops), logprobs=logprobs,
                                  seed=None if seed is None else seed + index, logits_processors=tuple(processors),
                                  stop_token_ids=stop_token_ids)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    # ------------------------------------------------------------------ chat
    def chat_request(self, raw: bytes) -> tuple[ChatCompletionRequest, ChatJob]:
        """Body of ``POST /v1/chat/completions`` -> (the request, its job)."""
        req = parse_body(raw, ChatCompletionRequest, self.limits)
        self.check_model(req.model)
        kwargs = req.chat_template_kwargs or {}
        thinking = kwargs.get("thinking", kwargs.get("enable_thinking"))
        if thinking is not None and not isinstance(thinking, bool):
            raise APIError(400, f"chat_template_kwargs.thinking must be a boolean, got {thinking!r}",
                           param="chat_template_kwargs")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        spec = ChatSpec(messages=req.messages, sampling=sampling_fields(req), tools=req.tools,
                        tool_choice=req.tool_choice, parallel_tool_calls=req.parallel_tool_calls,
                        response_format=req.response_format, thinking=thinking,
                        max_tokens=req.max_completion_tokens or req.max_tokens, max_tokens_param=param, n=req.n,
                        seed=req.seed, stop=req.stop_list(),
                        logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        return req, self.chat_job(spec)

    def chat_job(self, spec: ChatSpec) -> ChatJob:
        """Everything a chat needs before the engine: messages, tools, grammar, prompt, params."""
        lim = self.limits
        messages = normalize_messages(spec.messages)
        tools = check_tools(spec.tools, lim.max_schema_bytes)
        choice = tool_choice_of(spec.tool_choice, tools)
        thinking = self.default_thinking if spec.thinking is None else spec.thinking
        fmt = response_format_of(spec.response_format, lim.max_schema_bytes)
        forced = choice == "required" or isinstance(choice, dict)
        if fmt not in (None, "text") and forced:
            raise APIError(400, "response_format and a forced tool_choice can't both constrain the reply",
                           param="response_format")
        chars = sum(len(m["content"]) + len(m.get("reasoning_content") or "") for m in messages)
        self.check_text_fits(chars, "messages")
        try:
            prompt = self.tok.render_chat(messages, add_generation_prompt=True, thinking=thinking, tools=tools or None)
        except (TypeError, ValueError, KeyError) as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        max_tokens = self.budget(len(prompt), spec.max_tokens, spec.max_tokens_param)
        # Grammars compile once per request here (cached across requests); each choice gets its own
        # constraint, since a constraint holds the state of one sequence.
        if fmt not in (None, "text"):
            compiled = self.grammar.json_grammar(fmt or None)

            def processors() -> list:
                return [JSONConstraint(self.grammar, compiled, thinking, max_tokens)]
        elif forced:
            offered = [choice["tool"]] if isinstance(choice, dict) else tools
            compiled = self.grammar.tool_grammar(offered)
            # A named function is called once (OpenAI's behaviour); "required" may call several.
            parallel = spec.parallel_tool_calls and not isinstance(choice, dict)

            def processors() -> list:
                return [self.grammar.tool_constraint(offered, parallel, thinking, max_tokens=max_tokens,
                                                     compiled=compiled)]
        elif choice == "none" and tools:
            def processors() -> list:
                return [BanTokens([self.tok.token_id(TOOL_CALLS_BEGIN)])]
        else:
            def processors() -> list:
                return []
        # A model that starts the next user turn is done with its reply (as `dsv3 chat` does).
        params = [self.params(spec.sampling, max_tokens, spec.stop, spec.logprobs, spec.seed, i, processors(),
                              self.stop_ids) for i in range(spec.n)]
        names = [t["function"]["name"] for t in tools] if choice != "none" else []
        parsers = [ChatOutputParser(self.tok, thinking, tool_names=names, stop=spec.stop) for _ in params]
        return ChatJob(prompt, params, parsers, thinking, choice, max_tokens)

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
        if len(items) > self.limits.max_prompts:
            raise limit_error(f"prompt: at most {self.limits.max_prompts} prompts, got {len(items)}",
                              "--max-prompts", param="prompt")
        out = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                self.check_text_fits(len(item) + len(req.suffix or ""), "prompt")
                if req.suffix is not None:      # fill-in-the-middle, PSM: prefix, hole, suffix, end
                    out.append([self.tok.bos_id] + self.tok.format_fim(item, req.suffix))
                else:
                    out.append([self.tok.bos_id] + self.tok.encode(item))
            else:
                if req.suffix is not None:
                    raise APIError(400, "suffix works with text prompts only", param="suffix")
                if not item or not 0 <= min(item) <= max(item) < self.vocab:
                    raise APIError(400, f"prompt[{i}]: token ids must be a non-empty list of ints in "
                                        f"[0, {self.vocab})", param="prompt")
                out.append(list(item))
        return out

    def completion_request(self, raw: bytes) -> tuple[CompletionRequest, CompletionJob]:
        """Body of ``POST /v1/completions`` -> (the request, its job)."""
        req = parse_body(raw, CompletionRequest, self.limits)
        self.check_model(req.model)
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported (only best_of == n)", param="best_of")
        if req.echo and req.suffix is not None:
            raise APIError(400, "echo and suffix can't be combined", param="echo")
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens 0 generates nothing: it needs echo (with logprobs, to score the "
                                "prompt)", param="max_tokens")
        prompts = self._prompts(req)
        stops = req.stop_list()
        generate = req.max_tokens != 0
        budgets = [self.budget(len(p), req.max_tokens, "max_tokens", allow_zero=True) for p in prompts]
        fields = sampling_fields(req)
        params, parsers = [], []
        for k in range(len(prompts)):
            for j in range(req.n):
                # max_tokens 0 scores only; the params of such a sequence are never submitted.
                params.append(self.params(fields, max(1, budgets[k]), stops, req.logprobs, req.seed, j, []))
                parsers.append(ChatOutputParser(self.tok, stop=stops))
        echo = [self.tok.decode(prompts[i // req.n], skip_special_tokens=True) if req.echo else ""
                for i in range(len(params))]
        return req, CompletionJob(prompts, params, parsers, echo, score=req.echo and req.logprobs is not None,
                                  generate=generate)


