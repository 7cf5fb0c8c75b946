"""Pydantic schema of POST /v1/completions (OpenAI's legacy text completions) and its bodies.

The request shares the chat request's sampling fields (:class:`SamplingRequest`), ranges and
errors included; what it adds follows vLLM's ``CompletionRequest``: ``prompt`` as text, texts,
token ids or lists of token ids, and ``echo``. Unknown fields (SillyTavern's
``truncation_length``, ``ignore_eos``...) are ignored, as the chat request ignores them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import ValidationInfo, field_validator

from engine.protocol.chat import SamplingRequest, openai_object

# OpenAI allows 4 stop strings; vLLM and llama.cpp set no limit, and SillyTavern sends one per
# speaker and instruct sequence. Every stop string is searched after every token.
MAX_COMPLETION_STOP_STRINGS = 64

PROMPT_SHAPES = ("a string, a list of strings, a list of token ids or a list of lists of token "
                 "ids, none of them empty")


def _token_ids(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value))


def _prompt_shape(value: Any) -> bool:
    """Whether ``value`` is one of the prompt forms OpenAI and vLLM accept."""
    if isinstance(value, str) or _token_ids(value):
        return True
    return isinstance(value, list) and bool(value) and (
        all(isinstance(item, str) for item in value) or all(_token_ids(item) for item in value)
    )


class CompletionRequest(SamplingRequest):
    """The request body of POST /v1/completions."""

    max_stop: ClassVar[int] = MAX_COMPLETION_STOP_STRINGS

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    # accepted only at their "off" values (see the validators)
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if not _prompt_shape(value):
            raise ValueError(f"prompt must be {PROMPT_SHAPES}")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("logprobs are not supported by this server")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported by this server")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported by this server")
        return value

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a text or its token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt[0], int):
            return [prompt]  # one prompt of token ids
        return list(prompt)


def text_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    """One entry of a text completion's ``choices`` (whole or streamed)."""
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def text_completion_body(
    completion_id: str,
    model: str,
    created: int,
    choices: list[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """A ``text_completion`` object: the whole response, or one chunk of a stream."""
    return openai_object("text_completion", completion_id, model, created, choices, **extra)
