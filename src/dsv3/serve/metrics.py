"""Prometheus metrics of the server (``GET /metrics``), in a registry of its own per app.

Requests by endpoint and status; engine gauges (waiting and running sequences, cache blocks in use,
generated tokens per second over a sliding window) updated by the engine thread after every step;
token counters; histograms of time to first token and request latency.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Window over which the tokens/s gauge averages (seconds): long enough to smooth single steps,
# short enough to fall to 0 soon after the load stops.
TOKENS_PER_S_WINDOW = 10.0
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dsv3_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"],
                                registry=r)
        self.waiting = Gauge("dsv3_queue_depth", "sequences waiting for admission to the running batch", registry=r)
        self.running = Gauge("dsv3_running_sequences", "sequences in the running batch", registry=r)
        self.pending = Gauge("dsv3_pending_sequences", "sequences accepted and not finished (the bounded queue)",
                             registry=r)
        self.cache_usage = Gauge("dsv3_cache_usage", "fraction of latent-cache blocks in use", registry=r)
        self.cache_blocks_used = Gauge("dsv3_cache_blocks_used", "latent-cache blocks in use", registry=r)
        self.tokens_per_s = Gauge("dsv3_generation_tokens_per_second",
                                  f"generated tokens per second over the last {TOKENS_PER_S_WINDOW:g} s", registry=r)
        self.prompt_tokens = Counter("dsv3_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("dsv3_generation_tokens", "generated tokens", registry=r)
        self.aborted = Counter("dsv3_aborted_sequences", "sequences cancelled (client gone)", registry=r)
        self.rejected = Counter("dsv3_rejected_requests", "requests refused because the queue was full",
                                registry=r)
        self.ttft = Histogram("dsv3_time_to_first_token_seconds", "time from request to its first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("dsv3_request_latency_seconds", "time from request to its last token",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self._window: deque[tuple[float, int]] = deque()

    def record_step(self, new_tokens: int, waiting: int, running: int, blocks_used: int, num_blocks: int) -> None:
        """Called by the engine thread after each step."""
        now = time.monotonic()
        if new_tokens:
            self.generation_tokens.inc(new_tokens)
            self._window.append((now, new_tokens))
        while self._window and self._window[0][0] < now - TOKENS_PER_S_WINDOW:
            self._window.popleft()
        span = now - self._window[0][0] if len(self._window) > 1 else TOKENS_PER_S_WINDOW
        self.tokens_per_s.set(sum(n for _, n in self._window) / max(span, 1e-3))
        self.waiting.set(waiting)
        self.running.set(running)
        self.cache_blocks_used.set(blocks_used)
        self.cache_usage.set(blocks_used / num_blocks)

    def render(self) -> bytes:
        return generate_latest(self.registry)
