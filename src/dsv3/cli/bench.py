"""``dsv3 bench NAME``: our implementation and its peers measured in one run on the same config,
data and threads (``train``: a training step; ``decode``: the engine's decoding; ``serve``: the
server under load). The measurement code is in ``dsv3.bench``."""

from __future__ import annotations

import argparse
import sys

from ..config import PRESETS
from ..knobs import positive_int
from ..train.precision import TRAIN_DTYPES
from .common import (PROG, CLIError, add_device_arg, add_group, add_json_arg, add_member, reported, require_dir,
                     write_json)


def register(subparsers) -> None:
    sub = add_group(subparsers, "bench", help="benchmarks against peer implementations, in one run",
                    description="Each benchmark measures ours and its peers in the same process on the same "
                                "config, data and thread count, and reports the ratio.")
    _add_train(sub)
    _add_profile_train(sub)
    _add_decode(sub)
    _add_serve(sub)


# ---------------------------------------------------------------------- train
def _add_train(sub) -> None:
    t = add_member(sub, "train", cmd_bench_train,
                   help="tokens/s of a full training step: ours vs transformers' DeepseekV3ForCausalLM",
                   description="Time full training steps (forward, cross-entropy, backward, AdamW step) of "
                               "our model and of transformers' DeepseekV3ForCausalLM holding the same weights, "
                               "on the same batch, threads and precision (--dtype, as dsv3 train's: bf16 autocast "
                               "with fp32 master weights, or fp32), steps interleaved; report median/mean step "
                               "time, tokens/s, the ratio, and the first-step losses (which must agree: same "
                               "model). In bf16, ours is also timed in fp32 (dsv3[fp32]) for the bf16/fp32 ratio.")
    t.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shape (MTP is switched off)")
    t.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step")
    t.add_argument("--seq-len", type=positive_int, default=256, help="tokens per sequence")
    t.add_argument("--steps", type=positive_int, default=5, help="timed steps per implementation")
    t.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    t.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    t.add_argument("--seed", type=int, default=0, help="seed for the weights and the batch")
    t.add_argument("--dtype", choices=TRAIN_DTYPES, default="auto",
                   help="precision of every implementation's step: bf16 autocast or fp32; auto: bf16 where the "
                        "GPU/CPU has bf16 units (AMX, AVX512-BF16), else fp32")
    t.add_argument("--mtp", action="store_true", help="also time ours with the preset's MTP modules (extra line)")
    t.add_argument("--plain-ce", action="store_true",
                   help="also time ours with full logits + F.cross_entropy instead of the fused head (extra line)")
    t.add_argument("--compile", action="store_true",
                   help="also time ours with torch.compile on attention, norms, MLPs and routers (extra line; "
                        "compiles during --warmup)")
    t.add_argument("--torchtitan", action="store_true",
                   help="also try torchtitan's DeepSeek-V3 (if installed) and record whether it runs")
    t.add_argument("--transformers", nargs="+", default=["sdpa"], metavar="ATTN[/EXPERTS]",
                   help="transformers variants: attention implementation, optionally /experts implementation "
                        "(e.g. sdpa eager sdpa/eager); the first is the reference of the ratio")
    add_device_arg(t)
    add_json_arg(t)


