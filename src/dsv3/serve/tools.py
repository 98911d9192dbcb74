"""Chat requests in, OpenAI chat messages out: tools, tool calls, tool results and thinking.

Input side: :func:`normalize_messages` checks the OpenAI message list (content strings or text parts,
assistant ``tool_calls``, ``tool`` results answering one of them by ``tool_call_id``) and
:func:`check_tools` / :func:`tool_choice_of` the ``tools`` and ``tool_choice`` fields; the
tokenizer's chat template then renders them in the DeepSeek-V3 format (schemas in the system part,
calls and outputs in their marker blocks).

Output side: :class:`ChatOutputParser` turns the generated token ids into the reply's parts --
``reasoning_content`` (thinking mode: the ids before the ``</think>`` id), ``content`` and
``tool_calls`` (the V3 tool-call block). It works on token ids, never on decoded text: the markers
are special tokens, and only the ids the model emitted for them count. Ordinary tokens whose text
spells ``<｜tool▁calls▁begin｜>`` or ``</think>`` are content like any other text, so a reply can't
forge a tool call or a reasoning split by writing the marker strings, and a call to a function the
request did not offer is dropped. It is incremental for streaming: fed the growing list of ids, it
returns only what is new and certain, so the streamed pieces concatenate to exactly the
non-streamed reply however the tokens are grouped into steps (a whole tool-call block may arrive in
one step).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Collection

from ..tokenizer import THINK_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP
from .body import json_size_at_most
from .limits import Limits
from .protocol import APIError, limit_error
from .schema import check_schema

# OpenAI's rule for function names; it also keeps names safe to embed in a grammar literal.
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ROLES = ("system", "developer", "user", "assistant", "tool")


def _text_of(content: Any, where: str) -> str:
    """A message's content as text: a string, null, or a list of ``{"type": "text", "text": ...}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text", "output_text") \
                    or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(400, f"{where}.content[{i}]: only text parts are supported, got {kind!r}",
                               param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"{where}.content must be a string or a list of text parts, got {type(content).__name__}",
                   param="messages")


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages -> the tokenizer's message dicts (``developer`` is a system message).

    A ``tool`` message must answer a call of the latest assistant message with ``tool_calls``: its
    ``tool_call_id`` must be one of that message's call ids (OpenAI answers 400 otherwise).
    """
    out = []
    open_calls: set[str] = set()
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param="messages")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role,
                               "content": _text_of(m.get("content"), where)}
        if role == "assistant":
            if isinstance(m.get("reasoning_content"), str):
                msg["reasoning_content"] = m["reasoning_content"]
            calls = m.get("tool_calls")
            if calls is not None:
                if not isinstance(calls, list):
                    raise APIError(400, f"{where}.tool_calls must be a list", param="messages")
                msg["tool_calls"] = []
                open_calls = set()
                for j, call in enumerate(calls):
                    fn = call.get("function") if isinstance(call, dict) else None
                    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                        raise APIError(400, f"{where}.tool_calls[{j}].function.name is required", param="messages")
                    args = fn.get("arguments", "{}")
                    if not isinstance(args, (str, dict)):
                        raise APIError(400, f"{where}.tool_calls[{j}].function.arguments must be a JSON string",
                                       param="messages")
                    if isinstance(call.get("id"), str):
                        open_calls.add(call["id"])
                    msg["tool_calls"].append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise APIError(400, f"{where}: a tool message needs the tool_call_id of the call it answers",
                               param="messages")
            if call_id not in open_calls:
                raise APIError(400, f"{where}.tool_call_id {call_id!r} does not match a tool call of the "
                                    f"preceding assistant message", param="messages")
        out.append(msg)
    return out


def check_tools(tools: list[dict[str, Any]] | None, max_schema_bytes: int | None = None) -> list[dict[str, Any]]:
    """Validate OpenAI ``tools``: ``[{"type": "function", "function": {"name", "description", "parameters"}}]``.

    Each ``parameters`` must be a JSON schema (:func:`dsv3.serve.schema.check_schema`) of at most
    ``max_schema_bytes`` as compact JSON (default: the server's), and all tools together at most four
    times that.
    """
    if not tools:
        return []
    if max_schema_bytes is None:
        max_schema_bytes = Limits().max_schema_bytes
    total = 0
    for i, tool in enumerate(tools):
        fn = tool.get("function")
        if tool.get("type") != "function" or not isinstance(fn, dict):
            raise APIError(400, f"tools[{i}]: expected {{'type': 'function', 'function': {{...}}}}", param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise APIError(400, f"tools[{i}].function.name must match {FUNCTION_NAME.pattern}, got {name!r}",
                           param="tools")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise APIError(400, f"tools[{i}].function.description must be a string", param="tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        size = json_size_at_most(tool, max_schema_bytes)
        if size is None:
            raise limit_error(f"tools[{i}] is larger than {max_schema_bytes} bytes", "--max-schema-bytes",
                              param="tools")
        total += size
        if total > 4 * max_schema_bytes:
            raise limit_error(f"tools: together larger than {4 * max_schema_bytes} bytes", "--max-schema-bytes",
                              param="tools")
        check_schema(params, f"tools[{i}].function.parameters", "tools")
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: function names must be unique", param="tools")
    return tools


def tool_choice_of(choice: Any, tools: list[dict[str, Any]]) -> str | dict:
    """``"none" | "auto" | "required" | {"name": NAME, ...the tool}``, checked against ``tools``."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice in ("auto", "required") and not tools:
            raise APIError(400, f"tool_choice {choice!r} needs a non-empty tools list", param="tool_choice")
        return choice
    fn = choice.get("function") if choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or "
                            "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
    for tool in tools:
        if tool["function"]["name"] == name:
            return {"name": name, "tool": tool}
    raise APIError(400, f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")


def tool_call_json(index: int, name: str, arguments: str) -> dict:
    """One OpenAI ``tool_calls`` entry (also the streamed delta form, which carries ``index``)."""
    return {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


@dataclass
class ReplyDelta:
    """What a parser step adds to the reply."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


def _strip_fences(args: str) -> str:
    args = args.strip()
    if args.startswith("```"):
        args = args.partition("\n")[2] if "\n" in args else args[3:]      # the ```json line
    if args.rstrip().endswith("```"):
        args = args.rstrip()[:-3]
    return args.strip()


def call_from_text(kind: str, body: str) -> tuple[str, str] | None:
    """``(name, arguments)`` of one call from the text of its two parts (before and after the
    ``<｜tool▁sep｜>`` id), or None if it has no name.

    V3 writes ``function`` | ``NAME\\n```json\\nARGS\\n````; also accepted: the fences or the newline
    missing (``NAME{...}``) and V3.1's ``NAME`` | ``ARGS``.
    """
    kind, stripped = kind.strip(), body.strip()
    if "\n" in stripped:
        name, _, args = stripped.partition("\n")
    elif "{" in stripped and kind == "function":
        cut = stripped.index("{")
        name, args = stripped[:cut], stripped[cut:]
    else:
        name, args = kind, stripped
    name = name.strip()
    return (name, _strip_fences(args)) if name else None


class ChatOutputParser:
    """Incremental split of generated ids into reasoning, content and tool calls, by token id.

    Args:
        tokenizer: the model's :class:`dsv3.tokenizer.Tokenizer`.
        thinking: the prompt ended with ``<think>``: the ids up to the ``</think>`` id are reasoning.
        tool_names: the functions the request offered; from the ``<｜tool▁calls▁begin｜>`` id on, the
            ids form a tool-call block whose calls to these functions become ``tool_calls`` (calls
            to other names are dropped). Empty or None: no block is parsed (its ids are skipped
            like other special ids and its text stays content).
        stop: the request's stop strings. The engine finds them (:meth:`update` gets where); here
            they only set how much text is held back while streaming.

    :meth:`update` takes all ids generated so far and whether generation is over; it re-reads the
    whole list each time (replies are short next to a forward pass), holding back what could still
    change: a trailing partial UTF-8 character and a tail that could begin a stop string. Text is
    decoded from ordinary ids only; every special id is a boundary or dropped.
    """

    def __init__(self, tokenizer, thinking: bool = False, tool_names: Collection[str] | None = None,
                 stop: list[str] | None = None):
        self.tokenizer, self.thinking = tokenizer, thinking
        self.tool_names = frozenset(tool_names or ())
        self._hold = max((len(s) for s in stop or ()), default=1) - 1
        self._special = tokenizer.special_ids
        self._think_end = tokenizer.token_id(THINK_END)
        t = tokenizer.token_id
        self._calls_begin, self._call_begin, self._sep = t(TOOL_CALLS_BEGIN), t(TOOL_CALL_BEGIN), t(TOOL_SEP)
        self._call_end, self._calls_end = t(TOOL_CALL_END), t(TOOL_CALLS_END)
        self.reasoning = self.content = ""
        self.tool_calls: list[dict] = []
        self.dropped_calls: list[str] = []      # names of calls to functions that were not offered
        self.stopped = False                    # a stop string was found in the content

    def _text(self, ids: list[int], final: bool) -> str:
        text = self.tokenizer.decode([i for i in ids if i not in self._special])
        return text if final else text.rstrip("\ufffd")   # ids ending inside a UTF-8 character: wait

    def _calls(self, block: list[int]) -> list[tuple[str, str]]:
        """Complete calls of a tool-call block (the ids after ``<｜tool▁calls▁begin｜>``)."""
        calls, current, closed = [], None, False
        for i in block:
            if i == self._calls_end:
                closed = True
                break
            if i == self._call_begin:
                current = []
            elif i == self._call_end:
                if current is not None:
                    calls.append(current)
                current = None
            elif current is not None:
                current.append(i)
        if closed and current is not None:       # tolerated: the last call's end marker missing
            calls.append(current)
        out = []
        for ids in calls:
            if self._sep not in ids:
                continue
            cut = ids.index(self._sep)
            call = call_from_text(self._text(ids[:cut], True), self._text(ids[cut + 1:], True))
            if call is not None:
                out.append(call)
        return out

    def _parts(self, ids: list[int], final: bool, stop_at: int | None) -> tuple[str, str, list[tuple[str, str]], bool]:
        if self.thinking:
            if self._think_end in ids:
                cut = ids.index(self._think_end)
                reasoning_ids, rest = ids[:cut], ids[cut + 1:]
            else:
                reasoning_ids, rest = ids, []
        else:
            reasoning_ids, rest = [], ids
        block: list[int] = []
        if self.tool_names and self._calls_begin in rest:
            cut = rest.index(self._calls_begin)
            rest, block = rest[:cut], rest[cut + 1:]
        reasoning, content = self._text(reasoning_ids, final), self._text(rest, final)
        # The engine's output text is the reasoning's text followed by the content's (then the
        # block's): `stop_at` counts characters of it.
        shown = len(reasoning) + len(content)
        stopped = stop_at is not None
        if not stopped and not final and self._hold and not block:
            stop_at = max(0, shown - self._hold)       # might be the start of a stop string: wait
        if stop_at is not None:
            reasoning, content = reasoning[:stop_at], content[:max(0, stop_at - len(reasoning))]
        # Calls count unless the stop string came before the block.
        calls = self._calls(block) if block and not (stopped and stop_at < shown) else []
        return reasoning, content, calls, stopped

    def update(self, ids: list[int], final: bool = False, cut: int | None = None) -> ReplyDelta:
        """The new reasoning/content text and newly completed tool calls since the last call.

        ``cut``: a stop string ended the generation this many characters into its text (the
        engine's ``stop_text_len``); the reply ends there.
        """
        if self.stopped:
            return ReplyDelta()
        reasoning, content, calls, stopped = self._parts(ids, final, cut)
        delta = ReplyDelta()
        if len(reasoning) > len(self.reasoning) and reasoning.startswith(self.reasoning):
            delta.reasoning, self.reasoning = reasoning[len(self.reasoning):], reasoning
        if len(content) > len(self.content) and content.startswith(self.content):
            delta.content, self.content = content[len(self.content):], content
        offered = [c for c in calls if c[0] in self.tool_names]
        self.dropped_calls = [name for name, _ in calls if name not in self.tool_names]
        for name, arguments in offered[len(self.tool_calls):]:
            entry = tool_call_json(len(self.tool_calls), name, arguments)
            self.tool_calls.append(entry)
            delta.tool_calls.append(entry)
        self.stopped = stopped
        return delta
