"""The request that turns the current scene into an image prompt (scene art).

The bot owns scene art so it works with any OpenAI-compatible engine: a short
chat call writes a one-line diffusion prompt from the persona's art style,
appearance and the last few turns.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from bot.cards import Card, expand
from bot.story.prompt import TurnLike, render_turn

SCENE_TURNS = 6  # turns of context the image prompt is written from
SCENE_CHARS = 2400  # cap on the scene text sent (the newest text is kept)
APPEARANCE_CHARS = 600  # per persona in the scene
PROMPT_MAX_CHARS = 320  # CLIP text encoders read 77 tokens (~300 characters); longer is wasted
SCENE_INSTRUCTION = (
    "You write prompts for an image generator. Describe the CURRENT scene of this role-play as one "
    "comma-separated line of visual details: who is there and what they look like, what they are doing, "
    "the place, the light, the mood. No dialogue, no names of real artists, no explanations. "
    "Answer with the prompt line only."
)


def scene_prompt_messages(card: Card, turns: Sequence[TurnLike], user_name: str = "User",
                          cast: Sequence[Card] = ()) -> list[dict[str, Any]]:
    """Chat messages asking the engine for an image prompt of the current scene (`card`: the story's lead,
    whose art style the picture takes; `cast`: the other personas in the scene, whose looks it shows)."""
    char = card.display_name
    lines = [f"{t.author_name or char}: {render_turn(t)}" for t in turns[-SCENE_TURNS:]]
    scene = "\n".join(lines)[-SCENE_CHARS:]
    looks = [_appearance(member) for member in [card, *cast]]
    context = "\n\n".join(s for s in [
        f"Art style: {card.art_style}" if card.art_style else "",
        *(look for look in looks if look),
        f"Setting: {card.data.scenario}" if card.data.scenario.strip() else "",
        f"Latest turns:\n{scene}" if scene else "",
    ] if s)
    return [
        {"role": "system", "content": SCENE_INSTRUCTION},
        {"role": "user", "content": expand(context, char=char, user=user_name)},
    ]


def _appearance(card: Card) -> str:
    """A persona's look for the image prompt: its card's `appearance` (Masque extension), else its
    description (cut short: the scene needs the looks of everyone, not one life story)."""
    look = str(card.data.masque.get("appearance", "")) or card.data.description
    look = " ".join(expand(look, char=card.display_name, user="User").split())
    if len(look) > APPEARANCE_CHARS:
        look = look[:APPEARANCE_CHARS].rsplit(" ", 1)[0] + "…"
    return f"{card.display_name}'s appearance: {look}" if look else ""


def clean_image_prompt(text: str, art_style: str = "") -> str:
    """One clean line for the image model, the art style first (it matters most to the look)."""
    line = text.strip().strip("\"'`").strip()
    if line.lower().startswith("prompt:"):
        line = line[len("prompt:"):].strip().strip("\"'`").strip()
    line = re.sub(r"\s*,(\s*,)+", ",", ", ".join(p.strip() for p in line.splitlines() if p.strip()))
    line = _without_repeats(" ".join(line.split()).strip(" ,"))
    if art_style and art_style.lower() not in line.lower():
        line = f"{art_style}, {line}" if line else art_style
    return line[:PROMPT_MAX_CHARS]


def _without_repeats(line: str) -> str:
    """Drop repeated phrases and stuttered words (small models loop: "noir noir noir")."""
    phrases: list[str] = []
    for phrase in line.split(","):
        words: list[str] = []
        for word in phrase.split():
            if not words or word.lower() != words[-1].lower():
                words.append(word)
        text = " ".join(words)
        if text and text.lower() not in (p.lower() for p in phrases):
            phrases.append(text)
    return ", ".join(phrases)
