"""OpenAI request bodies (validated strictly: a string is not a number) and the error body."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError


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


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None


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
                          "literal_error", "enum"})


def parse_body(cls: type[BaseModel], body: Any) -> BaseModel:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(body).__name__}.")
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"]]
        # Union members appear in loc as type names ('str', 'list[int]'); they are not fields.
        fields = [p for p in loc if not (p[:1].isalpha() and ("[" in p or p in ("str", "int", "float", "bool")))]
        param = ".".join(fields) or None
        if first["type"] == "missing":
            raise APIError(400, f"Missing required field '{param}'.", param=param, code="missing_field")
        message = f"Invalid value for '{param}': {first['msg']} (got {first.get('input')!r})."
        code = "invalid_value" if first["type"] in VALUE_ERRORS else "invalid_type"
        raise APIError(400, message, param=param, code=code)


def message_text(message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)
