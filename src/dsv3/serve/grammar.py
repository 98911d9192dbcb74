"""Constrained decoding with xgrammar: JSON output and forced tool calls that always parse.

A constraint is a per-request logits processor for the engine
(``SamplingParams.logits_processors``): called with the ids generated so far and the next-token
logits ``[V]``, it returns the logits with every token the constraint forbids set to ``-inf``. The
engine samples from what is left, so whatever the model (even a random one) prefers, the output
stays inside the language:

* ``response_format: json_object`` -- any JSON object, then EOS;
* ``response_format: json_schema`` -- JSON valid under the schema, then EOS;
* ``tool_choice: required`` / a named function -- the DeepSeek-V3 tool-call block::

      <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
      ...<｜tool▁calls▁end｜><｜end▁of▁sentence｜>

  with NAME one of the offered functions and ARGS valid under that function's parameter schema.

The special-token markers are single ids, forced one at a time by the constraint itself; xgrammar
matches only the text between them (NAME, the fences and the JSON), over a token table where every
special token is an empty string (so xgrammar never emits one). Two details make "always parses"
hold for strict JSON parsers: the JSON is compact (``any_whitespace=False``), and tokens holding raw
control characters are masked out (xgrammar's string rule lets some of them through, but
``json.loads`` rejects a raw control character inside a string).

With thinking on, the reply first runs free up to ``</think>`` (EOS and tool markers masked) and
the constraint applies from there.

Given the request's ``max_tokens``, the last :data:`FINISH_MARGIN_TOKENS` tokens steer towards the
end (end the segment when allowed, prefer closing tokens), so an output with unbounded strings still
completes; only a budget below the margin (or a schema whose shortest valid text is longer) can cut
it (``finish_reason: "length"``), as with OpenAI.

Compiling a grammar can take a minute or gigabytes for an innocent-looking schema (a 20,000-value
enum), so :class:`GrammarBackend` budgets it: with ``compile_timeout`` set (the server's
``--grammar-timeout``) each compilation runs in a child process forked from this one and killed when
time is up, its serialized result read back through a pipe. Compilations run in parallel (no lock
is held while one compiles); the compiled grammars are kept in one cache bounded by bytes.
"""

from __future__ import annotations

import json
import os
import select
import signal
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch

from ..tokenizer import (EOS_TOKEN, THINK_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END,
                         TOOL_SEP)
from .protocol import APIError

# Bytes a compact JSON text never holds raw: C0 controls (inside strings they must be escaped; the
# compact layout needs no whitespace). The tool-call block itself uses "\n" around its fences.
_CONTROL_BYTES = frozenset(range(0x20))
# Calls in one forced tool-call block, at most (with parallel calls on): a random model would
# otherwise keep opening new calls until max_tokens and the block would never close.
MAX_TOOL_CALLS = 8
# When a request's max_tokens is known, this many tokens before it the constraint steers towards the
# end: the grammar segment ends as soon as it may, closing tokens (" } ]) are preferred, reasoning and
# further tool calls are closed. Enough for the forced tail of a tool block (fences and markers, ~6
# tokens) plus a closer per nesting level, so even a random model finishes inside max_tokens.
FINISH_MARGIN_TOKENS = 32
_CLOSER_BYTES = frozenset(b"}]")
_QUOTE, _BACKSLASH = ord('"'), ord("\\")


# UTF-8 as an automaton over bytes, so a grammar segment can refuse tokens that would make the text
# invalid UTF-8 (byte-level tokens can split characters; xgrammar accepts some byte sequences that
# decode to U+FFFD, which would then break the schema's string lengths). A state says what the next
# byte must be: (lowest, highest allowed byte, state after it). State 0 expects a character start.
_UTF8_STATES = {
    1: (0x80, 0xBF, 0), 2: (0x80, 0xBF, 1), 3: (0x80, 0xBF, 2),      # 1, 2, 3 continuation bytes left
    4: (0xA0, 0xBF, 1), 5: (0x80, 0x9F, 1),                          # after E0 (no overlong), ED (no surrogate)
    6: (0x90, 0xBF, 2), 7: (0x80, 0x8F, 2),                          # after F0 (no overlong), F4 (<= U+10FFFF)
}
_N_UTF8_STATES = 8


