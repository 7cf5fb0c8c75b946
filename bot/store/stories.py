"""Story state: channels, stories, turns, swipes, summaries, scene art."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BigInteger, Text, bindparam, delete, func, insert, select, true, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from bot.store.memory import ACTIVE_STORIES, MemoryRepo
from bot.store.models import (
    AuthorKind,
    ChannelPersona,
    ChannelState,
    LorebookRecord,
    PinnedFact,
    SceneArt,
    Story,
    StoryStatus,
    Summary,
    Swipe,
    Turn,
    TurnEmbedding,
    TurnMessage,
    utcnow,
)
from bot.store.sqlite import Prepared

SCENE_BANK_SIZE = 200  # the newest scene images a new scene is compared with
PERSONA_TURNS_KNOWN = 100_000  # stories whose newest persona turn position `answer_after` remembers


@dataclass(frozen=True)
class SceneKey:
    """A stored scene image as reuse compares it: the prompt's embedding, without the pixels."""

    id: int
    turn_id: int | None
    prompt: str
    embedding: list[float]
    has_image: bool


@dataclass
class NewTurn:
    """What a caller knows about a turn before it is stored."""

    author_kind: AuthorKind
    text: str
    author_id: int | None = None
    author_name: str = ""
    persona_id: int | None = None
    attachments: list[dict[str, Any]] = field(default_factory=list)
    token_count: int = 0
    message_ids: Sequence[int] = ()
    swipes: Sequence[str] = ()  # persona turns: the alternatives; `text` is swipes[0] when given

@dataclass
class PromptReads:
    """What a prompt reads of a story (`StoryRepo.prompt_reads`): the story, summary and turns from one
    snapshot; facts and lorebooks from the cache."""

    story: Story
    facts: list[PinnedFact]
    books: list[LorebookRecord]
    turns: list[Turn]  # the last ones the summary does not cover, oldest first, without swipes and messages
    summary: Summary | None


# add_turn's statements on SQLite, compiled once (bot/store/sqlite.py)
_SQLITE_NEXT_POSITION = Prepared(update(Story).where(Story.id == bindparam("story"))
                                 .values(turn_seq=Story.turn_seq + 1, updated_at=bindparam("now"))
                                 .returning(Story.turn_seq))
_SQLITE_INSERT_TURN = Prepared(insert(Turn).returning(Turn.id),
                               [column.key for column in Turn.__table__.c if column.key != "id"])
_SQLITE_INSERT_SWIPES = Prepared(insert(Swipe), ["turn_id", "index", "text", "token_count", "created_at"])
_SQLITE_INSERT_MESSAGES = Prepared(insert(TurnMessage), ["message_id", "turn_id", "part"])


def _add_turn_at_once():
    """PostgreSQL: add_turn's four writes in one statement, through data-modifying CTEs: the story's
    counter (its row lock orders concurrent turns), the turn at the new position, a swipe per text
    and a row per message id (unnested arrays, numbered from 0). Nothing is written when the story
    is gone (no row back), or when a message id is taken (the statement fails whole)."""
    turns = Turn.__table__

    def param(name: str, type_: Any = None) -> Any:  # "new_...": a bind named as a column would be SET too
        return bindparam(f"new_{name}", type_=type_ if type_ is not None else turns.c[name].type)

    seq = (update(Story).where(Story.id == param("story_id")).values(turn_seq=Story.turn_seq + 1,
                                                                    updated_at=param("now", turns.c.updated_at.type))
           .returning(Story.turn_seq).cte("seq"))
    now = param("now", turns.c.created_at.type)
    values = {"story_id": param("story_id"), "position": seq.c.turn_seq, "author_kind": param("author_kind"),
              "author_id": param("author_id"), "author_name": param("author_name"),
              "persona_id": param("persona_id"), "text": param("text"), "attachments": param("attachments"),
              "token_count": param("token_count"), "selected_swipe": param("selected_swipe"),
              "created_at": now, "updated_at": now}
    turn = (insert(Turn).from_select(list(values), select(*values.values()).select_from(seq))
            .returning(Turn.id, Turn.position).cte("turn"))
    texts = func.unnest(bindparam("new_texts", type_=ARRAY(Text))).table_valued(
        "text", with_ordinality="part").render_derived()
    ids = func.unnest(bindparam("new_message_ids", type_=ARRAY(BigInteger))).table_valued(
        "message_id", with_ordinality="part").render_derived()
    swipes = insert(Swipe).from_select(
        ["turn_id", "index", "text", "token_count", "created_at"],
        select(turn.c.id, texts.c.part - 1, texts.c.text, param("token_count"), now)
        .select_from(turn).join(texts, true()))
    messages = insert(TurnMessage).from_select(
        ["message_id", "turn_id", "part"],
        select(ids.c.message_id, turn.c.id, ids.c.part - 1).select_from(turn).join(ids, true()))
    return select(turn.c.id, turn.c.position).add_cte(swipes.cte("swipes"), messages.cte("messages"))


