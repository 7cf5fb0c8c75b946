"""Prompt building: a persona card, the story so far and its memory -> OpenAI chat messages.

Layout (the SillyTavern convention most cards are written for):
  system: system prompt, lore (before), description, personality, scenario,
          lore (after), pinned facts, story summary,
          lore (examples top), example dialogue (when it fits), lore (examples bottom)
  history: recent turns within the token budget, users as "Name: text", with
          the author's note, at-depth lore and recalled older turns inserted at their depths
  last user message: the new turn, its media parts, then post-history instructions
Each memory layer has a capped share of the budget (bot/story/memory.py).
Consecutive messages of one role are merged, so strict chat templates that
demand alternating roles accept the result.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bot.cards import Card, Lorebook, expand
from bot.story import memory as layers
from bot.story.lorebook import LoreResult, activate
from bot.story.memory import DepthNote, Memory
from bot.story.tokens import TokenCounter

DEFAULT_SYSTEM_PROMPT = (
    "You are {{char}} in an ongoing role-play with {{user}} and others on Discord. "
    "Stay in character and write only {{char}}'s next reply: vivid, concise prose, actions in *asterisks*. "
    "Never write for {{user}} or the other people in the scene."
)
CONTINUE_INSTRUCTION = "[Continue your last reply exactly where it stopped. Do not repeat what you already wrote.]"
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
    seed: int = 0  # stabilises `{{pick}}` per story
    budget: int = 3072  # tokens for the whole prompt (the reply's tokens are not counted here)
    media: list[dict[str, Any]] = field(default_factory=list)  # image_url/input_audio parts for the last turn
    instruction: str = ""  # an extra final instruction (continue)
    memory: Memory = field(default_factory=Memory)
    books: Sequence[Lorebook] = ()  # story and guild books; the card's own book is added first
    turn_number: int = 0  # the story's turn counter, for lore's timed effects
    counter: TokenCounter = field(default_factory=TokenCounter)
    scene: str = ""  # in a group scene: the rest of the cast (bot.story.cast.scene_members)


@dataclass
class Prompt:
    """A built prompt: the messages, and what the caller keeps from building it."""

    messages: list[dict[str, Any]]
    window_start: int  # index in `parts.turns` of the oldest turn in the history
    lore: LoreResult
    tokens: int  # the counter's estimate of the whole prompt


# Once a story outgrows the window, its history starts at a story position on a grid (a power of
# two at most 1/8 of the turns that fit), so the start moves once every few turns instead of
# every turn, and a server's prefix cache keeps reusing the history between moves (our engine,
# vLLM and llama.cpp all reuse only an unchanged prefix). The cost: at most an eighth of the
# history's turns; a window of under 16 turns has no grid. Power-of-two steps keep the grid
# still while the number of turns that fit wobbles.
HISTORY_GRID_SHARE = 8


def render_turn(turn: TurnLike, skip_kinds: Sequence[str] = ()) -> str:
    """A turn as prompt text: its words, then what its attachments showed or said.

    `skip_kinds` leaves out notes for media sent as real content parts (no double mention). An image
    sent as a part keeps its note: the part carries no name, and a server that cannot see images (the
    offline preset) invents nothing, so the note is all the persona knows of it.
    """
    notes = []
    for item in turn.attachments:
        kind = item.get("kind")
        if kind in skip_kinds and not (kind == "image" and not item.get("caption")):
            continue
        if item.get("transcript"):
            notes.append(f"[voice message: {item['transcript']}]")
        elif item.get("caption"):
            notes.append(f"[image: {item['caption']}]")
        elif kind == "image":
            notes.append(image_note(item))
        elif kind == "audio":
            notes.append(f"[audio: {item.get('filename', 'attachment')}]")
    return "\n".join(p for p in [turn.text.strip(), *notes] if p)


def image_note(item: dict[str, Any]) -> str:
    """`[an image was shared: NAME, W×H]`: what is known of an image no model described."""
    size = f", {item['width']}×{item['height']}" if item.get("width") and item.get("height") else ""
    return f"[an image was shared: {item.get('filename') or 'image'}{size}]"


def speaker_line(turn: TurnLike) -> str:
    """A turn as one "Name: text" line (lore scanning, recall quotes)."""
    return f"{turn.author_name or str(turn.author_kind).capitalize()}: {render_turn(turn)}"


def build_messages(parts: PromptParts) -> list[dict[str, Any]]:
    """The chat messages for `parts`, within `parts.budget` tokens (the newest turn is always kept)."""
    return build_prompt(parts).messages


def build_prompt(parts: PromptParts) -> Prompt:
    """Build the prompt: 1 trigger lore, 2 the system text with each memory layer in its share,
    3 the recent turns in what is left, 4 author's note and at-depth lore, 5 post-history instructions."""
    card, ex, count, budget = parts.card, _expander(parts), parts.counter.tokens, parts.budget
    books = [b for b in [card.data.character_book, *parts.books] if b is not None]
    lore = activate(books, [speaker_line(t) for t in parts.turns], turn=parts.turn_number,
                    timed=parts.memory.lore_timed, budget=int(budget * layers.LORE_SHARE), count_tokens=count)
    system = _system_text(card, lore, parts.memory, budget, count, ex, parts.scene)
    recall = layers.recall_block(parts.memory.recalled, int(budget * layers.RECALL_SHARE), count)
    post = "\n\n".join(p for p in [ex(card.data.post_history_instructions).strip(), parts.instruction] if p)
    notes = _depth_notes(parts.memory, lore, ex)
    fixed = parts.counter.message(system) + (parts.counter.message(post) if post else 0) + \
        sum(parts.counter.message(n.text) for n in notes)
    # Recall's share is always held back, so the window is the same with or without recalled turns
    # (the caller picks the window first, then recalls what lies before it).
    left = budget - fixed - int(budget * layers.RECALL_SHARE)
    if recall:  # near the end, not in the system text: see layers.RECALL_DEPTH
        notes.append(DepthNote(layers.RECALL_DEPTH, "system", recall))
    examples = _examples(card, lore, ex)
    if examples and parts.counter.message(examples) <= min(left, budget * layers.EXAMPLES_SHARE):
        system = f"{system}\n\n{examples}"
        left -= parts.counter.message(examples)
    history, start = _history(parts, left)
    messages = [{"role": "system", "content": system}, *layers.insert_at_depth(history, notes)]
    if post:
        messages.append({"role": "user", "content": post})
    merged = _merge_roles(messages)
    tokens = sum(parts.counter.message(_plain(m["content"])) for m in merged)
    return Prompt(merged, start, lore, tokens)


