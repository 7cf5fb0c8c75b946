"""The omni backend's dynamic batching, on a tiny random Qwen2.5-Omni thinker loaded through the
real ``engine.backends.omni.load``: concurrent text, image and audio requests share decode steps
and each gets the reply it gets alone (and the one transformers' own ``generate`` gives), with
every sampler, stop strings, cancellation, the bounded queue and per-request failures.

The shared tiny thinker (std 0.02 weights, rope theta 1e6) attends almost uniformly, so its
replies barely depend on positions. These tests load a copy whose queries are scaled up and
whose rope theta is small: attention is sharp and position-sensitive, so a wrong rope delta
changes the text (checked below), and batching must keep each row's 3-D positions right.

The same text, not the same bits: float32 matmuls on the CPU are not batch-invariant (a linear
layer on 1 row and on 6 rows differs by ~3e-7), so a row's logits in a batch differ from its
solo logits by ~2e-7 here, against a smallest top-2 gap of ~9e-4 in these replies. A real model
could, rarely, meet a near-tie that such a difference flips, as in any batched server.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5OmniThinkerForConditionalGeneration

from engine.backends import omni
from engine.batching import Delta, SequenceHandle
from engine.errors import APIError
from engine.registry import resolve_model
from engine.sampling import SamplingParams
from engine.settings import ChatSettings, EngineSettings
from tests.engine.conftest import RunningEngine, request
from tests.engine.test_chat_native import multimodal_messages, png_url

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SAMPLE_RATE = 16000
QUERY_SCALE = 40.0  # sharpens attention (the random queries are ~40x too small for that)
SHARP_ROPE_THETA = 100.0  # positions a few tokens apart rotate visibly apart
MAX_TOKENS = 24
ALL_SAMPLERS = {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                "frequency_penalty": 0.4, "presence_penalty": 0.3}


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def tone(seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def chat(text: str, images: int = 0, audios: int = 0) -> list[dict]:
    parts = [{"type": "image"}] * images + [{"type": "audio"}] * audios
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def sharp_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny thinker (tokenizer and processors included) with sharp attention."""
    cache = Path(os.environ["MASQUE_CACHE_DIR"])
    source = Path(resolve_model("tiny:omni", cache))
    target = tmp_path_factory.mktemp("omni") / "sharp"
    shutil.copytree(source, target)
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(target)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight *= QUERY_SCALE
            layer.self_attn.q_proj.bias *= QUERY_SCALE
    model.config.text_config.rope_parameters["rope_theta"] = SHARP_ROPE_THETA
    model.save_pretrained(target)
    return target


def load_backend(path: Path, **role: object) -> omni.OmniBackend:
    settings = EngineSettings(preset="offline", cache_dir=Path(os.environ["MASQUE_CACHE_DIR"]))
    return omni.load(ChatSettings(backend="omni", model=str(path), device="cpu", dtype="float32",
                                  **role), settings)


@pytest.fixture(scope="module")
def backend(sharp_model_path: Path) -> Iterator[omni.OmniBackend]:
    loaded = load_backend(sharp_model_path, max_batch=8)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def prompts(backend: omni.OmniBackend) -> dict[str, omni.OmniPrompt]:
    """Text only, an image, audio, both, two images (rope delta -4), and a longer text."""
    return {
        "text": backend.prepare(chat("Hello there, who are you?"), [], []),
        "image": backend.prepare(chat("What is in this picture?", images=1), [image(0)], []),
        "audio": backend.prepare(chat("What do you hear?", audios=1), [], [tone(2.0)]),
        "both": backend.prepare(chat("Both", images=1, audios=1), [image(1)], [tone(1.0, 220)]),
        "two images": backend.prepare(chat("Compare them.", images=2), [image(2), image(3)], []),
        "long text": backend.prepare(chat("Tell me a long story about the sea, the wind and "
                                          "the ships that sail on it at night."), [], []),
    }


async def run(backend: omni.OmniBackend, prompt: omni.OmniPrompt, started: asyncio.Event | None = None,
              **params: object) -> Delta:
    """One request to its end: the whole text, the token count and the finish reason.
    ``started`` is set once the request has streamed two deltas (it is decoding)."""
    return await collect(backend.submit(prompt, SamplingParams(**params)), started)


async def collect(handle: SequenceHandle, started: asyncio.Event | None = None) -> Delta:
    pieces, last = [], Delta("", 0)
    async for delta in handle:
        pieces.append(delta.text)
        last = delta
        if started is not None and len(pieces) == 2:
            started.set()
    return Delta("".join(pieces), last.tokens, last.finish_reason, last.error)


