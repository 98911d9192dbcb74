"""The one engine thread behind the server: continuous batching across every HTTP request.

Handlers never touch :class:`dsv3.LLM` themselves. They :meth:`EngineLoop.submit` a
:class:`Generation` (prompt ids, sampling parameters, an asyncio queue) and read deltas from its
queue; the engine thread owns the LLM: it takes new requests and cancellations from a thread-safe
command queue, runs ``LLM.step()`` while anything is scheduled, and hands each sequence's new tokens
to its asyncio queue through ``loop.call_soon_threadsafe``. So ``add_request``, ``step`` and
``abort`` always run on the same thread, between steps.

The queue is bounded: :meth:`submit` refuses (:class:`QueueFull`) when ``max_pending`` sequences are
already accepted and unfinished, and the server answers 429 with ``Retry-After``. A cancelled
generation (the client went away) is aborted in the engine, which frees its cache blocks.

Prompt scoring (:class:`Scoring`, for ``echo`` with ``logprobs`` on completions) runs on the same
thread: one forward of at most :data:`SCORE_CHUNK` prompt tokens per loop turn, over a latent cache
of its own, between engine steps, so a long prompt to score never holds up the running streams for
more than one chunk.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from .metrics import ServerMetrics

# How long the idle engine thread sleeps on its command queue before looking again (seconds);
# any command wakes it at once, this only bounds how late it notices a stop request.
IDLE_POLL_S = 0.5
# Prompt tokens scored per forward (one forward per loop turn, between engine steps).
SCORE_CHUNK = 256


class QueueFull(Exception):
    """The bounded queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server's queue is full, retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Delta:
    """New output of one generation since the previous delta."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list
    finish_reason: str | None = None
    error: str | None = None
    # A stop string ended the generation: the length of the output text before it (the engine
    # matched it; the reply parsers cut there and look for no stop string themselves).
    stop_text_len: int | None = None


@dataclass
class Generation:
    """One sequence to generate, as the HTTP side sees it."""

    prompt_ids: list[int]
    params: object                                   # dsv3.SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue                               # receives (tag, Delta)
    tag: int = 0                                     # e.g. the choice index of an n > 1 request
    created: float = field(default_factory=time.monotonic)
    seq: object = None                               # the engine's Sequence, set by the engine thread
    cancelled: bool = False
    first_token_at: float | None = None
    sent: int = 0                                    # output tokens already handed over


@dataclass
class Scores:
    """Log-probabilities of a prompt's tokens given the tokens before them (the first has none)."""

    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]
    error: str | None = None


@dataclass
class Scoring:
    """One prompt to score; its :class:`Scores` go to ``out`` as ``(tag, Scores)``."""

    prompt_ids: list[int]
    top: int                                         # alternatives per position (logprobs=N)
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    tag: int = 0
    cancelled: bool = False
    done: int = 0                                    # prompt tokens already through the model
    cache: object = None
    logprobs: list = field(default_factory=lambda: [None])
    top_logprobs: list = field(default_factory=lambda: [None])


