"""Webhook names, threads, and the streaming sink's rate-limited edits."""

from __future__ import annotations

import discord
from hypothesis import given
from hypothesis import strategies as st

from bot.discord_io.streaming import STREAM_CURSOR, WebhookReplySink
from bot.discord_io.webhooks import WEBHOOK_NAME_LIMIT, PersonaIdentity, sanitise_webhook_name
from tests.bot.simcord_kit import make_bot, world


def test_names_discord_refuses_are_made_acceptable():
    assert "clyde" not in sanitise_webhook_name("Clyde").lower()
    assert "discord" not in sanitise_webhook_name("My DISCORD pal").lower()
    assert sanitise_webhook_name("everyone") == "everyone (persona)"
    assert sanitise_webhook_name("@here") == "here (persona)"
    assert sanitise_webhook_name("   ") == "Persona"
    assert sanitise_webhook_name("Wren Halloway") == "Wren Halloway"


@given(st.text(max_size=300))
def test_any_name_becomes_a_valid_webhook_name(name):
    clean = sanitise_webhook_name(name)
    assert 1 <= len(clean) <= WEBHOOK_NAME_LIMIT + len(" (persona)")
    folded = clean.casefold()
    assert "clyde" not in folded and "discord" not in folded and "@" not in clean
    assert folded not in {"everyone", "here"}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_sink_edits_at_most_once_per_interval_and_splits_long_replies(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        channel = w.bot.get_channel(w.channel.id)
        clock = Clock()
        sink = WebhookReplySink(w.bot.poster, channel, PersonaIdentity("Wren"), interval_s=1.0, clock=clock)
        await sink.update("Once")  # posts at once
        for step, text in enumerate(["Once upon", "Once upon a", "Once upon a time"]):
            clock.now = 0.3 * (step + 1)
            await sink.update(text)  # all inside the interval: skipped
        assert sink.edits == 1 and w.persona_messages()[-1].content == "Once" + STREAM_CURSOR
        clock.now = 1.1
        await sink.update("Once upon a time there")
        assert sink.edits == 2 and w.persona_messages()[-1].content.startswith("Once upon a time there")

        long = " ".join(f"word{i}" for i in range(900))  # about 7000 characters
        ids = await sink.finish(long)
        await sink.seal(None)
        shown = [m for m in w.persona_messages() if m.id in ids]
        assert len(ids) == len(shown) >= 4 and all(len(m.content) <= 2000 for m in shown)
        assert " ".join(m.content for m in shown).split() == long.split()
        # A shorter rewrite into the same messages deletes the surplus ones.
        again = WebhookReplySink(w.bot.poster, channel, PersonaIdentity("Wren"), existing_ids=ids)
        assert await again.finish("Short now.") == ids[:1]
        await again.seal(None)
        assert [m.content for m in w.persona_messages()] == ["Short now."]


async def test_threads_use_the_parent_webhook_with_thread_id(bot_settings, store, fake_engine):
    async with world(make_bot(bot_settings, store)) as w:
        parent = w.bot.get_channel(w.channel.id)
        thread = await parent.create_thread(name="side quest", type=discord.ChannelType.public_thread)
        await w.env.settle()
        handle = next(t for t in w.channel.threads if t.id == thread.id)
        await w.admin.slash(handle, "story start", persona="Wren Halloway")
        executes = [r for r in w.env.http_requests if r.method == "POST" and r.path.startswith("/webhooks/")
                    and "simcord_webhook" in r.path]
        assert executes and all(str(r.params.get("thread_id")) == str(thread.id) for r in executes)
        created = [r for r in w.env.http_requests if r.method == "POST" and r.path.endswith("/webhooks")]
        assert [r.path for r in created] == [f"/channels/{w.channel.id}/webhooks"]  # on the parent
