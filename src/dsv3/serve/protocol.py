"""Request bodies of the OpenAI API as pydantic models, and OpenAI-style errors.

Every bad input becomes an :class:`APIError` with a 4xx status and a message naming the field at
fault, rendered as OpenAI does::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Unknown fields are ignored (clients send many we don't use); known fields are type-checked strictly
(``"temperature": "hot"`` or ``"n": 1.5`` is a 400, not a silent conversion).
"""

from __future__ import annotations

import json
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Ranges the OpenAI API documents; the server rejects values outside them with a 400.
MAX_N = 16                 # completions per request (each one is a sequence in the engine)
MAX_STOP = 16              # stop strings per request (OpenAI: 4)
MAX_TOP_LOGPROBS = 20      # OpenAI's cap for chat top_logprobs
MAX_COMPLETION_LOGPROBS = 20


class APIError(Exception):
    """An error the server answers with ``status`` and OpenAI's error JSON."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by chat and completions requests."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1 - MAX_N)   # torch generators take 64-bit seeds
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)                         # vLLM extension
    min_p: float | None = Field(None, ge=0, le=1)                  # vLLM extension
    repetition_penalty: float | None = Field(None, gt=0)           # vLLM extension
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    max_tokens: int | None = Field(None, ge=1)
    ignore_eos: bool = False                                        # vLLM extension (benchmarks)
    user: str | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"stop: at most {MAX_STOP} stop strings, got {len(stops)}", param="stop")
        if any(not s for s in stops):
            raise APIError(400, "stop: stop strings must be non-empty", param="stop")
        return stops


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``; ``suffix`` turns the request into fill-in-the-middle."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    max_tokens: int | None = Field(16, ge=1)                         # OpenAI's default for completions
    best_of: int | None = None


def parse_body(raw: bytes, model: type[_Strict]) -> _Strict:
    """Bytes of a request body -> a validated request, or a 400 naming the problem."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        # For unions pydantic appends the member type to the location; the first element is the field.
        param = str(err["loc"][0]) if err["loc"] else None
        raise APIError(400, f"{where}: {err['msg']} (got {_short(err.get('input'))})", param=param) from None


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
