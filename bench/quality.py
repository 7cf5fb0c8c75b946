"""Role-play quality benchmark (not a test): our prompt, samplers and reply shaping vs a SillyTavern-style default.

Run from the repository root::

    .venv/bin/python bench/quality.py                           # the offline model, in-process, full scripts
    .venv/bin/python bench/quality.py --quick                   # 2 scripts x 3 turns, 24 tokens (CI smoke test)
    .venv/bin/python bench/quality.py --presets roleplay,creative,precise --turns 20
    .venv/bin/python bench/quality.py --engine-url http://gpu:8000/v1 --model Qwen/Qwen2.5-7B-Instruct
    MASQUE_JUDGE_URL=http://gpu:8000/v1 MASQUE_JUDGE_MODEL=judge .venv/bin/python bench/quality.py

The user's lines are fixed (bench/quality_scripts.json: built-in cards, each copy given a length ask in
its post-history instructions; one group scene has an NPC the persona must not speak for); the model's
replies go into the history turn by turn, as in a real story. Every script runs once per configuration,
side by side on the same model in the same run:

- ours (PRESET): the bot's prompt (bot.story.prompt.build_prompt within the bot's own budget), its stop
  strings, the preset's samplers, max_tokens lowered to the card's length ask, the reply shaped by
  bot.story.shaping (the NPC counts among the others it cuts at) and asked again when nothing in
  character is left (as the pipeline does);
- baseline: SillyTavern's default chat-completion prompt (main prompt, card fields, example chat, the
  history with user lines as "Name: text", the card's post-history instructions last), OpenAI's
  default samplers, max_tokens 300, and the raw text as the reply.

Each reply is scored by the rule functions below (pure; unit-tested in tests/test_bench_quality.py) and,
when MASQUE_JUDGE_URL names an OpenAI-compatible server, by a judge model's 1-5 in-character score.
The scores are of what a user would see: ours after shaping, the baseline as it came.
Conversations run concurrently (--concurrency), so latency is under that load for every configuration;
on a small shared CPU, --threads 1 is often faster than torch's default.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import math
import os
import re
import statistics
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MASQUE_CACHE_DIR", str(REPO / ".cache" / "test-models"))

import openai  # noqa: E402

from bot.builtin import builtin_personas  # noqa: E402
from bot.cards import Card, expand  # noqa: E402
from bot.pipeline import NO_REPLY_TRIES  # noqa: E402
from bot.prompt_fit import DEFAULT_CONTEXT_WINDOW, PromptFitter  # noqa: E402
from bot.settings import BotSettings  # noqa: E402
from bot.story.generation import (  # noqa: E402
    EXTRA_PARAMS,
    LENGTH_SLACK,
    TOKENS_PER_WORD,
    asked_tokens,
    card_samplers,
    reply_tokens,
    resolve,
)
from bot.story.prompt import PromptParts, build_prompt, stop_sequences  # noqa: E402
from bot.story.shaping import cut_point, shape_reply  # noqa: E402
from bot.story.tokens import TokenCounter  # noqa: E402

SCRIPTS_FILE = Path(__file__).with_name("quality_scripts.json")
QUICK_SCRIPTS, QUICK_TURNS, QUICK_MAX_TOKENS = ("noir", "group"), 3, 24
REPLY_SETTING = 300  # the bot's default MASQUE_REPLY_MAX_TOKENS, and the baseline's max_tokens
BASELINE = "baseline"
BASELINE_MAIN = "Write {{char}}'s next reply in a fictional chat between {{char}} and {{user}}."
DISTINCT2_MIN, DISTINCT2_MIN_BIGRAMS = 0.6, 12  # below: a loop (short replies are not judged by it)
NGRAM_REPEATS = 3  # a word 3-gram this many times in one reply: a loop
SENTENCE_MIN_WORDS = 4  # shorter sentences ("She nods.") repeat naturally
OVER_SLACK = 1.10  # more than 10% over the card's ask: "over"
JUDGE_CONCURRENCY = 4
PROGRESS_EVERY = 5  # turns between progress lines
READY_POLLS, READY_POLL_S = 1500, 0.2  # 5 minutes: a first run converts the GGUF

ASSISTANT_SPEAK = re.compile("|".join([
    r"\bas an? (?:ai|artificial intelligence|language model|(?:helpful |virtual )?assistant)\b",
    r"\blanguage model\b",
    r"\bhow (?:can|may|could) i (?:assist|help) you(?: today)?\b",
    r"\bi'?m sorry,? but (?:i|as)\b",
    r"\bi (?:cannot|can't|am unable to|won't be able to) (?:fulfil+|comply|assist|help with|provide|generate)\b",
    r"\bi'?m (?:just )?an? (?:ai|chatbot|virtual assistant)\b",
    r"\bis there anything else (?:i can|you(?:'d| would) like)\b",
    r"\bi hope (?:this|that) helps\b",
    r"\bi'?m (?:happy|glad) to (?:help|assist)(?: you)? with (?:your|any|that|this)\b",
    r"\b(?:that's|what) a (?:great|good) question\b",
    r"\bhere(?:'s| is) (?:a|an|the|your) (?:\w+ ){0,2}(?:translation|guide|summary|response|snippet|code)\b",
    r"\bhere(?:'s| is) the answer to your question\b",
]), re.IGNORECASE)
# A line narrating the user's speech: "You say to her: ...", 'You reply, "..."'.
_YOU_SPEAK = re.compile(r"^[\s*_\"“]*you\s+(?:say|said|reply|replied|ask|asked|answer|answered)\b(?P<rest>.*)$",
                        re.IGNORECASE | re.MULTILINE)
_WORD = re.compile(r"[a-z0-9]+(?:['’-][a-z0-9]+)*", re.IGNORECASE)
_SENTENCE = re.compile(r"[^.!?…\n]+")
_TERMINAL = ".!?…*\"”’')"
_CLOSING = "*\"”’')_"
_DANGLING = {"a", "an", "the", "and", "or", "but", "to", "of", "into", "onto", "with", "from", "by",
             "their", "my", "your", "its", "our"}  # a phrase does not end on these


# ------------------------------------------------------------------ rule scores (pure)


def words(text: str) -> list[str]:
    """The reply's words, lower-cased (punctuation and asterisks dropped)."""
    return [w.lower() for w in _WORD.findall(text.replace("’", "'"))]