_ADD_TURN_AT_ONCE = _add_turn_at_once()

# cache kinds (see Database._cached): read on every message, written only by the methods below
CHANNEL_SETTINGS = "channel_settings"
CHANNEL_PERSONAS = "channel_personas"


class DuplicateMessage(LookupError):
    """A Discord message already shows a stored turn (a gateway replay, or a restart seeing it again)."""

    def __init__(self, message_ids: Sequence[int]):
        super().__init__(f"message(s) {', '.join(map(str, message_ids))} already have a turn")
        self.message_ids = list(message_ids)



def _with_children(query):
    return query.options(selectinload(Turn.swipes), selectinload(Turn.messages))


# prompt reads, built once (building a select with its clauses cost about as much as running it)
_LATEST_SUMMARY = (select(Summary).where(Summary.story_id == bindparam("story"))
                   .order_by(Summary.through_position.desc(), Summary.id.desc()).limit(1))
_TURNS_BETWEEN = (select(Turn).where(Turn.story_id == bindparam("story"), Turn.position > bindparam("after"),
                                     Turn.position < bindparam("before"))
                  .order_by(Turn.position.desc()).limit(bindparam("limit")))
_NO_POSITION_BOUND = 2**31 - 1  # positions are 32-bit integers


class StoryRepo(MemoryRepo):
    # ------------------------------------------------------------ channels

    async def bind_personas(self, channel_id: int, guild_id: int, persona_ids: Sequence[int]) -> None:
        """Set the channel's personas (in order), creating the channel row if needed."""
        async with self.session() as session:
            channel = await self._channel(session, channel_id, guild_id)
            await session.execute(delete(ChannelPersona).where(ChannelPersona.channel_id == channel_id))
            for position, persona_id in enumerate(persona_ids):
                session.add(ChannelPersona(channel_id=channel.channel_id, persona_id=persona_id, position=position))
        self.forget(CHANNEL_PERSONAS, channel_id)

    async def channel_persona_ids(self, channel_id: int) -> list[int]:
        """The channel's personas in order (cached: read several times per message)."""
        return list(await self._cached(CHANNEL_PERSONAS, channel_id,
                                       lambda: self._load_channel_persona_ids(channel_id)))

    async def _load_channel_persona_ids(self, channel_id: int) -> list[int]:
        async with self.read() as session:
            rows = await session.scalars(
                select(ChannelPersona.persona_id)
                .where(ChannelPersona.channel_id == channel_id)
                .order_by(ChannelPersona.position)
            )
            return list(rows)

    async def channel_settings(self, channel_id: int) -> dict[str, Any]:
        """The channel's stored settings (cached: read several times per message)."""
        return dict(await self._cached(CHANNEL_SETTINGS, channel_id,
                                       lambda: self._load_channel_settings(channel_id)))

    async def _load_channel_settings(self, channel_id: int) -> dict[str, Any]:
        async with self.read() as session:
            channel = await session.get(ChannelState, channel_id)
            return dict(channel.settings) if channel else {}

    async def update_channel_settings(self, channel_id: int, guild_id: int, **changes: Any) -> dict[str, Any]:
        async with self.session() as session:
            channel = await self._channel(session, channel_id, guild_id)
            channel.settings = {**channel.settings, **changes}
            settings = dict(channel.settings)
        self.forget(CHANNEL_SETTINGS, channel_id)
        return settings

    @staticmethod
    async def _channel(session: AsyncSession, channel_id: int, guild_id: int) -> ChannelState:
        channel = await session.get(ChannelState, channel_id)
        if channel is None:
            channel = ChannelState(channel_id=channel_id, guild_id=guild_id, settings={})
            session.add(channel)
            await session.flush()
        return channel

    # ------------------------------------------------------------ stories

    async def start_story(self, channel_id: int, guild_id: int, persona_id: int | None, title: str = "") -> Story:
        """Archive the channel's active story (if any) and start a new one."""
        async with self.session() as session:
            await self._channel(session, channel_id, guild_id)
            await self._archive(session, channel_id)
            story = Story(channel_id=channel_id, guild_id=guild_id, persona_id=persona_id,
                          title=title, status=StoryStatus.ACTIVE, turn_seq=0)
            session.add(story)
        self.forget(ACTIVE_STORIES, channel_id)
        return story

    async def set_story_persona(self, story_id: int, persona_id: int | None) -> None:
        """Change who leads a story (its persona when nobody else is chosen: the cast's first)."""
        async with self.session() as session:
            story = await session.get_one(Story, story_id)
            story.persona_id = persona_id
            channel_id = story.channel_id
        self.forget(ACTIVE_STORIES, channel_id)

    async def active_story(self, channel_id: int) -> Story | None:
        """The channel's active story (cached: read on every message in every channel).

        Its `turn_seq` and `updated_at` may be behind the database; everything else is current.
        """
        return await self._cached(ACTIVE_STORIES, channel_id, lambda: self._load_active_story(channel_id))

    async def _load_active_story(self, channel_id: int) -> Story | None:
        async with self.read() as session:
            return await session.scalar(
                select(Story).where(Story.channel_id == channel_id, Story.status == StoryStatus.ACTIVE)
            )

    async def get_story(self, story_id: int) -> Story | None:
        async with self.read() as session:
            return await session.get(Story, story_id)

    async def end_story(self, channel_id: int) -> Story | None:
        """Archive the active story; returns it, or None when there was none."""
        try:
            async with self.session() as session:
                return await self._archive(session, channel_id)
        finally:
            self.forget(ACTIVE_STORIES, channel_id)

    @staticmethod
    async def _archive(session: AsyncSession, channel_id: int) -> Story | None:
        story = await session.scalar(
            select(Story).where(Story.channel_id == channel_id, Story.status == StoryStatus.ACTIVE)
        )
        if story is not None:
            story.status, story.ended_at = StoryStatus.ARCHIVED, utcnow()
            await session.flush()  # before a new active story is inserted (unique index)
        return story

    async def stories(self, channel_id: int) -> list[Story]:
        async with self.read() as session:
            return list(await session.scalars(
                select(Story).where(Story.channel_id == channel_id).order_by(Story.id)
            ))

    # ------------------------------------------------------------ turns

    async def add_turn(self, story_id: int, new: NewTurn) -> Turn:
        """Append a turn. Positions come from an atomic counter, so concurrent
        appends in one story each get their own position, in commit order.

        Raises DuplicateMessage (and stores nothing) when one of `new.message_ids` already shows a turn:
        the message table's primary key refuses it, so this costs no lookup unless it happens."""
        try:
            return await self.retrying_disconnect(lambda: self._add_turn(story_id, new))
        except IntegrityError:
            if new.message_ids:
                async with self.read() as session:
                    taken = list(await session.scalars(select(TurnMessage.message_id).where(
                        TurnMessage.message_id.in_(list(new.message_ids)))))
                if taken:
                    raise DuplicateMessage(taken) from None
            raise

    async def _add_turn(self, story_id: int, new: NewTurn) -> Turn:
        # Neither the ORM's unit of work nor its execution path: a turn is written on every message, and
        # either cost more CPU than the statements themselves. SQLite writes it in one trip to its
        # thread, PostgreSQL in one statement; the Turn returned is built here.
        texts = list(new.swipes) or ([new.text] if new.author_kind == AuthorKind.PERSONA else [])
        now = utcnow()
        row = dict(story_id=story_id, author_kind=new.author_kind, author_id=new.author_id,
                   author_name=new.author_name, persona_id=new.persona_id, text=texts[0] if texts else new.text,
                   attachments=list(new.attachments), token_count=new.token_count, selected_swipe=0,
                   created_at=now, updated_at=now)
        swipes = [dict(index=i, text=t, token_count=new.token_count, created_at=now) for i, t in enumerate(texts)]
        messages = [dict(message_id=m, part=i) for i, m in enumerate(new.message_ids)]
        write = self._insert_turn if self._sqlite else self._insert_turn_at_once
        turn_id, position = await write(row, swipes, messages)
        if new.author_kind == AuthorKind.PERSONA:
            self._note_persona_turn(story_id, position)
        return Turn(id=turn_id, position=position, **row, swipes=[Swipe(turn_id=turn_id, **s) for s in swipes],
                    messages=[TurnMessage(turn_id=turn_id, **m) for m in messages])

    async def _insert_turn(self, row: dict[str, Any], swipes: list[dict[str, Any]],
                           messages: list[dict[str, Any]]) -> tuple[int, int]:
        """SQLite: a turn, its swipes and its messages in one transaction, in one trip to the connection's
        thread (`write_in_one_trip`): (turn id, position)."""
        counter = _SQLITE_NEXT_POSITION.parameters({"story": row["story_id"], "now": row["created_at"]})

        def write(db: sqlite3.Connection) -> tuple[int, int]:
            found = db.execute(_SQLITE_NEXT_POSITION.sql, counter).fetchone()
            if found is None:
                raise LookupError(f"story {row['story_id']} does not exist")
            position = found[0]
            turn_id = db.execute(_SQLITE_INSERT_TURN.sql,
                                 _SQLITE_INSERT_TURN.parameters({**row, "position": position})).fetchone()[0]
            if swipes:
                db.executemany(_SQLITE_INSERT_SWIPES.sql,
                               [_SQLITE_INSERT_SWIPES.parameters({**s, "turn_id": turn_id}) for s in swipes])
            if messages:
                db.executemany(_SQLITE_INSERT_MESSAGES.sql,
                               [_SQLITE_INSERT_MESSAGES.parameters({**m, "turn_id": turn_id}) for m in messages])
            return turn_id, position
        return await self.write_in_one_trip(write)

    async def _insert_turn_at_once(self, row: dict[str, Any], swipes: list[dict[str, Any]],
                                   messages: list[dict[str, Any]]) -> tuple[int, int]:
        """PostgreSQL: what `_insert_turn` writes, as one statement in autocommit (`_ADD_TURN_AT_ONCE`):
        one round trip where BEGIN, four statements and COMMIT took six; as atomic as a transaction."""
        values = {**row, "now": row["created_at"], "texts": [s["text"] for s in swipes],
                  "message_ids": [m["message_id"] for m in messages]}
        async with self.engine.connect() as connection:
            connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
            added = (await connection.execute(_ADD_TURN_AT_ONCE, {f"new_{k}": v for k, v in values.items()})).first()
        if added is None:
            raise LookupError(f"story {row['story_id']} does not exist")
        return added.id, added.position

    async def answer_after(self, story_id: int, turns: Sequence[Turn]) -> None:
        """Put people's turns about to be answered after any persona turn stored since they came (they
        arrived while another reply was being written), so the story reads each answer after what it
        answers. New positions come from the story's counter; `turns` are updated in place.

        Most messages come when no reply is in the making: the newest persona turn's position, as this
        process last stored or read it, then says there is nothing to move, without a query. (A
        channel's persona turns are written by the one process that runs its shard.)"""
        if not turns:
            return
        first = min(t.position for t in turns)
        known = self._persona_turn_at.get(story_id)
        if known is not None and known < first:
            return
        async with self.session() as session:
            latest = await session.scalar(select(func.max(Turn.position)).where(
                Turn.story_id == story_id, Turn.author_kind == AuthorKind.PERSONA))
            self._note_persona_turn(story_id, latest or 0)
            if latest is None or latest < first:
                return
            for turn in sorted(turns, key=lambda t: t.position):
                position = await session.scalar(
                    update(Story).where(Story.id == story_id)
                    .values(turn_seq=Story.turn_seq + 1).returning(Story.turn_seq))
                await session.execute(update(Turn).where(Turn.id == turn.id).values(position=position))
                turn.position = position

    def _note_persona_turn(self, story_id: int, position: int) -> None:
        if len(self._persona_turn_at) >= PERSONA_TURNS_KNOWN and story_id not in self._persona_turn_at:
            self._persona_turn_at.clear()  # only a shortcut: the next answer of each story asks again
        self._persona_turn_at[story_id] = position

    async def get_turn(self, turn_id: int) -> Turn | None:
        async with self.read() as session:
            return await session.scalar(_with_children(select(Turn).where(Turn.id == turn_id)))

    async def turn_by_message(self, message_id: int) -> Turn | None:
        """The turn a Discord message shows (for edits, deletes and buttons)."""
        async with self.read() as session:
            return await session.scalar(
                _with_children(select(Turn).join(TurnMessage).where(TurnMessage.message_id == message_id))
            )

    async def prompt_reads(self, story_id: int, limit: int, before: int | None = None) -> PromptReads | None:
        """Everything a prompt reads: the story, its latest summary and the last `limit` turns the summary
        does not cover (before position `before` when given), in one snapshot; its pinned facts and
        lorebooks (cached: `story_extras`). None when the story is gone."""
        async with self.read() as session:
            story = await session.get(Story, story_id)
            if story is None:
                return None
            turns, summary = await self._history(session, story_id, limit, before)
        facts, books = await self.story_extras(story_id, story.guild_id)
        return PromptReads(story, facts, books, turns, summary)

    async def prompt_history(self, story_id: int, limit: int,
                             before: int | None = None) -> tuple[list[Turn], Summary | None]:
        """The latest summary, and the last `limit` turns it does not cover (before position `before`
        when given), oldest first, without their swipes and messages; one snapshot."""
        async with self.read() as session:
            return await self._history(session, story_id, limit, before)

    @staticmethod
    async def _history(session: AsyncSession, story_id: int, limit: int,
                       before: int | None) -> tuple[list[Turn], Summary | None]:
        summary = await session.scalar(_LATEST_SUMMARY, {"story": story_id})
        turns = list(await session.scalars(_TURNS_BETWEEN, {
            "story": story_id, "limit": limit, "before": _NO_POSITION_BOUND if before is None else before,
            "after": -_NO_POSITION_BOUND if summary is None else summary.through_position}))
        turns.reverse()
        return turns, summary

    async def recent_turns(self, story_id: int, limit: int | None = None) -> list[Turn]:
        """The story's last `limit` turns (all when None), oldest first."""
        query = _with_children(select(Turn).where(Turn.story_id == story_id).order_by(Turn.position.desc()))
        if limit is not None:
            query = query.limit(limit)
        async with self.read() as session:
            return list(reversed(list(await session.scalars(query))))

    async def last_persona_id(self, story_id: int) -> int | None:
        """The persona that spoke last in the story (None before any did)."""
        async with self.read() as session:
            return await session.scalar(
                select(Turn.persona_id).where(Turn.story_id == story_id, Turn.author_kind == AuthorKind.PERSONA)
                .order_by(Turn.position.desc()).limit(1))

    async def count_turns(self, story_id: int) -> int:
        async with self.read() as session:
            return await session.scalar(select(func.count()).where(Turn.story_id == story_id)) or 0

    async def set_turn_messages(self, turn_id: int, message_ids: Sequence[int]) -> None:
        """Record which Discord messages now show the turn (replacing earlier ones)."""
        async with self.session() as session:
            await session.execute(delete(TurnMessage).where(TurnMessage.turn_id == turn_id))
            session.add_all(TurnMessage(message_id=m, turn_id=turn_id, part=i) for i, m in enumerate(message_ids))

    async def edit_turn(self, turn_id: int, text: str, token_count: int | None = None,
                        attachments: list[dict[str, Any]] | None = None) -> Turn:
        """Change a turn's text (a user edited their message; a continue appended text)."""
        async with self.session() as session:
            turn = await session.scalar(_with_children(select(Turn).where(Turn.id == turn_id)))
            if turn is None:
                raise LookupError(f"turn {turn_id} does not exist")
            turn.text = text
            if token_count is not None:
                turn.token_count = token_count
            if attachments is not None:
                turn.attachments = attachments
            if turn.swipes:
                turn.swipes[turn.selected_swipe].text = text
            await self._text_changed(session, turn)
        return turn

    async def add_swipe(self, turn_id: int, text: str, token_count: int = 0, select_it: bool = True) -> Turn:
        """Add an alternative reply (regenerate) and, by default, make it the one the story keeps."""
        async with self.session() as session:
            turn = await session.scalar(
                _with_children(select(Turn).where(Turn.id == turn_id).with_for_update())
            )
            if turn is None:
                raise LookupError(f"turn {turn_id} does not exist")
            index = len(turn.swipes)
            turn.swipes.append(Swipe(index=index, text=text, token_count=token_count))
            if select_it:
                turn.selected_swipe, turn.text, turn.token_count = index, text, token_count
                await self._text_changed(session, turn)
        return turn

    async def select_swipe(self, turn_id: int, index: int) -> Turn:
        """Keep swipe `index` (clamped to the range) as the turn's text."""
        async with self.session() as session:
            turn = await session.scalar(_with_children(select(Turn).where(Turn.id == turn_id)))
            if turn is None or not turn.swipes:
                raise LookupError(f"turn {turn_id} has no swipes")
            index = max(0, min(index, len(turn.swipes) - 1))
            swipe = turn.swipes[index]
            turn.selected_swipe, turn.text, turn.token_count = index, swipe.text, swipe.token_count
            await self._text_changed(session, turn)
        return turn

    async def delete_turn(self, turn_id: int) -> bool:
        async with self.session() as session:
            story_id = await session.scalar(select(Turn.story_id).where(Turn.id == turn_id))
            result = await session.execute(delete(Turn).where(Turn.id == turn_id))
        if story_id is not None:
            self.forget_recall(story_id)
        return result.rowcount > 0

    async def _text_changed(self, session: AsyncSession, turn: Turn) -> None:
        """A turn's text changed: its embedding is stale (the memory worker makes a new one)."""
        await session.execute(delete(TurnEmbedding).where(TurnEmbedding.turn_id == turn.id))
        self.forget_recall(turn.story_id)

    async def rewind(self, story_id: int, turns: int) -> list[Turn]:
        """Delete the story's last `turns` turns; returns them (their messages may be cleaned up)."""
        async with self.session() as session:
            doomed = list(await session.scalars(
                _with_children(select(Turn).where(Turn.story_id == story_id)
                               .order_by(Turn.position.desc()).limit(max(turns, 0)))
            ))
            if doomed:
                await session.execute(delete(Turn).where(Turn.id.in_([t.id for t in doomed])))
                # A summary that covered a removed turn tells of events that no longer happened.
                first = min(t.position for t in doomed)
                await session.execute(delete(Summary).where(Summary.story_id == story_id,
                                                            Summary.through_position >= first))
        self.forget_recall(story_id)
        return doomed

    # ------------------------------------------------------------ memory and art

    async def add_summary(self, story_id: int, through_position: int, text: str, token_count: int = 0) -> Summary:
        summary = Summary(story_id=story_id, through_position=through_position, text=text, token_count=token_count)
        async with self.session() as session:
            session.add(summary)
        return summary

    async def latest_summary(self, story_id: int) -> Summary | None:
        async with self.read() as session:
            return await session.scalar(_LATEST_SUMMARY, {"story": story_id})

    async def add_scene_art(self, art: SceneArt) -> SceneArt:
        async with self.session() as session:
            session.add(art)
        return art

    async def scene_art(self, story_id: int, limit: int = SCENE_BANK_SIZE) -> list[SceneArt]:
        """The story's scene art, newest first, whole rows (images included)."""
        async with self.read() as session:
            return list(await session.scalars(
                select(SceneArt).where(SceneArt.story_id == story_id)
                .order_by(SceneArt.id.desc()).limit(limit)
            ))

    async def scene_keys(self, story_id: int, limit: int = SCENE_BANK_SIZE) -> list[SceneKey]:
        """The story's scene art as reuse searches it, newest first: prompts and embeddings, never the PNGs.

        `length(image)` is read from the row's header (SQLite) or the TOAST pointer (PostgreSQL), so the
        blobs stay on disk; `image IS NOT NULL` would make SQLite load each one.
        """
        has_image = func.coalesce(func.length(SceneArt.image), 0) > 0
        async with self.read() as session:
            rows = await session.execute(
                select(SceneArt.id, SceneArt.turn_id, SceneArt.prompt, SceneArt.embedding, has_image)
                .where(SceneArt.story_id == story_id).order_by(SceneArt.id.desc()).limit(limit))
            return [SceneKey(id, turn_id, prompt, embedding or [], bool(image))
                    for id, turn_id, prompt, embedding, image in rows]

    async def scene_art_image(self, art_id: int) -> bytes | None:
        """One scene image's PNG (the one reuse picked)."""
        async with self.read() as session:
            return await session.scalar(select(SceneArt.image).where(SceneArt.id == art_id))

    async def count_scene_art(self, story_id: int) -> int:
        """How many scene images the story has (/story status), counted by the database."""
        async with self.read() as session:
            return await session.scalar(select(func.count()).where(SceneArt.story_id == story_id)) or 0