def _utf8_step(state: int, byte: int) -> int:
    """The state after ``byte``, or -1 if it makes the text invalid UTF-8."""
    if state:
        lo, hi, nxt = _UTF8_STATES[state]
        return nxt if lo <= byte <= hi else -1
    if byte < 0x80:
        return 0
    if 0xC2 <= byte <= 0xDF:
        return 1
    if 0xE0 <= byte <= 0xEF:
        return {0xE0: 4, 0xED: 5}.get(byte, 2)
    if 0xF0 <= byte <= 0xF4:
        return {0xF0: 6, 0xF4: 7}.get(byte, 3)
    return -1                                     # continuation without a start, C0/C1, F5..FF


def _utf8_table(pieces: list[bytes], vocab_size: int) -> torch.Tensor:
    """``[states, V]`` int8: the state after each token from each state, -1 where it is invalid."""
    table = torch.full((_N_UTF8_STATES, vocab_size), -1, dtype=torch.int8)
    for i, piece in enumerate(pieces[:vocab_size]):
        for start in range(_N_UTF8_STATES):
            state = start
            for byte in piece:
                state = _utf8_step(state, byte)
                if state < 0:
                    break
            table[start, i] = state
    return table


DEFAULT_CACHE_BYTES = 256 << 20
# Failed compilations (bad schemas) remembered, so that sending one again costs nothing.
_FAILED_KEYS = 256


def _build(xgr, compiler, spec: tuple) -> Any:
    """Compile one grammar from its JSON-able description (also run in a forked child).

    ``("json", schema_text | None)``: one JSON value (any object for None); ``("tools", [[name,
    parameters_text], ...])``: ``NAME\n```json\nARGS\n```` for one of the functions.
    """
    kind, body = spec
    if kind == "json":
        try:
            if body is None:
                grammar = xgr.Grammar.from_json_schema(json.dumps({"type": "object"}), any_whitespace=False,
                                                       strict_mode=False)
            else:
                grammar = xgr.Grammar.from_json_schema(body, any_whitespace=False)
        except Exception as e:   # xgrammar raises RuntimeError/ValueError subclasses for bad schemas
            raise APIError(400, f"response_format.json_schema.schema is not a usable JSON schema: {e}",
                           param="response_format") from None
        return compiler.compile_grammar(grammar)
    options = []
    for name, params in body:
        try:
            args = xgr.Grammar.from_json_schema(params, any_whitespace=False)
        except Exception as e:
            raise APIError(400, f"tools: parameters of {name!r} are not a usable JSON schema: {e}",
                           param="tools") from None
        # Names match [A-Za-z0-9_-]+ (checked by the server), so they are safe inside a literal.
        head = xgr.Grammar.from_ebnf(f'root ::= "{name}\\n```json\\n"')
        tail = xgr.Grammar.from_ebnf('root ::= "\\n```"')
        options.append(xgr.Grammar.concat(head, args, tail))
    grammar = options[0] if len(options) == 1 else xgr.Grammar.union(*options)
    return compiler.compile_grammar(grammar)


def _read_until(fd: int, deadline: float) -> bytes | None:
    """Everything written to pipe ``fd`` until its writer closes it, or None at ``deadline``."""
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return None
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


