"""Per-request samplers: repetition, frequency and presence penalties, top-k and min-p.

First the maths on hand-made logits, then the batcher on the real SmolLM2 (a row's penalties
follow it as others join and leave), then the HTTP API (raw requests and the official openai
client), then the omni backend (the same batcher with its own prefill and decode)."""

from __future__ import annotations

import asyncio
import math

import openai
import pytest
import torch

from engine.batching import Batcher
from engine.sampling import SamplingParams, TokenHistory, filter_row, penalise, sample_rows
from tests.engine.conftest import RunningEngine, make_client, request
from tests.engine.test_chat_batching import run, smollm  # noqa: F401 - smollm is a fixture

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MODEL = "masque-chat"
# a prompt SmolLM2 answers greedily by repeating the same seven words until it runs out
REPEATER = [{"role": "user", "content": "List the days of the week, again and again."}]
ALL_SAMPLERS = {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                "frequency_penalty": 0.4, "presence_penalty": 0.3}


def history(prompt: list[int], output: list[int], vocab: int = 4) -> TokenHistory:
    return TokenHistory.count([(prompt, output)], vocab)


# -- the maths ---------------------------------------------------------------------------------

def test_neutral_values_leave_logits_bit_equal() -> None:
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    logits[0, 3] = float("-inf")
    seen = history([1, 2, 3], [4, 4, 5], vocab=50)
    assert torch.equal(penalise(logits, [SamplingParams(1)], seen), logits)
    row = logits[0].clone()
    assert torch.equal(filter_row(row.clone(), SamplingParams(1)), row)
    # and sample_rows leaves its input alone, penalties or not
    before = logits.clone()
    sample_rows(logits, [SamplingParams(1, temperature=0, frequency_penalty=1.0)], [None], seen)
    assert torch.equal(logits, before)


def test_repetition_penalty_lowers_seen_tokens_of_either_sign() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = history(prompt=[0], output=[1])  # 0 only in the prompt, 1 only in the output
    out = penalise(logits, [SamplingParams(1, repetition_penalty=2.0)], seen)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]  # positive divided, negative multiplied
    before, after = logits.softmax(-1)[0], out.softmax(-1)[0]
    assert after[0] < before[0] and after[1] < before[1]  # both seen tokens lose mass
    assert after[2] > before[2] and after[3] > before[3]  # the unseen ones gain it


def test_frequency_scales_with_the_count_and_presence_is_flat() -> None:
    logits = torch.zeros(1, 4)
    seen = history(prompt=[3], output=[0, 0, 0, 1])  # prompt tokens do not count for these two
    freq = penalise(logits, [SamplingParams(1, frequency_penalty=0.5)], seen)
    assert freq.tolist() == [[-1.5, -0.5, 0.0, 0.0]]
    pres = penalise(logits, [SamplingParams(1, presence_penalty=0.5)], seen)
    assert pres.tolist() == [[-0.5, -0.5, 0.0, 0.0]]
    # negative values encourage repetition instead
    assert penalise(logits, [SamplingParams(1, presence_penalty=-1.0)], seen)[0, 0] == 1.0


def test_penalties_match_vllms_whole_vocabulary_formula_bit_for_bit() -> None:
    rng = torch.Generator().manual_seed(5)
    vocab, rows = 300, 3
    logits = torch.randn(rows, vocab, generator=rng) * 4
    outputs = [torch.randint(vocab, (n,), generator=rng).tolist() for n in (0, 7, 40)]
    prompts = [torch.randint(vocab, (n,), generator=rng).tolist() for n in (20, 0, 60)]
    tokens = TokenHistory.count(list(zip(prompts, outputs, strict=True)), vocab)
    params = [SamplingParams(1, repetition_penalty=1.3, frequency_penalty=0.2, presence_penalty=-0.7),
              SamplingParams(1),  # a neutral row sharing the call
              SamplingParams(1, repetition_penalty=0.8, frequency_penalty=1.5, presence_penalty=0.4)]
    # vLLM's apply_penalties, over the whole vocabulary
    repetition = torch.tensor([[p.repetition_penalty] for p in params]).repeat(1, vocab)
    repetition[~tokens.seen] = 1.0
    expected = torch.where(logits > 0, logits / repetition, logits * repetition)
    expected -= torch.tensor([[p.frequency_penalty] for p in params]) * tokens.counts
    expected -= torch.tensor([[p.presence_penalty] for p in params]) * (tokens.counts > 0)
    assert torch.equal(penalise(logits, params, tokens), expected)
    assert torch.equal(penalise(logits, params, tokens)[1], logits[1])


def test_top_k_keeps_exactly_k() -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(1))
    kept = filter_row(logits.clone(), SamplingParams(1, top_k=5)).isfinite()
    assert kept.sum() == 5 and set(kept.nonzero().flatten().tolist()) == set(logits.topk(5).indices.tolist())
    assert filter_row(torch.zeros(10), SamplingParams(1, top_k=3)).isfinite().sum() == 3  # ties too
    assert filter_row(logits.clone(), SamplingParams(1, top_k=0)).isfinite().all()  # 0 = off
    assert filter_row(logits.clone(), SamplingParams(1, top_k=500)).isfinite().all()  # k >= vocab


