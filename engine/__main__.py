"""``masque-engine`` / ``python -m engine``: serve the OpenAI-compatible model API."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from engine.app import create_app
from engine.settings import load_settings

EXIT_BAD_SETUP = 2

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


def main(argv: Sequence[str] | None = None) -> int:
    """Start the engine and serve until interrupted; a bad set-up is one line and exit code 2."""
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
        app = create_app(settings)
        # handler_cancellation: a client that hangs up cancels its handler, which stops generation.
        web.run_app(app, host=settings.host, port=settings.port, handler_cancellation=True,
                    print=logging.getLogger("engine").info)
    except (ValueError, OSError) as exc:  # bad settings (ValidationError), no key off loopback, port taken
        print(f"masque-engine: {exc}", file=sys.stderr)
        return EXIT_BAD_SETUP
    return 0


if __name__ == "__main__":
    sys.exit(main())
