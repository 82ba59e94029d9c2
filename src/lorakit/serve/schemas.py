"""OpenAI request bodies (validated strictly: a string is not a number), the error body, and the 400 that a
body failing validation gets. The routes take these models as typed bodies, so /openapi.json describes them."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # Unknown fields are ignored (clients send vendor extras); known fields must have the right type.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: str  # "text" (the default), "json_object", "json_schema"; the schema's own fields are ignored


Stop = Union[str, list[str], None]
MAX_LOGPROBS = 20  # most likely tokens listed per position (OpenAI's chat limit; vLLM's default too)


class _SamplingFields(_Strict):
    model: str
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    n: Optional[int] = Field(default=None, ge=1, le=16)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Stop = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    user: Optional[str] = None
    logit_bias: Optional[dict[str, float]] = None  # token id (as a string) -> bias in -100..100
    response_format: Optional[ResponseFormat] = None
    ignore_eos: bool = False  # vLLM extension: generate exactly max_tokens tokens (benchmarks)
    # vLLM's sampling extensions
    top_k: Optional[int] = Field(default=None, ge=-1)  # -1 or 0: off
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0, le=10.0)


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    echo: Optional[bool] = False
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


Content = Union[str, list[TextPart]]


class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: Content
    name: Optional[str] = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: Content  # required, as in OpenAI's API (a user message without content is a 400)
    name: Optional[str] = None


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: Optional[Content] = None  # OpenAI lets an assistant turn that called tools leave it out
    name: Optional[str] = None


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: Content
    tool_call_id: Optional[str] = None


# One message type per role, chosen by `role` (as OpenAI's and vLLM's schemas do).
ChatMessage = Annotated[Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage], Field(discriminator="role")]


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: Optional[list[Any]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    functions: Optional[list[Any]] = None  # the deprecated form of tools
    function_call: Union[str, dict[str, Any], None] = None
    audio: Optional[dict[str, Any]] = None


class LoadAdapterRequest(_Strict):
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(_Strict):
    lora_name: str
    lora_int_id: Optional[int] = None  # sent by some vLLM clients; unused


# pydantic error types for a value of the right type that is out of range or not one of the allowed ones
# (the server's own checks call these invalid_value too); every other failure is a wrong type.
VALUE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of",
                          "finite_number", "too_short", "too_long", "string_too_short", "string_too_long",
                          "literal_error", "enum", "union_tag_invalid"})


def _param(loc: tuple, body: Any, missing: bool) -> Optional[str]:
    """The dotted field path of an error's `loc` (messages.0.content), walking the body alongside it: loc also
    holds the labels of union members ('str', 'list[int]', a message's role), which are not fields."""
    fields, node = [], body
    for i, part in enumerate(loc):
        if isinstance(node, dict) and isinstance(part, str) and (part in node or (missing and i == len(loc) - 1)):
            fields.append(part)
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int):
            fields.append(str(part))
            node = node[part] if 0 <= part < len(node) else None
    return ".".join(fields) or None


def validation_error(errors: list[dict], body: Any) -> APIError:
    """The 400 for a request body that failed validation (FastAPI's RequestValidationError): the first problem,
    naming the field, with code missing_field, invalid_type or invalid_value (invalid_json for bad JSON)."""
    first = _most_specific(errors, body)
    kind = first["type"]
    loc = _body_loc(first)
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first["msg"])
        return APIError(400, f"The request body is not valid JSON ({detail} at character {loc[0] if loc else 0}).",
                        code="invalid_json")
    if not loc:
        if isinstance(body, (bytes, bytearray)):  # FastAPI reads a body as JSON only when it is declared so
            return APIError(400, "The request body must be JSON sent with the header 'Content-Type: "
                            "application/json' (curl: -H 'Content-Type: application/json').",
                            code="invalid_content_type")
        if kind == "missing":
            return APIError(400, "The request body is empty; send a JSON object.", code="missing_field")
        return APIError(400, f"The request body must be a JSON object, got {_json_type(body)}.", code="invalid_type")
    if kind in ("union_tag_not_found", "union_tag_invalid"):  # a message without a known role
        loc, kind = loc + ("role",), "missing" if kind == "union_tag_not_found" else kind
    param = _param(loc, body, kind == "missing")
    if kind == "missing":
        return APIError(400, f"Missing required field '{param}'.", param=param, code="missing_field")
    message = f"Invalid value for '{param}': {first['msg']} (got {first.get('input')!r})."
    return APIError(400, message, param=param, code="invalid_value" if kind in VALUE_ERRORS else "invalid_type")


def _body_loc(error: dict) -> tuple:
    loc = tuple(error["loc"])
    return loc[1:] if loc[:1] == ("body",) else loc


def _most_specific(errors: list[dict], body: Any) -> dict:
    """The first error, or one deeper inside the same field: a value that fits no member of a union gets an error
    from each member, and the deepest one (content.0.type, not content: not a string) says what to fix."""
    def path(error: dict) -> list[str]:
        return (_param(_body_loc(error), body, error["type"] == "missing") or "").split(".")

    first = path(errors[0])
    inside = [e for e in errors if path(e)[:len(first)] == first]
    return max(inside, key=lambda e: len(path(e)))  # the first of the deepest


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def message_text(message) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)
