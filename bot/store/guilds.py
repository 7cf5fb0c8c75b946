"""Per-guild settings (validated by the bot's settings model, stored as JSON)."""

from __future__ import annotations

from typing import Any

from bot.store.db import Database
from bot.store.models import GuildSettings

GUILD_SETTINGS = "guild_settings"  # cache kind


class GuildRepo(Database):
    async def guild_settings(self, guild_id: int) -> dict[str, Any]:
        """The guild's stored settings (cached: read on every message)."""
        return dict(await self._cached(GUILD_SETTINGS, guild_id, lambda: self._load_guild_settings(guild_id)))

    async def _load_guild_settings(self, guild_id: int) -> dict[str, Any]:
        async with self.read() as session:
            row = await session.get(GuildSettings, guild_id)
            return dict(row.settings) if row else {}

    async def update_guild_settings(self, guild_id: int, **changes: Any) -> dict[str, Any]:
        """Merge `changes` into the guild's settings; returns the result."""
        async with self.session() as session:
            row = await session.get(GuildSettings, guild_id, with_for_update=True)
            if row is None:
                row = GuildSettings(guild_id=guild_id, settings={})
                session.add(row)
            row.settings = {**row.settings, **changes}
        self.forget(GUILD_SETTINGS, guild_id)
        return dict(row.settings)

    async def forget_guild(self, guild_id: int) -> None:
        """Delete a guild's settings (the bot left it, or an admin asked to forget it)."""
        async with self.session() as session:
            row = await session.get(GuildSettings, guild_id)
            if row is not None:
                await session.delete(row)
        self.forget(GUILD_SETTINGS, guild_id)
