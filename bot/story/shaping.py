"""Reply shaping: what the model wrote -> what the persona says.

Models, small ones most, run past the persona's turn: they write the user's next line ("Ada: ...",
"You say ..."), another character's, or stop mid-sentence at the token limit. Shaping, in order:
1 drop a leading "Char:" header; 2 cut at the first line written for someone else (a human's or
another cast member's "Name:" line, or a second-person "You say"); 3 trim an unfinished last
sentence (as SillyTavern's "trim incomplete sentences"); 4 close an action or quote the trim left
open. A reply that is nothing but a name shapes to "" (the caller treats it as no reply).

`cut_point` is also used while streaming, so the stream stops as soon as the model starts writing
someone else's lines.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

# Generic names models use for the other side when they know no better.
GENERIC_NAMES = ("User", "{{user}}", "You", "Anon", "Human")
# "You say", "you reply to her:", "*You nod*": the model narrating the user's actions or words.
_SECOND_PERSON = re.compile(
    r"^[\s*_\"“]*you\s+(?:say|said|reply|replied|ask|asked|answer|answered|tell|told|respond|responded|"
    r"whisper|whispered|shout|shouted|nod|nodded|smile|smiled|walk|walked|look|looked)\b",
    re.IGNORECASE)
# A sentence ends in . ! ? … (and the like), possibly followed by closing marks, then a space or the end.
_SENTENCE_END = re.compile(r"[.!?…~♪](?:[\"'”’)\]*_]+)?(?=\s|$)")
_END_CHARS = ".!?…~♪\"'”’)]*_"
_SINGLE_ASTERISK = r"(?<!\*)\*(?!\*)"  # an action mark, not **bold**
_NO_SENTENCE_ENDS_WITH = frozenset(
    "the a an and or but to of in into on at by for from with as than that her his their my your our its".split())


def clean_header(text: str, char: str) -> str:
    """Drop a leading `Char:` the model may echo from the history format."""
    return re.sub(rf"^\s*{re.escape(char)}\s*:\s*", "", text, count=1).strip()


def may_become_name_prefix(text: str, char: str) -> bool:
    """True while a streamed reply could still turn out to be the `Char:` header clean_header drops."""
    stripped = text.lstrip()
    return len(stripped) <= len(char) + 1 and f"{char}:".startswith(stripped)


_MARKUP_ONLY = re.compile(r"[\s*_\[]*")  # what a name line's match may begin with (see _compiled_names)


def _name_pattern(names: Sequence[str]) -> re.Pattern[str] | None:
    """Line openings that belong to someone else: "Name:", "**Name:**", "[Name]", "Name says"."""
    return _compiled_names(tuple(names))[0]


@functools.lru_cache(maxsize=256)  # asked on every streamed chunk, with the same names all reply long
def _compiled_names(names: tuple[str, ...]) -> tuple[re.Pattern[str] | None, re.Pattern[str] | None]:
    """The name-line opening pattern, and one for a line that may start such an opening continued on
    the next lines (a name alone, in markup: "**Ann**" then ": ..."), for PartialShaper."""
    variants = set()
    for name in names:
        name = name.strip()
        if not name:
            continue
        variants.add(re.escape(name))
        first = name.split()[0]
        if len(first) >= 3 and first != name:
            variants.add(re.escape(first))
    if not variants:
        return None, None
    alternatives = "|".join(sorted(variants, key=len, reverse=True))
    return (re.compile(rf"^[\s*_\[]*(?:{alternatives})(?:[\s*_\]]*:|\]|\s+(?:says|said|replies|replied|asks|asked)\b)",
                       re.IGNORECASE | re.MULTILINE),
            re.compile(rf"[\s*_\[]*(?:{alternatives})[\s*_\]]*", re.IGNORECASE))


def cut_point(text: str, others: Sequence[str], start: int = 0) -> int | None:
    """Where the reply starts speaking for someone else (a line offset), or None; searched from `start`
    on (a line's start: `PartialShaper` does not search the lines it has read again).

    The first line never counts for a second-person narration ("You say" at the very start is the
    persona addressing the user: "You say that like it's easy.").
    """
    cuts = []
    pattern = _name_pattern([*others, *GENERIC_NAMES])
    if pattern is not None:
        cuts += [m.start() for m in pattern.finditer(text, start)]
    offset = start
    for line in text[start:].splitlines(keepends=True):
        if offset and _SECOND_PERSON.match(line):
            cuts.append(offset)
        offset += len(line)
    return min(cuts) if cuts else None


def trim_incomplete(text: str) -> str:
    """Cut an unfinished last sentence: back to the last sentence end, closed action (*...*) or closed
    quote. Text with no such end at all keeps its words; when it stops on a word no sentence ends with
    ("into the"), it gets "…", so it does not pass for finished."""
    stripped = _without_dangling_opener(text.rstrip())
    if not stripped or stripped[-1] in _END_CHARS:
        return stripped
    ends = [m.end() for m in _SENTENCE_END.finditer(stripped)]
    ends += _closing_marks(stripped, _SINGLE_ASTERISK) + _closing_marks(stripped, '"') + \
        [m.end() for m in re.finditer("”", stripped)]
    if ends:
        return stripped[:max(ends)].rstrip()
    last = re.findall(r"[A-Za-z']+", stripped)[-1:]
    return stripped + "…" if last and last[0].lower() in _NO_SENTENCE_ENDS_WITH else stripped


def _closing_marks(text: str, mark: str) -> list[int]:
    """End offsets of the marks that close a pair (the 2nd, 4th... occurrence)."""
    return [m.end() for m in list(re.finditer(mark, text))[1::2]]


def _without_dangling_opener(text: str) -> str:
    """Drop an action or quote opened at the very end with nothing after it (`... window.* "`)."""
    while text and text[-1] in '*"“' and (len(text) == 1 or text[-2].isspace()) and not text.endswith("**"):
        if _open_marks(text) and _open_marks(text)[-1] == text[-1]:
            text = text[:-1].rstrip()
        else:
            break
    return text


def _open_marks(text: str) -> list[str]:
    """The actions and quotes still open at the end of `text`, in the order they were opened."""
    stack: list[str] = []
    for match in re.finditer(rf'{_SINGLE_ASTERISK}|["“”]', text):
        mark = match.group()
        closer = {"*": "*", '"': '"', "“": "”"}
        if mark == "”":
            if "“" in stack:
                del stack[len(stack) - 1 - stack[::-1].index("“"):]
        elif mark in stack and closer[mark] == mark:
            del stack[len(stack) - 1 - stack[::-1].index(mark):]  # closes it (and anything opened inside)
        else:
            stack.append(mark)
    return stack


def balance_marks(text: str) -> str:
    """Close the actions (*...*) and quotes the text leaves open, innermost first; drop a lone trailing
    opener."""
    out = _without_dangling_opener(text.rstrip())
    for mark in reversed(_open_marks(out)):
        out += "”" if mark == "“" else mark
    return out


def shape_reply(text: str, char: str, others: Sequence[str] = (), trim: bool = True) -> str:
    """The reply as the persona says it (see the module docstring for the steps).

    `others`: the names the persona must not write for (the humans in the story, the rest of the cast).
    """
    reply = clean_header(text, char)
    cut = cut_point(reply, others)
    if cut is not None:
        reply = reply[:cut]
    reply = reply.strip()
    if _only_a_name(reply, char):
        return ""
    if trim:
        reply = trim_incomplete(reply)
    return balance_marks(reply) if reply else ""


def shape_partial(text: str, char: str, others: Sequence[str] = ()) -> tuple[str, bool]:
    """A reply still streaming: what to show so far, and whether the model has run past its turn."""
    reply = clean_header(text, char)
    cut = cut_point(reply, others)
    if cut is None:
        return reply, False
    return reply[:cut].strip(), True


class PartialShaper:
    """`shape_partial` for one reply as it streams in, the same answers for the same texts: the lines
    it has read to their end are not searched for other names again (searching the whole text on
    every chunk made a reply of n chunks cost O(n^2)). Only the last line, and the lines just above it
    that a name line's opening may begin with (markup alone, a name alone), are read again."""

    def __init__(self, char: str, others: Sequence[str] = ()):
        self._char, self._others = char, list(others)
        self._name_line = _compiled_names(tuple([*others, *GENERIC_NAMES]))[1]
        self._read = ""  # the reply's text up to where the next search starts (a line's start)

    def __call__(self, text: str) -> tuple[str, bool]:
        reply = clean_header(text, self._char)
        start = len(self._read) if reply.startswith(self._read) else 0  # else the header went: read all
        cut = cut_point(reply, self._others, start)
        if cut is not None:
            return reply[:cut].strip(), True
        line = reply.rfind("\n") + 1
        while line > 0:
            above = reply.rfind("\n", 0, line - 1) + 1
            if not (_MARKUP_ONLY.fullmatch(reply, above, line)
                    or (self._name_line and self._name_line.fullmatch(reply, above, line))):
                break
            line = above
        self._read = reply[:line]
        return reply, False


def _only_a_name(text: str, char: str) -> bool:
    bare = text.strip(" \t\n*_:.-—\"'")
    return not bare or bare.lower() in {char.lower(), char.split()[0].lower() if char.split() else ""}
