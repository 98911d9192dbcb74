"""``dsv3 serve``: the OpenAI-compatible server (its load benchmark is ``dsv3 bench serve``).

Heavy imports (torch, FastAPI, uvicorn) happen inside the command function so ``dsv3 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..knobs import positive_int
from .common import (CLIError, add_command, add_device_arg, add_engine_speed_args, engine_inputs, engine_speed_kwargs,
                     reported)
from .fields import add_dataclass_args, from_args

API_KEY_ENV = "DSV3_API_KEY"


def register(subparsers) -> None:
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
    p.add_argument("--adapter", metavar="DIR", default=None,
                   help="a LoRA adapter for --model (PEFT layout, e.g. OUT/final of `dsv3 sft --lora-rank`), "
                        "merged into the weights at load")
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
    add_device_arg(p, "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default="float32",
                   help="weight and latent-cache dtype (auto: bfloat16 only on a CPU with bf16 units where it "
                        "measures faster, else float32)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    add_engine_speed_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the engine's random stream (unseeded requests)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level")


def add_limit_args(p) -> None:
    """One flag per :class:`dsv3.serve.limits.Limits` field (the dataclass holds defaults and help)."""
    from ..serve.limits import Limits

    g = p.add_argument_group("request limits and timeouts (a request over a limit gets a 4xx naming it)")
    add_dataclass_args(g, Limits)


def limits_of(args: argparse.Namespace):
    """The :class:`dsv3.serve.limits.Limits` of the flags added by :func:`add_limit_args`."""
    from ..serve.limits import Limits

    return from_args(Limits, args)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..engine import LLM
    from ..serve.app import create_app
    from ..serve.transport import serve

    config, tokenizer = engine_inputs(args)
    if not 0 <= args.port < 65536:
        raise CLIError(f"--port must be in [0, 65535], got {args.port}")
    max_len = args.max_model_len or config.max_position_embeddings
    if max_len > config.max_position_embeddings:
        raise CLIError(f"--max-model-len {max_len} exceeds the model's max_position_embeddings "
                       f"{config.max_position_embeddings}")
    spec = {"speculative": args.speculative, "num_speculative_tokens": args.num_speculative_tokens} \
        if args.speculative else {}
    with reported(ValueError):
        llm = LLM(args.model, tokenizer=tokenizer, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_len,
                  num_blocks=args.num_blocks, seed=args.seed, adapter=args.adapter, **spec, **engine_speed_kwargs(args))
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    limits = limits_of(args)
    app = create_app(llm, name, api_key=api_key, max_pending=args.max_queue, thinking=args.reasoning, limits=limits)
    print(f"dsv3 serve: http://{args.host}:{args.port}/v1  model {name!r}, context {max_len} tokens, "
          f"{'API key required' if api_key else 'no API key'}; chat page at http://{args.host}:{args.port}/",
          file=sys.stderr, flush=True)
    serve(app, args.host, args.port, args.log_level, limits.header_timeout, limits.shutdown_timeout)
    return 0
