"""The bot's Prometheus metrics and its one log line per turn.

One `BotMetrics` per bot (its own `CollectorRegistry`, so two bots in one process, as in tests,
never share counters). The pipeline, the scene queue, the voice sessions and the engine client call
its small methods; nothing else in the bot imports prometheus_client. `serve_metrics` serves
`GET /metrics` on MASQUE_METRICS_HOST:MASQUE_METRICS_PORT when the port is set (0: off).

Each turn (a reply, a voice reply, a persona speaking next, a regenerate, a continue, a greeting
shown) ends with one INFO line on the `bot.turns` logger, key=value like the rest of the bot's log:
ids, token counts, latency and outcome, never the story's text and never a secret. The same fields
ride on the record as `masque_turn` for a JSON formatter.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from bot.errors import StoryError

log = logging.getLogger(__name__)
turn_log = logging.getLogger("bot.turns")

# A reply streams for seconds; a voice reply or a slow CPU engine takes longer.
LATENCY_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120, 300)
FIRST_TEXT_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 60)
ENGINE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180, 600)


class _Sink(Protocol):
    async def update(self, text_so_far: str) -> None: ...

    async def finish(self, text: str) -> list[int]: ...


@dataclass
class TurnRecord:
    """What one turn's log line and metrics say; the pipeline fills it in as the turn goes."""

    kind: str
    started: float  # time.perf_counter() when the user's message came (else when the turn began)
    guild: int | None = None
    channel: int | None = None
    story: int | None = None
    turn: int | None = None  # the persona turn made or shown
    persona: int | None = None
    user: int | None = None  # the Discord user answered
    tokens_in: int | None = None  # the prompt: the server's count where it gave one, else our estimate
    tokens_out: int | None = None  # the reply (estimated)
    engine: str = ""  # the chat model id asked
    fusion: str = ""  # our engine's fusion path, when it says
    first_text: float | None = None  # time.perf_counter() when the first reply text showed
    outcome: str = "ok"  # ok, error:<kind>, cancelled

    def about(self, *, guild: int | None = None, channel: int | None = None, story: int | None = None,
              persona: int | None = None, user: int | None = None, turn: int | None = None) -> None:
        """Note the ids known so far (None leaves a field as it is)."""
        for name, value in (("guild", guild), ("channel", channel), ("story", story), ("persona", persona),
                            ("user", user), ("turn", turn)):
            if value is not None:
                setattr(self, name, value)

    def generated(self, *, tokens_in: int, tokens_out: int, engine: str, extras: dict[str, Any]) -> None:
        """Note what the engine was asked and gave."""
        self.tokens_in, self.tokens_out, self.engine = tokens_in, max(tokens_out, 0), engine
        fusion = extras.get("fusion")
        self.fusion = fusion if isinstance(fusion, str) else ""

    def watch(self, sink: _Sink) -> _Sink:
        """`sink`, noting when the first reply text is shown."""
        return _WatchedSink(sink, self)

    def line(self, seconds: float) -> str:
        """The log line: `turn key=value ...` (values with spaces or quotes are JSON-quoted)."""
        fields: dict[str, Any] = {
            "guild": self.guild, "channel": self.channel, "story": self.story, "turn": self.turn,
            "persona": self.persona, "user": self.user, "kind": self.kind, "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out, "latency_ms": round(seconds * 1000)}
        if self.first_text is not None:
            fields["first_text_ms"] = round((self.first_text - self.started) * 1000)
        fields["engine"] = self.engine or None
        if self.fusion:
            fields["fusion"] = self.fusion
        fields["outcome"] = self.outcome
        return "turn " + " ".join(f"{key}={_value(value)}" for key, value in fields.items())


class _WatchedSink:
    """A reply sink that notes when text first shows (after the first update that shows any)."""

    def __init__(self, sink: _Sink, record: TurnRecord):
        self._sink, self._record = sink, record

    async def update(self, text_so_far: str) -> None:
        await self._sink.update(text_so_far)
        if self._record.first_text is None and text_so_far.strip():
            self._record.first_text = time.perf_counter()

    async def finish(self, text: str) -> list[int]:
        ids = await self._sink.finish(text)
        if self._record.first_text is None:
            self._record.first_text = time.perf_counter()
        return ids


def _value(value: Any) -> str:
    text = "-" if value is None else str(value)
    return json.dumps(text) if not text or any(c in text for c in ' "=\n\t') else text


def error_kind(error: BaseException) -> str:
    """How a failed turn or engine call is counted: the engine error's kind (bot/engine_client.py),
    `story` for a story command that cannot be done, `internal` for a bug."""
    kind = getattr(error, "kind", None)
    if isinstance(kind, str) and kind:
        return kind
    return "story" if isinstance(error, StoryError) else "internal"


class BotMetrics:
    """The bot's counters, histograms and gauges, and the per-turn log line."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.turns = Counter("masque_bot_turns", "Turns made or shown, by kind", ["kind"], registry=self.registry)
        self.turn_errors = Counter("masque_bot_turn_errors", "Turns that failed, by kind and error",
                                   ["kind", "error"], registry=self.registry)
        self.latency = Histogram(
            "masque_bot_reply_seconds", "From the user's message (or the button) to the reply shown and stored",
            ["kind"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_text = Histogram(
            "masque_bot_first_text_seconds", "From the user's message (or the button) to the first reply text shown",
            ["kind"], buckets=FIRST_TEXT_BUCKETS, registry=self.registry)
        self.engine_errors = Counter("masque_bot_engine_errors", "Failed engine calls, by kind and route",
                                     ["kind", "route"], registry=self.registry)
        self.engine_latency = Histogram("masque_bot_engine_call_seconds", "Engine calls (a streamed reply whole)",
                                        ["route"], buckets=ENGINE_BUCKETS, registry=self.registry)
        self.queue = Gauge("masque_bot_queue_depth", "Messages waiting for their answer or being answered, "
                           "per channel (channels with any)", ["channel"], registry=self.registry)
        self.queue_all = Gauge("masque_bot_queue_depth_all", "Messages waiting for their answer or being answered, "
                               "in every channel", registry=self.registry)
        self.voice = Gauge("masque_bot_voice_sessions", "Voice sessions playing a story", registry=self.registry)
        self._depths: dict[int, int] = {}
        self._voice: set[int] = set()
        self._shards = _ShardLatency()
        self.registry.register(self._shards)

    # ------------------------------------------------------------ turns

    @contextmanager
    def turn(self, kind: str, started: float | None = None) -> Iterator[TurnRecord]:
        """Time one turn; its outcome comes from how the block ends. Logs the turn's line at the end."""
        record = TurnRecord(kind, time.perf_counter() if started is None else started)
        try:
            yield record
        except Exception as exc:
            record.outcome = f"error:{error_kind(exc)}"
            raise
        except BaseException:
            record.outcome = "cancelled"
            raise
        finally:
            self.finish(record)

    def finish(self, record: TurnRecord) -> None:
        seconds = max(time.perf_counter() - record.started, 0.0)
        if record.outcome == "ok":
            self.turns.labels(record.kind).inc()
            self.latency.labels(record.kind).observe(seconds)
            if record.first_text is not None:
                self.first_text.labels(record.kind).observe(max(record.first_text - record.started, 0.0))
        elif record.outcome.startswith("error:"):
            self.turn_errors.labels(record.kind, record.outcome.removeprefix("error:")).inc()
        turn_log.info("%s", record.line(seconds), extra={"masque_turn": {**asdict(record), "seconds": seconds}})

    # ------------------------------------------------------------ the engine client's observer

    def engine_call(self, route: str, seconds: float, error: BaseException | None) -> None:
        """One engine call ended (bot/engine_client.py): its time, and its error's kind when it failed."""
        self.engine_latency.labels(route).observe(seconds)
        if error is not None:
            self.engine_errors.labels(error_kind(error), route).inc()

    # ------------------------------------------------------------ gauges

    def queue_depth(self, channel_id: int, count: int) -> None:
        """A channel's messages waiting or being answered; a channel with none has no series."""
        if count > 0:
            self._depths[channel_id] = count
            self.queue.labels(str(channel_id)).set(count)
        elif self._depths.pop(channel_id, None) is not None:
            self.queue.remove(str(channel_id))
        self.queue_all.set(sum(self._depths.values()))

    def voice_session(self, guild_id: int, active: bool) -> None:
        """A guild's voice session started or ended (idempotent)."""
        if active:
            self._voice.add(guild_id)
        else:
            self._voice.discard(guild_id)
        self.voice.set(len(self._voice))

    def watch_shards(self, client: Any) -> None:
        """Report `client`'s gateway latency per shard at each scrape (a discord.py client)."""
        self._shards.client = client

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ShardLatency(Collector):
    """Gateway heartbeat latency per shard, read from the discord.py client when scraped."""

    def __init__(self) -> None:
        self.client: Any = None

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("masque_bot_shard_latency_seconds", "Gateway heartbeat latency per shard",
                                   labels=["shard"])
        for shard, seconds in self._latencies():
            if math.isfinite(seconds):  # nan until the first heartbeat is acknowledged
                family.add_metric([str(shard)], seconds)
        yield family

    def _latencies(self) -> list[tuple[int, float]]:
        client = self.client
        if client is None:
            return []
        pairs = getattr(client, "latencies", None)  # AutoShardedClient: every shard of this process
        if pairs is None:
            pairs = [(getattr(client, "shard_id", None) or 0, client.latency)]
        return [(int(shard), float(seconds)) for shard, seconds in pairs]


class MetricsServer:
    """`GET /metrics` for Prometheus, on the bot's event loop."""

    def __init__(self, metrics: BotMetrics, host: str, port: int):
        self.metrics, self.host, self.port = metrics, host, port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response


async def serve_metrics(metrics: BotMetrics, settings: Any) -> MetricsServer | None:
    """Start `/metrics` when MASQUE_METRICS_PORT is set; None when it is not, or the port is taken (logged:
    the stories go on without metrics)."""
    if not settings.metrics_port:
        return None
    server = MetricsServer(metrics, settings.metrics_host, settings.metrics_port)
    try:
        await server.start()
    except OSError as exc:
        log.error("no metrics: cannot listen on %s:%d (%s); check MASQUE_METRICS_HOST and MASQUE_METRICS_PORT",
                  settings.metrics_host, settings.metrics_port, exc)
        return None
    log.info("metrics at http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    return server
