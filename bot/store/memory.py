"""The memory layers' storage: pinned facts, turn embeddings and recall, summaries, lorebooks, the author's note.

Recall is one interface on both databases: `recall(story_id, vector, before, k)`.
PostgreSQL searches in SQL with pgvector (cosine distance; an HNSW index covers
the offline model's size). SQLite keeps each story's vectors as one normalised
numpy matrix in memory (loaded once, appended as embeddings are written) and
searches it by brute force: a 10,000-turn story is a ~15 MB matrix and a
millisecond matrix-vector product. SQLite runs in one process, so the matrix
cannot go stale behind our back; every write here keeps it right.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import LargeBinary, bindparam, cast, delete, insert, literal_column, select, type_coerce, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.store.db import POOL_SIZE, Database
from bot.store.models import LorebookRecord, PinnedFact, Story, Summary, Turn, TurnEmbedding

MAX_FACTS = 50
MAX_FACT_CHARS = 500
ACTIVE_STORIES = "active_stories"  # cache kind: active stories by channel id (read in bot/store/stories.py)
STORY_EXTRAS = "story_extras"  # cache kind: a story's pinned facts and lorebooks, by story id (read per prompt)


@dataclass
class _Bank:
    """One story's vectors on SQLite: turn ids, positions and unit-length rows, by dimension."""

    ids: np.ndarray
    positions: np.ndarray
    matrix: np.ndarray  # float32, rows normalised


# statements run on every turn (the memory worker's, recall's), built once
_TURNS_TO_EMBED = (select(Turn).outerjoin(TurnEmbedding, TurnEmbedding.turn_id == Turn.id)
                   .where(Turn.story_id.in_(bindparam("stories", expanding=True)), TurnEmbedding.turn_id.is_(None))
                   .order_by(Turn.id).limit(bindparam("limit")))
_NOT_EMBEDDED = (select(Turn.id).outerjoin(TurnEmbedding, TurnEmbedding.turn_id == Turn.id)
                 .where(Turn.id.in_(bindparam("ids", expanding=True)), TurnEmbedding.turn_id.is_(None)))
_INSERT_EMBEDDINGS = insert(TurnEmbedding)
_TURNS_BY_ID = select(Turn).where(Turn.id.in_(bindparam("ids", expanding=True))).order_by(Turn.position)  # recall


