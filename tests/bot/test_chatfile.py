"""Story files that travel: SillyTavern chat JSONL both ways, Masque JSON out (bot/story/chatfile.py)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bot.story.chatfile import (
    MAX_CHAT_FILE_BYTES,
    ChatFileError,
    from_sillytavern_jsonl,
    parse_st_date,
    to_masque_json,
    to_sillytavern_jsonl,
)

T0 = datetime(2024, 6, 5, 14, 56, 50, 682000, tzinfo=UTC)
SOURCE = "chat.jsonl"
# The patterns ST's parseTimestamp (public/scripts/utils.js, 1.12) reads; anything else is "Invalid date".
ST_HUMANIZED_PATTERN = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2}) @(\d{1,2})h (\d{1,2})m (\d{1,2})s (\d{1,3})ms")
ST_CREATE_DATE_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}@\d{2}h\d{2}m\d{2}s$")  # humanizedDateTime

# A chat as SillyTavern 1.12 saves it (saveChat/saveReply/sendMessageAsUser/sendNarratorMessage/
# sendCommentMessage in public/script.js and slash-commands.js): greeting with an alternate greeting,
# a user message, a reply swiped to its second version, a /sys narration, a /comment, a /hide'd message
# and a /help page that ST's UI left in the chat.
ST_SAMPLE = "\n".join([
    '{"user_name":"Ada","character_name":"Seraphina","create_date":"2024-09-20@18h03m12s",'
    '"chat_metadata":{"note_prompt":"","note_interval":1,"note_position":1,"note_depth":4,"note_role":0,'
    '"tainted":true}}',
    '{"name":"Seraphina","is_user":false,"is_system":false,"send_date":"September 20, 2024 6:03pm",'
    '"mes":"*Seraphina looks up.* Oh, you\'re awake.","extra":{},"swipe_id":0,'
    '"swipes":["*Seraphina looks up.* Oh, you\'re awake.","*A warm light fills the glade.*"],"swipe_info":[]}',
    '{"name":"Ada","is_user":true,"is_system":false,"send_date":"September 20, 2024 6:04pm",'
    '"mes":"Where am I?","extra":{"isSmallSys":false,"token_count":5},'
    '"force_avatar":"User Avatars/1718000000000-Ada.png"}',
    '{"extra":{"api":"openai","model":"gpt-4o"},"name":"Seraphina","is_user":false,'
    '"send_date":"September 20, 2024 6:05pm","mes":"You are in my glade.","title":"",'
    '"gen_started":"2024-09-20T18:04:58.123Z","gen_finished":"2024-09-20T18:05:01.456Z","swipe_id":1,'
    '"swipes":["The forest, traveller.","You are in my glade."],'
    '"swipe_info":[{"send_date":"September 20, 2024 6:04pm","gen_started":"2024-09-20T18:04:40.000Z",'
    '"gen_finished":"2024-09-20T18:04:44.000Z","extra":{"api":"openai","model":"gpt-4o"}},'
    '{"send_date":"September 20, 2024 6:05pm","gen_started":"2024-09-20T18:04:58.123Z",'
    '"gen_finished":"2024-09-20T18:05:01.456Z","extra":{"api":"openai","model":"gpt-4o"}}]}',
    '{"name":"System","is_user":false,"is_system":false,"send_date":"September 20, 2024 6:06pm",'
    '"mes":"A storm rolls in.","force_avatar":"img/five.png","extra":{"type":"narrator","bias":null,'
    '"gen_id":1726855560000,"isSmallSys":false,"api":"manual","model":"slash command"}}',
    '{"name":"Note","is_user":false,"is_system":true,"send_date":"September 20, 2024 6:06pm",'
    '"mes":"OOC: remember the storm","force_avatar":"img/quill.png","extra":{"type":"comment",'
    '"gen_id":1726855570000,"isSmallSys":false,"api":"manual","model":"slash command"}}',
    '{"name":"Ada","is_user":true,"is_system":true,"send_date":"September 20, 2024 6:07pm",'
    '"mes":"I shiver.","extra":{"isSmallSys":false}}',
    '{"name":"SillyTavern System","force_avatar":"img/five.png","is_user":false,"is_system":true,'
    '"mes":"Hello there! Please select the help topic you would like to learn more about:",'
    '"send_date":"September 20, 2024 6:08pm","extra":{"isSmallSys":true,"type":"help"}}',
])


@dataclass
class FakeSwipe:
    index: int
    text: str


@dataclass
class FakeTurn:
    position: int
    author_kind: str
    author_name: str
    text: str
    author_id: int | None = None
    swipes: list[FakeSwipe] = field(default_factory=list)
    selected_swipe: int = 0
    attachments: list[dict[str, Any]] = field(default_factory=list)
    created_at: datetime = T0


def persona(position: int, texts: list[str], selected: int = 0, name: str = "Noir") -> FakeTurn:
    return FakeTurn(position, "persona", name, texts[selected], None,
                    [FakeSwipe(i, t) for i, t in enumerate(texts)], selected,
                    created_at=T0 + timedelta(minutes=position))


def story() -> list[FakeTurn]:
    return [
        persona(1, ["*The rain hammers the window.* You're late."]),
        FakeTurn(2, "user", "Ada", "Sorry. The tram broke down.", 123456789012345678,
                 created_at=T0 + timedelta(minutes=2)),
        persona(3, ["Sit.", "*She slides a file across.* Sit.", "Coffee?"], selected=1),
        FakeTurn(4, "narrator", "Narrator", "Thunder rolls over the city.", created_at=T0 + timedelta(minutes=4)),
        FakeTurn(5, "user", "Bo", "I'll take the coffee.\nBlack, thanks.", 42, created_at=T0 + timedelta(minutes=5)),
        persona(6, ["First try.", "Second try."], selected=0),
    ]


def export(turns: list[FakeTurn]) -> bytes:
    return to_sillytavern_jsonl(turns, character_name="Noir", user_name="Ada", created_at=T0)


def lines(blob: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in blob.decode().split("\n")]


def jsonl(*rows: Any) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


HEADER = {"user_name": "Ada", "character_name": "Noir", "create_date": "2024-06-05@14h56m50s", "chat_metadata": {}}


def message(**fields: Any) -> dict[str, Any]:
    return {"name": "Noir", "is_user": False, "is_system": False, "send_date": "June 5, 2024 2:56pm",
            "mes": "Hello.", "extra": {}, **fields}


# ---------------------------------------------------------------- round trip


def test_round_trip_keeps_authors_texts_swipes_and_selection() -> None:
    turns = story()
    chat = from_sillytavern_jsonl(export(turns), SOURCE)

    assert (chat.user_name, chat.character_name) == ("Ada", "Noir")
    assert [(t.author_kind, t.author_name, t.text) for t in chat.turns] == [
        (t.author_kind, t.author_name, t.text) for t in turns
    ]
    for original, imported in zip(turns, chat.turns, strict=True):
        assert imported.swipes == [s.text for s in original.swipes]
        assert imported.selected_swipe == original.selected_swipe
    assert chat.turns[2].swipes[chat.turns[2].selected_swipe] == "*She slides a file across.* Sit."


def test_round_trip_keeps_times_to_the_millisecond() -> None:
    chat = from_sillytavern_jsonl(export(story()), SOURCE)
    assert [t.created_at for t in chat.turns] == [t.created_at for t in story()]


def test_system_turns_travel_as_narration() -> None:
    turns = [FakeTurn(1, "system", "", "The story was resumed.")]
    row = lines(export(turns))[1]
    assert row["extra"]["type"] == "narrator" and row["name"] == "System"
    imported = from_sillytavern_jsonl(export(turns), SOURCE).turns[0]
    assert (imported.author_kind, imported.author_name, imported.text) == ("narrator", "System", turns[0].text)


def test_line_breaks_inside_texts_stay_inside_one_line() -> None:
    turns = [FakeTurn(1, "user", "Ada", "one\ntwo\u2028three\r\nfour")]
    blob = export(turns)
    assert blob.count(b"\n") == 1  # header + one message
    assert from_sillytavern_jsonl(blob, SOURCE).turns[0].text == turns[0].text


# ---------------------------------------------------------------- what ST needs


def test_header_is_what_st_save_chat_writes() -> None:
    blob = export(story())
    header = lines(blob)[0]
    assert set(header) == {"user_name", "character_name", "create_date", "chat_metadata"}
    assert (header["user_name"], header["character_name"], header["chat_metadata"]) == ("Ada", "Noir", {})
    assert ST_CREATE_DATE_PATTERN.match(header["create_date"])
    assert header["create_date"] == "2024-06-05@14h56m50s"
    assert not blob.endswith(b"\n") and b'": ' not in blob.split(b"\n")[0]  # compact, as JSON.stringify


def test_messages_have_the_fields_st_writes() -> None:
    rows = lines(export(story()))[1:]
    for row in rows:
        assert {"name", "is_user", "is_system", "send_date", "mes", "extra"} <= set(row)
        assert row["is_system"] is False  # every turn was in the prompt: nothing hidden
        assert ST_HUMANIZED_PATTERN.search(row["send_date"])
    user, reply, narration = rows[1], rows[2], rows[3]
    assert user == {"name": "Ada", "is_user": True, "is_system": False, "send_date": "2024-6-5 @14h 58m 50s 682ms",
                    "mes": "Sorry. The tram broke down.", "extra": {"isSmallSys": False}}
    assert reply["is_user"] is False and reply["name"] == "Noir"
    assert reply["swipes"] == ["Sit.", "*She slides a file across.* Sit.", "Coffee?"]
    assert reply["swipe_id"] == 1 and reply["mes"] == reply["swipes"][1]
    assert len(reply["swipe_info"]) == 3 and all("send_date" in i and i["extra"] == {} for i in reply["swipe_info"])
    assert narration["extra"]["type"] == "narrator" and narration["force_avatar"] == "img/five.png"
    assert narration["name"] == "Narrator"


def test_st_reads_our_send_dates_back_to_the_same_instant() -> None:
    # ST's parseTimestamp turns the humanized form into ISO with a Z: the same conversion here.
    row = lines(export(story()))[2]
    y, mo, d, h, mi, s, ms = ST_HUMANIZED_PATTERN.search(row["send_date"]).groups()
    iso = f"{y}-{mo.zfill(2)}-{d.zfill(2)}T{h.zfill(2)}:{mi.zfill(2)}:{s.zfill(2)}.{ms.zfill(3)}+00:00"
    assert datetime.fromisoformat(iso) == T0 + timedelta(minutes=2)


def test_attachment_notes_join_mes_and_no_media_travels() -> None:
    voice = {"kind": "audio", "filename": "voice.ogg", "url": "https://cdn.discordapp.com/x/voice.ogg",
             "transcript": "Open the door."}
    image = {"kind": "image", "filename": "map.png", "url": "https://cdn.discordapp.com/x/map.png", "caption": "a map"}
    turns = [FakeTurn(1, "user", "Ada", "Listen.", attachments=[voice, image]),
             FakeTurn(2, "persona", "Noir", "Look.", swipes=[FakeSwipe(0, "Other."), FakeSwipe(1, "Look.")],
                      selected_swipe=1, attachments=[{"kind": "image", "filename": "scene.png"}])]
    rows = lines(export(turns))
    assert rows[1]["mes"] == "Listen.\n[voice message: Open the door.]\n[image: a map]"
    assert rows[2]["mes"] == "Look.\n[an image was shared: scene.png]" == rows[2]["swipes"][1]
    assert rows[2]["swipes"][0] == "Other."
    assert b"cdn.discordapp.com" not in export(turns)


def test_a_persona_turn_without_swipe_rows_still_gets_one_swipe() -> None:
    row = lines(export([FakeTurn(1, "persona", "", "Hello.")]))[1]
    assert (row["name"], row["swipes"], row["swipe_id"]) == ("Noir", ["Hello."], 0)


# ---------------------------------------------------------------- importing ST's own files


def test_a_chat_as_sillytavern_writes_it_imports() -> None:
    chat = from_sillytavern_jsonl(ST_SAMPLE.encode(), SOURCE)

    assert (chat.user_name, chat.character_name) == ("Ada", "Seraphina")
    assert [(t.author_kind, t.author_name, t.text) for t in chat.turns] == [
        ("persona", "Seraphina", "*Seraphina looks up.* Oh, you're awake."),
        ("user", "Ada", "Where am I?"),
        ("persona", "Seraphina", "You are in my glade."),
        ("narrator", "System", "A storm rolls in."),
        ("user", "Ada", "I shiver."),  # hidden with /hide: still the story
    ]  # the /comment and the /help page are ST's notes, not the story
    greeting, user, reply = chat.turns[:3]
    assert greeting.swipes == ["*Seraphina looks up.* Oh, you're awake.", "*A warm light fills the glade.*"]
    assert (reply.swipes, reply.selected_swipe) == (["The forest, traveller.", "You are in my glade."], 1)
    assert user.swipes == [] and chat.turns[3].swipes == []
    assert greeting.created_at == datetime(2024, 9, 20, 18, 3, tzinfo=UTC)


def test_an_empty_chat_is_valid() -> None:
    assert from_sillytavern_jsonl(jsonl(HEADER), SOURCE).turns == []
    chat = from_sillytavern_jsonl(jsonl(HEADER) + b"\n", SOURCE)
    assert (chat.user_name, chat.character_name, chat.turns) == ("Ada", "Noir", [])


def test_windows_line_endings_and_a_bom_are_read() -> None:
    blob = b"\xef\xbb\xbf" + jsonl(HEADER, message(mes="Hi.")).replace(b"\n", b"\r\n") + b"\r\n"
    assert [t.text for t in from_sillytavern_jsonl(blob, SOURCE).turns] == ["Hi."]


def test_chub_nested_texts_are_flattened_as_st_does() -> None:
    row = message(mes={"message": "B"}, swipes=[{"message": "A"}, {"message": "B"}], swipe_id=1)
    turn = from_sillytavern_jsonl(jsonl(HEADER, row), SOURCE).turns[0]
    assert (turn.text, turn.swipes, turn.selected_swipe) == ("B", ["A", "B"], 1)


@pytest.mark.parametrize(("fields", "swipes", "selected"), [
    ({"swipes": ["A", "B"], "swipe_id": 1, "mes": "B edited"}, ["A", "B edited"], 1),  # mes wins, as ST edits
    ({"swipes": ["A", "B"], "mes": "B"}, ["B"], 0),  # no swipe_id: ST rebuilds swipes from mes
    ({"swipes": [], "swipe_id": 0, "mes": "B"}, ["B"], 0),
    ({"swipes": ["A", "B"], "swipe_id": 5, "mes": "A"}, ["A", "B"], 0),  # out of range: the swipe showing mes
    ({"swipes": ["A", "B"], "swipe_id": 2, "mes": "C"}, ["A", "B", "C"], 2),  # saved mid-generation
    ({"swipes": ["A", "B"], "swipe_id": -1, "mes": "C"}, ["A", "B", "C"], 2),
    ({"swipes": ["A", "B"], "swipe_id": 1.0, "mes": "B"}, ["A", "B"], 1),  # one number type in JavaScript
])
def test_swipe_selection_follows_st(fields: dict[str, Any], swipes: list[str], selected: int) -> None:
    turn = from_sillytavern_jsonl(jsonl(HEADER, message(**fields)), SOURCE).turns[0]
    assert (turn.swipes, turn.selected_swipe, turn.text) == (swipes, selected, fields["mes"])


def test_missing_names_fall_back_to_the_header() -> None:
    rows = [{"is_user": True, "mes": "Hi."}, {"mes": "Hello."}, {"mes": "Rain.", "extra": {"type": "narrator"}}]
    turns = from_sillytavern_jsonl(jsonl(HEADER, *rows), SOURCE).turns
    assert [(t.author_kind, t.author_name) for t in turns] == [("user", "Ada"), ("persona", "Noir"),
                                                               ("narrator", "System")]
    assert all(t.created_at is None for t in turns)


@pytest.mark.parametrize(("value", "expected"), [
    ("June 19, 2023 2:20pm", datetime(2023, 6, 19, 14, 20, tzinfo=UTC)),
    ("Dec 1, 2023 12:05am", datetime(2023, 12, 1, 0, 5, tzinfo=UTC)),
    ("2024-6-5 @14h 56m 50s 682ms", T0),
    ("2024-07-12@01h31m37s", datetime(2024, 7, 12, 1, 31, 37, tzinfo=UTC)),
    (1717599410682, T0),
    ("1717599410682", T0),
    ("2024-06-05T14:56:50.682Z", T0),
    ("2024-06-05T16:56:50.682+02:00", T0),
    ("yesterday", None),
    ("", None),
    (None, None),
    (-5, None),
])
def test_send_dates_are_read_as_st_reads_them(value: Any, expected: datetime | None) -> None:
    assert parse_st_date(value) == expected


# ---------------------------------------------------------------- refusing bad files


@pytest.mark.parametrize(("blob", "line", "field"), [
    (b"", 1, None),
    (b"\n" + jsonl(HEADER), 1, None),  # ST reads the header from the very first line
    (jsonl(message()), 1, None),  # header missing: the first line is a message
    (jsonl({"chat_metadata": {}}), 1, None),
    (jsonl("[1, 2]"), 1, None),
    (jsonl({"user_name": 7, "character_name": "Noir"}), 1, "user_name"),
    (jsonl(HEADER, message(), "{not json"), 3, None),
    (jsonl(HEADER, "42"), 2, None),
    (jsonl(HEADER, {"name": "Noir"}), 2, "mes"),
    (jsonl(HEADER, message(mes=["Hello."])), 2, "mes"),
    (jsonl(HEADER, message(mes=None)), 2, "mes"),
    (jsonl(HEADER, message(swipes="Hello.", swipe_id=0)), 2, "swipes"),
    (jsonl(HEADER, message(swipes=["Hello.", 3], swipe_id=0)), 2, "swipes[1]"),
    (jsonl(HEADER, message(swipes=["Hello."], swipe_id="0")), 2, "swipe_id"),
    (jsonl(HEADER, message(swipes=["Hello."], swipe_id=0.5)), 2, "swipe_id"),
    (jsonl(HEADER, message(swipes=["Hello."], swipe_id=True)), 2, "swipe_id"),
    (jsonl(HEADER, message(is_user="true")), 2, "is_user"),
    (jsonl(HEADER, message(is_system=1)), 2, "is_system"),
    (jsonl(HEADER, message(name=["Noir"])), 2, "name"),
    (jsonl(HEADER, message(send_date={"day": 1})), 2, "send_date"),
    (jsonl(HEADER, message()) + b"\n" + b'{"mes": "caf\xe9"}', 3, None),  # not UTF-8
])
def test_malformed_files_are_refused_with_file_line_and_field(blob: bytes, line: int, field: str | None) -> None:
    with pytest.raises(ChatFileError) as caught:
        from_sillytavern_jsonl(blob, SOURCE)
    error = caught.value
    assert (error.source, error.line, error.field) == (SOURCE, line, field)
    assert str(error).startswith(f"{SOURCE}: line {line}: " + (f"{field}: " if field else ""))


def test_one_bad_line_refuses_the_whole_file() -> None:
    good = [message(mes=f"Line {i}.") for i in range(5)]
    with pytest.raises(ChatFileError, match="line 7: mes"):
        from_sillytavern_jsonl(jsonl(HEADER, *good, message(mes=3)), SOURCE)


def test_files_over_the_limit_are_refused_before_parsing() -> None:
    blob = jsonl(HEADER) + b"\n" + b" " * (MAX_CHAT_FILE_BYTES + 1 - len(jsonl(HEADER)) - 1)
    assert len(blob) == MAX_CHAT_FILE_BYTES + 1
    with pytest.raises(ChatFileError, match="limit") as caught:
        from_sillytavern_jsonl(blob, SOURCE)
    assert (caught.value.line, caught.value.field) == (None, None)
    assert from_sillytavern_jsonl(blob[:-1], SOURCE).turns == []  # exactly the limit is fine


# ---------------------------------------------------------------- Masque JSON


def test_masque_json_holds_everything() -> None:
    turns = story()
    turns[1].attachments = [{"kind": "audio", "filename": "v.ogg", "url": "https://cdn/v.ogg",
                             "content_type": "audio/ogg", "size": 1234, "transcript": "Sorry.", "data": b"\x00"}]
    blob = to_masque_json(turns, title="Rainy Night", persona_name="Noir", created_at=T0,
                          summary="Ada met Noir.", extra={"story_id": 7, "pinned": ["the file"]})
    doc = json.loads(blob)

    assert (doc["format"], doc["version"]) == ("masque.story", 1)
    assert (doc["title"], doc["persona_name"], doc["summary"]) == ("Rainy Night", "Noir", "Ada met Noir.")
    assert doc["created_at"] == "2024-06-05T14:56:50.682000+00:00"
    assert doc["extra"] == {"story_id": 7, "pinned": ["the file"]}
    assert len(doc["turns"]) == len(turns)
    for original, saved in zip(turns, doc["turns"], strict=True):
        assert saved["position"] == original.position
        assert (saved["author_kind"], saved["author_name"], saved["text"]) == (
            original.author_kind, original.author_name, original.text)
        assert saved["swipes"] == [{"index": s.index, "text": s.text} for s in original.swipes]
        assert saved["selected_swipe"] == original.selected_swipe
        assert datetime.fromisoformat(saved["created_at"]) == original.created_at
    user = doc["turns"][1]
    assert user["author_id"] == "123456789012345678"  # a string: beyond JavaScript's exact integers
    assert doc["turns"][0]["author_id"] is None
    assert user["attachments"] == [{"kind": "audio", "filename": "v.ogg", "url": "https://cdn/v.ogg",
                                    "content_type": "audio/ogg", "size": 1234, "transcript": "Sorry."}]


def test_masque_json_reads_enum_author_kinds_as_plain_strings() -> None:
    from enum import StrEnum

    class Kind(StrEnum):
        USER = "user"

    turn = FakeTurn(1, Kind.USER, "Ada", "Hi.")
    assert json.loads(to_masque_json([turn], title="", persona_name="", created_at=T0))["turns"][0][
        "author_kind"] == "user"
    assert lines(export([turn]))[1]["is_user"] is True


def test_error_message_names_file_line_and_field() -> None:
    assert str(ChatFileError("a.jsonl", 3, "mes", "expected a string")) == "a.jsonl: line 3: mes: expected a string"
    assert str(ChatFileError("a.jsonl", None, None, "too big")) == "a.jsonl: too big"
