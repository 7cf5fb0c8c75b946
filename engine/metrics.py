"""Prometheus metrics for /metrics.

One :class:`Metrics` per application (its own ``CollectorRegistry``, so two servers in one
process, as in tests, never share counters). The middleware records every route generically;
backends add generated tokens; queue depth and GPU memory are read when scraped.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from engine.registry import Registry

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """The engine's counters, histograms and gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "masque_requests", "HTTP requests served", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "masque_request_seconds", "HTTP request latency", ["route"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_depth = Gauge(
            "masque_queue_depth", "Jobs waiting or running per role", ["role"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "masque_generated_tokens", "Tokens generated", ["role"], registry=self.registry
        )
        self.prompt_tokens = Counter(
            "masque_prompt_tokens", "Prompt tokens processed", ["role"], registry=self.registry
        )
        self.tokens_per_second = Gauge(
            "masque_tokens_per_second", "Decode throughput of the latest batch step", ["role"],
            registry=self.registry,
        )
        self.batch_size = Gauge(
            "masque_batch_size", "Sequences in the latest decode step", ["role"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "masque_time_to_first_token_seconds", "Time to first token", ["role"],
            buckets=TTFT_BUCKETS, registry=self.registry,
        )
        self.tpot = Histogram(
            "masque_time_per_output_token_seconds",
            "Decode time per output token after the first, per finished sequence", ["role"],
            buckets=TPOT_BUCKETS, registry=self.registry,
        )
        self.queue_wait = Histogram(
            "masque_queue_wait_seconds", "Time a sequence waited before its prompt ran", ["role"],
            buckets=QUEUE_BUCKETS, registry=self.registry,
        )
        self.batch_sizes = Histogram(
            "masque_batch_size_steps", "Sequences decoded together, per decode step", ["role"],
            buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.prefix_queries = Counter(
            "masque_prefix_cache_queries_tokens", "Prompt tokens looked up in the prefix cache",
            ["role"], registry=self.registry,
        )
        self.prefix_hits = Counter(
            "masque_prefix_cache_hits_tokens", "Prompt tokens served from the prefix cache",
            ["role"], registry=self.registry,
        )
        self.prefix_hit_ratio = Gauge(
            "masque_prefix_cache_hit_ratio", "Share of prompt tokens served from the prefix cache",
            ["role"], registry=self.registry,
        )
        self.prefix_bytes = Gauge(
            "masque_prefix_cache_bytes", "Memory held by the prefix cache", ["role"],
            registry=self.registry,
        )
        self.gpu_memory = Gauge(
            "masque_gpu_memory_bytes", "CUDA memory allocated", ["device"], registry=self.registry
        )

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """Count one HTTP request and its latency."""
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_generation(self, role: str, new_tokens: int, seconds: float, batch: int) -> None:
        """Record one decode step of ``batch`` sequences that made ``new_tokens`` tokens."""
        self.tokens.labels(role).inc(new_tokens)
        self.batch_size.labels(role).set(batch)
        self.batch_sizes.labels(role).observe(batch)
        if seconds > 0:
            self.tokens_per_second.labels(role).set(new_tokens / seconds)

    def observe_sequence(self, role: str, *, queued: float, completion_tokens: int,
                         decode_seconds: float) -> None:
        """Record one finished sequence: its queue wait and time per output token."""
        self.queue_wait.labels(role).observe(queued)
        if completion_tokens > 1 and decode_seconds > 0:
            self.tpot.labels(role).observe(decode_seconds / (completion_tokens - 1))

    def observe_prefix(self, role: str, prompt_tokens: int, reused: int, cache_bytes: int) -> None:
        """Record one prefix-cache lookup (in tokens, as vLLM counts them)."""
        self.prefix_queries.labels(role).inc(prompt_tokens)
        self.prefix_hits.labels(role).inc(reused)
        queried = self.prefix_queries.labels(role)._value.get()  # noqa: SLF001 - our own counter
        hits = self.prefix_hits.labels(role)._value.get()  # noqa: SLF001
        self.prefix_hit_ratio.labels(role).set(hits / queried if queried else 0.0)
        self.prefix_bytes.labels(role).set(cache_bytes)

    def render(self, registry: Registry | None) -> bytes:
        """The Prometheus text exposition, with gauges refreshed now."""
        if registry is not None:
            for role, depth in registry.queue_depths().items():
                self.queue_depth.labels(role).set(depth)
        self._refresh_gpu_memory()
        return generate_latest(self.registry)

    def _refresh_gpu_memory(self) -> None:
        import torch  # already imported by the backends; keeps this module light for tests

        if not torch.cuda.is_available():
            return
        for index in range(torch.cuda.device_count()):
            self.gpu_memory.labels(f"cuda:{index}").set(torch.cuda.memory_allocated(index))


CONTENT_TYPE = CONTENT_TYPE_LATEST

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def metrics_middleware(metrics: Metrics) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A middleware recording every request's route, status and latency."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            info = request.match_info
            resource = info.route.resource if info.route is not None else None
            route = resource.canonical if resource is not None else "unmatched"
            metrics.observe_request(route, status, time.perf_counter() - start)

    return middleware