def stop_sequences(turns: Sequence[TurnLike], user_name: str, cast: Sequence[str] = ()) -> list[str]:
    """Stop strings that end a reply where the model starts speaking for a user (the newest speakers
    first) or, in a group scene, for another cast member. Reply shaping catches the names that do not
    fit OpenAI's four stop strings."""
    names = [user_name, *cast] + [t.author_name for t in reversed(turns) if t.author_kind == "user"]
    unique = list(dict.fromkeys(n for n in names if n))[:MAX_STOP_NAMES]
    return [f"\n{n}:" for n in unique]


def continue_instruction() -> str:
    return CONTINUE_INSTRUCTION


def _expander(parts: PromptParts) -> Callable[[str], str]:
    char, user = parts.card.display_name, parts.user_name
    return lambda text: expand(text, char=char, user=user, seed=parts.seed)


def _system_text(card: Card, lore: LoreResult, memory: Memory, budget: int, count: Callable[[str], int],
                 ex: Callable[[str], str], scene: str = "") -> str:
    data = card.data
    base = data.system_prompt.replace("{{original}}", DEFAULT_SYSTEM_PROMPT) if data.system_prompt.strip() \
        else DEFAULT_SYSTEM_PROMPT
    sections = [
        base, *lore.at("before_char"), data.description,
        f"{{{{char}}}}'s personality: {data.personality}" if data.personality.strip() else "",
        f"Scenario: {data.scenario}" if data.scenario.strip() else "",
        scene,
        *lore.at("after_char"),
        layers.facts_block(memory.facts, int(budget * layers.FACTS_SHARE), count),
        layers.summary_block(memory.summary, int(budget * layers.SUMMARY_SHARE), count),
    ]
    return "\n\n".join(ex(s).strip() for s in sections if s and s.strip())