class MemoryRepo(Database):
    def __init__(self, url: str | None = None, pool_size: int = POOL_SIZE):
        super().__init__(url, pool_size)
        self._recall_banks: dict[tuple[int, int], _Bank | None] = {}  # SQLite: (story, dim) -> vectors

    async def story_extras(self, story_id: int, guild_id: int) -> tuple[list[PinnedFact], list[LorebookRecord]]:
        """What a prompt reads of a story besides the story row and its turns: its pinned facts and the
        lorebooks it reads (its own, then the guild's). Cached: read on every message, changed rarely."""
        async def load() -> tuple[list[PinnedFact], list[LorebookRecord]]:
            async with self.read() as session:
                facts = list(await session.scalars(_facts_of(story_id)))
                return facts, await self._lorebooks(session, guild_id, story_id)
        return await self._cached(STORY_EXTRAS, story_id, load)

    # ------------------------------------------------------------ pinned facts

    async def add_fact(self, story_id: int, text: str, author_id: int | None = None) -> PinnedFact:
        text = " ".join(text.split())
        if not text:
            raise ValueError("A pinned fact needs some text.")
        if len(text) > MAX_FACT_CHARS:
            raise ValueError(f"A pinned fact is at most {MAX_FACT_CHARS} characters (this one is {len(text)}).")
        async with self.session() as session:
            count = len(list(await session.scalars(select(PinnedFact.id).where(PinnedFact.story_id == story_id))))
            if count >= MAX_FACTS:
                raise ValueError(f"This story already has {MAX_FACTS} pinned facts; remove one first.")
            fact = PinnedFact(story_id=story_id, text=text, author_id=author_id)
            session.add(fact)
        self.forget(STORY_EXTRAS, story_id)
        return fact

    async def facts(self, story_id: int) -> list[PinnedFact]:
        async with self.read() as session:
            return list(await session.scalars(
                _facts_of(story_id)))

    async def remove_fact(self, story_id: int, fact_id: int) -> PinnedFact | None:
        async with self.session() as session:
            fact = await session.get(PinnedFact, fact_id)
            if fact is None or fact.story_id != story_id:
                return None
            await session.delete(fact)
        self.forget(STORY_EXTRAS, story_id)
        return fact

    # ------------------------------------------------------------ author's note and lore state

    async def set_author_note(self, story_id: int, text: str, depth: int) -> None:
        async with self.session() as session:
            await session.execute(update(Story).where(Story.id == story_id)
                                  .values(author_note=text.strip(), author_note_depth=depth))
        self.forget(ACTIVE_STORIES)

    async def set_lore_state(self, story_id: int, state: dict[str, Any]) -> None:
        async with self.session() as session:
            await session.execute(update(Story).where(Story.id == story_id).values(lore_state=state))
        self.forget(ACTIVE_STORIES)

    # ------------------------------------------------------------ summaries

    async def summaries(self, story_id: int) -> list[Summary]:
        async with self.read() as session:
            return list(await session.scalars(
                select(Summary).where(Summary.story_id == story_id).order_by(Summary.through_position, Summary.id)))

    async def clear_summaries(self, story_id: int) -> int:
        """Drop the story's summaries (an admin asked for a new one: the worker writes it again)."""
        async with self.session() as session:
            result = await session.execute(delete(Summary).where(Summary.story_id == story_id))
            return result.rowcount or 0

    # ------------------------------------------------------------ embeddings and recall

    async def turns_to_embed(self, story_id: int, limit: int) -> list[Turn]:
        """The story's turns that have no embedding yet, oldest first."""
        return await self.turns_to_embed_in([story_id], limit)

    async def turns_to_embed_in(self, story_ids: Sequence[int], limit: int) -> list[Turn]:
        """These stories' turns that have no embedding yet, the oldest stored first."""
        async with self.read() as session:
            return list(await session.scalars(_TURNS_TO_EMBED, {"stories": list(story_ids), "limit": limit}))

    async def turns_between(self, story_id: int, after: int, before: int) -> list[Turn]:
        """The story's turns with `after` < position < `before`, oldest first (what a summary folds in)."""
        async with self.read() as session:
            return list(await session.scalars(
                select(Turn).where(Turn.story_id == story_id, Turn.position > after, Turn.position < before)
                .order_by(Turn.position)))

    async def add_embeddings(self, story_id: int, items: Sequence[tuple[int, int, list[float]]],
                             model: str = "") -> None:
        """Store (turn id, position, vector) triples. A turn deleted meanwhile is skipped."""
        await self.add_embeddings_in({story_id: items}, model)

    async def add_embeddings_in(self, items: Mapping[int, Sequence[tuple[int, int, list[float]]]],
                                model: str = "") -> None:
        """`add_embeddings` for several stories (story id -> its triples), in one transaction. (Core
        statements built once: this runs after every turn.)"""
        if not any(items.values()):
            return
        async with self.connection() as connection:
            # the turns still there that have no embedding yet
            wanted = set((await connection.execute(_NOT_EMBEDDED, {
                "ids": [turn_id for triples in items.values() for turn_id, _, _ in triples]})).scalars())
            fresh = {story_id: [i for i in triples if i[0] in wanted] for story_id, triples in items.items()}
            rows = [dict(turn_id=t, story_id=story_id, position=p, model=model, dim=len(v), embedding=list(v))
                    for story_id, triples in fresh.items() for t, p, v in triples]
            if rows:
                await connection.execute(_INSERT_EMBEDDINGS, rows)
        for story_id, triples in fresh.items():
            self._bank_append(story_id, triples)

    async def recall(self, story_id: int, vector: Sequence[float], before: int, k: int) -> list[Turn]:
        """The `k` turns before position `before` closest to `vector` (cosine), in story order."""
        if k <= 0 or before <= 1 or not vector:
            return []
        ids = await (self._recall_sql(story_id, vector, before, k) if not self._sqlite
                     else self._recall_bank(story_id, vector, before, k))
        if not ids:
            return []
        async with self.read() as session:
            return list(await session.scalars(_TURNS_BY_ID, {"ids": ids}))

    async def _recall_sql(self, story_id: int, vector: Sequence[float], before: int, k: int) -> list[int]:
        from pgvector.sqlalchemy import VECTOR

        dim = len(vector)
        distance = cast(TurnEmbedding.embedding, VECTOR(dim)).cosine_distance(list(vector))
        # The size as a literal, not a parameter: only then can the planner match the HNSW index's
        # `WHERE dim = 384` (its expression is the same cast).
        same_size = TurnEmbedding.dim == literal_column(str(int(dim)))
        async with self.read() as session:
            return list(await session.scalars(
                select(TurnEmbedding.turn_id)
                .where(TurnEmbedding.story_id == story_id, same_size, TurnEmbedding.position < before)
                .order_by(distance).limit(k)))

    async def _recall_bank(self, story_id: int, vector: Sequence[float], before: int, k: int) -> list[int]:
        bank = await self._bank(story_id, len(vector))
        if bank is None:
            return []
        query = np.asarray(vector, dtype=np.float32)
        query /= np.linalg.norm(query) or 1.0
        scores = bank.matrix @ query
        scores[bank.positions >= before] = -np.inf
        count = int(np.count_nonzero(bank.positions < before))
        if count == 0:
            return []
        top = np.argpartition(-scores, min(k, count) - 1)[: min(k, count)]
        return [int(bank.ids[i]) for i in top]

    async def _bank(self, story_id: int, dim: int) -> _Bank | None:
        banks = self._recall_banks
        if (story_id, dim) not in banks:
            async with self.read() as session:  # the stored float32 bytes as they are: no float lists
                rows = (await session.execute(
                    select(TurnEmbedding.turn_id, TurnEmbedding.position,
                           type_coerce(TurnEmbedding.embedding, LargeBinary))
                    .where(TurnEmbedding.story_id == story_id, TurnEmbedding.dim == dim))).all()
            matrix = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32)
            banks[(story_id, dim)] = _make_bank([r[0] for r in rows], [r[1] for r in rows], matrix, dim)
        return banks[(story_id, dim)]

    def _bank_append(self, story_id: int, items: Sequence[tuple[int, int, list[float]]]) -> None:
        banks = self._recall_banks
        for dim in {len(v) for _, _, v in items}:
            if (story_id, dim) not in banks:
                continue  # loaded whole on first use
            rows = [i for i in items if len(i[2]) == dim]
            new = _make_bank([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], dim)
            old = banks[(story_id, dim)]
            banks[(story_id, dim)] = new if old is None else _Bank(
                np.concatenate([old.ids, new.ids]), np.concatenate([old.positions, new.positions]),
                np.concatenate([old.matrix, new.matrix]))

    def forget_recall(self, story_id: int) -> None:
        """Drop a story's in-memory vectors (turns were deleted or changed); reloaded on next use."""
        for key in [k for k in self._recall_banks if k[0] == story_id]:
            del self._recall_banks[key]

    # ------------------------------------------------------------ lorebooks

    async def save_lorebook(self, guild_id: int, story_id: int | None, name: str,
                            book: dict[str, Any]) -> LorebookRecord:
        """Add a book, or replace the one of that name in the same scope."""
        key = name.casefold()
        async with self.session() as session:
            record = await session.scalar(select(LorebookRecord).where(
                LorebookRecord.guild_id == guild_id, LorebookRecord.scope_key == (story_id or 0),
                LorebookRecord.name_key == key))
            if record is None:
                record = LorebookRecord(guild_id=guild_id, story_id=story_id, scope_key=story_id or 0,
                                        name=name, name_key=key, book=book)
                session.add(record)
            else:
                record.name, record.book = name, book
        self.forget(STORY_EXTRAS)  # a guild's book is read by all its stories
        return record

    async def lorebooks(self, guild_id: int, story_id: int | None) -> list[LorebookRecord]:
        """The books a story reads: its own, then the guild's (by name within each)."""
        async with self.read() as session:
            return await self._lorebooks(session, guild_id, story_id)

    @staticmethod
    async def _lorebooks(session: AsyncSession, guild_id: int, story_id: int | None) -> list[LorebookRecord]:
        scopes = [0] + ([story_id] if story_id else [])
        rows = list(await session.scalars(select(LorebookRecord).where(
            LorebookRecord.guild_id == guild_id, LorebookRecord.scope_key.in_(scopes))))
        return sorted(rows, key=lambda r: (r.scope_key == 0, r.name_key))

    async def remove_lorebook(self, guild_id: int, story_id: int | None, name: str) -> LorebookRecord | None:
        """Remove the story's book of that name, else the guild's."""
        for record in await self.lorebooks(guild_id, story_id):
            if record.name_key == name.casefold():
                async with self.session() as session:
                    await session.execute(delete(LorebookRecord).where(LorebookRecord.id == record.id))
                self.forget(STORY_EXTRAS)
                return record
        return None


def _facts_of(story_id: int):
    return select(PinnedFact).where(PinnedFact.story_id == story_id).order_by(PinnedFact.id)


def _make_bank(ids: list[int], positions: list[int], vectors: Any, dim: int) -> _Bank | None:
    if not ids:
        return None
    matrix = np.array(vectors, dtype=np.float32).reshape(len(ids), dim)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    matrix /= np.where(norms == 0, 1.0, norms)
    return _Bank(np.asarray(ids, dtype=np.int64), np.asarray(positions, dtype=np.int64), matrix)
