"""Buttons under a reply: regenerate, previous/next swipe, continue, illustrate; retry after an error.

They are `DynamicItem`s: the custom_id carries the action and the turn id
(`masque:regen:42`), so they keep working after a restart without any stored
view state. What a press does lives in `bot.discord_io.replies.ReplyService`
(reached through `interaction.client.replies`); who may press is checked here.
"""

from __future__ import annotations

import enum
import re
from typing import Any, Protocol

import discord

CUSTOM_ID_PREFIX = "masque"


class Action(enum.StrEnum):
    REGENERATE = "regen"
    PREVIOUS = "prev"
    NEXT = "next"
    CONTINUE = "more"
    ILLUSTRATE = "art"
    RETRY = "retry"


_STYLE = {
    Action.REGENERATE: ("Regenerate", "🔄", discord.ButtonStyle.secondary),
    Action.PREVIOUS: ("Previous", "◀️", discord.ButtonStyle.secondary),
    Action.NEXT: ("Next", "▶️", discord.ButtonStyle.secondary),
    Action.CONTINUE: ("Continue", "➕", discord.ButtonStyle.secondary),
    Action.ILLUSTRATE: ("Illustrate", "🎨", discord.ButtonStyle.secondary),
    Action.RETRY: ("Retry", "🔁", discord.ButtonStyle.primary),
}
_ACTIONS = "|".join(a.value for a in Action)


class ActionHandler(Protocol):
    """What the buttons call (implemented by ReplyService)."""

    async def may_press(self, interaction: discord.Interaction, turn_id: int) -> bool: ...
    async def on_button(self, interaction: discord.Interaction, action: Action, turn_id: int) -> None: ...


def custom_id(action: Action, turn_id: int) -> str:
    return f"{CUSTOM_ID_PREFIX}:{action.value}:{turn_id}"


class TurnButton(discord.ui.DynamicItem[discord.ui.Button[Any]],
                 template=rf"{CUSTOM_ID_PREFIX}:(?P<action>{_ACTIONS}):(?P<turn>[0-9]+)"):
    """One button bound to one turn; its state lives entirely in its custom_id."""

    def __init__(self, action: Action, turn_id: int, *, disabled: bool = False):
        label, emoji, style = _STYLE[action]
        super().__init__(discord.ui.Button(label=label, emoji=emoji, style=style, disabled=disabled,
                                           custom_id=custom_id(action, turn_id)))
        self.action, self.turn_id = action, turn_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button[Any],
                             match: re.Match[str], /) -> TurnButton:
        return cls(Action(match["action"]), int(match["turn"]))

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        handler: ActionHandler = interaction.client.replies  # type: ignore[attr-defined]
        if await handler.may_press(interaction, self.turn_id):
            return True
        await interaction.response.send_message(
            "Only people taking part in this channel's story can use these buttons. "
            "Write a message in the story to join it.", ephemeral=True)
        return False

    async def callback(self, interaction: discord.Interaction) -> None:
        handler: ActionHandler = interaction.client.replies  # type: ignore[attr-defined]
        await handler.on_button(interaction, self.action, self.turn_id)


def reply_view(turn_id: int, *, swipe: int = 0, swipes: int = 1, art: bool = True) -> discord.ui.View:
    """The buttons under a persona reply; previous/next are disabled at the ends of the swipes."""
    view = discord.ui.View(timeout=None)
    view.add_item(TurnButton(Action.PREVIOUS, turn_id, disabled=swipe <= 0))
    view.add_item(TurnButton(Action.REGENERATE, turn_id))
    view.add_item(TurnButton(Action.NEXT, turn_id, disabled=swipe >= swipes - 1))
    view.add_item(TurnButton(Action.CONTINUE, turn_id))
    if art:
        view.add_item(TurnButton(Action.ILLUSTRATE, turn_id))
    return view


def retry_view(user_turn_id: int) -> discord.ui.View:
    """A single retry button for a user turn the engine failed to answer."""
    view = discord.ui.View(timeout=None)
    view.add_item(TurnButton(Action.RETRY, user_turn_id))
    return view
