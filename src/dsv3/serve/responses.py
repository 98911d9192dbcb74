"""``POST /v1/responses``: the OpenAI Responses API on top of the chat machinery.

A Responses request is turned into a chat (:func:`chat_spec`): ``instructions`` become the system
message; ``input`` (a string or a list of items) becomes the messages -- ``message`` items,
``function_call`` items (attached as ``tool_calls`` to the assistant turn they belong to),
``function_call_output`` items (tool messages answering a ``call_id``), ``reasoning`` items (the
next assistant turn's reasoning); function ``tools`` and ``tool_choice`` take the chat forms;
``text.format`` becomes ``response_format``; ``reasoning`` switches thinking mode on (``effort:
"none"`` off). The reply comes back as output items: ``reasoning`` (with ``reasoning_text``
content), ``message`` (``output_text``) and ``function_call`` items, in that order.

Streaming sends the Responses API's typed events (``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``, ``response.reasoning_text.delta``,
``response.output_text.delta``, ``response.function_call_arguments.delta`` / ``.done``, the
matching ``.done`` events, and ``response.completed`` or ``response.incomplete`` with the whole
response), each as ``event: TYPE`` + ``data: {...}`` with a running ``sequence_number``.

Nothing is stored (``store`` is accepted and ignored): ``previous_response_id`` is refused with a
400 asking for the whole conversation in ``input``.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ..tokenizer import THINK_END
from .prepare import ChatJob, ChatSpec, sampling_fields
from .protocol import APIError, ResponsesRequest, parse_body
from .streaming import ClientGone, ShuttingDown, json_reply, raise_engine_error, shutting_down, sse

if TYPE_CHECKING:
    from .app import Server


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _parts_text(content: Any, where: str) -> Any:
    """Responses content (a string or input/output text parts) in the chat message form."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts", param="input")
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text", "refusal"):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise APIError(400, f"{where}.content[{i}]: only text parts are supported, got {kind!r}", param="input")
    return [{"type": "text", "text": p.get("text", p.get("refusal", ""))} for p in content]


def _tools(tools: list[dict] | None) -> list[dict] | None:
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise APIError(400, f"tools[{i}]: only function tools are supported, got {kind!r}", param="tools")
        fn = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}",
                   param="tool_choice")


def _format(text: dict | None) -> dict | None:
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise APIError(400, "text.format must be an object", param="text")
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema") or {}}}
    if fmt.get("type") in ("text", "json_object"):
        return {"type": fmt["type"]}
    raise APIError(400, f"text.format.type must be 'text', 'json_object' or 'json_schema', got {fmt.get('type')!r}",
                   param="text")


