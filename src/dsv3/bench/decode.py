"""``dsv3 bench decode``: greedy decoding of our engine against its peers and the memory roofline, in one run.

Every engine gets the same checkpoint directory at the same precision, the same prompts (random
token ids from a seeded generator, all ``prompt_len`` long), exactly ``gen_len`` new tokens per
sequence by greedy decoding with end-of-sequence ignored, and the same number of threads. For each
batch size (``batch``: one or several, e.g. 1, 8, 32) the engines take turns round by round in an
order that rotates every round (ours, peer A, peer B, then peer A, peer B, ours, ...), so load from
other processes falls on all of them alike; medians of the timed rounds are reported.

Peers (:mod:`dsv3.bench.decode_engines`): ``transformers`` (``generate``; the default, as before),
``llama.cpp`` (the checkpoint converted to GGUF at the compared precision) and ``vllm`` (its CPU
backend). Equal precision: ours fp32 = llama.cpp f32 = vLLM float32 = transformers float32; bf16 =
bf16 = bfloat16 = bfloat16; our weight-only int8 = llama.cpp q8_0 (vLLM and transformers have no
equal path: skipped, with the reason). A peer that is not installed is reported, not raised.

Each round is split by the engine into prefill (until every sequence has its first new token) and
decode (the other ``gen_len - 1`` steps). Reported per engine and batch: prefill seconds, ms per
decode step, decode tokens/s (``batch`` tokens per step), end-to-end tokens/s
(``batch * gen_len / (prefill + decode)``) and per-token latency; per peer: the ratios ours / peer
(decode and end to end) and the greedy agreement (identical sequences, first divergence of each).

The roofline (:mod:`dsv3.bench.roofline`): bytes a decode step must read, counted from our loaded
model's tensors at their stored precision, with the routed experts the batch really touched
(counted in an untimed round) and the latent cache at the mean context; a stream-read bandwidth
probe measured in the same run with the same threads; the fraction reached is
``bytes per step / (bandwidth * step time)`` for every engine. The JSON also records the CPU model,
its AVX2/AVX512/AMX flags, torch's CPU capability and the load average before and after.

With ``speculative="mtp"`` a second engine on the same weights decodes with MTP speculation; with
``compile=True`` a third runs ``torch.compile``'d decode steps. Both are timed in the same rotation
and reported against ours without them.

``dsv3 bench decode --random-preset`` (no checkpoint) lives in :mod:`dsv3.bench.decode_preset`.
"""

from __future__ import annotations

import inspect
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..accounting import param_counts
from .decode_engines import (OursEngine, Peer, Precision, RunContext, agreement, check_precision,
                             dynamic_cache_bytes, resolve_peer)
from .decode_preset import (WARMUP_TOKENS, bench_decode_roofline, format_bench_roofline, random_model,
                            random_prompts)
from .machine import load_average, machine_info, resolve_device, torch_threads
from .roofline import ExpertCounter, bandwidth_probe, decode_step_bytes, measure_bandwidth, model_step_bytes

# The random-preset roofline and the roofline pieces stay importable from here (they lived here before).
__all__ = ["bench_decode", "format_bench_decode", "parse_batches", "bench_decode_roofline", "format_bench_roofline",
           "decode_step_bytes", "model_step_bytes", "measure_bandwidth", "random_model", "random_prompts",
           "engine_supports_speculative", "ours_cache_bytes"]

DEFAULT_PEERS = ("transformers",)


# ------------------------------------------------------------------------------------- helpers
def engine_supports_speculative() -> bool:
    """Whether this ``dsv3.LLM`` takes ``speculative=`` (MTP speculative decoding)."""
    from ..engine import LLM
    return "speculative" in inspect.signature(LLM.__init__).parameters


def engine_supports_quantize() -> bool:
    """Whether this ``dsv3.LLM`` takes ``quantize=`` (weight-only int8/int4)."""
    from ..engine import LLM
    return "quantize" in inspect.signature(LLM.__init__).parameters


