"""Long prefill: blocked attention (fused flash kernel per key block, or the eager online softmax)
and the engine's chunked prefill over it.

Both blocked kernels are checked against a plain float64 softmax attention written here; MLA's blocked
paths (naive per block, absorbed) against MLA's own full attention; and the engine's chunked prefill
(3 chunks of 64 tokens, key blocks of 32, consecutive and scattered cache pages) against the model's
unchunked full-sequence forward.
"""

from __future__ import annotations

import functools

import pytest
import torch

from dsv3.engine.llm import LLM
from dsv3.engine.paged_cache import PagedLatentCache
from dsv3.engine.runner import ModelRunner
from dsv3.kernels.blocked_attention import blocked_attention
from dsv3.model import Transformer
from dsv3.model.mla import MLA
from conftest import tiny_config


def plain_attention(q, k, v, scale, q_start):
    """softmax(q k^T * scale) v in float64 with the causal mask key_pos <= q_start + i (k, v broadcast)."""
    q, k, v = q.double(), k.double(), v.double()
    s = torch.matmul(q, k.transpose(-1, -2)) * scale                             # [G, S, T]
    S, T = q.shape[1], k.shape[1]
    visible = torch.arange(T)[None, :] <= torch.arange(q_start, q_start + S)[:, None]
    return torch.matmul(s.masked_fill(~visible, float("-inf")).softmax(-1), v)


def _blocks(k, v, size, order=None):
    starts = list(range(0, k.shape[1], size))
    for s in (starts if order is None else [starts[i] for i in order]):
        yield k[:, s:s + size], v[:, s:s + size], s


