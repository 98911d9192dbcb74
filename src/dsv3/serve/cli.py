"""``dsv3 serve`` (the OpenAI-compatible server) and ``dsv3 bench serve`` (its load benchmark).

Registered through ``dsv3.cli.FEATURE_CLIS``; heavy imports (torch, FastAPI, uvicorn) happen inside
the command functions so ``dsv3 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..cli import (CLIError, HelpFormatter, _write_json, add_command, add_engine_speed_args, engine_speed_kwargs,
                   positive_int)

API_KEY_ENV = "DSV3_API_KEY"


def add_parsers(subparsers, bench, experiment) -> None:
    p = add_command(subparsers, "serve", cmd_serve, help="serve a model over an OpenAI-compatible HTTP API",
                    description="FastAPI + uvicorn server for one checkpoint: /v1/models, /v1/chat/completions "
                                "(tools, JSON output, thinking), /v1/completions (suffix = fill-in-the-middle, "
                                "echo + logprobs = prompt scoring), /v1/responses (the Responses API), a chat page "
                                "at /, /health, /metrics (Prometheus), /openapi.json. All requests share one "
                                "engine (continuous batching). Binds 127.0.0.1 unless --host says otherwise.")
    p.add_argument("--model", metavar="DIR", required=True,
                   help="checkpoint directory: config.json, safetensors weights and (unless --tokenizer) "
                        "tokenizer.json")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="directory (or file) of the tokenizer.json (default: the model directory)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every endpoint but /health "
                        f"(default: the {API_KEY_ENV} environment variable; unset: no key)")
    p.add_argument("--served-model-name", default=None,
                   help="model id in the API (default: the model directory's name)")
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="context limit, prompt + completion (default: the model's max_position_embeddings)")
    p.add_argument("--max-num-seqs", type=positive_int, default=32, help="sequences decoded together, at most")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=1024,
                   help="tokens per engine step (prefill chunks + decodes)")
    p.add_argument("--num-blocks", type=positive_int, default=None,
                   help="latent-cache blocks of 16 tokens (default: enough for --max-num-seqs full contexts)")
    p.add_argument("--max-queue", type=positive_int, default=256,
                   help="sequences accepted and unfinished, at most; beyond it requests get 429")
    add_limit_args(p)
    p.add_argument("--reasoning", action="store_true",
                   help="thinking mode by default for chat requests (chat_template_kwargs.thinking overrides)")
    p.add_argument("--speculative", choices=["mtp"], default=None,
                   help="MTP speculative decoding (requests with grammars, penalties or logprobs decode plainly)")
    p.add_argument("--num-speculative-tokens", type=positive_int, default=1, metavar="K",
                   help="draft tokens per step with --speculative")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default="float32",
                   help="weight and latent-cache dtype (auto: bfloat16 only on a CPU with bf16 units where it "
                        "measures faster, else float32)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    add_engine_speed_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the engine's random stream (unseeded requests)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level")

    b = bench.add_parser("serve", formatter_class=HelpFormatter,
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
    b.add_argument("--json", metavar="FILE", help="also write the full result as JSON to FILE")
    b.set_defaults(func=cmd_bench_serve)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_limit_args(p) -> None:
    """One flag per :class:`dsv3.serve.limits.Limits` field (the dataclass holds defaults and help)."""
    from dataclasses import fields

    from .limits import Limits

    g = p.add_argument_group("request limits and timeouts (a request over a limit gets a 4xx naming it)")
    for f in fields(Limits):
        g.add_argument(Limits.flag(f.name), dest=f.name, type=positive_int if isinstance(f.default, int)
                       else _positive_float, default=f.default, help=f.metadata["help"])


def limits_of(args: argparse.Namespace):
    from dataclasses import fields

    from .limits import Limits

    return Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from ..config import ModelConfig
    from ..engine import LLM
    from ..tokenizer import Tokenizer, TokenizerError
    from .app import create_app
    from .transport import serve

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not os.path.isdir(args.model):
        raise CLIError(f"--model {args.model}: no such model directory")
    if not 0 <= args.port < 65536:
        raise CLIError(f"--port must be in [0, 65535], got {args.port}")
    config = ModelConfig.from_json_file(args.model)
    try:
        tokenizer = Tokenizer.load(args.tokenizer or args.model)
    except TokenizerError as e:
        raise CLIError(str(e)) from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CLIError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                       f"{config.vocab_size}: not this model's tokenizer")
    max_len = args.max_model_len or config.max_position_embeddings
    if max_len > config.max_position_embeddings:
        raise CLIError(f"--max-model-len {max_len} exceeds the model's max_position_embeddings "
                       f"{config.max_position_embeddings}")
    spec = {"speculative": args.speculative, "num_speculative_tokens": args.num_speculative_tokens} \
        if args.speculative else {}
    try:
        llm = LLM(args.model, tokenizer=tokenizer, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_len,
                  num_blocks=args.num_blocks, seed=args.seed, **spec, **engine_speed_kwargs(args))
    except ValueError as e:
        raise CLIError(str(e)) from None
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    limits = limits_of(args)
    app = create_app(llm, name, api_key=api_key, max_pending=args.max_queue, thinking=args.reasoning, limits=limits)
    print(f"dsv3 serve: http://{args.host}:{args.port}/v1  model {name!r}, context {max_len} tokens, "
          f"{'API key required' if api_key else 'no API key'}; chat page at http://{args.host}:{args.port}/",
          file=sys.stderr, flush=True)
    serve(app, args.host, args.port, args.log_level, limits.header_timeout, limits.shutdown_timeout)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from ..bench.serve import bench_serve, format_bench_serve

    if not os.path.isdir(args.model):
        raise CLIError(f"--model {args.model}: no such model directory")
    result = bench_serve(args.model, concurrency=args.concurrency, requests=args.requests,
                         prompt_len=args.prompt_len, gen_len=args.gen_len, threads=args.threads, peer=args.peer,
                         peer_timeout=args.peer_timeout, seed=args.seed, device=args.device, dtype=args.dtype)
    print(format_bench_serve(result))
    if args.json:
        _write_json(args.json, result)
    return 0
