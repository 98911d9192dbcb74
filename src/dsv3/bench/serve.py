"""``dsv3 bench serve``: our HTTP server under concurrent load, against ``transformers serve``.

Each server runs as its own process on a free loopback port with the same checkpoint, fp32, on the
same CPU and thread count. A load level is ``concurrency`` clients that each send streaming
``/v1/completions`` requests back to back until ``requests`` have been sent: greedy, ``max_tokens =
gen_len``, ``ignore_eos`` for ours only (``transformers serve`` answers that field with a 422; tokens are counted
from ``usage``, so an early stop would show, and a random or tiny model rarely stops), with
prompts made of ``prompt_len`` random ordinary tokens of the checkpoint's tokenizer (the same prompts
for both servers). Measured per level, from the client side:

* output tokens/s = completion tokens (``usage`` of the last chunk, else chunks with text) / wall time;
* requests/s;
* time to first token (request sent -> first streamed chunk carrying text), p50 and p99;
* request latency p50.

``ratio`` is ours / peer for tokens/s (higher is better) and peer / ours for TTFT (higher is better).

``transformers serve`` passes ``device_map`` to ``from_pretrained``, which needs the ``accelerate``
package. When that is not installed the peer is started through a launcher that skips that one
check for a CPU run (``device_map=None``, i.e. load on the CPU -- what ``device_map="cpu"`` means);
the JSON says so under ``peer.launch``. If the peer cannot run at all the JSON records why.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .machine import machine_info

REQUEST_TIMEOUT_S = 600
WARMUP_REQUESTS = 2

# Runs `transformers serve ARGS...` with the device_map check relaxed for CPU (see the module docstring).
_TRANSFORMERS_LAUNCHER = """
import sys
import transformers.modeling_utils as mu
if {shim}:
    _check = mu.check_and_set_device_map
    mu.check_and_set_device_map = lambda dm: None if dm in ("cpu", None) else _check(dm)
from transformers.cli.transformers import main
sys.argv = ["transformers", "serve", *sys.argv[1:]]
sys.exit(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile ``q`` in [0, 100] (numpy's default method)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class _Process:
    """A server subprocess whose output goes to a log file (read back when it fails)."""

    def __init__(self, argv: list[str], env: dict):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, text=True)

    def tail(self, n: int = 1500) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-n:]

    def wait_healthy(self, base: str, timeout: float) -> str | None:
        """None once ``/health`` answers 200, else the reason it didn't."""
        import httpx
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"exited with status {self.proc.returncode}: {self.tail()}"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    return None
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        return f"no healthy /health within {timeout:.0f} s: {self.tail()}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        os.unlink(self.log.name)


async def _one(client, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    ttft = None
    tokens = chunks = 0
    async with client.stream("POST", url, json=body, timeout=REQUEST_TIMEOUT_S) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']}")
            if any(c.get("text") for c in event.get("choices") or []):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"ttft": ttft, "latency": time.perf_counter() - t0, "tokens": tokens or chunks}


async def _level(base: str, model: str, prompts: list[str], concurrency: int, gen_len: int, extra: dict) -> dict:
    import httpx
    url = base + "/v1/completions"
    todo = list(prompts)
    results: list[dict] = []

    def body(prompt: str) -> dict:
        return {"model": model, "prompt": prompt, "max_tokens": gen_len, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, **extra}

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        for p in prompts[:WARMUP_REQUESTS]:
            await _one(client, url, body(p))

        async def worker():
            while todo:
                results.append(await _one(client, url, body(todo.pop())))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall, "output_tokens": tokens,
            "tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall,
            "ttft_ms_p50": _ms(_percentile(ttfts, 50)), "ttft_ms_p99": _ms(_percentile(ttfts, 99)),
            "latency_ms_p50": _ms(_percentile([r["latency"] for r in results], 50))}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def _prompts(model_dir: str, n: int, prompt_len: int, seed: int) -> list[str]:
    from ..tokenizer import Tokenizer
    tok = Tokenizer.load(model_dir)
    rng = random.Random(seed)
    ordinary = [i for i in range(tok.vocab_size) if i not in tok.special_ids]
    return [tok.decode([rng.choice(ordinary) for _ in range(prompt_len)]) for _ in range(n)]


def _run_levels(base: str, model: str, prompts: list[str], levels: list[tuple[int, int]], gen_len: int,
                extra: dict | None = None) -> list:
    return [asyncio.run(_level(base, model, prompts[:n], c, gen_len, extra or {})) for c, n in levels]


