"""``dsv3 bench decode`` with peers and the roofline: the benchmark's bookkeeping against fake peers, the
bytes-per-step accounting against a hand count from the config, machine probes and CLI flags.

The fake peers stand in for llama.cpp / vLLM: they answer in known time with known tokens, so the
ratios, the interleaving and the agreement can be checked exactly. The benchmark against the real
peers is in ``tests/interop/test_bench_decode_peers.py`` (``make interop``).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import chat_checkpoint, tiny_config

import dsv3
from dsv3.bench import decode_engines, roofline
from dsv3.bench.decode import bench_decode, format_bench_decode, parse_batches, random_prompts
from dsv3.bench.decode_engines import (LlamaCppPeer, OursEngine, Precision, RunContext, TransformersPeer, VllmPeer,
                                       agreement, first_divergence, resolve_peer)
from dsv3.bench.machine import cpu_info, l3_cache_bytes, parse_size
from dsv3.bench.roofline import ExpertCounter, expected_distinct_experts, model_step_bytes, probe_bytes
from dsv3.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return chat_checkpoint(tmp_path_factory.mktemp("bench-decode"))


@pytest.fixture(autouse=True)
def small_probe(monkeypatch):
    """A 1 MiB bandwidth probe: the real one reads >= 256 MiB, too slow for many small tests."""
    monkeypatch.setitem(roofline.MIN_PROBE_BYTES, "cpu", 1 << 20)
    monkeypatch.setattr(roofline, "l3_cache_bytes", lambda: None)


# ------------------------------------------------------------------------------------- fake peers
class FakeEngine:
    """Answers with ``tokens_fn(prompts, n)`` and fixed times; logs each call into ``log``."""

    def __init__(self, name, log, tokens_fn, prefill_s, step_s, fail_on_call=None):
        self.name, self.log, self.tokens_fn = name, log, tokens_fn
        self.prefill_s, self.step_s, self.fail_on_call = prefill_s, step_s, fail_on_call
        self.info = {"fake": True}
        self.calls = 0

    def generate(self, prompts, new_tokens):
        self.calls += 1
        self.log.append(self.name)
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise RuntimeError("fake peer crashed\nsecond line")
        tokens = self.tokens_fn(prompts, new_tokens)
        return {"tokens": tokens, "prefill_s": self.prefill_s, "decode_s": self.step_s * (new_tokens - 1),
                "decode_tokens": len(prompts) * (new_tokens - 1)}


class FakePeer:
    def __init__(self, name, log, tokens_fn=None, prefill_s=0.5, step_s=0.25, unavailable=None,
                 fail_on_call=None, precision_map=None):
        self.name, self.log = name, log
        self.tokens_fn = tokens_fn
        self.prefill_s, self.step_s = prefill_s, step_s
        self._unavailable, self.fail_on_call = unavailable, fail_on_call
        self.precision_map = precision_map or {}
        self.opened_with = None

    def unavailable(self, ctx):
        return self._unavailable

    def precision(self, p):
        key = (p.dtype, p.quantize)
        if key in self.precision_map:
            return self.precision_map[key]
        return p.dtype, None

    def open(self, ctx, precision):
        self.opened_with = (ctx, precision)
        return FakeEngine(f"fake-{self.name}", self.log, self.tokens_fn, self.prefill_s, self.step_s,
                          self.fail_on_call)


def ours_tokens(model_dir):
    """Our own greedy tokens for any prompts, from a separate engine: what an agreeing peer answers."""
    from dsv3.engine import LLM, SamplingParams

    llm = LLM(model_dir, max_num_seqs=8, max_model_len=64, prefix_caching=False)

    def fn(prompts, n):
        return [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n,
                                                                            ignore_eos=True))]
    return fn


def test_fake_peers_ratios_agreement_and_order(model_dir, monkeypatch):
    log: list[str] = []
    real_generate = OursEngine.generate

    def logged(self, prompts, n, on_decode_step=None):
        log.append(self.name)
        return real_generate(self, prompts, n, on_decode_step)

    monkeypatch.setattr(OursEngine, "generate", logged)
    same = ours_tokens(model_dir)

    def differ_at_2(prompts, n):                       # ours' tokens with the third one changed
        toks = same(prompts, n)
        return [t[:2] + [(t[2] + 1) % 300] + t[3:] if n > 2 else t for t in toks]

    a = FakePeer("a", log, same, prefill_s=0.5, step_s=0.25)
    b = FakePeer("b", log, differ_at_2, prefill_s=0.1, step_s=0.125)
    r = bench_decode(model_dir, batch="1,2", prompt_len=4, gen_len=5, repeats=3, warmup=1, peers=[a, b])

    assert r["batches"] == [1, 2] and [run["batch"] for run in r["runs"]] == [1, 2]
    assert r["peers"]["a"] == {"status": "ran", "precision": "float32", "engine": "fake-a"}
    ctx, prec = a.opened_with
    assert prec == "float32" and ctx.precision == Precision("float32") and ctx.threads == 1

    # Interleaving, per batch: one warmup round (ours counting experts, then a, b), then rotating rounds.
    ours = "dsv3"
    per_batch = [ours, "fake-a", "fake-b",                           # warmup
                 ours, "fake-a", "fake-b", "fake-a", "fake-b", ours, "fake-b", ours, "fake-a"]
    assert log == per_batch + per_batch

    for run in r["runs"]:
        B = run["batch"]
        res = {x["key"]: x for x in run["results"]}
        fa, fb, us = res["a"], res["b"], res["dsv3"]
        # The fake's own times: decode 4 steps x 0.25 s, B tokens per step.
        assert fa["decode_s_median"] == pytest.approx(1.0) and fa["prefill_s_median"] == pytest.approx(0.5)
        assert fa["step_ms"] == pytest.approx(250.0) and fa["decode_tokens_per_s"] == pytest.approx(B / 0.25)
        assert fa["tokens_per_s"] == pytest.approx(B * 5 / 1.5)
        assert len(us["time_s_all"]) == 3 and us["decode_tokens"] == B * 4
        assert us["decode_tokens_per_s"] == pytest.approx(B * 4 / us["decode_s_median"])
        for key, x in (("a", fa), ("b", fb)):
            assert run["ratios"][key]["decode"] == pytest.approx(us["decode_tokens_per_s"] / x["decode_tokens_per_s"])
            assert run["ratios"][key]["total"] == pytest.approx(us["tokens_per_s"] / x["tokens_per_s"])
        assert run["agreement"]["a"]["identical"] and run["agreement"]["a"]["first_divergence"] == [None] * B
        assert run["agreement"]["b"] == {"identical": False, "identical_sequences": 0, "sequences": B,
                                         "fraction": 0.0, "first_divergence": [2] * B, "min_first_divergence": 2}
        # The roofline fraction of every engine from the same bytes and bandwidth.
        need, bw = run["roofline"]["bytes_per_step"]["total"], r["bandwidth"]["roofline_bytes_per_s"]
        for x in run["results"]:
            assert x["roofline_fraction"] == pytest.approx(need / (bw * x["step_ms"] / 1000))
    assert r["throughput_never_falls"]["a"] is True              # B / 0.25 tokens/s grows with B
    assert r["throughput_by_batch"]["a"] == {"1": pytest.approx(4.0), "2": pytest.approx(8.0)}
    assert r["tokens_identical"] is None and r["tokens_must_match"] is False   # no transformers peer
    text = format_bench_decode(r)
    assert "fake-a" in text and "first divergence at token 2" in text and "batch 2" in text
    json.dumps(r)                                                  # JSON-ready


def test_unavailable_and_skipped_peers_are_reported_not_raised(model_dir):
    log: list[str] = []
    missing = FakePeer("missing", log, unavailable="missing-peer is not installed (pip install missing-peer)")
    no_int8 = FakePeer("noint8", log, precision_map={("float32", None): (None, "no equal precision")})
    r = bench_decode(model_dir, batch=1, prompt_len=4, gen_len=3, repeats=1, warmup=0, peers=[missing, no_int8],
                     roofline=False)
    assert r["peers"]["missing"] == {"status": "skipped", "precision": "float32",
                                     "reason": "missing-peer is not installed (pip install missing-peer)"}
    assert r["peers"]["noint8"]["status"] == "skipped" and r["peers"]["noint8"]["reason"] == "no equal precision"
    assert log == [] and [x["key"] for x in r["results"]] == ["dsv3"] and "bandwidth" not in r
    assert "peer missing: skipped: missing-peer is not installed" in format_bench_decode(r)


def test_a_failing_peer_is_dropped_and_recorded(model_dir):
    log: list[str] = []
    same = ours_tokens(model_dir)
    flaky = FakePeer("flaky", log, same, fail_on_call=2)     # the warmup works, the first timed round fails
    lines: list[str] = []
    r = bench_decode(model_dir, batch="1,2", prompt_len=4, gen_len=3, repeats=2, warmup=1, peers=[flaky],
                     roofline=False, progress=lines.append)
    assert lines[0].startswith("batch 1 warmup: dsv3 ") and lines[1].startswith("batch 1 warmup: fake-flaky ")
    assert "batch 1 round 1/2: fake-flaky failed: batch 1: RuntimeError: fake peer crashed" in lines
    assert r["errors"]["flaky"] == "batch 1: RuntimeError: fake peer crashed\nsecond line"
    assert "flaky: failed: batch 1: RuntimeError: fake peer crashed ... second line" in format_bench_decode(r)
    assert log == ["fake-flaky", "fake-flaky"]               # never called again, also not at batch 2
    assert all(x["key"] == "dsv3" for run in r["runs"] for x in run["results"])


def test_self_warming_peers_skip_the_warmup_rounds(model_dir):
    log: list[str] = []
    peer = FakePeer("own-warmup", log, ours_tokens(model_dir))
    real_open = peer.open

    def open_self_warming(ctx, precision):
        eng = real_open(ctx, precision)
        eng.self_warming = True                     # as llama.cpp's and vLLM's adapters: every call warms up
        return eng

    peer.open = open_self_warming
    r = bench_decode(model_dir, batch=1, prompt_len=4, gen_len=3, repeats=2, warmup=2, peers=[peer], roofline=False)
    assert log == ["fake-own-warmup"] * 2 and len(r["results"][1]["time_s_all"]) == 2


def test_transformers_stays_the_default_peer(model_dir):
    pytest.importorskip("transformers")
    r = bench_decode(model_dir, batch=2, prompt_len=4, gen_len=3, repeats=1, warmup=0, roofline=False)
    assert r["peers"]["transformers"]["status"] == "ran" and r["reference"].startswith("transformers")
    assert r["tokens_must_match"] is True and r["tokens_identical"] is True
    hf = next(x for x in r["results"] if x["key"] == "transformers")
    assert hf["prefill_s_median"] > 0 and hf["decode_tokens"] == 2 * 2
    assert r["ratio"] == pytest.approx(r["results"][0]["tokens_per_s"] / hf["tokens_per_s"])


# ------------------------------------------------------------------------------------- precision, peers
def test_peer_precision_mapping():
    f32, bf16, int8, int4 = (Precision("float32"), Precision("bfloat16"), Precision("float32", "int8"),
                             Precision("bfloat16", "int4"))
    llama, vllm, hf = LlamaCppPeer(), VllmPeer(), TransformersPeer()
    assert [llama.precision(p)[0] for p in (f32, bf16, int8)] == ["f32", "bf16", "q8_0"]
    assert llama.precision(int4)[0] is None and "q8_0" in llama.precision(int4)[1]
    assert [vllm.precision(p)[0] for p in (f32, bf16)] == ["float32", "bfloat16"]
    assert vllm.precision(int8) == (None, "vLLM's CPU backend has no weight-only int8 path equal to ours")
    assert hf.precision(bf16) == ("bfloat16", None) and hf.precision(int8)[0] is None
    assert int8.label == "int8 (fp32 activations)" and bf16.label == "bf16"


def test_resolve_peer_and_unavailable_messages(monkeypatch, tmp_path):
    assert resolve_peer("llama-cpp").name == "llama.cpp" and resolve_peer("VLLM").name == "vllm"
    with pytest.raises(ValueError, match="unknown peer 'ollama'; choose from transformers, llama.cpp, vllm"):
        resolve_peer("ollama")
    ctx = RunContext(tmp_path, tiny_config(), Precision(), 1, torch.device("cpu"), tmp_path)
    # A shape vLLM's MLA kernels refuse is skipped with the config's own reason.
    if hasattr(ctx.config, "servable_latent"):
        assert not ctx.config.servable_latent and "576" in VllmPeer().unavailable(ctx)
    cuda_ctx = RunContext(tmp_path, tiny_config(), Precision(), 1, torch.device("cuda"), tmp_path)
    assert "runs on the CPU" in LlamaCppPeer().unavailable(cuda_ctx)
    # An adapter module that cannot be imported is a message, not an ImportError.
    monkeypatch.setitem(sys.modules, "dsv3.bench.peers.llama_cpp", None)
    msg = LlamaCppPeer().unavailable(ctx)
    assert msg.startswith("the llama.cpp adapter (dsv3.bench.peers.llama_cpp) cannot be imported")


def test_agreement_and_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2                 # a shorter answer diverges where it ends
    a = agreement([[1, 2, 3], [4, 5, 6], [7, 8, 9]], [[1, 2, 3], [4, 0, 6], [0, 8, 9]])
    assert a == {"identical": False, "identical_sequences": 1, "sequences": 3, "fraction": pytest.approx(1 / 3),
                 "first_divergence": [None, 1, 0], "min_first_divergence": 0}
    with pytest.raises(ValueError):
        agreement([[1]], [[1], [2]])


def test_gguf_conversion_is_cached_by_fingerprint(tmp_path, monkeypatch):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text("{}")
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        open(cmd[cmd.index("gguf") + 2], "wb").write(b"GGUF")
        return type("P", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.setattr(decode_engines.subprocess, "run", fake_run)
    out, seconds = decode_engines.convert_to_gguf(src, tmp_path / "cache", "q8_0")
    assert out.exists() and out.name.endswith("-q8_0.gguf") and seconds is not None
    assert calls[0][1:6] == ["-m", "dsv3", "export", "--to", "gguf"] and calls[0][-2:] == ["--type", "q8_0"]
    again, seconds = decode_engines.convert_to_gguf(src, tmp_path / "cache", "q8_0")
    assert again == out and seconds is None and len(calls) == 1
    (src / "model.safetensors").write_bytes(b"x")                # other weights: another file
    assert decode_engines.convert_to_gguf(src, tmp_path / "cache", "q8_0")[0] != out


# ------------------------------------------------------------------------------------- roofline
def hand_step_bytes(c, batch: int, context: float, experts: float, elsize: int, cache_elsize: int) -> float:
    """Bytes of one decode step written out from the config: every tensor a step reads, by hand."""
    D, H = c.hidden_size, c.num_attention_heads
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    if c.q_lora_rank:
        q = D * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * qk
    else:
        q = D * H * qk
    attn = (q + D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
            + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim) + H * c.v_head_dim * D)
    values = 0.0
    for i in range(c.num_hidden_layers):
        values += attn + 2 * D                                       # + input and post-attention norms
        if i < c.first_k_dense_replace:
            values += 3 * D * c.intermediate_size
        else:
            values += c.n_routed_experts * D                        # router weight
            values += c.n_routed_experts if c.topk_method == "noaux_tc" else 0   # its selection bias
            values += 3 * D * c.n_shared_experts * c.moe_intermediate_size
            values += experts * 3 * D * c.moe_intermediate_size     # the experts touched
    values += D + c.vocab_size * D + batch * D                      # final norm, lm_head, embedding rows
    cache = batch * context * c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * cache_elsize
    return values * elsize + cache


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "first_k_dense_replace": 0}])
@pytest.mark.parametrize("batch", [1, 5])
def test_model_step_bytes_matches_a_hand_count(overrides, batch):
    c = tiny_config(**overrides)
    model = dsv3.Transformer(c)
    E, k = c.n_routed_experts, c.num_experts_per_tok
    expected_experts = E * (1 - (1 - k / E) ** batch)
    got = model_step_bytes(model, batch, 10.5, 4)
    assert got["experts_per_moe_layer"] == pytest.approx(expected_experts)
    assert got["total"] == pytest.approx(hand_step_bytes(c, batch, 10.5, expected_experts, 4, 4))
    assert got["cache"] == pytest.approx(batch * 10.5 * c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 4)
    # A measured expert count replaces the expectation; bf16 weights halve the weight bytes.
    got = model_step_bytes(model.to(torch.bfloat16), batch, 3, 2, experts_per_moe_layer=3.0)
    assert got["total"] == pytest.approx(hand_step_bytes(c, batch, 3, 3.0, 2, 2))
    assert set(got["weights_by_dtype"]) == {"bfloat16"}


def test_model_step_bytes_counts_stored_precision_and_tied_heads():
    c = tiny_config()
    model = dsv3.Transformer(c)
    full = model_step_bytes(model, 1, 0, 4)
    for layer in model.layers:                     # experts stored in bf16, the rest fp32
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts.to(torch.bfloat16)
    mixed = model_step_bytes(model, 1, 0, 4)
    assert mixed["routed_experts"] == pytest.approx(full["routed_experts"] / 2)
    assert mixed["weights_by_dtype"]["bfloat16"] == pytest.approx(mixed["routed_experts"])
    assert mixed["other_weights"] == full["other_weights"]
    tied = model_step_bytes(dsv3.Transformer(tiny_config(tie_word_embeddings=True)), 3, 0, 4)
    untied = model_step_bytes(dsv3.Transformer(c), 3, 0, 4)
    # Tied: the table is read once, in full, as the head; no separate embedding rows.
    assert tied["embedding_rows"] == 0
    assert tied["weights"] == pytest.approx(untied["weights"] - 3 * c.hidden_size * 4)


def test_gguf_step_bytes_reads_the_files_own_tensor_sizes(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    c = tiny_config(num_hidden_layers=2)                  # blk.2 is then a nextn (MTP) block: not read
    E, V, D = c.n_routed_experts, c.vocab_size, c.hidden_size
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "deepseek2")
    arrays = {"token_embd.weight": np.zeros((V, D), np.float32), "output.weight": np.zeros((V, D), np.float16),
              "blk.0.attn_q_a.weight": np.zeros((24, D), np.float32),
              "blk.1.ffn_up_exps.weight": np.zeros((E, 16, D), np.float16),
              "blk.2.attn_q_a.weight": np.zeros((24, D), np.float32)}
    for name, a in arrays.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = roofline.gguf_step_bytes(path, c, batch=3, mean_context=5, cache_value_bytes=2, experts_per_moe_layer=2.5)
    assert got["embedding_rows"] == pytest.approx(3 * D * 4)
    assert got["routed_experts"] == pytest.approx(E * 16 * D * 2 * 2.5 / E)
    assert got["other_weights"] == pytest.approx(V * D * 2 + 24 * D * 4)
    assert got["cache"] == pytest.approx(3 * 5 * 2 * c.latent_dim * 2)
    assert got["weights_by_dtype"] == {"F32": pytest.approx(3 * D * 4 + 24 * D * 4),
                                       "F16": pytest.approx(V * D * 2 + 16 * D * 2 * 2.5)}


def test_an_engine_with_its_own_step_bytes_gets_its_own_roofline(model_dir):
    log: list[str] = []
    peer = FakePeer("own-bytes", log, ours_tokens(model_dir))
    real_open = peer.open

    def open_with_bytes(ctx, precision):
        eng = real_open(ctx, precision)
        eng.step_bytes = lambda batch, context, experts: {"total": 1e6 * batch, "cache": 0.0,
                                                          "weights_by_dtype": {"Q8_0": 1e6 * batch}}
        return eng

    peer.open = open_with_bytes
    r = bench_decode(model_dir, batch=2, prompt_len=4, gen_len=3, repeats=1, warmup=0, peers=[peer])
    x = next(x for x in r["results"] if x["key"] == "own-bytes")
    assert x["bytes_per_step"] == 2e6 and r["roofline"]["bytes_per_step_by_engine"]["own-bytes"]["total"] == 2e6
    assert x["roofline_fraction"] == pytest.approx(2e6 / (r["bandwidth"]["roofline_bytes_per_s"] * 0.25))
    ours = r["results"][0]
    assert ours["bytes_per_step"] == r["roofline"]["bytes_per_step"]["total"]
    assert "fake-own-bytes reads its own 2.00 MB/step (weights Q8_0 2.00 MB" in format_bench_decode(r)


def test_expert_counter_counts_what_routers_chose():
    torch.manual_seed(0)
    c = tiny_config(num_nextn_predict_layers=0)
    model = dsv3.Transformer(c).eval()
    counter = ExpertCounter(model)
    n_moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    assert len(counter.routers) == n_moe and counter.mean() is None
    counter.reset()
    counter.observe()                               # nothing ran: nothing counted
    assert counter.counts == []
    with torch.no_grad():
        model(torch.tensor([[3]]))                  # one token picks exactly k distinct experts
    counter.observe()
    assert counter.counts == [c.num_experts_per_tok] * n_moe
    counter.observe()                               # the same step is not counted twice
    assert len(counter.counts) == n_moe
    with torch.no_grad():
        model(torch.arange(6).view(6, 1))           # 6 tokens: between k and min(E, 6k) distinct
    counter.observe()
    assert all(c.num_experts_per_tok <= n <= min(c.n_routed_experts, 6 * c.num_experts_per_tok)
               for n in counter.counts[n_moe:])


def test_expected_distinct_experts():
    assert expected_distinct_experts(64, 6, 1) == pytest.approx(6)
    assert expected_distinct_experts(64, 6, 1000) == pytest.approx(64)
    # Against a direct simulation of uniform picks (k distinct of E per token).
    gen = torch.Generator().manual_seed(0)
    sims = [len(set(torch.cat([torch.randperm(16, generator=gen)[:4] for _ in range(8)]).tolist()))
            for _ in range(4000)]
    assert sum(sims) / len(sims) == pytest.approx(expected_distinct_experts(16, 4, 8), rel=0.01)


def test_bandwidth_probe_size_and_fields(monkeypatch):
    monkeypatch.setitem(roofline.MIN_PROBE_BYTES, "cpu", 1 << 28)
    monkeypatch.setattr(roofline, "l3_cache_bytes", lambda: 96 << 20)
    assert probe_bytes(torch.device("cpu")) == (384 << 20, 96 << 20)        # 4x L3 above the floor
    monkeypatch.setattr(roofline, "l3_cache_bytes", lambda: 32 << 20)
    assert probe_bytes(torch.device("cpu")) == (256 << 20, 32 << 20)        # the floor
    p = roofline.bandwidth_probe(torch.device("cpu"), repeats=2, nbytes=1 << 20)
    assert p["probe_bytes"] == 1 << 20 and p["threads"] == torch.get_num_threads()
    assert p["read_bytes_per_s_best"] >= p["read_bytes_per_s"] > 0 and p["copy_bytes_per_s"] > 0


# ------------------------------------------------------------------------------------- machine
def test_parse_size_and_l3_from_sysfs(tmp_path):
    assert parse_size("32768K") == 32 << 20 and parse_size("1 MiB") == 1 << 20 and parse_size("512") == 512
    with pytest.raises(ValueError):
        parse_size("lots")
    # Two CPUs sharing one 16 MiB L3, a third with its own: 32 MiB in all (L2 entries ignored).
    for cpu, shared in (("cpu0", "0-1"), ("cpu1", "0-1"), ("cpu2", "2")):
        for index, level, size in (("index2", "2", "1024K"), ("index3", "3", "16384K")):
            d = tmp_path / cpu / "cache" / index
            d.mkdir(parents=True)
            (d / "level").write_text(level)
            (d / "size").write_text(size)
            (d / "shared_cpu_list").write_text(shared if level == "3" else cpu[-1])
    assert l3_cache_bytes(tmp_path) == 32 << 20


def test_cpu_info_records_flags_and_capability():
    info = cpu_info()
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert {"avx2", "avx512f", "avx512_bf16", "amx_bf16"} <= set(info["cpu_flags"])
    assert all(isinstance(v, bool) for v in info["cpu_flags"].values())
    assert info["l3_cache_bytes"] is None or info["l3_cache_bytes"] > 0


def test_random_prompts_of_a_larger_batch_extend_the_smaller():
    assert random_prompts(32, 5, 100, 7)[:8] == random_prompts(8, 5, 100, 7)


# ------------------------------------------------------------------------------------- CLI
def test_parse_batches():
    assert parse_batches("1,8,32") == [1, 8, 32] and parse_batches(4) == [4] and parse_batches([2, 1]) == [2, 1]
    for bad, msg in (("0", ">= 1"), ("1,x", "positive integers"), ("1,1", "twice"), ("", "positive integers")):
        with pytest.raises(ValueError, match=msg):
            parse_batches(bad)


@pytest.mark.parametrize("flags, message", [
    (["--batch", "1,0"], "batch sizes must be >= 1"),
    (["--dtype", "float16"], "dtype must be one of float32, bfloat16"),
    (["--peer", "none", "--peer", "vllm"], "--peer none runs ours alone"),
    (["--random-preset", "tiny", "--batch", "1,8"], "--random-preset takes one --batch size"),
    (["--random-preset", "tiny", "--peer", "vllm"], "takes no --speculative or --peer"),
])
def test_bench_decode_flag_errors(model_dir, capsys, flags, message):
    argv = ["bench", "decode", *([] if "--random-preset" in flags else ["--model", model_dir]), *flags]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bench_decode_unknown_peer_is_an_argparse_error(model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "decode", "--model", model_dir, "--peer", "ollama"])
    assert e.value.code == 2 and "invalid choice: 'ollama'" in capsys.readouterr().err


def test_bench_decode_cli_peer_none_several_batches(model_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "decode", "--model", model_dir, "--peer", "none", "--batch", "1,3", "--prompt-len", "4",
                 "--gen-len", "3", "--repeats", "1", "--warmup", "1", "--threads", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["batches"] == [1, 3] and r["peers"] == {} and "results" not in r       # per batch under "runs"
    assert [len(run["results"]) for run in r["runs"]] == [1, 1]
    assert r["machine"]["load_avg_before"] is not None and "cpu_flags" in r["machine"]
    assert r["runs"][0]["experts_per_moe_layer_measured"] == pytest.approx(
        dsv3.ModelConfig.from_json_file(model_dir).num_experts_per_tok)            # batch 1: exactly k
    assert "decode tokens/s by batch size" in capsys.readouterr().out


def test_bench_decode_quantize_without_engine_support_is_a_clear_error(model_dir, capsys, monkeypatch):
    from dsv3.bench import decode
    monkeypatch.setattr(decode, "engine_supports_quantize", lambda: False)
    with pytest.raises(SystemExit) as e:
        main(["bench", "decode", "--model", model_dir, "--quantize", "int8", "--peer", "none"])
    assert e.value.code == 2 and "no weight-only quantization" in capsys.readouterr().err