def parse_batches(spec: str | int | Sequence[int]) -> list[int]:
    """Batch sizes from ``8``, ``"1,8,32"`` or ``[1, 8, 32]``: positive, no repeats, in the given order."""
    if isinstance(spec, int):
        items: list = [spec]
    elif isinstance(spec, str):
        items = [s.strip() for s in spec.split(",")]
    else:
        items = list(spec)
    out = []
    for s in items:
        try:
            b = int(s)
        except (TypeError, ValueError):
            raise ValueError(f"batch sizes must be positive integers separated by commas, got {spec!r}") from None
        if b < 1:
            raise ValueError(f"batch sizes must be >= 1, got {b}")
        if b in out:
            raise ValueError(f"batch size {b} given twice in {spec!r}")
        out.append(b)
    if not out:
        raise ValueError("no batch size given")
    return out


def ours_cache_bytes(llm, num_hidden_layers: int) -> dict:
    """Bytes per cached token of the engine's paged latent cache, read off its allocation.

    The cache allocates ``num_layers`` layers (the main ones plus one per MTP module) of
    ``num_blocks * block_size`` slots; a token of a sequence takes one slot in every layer.
    """
    cache = llm.cache
    slots = cache.num_blocks * cache.block_size
    per_slot = cache.nbytes() / slots                    # all allocated layers, MTP included
    layers = cache.c_kv.shape[0]
    per_layer = per_slot / layers
    return {
        "per_token": per_layer * num_hidden_layers,      # what the main model keeps, comparable with transformers
        "per_slot_allocated": per_slot,
        "allocated_layers": layers,
        "per_layer": per_layer,
        "layout": {"c_kv": list(cache.c_kv.shape[2:]), "k_pe": list(cache.k_pe.shape[2:]),
                   "dtype": str(cache.c_kv.dtype).removeprefix("torch.")},
        "total_bytes": cache.nbytes(),
        "slots": slots,
    }