def _examples(card: Card, lore: LoreResult, ex: Callable[[str], str]) -> str:
    raw = card.data.mes_example.strip()
    blocks = [b.strip() for b in re.split(r"<START>", raw, flags=re.IGNORECASE) if b.strip()] if raw else []
    if not blocks:
        return ""
    body = "\n\n".join([*lore.at("em_top"), *blocks, *lore.at("em_bottom")])
    return ex("Examples of how {{char}} speaks:\n\n" + body)


def _depth_notes(memory: Memory, lore: LoreResult, ex: Callable[[str], str]) -> list[DepthNote]:
    """The author's note (with its top/bottom lore) and at-depth lore, to insert into the history."""
    notes = [DepthNote(h.depth, h.role, ex(h.content).strip()) for h in lore.hits
             if h.position == "at_depth" and h.content.strip()]
    note = layers.note_text(memory.note, lore.at("an_top"), lore.at("an_bottom"))
    if note:
        notes.append(DepthNote(memory.note_depth, "system", ex(f"Author's note: {note}")))
    return notes


def _history(parts: PromptParts, budget: int) -> tuple[list[dict[str, Any]], int]:
    """Turns from the newest back while they fit; the newest always goes in. Once older turns must
    be left out, the oldest kept is one whose story position is a multiple of HISTORY_STEP. Returns
    them and the index of the oldest one kept."""
    picked: list[dict[str, Any]] = []
    used = 0
    last = len(parts.turns) - 1
    start = last + 1
    for index in range(last, -1, -1):
        turn = parts.turns[index]
        media = parts.media if index == last and turn.author_kind == "user" else []
        message = _turn_message(turn, media, parts.card.display_name)
        cost = parts.counter.message(_plain(message["content"]))
        if picked and used + cost > budget:
            break
        picked.append(message)
        used += cost
        start = index
    history = list(reversed(picked))
    step = history_step(len(picked))
    if start > 0 and step > 1:  # older turns were left out: start on the step grid
        anchored = next((i for i in range(start, last + 1)
                         if getattr(parts.turns[i], "position", i) % step == 0), start)
        history, start = history[anchored - start:], anchored
    return history, start


def history_step(fitting: int) -> int:
    """The grid a trimmed history starts on: the largest power of two at most 1/HISTORY_GRID_SHARE of
    the turns that fit (1: no grid for a window of fewer than 2 * HISTORY_GRID_SHARE turns)."""
    share = fitting // HISTORY_GRID_SHARE
    return 1 << (share.bit_length() - 1) if share > 1 else 1


def _turn_message(turn: TurnLike, media: list[dict[str, Any]], char: str) -> dict[str, Any]:
    """A turn as a chat message: the speaker's own turns are the assistant's; everyone else (people, and
    in a group scene the other personas) speaks on the user side under their name."""
    if turn.author_kind == "persona" and (not turn.author_name or turn.author_name == char):
        return {"role": "assistant", "content": turn.text}
    text = render_turn(turn, skip_kinds=[_PART_KINDS[p["type"]] for p in media if p.get("type") in _PART_KINDS])
    if turn.author_kind in ("user", "persona"):
        text = f"{turn.author_name or 'User'}: {text}"
    else:  # narrator or system notes join the user side: not every template allows system mid-chat
        text = f"[{turn.author_name or turn.author_kind.capitalize()}] {text}"
    if media:
        return {"role": "user", "content": [{"type": "text", "text": text}, *media]}
    return {"role": "user", "content": text}


def prompt_chars(messages: Sequence[dict[str, Any]]) -> int:
    """Characters of text in `messages` (what a token count is learned against)."""
    return sum(len(_plain(m["content"])) for m in messages)


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
