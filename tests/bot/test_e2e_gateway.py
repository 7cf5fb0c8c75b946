"""End to end over the network: the real discord.py client of the app against a local fake Discord.

MasqueBot (C2's app, C1's pipeline, a real SQLite store, the fake engine) logs in over REST,
syncs its slash commands, identifies on the fake gateway and then plays a story: the interaction
callback path, webhook posts as the persona, streamed edits, multipart uploads and the echo of
its own webhook messages (which it must not answer).
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import discord
import pytest
from PIL import Image

from bot.app import DiscordSetupError, MasqueBot, apply_endpoints, run_discord
from bot.cards import expand
from bot.discord_io.replies import TYPING_DELAY_S
from bot.engine_client import EngineClient
from bot.pipeline import persona_card
from bot.settings import BotSettings
from bot.store import Store
from tests.fakes.fake_discord import Attachment, FakeDiscord, RestCall
from tests.fakes.fake_engine import FakeEngine

READY_S = 20.0
PERSONA = "Wren Halloway"


@pytest.fixture
async def discord_server() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


@asynccontextmanager
async def running_bot(server: FakeDiscord, engine_url: str, store: Store,
                      database_url: str, **settings_env: str) -> AsyncIterator[MasqueBot]:
    """The app's bot, started for real against the fake Discord and ready (guild received); closed after."""
    settings = BotSettings(DISCORD_TOKEN=server.token, MASQUE_ENGINE_URL=engine_url,
                           MASQUE_DATABASE_URL=database_url, DISCORD_API_BASE=server.api_base,
                           DISCORD_GATEWAY_URL=server.gateway_url, _env_file=None, **settings_env)
    apply_endpoints(settings)
    engine = EngineClient.from_settings(settings)
    client = MasqueBot(settings, store, engine)
    runner = asyncio.create_task(client.start(server.token))
    try:
        await asyncio.wait_for(client.wait_until_ready(), READY_S)
        yield client
    finally:
        try:
            await _within(asyncio.ensure_future(client.close()), "close()")
            await _within(runner, "its run task, after close()")
        finally:
            await engine.close()


async def _within(task: asyncio.Future, what: str) -> None:
    """Wait READY_S for a shutdown step without cancelling it (a step that swallowed a cancel would
    hang the test until pytest's timeout); fail with every task's stack when it does not end."""
    done, _ = await asyncio.wait({task}, timeout=READY_S)
    if not done:
        stacks = io.StringIO()
        for pending in asyncio.all_tasks():
            pending.print_stack(limit=12, file=stacks)
        raise AssertionError(f"the bot's {what} did not end in {READY_S:.0f} s; tasks:\n{stacks.getvalue()}")
    task.result()


@pytest.fixture
async def bot(discord_server: FakeDiscord, fake_engine: FakeEngine, store: Store, sqlite_url: str,
              endpoints_restored: None) -> AsyncIterator[MasqueBot]:
    async with running_bot(discord_server, fake_engine.url, store, sqlite_url) as client:
        yield client


def persona_posts(server: FakeDiscord, since: int = 0) -> list[RestCall]:
    """Webhook executions (new persona messages) recorded from call index `since`."""
    return [c for c in server.calls[since:] if c.method == "POST" and c in server.webhook_calls()]


async def start_story(server: FakeDiscord, channel_id: int | None = None) -> RestCall:
    """/story start as the admin; returns the greeting's webhook post once the command has finished."""
    interaction = await server.slash("story start", channel_id=channel_id, user_id=server.world.admin_id,
                                     persona=PERSONA)
    # The command's last step is its ephemeral follow-up, after the greeting is posted and sealed.
    await server.wait_for_call(lambda c: c.method == "POST" and c.path.startswith(
        f"/webhooks/{server.world.application_id}/{interaction['token']}"))
    return next(c for c in server.calls if c.method == "POST" and c in server.webhook_calls())


async def test_login_identify_and_command_sync(bot: MasqueBot, discord_server: FakeDiscord) -> None:
    identify = discord_server.identifies[0]
    assert identify["token"] == discord_server.token
    assert identify["intents"] & discord.Intents(message_content=True).value  # the privileged intent
    synced = {c["name"] for c in discord_server.commands}
    assert {"persona", "story", "scene", "imagine", "masque"} <= synced
    assert discord_server.calls_to("PUT", f"/applications/{discord_server.world.application_id}/commands")
    guild = bot.get_guild(discord_server.world.guild_id)
    assert guild is not None and guild.get_channel(discord_server.world.story_channel_id) is not None
    assert bot.application_id == discord_server.world.application_id


