"""Confirm / Cancel under an ephemeral question: only the person who asked may answer, and no answer
in CONFIRM_TIMEOUT_S means no."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import discord

log = logging.getLogger(__name__)

CONFIRM_TIMEOUT_S = 120.0
CANCELLED = "Cancelled: nothing was deleted."
TIMED_OUT = "No answer in time: nothing was deleted. Run the command again to start over."
NOT_YOURS = "Only the person who ran this command can answer it."
FAILED = "Something went wrong on my side and nothing was deleted. Try again in a moment."


class ConfirmView(discord.ui.View):
    """Runs `action` (which returns the text to show) when the owner presses Confirm."""

    def __init__(self, owner_id: int, action: Callable[[], Awaitable[str]], timeout: float = CONFIRM_TIMEOUT_S):
        super().__init__(timeout=timeout)
        self.owner_id, self.action = owner_id, action
        self.question: discord.Interaction | None = None  # the command's interaction: edited on timeout
        self.answered = False

    async def ask(self, interaction: discord.Interaction, text: str) -> None:
        """Post the question (ephemeral) as the answer to `interaction`."""
        self.question = interaction
        await interaction.response.send_message(text, view=self, ephemeral=True)

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id == self.owner_id and not self.answered:
            return True
        await interaction.response.send_message(NOT_YOURS if interaction.user.id != self.owner_id
                                                else "Already answered.", ephemeral=True)
        return False

    @discord.ui.button(label="Confirm", style=discord.ButtonStyle.danger)
    async def confirm(self, interaction: discord.Interaction, _: discord.ui.Button) -> None:
        self.answered = True
        self.stop()
        await interaction.response.defer()  # a big deletion may outlast Discord's 3 s answer window
        try:
            text = await self.action()
        except Exception:
            log.exception("a confirmed deletion failed")  # its transaction rolled back
            text = FAILED
        await interaction.edit_original_response(content=text, view=None)

    @discord.ui.button(label="Cancel", style=discord.ButtonStyle.secondary)
    async def cancel(self, interaction: discord.Interaction, _: discord.ui.Button) -> None:
        self.answered = True
        self.stop()
        await interaction.response.edit_message(content=CANCELLED, view=None)

    async def on_timeout(self) -> None:
        if self.answered or self.question is None:
            return
        try:
            await self.question.edit_original_response(content=TIMED_OUT, view=None)
        except discord.HTTPException:
            pass  # the question was dismissed; nothing to tidy