def generate_text(backend: omni.OmniBackend, prompt: omni.OmniPrompt, max_tokens: int) -> str:
    """transformers' own greedy ``generate`` (its own 3-D positions), up to the first end token."""
    with torch.inference_mode():
        out = backend.model.generate(**prompt.inputs, max_new_tokens=max_tokens, do_sample=False,
                                     repetition_penalty=1.0)
    ids = []
    for token in out[0, len(prompt):].tolist():
        if token in backend.batcher.eos_ids:
            break
        ids.append(token)
    return backend.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


async def staggered(backend: omni.OmniBackend, jobs: list[tuple[omni.OmniPrompt, dict]]) -> list[Delta]:
    """Run ``jobs`` concurrently: the first half at once (one prefill call), the rest each once
    the job before it is decoding, so they join a running batch of a different width."""
    started = [asyncio.Event() for _ in jobs]
    half = len(jobs) // 2

    async def job(i: int) -> Delta:
        if i > half:
            await started[i - 1].wait()
        prompt, params = jobs[i]
        return await run(backend, prompt, started[i], **params)

    return await asyncio.gather(*(job(i) for i in range(len(jobs))))


async def test_concurrent_greedy_replies_match_solo_and_generate(
    backend: omni.OmniBackend, prompts: dict[str, omni.OmniPrompt]
) -> None:
    greedy = {"max_tokens": MAX_TOKENS, "temperature": 0}
    solo = {name: await run(backend, prompt, **greedy) for name, prompt in prompts.items()}
    for name, prompt in prompts.items():
        assert solo[name].text == generate_text(backend, prompt, MAX_TOKENS), name
    assert sum(reply.tokens for reply in solo.values()) > 3 * MAX_TOKENS  # not all cut short

    # mixed budgets and a stop string: rows leave the batch at different steps
    stop = solo["image"].text[5:8]
    jobs = [(prompt, greedy) for prompt in prompts.values()]
    jobs += [(prompts["image"], {**greedy, "stop": (stop,)}), (prompts["both"], {**greedy, "max_tokens": 3})]
    backend.batcher.peak_batch = 0
    together = await staggered(backend, jobs)

    assert backend.peak_batch > 1
    assert [reply.text for reply in together[:len(prompts)]] == [reply.text for reply in solo.values()]
    stopped, short = together[len(prompts):]
    assert stopped.finish_reason == "stop" and stopped.text == solo["image"].text.split(stop)[0]
    assert short.finish_reason == "length" and short.tokens == 3
    assert solo["both"].text.startswith(short.text)
    assert backend.queue_depth() == 0