def assistant_speak(reply: str) -> bool:
    """The persona talks like a chat assistant ("As an AI", "How can I help you today?")."""
    return ASSISTANT_SPEAK.search(reply.replace("’", "'")) is not None


def impersonates(reply: str, others: Sequence[str]) -> bool:
    """The reply writes for someone else: a line the bot's shaping would cut at (a "Name:" line of the
    user, the NPC or a generic "User:"), or a line narrating the user's speech ("You say to her: ...").
    A first line "You say that like it's easy." is the persona talking to the user, not for them."""
    if cut_point(reply, others) is not None:
        return True
    for match in _YOU_SPEAK.finditer(reply):
        if reply[:match.start()].strip() or re.match(r"[^.!?]{0,40}?[:\"“]", match["rest"]):
            return True
    return False


def distinct_n(tokens: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams (1.0 when there are none): low values mean repetition."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def max_ngram_repeats(tokens: Sequence[str], n: int = 3) -> int:
    """How often the most frequent word n-gram occurs."""
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n])
        counts[gram] = counts.get(gram, 0) + 1
    return max(counts.values(), default=0)


def sentences(text: str) -> list[tuple[str, ...]]:
    """The text's sentences as word tuples, those of at least SENTENCE_MIN_WORDS words."""
    found = (tuple(words(s)) for s in _SENTENCE.findall(text))
    return [s for s in found if len(s) >= SENTENCE_MIN_WORDS]


def loops(reply: str, previous: str = "") -> bool:
    """The reply loops: distinct-2 under DISTINCT2_MIN (in a reply long enough to tell), a word 3-gram
    NGRAM_REPEATS times or more, a sentence said twice, or a sentence of the persona's previous reply."""
    tokens = words(reply)
    if len(tokens) - 1 >= DISTINCT2_MIN_BIGRAMS and distinct_n(tokens, 2) < DISTINCT2_MIN:
        return True
    if max_ngram_repeats(tokens, 3) >= NGRAM_REPEATS:
        return True
    said = sentences(reply)
    return len(set(said)) < len(said) or bool(set(said) & set(sentences(previous)))


