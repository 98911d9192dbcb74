"""Inference engine: paged latent cache, continuous batching, prefix caching, preemption, sampling seeds."""

import warnings

import pytest
import torch
from conftest import far_from_ties_

import dsv3
from dsv3.engine.block_manager import BlockManager
from dsv3.engine.llm import LLM
from dsv3.engine.sampling import SamplingParams
from dsv3.engine.speculation import MTPSpeculator
from dsv3.sample import generate

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [[3, 5, 7, 11, 13], [2] * 21, list(range(40, 73)), [9, 8], list(range(10, 27))]


def random_checkpoint(path, mtp_layers: int, seed: int):
    """A random tiny V3 with weights large enough that greedy decoding is far from ties."""
    cfg = dsv3.ModelConfig.from_hf(dict(
        vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_group=4, topk_group=2,
        num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=12, first_k_dense_replace=1, num_nextn_predict_layers=mtp_layers, max_position_embeddings=256,
        torch_dtype="float32"))
    torch.manual_seed(seed)
    dsv3.save_pretrained(far_from_ties_(dsv3.Transformer(cfg)), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("ckpt"), mtp_layers=0, seed=0)


def reference_greedy(model, prompt, n):
    """Contiguous-cache greedy decoding with the model alone."""
    return generate(model, prompt, n, temperature=0)


def test_greedy_matches_transformers_with_requests_joining_at_different_times(checkpoint):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    llm = LLM(checkpoint, block_size=4, max_num_batched_tokens=16)
    seqs = [llm.add_request(PROMPTS[0], GREEDY), llm.add_request(PROMPTS[1], GREEDY)]
    for extra in PROMPTS[2:]:  # later requests join a running batch
        for _ in range(3):
            llm.step()
        seqs.append(llm.add_request(extra, GREEDY))
    while llm.scheduler.has_work():
        llm.step()
    for p, s in zip(PROMPTS, seqs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert s.output == ref and s.finish_reason == "length"


def test_paged_equals_contiguous_cache(checkpoint):
    llm = LLM(checkpoint, block_size=3, max_num_batched_tokens=7)
    outs = llm.generate(PROMPTS, GREEDY)
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == reference_greedy(llm.model, p, 10)


def test_prefix_cache_hits_give_identical_outputs(checkpoint):
    shared = list(range(5, 45))
    prompts = [shared + [1, 2], shared + [3], shared + [60, 61, 62]]
    plain = LLM(checkpoint, block_size=4, prefix_caching=False).generate(prompts, GREEDY)
    llm = LLM(checkpoint, block_size=4)
    first = llm.generate(prompts[:1], GREEDY)
    assert llm.block_manager.prefix_hits == 0
    rest = llm.generate(prompts[1:], GREEDY)
    assert llm.block_manager.prefix_hits >= 2 * 40 - 8  # the shared full blocks were reused
    assert [o.token_ids for o in first + rest] == [o.token_ids for o in plain]


def test_preemption_and_recompute_give_identical_outputs(checkpoint):
    ref = LLM(checkpoint, block_size=4).generate(PROMPTS, GREEDY)
    # 11 blocks of 4 slots: the first two requests outgrow it together (15 + 31 tokens = 12 blocks)
    llm = LLM(checkpoint, block_size=4, num_blocks=11, max_num_batched_tokens=64)
    outs = llm.generate(PROMPTS, GREEDY)
    assert llm.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert llm.block_manager.num_free == 11  # everything returned


def test_cache_memory_equals_formula(checkpoint):
    llm = LLM(checkpoint, block_size=8, num_blocks=10)
    c = llm.config
    assert llm.cache.nbytes() == 10 * 8 * c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 4


def test_seeds_reproduce_whatever_the_batch(checkpoint):
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, ignore_eos=True)
    alone = LLM(checkpoint).generate([PROMPTS[0]], sp)[0].token_ids
    batched = LLM(checkpoint, seed=7).generate([PROMPTS[2], PROMPTS[0], PROMPTS[1]],
                                               [SamplingParams(temperature=1.0, max_tokens=5), sp, GREEDY])
    assert batched[1].token_ids == alone
    other = LLM(checkpoint).generate([PROMPTS[0]], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12,
                                                                   seed=99, ignore_eos=True))[0].token_ids
    assert other != alone


