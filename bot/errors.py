"""Story errors: a command that cannot be done, with a message that is safe to show the user."""

from __future__ import annotations


class StoryError(Exception):
    """A story command that cannot be done; the message is safe to show the user."""


class NoStory(StoryError):
    def __init__(self) -> None:
        super().__init__("There is no story in this channel. Start one with /story start.")


class UnknownPersona(StoryError):
    def __init__(self, name: str) -> None:
        super().__init__(f"There is no persona named {name!r}. See /persona list.")


class UnknownTurn(StoryError):
    def __init__(self) -> None:
        super().__init__("That message is no longer part of the story.")
