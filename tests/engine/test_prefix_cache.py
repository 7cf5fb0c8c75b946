"""The offline chat path as it is served: SmolLM2 in the lean decoder (int8 prompts, 4-bit decode
steps) with the per-row attention and the prefix cache, loaded by the real loading code. Batching
and prefix reuse never change a greedy reply; the cache keeps to its memory bound; /metrics
reports its hits."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch

from engine.backends import llm
from engine.batching import PREFILL_CHUNK
from engine.lean import GrowingLayer, LeanDecoder
from engine.prefix_cache import MIN_REUSE_TOKENS, PrefixCache, common_prefix
from engine.quantize import Int4Linear, Int8Linear, PackedInt8Linear
from engine.registry import resolve_model
from engine.sampling import SamplingParams
from engine.settings import EngineSettings
from tests.engine.conftest import offline_settings, request

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SYSTEM = ("You are Wren Halloway, the keeper of a lighthouse on a storm-beaten island. You speak "
          "plainly, you notice the sea, and you never break character. ") * 6


@pytest.fixture(scope="module")
def settings() -> EngineSettings:
    return offline_settings()


@pytest.fixture(scope="module")
def backend(settings: EngineSettings):  # noqa: ANN201 - an llm.LLMBackend
    role = settings.chat.model_copy(update={
        "model": resolve_model(settings.chat.model, Path(settings.cache_dir)),
        "max_batch": 8,
    })
    loaded = llm.load(role, settings)
    yield loaded
    loaded.close()


async def reply(backend, prompt: list[int], max_tokens: int = 24) -> str:  # noqa: ANN001
    pieces = []
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    async for delta in backend.submit(prompt, params):
        assert delta.finish_reason != "error", delta.error
        pieces.append(delta.text)
    return "".join(pieces)


def chat(backend, *turns: str) -> list[int]:  # noqa: ANN001
    messages = [{"role": "system", "content": SYSTEM}]
    for index, text in enumerate(turns):
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": text})
    return backend.prepare(messages, [], [])


def test_int8_linear_is_close_to_float_and_independent_of_the_batch() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 1536)
    quantised = Int8Linear(linear)
    rows = torch.randn(8, 576) * 3
    exact = linear(rows)
    together = quantised(rows)
    alone = torch.cat([quantised(rows[i:i + 1]) for i in range(8)])
    assert torch.equal(together, alone)  # bit for bit, whatever shares the call
    assert (together - exact).abs().max() < 0.02 * exact.abs().max()


def test_int4_linear_keeps_q4_1_weights_and_is_independent_of_the_batch() -> None:
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (1536, 576 // 32, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15  # every block uses its whole range, as GGUF's quantiser makes it
    scale = torch.rand(1536, 576 // 32, 1) * 0.004 + 0.001
    low = -torch.rand(1536, 576 // 32, 1) * 0.03
    linear = torch.nn.Linear(576, 1536)
    linear.weight.data = (codes * scale + low).reshape(1536, 576)  # a Q4_1 tensor, dequantised
    quantised = Int4Linear(linear)
    rows = torch.randn(8, 576) * 3
    exact = linear(rows)
    together = quantised(rows)
    alone = torch.cat([quantised(rows[i:i + 1]) for i in range(8)])
    assert torch.equal(together, alone)
    # bfloat16 activations and scales: ~0.5% of the largest output, where re-quantising the codes
    # to other 4-bit groups would be off by several percent
    assert (together - exact).abs().max() < 0.01 * exact.abs().max()


def test_the_offline_model_is_served_by_the_lean_decoder(backend) -> None:  # noqa: ANN001
    assert isinstance(backend.model, LeanDecoder) and backend.model.decode_int4
    int8 = [m for m in backend.model.modules() if isinstance(m, Int8Linear)]
    int4 = [m for m in backend.model.modules() if isinstance(m, Int4Linear)]
    packed = [m for m in backend.model.modules() if isinstance(m, PackedInt8Linear)]
    # prompts: qkv, o, gate+up, down in 30 layers and the output layer, int8 prepacked for FBGEMM
    assert not int8 and len(packed) == 30 * 4 + 1
    assert len(int4) == 30 * 3  # decode steps: qkv, o and down in 4 bits, gate+up the prompts' int8
    assert all(layer.decode.gate_up is layer.prefill.gate_up for layer in backend.model.layers)
    assert isinstance(backend.model.lm_head, PackedInt8Linear)
    assert not any(isinstance(m, torch.nn.Linear) for m in backend.model.modules())


async def test_the_lean_decoder_writes_what_transformers_writes(backend, settings) -> None:  # noqa: ANN001
    """The same weights through transformers' own forward (int8 linears, per-row attention)
    give the same greedy text: the lean decoder changes the speed, not the model."""
    from engine import lean

    role = backend.role.model_copy(update={"prefix_cache_mb": 0, "quantize": "int8"})
    lean_int8 = llm.load(role, settings)  # int8 everywhere: what transformers' forward can run
    kept = set(lean.SUPPORTED)
    lean.SUPPORTED.clear()
    try:
        general = llm.load(role, settings)
    finally:
        lean.SUPPORTED.update(kept)
    try:
        assert not isinstance(general.model, LeanDecoder) and not lean_int8.model.decode_int4
        for question in ("Who keeps the light?", "Tell me a story about the sea and the storm."):
            prompt = chat(backend, question)
            assert await reply(lean_int8, prompt, 32) == await reply(general, prompt, 32)
    finally:
        general.close()
        lean_int8.close()


def test_the_growing_cache_appends_in_place_and_takes_assigned_rows() -> None:
    layer = GrowingLayer()
    first = torch.randn(2, 3, 5, 4)
    keys, _ = layer.update(first, first.clone())
    assert torch.equal(keys, first) and layer.get_seq_length() == 5
    storage = layer._k.data_ptr()  # noqa: SLF001
    step = torch.randn(2, 3, 1, 4)
    keys, values = layer.update(step, step.clone())
    assert layer._k.data_ptr() == storage  # written into the spare room, not copied  # noqa: SLF001
    assert torch.equal(keys, torch.cat([first, step], dim=2)) and values.shape[2] == 6
    layer.keys, layer.values = keys[1:], values[1:]  # the batcher dropping a row
    assert layer.get_seq_length() == 6 and layer.keys.shape[0] == 1
    # the batcher pads keys first, then values (reading values after keys changed length)
    layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, 3, 0))
    layer.values = torch.nn.functional.pad(layer.values, (0, 0, 3, 0))
    assert layer.keys.shape == layer.values.shape == (1, 3, 9, 4)
    assert torch.equal(layer.values[:, :, 3:], values[1:])
    layer.keys = layer.keys[:, :, 2:]
    layer.values = layer.values[:, :, 2:]  # trimming, the same way
    keys, values = layer.update(step[:1], step[:1].clone())
    assert keys.shape == values.shape == (1, 3, 8, 4)
    assert torch.equal(values[:, :, 1:7], torch.cat([first, step], dim=2)[1:])


async def test_batch_of_eight_gives_each_prompt_its_solo_text(backend) -> None:  # noqa: ANN001
    questions = ["Hi", "What is that light out on the water tonight?", "Tell me about the storm.",
                 "Who are you?", "Is the boat coming back before the tide turns, keeper?",
                 "Describe the lamp room.", "Sing me a sea shanty.", "Why do gulls circle?"]
    prompts = [chat(backend, q) for q in questions]
    assert len({len(p) for p in prompts}) > 4  # different lengths: rows are padded differently
    cache, backend.batcher.prefix_cache = backend.batcher.prefix_cache, None
    try:
        solo = [await reply(backend, p) for p in prompts]
        peak = backend.batcher.peak_batch
        together = await asyncio.gather(*(reply(backend, p) for p in prompts))
    finally:
        backend.batcher.prefix_cache = cache
    assert backend.batcher.peak_batch > max(peak, 4)
    assert together == solo


async def test_prompts_admitted_together_run_in_one_call_and_keep_their_solo_text(
        backend, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """Eight prompts admitted in one step run their chunks in one model call per chunk (the
    linear layers on all their tokens, attention per prompt); each still gets its solo greedy
    text, with the prefix cache on and off. The prompts are one to three chunks long; with the
    cache, those sharing the card's first chunk with an earlier one wait for it and reuse it."""
    batcher = backend.batcher
    questions = ["Hi", "What is that light out on the water tonight?", "Who are you?",
                 "Tell me about the storm. " * 20, "Describe the lamp room.", "Hi",
                 "Is the boat coming back before the tide turns, keeper? " * 12, "Why do gulls circle?"]
    prompts = [chat(backend, q) for q in questions]
    prompts[1] = prompts[1][-60:]  # no card: shares no chunk with the others
    chunks = [(len(p) - 1) // PREFILL_CHUNK + 1 for p in prompts]
    assert sorted(set(chunks)) == [1, 2, 3]
    cache = batcher.prefix_cache
    batcher.prefix_cache = None
    try:
        solo = [await reply(backend, p) for p in prompts]
    finally:
        batcher.prefix_cache = cache
    calls: list[int] = []
    run_chunks = batcher.model.prefill_chunks

    def counted(chunks: list) -> torch.Tensor:  # noqa: ANN001
        calls.append(len(chunks))
        return run_chunks(chunks)

    monkeypatch.setattr(batcher.model, "prefill_chunks", counted)
    take = batcher._take  # noqa: SLF001
    queued = threading.Event()

    def held(room: int, block: bool) -> list:
        queued.wait()  # all eight are queued before the worker admits any
        return take(room, block)

    monkeypatch.setattr(batcher, "_take", held)
    for prefix_cache in (None, cache):
        batcher.prefix_cache, calls[:] = prefix_cache, []
        queued.clear()
        try:
            handles = [backend.submit(p, SamplingParams(max_tokens=24, temperature=0)) for p in prompts]
            queued.set()
            together = [await text_of(handle) for handle in handles]
        finally:
            batcher.prefix_cache = cache
        assert together == solo
        if prefix_cache is None:  # every prompt's k-th chunk in the k-th call
            assert calls == [sum(n > k for n in chunks) for k in range(3)]
        else:  # the first card and the card-less prompt, then the rest after the card's chunk
            rest = [n - 1 for row, n in enumerate(chunks) if row > 1]
            assert calls == [2, 1] + [sum(n > k for n in rest) for k in range(max(rest))], calls


async def text_of(handle) -> str:  # noqa: ANN001
    pieces = []
    async for delta in handle:
        assert delta.finish_reason != "error", delta.error
        pieces.append(delta.text)
    return "".join(pieces)


async def test_rows_joining_and_leaving_mid_flight_keep_their_solo_text(backend) -> None:  # noqa: ANN001
    """Rows of different lengths join a running batch (left-padding the cache), finish at
    different steps (trimming it) and leave: each text is still the solo text."""
    prompts = [chat(backend, q) for q in ("Hi", "Tell me about the storm that sank the Mary Ellen.",
                                          "What is that bell?")]
    solo = [await reply(backend, p, 20) for p in prompts]
    short = await reply(backend, prompts[2], 3)

    async def later(prompt: list[int], tokens: int, delay: float) -> str:
        await asyncio.sleep(delay)
        return await reply(backend, prompt, tokens)

    texts = await asyncio.gather(later(prompts[0], 20, 0), later(prompts[1], 20, 0.15),
                                 later(prompts[2], 3, 0.3), later(prompts[2], 20, 0.45))
    assert texts == [solo[0], solo[1], short, solo[2]]


async def test_a_story_turn_reuses_the_last_prompt_and_gives_the_cold_text(backend) -> None:  # noqa: ANN001
    cache = backend.batcher.prefix_cache
    turns = ["The fog is thick tonight. Do you hear the bell?"]
    for _ in range(3):
        prompt = chat(backend, *turns)
        before = (cache.stats.hits, cache.stats.reused_tokens)
        warm = await reply(backend, prompt)
        hits, reused = cache.stats.hits - before[0], cache.stats.reused_tokens - before[1]
        backend.batcher.prefix_cache = None
        try:
            cold = await reply(backend, prompt)
        finally:
            backend.batcher.prefix_cache = cache
        assert warm == cold
        if len(turns) > 1:  # every turn after the first starts with the last turn's prompt
            assert hits == 1 and reused >= len(prompt) - 128 - 60
        turns += [warm, "And then? Tell me what happens next, keeper."]


async def test_regenerate_reuses_all_but_the_last_chunk(backend) -> None:  # noqa: ANN001
    prompt = chat(backend, "Light the lamp, Wren. " * 12)
    first = await reply(backend, prompt)
    started = time.perf_counter()
    again = await reply(backend, prompt)
    assert again == first
    reused = backend.batcher.prefix_cache.stats.reused_tokens
    assert reused >= (len(prompt) - 1) // 128 * 128 > 0, (time.perf_counter() - started)


def tensors(tokens: int, size: int = 1024) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One layer's keys and values for ``tokens`` tokens, ``size`` bytes per token each."""
    return [torch.zeros(1, 1, tokens, size // 4)], [torch.zeros(1, 1, tokens, size // 4)]


def test_the_cache_keeps_to_its_bound_least_recent_out() -> None:
    cache = PrefixCache(max_bytes=3 * 2 * 100 * 1024)  # three 100-token prompts
    stories = [[story] * 100 for story in range(1, 5)]
    for tokens in stories[:3]:
        cache.store(tokens, *tensors(100))
    assert len(cache) == 3 and cache.nbytes == cache.max_bytes
    assert cache.lookup(stories[0] + [9])[0] == 100  # story 1 is now the most recent
    cache.store(stories[3], *tensors(100))  # evicts story 2, the least recent
    assert cache.nbytes <= cache.max_bytes and cache.stats.evictions == 1
    assert cache.lookup(stories[1] + [9]) == (0, None)
    assert cache.lookup(stories[0] + [9])[0] == 100
    cache.store(list(range(1000)), *tensors(1000))  # larger than the whole bound: not kept
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes


def test_a_longer_prompt_replaces_its_own_prefix_and_reuse_is_aligned() -> None:
    cache = PrefixCache(max_bytes=10 * 2**20)
    turn = list(range(300))
    cache.store(turn, *tensors(300))
    cache.store(turn + list(range(1000, 1150)), *tensors(450))
    assert len(cache) == 1  # the shorter one could serve nothing the longer cannot
    reuse, _ = cache.lookup(turn + list(range(1000, 1100)) + [5, 6], align=128)
    assert reuse == 384 and reuse % 128 == 0
    assert cache.lookup(list(range(MIN_REUSE_TOKENS - 1)) + [7]) == (0, None)  # too short
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2


async def test_metrics_report_prefix_hits_and_serving_histograms(backend, settings) -> None:  # noqa: ANN001
    from engine.metrics import Metrics

    metrics = Metrics()
    backend.attach_metrics(metrics)
    try:
        prompt = chat(backend, "Ring the bell twice for the fishermen. " * 8)
        await reply(backend, prompt)
        await reply(backend, prompt)
    finally:
        backend.batcher.metrics = None
    text = metrics.render(None).decode()
    hits = float(text.split('masque_prefix_cache_hits_tokens_total{role="chat"} ')[1].split()[0])
    assert hits >= 128
    assert 'masque_prefix_cache_hit_ratio{role="chat"}' in text
    assert 'masque_time_per_output_token_seconds_count{role="chat"} 2.0' in text
    assert 'masque_queue_wait_seconds_count{role="chat"} 2.0' in text
    assert 'masque_batch_size_steps_bucket{le="1.0",role="chat"}' in text


async def test_engine_metrics_endpoint_shows_the_prefix_cache(engine_url: str) -> None:
    body = {"model": "masque-chat", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": "Good evening, keeper."}]}
    for _ in range(2):
        assert (await request("POST", f"{engine_url}/v1/chat/completions", body=body)).status == 200
    scraped = await request("GET", f"{engine_url}/metrics")
    assert scraped.status == 200
    text = scraped.body
    assert "masque_prefix_cache_hits_tokens_total" in text
    assert "masque_time_to_first_token_seconds_count" in text
