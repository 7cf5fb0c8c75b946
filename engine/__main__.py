"""``masque-engine`` / ``python -m engine``: serve the OpenAI-compatible model API."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from engine.app import LOADER, create_app
from engine.routes import REGISTRY
from engine.settings import EngineSettings, load_settings

EXIT_BAD_SETUP = 2
EXIT_MODEL_FAILED = 3  # a configured model did not load (and start_degraded is off)

log = logging.getLogger("engine")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; anything left out comes from the environment or the config file."""
    parser = argparse.ArgumentParser(prog="masque-engine", description=__doc__)
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--preset", choices=["offline", "gpu", "none"],
                        help="model preset (default offline)")
    parser.add_argument("--config", help="TOML settings file (or MASQUE_ENGINE_CONFIG)")
    parser.add_argument("--log-level", help="logging level (default INFO)")
    return parser.parse_args(argv)


async def serve(settings: EngineSettings) -> int:
    """Serve until SIGINT/SIGTERM (0), or stop at once when a model fails to load (EXIT_MODEL_FAILED)."""
    app = create_app(settings)
    # handler_cancellation: a client that hangs up cancels its handler, which stops generation.
    # handle_signals: SIGINT/SIGTERM raise aiohttp's GracefulExit, as under web.run_app.
    runner = web.AppRunner(app, handle_signals=True, handler_cancellation=True)
    await runner.setup()  # starts loading the models in the background
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
        log.info("Serving on http://%s:%d (models loading; GET /health)", settings.host, settings.port)
        await app[LOADER]
        failed = app[REGISTRY].failures()
        if failed and not settings.start_degraded:
            for role, error in failed.items():
                print(f"masque-engine: the {role} model ({settings.role(role).model}) failed to load: {error}\n"
                      "Fix or empty that role's model, or set MASQUE_ENGINE_START_DEGRADED=true to serve the "
                      "other roles without it.", file=sys.stderr)
            return EXIT_MODEL_FAILED
        if failed:
            log.warning("Serving degraded, without: %s", ", ".join(failed))
        await asyncio.Event().wait()  # until a signal
        return 0
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Start the engine and serve until stopped; a bad set-up is one line and exit code 2, a model that
    fails to load exit code 3 (see EngineSettings.start_degraded)."""
    args = parse_args(argv)
    overrides: dict[str, Any] = {
        key: value
        for key, value in {
            "host": args.host, "port": args.port, "preset": args.preset,
            "log_level": args.log_level,
        }.items()
        if value is not None
    }
    try:
        settings = load_settings(args.config, **overrides)
        logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
        return asyncio.run(serve(settings))
    except (ValueError, OSError) as exc:  # bad settings (ValidationError), no key off loopback, port taken
        print(f"masque-engine: {exc}", file=sys.stderr)
        return EXIT_BAD_SETUP
    except (web.GracefulExit, KeyboardInterrupt):  # SIGTERM (docker stop, systemd) or Ctrl+C: a clean stop
        return 0


if __name__ == "__main__":
    sys.exit(main())
