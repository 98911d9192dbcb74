"""Chat-format SFT data: JSONL conversations -> token ids + assistant-only loss masks -> packed rows.

One JSON object per line::

    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "...", "reasoning_content": "...",
                   "tool_calls": [...]},
                  {"role": "tool", "content": "..."}, ...],
     "tools": [...],            # optional: JSON schemas shown in the system part
     "thinking": true,          # optional: render in thinking mode (default: true when the last
                                #   assistant message carries reasoning)
     "teacher": {...}}          # optional, written by `dsv3 distill` (see below)

The conversation is rendered with the model's own chat format (:meth:`Tokenizer.render_chat_with_mask`),
so a trained model sees exactly what ``dsv3 chat`` / ``dsv3 serve`` will feed it. Only tokens the
assistant generates carry loss: its reasoning, ``</think>``, content, tool calls and the closing
EOS -- never the system prompt, user turns, tool outputs or the ``<｜Assistant｜>`` prompt itself.

**Teacher records** (distillation): ``teacher = {"prompt_ids": [...], "completion_ids": [...],
"top_logprobs": [[[id, logprob], ...], ...]}``. The example is then exactly the teacher's tokens
(the prompt as the teacher saw it, the completion as it generated it, no re-tokenization), the loss
mask covers the completion, and ``top_logprobs[j]`` -- the teacher's top-k log-probabilities before
completion token ``j`` -- feed the KL term of :mod:`dsv3.post.sft`.

**Packing.** Examples are concatenated into rows of ``seq_len + 1`` tokens (inputs ``row[:-1]``,
targets ``row[1:]``), an example never split across rows; the rest of a row is padding with no
loss. As in pre-training there is no cross-example attention mask: every example starts with BOS,
which the model has learned to treat as a document boundary.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..tokenizer import THINK_END, Tokenizer

_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class ChatDataError(ValueError):
    """A chat JSONL file is malformed; the message names the file and line."""


@dataclass
class Example:
    """One rendered conversation: ``ids`` [n], ``mask`` [n] (True: a trained target token) and, for
    distillation, per target position the teacher's top-k ``(ids, logprobs)`` (else ``None``)."""

    ids: list[int]
    mask: list[bool]
    teacher: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)  # token index -> top-k
    source: str = ""

    def __len__(self) -> int:
        return len(self.ids)


def wants_thinking(record: Mapping[str, Any]) -> bool:
    """Thinking mode for a record: its ``thinking`` field, else whether the last assistant message
    carries reasoning (a ``reasoning_content`` / ``thinking`` / ``reasoning`` field, or content
    with ``</think>``)."""
    if record.get("thinking") is not None:
        return bool(record["thinking"])
    replies = [m for m in record["messages"] if isinstance(m, Mapping) and m.get("role") == "assistant"]
    if not replies:
        return False
    last = replies[-1]
    return any(last.get(k) for k in _REASONING_KEYS) or THINK_END in str(last.get("content") or "")


def render_example(tokenizer: Tokenizer, record: Mapping[str, Any], source: str = "") -> Example:
    """Token ids and the assistant-only loss mask of one JSONL record (see the module doc)."""
    teacher = record.get("teacher")
    if teacher is not None:
        if not isinstance(teacher, Mapping):
            raise ChatDataError(f"{source}: 'teacher' must be an object")
        fp = teacher.get("tokenizer_fingerprint")
        if fp is not None and fp != tokenizer.fingerprint():
            raise ChatDataError(f"{source}: the teacher's token ids come from a different tokenizer than this "
                                "model's; distillation with teacher tokens needs a shared tokenizer (regenerate "
                                "the data with `dsv3 distill` without --top-logprobs to train on the text)")
        ex = _teacher_example(teacher, source)
        if max(ex.ids) >= tokenizer.vocab_size:
            raise ChatDataError(f"{source}: teacher token id {max(ex.ids)} is outside this tokenizer's "
                                f"{tokenizer.vocab_size} ids")
        return ex
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ChatDataError(f"{source}: record needs a non-empty 'messages' list")
    if not any(isinstance(m, Mapping) and m.get("role") == "assistant" for m in messages):
        raise ChatDataError(f"{source}: no assistant message, nothing to train on")
    try:
        ids, mask = tokenizer.render_chat_with_mask(messages, thinking=wants_thinking(record),
                                                    tools=record.get("tools"))
    except (TypeError, ValueError, KeyError) as e:
        raise ChatDataError(f"{source}: {e}") from None
    return Example(ids, mask, source=source)