def cmd_bench_train(args: argparse.Namespace) -> int:
    from ..bench.train import bench_train, format_bench_train
    if args.warmup < 0:
        raise CLIError(f"--warmup must be >= 0, got {args.warmup}")
    with reported(ValueError):
        result = bench_train(preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps,
                             warmup=args.warmup, threads=args.threads, seed=args.seed, mtp=args.mtp,
                             torchtitan=args.torchtitan, transformers_variants=args.transformers, device=args.device,
                             plain_ce=args.plain_ce, compile=args.compile, dtype=args.dtype)
    print(format_bench_train(result))
    if args.json:
        write_json(args.json, result)
    if result.get("first_loss_match") is False:
        print(f"{PROG}: error: first-step losses differ by {result['first_loss_abs_diff']:.3g}: "
              f"not the same model", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------- profile-train
def _add_profile_train(sub) -> None:
    p = add_member(sub, "profile-train", cmd_bench_profile_train,
                   help="where a training step's time goes, per precision (torch.profiler)",
                   description="Run the trainer's own step (losses, backward, clipping, AdamW) on one model and "
                               "batch in each --dtypes precision and report milliseconds per step by op category "
                               "(GEMMs, attention, casts, norms/reductions, elementwise, indexing), the forward / "
                               "backward / optimizer phases and the top ops: what bf16 autocast adds besides "
                               "cheaper GEMMs.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model shape (MTP is switched off)")
    p.add_argument("--batch-size", type=positive_int, default=2, help="sequences per step")
    p.add_argument("--seq-len", type=positive_int, default=128, help="tokens per sequence")
    p.add_argument("--dtypes", nargs="+", choices=TRAIN_DTYPES, default=["fp32", "bf16"], help="precisions profiled")
    p.add_argument("--steps", type=positive_int, default=1, help="profiled (and timed) steps per precision")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    p.add_argument("--top", type=positive_int, default=20, help="top ops listed per precision")
    add_device_arg(p)
    add_json_arg(p)


def cmd_bench_profile_train(args: argparse.Namespace) -> int:
    from ..bench.profile_train import format_profile_train, profile_train_step
    if args.warmup < 0:
        raise CLIError(f"--warmup must be >= 0, got {args.warmup}")
    with reported(ValueError):
        result = profile_train_step(args.preset, args.batch_size, args.seq_len, tuple(args.dtypes), args.threads,
                                    args.steps, args.warmup, device=args.device, top=args.top)
    print(format_profile_train(result))
    if args.json:
        write_json(args.json, result)
    return 0


# ---------------------------------------------------------------------- decode
def _add_decode(sub) -> None:
    d = add_member(sub, "decode", cmd_bench_decode,
                   help="decode tokens/s: our engine vs llama.cpp / vLLM / transformers, and the roofline",
                   description="Greedy generation of the same random prompts (seeded, all --prompt-len "
                               "tokens) for exactly --gen-len new tokens (EOS ignored), by our engine (dsv3.LLM) "
                               "and each --peer on the same checkpoint at the same precision (--dtype float32: "
                               "llama.cpp f32, vLLM float32; bfloat16: bf16 / bfloat16; --quantize int8: "
                               "llama.cpp q8_0, vLLM skipped) and threads, rounds interleaved, for each --batch "
                               "size; report prefill time, ms per decode step, decode and end-to-end tokens/s, "
                               "the ratio ours/peer, greedy agreement (identical sequences, first divergence), "
                               "bytes per decode step, a bandwidth probe and the fraction of the memory "
                               "roofline reached. Default peer: transformers (whose fp32 greedy tokens must "
                               "equal ours). --speculative mtp adds our engine with MTP speculative decoding: "
                               "speedup, acceptance rate, mean accepted length.")
    d.add_argument("--model", metavar="DIR", default=None,
                   help="checkpoint directory (config.json + safetensors); required unless --random-preset")
    d.add_argument("--random-preset", metavar="NAME", default=None,
                   help="instead of --model: a random-weight preset model (e.g. v2-lite); times our engine eagerly "
                        "and with CUDA graphs and reports the memory-bandwidth roofline fraction (no transformers)")
    d.add_argument("--dtype", default=None,
                   help="our precision and the peers' equal one: float32, bfloat16 or auto (what dsv3 would "
                        "pick on this CPU; default float32; with --random-preset the weights dtype, default "
                        "bfloat16)")
    d.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="our weights quantized weight-only (int8 is compared with llama.cpp q8_0)")
    d.add_argument("--peer", action="append", default=None, metavar="NAME",
                   choices=["transformers", "llama.cpp", "vllm", "none"],
                   help="peer to compare with, repeatable: transformers (default), llama.cpp (the checkpoint "
                        "converted to GGUF), vllm (vLLM's CPU build in .venv-vllm); none: ours alone")
    d.add_argument("--gguf-dir", metavar="DIR", default=None,
                   help="keep the GGUF files converted for llama.cpp here and reuse them (default: a temporary "
                        "directory)")
    d.add_argument("--no-roofline", action="store_true",
                   help="skip the bandwidth probe and the roofline fractions")
    d.add_argument("--compile", action="store_true",
                   help="also time our engine with torch.compile'd decode steps (LLM(compile=True)); "
                        "compilation happens in the warmup round and is reported")
    d.add_argument("--batch", default="1", metavar="B[,B...]",
                   help="sequences generated together; several sizes separated by commas (e.g. 1,8,32) are run "
                        "one after another (--random-preset: one size)")
    d.add_argument("--prompt-len", type=positive_int, default=32, help="tokens per prompt")
    d.add_argument("--gen-len", type=positive_int, default=64, help="new tokens per sequence")
    d.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    d.add_argument("--repeats", type=positive_int, default=3, help="timed rounds (the median is reported)")
    d.add_argument("--warmup", type=int, default=1, help="untimed rounds before them (of a few tokens)")
    d.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    d.add_argument("--speculative", choices=["mtp"], default=None,
                   help="also time our engine with MTP speculative decoding")
    d.add_argument("--num-speculative-tokens", type=positive_int, default=1, metavar="K",
                   help="draft tokens per step with --speculative")
    add_device_arg(d)
    add_json_arg(d)


