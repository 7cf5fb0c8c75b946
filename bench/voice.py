"""Voice benchmark (not a test: nothing here is asserted).

Run from the repository root::

    .venv/bin/python -m bench.voice              # every section, the offline engine included (minutes)
    .venv/bin/python -m bench.voice --quick      # small sizes, fakes only (the CI smoke test)
    .venv/bin/python -m bench.voice --json out.json

1. **Receive path**: the bot's CPU per second of received audio with 10 speakers talking at once.
   Real encrypted RTP packets (espeak-ng speech, real libopus, XChaCha20 rtpsize, an RTP header
   extension on every packet) go through `VoiceReceiver.feed` (decrypt, Opus decode) into
   `TurnTaker.push` (voice activity), as discord.py's socket reader would hand them over. Reported
   as a share of one core per active speaker (target: at most 2 %), plus the cost of DAVE decryption
   per packet (one speaker in a real davey MLS group).
2. **Reply latency, the bot's own cost**: the real MasqueBot in a voice call on the fake Discord
   (tests/fakes/fake_voice.py), a zero-delay fake engine (a fixed transcript, reply and speech).
   A user speaks; measured from the user's last packet to the first audible packet the bot sends
   back, less the silence window that ends a turn (target: p50/p95 at most 300 ms). The bot's own
   figure (end of the silence window to the start of playback) is printed beside it.
3. **Reply latency on the offline engine** (skipped with --quick): the same, with the bot on the
   real offline engine (Whisper tiny.en, SmolLM2, Piper) as a child process: what a user waits.
4. **STT and TTS real-time factors** through the engine's HTTP API (skipped with --quick): seconds
   of processing per second of audio, as the bot sees them.

Sections 2 and 3 run the fake Discord and the fake voice server in the bot's own process, so their
work (Opus encoding of the user's speech, decoding the bot's) shares the event loop with the bot:
the latency figures are an upper bound of the bot's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import discord.opus
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.builtin import builtin_personas  # noqa: E402
from bot.engine_client import EngineClient  # noqa: E402
from bot.engine_process import EngineProcess  # noqa: E402
from bot.settings import BotSettings  # noqa: E402
from bot.store import Store  # noqa: E402
from bot.voice.audio import decode_to_pcm, pcm_to_wav, resample_pcm  # noqa: E402
from bot.voice.receiver import VoiceReceiver  # noqa: E402
from bot.voice.turns import FRAME_BYTES, TurnTaker, level_dbfs  # noqa: E402
from tests.fakes.fake_discord import FakeDiscord  # noqa: E402
from tests.fakes.fake_engine import FakeEngine, espeak_wav  # noqa: E402
from tests.fakes.fake_voice import FakeVoiceServer, espeak_pcm, opus_frames, seal_rtp  # noqa: E402

SPEECH = "Good evening keeper. Is the lamp lit tonight, and did the boats come home?"
QUESTION = "Hello keeper. What is your name?"
REPLY = "My name is Wren. I keep the lighthouse on the hill."
KEY = bytes(range(32))
MODE = "aead_xchacha20_poly1305_rtpsize"
OWN_SSRC = 1


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# ---------------------------------------------------------------- 1. receive path


class _State:
    """What the receiver reads of discord.py's VoiceConnectionState."""

    def __init__(self, dave_session: Any = None) -> None:
        self.secret_key, self.mode, self.ssrc = list(KEY), MODE, OWN_SSRC
        self.dave_session, self.dave_protocol_version = dave_session, 1 if dave_session else 0