class EngineLoop:
    """Runs ``llm`` on a daemon thread; see the module docstring.

    Args:
        llm: a :class:`dsv3.LLM`.
        metrics: gauges and counters to update after each step.
        max_pending: sequences accepted and not yet finished, at most (the bounded queue).
        retry_after: seconds a refused client is told to wait.
    """

    def __init__(self, llm, metrics: ServerMetrics, max_pending: int, retry_after: int = 1):
        self.llm, self.metrics = llm, metrics
        self.max_pending, self.retry_after = max_pending, retry_after
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        self._live: dict[int, Generation] = {}          # seq_id -> generation, engine thread only
        self._scoring: list[Scoring] = []                # engine thread only
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
        self.threads = torch.get_num_threads()

    # ------------------------------------------------------------------ HTTP side (event loop thread)
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout=10)

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, gens: list[Generation]) -> None:
        """Queue the generations of one request, all or none (``QueueFull``)."""
        if len(gens) > self.max_pending:
            raise ValueError(f"the request needs {len(gens)} sequences, the server's queue holds {self.max_pending}")
        with self._lock:
            if self._pending + len(gens) > self.max_pending:
                self.metrics.rejected.inc()
                raise QueueFull(self.retry_after)
            self._pending += len(gens)
            self.metrics.pending.set(self._pending)
        for g in gens:
            self._commands.put(("add", g))

    def cancel(self, gens: list) -> None:
        """Abort generations (or scorings) whose client is gone (finished ones are left alone)."""
        for g in gens:
            if isinstance(g, Scoring):
                g.cancelled = True
            else:
                self._commands.put(("abort", g))

    def score(self, jobs: list[Scoring]) -> None:
        """Queue prompts to score (not counted in the bounded queue: they hold no cache blocks)."""
        for job in jobs:
            self._commands.put(("score", job))

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running."""
        return self._thread.is_alive()

    # ------------------------------------------------------------------ engine thread
    def _release(self, n: int = 1) -> None:
        with self._lock:
            self._pending -= n
            self.metrics.pending.set(self._pending)

    def _send(self, gen: Generation, delta: Delta) -> None:
        gen.loop.call_soon_threadsafe(gen.out.put_nowait, (gen.tag, delta))

    def _handle(self, kind: str, gen: Generation | None) -> None:
        if kind == "add":
            if gen.cancelled:
                self._release()
                return
            try:
                gen.seq = self.llm.add_request(gen.prompt_ids, gen.params)
            except Exception as e:             # the HTTP side checks inputs first; this keeps the thread alive
                self._release()
                self._send(gen, Delta([], [], [], "error", f"{type(e).__name__}: {e}"))
                return
            self._live[gen.seq.seq_id] = gen
        elif kind == "score":
            self._scoring.append(gen)
        elif kind == "abort":
            gen.cancelled = True
            seq = gen.seq
            if seq is not None and self._live.pop(seq.seq_id, None) is not None:
                self.llm.abort(seq)
                self.metrics.aborted.inc()
                self._release()

    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while not self._stop.is_set():
                busy = self.llm.scheduler.has_work() or bool(self._scoring)
                try:
                    kind, gen = self._commands.get(block=not busy, timeout=None if busy else IDLE_POLL_S)
                    self._handle(kind, gen)
                    while True:                     # everything else that arrived meanwhile
                        kind, gen = self._commands.get_nowait()
                        self._handle(kind, gen)
                except queue.Empty:
                    pass
                if self._scoring:
                    self._score_chunk(self._scoring[0])
                if self.llm.scheduler.has_work():
                    self._step()
                else:
                    self._update_gauges(0)

    def _score_chunk(self, job: Scoring) -> None:
        """One forward of the next prompt chunk; sends the scores when the prompt is done."""
        if job.cancelled:
            self._scoring.remove(job)
            return
        ids, model = job.prompt_ids, self.llm.model
        try:
            if job.cache is None:
                job.cache = model.new_cache(1, len(ids))
            start, end = job.done, min(len(ids), job.done + SCORE_CHUNK)
            x = torch.tensor([ids[start:end]], device=self.llm.device)
            logp = model(x, start_pos=start, cache=job.cache)[0].float().log_softmax(-1)    # [T, V]
            targets = ids[start + 1:end + 1]                     # position t scores token t + 1
            n = len(targets)
            chosen = logp[:n].gather(1, torch.tensor(targets, device=logp.device)[:, None])[:, 0]
            job.logprobs += chosen.tolist()
            if job.top:
                values, idx = logp[:n].topk(min(job.top, logp.shape[-1]), dim=-1)
                job.top_logprobs += [list(zip(i, v)) for i, v in zip(idx.tolist(), values.tolist())]
            else:
                job.top_logprobs += [[] for _ in range(n)]
            job.done = end
        except Exception as e:                 # a bug: fail this request, keep serving
            self._scoring.remove(job)
            job.loop.call_soon_threadsafe(job.out.put_nowait, (job.tag, Scores([], [], f"{type(e).__name__}: {e}")))
            return
        if job.done == len(ids):
            self._scoring.remove(job)
            job.cache = None
            job.loop.call_soon_threadsafe(job.out.put_nowait, (job.tag, Scores(job.logprobs, job.top_logprobs)))

    def _step(self) -> None:
        try:
            advanced = self.llm.step()
        except Exception as e:                     # a bug: fail the running requests, keep serving
            for gen in list(self._live.values()):
                self._send(gen, Delta([], [], [], "error", f"engine error: {type(e).__name__}: {e}"))
                self.llm.abort(gen.seq)
            self._release(len(self._live))
            self._live.clear()
            return
        new_tokens = 0
        now = time.monotonic()
        for seq in advanced:
            gen = self._live.get(seq.seq_id)
            if gen is None:
                continue
            sent = gen.sent
            toks = seq.output[sent:]
            new_tokens += len(toks)
            gen.sent = len(seq.output)
            if gen.first_token_at is None and toks:
                gen.first_token_at = now
                self.metrics.ttft.observe(now - gen.created)
            want_lp = seq.params.logprobs is not None
            delta = Delta(list(toks), list(seq.logprobs[sent:]) if want_lp else [],
                          list(seq.top_logprobs[sent:]) if want_lp else [],
                          seq.finish_reason if seq.finished else None, stop_text_len=seq.stop_text_len)
            self._send(gen, delta)
            if seq.finished:
                del self._live[seq.seq_id]
                self.metrics.latency.observe(now - gen.created)
                self._release()
        self._update_gauges(new_tokens)

    def _update_gauges(self, new_tokens: int) -> None:
        bm, sched = self.llm.block_manager, self.llm.scheduler
        self.metrics.record_step(new_tokens, len(sched.waiting), len(sched.running), bm.num_blocks - bm.num_free,
                                 bm.num_blocks)
