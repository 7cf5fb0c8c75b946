"""Schemas of /v1/embeddings (OpenAI's)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings. ``input`` is one string or a list of strings.

    OpenAI also takes token-id arrays (its own tokenizer's ids); those mean nothing to
    another model, so they are refused with a clear message rather than guessed at.
    """

    model_config = ConfigDict(extra="ignore")

    input: str | list[str] | list[int] | list[list[int]]
    model: str = Field(min_length=1)
    # The official Python client asks for base64 unless told otherwise, then decodes it.
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    @field_validator("input")
    @classmethod
    def _texts_only(cls, value: str | list) -> str | list[str]:
        """Strings only, none of them empty."""
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("input must not be an empty list")
        if not all(isinstance(text, str) for text in texts):
            raise ValueError("token-id arrays are not supported; send the text instead")
        for index, text in enumerate(texts):
            if not text.strip():
                raise ValueError(f"input[{index}] is empty")
        return value

    def texts(self) -> list[str]:
        """The inputs as a list."""
        return [self.input] if isinstance(self.input, str) else list(self.input)  # type: ignore[arg-type]


class EmbeddingData(BaseModel):
    """One vector: floats, or little-endian float32 bytes in base64."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    """Tokens read."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """The OpenAI embeddings response."""

    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