def spec_summary(before: dict, after: dict) -> dict:
    """Acceptance statistics of the timed rounds (counters ``after - before``) plus the engine's own."""
    def counter(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    delta = {k: v - before[k] for k, v in after.items() if counter(v) and counter(before.get(k))}
    out = {"engine": dict(after), "timed_rounds": delta}
    drafted, accepted = delta.get("drafted"), delta.get("accepted")
    out["acceptance_rate"] = (accepted / drafted if drafted else None) if drafted is not None and accepted is not None \
        else after.get("acceptance_rate")
    steps, emitted = delta.get("verify_steps"), delta.get("emitted")
    out["mean_accepted_length"] = (emitted / steps if steps else None) if steps is not None and emitted is not None \
        else after.get("mean_accepted_length")
    return out


def _spec_stats(llm) -> dict:
    stats = getattr(llm, "spec_stats", None)
    return dict(stats) if stats else {}


def _error_text(e: BaseException, limit: int = 2000) -> str:
    """``Type: message`` of a peer's exception; its log tail included (vLLM's), cut to the last ``limit`` chars."""
    text = f"{type(e).__name__}: {str(e).strip()}".rstrip(": ")
    return text if len(text) <= limit else text[:200] + "\n...\n" + text[-(limit - 200):]


def summarize_rounds(name: str, info: dict, rounds: list[dict], batch: int, gen_len: int) -> dict:
    """Medians of an engine's timed rounds: prefill, decode, total; tokens/s, ms per decode step."""
    prefill = [r["prefill_s"] for r in rounds]
    decode = [r["decode_s"] for r in rounds]
    total = [p + d for p, d in zip(prefill, decode)]
    med_total, med_decode = statistics.median(total), statistics.median(decode)
    decode_tokens = rounds[-1]["decode_tokens"]
    steps = decode_tokens / batch                      # decode steps of one sequence
    return {
        "name": name,
        **info,
        "time_s_median": med_total,
        "time_s_mean": statistics.fmean(total),
        "time_s_min": min(total),
        "time_s_all": total,
        "prefill_s_median": statistics.median(prefill),
        "prefill_s_all": prefill,
        "decode_s_median": med_decode,
        "decode_s_all": decode,
        "decode_tokens": decode_tokens,
        "tokens_per_s": batch * gen_len / med_total,
        "latency_ms_per_token": 1000 * med_total / gen_len,
        "decode_tokens_per_s": decode_tokens / med_decode if decode_tokens and med_decode > 0 else None,
        "step_ms": 1000 * med_decode / steps if steps else None,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


# ------------------------------------------------------------------------------------- the benchmark
def bench_decode(model: str | Path, batch: int | str | Sequence[int] = 1, prompt_len: int = 32, gen_len: int = 64,
                 threads: int | None = None, seed: int = 0, speculative: str | None = None,
                 num_speculative_tokens: int = 1, repeats: int = 3, warmup: int = 1,
                 device: str | torch.device | None = None, compile: bool = False,
                 peers: Sequence[str | Peer] | None = None, dtype: str = "float32", quantize: str | None = None,
                 gguf_dir: str | Path | None = None, roofline: bool = True, progress=None) -> dict:
    """Time greedy decoding of ours and of ``peers`` on the checkpoint directory ``model``.

    ``batch``: one batch size or several (``"1,8,32"``); each is run in turn with all engines.
    ``peers``: names (``transformers``, ``llama.cpp``, ``vllm``) or :class:`Peer` objects; None means
    ``["transformers"]`` (the comparison of earlier versions), ``[]`` ours alone. ``dtype``
    (``float32`` | ``bfloat16`` | ``auto``: :func:`dsv3.cpu.auto_dtype`'s choice for this CPU) and ``quantize`` (None | ``int8`` | ``int4``, weight-only) set our
    precision; each peer runs at its equal one or is skipped with the reason. ``gguf_dir`` keeps the
    GGUF files llama.cpp gets (reused on the next run; default: a temporary directory). ``repeats``
    timed rounds per batch after ``warmup`` untimed ones (of ``WARMUP_TOKENS`` new tokens).
    ``roofline``: probe the memory bandwidth and report the fraction of the roofline. ``progress``:
    called with a line of text after every round (the CLI prints them to stderr). Returns a
    JSON-ready dict; with a single batch size its fields are also at the top level (as before).
    """
    batches = parse_batches(batch)
    if prompt_len < 1 or gen_len < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need prompt_len, gen_len, repeats >= 1 and warmup >= 0, got prompt_len={prompt_len}, "
                         f"gen_len={gen_len}, repeats={repeats}, warmup={warmup}")
    if speculative not in (None, "mtp"):
        raise ValueError(f"speculative must be None or 'mtp', got {speculative!r}")
    if speculative and not engine_supports_speculative():
        raise ValueError("this dsv3.LLM has no speculative decoding (no `speculative=` argument)")
    if num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
    if compile and warmup < 1:
        raise ValueError("compile needs warmup >= 1 (the warmup round compiles; it must not be timed)")
    dtype_requested = dtype
    if dtype == "auto":                                  # resolved here, so every peer gets the same one
        from ..cpu import auto_dtype
        dtype = str(auto_dtype(device)).removeprefix("torch.")
    precision = check_precision(dtype, quantize)
    if quantize is not None and not engine_supports_quantize():
        raise ValueError(f"quantize={quantize!r}: this dsv3.LLM has no weight-only quantization (no `quantize=`)")
    if not Path(model).is_dir():
        raise ValueError(f"{model}: no such model directory")
    peer_objs = [resolve_peer(p) if isinstance(p, str) else p for p in (DEFAULT_PEERS if peers is None else peers)]
    names = [p.name for p in peer_objs]
    if len(set(names)) != len(names):
        raise ValueError(f"a peer is given twice: {names}")
    dev = resolve_device(device)
    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="dsv3-bench-") as tmp:
        workdir = Path(gguf_dir) if gguf_dir is not None else Path(tmp)
        out = _bench_decode(Path(model), batches, prompt_len, gen_len, seed, speculative, num_speculative_tokens,
                            repeats, warmup, dev, compile, peer_objs, precision, workdir, roofline,
                            progress or (lambda line: None))
    out["dtype_requested"] = dtype_requested
    return out


