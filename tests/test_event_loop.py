"""The bot's event loop (bot/event_loop.py): uvloop by default where installed, asyncio's own when turned off."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from bot import event_loop

uvloop = pytest.importorskip("uvloop", reason="uvloop is a dependency on Linux and macOS only")


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def test_the_bot_runs_on_uvloop_unless_turned_off():
    assert event_loop.run(_loop_module()) == "uvloop"
    assert event_loop.run(_loop_module(), use_uvloop=False) == "asyncio"


def test_masque_uvloop_false_gives_asyncio_s_loop_to_masque_bot():
    # What masque-bot's main() passes: the setting, read from the environment.
    code = ("import asyncio; from bot import event_loop; from bot.settings import BotSettings\n"
            "async def which(): return type(asyncio.get_running_loop()).__module__\n"
            "print(event_loop.run(which(), use_uvloop=BotSettings().uvloop))")
    for value, expected in (("0", "asyncio"), ("1", "uvloop")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"MASQUE_UVLOOP": value, "PATH": ""}, cwd=None)
        assert out.stdout.strip().split(".")[0] == expected
