"""Schemas of /v1/audio/transcriptions, /v1/audio/speech and /v1/audio/voices (OpenAI's)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TranscriptionFormat = Literal["json", "text", "verbose_json", "srt", "vtt"]
SpeechFormat = Literal["wav", "opus", "pcm", "flac", "mp3"]


class TranscriptionForm(BaseModel):
    """The non-file fields of the multipart transcription request."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    language: str | None = None  # ISO-639-1, e.g. "en"
    prompt: str | None = None
    response_format: TranscriptionFormat = "json"
    temperature: float = Field(0.0, ge=0.0, le=1.0)

    @field_validator("language")
    @classmethod
    def _blank_is_auto(cls, value: str | None) -> str | None:
        """An empty language field means "detect it", as OpenAI treats it."""
        if value is None:
            return None
        return value.strip().lower() or None


class SegmentOut(BaseModel):
    """One segment of verbose_json."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class TranscriptionVerbose(BaseModel):
    """verbose_json: the text, language name, duration and timed segments."""

    task: Literal["transcribe"] = "transcribe"
    language: str
    duration: float
    text: str
    segments: list[SegmentOut]


class SpeechRequest(BaseModel):
    """POST /v1/audio/speech. The default format is mp3, as OpenAI's."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    input: str = Field(min_length=1)
    voice: str = Field(min_length=1)
    response_format: SpeechFormat = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)

    @field_validator("input")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        """Whitespace alone has nothing to say."""
        if not value.strip():
            raise ValueError("input must contain text to speak")
        return value


class VoiceOut(BaseModel):
    """One entry of GET /v1/audio/voices."""

    id: str
    object: Literal["voice"] = "voice"
    language: str
    sample_rate: int
    quality: str
    speakers: int


class VoiceList(BaseModel):
    """GET /v1/audio/voices: the voices, and which one is the default."""

    object: Literal["list"] = "list"
    data: list[VoiceOut]
    default: str