def _bench_decode(model_dir: Path, batches: list[int], prompt_len: int, gen_len: int, seed: int,
                  speculative: str | None, k: int, repeats: int, warmup: int, dev: torch.device, compile: bool,
                  peers: list[Peer], precision: Precision, workdir: Path, roofline: bool, progress) -> dict:
    from ..engine import LLM

    load_before = load_average()
    threads = torch.get_num_threads()
    max_batch = max(batches)
    # Sized for the largest batch; each batch is prefilled in one step (as the peers do); no prefix
    # caching, or every round after the first would skip most of its prefill.
    engine_kwargs = dict(max_num_seqs=max_batch, max_model_len=prompt_len + gen_len + k + 1,
                         max_num_batched_tokens=max(1024, max_batch * (prompt_len + k + 1)), prefix_caching=False)
    llm_kwargs = dict(dtype=precision.dtype, device=dev)
    if precision.quantize is not None:
        llm_kwargs["quantize"] = precision.quantize
    plain = LLM(model_dir, **llm_kwargs, **engine_kwargs)
    cfg = plain.config
    if prompt_len + gen_len > cfg.max_position_embeddings:
        raise ValueError(f"prompt_len + gen_len = {prompt_len + gen_len} exceeds max_position_embeddings="
                         f"{cfg.max_position_embeddings}")

    # (key, engine): key names the engine in ratios and agreement; ours first, peers next, our variants last.
    engines: list[tuple[str, object]] = [("dsv3", OursEngine("dsv3", plain, {"speculative": None}))]
    peer_report: dict[str, dict] = {}
    errors: dict[str, str] = {}
    ctx = RunContext(model_dir, cfg, precision, threads, dev, workdir)
    for peer in peers:
        reason = peer.unavailable(ctx)
        peer_prec, why = peer.precision(precision)
        if reason is None and why is not None:
            reason = why
        if reason is not None:
            peer_report[peer.name] = {"status": "skipped", "precision": peer_prec, "reason": reason}
            continue
        try:
            eng = peer.open(ctx, peer_prec)
        except Exception as e:  # noqa: BLE001 - a broken peer is a result, not a crash
            errors[peer.name] = _error_text(e)
            peer_report[peer.name] = {"status": "failed", "precision": peer_prec, "reason": errors[peer.name]}
            continue
        peer_report[peer.name] = {"status": "ran", "precision": peer_prec, "engine": eng.name}
        engines.append((peer.name, eng))
    spec_llm = compiled_llm = None
    if speculative:
        spec_llm = LLM(model_dir, speculative=speculative, num_speculative_tokens=k, **llm_kwargs, **engine_kwargs)
        engines.append(("dsv3+mtp", OursEngine(f"dsv3+mtp(k={k})", spec_llm,
                                               {"speculative": speculative, "num_speculative_tokens": k})))
    if compile:
        compiled_llm = LLM(model_dir, compile=True, **llm_kwargs, **engine_kwargs)
        engines.append(("dsv3+compile", OursEngine("dsv3+compile", compiled_llm, {"compile": True})))

    bw_before = bandwidth_probe(dev) if roofline else None
    counter = ExpertCounter(plain.model) if roofline else None
    failed: set[str] = set()
    runs = []
    for b in batches:
        runs.append(_run_batch(engines, b, prompt_len, gen_len, seed, repeats, warmup, counter, cfg, spec_llm,
                               errors, failed, progress))
    bw_after = bandwidth_probe(dev) if roofline else None

    out: dict = {
        "benchmark": "decode",
        "model": str(model_dir),
        "config": cfg.to_hf(),
        "params": param_counts(cfg)["total"],         # by formula: quantized weights are buffers, not parameters
        "batches": batches,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "repeats": repeats,
        "warmup": warmup,
        "warmup_tokens": min(gen_len, WARMUP_TOKENS) if warmup else 0,
        "seed": seed,
        "decoding": "greedy",
        "precision": precision.label,
        "dtype": precision.dtype,
        "quantize": precision.quantize,
        "peers": peer_report,
        "engine": dict(engine_kwargs),
        "machine": {**machine_info(threads, dev), "load_avg_before": load_before,
                    "load_avg_after": load_average()},
        "runs": runs,
        "errors": errors,
    }
    ours_cache = ours_cache_bytes(plain, cfg.num_hidden_layers)
    out["cache_bytes_per_token"] = {
        "ours": ours_cache["per_token"],
        "formula": cfg.num_hidden_layers * cfg.latent_dim * plain.cache.c_kv.element_size(),
        "ours_detail": ours_cache,
    }
    hf = next((e for key, e in engines if key == "transformers"), None)
    if hf is not None and hf.last_cache is not None:
        t = dynamic_cache_bytes(hf.last_cache)
        out["cache_bytes_per_token"].update({"transformers": t["per_token"], "transformers_detail": t,
                                             "ratio_transformers_over_ours": t["per_token"] / ours_cache["per_token"]})
    if roofline:
        bw = max(bw_before["read_bytes_per_s"], bw_after["read_bytes_per_s"])
        out["bandwidth"] = {"before": bw_before, "after": bw_after, "roofline_bytes_per_s": bw,
                            "method": "median stream read (sum) of a buffer >= 4x L3, higher of before/after"}
        for run in runs:
            _add_roofline(run, dict(engines), plain, prompt_len, gen_len, bw)
    out["throughput_by_batch"], out["throughput_never_falls"] = _throughput_by_batch(runs)

    # Greedy tokens against transformers in fp32 must be identical: same weights, same math.
    compared = [r["agreement"]["transformers"] for r in runs if "transformers" in r["agreement"]]
    out["tokens_identical"] = all(a["identical"] for a in compared) if compared else None
    out["tokens_must_match"] = bool(compared) and precision == Precision("float32")
    if len(runs) == 1:                                 # one batch size: its fields at the top level, as before
        run = runs[0]
        out.update({key: run[key] for key in ("batch", "results", "ratios", "agreement") if key in run})
        out["new_tokens_per_round"] = run["batch"] * gen_len
        for key in ("compiled", "speculative", "roofline"):
            if key in run:
                out[key] = run[key]
        if "transformers" in run["agreement"]:
            a = run["agreement"]["transformers"]
            out.update({"reference": next(x["name"] for x in run["results"] if x["key"] == "transformers"),
                        "ratio": run["ratios"]["transformers"]["total"],
                        "tokens_identical_fraction": a["fraction"],
                        "tokens_identical_sequences": a["identical_sequences"]})
    return out


