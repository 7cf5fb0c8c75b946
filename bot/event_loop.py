"""The event loop the bot's processes run on: uvloop where it is installed, else asyncio's own.

The bot is asyncio I/O through and through (the gateway, Discord's REST API, the engine's streams,
the database drivers' hand-offs), and uvloop runs the same code with less CPU per wake-up, socket
read and thread hand-off. It is a dependency on Linux and macOS; Windows and MASQUE_UVLOOP=0 get
asyncio's loop, which behaves the same, a little slower.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory(use_uvloop: bool = True) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when wanted and installed; None: asyncio's default loop."""
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """`asyncio.run(main)` on the loop `loop_factory` picks."""
    with asyncio.Runner(loop_factory=loop_factory(use_uvloop)) as runner:
        return runner.run(main)
