"""Turn-taking in a voice channel: who is speaking, and when an utterance is over.

Pure and synchronous: the voice session pushes each speaker's decoded 20 ms frames
(48 kHz stereo s16le) with their arrival time, and polls now and then. A frame is
*voiced* when its level is above a threshold (dBFS). An utterance starts at the first
voiced frame (with a short pre-roll, so the first syllable is not clipped) and ends
once no voiced frame came for the silence window; Discord clients also stop sending
packets while a user is silent, so the end is found by time, not by frames. Utterances
with less voiced audio than the minimum (a cough, a click) are dropped.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

FRAME_S = 0.02  # Discord sends 20 ms Opus frames
FRAME_BYTES = 3840  # 960 samples x 2 channels x 2 bytes
PREROLL_FRAMES = 10  # 200 ms kept from before the first voiced frame
TAIL_FRAMES = 5  # 100 ms kept after the last voiced frame
MAX_UTTERANCE_S = 30.0  # a monologue is cut into turns of at most this


def level_dbfs(pcm: bytes) -> float:
    """The RMS level of s16le PCM in dB relative to full scale (-inf for digital silence)."""
    samples = np.frombuffer(pcm, dtype=np.int16)
    if samples.size == 0:
        return -math.inf
    power = float(np.dot(samples, samples.astype(np.float64))) / samples.size
    return 10 * math.log10(power / 32768.0**2) if power > 0 else -math.inf


@dataclass(frozen=True)
class Utterance:
    """One thing a speaker said: the audio (48 kHz stereo s16le) and when it was said."""

    user_id: int
    pcm: bytes
    started_at: float
    ended_at: float  # arrival time of the last voiced frame
    voiced_s: float

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / (FRAME_BYTES / FRAME_S)


@dataclass
class _Speaker:
    preroll: deque[bytes] = field(default_factory=lambda: deque(maxlen=PREROLL_FRAMES))
    frames: list[bytes] = field(default_factory=list)
    started_at: float = 0.0
    last_voiced_at: float = 0.0
    voiced_frames: int = 0
    frames_since_voiced: int = 0

    @property
    def active(self) -> bool:
        return bool(self.frames)


class TurnTaker:
    """Voice activity and end-of-utterance detection for every speaker of a call."""

    def __init__(self, *, silence_s: float = 0.7, min_voiced_s: float = 0.3, threshold_dbfs: float = -45.0,
                 max_utterance_s: float = MAX_UTTERANCE_S):
        self.silence_s, self.min_voiced_s = silence_s, min_voiced_s
        self.threshold_dbfs, self.max_utterance_s = threshold_dbfs, max_utterance_s
        self._speakers: dict[int, _Speaker] = {}

    def push(self, user_id: int, pcm: bytes, now: float) -> None:
        """One decoded frame of `user_id`, arrived at `now` (seconds, any monotonic clock)."""
        speaker = self._speakers.get(user_id)
        if speaker is None:
            speaker = self._speakers[user_id] = _Speaker()
        voiced = level_dbfs(pcm) > self.threshold_dbfs
        if not speaker.active:
            if not voiced:
                speaker.preroll.append(pcm)
                return
            speaker.frames = [*speaker.preroll, pcm]
            speaker.preroll.clear()
            speaker.started_at = now
            speaker.voiced_frames, speaker.frames_since_voiced = 0, 0
        else:
            speaker.frames.append(pcm)
        if voiced:
            speaker.voiced_frames += 1
            speaker.last_voiced_at = now
            speaker.frames_since_voiced = 0
        else:
            speaker.frames_since_voiced += 1

    def poll(self, now: float) -> list[Utterance]:
        """Utterances that ended by `now` (silence window passed, or too long), oldest end first."""
        done = []
        for user_id, speaker in self._speakers.items():
            if not speaker.active:
                continue
            silent = now - speaker.last_voiced_at >= self.silence_s
            too_long = len(speaker.frames) * FRAME_S >= self.max_utterance_s
            if silent or too_long:
                utterance = self._finish(user_id, speaker)
                if utterance is not None:
                    done.append(utterance)
        return sorted(done, key=lambda u: u.ended_at)

    def speaking_s(self, user_id: int) -> float:
        """Voiced seconds in the utterance `user_id` is making now (0 when silent): for barge-in."""
        speaker = self._speakers.get(user_id)
        return speaker.voiced_frames * FRAME_S if speaker is not None and speaker.active else 0.0

    def anyone_speaking_s(self) -> float:
        return max((self.speaking_s(u) for u in self._speakers), default=0.0)

    def forget(self, user_id: int) -> None:
        """The user left: whatever they were saying is dropped."""
        self._speakers.pop(user_id, None)

    def _finish(self, user_id: int, speaker: _Speaker) -> Utterance | None:
        keep = len(speaker.frames) - max(0, speaker.frames_since_voiced - TAIL_FRAMES)
        frames, voiced = speaker.frames[:keep], speaker.voiced_frames * FRAME_S
        speaker.frames, speaker.voiced_frames, speaker.frames_since_voiced = [], 0, 0
        if voiced < self.min_voiced_s:
            return None
        return Utterance(user_id, b"".join(frames), speaker.started_at, speaker.last_voiced_at, voiced)