def _speech_frames(seconds: float) -> list[bytes]:
    """`seconds` of espeak-ng speech as 20 ms Opus frames (the clip repeated)."""
    clip = opus_frames(espeak_pcm(SPEECH))
    need = int(seconds / 0.02)
    return (clip * (need // len(clip) + 1))[:need]


def receive_cpu(speakers: int, seconds: float) -> dict[str, float]:
    """CPU of feed -> decrypt -> Opus decode -> voice activity, for `speakers` talking for `seconds`."""
    frames = _speech_frames(seconds)
    packets = [seal_rtp(KEY, i * speakers + s + 1, 1000 + s, i, i * 960, frame)
               for i, frame in enumerate(frames) for s in range(speakers)]
    loop = asyncio.new_event_loop()
    turns = TurnTaker()
    delivered = 0

    def on_frame(user_id: int, pcm: bytes) -> None:
        nonlocal delivered
        delivered += 1
        turns.push(user_id, pcm, time.monotonic())

    receiver = VoiceReceiver(lambda: _State(), on_frame, loop)
    for s in range(speakers):
        receiver.map_ssrc(1000 + s, 500 + s)
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    for index, packet in enumerate(packets):
        receiver.feed(packet)
        if index % (speakers * 25) == 0:  # the loop runs the callbacks and polls, as the session does
            loop.run_until_complete(asyncio.sleep(0))
            turns.poll(time.monotonic())
    while delivered < len(packets):
        loop.run_until_complete(asyncio.sleep(0))
    cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start_wall
    loop.close()
    audio_s = speakers * seconds
    return {"speakers": speakers, "seconds": seconds, "packets": len(packets), "cpu_s": cpu, "wall_s": wall,
            "us_per_packet": cpu / len(packets) * 1e6, "core_share_per_speaker": cpu / audio_s,
            "transport_failures": receiver.stats.transport_failures}


def dave_cost(packets: int) -> dict[str, float]:
    """Extra CPU per packet of DAVE decryption (a real davey group of the bot and one speaker)."""
    from tests.fakes.dave_group import DAVE_SPEAKER_ID, dave_pair

    bot, speaker = dave_pair()
    frames = _speech_frames(packets * 0.02)
    results = {}
    for label, session in (("plain", None), ("dave", bot)):
        loop = asyncio.new_event_loop()
        sealed = [seal_rtp(KEY, i + 1, 1000, i, i * 960, speaker.encrypt_opus(f) if session else f)
                  for i, f in enumerate(frames)]
        receiver = VoiceReceiver(lambda session=session: _State(session), lambda uid, pcm: None, loop)
        receiver.map_ssrc(1000, DAVE_SPEAKER_ID)
        start = time.process_time()
        for packet in sealed:
            receiver.feed(packet)
        results[label] = (time.process_time() - start) / len(sealed) * 1e6
        results[f"{label}_dave_failures"] = receiver.stats.dave_failures
        loop.close()
    return {"us_per_packet_plain": results["plain"], "us_per_packet_dave": results["dave"],
            "dave_failures": results["dave_dave_failures"]}


# ---------------------------------------------------------------- 2 and 3. reply latency


async def reply_latency(utterances: int, engine_url: str | None, store: Store, database_url: str) -> dict[str, Any]:
    """Speak `utterances` questions in a voice call; time from the last packet to the first audible reply."""
    from tests.bot.test_e2e_gateway import running_bot, start_story

    fake: FakeEngine | None = None
    if engine_url is None:  # zero delay: the engine's answers are made before the clock starts
        fake = FakeEngine(reply=REPLY, masque=False)
        fake.transcriber = lambda data: QUESTION
        fake.speech_audio = espeak_wav(REPLY)
        engine_url = await fake.start()
    question = without_trailing_silence(await asyncio.to_thread(espeak_pcm, QUESTION))
    waits, bot_own, silence_s = [], [], 0.0
    async with FakeVoiceServer() as voice, FakeDiscord(voice=voice) as server:
        voice.trust_in_process()
        async with running_bot(server, engine_url, store, database_url) as bot:
            await start_story(server)
            await server.user_joins_voice(server.world.user_id)
            await server.slash("voice join")
            await voice.wait_connected(30)
            session = await _until(lambda: bot.get_cog("Voice").sessions.get(server.world.guild_id), 30)
            silence_s = session.turns.silence_s
            for _ in range(utterances):
                voice.clear_received()
                answered = session.stats.answered
                await voice.speak(server.world.user_id, question)
                spoken_at = time.perf_counter()
                await _until(lambda: voice.first_loud_at is not None, 300)
                waits.append(voice.first_loud_at - spoken_at)
                await _until(lambda done=answered: session.stats.answered > done and not session._speaker.speaking,
                             300)
                await asyncio.sleep(0.3)
            bot_own = list(session.stats.first_audio_delays)
    if fake is not None:
        await fake.stop()
    own = [w - silence_s for w in waits]
    return {"utterances": utterances, "silence_window_s": silence_s,
            "wait_p50_s": percentile(waits, 50), "wait_p95_s": percentile(waits, 95),
            "after_silence_p50_s": percentile(own, 50), "after_silence_p95_s": percentile(own, 95),
            "bot_measured_p50_s": percentile(bot_own, 50), "bot_measured_p95_s": percentile(bot_own, 95)}


def without_trailing_silence(pcm: bytes) -> bytes:
    """The clip up to its last voiced 20 ms frame, so its last packet is where the silence window starts."""
    frames = [pcm[i:i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]
    voiced = [i for i, f in enumerate(frames) if level_dbfs(f) > BotSettings().voice_vad_threshold_dbfs]
    return b"".join(frames[: voiced[-1] + 1]) if voiced else pcm


async def _until(predicate, wait_s: float):
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        await asyncio.sleep(0.005)
    raise TimeoutError(f"nothing after {wait_s} s")


# ---------------------------------------------------------------- 4. real-time factors


async def real_time_factors(engine_url: str, repeats: int = 3) -> dict[str, float]:
    """Seconds of work per second of audio for /v1/audio/transcriptions and /v1/audio/speech."""
    client = EngineClient([engine_url], timeout_s=300)
    clip = espeak_pcm(SPEECH)
    clip_s = len(clip) / (48000 * 4)
    wav16k = pcm_to_wav(resample_pcm(clip, from_rate=48000, from_channels=2, to_rate=16000, to_channels=1),
                        rate=16000, channels=1)
    stt, tts, spoken_s = [], [], 0.0
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            await client.transcribe(wav16k, "clip.wav", "audio/wav")
            stt.append((time.perf_counter() - start) / clip_s)
            start = time.perf_counter()
            audio = await client.speech(REPLY, response_format="wav")
            took = time.perf_counter() - start
            spoken_s = len(decode_to_pcm(audio, rate=16000, channels=1)) / 32000
            tts.append(took / spoken_s)
    finally:
        await client.close()
    return {"stt_clip_s": clip_s, "stt_rtf": statistics.median(stt), "tts_audio_s": spoken_s,
            "tts_rtf": statistics.median(tts)}


# ---------------------------------------------------------------- main


async def _run_calls(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    """Sections 2 to 4: the bot in a voice call."""
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite+aiosqlite:///{folder}/bench.db"
        store = Store(url)
        await store.upgrade()
        await store.sync_builtin_personas(builtin_personas())
        try:
            figures["latency_fake_engine"] = await reply_latency(2 if args.quick else args.utterances, None,
                                                                 store, url)
            if not args.quick:
                engine = EngineProcess("offline", progress=lambda line: print(f"  engine: {line}"))
                await engine.start()
                try:
                    figures["rtf"] = await real_time_factors(engine.base_url)
                    figures["latency_offline_engine"] = await reply_latency(args.offline_utterances,
                                                                            engine.base_url, store, url)
                finally:
                    await engine.stop()
        finally:
            await store.close()


def report(figures: dict[str, Any]) -> str:
    r, d = figures["receive"], figures["dave"]
    lines = ["1. receive path (feed -> decrypt -> Opus -> voice activity)",
             f"   {r['speakers']} speakers x {r['seconds']:g} s: {r['cpu_s'] * 1000:.0f} ms CPU, "
             f"{r['us_per_packet']:.0f} us/packet = {r['core_share_per_speaker'] * 100:.2f} % of a core "
             "per active speaker (target <= 2 %)",
             f"   DAVE decryption: {d['us_per_packet_dave']:.0f} us/packet vs {d['us_per_packet_plain']:.0f} "
             f"without ({d['dave_failures']} failures)"]
    for key, title in (("latency_fake_engine", "2. reply latency, zero-delay fake engine (the bot's own cost)"),
                       ("latency_offline_engine", "3. reply latency, offline engine")):
        if key in figures:
            f = figures[key]
            lines += [title,
                      f"   {f['utterances']} utterances; end of speech -> first audible reply packet: "
                      f"p50 {f['wait_p50_s'] * 1000:.0f} ms, p95 {f['wait_p95_s'] * 1000:.0f} ms",
                      f"   less the {f['silence_window_s'] * 1000:.0f} ms silence window: "
                      f"p50 {f['after_silence_p50_s'] * 1000:.0f} ms, p95 {f['after_silence_p95_s'] * 1000:.0f} ms"
                      f" (the bot's own clock: p50 {f['bot_measured_p50_s'] * 1000:.0f} ms, "
                      f"p95 {f['bot_measured_p95_s'] * 1000:.0f} ms)"]
    if "rtf" in figures:
        f = figures["rtf"]
        lines += ["4. real-time factors through the engine's API (lower is faster)",
                  f"   speech to text: {f['stt_rtf']:.3f} ({f['stt_clip_s']:.1f} s clip); "
                  f"text to speech: {f['tts_rtf']:.3f} ({f['tts_audio_s']:.1f} s of speech)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, fakes only")
    parser.add_argument("--utterances", type=int, default=20)
    parser.add_argument("--offline-utterances", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not discord.opus.is_loaded():
        discord.opus._load_default()  # noqa: SLF001
    speakers, seconds = (10, 2.0) if args.quick else (10, 10.0)
    figures: dict[str, Any] = {"receive": receive_cpu(speakers, seconds),  # each runs a loop of its own
                               "dave": dave_cost(100 if args.quick else 1000)}
    asyncio.run(_run_calls(args, figures))
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