def test_min_p_drops_tokens_below_its_share_of_the_best() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = filter_row(logits.clone(), SamplingParams(1, min_p=0.2)).isfinite()  # floor 0.1
    assert kept.tolist() == [True, True, True, False]
    kept = filter_row(logits.clone(), SamplingParams(1, min_p=0.7)).isfinite()  # floor 0.35
    assert kept.tolist() == [True, False, False, False]
    probs = filter_row(logits.clone(), SamplingParams(1, min_p=0.2)).softmax(-1)
    assert math.isclose(float(probs[0]), 0.5 / 0.95, rel_tol=1e-5)  # the rest renormalised


def test_penalties_move_the_greedy_argmax() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0, -1.0]])
    seen = history(prompt=[], output=[0, 0])
    greedy = [None]
    assert sample_rows(logits, [SamplingParams(1, temperature=0)], greedy) == 0
    for penalty in ({"frequency_penalty": 0.5}, {"presence_penalty": 0.6},
                    {"repetition_penalty": 1.5}):
        params = [SamplingParams(1, temperature=0, **penalty)]
        assert sample_rows(logits, params, greedy, seen) == 1, penalty
    with pytest.raises(ValueError, match="TokenHistory"):
        sample_rows(logits, [SamplingParams(1, temperature=0, presence_penalty=1.0)], greedy)


def test_mixed_batch_gives_each_row_its_own_treatment() -> None:
    vocab = 64
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(2)).repeat(5, 1)
    best = int(logits[0].argmax())
    params = [
        SamplingParams(1, temperature=0),  # plain greedy
        SamplingParams(1, temperature=0, frequency_penalty=100.0),  # greedy, best token banned
        SamplingParams(1, temperature=1.0, top_k=1),  # sampled, but only one token survives
        SamplingParams(1, temperature=1.0, seed=3, min_p=0.5, repetition_penalty=1.3),
        SamplingParams(1, temperature=1.0, seed=4),  # plain sampling
    ]
    outputs = [[], [best], [], [best], []]
    rows = TokenHistory.count([([], out) for out in outputs], vocab)

    def generators() -> list[torch.Generator | None]:
        return [None, None, None, torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]

    together = sample_rows(logits, params, generators(), rows).tolist()
    assert together[0] == best and together[1] != best and together[2] == best
    # each row alone (its own history row, its own generator) picks what it picked in the crowd
    for row in range(5):
        alone = sample_rows(logits[row:row + 1], params[row:row + 1], generators()[row:row + 1],
                            rows.select(torch.tensor([row])))
        assert int(alone) == together[row], row


# -- the batcher -------------------------------------------------------------------------------

async def test_penalties_follow_their_row_as_others_join_and_leave(smollm) -> None:  # noqa: ANN001, F811
    model, tok = smollm
    prompts = [tok(text)["input_ids"] for text in
               ("Monday, Tuesday, Monday, Tuesday,", "Once upon a time", "The sea, the sea, the")]
    jobs = [  # (prompt, settings): penalised and plain rows of different lengths
        (prompts[0], {"max_tokens": 40, "frequency_penalty": 1.0}),
        (prompts[2], {"max_tokens": 8, "repetition_penalty": 1.3, "presence_penalty": 0.5}),
        (prompts[1], {"max_tokens": 24}),
        (prompts[2], {"max_tokens": 16, "frequency_penalty": 0.7}),
    ]
    batcher = Batcher(model, tok, max_batch=4, max_queue=8, eos_ids=set())
    try:
        solo = [await run(batcher, prompt, temperature=0, **kw) for prompt, kw in jobs]
        plain = await run(batcher, prompts[0], max_tokens=40, temperature=0)
        assert plain != solo[0]  # the penalty matters for this prompt
        streaming = [asyncio.Event() for _ in jobs]

        async def join(i: int) -> tuple[str, str | None]:
            """Job i, started once job i-1 has streamed a few deltas: each joins a batch that
            has been decoding for a few steps."""
            if i:
                await streaming[i - 1].wait()
            prompt, kw = jobs[i]
            pieces, finish = [], None
            async for delta in batcher.submit(prompt, SamplingParams(temperature=0, **kw)):
                pieces.append(delta.text)
                finish = delta.finish_reason
                if len(pieces) == 3 or finish:
                    streaming[i].set()
            return "".join(pieces), finish

        # a penalised row alone; a penalised one joins (the histories are concatenated); a
        # plain one joins (the batch counts every row's history afresh); a penalised one joins
        # (concatenated again); the short one leaves (the history rows are selected)
        together = await asyncio.gather(*(join(i) for i in range(len(jobs))))
        assert batcher.peak_batch == 4
        assert together == solo
        assert batcher.depth() == 0
    finally:
        batcher.close()


# -- the HTTP API ------------------------------------------------------------------------------