def unfinished(reply: str) -> bool:
    """The last sentence is cut off: the reply does not end in . ! ? … or a closing mark (* " ” ’ ' ), or
    the mark closes a phrase cut off mid-way ("*She leans into the*": shaping closes an action it trims)."""
    stripped = reply.rstrip()
    if not stripped:
        return False
    if stripped[-1] not in _TERMINAL:
        return True
    inner = stripped.rstrip(_CLOSING).rstrip()
    return bool(inner) and (inner[-1] in ",;:-–—" or (inner[-1].isalnum() and words(inner)[-1] in _DANGLING))


def asked_words(*instructions: str) -> int | None:
    """The reply length in words the card asks for, or None: bot.story.generation.asked_tokens (the one
    parser of length asks) turned back into words, so both sides read "under 100 words" the same way."""
    tokens = asked_tokens(*instructions)
    return None if tokens is None else math.floor(tokens / (TOKENS_PER_WORD * LENGTH_SLACK))


def over_length(word_count: int, asked: int | None) -> bool:
    """More than 10% over the card's ask (never, for a card that asks no length)."""
    return asked is not None and word_count > asked * OVER_SLACK


def wrong_speaker(reply: str, npc: str) -> bool:
    """The reply opens with, or contains, a line spoken as the NPC ("Dex:", "**Dex Okafor:**")."""
    names = {npc.strip(), npc.split()[0]} if npc.strip() else set()
    names = [re.escape(n) for n in sorted(names, key=len, reverse=True) if len(n) >= 3]
    return bool(names) and re.search(rf"^[\s*_\[]*(?:{'|'.join(names)})[\s*_\]]*:", reply,
                                     re.IGNORECASE | re.MULTILINE) is not None


def parse_judge(text: str) -> int | None:
    """The judge's score: the first digit in its answer, if it is 1-5."""
    match = re.search(r"\d", text or "")
    return int(match[0]) if match and 1 <= int(match[0]) <= 5 else None


# ------------------------------------------------------------------ scripts and the two prompts


@dataclass
class Turn:
    """A turn as the bot's prompt builder reads it (bot.story.prompt.TurnLike)."""

    author_kind: str
    author_name: str
    text: str
    attachments: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Script:
    """One scripted story: the card (a bench copy), the user's name and lines, an NPC in group scenes."""

    name: str
    card: Card
    user: str
    lines: list[str]
    npc: str = ""

    @property
    def char(self) -> str:
        return self.card.display_name

    @property
    def others(self) -> list[str]:
        return [n for n in (self.user, self.npc) if n]

    @property
    def asked(self) -> int | None:
        return asked_words(self.card.data.post_history_instructions, self.card.data.system_prompt)

    def ex(self, text: str) -> str:
        return expand(text, char=self.char, user=self.user).strip()


def load_scripts(names: Sequence[str] | None = None, path: Path = SCRIPTS_FILE) -> list[Script]:
    """The scripts (all, or those named), each with its copy of a built-in card."""
    cards = {parsed.card.name: parsed.card for parsed in builtin_personas()}
    scripts = []
    for raw in json.loads(path.read_text())["scripts"]:
        if names and raw["name"] not in names:
            continue
        data = cards[raw["card"]].data
        changes = {"post_history_instructions": raw.get("post_history_instructions", data.post_history_instructions)}
        if raw.get("scenario_extra"):
            changes["scenario"] = f"{data.scenario} {raw['scenario_extra']}".strip()
        card = cards[raw["card"]].model_copy(update={"data": data.model_copy(update=changes)})
        scripts.append(Script(raw["name"], card, raw["user"], list(raw["lines"]), raw.get("npc", "")))
    return scripts


@dataclass
class Request:
    """One chat completion to send: messages, length, samplers, stop strings; `shape` for ours."""

    messages: list[dict[str, Any]]
    max_tokens: int
    samplers: dict[str, Any]
    stop: list[str]
    shape: bool


