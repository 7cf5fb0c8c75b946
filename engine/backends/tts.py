"""Text to speech with piper (VITS voices exported to ONNX, fast on a CPU).

``model`` in the role settings is the default voice's ``.onnx`` file (its ``.onnx.json`` config
next to it); ``voices_dir`` may add more voices. A voice's id is its file name without
``.onnx``, e.g. ``en_US-joe-medium``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.backends import digests

log = logging.getLogger(__name__)
# OpenAI's voice names: accepted and spoken by the default voice, so OpenAI clients work unchanged.
OPENAI_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage",
                           "shimmer", "verse"})

MIN_SPEED = 0.25  # OpenAI's range for `speed`
MAX_SPEED = 4.0
ONNX_SUFFIX = ".onnx"


class UnknownVoice(KeyError):
    """The requested voice is not loaded."""


@dataclass(frozen=True)
class VoiceInfo:
    """What /v1/audio/voices tells about one voice."""

    id: str
    language: str
    sample_rate: int
    quality: str
    speakers: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "id": self.id, "object": "voice", "language": self.language,
            "sample_rate": self.sample_rate, "quality": self.quality, "speakers": self.speakers,
        }


@dataclass(frozen=True)
class Speech:
    """Synthesised audio: mono float32 samples in [-1, 1] at ``sample_rate``."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self.samples) / self.sample_rate


def _voice_info(onnx_path: Path) -> VoiceInfo:
    config = json.loads(Path(f"{onnx_path}.json").read_text(encoding="utf-8"))
    return VoiceInfo(
        id=onnx_path.name.removesuffix(ONNX_SUFFIX),
        language=config.get("language", {}).get("code", ""),
        sample_rate=int(config["audio"]["sample_rate"]),
        quality=config.get("audio", {}).get("quality", ""),
        speakers=int(config.get("num_speakers", 1)),
    )


def find_voices(default_voice: str, voices_dir: str = "") -> list[Path]:
    """The default voice first, then every other ``*.onnx`` with a config in ``voices_dir``."""
    paths = [Path(default_voice)] if default_voice else []
    if voices_dir:
        for candidate in sorted(Path(voices_dir).glob(f"*{ONNX_SUFFIX}")):
            if Path(f"{candidate}.json").is_file() and candidate not in paths:
                paths.append(candidate)
    return paths


class PiperTTS:
    """One or more piper voices; the first is the default."""

    name = "piper"

    def __init__(self, voice_paths: list[Path], use_cuda: bool = False) -> None:
        from piper import PiperVoice

        if not voice_paths:
            raise ValueError("No piper voice configured")
        self._voices: dict[str, Any] = {}
        self._info: dict[str, VoiceInfo] = {}
        for path in voice_paths:
            if not Path(f"{path}.json").is_file():
                raise FileNotFoundError(f"Piper voice config missing: {path}.json")
            info = _voice_info(path)
            self._voices[info.id] = PiperVoice.load(path, use_cuda=use_cuda)
            self._info[info.id] = info
            log.info("Loaded piper voice %s (%s, %d Hz)", info.id, info.language, info.sample_rate)
        self.default_voice = next(iter(self._voices))

    def voices(self) -> list[VoiceInfo]:
        """Every loaded voice, the default first."""
        return list(self._info.values())

    def _voice_id(self, voice: str | None) -> str:
        """The loaded voice that speaks ``voice``: the default for None and for OpenAI's names."""
        if voice is None or (voice in OPENAI_VOICES and voice not in self._voices):
            return self.default_voice
        return voice

    def has_voice(self, voice: str) -> bool:
        """True when ``voice`` is a loaded voice id, or one of OpenAI's (spoken by the default voice)."""
        return self._voice_id(voice) in self._voices

    def synthesize(self, text: str, voice: str | None = None, speed: float = 1.0) -> Speech:
        """Speak ``text`` with ``voice`` (default voice when None) at ``speed`` (1.0 = normal)."""
        from piper import SynthesisConfig

        voice_id = self._voice_id(voice or None)
        if voice_id not in self._voices:
            raise UnknownVoice(voice_id)
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise ValueError(f"speed must be between {MIN_SPEED} and {MAX_SPEED}")
        piper_voice = self._voices[voice_id]
        # piper's length_scale stretches phoneme durations: the inverse of speed.
        base_scale = piper_voice.config.length_scale or 1.0
        config = SynthesisConfig(length_scale=base_scale / speed)
        chunks = [chunk.audio_float_array for chunk in piper_voice.synthesize(text, config)]
        samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        return Speech(samples.astype(np.float32, copy=False), self._info[voice_id].sample_rate)


def load(role_settings: Any, settings: Any) -> PiperTTS:
    """Load the configured voices (blocking; the registry runs it in a thread)."""
    use_cuda = role_settings.device == "cuda"
    voices = find_voices(role_settings.model, role_settings.voices_dir)
    for voice in voices:
        digests.verify(voice)
    return PiperTTS(voices, use_cuda)


def measure_tts_rtf(backend: PiperTTS, text: str, repeats: int = 3) -> float:
    """Real-time factor of synthesis (compute seconds per second of speech; lower is faster):
    one warm-up, then the best of ``repeats``."""
    speech = backend.synthesize(text)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        speech = backend.synthesize(text)
        best = min(best, time.perf_counter() - started)
    return best / speech.duration