async def test_a_refused_command_sync_does_not_stop_the_bot(
        discord_server: FakeDiscord, fake_engine: FakeEngine, store: Store, sqlite_url: str,
        endpoints_restored: None) -> None:
    discord_server.refuse_command_sync = True
    async with running_bot(discord_server, fake_engine.url, store, sqlite_url) as bot:
        assert discord_server.calls_to("PUT", f"/applications/{discord_server.world.application_id}/commands")
        assert discord_server.commands == []
        await bot.store.start_story(discord_server.world.story_channel_id, discord_server.world.guild_id,
                                    (await bot.store.get_persona(discord_server.world.guild_id, PERSONA)).id)
        said = await discord_server.user_says("Is anyone on watch?")
        await discord_server.wait_for_call(lambda c: c.method == "POST" and c in discord_server.webhook_calls())
        turn = await bot.store.turn_by_message(int(said["id"]))
        assert turn is not None  # the story still plays without slash commands


async def test_a_wrong_token_is_a_clear_set_up_error_that_does_not_show_the_token(
        discord_server: FakeDiscord, fake_engine: FakeEngine, store: Store, sqlite_url: str,
        endpoints_restored: None) -> None:
    wrong = "not-the-token-" + "x" * 40
    settings = BotSettings(DISCORD_TOKEN=wrong, MASQUE_ENGINE_URL=fake_engine.url, MASQUE_DATABASE_URL=sqlite_url,
                           DISCORD_API_BASE=discord_server.api_base, DISCORD_GATEWAY_URL=discord_server.gateway_url,
                           _env_file=None)
    engine = EngineClient.from_settings(settings)
    try:
        with pytest.raises(DiscordSetupError) as refused:
            await asyncio.wait_for(run_discord(settings, store, engine), READY_S)
    finally:
        await engine.close()
    assert "DISCORD_TOKEN" in str(refused.value) and wrong not in str(refused.value)


async def test_story_start_answers_the_interaction_and_greets_as_the_persona(
        bot: MasqueBot, discord_server: FakeDiscord) -> None:
    interaction = await discord_server.slash("story start", user_id=discord_server.world.admin_id, persona=PERSONA)
    callback = await discord_server.wait_for_call(lambda c: c.path.startswith("/interactions/"))
    assert callback.path == f"/interactions/{interaction['id']}/{interaction['token']}/callback"
    assert callback.json["type"] in (4, 5)  # answered (or deferred) within Discord's 3 seconds
    greeting = await discord_server.wait_for_call(lambda c: c.method == "POST" and c in discord_server.webhook_calls())
    card = persona_card(await bot.store.get_persona(discord_server.world.guild_id, PERSONA))
    assert greeting.json["username"] == card.display_name  # posted as the persona, not as the bot
    assert greeting.json["allowed_mentions"]["parse"] == []
    assert greeting.query["wait"] in ("1", "true")
    hook = discord_server.webhooks[int(greeting.path.split("/")[2])]
    assert hook["channel_id"] == str(discord_server.world.story_channel_id)
    await discord_server.wait_for_call(lambda c: c.method == "POST" and c.path.startswith(
        f"/webhooks/{discord_server.world.application_id}/{interaction['token']}"))  # the ephemeral follow-up
    shown = discord_server.messages[int(greeting.response["id"])]
    assert shown["webhook_id"] == hook["id"]
    assert expand(card.data.first_mes, char=card.display_name, user="Ada_Admin")[:40] in shown["content"]


