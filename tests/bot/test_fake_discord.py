"""The fake Discord itself: it answers like Discord where the bot could get things wrong.

Plain aiohttp against its REST and gateway, so the end-to-end tests can trust what it checks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.fakes.fake_discord import FakeDiscord

BOT = {"Authorization": "Bot fake-bot-token"}


@pytest.fixture
async def server() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as fake:
        yield fake


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def make_webhook(server: FakeDiscord, http: aiohttp.ClientSession, name: str = "Wren") -> dict:
    url = f"{server.api_base}/channels/{server.world.story_channel_id}/webhooks"
    async with http.post(url, json={"name": name}, headers=BOT) as resp:
        return {"status": resp.status, **(await resp.json())}


async def test_rest_needs_the_bot_token_and_answers_exact_json(server: FakeDiscord,
                                                               http: aiohttp.ClientSession) -> None:
    async with http.get(f"{server.api_base}/users/@me") as resp:
        assert resp.status == 401
    async with http.get(f"{server.api_base}/users/@me", headers={"Authorization": "Bot wrong"}) as resp:
        assert resp.status == 401
    async with http.get(f"{server.api_base}/users/@me", headers=BOT) as resp:
        assert resp.headers["Content-Type"] == "application/json"  # discord.py parses only this exact type
        assert (await resp.json())["id"] == str(server.world.bot_id)
    async with http.get(f"{server.api_base}/gateway/bot", headers=BOT) as resp:
        assert (await resp.json())["url"] == server.gateway_url


async def test_webhook_rules_like_discord(server: FakeDiscord, http: aiohttp.ClientSession) -> None:
    assert (await make_webhook(server, http, "Clyde the Bard"))["code"] == 50035
    hook = await make_webhook(server, http)
    execute = f"{server.api_base}/webhooks/{hook['id']}/{hook['token']}"
    async with http.post(execute, params={"wait": "true"}, json={"content": "x" * 2001}) as resp:
        assert resp.status == 400 and (await resp.json())["code"] == 50035
    async with http.post(execute, params={"wait": "true"}, json={"content": ""}) as resp:
        assert (await resp.json())["code"] == 50006
    async with http.post(execute, params={"wait": "true"}, json={"content": "hi", "username": "Wren"}) as resp:
        message = await resp.json()
    assert message["webhook_id"] == hook["id"] and message["author"]["username"] == "Wren"
    assert server.dispatched[-1][0] == "MESSAGE_CREATE"  # echoed through the gateway, as Discord does
    async with http.post(execute, json={"content": "no wait"}) as resp:
        assert resp.status == 204
    server.delete_webhook(server.world.story_channel_id)
    async with http.patch(f"{execute}/messages/{message['id']}", json={"content": "edit"}) as resp:
        assert resp.status == 404 and (await resp.json())["code"] == 10015


async def test_multipart_uploads_become_served_attachments(server: FakeDiscord, http: aiohttp.ClientSession) -> None:
    form = aiohttp.FormData()
    form.add_field("payload_json", '{"content": "art", "attachments": [{"id": 0, "filename": "a.png"}]}',
                   content_type="application/json")
    form.add_field("files[0]", b"\x89PNG fake", filename="a.png", content_type="application/octet-stream")
    url = f"{server.api_base}/channels/{server.world.story_channel_id}/messages"
    async with http.post(url, data=form, headers=BOT) as resp:
        message = await resp.json()
    (call,) = server.calls_to("POST", f"/channels/{server.world.story_channel_id}/messages")
    assert call.multipart and call.json["content"] == "art" and call.files[0].data == b"\x89PNG fake"
    (attachment,) = message["attachments"]
    assert attachment["content_type"] == "image/png"
    async with http.get(attachment["url"]) as resp:
        assert await resp.read() == b"\x89PNG fake"


async def test_an_interaction_is_answered_once(server: FakeDiscord, http: aiohttp.ClientSession) -> None:
    server.commands = [{"id": "1", "name": "story", "type": 1, "options": [
        {"name": "start", "type": 1, "options": [{"name": "persona", "type": 3}]}]}]
    interaction = await server.slash("story start", persona="Wren")
    assert interaction["data"]["options"] == [
        {"name": "start", "type": 1, "options": [{"name": "persona", "type": 3, "value": "Wren"}]}]
    url = f"{server.api_base}/interactions/{interaction['id']}/{interaction['token']}/callback"
    body = {"type": 4, "data": {"content": "hello", "flags": 64}}
    async with http.post(url, json=body, params={"with_response": "1"}) as resp:
        answer = await resp.json()
    assert answer["interaction"]["response_message_ephemeral"] is True
    assert answer["resource"]["message"]["content"] == "hello"
    async with http.post(url, json=body) as resp:
        assert (await resp.json())["code"] == 40060
    with pytest.raises(KeyError, match="no option"):
        await server.slash("story start", mood="grim")


async def test_gateway_hello_identify_ready_heartbeat(server: FakeDiscord, http: aiohttp.ClientSession) -> None:
    async with http.ws_connect(server.gateway_url) as ws:
        hello = await ws.receive_json()
        assert hello["op"] == 10 and hello["d"]["heartbeat_interval"] > 0
        await ws.send_json({"op": 2, "d": {"token": server.token, "intents": 1 << 15, "properties": {}}})
        ready, guild = await ws.receive_json(), await ws.receive_json()
        assert ready["t"] == "READY" and ready["d"]["application"]["id"] == str(server.world.application_id)
        assert guild["t"] == "GUILD_CREATE" and len(guild["d"]["members"]) == 3
        await ws.send_json({"op": 1, "d": ready["s"]})
        assert (await ws.receive_json())["op"] == 11
        await server.user_says("hello there")
        event = await ws.receive_json()
        assert event["t"] == "MESSAGE_CREATE" and event["d"]["content"] == "hello there"
    async with http.ws_connect(server.gateway_url) as ws:
        await ws.receive_json()
        await ws.send_json({"op": 2, "d": {"token": "stolen"}})
        closing = await ws.receive()
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 4004
