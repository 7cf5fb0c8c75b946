"""A story's memory as one prompt needs it: pinned facts, summary, lore books, author's note, recall.

The pipeline asks `layers` before building a prompt, starts the recall query
as soon as the user's turn is stored (`start_query`: one short embedding call
that runs beside the history reads), and calls `after_prompt` once the prompt
is built, which hands everything slow to the background worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime

from bot.cards import Lorebook
from bot.engine_client import EngineClient, EngineError
from bot.errors import StoryError
from bot.memory.worker import Interrupted, MemoryWorker, embedding_text
from bot.prompt_fit import DEFAULT_CONTEXT_WINDOW, PromptFitter
from bot.settings import BotSettings
from bot.store import LorebookRecord, PinnedFact, Store, Story, Summary, Turn
from bot.story import Memory, Prompt, speaker_line
from bot.story.memory import FACTS_SHARE, facts_block

log = logging.getLogger(__name__)

RECALL_QUERY_TIMEOUT_S = 2.0  # the recall query never holds a reply up longer than this
RECALL_MIN_TURNS = 12  # shorter stories fit their window whole: nothing to recall
MAX_NOTE_CHARS = 2000


class StoryMemory:
    """Reads the memory layers of a story for its prompts, and feeds the background worker."""

    def __init__(self, store: Store, engine: EngineClient, settings: BotSettings, fitter: PromptFitter,
                 busy=lambda: False):
        self.store, self.engine, self.settings, self.fitter = store, engine, settings, fitter
        self.worker = MemoryWorker(store, engine, settings, fitter.counter,
                                   window=lambda: fitter.known_window or DEFAULT_CONTEXT_WINDOW, busy=busy)
        self._books: dict[tuple[int, datetime | None], Lorebook] = {}  # parsed once per stored version

    def layers(self, story: Story, facts: Sequence[PinnedFact], records: Sequence[LorebookRecord],
               summary: Summary | None) -> tuple[Memory, list[Lorebook]]:
        """The story's memory (recall aside) and the lorebooks it reads besides its card's
        (from `Store.prompt_reads`)."""
        books = []
        for record in records:
            key = (record.id, record.updated_at)
            if key not in self._books:
                self._books[key] = Lorebook.model_validate(record.book)
            books.append(self._books[key])
        memory = Memory(summary=summary.text if summary else "", facts=[f.text for f in facts],
                        note=story.author_note or "", note_depth=story.author_note_depth,
                        lore_timed=dict(story.lore_state or {}))
        return memory, books

    def start_query(self, story: Story, turn: Turn | None) -> asyncio.Task | None:
        """Embed the new turn for recall, beside the history reads (None when nothing can be recalled)."""
        if turn is None or self.settings.recall_turns <= 0 or story.turn_seq < RECALL_MIN_TURNS:
            return None
        return asyncio.create_task(self.engine.embed([embedding_text(turn)]))

    async def recalled(self, story_id: int, query: asyncio.Task | None, before: int) -> list[str]:
        """Older turns (before position `before`) that bear on the new one, as "Name: text" lines."""
        vector = await _vector(query)
        if vector is None:
            return []
        turns = await self.store.recall(story_id, vector, before, self.settings.recall_turns)
        return [speaker_line(t) for t in turns]

    async def after_prompt(self, story: Story, prompt: Prompt, turns: Sequence[Turn], query: asyncio.Task | None,
                           query_turn: Turn | None) -> None:
        """Keep lore's timed state, offer the query's vector, and tell the worker where the window began."""
        if prompt.lore.timed != (story.lore_state or {}):
            await self.store.set_lore_state(story.id, prompt.lore.timed)
        vector = await _vector(query) if query is not None and query.done() else None
        if query is not None and not query.done():
            query.cancel()
        if vector is not None and query_turn is not None:
            self.worker.offer_vector(story.id, query_turn.id, query_turn.position, vector)
        start = turns[prompt.window_start].position if prompt.window_start < len(turns) else None
        self.worker.notify(story.id, start)

    async def close(self) -> None:
        await self.worker.close()

    # ------------------------------------------------------------ what users change (/memory, /story note)

    async def pin(self, story: Story, text: str, author_id: int | None = None) -> PinnedFact:
        """Pin a fact, unless the pinned facts would outgrow their share of the prompt (they are
        always in it: a fact that would be left out is refused instead)."""
        room = int(await self.fitter.smallest_budget() * FACTS_SHARE)
        facts = [f.text for f in await self.store.facts(story.id)] + [text]
        used = self.fitter.counter.tokens(facts_block(facts, 10**9, self.fitter.counter.tokens))
        if used > room:
            raise StoryError(f"The pinned facts would take {used} tokens of the prompt, over their {room}: "
                             "remove or shorten one first (/memory list).")
        try:
            return await self.store.add_fact(story.id, text, author_id)
        except ValueError as exc:
            raise StoryError(str(exc)) from None

    async def unpin(self, story: Story, fact_id: int) -> PinnedFact:
        fact = await self.store.remove_fact(story.id, fact_id)
        if fact is None:
            raise StoryError(f"This story has no pinned fact #{fact_id}. See /memory list.")
        return fact

    async def set_note(self, story: Story, text: str, depth: int) -> None:
        if len(text) > MAX_NOTE_CHARS:
            raise StoryError(f"An author's note is at most {MAX_NOTE_CHARS} characters (this one is {len(text)}).")
        await self.store.set_author_note(story.id, text, depth)

    async def edit_summary(self, story: Story, text: str) -> Summary:
        """Replace the summary's text (it keeps covering the same turns)."""
        latest = await self.store.latest_summary(story.id)
        if latest is None:
            raise StoryError("This story has no summary yet: one is written once turns leave the prompt.")
        return await self.store.add_summary(story.id, latest.through_position, text.strip(),
                                            self.worker.counter.tokens(text))

    async def redo_summary(self, story: Story) -> Summary | None:
        """Write the summary again from the turns (now, raising engine errors to the caller)."""
        if not self.worker.knows_window(story.id):
            raise StoryError("Masque learns which turns left the prompt when it writes the next reply: "
                             "redo the summary after the story's next message.")
        await self.store.clear_summaries(story.id)
        try:
            await self.worker.run_once(story.id)
        except Interrupted:
            self.worker.notify(story.id, None)
            raise StoryError("A reply began meanwhile: the summary is being written in the background.") from None
        return await self.store.latest_summary(story.id)


async def _vector(query: asyncio.Task | None) -> list[float] | None:
    if query is None or (query.done() and (query.cancelled() or query.exception() is not None)):
        return None
    try:
        vectors = await asyncio.wait_for(asyncio.shield(query), RECALL_QUERY_TIMEOUT_S)
    except (TimeoutError, EngineError) as exc:
        log.info("recall skipped for this prompt: %s", exc.__class__.__name__)
        query.cancel()
        return None
    return vectors[0] if vectors else None
