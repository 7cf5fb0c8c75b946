"""Audio routes, as OpenAI's: POST /v1/audio/transcriptions (multipart), POST /v1/audio/speech,
and GET /v1/audio/voices (ours: the voices this server can speak with)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import PurePath

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from engine.audio import CONTENT_TYPES, decode_audio, encode_speech
from engine.backends.stt import SpeechToText, Transcript
from engine.errors import invalid_request, read_json, too_large
from engine.protocol.audio import (
    SegmentOut,
    SpeechRequest,
    TranscriptionForm,
    TranscriptionVerbose,
    VoiceList,
    VoiceOut,
)
from engine.routes import REGISTRY, SETTINGS
from engine.routes.served import check_model

routes = web.RouteTableDef()

READ_CHUNK = 64 * 1024
MAX_FIELD_BYTES = 64 * 1024  # a text field of the form (prompt, language...)


@dataclass
class Upload:
    """The parsed multipart form: text fields and the uploaded file."""

    fields: dict[str, str] = field(default_factory=dict)
    data: bytes | None = None
    filename: str | None = None


async def _read_part(part: BodyPartReader, limit: int, name: str) -> bytes:
    """Read one part, refusing it with 413 as soon as it passes ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise too_large(f"{name} is larger than the limit of {limit} bytes.", name)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_upload(request: web.Request, max_file_bytes: int) -> Upload:
    """Parse a multipart/form-data body (400 when it is not one)."""
    if request.content_type != "multipart/form-data":
        raise invalid_request(
            "This endpoint takes multipart/form-data with the audio in a 'file' field.",
            code="invalid_content_type",
        )
    try:
        return await _read_parts(await request.multipart(), max_file_bytes)
    except (ValueError, HttpProcessingError) as exc:  # aiohttp's reader on a truncated or malformed body
        raise invalid_request(f"The multipart/form-data body is malformed: {exc}", code="invalid_multipart") from None


async def _read_parts(reader: MultipartReader, max_file_bytes: int) -> Upload:
    upload = Upload()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader) or not part.name:
            continue  # nested multiparts or unnamed parts carry nothing we read
        if part.name == "file":
            upload.data = await _read_part(part, max_file_bytes, "file")
            upload.filename = part.filename
            continue
        raw = await _read_part(part, MAX_FIELD_BYTES, part.name)
        try:
            upload.fields[part.name] = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid_request(f"{part.name} is not UTF-8 text.", part.name) from None
    return upload


def _language_code(language: str | None, stt: SpeechToText) -> str | None:
    """Accept ISO-639-1 codes or English names ("english"); refuse what the model lacks."""
    if language is None:
        return None
    from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

    code = language if language in LANGUAGES else TO_LANGUAGE_CODE.get(language)
    if code is None:
        raise invalid_request(f"Unknown language {language!r}; use an ISO-639-1 code such as "
                              "'en'.", "language", "invalid_language")
    if code != "en" and not stt.multilingual:
        raise invalid_request("This speech model only transcribes English.", "language",
                              "unsupported_language")
    return code


def _timestamp(seconds: float, separator: str) -> str:
    millis = int(round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def subtitles(transcript: Transcript, fmt: str) -> str:
    """The transcript as SubRip (``srt``) or WebVTT (``vtt``) cues."""
    separator = "," if fmt == "srt" else "."
    cues = []
    for number, segment in enumerate(transcript.segments, start=1):
        span = f"{_timestamp(segment.start, separator)} --> {_timestamp(segment.end, separator)}"
        prefix = f"{number}\n" if fmt == "srt" else ""
        cues.append(f"{prefix}{span}\n{segment.text.strip()}\n")
    body = "\n".join(cues)
    return f"WEBVTT\n\n{body}" if fmt == "vtt" else body


def render_transcript(transcript: Transcript, fmt: str) -> web.Response:
    """One transcript in the asked ``response_format``."""
    if fmt == "text":
        return web.Response(text=transcript.text, content_type="text/plain")
    if fmt in ("srt", "vtt"):
        return web.Response(text=subtitles(transcript, fmt), content_type="text/plain")
    if fmt == "verbose_json":
        from whisper.tokenizer import LANGUAGES

        verbose = TranscriptionVerbose(
            language=LANGUAGES.get(transcript.language, transcript.language),
            duration=transcript.duration, text=transcript.text,
            segments=[SegmentOut(**vars(segment)) for segment in transcript.segments],
        )
        return web.json_response(verbose.model_dump())
    usage = {"type": "duration", "seconds": math.ceil(transcript.duration)}
    return web.json_response({"text": transcript.text, "usage": usage})


@routes.post("/v1/audio/transcriptions")
async def transcriptions(request: web.Request) -> web.Response:
    """Speech to text (OpenAI's multipart request; json, text, verbose_json, srt, vtt)."""
    settings = request.app[SETTINGS]
    upload = await read_upload(request, settings.limits.max_audio_bytes)
    form = TranscriptionForm.model_validate(upload.fields)
    check_model(form.model, settings.stt, "speech-to-text")
    if not upload.data:
        raise invalid_request("The 'file' field with the audio is required.", "file",
                              "missing_required_parameter")
    registry = request.app[REGISTRY]
    stt: SpeechToText = registry.get("stt")
    language = _language_code(form.language, stt)
    hint = PurePath(upload.filename).suffix.lstrip(".").lower() if upload.filename else None
    data, max_seconds = upload.data, settings.limits.max_audio_seconds

    def work() -> Transcript:  # decoding is CPU work too: keep it off the event loop
        audio = decode_audio(data, hint, max_seconds=max_seconds, param="file")
        return stt.transcribe(audio, language, form.temperature, form.prompt)

    transcript = await registry.queue("stt").run(work)
    return render_transcript(transcript, form.response_format)


@routes.post("/v1/audio/speech")
async def speech(request: web.Request) -> web.Response:
    """Text to speech: the audio file itself in the asked ``response_format``."""
    settings = request.app[SETTINGS]
    body = SpeechRequest.model_validate(await read_json(request))
    check_model(body.model, settings.tts, "text-to-speech")
    limit = settings.tts.max_input_chars
    if len(body.input) > limit:
        raise invalid_request(f"input is {len(body.input)} characters; the limit is {limit}.",
                              "input", "string_above_max_length")
    registry = request.app[REGISTRY]
    tts = registry.get("tts")
    if not tts.has_voice(body.voice):
        known = ", ".join(v.id for v in tts.voices())
        raise invalid_request(f"Unknown voice {body.voice!r}; available: {known} "
                              "(GET /v1/audio/voices).", "voice", "voice_not_found")

    def work() -> bytes:
        spoken = tts.synthesize(body.input, body.voice, body.speed)
        return encode_speech(spoken.samples, spoken.sample_rate, body.response_format)

    audio = await registry.queue("tts").run(work)
    return web.Response(body=audio, content_type=CONTENT_TYPES[body.response_format])


@routes.get("/v1/audio/voices")
async def voices(request: web.Request) -> web.Response:
    """The voices /v1/audio/speech accepts, the default first."""
    tts = request.app[REGISTRY].get("tts")
    listing = VoiceList(
        data=[VoiceOut(**voice.as_dict()) for voice in tts.voices()], default=tts.default_voice
    )
    return web.json_response(listing.model_dump())