@functools.cache
def prompt_budget(window: int, setting: int) -> int:
    """The prompt's token budget by the bot's own rule (bot/prompt_fit.py, estimate only): both
    configurations get the same room, so neither sees more history."""
    return PromptFitter(None, BotSettings()).budget(window, min(setting, window // 2), exact=False)


def ours(script: Script, turns: Sequence[Turn], preset: str, window: int, setting: int) -> Request:
    """The bot's request: its prompt within its budget, its stop strings, the preset over the card's
    samplers, and max_tokens lowered to the card's length ask (as bot/pipeline.py builds it)."""
    data = script.card.data
    prompt = build_prompt(PromptParts(card=script.card, user_name=script.user, turns=turns,
                                      budget=prompt_budget(window, setting)))
    samplers = card_samplers(data.masque).over(resolve(preset))
    return Request(prompt.messages, reply_tokens(setting, data.post_history_instructions, data.system_prompt),
                   samplers.request_params(), stop_sequences(turns, script.user), shape=True)


def baseline(script: Script, turns: Sequence[Turn], window: int, setting: int) -> Request:
    """SillyTavern's default chat-completion prompt: the main prompt, description, personality, scenario,
    example chat, then the history (oldest dropped to fit the same budget as ours) and the card's
    post-history instructions; OpenAI's default samplers; no stop strings, no shaping."""
    data = script.card.data
    examples = [b.strip() for b in re.split(r"<START>", data.mes_example, flags=re.IGNORECASE) if b.strip()]
    system = "\n\n".join(script.ex(s) for s in [
        BASELINE_MAIN, data.description,
        f"[{{{{char}}}}'s personality: {data.personality}]" if data.personality.strip() else "",
        f"[Circumstances and context of the dialogue: {data.scenario}]" if data.scenario.strip() else "",
        *(f"[Example Chat]\n{b}" for b in examples), "[Start a new Chat]"] if s.strip())
    history = [{"role": "assistant", "content": t.text} if t.author_kind == "persona"
               else {"role": "user", "content": f"{t.author_name}: {t.text}"} for t in turns]
    post = script.ex(data.post_history_instructions)
    tail = [{"role": "system", "content": post}] if post else []
    counter = TokenCounter()
    room = prompt_budget(window, setting) - counter.message(system) - sum(counter.message(m["content"]) for m in tail)
    while len(history) > 1 and sum(counter.message(m["content"]) for m in history) > room:
        history.pop(0)
    messages = [{"role": "system", "content": system}, *history, *tail]
    return Request(messages, setting, {"temperature": 1.0, "top_p": 1.0, "frequency_penalty": 0.0,
                                       "presence_penalty": 0.0}, [], shape=False)


# ------------------------------------------------------------------ running the stories


@dataclass
class Reply:
    """One scored reply."""

    model: str
    config: str
    script: str
    turn: int
    user_line: str
    raw: str
    reply: str
    latency_s: float
    tries: int = 1
    discarded: list[str] = field(default_factory=list)  # ours: earlier samples with nothing in character
    error: str = ""
    scores: dict[str, Any] = field(default_factory=dict)
    judge: int | None = None


def score(reply: str, previous: str, script: Script) -> dict[str, Any]:
    """Every rule score of one reply (wrong_speaker is None outside group scenes)."""
    count = len(words(reply))
    return {"empty": not reply.strip(), "loop": loops(reply, previous), "unfinished": unfinished(reply),
            "impersonation": impersonates(reply, script.others), "assistant": assistant_speak(reply),
            "wrong_speaker": wrong_speaker(reply, script.npc) if script.npc else None,
            "words": count, "asked": script.asked, "over": over_length(count, script.asked)}


async def complete(client: openai.AsyncOpenAI, model: str, request: Request, seed: int) -> str:
    """One chat completion's text (the extras vLLM and our engine accept go in the body)."""
    native = {k: v for k, v in request.samplers.items() if k not in EXTRA_PARAMS}
    extra = {k: v for k, v in request.samplers.items() if k in EXTRA_PARAMS}
    kwargs: dict[str, Any] = {"stop": request.stop} if request.stop else {}
    response = await client.chat.completions.create(
        model=model, messages=request.messages, max_tokens=request.max_tokens, seed=seed,
        extra_body=extra or None, **native, **kwargs)
    return response.choices[0].message.content or ""


async def converse(client: openai.AsyncOpenAI, model: str, script: Script, config: str, preset: str | None,
                   window: int, args: argparse.Namespace) -> list[Reply]:
    """Play one script under one configuration (ours with `preset`, or the baseline when it is None);
    every reply joins the history as it was shown."""
    turns = [Turn("persona", script.char, script.ex(script.card.data.first_mes))]
    replies = []
    for index, line in enumerate(script.lines[:args.turns or None]):
        turns.append(Turn("user", script.user, line))
        request = baseline(script, turns, window, args.max_tokens) if preset is None else \
            ours(script, turns, preset, window, args.max_tokens)
        previous = next((t.text for t in reversed(turns) if t.author_kind == "persona"), "")
        started, raws, text, error = time.perf_counter(), [], "", ""
        try:
            while not text and len(raws) < (NO_REPLY_TRIES if request.shape else 1):
                seed = zlib.crc32(f"{script.name}/{index}/{len(raws)}".encode())
                raws.append(await complete(client, model, request, seed))
                text = shape_reply(raws[-1], script.char, script.others) if request.shape else raws[-1].strip()
        except openai.APIError as exc:  # reported per reply; the story goes on
            error = f"{type(exc).__name__}: {exc}"
        reply = Reply(model, config, script.name, index, line, raws[-1] if raws else "", text,
                      time.perf_counter() - started, len(raws), raws[:-1], error)
        if not error:
            reply.scores = score(text, previous, script)
        replies.append(reply)
        if text:  # as in the bot: a reply with nothing in character is not stored
            turns.append(Turn("persona", script.char, text))
        if (index + 1) % PROGRESS_EVERY == 0:
            print(f"  {model} / {config} / {script.name}: {index + 1} turns", flush=True)
    return replies


JUDGE_PROMPT = """You grade one reply in a role-play. The character is {char}.
{description}

The user ({user}) wrote:
{line}

{char}'s reply:
{reply}

Score how well the reply stays in character as {char}, from 1 to 5:
5 = fully in character, vivid, answers the user, speaks only for {char};
3 = in character but flat, repetitive or partly off;
1 = out of character, talks like an AI assistant, writes the user's or others' lines, or is broken text.
Answer with a single digit."""


async def judge_all(replies: list[Reply], scripts: dict[str, Script]) -> str | None:
    """Fill each reply's judge score when MASQUE_JUDGE_URL is set; return the judge's name (or None)."""
    url = os.environ.get("MASQUE_JUDGE_URL")
    if not url:
        return None
    model = os.environ.get("MASQUE_JUDGE_MODEL", "masque-chat")
    client = openai.AsyncOpenAI(base_url=api_base(url), api_key=os.environ.get("MASQUE_JUDGE_API_KEY", "none"),
                                max_retries=1, timeout=600)
    gate = asyncio.Semaphore(JUDGE_CONCURRENCY)

    async def judge(reply: Reply) -> None:
        script = scripts[reply.script]
        prompt = JUDGE_PROMPT.format(char=script.char, description=script.ex(script.card.data.description),
                                     user=script.user, line=reply.user_line, reply=reply.reply)
        async with gate:
            answer = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0)
        reply.judge = parse_judge(answer.choices[0].message.content or "")

    try:
        await asyncio.gather(*(judge(r) for r in replies if r.reply and not r.error))
    finally:
        await client.close()
    return f"{model} at {url}"


# ------------------------------------------------------------------ the engine


def api_base(url: str) -> str:
    """An OpenAI base URL: `url` with /v1 added when it does not end in it already."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


async def start_engine(conversations: int, threads: int) -> tuple[Any, str, str]:
    """The offline engine in-process (chat role only): its runner, base URL and served model name."""
    from aiohttp import web

    from engine.app import create_app
    from engine.routes import REGISTRY
    from engine.settings import EngineSettings

    settings = EngineSettings(
        preset="offline", cache_dir=Path(os.environ["MASQUE_CACHE_DIR"]), torch_threads=threads,
        chat={"max_batch": conversations, "max_queue": 4 * conversations},
        caption={"model": ""}, stt={"model": ""}, tts={"model": ""}, images={"model": ""}, embeddings={"model": ""})
    runner = web.AppRunner(create_app(settings), handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    for _ in range(READY_POLLS):
        status = runner.app[REGISTRY].status()
        failed = {r: s for r, s in status["roles"].items() if s["state"] == "failed"}
        if failed:
            await runner.cleanup()
            raise RuntimeError(f"models failed to load: {failed}")
        if status["ready"]:
            return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/v1", settings.chat.served_name
        await asyncio.sleep(READY_POLL_S)
    await runner.cleanup()
    raise RuntimeError("the offline engine did not load in time")


async def context_window(client: openai.AsyncOpenAI, model: str) -> int:
    """The model's window as the server reports it (`max_model_len`), else the bot's default."""
    try:
        served = {m.id: (m.model_extra or {}).get("max_model_len") for m in (await client.models.list()).data}
    except openai.APIError:
        served = {}
    return int(served.get(model) or DEFAULT_CONTEXT_WINDOW)


# ------------------------------------------------------------------ figures and the report


def summarize(replies: list[Reply]) -> dict[str, Any]:
    """One configuration's figures (counts, per-100 loop rate, means) over `replies`."""
    scored = [r for r in replies if not r.error]
    shown = [r for r in scored if not r.scores["empty"]]
    group = [r for r in scored if r.scores["wrong_speaker"] is not None]
    asked = [r.scores["asked"] for r in scored if r.scores["asked"] is not None]
    judged = [r.judge for r in scored if r.judge is not None]

    def count(key: str, among: list[Reply] = scored) -> int:
        return sum(1 for r in among if r.scores[key])

    return {
        "replies": len(replies), "errors": len(replies) - len(scored), "empty": count("empty"),
        "loops": count("loop"), "loops_per_100": round(100 * count("loop") / len(scored), 1) if scored else 0.0,
        "unfinished": count("unfinished"), "impersonations": count("impersonation"),
        "assistant_speak": count("assistant"), "wrong_speaker": count("wrong_speaker", group),
        "group_replies": len(group), "over_length": count("over"),
        "mean_words": round(statistics.fmean(r.scores["words"] for r in shown), 1) if shown else 0.0,
        "mean_asked": round(statistics.fmean(asked), 1) if asked else None,
        "retries": sum(max(r.tries - 1, 0) for r in replies),
        "mean_latency_s": round(statistics.fmean(r.latency_s for r in replies), 2) if replies else 0.0,
        "judge_mean": round(statistics.fmean(judged), 2) if judged else None, "judged": len(judged),
    }


COLUMNS = [  # (heading, how a row's figures print)
    ("replies", lambda f: f["replies"]),
    ("loops/100", lambda f: f"{f['loops_per_100']:.1f}"),
    ("unfinished", lambda f: f["unfinished"]),
    ("imperson.", lambda f: f["impersonations"]),
    ("assistant", lambda f: f["assistant_speak"]),
    ("wrong spk", lambda f: f"{f['wrong_speaker']}/{f['group_replies']}"),
    ("words/asked", lambda f: f"{f['mean_words']:.0f}/{'-' if f['mean_asked'] is None else round(f['mean_asked'])}"),
    ("over", lambda f: f["over_length"]),
    ("empty", lambda f: f["empty"]),
    ("latency s", lambda f: f"{f['mean_latency_s']:.2f}"),
    ("judge", lambda f: "-" if f["judge_mean"] is None else f"{f['judge_mean']:.2f}"),
]


def report(figures: dict[str, Any]) -> None:
    """Print one table per model: a row per configuration."""
    plan = figures["plan"]
    print(f"\nRole-play quality: scripts {', '.join(plan['scripts'])}; up to {plan['turns']} turns each; "
          f"reply setting {plan['max_tokens']} tokens; {plan['concurrency']} conversations at once; "
          f"judge: {plan['judge'] or 'none (set MASQUE_JUDGE_URL)'}")
    first = max(len(c) for c in plan["configs"])
    for model, configs in figures["results"].items():
        print(f"\nmodel {model} (window {figures['windows'][model]} tokens, engine: {plan['engine']})")
        print(" | ".join([f"{'configuration':<{first}}", *(h for h, _ in COLUMNS)]))
        print("-+-".join(["-" * first, *("-" * len(h) for h, _ in COLUMNS)]))
        for config, row in configs.items():
            print(" | ".join([f"{config:<{first}}", *(f"{fmt(row)!s:>{len(h)}}" for h, fmt in COLUMNS)]))
    print("\nloops: low distinct-2, a 3-gram 3+ times, a sentence twice or from the previous reply; unfinished: no "
          "closing . ! ? … * \" at the end;\nwrong spk: replies with an NPC line / group-scene replies; over: more "
          "than 10% over the ask; empty: nothing in character after the tries")


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-url", help="an OpenAI-compatible server (default: the offline engine in-process)")
    parser.add_argument("--model", default="", help="the model(s) to compare there, comma-separated")
    parser.add_argument("--presets", default="roleplay", help="our sampler presets, one row each, comma-separated")
    parser.add_argument("--scripts", default="", help="script names to run, comma-separated (default: all)")
    parser.add_argument("--turns", type=int, default=0, help="user lines per script at most (0 = all)")
    parser.add_argument("--max-tokens", type=int, default=REPLY_SETTING, help="the reply-length setting")
    parser.add_argument("--concurrency", type=int, default=0, help="conversations at once (0 = all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the in-process engine (0 = default)")
    parser.add_argument("--quick", action="store_true", help="CI smoke: 2 scripts x 3 turns, 24-token replies")
    parser.add_argument("--json", metavar="PATH", help="also write the figures (and every reply) as JSON")
    args = parser.parse_args(argv)
    if args.engine_url and not args.model:
        parser.error("--engine-url needs --model")
    if args.quick:
        args.scripts, args.turns = ",".join(QUICK_SCRIPTS), QUICK_TURNS
        args.max_tokens, args.presets = min(args.max_tokens, QUICK_MAX_TOKENS), args.presets.split(",")[0]
        args.threads = args.threads or 1  # CI cores are shared: a second torch thread mostly waits for one
    return args


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    """Every script under every configuration on every model, then the judge; the figures."""
    scripts = load_scripts([s for s in args.scripts.split(",") if s])
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    for name in presets:
        resolve(name)  # an unknown preset fails here, before any model loads
    configs: dict[str, str | None] = {**{f"ours ({p})": p for p in presets}, BASELINE: None}
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    jobs = len(scripts) * len(configs)
    concurrency = args.concurrency or jobs
    runner = None
    if args.engine_url:
        url = api_base(args.engine_url)
    else:
        print("loading the offline engine (chat role only)...", flush=True)
        runner, url, served = await start_engine(concurrency, args.threads)
        models = [served]
    client = openai.AsyncOpenAI(base_url=url, api_key=os.environ.get("OPENAI_API_KEY", "bench"),
                                max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def play(model: str, script: Script, config: str, window: int) -> list[Reply]:
        async with gate:
            return await converse(client, model, script, config, configs[config], window, args)

    replies: list[Reply] = []
    windows: dict[str, int] = {}
    try:
        for model in models:
            windows[model] = await context_window(client, model)
            runs = await asyncio.gather(*(play(model, s, c, windows[model]) for s in scripts for c in configs))
            replies += [r for run in runs for r in run]
    finally:
        await client.close()
        if runner is not None:
            await runner.cleanup()
    judge = await judge_all(replies, {s.name: s for s in scripts})
    results = {model: {config: summarize([r for r in replies if r.model == model and r.config == config])
                       for config in configs} for model in models}
    by_script = {model: {config: {s.name: summarize([r for r in replies if (r.model, r.config, r.script)
                                                     == (model, config, s.name)]) for s in scripts}
                         for config in configs} for model in models}
    plan = {"scripts": [s.name for s in scripts], "turns": max(len(s.lines[:args.turns or None]) for s in scripts),
            "max_tokens": args.max_tokens, "configs": list(configs), "concurrency": concurrency, "judge": judge,
            "engine": args.engine_url or "offline preset, in-process"}
    return {"plan": plan, "windows": windows, "results": results, "by_script": by_script,
            "replies": [asdict(r) for r in replies]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the report, and return the figures (also written with --json)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    figures = asyncio.run(main_async(args))
    figures["plan"]["wall_s"] = round(time.perf_counter() - started, 1)
    report(figures)
    print(f"total bench time {figures['plan']['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