def _messages(req: ResponsesRequest) -> list[dict]:
    messages: list[dict] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    items = [{"type": "message", "role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    if not items:
        raise APIError(400, "input must not be empty", param="input")
    reasoning = None           # a reasoning item's text, for the assistant turn that follows it
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            msg = {"role": role, "content": _parts_text(item.get("content"), where)}
            if role == "assistant" and reasoning is not None:
                msg["reasoning_content"], reasoning = reasoning, None
            messages.append(msg)
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise APIError(400, f"{where}: a function_call item needs call_id and name", param="input")
            arguments = item.get("arguments", "")
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                msg = {"role": "assistant", "content": None, "tool_calls": [call]}
                if reasoning is not None:
                    msg["reasoning_content"], reasoning = reasoning, None
                messages.append(msg)
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                output = _parts_text(output, where)
            elif not isinstance(output, str):
                raise APIError(400, f"{where}.output must be a string", param="input")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        else:
            raise APIError(400, f"{where}: input items of type {kind!r} are not supported (message, function_call, "
                                "function_call_output and reasoning are)", param="input")
    return messages


def chat_spec(req: ResponsesRequest) -> ChatSpec:
    """The chat a Responses request asks for."""
    if req.previous_response_id:
        raise APIError(400, "previous_response_id is not supported: this server stores no responses; send the "
                            "whole conversation in input", param="previous_response_id")
    thinking = None
    if req.reasoning is not None:
        thinking = req.reasoning.get("effort") != "none"
    return ChatSpec(messages=_messages(req), sampling=sampling_fields(req), tools=_tools(req.tools),
                    tool_choice=_tool_choice(req.tool_choice), parallel_tool_calls=req.parallel_tool_calls,
                    response_format=_format(req.text), thinking=thinking, max_tokens=req.max_output_tokens,
                    max_tokens_param="max_output_tokens", seed=req.seed)


class _Events:
    """Typed, numbered server-sent events of one streamed response."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, kind: str, **fields) -> str:
        event = {"type": kind, "sequence_number": self.n, **fields}
        self.n += 1
        return sse(event, event=kind)


class ResponsesAPI:
    """The endpoint's two halves: :meth:`prepare` (a preparing thread) and :meth:`respond`."""

    def __init__(self, server: "Server"):
        self.server = server

    def prepare(self, raw: bytes) -> tuple[ResponsesRequest, ChatJob]:
        prep = self.server.prep
        req = parse_body(raw, ResponsesRequest, prep.limits)
        prep.check_model(req.model)
        return req, prep.chat_job(chat_spec(req))

    # ------------------------------------------------------------------ the response object
    def _shell(self, req: ResponsesRequest, job: ChatJob, rid: str, created: int) -> dict:
        fmt = (req.text or {}).get("format") or {"type": "text"}
        return {"id": rid, "object": "response", "created_at": created, "status": "in_progress",
                "model": self.server.model_name, "output": [], "error": None, "incomplete_details": None,
                "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
                "parallel_tool_calls": req.parallel_tool_calls, "previous_response_id": None,
                "reasoning": {"effort": (req.reasoning or {}).get("effort"), "summary": None},
                "store": False, "temperature": req.temperature, "text": {"format": fmt},
                "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
                "tools": req.tools or [], "top_p": req.top_p, "truncation": "disabled", "usage": None,
                "user": req.user, "metadata": req.metadata or {}}

    def _usage(self, job: ChatJob, ids: list[int]) -> dict:
        reasoning = 0
        if job.thinking:
            end = self.server.tok.token_id(THINK_END)
            reasoning = ids.index(end) + 1 if end in ids else len(ids)
        return {"input_tokens": len(job.prompt), "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": len(ids), "output_tokens_details": {"reasoning_tokens": reasoning},
                "total_tokens": len(job.prompt) + len(ids)}

    @staticmethod
    def _finish(shell: dict, reason: str | None) -> dict:
        if reason == "length":
            shell.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
        else:
            shell["status"] = "completed"
        shell["completed_at"] = int(time.time())
        return shell

    async def respond(self, req: ResponsesRequest, job: ChatJob, request: Request):
        server = self.server
        gens, out = server.start(job.prompt, job.params)
        rid, created = _new_id("resp"), int(time.time())
        if req.stream:
            return StreamingResponse(self._stream(req, job, gens, out, request, rid, created),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        ids: list[int] = []
        reason = cut = None
        try:
            async for _, delta in server.deltas(gens, out, request):
                raise_engine_error(delta)
                ids += delta.token_ids
                reason, cut = delta.finish_reason or reason, delta.stop_text_len
        except ClientGone:
            return Response(status_code=499)
        except ShuttingDown:
            raise shutting_down() from None
        parser = job.parsers[0]
        parser.update(ids, final=True, cut=cut)     # cut: where the engine found a stop string
        shell = self._shell(req, job, rid, created)
        if job.thinking and parser.reasoning:
            shell["output"].append({"type": "reasoning", "id": _new_id("rs"), "status": "completed", "summary": [],
                                    "content": [{"type": "reasoning_text", "text": parser.reasoning}]})
        if parser.content or not parser.tool_calls:
            shell["output"].append({"type": "message", "id": _new_id("msg"), "status": "completed",
                                    "role": "assistant", "content": [
                                        {"type": "output_text", "text": parser.content, "annotations": [],
                                         "logprobs": []}]})
        for call in parser.tool_calls:
            shell["output"].append(self._call_item(call, "completed"))
        shell["usage"] = self._usage(job, ids)
        return await json_reply(self._finish(shell, reason))

    @staticmethod
    def _call_item(call: dict, status: str, arguments: str | None = None) -> dict:
        fn = call["function"]
        return {"type": "function_call", "id": _new_id("fc"), "call_id": call["id"], "name": fn["name"],
                "arguments": fn["arguments"] if arguments is None else arguments, "status": status}

    async def _stream(self, req, job: ChatJob, gens, out, request, rid: str, created: int):
        server = self.server
        ev = _Events()
        shell = self._shell(req, job, rid, created)
        yield ev("response.created", response=dict(shell))
        yield ev("response.in_progress", response=dict(shell))
        output: list[dict] = []       # finished items, for the final response
        open_item: dict | None = None  # the reasoning or message item being streamed
        text = ""

        def close_open():
            nonlocal open_item, text
            if open_item is None:
                return []
            idx, item = len(output), open_item
            if item["type"] == "reasoning":
                part = {"type": "reasoning_text", "text": text}
                events = [ev("response.reasoning_text.done", item_id=item["id"], output_index=idx, content_index=0,
                             text=text)]
            else:
                part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
                events = [ev("response.output_text.done", item_id=item["id"], output_index=idx, content_index=0,
                             text=text, logprobs=[])]
            item = {**item, "status": "completed", "content": [part]}
            events += [ev("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0,
                          part=part),
                       ev("response.output_item.done", output_index=idx, item=item)]
            output.append(item)
            open_item, text = None, ""
            return events

        def open_new(kind: str):
            nonlocal open_item
            idx = len(output)
            if kind == "reasoning":
                open_item = {"type": "reasoning", "id": _new_id("rs"), "status": "in_progress", "summary": [],
                             "content": []}
                part = {"type": "reasoning_text", "text": ""}
            else:
                open_item = {"type": "message", "id": _new_id("msg"), "status": "in_progress", "role": "assistant",
                             "content": []}
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            return [ev("response.output_item.added", output_index=idx, item=dict(open_item)),
                    ev("response.content_part.added", item_id=open_item["id"], output_index=idx, content_index=0,
                       part=part)]

        ids: list[int] = []
        reason = None
        parser = job.parsers[0]
        try:
            async for _, delta in server.deltas(gens, out, request):
                if delta.error:
                    yield ev("error", code="server_error", message="internal server error", param=None)
                    return
                ids += delta.token_ids
                reason = delta.finish_reason or reason
                part = parser.update(ids, final=delta.finish_reason is not None, cut=delta.stop_text_len)
                for kind, piece in (("reasoning", part.reasoning), ("message", part.content)):
                    if not piece:
                        continue
                    if open_item is None or open_item["type"] != kind:
                        for e in close_open() + open_new(kind):
                            yield e
                    text += piece
                    name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
                    extra = {} if kind == "reasoning" else {"logprobs": []}
                    yield ev(name, item_id=open_item["id"], output_index=len(output), content_index=0, delta=piece,
                             **extra)
                for call in part.tool_calls:
                    for e in close_open():
                        yield e
                    idx = len(output)
                    item = self._call_item(call, "in_progress", arguments="")
                    args = call["function"]["arguments"]
                    yield ev("response.output_item.added", output_index=idx, item=dict(item))
                    yield ev("response.function_call_arguments.delta", item_id=item["id"], output_index=idx,
                             delta=args)
                    yield ev("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                             arguments=args)
                    item.update(arguments=args, status="completed")
                    output.append(item)
                    yield ev("response.output_item.done", output_index=idx, item=item)
        except ClientGone:
            return
        except ShuttingDown:
            # The Responses API ends a stream with its typed error event (no [DONE] in this protocol).
            err = shutting_down()
            yield ev("error", code=err.code, message=err.message, param=None)
            return
        if not any(item["type"] in ("message", "function_call") for item in output) and \
                (open_item is None or open_item["type"] != "message"):
            for e in close_open() + open_new("message"):       # an empty reply is still one message
                yield e
        for e in close_open():
            yield e
        shell["output"] = output
        shell["usage"] = self._usage(job, ids)
        final = self._finish(shell, reason)
        yield ev("response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final)
