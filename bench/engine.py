"""Engine benchmark (not a test): chat throughput and latency, STT and TTS speed, llama.cpp anchor.

Run from the repository root::

    .venv/bin/python bench/engine.py                # offline models, a few minutes on 2 cores
    .venv/bin/python bench/engine.py --dtype float32 --threads 2 --max-tokens 48
    .venv/bin/python bench/engine.py --samplers --max-tokens 64   # each sampler's cost instead
    .venv/bin/python bench/engine.py --backend llm,ct2 --skip-audio   # two backends, one run
    .venv/bin/python bench/engine.py --backend llamacpp,llm-int8,llm-int4 --threads 1 --skip-audio
    .venv/bin/python bench/engine.py --backend llamacpp,llm-int4 --threads 1 --skip-audio --rounds 5
    .venv/bin/python bench/engine.py --story 30 --threads 1   # prefix reuse over a story

It prints, side by side:
- aggregate chat tokens/s at 1, 4, 8 and 16 concurrent requests through the real server
  (streaming, official async openai client), vs the same requests sent one at a time;
- time to first token p50/p99 under each load;
- the STT real-time factor of faster-whisper vs openai-whisper on the same espeak-ng clip,
  and the TTS real-time factor of piper (the backends are called directly);
- llama.cpp (llama-cpp-python, when installed) on the same GGUF at batch 1, the anchor for the
  goals: one channel >= llama.cpp batch 1, eight channels >= 3x llama.cpp batch 1.

With ``--rounds N`` every backend's server stays up and the measures run in N interleaved rounds
(the anchor, then each level on each backend in turn), so that a noisy neighbour on a shared machine hurts
them alike; it prints each level's best and median of N, and the goals judged on the best of N,
on the medians, and round by round (each round against its own anchor). The one-at-a-time
requests run once, after the first round.

Backends: ``llm`` (transformers in ``--dtype``), ``llm-int4`` (the offline default: 4-bit decode
steps, see engine.lean), ``llm-int8`` (float32 with
int8 linear layers, see engine.quantize), ``ct2``, ``llamacpp``, ``hybrid``.

With ``--story N`` it replays one story of N turns instead: a ~2,000-token prompt (card, lore,
history) growing by ~150 tokens a turn (the reply and the next message), sent to two servers
side by side, turn by turn: the offline default with its prefix cache, and the same without
(``prefix_cache_mb=0``). It prints each turn's time to first token on both, and checks that the
two replies are the same text.

With ``--samplers`` it prints instead what each sampler costs (greedy for reference, then
none, repetition penalty, frequency + presence penalties, top-k, min-p, all together):
aggregate tokens/s through the server at batch 1 and 8 (seeded sampling at temperature 1, best
of ``--rounds`` interleaved rounds), and the milliseconds per decode step that ``sample_rows``
itself takes for those rows, timed apart from the model.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MASQUE_CACHE_DIR", str(REPO / ".cache" / "test-models"))

import openai  # noqa: E402
from aiohttp import web  # noqa: E402

from engine.app import create_app  # noqa: E402
from engine.registry import resolve_model  # noqa: E402
from engine.settings import EngineSettings  # noqa: E402

SYSTEM = "You are Captain Mara, a pirate. Stay in character and answer briefly."
QUESTIONS = [
    "Where is the treasure buried?", "Who is your first mate?", "What is your ship called?",
    "Tell me about the storm last night.", "Why do you fear the kraken?", "What is your rum?",
    "How did you lose your eye?", "Where do we sail next?", "Who is the navy admiral?",
    "Describe the island.", "What song do the sailors sing?", "What is in the chest?",
    "How many cannons do we have?", "Who betrayed you?", "What is the map made of?",
    "When do we reach port?",
]
CLIP_TEXT = ("The captain raised the black flag and the crew cheered as the ship turned "
             "toward the island of lost treasure.")
PERCENTILES = (50, 99)
LOAD_TIMEOUT_POLLS = 1500  # 5 minutes: the first run converts the GGUF
GREEDY = {"temperature": 0}
# --samplers: each set's request fields, on top of seeded sampling at temperature 1
SAMPLER_TEMPERATURE = 1.0
SAMPLER_SETS = {
    "greedy": {"temperature": 0},  # the reference: no sampling at all
    "none": {},
    "repetition_penalty": {"repetition_penalty": 1.1},
    "frequency+presence": {"frequency_penalty": 0.5, "presence_penalty": 0.5},
    "top_k": {"top_k": 40},
    "min_p": {"min_p": 0.05},
    "all": {"repetition_penalty": 1.1, "frequency_penalty": 0.5, "presence_penalty": 0.5,
            "top_k": 40, "min_p": 0.05},
}
SAMPLER_VOCAB = 49152  # SmolLM2's, for timing sample_rows apart from the model
SAMPLER_PROMPT_TOKENS = 300


@dataclass
class Run:
    """One load level's outcome."""

    tokens: int
    seconds: float
    ttfts: list[float]

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def percentile(values: list[float], pct: int) -> float:
    """Nearest-rank percentile (fine for a handful of samples)."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


async def one_request(client: openai.AsyncOpenAI, question: str, max_tokens: int,
                      started: float, sampling: dict | None = None) -> tuple[int, float]:
    """Stream one chat completion (greedy unless ``sampling`` holds other request fields);
    return (completion tokens, time to first token)."""
    stream = await client.chat.completions.create(
        model="masque-chat", max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, extra_body=sampling or GREEDY,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
    )
    ttft, tokens = float("nan"), 0
    async for chunk in stream:
        if ttft != ttft and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, ttft


async def concurrent(client: openai.AsyncOpenAI, questions: list[str], max_tokens: int,
                     samplings: list[dict] | None = None) -> Run:
    """All ``questions`` at once (question i with ``samplings[i]`` when given)."""
    started = time.perf_counter()
    samplings = samplings or [GREEDY] * len(questions)
    results = await asyncio.gather(*(one_request(client, q, max_tokens, started, sampling)
                                     for q, sampling in zip(questions, samplings, strict=True)))
    return Run(sum(r[0] for r in results), time.perf_counter() - started, [r[1] for r in results])


async def sequential(client: openai.AsyncOpenAI, questions: list[str], max_tokens: int) -> Run:
    total, ttfts, started = 0, [], time.perf_counter()
    for question in questions:
        tokens, ttft = await one_request(client, question, max_tokens, time.perf_counter())
        total += tokens
        ttfts.append(ttft)
    return Run(total, time.perf_counter() - started, ttfts)


@asynccontextmanager
async def chat_server(settings: EngineSettings) -> AsyncIterator[openai.AsyncOpenAI]:
    """The real server on a free port, its models loaded and warm; yields a client for it."""
    runner = web.AppRunner(create_app(settings), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0,
                                timeout=600)
    try:
        for _ in range(LOAD_TIMEOUT_POLLS):
            if _ready(runner):
                break
            await asyncio.sleep(0.2)
        await concurrent(client, QUESTIONS[:2], 4)  # warm-up
        yield client
    finally:
        await client.close()
        await runner.cleanup()


@dataclass
class Level:
    """One load level over the rounds: the concurrent runs, and the one-at-a-time run (once)."""

    batched: list[Run]
    alone: Run | None = None

    @property
    def rates(self) -> list[float]:
        return [run.rate for run in self.batched]


async def bench_chat(backends: dict[str, EngineSettings], levels: list[int], max_tokens: int,
                     rounds: int, anchor: Callable[[], float] | None) -> tuple[dict, list[float]]:
    """Serve SmolLM2 on every backend at once and measure them in interleaved rounds: per round
    the llama.cpp anchor (``anchor()``, batch 1), then each load level on each backend in turn, so
    that a noisy neighbour hurts them alike and batch 1 runs right after the anchor. The same
    requests one at a time run once, after the first round (they take longer than all the
    concurrent levels together). Returns ({backend: {level: Level}}, the anchor's tok/s per
    round)."""
    results: dict[str, dict[int, Level]] = {name: {level: Level([]) for level in levels}
                                            for name in backends}
    anchors: list[float] = []
    async with AsyncExitStack() as stack:
        clients = {name: await stack.enter_async_context(chat_server(settings))
                   for name, settings in backends.items()}
        for round_ in range(rounds):
            if anchor is not None:
                anchors.append(anchor())
                print(f"round {round_ + 1}: llama.cpp batch 1 {anchors[-1]:.1f} tok/s", flush=True)
            for level in levels:  # level by level, the backends side by side
                questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(level)]
                for name, client in clients.items():
                    batched = await concurrent(client, questions, max_tokens)
                    results[name][level].batched.append(batched)
                    print(f"round {round_ + 1}: {name} level {level:2d}: batched "
                          f"{batched.rate:6.1f} tok/s", flush=True)
            if round_ == 0:
                for level in levels:
                    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(level)]
                    for name, client in clients.items():
                        alone = results[name][level].alone = await sequential(
                            client, questions, max_tokens)
                        print(f"{name} level {level:2d}: one at a time {alone.rate:6.1f} tok/s",
                              flush=True)
    return results, anchors


async def bench_samplers(settings: EngineSettings, levels: list[int], max_tokens: int,
                         rounds: int) -> dict[str, dict[int, float]]:
    """Tokens/s of every sampler set at every level: the best of ``rounds``, the sets
    interleaved within each round so that a noisy neighbour hurts them alike."""
    rates: dict[str, dict[int, float]] = {name: {} for name in SAMPLER_SETS}
    async with chat_server(settings) as client:
        for round_ in range(rounds):
            for name, fields in SAMPLER_SETS.items():
                for level in levels:
                    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(level)]
                    samplings = [{"temperature": SAMPLER_TEMPERATURE, "seed": i, **fields}
                                 for i in range(level)]
                    run = await concurrent(client, questions, max_tokens, samplings)
                    rates[name][level] = max(rates[name].get(level, 0.0), run.rate)
                    # sampled replies may stop early: the token count says how comparable
                    print(f"  round {round_ + 1}, {name}, b{level}: {run.rate:.1f} tok/s "
                          f"({run.tokens} tokens)", flush=True)
    return rates


def sampling_ms(fields: dict, batch: int, steps: int = 64) -> float:
    """Milliseconds per decode step that ``sample_rows`` and the token-history update take for
    ``batch`` rows sampled with ``fields``: the samplers' own cost, apart from the model."""
    import torch

    from engine.sampling import SamplingParams, TokenHistory, sample_rows

    rng = torch.Generator().manual_seed(0)
    params = [SamplingParams(steps, seed=row, **{"temperature": SAMPLER_TEMPERATURE, **fields})
              for row in range(batch)]
    generators = [torch.Generator().manual_seed(row) for row in range(batch)]
    prompt = torch.randint(SAMPLER_VOCAB, (SAMPLER_PROMPT_TOKENS,), generator=rng).tolist()
    history = None
    if any(p.penalised for p in params):
        history = TokenHistory.count([(prompt, [])] * batch, SAMPLER_VOCAB)
    logits = torch.randn(batch, SAMPLER_VOCAB, generator=rng)
    started = time.perf_counter()
    for _ in range(steps):
        tokens = sample_rows(logits, params, generators, history)
        if history is not None:
            history.add(tokens)
    return (time.perf_counter() - started) / steps * 1000


