"""Scene art: the tiny random Stable Diffusion pipeline, saved and loaded like a real model,
behind /v1/images/generations, driven by the official openai client."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import openai
import pytest
import torch
from PIL import Image

from engine.backends.images import ContentBlocked, DiffusersImages, blocked_terms
from engine.settings import EngineSettings
from engine.tiny import diffusion

FAST = {"steps": 2}  # two denoising steps: the tiny model paints noise either way


def png(b64: str) -> Image.Image:
    """Decode one b64_json image, insisting that it is a PNG."""
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


async def post_json(url: str, body: dict) -> tuple[int, dict]:
    """POST a JSON body; the status and the decoded answer."""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/images/generations", json=body) as response:
            return response.status, await response.json(content_type=None)


# --- the tiny pipeline and the backend ----------------------------------------------------------

def test_tiny_pipeline_builds_once_and_loads_with_from_pretrained(
    engine_settings: EngineSettings,
) -> None:
    from diffusers import DiffusionPipeline

    target = engine_settings.cache_dir / "tiny" / "diffusion"
    path = diffusion.build(target)
    stamp = (Path(path) / "unet" / "config.json").stat().st_mtime
    assert diffusion.build(target) == path and diffusion.is_built(path)
    assert (Path(path) / "unet" / "config.json").stat().st_mtime == stamp  # not rebuilt
    pipe = DiffusionPipeline.from_pretrained(path)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.tokenizer("the cat").input_ids[1:-1] == [pipe.tokenizer.convert_tokens_to_ids(t)
                                                        for t in ("the</w>", "cat</w>")]


@pytest.fixture(scope="module")
def tiny_pipe(engine_settings: EngineSettings):  # noqa: ANN201 - a diffusers pipeline
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(diffusion.build(
        engine_settings.cache_dir / "tiny" / "diffusion"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def always_flagging_checker():  # noqa: ANN201 - (checker, feature extractor)
    """A tiny random SD safety checker whose thresholds make it flag every image."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tiny = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
            "num_hidden_layers": 1}
    config = CLIPConfig(text_config=tiny, projection_dim=32,
                        vision_config={**tiny, "image_size": 32, "patch_size": 8})
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():  # a concept score is similarity minus threshold: -2 makes it positive
        checker.concept_embeds_weights.fill_(-2.0)
    extractor = CLIPImageProcessor(size={"shortest_edge": 32},
                                   crop_size={"height": 32, "width": 32})
    return checker, extractor


def test_safety_switch_uses_the_pipeline_checker(tiny_pipe) -> None:
    checker, extractor = always_flagging_checker()
    checked = type(tiny_pipe).from_pipe(tiny_pipe, safety_checker=checker,
                                        feature_extractor=extractor)
    backend = DiffusersImages(checked, "cpu", default_steps=2)
    assert backend.has_checker
    with pytest.raises(ContentBlocked, match="safety checker"):
        backend.generate("a quiet harbour", 32, 32, seed=1, safety=True)
    result = backend.generate("a quiet harbour", 32, 32, seed=1, safety=False)
    assert result.images[0].size == (32, 32)
    assert checked.safety_checker is checker  # switching off never changed the shared pipeline


def test_seeds_make_images_reproducible(tiny_pipe) -> None:
    backend = DiffusersImages(tiny_pipe, "cpu", default_steps=2)
    assert backend.native_size == 64
    first = backend.generate("a red door", 32, 32, n=2, seed=41)
    again = backend.generate("a red door", 32, 32, n=1, seed=42)
    assert first.seeds == [41, 42]
    assert first.images[1].tobytes() == again.images[0].tobytes()
    assert first.images[0].tobytes() != first.images[1].tobytes()


def test_concurrent_calls_match_sequential_ones(tiny_pipe) -> None:
    # Different step counts: without the backend's lock, one call's set_timesteps would
    # change the other's schedule half way through.
    backend = DiffusersImages(tiny_pipe, "cpu")
    jobs = [("a tower", 3), ("a bridge", 7)] * 2
    alone = [backend.generate(p, 32, 32, seed=1, steps=n).images[0].tobytes() for p, n in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(
            lambda job: backend.generate(job[0], 32, 32, seed=1, steps=job[1]).images[0].tobytes(),
            jobs,
        ))
    assert together == alone


