"""Prompt building: a persona card and the story so far -> OpenAI chat messages.

Layout (the SillyTavern convention most cards are written for):
  system: system prompt, lore (before), description, personality, scenario,
          lore (after), story summary, example dialogue (when it fits)
  history: recent turns within the token budget, users as "Name: text"
  last user message: the new turn, its media parts, then post-history instructions
Consecutive messages of one role are merged, so strict chat templates that
demand alternating roles accept the result.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bot.cards import Card, LoreEntry, expand
from bot.story.lorebook import triggered_entries
from bot.story.tokens import message_tokens

DEFAULT_SYSTEM_PROMPT = (
    "You are {{char}} in an ongoing role-play with {{user}} and others on Discord. "
    "Stay in character and write only {{char}}'s next reply: vivid, concise prose, actions in *asterisks*. "
    "Never write for {{user}} or the other people in the scene."
)
CONTINUE_INSTRUCTION = "[Continue your last reply exactly where it stopped. Do not repeat what you already wrote.]"
EXAMPLES_SHARE = 0.25  # at most this share of the budget goes to example dialogue
MAX_STOP_NAMES = 3  # OpenAI allows four stop strings
_PART_KINDS = {"image_url": "image", "input_audio": "audio"}


class TurnLike(Protocol):
    """What the builder reads from a turn (bot.store.Turn fits; tests pass plain dataclasses)."""

    author_kind: str
    author_name: str
    text: str
    attachments: list[dict[str, Any]]


@dataclass
class PromptParts:
    """Everything one prompt is made of."""

    card: Card
    user_name: str  # who `{{user}}` is: the person speaking now
    turns: Sequence[TurnLike]  # oldest first; normally ends with the new user turn
    summary: str = ""
    seed: int = 0  # stabilises `{{pick}}` per story
    budget: int = 3072  # tokens for the whole prompt (the reply's tokens are not counted here)
    media: list[dict[str, Any]] = field(default_factory=list)  # image_url/input_audio parts for the last turn
    instruction: str = ""  # an extra final instruction (continue)


def render_turn(turn: TurnLike, skip_kinds: Sequence[str] = ()) -> str:
    """A turn as prompt text: its words, then what its attachments showed or said.

    `skip_kinds` leaves out notes for media sent as real content parts (no double mention).
    """
    notes = []
    for item in turn.attachments:
        kind = item.get("kind")
        if kind in skip_kinds:
            continue
        if item.get("transcript"):
            notes.append(f"[voice message: {item['transcript']}]")
        elif item.get("caption"):
            notes.append(f"[image: {item['caption']}]")
        elif kind in ("image", "audio"):
            notes.append(f"[{kind}: {item.get('filename', 'attachment')}]")
    return "\n".join(p for p in [turn.text.strip(), *notes] if p)


def build_messages(parts: PromptParts) -> list[dict[str, Any]]:
    """The chat messages for `parts`, within `parts.budget` tokens (the newest turn is always kept)."""
    card, ex = parts.card, _expander(parts)
    lore = triggered_entries(card.data.character_book, [render_turn(t) for t in parts.turns])
    system = _system_text(card, lore, parts.summary, ex)
    post = "\n\n".join(p for p in [ex(card.data.post_history_instructions).strip(), parts.instruction] if p)
    left = parts.budget - message_tokens(system) - message_tokens(post)
    examples = _examples(card, ex)
    if examples and message_tokens(examples) <= min(left, parts.budget * EXAMPLES_SHARE):
        system = f"{system}\n\n{examples}"
        left -= message_tokens(examples)
    history = _history(parts, left)
    messages = [{"role": "system", "content": system}, *history]
    if post:
        messages.append({"role": "user", "content": post})
    return _merge_roles(messages)


def stop_sequences(turns: Sequence[TurnLike], user_name: str) -> list[str]:
    """Stop strings that end a reply where the model starts speaking for a user."""
    names = [user_name] + [t.author_name for t in reversed(turns) if t.author_kind == "user"]
    unique = list(dict.fromkeys(n for n in names if n))[:MAX_STOP_NAMES]
    return [f"\n{n}:" for n in unique]


def clean_reply(text: str, char: str) -> str:
    """Drop a leading `Char:` the model may echo from the history format."""
    return re.sub(rf"^\s*{re.escape(char)}\s*:\s*", "", text, count=1).strip()


def may_become_name_prefix(text: str, char: str) -> bool:
    """True while a streamed reply could still turn out to be the `Char:` header clean_reply drops."""
    stripped = text.lstrip()
    return len(stripped) <= len(char) + 1 and f"{char}:".startswith(stripped)


def continue_instruction() -> str:
    return CONTINUE_INSTRUCTION


def _expander(parts: PromptParts) -> Callable[[str], str]:
    char, user = parts.card.display_name, parts.user_name
    return lambda text: expand(text, char=char, user=user, seed=parts.seed)


def _system_text(card: Card, lore: list[LoreEntry], summary: str, ex: Callable[[str], str]) -> str:
    data = card.data
    base = data.system_prompt.replace("{{original}}", DEFAULT_SYSTEM_PROMPT) if data.system_prompt.strip() \
        else DEFAULT_SYSTEM_PROMPT
    before = [e.content for e in lore if e.position == "before_char"]
    after = [e.content for e in lore if e.position != "before_char"]
    sections = [
        base, *before, data.description,
        f"{{{{char}}}}'s personality: {data.personality}" if data.personality.strip() else "",
        f"Scenario: {data.scenario}" if data.scenario.strip() else "",
        *after,
        f"The story so far: {summary}" if summary.strip() else "",
    ]
    return "\n\n".join(ex(s).strip() for s in sections if s and s.strip())


def _examples(card: Card, ex: Callable[[str], str]) -> str:
    raw = card.data.mes_example.strip()
    if not raw:
        return ""
    blocks = [b.strip() for b in re.split(r"<START>", raw, flags=re.IGNORECASE) if b.strip()]
    return ex("Examples of how {{char}} speaks:\n\n" + "\n\n".join(blocks))


def _history(parts: PromptParts, budget: int) -> list[dict[str, Any]]:
    """Turns from the newest back while they fit; the newest always goes in."""
    picked: list[dict[str, Any]] = []
    used = 0
    last = len(parts.turns) - 1
    for index in range(last, -1, -1):
        turn = parts.turns[index]
        media = parts.media if index == last and turn.author_kind == "user" else []
        message = _turn_message(turn, media)
        cost = message_tokens(_plain(message["content"]))
        if picked and used + cost > budget:
            break
        picked.append(message)
        used += cost
    return list(reversed(picked))


def _turn_message(turn: TurnLike, media: list[dict[str, Any]]) -> dict[str, Any]:
    if turn.author_kind == "persona":
        return {"role": "assistant", "content": turn.text}
    text = render_turn(turn, skip_kinds=[_PART_KINDS[p["type"]] for p in media if p.get("type") in _PART_KINDS])
    if turn.author_kind == "user":
        text = f"{turn.author_name or 'User'}: {text}"
    else:  # narrator or system notes join the user side: not every template allows system mid-chat
        text = f"[{turn.author_name or turn.author_kind.capitalize()}] {text}"
    if media:
        return {"role": "user", "content": [{"type": "text", "text": text}, *media]}
    return {"role": "user", "content": text}


def _plain(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if p.get("type") == "text")


def _merge_roles(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    merged: list[dict[str, Any]] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"] and message["role"] != "system":
            merged[-1] = {"role": message["role"], "content": _join(merged[-1]["content"], message["content"])}
        else:
            merged.append(dict(message))
    return merged


def _join(a: str | list[dict[str, Any]], b: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    if isinstance(a, str) and isinstance(b, str):
        return f"{a}\n\n{b}"
    return _as_parts(a) + _as_parts(b)


def _as_parts(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