def bench_serve(model_dir: str, concurrency: list[int] = (1, 8, 32), requests: int | None = None,
                prompt_len: int = 32, gen_len: int = 32, threads: int | None = None, peer: str = "transformers",
                peer_timeout: int = 180, seed: int = 0, device: str = "cpu", dtype: str = "float32") -> dict:
    """Run the load levels against ``dsv3 serve`` (and ``transformers serve``); the JSON-able result."""
    import torch

    threads = threads or torch.get_num_threads()
    levels = [(c, requests or max(4, 2 * c)) for c in concurrency]
    prompts = _prompts(model_dir, max(n for _, n in levels) + WARMUP_REQUESTS, prompt_len, seed)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    result = {"model": model_dir, "prompt_len_tokens": prompt_len, "gen_len": gen_len, "endpoint": "/v1/completions",
              "stream": True, "machine": machine_info(threads, torch.device(device)), "levels": concurrency,
              "dtype": dtype}

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    ours = _Process([sys.executable, "-m", "dsv3", "serve", "--model", model_dir, "--port", str(port),
                     "--threads", str(threads), "--max-num-seqs", str(max(concurrency)), "--device", device,
                     "--dtype", dtype,
                     "--max-queue", str(4 * max(concurrency) + 8), "--served-model-name", "bench"], env)
    try:
        error = ours.wait_healthy(base, 180)
        if error:
            raise RuntimeError(f"dsv3 serve did not start: {error}")
        result["ours"] = {"name": "dsv3 serve", "results": _run_levels(base, "bench", prompts, levels, gen_len,
                                                                        {"ignore_eos": True})}
    finally:
        ours.stop()

    if peer == "transformers":
        result["peer"] = _bench_transformers(model_dir, prompts, levels, gen_len, peer_timeout, env, device, dtype)
        if result["peer"].get("results"):
            result["ratio"] = [
                {"concurrency": o["concurrency"],
                 "tokens_per_s_ours_over_peer": o["tokens_per_s"] / p["tokens_per_s"],
                 "ttft_p50_peer_over_ours": p["ttft_ms_p50"] / o["ttft_ms_p50"],
                 "ttft_p99_peer_over_ours": p["ttft_ms_p99"] / o["ttft_ms_p99"]}
                for o, p in zip(result["ours"]["results"], result["peer"]["results"])]
    return result


def _bench_transformers(model_dir, prompts, levels, gen_len, timeout, env, device, dtype) -> dict:
    try:
        import transformers
    except ImportError as e:
        return {"name": "transformers serve", "error": f"transformers is not installed: {e}"}
    # The shim only helps a CPU run; on a GPU without accelerate the peer fails and says why.
    shim = importlib.util.find_spec("accelerate") is None and device == "cpu"
    launch = ("transformers serve with from_pretrained's device_map check skipped for CPU (accelerate is not "
              "installed; transformers serve always passes device_map)") if shim else "transformers serve"
    out = {"name": "transformers serve", "version": transformers.__version__, "launch": launch,
           "flags": ["--device", device, "--dtype", dtype]}
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _Process([sys.executable, "-c", _TRANSFORMERS_LAUNCHER.format(shim=shim), os.path.abspath(model_dir),
                     "--host", "127.0.0.1", "--port", str(port), *out["flags"]], env)
    try:
        error = proc.wait_healthy(base, timeout)
        if error:
            out["error"] = f"transformers serve did not start: {error}"
            return out
        out["results"] = _run_levels(base, os.path.abspath(model_dir), prompts, levels, gen_len)
    except Exception as e:          # record why the peer failed; ours is already measured
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        proc.stop()
    return out


def format_bench_serve(r: dict) -> str:
    lines = [f"dsv3 bench serve: {r['model']}  prompt {r['prompt_len_tokens']} tok, {r['gen_len']} new tok/request, "
             f"threads {r['machine']['threads']}",
             f"{'server':<20} {'conc':>4} {'reqs':>5} {'tok/s':>8} {'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
             f"{'lat p50':>8}"]
    for side in ("ours", "peer"):
        s = r.get(side)
        if not s:
            continue
        if s.get("error"):
            lines.append(f"{s['name']:<20} error: {s['error'][:300]}")
        for x in s.get("results", []):
            lines.append(f"{s['name']:<20} {x['concurrency']:>4} {x['requests']:>5} {x['tokens_per_s']:>8.1f} "
                         f"{x['requests_per_s']:>7.2f} {x['ttft_ms_p50']:>7.0f}ms {x['ttft_ms_p99']:>7.0f}ms "
                         f"{x['latency_ms_p50']:>6.0f}ms")
    for x in r.get("ratio", []):
        lines.append(f"ratio at concurrency {x['concurrency']}: tokens/s ours/peer "
                     f"{x['tokens_per_s_ours_over_peer']:.2f}x, TTFT p50 peer/ours {x['ttft_p50_peer_over_ours']:.2f}x")
    return "\n".join(lines)
