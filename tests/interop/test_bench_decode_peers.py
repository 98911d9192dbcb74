"""``dsv3 bench decode --peer llama.cpp --peer vllm`` against the real peers (``make interop``): each runs
on a tiny checkpoint with the servable latent at batch 1 and 2, and its rounds, ratios and greedy
agreement come back. Skipped, with the reason, where a peer is not installed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import chat_checkpoint

import dsv3
from dsv3.bench.decode import bench_decode
from dsv3.bench.decode_engines import Precision, RunContext, resolve_peer

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def servable_dir(tmp_path_factory):
    """The tiny checkpoint with the 576-wide latent (kv_lora_rank 512 + rope 64) vLLM's MLA kernels need."""
    return chat_checkpoint(tmp_path_factory.mktemp("bench-decode-576"), kv_lora_rank=512, qk_rope_head_dim=64)


@pytest.mark.parametrize("peer", ["llama.cpp", "vllm"])
def test_real_peer_decodes_the_same_checkpoint(servable_dir, peer, tmp_path):
    """The real peer on a tiny checkpoint in fp32: it runs at batch 1 and 2, and its tokens are compared."""
    p = resolve_peer(peer)
    ctx = RunContext(servable_dir, dsv3.ModelConfig.from_json_file(servable_dir), Precision(), 1,
                     torch.device("cpu"), tmp_path)
    reason = p.unavailable(ctx)
    if reason is not None:
        pytest.skip(reason)
    r = bench_decode(servable_dir, batch="1,2", prompt_len=4, gen_len=4, repeats=1, warmup=1, peers=[peer],
                     gguf_dir=tmp_path, roofline=False)
    assert r["peers"][peer]["status"] == "ran", r["errors"]
    for run in r["runs"]:
        assert peer in run["ratios"] and run["agreement"][peer]["sequences"] == run["batch"]
