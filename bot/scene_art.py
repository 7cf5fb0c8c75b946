"""Scene art: a picture of the current scene, reused when an earlier one is close enough.

Steps in `illustrate`: 1 skip when nothing happened since the last image,
2 a chat call writes an image prompt (persona art style + appearance + scene),
3 the prompt is embedded (/v1/embeddings), 4 the embeddings of the story's
earlier images are searched by cosine similarity (their pixels stay in the
database) and the best is reused when it reaches the threshold: only its PNG is
loaded, 5 otherwise /v1/images/generations paints a new one, which is kept in
the scene-art table with its embedding. Works with any OpenAI-compatible engine.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from bot.cards import Card
from bot.engine_client import EngineBadResponse, EngineClient
from bot.settings import BotSettings
from bot.store import SceneArt, SceneKey, Store, Story, Turn
from bot.story.scene import clean_image_prompt, scene_prompt_messages

SCENE_PROMPT_MAX_TOKENS = 60  # CLIP reads 77 tokens and the art style comes first
SCENE_PROMPT_TEMPERATURE = 0.4  # a steady description, not a creative one
SAFE_NEGATIVE = "nsfw, nudity, gore"
BASE_NEGATIVE = "lowres, blurry, watermark, text"


@dataclass
class SceneImage:
    png: bytes
    prompt: str
    reused: bool
    art_id: int | None  # the scene_art row (None for one-off /imagine art)


@dataclass
class ArtStats:
    """Reuse counters (the benchmark reports the hit rate)."""

    hits: int = 0
    misses: int = 0
    skipped: int = 0  # nothing changed since the last image

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity of two vectors (0 when either is empty, zero or the lengths differ)."""
    if len(a) != len(b) or not a:
        return 0.0
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def best_match(query: Sequence[float], bank: Sequence[SceneKey]) -> tuple[SceneKey | None, float]:
    """The earlier image whose prompt is closest to `query` (only those with stored pixels)."""
    best, score = None, -1.0
    for art in bank:
        if art.embedding and art.has_image:
            similarity = cosine(query, art.embedding)
            if similarity > score:
                best, score = art, similarity
    return best, score


class SceneArtService:
    """Illustrates stories; holds the hit-rate counters for this process."""

    def __init__(self, store: Store, engine: EngineClient, settings: BotSettings):
        self.store, self.engine, self.settings = store, engine, settings
        self.stats = ArtStats()

    async def illustrate(self, story: Story, card: Card, turns: Sequence[Turn], *, force: bool = False,
                         safe: bool = True, fresh: bool = False, cast: Sequence[Card] = ()) -> SceneImage | None:
        """Art for the story's current scene (`cast`: the other personas in it), or None when nothing
        changed and not `force`."""
        bank = await self.store.scene_keys(story.id)
        latest_turn = turns[-1].id if turns else None
        if not force and (latest_turn is None or (bank and bank[0].turn_id == latest_turn)):
            self.stats.skipped += 1
            return None
        reply = await self.engine.chat(scene_prompt_messages(card, turns, cast=cast),
                                       max_tokens=SCENE_PROMPT_MAX_TOKENS, temperature=SCENE_PROMPT_TEMPERATURE)
        prompt = clean_image_prompt(reply.text, card.art_style)
        if not prompt:
            raise EngineBadResponse("the engine wrote an empty image prompt")
        [embedding] = await self.engine.embed([prompt])
        match, score = best_match(embedding, bank)
        if match is not None and not fresh and score >= self.settings.scene_reuse_threshold:
            png = await self.store.scene_art_image(match.id)
            if png:  # (else it was deleted since: paint instead)
                self.stats.hits += 1
                return SceneImage(png=png, prompt=match.prompt, reused=True, art_id=match.id)
        self.stats.misses += 1
        return await self._paint(story, latest_turn, prompt, embedding, safe)

    async def _paint(self, story: Story, turn_id: int | None, prompt: str, embedding: list[float],
                     safe: bool) -> SceneImage:
        seed = zlib.crc32(f"{story.id}:{prompt}".encode())
        negative = negative_prompt(safe)
        png = await self.engine.generate_image(prompt, negative_prompt=negative, seed=seed, safe=safe,
                                               size=self.settings.scene_image_size)
        width, height = image_size(png)
        art = await self.store.add_scene_art(SceneArt(
            story_id=story.id, turn_id=turn_id, prompt=prompt, negative_prompt=negative, seed=seed,
            embedding=list(embedding), image=png, width=width, height=height))
        return SceneImage(png=png, prompt=prompt, reused=False, art_id=art.id)

    async def imagine(self, prompt: str, card: Card | None, safe: bool = True) -> SceneImage:
        """One-off art from the user's prompt, in the persona's art style when there is one."""
        text = clean_image_prompt(prompt, card.art_style if card else "")
        if not text:
            raise ValueError("Describe what to draw.")
        png = await self.engine.generate_image(text, negative_prompt=negative_prompt(safe), safe=safe,
                                               size=self.settings.scene_image_size)
        image_size(png)  # proves it is an image before anyone posts it
        return SceneImage(png=png, prompt=text, reused=False, art_id=None)


def negative_prompt(safe: bool) -> str:
    return f"{BASE_NEGATIVE}, {SAFE_NEGATIVE}" if safe else BASE_NEGATIVE


def image_size(png: bytes) -> tuple[int, int]:
    """Width and height of the engine's image; EngineBadResponse when it is not an image."""
    try:
        with Image.open(io.BytesIO(png)) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as exc:
        raise EngineBadResponse("the engine's image could not be read") from exc
