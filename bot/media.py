"""User media -> OpenAI content parts: images as `image_url` data URLs, audio as `input_audio`.

Against an engine that cannot hear (no `masque` extras seen), audio is
transcribed first through /v1/audio/transcriptions and sent as text instead.
"""

from __future__ import annotations

import base64
import io
import mimetypes
from collections.abc import Sequence
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from bot.engine_client import EngineClient
    from bot.pipeline import InputAttachment

DEFAULT_AUDIO_FORMAT = "wav"
# input_audio.format names, by the suffix or MIME subtype we see from Discord.
AUDIO_FORMATS = {"wav": "wav", "x-wav": "wav", "wave": "wav", "mp3": "mp3", "mpeg": "mp3", "ogg": "ogg",
                 "oga": "ogg", "opus": "ogg", "flac": "flac", "x-flac": "flac", "m4a": "m4a", "mp4": "m4a",
                 "webm": "webm"}


def audio_format(filename: str, content_type: str) -> str:
    """The `input_audio.format` for a file: from its suffix, else its MIME type, else wav."""
    suffix = PurePath(filename).suffix.lower().lstrip(".")
    subtype = content_type.split(";")[0].split("/")[-1].strip().lower() if content_type else ""
    return AUDIO_FORMATS.get(suffix) or AUDIO_FORMATS.get(subtype) or DEFAULT_AUDIO_FORMAT


def image_part(data: bytes, content_type: str, filename: str = "") -> dict[str, Any]:
    """An `image_url` part holding the image as a base64 data URL."""
    mime = content_type.split(";")[0].strip() or mimetypes.guess_type(filename)[0] or "image/png"
    url = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return {"type": "image_url", "image_url": {"url": url}}


def audio_part(data: bytes, filename: str, content_type: str) -> dict[str, Any]:
    """An `input_audio` part (base64 data and its format)."""
    return {"type": "input_audio", "input_audio": {
        "data": base64.b64encode(data).decode("ascii"), "format": audio_format(filename, content_type)}}


def media_parts(attachments: Sequence[InputAttachment], with_audio: bool = True) -> list[dict[str, Any]]:
    """Content parts for a turn's images (always) and audio (when the engine hears it natively)."""
    parts = []
    for item in attachments:
        if item.kind == "image":
            parts.append(image_part(item.data, item.content_type, item.filename))
        elif item.kind == "audio" and with_audio:
            parts.append(audio_part(item.data, item.filename, item.content_type))
    return parts


async def transcribe_audio(engine: EngineClient, attachments: Sequence[InputAttachment]) -> list[str]:
    """Transcripts of the audio attachments, in order, through the engine's transcription endpoint."""
    return [await engine.transcribe(a.data, a.filename, a.content_type) for a in attachments if a.kind == "audio"]


def attachment_meta(attachments: Sequence[InputAttachment]) -> list[dict]:
    """What the store keeps about attachments (never the bytes): kind, name, url, type, size, and an
    image's width and height (read from its header)."""
    out = []
    for a in attachments:
        meta = {"kind": a.kind, "filename": a.filename, "url": a.url, "content_type": a.content_type,
                "size": len(a.data)}
        if a.kind == "image":
            meta.update(image_dimensions(a.data))
        out.append(meta)
    return out


def image_dimensions(data: bytes) -> dict[str, int]:
    """`{"width": W, "height": H}` from an image's header; {} when it is not an image Pillow knows."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return {"width": image.width, "height": image.height}
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return {}


def annotate(meta: list[dict], heard: Sequence[str], seen: Sequence[str]) -> list[dict]:
    """Attach transcripts to audio items and captions to image items, in order."""
    spoken, shown, out = iter(heard), iter(seen), []
    for item in meta:
        item = dict(item)
        if item.get("kind") == "audio" and not item.get("transcript"):
            item["transcript"] = next(spoken, "")
        elif item.get("kind") == "image" and not item.get("caption"):
            item["caption"] = next(shown, "")
        out.append({k: v for k, v in item.items() if v != "" or k in ("url", "content_type")})
    return out
