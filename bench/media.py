"""Speech and art figures for the engine benchmark (not a test: nothing here is asserted).

Measures, on the models the settings name (the offline preset by default):
- STT real-time factor of faster-whisper and of openai-whisper on the same clip,
- TTS real-time factor of piper,
- seconds per image of the configured diffusers pipeline.

The clip is spoken by the packaged piper voice, so both Whisper backends hear identical,
real speech. ``bench/engine.py`` imports :func:`measure_media`; alone, run
``.venv/bin/python bench/media.py`` (or ``-m bench.media``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# Run as a script, this folder comes first on sys.path and its engine.py (the benchmark)
# would shadow the engine package: put the repository root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.audio import SAMPLE_RATE, resample  # noqa: E402
from engine.backends import images as image_backends  # noqa: E402
from engine.backends import stt as stt_backends  # noqa: E402
from engine.backends import tts as tts_backends  # noqa: E402
from engine.registry import resolve_model  # noqa: E402
from engine.settings import EngineSettings, load_settings  # noqa: E402

CLIP_TEXT = (
    "The storm rolled in from the sea just after midnight. The old captain lit a lantern, "
    "pulled on his coat and walked down to the harbour to check the boats. Nobody else was "
    "awake, and the only sound was the wind against the shutters."
)
TTS_TEXT = "Welcome back, traveller. The fire is warm and the soup is almost ready."


def _resolved(settings: EngineSettings, role: str, **update: Any) -> Any:
    role_settings = settings.role(role)
    path = resolve_model(role_settings.model, settings.cache_dir)
    return role_settings.model_copy(update={"model": path, **update})


def speech_clip(tts: tts_backends.PiperTTS, text: str = CLIP_TEXT) -> Any:
    """``text`` spoken by the default voice, as float32 mono 16 kHz (Whisper's input)."""
    spoken = tts.synthesize(text)
    return resample(spoken.samples, spoken.sample_rate, SAMPLE_RATE).astype("float32") / 32767.0


def measure_media(settings: EngineSettings | None = None, repeats: int = 3,
                  image_size: int = 64, image_steps: int = 2) -> dict[str, Any]:
    """The speech and art figures as a dict (see the module docstring)."""
    settings = settings or load_settings()
    figures: dict[str, Any] = {}
    tts = tts_backends.load(_resolved(settings, "tts"), settings)
    figures["tts_rtf"] = tts_backends.measure_tts_rtf(tts, TTS_TEXT, repeats)
    clip = speech_clip(tts)
    figures["clip_seconds"] = round(clip.size / SAMPLE_RATE, 2)
    figures["stt_rtf"] = {}
    figures["stt_load_seconds"] = {}
    for backend_name in ("faster-whisper", "openai-whisper"):
        started = time.perf_counter()
        backend = stt_backends.load(_resolved(settings, "stt", backend=backend_name), settings)
        figures["stt_load_seconds"][backend_name] = round(time.perf_counter() - started, 2)
        figures["stt_rtf"][backend_name] = stt_backends.measure_stt_rtf(backend, clip, repeats)
        del backend
    if settings.images.model:
        painter = image_backends.load(_resolved(settings, "images"), settings)
        figures["image_seconds"] = image_backends.measure_image_seconds(
            painter, image_size, image_steps)
        figures["image"] = f"{image_size}x{image_size}, {image_steps} steps, {settings.images.model}"
    return figures


def format_media(figures: dict[str, Any]) -> str:
    """A small human-readable table of :func:`measure_media`'s figures."""
    lines = [f"clip: {figures['clip_seconds']} s of piper speech (lower RTF is faster)"]
    for name, rtf in figures["stt_rtf"].items():
        load = figures["stt_load_seconds"][name]
        lines.append(f"  STT {name:<15} RTF {rtf:6.3f}   ({1 / rtf:5.1f}x real time, "
                     f"load {load:.1f} s)")
    tts_rtf = figures["tts_rtf"]
    lines.append(f"  TTS piper           RTF {tts_rtf:6.3f}   ({1 / tts_rtf:5.1f}x real time)")
    if "image_seconds" in figures:
        lines.append(f"  image               {figures['image_seconds']:.2f} s  ({figures['image']})")
    return "\n".join(lines)


def main() -> None:
    """Print the figures (``--json`` for machine-readable output)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="engine TOML settings file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = measure_media(load_settings(args.config), repeats=args.repeats)
    print(json.dumps(figures, indent=2) if args.json else format_media(figures))


if __name__ == "__main__":
    main()
