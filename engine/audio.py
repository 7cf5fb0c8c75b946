"""Audio in and out for the engine: decode anything to Whisper's input, encode TTS output.

Decoding goes through PyAV (FFmpeg's demuxers, decoders and resampler), so every container
FFmpeg knows (wav, mp3, ogg/opus, flac, webm, m4a...) works and nothing is resampled by hand.
Errors are :class:`engine.errors.APIError` so a route can let them through unchanged.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import av
import numpy as np

from engine.errors import APIError, invalid_request

SAMPLE_RATE = 16_000
"""Whisper's input rate; :func:`decode_audio` always returns this."""

DEFAULT_MAX_SECONDS = 600.0
PCM_RATE = 24_000
"""OpenAI's ``pcm`` speech format: raw 16-bit little-endian mono at 24 kHz, no header."""

OPUS_RATE = 48_000
SPEECH_FORMATS = ("wav", "opus", "pcm", "flac", "mp3")
CONTENT_TYPES = {
    "wav": "audio/wav",
    "opus": "audio/ogg",
    "pcm": "audio/pcm",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
}
# (container, codec) handed to PyAV for the compressed speech formats.
_AV_OUTPUTS = {"opus": ("ogg", "libopus"), "flac": ("flac", "flac"), "mp3": ("mp3", "libmp3lame")}


def _reason(exc: av.error.FFmpegError) -> str:
    """FFmpeg's short reason ("Invalid data found when processing input")."""
    return str(exc.strerror or exc)


def _not_audio(param: str, detail: str) -> APIError:
    return invalid_request(
        f"The uploaded {param} is not a decodable audio file ({detail}).",
        param=param, code="invalid_audio",
    )


def _too_long(param: str, max_seconds: float) -> APIError:
    return invalid_request(
        f"The audio in {param} is longer than the limit of {max_seconds:g} seconds.",
        param=param, code="audio_too_long",
    )


def _open(data: bytes, fmt: str | None, param: str) -> av.container.InputContainer:
    """Open ``data`` letting FFmpeg probe the container; ``fmt`` is only a fallback hint,
    because clients often label a webm as ogg or an m4a as mp3 and probing is more reliable."""
    try:
        return av.open(io.BytesIO(data), mode="r")
    except av.error.FFmpegError as probe_error:
        if not fmt:
            raise _not_audio(param, _reason(probe_error)) from None
    try:
        return av.open(io.BytesIO(data), mode="r", format=fmt)
    except av.error.FFmpegError as exc:
        raise _not_audio(param, _reason(exc)) from None
    except ValueError as exc:  # PyAV's answer to a format name FFmpeg does not know
        raise _not_audio(param, f"unknown format {fmt!r}: {exc}") from None


def _decoded_chunks(
    container: av.container.InputContainer, param: str, max_seconds: float
) -> Iterator[np.ndarray]:
    """Yield float32 mono 16 kHz chunks, stopping as soon as the limit is passed."""
    if not container.streams.audio:
        raise _not_audio(param, "no audio stream")
    stream = container.streams.audio[0]
    if container.duration is not None and container.duration / av.time_base > max_seconds + 1:
        raise _too_long(param, max_seconds)  # cheap early refusal from the header
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    limit = int(max_seconds * SAMPLE_RATE)
    total = 0
    try:
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                total += out.samples
                if total > limit:
                    raise _too_long(param, max_seconds)
                yield out.to_ndarray().reshape(-1)
        for out in resampler.resample(None):  # flush what the resampler still holds
            total += out.samples
            if total > limit:
                raise _too_long(param, max_seconds)
            yield out.to_ndarray().reshape(-1)
    except av.error.FFmpegError as exc:
        raise _not_audio(param, _reason(exc)) from None


def decode_audio(
    data: bytes,
    fmt: str | None = None,
    *,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    param: str = "file",
) -> np.ndarray:
    """Decode any audio file to a float32 mono 16 kHz array.

    ``fmt`` (wav, mp3, ogg, flac, webm...) is a hint used only when probing fails. Raises a
    400 :class:`APIError` naming ``param`` for empty, corrupt or non-audio data and for audio
    longer than ``max_seconds``.
    """
    if not data:
        raise _not_audio(param, "it is empty")
    with _open(data, fmt, param) as container:
        chunks = list(_decoded_chunks(container, param, max_seconds))
    if not chunks:
        raise _not_audio(param, "no audio samples")
    return np.concatenate(chunks).astype(np.float32, copy=False)


def to_int16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] (or already int16) as int16 PCM."""
    if samples.dtype == np.int16:
        return samples
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)


def _frame(samples: np.ndarray, sample_rate: int) -> av.AudioFrame:
    pcm = to_int16(samples).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
    frame.sample_rate = sample_rate
    return frame


def resample(samples: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """Mono samples at ``sample_rate`` as int16 at ``target_rate`` (PyAV's resampler)."""
    if sample_rate == target_rate:
        return to_int16(samples)
    resampler = av.AudioResampler(format="s16", layout="mono", rate=target_rate)
    parts = [f.to_ndarray().reshape(-1) for f in resampler.resample(_frame(samples, sample_rate))]
    parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)


def encode_wav(samples: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM WAV."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=sample_rate, layout="mono")
        for packet in stream.encode(_frame(samples, sample_rate)):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def encode_pcm(samples: np.ndarray, sample_rate: int) -> bytes:
    """Raw 16-bit little-endian mono at 24 kHz, as OpenAI's ``pcm`` format."""
    return resample(samples, sample_rate, PCM_RATE).astype("<i2").tobytes()


def _encode_av(samples: np.ndarray, sample_rate: int, container_fmt: str, codec: str) -> bytes:
    """Encode with PyAV, which also re-chunks to the codec's frame size and resamples."""
    rate = OPUS_RATE if codec == "libopus" else sample_rate
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        for packet in stream.encode(_frame(samples, sample_rate)):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def encode_opus(samples: np.ndarray, sample_rate: int) -> bytes:
    """Opus in an Ogg container at 48 kHz (what OpenAI and Discord voice use)."""
    return _encode_av(samples, sample_rate, "ogg", "libopus")


def encode_speech(samples: np.ndarray, sample_rate: int, response_format: str) -> bytes:
    """Encode TTS output in one of :data:`SPEECH_FORMATS`."""
    if response_format == "wav":
        return encode_wav(samples, sample_rate)
    if response_format == "pcm":
        return encode_pcm(samples, sample_rate)
    if response_format in _AV_OUTPUTS:
        container_fmt, codec = _AV_OUTPUTS[response_format]
        return _encode_av(samples, sample_rate, container_fmt, codec)
    raise invalid_request(
        f"Unsupported response_format {response_format!r}; use one of {', '.join(SPEECH_FORMATS)}.",
        param="response_format", code="invalid_value",
    )