async def test_a_wrong_rope_delta_would_change_the_reply(
    backend: omni.OmniBackend, prompts: dict[str, omni.OmniPrompt], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The position checks above have teeth: text positions taken as plain offsets (delta 0)
    give another reply for the two-image prompt, whose delta is -4."""
    right = await run(backend, prompts["two images"], max_tokens=MAX_TOKENS, temperature=0)
    positions = backend.batcher._prompt_positions
    assert positions(prompts["two images"].inputs["input_ids"],
                     prompts["two images"].inputs["attention_mask"],
                     {"image_grid_thw": prompts["two images"].inputs["image_grid_thw"]})[1] == -4
    monkeypatch.setattr(backend.batcher, "_prompt_positions", lambda *args: (positions(*args)[0], 0))
    wrong = await run(backend, prompts["two images"], max_tokens=MAX_TOKENS, temperature=0)
    assert wrong.text != right.text


async def test_seeded_samplers_reproduce_alone_and_in_a_crowd(
    backend: omni.OmniBackend, prompts: dict[str, omni.OmniPrompt]
) -> None:
    seeded = {"max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 7, **ALL_SAMPLERS}
    first = await run(backend, prompts["both"], **seeded)
    assert first.text and (await run(backend, prompts["both"], **seeded)).text == first.text
    assert (await run(backend, prompts["both"], **{**seeded, "seed": 8})).text != first.text
    crowd = await staggered(backend, [
        (prompts["text"], {"max_tokens": MAX_TOKENS, "temperature": 0}),
        (prompts["image"], {"max_tokens": MAX_TOKENS, "temperature": 0.8, "seed": 1, "top_k": 5}),
        (prompts["both"], seeded),
        (prompts["audio"], {"max_tokens": MAX_TOKENS, "temperature": 0, "repetition_penalty": 1.3}),
    ])
    assert crowd[2].text == first.text


async def test_a_cancelled_request_frees_its_slot(sharp_model_path: Path,
                                                  prompts: dict[str, omni.OmniPrompt]) -> None:
    small = load_backend(sharp_model_path, max_batch=2, max_queue=2)
    small.batcher.eos_ids = set()  # the long requests run until cancelled
    endless = {"max_tokens": 1500, "temperature": 0}
    try:
        first = small.submit(prompts["image"], SamplingParams(**endless))
        second = small.submit(prompts["audio"], SamplingParams(**endless))
        await first.__anext__()
        with pytest.raises(APIError) as refused:
            small.submit(prompts["text"], SamplingParams(max_tokens=4))
        assert refused.value.status == 503
        first.cancel()
        for _ in range(200):  # the batch drops the row at its next step
            if small.queue_depth() < 2:
                break
            await asyncio.sleep(0.01)
        assert small.queue_depth() == 1
        reply = await run(small, prompts["text"], max_tokens=4, temperature=0)
        assert reply.finish_reason == "length" and reply.tokens == 4
        second.cancel()
        for _ in range(200):
            if small.queue_depth() == 0:
                break
            await asyncio.sleep(0.01)
        assert small.queue_depth() == 0
    finally:
        small.close()


async def test_a_failing_request_spares_the_others(
    backend: omni.OmniBackend, prompts: dict[str, omni.OmniPrompt], monkeypatch: pytest.MonkeyPatch
) -> None:
    greedy = {"max_tokens": MAX_TOKENS, "temperature": 0}
    solo = [await run(backend, prompts[name], **greedy) for name in ("text", "both")]
    inputs = prompts["image"].inputs
    # half the image's patches: the vision encoder gives fewer features than placeholders
    broken = omni.OmniPrompt({**inputs, "pixel_values": inputs["pixel_values"][: len(inputs["pixel_values"]) // 2]})
    sizes: list[int] = []
    prefill = backend.batcher._prefill
    monkeypatch.setattr(backend.batcher, "_prefill", lambda seqs: sizes.append(len(seqs)) or prefill(seqs))
    # queued back to back (no await between), so the worker takes all three in one prefill call,
    # where the broken one runs between the two good ones
    handles = [backend.submit(prompt, SamplingParams(**greedy))
               for prompt in (prompts["text"], broken, prompts["both"])]
    together = [await collect(handle) for handle in handles]
    assert sizes == [3]
    assert together[1].finish_reason == "error" and together[1].error
    assert [together[0].text, together[2].text] == [reply.text for reply in solo]
    assert backend.queue_depth() == 0


async def test_prepare_text_is_a_raw_prompt(backend: omni.OmniBackend) -> None:
    prompt = backend.prepare_text("Once upon a time")
    ids = backend.tokenizer("Once upon a time")["input_ids"]
    assert prompt.inputs["input_ids"][0].tolist() == ids and len(prompt) == len(ids)
    assert set(prompt.inputs) == {"input_ids", "attention_mask"}  # no template, no media
    reply = await run(backend, prompt, max_tokens=5, temperature=0)
    assert reply.tokens > 0 and reply.finish_reason in {"stop", "length"}


async def test_concurrent_http_requests_share_the_batch(native_engine: RunningEngine) -> None:
    """Through the server: a long streamed reply is decoding while text, image and audio
    requests arrive; all share its steps and each reply is the one it gets alone."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{native_engine.url}/v1", api_key="unused",
                                max_retries=0, timeout=120)
    backend = native_engine.registry.get("chat")
    audio = multimodal_messages()[0]["content"][1]
    requests = [
        [{"role": "user", "content": "Hello there."}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(3)}},
                                      {"type": "text", "text": "And this?"}]}],
        [{"role": "user", "content": [audio, {"type": "text", "text": "Listen."}]}],
    ]
    long_ask = multimodal_messages(1)

    async def reply(messages: list[dict], max_tokens: int = 16) -> tuple[str, int]:
        out = await client.chat.completions.create(
            model="masque-omni", messages=messages, max_tokens=max_tokens, temperature=0)
        return out.choices[0].message.content, out.usage.completion_tokens

    async def streamed(decoding: asyncio.Event) -> tuple[str, int]:
        stream = await client.chat.completions.create(
            model="masque-omni", messages=long_ask, max_tokens=400, temperature=0, stream=True,
            stream_options={"include_usage": True})
        pieces, tokens = [], 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                decoding.set()
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return "".join(pieces), tokens

    async def crowd() -> list[tuple[str, int]]:
        await decoding.wait()
        return await asyncio.gather(*(reply(messages) for messages in requests))

    try:
        alone = [await reply(messages) for messages in requests]
        long_alone = await reply(long_ask, 400)
        assert long_alone[1] == 400  # the tiny model never ends it: it is still decoding below
        decoding = asyncio.Event()
        long_together, together = await asyncio.gather(streamed(decoding), crowd())
        assert together == alone
        assert long_together == long_alone
        assert backend.peak_batch > 1
    finally:
        await client.close()
    scraped = (await request("GET", f"{native_engine.url}/metrics")).body
    for name in ("masque_queue_wait_seconds_count", "masque_time_per_output_token_seconds_count",
                 "masque_batch_size_steps_count"):
        assert float(scraped.split(name + '{role="chat"} ')[1].split()[0]) >= 8, name
