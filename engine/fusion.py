"""From OpenAI message parts to model inputs, on either fusion path.

First every image and audio part is checked and decoded (bad base64, not an image, too big,
not audio, too long: each a clear 400/413 naming the part). Then:

- native fusion keeps the media: the messages get ``{"type": "image"}`` / ``{"type": "audio"}``
  placeholders in place and the decoded media go to the omni model's own encoders;
- composed fusion asks the ``caption`` role to describe each image and the ``stt`` role to
  transcribe each clip, and merges the results into the message text with clear markers.

Either way the response's ``masque`` object says which path ran and what was seen and heard.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.audio import decode_audio
from engine.errors import invalid_request, too_large
from engine.protocol.chat import AudioPart, ChatMessage, ImagePart, TextPart
from engine.registry import Registry
from engine.settings import LimitSettings

IMAGE_MARKER = "[Image: {text}]"
# With no image model (the offline preset has none with real weights) nothing is invented: the
# model is told that an image was shared, and its size.
UNSEEN_IMAGE_MARKER = "[An image was shared: {width}×{height}]"
AUDIO_MARKER = "[Voice message, transcribed: {text}]"
EMPTY_AUDIO = "(no speech heard)"
REMOTE_SCHEMES = ("http://", "https://")


@dataclass
class MediaItem:
    """One decoded image or audio clip, and where it came from."""

    message: int
    param: str
    value: Any  # PIL.Image.Image or a float32 16 kHz numpy array


@dataclass
class ParsedChat:
    """The conversation with its media decoded, in order."""

    messages: list[ChatMessage]
    images: list[MediaItem] = field(default_factory=list)
    audios: list[MediaItem] = field(default_factory=list)


def b64decode(data: str, param: str) -> bytes:
    """Strict base64 (whitespace tolerated) or a 400 naming ``param``."""
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise invalid_request(f"{param} is not valid base64.", param, "invalid_base64") from None


def data_url_bytes(url: str, param: str) -> bytes:
    """The payload of a ``data:<mime>;base64,<data>`` URL."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise invalid_request(
            f"{param} must be a base64 data URL (data:image/png;base64,...).", param, "invalid_url"
        )
    return b64decode(payload, param)


def decode_image(data: bytes, limits: LimitSettings, param: str) -> Image.Image:
    """Open and check an image: a real image, within the byte and pixel limits, as RGB."""
    if len(data) > limits.max_image_bytes:
        raise too_large(f"{param} is larger than {limits.max_image_bytes} bytes.", param)
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size  # read from the header, before decoding any pixels
        if width * height > limits.max_image_pixels:
            raise too_large(
                f"{param} is {width}x{height}; the limit is {limits.max_image_pixels} pixels.",
                param, "image_too_large",
            )
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError):
        raise invalid_request(f"{param} is not a readable image.", param, "invalid_image") from None
    return image.convert("RGB")