def _teacher_example(teacher: Mapping[str, Any], source: str) -> Example:
    try:
        prompt = [int(i) for i in teacher["prompt_ids"]]
        completion = [int(i) for i in teacher["completion_ids"]]
    except (KeyError, TypeError, ValueError):
        raise ChatDataError(f"{source}: 'teacher' needs integer lists 'prompt_ids' and 'completion_ids'") from None
    if not prompt or not completion:
        raise ChatDataError(f"{source}: empty teacher prompt or completion")
    ids = prompt + completion
    mask = [False] * len(prompt) + [True] * len(completion)
    top = teacher.get("top_logprobs") or []
    if top and len(top) != len(completion):
        raise ChatDataError(f"{source}: teacher has {len(top)} top_logprobs rows for {len(completion)} "
                            "completion tokens")
    dist = {}
    for j, row in enumerate(top):
        if row:
            dist[len(prompt) + j] = ([int(i) for i, _ in row], [float(lp) for _, lp in row])
    return Example(ids, mask, dist, source)


def read_chat_jsonl(paths: str | Path | Sequence[str | Path], tokenizer: Tokenizer) -> list[Example]:
    """Every record of the JSONL file(s), rendered. Errors name ``file:line``."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ChatDataError(f"{path}: no such chat data file")
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ChatDataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(record, dict):
                    raise ChatDataError(f"{where}: a record must be a JSON object with 'messages'")
                ex = render_example(tokenizer, record, where)
                ex.source = hashlib.sha256(line.strip().encode()).hexdigest()[:16]  # content id: stable split
                out.append(ex)
    if not out:
        raise ChatDataError(f"no records in {', '.join(map(str, paths))}")
    return out


# --------------------------------------------------------------------------------------- packing
@dataclass
class PackedChat:
    """Packed rows. ``tokens`` [R, L] (L = seq_len + 1), ``targets_mask`` [R, L-1] (loss on target
    ``tokens[:, 1:]``), and for distillation ``teacher_ids`` / ``teacher_logprobs`` [R, L-1, K] with
    ``teacher_valid`` [R, L-1] (K = 0 when no example has teacher log-probs)."""

    tokens: torch.Tensor
    targets_mask: torch.Tensor
    teacher_ids: torch.Tensor
    teacher_logprobs: torch.Tensor
    teacher_valid: torch.Tensor
    num_truncated: int = 0

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def rows(self, index) -> dict[str, torch.Tensor]:
        """The batch of rows ``index`` (a list or tensor of row numbers) as a dict of tensors."""
        index = torch.as_tensor(index, dtype=torch.long)
        return {"tokens": self.tokens[index], "targets_mask": self.targets_mask[index],
                "teacher_ids": self.teacher_ids[index], "teacher_logprobs": self.teacher_logprobs[index],
                "teacher_valid": self.teacher_valid[index]}

    @property
    def num_target_tokens(self) -> int:
        return int(self.targets_mask.sum())


def pack(examples: Sequence[Example], seq_len: int, pad_id: int) -> PackedChat:
    """Greedy packing in the given order: an example goes into the current row if it fits, else it
    starts a new row. An example longer than ``seq_len + 1`` is cut to that length (counted in
    ``num_truncated``)."""
    if seq_len < 1:
        raise ChatDataError(f"seq_len must be positive, got {seq_len}")
    L = seq_len + 1
    rows: list[list[Example]] = []
    used = L  # forces a first row
    truncated = 0
    for ex in examples:
        n = len(ex)
        if n > L:
            truncated += 1
            ex = Example(ex.ids[:L], ex.mask[:L], {i: t for i, t in ex.teacher.items() if i < L}, ex.source)
            n = L
        if used + n > L:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += n
    K = max((len(t[0]) for ex in examples for t in ex.teacher.values()), default=0)
    R = len(rows)
    tokens = torch.full((R, L), pad_id, dtype=torch.long)
    mask = torch.zeros(R, L, dtype=torch.bool)
    t_ids = torch.zeros(R, L, K, dtype=torch.long)
    t_lp = torch.full((R, L, K), -math.inf)
    t_valid = torch.zeros(R, L, dtype=torch.bool)
    for r, row in enumerate(rows):
        at = 0
        for ex in row:
            n = len(ex)
            tokens[r, at:at + n] = torch.tensor(ex.ids)
            mask[r, at:at + n] = torch.tensor(ex.mask)
            for i, (ids, lps) in ex.teacher.items():
                t_ids[r, at + i, :len(ids)] = torch.tensor(ids)
                t_lp[r, at + i, :len(lps)] = torch.tensor(lps)
                t_valid[r, at + i] = True
            at += n
    # Token i is the target of input position i - 1; row position 0 is never a target.
    return PackedChat(tokens, mask[:, 1:].contiguous(), t_ids[:, 1:].contiguous(), t_lp[:, 1:].contiguous(),
                      t_valid[:, 1:].contiguous(), truncated)


class RowBatches:
    """An endless stream of row batches: each epoch a fresh seeded permutation of the rows.

    ``batch_size`` is the global batch; with ``world_size`` ranks each takes its ``rank``-th slice of
    it (every rank advances the same shared position), so a run means the same at any world size.
    :meth:`state_dict` / :meth:`load_state_dict` resume the exact stream (pure function of seed,
    epoch and position, like the pre-training batches)."""

    def __init__(self, packed: PackedChat, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ChatDataError(f"batch_size must be positive, got {batch_size}")
        if batch_size % world_size:
            raise ChatDataError(f"--batch-size {batch_size} is the global batch; it must be divisible by the "
                                f"number of ranks ({world_size})")
        if len(packed) == 0:
            raise ChatDataError("no packed rows to train on")
        self.packed, self.batch_size, self.seed = packed, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0

    def _perm(self) -> np.ndarray:
        from ..data import epoch_permutation  # the same stable permutation as pre-training
        return epoch_permutation(len(self.packed), self.seed + self.epoch)

    def __iter__(self) -> RowBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        chosen, need = [], self.batch_size
        while need:
            perm = self._perm()
            take = min(need, len(self.packed) - self.position)
            chosen += perm[self.position:self.position + take].tolist()
            self.position += take
            need -= take
            if self.position == len(self.packed):
                self.epoch, self.position = self.epoch + 1, 0
        local = self.batch_size // self.world_size
        return self.packed.rows(chosen[self.rank * local:(self.rank + 1) * local])

    @property
    def epoch_progress(self) -> float:
        return self.epoch + self.position / len(self.packed)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "num_rows": len(self.packed)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if state["num_rows"] != len(self.packed):
            raise ChatDataError(f"resume state was saved with {state['num_rows']} packed rows, the data now "
                                f"packs into {len(self.packed)}: the data or --seq-len changed")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])


def split_examples(examples: Sequence[Example], val_fraction: float) -> tuple[list[Example], list[Example]]:
    """(train, val) by a hash of each record's content: stable across runs and file order."""
    from ..data import split_of
    train, val = [], []
    for ex in examples:
        (val if split_of(ex.source, val_fraction) == "val" else train).append(ex)
    if not train:  # a tiny file can hash entirely into val; keep something to train on
        train, val = list(val), []
    return train, val
