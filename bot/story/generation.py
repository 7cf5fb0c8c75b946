"""How a reply is generated: the sampler preset and the reply's length.

Samplers come in layers, weakest first: a named preset (the bot's `MASQUE_SAMPLER_PRESET`, or the
one a server picked), the server's own values (`/masque samplers`), then the persona card's
(`extensions.masque.samplers`, so a character tuned for its model carries its settings). Unset
values fall through to the layer below.

The reply's length: a server's `reply_tokens` (or the bot's `MASQUE_REPLY_MAX_TOKENS`), lowered to
what the card itself asks for when its instructions name a length ("under 150 words",
"two paragraphs at most"). Reply shaping (bot/story/shaping.py) then trims the unfinished end.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# The request-body names vLLM, llama.cpp's server and our engine accept beyond OpenAI's own.
EXTRA_PARAMS = ("top_k", "min_p", "repetition_penalty")


class Samplers(BaseModel):
    """Sampler values; None means "not set here" (a lower layer, or the server's default, decides)."""

    model_config = ConfigDict(extra="ignore")

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1000)  # 0 = off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=1, le=2)  # 1 = off
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)

    def over(self, base: Samplers) -> Samplers:
        """These values where set, `base`'s elsewhere."""
        return base.model_copy(update=self.model_dump(exclude_none=True))

    def request_params(self, extras: bool = True) -> dict[str, Any]:
        """The chat request's sampler fields; `extras=False` leaves out those OpenAI itself refuses."""
        values = self.model_dump(exclude_none=True)
        if not extras:
            values = {k: v for k, v in values.items() if k not in EXTRA_PARAMS}
        return values


# Named presets, as SillyTavern users know them. "roleplay" is the default: min-p sampling cuts the
# junk tail, a repetition penalty keeps a small model from copying its previous reply, and light
# frequency and presence penalties keep a reply from looping on itself. Measured on SmolLM2-135M with
# bench/quality.py (10 turns x 3 scripts, loops per 100 replies; the SillyTavern-default baseline 6.7):
# repetition penalty 1.1: 6.7, 1.05: 23.3, none: 86.7 (it repeats its last reply word for word). The
# penalty's price: it also penalises the prompt's tokens, so in a long group scene the small model
# sometimes mangles a name it must repeat ("Captain Varga" became "Vergarax"). "neutral" sends
# nothing, so the server decides.
PRESETS: dict[str, Samplers] = {
    "roleplay": Samplers(temperature=0.8, top_p=1.0, top_k=0, min_p=0.05, repetition_penalty=1.1,
                         frequency_penalty=0.2, presence_penalty=0.1),
    "creative": Samplers(temperature=1.0, top_p=1.0, top_k=0, min_p=0.1, repetition_penalty=1.05,
                         frequency_penalty=0.3, presence_penalty=0.3),
    "precise": Samplers(temperature=0.5, top_p=0.9, top_k=40, min_p=0.0, repetition_penalty=1.1,
                        frequency_penalty=0.0, presence_penalty=0.0),
    "neutral": Samplers(),
}
DEFAULT_PRESET = "roleplay"


def preset(name: str) -> Samplers:
    """A named preset; an unknown name is a ValueError listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown sampler preset {name!r}; known: {', '.join(PRESETS)}") from None


def card_samplers(masque_block: dict[str, Any]) -> Samplers:
    """The samplers a card carries in `extensions.masque.samplers` (broken values are ignored)."""
    raw = masque_block.get("samplers") if isinstance(masque_block, dict) else None
    if not isinstance(raw, dict):
        return Samplers()
    try:
        return Samplers.model_validate(raw)
    except ValidationError:
        good = {}
        for key, value in raw.items():  # keep what is valid, one field at a time
            try:
                good.update(Samplers.model_validate({key: value}).model_dump(exclude_none=True))
            except ValidationError:
                continue
        return Samplers.model_validate(good)


def resolve(base: str, server: dict[str, Any] | None = None, card: Samplers | None = None) -> Samplers:
    """The samplers of one reply: the server's preset (else `base`), its values, then the card's."""
    server = server or {}
    name = server.get("preset") if server.get("preset") in PRESETS else base
    layered = Samplers.model_validate(server.get("values") or {}).over(preset(name))
    return (card or Samplers()).over(layered)


# -- length -----------------------------------------------------------------------------------

TOKENS_PER_WORD = 1.35  # English prose, for the BPE tokenizers chat models use
WORDS_PER_SENTENCE = 18
WORDS_PER_PARAGRAPH = 70
LENGTH_SLACK = 1.25  # room to finish the sentence the limit falls in; shaping trims the rest
MIN_REPLY_TOKENS = 16

_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
                 "nine": 9, "ten": 10, "a single": 1, "a couple of": 2, "a few": 3}
_NUMBER = r"(\d{1,4}|" + "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True)) + ")"
_LIMIT = r"(?:under|below|fewer than|less than|(?:no|not|never) more than|at most|up to|max(?:imum)?|within)"
_UNIT = r"(words?|sentences?|paragraphs?|tokens?)"
_ASKS = [
    re.compile(rf"\b{_LIMIT}\s+(?:of\s+)?{_NUMBER}\s+{_UNIT}", re.IGNORECASE),  # under 150 words
    re.compile(rf"\b{_NUMBER}\s+{_UNIT}\s+(?:or (?:less|fewer)|at most|max(?:imum)?)", re.IGNORECASE),
    re.compile(rf"\b(?:\d{{1,4}})\s*(?:-|to|–)\s*{_NUMBER}\s+{_UNIT}", re.IGNORECASE),  # 100-150 words
]
_UNIT_WORDS = {"word": 1, "sentence": WORDS_PER_SENTENCE, "paragraph": WORDS_PER_PARAGRAPH}


def asked_tokens(*instructions: str) -> int | None:
    """The reply length in tokens that card text asks for ("under 150 words" -> about 250), or None.

    The smallest ask wins when the text names several.
    """
    asks = []
    for text in instructions:
        for pattern in _ASKS:
            for match in pattern.finditer(text or ""):
                number, unit = match.group(1).lower(), match.group(2).lower().rstrip("s")
                count = _NUMBER_WORDS.get(number) or int(number)
                words = count * _UNIT_WORDS.get(unit, 0)
                tokens = count if unit == "token" else words * TOKENS_PER_WORD
                if tokens > 0:
                    asks.append(tokens)
    if not asks:
        return None
    return max(MIN_REPLY_TOKENS, math.ceil(min(asks) * LENGTH_SLACK))


def reply_tokens(setting: int, *instructions: str) -> int:
    """`max_tokens` for a reply: the setting, lowered to what the card's instructions ask."""
    asked = asked_tokens(*instructions)
    return setting if asked is None else min(setting, asked)
