"""The bot's audio helpers: decode what a speech server returns, resample, wrap as WAV, encode OGG Opus.

Everything here is s16le interleaved PCM ("pcm") plus its rate and channel count, and
CPU-bound: callers on the event loop run these in `asyncio.to_thread`. Decoding and
encoding go through PyAV (FFmpeg), so any container/codec FFmpeg knows is accepted:
WAV, OGG Opus, MP3, FLAC... but not raw headerless PCM (nothing says what it is).
"""

from __future__ import annotations

import io
import logging
import wave

import av
import av.error
import numpy as np

log = logging.getLogger(__name__)

MAX_INPUT_BYTES = 25 * 1024 * 1024  # more than Discord's upload limit and any sane speech reply
MAX_SECONDS = 600.0  # ten minutes of decoded audio
SAMPLE_BYTES = 2  # s16
OPUS_RATE = 48000  # Opus always runs at 48 kHz; Discord's clients expect it
OPUS_BITRATE = 48000  # plenty for one voice, small enough for a quick upload
_LAYOUTS = {1: "mono", 2: "stereo"}


class AudioError(ValueError):
    """Audio that cannot be used: empty, corrupt, undecodable, or too long."""


def _layout(channels: int) -> str:
    try:
        return _LAYOUTS[channels]
    except KeyError:
        raise ValueError(f"only mono or stereo audio is supported, not {channels} channels") from None


def _frame_bytes(rate: int, channels: int, seconds: float) -> int:
    return int(rate * seconds) * channels * SAMPLE_BYTES


def decode_to_pcm(data: bytes, *, rate: int, channels: int) -> bytes:
    """Decode a whole audio file (any container/codec FFmpeg opens) to s16le PCM at `rate`/`channels`.

    Raises AudioError for empty, corrupt or undecodable input, input over MAX_INPUT_BYTES
    and audio longer than MAX_SECONDS. A stream that breaks after some audio decoded keeps
    what came before the break (a truncated speech reply is still worth playing).
    """
    if not data:
        raise AudioError("no audio: the data is empty")
    if len(data) > MAX_INPUT_BYTES:
        raise AudioError(f"audio too large: {len(data)} bytes (at most {MAX_INPUT_BYTES})")
    limit = _frame_bytes(rate, channels, MAX_SECONDS)
    layout = _layout(channels)
    resampler, source = av.AudioResampler(format="s16", layout=layout, rate=rate), None
    chunks: list[bytes] = []
    size = 0
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise AudioError(f"not audio FFmpeg can read ({exc.__class__.__name__}: {exc})") from exc
    with container:
        if not container.streams.audio:
            raise AudioError(f"no audio stream in the data (format {container.format.name})")
        try:
            for frame in container.decode(audio=0):
                frame.pts = None  # let the resampler count samples itself (some demuxers give odd pts)
                shape = (frame.format.name, frame.layout.name, frame.sample_rate)
                if source is not None and shape != source:  # chained OGG, MP3 changing rate: start afresh
                    chunks.extend(out.to_ndarray().tobytes() for out in resampler.resample(None))
                    resampler = av.AudioResampler(format="s16", layout=layout, rate=rate)
                source = shape
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray().tobytes()
                    size += len(chunk)
                    if size > limit:
                        raise AudioError(f"audio longer than {MAX_SECONDS:.0f} seconds")
                    chunks.append(chunk)
            chunks.extend(out.to_ndarray().tobytes() for out in resampler.resample(None))
        except av.error.FFmpegError as exc:
            if not chunks:
                raise AudioError(f"corrupt audio ({exc.__class__.__name__}: {exc})") from exc
            log.warning("audio broke off after %.2f s (%s); keeping what decoded", size / (rate * channels * 2), exc)
    pcm = b"".join(chunks)
    if len(pcm) > limit:
        raise AudioError(f"audio longer than {MAX_SECONDS:.0f} seconds")
    if not pcm:
        raise AudioError("no audio decoded from the data")
    return pcm


def resample_pcm(pcm: bytes, *, from_rate: int, from_channels: int, to_rate: int, to_channels: int) -> bytes:
    """Convert s16le PCM between rates and mono/stereo (e.g. Discord's 48 kHz stereo to 16 kHz mono).

    Channels are mixed in numpy; the rate goes through libswresample, one frame per call
    (a 10 s utterance takes a few milliseconds).
    """
    for channels in (from_channels, to_channels):
        _layout(channels)  # only mono and stereo
    if len(pcm) % (SAMPLE_BYTES * from_channels):
        raise AudioError(f"PCM length {len(pcm)} is not a whole number of {from_channels}-channel s16 samples")
    samples = np.frombuffer(pcm, dtype="<i2").reshape(-1, from_channels)
    if from_channels != to_channels:
        if to_channels == 1:  # average the two channels (int32: no overflow)
            samples = ((samples[:, 0].astype(np.int32) + samples[:, 1]) // 2).astype(np.int16).reshape(-1, 1)
        else:
            samples = np.repeat(samples, 2, axis=1)
    if from_rate == to_rate or not len(samples):
        return np.ascontiguousarray(samples, dtype="<i2").tobytes()
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.int16).reshape(1, -1),
                                       format="s16", layout=_layout(to_channels))
    frame.sample_rate = from_rate
    resampler = av.AudioResampler(format="s16", layout=_layout(to_channels), rate=to_rate)
    out = [*resampler.resample(frame), *resampler.resample(None)]
    return b"".join(f.to_ndarray().tobytes() for f in out)


def pcm_to_wav(pcm: bytes, *, rate: int, channels: int) -> bytes:
    """Wrap s16le PCM in a WAV file."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(SAMPLE_BYTES)
        wav.setframerate(rate)
        wav.writeframes(pcm)
    return buffer.getvalue()


def encode_ogg_opus(pcm: bytes, *, rate: int, channels: int) -> bytes:
    """Encode s16le PCM as OGG Opus, 48 kHz mono (what Discord voice messages carry).

    Other rates are resampled and stereo is mixed down first.
    """
    if not pcm:
        raise AudioError("no audio to encode")
    if rate != OPUS_RATE or channels != 1:
        pcm = resample_pcm(pcm, from_rate=rate, from_channels=channels, to_rate=OPUS_RATE, to_channels=1)
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.int16, copy=False).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
    frame.sample_rate = OPUS_RATE
    frame.pts = 0
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=OPUS_RATE)
        stream.codec_context.layout = "mono"
        stream.codec_context.bit_rate = OPUS_BITRATE
        # PyAV cuts the one big frame into the encoder's 20 ms frames itself.
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def is_ogg_opus(data: bytes) -> bool:
    """Whether `data` starts like an OGG Opus file (first page holds the OpusHead header)."""
    return data[:4] == b"OggS" and b"OpusHead" in data[:64]
