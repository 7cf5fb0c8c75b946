"""Slash commands and listeners, one cog per concern (loaded by bot.app.MasqueBot)."""

COGS = ("bot.cogs.personas", "bot.cogs.story", "bot.cogs.memory", "bot.cogs.lore", "bot.cogs.art",
        "bot.cogs.admin", "bot.cogs.chat", "bot.cogs.voice", "bot.cogs.privacy")
