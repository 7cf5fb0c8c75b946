"""Every Python package in bot/ and engine/ is listed in pyproject.toml, so the wheel has it; every
dependency the bot declares is used."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# A distribution -> the module its users import, where the two names differ.
IMPORT_NAMES = {"discord.py": "discord", "pillow": "PIL", "pydantic-settings": "pydantic_settings"}
LOADED_BY_URL = {"aiosqlite"}  # SQLAlchemy imports the driver a database URL names


def test_every_package_is_in_the_wheel():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(init.parent.relative_to(REPO).parts)
               for top in ("bot", "engine") for init in (REPO / top).rglob("__init__.py")}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    mapped = {name: REPO / folder for name, folder in config["package-dir"].items()}
    assert mapped["bot.migrations"].joinpath("env.py").is_file()
    assert list(mapped["bot.builtin_personas"].glob("*.json"))


def imported_modules(*folders: str) -> set[str]:
    """The top-level modules imported anywhere in these folders."""
    names: set[str] = set()
    for folder in folders:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    return names


def test_every_declared_dependency_is_used():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[<>=~!; ]", requirement, maxsplit=1)[0].lower() for requirement in declared}
    imported = imported_modules("bot", "engine", "migrations")
    unused = {name for name in names - LOADED_BY_URL if IMPORT_NAMES.get(name, name.replace("-", "_")) not in imported}
    assert unused == set(), "remove these from [project] dependencies in pyproject.toml, or use them"