def _run_batch(engines: list[tuple[str, object]], batch: int, prompt_len: int, gen_len: int, seed: int,
               repeats: int, warmup: int, counter: ExpertCounter | None, cfg, spec_llm, errors: dict,
               failed: set, progress) -> dict:
    """All engines on one batch size: warmup rounds, then ``repeats`` rotated timed rounds."""
    prompts = random_prompts(batch, prompt_len, cfg.vocab_size, seed)
    warm_tokens = min(gen_len, WARMUP_TOKENS)
    rounds: dict[str, list[dict]] = {key: [] for key, _ in engines}
    last: dict[str, list[list[int]]] = {}
    warmup_s: dict[str, float] = {}

    def turn(key: str, eng, n: int, timed: bool, on_step=None, label: str = "warmup") -> None:
        if key in failed:
            return
        t0 = time.perf_counter()
        try:
            r = eng.generate(prompts, n, on_step) if on_step is not None else eng.generate(prompts, n)
        except Exception as e:
            if key.startswith("dsv3"):
                raise                                    # ours failing is a bug, not a result
            errors[key] = f"batch {batch}: {_error_text(e)}"
            failed.add(key)                              # a failing peer is dropped from the rest of the run
            progress(f"batch {batch} {label}: {eng.name} failed: {errors[key].splitlines()[0]}")
            return
        progress(f"batch {batch} {label}: {eng.name} {time.perf_counter() - t0:.2f} s"
                 + (f" (prefill {r['prefill_s']:.3f} s + decode {r['decode_s']:.3f} s)" if timed else ""))
        if not timed:
            warmup_s.setdefault(key, time.perf_counter() - t0)
            return
        if len(r["tokens"]) != batch or any(len(t) != n for t in r["tokens"]):
            errors[key] = (f"batch {batch}: returned {[len(t) for t in r['tokens']]} tokens per sequence, "
                           f"expected {batch} x {n}")
            failed.add(key)
            return
        rounds[key].append(r)
        last[key] = r["tokens"]

    experts_seen = None
    for w in range(warmup):
        for key, eng in engines:
            if key == "dsv3" and w == 0 and counter is not None:
                counter.reset()
                turn(key, eng, warm_tokens, False, counter.observe)
                experts_seen = counter.mean()
                counter.counts.clear()
            elif not getattr(eng, "self_warming", False):
                turn(key, eng, warm_tokens, False)
    if counter is not None and experts_seen is None and warm_tokens > 1:
        counter.reset()                                  # no warmup: one untimed counting round of ours
        engines[0][1].generate(prompts, warm_tokens, counter.observe)
        experts_seen = counter.mean()
        counter.counts.clear()
    spec_before = _spec_stats(spec_llm) if spec_llm is not None else {}
    for r in range(repeats):
        live = [(key, eng) for key, eng in engines if key not in failed]
        shift = r % len(live)
        for key, eng in live[shift:] + live[:shift]:
            turn(key, eng, gen_len, True, label=f"round {r + 1}/{repeats}")

    results = []
    for key, eng in engines:
        if rounds[key]:
            results.append({"key": key, **summarize_rounds(eng.name, eng.info, rounds[key], batch, gen_len)})
    by_key = {x["key"]: x for x in results}
    ours = by_key["dsv3"]
    run: dict = {"batch": batch, "results": results, "ratios": {}, "agreement": {},
                 "experts_per_moe_layer_measured": experts_seen, "warmup_round_s": warmup_s}
    for key, x in by_key.items():
        if key.startswith("dsv3"):
            continue
        run["ratios"][key] = {"decode": _ratio(ours["decode_tokens_per_s"], x["decode_tokens_per_s"]),
                              "total": _ratio(ours["tokens_per_s"], x["tokens_per_s"])}
        run["agreement"][key] = agreement(last["dsv3"], last[key])
    hf = by_key.get("transformers")
    if "dsv3+compile" in by_key:
        c = by_key["dsv3+compile"]
        run["compiled"] = {
            "name": c["name"], "warmup_round_s_incl_compile": warmup_s.get("dsv3+compile"),
            "speedup_vs_ours": ours["time_s_median"] / c["time_s_median"],
            "decode_speedup_vs_ours": _ratio(c["decode_tokens_per_s"], ours["decode_tokens_per_s"]),
            "ratio_vs_transformers": (c["tokens_per_s"] / hf["tokens_per_s"]) if hf is not None else None,
            "tokens_equal_plain": last["dsv3+compile"] == last["dsv3"],
            "tokens_equal_transformers": last["dsv3+compile"] == last["transformers"] if hf is not None else None,
        }
    if "dsv3+mtp" in by_key:
        s = by_key["dsv3+mtp"]
        same = agreement(last["dsv3"], last["dsv3+mtp"])
        run["speculative"] = {
            "method": "mtp",
            "num_speculative_tokens": s["num_speculative_tokens"],
            "name": s["name"],
            "speedup_vs_ours": ours["time_s_median"] / s["time_s_median"],
            "ratio_vs_transformers": (s["tokens_per_s"] / hf["tokens_per_s"]) if hf is not None else None,
            **spec_summary(spec_before, _spec_stats(spec_llm)),
            "tokens_equal_plain": same["identical"],
            "tokens_equal_plain_fraction": same["fraction"],
        }
    return run


