"""``dsv3.LLM``: offline batched generation over the paged latent cache with continuous batching.

    llm = dsv3.LLM("runs/tiny/final")
    outs = llm.generate(["def main(", "import os"], dsv3.SamplingParams(temperature=0, max_tokens=32))

Requests join and leave the running batch independently; each step runs every running request
(decode) plus as much waiting prompt as the token budget allows (chunked prefill).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence as Seq

import torch

from ..model import Transformer
from .block_manager import BlockManager
from .paged_cache import PagedLatentCache
from .runner import ModelRunner
from .sampling import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str | None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class LLM:
    """An inference engine for one model (DeepSeek-V3/V2 in the HF layout, or a model object)."""

    def __init__(self, model: str | Path | Transformer, tokenizer=None, *, dtype: torch.dtype | str | None = None,
                 device: str | torch.device | None = None, block_size: int = 16, num_blocks: int | None = None,
                 max_num_seqs: int = 32, max_num_batched_tokens: int = 1024, max_model_len: int = 2048,
                 prefix_caching: bool = True, seed: int = 0):
        if isinstance(model, Transformer):
            self.model = model.eval()
        else:
            from ..checkpoint import load_pretrained
            self.model = load_pretrained(model, dtype=dtype or "float32", device=device)
            if tokenizer is None and (Path(model) / "tokenizer.json").exists():
                from ..tokenizer import Tokenizer
                tokenizer = Tokenizer.load(model)
        self.tokenizer = tokenizer
        self.config = self.model.config
        self.device = self.model.embed_tokens.weight.device
        self.max_model_len = max_model_len
        if num_blocks is None:
            num_blocks = -(-max_num_seqs * max_model_len // block_size)
        self.block_manager = BlockManager(num_blocks, block_size, prefix_caching)
        n_layers = self.config.num_hidden_layers + self.config.num_nextn_predict_layers
        self.cache = PagedLatentCache(self.config, num_blocks, block_size, n_layers,
                                      self.model.embed_tokens.weight.dtype, self.device)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.cache)
        self._ids = itertools.count()
        self._seed_rng = torch.Generator().manual_seed(seed)
        self._stop_text: dict[int, str] = {}     # output text cut at a stop string

    # ------------------------------------------------------------------ requests
    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids or LLM(..., tokenizer=...)")
            return [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt")
        if max(ids) >= self.config.vocab_size or min(ids) < 0:
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        return ids

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None) -> Sequence:
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"max_model_len={self.max_model_len}")
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._seed_rng))
        gen = torch.Generator(device=self.device).manual_seed(seed)
        seq = Sequence(next(self._ids), ids, params, gen)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Cancel a request and free its cache blocks."""
        if not seq.finished:
            self.scheduler.finish(seq, "abort")

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[Sequence]:
        """One forward pass; returns the sequences that got a new token."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        seqs, out = self.runner.run(batch)
        for seq, _ in batch:
            self.block_manager.register(seq.block_table, seq.block_hashes, seq.tokens, seq.num_computed)
        for i, seq in enumerate(seqs):
            tok = int(out.token_ids[i])
            seq.output.append(tok)
            if seq.params.logprobs is not None:
                seq.logprobs.append(float(out.logprobs[i]))
                seq.top_logprobs.append(out.top_logprobs[i])
            self._check_stop(seq, tok)
        return seqs

    def _check_stop(self, seq: Sequence, tok: int) -> None:
        p = seq.params
        eos = self.config.eos_token_id
        if (tok == eos and not p.ignore_eos) or tok in p.stop_token_ids:
            self.scheduler.finish(seq, "stop")
            return
        if p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output, skip_special_tokens=True)
            hits = [text.find(s) for s in p.stop if s and s in text]
            if hits:
                self._stop_text[seq.seq_id] = text[: min(hits)]
                self.scheduler.finish(seq, "stop")
                return
        if len(seq.output) >= p.max_tokens:
            self.scheduler.finish(seq, "length")

    def output_of(self, seq: Sequence) -> RequestOutput:
        text = self._stop_text.get(seq.seq_id)
        if text is None and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output, skip_special_tokens=True)
        return RequestOutput(seq.seq_id, list(seq.prompt), list(seq.output), text, seq.finish_reason,
                             list(seq.logprobs), list(seq.top_logprobs))

    def generate(self, prompts: Seq[str | Seq[int]] | str, params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate for every prompt (continuous batching); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        while self.scheduler.has_work():
            self.step()
        return [self.output_of(s) for s in seqs]

    def stream(self, prompt: str | Seq[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every new token (other requests may run alongside)."""
        seq = self.add_request(prompt, params)
        seen = 0
        while not seq.finished:
            self.step()
            if len(seq.output) > seen or seq.finished:
                seen = len(seq.output)
                yield self.output_of(seq)
