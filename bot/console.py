"""Console mode: role-play in the terminal with a built-in persona.

The same StoryPipeline, store and engine client as Discord; only the sink
differs (it prints). Reads lines from stdin, so it works piped as well as
typed: the first line may answer the persona prompt. The story is kept in the
database and resumed next time with the same persona (`--new` starts over).
Commands: /swipe, /back, /regen, /continue, /rewind N, /memory, /note, /summary, /help, /quit.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TextIO

from bot.engine_client import EngineError
from bot.pipeline import StoryError, StoryPipeline, UserInput, persona_card
from bot.store import GLOBAL_GUILD, AuthorKind, Persona, Turn

log = logging.getLogger(__name__)

CONSOLE_CHANNEL_ID = 1  # the console's story lives in the database like a channel's
CONSOLE_GUILD_ID = GLOBAL_GUILD
CONSOLE_USER_ID = 0
DEFAULT_USER_NAME = "Traveller"
RESUME_SHOWN_TURNS = 2  # turns reprinted when a story is resumed
HELP = ("Type to speak. Commands: /swipe (next reply), /back (previous reply), /regen (new reply), "
        "/continue, /rewind N (undo N turns), /memory [add TEXT | remove ID] (pinned facts), "
        "/note [TEXT] (author's note), /summary, /help, /quit.")
NOTE_DEPTH = 4


class Lines:
    """Lines from a text stream without blocking the event loop; None at end of input.

    A daemon thread does the blocking reads, so Ctrl+C ends the program at once
    instead of waiting for a read that only Enter would finish.
    """

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._queue: asyncio.Queue[str | None] | None = None

    def _start(self) -> asyncio.Queue[str | None]:
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def pump() -> None:
            try:
                for line in iter(self.stream.readline, ""):
                    loop.call_soon_threadsafe(queue.put_nowait, line.rstrip("\r\n"))
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except RuntimeError:  # the loop closed while we waited for input: the program is ending
                return

        threading.Thread(target=pump, name="console-stdin", daemon=True).start()
        return queue

    async def read(self) -> str | None:
        if self._queue is None:
            self._queue = self._start()
        line = await self._queue.get()
        if line is None:
            self._queue.put_nowait(None)  # stay at end of input for later reads
        return line


@dataclass
class PrintSink:
    """Prints a reply as it streams: the persona's name, then each new piece of text."""

    speaker: str
    out: TextIO
    shown: str = field(default="", init=False)

    async def update(self, text_so_far: str) -> None:
        if not self.shown:
            self.out.write(f"{self.speaker}: ")
        if text_so_far.startswith(self.shown):
            self.out.write(text_so_far[len(self.shown):])
            self.shown = text_so_far
        self.out.flush()

    async def finish(self, text: str) -> list[int]:
        if not self.shown:
            self.out.write(f"{self.speaker}: {text}")
        elif text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
        else:  # the text changed under us (a cleaned prefix): show the final version whole
            self.out.write(f"\n{self.speaker}: {text}")
        self.out.write("\n\n")
        self.out.flush()
        self.shown = ""
        return []  # nothing in the console has a message id


