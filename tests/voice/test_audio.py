"""The bot's audio helpers on real audio: espeak-ng speech, ffmpeg's OGG Opus and MP3, pure tones."""

from __future__ import annotations

import io
import random
import shutil
import subprocess
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from bot.voice import audio
from bot.voice.audio import AudioError, decode_to_pcm, encode_ogg_opus, pcm_to_wav, resample_pcm

SPEECH = "Hello there, traveller. Welcome to the Gilded Lantern; the fire is warm tonight."


def tone(freq: float, seconds: float, rate: int, channels: int, amplitude: float = 0.5) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wave_ = (np.sin(2 * np.pi * freq * t) * amplitude * 32767).astype("<i2")
    return np.repeat(wave_[:, None], channels, axis=1).tobytes()


def samples(pcm: bytes, channels: int) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").reshape(-1, channels).astype(np.float64)


def dominant_hz(mono: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
    return float(np.fft.rfftfreq(len(mono), 1 / rate)[spectrum.argmax()])


def envelope(mono: np.ndarray, rate: int, window_s: float = 0.02) -> np.ndarray:
    size = int(rate * window_s)
    usable = len(mono) // size * size
    return np.sqrt((mono[:usable].reshape(-1, size) ** 2).mean(axis=1))


def espeak_wav(path: Path, text: str = SPEECH) -> bytes:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (Debian package espeak-ng)")
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path.read_bytes()


def ffmpeg(source: Path, target: Path, *args: str) -> bytes:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(source), *args, str(target)],
                   check=True, capture_output=True)
    return target.read_bytes()


@pytest.fixture(scope="module")
def speech_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("speech")
    wav = espeak_wav(folder / "speech.wav")
    return {"wav": wav,
            "ogg": ffmpeg(folder / "speech.wav", folder / "speech.ogg", "-c:a", "libopus", "-b:a", "48k"),
            "mp3": ffmpeg(folder / "speech.wav", folder / "speech.mp3", "-c:a", "libmp3lame", "-b:a", "64k")}


def test_espeak_wav_ogg_and_mp3_decode_to_the_same_speech_at_48k_stereo(speech_files):
    with wave.open(io.BytesIO(speech_files["wav"])) as source:
        source_s = source.getnframes() / source.getframerate()
    decoded = {kind: samples(decode_to_pcm(data, rate=48000, channels=2), 2) for kind, data in speech_files.items()}
    reference = envelope(decoded["wav"][:, 0], 48000)
    for kind, pcm in decoded.items():
        assert abs(len(pcm) / 48000 - source_s) < 0.05, kind  # OGG's pre-skip and MP3's padding are trimmed
        assert np.array_equal(pcm[:, 0], pcm[:, 1]), kind  # mono source: both channels the same
        shape = envelope(pcm[:, 0], 48000)
        n = min(len(shape), len(reference))
        assert np.corrcoef(shape[:n], reference[:n])[0, 1] > 0.9, kind  # same words at the same times
        assert shape.max() > 20 * max(np.median(shape[:3]), 1.0), kind  # speech, then the quiet start


def test_decode_to_16k_mono_keeps_the_duration(speech_files):
    stereo = decode_to_pcm(speech_files["wav"], rate=48000, channels=2)
    mono = decode_to_pcm(speech_files["mp3"], rate=16000, channels=1)
    assert abs(len(mono) / 2 / 16000 - len(stereo) / 4 / 48000) < 0.05


def test_resampling_48k_stereo_to_16k_mono_keeps_a_tones_frequency_and_level():
    pcm = tone(440.0, 2.0, 48000, 2)
    out = samples(resample_pcm(pcm, from_rate=48000, from_channels=2, to_rate=16000, to_channels=1), 1)[:, 0]
    assert abs(len(out) - 32000) <= 16
    assert abs(dominant_hz(out, 16000) - 440.0) < 2.0
    middle = out[1600:-1600]
    assert 0.45 < np.abs(middle).max() / 32767 < 0.55  # the level survives the mix-down


def test_resampling_mixes_the_two_channels_and_goes_back_up():
    left = np.frombuffer(tone(300.0, 1.0, 48000, 1), dtype="<i2")
    right = np.frombuffer(tone(1000.0, 1.0, 48000, 1), dtype="<i2")
    pcm = np.stack([left, right], axis=1).astype("<i2").tobytes()
    mono = samples(resample_pcm(pcm, from_rate=48000, from_channels=2, to_rate=48000, to_channels=1), 1)[:, 0]
    spectrum = np.abs(np.fft.rfft(mono))
    freqs = np.fft.rfftfreq(len(mono), 1 / 48000)
    assert spectrum[np.argmin(abs(freqs - 300))] > 0.3 * spectrum.max()  # both voices are in the mix
    assert spectrum[np.argmin(abs(freqs - 1000))] > 0.3 * spectrum.max()
    up = samples(resample_pcm(tone(440.0, 1.0, 16000, 1), from_rate=16000, from_channels=1, to_rate=48000,
                              to_channels=2), 2)
    assert abs(len(up) - 48000) <= 16 and np.array_equal(up[:, 0], up[:, 1])
    assert abs(dominant_hz(up[:, 0], 48000) - 440.0) < 2.0