def png(width: int = 32, height: int = 24, color: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def buttons(message: dict) -> list[str]:
    """The custom ids of a message's buttons."""
    return [b.get("custom_id", "") for row in message.get("components", []) for b in row.get("components", [])]


async def test_a_user_message_gets_a_streamed_reply_as_the_persona_that_pings_nobody(
        bot: MasqueBot, discord_server: FakeDiscord, fake_engine: FakeEngine) -> None:
    await start_story(discord_server)
    fake_engine.reply = "@everyone look! <@&1> and <@" + str(discord_server.world.admin_id) + "> " + "word " * 60
    fake_engine.token_delay = 0.02  # ~1.3 s of tokens: at least one streaming edit before the end
    since = len(discord_server.calls)
    said = await discord_server.user_says("Wren, what is behind the door?")
    final = await discord_server.wait_for_call(
        lambda c: c.method == "PATCH" and c in discord_server.webhook_calls() and buttons(c.json or {}) != [],
        since=since, wait_s=20)
    chats = fake_engine.requests_to("/v1/chat/completions")
    assert chats[-1].json["stream"] is True
    assert "Wren, what is behind the door?" in str(chats[-1].json["messages"])
    persona_calls = [c for c in discord_server.calls[since:] if c in discord_server.webhook_calls()]
    assert persona_calls[0].method == "POST" and len(persona_calls) >= 2  # posted, then edited as tokens came
    for call in persona_calls:  # every send and edit: nobody is pinged, whatever the model wrote
        assert call.json["allowed_mentions"]["parse"] == [], call
        assert not call.json["allowed_mentions"].get("users") and not call.json["allowed_mentions"].get("roles")
    assert persona_calls[0].json["username"] == "Wren"
    assert final.json["content"].startswith("@everyone look!")
    turn = await bot.store.turn_by_message(int(said["id"]))
    assert turn is not None and turn.text == "Wren, what is behind the door?"
    # Discord echoed the persona's webhook messages back through the gateway: no reply to them.
    await asyncio.sleep(0.5)
    assert len(fake_engine.requests_to("/v1/chat/completions")) == len(chats)


async def test_typing_shows_only_while_a_reply_is_slow_to_start(
        bot: MasqueBot, discord_server: FakeDiscord, fake_engine: FakeEngine) -> None:
    await start_story(discord_server)
    fake_engine.latency = TYPING_DELAY_S + 0.8  # nothing to show for a while: "typing..."
    since = len(discord_server.calls)
    said = await discord_server.user_says("Wren?")
    typing = f"/channels/{said['channel_id']}/typing"
    await discord_server.wait_for_call(lambda c: c.method == "PATCH" and buttons(c.json or {}) != [],
                                       since=since, wait_s=20)
    calls = discord_server.calls[since:]
    typed = [i for i, c in enumerate(calls) if c.method == "POST" and c.path.endswith(typing)]
    posted = [i for i, c in enumerate(calls) if c in discord_server.webhook_calls() and c.method == "POST"]
    assert typed and posted and typed[0] < posted[0]
    fake_engine.latency = 0.0  # shown at once: no indicator, which Discord would keep up after the reply
    since = len(discord_server.calls)
    await discord_server.user_says("And now?")
    await discord_server.wait_for_call(lambda c: c.method == "PATCH" and buttons(c.json or {}) != [],
                                       since=since, wait_s=20)
    await asyncio.sleep(TYPING_DELAY_S + 0.3)
    assert not [c for c in discord_server.calls[since:] if c.method == "POST" and c.path.endswith(typing)]


async def test_an_image_attachment_reaches_the_engine_and_art_is_uploaded_as_multipart(
        bot: MasqueBot, discord_server: FakeDiscord, fake_engine: FakeEngine) -> None:
    await start_story(discord_server)
    picture = png()
    since = len(discord_server.calls)
    await discord_server.user_says("Look at this map.", attachments=[Attachment("map.png", "image/png", picture)])
    await discord_server.wait_for_call(
        lambda c: c.method == "PATCH" and c in discord_server.webhook_calls() and buttons(c.json or {}) != [],
        since=since, wait_s=20)
    parts = fake_engine.requests_to("/v1/chat/completions")[-1].json["messages"][-1]["content"]
    images = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert images == ["data:image/png;base64," + base64.b64encode(picture).decode()]

    interaction = await discord_server.slash("imagine", prompt="a lighthouse in a storm")
    upload = await discord_server.wait_for_call(
        lambda c: c.multipart and c.path.startswith(f"/webhooks/{discord_server.world.application_id}/"), wait_s=20)
    assert upload.path.endswith(interaction["token"])
    (art,) = upload.files
    assert art.filename == "scene.png" and Image.open(io.BytesIO(art.data)).format == "PNG"
    assert upload.json["attachments"][0]["filename"] == "scene.png"
    assert upload.response["attachments"][0]["content_type"] == "image/png"  # Discord infers the type
    assert fake_engine.requests_to("/v1/images/generations")[-1].json["prompt"]


async def test_a_message_in_a_thread_is_answered_through_the_parent_webhook(
        bot: MasqueBot, discord_server: FakeDiscord) -> None:
    world = discord_server.world
    greeting = await start_story(discord_server, channel_id=world.thread_id)
    assert greeting.query["thread_id"] == str(world.thread_id)
    hook = discord_server.webhooks[int(greeting.path.split("/")[2])]
    assert hook["channel_id"] == str(world.story_channel_id)  # webhooks live on the parent channel
    since = len(discord_server.calls)
    await discord_server.user_says("Down the side passage we go.", channel_id=world.thread_id)
    reply = await discord_server.wait_for_call(
        lambda c: c.method == "POST" and c in discord_server.webhook_calls(), since=since, wait_s=20)
    assert reply.query["thread_id"] == str(world.thread_id)
    assert discord_server.messages[int(reply.response["id"])]["channel_id"] == str(world.thread_id)


async def test_a_deleted_webhook_is_recreated_once(bot: MasqueBot, discord_server: FakeDiscord) -> None:
    first = await start_story(discord_server)
    discord_server.delete_webhook(discord_server.world.story_channel_id)
    since = len(discord_server.calls)
    await discord_server.user_says("Are you still there?")
    reply = await discord_server.wait_for_call(
        lambda c: c.method == "POST" and c in discord_server.webhook_calls() and c.status == 200, since=since,
        wait_s=20)
    assert reply.path.split("/")[2] != first.path.split("/")[2]
    assert [c.status for c in discord_server.calls[since:] if c.path.startswith("/webhooks/") and c.status == 404]
    assert len(discord_server.calls_to("POST", f"/channels/{discord_server.world.story_channel_id}/webhooks")) == 2


async def test_a_button_press_regenerates_the_reply_in_place(
        bot: MasqueBot, discord_server: FakeDiscord, fake_engine: FakeEngine) -> None:
    await start_story(discord_server)
    since = len(discord_server.calls)
    await discord_server.user_says("Tell me a secret.")
    sealed = await discord_server.wait_for_call(
        lambda c: c.method == "PATCH" and c in discord_server.webhook_calls() and buttons(c.json or {}) != [],
        since=since, wait_s=20)
    message_id = int(sealed.response["id"])
    regen = next(b for b in buttons(sealed.json) if ":regen:" in b)
    fake_engine.reply = "A different secret, then."
    since = len(discord_server.calls)
    interaction = await discord_server.press(message_id, regen)
    rewritten = await discord_server.wait_for_call(
        lambda c: c.method == "PATCH" and c.path.endswith(f"/messages/{message_id}")
        and (c.json or {}).get("content") == "A different secret, then.", since=since, wait_s=20)
    assert rewritten.json["allowed_mentions"]["parse"] == []
    assert discord_server.interactions[interaction["token"]]["callback"]["type"] in (5, 6)  # deferred
    turn = await bot.store.turn_by_message(message_id)
    assert turn is not None and turn.text == "A different secret, then." and len(turn.swipes) == 2


async def test_a_normal_user_cannot_delete_a_persona(bot: MasqueBot, discord_server: FakeDiscord) -> None:
    interaction = await discord_server.slash("persona delete", name=PERSONA)  # as the normal user
    callback = await discord_server.wait_for_call(lambda c: c.path.startswith("/interactions/"))
    assert callback.path.endswith(f"{interaction['token']}/callback")
    assert callback.json["data"]["flags"] & 64  # ephemeral
    assert "Manage Server" in callback.json["data"]["content"]
    assert await bot.store.get_persona(discord_server.world.guild_id, PERSONA) is not None


@pytest.mark.parametrize(("mode", "words"), [("down", "not reachable"), ("slow", "took too long"),
                                             ("stall", "took too long")])
async def test_an_engine_that_is_down_slow_or_stalling_gets_a_clear_message_and_keeps_the_turn(
        discord_server: FakeDiscord, fake_engine: FakeEngine, store: Store, sqlite_url: str,
        endpoints_restored: None, mode: str, words: str) -> None:
    # Real clock here (unlike SimCord's virtual one), so the engine client's own timeout fires.
    async with running_bot(discord_server, fake_engine.url, store, sqlite_url,
                           MASQUE_ENGINE_TIMEOUT_S="1", MASQUE_ENGINE_RETRIES="0") as bot:
        await start_story(discord_server)
        await fake_engine.set_mode(mode)
        since = len(discord_server.calls)
        said = await discord_server.user_says("Hello? Anyone?")
        note = await discord_server.wait_for_call(
            lambda c: c.method == "POST" and c.path == f"/channels/{said['channel_id']}/messages", since=since,
            wait_s=30)
        assert str(note.json["message_reference"]["message_id"]) == said["id"]
        assert words in note.json["content"]
        assert note.json["allowed_mentions"]["parse"] == []
        assert any(":retry:" in b for b in buttons(note.json))
        turn = await bot.store.turn_by_message(int(said["id"]))
        assert turn is not None and turn.text == "Hello? Anyone?"  # the user's turn is never lost
        # Whatever the stream had shown of the reply is not left behind as if it were the answer.
        posted = [int(c.response["id"]) for c in persona_posts(discord_server, since)]
        assert not any(i in discord_server.messages for i in posted)


@pytest.mark.parametrize("engine_seen", [False, True], ids=["engine-not-yet-seen", "engine-seen-speaking-masque"])
async def test_a_voice_message_is_heard_and_quoted(bot: MasqueBot, discord_server: FakeDiscord,
                                                   fake_engine: FakeEngine, engine_seen: bool) -> None:
    await start_story(discord_server)
    if engine_seen:  # one reply first: its `masque` extras tell the client the engine hears audio parts itself
        since = len(discord_server.calls)
        # the admin asks, so the player's voice message after it meets no per-user cooldown
        await discord_server.user_says("Is the gate locked?", user_id=discord_server.world.admin_id)
        await discord_server.wait_for_call(
            lambda c: c.method == "PATCH" and c in discord_server.webhook_calls() and buttons(c.json or {}) != [],
            since=since, wait_s=20)
    assert bot.engine.speaks_masque() is engine_seen
    fake_engine.transcript = "open the gate before the tide turns"
    said = await discord_server.user_says("", attachments=[Attachment("voice-message.ogg", "audio/ogg",
                                                                      b"OggS fake opus", voice=True)])
    quote = await discord_server.wait_for_call(
        lambda c: c.method == "POST" and c.path == f"/channels/{said['channel_id']}/messages", wait_s=20)
    assert "open the gate before the tide turns" in quote.json["content"]
    assert quote.json["allowed_mentions"]["parse"] == []
    # The audio reached the engine one way only: as an input_audio part to an engine known to speak `masque`,
    # else through /v1/audio/transcriptions first, and then as text.
    audio = base64.b64encode(b"OggS fake opus").decode()
    parts = [p for r in fake_engine.requests_to("/v1/chat/completions") for m in r.json["messages"]
             if isinstance(m["content"], list) for p in m["content"] if p["type"] == "input_audio"]
    uploads = [r.form["file"]["data"] for r in fake_engine.requests_to("/v1/audio/transcriptions")]
    if engine_seen:
        assert [p["input_audio"]["data"] for p in parts] == [audio] and uploads == []
    else:
        assert parts == [] and uploads == [b"OggS fake opus"]
        assert "open the gate before the tide turns" in str(fake_engine.requests_to("/v1/chat/completions")[-1].json)
    turn = await bot.store.turn_by_message(int(said["id"]))
    assert turn is not None and turn.attachments[0]["transcript"] == "open the gate before the tide turns"


async def test_a_restarted_bot_resumes_the_story_from_sql(
        bot: MasqueBot, discord_server: FakeDiscord, fake_engine: FakeEngine, store: Store, sqlite_url: str) -> None:
    await start_story(discord_server)
    since = len(discord_server.calls)
    await discord_server.user_says("My name is Captain Marlow.")
    await discord_server.wait_for_call(
        lambda c: c.method == "PATCH" and c in discord_server.webhook_calls() and buttons(c.json or {}) != [],
        since=since, wait_s=20)
    await bot.close()  # the process goes away; the story stays in SQLite

    restarted_store = Store(sqlite_url)
    await restarted_store.upgrade()
    try:
        async with running_bot(discord_server, fake_engine.url, restarted_store, sqlite_url) as again:
            since = len(discord_server.calls)
            await discord_server.user_says("Do you remember my name?")
            await discord_server.wait_for_call(
                lambda c: c.method == "POST" and c in discord_server.webhook_calls(), since=since, wait_s=20)
            prompt = str(fake_engine.requests_to("/v1/chat/completions")[-1].json["messages"])
            assert "My name is Captain Marlow." in prompt and "Do you remember my name?" in prompt
            assert len(discord_server.identifies) == 2 and again.user.id == discord_server.world.bot_id
    finally:
        await restarted_store.close()


async def test_two_messages_at_once_in_one_channel_are_answered_in_order(
        bot: MasqueBot, discord_server: FakeDiscord, fake_engine: FakeEngine) -> None:
    await start_story(discord_server)
    fake_engine.latency = 0.2  # the first reply is still being written when the second message arrives
    since = len(discord_server.calls)
    first = await discord_server.user_says("First: I light the lantern.")
    second = await discord_server.user_says("Second: I open the door.", user_id=discord_server.world.admin_id)
    await discord_server.wait_for_call(lambda _: len(sealed(discord_server, since)) >= 2, since=since, wait_s=20)
    chats = [r.json["messages"] for r in fake_engine.requests_to("/v1/chat/completions")]
    assert "First: I light the lantern." in str(chats[-2][-1]) and "Second" not in str(chats[-2])
    assert "First: I light the lantern." in str(chats[-1]) and "Second: I open the door." in str(chats[-1][-1])
    assert "You said: Uma_User: First: I light the lantern." in str(chats[-1])  # the first reply, in the history
    first_turn = await bot.store.turn_by_message(int(first["id"]))
    second_turn = await bot.store.turn_by_message(int(second["id"]))
    assert first_turn is not None and second_turn is not None and first_turn.position < second_turn.position


def sealed(server: FakeDiscord, since: int) -> list[RestCall]:
    """Final persona edits (the ones that put the buttons on) from call index `since`."""
    return [c for c in server.calls[since:]
            if c.method == "PATCH" and c in server.webhook_calls() and buttons(c.json or {}) != []]


async def test_a_30_turn_story_over_the_gateway_against_a_vllm_shaped_server(
        discord_server: FakeDiscord, store: Store, sqlite_url: str, endpoints_restored: None) -> None:
    """A newcomer's evening: 30 turns, a pinned fact and an author's note, on a 2048-token vLLM:
    every message answered as the persona, no request over the window, the fact in the last prompt."""
    from tests.fakes.fake_vllm import FakeVLLM

    async with FakeVLLM(max_model_len=2048, reply="*Wren taps the ledger.* " + "Go on, and mind the tide. " * 8) \
            as vllm, running_bot(discord_server, vllm.url, store, sqlite_url) as bot:
        await start_story(discord_server)
        channel, player = discord_server.world.story_channel_id, discord_server.world.admin_id
        await bot.store.update_guild_settings(discord_server.world.guild_id, cooldown_s=0)  # one fast typist
        await discord_server.slash("memory add", user_id=player, text="Ann's brother Theo wore a green scarf.")
        await discord_server.slash("story note", user_id=player, text="Keep it rainy.", depth=2)
        for turn in range(30):
            since = len(discord_server.calls)
            said = await discord_server.user_says(f"I look along the quay for clues, step {turn}.")
            await discord_server.wait_for_call(
                lambda c: c.method == "PATCH" and c in discord_server.webhook_calls() and buttons(c.json or {}) != [],
                since=since, wait_s=20)
            assert (await bot.store.turn_by_message(int(said["id"]))) is not None
        story = await bot.store.active_story(channel)
        assert await bot.store.count_turns(story.id) == 61  # greeting + 30 exchanges
        assert vllm.over_window() == [] and not [c for c in vllm.chat_calls if c.refused]
        last = str(vllm.chat_calls[-1].record.json["messages"])
        assert "green scarf" in last and "Keep it rainy." in last
