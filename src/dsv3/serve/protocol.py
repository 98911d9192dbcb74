"""Request bodies of the OpenAI API as pydantic models, and OpenAI-style errors.

Every bad input becomes an :class:`APIError` with a 4xx status and a message naming the field at
fault, rendered as OpenAI does::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Unknown fields are ignored (clients send many we don't use); known fields are type-checked strictly
(``"temperature": "hot"`` or ``"n": 1.5`` is a 400, not a silent conversion). JSON has one number
type, so an integer field takes an integer-valued float (``1489.0``) as OpenAI does.

:func:`parse_body` is the one way in: bytes -> :mod:`.body`'s checked JSON -> the request limits
that can be judged on the raw JSON (:class:`dsv3.serve.limits.Limits`) -> the model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from .body import BodyError, check_values, json_size_at_most, parse_json

# Ranges the OpenAI API documents; the server rejects values outside them with a 400.
MAX_N = 16                 # completions per request (each one is a sequence in the engine)
MAX_STOP = 16              # stop strings per request (OpenAI: 4)
MAX_STOP_CHARS = 1024      # characters per stop string (the reply parser holds back that much text)
MAX_TOP_LOGPROBS = 20      # OpenAI's cap for chat top_logprobs
MAX_COMPLETION_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024      # entries of logit_bias (OpenAI: 300)
LOGIT_BIAS_RANGE = 100.0   # OpenAI: each bias in [-100, 100]


class APIError(Exception):
    """An error the server answers with ``status`` and OpenAI's error JSON."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def limit_error(message: str, flag: str, param: str | None = None) -> APIError:
    """A 400 for a request over one of the server's limits, naming the flag that sets it."""
    return APIError(400, f"{message} (the server's limit, set by {flag})", param=param, code="limit_exceeded")


def _integral(value: Any) -> Any:
    # JSON has one number type: 1489.0 is the integer 1489 to most JSON libraries' users.
    if type(value) is float and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_integral)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Sampling fields every generating endpoint takes (OpenAI's and vLLM's names).

    Fields named like :class:`dsv3.engine.SamplingParams` fields are passed to it by name
    (:func:`dsv3.serve.prepare.sampling_fields`); the others are read by the server.
    """

    seed: Int | None = Field(None, ge=-2**63, le=2**63 - 1 - MAX_N)   # torch generators take 64-bit seeds
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: Int | None = Field(None, ge=-1)                         # vLLM extension
    min_p: float | None = Field(None, ge=0, le=1)                  # vLLM extension
    repetition_penalty: float | None = Field(None, gt=0)           # vLLM extension
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None                     # token id (a string key) -> bias
    ignore_eos: bool = False                                        # vLLM extension (benchmarks)

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[int, float] | None:
        if not bias:
            return None
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        out = {}
        for key, value in bias.items():
            if not (key.isascii() and key.isdigit() and len(key) <= 12):
                raise ValueError(f"keys must be token ids (decimal integers as strings), got {key!r}")
            if not -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:
                raise ValueError(f"biases must be in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}], got {value}")
            out[int(key)] = float(value)
        return out


class _Sampling(_SamplingFields):
    """Fields shared by chat and completions requests."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Int = Field(1, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = None
    max_tokens: Int | None = Field(None, ge=1)
    user: str | None = None

    def stop_list(self) -> list[str]:
        return check_stops(self.stop)


def check_stops(stop: str | list[str] | None) -> list[str]:
    """The ``stop`` field as a checked list."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop: at most {MAX_STOP} stop strings, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "stop: stop strings must be non-empty", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop: stop strings are at most {MAX_STOP_CHARS} characters", param="stop")
    return stops


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``; ``suffix`` turns the request into fill-in-the-middle.

    ``max_tokens: 0`` with ``echo`` and ``logprobs`` scores the prompt without generating (what
    lm-eval's loglikelihood tasks ask of ``local-completions``).
    """

    prompt: Union[str, list[str], list[int], list[list[int]]]
    suffix: str | None = None
    echo: bool = False
    logprobs: Int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    max_tokens: Int | None = Field(16, ge=0)                         # OpenAI's default for completions
    best_of: Int | None = None


class ResponsesRequest(_SamplingFields):
    """``POST /v1/responses`` (the OpenAI Responses API): the fields this server acts on.

    ``input`` is a string or a list of items (messages, ``function_call`` and
    ``function_call_output`` items); :mod:`dsv3.serve.responses` turns it into a chat. The sampling
    fields beyond ``temperature`` and ``top_p`` are the same extensions chat requests take.
    """

    model: str
    input: Union[str, list[dict[str, Any]]]
    instructions: str | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    max_output_tokens: Int | None = Field(None, ge=1)
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None


# Raw-JSON fields whose list length a limit caps, checked before anything walks the lists.
_COUNTED = {"messages": "max_messages", "input": "max_messages", "tools": "max_tools", "prompt": "max_prompts"}


def parse_body(raw: bytes, model: type[_Strict], limits=None) -> _Strict:
    """Bytes of a request body -> a validated request, or a 400 naming the problem.

    ``limits`` (a :class:`dsv3.serve.limits.Limits`) caps list lengths before the body is walked.
    """
    try:
        data = parse_json(raw)
    except BodyError as e:
        raise APIError(400, str(e)) from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    if limits is not None:
        for key, attr in _COUNTED.items():
            value = data.get(key)
            if not isinstance(value, list):
                continue
            if key == "prompt" and value and isinstance(value[0], int):
                continue                      # one prompt of token ids: the context length bounds it
            cap = getattr(limits, attr)
            if len(value) > cap:
                raise limit_error(f"{key}: at most {cap} items, got {len(value)}",
                                  "--" + attr.replace("_", "-"), param=key)
    try:
        check_values(data)
    except BodyError as e:
        raise APIError(400, str(e)) from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        # For unions pydantic appends the member type to the location; the first element is the field.
        param = str(err["loc"][0]) if err["loc"] else None
        raise APIError(400, f"{where}: {err['msg']} (got {_short(err.get('input'))})", param=param) from None
    except RecursionError:     # check_values bounds the depth; this is a second line
        raise APIError(400, "the request body is nested too deeply") from None


def _short(value: Any, limit: int = 80) -> str:
    import json

    if json_size_at_most(value, 4 * limit) is None:
        return f"a {type(value).__name__} too long to show"
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