@pytest.mark.parametrize(("prompt", "found"), [
    ("A NUDE statue", ["nude"]), ("sexy pirate", ["sexy"]), ("Essex countryside", []),
    ("a nudibranch on a reef", []),
])
def test_blocked_terms_match_whole_words(prompt: str, found: list[str]) -> None:
    assert blocked_terms(prompt) == found


# --- /v1/images/generations --------------------------------------------------------------------

def test_generate_pngs_of_the_asked_size(openai_client: openai.OpenAI) -> None:
    result = openai_client.images.generate(
        prompt="a lighthouse on a cliff at dusk", size="64x32", n=2,
        extra_body={**FAST, "seed": 5, "negative_prompt": "blurry"},
    )
    images = [png(item.b64_json) for item in result.data]
    assert [image.size for image in images] == [(64, 32), (64, 32)]
    assert images[0].tobytes() != images[1].tobytes()
    assert result.size == "64x32"
    assert result.model_extra["masque"] == {"seeds": [5, 6], "steps": 2, "safety": True}


@pytest.mark.parametrize("size", [None, "auto"])
def test_default_size_is_the_models_own(openai_client: openai.OpenAI, size: str | None) -> None:
    # The tiny UNet samples 8 latent pixels and its VAE scales by 8: a 64x64 model.
    extra = {"size": size} if size else {}
    result = openai_client.images.generate(prompt="a small boat", extra_body=FAST, **extra)
    assert png(result.data[0].b64_json).size == (64, 64) and result.size == "64x64"


def test_an_openai_size_paints_at_that_size(openai_client: openai.OpenAI) -> None:
    result = openai_client.images.generate(model="dall-e-2", prompt="a small boat", size="256x256",
                                           extra_body=FAST)
    assert png(result.data[0].b64_json).size == (256, 256) and result.size == "256x256"


def test_same_seed_same_image(openai_client: openai.OpenAI) -> None:
    def paint() -> str:
        return openai_client.images.generate(
            prompt="a red door", size="32x32", extra_body={**FAST, "seed": 9}
        ).data[0].b64_json

    assert paint() == paint()


def test_safety_is_the_callers_switch(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.images.generate(prompt="a nude figure", size="32x32", extra_body=FAST)
    assert info.value.body["code"] == "content_policy_violation"
    assert info.value.body["param"] == "prompt"
    allowed = openai_client.images.generate(prompt="a nude figure", size="32x32",
                                            extra_body={**FAST, "safety": False})
    assert png(allowed.data[0].b64_json).size == (32, 32)


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"prompt": "x", "size": "65x64"}, 400, "size", "invalid_size"),
        ({"prompt": "x", "size": "huge"}, 400, "size", "invalid_size"),
        ({"prompt": "x", "size": "0x64"}, 400, "size", "invalid_size"),
        ({"prompt": "x", "size": "4096x4096"}, 400, "size", "invalid_size"),
        ({"prompt": "x", "size": "2048x2048"}, 400, "size", "invalid_size"),  # > max_side
        ({"prompt": "x", "size": "32x32", "n": 5}, 400, "n", "invalid_value"),
        ({"prompt": "x", "size": "32x32", "n": 0}, 400, "n", "invalid_value"),
        ({"prompt": "x", "size": "32x32", "n": 11}, 400, "n", "invalid_value"),
        ({"size": "32x32"}, 400, "prompt", "missing_required_parameter"),
        ({"prompt": "  ", "size": "32x32"}, 400, "prompt", "invalid_value"),
        ({"prompt": "x", "size": "32x32", "response_format": "url"}, 400, "response_format",
         "unsupported_value"),
        ({"prompt": "x", "size": "32x32", "steps": 1000}, 400, "steps", "invalid_value"),
        ({"prompt": "x", "size": "32x32", "seed": -1}, 400, "seed", "invalid_value"),
        ({"prompt": "x", "size": "32x32", "model": "midjourney"}, 404, "model",
         "model_not_found"),
    ],
)
async def test_generation_bad_input(engine_url: str, body: dict, status: int, param: str,
                                    code: str) -> None:
    got, answer = await post_json(engine_url, body)
    assert got == status, answer
    error = answer["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"]


async def test_malformed_json_is_a_400(engine_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{engine_url}/v1/images/generations", data=b"{prompt:",
                                headers={"Content-Type": "application/json"}) as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "invalid_json"


def test_bad_size_through_the_client(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.images.generate(prompt="a tower", size="100x100")
    assert info.value.body["param"] == "size"