def _ready(runner: web.AppRunner) -> bool:
    from engine.routes import REGISTRY

    registry = runner.app[REGISTRY]
    status = registry.status()
    failed = {r: s for r, s in status["roles"].items() if s["state"] == "failed"}
    if failed:
        raise RuntimeError(f"models failed to load: {failed}")
    return status["ready"]


def chat_settings(args: argparse.Namespace, backend: str | None = None,
                  **chat: object) -> EngineSettings:
    """Chat only, on the CPU; ``llm-int8``/``llm-int4`` are the llm backend quantised (engine.lean)."""
    backend = backend or args.backends[0]
    quantised = backend in ("llm-int8", "llm-int4")
    return EngineSettings(
        cache_dir=Path(os.environ["MASQUE_CACHE_DIR"]), torch_threads=args.threads,
        chat={"max_batch": max(args.levels), "max_queue": 4 * max(args.levels),
              "dtype": "float32" if quantised else args.dtype, "device": "cpu",
              "backend": "llm" if quantised else backend,
              "quantize": backend.removeprefix("llm-") if quantised else "none", **chat},
        caption={"model": ""}, stt={"model": ""}, tts={"model": ""}, images={"model": ""},
        embeddings={"model": ""},
    )


def llama_cpp_anchor(settings: EngineSettings, max_tokens: int,
                     threads: int) -> Callable[[], float] | None:
    """A function measuring llama.cpp's batch-1 tokens/s on the same GGUF (four greedy chats, the
    prompt included, as a llama.cpp user waits for it), or None when it is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    gguf = resolve_model(settings.chat.model, settings.cache_dir)
    # n_batch=1: larger prompt batches crashed in decode on this CPU (see issue 3)
    llm = Llama(model_path=gguf, n_ctx=1024, n_batch=1, n_threads=threads or os.cpu_count(),
                verbose=False, seed=0)

    def measure() -> float:
        tokens, started = 0, time.perf_counter()
        for question in QUESTIONS[:4]:
            out = llm.create_chat_completion(
                messages=[{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": question}],
                max_tokens=max_tokens, temperature=0,
            )
            tokens += out["usage"]["completion_tokens"]
        return tokens / (time.perf_counter() - started)

    return measure


def bench_audio(settings: EngineSettings) -> dict[str, float]:
    """STT real-time factors (both backends, same clip) and the TTS real-time factor."""
    from engine.audio import decode_audio
    from engine.backends import stt, tts

    figures: dict[str, float] = {}
    if shutil.which("espeak-ng") is None:
        print("  espeak-ng missing: no STT figures")
    else:
        with tempfile.TemporaryDirectory() as folder:
            wav = Path(folder) / "clip.wav"
            subprocess.run(["espeak-ng", "-s", "150", "-w", str(wav), CLIP_TEXT], check=True)
            audio = decode_audio(wav.read_bytes(), "wav")
        for name in ("faster-whisper", "openai-whisper"):
            role = settings.stt.model_copy(update={
                "backend": name, "model": resolve_model(settings.stt.model, settings.cache_dir),
            })
            figures[f"stt {name}"] = stt.measure_stt_rtf(stt.load(role, settings), audio)
    voice = settings.tts.model_copy(
        update={"model": resolve_model(settings.tts.model, settings.cache_dir)}
    )
    figures["tts piper"] = tts.measure_tts_rtf(tts.load(voice, settings), CLIP_TEXT)
    return figures


def report_chat(chat: dict[int, Level], backend: str, args: argparse.Namespace) -> None:
    engine = {"llm": f"transformers, {args.dtype}", "llamacpp": "llama.cpp backend",
              "llm-int8": "lean decoder, int8 linear layers",
              "llm-int4": "lean decoder, int8 prompts, 4-bit decode steps",
              "hybrid": f"hybrid: llama.cpp alone, transformers {args.dtype} batch",
              "ct2": "CTranslate2 int8"}[backend]
    print(f"\nChat: SmolLM2-135M-Instruct ({engine}, {args.threads or 'default'} threads), "
          f"max_tokens={args.max_tokens}, greedy, {args.rounds} round(s)")
    print(f"{'concurrent':>10} | {'best tok/s':>10} | {'median tok/s':>12} | "
          f"{'one-at-a-time tok/s':>19} | {'speed-up':>8} | {'TTFT p50 s':>10} | {'TTFT p99 s':>10}")
    for level, entry in chat.items():
        ttfts = [t for run in entry.batched for t in run.ttfts]  # every round's
        p50, p99 = (percentile(ttfts, p) for p in PERCENTILES)
        best, middle = max(entry.rates), statistics.median(entry.rates)
        print(f"{level:>10} | {best:>10.1f} | {middle:>12.1f} | {entry.alone.rate:>19.1f} | "
              f"{middle / entry.alone.rate:>7.2f}x | {p50:>10.2f} | {p99:>10.2f}")
    if args.rounds > 1:
        print(f"{'per round':>10} | " + "; ".join(
            f"b{level}: " + " ".join(f"{rate:.1f}" for rate in entry.rates)
            for level, entry in chat.items()))


def verdicts(chat: dict[int, Level], anchors: list[float]) -> list[str]:
    """The goals judged three ways: best of N against best of N, median against median, and
    round by round (each round's figures against that round's anchor)."""
    lines = []
    for goal, level, factor, text in ((1, 1, 1, "one channel >= llama.cpp b1"),
                                      (2, 8, 3, "8 channels >= 3x llama.cpp b1")):
        if level not in chat:
            continue
        rates = chat[level].rates
        for name, ours, anchor in (("best", max(rates), max(anchors)),
                                   ("median", statistics.median(rates), statistics.median(anchors))):
            lines.append(f"  goal {goal} ({text}), {name:>6}: {ours:.1f} vs {factor * anchor:.1f} "
                         f"-> {'met' if ours >= factor * anchor else 'not met'}")
        met = sum(ours >= factor * anchor for ours, anchor in zip(rates, anchors, strict=True))
        lines.append(f"  goal {goal} ({text}), round by round: met in {met} of {len(rates)}")
    return lines


def report(chats: dict[str, dict], anchors: list[float], audio: dict[str, float],
           args: argparse.Namespace, wall: float) -> None:
    for backend, chat in chats.items():
        report_chat(chat, backend, args)
    chat = chats[args.backends[-1]]  # the goals are judged on the last (fastest) backend named
    if not anchors:
        print("llama.cpp: not measured (--skip-llama, or pip install llama-cpp-python)")
    else:
        print(f"llama.cpp batch 1 on the same GGUF: best {max(anchors):.1f} tok/s, median "
              f"{statistics.median(anchors):.1f} (rounds: {' '.join(f'{a:.1f}' for a in anchors)})")
        print("\n".join(verdicts(chat, anchors)))
    for name, rtf in audio.items():
        print(f"{name:>22}: real-time factor {rtf:.3f} ({1 / rtf:.1f}x faster than real time)")
    print(f"total bench time {wall:.0f} s")


def report_samplers(rates: dict[str, dict[int, float]], timings: dict[str, dict[int, float]],
                    args: argparse.Namespace, wall: float) -> None:
    levels = args.levels
    print(f"\nSamplers: SmolLM2-135M-Instruct (transformers, {args.dtype}, "
          f"{args.threads or 'default'} threads), max_tokens={args.max_tokens}, seeded sampling "
          f"at temperature {SAMPLER_TEMPERATURE:g}, best of {args.rounds} rounds")
    header = " | ".join(f"{f'b{level} tok/s':>9}" for level in levels)
    timing = " | ".join(f"{f'b{level} sample ms/step':>18}" for level in levels)
    print(f"{'sampler':>18} | {header} | {timing}")
    for name in SAMPLER_SETS:
        served = " | ".join(f"{rates[name][level]:>9.1f}" for level in levels)
        own = " | ".join(f"{timings[name][level]:>18.2f}" for level in levels)
        print(f"{name:>18} | {served} | {own}")
    print(f"total bench time {wall:.0f} s")


# -- story replay -------------------------------------------------------------------------------

STORY_CARD = (
    "You are Wren Halloway, keeper of the Greyhaven lighthouse on a storm-beaten island. "
    "You are gruff, kind, and superstitious; you speak in short sentences and notice the sea, "
    "the weather and the lamp. Stay in character; never speak for the visitor. "
)
STORY_LORE = [
    "Greyhaven: a granite island two miles off the coast, one jetty, one well, and the tower.",
    "The lamp: a first-order Fresnel lens, lit at dusk, wound every four hours by hand.",
    "The Mary Ellen: a fishing boat lost with all hands in the great storm of 1887.",
    "The bell: rung three times when fog rolls in, once more for every boat still out.",
    "Old Tom: the previous keeper, who vanished one winter and left only his logbook.",
]
STORY_MOVES = [
    "I climb the stairs to the lamp room and look out at the black water, where a light "
    "flickers where no boat should be. I ask Wren whether she has seen it before and what it is.",
    "I open Old Tom's logbook on the table and read the last entry aloud by the lamp, slowly, "
    "then I ask Wren why the final pages are torn out and who could have done it.",
    "The fog rolls in thick and grey, and somewhere below a bell is ringing that is not ours. "
    "I grab my coat and ask Wren whether we should go down to the jetty together.",
]
STORY_REPLY_TOKENS = 40
STORY_START_TOKENS = 2000
STORY_CONTEXT = 8192


def story_prompt(turns: list[tuple[str, str]], move: str) -> list[dict[str, str]]:
    """The chat for the next turn: card and lore, every earlier turn, the new move."""
    system = STORY_CARD + "\nLore:\n" + "\n".join(STORY_LORE)
    messages = [{"role": "system", "content": system}]
    for user, reply in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages + [{"role": "user", "content": move}]


async def story_turn(client: openai.AsyncOpenAI, messages: list[dict]) -> tuple[str, float]:
    """One greedy turn, streamed; (reply, time to first token)."""
    started, ttft, pieces = time.perf_counter(), float("nan"), []
    stream = await client.chat.completions.create(
        model="masque-chat", messages=messages, max_tokens=STORY_REPLY_TOKENS, stream=True,
        temperature=0,
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft != ttft:
                ttft = time.perf_counter() - started
            pieces.append(chunk.choices[0].delta.content)
    return "".join(pieces), ttft


async def bench_story(args: argparse.Namespace) -> list[tuple[int, float, float, bool]]:
    """Per turn: (prompt tokens, TTFT with prefix reuse, TTFT without, same reply)."""
    from transformers import AutoTokenizer

    from engine.backends.llm import locate_checkpoint, text_chat_ids

    args.levels = [1]
    settings = {"max_context_tokens": STORY_CONTEXT, "max_batch": 1}
    reuse = chat_settings(args, "llm-int4", **settings)
    cold = chat_settings(args, "llm-int4", prefix_cache_mb=0, **settings)
    role = reuse.chat.model_copy(update={"model": resolve_model(reuse.chat.model, reuse.cache_dir)})
    tokenizer = AutoTokenizer.from_pretrained(locate_checkpoint(role, reuse.cache_dir))
    turns: list[tuple[str, str]] = []
    # history from earlier in the story until the first prompt holds ~2,000 tokens
    def count(messages: list[dict]) -> int:
        return len(text_chat_ids(tokenizer, messages, [], []))

    while count(story_prompt(turns, STORY_MOVES[0])) < STORY_START_TOKENS:
        turns.append((STORY_MOVES[len(turns) % 3], STORY_MOVES[(len(turns) + 1) % 3]))
    rows = []
    async with chat_server(reuse) as warm_client, chat_server(cold) as cold_client:
        for turn in range(args.story):
            messages = story_prompt(turns, STORY_MOVES[turn % 3])
            size = count(messages)
            warm_reply, warm_ttft = await story_turn(warm_client, messages)
            cold_reply, cold_ttft = await story_turn(cold_client, messages)
            rows.append((size, warm_ttft, cold_ttft, warm_reply == cold_reply))
            print(f"  turn {turn + 1:2d}: {size} tokens, TTFT {warm_ttft:.2f} s with reuse, "
                  f"{cold_ttft:.2f} s without", flush=True)
            turns.append((STORY_MOVES[turn % 3], warm_reply))
    return rows


def report_story(rows: list[tuple[int, float, float, bool]], args: argparse.Namespace,
                 wall: float) -> None:
    warm = sorted(r[1] for r in rows[1:])  # the first turn has nothing to reuse
    cold = sorted(r[2] for r in rows[1:])
    print(f"\nStory replay: {len(rows)} turns, {rows[0][0]}-{rows[-1][0]} prompt tokens, "
          f"SmolLM2-135M, the offline default (int4 decode), {args.threads or 'default'} threads, "
          f"greedy {STORY_REPLY_TOKENS}-token replies")
    print(f"{'':>16} | {'TTFT p50 s':>10} | {'TTFT mean s':>11} | {'TTFT max s':>10}")
    for name, values in (("with reuse", warm), ("without", cold)):
        print(f"{name:>16} | {percentile(values, 50):>10.2f} | {sum(values) / len(values):>11.2f} | "
              f"{values[-1]:>10.2f}")
    ratio = (sum(warm) / len(warm)) / (sum(cold) / len(cold))
    print(f"mean TTFT with reuse / without: {ratio:.2f} (goal <= 0.33: "
          f"{'met' if ratio <= 1 / 3 else 'not met'}); same replies: "
          f"{sum(r[3] for r in rows)}/{len(rows)} turns")
    print(f"total bench time {wall:.0f} s")


def default_dtype() -> str:
    """bfloat16 when the CPU computes it natively (AVX512-BF16/AMX), else float32."""
    import torch

    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")],
                        help="concurrent requests (default 1,4,8,16; with --samplers 1,8)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default=default_dtype(), choices=["float32", "bfloat16"],
                        help="transformers weights (default: bfloat16 where the CPU has it)")
    parser.add_argument("--backend", default="llm",
                        help="chat backend(s) behind the server, comma-separated to compare in "
                             "one run: llm, llm-int8, llm-int4, ct2, llamacpp, hybrid (llamacpp needs "
                             "llama-cpp-python)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--skip-audio", action="store_true")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--samplers", action="store_true",
                        help="measure each sampler's cost instead (no llama.cpp, no audio)")
    parser.add_argument("--rounds", type=int,
                        help="interleaved rounds: best and median of N (default 1; --samplers: "
                             "best of N, default 2)")
    parser.add_argument("--story", type=int, default=0, metavar="TURNS",
                        help="replay a story of TURNS turns with and without prefix reuse instead")
    args = parser.parse_args(argv)
    args.levels = args.levels or ([1, 8] if args.samplers else [1, 4, 8, 16])
    args.rounds = args.rounds or (2 if args.samplers else 1)
    args.backends = args.backend.split(",")
    unknown = set(args.backends) - {"llm", "llm-int8", "llm-int4", "ct2", "llamacpp", "hybrid"}
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(sorted(unknown))}")
    started = time.perf_counter()
    if args.story:
        report_story(asyncio.run(bench_story(args)), args, time.perf_counter() - started)
        return
    settings = chat_settings(args)
    if args.samplers:
        print("sampler sets (each: every level, seeded sampling)")
        rates = asyncio.run(bench_samplers(settings, args.levels, args.max_tokens, args.rounds))
        timings = {name: {level: min(sampling_ms(fields, level) for _ in range(args.rounds))
                          for level in args.levels} for name, fields in SAMPLER_SETS.items()}
        report_samplers(rates, timings, args, time.perf_counter() - started)
        return
    anchor = None if args.skip_llama else llama_cpp_anchor(settings, args.max_tokens, args.threads)
    print(f"chat load levels, {args.rounds} round(s): llama.cpp batch 1, then each level on each "
          "backend (concurrent; after round 1, the same requests one at a time)")
    chats, anchors = asyncio.run(bench_chat(
        {backend: chat_settings(args, backend) for backend in args.backends}, args.levels,
        args.max_tokens, args.rounds, anchor))
    audio = {} if args.skip_audio else bench_audio(EngineSettings(
        cache_dir=Path(os.environ["MASQUE_CACHE_DIR"])))
    report(chats, anchors, audio, args, time.perf_counter() - started)

if __name__ == "__main__":
    main()