def _add_roofline(run: dict, engines: dict, plain, prompt_len: int, gen_len: int, bandwidth: float) -> None:
    """Bytes per decode step of this batch and the fraction of the roofline each engine reached.

    The bytes are ours (our model's tensors, our cache) for every engine that stores the weights as
    we do (same dtype, no quantization of its own); an engine with ``step_bytes`` (llama.cpp: its
    GGUF's tensor types and its cache type) is measured against its own.
    """
    # Decode step j (1..gen_len-1) attends over prompt_len + j positions: mean prompt_len + gen_len / 2.
    context, experts = prompt_len + gen_len / 2, run["experts_per_moe_layer_measured"]
    need = model_step_bytes(plain.model, run["batch"], context, plain.cache.c_kv.element_size(), experts)
    run["roofline"] = {"bytes_per_step": need, "bandwidth_bytes_per_s": bandwidth,
                       "step_ms_at_roofline": 1000 * need["total"] / bandwidth, "bytes_per_step_by_engine": {}}
    for x in run["results"]:
        eng = engines.get(x["key"])
        own = eng.step_bytes(run["batch"], context, experts) if hasattr(eng, "step_bytes") else None
        total = need["total"] if own is None else own["total"]
        if own is not None:
            run["roofline"]["bytes_per_step_by_engine"][x["key"]] = own
        x["bytes_per_step"] = total
        if x["step_ms"]:
            achieved = total / (x["step_ms"] / 1000)
            x["achieved_bytes_per_s"] = achieved
            x["roofline_fraction"] = achieved / bandwidth