class GrammarBackend:
    """xgrammar's tokenizer table and compiler for one model, built on first use, and a cache of
    compiled grammars.

    Args:
        tokenizer: the model's :class:`dsv3.tokenizer.Tokenizer`.
        vocab_size: the model's ``vocab_size`` (the logits' width; may exceed the tokenizer's).
        cache_bytes: memory the cached compiled grammars may hold (xgrammar's own estimate); the
            least recently used go first. This is the only cache (xgrammar's is switched off).
        compile_timeout: seconds one compilation may take. ``None``: compile in this process, no
            limit (library use). A number: compile in a forked child process that is killed when
            time is up (400 naming the limit), so a schema that would compile for a minute or
            blow up memory costs the server nothing but the budget. Without ``os.fork`` (Windows)
            the compilation runs here, unbounded.
        max_compiles: compilations running at once; a request that finds them all busy for
            longer than ``compile_timeout`` gets a 503.

    Compilations of different grammars run in parallel (no lock is held while one compiles);
    requests for a grammar that is being compiled wait for that compilation.
    """

    def __init__(self, tokenizer, vocab_size: int, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 compile_timeout: float | None = None, max_compiles: int = 2):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.cache_bytes, self.compile_timeout = cache_bytes, compile_timeout
        self._lock = threading.Lock()              # guards the dicts below; never held while compiling
        self._setup_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_compiles)
        self._compiler = None
        self._cache: OrderedDict[str, tuple[Any, int]] = OrderedDict()   # key -> (compiled, bytes)
        self._cached_bytes = 0
        self._inflight: dict[str, Future] = {}
        self._failed: OrderedDict[str, APIError] = OrderedDict()
        self.compiles = 0                          # compilations started (for tests and metrics)

    @property
    def cached_bytes(self) -> int:
        """Bytes the cached compiled grammars hold."""
        return self._cached_bytes

    def _setup(self) -> None:
        import xgrammar as xgr

        tok = self.tokenizer
        vocab = tok.backend.get_vocab(with_added_tokens=True)
        encoded = [""] * tok.vocab_size
        for piece, i in vocab.items():
            encoded[i] = "" if i in tok.special_ids else piece     # empty = never produced by a grammar
        self._xgr = xgr
        self.info = xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=self.vocab_size,
                                      stop_token_ids=[tok.eos_id])
        # Our cache below is the only one: xgrammar's would keep every grammar ever compiled.
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        # [V] bool: tokens whose bytes hold a control character other than "\n" (JSON never needs
        # them raw), and the same with "\n" too for plain JSON output.
        pieces = self.info.decoded_vocab                                   # raw bytes of every token
        bad_nl = torch.zeros(self.vocab_size, dtype=torch.bool)
        bad = torch.zeros(self.vocab_size, dtype=torch.bool)
        for i in range(tok.vocab_size):
            if i in tok.special_ids:
                continue
            ctrl = _CONTROL_BYTES.intersection(pieces[i])
            bad_nl[i] = bool(ctrl)
            bad[i] = bool(ctrl - {0x0A})
        self.control_mask, self.control_mask_keep_newline = bad_nl, bad
        self.utf8_next = _utf8_table(pieces, self.vocab_size)
        # For the end of a budget: tokens that close a string (" then only } or ]), and tokens made only
        # of } and ] (close arrays and objects).
        self.pieces = pieces
        self.close_string_mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        self.close_struct_mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        for i in range(tok.vocab_size):
            piece = pieces[i]
            if not piece or i in tok.special_ids:
                continue
            self.close_string_mask[i] = piece[0] == _QUOTE and _CLOSER_BYTES.issuperset(piece[1:])
            self.close_struct_mask[i] = _CLOSER_BYTES.issuperset(piece)
        # Special ids and the model's padding ids past the tokenizer. xgrammar sees them as empty
        # strings, and an empty string fits anywhere, so a grammar segment bans them itself (all but
        # the one id that ends the segment).
        self.special_mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        self.special_mask[sorted(tok.special_ids)] = True
        self.special_mask[tok.vocab_size:] = True

    def ensure_ready(self) -> None:
        """Build the tokenizer tables now (they are built on first use otherwise)."""
        with self._setup_lock:
            if self._compiler is None:
                self._setup()

    # -------------------------------------------------------------------------------- compiling
    def _compiled(self, key: str, spec: tuple) -> Any:
        self.ensure_ready()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit[0]
            if key in self._failed:
                raise self._failed[key]
            pending = self._inflight.get(key)
            owner = pending is None
            if owner:
                pending = self._inflight[key] = Future()
        if not owner:                  # someone compiles this grammar right now: wait for theirs
            try:
                return pending.result(timeout=None if self.compile_timeout is None else 2 * self.compile_timeout)
            except FutureTimeout:
                raise self._over_budget() from None
        try:
            compiled = self._compile(spec)
        except APIError as e:
            with self._lock:
                self._inflight.pop(key, None)
                if e.status == 400 and e.code != "limit_exceeded":   # a bad schema stays bad
                    self._failed[key] = e
                    while len(self._failed) > _FAILED_KEYS:
                        self._failed.popitem(last=False)
            pending.set_exception(e)
            raise
        except BaseException as e:
            with self._lock:
                self._inflight.pop(key, None)
            pending.set_exception(e)
            raise
        size = int(compiled.memory_size_bytes)
        with self._lock:
            self._inflight.pop(key, None)
            if size <= self.cache_bytes:
                self._cache[key] = (compiled, size)
                self._cached_bytes += size
                while self._cached_bytes > self.cache_bytes:
                    _, (_, old) = self._cache.popitem(last=False)
                    self._cached_bytes -= old
        pending.set_result(compiled)
        return compiled

    def _over_budget(self) -> APIError:
        return APIError(400, f"the grammar for this request's schema took longer than {self.compile_timeout:g} s "
                             "to compile (the server's limit, set by --grammar-timeout); simplify the schema "
                             "(fewer enum values or properties)", code="limit_exceeded")

    def _compile(self, spec: tuple) -> Any:
        self.compiles += 1
        if self.compile_timeout is None or not hasattr(os, "fork"):
            return _build(self._xgr, self._compiler, spec)
        deadline = time.monotonic() + self.compile_timeout
        if not self._slots.acquire(timeout=self.compile_timeout):
            raise APIError(503, "the server's grammar compilers are all busy; retry shortly", "server_error",
                           code="compiler_busy", headers={"Retry-After": "1"})
        try:
            return self._compile_forked(spec, deadline)
        finally:
            self._slots.release()

    def _compile_forked(self, spec: tuple, deadline: float) -> Any:
        """Compile in a child process forked from this one (it has xgrammar and the tokenizer table
        already) and read the serialized result back; kill the child at ``deadline``."""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:                                   # the child: compile, write, exit at once
            try:
                os.close(read_fd)
                # A fresh compiler: the parent's may have been mid-compilation in another thread.
                compiler = self._xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
                payload = b"K" + _build(self._xgr, compiler, spec).serialize_json().encode()
            except APIError as e:
                payload = b"E" + e.message.encode("utf-8", "replace")
            except BaseException as e:                 # noqa: BLE001 - the child must always exit
                payload = b"E" + f"the grammar could not be compiled ({type(e).__name__})".encode()
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(write_fd, view):]
            finally:
                os._exit(0)
        os.close(write_fd)
        try:
            data = _read_until(read_fd, deadline)
        finally:
            os.close(read_fd)
            if data is None:
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        if data is None:
            raise self._over_budget()
        if data[:1] == b"K":
            return self._xgr.CompiledGrammar.deserialize_json(data[1:].decode(), self.info)
        message = data[1:].decode("utf-8", "replace") or "the grammar compiler crashed on this schema"
        param = "tools" if spec[0] == "tools" else "response_format"
        raise APIError(400, message, param=param)

    # -------------------------------------------------------------------------------- factories
    def json_constraint(self, schema: dict | None, thinking: bool = False,
                        max_tokens: int | None = None) -> "JSONConstraint":
        """A constraint for one JSON value: any object (``schema=None``) or one valid under ``schema``."""
        return JSONConstraint(self, self.json_grammar(schema), thinking, max_tokens)

    def json_grammar(self, schema: dict | None) -> Any:
        """The compiled grammar of :meth:`json_constraint` (cached); compile it once per request."""
        text = json.dumps(schema, sort_keys=True) if schema is not None else None
        return self._compiled("json:" + (text or "object"), ("json", text))

    def tool_constraint(self, tools: list[dict], parallel: bool, thinking: bool = False,
                        max_calls: int = MAX_TOOL_CALLS, max_tokens: int | None = None,
                        compiled: Any = None) -> "ToolCallConstraint":
        """A constraint forcing a tool-call block that calls functions of ``tools`` with valid arguments
        (``compiled``: :meth:`tool_grammar` of the same tools, when the caller has it already)."""
        if compiled is None:
            compiled = self.tool_grammar(tools)
        # Tokens a call needs besides its arguments: markers, "function", name and fences, EOS.
        tok = self.tokenizer
        fixed = 5 + len(tok.encode("function")) + len(tok.encode("\n```")) + max(
            len(tok.encode(f"{t['function']['name']}\n```json\n")) for t in tools)
        return ToolCallConstraint(self, compiled, max_calls if parallel else 1, thinking, max_tokens,
                                  reserve=FINISH_MARGIN_TOKENS + fixed)

    def tool_grammar(self, tools: list[dict]) -> Any:
        """The compiled grammar of :meth:`tool_constraint` (cached)."""
        body = [[t["function"]["name"], json.dumps(t["function"].get("parameters")
                                                  or {"type": "object", "properties": {}}, sort_keys=True)]
                for t in tools]
        return self._compiled("tools:" + json.dumps(body), ("tools", body))


