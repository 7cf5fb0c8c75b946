"""Background memory work: embed every turn (for recall) and write rolling summaries.

Never on the reply path: the pipeline only calls `notify(story, window_start)`
after a reply, and the work runs in one task when no reply is being made
(or after MAX_IDLE_WAIT_S, so a busy server still gets its summaries).
Nothing is lost on failure: the work is "what is missing" (turns without an
embedding, turns before the window that no summary covers), so a failed run
is simply tried again later, with backoff, and after a restart on the story's
next reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bot.engine_client import EngineBadResponse, EngineClient, EngineError
from bot.settings import BotSettings
from bot.store import Store, Turn
from bot.story import TokenCounter, speaker_line
from bot.story.summary import chunk_turns, clean_summary, summary_messages

log = logging.getLogger(__name__)

EMBED_BATCH = 32
EMBED_ROUNDS = 8  # batches per visit: a story of 10,000 old turns is backfilled over visits
VISIT_STORIES = 64  # stories whose new turns are embedded together
IDLE_POLL_S = 0.2
MAX_IDLE_WAIT_S = 10.0
RETRY_BASE_S = 15.0
RETRY_MAX_S = 600.0
SUMMARY_TEMPERATURE = 0.3
MAX_INTERRUPTIONS = 2  # summary calls of a story stopped for replies before one is let through
WORDS_PER_TOKEN = 0.7
SUMMARY_CHUNK_SHARE = 0.5  # of the context window: the turns folded in one summary call
# Embedding models have small windows (MiniLM: 256 tokens) and servers refuse longer inputs
# rather than cut them; the opening of a turn carries what recall needs.
EMBED_MAX_CHARS = 800


def embedding_text(turn: Turn) -> str:
    """What is embedded for a turn: its "Name: text" line, cut to what any embedding model takes."""
    line = speaker_line(turn)
    return line if len(line) <= EMBED_MAX_CHARS else line[:EMBED_MAX_CHARS].rsplit(" ", 1)[0]


class Interrupted(Exception):
    """A summary call was stopped because a reply began (the engine's time is the reply's)."""


@dataclass
class _Due:
    window_start: int | None  # the position of the oldest turn the last prompt held
    not_before: float = 0.0  # monotonic time: a retry waits until then
    failures: int = 0
    interruptions: int = 0  # summary calls of this story stopped for a reply
    notices: int = 0  # notify() calls: one that comes while the work runs keeps the story due


class MemoryWorker:
    """Runs the memory work of stories that had a reply, one story at a time, in the background."""

    def __init__(self, store: Store, engine: EngineClient, settings: BotSettings, counter: TokenCounter,
                 window: Callable[[], int], busy: Callable[[], bool] = lambda: False):
        self.store, self.engine, self.settings, self.counter = store, engine, settings, counter
        self._window, self._busy = window, busy
        self._due: dict[int, _Due] = {}
        self._windows: dict[int, int] = {}  # story -> where its last prompt's window began
        self._vectors: dict[int, list[tuple[int, int, list[float]]]] = {}  # story -> (turn, position, vector)
        self._task: asyncio.Task | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._summary_call: asyncio.Future | None = None
        self._summarising: int | None = None  # the story whose summary call is in flight
        self.retry_base_s = RETRY_BASE_S

    def notify(self, story_id: int, window_start: int | None) -> None:
        """A prompt of `story_id` was built; turns before `window_start` have left its window."""
        due = self._due.setdefault(story_id, _Due(window_start))
        due.notices += 1
        if window_start is not None:
            due.window_start = self._windows[story_id] = window_start
        self._ensure_running()

    def offer_vector(self, story_id: int, turn_id: int, position: int, vector: Sequence[float]) -> None:
        """An embedding the pipeline already made (the recall query of a user turn): stored, not remade."""
        self._vectors.setdefault(story_id, []).append((turn_id, position, list(vector)))

    def interrupt(self) -> None:
        """A reply begins: stop a summary call in flight (it is made again once no reply is being made;
        the chunks already folded are stored)."""
        due = self._due.get(self._summarising) if self._summarising is not None else None
        if self._summary_call is None or self._summary_call.done() or due is None:
            return
        if due.interruptions < MAX_INTERRUPTIONS:  # then it runs through: a busy channel still gets summaries
            due.interruptions += 1
            self._summary_call.cancel()

    def knows_window(self, story_id: int) -> bool:
        """Whether a prompt of this story was built since start (summaries need to know its window)."""
        return story_id in self._windows

    async def run_once(self, story_id: int) -> None:
        """Do a story's due work now, raising on failure (tests, benchmarks, `/story summary redo`)."""
        failure: EngineError | None = None
        steps = (lambda: self._embed([story_id]), lambda: self._summarise(story_id, self._windows.get(story_id)))
        for step in steps:
            try:  # one failing (an embedding server down) must not hold up the other
                await step()
            except EngineError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    async def drain(self) -> None:
        """Wait until no work is due or running (tests, benchmarks: wrap in asyncio.timeout; a retry
        waiting for its time counts as due)."""
        while self._due or (self._task is not None and not self._task.done()):  # noqa: ASYNC110 - a test helper
            await asyncio.sleep(IDLE_POLL_S / 10)

    async def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})  # not `await task` in suppress(): that would swallow our own cancel
            self._task = None

    # ------------------------------------------------------------ the loop

    def _ensure_running(self) -> None:
        # One task while there is work, none when idle (a story bot spends most time idle, and a
        # parked background task would be one more thing to shut down).
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="masque-memory")

    async def _run(self) -> None:
        while ready := self._ready():
            await self._wait_idle()
            await self._visit(ready[:VISIT_STORIES])
        waiting = [d.not_before for d in self._due.values()]
        if waiting and (self._retry is None or self._retry.cancelled()):  # retries: come back for the first
            delay = max(min(waiting) - time.monotonic(), IDLE_POLL_S)
            self._retry = asyncio.get_running_loop().call_later(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._ensure_running()

    def _ready(self) -> list[int]:
        now = time.monotonic()
        return [s for s, d in self._due.items() if d.not_before <= now]

    async def _wait_idle(self) -> None:
        deadline = time.monotonic() + MAX_IDLE_WAIT_S
        # `busy` is the pipeline's count of replies in flight; polling it a few times a second is
        # simpler than an event both sides must keep in step.
        while self._busy() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(IDLE_POLL_S)

    async def _visit(self, story_ids: list[int]) -> None:
        """The due work of these stories: their new turns embedded together (one read, one embeddings
        call a batch, one write, however many stories), then each story's summary."""
        notices = {s: self._due[s].notices for s in story_ids}
        try:
            await self._embed(story_ids)
            failed: EngineError | None = None
        except EngineError as exc:
            failed = exc
        except Exception:  # a bug must not kill the worker for every story
            log.exception("embedding the new turns of stories %s failed", story_ids)
            failed = None
        for story_id in story_ids:
            due = self._due[story_id]
            failure = failed
            try:
                await self._wait_idle()
                await self._summarise(story_id, self._windows.get(story_id))
            except Interrupted:
                continue  # still due: done again after the reply
            except EngineError as exc:
                failure = failure or exc
            except Exception:
                log.exception("memory work for story %s failed", story_id)
            if failure is not None:
                due.failures += 1
                due.not_before = time.monotonic() + min(self.retry_base_s * 2 ** (due.failures - 1), RETRY_MAX_S)
                log.warning("memory work for story %s failed (%s); retrying in %.0f s", story_id,
                            failure.__class__.__name__, due.not_before - time.monotonic())
            elif due.notices == notices[story_id]:  # a turn stored meanwhile (a later notify): the next visit
                self._due.pop(story_id, None)

    # ------------------------------------------------------------ the work

    async def _embed(self, story_ids: list[int]) -> None:
        """Embed these stories' turns that have none, oldest first; the vectors offered meanwhile (the
        recall queries of user turns) are stored with the first batch, in the same write."""
        offered = {turn_id: (story_id, position, v) for story_id in story_ids
                   for turn_id, position, v in self._vectors.pop(story_id, [])}
        model = self.engine.models.embedding
        try:
            for _ in range(EMBED_ROUNDS):
                turns = await self.store.turns_to_embed_in(story_ids, EMBED_BATCH)
                needed = [t for t in turns if t.id not in offered]
                vectors = await self.engine.embed([embedding_text(t) for t in needed]) if needed else []
                made = dict(zip((t.id for t in needed), vectors, strict=True))
                items: dict[int, list[tuple[int, int, list[float]]]] = {}
                for turn in turns:
                    vector = offered.pop(turn.id)[2] if turn.id in offered else made[turn.id]
                    items.setdefault(turn.story_id, []).append((turn.id, turn.position, vector))
                await self.store.add_embeddings_in(items, model)
                if len(turns) < EMBED_BATCH:
                    return
        finally:  # an engine error, or offers past the batches (already embedded, or still queued)
            left: dict[int, list[tuple[int, int, list[float]]]] = {}
            for turn_id, (story_id, position, vector) in offered.items():
                left.setdefault(story_id, []).append((turn_id, position, vector))
            await self.store.add_embeddings_in(left, model)

    async def _summarise(self, story_id: int, window_start: int | None) -> None:
        """Fold the turns that left the window into the summary, a chunk at a time (each chunk stored)."""
        if window_start is None or window_start - 1 < self.settings.summary_min_turns:
            return  # too few positions before the window for a summary, whatever the last one covers
        latest = await self.store.latest_summary(story_id)
        through = latest.through_position if latest else 0
        if window_start - through - 1 < self.settings.summary_min_turns:
            return  # fewer positions than that between them, so fewer turns: nothing to read
        turns = await self.store.turns_between(story_id, through, window_start)
        if len(turns) < self.settings.summary_min_turns:
            return
        text = latest.text if latest else ""
        limit = int(self._window() * SUMMARY_CHUNK_SHARE) - self.counter.tokens(text)
        for chunk in chunk_turns(turns, max(limit, 64), self.counter.tokens):
            self._summarising = story_id
            try:
                text = await self._fold(text, chunk)
            finally:
                self._summarising = None
            await self.store.add_summary(story_id, chunk[-1].position, text, self.counter.tokens(text))

    async def _fold(self, previous: str, turns: list[Turn]) -> str:
        max_tokens = self.settings.summary_max_tokens
        messages = summary_messages(previous, turns, int(max_tokens * WORDS_PER_TOKEN))
        self._summary_call = asyncio.ensure_future(
            self.engine.chat(messages, max_tokens=max_tokens, temperature=SUMMARY_TEMPERATURE))
        try:
            result = await self._summary_call
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the worker itself is stopping
            raise Interrupted() from None
        finally:
            self._summary_call = None
        text = clean_summary(result.text)
        if not text:
            raise EngineBadResponse("the engine wrote an empty summary")
        return text