async def fetch_image(url: str, limits: LimitSettings, param: str) -> bytes:
    """Download a remote image (only when ``allow_remote_urls`` is on), within the size limit."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=20)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
            if resp.status != 200:
                raise invalid_request(f"{param}: fetching the URL gave HTTP {resp.status}.", param)
            data = await resp.content.read(limits.max_image_bytes + 1)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise invalid_request(f"{param}: could not fetch the URL ({exc}).", param) from None
    return data


async def image_bytes(part: ImagePart, limits: LimitSettings, param: str) -> bytes:
    """The bytes of an image part: a data URL, or a remote URL when allowed."""
    url = part.image_url.url
    if url.startswith(REMOTE_SCHEMES):
        if not limits.allow_remote_urls:
            raise invalid_request(
                f"{param}: remote image URLs are disabled on this server; send a data URL.",
                param, "remote_url_disabled",
            )
        return await fetch_image(url, limits, param)
    return data_url_bytes(url, param)


def decode_clip(part: AudioPart, limits: LimitSettings, param: str) -> np.ndarray:
    """Decode an input_audio part to 16 kHz mono float32, within the limits."""
    data = b64decode(part.input_audio.data, param)
    if len(data) > limits.max_audio_bytes:
        raise too_large(f"{param} is larger than {limits.max_audio_bytes} bytes.", param)
    return decode_audio(
        data, part.input_audio.format, max_seconds=limits.max_audio_seconds, param=param
    )


async def parse_media(messages: list[ChatMessage], limits: LimitSettings) -> ParsedChat:
    """Decode and check every image and audio part (decoding runs off the event loop)."""
    parsed = ParsedChat(messages)
    count = 0
    for index, message in enumerate(messages):
        if not isinstance(message.content, list):
            continue
        for slot, part in enumerate(message.content):
            param = f"messages[{index}].content[{slot}]"
            if isinstance(part, TextPart):
                continue
            count += 1
            if count > limits.max_parts:
                raise invalid_request(
                    f"At most {limits.max_parts} image and audio parts per request.", param,
                    "too_many_parts",
                )
            if isinstance(part, ImagePart):
                data = await image_bytes(part, limits, param)
                image = await asyncio.to_thread(decode_image, data, limits, param)
                parsed.images.append(MediaItem(index, param, image))
            else:
                clip = await asyncio.to_thread(decode_clip, part, limits, param)
                parsed.audios.append(MediaItem(index, param, clip))
    return parsed


def native_messages(parsed: ParsedChat) -> list[dict[str, Any]]:
    """Messages for an omni model's chat template: media parts become placeholders."""
    out = []
    for message in parsed.messages:
        if isinstance(message.content, list):
            content: Any = [_native_part(part) for part in message.content]
        else:
            content = message.content or ""
        out.append({"role": _template_role(message.role), "content": content})
    return out


def _native_part(part: TextPart | ImagePart | AudioPart) -> dict[str, str]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    return {"type": "image"} if isinstance(part, ImagePart) else {"type": "audio"}


def _template_role(role: str) -> str:
    # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
    return "system" if role == "developer" else role


async def compose(parsed: ParsedChat, registry: Registry) -> tuple[list[dict], dict[str, Any]]:
    """Text-only messages with captions and transcripts merged in, plus the masque report."""
    sees = registry.enabled("caption")
    captions = [await _caption(registry, item.value) if sees else "" for item in parsed.images]
    transcripts = [await _transcribe(registry, item.value) for item in parsed.audios]
    markers = [IMAGE_MARKER.format(text=caption) if sees else
               UNSEEN_IMAGE_MARKER.format(width=item.value.width, height=item.value.height)
               for item, caption in zip(parsed.images, captions, strict=True)]
    images, audios = iter(markers), iter(transcripts)
    out = []
    for message in parsed.messages:
        if isinstance(message.content, list):
            pieces = []
            for part in message.content:
                if isinstance(part, TextPart):
                    pieces.append(part.text)
                elif isinstance(part, ImagePart):
                    pieces.append(next(images))
                else:
                    pieces.append(AUDIO_MARKER.format(text=next(audios) or EMPTY_AUDIO))
            content = "\n".join(piece for piece in pieces if piece)
        else:
            content = message.content or ""
        out.append({"role": _template_role(message.role), "content": content})
    masque = {
        "fusion": "composed",
        "transcripts": [
            {"message": item.message, "text": text}
            for item, text in zip(parsed.audios, transcripts, strict=True)
        ],
        # Only real descriptions: with no image model the list is empty.
        "captions": [
            {"message": item.message, "text": text}
            for item, text in zip(parsed.images, captions, strict=True) if sees
        ],
    }
    return out, masque


async def _caption(registry: Registry, image: Image.Image) -> str:
    captioner = registry.get("caption")
    caption = await registry.queue("caption").run(captioner.caption, image)
    return " ".join(caption.split())  # one line, so the marker stays one line


async def _transcribe(registry: Registry, clip: np.ndarray) -> str:
    stt = registry.get("stt")
    transcript = await registry.queue("stt").run(stt.transcribe, clip)
    return " ".join(transcript.text.split())


def native_report() -> dict[str, Any]:
    """The masque object of the native path: the model saw and heard the media itself."""
    return {"fusion": "native", "transcripts": [], "captions": []}
