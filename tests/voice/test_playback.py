"""Speaking: sentences from a streamed reply, what is spoken, and the source discord.py's player reads."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from bot.voice.playback import FRAME_BYTES, SILENCE, ReplySpeaker, SentenceSplitter, SpeechSource, speakable


def test_sentences_come_out_as_the_reply_grows():
    splitter = SentenceSplitter()
    assert splitter.feed("Hello there") == []
    assert splitter.feed("Hello there, traveller. How") == ["Hello there, traveller."]
    assert splitter.feed("Hello there, traveller. How are you?") == []  # no space after '?' yet
    assert splitter.feed("Hello there, traveller. How are you? I") == ["How are you?"]
    assert splitter.finish("Hello there, traveller. How are you? I waited.") == ["I waited."]
    assert splitter.finish("Hello there, traveller. How are you? I waited.") == []


def test_quotes_and_ellipses_end_sentences_and_long_ones_are_cut_at_a_comma():
    splitter = SentenceSplitter()
    assert splitter.feed('"Run!" she said… then ') == ['"Run!"', "she said…"]
    long = "word " * 30 + ", and then " + "more " * 10
    first = splitter.feed('"Run!" she said… then ' + long)
    assert len(first) == 1 and first[0].endswith(",") and len(first[0]) <= 170


def test_a_rewritten_prefix_does_not_repeat_or_lose_sentences():
    splitter = SentenceSplitter()
    assert splitter.feed("One. Two") == ["One."]
    assert splitter.finish("One. Two three.") == ["Two three."]


def test_speakable_drops_stage_directions_and_markup():
    assert speakable("*She smiles.* \"Welcome, **friend**.\" See https://x.y") == '"Welcome, friend." See'
    assert speakable("*waves*") == "waves"  # only an action: say it
    assert speakable("  ") == ""


def test_the_source_gives_frames_then_silence_while_waiting_then_ends():
    source = SpeechSource()
    assert source.read() == SILENCE  # nothing yet, reply still coming
    source.put(b"\x01" * (FRAME_BYTES + 10))
    assert source.read() == b"\x01" * FRAME_BYTES
    assert source.read() == (b"\x01" * 10).ljust(FRAME_BYTES, b"\0")  # a partial frame is padded when starved
    source.put(b"\x02" * 100)
    source.end()
    assert source.read() == (b"\x02" * 100).ljust(FRAME_BYTES, b"\0")
    assert source.read() == b""  # ended and drained: the player stops
    assert not source.is_opus()


class PlayerDouble:
    """Stands in for discord.VoiceClient's player: reads the source on a thread every 20 ms like discord.py."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.plays = 0

    def is_connected(self) -> bool:
        return True

    def is_playing(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()

    def play(self, source, *, after) -> None:
        if self.is_playing():
            raise RuntimeError("Already playing audio.")
        self.plays += 1
        self._stop.clear()

        def run() -> None:
            while not self._stop.is_set() and (frame := source.read()):
                self.frames.append(frame)
                time.sleep(0.002)
            after(None)

        self._thread = threading.Thread(target=run)
        self._thread.start()


@pytest.mark.timeout(20)
async def test_replies_play_in_order_and_synthesis_does_not_wait_for_playback():
    player = PlayerDouble()
    marks = {"One.": 1, "Two.": 2, "Three.": 3}

    async def synthesise(text: str) -> bytes:
        await asyncio.sleep(0.01)
        return bytes([marks[text]]) * FRAME_BYTES * 3

    first = ReplySpeaker(player, synthesise)
    second = ReplySpeaker(player, synthesise, previous=first)
    for sentence in ("One.", "Two."):
        first.say(sentence)
    second.say("Three.")
    second.finish()
    first.finish()
    await asyncio.wait_for(second.wait(), 10)
    assert first.spoken == ["One.", "Two."] and second.spoken == ["Three."]
    played = [f[0] for f in player.frames if f != SILENCE]
    # The first reply plays whole, in order, before the second starts (it waited for the first to end).
    assert played == [1] * 3 + [2] * 3 + [3] * 3 and player.plays == 2


@pytest.mark.timeout(20)
async def test_stop_ends_playback_and_drops_what_was_not_said():
    player = PlayerDouble()

    async def synthesise(text: str) -> bytes:
        await asyncio.sleep(0.05 if text != "One." else 0)
        return b"\x03" * FRAME_BYTES * 500  # ten seconds

    speaker = ReplySpeaker(player, synthesise)
    speaker.say("One.")
    speaker.say("Two.")
    for _ in range(100):
        if speaker.speaking:
            break
        await asyncio.sleep(0.01)
    assert speaker.speaking
    speaker.stop()
    await asyncio.wait_for(speaker.wait(), 2)
    await asyncio.sleep(0.05)
    assert not player.is_playing() and speaker.spoken == ["One."] and len(player.frames) < 500


async def test_a_failing_sentence_is_skipped_not_fatal():
    player = PlayerDouble()

    async def synthesise(text: str) -> bytes:
        if text == "Bad.":
            raise RuntimeError("tts down")
        return b"\x04" * FRAME_BYTES

    speaker = ReplySpeaker(player, synthesise)
    for sentence in ("Bad.", "Good."):
        speaker.say(sentence)
    speaker.finish()
    await asyncio.wait_for(speaker.wait(), 5)
    assert speaker.failures == 1 and speaker.spoken == ["Good."]
