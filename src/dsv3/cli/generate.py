"""``dsv3 generate`` and ``dsv3 chat``: the engine (``dsv3.LLM``) from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..knobs import positive_int
from .common import (PROG, CLIError, add_command, add_device_arg, add_engine_speed_args, engine_inputs,
                     engine_speed_kwargs, reported)


def register(subparsers) -> None:
    add_generate_parser(subparsers)
    add_chat_parser(subparsers)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """``--model DIR`` and the engine flags shared by ``generate`` and ``chat``."""
    p.add_argument("--model", metavar="DIR", required=True,
                   help="model directory: config.json, safetensors weights and (unless --tokenizer) tokenizer.json")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="directory (or file) of the tokenizer.json (default: the model directory)")
    p.add_argument("--adapter", metavar="DIR", default=None,
                   help="a LoRA adapter for --model (PEFT layout, e.g. OUT/final of `dsv3 sft --lora-rank`), "
                        "merged into the weights at load")
    p.add_argument("--speculative", choices=["mtp"], default=None,
                   help="speculative decoding: the model's MTP module drafts tokens, the main model verifies them "
                        "(the output distribution is unchanged)")
    p.add_argument("--num-speculative-tokens", type=positive_int, default=1, metavar="K",
                   help="draft tokens per step with --speculative")
    add_device_arg(p, "cpu")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                   help="weights and activations; auto: bfloat16 only on a CPU with bf16 units (AMX / "
                        "AVX512-BF16) where it measures faster than float32, else float32")
    add_engine_speed_args(p)



def _sampling_params(**fields):
    """``SamplingParams(**fields)``, an out-of-range value being a user error."""
    from ..engine import SamplingParams
    with reported(ValueError):
        return SamplingParams(**fields)


def _load_llm(args: argparse.Namespace, tokenizer, max_num_seqs: int, max_model_len: int):
    """``dsv3.LLM`` on ``--model`` with a cache for ``max_num_seqs`` sequences of ``max_model_len`` tokens."""
    from ..bench.decode import engine_supports_speculative
    from ..engine import LLM

    kwargs = {}
    if args.speculative:
        if not engine_supports_speculative():
            raise CLIError("--speculative: this version of the engine has no speculative decoding")
        kwargs = {"speculative": args.speculative, "num_speculative_tokens": args.num_speculative_tokens}
    with reported(ValueError):
        return LLM(args.model, tokenizer=tokenizer, device=args.device, dtype=args.dtype, max_num_seqs=max_num_seqs,
                   max_model_len=max_model_len, seed=getattr(args, "seed", None) or 0, adapter=args.adapter, **kwargs,
                   **engine_speed_kwargs(args))


def _print_spec_stats(llm) -> None:
    """One line of MTP acceptance statistics on stderr (nothing without speculation)."""
    stats = getattr(llm, "spec_stats", None)
    if not getattr(llm, "num_spec", 0) or not stats:
        return
    drafted, accepted = stats.get("drafted", 0), stats.get("accepted", 0)
    rate = stats.get("acceptance_rate", accepted / drafted if drafted else None)
    length = stats.get("mean_accepted_length")
    text = f"MTP drafts: {accepted}/{drafted} accepted"
    if rate is not None:
        text += f" ({100 * rate:.1f}%)"
    if length is not None:
        text += f", {length:.2f} tokens per verification step"
    print(f"[{text}]", file=sys.stderr)


def add_generate_parser(subparsers) -> None:
    p = add_command(subparsers, "generate", cmd_generate, help="generate completions of prompts with the engine",
                    description="Batch generation with dsv3.LLM (paged latent cache, continuous batching). Each "
                                "prompt is encoded with BOS in front, as LLM.encode does. Prints each completion "
                                "(with a header line when there are several), or --json lines.")
    add_engine_args(p)
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt; repeatable")
    p.add_argument("--prompt-file", metavar="FILE",
                   help="more prompts, one per line (blank lines skipped; - reads standard input)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt, at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 is off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (0 is off)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the engine's random stream, for reproducible samples (default: 0)")
    p.add_argument("--stop", action="extend", nargs="+", default=[], metavar="STR",
                   help="stop strings: the completion is cut before the first one")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per completion: prompt, text, token ids, finish reason")


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(args.prompt_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise CLIError("no prompt: give --prompt TEXT or --prompt-file FILE")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    prompts = _read_prompts(args)
    params = _sampling_params(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_tokens=args.max_tokens, stop=tuple(args.stop))
    config, tokenizer = engine_inputs(args)
    ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]     # as LLM.encode does
    longest = max(len(x) for x in ids)
    if longest + params.max_tokens > config.max_position_embeddings:
        raise CLIError(f"the longest prompt ({longest} tokens) + --max-tokens {params.max_tokens} exceeds the "
                       f"model's context of {config.max_position_embeddings} tokens")
    spec = args.num_speculative_tokens if args.speculative else 0
    llm = _load_llm(args, tokenizer, max_num_seqs=min(len(prompts), 32),
                    max_model_len=longest + params.max_tokens + spec + 1)
    t0 = time.perf_counter()
    with reported(ValueError):
        outputs = llm.generate(ids, params)
    elapsed = time.perf_counter() - t0
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        if args.json:
            print(json.dumps({"index": i, "prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                              "prompt_token_ids": out.prompt_token_ids, "finish_reason": out.finish_reason,
                              "num_tokens": len(out.token_ids)}, ensure_ascii=False))
        else:
            if len(prompts) > 1:
                head = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                print(f"--- [{i + 1}/{len(prompts)}] {head!r} ({out.finish_reason}, {len(out.token_ids)} tokens)")
            print(out.text)
    sys.stdout.flush()                 # the completions first, then the statistics on stderr
    n_tokens = sum(len(o.token_ids) for o in outputs)
    print(f"[{len(outputs)} completion{'s' * (len(outputs) != 1)}, {n_tokens} tokens in {elapsed:.2f} s, "
          f"{n_tokens / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
    _print_spec_stats(llm)
    return 0


def add_chat_parser(subparsers) -> None:
    p = add_command(subparsers, "chat", cmd_chat, help="chat with a model in the terminal (or through a pipe)",
                    description="Reads one user message per line from standard input (a terminal or a pipe; "
                                "/exit or end of input stops, /reset forgets the conversation), renders the "
                                "conversation with the DeepSeek-V3 chat template and streams the reply as it "
                                "is generated. With --think the model reasons first: the reasoning is shown "
                                "dimmed (or after 'thinking: ' when not on a terminal) and only the final answer "
                                "is kept in the conversation.")
    add_engine_args(p)
    p.add_argument("--think", action="store_true", help="thinking mode: the reply opens with <think> reasoning")
    p.add_argument("--system", metavar="TEXT", default=None, help="a system message")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 is off)")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens per reply, at most")
    p.add_argument("--seed", type=int, default=None, help="seed of the engine's random stream (default: 0)")


def cmd_chat(args: argparse.Namespace) -> int:
    from ..tokenizer import SPECIAL_TOKENS, THINK_BEGIN, THINK_END, split_thinking

    config, tokenizer = engine_inputs(args)
    context = config.max_position_embeddings
    stop_ids = set(tokenizer.stop_ids(extra=(config.eos_token_id,)))  # EOS(es), the next user turn
    params = _sampling_params(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                              stop_token_ids=tuple(sorted(stop_ids)))
    if params.max_tokens >= context:
        raise CLIError(f"--max-tokens {params.max_tokens} leaves no room for the conversation in the model's "
                       f"context of {context} tokens")
    think_end = tokenizer.token_id(THINK_END) if args.think else None
    llm = _load_llm(args, tokenizer, max_num_seqs=1, max_model_len=context)

    out = sys.stdout
    tty = out.isatty()
    dim_on, dim_off = ("\x1b[2m", "\x1b[0m") if tty else ("thinking: ", "")
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []

    def fit(messages: list[dict]) -> list[int] | None:
        """The prompt ids, dropping the oldest turns until prompt + reply fit the context."""
        while True:
            ids = tokenizer.render_chat(system + messages, add_generation_prompt=True, thinking=args.think)
            if len(ids) + params.max_tokens <= context:
                return ids
            if len(messages) <= 1:
                return None
            del messages[0]

    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                print(file=out)
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history.clear()
            continue
        history.append({"role": "user", "content": line})
        ids = fit(history)
        if ids is None:
            history.pop()
            print(f"{PROG}: message too long for the model's context of {context} tokens", file=sys.stderr)
            continue
        reply: list[int] = []
        pieces = tokenizer.decode_stream(skip_special_tokens=True)
        reasoning = args.think
        if reasoning:
            out.write(dim_on)
        for result in llm.stream(ids, params):
            for tok in result.token_ids[len(reply):]:
                if tok in stop_ids:
                    continue
                if reasoning and tok == think_end:
                    reasoning = False
                    out.write(dim_off + "\n")
                    continue
                out.write(pieces.step(tok))
            reply = list(result.token_ids)
            out.flush()
        out.write((dim_off if reasoning else "") + "\n")
        out.flush()
        text = tokenizer.decode([t for t in reply if t not in stop_ids])
        _, content = split_thinking(THINK_BEGIN + text if args.think else text)
        for special in SPECIAL_TOKENS:
            content = content.replace(special, "")
        history.append({"role": "assistant", "content": content.strip()})
    _print_spec_stats(llm)
    return 0

