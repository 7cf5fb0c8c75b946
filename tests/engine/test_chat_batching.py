"""The pieces of the dynamic batcher: text streaming with stop strings, per-row sampling, and
the batch itself on the real SmolLM2 (joining, leaving and matching solo decoding)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from engine.batching import Batcher, SamplingParams, TextStream, sample_rows
from engine.tiny import fast_tokenizer, train_bpe

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201 - a transformers tokenizer
    return fast_tokenizer(train_bpe(300, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))


def stream_all(tokenizer, text: str, stop: tuple[str, ...]) -> tuple[list[str], bool]:  # noqa: ANN001
    """Feed ``text`` token by token; return the pieces sent and whether a stop string hit."""
    ids = tokenizer(text)["input_ids"]
    stream, pieces = TextStream(tokenizer, stop), []
    for end in range(1, len(ids) + 1):
        piece, stopped = stream.add(ids[:end])
        pieces.append(piece)
        if stopped:
            return pieces, True
    pieces.append(stream.flush())
    return pieces, False


def test_text_stream_rebuilds_the_text(tokenizer) -> None:  # noqa: ANN001
    text = "The quick brown fox jumps over the lazy dog."
    pieces, stopped = stream_all(tokenizer, text, ())
    assert "".join(pieces) == text and not stopped
    assert sum(1 for piece in pieces if piece) > 3  # streamed, not at the end


def test_text_stream_stops_and_never_leaks_the_stop_string(tokenizer) -> None:  # noqa: ANN001
    pieces, stopped = stream_all(tokenizer, "Hello, how are you today? I am fine.", ("you to",))
    assert stopped
    assert "".join(pieces) == "Hello, how are "
    assert all("you" not in piece for piece in pieces)  # a partial stop was held back


def test_text_stream_releases_a_false_alarm(tokenizer) -> None:  # noqa: ANN001
    pieces, stopped = stream_all(tokenizer, "A picture of a cat.", ("a dog",))
    assert not stopped and "".join(pieces) == "A picture of a cat."


def test_sample_rows_mixes_greedy_seeded_and_top_p() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.5]] * 3)
    params = [SamplingParams(4, temperature=0), SamplingParams(4, temperature=1.0, seed=1),
              SamplingParams(4, temperature=5.0, top_p=0.4)]
    gens = [None, torch.Generator().manual_seed(7), torch.Generator().manual_seed(3)]
    first = sample_rows(logits.clone(), params, gens)
    assert first[0] == 1  # greedy row
    gens[1] = torch.Generator().manual_seed(7)
    assert sample_rows(logits.clone(), params, gens)[1] == first[1]  # same seed, same token
    # at temperature 5 the best token holds 45% of the mass: top_p=0.4 keeps it alone
    picks = {int(sample_rows(logits.clone(), params, [None, None, None])[2]) for _ in range(30)}
    assert picks == {1}


@pytest.fixture(scope="module")
def smollm(engine_settings):  # noqa: ANN001, ANN201
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.backends.llm import locate_checkpoint
    from engine.registry import resolve_model

    role = engine_settings.chat.model_copy(update={
        "model": resolve_model(engine_settings.chat.model, Path(engine_settings.cache_dir)),
    })
    path = locate_checkpoint(role, Path(engine_settings.cache_dir))
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


async def run(batcher: Batcher, prompt: list[int], **kw) -> tuple[str, str | None]:  # noqa: ANN003
    pieces, finish = [], None
    async for delta in batcher.submit(prompt, SamplingParams(**kw)):
        pieces.append(delta.text)
        finish = delta.finish_reason
    return "".join(pieces), finish


async def test_batched_greedy_matches_solo_and_rows_join_and_leave(smollm) -> None:  # noqa: ANN001
    model, tok = smollm
    prompts = [tok(text)["input_ids"] for text in
               ("Once upon a time", "The pirate ship sailed into the harbour at dawn and", "Hi")]
    batcher = Batcher(model, tok, max_batch=4, max_queue=8, eos_ids=set())  # never stops early
    try:
        solo = [await run(batcher, p, max_tokens=12, temperature=0) for p in prompts]
        # different lengths and budgets: rows join mid-flight and leave at different steps
        together = await asyncio.gather(
            run(batcher, prompts[0], max_tokens=12, temperature=0),
            run(batcher, prompts[1], max_tokens=12, temperature=0),
            run(batcher, prompts[2], max_tokens=3, temperature=0),
            run(batcher, prompts[2], max_tokens=12, temperature=0),
        )
        assert batcher.peak_batch >= 2
        texts = [text for text, _ in together]
        assert [texts[0], texts[1], texts[3]] == [solo[0][0], solo[1][0], solo[2][0]]
        assert solo[2][0].startswith(texts[2]) and len(texts[2]) < len(solo[2][0])
        assert {f for _, f in together} == {"length"}
        assert batcher.depth() == 0
    finally:
        batcher.close()


async def test_a_failing_prompt_ends_in_error_and_spares_the_batch(smollm) -> None:  # noqa: ANN001
    model, tok = smollm
    batcher = Batcher(model, tok, max_batch=4, max_queue=8, eos_ids=set())
    try:
        good = asyncio.create_task(run(batcher, tok("Once upon a time")["input_ids"],
                                       max_tokens=16, temperature=0))
        await asyncio.sleep(0.3)  # let it start decoding
        bad_ids = [model.config.vocab_size + 10]  # no such token: the embedding lookup fails
        deltas = [delta async for delta in batcher.submit(bad_ids, SamplingParams(4))]
        assert deltas[-1].finish_reason == "error" and deltas[-1].error
        text, finish = await good
        assert finish == "length" and text
        assert batcher.depth() == 0
    finally:
        batcher.close()
