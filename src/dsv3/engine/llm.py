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
from .sampling import SamplingParams, penalty_inputs, sample
from .scheduler import Scheduler
from .sequence import Sequence
from .speculation import MTPSpeculator
from .weight_layout import column_major_linears


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
    """An inference engine for one model (DeepSeek-V3/V2 in the HF layout, or a model object).

    Decode fast paths (docs/engine-performance.md): ``cuda_graphs=True`` replays captured CUDA graphs
    of static-shape decode steps on a GPU; ``compile=True`` runs those steps through ``torch.compile``
    (on a CPU about 2x the eager engine, after a one-off compilation per batch bucket; on CUDA the
    compiled step is also captured in CUDA graphs).

    Precision: ``dtype`` is ``"float32"`` (the default), ``"bfloat16"`` or ``"auto"`` (bf16 only on a
    CPU with bf16 units where it measures faster, see :func:`dsv3.cpu.auto_dtype`); ``quantize``
    (``"int8"`` | ``"int4"``, CPU only) stores the linear layers and routed experts weight-only
    quantized (:func:`dsv3.quant.weight_only.quantize_weight_only`; a model object is quantized in place).
    """

    def __init__(self, model: str | Path | Transformer, tokenizer=None, *, dtype: torch.dtype | str | None = None,
                 device: str | torch.device | None = None, block_size: int = 16, num_blocks: int | None = None,
                 max_num_seqs: int = 32, max_num_batched_tokens: int = 1024, max_model_len: int = 2048,
                 prefix_caching: bool = True, seed: int = 0, speculative: str | None = None,
                 num_speculative_tokens: int = 1, cuda_graphs: bool = False, keep_fp8: bool = False,
                 compile: bool = False, quantize: str | None = None, adapter: str | Path | None = None):
        from ..lora import is_adapter_dir, merge_adapter  # adapter: a LoRA (PEFT layout) merged in at load
        if not isinstance(model, Transformer) and is_adapter_dir(model):
            raise ValueError(f"{model} is a LoRA adapter: give its base model as the model and this as adapter=")
        if quantize is not None and keep_fp8:
            raise ValueError("quantize and keep_fp8 are two ways of storing the same weights: choose one")
        self.quantization = None  # the summary of quantize_weight_only, when quantized
        if isinstance(model, Transformer):
            self.model = model.eval() if adapter is None else merge_adapter(model, adapter).eval()
            if quantize is not None:  # in place: the caller's model gets the quantized layers
                self.quantization = _quantize(self.model, quantize)
        else:
            from ..checkpoint import load_pretrained
            from ..cpu import resolve_dtype
            from ..quant import load_pretrained_fp8
            # keep_fp8: FP8 checkpoint weights stay float8_e4m3fn + scales (dsv3.quant), half of bf16
            load = load_pretrained_fp8 if keep_fp8 else load_pretrained
            self.model = load(model, dtype=resolve_dtype(dtype, device) or "float32", device=device)
            if adapter is not None:
                merge_adapter(self.model, adapter)
            if quantize is not None:
                self.quantization = _quantize(self.model, quantize)
            if self.model.embed_tokens.weight.device.type == "cpu":
                # Our own copy: store Linear weights the way the CPU's GEMMs stream them fastest.
                column_major_linears(self.model)
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
        # The MTP layers' cache only when they draft: without speculation it would be dead memory
        # (a fifth of the cache of the 4-layer demo model).
        n_layers = self.config.num_hidden_layers + (self.config.num_nextn_predict_layers if speculative == "mtp" else 0)
        self.cache = PagedLatentCache(self.config, num_blocks, block_size, n_layers,
                                      self.model.embed_tokens.weight.dtype, self.device)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.cache)
        if speculative not in (None, "mtp"):
            raise ValueError(f"speculative={speculative!r}: only None or 'mtp'")
        if speculative == "mtp" and not self.model.mtp:
            raise ValueError("speculative='mtp' needs a model with MTP layers (num_nextn_predict_layers >= 1)")
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.num_spec = num_speculative_tokens if speculative == "mtp" else 0
        self.speculator = MTPSpeculator(self.runner, self.block_manager, self.num_spec, max_model_len)
        # cuda_graphs: decode steps run on static shapes, one per batch bucket, replayed from CUDA
        # graphs on a GPU (eagerly on the CPU). Opt-in until it has been verified on more GPUs.
        # compile: the same static-shape steps through torch.compile (the first step of each bucket
        # compiles: 5 s to a few minutes); on CUDA the compiled step is then captured. With MTP
        # speculation the verification rows (1 + num_spec per sequence) and the drafts run there too.
        if cuda_graphs or compile:
            from .cuda_graph import CUDAGraphDecoder
            self.runner.graphs = CUDAGraphDecoder(self.model, self.cache, max_num_seqs, max_model_len,
                                                  capture=self.device.type == "cuda", compile=compile,
                                                  max_query_len=1 + self.num_spec)
        self._ids = itertools.count()
        self._seed_rng = torch.Generator().manual_seed(seed)

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
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: pass LLM(..., tokenizer=...) or use stop_token_ids")
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
        """One forward pass (plus MTP drafting when speculative); returns sequences that got tokens."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        items = []
        for seq, n in batch:
            toks = seq.tokens[seq.num_computed: seq.num_computed + n]
            items.append((toks + seq.draft, seq.num_computed, seq.block_table))
        hidden = self.runner.forward(items)
        plain: list[tuple[Sequence, torch.Tensor]] = []
        drafted: list[tuple[Sequence, int, torch.Tensor]] = []
        advanced = []
        for (seq, n), h in zip(batch, hidden):
            ends = seq.num_computed + n == len(seq)
            if not ends:                       # a prompt chunk: nothing to sample yet
                self._computed(seq, n, h[:n])
            elif seq.draft:
                drafted.append((seq, n, h))
            else:
                self._computed(seq, n, h[:n])
                plain.append((seq, h[n - 1]))
        if drafted:  # one head call for every draft-carrying sequence: rows after the last token and each draft
            logits = self.runner.logits(torch.cat([h[n - 1:] for _, n, h in drafted]))
            for (seq, n, h), lg in zip(drafted, logits.split([len(s.draft) + 1 for s, _, _ in drafted])):
                accepted = self.speculator.verify(seq, lg)
                self._computed(seq, n + len(accepted) - 1, h[: n + len(accepted) - 1])
                self._append(seq, accepted)
                advanced.append(seq)
        if plain:
            seqs = [s for s, _ in plain]
            logits = self.runner.logits(torch.stack([h for _, h in plain]))
            params = [s.params for s in seqs]
            if any(s.params.logits_processors for s in seqs):   # per-request processors (e.g. grammar masks)
                logits = torch.stack([_apply_processors(s, row) for s, row in zip(seqs, logits)])
            counts = mask = None
            if any(p.uses_penalties for p in params):
                counts, mask = penalty_inputs([s.prompt for s in seqs], [s.output for s in seqs],
                                              logits.shape[-1], device=self.device)
            out = sample(logits, params, [s.generator for s in seqs], counts, mask)
            for i, seq in enumerate(seqs):
                if seq.params.logprobs is not None:
                    seq.logprobs.append(float(out.logprobs[i]))
                    seq.top_logprobs.append(out.top_logprobs[i])
                self._append(seq, [int(out.token_ids[i])])
                advanced.append(seq)
        for seq, _ in batch:
            if not seq.finished:
                self.block_manager.register(seq.block_table, seq.block_hashes, seq.tokens, seq.num_computed)
        if self.num_spec:
            self.speculator.draft([s for s in advanced if not s.finished])
        return advanced

    def _computed(self, seq: Sequence, n: int, h: torch.Tensor) -> None:
        seq.num_computed += n
        if self.num_spec:
            seq.pending_hidden.append(h)

    def _append(self, seq: Sequence, tokens: list[int]) -> None:
        for tok in tokens:
            seq.output.append(tok)
            self._check_stop(seq, tok)
            if seq.finished:
                return

    @property
    def spec_stats(self) -> dict:
        """MTP speculation: drafted/accepted counts, acceptance rate and mean tokens emitted per
        verification step (all zero without speculation)."""
        return self.speculator.stats

    def _check_stop(self, seq: Sequence, tok: int) -> None:
        p = seq.params
        eos = self.config.eos_token_id
        if (tok == eos and not p.ignore_eos) or tok in p.stop_token_ids:
            self.scheduler.finish(seq, "stop")
            return
        if p.stop and seq.match_stop(self.tokenizer):
            self.scheduler.finish(seq, "stop")
            return
        if len(seq.output) >= p.max_tokens:
            self.scheduler.finish(seq, "length")

    def output_of(self, seq: Sequence) -> RequestOutput:
        """The request's output so far (its text cut before the stop string that ended it, if one did)."""
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output, skip_special_tokens=True)[:seq.stop_text_len]
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


def _quantize(model: Transformer, scheme: str) -> dict:
    from ..quant.weight_only import DECODE_OPTIONS, quantize_weight_only
    return quantize_weight_only(model, scheme, **DECODE_OPTIONS.get(scheme, {}))


def _apply_processors(seq: Sequence, logits: torch.Tensor) -> torch.Tensor:
    for proc in seq.params.logits_processors:
        logits = proc(seq.output, logits)
    return logits