KERNELS = ["online", "flash"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("S,T,block,q_tile", [(64, 64, 32, 128), (48, 200, 32, 16), (1, 77, 32, 128), (70, 300, 64, 32)])
def test_blocked_attention_equals_plain_softmax_attention(kernel, shared, S, T, block, q_tile):
    g = torch.Generator().manual_seed(S * 1000 + T)
    G, d, dv = 3, 24, 10
    q = torch.randn(G, S, d, generator=g) * 2
    kg = 1 if shared else G
    k, v = torch.randn(kg, T, d, generator=g) * 2, torch.randn(kg, T, dv, generator=g)
    out = blocked_attention(q, _blocks(k, v, block), 0.3, T - S, q_tile=q_tile, kernel=kernel)
    ref = plain_attention(q, k, v, 0.3, T - S)
    assert out.shape == (G, S, dv) and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_blocked_attention_takes_blocks_in_any_order_and_skips_future_keys(kernel):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 40, 8, generator=g), torch.randn(2, 160, 8, generator=g), torch.randn(2, 160, 5, generator=g)
    # Queries at 60..99: the keys past 99 (blocks at 100..159) must not count, whatever their order.
    out = blocked_attention(q, _blocks(k, v, 20, order=[7, 2, 0, 5, 1, 6, 3, 4]), 0.5, 60, q_tile=16, kernel=kernel)
    torch.testing.assert_close(out.double(), plain_attention(q, k[:, :100], v[:, :100], 0.5, 60), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block,q_start", [(48, 100), (64, 96), (200, 130), (13, 121)])
def test_flash_kernel_block_boundaries_inside_the_chunk(block, q_start):
    """The flash path splits a key block that straddles the chunk's first query into its past part
    (unmasked call) and its own part, and gathers the chunk's own keys from several blocks into one
    causal call: block edges before, at and inside the chunk, blocks given out of order."""
    g = torch.Generator().manual_seed(block + q_start)
    S, G, d, dv = 70, 4, 96, 32                       # MLA's tiny head sizes: v padded inside the kernel
    T = q_start + S
    q = torch.randn(G, S, d, generator=g)
    k, v = torch.randn(G, T, d, generator=g), torch.randn(G, T, dv, generator=g)
    n = -(-T // block)
    order = list(range(n))[::-1]
    out = blocked_attention(q, _blocks(k, v, block, order=order), d ** -0.5, q_start, kernel="flash")
    torch.testing.assert_close(out.double(), plain_attention(q, k, v, d ** -0.5, q_start), atol=1e-5, rtol=1e-5)
    online = blocked_attention(q, _blocks(k, v, block), d ** -0.5, q_start, kernel="online")
    torch.testing.assert_close(out, online, atol=1e-5, rtol=1e-5)


def test_flash_kernel_wider_values_and_own_keys_with_a_gap():
    """v wider than q/k (the query side is zero-padded), and the chunk's own keys with a hole in their
    positions (an explicit mask instead of the causal flag; a query that sees no own key keeps only
    its past keys)."""
    g = torch.Generator().manual_seed(3)
    G, S, d, dv, q_start = 2, 12, 8, 20, 30
    q = torch.randn(G, S, d, generator=g)
    k, v = torch.randn(G, 42, d, generator=g), torch.randn(G, 42, dv, generator=g)
    keep = [i for i in range(42) if i not in (31, 32, 33)]                      # own positions 31..33 missing
    blocks = [(k[:, 0:30], v[:, 0:30], 0), (k[:, 30:31], v[:, 30:31], 30), (k[:, 34:42], v[:, 34:42], 34)]
    out = blocked_attention(q, blocks, 0.4, q_start, kernel="flash")
    s = torch.matmul(q.double(), k[:, keep].double().transpose(-1, -2)) * 0.4
    visible = torch.tensor(keep)[None, :] <= torch.arange(q_start, q_start + S)[:, None]
    ref = torch.matmul(s.masked_fill(~visible, float("-inf")).softmax(-1), v[:, keep].double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_flash_kernel_bf16_inputs_stay_close_to_fp32():
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 40, 16, generator=g), torch.randn(2, 100, 16, generator=g), torch.randn(2, 100, 8, generator=g)
    ref = plain_attention(q, k, v, 0.25, 60)
    out = blocked_attention(q.bfloat16(), _blocks(k.bfloat16(), v.bfloat16(), 32), 0.25, 60, kernel="flash")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("kernel", KERNELS)
def test_blocked_attention_rejects_bad_input(kernel):
    q = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="no key blocks"):
        blocked_attention(q, [], 1.0, 0, kernel=kernel)
    with pytest.raises(ValueError, match="do not fit"):
        blocked_attention(q, [(torch.randn(2, 4, 7), torch.randn(2, 4, 3), 0)], 1.0, 0, kernel=kernel)
    with pytest.raises(ValueError, match="saw no key"):  # queries at 0..3, keys only at 10..13
        blocked_attention(q, [(torch.randn(2, 4, 8), torch.randn(2, 4, 3), 10)], 1.0, 0, kernel=kernel)
    with pytest.raises(ValueError, match="q \\[G, S, d\\]"):
        blocked_attention(torch.randn(4, 8), [], 1.0, 0, kernel=kernel)
    with pytest.raises(ValueError, match="kernel must be one of"):
        blocked_attention(q, [], 1.0, 0, kernel="fused")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("absorb", [False, True, None])
def test_mla_attend_blocks_equals_full_attention(absorb, kernel):
    torch.manual_seed(0)
    c = tiny_config()
    mla = MLA(c, 0).eval()
    S, T = 24, 100
    q_nope, q_pe = torch.randn(1, S, c.num_attention_heads, c.qk_nope_head_dim), torch.randn(1, S, c.num_attention_heads, c.qk_rope_head_dim)
    c_kv, k_pe = torch.randn(1, T, c.kv_lora_rank), torch.randn(1, T, c.qk_rope_head_dim)
    with torch.no_grad():
        ref = mla.attend(q_nope, q_pe, c_kv, k_pe, absorb=False)[0]                 # [S, H, v]
        lat = ((c_kv[0, s:s + 32], k_pe[0, s:s + 32], s) for s in range(0, T, 32))
        out = mla.attend_blocks(q_nope[0], q_pe[0], lat, T - S, absorb=absorb, q_tile=8, kernel=kernel)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_absorbed_is_cheaper_for_few_queries_only():
    mla = MLA(tiny_config(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32), 0)
    assert mla.absorbed_is_cheaper(1, 4096) and not mla.absorbed_is_cheaper(1024, 4096)


def test_key_blocks_are_views_where_pages_are_consecutive():
    c = tiny_config()
    cache = PagedLatentCache(c, num_blocks=12, block_size=4, num_layers=1, dtype=torch.float32, device=torch.device("cpu"))
    # pages 3,4,5 consecutive, then 9, then 1: positions 0..11 are slots 12..23, then 36..39, then 4..7
    blocks = cache.key_blocks([3, 4, 5, 9, 1], ctx_len=19, block_len=8)
    assert blocks == [(0, 8, 12), (8, 16, None), (16, 19, 4)]
    with pytest.raises(ValueError, match=">= 1"):
        cache.key_blocks([0], 3, 0)


def _model(**overrides):
    torch.manual_seed(0)
    return Transformer(tiny_config(max_position_embeddings=512, **overrides)).eval()


def test_engine_long_chunked_prefill_equals_unchunked_forward():
    """3 chunks x 64 tokens through dsv3.LLM with key blocks of 32: the logits after the last chunk
    and every chunk's hidden states equal the model's single full-sequence forward (1e-5)."""
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (192,), generator=torch.Generator().manual_seed(1)).tolist()
    llm = LLM(model, max_num_batched_tokens=64, max_num_seqs=1, max_model_len=256, block_size=16, prefix_caching=False)
    llm.runner.attention_block = 32
    hidden, forward = [], llm.runner.forward

    def spy(items):
        out = forward(items)
        hidden.append(out[0])
        return out

    llm.runner.forward = spy
    seq = llm.add_request(ids, __import__("dsv3").SamplingParams(temperature=0, max_tokens=1))
    while llm.scheduler.has_work():
        llm.step()
    assert [h.shape[0] for h in hidden] == [64, 64, 64]
    with torch.inference_mode():
        ref, _, _ = model.hidden_states(torch.tensor([ids]))
        ref_logits = model.lm_head(ref[0, -1]).float()
    torch.testing.assert_close(torch.cat(hidden), ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(llm.runner.logits(hidden[-1][-1:])[0], ref_logits, atol=1e-5, rtol=1e-5)
    assert seq.output == [int(ref_logits.argmax())]


@pytest.mark.parametrize("kernel", KERNELS)
def test_runner_prefill_over_scattered_pages_equals_unchunked_forward(kernel, monkeypatch):
    """A block table whose pages are out of order (gathered key blocks) and partly consecutive (views),
    prompt chunks with a decode-sized item beside them (its absorbed blocked path), through each kernel."""
    monkeypatch.setattr(MLA, "attend_blocks", functools.partialmethod(MLA.attend_blocks, kernel=kernel))
    model = _model()
    c = model.config
    cache = PagedLatentCache(c, num_blocks=24, block_size=8, num_layers=c.num_hidden_layers + c.num_nextn_predict_layers,
                             dtype=torch.float32, device=torch.device("cpu"))
    runner = ModelRunner(model, cache, attention_block=16)
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, c.vocab_size, (150,), generator=g).tolist()
    b = torch.randint(0, c.vocab_size, (20,), generator=g).tolist()
    table_a = [7, 8, 9, 2, 15, 16, 0, 1, 20, 21, 22, 4, 5, 6, 3, 23, 10, 11, 12]   # 19 pages = 152 slots
    table_b = [13, 14, 17]
    a1, b1 = runner.forward([(a[:64], 0, table_a), (b[:19], 0, table_b)])
    a2, b2 = runner.forward([(a[64:128], 64, table_a), (b[19:], 19, table_b)])   # b: one token, absorbed blocks
    (a3,) = runner.forward([(a[128:], 128, table_a)])
    with torch.inference_mode():
        ref_a, _, _ = model.hidden_states(torch.tensor([a]))
        ref_b, _, _ = model.hidden_states(torch.tensor([b]))
    torch.testing.assert_close(torch.cat([a1, a2, a3]), ref_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([b1, b2]), ref_b[0], atol=1e-5, rtol=1e-5)
