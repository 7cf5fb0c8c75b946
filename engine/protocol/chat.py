"""Pydantic schemas of /v1/chat/completions (the OpenAI dialect) and its response bodies."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4  # OpenAI's limit


class TextPart(BaseModel):
    """``{"type": "text", "text": ...}``"""

    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    """The ``image_url`` object: a data URL (or, when allowed, an http(s) URL)."""

    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] = "auto"


class ImagePart(BaseModel):
    """``{"type": "image_url", "image_url": {"url": ...}}``"""

    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(BaseModel):
    """The ``input_audio`` object: base64 audio and its format."""

    data: str = Field(min_length=1)
    format: Literal["wav", "mp3", "ogg", "flac", "webm", "m4a", "opus"]


class AudioPart(BaseModel):
    """``{"type": "input_audio", "input_audio": {"data": ..., "format": ...}}``"""

    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    """One message of the conversation."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` is meaningful."""

    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What a chat and a text completion request share: the model, the samplers, the stop
    strings and streaming. Unknown fields are ignored, as vLLM's extras from other clients are."""

    model_config = ConfigDict(extra="ignore")
    max_stop: ClassVar[int] = MAX_STOP_STRINGS

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    # vLLM's extra sampling parameters (OpenAI clients send them in ``extra_body``)
    repetition_penalty: float | None = Field(None, gt=0)
    min_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 and 0 both mean off
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > cls.max_stop:
            raise ValueError(f"at most {cls.max_stop} stop strings")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        """``stop`` as a tuple, whichever form it came in."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingRequest):
    """The request body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the newer name) or ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


def new_completion_id(prefix: str = "chatcmpl") -> str:
    """An id shaped like OpenAI's (``chatcmpl-...`` for chats, ``cmpl-...`` for text)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    completion_id: str,
    model: str,
    choices: list[tuple[str, str]],
    usage: dict[str, int],
    masque: dict[str, Any],
) -> dict[str, Any]:
    """A ``chat.completion`` object from ``(text, finish_reason)`` per choice."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": index,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
            for index, (text, finish) in enumerate(choices)
        ],
        "usage": usage,
        "masque": masque,
    }


def openai_object(kind: str, completion_id: str, model: str, created: int,
                  choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """An OpenAI response object (``chat.completion.chunk``, ``text_completion``...)."""
    return {"id": completion_id, "object": kind, "created": created, "model": model,
            "choices": choices, **extra}


def chunk_body(
    completion_id: str,
    model: str,
    created: int,
    choices: list[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """A ``chat.completion.chunk`` object."""
    return openai_object("chat.completion.chunk", completion_id, model, created, choices, **extra)


def chunk_choice(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> dict:
    """One entry of a chunk's ``choices``."""
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
