"""Discord voice messages: a persona's reply as a real voice message (the bubble with a waveform).

A voice message is a message with flag IS_VOICE_MESSAGE (1 << 13), no content, and exactly
one OGG Opus attachment whose `payload_json` entry carries `duration_secs` and `waveform`
(base64 of up to 256 one-byte amplitudes). discord.py 2.7 has no API for it: `File.to_dict`
knows no duration or waveform, and `handle_message_parameters` uploads every file as
application/octet-stream. So the multipart form is built here and sent through discord.py's
own request paths (`HTTPClient.request` for the bot, the webhook adapter for webhooks), which
keep rate limits, retries and auth.

The persona's webhook goes first; Discord refusing a webhook voice message (400/403) falls
back to the bot account, which can also reply to a message.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass
from typing import Any

import discord
import numpy as np
from discord.http import Route
from discord.webhook.async_ import async_context

from bot.discord_io.webhooks import PersonaIdentity, WebhookChannel, WebhookPoster
from bot.voice.audio import OPUS_RATE, decode_to_pcm, encode_ogg_opus, is_ogg_opus

log = logging.getLogger(__name__)

IS_VOICE_MESSAGE = 1 << 13
WAVEFORM_SAMPLES = 256  # Discord's maximum
FILENAME = "voice-message.ogg"
CONTENT_TYPE = "audio/ogg"
NO_MENTIONS_PAYLOAD: dict[str, Any] = {"parse": []}
REFUSED = (400, 403)  # what makes a webhook voice message fall back to the bot


@dataclass(frozen=True)
class VoiceNote:
    """A voice message ready to upload."""

    ogg: bytes  # OGG Opus
    duration_secs: float
    waveform: str  # base64 of up to 256 one-byte amplitudes
    filename: str = FILENAME


def waveform_of(pcm: bytes, *, samples: int = WAVEFORM_SAMPLES) -> bytes:
    """Up to `samples` amplitudes (0..255) of mono s16le PCM: the RMS of equal windows, loudest = 255."""
    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    count = min(samples, len(audio))
    if count == 0:
        return b""
    starts = np.linspace(0, len(audio), count + 1).astype(np.int64)[:-1]
    sizes = np.diff(np.append(starts, len(audio)))
    rms = np.sqrt(np.add.reduceat(audio * audio, starts) / sizes)
    peak = rms.max()
    if peak <= 0:
        return bytes(count)
    return np.clip(np.round(rms / peak * 255), 0, 255).astype(np.uint8).tobytes()


def make_voice_note(audio: bytes, *, max_seconds: float | None = None) -> VoiceNote:
    """A voice note from what a text-to-speech server returned (WAV, OGG Opus, MP3, FLAC...).

    Cut at `max_seconds` when given; encoded as 48 kHz mono OGG Opus unless it already is
    OGG Opus and needs no cut. Duration and waveform come from the decoded samples.
    CPU-bound: run it in `asyncio.to_thread`. Raises AudioError for audio that will not decode.
    """
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, not {max_seconds}")
    pcm = decode_to_pcm(audio, rate=OPUS_RATE, channels=1)
    cut = max_seconds is not None and len(pcm) > int(max_seconds * OPUS_RATE) * 2
    if cut:
        pcm = pcm[:int(max_seconds * OPUS_RATE) * 2]
    ogg = audio if is_ogg_opus(audio) and not cut else encode_ogg_opus(pcm, rate=OPUS_RATE, channels=1)
    return VoiceNote(ogg=ogg, duration_secs=round(len(pcm) / 2 / OPUS_RATE, 3),
                     waveform=base64.b64encode(waveform_of(pcm)).decode("ascii"))


def _voice_payload(note: VoiceNote, **extra: Any) -> dict[str, Any]:
    return {"flags": IS_VOICE_MESSAGE, "allowed_mentions": NO_MENTIONS_PAYLOAD, **extra,
            "attachments": [{"id": 0, "filename": note.filename, "duration_secs": note.duration_secs,
                             "waveform": note.waveform}]}


def _multipart(note: VoiceNote, payload: dict[str, Any]) -> tuple[list[dict[str, Any]], list[discord.File]]:
    """The form discord.py's request paths send (payload_json, then files[0] as audio/ogg).

    The file is passed along too so a retried request rewinds it.
    """
    file = discord.File(io.BytesIO(note.ogg), filename=note.filename)
    form = [{"name": "payload_json", "value": discord.utils._to_json(payload)},
            {"name": "files[0]", "value": file.fp, "filename": note.filename, "content_type": CONTENT_TYPE}]
    return form, [file]


async def send_voice_note_via_webhook(webhook: discord.Webhook, note: VoiceNote, *, username: str,
                                      avatar_url: str | None,
                                      thread: discord.abc.Snowflake | None = None) -> int:
    """Post `note` through `webhook` as `username` (into `thread` when given); returns the message id."""
    if webhook.token is None:
        raise ValueError(f"webhook {webhook.id} has no token: it cannot post")
    extra: dict[str, Any] = {"username": username}
    if avatar_url:
        extra["avatar_url"] = avatar_url
    form, files = _multipart(note, _voice_payload(note, **extra))
    try:
        data = await async_context.get().execute_webhook(
            webhook.id, webhook.token, session=webhook.session, proxy=webhook.proxy,
            proxy_auth=webhook.proxy_auth, multipart=form, files=files,
            thread_id=thread.id if thread is not None else None, wait=True)
    finally:
        for file in files:
            file.close()
    return int(data["id"])


async def send_voice_note_as_bot(channel: discord.abc.Messageable, note: VoiceNote, *,
                                 reference: discord.Message | discord.PartialMessage | None = None) -> int:
    """Post `note` as the bot account (a reply to `reference` when given); returns the message id."""
    target = await channel._get_channel()  # a text channel or thread; the HTTP client rides on its state
    extra: dict[str, Any] = {}
    if reference is not None:
        extra["message_reference"] = reference.to_reference(fail_if_not_exists=False).to_dict()
        extra["allowed_mentions"] = {**NO_MENTIONS_PAYLOAD, "replied_user": False}
    form, files = _multipart(note, _voice_payload(note, **extra))
    route = Route("POST", "/channels/{channel_id}/messages", channel_id=target.id)
    try:
        data = await target._state.http.request(route, form=form, files=files)
    finally:
        for file in files:
            file.close()
    return int(data["id"])


async def post_voice_note(poster: WebhookPoster, channel: WebhookChannel, who: PersonaIdentity, note: VoiceNote, *,
                          reply_to: discord.Message | discord.PartialMessage | None = None) -> int:
    """Post `note` as the persona: through its webhook, else (Discord refused: 400/403) as the bot.

    Webhooks cannot reply, so `reply_to` only shapes the bot's fallback. Returns the message id.
    """
    try:
        thread = channel if isinstance(channel, discord.Thread) else None
        return await poster.with_webhook(channel, who, lambda hook: send_voice_note_via_webhook(
            hook, note, username=who.webhook_name, avatar_url=who.avatar_url, thread=thread))
    except discord.HTTPException as exc:
        if exc.status not in REFUSED:
            raise
        log.warning("Discord refused the voice message through the webhook in channel %s (%s, code %s: %s); "
                    "sending it as the bot", channel.id, exc.status, exc.code, exc.text)
    return await send_voice_note_as_bot(channel, note, reference=reply_to)
