"""Distillation data: ``dsv3 distill --teacher T --prompts FILE --out DATA.jsonl``.

DeepSeek-V3 served as the teacher whose generations trained smaller models (and R1's reasoning was
distilled into V3). Here a teacher model answers every prompt through the chat template with the
inference engine, and each answer becomes a chat JSONL record for ``dsv3 sft``:

    {"messages": [..., {"role": "assistant", "content": ..., "reasoning_content": ...}],
     "thinking": bool, "finish_reason": "stop"}

With ``--top-logprobs K`` the record also keeps the teacher's exact tokens and, per generated token,
its top-K log-probabilities (the engine's raw ``log_softmax`` of the logits, before temperature)::

    "teacher": {"prompt_ids": [...], "completion_ids": [...], "top_logprobs": [[[id, lp], ...], ...],
                "tokenizer_fingerprint": "..."}

``dsv3 sft`` then trains on exactly those tokens and adds a KL term toward the teacher's top-K
distribution (:func:`dsv3.post.sft.topk_kl`); that needs the student to share the teacher's tokenizer,
which the fingerprint checks. Completions cut by ``--max-tokens`` are dropped (counted in the summary)
unless ``keep_truncated``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..tokenizer import SPECIAL_TOKENS, parse_tool_calls, split_thinking


def read_conversations(path: str | Path) -> list[list[dict]]:
    """Prompts to answer: JSONL rows with ``messages`` (a conversation ending in a user turn) or
    ``prompt`` (one user message), or plain text with one user message per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            out.append([{"role": "user", "content": line}])
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        if isinstance(row.get("messages"), list) and row["messages"]:
            msgs = row["messages"]
            if msgs[-1].get("role") not in ("user", "tool"):
                raise ValueError(f"{path}:{lineno}: the conversation must end with a user (or tool) turn")
            out.append(msgs)
        elif isinstance(row.get("prompt"), str):
            out.append([{"role": "user", "content": row["prompt"]}])
        else:
            raise ValueError(f"{path}:{lineno}: a JSON row needs 'messages' or 'prompt'")
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def reply_message(text: str, thinking: bool) -> dict:
    """The assistant message of a decoded completion (special tokens kept, stop token removed)."""
    content, calls = parse_tool_calls(text)
    reasoning = ""
    if thinking:
        reasoning, content = split_thinking(content)
    for special in SPECIAL_TOKENS:
        content = content.replace(special, "")
    msg: dict = {"role": "assistant", "content": content.strip()}
    if reasoning:
        msg["reasoning_content"] = reasoning
    if calls:
        msg["tool_calls"] = [{"type": "function", "function": c} for c in calls]
    return msg


def distill(teacher: str | Path, conversations: list[list[dict]], out: str | Path, *, thinking: bool = False,
            max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 1.0, top_logprobs: int = 0,
            samples_per_prompt: int = 1, seed: int = 0, device: str | None = None,
            max_num_seqs: int = 32, keep_truncated: bool = False) -> dict:
    """Answer every conversation with ``teacher`` and write chat JSONL records to ``out``.

    Returns ``{"out", "prompts", "written", "dropped_truncated", "completion_tokens"}``.
    """
    from ..engine import LLM, SamplingParams
    from ..tokenizer import Tokenizer
    from ..tasks import completion_text

    if top_logprobs < 0 or samples_per_prompt < 1:
        raise ValueError("top_logprobs must be >= 0 and samples_per_prompt >= 1")
    tokenizer = Tokenizer.load(teacher)
    prompts = [tokenizer.render_chat(m, add_generation_prompt=True, thinking=thinking) for m in conversations]
    longest = max(map(len, prompts)) + max_new_tokens
    llm = LLM(teacher, tokenizer, device=device, max_num_seqs=max_num_seqs, max_model_len=longest, seed=seed)
    stops = tokenizer.stop_ids()
    jobs, params = [], []
    for i, ids in enumerate(prompts):
        for j in range(samples_per_prompt):
            jobs.append(i)
            params.append(SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                         stop_token_ids=stops, seed=seed * 1_000_003 + i * samples_per_prompt + j,
                                         logprobs=top_logprobs or None))
    outs = llm.generate([prompts[i] for i in jobs], params)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = dropped = n_tokens = 0
    fingerprint = tokenizer.fingerprint()
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, o in zip(jobs, outs):
            if o.finish_reason != "stop" and not keep_truncated:
                dropped += 1
                continue
            text = completion_text(tokenizer, o.token_ids)
            record = {"messages": [*conversations[i], reply_message(text, thinking)], "thinking": thinking,
                      "finish_reason": o.finish_reason}
            if top_logprobs:
                record["teacher"] = {
                    "prompt_ids": list(prompts[i]), "completion_ids": list(o.token_ids),
                    "top_logprobs": [[[int(t), round(float(lp), 6)] for t, lp in row] for row in o.top_logprobs],
                    "tokenizer_fingerprint": fingerprint, "model": str(teacher)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
            n_tokens += len(o.token_ids)
    tmp.replace(out)   # a killed run never leaves a half-written data file under the final name
    return {"out": str(out), "prompts": len(conversations), "written": written, "dropped_truncated": dropped,
            "completion_tokens": n_tokens, "top_logprobs": top_logprobs}
