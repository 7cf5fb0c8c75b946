"""Speaking in a voice channel: a streamed reply becomes sentences, each spoken as soon as it is ready.

`SentenceSplitter` cuts the growing reply text into sentences; `ReplySpeaker` sends
each one to text-to-speech in order and feeds the audio to one `SpeechSource`
playing on the voice client, so the first sentence plays while later ones are
still being written and synthesised. `stop()` is barge-in: playback ends at once
and sentences not yet spoken are dropped.

discord.py's player reads 20 ms of 48 kHz stereo s16le from the source on its own
thread; the source hands out what the synthesiser has produced and, between two
sentences not yet ready, silence (so the call does not end mid-reply).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import re
from collections.abc import Awaitable, Callable

import discord

log = logging.getLogger(__name__)

FRAME_BYTES = 3840  # 20 ms of 48 kHz stereo s16le
SILENCE = bytes(FRAME_BYTES)
MAX_CHUNK_CHARS = 160  # a sentence longer than this is cut at a comma, so speech starts sooner

_SENTENCE_END = re.compile(r"[.!?…]+[\"”’')\]*_~]*(?=\s)|\n+")
_CLAUSE_END = re.compile(r"[,;:—–]\s")
_ACTION = re.compile(r"(?<!\*)\*(?!\*)[^*\n]+(?<!\*)\*(?!\*)")  # *waves*: a stage direction, not spoken
_MARKUP = re.compile(r"[*_~`#>|]+")
_LINKS = re.compile(r"<[^>]*>|https?://\S+")  # links, <@mentions>, <:emoji:>


def speakable(text: str) -> str:
    """What text-to-speech should say: no stage directions in asterisks, no markdown, no links."""
    spoken = _ACTION.sub(" ", text)
    if not spoken.strip(" .,!?\n"):
        spoken = text  # only an action: say it rather than nothing
    return " ".join(_MARKUP.sub("", _LINKS.sub(" ", spoken)).split())


class SentenceSplitter:
    """Cut a reply that grows token by token into sentences, each given once."""

    def __init__(self) -> None:
        self._said = 0  # characters of the reply already given out
        self._text = ""

    def feed(self, text_so_far: str) -> list[str]:
        """The sentences completed since the last call."""
        if not text_so_far.startswith(self._text[: self._said]):
            # The reply was rewritten (a name header dropped, a trim): keep going from the same offset.
            self._said = min(self._said, len(text_so_far))
        self._text = text_so_far
        sentences = []
        while True:
            rest = self._text[self._said:]
            match = _SENTENCE_END.search(rest)
            if match is not None:
                cut = match.end()
            elif len(rest) > MAX_CHUNK_CHARS and (clauses := list(_CLAUSE_END.finditer(rest, 0, MAX_CHUNK_CHARS))):
                cut = clauses[-1].end()
            else:
                break
            self._said += cut
            if piece := rest[:cut].strip():
                sentences.append(piece)
        return sentences

    def finish(self, text: str) -> list[str]:
        """The final text: every sentence not given yet, the unfinished last one included."""
        sentences = self.feed(text)
        rest = self._text[self._said:].strip()
        self._said = len(self._text)
        return sentences + ([rest] if rest else [])


class SpeechSource(discord.AudioSource):
    """PCM handed over by the event loop, read by discord.py's player thread 20 ms at a time."""

    def __init__(self) -> None:
        self._chunks: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._buffer = bytearray()
        self._ended = False

    def put(self, pcm: bytes) -> None:
        self._chunks.put(pcm)

    def end(self) -> None:
        """No more audio will come: play what is left, then stop."""
        self._chunks.put(None)

    def read(self) -> bytes:
        while len(self._buffer) < FRAME_BYTES and not self._ended:
            try:
                chunk = self._chunks.get_nowait()
            except queue.Empty:
                return SILENCE if not self._buffer else self._take()  # the next sentence is on its way
            if chunk is None:
                self._ended = True
            else:
                self._buffer += chunk
        return self._take()

    def _take(self) -> bytes:
        if not self._buffer:
            return b""  # ended and drained: the player stops
        frame = bytes(self._buffer[:FRAME_BYTES]).ljust(FRAME_BYTES, b"\0")
        del self._buffer[:FRAME_BYTES]
        return frame

    def is_opus(self) -> bool:
        return False


Synthesise = Callable[[str], Awaitable[bytes]]  # text -> 48 kHz stereo s16le PCM


class ReplySpeaker:
    """Speaks one reply on a voice client, sentence by sentence, after the previous reply finished."""

    def __init__(self, voice_client: discord.VoiceClient, synthesise: Synthesise, *,
                 previous: ReplySpeaker | None = None, on_first_audio: Callable[[], None] | None = None):
        self._vc, self._synthesise, self._previous = voice_client, synthesise, previous
        self._on_first_audio = on_first_audio
        self._sentences: asyncio.Queue[str | None] = asyncio.Queue()
        self._source = SpeechSource()
        self._done = asyncio.Event()
        self._started = False  # playing on the voice client
        self._starting: asyncio.Task | None = None  # waits for the previous reply, then plays
        self.stopped = False
        self.spoken: list[str] = []
        self.failures = 0
        self._task = asyncio.create_task(self._run(), name="voice-reply")

    def say(self, sentence: str) -> None:
        if not self.stopped:
            self._sentences.put_nowait(sentence)

    def finish(self) -> None:
        """The reply is complete: no more sentences."""
        self._sentences.put_nowait(None)

    def stop(self) -> None:
        """Barge-in or leaving: stop speaking now; what was not spoken yet is dropped."""
        if self.stopped:
            return
        self.stopped = True
        self._task.cancel()
        if self._starting is not None:
            self._starting.cancel()
        if self._started and self._vc.is_playing():
            self._vc.stop()
        self._done.set()

    @property
    def speaking(self) -> bool:
        return self._started and not self._done.is_set()

    async def wait(self) -> None:
        """Until the reply was played to its end (or stopped)."""
        await self._done.wait()

    async def _run(self) -> None:
        try:
            while (sentence := await self._sentences.get()) is not None:
                text = speakable(sentence)
                if not text:
                    continue
                try:
                    pcm = await self._synthesise(text)
                except Exception as exc:  # noqa: BLE001 - one sentence failing must not end the reply
                    self.failures += 1
                    log.warning("text to speech failed for a sentence (%s); skipping it", exc)
                    continue
                self._source.put(pcm)
                self.spoken.append(text)
                if self._starting is None:  # synthesis goes on while the previous reply finishes
                    self._starting = asyncio.create_task(self._start(), name="voice-reply-start")
            self._source.end()
            if self._starting is None:
                self._done.set()
        except asyncio.CancelledError:
            self._source.end()
            raise
        except Exception:
            log.exception("voice reply playback failed")
            self._done.set()

    async def _start(self) -> None:
        if self._previous is not None:
            await self._previous.wait()
        if self.stopped or not self._vc.is_connected():
            self._done.set()
            return
        loop = asyncio.get_running_loop()

        def after(error: Exception | None) -> None:
            if error is not None:
                log.warning("voice playback ended with an error: %s", error)
            with contextlib.suppress(RuntimeError):  # the loop closed first (shutting down)
                loop.call_soon_threadsafe(self._done.set)

        with contextlib.suppress(discord.ClientException):
            if self._vc.is_playing():
                self._vc.stop()  # an older reply still playing after being superseded
        self._vc.play(self._source, after=after)
        self._started = True
        if self._on_first_audio is not None:
            self._on_first_audio()