def test_resampling_a_ten_second_utterance_takes_milliseconds():
    pcm = tone(220.0, 10.0, 48000, 2)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        resample_pcm(pcm, from_rate=48000, from_channels=2, to_rate=16000, to_channels=1)
        best = min(best, time.perf_counter() - start)
    assert best < 0.05, f"{best * 1000:.1f} ms for 10 s of audio"


def test_resampling_edge_cases():
    assert resample_pcm(b"", from_rate=48000, from_channels=2, to_rate=16000, to_channels=1) == b""
    with pytest.raises(AudioError):
        resample_pcm(b"\x00\x01\x02", from_rate=48000, from_channels=2, to_rate=16000, to_channels=1)
    with pytest.raises(ValueError):
        resample_pcm(b"\x00" * 12, from_rate=48000, from_channels=6, to_rate=16000, to_channels=1)


NOISE = random.Random(7)


@pytest.mark.parametrize("data", [
    NOISE.randbytes(4096),
    b"RIFF\x24\x00\x00\x00WAVEfmt " + NOISE.randbytes(300),
    b"OggS" + NOISE.randbytes(2000),
    b"ID3\x03\x00\x00\x00\x00\x00\x00" + NOISE.randbytes(2000),
    b"not audio at all, just a sentence someone typed",
], ids=["random", "wav-header-then-noise", "ogg-magic-then-noise", "id3-then-noise", "text"])
def test_corrupt_audio_is_an_audio_error(data):
    with pytest.raises(AudioError):
        decode_to_pcm(data, rate=48000, channels=2)


def test_empty_too_large_and_too_long_audio_are_audio_errors(speech_files, monkeypatch):
    with pytest.raises(AudioError, match="empty"):
        decode_to_pcm(b"", rate=48000, channels=2)
    with pytest.raises(AudioError, match="too large"):
        decode_to_pcm(b"\x00" * (audio.MAX_INPUT_BYTES + 1), rate=48000, channels=2)
    monkeypatch.setattr(audio, "MAX_SECONDS", 1.0)
    with pytest.raises(AudioError, match="longer than"):
        decode_to_pcm(speech_files["wav"], rate=48000, channels=2)
    assert issubclass(AudioError, ValueError)


def test_a_truncated_file_keeps_the_audio_before_the_break(speech_files):
    whole = decode_to_pcm(speech_files["mp3"], rate=16000, channels=1)
    half = decode_to_pcm(speech_files["mp3"][: len(speech_files["mp3"]) // 2], rate=16000, channels=1)
    assert 0.3 * len(whole) < len(half) < 0.7 * len(whole)


def test_a_stream_that_breaks_midway_keeps_what_decoded(tmp_path, caplog):
    espeak_wav(tmp_path / "a.wav", "first part")
    narrow = ffmpeg(tmp_path / "a.wav", tmp_path / "a16.mp3", "-ar", "16000")
    wide = ffmpeg(tmp_path / "a.wav", tmp_path / "a44.mp3", "-ar", "44100", "-ac", "2")
    first = decode_to_pcm(narrow, rate=16000, channels=1)
    with caplog.at_level("WARNING", logger="bot.voice.audio"):
        joined = decode_to_pcm(narrow + wide, rate=16000, channels=1)
    if "keeping what decoded" in caplog.text:  # PyAV's FFmpeg (8.x) stops at the second part's header
        assert abs(len(joined) - len(first)) < 0.05 * len(first)
    else:  # an FFmpeg that follows the change of rate and channels decodes both parts
        assert abs(len(joined) - 2 * len(first)) < 0.05 * len(first)


def test_pcm_to_wav_round_trips():
    pcm = tone(440.0, 0.5, 16000, 1)
    wav = pcm_to_wav(pcm, rate=16000, channels=1)
    with wave.open(io.BytesIO(wav)) as reader:
        assert (reader.getframerate(), reader.getnchannels(), reader.getsampwidth()) == (16000, 1, 2)
        assert reader.readframes(reader.getnframes()) == pcm
    assert decode_to_pcm(wav, rate=16000, channels=1) == pcm


def test_encode_ogg_opus_is_48k_mono_opus_of_the_same_length():
    pcm = tone(440.0, 1.5, 24000, 2)
    ogg = encode_ogg_opus(pcm, rate=24000, channels=2)
    assert ogg[:4] == b"OggS" and audio.is_ogg_opus(ogg)
    with av.open(io.BytesIO(ogg)) as container:
        stream = container.streams.audio[0]
        assert (stream.codec_context.name, stream.rate, stream.codec_context.channels) == ("opus", 48000, 1)
    back = samples(decode_to_pcm(ogg, rate=48000, channels=1), 1)[:, 0]
    assert abs(len(back) / 48000 - 1.5) < 0.03
    assert abs(dominant_hz(back, 48000) - 440.0) < 2.0
    with pytest.raises(AudioError):
        encode_ogg_opus(b"", rate=48000, channels=1)