def _cmd_bench_roofline(args: argparse.Namespace) -> int:
    from ..bench.decode import bench_decode_roofline, format_bench_roofline, parse_batches
    if args.model is not None or args.speculative or args.peer:
        raise CLIError("--random-preset replaces --model and takes no --speculative or --peer")
    with reported(ValueError):
        batches = parse_batches(args.batch)
        if len(batches) != 1:
            raise ValueError(f"--random-preset takes one --batch size, got {args.batch}")
        result = bench_decode_roofline(args.random_preset, dtype=args.dtype or "bfloat16", batch=batches[0],
                                       prompt_len=args.prompt_len, gen_len=args.gen_len, repeats=args.repeats,
                                       seed=args.seed, device=args.device, threads=args.threads,
                                       compile=args.compile, quantize=args.quantize)
    print(format_bench_roofline(result))
    if args.json:
        write_json(args.json, result)
    return 0


def cmd_bench_decode(args: argparse.Namespace) -> int:
    from ..bench.decode import bench_decode, format_bench_decode
    if args.warmup < 0:
        raise CLIError(f"--warmup must be >= 0, got {args.warmup}")
    if args.random_preset is not None:
        return _cmd_bench_roofline(args)
    if args.model is None:
        raise CLIError("bench decode needs --model DIR (or --random-preset NAME)")
    peers = args.peer
    if peers is not None and "none" in peers:
        if len(peers) > 1:
            raise CLIError("--peer none runs ours alone; it cannot be combined with other --peer values")
        peers = []
    with reported(ValueError):
        result = bench_decode(args.model, batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len,
                              threads=args.threads, seed=args.seed, speculative=args.speculative,
                              num_speculative_tokens=args.num_speculative_tokens, repeats=args.repeats,
                              warmup=args.warmup, device=args.device, compile=args.compile, peers=peers,
                              dtype=args.dtype or "float32", quantize=args.quantize, gguf_dir=args.gguf_dir,
                              roofline=not args.no_roofline, progress=lambda line: print(line, file=sys.stderr,
                                                                                          flush=True))
    print(format_bench_decode(result))
    if args.json:
        write_json(args.json, result)
    if result.get("tokens_must_match") and result.get("tokens_identical") is False:
        bad = []
        for run in result["runs"]:
            a = run["agreement"].get("transformers")
            if a is not None and not a["identical"]:
                differ = a["sequences"] - a["identical_sequences"]
                bad.append(f"batch {run['batch']}: {differ} of {a['sequences']} sequences")
        print(f"{PROG}: error: fp32 greedy tokens of ours and transformers differ ({'; '.join(bad)})",
              file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------- serve
def _add_serve(sub) -> None:
    b = add_member(sub, "serve", cmd_bench_serve,
                   help="throughput and time to first token of `dsv3 serve` under load (vs transformers serve)",
                   description="Starts `dsv3 serve` on the checkpoint (a subprocess on a free loopback port), "
                               "sends streaming completion requests at each concurrency level (random token "
                               "prompts, exactly --gen-len tokens each) and reports output tokens/s, requests/s "
                               "and time to first token p50/p99. With --peer transformers the same load runs "
                               "against `transformers serve` on the same checkpoint and the JSON holds the "
                               "ratios (or why the peer could not run).")
    b.add_argument("--model", metavar="DIR", required=True, help="checkpoint directory with tokenizer")
    b.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 8, 32],
                   help="concurrent clients, one run per value")
    b.add_argument("--requests", type=positive_int, default=None,
                   help="requests per concurrency level (default: 2 x concurrency, at least 4)")
    b.add_argument("--prompt-len", type=positive_int, default=32, help="tokens per prompt")
    b.add_argument("--gen-len", type=positive_int, default=32, help="generated tokens per request")
    b.add_argument("--threads", type=positive_int, default=None, help="torch threads of each server")
    b.add_argument("--device", default="cpu", help="torch device of both servers (e.g. cuda)")
    b.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights of both servers")
    b.add_argument("--peer", choices=["transformers", "none"], default="transformers",
                   help="also measure `transformers serve` on the same checkpoint")
    b.add_argument("--peer-timeout", type=positive_int, default=180,
                   help="seconds to wait for the peer server to come up")
    b.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    add_json_arg(b)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from ..bench.serve import bench_serve, format_bench_serve

    require_dir(args.model, "--model")
    result = bench_serve(args.model, concurrency=args.concurrency, requests=args.requests,
                         prompt_len=args.prompt_len, gen_len=args.gen_len, threads=args.threads, peer=args.peer,
                         peer_timeout=args.peer_timeout, seed=args.seed, device=args.device, dtype=args.dtype)
    print(format_bench_serve(result))
    if args.json:
        write_json(args.json, result)
    return 0
