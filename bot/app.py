"""The Discord bot: `MasqueBot`, its intents, its one error handler, and `run_discord` to start it.

Model output never pings: `AllowedMentions.none()` is the client default and
is passed again on every send (webhook sends included). The REST base and the
gateway URL can be pointed at a proxy (nirn-proxy) or a test server.
"""

from __future__ import annotations

import logging

import discord
import yarl
from discord import app_commands
from discord.ext import commands

from bot.cogs import COGS
from bot.discord_io.replies import ReplyService
from bot.discord_io.views import TurnButton
from bot.discord_io.webhooks import NO_MENTIONS, WebhookPoster
from bot.engine_client import EngineClient, EngineError
from bot.metrics import MetricsServer, serve_metrics
from bot.pipeline import StoryError, StoryPipeline
from bot.settings import BotSettings
from bot.store import Store

log = logging.getLogger(__name__)

GENERIC_ERROR = "Something went wrong on my side. Try again; if it keeps happening, tell a server admin."


def masque_intents() -> discord.Intents:
    """Guilds, guild messages and the privileged message-content intent (to read story messages); not
    typing events (every reply's own "typing..." would come back as one to parse)."""
    intents = discord.Intents.default()
    intents.message_content = True
    intents.members = False
    intents.presences = False
    intents.typing = False
    return intents


def apply_endpoints(settings: BotSettings) -> None:
    """Point discord.py's REST and gateway at DISCORD_API_BASE / DISCORD_GATEWAY_URL when set."""
    if settings.discord_api_base:
        base = yarl.URL(settings.discord_api_base.rstrip("/"))
        if base.path in ("", "/"):  # a bare proxy address: Discord's API lives under /api/v10
            base = base.with_path(f"/api/v{discord.http.INTERNAL_API_VERSION}")
        discord.http.Route.BASE = str(base).rstrip("/")
    if settings.discord_gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


class MasqueBot(commands.AutoShardedBot):
    """The role-play bot. Holds the story pipeline and the reply service the cogs and buttons use.

    Sharded as Discord asks (MASQUE_SHARD_COUNT unset: its recommendation from /gateway/bot), every
    shard in this process unless MASQUE_SHARD_IDS picks some: several processes then share one
    PostgreSQL database. A guild lives on one shard, so its channels' locks and queues stay in
    one process; cached rows are kept right across processes by the store (LISTEN/NOTIFY).
    """

    def __init__(self, settings: BotSettings, store: Store, engine: EngineClient,
                 pipeline: StoryPipeline | None = None):
        super().__init__(command_prefix=commands.when_mentioned, intents=masque_intents(),
                         allowed_mentions=NO_MENTIONS, help_command=None,
                         shard_count=settings.shard_count, shard_ids=settings.shard_ids,
                         max_messages=None)  # no message cache: edits and deletes are handled from raw events
        self.settings, self.store, self.engine = settings, store, engine
        self.pipeline = pipeline or StoryPipeline(store, engine, settings)
        self.poster = WebhookPoster(self)
        self.replies = ReplyService(self.pipeline, self.poster)
        self.tree.on_error = self.on_app_command_error
        self.metrics = self.pipeline.metrics
        self.metrics.watch_shards(self)
        self.metrics_server: MetricsServer | None = None

    async def setup_hook(self) -> None:
        """Serve /metrics (when MASQUE_METRICS_PORT is set), load the cogs, register the persistent reply
        buttons and sync the slash commands."""
        self.metrics_server = await serve_metrics(self.metrics, self.settings)
        if self.shard_count is None and self.settings.discord_gateway_url:
            # discord.py connects to the URL that comes with Discord's shard count; ask for the count
            # alone, so a gateway proxy set with DISCORD_GATEWAY_URL is still the one used
            self.shard_count, _, _ = await self.http.get_bot_gateway()
        for name in COGS:
            await self.load_extension(name)
        self.add_dynamic_items(TurnButton)
        try:
            synced = await self.tree.sync()
        except discord.HTTPException as exc:
            # Stories still play (the message flow needs no commands); Discord keeps the last synced set.
            log.warning("could not sync the slash commands (HTTP %s): %s; the previous set stays", exc.status,
                        exc.text)
        else:
            log.info("synced %d slash commands", len(synced))

    async def close(self) -> None:
        if self.metrics_server is not None:
            await self.metrics_server.stop()
            self.metrics_server = None
        await self.pipeline.close()
        await super().close()

    async def on_app_command_error(self, interaction: discord.Interaction,
                                   error: app_commands.AppCommandError) -> None:
        """The one place command errors become short ephemeral messages that say what to do next."""
        cause = error.original if isinstance(error, app_commands.CommandInvokeError) else error
        message = error_message(cause)
        if message is None:
            log.error("command %s failed", interaction.command and interaction.command.qualified_name,
                      exc_info=cause)
            message = GENERIC_ERROR
        await send_ephemeral(interaction, message)


def error_message(error: BaseException) -> str | None:
    """What to tell the user about `error`; None for bugs (logged, generic message)."""
    if isinstance(error, app_commands.MissingPermissions | app_commands.BotMissingPermissions):
        return f"{error} Ask a server admin."
    if isinstance(error, app_commands.CommandOnCooldown):
        return f"Slow down a little: try again in {error.retry_after:.0f} s."
    if isinstance(error, app_commands.NoPrivateMessage):
        return "Use this command in a server channel."
    if isinstance(error, app_commands.CheckFailure | app_commands.TransformerError):
        return str(error) or "You cannot use this command here."
    if isinstance(error, EngineError):
        return error.user_message
    if isinstance(error, StoryError):
        return str(error)
    if isinstance(error, discord.Forbidden):
        return "I am missing a permission here (Send Messages, Manage Webhooks, Attach Files). Ask a server admin."
    return None


async def send_ephemeral(interaction: discord.Interaction, text: str) -> None:
    """Answer ephemerally whether or not the interaction was already answered or deferred."""
    if interaction.response.is_done():
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_MENTIONS)
    else:
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_MENTIONS)


class DiscordSetupError(Exception):
    """Discord refused the bot's set-up (token, intents): a message for the admin, no traceback."""


async def run_discord(settings: BotSettings, store: Store, engine: EngineClient) -> None:
    """Connect to Discord with DISCORD_TOKEN and run until stopped (the store is already upgraded)."""
    if settings.discord_token is None:
        raise DiscordSetupError("DISCORD_TOKEN is not set")
    apply_endpoints(settings)
    bot = MasqueBot(settings, store, engine)
    try:
        async with bot:
            await bot.start(settings.discord_token.get_secret_value())
    except discord.LoginFailure as exc:
        raise DiscordSetupError("Discord refused DISCORD_TOKEN: copy the bot token again from the developer "
                                "portal (Bot > Reset Token).") from exc
    except discord.PrivilegedIntentsRequired as exc:
        raise DiscordSetupError("Discord refused the Message Content intent: enable it in the developer "
                                "portal (Bot > Privileged Gateway Intents).") from exc
