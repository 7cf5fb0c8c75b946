"""`masque-bot` / `python -m bot`: the Discord bot, or console mode without a token.

Steps: read settings from the environment, open the store (migrations, built-in
personas), find the engine (MASQUE_ENGINE_URL, else a local child engine on the
offline preset), then run the Discord bot when DISCORD_TOKEN is set, else
console role-play (also with `--console`). SIGTERM (docker stop, systemd) stops it as
Ctrl+C does, child engine included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from bot import event_loop
from bot.builtin import builtin_personas
from bot.console import DEFAULT_USER_NAME, run_console
from bot.engine_client import EngineClient
from bot.engine_process import EngineStartError, engine_urls
from bot.metrics import serve_metrics
from bot.pipeline import StoryPipeline
from bot.settings import BotSettings
from bot.store import DatabaseInUse, Store

log = logging.getLogger("bot")
EXIT_BAD_SETUP = 2
# Libraries that log every request or migration step at INFO: too chatty for a terminal role-play.
NOISY_LOGGERS = ("alembic", "discord.http")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="masque-bot", description="Masque: Discord role-play bot, or terminal role-play without a token.")
    parser.add_argument("--console", action="store_true", help="role-play in this terminal, token or not")
    parser.add_argument("--persona", metavar="NAME", help="console: the persona to play (else a menu)")
    parser.add_argument("--name", default=DEFAULT_USER_NAME, help="console: your name in the story ({{user}})")
    parser.add_argument("--new", action="store_true", help="console: start a new story instead of resuming")
    return parser.parse_args(argv)


def progress(text: str) -> None:
    """Start-up progress for people: stderr, so console role-play on stdout stays clean."""
    print(text, file=sys.stderr, flush=True)


async def run(args: argparse.Namespace, settings: BotSettings) -> int:
    """Open the store and the engine, then run console mode or the Discord bot."""
    store = Store(settings.database_url, settings.database_pool_size)
    try:
        await store.upgrade()
        try:
            store.claim_process(every_shard=settings.runs_every_shard)
        except DatabaseInUse as exc:
            print(f"masque-bot: {exc}", file=sys.stderr)
            return EXIT_BAD_SETUP
        await store.listen()
        await store.sync_builtin_personas(builtin_personas())
        async with engine_urls(settings, progress) as url:
            engine = EngineClient.from_settings(settings, url)
            try:
                if args.console or settings.discord_token is None:
                    if settings.log_level.upper() != "DEBUG":  # per-turn lines would interleave the story
                        logging.getLogger("bot.turns").setLevel(logging.WARNING)
                    pipeline = StoryPipeline(store, engine, settings)
                    metrics = await serve_metrics(pipeline.metrics, settings)
                    try:
                        return await run_console(pipeline, args.persona, args.name, args.new)
                    finally:
                        if metrics is not None:
                            await metrics.stop()
                        await pipeline.close()
                from bot.app import DiscordSetupError, run_discord  # discord.py loads only when the bot is used

                try:
                    await run_discord(settings, store, engine)
                except DiscordSetupError as exc:
                    print(f"masque-bot: {exc}", file=sys.stderr)
                    return EXIT_BAD_SETUP
                return 0
            finally:
                await engine.close()
    finally:
        await store.close()


async def run_until_stopped(args: argparse.Namespace, settings: BotSettings) -> int:
    """`run`, with SIGTERM handled as asyncio handles Ctrl+C: the run is cancelled, so every `finally` runs.

    Without this SIGTERM would end the process on the spot, and the child engine, which sits in its own
    session (so a terminal's Ctrl+C reaches only the bot), would be left running.
    """
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    with contextlib.suppress(NotImplementedError):  # Windows has no loop signal handlers
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await run(args, settings)
    except asyncio.CancelledError:
        if not terminated:
            raise
        log.info("stopped by SIGTERM")
        return 0  # a requested stop, not a failure
    finally:
        with contextlib.suppress(NotImplementedError):
            loop.remove_signal_handler(signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `masque-bot`."""
    args = parse_args(argv)
    try:
        settings = BotSettings()
    except ValidationError as exc:
        print(f"masque-bot: bad setting: {exc}", file=sys.stderr)
        return EXIT_BAD_SETUP
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return event_loop.run(run_until_stopped(args, settings), use_uvloop=settings.uvloop)
    except EngineStartError as exc:
        print(f"masque-bot: the local engine did not start: {exc}\n"
              "Set MASQUE_ENGINE_URL to use an engine that is already running.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
