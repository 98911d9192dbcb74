"""`dsv3 serve` on a GPU, in one run (a few minutes on an H100): ``PYTHONPATH=src python benchmarks/gpu/serve.py``.

1. Builds a random checkpoint of the ``small`` preset shape (bf16 on the GPU) with a byte-level BPE
   tokenizer trained on the standard library's sources (no download).
2. ``dsv3 bench serve`` on it with ``--device cuda --dtype bfloat16``: output tokens/s and time to first
   token p50/p99 at concurrency 1, 8, 32, 64, and the same load against ``transformers serve`` on the
   same checkpoint (it needs ``accelerate`` for a GPU ``device_map``; if that is missing the JSON says so).
3. Constrained decoding on the GPU: a JSON-schema request and a forced tool call through the server,
   both must parse and validate.
4. The GPU-marked unit tests of this area (pytest -m gpu tests/test_serve_units.py).

Writes ``serve.json`` into ``$OUT`` when set; the summary table is printed last.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

PRESET = "small"          # ~0.5B total / ~0.1B active parameters

results: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                 else None}


def missing_modules() -> list[str]:
    import importlib.util
    return [m for m in ("fastapi", "uvicorn", "httpx", "xgrammar", "prometheus_client", "openai")
            if importlib.util.find_spec(m) is None]


def build_checkpoint(root: Path) -> str:
    import sysconfig

    import dsv3
    from dsv3.tokenizer import train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:200]]
    tok = train_tokenizer(texts, vocab_size=8192)
    cfg = dataclasses.replace(dsv3.preset(PRESET), vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = dsv3.Transformer(cfg).to(torch.bfloat16)
    out = root / f"{PRESET}-random"
    dsv3.save_pretrained(model, out)
    tok.save(out)
    return str(out)


def constrained_through_server(model_dir: str) -> dict:
    """Start `dsv3 serve` on CUDA and check one JSON-schema and one forced-tool reply."""
    import httpx
    import openai

    from dsv3.bench.serve import _Process, _free_port
    port = _free_port()
    proc = _Process([sys.executable, "-m", "dsv3", "serve", "--model", model_dir, "--port", str(port), "--device",
                     "cuda", "--dtype", "bfloat16", "--served-model-name", "m"], dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    try:
        err = proc.wait_healthy(base, 300)
        if err:
            return {"error": err}
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=300)
        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                  "required": ["city", "days"], "additionalProperties": False}
        t0 = time.perf_counter()
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "weather"}],
                                           temperature=1.0, seed=0, max_tokens=200,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "w", "schema": schema}})
        obj = json.loads(r.choices[0].message.content)
        json_ok = set(obj) == {"city", "days"} and len(obj["city"]) <= 12 and 1 <= obj["days"] <= 7
        t1 = time.perf_counter()
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}}]
        r2 = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "weather"}],
                                            tools=tools, tool_choice="required", temperature=1.0, seed=0,
                                            max_tokens=300)
        calls = r2.choices[0].message.tool_calls or []
        tool_ok = bool(calls) and all(c.function.name == "get_weather" and set(json.loads(c.function.arguments))
                                      == {"city", "days"} for c in calls)
        return {"json_schema_ok": json_ok, "json_schema_s": t1 - t0, "tool_call_ok": tool_ok,
                "tool_call_s": time.perf_counter() - t1, "health": httpx.get(base + "/health").json()}
    finally:
        proc.stop()


def main() -> None:
    missing = missing_modules()
    if missing or not torch.cuda.is_available():
        results["error"] = f"missing modules {missing}" if missing else "no CUDA device"
        return
    from dsv3.bench.serve import bench_serve, format_bench_serve
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_checkpoint(Path(tmp))
        try:
            results["bench"] = bench_serve(model_dir, concurrency=[1, 8, 32, 64], prompt_len=64, gen_len=64,
                                           device="cuda", dtype="bfloat16", peer="transformers", peer_timeout=300)
            results["bench_table"] = format_bench_serve(results["bench"])
        except Exception:
            results["bench_error"] = traceback.format_exc()[-2000:]
        try:
            results["constrained"] = constrained_through_server(model_dir)
        except Exception:
            results["constrained_error"] = traceback.format_exc()[-2000:]
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_serve_units.py"],
                           capture_output=True, text=True)
    results["gpu_tests"] = {"returncode": tests.returncode, "tail": tests.stdout[-1500:]}


if __name__ == "__main__":
    try:
        main()
    except Exception:
        results["error"] = traceback.format_exc()[-3000:]
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "serve.json").write_text(json.dumps(results, indent=2))
    print("\n== dsv3 serve on GPU ==")
    print(f"device: {results.get('device')}, torch {results['torch']}")
    for key in ("error", "bench_error", "constrained_error"):
        if results.get(key):
            print(f"{key}: {results[key]}")
    if results.get("constrained"):
        print(f"constrained decoding through the server: {results['constrained']}")
    if results.get("gpu_tests"):
        print(f"pytest -m gpu: status {results['gpu_tests']['returncode']}: "
              f"{results['gpu_tests']['tail'].strip().splitlines()[-1:]}")
    if results.get("bench_table"):
        print(results["bench_table"])
