"""Every Python package in bot/ and engine/ is listed in pyproject.toml, so the wheel has it."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_package_is_in_the_wheel():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(init.parent.relative_to(REPO).parts)
               for top in ("bot", "engine") for init in (REPO / top).rglob("__init__.py")}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    mapped = {name: REPO / folder for name, folder in config["package-dir"].items()}
    assert mapped["bot.migrations"].joinpath("env.py").is_file()
    assert list(mapped["bot.builtin_personas"].glob("*.json"))
