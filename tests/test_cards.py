"""Character cards: every format in, every format out, nothing lost, bad input named."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bot.cards import (
    MAX_CARD_BYTES,
    MAX_LOREBOOK_ENTRIES,
    CardError,
    expand,
    load_card,
    load_lorebook,
    parse_card,
    parse_lorebook,
    to_charx,
    to_json,
    to_png_card,
    write_card,
)
from bot.cards import png as pngmod
from bot.cards.parser import placeholder_avatar
from tests.conftest import CARDS, ecosystem_cards

OWN_CARDS = ("Ilse.png", "Tobin.png", "Maud.json", "Pell.charx")


def v2_card(**data) -> dict:
    base = {"name": "Ada", "description": "An engineer.", "first_mes": "Hello, {{user}}."}
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": {**base, **data}}


def png_with(texts: dict[str, str]) -> bytes:
    chunks = pngmod.read_chunks(placeholder_avatar("x"))
    return pngmod.with_text(chunks, texts)


def b64json(obj: dict) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


# ------------------------------------------------------------------ the project's own cards


def test_a_v2_png_reads_with_its_lorebook():
    parsed = load_card(CARDS / "Ilse.png")
    assert parsed.card.name == "Ilse"
    assert parsed.source_spec == "v2" and parsed.format == "png"
    book = parsed.card.data.character_book
    assert book is not None and book.name == "Emberfall"
    assert len(book.entries) == 4
    assert book.entries[1].keys[:2] == ["glassmoth", "glassmoths"]
    # SillyTavern's own top-level extras survive normalisation.
    v3 = parsed.card.to_v3()
    assert v3["spec"] == "chara_card_v3" and v3["create_date"].startswith("2024-1-1")
    assert v3["fav"] is False and v3["data"]["extensions"]["world"] == "Emberfall"
    assert v3["data"]["character_book"]["entries"][1]["extensions"] == {
        "position": 0, "probability": None, "useProbability": False,
    }
    Image.open(io.BytesIO(parsed.avatar)).verify()
    assert "chara" not in pngmod.text_chunks(pngmod.read_chunks(parsed.avatar))  # the avatar is the bare image


def test_a_png_with_only_a_ccv3_chunk_is_v3():
    parsed = load_card(CARDS / "Tobin.png")
    assert (parsed.format, parsed.source_spec) == ("png", "v3")
    assert parsed.card.name == "Tobin Quill" and parsed.card.display_name == "Tobin"
    assert parsed.card.to_v3()["data"]["group_only_greetings"] == ['"Everyone, to the table."']


def test_a_json_card_and_a_charx_card():
    maud = load_card(CARDS / "Maud.json")
    assert (maud.card.name, maud.format, maud.source_spec, maud.avatar) == ("Maud", "json", "v2", None)
    pell = load_card(CARDS / "Pell.charx")
    assert (pell.card.name, pell.format, pell.source_spec) == ("Pell", "charx", "v3")
    with zipfile.ZipFile(CARDS / "Pell.charx") as archive:
        assert pell.avatar == archive.read("assets/icon/images/main.png")


@pytest.mark.parametrize("name", [*OWN_CARDS, "ecosystem:Seraphina.png"])
def test_every_card_round_trips_through_png_json_and_charx(name: str):
    path = ecosystem_cards() / name.removeprefix("ecosystem:") if name.startswith("ecosystem:") else CARDS / name
    parsed = load_card(path)
    original = parsed.card.to_v3()
    again = parse_card(to_png_card(parsed.card, parsed.avatar), "again.png")
    assert again.card.to_v3() == original
    assert parse_card(to_json(parsed.card), "again.json").card.to_v3() == original
    charx = parse_card(to_charx(parsed.card, parsed.avatar), "again.charx")
    assert (charx.avatar is not None) == (parsed.avatar is not None)
    charx_v3 = charx.card.to_v3()
    if "assets" not in original["data"]:  # the writer names the avatar as the card's icon asset
        charx_v3["data"].pop("assets", None)
    assert charx_v3 == original


def test_png_export_writes_both_chunks_v3_read_first():
    parsed = load_card(CARDS / "Ilse.png")
    texts = pngmod.text_chunks(pngmod.read_chunks(to_png_card(parsed.card, parsed.avatar)))
    v2 = json.loads(base64.b64decode(texts["chara"]))
    v3 = json.loads(base64.b64decode(texts["ccv3"]))
    assert v2["spec"] == "chara_card_v2" and v3["spec"] == "chara_card_v3"
    assert "group_only_greetings" not in v2["data"] and "group_only_greetings" in v3["data"]
    # When both exist, ccv3 wins.
    both = png_with({"chara": b64json(v2_card(name="Old")), "ccv3": b64json({**v2_card(name="New"),
                                                                           "spec": "chara_card_v3"})})
    assert parse_card(both, "both.png").card.name == "New"


def test_world_info_becomes_a_lorebook():
    book = load_lorebook(CARDS / "Emberfall.lorebook.json")
    assert len(book.entries) == 4
    first = book.entries[0]
    assert first.keys == ["emberfall", "monastery", "cloister", "mountain monastery"]
    assert first.id == 0 and first.insertion_order == 100 and first.enabled is True
    assert first.position == "before_char"
    assert first.extensions["position"] == 0  # SillyTavern's raw fields kept in extensions


# ------------------------------------------------------------------ the ecosystem's real cards (extras)


def test_seraphina_png_reads_with_her_lorebook(shared_cards: Path):
    parsed = load_card(shared_cards / "Seraphina.png")
    assert parsed.card.name == "Seraphina"
    assert parsed.source_spec == "v2" and parsed.format == "png"
    book = parsed.card.data.character_book
    assert book is not None and book.name == "Eldoria"
    assert len(book.entries) == 4
    assert book.entries[1].keys[:2] == ["shadowfang", "beast"]
    v3 = parsed.card.to_v3()
    assert v3["spec"] == "chara_card_v3" and v3["create_date"].startswith("2023-5-12")
    assert v3["data"]["extensions"]["world"] == "Eldoria"
    Image.open(io.BytesIO(parsed.avatar)).verify()


def test_eldoria_world_info_becomes_a_lorebook(shared_cards: Path):
    from bot.story.lorebook import activate, book_problems

    book = load_lorebook(shared_cards / "Eldoria.lorebook.json")
    assert book.name == "Eldoria" and book_problems(book) == [] and len(book.entries) == 4
    assert book.entries[0].keys == ["eldoria", "wood", "forest", "magical forest"]
    result = activate([book], ["User: tell me about the forest"], turn=1, budget=10_000)
    assert sorted(h.uid for h in result.hits) == ["0", "1", "2", "3"]


# ------------------------------------------------------------------ formats


def test_v1_card_moves_into_data_and_keeps_extras():
    v1 = {"name": "Bob", "description": "d", "personality": "p", "first_mes": "hi", "chat": "Bob - 1", "fav": True}
    parsed = parse_card(json.dumps(v1).encode(), "bob.json")
    assert parsed.source_spec == "v1"
    v3 = parsed.card.to_v3()
    assert v3["data"]["name"] == "Bob" and v3["data"]["personality"] == "p"
    assert v3["chat"] == "Bob - 1" and v3["fav"] is True


def test_unknown_keys_survive_at_every_level():
    card = v2_card(
        custom_field={"nested": [1, 2]},
        extensions={"depth_prompt": {"depth": 4}},
        character_book={"entries": [{"keys": ["a"], "content": "b", "vendor_flag": 7}], "book_extra": "x"},
    )
    card["top_extra"] = {"k": "v"}
    out = json.loads(to_json(parse_card(json.dumps(card).encode(), "c.json").card))
    assert out["top_extra"] == {"k": "v"}
    assert out["data"]["custom_field"] == {"nested": [1, 2]}
    assert out["data"]["extensions"] == {"depth_prompt": {"depth": 4}}
    assert out["data"]["character_book"]["book_extra"] == "x"
    assert out["data"]["character_book"]["entries"][0]["vendor_flag"] == 7


def test_v3_standalone_lorebook():
    doc = {"spec": "lorebook_v3", "data": {"name": "World", "entries": [
        {"keys": ["moon"], "content": "The moon is hollow.", "use_regex": False, "case_sensitive": True}]}}
    book = parse_lorebook(json.dumps(doc).encode(), "world.json")
    assert book.name == "World" and book.entries[0].case_sensitive is True


def test_charx_reads_card_json_and_embedded_icon():
    avatar = placeholder_avatar("Zed")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        card = {**v2_card(name="Zed"), "spec": "chara_card_v3"}
        card["data"]["assets"] = [{"type": "icon", "uri": "embeded://assets/icon/images/main.png",
                                   "name": "main", "ext": "png"}]
        archive.writestr("card.json", json.dumps(card))
        archive.writestr("assets/icon/images/main.png", avatar)
    parsed = parse_card(buffer.getvalue(), "zed.charx")
    assert parsed.card.name == "Zed" and parsed.format == "charx" and parsed.avatar == avatar


def test_greetings_and_display_name():
    card = parse_card(json.dumps({**v2_card(alternate_greetings=["Hey", " "], nickname="Adi"),
                                  "spec": "chara_card_v3"}).encode(), "c.json").card
    assert card.greetings() == ["Hello, {{user}}.", "Hey"]
    assert card.display_name == "Adi"


# ------------------------------------------------------------------ macros


def test_macros_expand():
    text = "{{char}} greets {{User}}. <BOT> and <USER>. {{unknown}}"
    assert expand(text, char="Ada", user="Sam") == "Ada greets Sam. Ada and Sam. {{unknown}}"
    assert expand("{{pick:a,b,c}}", char="", user="", seed=3) == expand("{{pick:a,b,c}}", char="", user="", seed=3)
    rolls = {int(expand("{{roll:d6}}", char="", user="")) for _ in range(200)}
    assert rolls <= set(range(1, 7)) and len(rolls) > 3
    assert expand("{{random:x,y}}", char="", user="") in {"x", "y"}


# ------------------------------------------------------------------ bad input


def _bad(blob: bytes, source: str) -> CardError:
    with pytest.raises(CardError) as info:
        parse_card(blob, source)
    return info.value


def test_truncated_png_names_the_chunk():
    blob = (CARDS / "Ilse.png").read_bytes()
    err = _bad(blob[: blob.index(b"IDAT") + 100], "Ilse.png")
    assert "Ilse.png" in str(err) and "truncated" in err.reason and "IDAT" in err.reason


def test_garbage_is_named_by_the_format_its_file_claims():
    garbage = bytes(range(128, 256)) * 4  # neither a PNG, a zip nor UTF-8 text
    assert _bad(garbage, "photo.png").reason == "not a PNG file (it does not start with the PNG signature)"
    assert _bad(garbage, "card.charx").reason == "not a CHARX file (it is not a zip archive)"
    assert _bad(garbage, "card.json").reason.startswith("not UTF-8 text")
    # The content decides, not the name: a JSON card saved as .png is still read.
    assert parse_card(json.dumps(v2_card()).encode(), "misnamed.png").card.name == "Ada"


def test_writing_to_an_unknown_extension_is_refused(tmp_path: Path):
    card = load_card(CARDS / "Maud.json").card
    with pytest.raises(CardError) as info:
        write_card(card, tmp_path / "maud.txt")
    assert str(info.value) == ("maud.txt: unknown card extension '.txt': "
                               "write to a file ending .png, .charx, .json, .v2.json")
    assert not (tmp_path / "maud.txt").exists()
    for name, spec in (("m.json", "chara_card_v3"), ("m.v2.json", "chara_card_v2"), ("M.PNG", "chara_card_v3")):
        write_card(card, tmp_path / name)
        assert load_card(tmp_path / name).card.to_v3()["data"]["name"] == "Maud", name
        if name.endswith("json"):
            assert json.loads((tmp_path / name).read_text())["spec"] == spec


def test_png_without_card():
    err = _bad(placeholder_avatar("x"), "plain.png")
    assert str(err).startswith("plain.png: ") and "no character card" in err.reason


def test_bad_base64_in_chunk():
    err = _bad(png_with({"chara": "not base64 !!!"}), "b64.png")
    assert err.field == "chara chunk" and "base64" in err.reason


def test_invalid_json():
    err = _bad(b'{"spec": "chara_card_v2", "data": {', "broken.json")
    assert "invalid JSON" in err.reason and "line 1" in err.reason
    err = _bad(png_with({"ccv3": base64.b64encode(b"{nope").decode()}), "j.png")
    assert err.field == "ccv3 chunk" and "invalid JSON" in err.reason


def test_wrong_field_types_name_the_field():
    err = _bad(json.dumps(v2_card(alternate_greetings="not a list")).encode(), "types.json")
    assert err.field == "data.alternate_greetings" and "list" in err.reason.lower()
    err = _bad(json.dumps(v2_card(name=123)).encode(), "types.json")
    assert err.field == "data.name"
    err = _bad(json.dumps(v2_card(character_book={"entries": [{"keys": "x"}]})).encode(), "types.json")
    assert err.field == "data.character_book.entries.0.keys"


def test_file_over_the_size_limit(tmp_path: Path):
    big = tmp_path / "huge.png"
    with big.open("wb") as handle:
        handle.truncate(50 * 1024 * 1024)
    with pytest.raises(CardError) as info:
        load_card(big)
    assert "huge.png" in str(info.value) and "limit" in info.value.reason
    assert "limit" in _bad(b"{" + b" " * MAX_CARD_BYTES + b"}", "big.json").reason
    # Bytes that never were a file (a Discord attachment): a real card padded to one byte over the limit is
    # refused by its size, and the same card one byte shorter is read (a PNG ends at IEND).
    card = (CARDS / "Ilse.png").read_bytes()
    oversized = card + b"\0" * (MAX_CARD_BYTES + 1 - len(card))
    err = _bad(oversized, "padded.png")
    assert err.source == "padded.png" and err.reason == "file is 16.0 MiB, over the 16.0 MiB limit"
    assert parse_card(oversized[:-1], "padded.png").card.name == "Ilse"


def test_lorebook_with_100k_entries():
    entries = [{"keys": ["k"], "content": "c"}] * 100_000
    err = _bad(json.dumps(v2_card(character_book={"entries": entries})).encode(), "many.json")
    assert err.field == "data.character_book.entries" and str(MAX_LOREBOOK_ENTRIES) in err.reason
    world = {"entries": {str(i): {"uid": i, "key": ["k"], "content": "c"} for i in range(100_000)}}
    with pytest.raises(CardError) as info:
        parse_lorebook(json.dumps(world).encode(), "world.json")
    assert info.value.field == "entries" and "100000" in info.value.reason


def test_name_of_500_characters():
    err = _bad(json.dumps(v2_card(name="N" * 500)).encode(), "long.json")
    assert err.field == "data.name" and "100" in err.reason


def test_not_a_card_at_all():
    assert "lorebook" in _bad(json.dumps({"spec": "lorebook_v3", "data": {}}).encode(), "l.json").reason
    assert _bad(b"[1, 2]", "list.json").reason.startswith("expected a JSON object")
    assert _bad(b"", "empty.json").reason == "file is empty"
    assert _bad(b"PK\x03\x04garbage", "bad.charx").reason.startswith("not a valid CHARX")
    assert _bad(json.dumps({"spec": "chara_card_v9", "data": {}}).encode(), "v9.json").field == "spec"


# ------------------------------------------------------------------ property: round trip

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_key = st.text(st.characters(whitelist_categories=("Ll",)), min_size=1, max_size=8).filter(
    lambda k: k not in {"spec", "spec_version", "data"})
_json_value = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | _text,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_key, inner, max_size=3),
                           max_leaves=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=_text.filter(lambda s: s.strip() and len(s) <= 100),
    greetings=st.lists(_text, max_size=3),
    extensions=st.dictionaries(_key, _json_value, max_size=3),
    extras=st.dictionaries(_key.map(lambda k: "x_" + k), _json_value, max_size=3),
    keys=st.lists(_text, max_size=3),
)
def test_round_trip_keeps_everything(name, greetings, extensions, extras, keys):
    card = {"spec": "chara_card_v3", "spec_version": "3.0", **extras, "data": {
        "name": name, "alternate_greetings": greetings, "extensions": extensions, **extras,
        "character_book": {"entries": [{"keys": keys, "content": name, **extras}]},
    }}
    parsed = parse_card(json.dumps(card).encode(), "prop.json")
    v3 = parsed.card.to_v3()
    for out in (parse_card(to_json(parsed.card), "a.json"), parse_card(to_png_card(parsed.card), "a.png")):
        assert out.card.to_v3() == v3
    assert v3["data"]["extensions"] == extensions
    for key, value in extras.items():
        assert v3[key] == value and v3["data"][key] == value
        assert v3["data"]["character_book"]["entries"][0][key] == value


# ------------------------------------------------------------------ SillyTavern world info


def _world(**entry) -> bytes:
    base = {"uid": 7, "key": ["dragon"], "keysecondary": [], "content": "Dragons nest here.", "order": 100}
    return json.dumps({"entries": {"7": {**base, **entry}}}).encode()


def _bad_lorebook(blob: bytes, source: str = "world.json") -> CardError:
    with pytest.raises(CardError) as info:
        parse_lorebook(blob, source)
    return info.value


def test_world_info_converts_with_its_positions_depths_and_logic():
    from bot.story.lorebook import activate, book_problems

    book = load_lorebook(CARDS / "Emberfall.lorebook.json")
    assert book.name == "Emberfall" and book_problems(book) == []
    assert [e.extensions["position"] for e in book.entries] == [0, 0, 0, 0]
    assert all(e.position == "before_char" and e.selective is False for e in book.entries)
    once = activate([book], ["User: tell me about the monastery"], turn=1, budget=10_000, max_recursion=1)
    assert [(h.position, h.book, h.uid, h.depth, h.role) for h in once.hits] == [
        ("before_char", "Emberfall", "0", 4, "system")]
    # its entries name each other (glassmoths, the bellwright...), so recursion brings in the whole book
    result = activate([book], ["User: tell me about the monastery"], turn=1, budget=10_000)
    assert sorted(h.uid for h in result.hits) == ["0", "1", "2", "3"]


def test_world_info_fields_become_sillytaverns_embedded_form():
    blob = _world(position=4, depth=2, role=1, selectiveLogic=3, selective=True, keysecondary=["fire"],
                  excludeRecursion=True, preventRecursion=False, delayUntilRecursion=2, probability=50,
                  useProbability=True, group="beasts", groupOverride=True, groupWeight=30, useGroupScoring=None,
                  scanDepth=3, caseSensitive=True, matchWholeWords=False, sticky=2, cooldown=1, delay=4,
                  disable=True, constant=False, comment="Dragon", characterFilter={"names": []})
    entry = parse_lorebook(blob, "w.json").entries[0]
    assert (entry.id, entry.keys, entry.secondary_keys, entry.insertion_order) == (7, ["dragon"], ["fire"], 100)
    assert entry.enabled is False and entry.position == "after_char" and entry.comment == "Dragon"
    assert entry.extensions == {
        "position": 4, "depth": 2, "role": 1, "selectiveLogic": 3, "exclude_recursion": True,
        "prevent_recursion": False, "delay_until_recursion": 2, "probability": 50, "useProbability": True,
        "group": "beasts", "group_override": True, "group_weight": 30, "use_group_scoring": None, "scan_depth": 3,
        "case_sensitive": True, "match_whole_words": False, "sticky": 2, "cooldown": 1, "delay": 4,
        "characterFilter": {"names": []},  # unknown fields are kept as they are
    }


def test_world_info_at_depth_reaches_the_matcher():
    from bot.story.lorebook import activate

    book = parse_lorebook(_world(position=4, depth=1, role=2), "w.json")
    hit = activate([book], ["a dragon"], turn=0).hits[0]
    assert (hit.position, hit.depth, hit.role, hit.book) == ("at_depth", 1, "assistant", "w")


def test_malformed_world_info_names_the_file_the_entry_and_the_field():
    assert "invalid JSON" in _bad_lorebook(b'{"entries": {"0": {', "broken.json").reason
    err = _bad_lorebook(_world(key=5), "types.json")
    assert (err.source, err.field) == ("types.json", "entries.7.key") and "list of strings" in err.reason
    err = _bad_lorebook(_world(probability="x"))
    assert err.field == "entries.7.probability" and "number" in err.reason
    err = _bad_lorebook(_world(constant="yes"))
    assert err.field == "entries.7.constant"
    err = _bad_lorebook(json.dumps({"entries": {"0": {"key": ["a"], "content": "c"}, "1": ["not", "an", "entry"]}})
                        .encode())
    assert err.field == "entries.1" and "object" in err.reason
    err = _bad_lorebook(_world(content="x" * 300_000))
    assert err.field == "entries.7.content"  # the entry's key in the file, not its place in our list
    assert "types.json" in str(_bad_lorebook(_world(key=5), "types.json"))


def test_world_info_numbers_may_be_numeric_strings_and_nulls_mean_unset():
    entry = parse_lorebook(_world(order="5", depth=None, scanDepth=None), "w.json").entries[0]
    assert entry.insertion_order == 5 and entry.extensions == {"depth": None, "scan_depth": None}


def test_world_info_over_the_size_limit():
    err = _bad_lorebook(b'{"entries": {}, "pad": "' + b"x" * (20 * 1024 * 1024) + b'"}', "huge.json")
    assert err.source == "huge.json" and "limit" in err.reason


def test_a_regex_key_that_does_not_compile_is_accepted_and_reported():
    from bot.story.lorebook import book_problems

    book = parse_lorebook(_world(key=["/[a-/i", "dragon"], comment="Dragon"), "w.json")
    assert book.entries[0].keys == ["/[a-/i", "dragon"]
    assert book_problems(book)[0].startswith('entry 7 (Dragon): key "/[a-/i" is not a valid regex')
