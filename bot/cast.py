"""A story's cast: which personas are in the scene, their joins and leaves, and who speaks next.

The cast is the channel's persona list (`channel_personas`, in the order they joined); the story's
`persona_id` is its lead (who started it; the next in the cast when the lead leaves). Joins and
leaves are system turns in the story, so a persona added mid-story is shown only what happened
while it was there, and the export tells who came and went. The choices themselves are pure
(bot/story/cast.py).
"""

from __future__ import annotations

import random
import weakref

from bot.cards import Card, expand
from bot.errors import StoryError, UnknownPersona
from bot.prefs import ChannelPrefs, channel_prefs
from bot.store import AuthorKind, NewTurn, Persona, Store, Story, Turn
from bot.story.cast import (
    JOIN_TEXT,
    LEAVE_TEXT,
    Member,
    answered_by,
    choose_speaker,
    member_aliases,
    talkativeness,
)
from bot.story.tokens import estimate_tokens

MAX_CAST = 8  # personas in one scene: more than this and nobody gets a word in


# Parsed cards by persona row: a card is read several times per message (speaker choice, prompt,
# reply header), and validating its JSON costs more than the rest of those steps. A row whose `card`
# is replaced gets parsed again; rows are read-only once loaded (the store caches them).
_CARDS: weakref.WeakKeyDictionary[Persona, tuple[dict, Card]] = weakref.WeakKeyDictionary()


def persona_card(persona: Persona) -> Card:
    """The persona's card model (stored as V3 JSON). Shared by its callers: do not change it."""
    cached = _CARDS.get(persona)
    if cached is not None and cached[0] is persona.card:
        return cached[1]
    card = Card.model_validate(persona.card)
    _CARDS[persona] = (persona.card, card)
    return card


def member_of(persona: Persona) -> Member:
    """How the speaker choice and the other members' prompts see a persona."""
    card = persona_card(persona)
    name = card.display_name
    return Member(persona.id, name, member_aliases(name, card.data.name, card.data.nickname),
                  talkativeness(card.data.extensions),
                  expand(card.data.description, char=name, user="the others", seed=0))


class Cast:
    """Reads and changes a story's cast (through the store)."""

    def __init__(self, store: Store, rng: random.Random | None = None):
        self.store = store
        self.rng = rng or random.Random()

    async def personas(self, story: Story) -> list[Persona]:
        """The cast in order; a story from before casts existed has its lead alone."""
        ids = await self.store.channel_persona_ids(story.channel_id)
        if not ids and story.persona_id is not None:
            ids = [story.persona_id]
        found = [await self.store.get_persona_by_id(i) for i in ids]
        return [p for p in found if p is not None]

    async def members(self, story: Story) -> list[Member]:
        return [member_of(p) for p in await self.personas(story)]

    async def add(self, story: Story, persona: Persona) -> Turn:
        """Bring `persona` into the scene; returns the join note (a story turn)."""
        cast = await self.personas(story)
        if any(p.id == persona.id for p in cast):
            raise StoryError(f"{persona.name} is already in this scene.")
        if len(cast) >= MAX_CAST:
            raise StoryError(f"A scene holds at most {MAX_CAST} personas: remove one first (/story remove).")
        await self.store.bind_personas(story.channel_id, story.guild_id, [p.id for p in cast] + [persona.id])
        return await self._note(story, persona, JOIN_TEXT)

    async def remove(self, story: Story, persona: Persona) -> Turn:
        """Take `persona` out of the scene (it speaks no more); returns the leave note."""
        cast = await self.personas(story)
        if not any(p.id == persona.id for p in cast):
            raise StoryError(f"{persona.name} is not in this scene.")
        rest = [p for p in cast if p.id != persona.id]
        if not rest:
            raise StoryError("A story needs someone to play it: add another persona first, or end it with /story end.")
        await self.store.bind_personas(story.channel_id, story.guild_id, [p.id for p in rest])
        if story.persona_id == persona.id:
            await self.store.set_story_persona(story.id, rest[0].id)
        return await self._note(story, persona, LEAVE_TEXT)

    async def _note(self, story: Story, persona: Persona, template: str) -> Turn:
        text = template.format(name=persona_card(persona).display_name)
        return await self.store.add_turn(story.id, NewTurn(
            AuthorKind.SYSTEM, text, author_name="Scene", persona_id=persona.id, token_count=estimate_tokens(text)))

    async def persona_named(self, guild_id: int, name: str) -> Persona:
        persona = await self.store.get_persona(guild_id, name)
        if persona is None:
            raise UnknownPersona(name)
        return persona

    async def greet(self, story: Story, persona: Persona, user_name: str) -> Turn | None:
        """Store what a persona says on joining the scene (its card's group-only greeting), if anything."""
        text = group_greeting(persona, user_name, story.id)
        if not text:
            return None
        return await self.store.add_turn(story.id, NewTurn(
            AuthorKind.PERSONA, text, author_name=persona_card(persona).display_name, persona_id=persona.id,
            token_count=estimate_tokens(text)))

    async def next_speaker(self, story: Story, name: str | None) -> Persona:
        """The persona `/story next` makes speak: the one named (it must be in the scene), else the one the
        story's strategy picks (round robin when the strategy is manual)."""
        cast = await self.personas(story)
        if name:
            chosen = next((p for p in cast if p.name.lower() == name.lower()), None)
            if chosen is None:
                raise StoryError(f"{name} is not in this scene: add them with /story add.")
            return chosen
        speaker = await self.speaker(story, "", None)
        if speaker is not None:
            return speaker
        last, ids = await self.store.last_persona_id(story.id), [p.id for p in cast]  # manual: in cast order
        return cast[(ids.index(last) + 1) % len(cast) if last in ids else 0]

    async def prefs(self, story: Story) -> ChannelPrefs:
        return await channel_prefs(self.store, story.channel_id)

    async def speaker(self, story: Story, text: str, reply_to: int | None) -> Persona | None:
        """Who answers a human message now (None: nobody, the manual strategy)."""
        cast = await self.personas(story)
        if len(cast) == 1:
            return cast[0]  # a story of one: no choice to make, nothing to read
        prefs = await self.prefs(story)
        last = await self.store.last_persona_id(story.id)
        chosen = choose_speaker([member_of(p) for p in cast], text, reply_to=reply_to,
                                last_speaker=last, strategy=prefs.speaker_strategy, rng=self.rng)
        return next((p for p in cast if chosen and p.id == chosen.persona_id), None)

    async def answerer(self, story: Story, reply: str, speaker: int, in_a_row: int) -> Persona | None:
        """Who answers a persona's reply, within the story's limit of persona replies in a row."""
        cast = await self.personas(story)
        if len(cast) < 2:
            return None  # nobody else to answer
        prefs = await self.prefs(story)
        chosen = answered_by([member_of(p) for p in cast], reply, speaker, in_a_row, prefs.persona_chain)
        return next((p for p in cast if chosen and p.id == chosen.persona_id), None)


def group_greeting(persona: Persona, user_name: str, seed: int) -> str:
    """What a persona says on joining a scene: its card's first group-only greeting ("" when none)."""
    card = persona_card(persona)
    greetings = card.data.group_only_greetings
    return expand(greetings[0], char=card.display_name, user=user_name, seed=seed) if greetings else ""
