"""Files users attach to slash commands (cards, lorebooks, chats): refused before download when too big."""

from __future__ import annotations

import discord
from discord import app_commands


def refuse_if_too_big(file: discord.Attachment, limit: int, nothing: str = "Nothing was stored.") -> None:
    """A CheckFailure (a short ephemeral answer) when `file` is over `limit` bytes; read nothing first."""
    if file.size > limit:
        raise app_commands.CheckFailure(f"{file.filename} is {file.size // 1024} KiB; the limit is "
                                        f"{limit // (1024 * 1024)} MiB. {nothing}")
