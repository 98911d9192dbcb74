"""Chat requests in, OpenAI chat messages out: tools, tool calls, tool results and thinking.

Input side: :func:`normalize_messages` checks the OpenAI message list (content strings or text parts,
assistant ``tool_calls``, ``tool`` results) and :func:`check_tools` / :func:`tool_choice_of` the
``tools`` and ``tool_choice`` fields; the tokenizer's chat template then renders them in the
DeepSeek-V3 format (schemas in the system part, calls and outputs in their marker blocks).

Output side: :class:`ChatOutputParser` turns the generated token ids into the reply's parts --
``reasoning_content`` (thinking mode: everything before ``</think>``), ``content`` and ``tool_calls``
(the V3 tool-call block, parsed by :func:`dsv3.tokenizer.parse_tool_calls`). It is incremental for
streaming: fed the growing list of ids, it returns only what is new and certain, so the streamed
pieces concatenate to exactly the non-streamed reply however the tokens are grouped into steps (a
whole tool-call block may arrive in one step).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..tokenizer import SPECIAL_TOKENS, THINK_END, TOOL_CALLS_BEGIN, parse_tool_calls
from .protocol import APIError

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
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(400, f"{where}.content[{i}]: only text parts are supported, got {kind!r}",
                               param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"{where}.content must be a string or a list of text parts, got {type(content).__name__}",
                   param="messages")


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages -> the tokenizer's message dicts (``developer`` is a system message)."""
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param="messages")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role,
                               "content": _text_of(m.get("content"), where)}
        if role == "assistant":
            for key in ("reasoning_content",):
                if isinstance(m.get(key), str):
                    msg[key] = m[key]
            calls = m.get("tool_calls")
            if calls is not None:
                if not isinstance(calls, list):
                    raise APIError(400, f"{where}.tool_calls must be a list", param="messages")
                msg["tool_calls"] = []
                for j, call in enumerate(calls):
                    fn = call.get("function") if isinstance(call, dict) else None
                    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                        raise APIError(400, f"{where}.tool_calls[{j}].function.name is required", param="messages")
                    args = fn.get("arguments", "{}")
                    if not isinstance(args, (str, dict)):
                        raise APIError(400, f"{where}.tool_calls[{j}].function.arguments must be a JSON string",
                                       param="messages")
                    msg["tool_calls"].append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
        out.append(msg)
    return out


def check_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Validate OpenAI ``tools``: ``[{"type": "function", "function": {"name", "description", "parameters"}}]``."""
    if not tools:
        return []
    for i, tool in enumerate(tools):
        fn = tool.get("function")
        if tool.get("type") != "function" or not isinstance(fn, dict):
            raise APIError(400, f"tools[{i}]: expected {{'type': 'function', 'function': {{...}}}}", param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise APIError(400, f"tools[{i}].function.name must match {FUNCTION_NAME.pattern}, got {name!r}",
                           param="tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
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


def _strip_specials(text: str) -> str:
    for tok in SPECIAL_TOKENS:
        if tok in text:
            text = text.replace(tok, "")
    return text


class ChatOutputParser:
    """Incremental split of generated ids into reasoning, content and tool calls.

    Args:
        tokenizer: the model's :class:`dsv3.tokenizer.Tokenizer`.
        thinking: the prompt ended with ``<think>``: text up to ``</think>`` is reasoning.
        parse_tools: text from ``<｜tool▁calls▁begin｜>`` on is a tool-call block, not content.
        stop: stop strings; the content is cut before the first one.

    :meth:`update` takes all ids generated so far and whether generation is over; it re-reads the
    whole text each time (replies are short next to a forward pass), holding back what could still
    change: a trailing partial UTF-8 character and a tail that could begin a stop string.
    """

    def __init__(self, tokenizer, thinking: bool = False, parse_tools: bool = False, stop: list[str] | None = None):
        self.tokenizer, self.thinking, self.parse_tools = tokenizer, thinking, parse_tools
        self.stop = list(stop or [])
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.reasoning = self.content = ""
        self.tool_calls: list[dict] = []
        self.stopped = False          # a stop string was found in the content

    def _parts(self, ids: list[int], final: bool) -> tuple[str, str, list[dict], bool]:
        text = self.tokenizer.decode(ids)
        if not final:
            text = text.rstrip("\ufffd")      # the ids end inside a UTF-8 character: wait for the rest
        if self.thinking:
            reasoning, sep, rest = text.partition(THINK_END)
            if not sep:
                reasoning, rest = text, ""
        else:
            reasoning, rest = "", text
        calls: list[dict] = []
        if self.parse_tools and TOOL_CALLS_BEGIN in rest:
            rest, calls = parse_tool_calls(rest)
        reasoning, content = _strip_specials(reasoning), _strip_specials(rest)
        stopped = False
        hits = [content.find(s) for s in self.stop if s in content]
        if hits:
            content, stopped = content[: min(hits)], True
        elif not final and self._hold:
            content = content[: max(0, len(content) - self._hold)]   # might be the start of a stop string
        return reasoning, content, calls, stopped

    def update(self, ids: list[int], final: bool = False) -> ReplyDelta:
        """The new reasoning/content text and newly completed tool calls since the last call."""
        if self.stopped:
            return ReplyDelta()
        reasoning, content, calls, stopped = self._parts(ids, final)
        delta = ReplyDelta()
        if len(reasoning) > len(self.reasoning) and reasoning.startswith(self.reasoning):
            delta.reasoning, self.reasoning = reasoning[len(self.reasoning):], reasoning
        if len(content) > len(self.content) and content.startswith(self.content):
            delta.content, self.content = content[len(self.content):], content
        for call in calls[len(self.tool_calls):]:
            entry = tool_call_json(len(self.tool_calls), call["name"], call["arguments"])
            self.tool_calls.append(entry)
            delta.tool_calls.append(entry)
        self.stopped = stopped
        return delta
