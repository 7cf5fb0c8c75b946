"""`masque`: the admin command line (cards, personas, a user's data, database).

Exit codes: 0 success, 2 bad input (a card that cannot be read, a name that
is taken, a persona that does not exist), 1 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bot.builtin import builtin_personas
from bot.cards import CardError, load_card, load_lorebook, write_card
from bot.cards.model import Card
from bot.settings import BotSettings
from bot.store import Persona, PersonaExists, Store

EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Bad input from the person at the keyboard: printed, exit code 2."""


def _print_json(obj: object) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=2))


# ------------------------------------------------------------------ cards


def card_show(args: argparse.Namespace) -> None:
    parsed = load_card(args.file)
    _print_json(parsed.card.to_v2() if args.spec == "v2" else parsed.card.to_v3())


def card_convert(args: argparse.Namespace) -> None:
    parsed = load_card(args.file)
    avatar = Path(args.avatar).read_bytes() if args.avatar else parsed.avatar
    write_card(parsed.card, args.out, avatar)
    print(f"wrote {args.out} ({parsed.card.name}, from {parsed.format} {parsed.source_spec})")


def lore_show(args: argparse.Namespace) -> None:
    book = load_lorebook(args.file)
    _print_json({"spec": "lorebook_v3", "data": book.dump()})


# ------------------------------------------------------------------ personas and database


async def _open_store() -> Store:
    store = Store(BotSettings().database_url)
    await store.upgrade()
    await store.listen()  # PostgreSQL: running bot processes hear what this command changes
    await store.sync_builtin_personas(builtin_personas())
    return store


async def persona_import(args: argparse.Namespace) -> None:
    parsed = load_card(args.file)
    store = await _open_store()
    try:
        persona = await store.create_persona(args.guild, parsed, author_id=args.author)
    except PersonaExists as exc:
        raise UserError(f"{Path(args.file).name}: data.name: {exc}") from exc
    finally:
        await store.close()
    print(f"imported {persona.name!r} into guild {args.guild} (persona id {persona.id})")


async def persona_list(args: argparse.Namespace) -> None:
    store = await _open_store()
    try:
        personas = await store.list_personas(args.guild)
    finally:
        await store.close()
    if args.json:
        _print_json([_persona_row(p) for p in personas])
        return
    for p in personas:
        where = "built-in" if p.scope == "builtin" else f"guild {p.guild_id}"
        tags = ", ".join(p.card["data"].get("tags", [])[:4])
        print(f"{p.name:<28} {where:<24} {tags}")


async def persona_export(args: argparse.Namespace) -> None:
    store = await _open_store()
    try:
        persona = await store.get_persona(args.guild, args.name)
    finally:
        await store.close()
    if persona is None:
        raise UserError(f"no persona named {args.name!r} in guild {args.guild}")
    write_card(Card.model_validate(persona.card), args.out, persona.avatar)
    print(f"wrote {args.out}")


def _persona_row(p: Persona) -> dict:
    return {"id": p.id, "name": p.name, "scope": str(p.scope), "guild_id": p.guild_id,
            "tags": p.card["data"].get("tags", []), "has_avatar": p.avatar is not None}


async def db_upgrade(args: argparse.Namespace) -> None:
    store = Store(BotSettings().database_url)
    try:
        await store.upgrade(args.revision)
        print(f"database at revision {await store.current_revision()} ({_safe_url(store.url)})")
    finally:
        await store.close()


def data_export(args: argparse.Namespace) -> None:
    data = asyncio.run(_with_store(lambda store: store.export_user(args.user)))
    text = json.dumps(data, ensure_ascii=False, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
        print(f"wrote {args.out} ({len(data['turns'])} turns of user {args.user})")
    else:
        print(text)


def data_delete(args: argparse.Namespace) -> None:
    if not args.yes:
        try:
            answer = input(f"Delete everything stored about user {args.user}, in every guild? Type 'yes': ")
        except EOFError:  # no terminal to ask
            answer = ""
        if answer.strip().lower() != "yes":
            raise UserError("not confirmed: nothing was deleted")
    # The same deletion as /masque forget-me everywhere.
    erased = asyncio.run(_with_store(lambda store: store.erase_user(args.user)))
    print(f"deleted user {args.user}: " + ", ".join(f"{k} {v}" for k, v in erased.as_dict().items()))


async def _with_store(action):
    store = await _open_store()
    try:
        return await action(store)
    finally:
        await store.close()


def _safe_url(url: str) -> str:
    """The URL without its password, for printing."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="masque", description="Masque admin tools.")
    groups = parser.add_subparsers(dest="group", required=True)

    card = groups.add_parser("card", help="read and convert character cards").add_subparsers(required=True)
    show = card.add_parser("show", help="print a card (PNG, JSON or CHARX) as normalised JSON")
    show.add_argument("file")
    show.add_argument("--spec", choices=("v2", "v3"), default="v3")
    show.set_defaults(func=card_show)
    convert = card.add_parser("convert", help="convert a card: OUT ending .png, .charx, .v2.json or .json")
    convert.add_argument("file")
    convert.add_argument("out")
    convert.add_argument("--avatar", help="an image to use as the avatar (PNG output)")
    convert.set_defaults(func=card_convert)

    lore = groups.add_parser("lore", help="read lorebooks").add_subparsers(required=True)
    lshow = lore.add_parser("show", help="print a lorebook (V3 or SillyTavern world info) as lorebook_v3")
    lshow.add_argument("file")
    lshow.set_defaults(func=lore_show)

    persona = groups.add_parser("persona", help="manage stored personas").add_subparsers(required=True)
    pimport = persona.add_parser("import", help="store a card as a persona of a guild")
    pimport.add_argument("file")
    pimport.add_argument("--guild", type=int, required=True, help="Discord guild (server) id")
    pimport.add_argument("--author", type=int, default=None, help="Discord user id of the author")
    pimport.set_defaults(func=persona_import)
    plist = persona.add_parser("list", help="list personas (built-ins and guild personas)")
    plist.add_argument("--guild", type=int, default=None, help="only those usable in this guild")
    plist.add_argument("--json", action="store_true")
    plist.set_defaults(func=persona_list)
    pexport = persona.add_parser("export", help="write a stored persona as a card file")
    pexport.add_argument("name")
    pexport.add_argument("out")
    pexport.add_argument("--guild", type=int, default=0)
    pexport.set_defaults(func=persona_export)

    data = groups.add_parser("data", help="what is stored about a user").add_subparsers(required=True)
    dexport = data.add_parser("export", help="everything stored about a user, in every guild, as JSON")
    dexport.add_argument("--user", type=int, required=True, help="Discord user id")
    dexport.add_argument("--out", default=None, help="write to this file instead of printing")
    dexport.set_defaults(func=data_export)
    ddelete = data.add_parser("delete", help="delete a user's data in every guild (as /masque forget-me)")
    ddelete.add_argument("--user", type=int, required=True, help="Discord user id")
    ddelete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    ddelete.set_defaults(func=data_delete)

    db = groups.add_parser("db", help="database schema").add_subparsers(required=True)
    upgrade = db.add_parser("upgrade", help="migrate the database to the latest schema")
    upgrade.add_argument("--revision", default="head")
    upgrade.set_defaults(func=db_upgrade)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    except (CardError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
