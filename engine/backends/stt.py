"""Speech to text: faster-whisper (the default, CTranslate2) and openai-whisper.

Both take a float32 mono 16 kHz array (see :func:`engine.audio.decode_audio`) and return the
same :class:`Transcript`. Both put a voice-activity detector (Silero, shipped inside
faster-whisper) in front of Whisper, because Whisper asked to transcribe silence or noise
famously answers "you" or "Thanks for watching!".
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from engine.audio import SAMPLE_RATE
from engine.backends import digests, pick_device

log = logging.getLogger(__name__)

CT2_WEIGHTS = "model.bin"
# Whisper's own guard against hallucinated text on quiet segments.
NO_SPEECH_THRESHOLD = 0.6


@dataclass(frozen=True)
class Segment:
    """One timed piece of a transcript (the fields of OpenAI's verbose_json segments)."""

    id: int
    start: float
    end: float
    text: str
    seek: int = 0
    tokens: list[int] = field(default_factory=list)
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0


@dataclass(frozen=True)
class Transcript:
    """What was said: the text, the language code, the audio's length and the segments."""

    text: str
    language: str
    duration: float
    segments: list[Segment]


class SpeechToText(Protocol):
    """The interface routes and the composed chat path use."""

    name: str
    multilingual: bool

    def transcribe(
        self,
        audio: np.ndarray,
        language: str | None = None,
        temperature: float = 0.0,
        prompt: str | None = None,
    ) -> Transcript: ...


def has_speech(audio: np.ndarray) -> bool:
    """True when Silero VAD finds any speech in ``audio`` (16 kHz mono float32)."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    return bool(get_speech_timestamps(audio, VadOptions()))


def _join(segments: list[Segment]) -> str:
    return "".join(segment.text for segment in segments).strip()


def _empty(language: str | None, duration: float) -> Transcript:
    return Transcript(text="", language=language or "en", duration=duration, segments=[])


class FasterWhisperSTT:
    """Whisper on CTranslate2: int8 on CPU, several times faster than PyTorch."""

    name = "faster-whisper"

    def __init__(
        self, model: str, device: str = "cpu", compute_type: str = "auto",
        beam_size: int = 1, vad: bool = True, download_root: str | None = None,
    ) -> None:
        from faster_whisper import WhisperModel

        if compute_type == "auto":
            compute_type = "float16" if device == "cuda" else "int8"
        self.model = WhisperModel(
            model, device=device, compute_type=compute_type, download_root=download_root
        )
        self.multilingual = bool(self.model.model.is_multilingual)
        self.beam_size = beam_size
        self.vad = vad

    def transcribe(
        self,
        audio: np.ndarray,
        language: str | None = None,
        temperature: float = 0.0,
        prompt: str | None = None,
    ) -> Transcript:
        """Transcribe ``audio``; silence and noise give an empty text."""
        duration = len(audio) / SAMPLE_RATE
        pieces, info = self.model.transcribe(
            audio,
            language=language,
            temperature=temperature,
            beam_size=self.beam_size,
            vad_filter=self.vad,
            initial_prompt=prompt or None,
            condition_on_previous_text=False,  # stops one misheard line from looping
            no_speech_threshold=NO_SPEECH_THRESHOLD,
        )
        segments = [
            Segment(
                id=i, start=float(s.start), end=float(s.end), text=s.text, seek=int(s.seek),
                tokens=list(s.tokens), temperature=float(s.temperature or 0.0),
                avg_logprob=float(s.avg_logprob), compression_ratio=float(s.compression_ratio),
                no_speech_prob=float(s.no_speech_prob),
            )
            for i, s in enumerate(pieces)  # a generator: decoding happens here
        ]
        return Transcript(_join(segments), info.language, duration, segments)


class OpenAIWhisperSTT:
    """The reference PyTorch Whisper (``whisper.load_model`` on a checkpoint or a name)."""

    name = "openai-whisper"

    def __init__(self, checkpoint: str, device: str = "cpu", vad: bool = True,
                 download_root: str | None = None) -> None:
        import whisper

        self.model = whisper.load_model(checkpoint, device=device, download_root=download_root)
        self.multilingual = bool(self.model.is_multilingual)
        self.fp16 = device == "cuda"
        self.vad = vad
        # Decoding installs kv-cache hooks on the shared model: one transcription at a time.
        self._lock = threading.Lock()

    def transcribe(
        self,
        audio: np.ndarray,
        language: str | None = None,
        temperature: float = 0.0,
        prompt: str | None = None,
    ) -> Transcript:
        """Transcribe ``audio``; silence and noise give an empty text."""
        duration = len(audio) / SAMPLE_RATE
        if self.vad and not has_speech(audio):
            return _empty(language, duration)
        with self._lock:
            result: dict[str, Any] = self.model.transcribe(
                audio,
                language=language,
                temperature=temperature,
                initial_prompt=prompt or None,
                fp16=self.fp16,
                condition_on_previous_text=False,
                no_speech_threshold=NO_SPEECH_THRESHOLD,
                verbose=None,
            )
        segments = [
            Segment(
                id=i, start=float(s["start"]), end=float(s["end"]), text=s["text"],
                seek=int(s["seek"]), tokens=list(s["tokens"]),
                temperature=float(s["temperature"]), avg_logprob=float(s["avg_logprob"]),
                compression_ratio=float(s["compression_ratio"]),
                no_speech_prob=float(s["no_speech_prob"]),
            )
            for i, s in enumerate(result["segments"])
        ]
        return Transcript(_join(segments), result.get("language") or "en", duration, segments)


def openai_whisper_checkpoint(model: str, cache_dir: Path) -> str:
    """What ``whisper.load_model`` should open for ``model``.

    A CTranslate2 folder (the offline tiny.en) is converted once into the cache; a ``.pt`` file
    or an official model name ("tiny.en", "large-v3-turbo") passes through unchanged.
    """
    path = Path(model)
    if path.is_dir() and (path / CT2_WEIGHTS).is_file():
        from engine.tiny.whisper import build_from_ct2

        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        return str(build_from_ct2(path, cache_dir / "converted" / f"openai-whisper-{key}"))
    return model


def load(role_settings: Any, settings: Any) -> SpeechToText:
    """Build the configured STT backend (blocking; the registry runs it in a thread)."""
    device = pick_device(role_settings.device).type
    download_root = str(settings.cache_dir / "hub")
    digests.verify(Path(role_settings.model) / CT2_WEIGHTS)
    if role_settings.backend == "openai-whisper":
        checkpoint = openai_whisper_checkpoint(role_settings.model, settings.cache_dir)
        return OpenAIWhisperSTT(checkpoint, device, role_settings.vad, download_root)
    return FasterWhisperSTT(
        role_settings.model, device, role_settings.compute_type,
        role_settings.beam_size, role_settings.vad, download_root,
    )


def measure_stt_rtf(backend: SpeechToText, audio: np.ndarray, repeats: int = 3) -> float:
    """Real-time factor (seconds of compute per second of audio; lower is faster).

    One untimed warm-up run, then the best of ``repeats`` runs, so a busy neighbour on a
    shared machine inflates the figure as little as possible.
    """
    backend.transcribe(audio, language="en")
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        backend.transcribe(audio, language="en")
        best = min(best, time.perf_counter() - started)
    return best / (len(audio) / SAMPLE_RATE)