async def chat(url: str, **body: object) -> dict:
    reply = await request("POST", f"{url}/v1/chat/completions",
                          body={"model": MODEL, "messages": REPEATER, **body})
    assert reply.status == 200, reply.body
    return reply.body


def text_of(body: dict) -> str:
    return body["choices"][0]["message"]["content"]


async def test_seeded_samplers_reproduce_alone_and_in_a_crowd(engine_url: str) -> None:
    body = {"temperature": 1.0, "seed": 7, "max_tokens": 24, **ALL_SAMPLERS}
    first = text_of(await chat(engine_url, **body))
    assert first and text_of(await chat(engine_url, **body)) == first
    crowd = await asyncio.gather(
        chat(engine_url, **body), chat(engine_url, temperature=0, max_tokens=30),
        chat(engine_url, temperature=0.7, seed=1, max_tokens=12, top_k=5),
    )
    assert text_of(crowd[0]) == first


def repeated_share(text: str) -> float:
    words = text.split()
    return 1 - len(set(words)) / len(words)


@pytest.mark.parametrize("penalty", [{"repetition_penalty": 1.3}, {"frequency_penalty": 1.0}])
async def test_a_penalty_changes_greedy_output_and_repeats_less(engine_url: str, penalty: dict) -> None:
    plain = text_of(await chat(engine_url, temperature=0, max_tokens=64))
    penalised = text_of(await chat(engine_url, temperature=0, max_tokens=64, **penalty))
    assert penalised != plain
    assert repeated_share(plain) > 0.5, plain  # the prompt really makes it loop
    assert repeated_share(penalised) < repeated_share(plain) - 0.2, penalised


@pytest.mark.parametrize(("field", "value"), [
    ("frequency_penalty", 3), ("presence_penalty", -2.5), ("repetition_penalty", 0),
    ("min_p", 1.5), ("top_k", -2), ("top_k", 2.5),
])
async def test_out_of_range_samplers_are_400_naming_the_field(engine_url: str, field: str,
                                                              value: float) -> None:
    reply = await request("POST", f"{engine_url}/v1/chat/completions", body={
        "model": MODEL, "messages": REPEATER, "max_tokens": 2, field: value,
    })
    assert reply.status == 400, reply.body
    error = reply.body["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == field and field in error["message"]


async def test_edge_values_are_accepted(engine_url: str) -> None:
    for body in ({"top_k": -1}, {"top_k": 0}, {"min_p": 0}, {"min_p": 1},
                 {"frequency_penalty": -2, "presence_penalty": 2}, {"repetition_penalty": 0.5},
                 {"top_k": None, "min_p": None, "repetition_penalty": None}):
        await chat(engine_url, temperature=0.5, seed=0, max_tokens=2, **body)


def test_openai_client_streams_with_extra_body_samplers(openai_client: openai.OpenAI) -> None:
    def streamed(**kwargs: object) -> str:
        chunks = list(openai_client.chat.completions.create(
            model=MODEL, messages=REPEATER, max_tokens=24, stream=True, **kwargs))
        assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    samplers = {"frequency_penalty": 0.4, "presence_penalty": 0.3,
                "extra_body": {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}}
    seeded = streamed(temperature=1.0, seed=11, **samplers)
    assert seeded and streamed(temperature=1.0, seed=11, **samplers) == seeded
    whole = openai_client.chat.completions.create(
        model=MODEL, messages=REPEATER, max_tokens=24, temperature=1.0, seed=11, **samplers)
    assert whole.choices[0].message.content == seeded  # streamed or not, the same draws
    # each extra_body field reaches the sampler: top_k=1 or min_p=1 sampling is greedy, and a
    # repetition penalty changes the greedy text
    greedy = streamed(temperature=0)
    assert streamed(temperature=1.5, seed=3, extra_body={"top_k": 1}) == greedy
    assert streamed(temperature=1.5, seed=3, extra_body={"min_p": 1}) == greedy
    assert streamed(temperature=0, extra_body={"repetition_penalty": 1.3}) != greedy


# -- the omni backend --------------------------------------------------------------------------

def test_omni_backend_with_samplers(native_engine: RunningEngine) -> None:
    client = make_client(native_engine.url)
    hello = {"model": "masque-omni", "messages": [{"role": "user", "content": "Hello there."}]}
    samplers = {"frequency_penalty": 0.4, "presence_penalty": 0.3,
                "extra_body": {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}}
    first = client.chat.completions.create(**hello, max_tokens=10, temperature=0.9, seed=5,
                                           **samplers)
    assert first.usage.completion_tokens > 0 and first.choices[0].message.content
    again = client.chat.completions.create(**hello, max_tokens=10, temperature=0.9, seed=5,
                                           **samplers)
    assert again.choices[0].message.content == first.choices[0].message.content

    def greedy(**penalty: object) -> str:
        reply = client.chat.completions.create(**hello, max_tokens=16, temperature=0, **penalty)
        return reply.choices[0].message.content

    # penalties apply to greedy decoding too (the tiny random model repeats within 16 tokens)
    plain = greedy()
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                    {"extra_body": {"repetition_penalty": 2.0}}):
        assert greedy(**penalty) != plain, penalty
