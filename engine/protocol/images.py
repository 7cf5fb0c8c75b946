"""Schemas of /v1/images/generations (OpenAI's, plus ``negative_prompt``, ``seed``, ``steps``
and ``safety`` as extensions)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SIZE_PATTERN = re.compile(r"^(\d{1,5})x(\d{1,5})$")
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 4000
OPENAI_MAX_N = 10  # OpenAI's own ceiling; the server's max_n may be lower


def parse_size(size: str) -> tuple[int, int]:
    """``"WxH"`` as (width, height); raises ValueError on any other shape."""
    match = SIZE_PATTERN.match(size.strip().lower())
    if not match:
        raise ValueError(f"size must look like 512x512 (width x height), got {size!r}")
    return int(match.group(1)), int(match.group(2))


class ImageRequest(BaseModel):
    """POST /v1/images/generations."""

    model_config = ConfigDict(extra="ignore")  # quality, style, user... are accepted, unused

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int = Field(1, ge=1, le=OPENAI_MAX_N)
    size: str | None = None  # "WxH" or "auto"; None or "auto" = the server's default size
    response_format: Literal["b64_json", "url"] | None = None
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1)
    safety: bool | None = None  # None = the server's default (on)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        """A prompt of spaces paints nothing in particular."""
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value


class ImageData(BaseModel):
    """One generated image."""

    b64_json: str
    revised_prompt: str | None = None


class ImageExtras(BaseModel):
    """What made the images (the ``masque`` extension, ignored by OpenAI clients)."""

    seeds: list[int]
    steps: int
    safety: bool


class ImagesResponse(BaseModel):
    """The OpenAI images response, always ``b64_json`` PNGs."""

    created: int
    data: list[ImageData]
    size: str
    output_format: Literal["png"] = "png"
    masque: ImageExtras