def test_stop_tokens_max_tokens_logprobs_and_abort(checkpoint):
    llm = LLM(checkpoint)
    full = llm.generate([PROMPTS[0]], GREEDY)[0].token_ids
    stop_at = full[4]
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=(stop_at,),
                                                     ignore_eos=True, logprobs=2))[0]
    assert out.token_ids == full[: full.index(stop_at) + 1] and out.finish_reason == "stop"
    assert len(out.logprobs) == len(out.token_ids) and all(lp <= 0 for lp in out.logprobs)
    assert all(len(t) == 2 for t in out.top_logprobs)
    seq = llm.add_request(PROMPTS[2], GREEDY)
    llm.step()
    assert llm.block_manager.num_free < llm.block_manager.num_blocks
    llm.abort(seq)
    assert seq.finish_reason == "abort" and llm.block_manager.num_free == llm.block_manager.num_blocks
    with pytest.raises(ValueError, match="max_model_len"):
        llm.add_request([1] * 2000, SamplingParams(max_tokens=100))


def test_block_manager_prefix_sharing_and_eviction():
    bm = BlockManager(num_blocks=4, block_size=2)
    t1 = []
    assert bm.grow(t1, 5) and len(t1) == 3 and bm.num_free == 1
    h1 = []
    bm.register(t1, h1, [1, 2, 3, 4, 5], num_computed=5)
    assert len(h1) == 2  # two full blocks hashed
    table, hashes = bm.match_prefix([1, 2, 3, 4, 9, 9])
    assert table == t1[:2] and bm.ref[t1[0]] == 2
    bm.free(table)
    bm.free(t1)
    assert bm.num_free == 4
    again, _ = bm.match_prefix([1, 2, 3, 4, 7])   # cached blocks survive their request
    assert len(again) == 2
    bm.free(again)
    t2 = []
    assert bm.grow(t2, 8) and not bm.grow(t2, 10)  # all 4 blocks, reusing (evicting) the cached ones
    assert bm.match_prefix([1, 2, 3, 4, 5]) == ([], [])


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
    """With one (random) MTP module: its drafts are mostly wrong, which exercises rejection."""
    return random_checkpoint(tmp_path_factory.mktemp("mtp"), mtp_layers=1, seed=1)


@pytest.mark.parametrize("k", [1, 3])
def test_mtp_speculative_greedy_equals_plain_greedy(mtp_checkpoint, k):
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = LLM(mtp_checkpoint, block_size=4).generate(PROMPTS, sp)
    llm = LLM(mtp_checkpoint, block_size=4, speculative="mtp", num_speculative_tokens=k)
    spec = llm.generate(PROMPTS, sp)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    st = llm.spec_stats
    assert st["drafted"] > 0 and st["verify_steps"] > 0
    assert 0 <= st["acceptance_rate"] <= 1 and 1 <= st["mean_accepted_length"] <= k + 1
    assert llm.block_manager.num_free == llm.block_manager.num_blocks


def test_mtp_speculative_sampling_runs_and_reproduces(mtp_checkpoint):
    sp = SamplingParams(temperature=0.8, top_k=20, max_tokens=12, seed=5, ignore_eos=True)
    a = LLM(mtp_checkpoint, speculative="mtp", num_speculative_tokens=2).generate(PROMPTS[:3], sp)
    b = LLM(mtp_checkpoint, speculative="mtp", num_speculative_tokens=2).generate(PROMPTS[:3], sp)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(len(o.token_ids) == 12 for o in a)
    with pytest.raises(ValueError, match="speculative"):
        LLM(mtp_checkpoint, speculative="eagle")


def test_speculative_bookkeeping_with_oracle_drafts(mtp_checkpoint, monkeypatch):
    """Drafts taken from the true greedy continuation (every third one corrupted) must be accepted
    up to the first wrong one, and the output must still equal plain greedy decoding."""
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    plain = {tuple(p): o.token_ids for p, o in zip(PROMPTS, LLM(mtp_checkpoint).generate(PROMPTS, sp))}
    real_draft = MTPSpeculator.draft
    calls = {"n": 0}

    def oracle(self, seqs):
        real_draft(self, seqs)           # keeps the MTP cache and state moving as usual
        for s in seqs:
            if s.draft:
                truth = plain[tuple(s.prompt)][len(s.output):]
                calls["n"] += 1
                s.draft = [t if (calls["n"] + j) % 3 else (t + 1) % 97 for j, t in enumerate(truth[:len(s.draft)])]
                s.draft += [0] * (3 - len(s.draft))
    monkeypatch.setattr(MTPSpeculator, "draft", oracle)
    llm = LLM(mtp_checkpoint, block_size=4, speculative="mtp", num_speculative_tokens=3)
    outs = llm.generate(PROMPTS, sp)
    assert [o.token_ids for o in outs] == [plain[tuple(p)] for p in PROMPTS]
    st = llm.spec_stats
    assert st["acceptance_rate"] > 0.3 and st["mean_accepted_length"] > 1.5