class Console:
    """One terminal role-play session."""

    def __init__(self, pipeline: StoryPipeline, lines: Lines, out: TextIO, user_name: str = DEFAULT_USER_NAME):
        self.pipeline, self.lines, self.out, self.user_name = pipeline, lines, out, user_name
        self.persona: Persona | None = None
        self.commands: dict[str, Callable[[str], Awaitable[None]]] = {
            "/swipe": self._swipe_next, "/back": self._swipe_back, "/regen": self._regen,
            "/continue": self._continue, "/rewind": self._rewind, "/help": self._help,
            "/memory": self._memory, "/note": self._note, "/summary": self._summary,
        }

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    async def choose_persona(self, name: str | None) -> Persona | None:
        """The persona named `name`, or one picked from a numbered list of the built-ins."""
        store = self.pipeline.store
        if name:
            persona = await store.get_persona(CONSOLE_GUILD_ID, name)
            if persona is None:  # a unique part of a name is enough: `--persona wren`
                matches = await store.persona_names(CONSOLE_GUILD_ID, name)
                persona = await store.get_persona(CONSOLE_GUILD_ID, matches[0]) if len(matches) == 1 else None
            if persona is None:
                choices = ", ".join(p.name for p in await store.list_personas(CONSOLE_GUILD_ID))
                self.say(f"No persona named {name!r}. Choose one of: {choices}.")
            return persona
        personas = await store.list_personas(CONSOLE_GUILD_ID)
        for number, persona in enumerate(personas, 1):
            self.say(f"  {number}. {persona.name}")
        while True:
            self.say(f"Choose a persona (1-{len(personas)}):")
            line = await self.lines.read()
            if line is None:
                return None
            if line.strip().isdigit() and 1 <= int(line) <= len(personas):
                return personas[int(line) - 1]
            match = await store.get_persona(CONSOLE_GUILD_ID, line.strip()) if line.strip() else None
            if match is not None:
                return match

    async def run(self, persona_name: str | None = None, new: bool = False) -> int:
        """Choose a persona, resume its story (or start one), then role-play until /quit or end of input."""
        self.persona = await self.choose_persona(persona_name)
        if self.persona is None:
            return 2
        await self._open_story(new)
        while (line := await self._prompt()) is not None:
            text = line.strip()
            if text in ("/quit", "/exit"):
                break
            if text:
                await self._handle(text)
        self.say("Goodbye. The story is saved.")
        return 0

    async def _prompt(self) -> str | None:
        """Show `Name> ` and read the next line."""
        self.out.write(f"{self.user_name}> ")
        self.out.flush()
        line = await self.lines.read()
        if line is None:
            self.out.write("\n")
        return line

    async def _open_story(self, new: bool) -> None:
        """Resume the console's story with this persona, as the database left it; else start one."""
        assert self.persona is not None
        story = await self.pipeline.store.active_story(CONSOLE_CHANNEL_ID)
        if story is not None and story.persona_id == self.persona.id and not new:
            turns = await self.pipeline.store.recent_turns(story.id, RESUME_SHOWN_TURNS)
            self.say(f"--- {self.persona.name} (resumed) --- ({HELP})\n")
            for turn in turns:
                if turn.author_kind == AuthorKind.PERSONA:
                    await self._sink().finish(turn.text)
                else:
                    self.say(f"{turn.author_name}: {turn.text}\n")
            return
        story, persona, _ = await self.pipeline.start_story(
            CONSOLE_CHANNEL_ID, CONSOLE_GUILD_ID, self.persona.name, self.user_name)
        self.say(f"--- {persona.name} --- ({HELP})\n")
        await self.pipeline.show_greeting(story, self._sink())

    async def _handle(self, text: str) -> None:
        word, _, rest = text.partition(" ")
        action = self.commands.get(word.lower()) if word.startswith("/") else None
        try:
            if action is not None:
                await action(rest.strip())
            elif word.startswith("/"):
                self.say(f"Unknown command {word}. {HELP}")
            else:
                await self.pipeline.reply(CONSOLE_CHANNEL_ID, CONSOLE_GUILD_ID,
                                          UserInput(text, CONSOLE_USER_ID, self.user_name), self._sink())
        except EngineError as exc:
            self.say(f"\n[{exc.user_message} Your words are kept: type /regen to try again.]")
            log.warning("engine error: %s", exc)
        except (StoryError, LookupError, ValueError) as exc:
            self.say(f"[{exc}]")

    def _sink(self) -> PrintSink:
        assert self.persona is not None
        return PrintSink(persona_card(self.persona).display_name, self.out)

    async def _last_turn(self) -> Turn | None:
        story = await self.pipeline.store.active_story(CONSOLE_CHANNEL_ID)
        turns = await self.pipeline.store.recent_turns(story.id, 1) if story else []
        return turns[-1] if turns else None

    async def _swipe(self, delta: int) -> None:
        turn = await self._last_turn()
        if turn is None or turn.author_kind != AuthorKind.PERSONA:
            self.say("[There is no reply to swipe yet.]")
            return
        target = turn.selected_swipe + delta
        if target >= len(turn.swipes):  # past the last swipe: write a new one, as SillyTavern does
            await self._regen("")
            return
        if target < 0:
            self.say("[This is the first reply.]")
            return
        turn = await self.pipeline.swipe(turn.id, delta)
        self.say(f"(reply {turn.selected_swipe + 1}/{len(turn.swipes)})")
        await self._sink().finish(turn.text)

    async def _swipe_next(self, _: str) -> None:
        await self._swipe(+1)

    async def _swipe_back(self, _: str) -> None:
        await self._swipe(-1)

    async def _regen(self, _: str) -> None:
        turn = await self._last_turn()
        if turn is None:
            self.say("[Nothing to regenerate yet.]")
            return
        turn = await self.pipeline.regenerate(turn.id, self._sink())
        if turn.swipes:
            self.say(f"(reply {turn.selected_swipe + 1}/{len(turn.swipes)})")

    async def _continue(self, _: str) -> None:
        turn = await self._last_turn()
        if turn is None or turn.author_kind != AuthorKind.PERSONA:
            self.say("[There is no reply to continue.]")
            return
        await self.pipeline.continue_turn(turn.id, self._sink())

    async def _rewind(self, arg: str) -> None:
        count = int(arg) if arg.isdigit() else 1 if not arg else -1
        if count < 1:
            self.say("[Usage: /rewind N, with N a positive number of turns.]")
            return
        removed = await self.pipeline.rewind(CONSOLE_CHANNEL_ID, count)
        self.say(f"[Removed {len(removed)} turn(s).]")

    async def _help(self, _: str) -> None:
        self.say(HELP)

    async def _memory(self, arg: str) -> None:
        story = await self.pipeline.story_of(CONSOLE_CHANNEL_ID)
        action, _, rest = arg.partition(" ")
        if action == "add":
            fact = await self.pipeline.memory.pin(story, rest, CONSOLE_USER_ID)
            self.say(f"[Pinned #{fact.id}: {fact.text}]")
        elif action == "remove":
            if not rest.strip().isdigit():
                self.say("[Usage: /memory remove ID (the number /memory shows).]")
                return
            fact = await self.pipeline.memory.unpin(story, int(rest))
            self.say(f"[Unpinned #{fact.id}.]")
        elif not action:
            facts = await self.pipeline.store.facts(story.id)
            self.say("\n".join(f"  #{f.id} {f.text}" for f in facts) if facts else
                     "[No pinned facts. /memory add TEXT pins one: it is in every prompt.]")
        else:
            self.say("[Usage: /memory, /memory add TEXT, /memory remove ID.]")

    async def _note(self, arg: str) -> None:
        story = await self.pipeline.story_of(CONSOLE_CHANNEL_ID)
        await self.pipeline.memory.set_note(story, arg, story.author_note_depth or NOTE_DEPTH)
        self.say(f"[Author's note set at depth {story.author_note_depth or NOTE_DEPTH}.]" if arg.strip()
                 else "[Author's note cleared.]")

    async def _summary(self, _: str) -> None:
        story = await self.pipeline.story_of(CONSOLE_CHANNEL_ID)
        summary = await self.pipeline.store.latest_summary(story.id)
        self.say(f"[Summary through turn {summary.through_position}] {summary.text}" if summary else
                 "[No summary yet: one is written in the background once turns leave the prompt.]")


async def run_console(pipeline: StoryPipeline, persona: str | None = None, user_name: str = DEFAULT_USER_NAME,
                      new: bool = False, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Run console mode on stdin/stdout; returns the exit code. `new` starts over instead of resuming."""
    console = Console(pipeline, Lines(stdin or sys.stdin), stdout or sys.stdout, user_name)
    return await console.run(persona, new)
