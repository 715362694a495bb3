"""The OpenAI request bodies fermion's server accepts, and the OpenAI error format it answers with.

Requests are validated in full before any work is done: a wrong type, a value out of range or a field the server
does not know is a 400 naming the field, as OpenAI's API does. The parameters OpenAI has that the server cannot
honour (suffix, best_of > n, logprobs together with echo, which would need the prompt's log-probabilities) are
refused with a message saying so, never ignored. Tools, logprobs / top_logprobs and logit_bias are served
(serve/tools.py, serve/logprobs.py). Sampling extensions that vLLM also accepts (top_k, min_p, repetition_penalty,
ignore_eos, stop_token_ids) go in the request body; the official client sends them through `extra_body`. Every
number must be finite (JSON has no NaN or Infinity, but Python's json module writes them, and 1e400 parses as
infinity) and in the range the engine takes (infer/sampling.py's LIMITS, the one table of them); a seed is a signed
64-bit integer, as in vLLM.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from fermion.infer.sampling import LIMITS, MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings per request, OpenAI's limit
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' `logprobs`, OpenAI's legacy limit


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}} with a status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):  # noqa: A002 - OpenAI's name
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers  # HTTP headers the answer carries (Allow on a 405, Connection: close on a 413)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def within(name: str) -> FieldInfo:
    """The pydantic constraint of a sampling parameter's range in LIMITS."""
    bounds = LIMITS[name]
    return Field(ge=None if bounds.open_low else bounds.low, gt=bounds.low if bounds.open_low else None,
                 le=None if bounds.open_high else bounds.high, lt=bounds.high if bounds.open_high else None)


Temperature = Annotated[float, within("temperature")]
TopP = Annotated[float, within("top_p")]
Stop = StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP)] | None
Bias = Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS, allow_inf_nan=False)]


class StreamOptions(Strict):
    include_usage: StrictBool = False


class Sampling(Strict):
    """What every generating request shares."""

    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stop: Stop = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, within("presence_penalty")] = 0.0
    frequency_penalty: Annotated[float, within("frequency_penalty")] = 0.0
    logit_bias: dict[str, Bias] | None = None  # token id (a string, as JSON keys are) -> bias
    user: StrictStr | None = None
    # extensions, as vLLM names them
    top_k: Annotated[StrictInt, Field(ge=-1, le=LIMITS["top_k"].high)] = 0  # -1 (vLLM's old "off") is 0
    min_p: Annotated[float, within("min_p")] = 0.0
    repetition_penalty: Annotated[float, within("repetition_penalty")] = 1.0
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None):
        for key in bias or {}:
            if not re.fullmatch(r"[0-9]{1,12}", key):
                raise ValueError(f"logit_bias keys are token ids written as strings of digits, like \"50256\"; "
                                 f"got {key!r}")
        return bias

    @model_validator(mode="after")
    def _unsupported(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def token_bias(self) -> dict[int, float]:
        return {int(token): bias for token, bias in (self.logit_bias or {}).items()}


class CompletionRequest(Sampling):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    @model_validator(mode="after")
    def _completion_only(self):
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported by this server")
        if self.echo and self.logprobs is not None:
            raise ValueError("logprobs together with echo (log-probabilities of the prompt) is not supported by this "
                             "server; leave one out")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be an empty list")
        return self


class TextPart(Strict):
    type: Literal["text"]
    text: StrictStr


class ToolCallFunction(Strict):
    name: StrictStr
    arguments: StrictStr  # a JSON object, as a string

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str) -> str:
        try:
            value = json.loads(arguments)
        except ValueError as err:
            raise ValueError(f"arguments must be a JSON object written as a string: {err}") from None
        if not isinstance(value, dict):
            raise ValueError("arguments must be a JSON object written as a string")
        return arguments


class ToolCall(Strict):
    id: StrictStr
    type: Literal["function"]
    function: ToolCallFunction


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, sent back with the tools' results
    tool_call_id: StrictStr | None = None  # a tool's result: the call it answers
    refusal: StrictStr | None = None  # what the API answered, as clients send its message back

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls belong to assistant messages, not {self.role} ones")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a message with role tool needs tool_call_id (the id of the call it answers), and "
                             "only such a message has one")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(Strict):
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments object
    strict: StrictBool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Strict):
    name: StrictStr


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(Strict):
    name: StrictStr
    schema_: dict[str, Any] = Field(alias="schema")
    description: StrictStr | None = None
    strict: StrictBool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self


class ChatCompletionRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    response_format: ResponseFormat | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None  # None: true, as OpenAI defaults it

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, top: int | None, info: ValidationInfo):
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs to be true")
        return top

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, tools: list[Tool] | None):
        names = [tool.function.name for tool in tools or []]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"tools: the function {twice[0]!r} is defined more than once")
        return tools

    @model_validator(mode="after")
    def _chat_only(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top(self) -> int | None:
        """How many alternatives each token's log-probability comes with; None: no log-probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict]:
        """Messages as the chat templates take them ("developer" is OpenAI's newer name for "system"): a call's
        arguments as an object and a tool's result with the name of the function it answers, as transformers'
        tool-calling templates read them."""
        out, calls = [], {}
        for i, m in enumerate(self.messages):
            message = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.tool_calls:
                message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": json.loads(c.function.arguments)}} for c in m.tool_calls]
                calls.update((c.id, c.function.name) for c in m.tool_calls)
            if m.role == "tool":
                if m.tool_call_id not in calls:
                    raise APIError(400, f"messages.{i}: a tool message must answer a call of an earlier assistant "
                                        f"message; no call has the id {m.tool_call_id!r}",
                                   param=f"messages.{i}.tool_call_id")
                message.update(tool_call_id=m.tool_call_id, name=calls[m.tool_call_id])
            out.append(message)
        return out


def describe_validation_error(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's errors -> one message naming the field, and the field's dotted path as OpenAI's `param`."""
    error = errors[0]
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    # Union members add their type name to the location (prompt.str, prompt.list[int].0); keep the field path.
    path = [part for part in location if not any(c in part for c in "[]") and part not in ("str", "int", "float",
                                                                                             "bool", "function-after")]
    param = ".".join(path) or None
    kind = error.get("type", "")
    if kind in ("json_invalid", "json_type"):
        return f"the request body is not valid JSON: {error.get('msg', '')} (at {error.get('ctx', {})})", None
    if kind == "missing":
        return f"'{param}' is required", param
    if kind == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param
    message = error.get("msg", "invalid value").removeprefix("Value error, ")
    if param and kind != "value_error":
        given = error.get("input")
        return f"invalid value for '{param}': {message} (got {given!r})"[:500], param
    return message, param
