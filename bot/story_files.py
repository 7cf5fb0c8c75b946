"""Story files that travel: /story export (text, SillyTavern chat JSONL, Masque JSON) and /story import
(a SillyTavern chat JSONL into a new story). The formats are in bot/story/chatfile.py (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

from bot.errors import StoryError, UnknownPersona
from bot.pipeline import DEFAULT_USER_NAME, StoryPipeline, persona_card
from bot.store import AuthorKind, NewTurn, Persona, Story
from bot.story import estimate_tokens, format_transcript
from bot.story.chatfile import ImportedChat, to_masque_json, to_sillytavern_jsonl

FORMATS = ("text", "sillytavern", "masque")


async def export_story(pipeline: StoryPipeline, channel_id: int, fmt: str) -> bytes:
    """The channel's story as a file in `fmt` (one of FORMATS)."""
    store = pipeline.store
    story = await pipeline.story_of(channel_id)
    turns = await store.recent_turns(story.id)
    if fmt == "text":
        return format_transcript(story, turns).encode("utf-8")
    persona = await pipeline.persona_of_story(story)
    name = persona_card(persona).display_name
    created = story.created_at if story.created_at.tzinfo else story.created_at.replace(tzinfo=UTC)
    if fmt == "sillytavern":
        user = next((t.author_name for t in reversed(turns) if t.author_kind == AuthorKind.USER), DEFAULT_USER_NAME)
        # The header names the persona itself (not its nickname), so /story import finds it again.
        return to_sillytavern_jsonl(turns, character_name=persona.name, user_name=user, created_at=created)
    summary = await store.latest_summary(story.id)
    facts = [f.text for f in await store.facts(story.id)]
    return to_masque_json(turns, title=story.title, persona_name=name, created_at=created,
                          summary=summary.text if summary else "",
                          extra={"pinned_facts": facts, "author_note": story.author_note,
                                 "author_note_depth": story.author_note_depth,
                                 "exported_at": datetime.now(UTC).isoformat()})


async def import_story(pipeline: StoryPipeline, channel_id: int, guild_id: int, chat: ImportedChat,
                       persona_name: str | None = None) -> tuple[Story, Persona]:
    """A new story in the channel holding `chat` (the channel's old story is archived)."""
    store = pipeline.store
    persona = await _persona_for(pipeline, channel_id, guild_id, chat, persona_name)
    async with pipeline.channel_lock(channel_id):
        await store.bind_personas(channel_id, guild_id, [persona.id])
        story = await store.start_story(channel_id, guild_id, persona.id, title=persona.name)
        for turn in chat.turns:
            kind = AuthorKind(turn.author_kind)
            speaks = kind == AuthorKind.PERSONA
            added = await store.add_turn(story.id, NewTurn(
                kind, turn.text, author_name=turn.author_name, persona_id=persona.id if speaks else None,
                swipes=turn.swipes if speaks else (), token_count=estimate_tokens(turn.text)))
            if speaks and 0 < turn.selected_swipe < len(turn.swipes):
                await store.select_swipe(added.id, turn.selected_swipe)
    return story, persona


async def _persona_for(pipeline: StoryPipeline, channel_id: int, guild_id: int, chat: ImportedChat,
                       persona_name: str | None) -> Persona:
    """The persona named, else the one the file names, else the channel's current one."""
    store = pipeline.store
    if persona_name:
        persona = await store.get_persona(guild_id, persona_name)
        if persona is None:
            raise UnknownPersona(persona_name)
        return persona
    persona = await store.get_persona(guild_id, chat.character_name) if chat.character_name else None
    current = await store.active_story(channel_id)
    if persona is None and current is not None and current.persona_id:
        persona = await store.get_persona_by_id(current.persona_id)
    if persona is None:
        raise StoryError(f"There is no persona named {chat.character_name!r} here: say which persona plays this "
                         "story with /story import persona:.")
    return persona