class _Constraint:
    """Shared machinery: catch up on generated ids, then mask. Subclasses define the token program."""

    def __init__(self, backend: GrammarBackend, thinking: bool, max_tokens: int | None = None,
                 reserve: int = FINISH_MARGIN_TOKENS):
        self.backend, self.max_tokens, self.reserve = backend, max_tokens, reserve
        self.finishing = False             # within FINISH_MARGIN_TOKENS of max_tokens: end the segment
        self.closing = False               # within `reserve`: open nothing new (reasoning, another call)
        self.tok = backend.tokenizer
        self.in_thinking = thinking
        self.seen = 0
        self.matcher = None
        self.bitmask = None
        self.failed = False            # a token outside the language was accepted (never by sampling)

    def _new_matcher(self, compiled, stop_id: int) -> None:
        xgr = self.backend._xgr
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=[stop_id])
        self.stop_id = stop_id
        self.utf8 = 0                      # UTF-8 automaton state of the text the matcher accepted
        self.in_string = self.escaped = False      # JSON lexical state, for closing at the end of a budget
        if self.bitmask is None:
            self.bitmask = xgr.allocate_token_bitmask(1, self.backend.vocab_size)

    def _grammar_mask(self, logits: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        # Masked on the CPU, where xgrammar's bitmask and our tables live (one [V] copy per token on a GPU).
        out = logits.float().cpu().clone().unsqueeze(0)                  # [1, V]
        self.backend._xgr.apply_token_bitmask_inplace(out, self.bitmask)
        banned = control | self.backend.special_mask | (self.backend.utf8_next[self.utf8] < 0)
        banned[self.stop_id] = self.utf8 != 0                            # end only on a whole character
        masked = out[0].masked_fill(banned, float("-inf"))
        allowed = torch.isfinite(masked)
        if not bool(allowed.any()):
            # Our extra bans must never leave nothing to sample; the grammar's own mask always leaves something.
            return out[0].to(logits.device)
        if self.finishing:
            if allowed[self.stop_id]:
                allowed = torch.zeros_like(allowed).index_fill(0, torch.tensor([self.stop_id]), True)
            else:
                closers = self.backend.close_string_mask if self.in_string else self.backend.close_struct_mask
                if bool((allowed & closers).any()):
                    allowed = allowed & closers
            masked = masked.masked_fill(~allowed, float("-inf"))
        return masked.to(logits.device)

    def _grammar_accept(self, tok: int) -> None:
        if not self.matcher.accept_token(tok):
            self.failed = True
        if tok < self.backend.vocab_size and tok != self.stop_id:
            self.utf8 = max(0, int(self.backend.utf8_next[self.utf8, tok]))
            for byte in self.backend.pieces[tok]:
                if self.escaped:
                    self.escaped = False
                elif self.in_string and byte == _BACKSLASH:
                    self.escaped = True
                elif byte == _QUOTE:
                    self.in_string = not self.in_string

    @staticmethod
    def _only(logits: torch.Tensor, allowed: list[int]) -> torch.Tensor:
        keep = torch.full_like(logits, float("-inf"))
        idx = torch.tensor(allowed, device=logits.device)
        keep[idx] = logits[idx].float()
        return keep

    def _accept_thinking(self, tok: int) -> bool:
        """While reasoning: True if ``tok`` was consumed by the free-running part."""
        if not self.in_thinking:
            return False
        if tok == self.tok.token_id(THINK_END):
            self.in_thinking = False
        return True

    def _thinking_mask(self, logits: torch.Tensor) -> torch.Tensor:
        # Free text, but no end of reply and no tool block before </think>.
        banned = [self.tok.eos_id, self.tok.token_id(TOOL_CALLS_BEGIN)]
        return logits.index_fill(0, torch.tensor(banned, device=logits.device), float("-inf"))

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        for tok in output_ids[self.seen:]:
            if not self._accept_thinking(tok):
                self.accept(tok)
        self.seen = len(output_ids)
        if self.max_tokens is not None:
            left = self.max_tokens - len(output_ids)
            self.finishing, self.closing = left <= FINISH_MARGIN_TOKENS, left <= self.reserve
        if self.in_thinking:
            if self.closing:                   # time to stop reasoning: the answer needs `reserve` tokens
                return self._only(logits, [self.tok.token_id(THINK_END)])
            return self._thinking_mask(logits)
        return self.mask(logits)

    def accept(self, tok: int) -> None:
        raise NotImplementedError

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class JSONConstraint(_Constraint):
    """One compact JSON value from the compiled grammar, then EOS."""

    def __init__(self, backend: GrammarBackend, compiled, thinking: bool = False, max_tokens: int | None = None):
        super().__init__(backend, thinking, max_tokens)
        self._new_matcher(compiled, self.tok.eos_id)

    def accept(self, tok: int) -> None:
        self._grammar_accept(tok)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        if self.matcher.is_terminated():
            return self._only(logits, [self.tok.eos_id])
        return self._grammar_mask(logits, self.backend.control_mask)


class ToolCallConstraint(_Constraint):
    """The V3 tool-call block: forced markers around grammar-matched ``NAME\\n```json\\nARGS\\n````."""

    def __init__(self, backend: GrammarBackend, compiled, max_calls: int = 1, thinking: bool = False,
                 max_tokens: int | None = None, reserve: int = FINISH_MARGIN_TOKENS):
        super().__init__(backend, thinking, max_tokens, reserve)
        self.compiled, self.max_calls, self.calls = compiled, max_calls, 0
        t = self.tok
        self.calls_begin, self.call_begin = t.token_id(TOOL_CALLS_BEGIN), t.token_id(TOOL_CALL_BEGIN)
        self.sep, self.call_end = t.token_id(TOOL_SEP), t.token_id(TOOL_CALL_END)
        self.calls_end, self.eos = t.token_id(TOOL_CALLS_END), t.token_id(EOS_TOKEN)
        # The token program: ids forced one by one, then (when empty) the grammar or a choice.
        self.forced = [self.calls_begin] + self._call_head()
        self.choosing = False          # after a call: another call (if parallel) or the end

    def _call_head(self) -> list[int]:
        return [self.call_begin, *self.tok.encode("function"), self.sep]

    def accept(self, tok: int) -> None:
        if self.forced:
            if tok != self.forced.pop(0):
                self.failed = True
            if not self.forced and self.matcher is None and not self.choosing and not self.failed \
                    and tok == self.sep:
                self._new_matcher(self.compiled, self.call_end)
            return
        if self.choosing:
            self.choosing = False
            if tok == self.call_begin:
                self.forced = self._call_head()[1:]
            elif tok == self.calls_end:
                self.forced = [self.eos]
            else:
                self.failed = True
            return
        if self.matcher is not None:
            self._grammar_accept(tok)
            if self.matcher.is_terminated():       # it accepted <｜tool▁call▁end｜>
                self.matcher = None
                self.choosing = True
                self.calls += 1

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        if self.forced:
            return self._only(logits, [self.forced[0]])
        if self.choosing:
            more = self.calls < self.max_calls and not self.closing
            return self._only(logits, [self.call_begin, self.calls_end] if more else [self.calls_end])
        if self.matcher is not None:
            return self._grammar_mask(logits, self.backend.control_mask_keep_newline)
        return self._only(logits, [self.eos])      # the block is complete


class BanTokens:
    """A processor that never lets the given ids through (``tool_choice: "none"`` bans the tool block)."""

    def __init__(self, ids: list[int]):
        self.ids = list(ids)

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        return logits.index_fill(0, torch.tensor(self.ids, device=logits.device), float("-inf"))