def _throughput_by_batch(runs: list[dict]) -> tuple[dict, dict]:
    """Decode tokens/s of each engine over the batch sizes (in the order run), and whether it never falls."""
    by: dict[str, list] = {}
    for run in runs:
        for x in run["results"]:
            by.setdefault(x["key"], []).append((run["batch"], x["decode_tokens_per_s"]))
    never_falls = {}
    for key, pts in by.items():
        pts.sort()
        vals = [v for _, v in pts]
        never_falls[key] = all(a is not None and b is not None and b >= a for a, b in zip(vals, vals[1:]))
    return {key: {str(b): v for b, v in pts} for key, pts in by.items()}, never_falls


# ------------------------------------------------------------------------------------- report
def _fmt(v: float | None, spec: str, none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def _flags_text(m: dict) -> str:
    flags = m.get("cpu_flags")
    if not flags:
        return "flags unknown"
    shown = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    have = [f for f in shown if flags.get(f)]
    lack = [f for f in shown if not flags.get(f)]
    return "+".join(have) + (f"; no {'/'.join(lack)}" if lack else "")


def format_bench_decode(r: dict) -> str:
    """A human table of :func:`bench_decode`'s result: one block per batch size."""
    m = r["machine"]
    batches = ", ".join(str(b) for b in r["batches"])
    lines = [
        f"decode: {r['model']} ({r['params'] / 1e6:.2f}M params), batch {batches} x prompt {r['prompt_len']} "
        f"-> {r['gen_len']} new tokens each, greedy, {r['precision']}; median of {r['repeats']} rounds after "
        f"{r['warmup']} warmup",
        f"machine: {m.get('cpu_model') or m['cpu']} ({_flags_text(m)}; torch {m.get('torch_cpu_capability')}), "
        f"{m['usable_cores']} cores, {m['threads']} threads, device {m['device']}, torch {m['torch']}, "
        f"load {_load_text(m.get('load_avg_before'))} -> {_load_text(m.get('load_avg_after'))}, {m['date']}",
    ]
    for name, p in r["peers"].items():
        if p["status"] == "ran":
            lines.append(f"peer {name}: {p['engine']}")
        else:
            lines.append(f"peer {name}: {p['status']}: {p['reason']}")
    bw = r.get("bandwidth")
    if bw:
        b = bw["before"]
        lines.append(f"bandwidth (stream read of {b['probe_bytes'] / 2**20:,.0f} MiB, {b['threads']} threads): "
                     f"{bw['roofline_bytes_per_s'] / 1e9:,.1f} GB/s (before {b['read_bytes_per_s'] / 1e9:,.1f}, "
                     f"after {bw['after']['read_bytes_per_s'] / 1e9:,.1f}; copy {b['copy_bytes_per_s'] / 1e9:,.1f})")
    for run in r["runs"]:
        lines.append("")
        lines += _format_run(run, r)
    if len(r["runs"]) > 1:
        lines.append("")
        lines.append("decode tokens/s by batch size:")
        for key, pts in r["throughput_by_batch"].items():
            seq = " -> ".join(f"{_fmt(v, ',.1f')} (b={b})" for b, v in pts.items())
            lines.append(f"  {key:<14} {seq}; never falls: {'yes' if r['throughput_never_falls'][key] else 'NO'}")
    c = r["cache_bytes_per_token"]
    d = c["ours_detail"]
    ours_line = (f"cache bytes/token: ours {c['ours']:,.0f} ({r['config']['num_hidden_layers']} layers x "
                 f"(c_kv {d['layout']['c_kv'][0]} + k_pe {d['layout']['k_pe'][0]}) x {d['layout']['dtype']}")
    if d["allocated_layers"] != r["config"]["num_hidden_layers"]:
        ours_line += f"; {d['per_slot_allocated']:,.0f} per slot allocated incl. MTP layers"
    lines.append("")
    lines.append(ours_line + ")")
    if "transformers" in c:
        t = c["transformers_detail"]
        lines.append(f"                   transformers {c['transformers']:,.0f} ({t['cache_class']}, {t['layers']} "
                     f"layers of keys {t['key_shape']} + values {t['value_shape']} {t['dtype']}); "
                     f"transformers / ours = {c['ratio_transformers_over_ours']:.2f}x")
    for name, err in r.get("errors", {}).items():
        first, *rest = err.splitlines()
        lines.append(f"{name}: failed: {first}" + (f" ... {rest[-1].strip()}" if rest else ""))
    return "\n".join(lines)


def _load_text(load: list[float] | None) -> str:
    return "?" if not load else f"{load[0]:.2f}"


def _format_run(run: dict, r: dict) -> list[str]:
    roof = run.get("roofline")
    head = f"batch {run['batch']}"
    if roof:
        n = roof["bytes_per_step"]
        measured = run["experts_per_moe_layer_measured"]
        experts = (f"{n['experts_per_moe_layer']:.1f} routed experts/MoE layer "
                   + ("counted" if measured is not None else "expected, uniform routing"))
        head += (f": bytes/step {n['total'] / 1e6:,.2f} MB (weights {n['weights'] / 1e6:,.2f} MB with {experts}; "
                 f"latent cache {n['cache'] / 1e6:,.3f} MB); roofline step {roof['step_ms_at_roofline']:.3f} ms")
    lines = [head,
             f"  {'engine':<38} {'prefill s':>9} {'ms/step':>8} {'decode tok/s':>12} {'total tok/s':>11} "
             f"{'roofline':>8} {'ours/peer':>9}  greedy tokens vs ours"]
    for x in run["results"]:
        key = x["key"]
        ratio = run["ratios"].get(key, {}).get("decode")
        agree = run["agreement"].get(key)
        if agree is None:
            agree_text = "-"
        elif agree["identical"]:
            agree_text = f"identical {agree['identical_sequences']}/{agree['sequences']}"
        else:
            agree_text = (f"{agree['identical_sequences']}/{agree['sequences']} identical, first divergence at "
                          f"token {agree['min_first_divergence']}")
        frac = x.get("roofline_fraction")
        lines.append(f"  {x['name']:<38} {x['prefill_s_median']:>9.3f} {_fmt(x['step_ms'], '8.2f'):>8} "
                     f"{_fmt(x['decode_tokens_per_s'], ',.1f'):>12} {x['tokens_per_s']:>11,.1f} "
                     f"{_fmt(None if frac is None else 100 * frac, '.1f'):>7}% "
                     f"{_fmt(ratio, '.2f', '-'):>8}{'x' if ratio else ' '}  {agree_text}")
    c = run.get("compiled")
    if c:
        lines.append(f"  torch.compile: {c['speedup_vs_ours']:.2f}x ours eager end to end; greedy tokens "
                     f"{'equal' if c['tokens_equal_plain'] else 'DIFFER from'} eager; warmup round incl. "
                     f"compilation {_fmt(c['warmup_round_s_incl_compile'], '.0f')} s")
    s = run.get("speculative")
    if s:
        rate = "n/a" if s["acceptance_rate"] is None else f"{s['acceptance_rate']:.3f}"
        length = "n/a" if s["mean_accepted_length"] is None else f"{s['mean_accepted_length']:.3f}"
        lines.append(f"  MTP speculation (k={s['num_speculative_tokens']}): {s['speedup_vs_ours']:.2f}x ours plain"
                     + f"; acceptance rate {rate}, mean accepted length {length} tokens/step; greedy tokens "
                     + ("equal to plain" if s["tokens_equal_plain"] else
                        f"DIFFER from plain ({100 * s['tokens_equal_plain_fraction']:.0f}% of sequences equal)"))
    own = (roof or {}).get("bytes_per_step_by_engine", {})
    for key, b in own.items():
        name = next(x["name"] for x in run["results"] if x["key"] == key)
        lines.append(f"  {name} reads its own {b['total'] / 1e6:,.2f} MB/step (weights "
                     + ", ".join(f"{t} {v / 1e6:,.2f}" for t, v in b["weights_by_dtype"].items())
                     + f" MB; cache {b['cache'] / 1e6:,.3f} MB)")
    lines.append("  ours/peer: decode tokens/s; roofline: bytes/step / (bandwidth x step time)")
    return lines

