"""Turn-taking: voice activity, end of utterance, minimum length, several speakers, barge-in level."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bot.voice.turns import FRAME_BYTES, FRAME_S, TurnTaker, level_dbfs

SILENT = bytes(FRAME_BYTES)


def tone_frame(amplitude: float = 0.3, freq: float = 220.0) -> bytes:
    t = np.arange(960) / 48000
    wave = (amplitude * 32767 * np.sin(2 * math.pi * freq * t)).astype(np.int16)
    return np.repeat(wave, 2).tobytes()  # stereo


def feed(taker: TurnTaker, user: int, frames: list[bytes], start: float) -> float:
    now = start
    for frame in frames:
        taker.push(user, frame, now)
        now += FRAME_S
    return now


def test_level_of_silence_and_tone():
    assert level_dbfs(SILENT) == -math.inf
    assert -14 < level_dbfs(tone_frame(0.3)) < -12  # a sine's RMS is amplitude / sqrt(2): -13.5 dBFS
    assert level_dbfs(tone_frame(0.001)) < -45


def test_an_utterance_ends_after_the_silence_window_with_preroll_and_tail():
    taker = TurnTaker(silence_s=0.7, min_voiced_s=0.3)
    now = feed(taker, 1, [SILENT] * 20, 0.0)  # 400 ms of quiet before: only 200 ms pre-roll is kept
    now = feed(taker, 1, [tone_frame()] * 50, now)  # one second of speech
    last_voiced = now - FRAME_S
    now = feed(taker, 1, [SILENT] * 10, now)  # then packets of silence, then nothing (the client stops)
    assert taker.poll(last_voiced + 0.69) == []
    [utterance] = taker.poll(last_voiced + 0.7)
    assert utterance.user_id == 1 and utterance.ended_at == pytest.approx(last_voiced)
    assert utterance.voiced_s == pytest.approx(1.0)
    assert len(utterance.pcm) == (10 + 50 + 5) * FRAME_BYTES  # pre-roll + speech + 100 ms tail
    assert taker.poll(now + 5) == []  # given once


def test_too_short_sounds_are_dropped():
    taker = TurnTaker(silence_s=0.5, min_voiced_s=0.3)
    now = feed(taker, 1, [tone_frame()] * 10, 0.0)  # a 200 ms click
    assert taker.poll(now + 1) == []


def test_a_pause_shorter_than_the_window_keeps_one_utterance():
    taker = TurnTaker(silence_s=0.7, min_voiced_s=0.3)
    now = feed(taker, 1, [tone_frame()] * 25, 0.0)
    now = feed(taker, 1, [SILENT] * 25, now)  # 500 ms pause: not the end
    assert taker.poll(now) == []
    now = feed(taker, 1, [tone_frame()] * 25, now)
    [utterance] = taker.poll(now + 1)
    assert utterance.voiced_s == pytest.approx(1.0)


def test_two_speakers_come_out_in_the_order_they_finished():
    taker = TurnTaker(silence_s=0.7, min_voiced_s=0.3)
    feed(taker, 1, [tone_frame()] * 50, 0.0)  # Alice speaks 0-1 s
    feed(taker, 2, [tone_frame(freq=330)] * 30, 0.2)  # Bob speaks 0.2-0.8 s: he ends first
    assert [u.user_id for u in taker.poll(3.0)] == [2, 1]


def test_speaking_time_is_what_barge_in_reads():
    taker = TurnTaker()
    feed(taker, 1, [tone_frame()] * 20, 0.0)
    assert taker.speaking_s(1) == pytest.approx(0.4)
    assert taker.anyone_speaking_s() == pytest.approx(0.4)
    assert taker.speaking_s(2) == 0.0
    taker.forget(1)
    assert taker.anyone_speaking_s() == 0.0


def test_a_monologue_is_cut_at_the_maximum_length():
    taker = TurnTaker(max_utterance_s=2.0)
    now = feed(taker, 1, [tone_frame()] * 100, 0.0)
    [utterance] = taker.poll(now)
    assert utterance.duration_s == pytest.approx(2.0)
