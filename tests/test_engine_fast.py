"""Engine fast paths: static-shape (CUDA-graph) decode steps, the greedy sampling shortcut.

The static decode step pads a batch to its bucket with rows that write only the scratch block; on
the CPU its buffers run eagerly, so the padding and block-table logic is checked here against the
plain engine and against the model's own contiguous-cache greedy decoding. On a GPU the captured
graphs are checked against eager decoding.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch._inductor.config

from dsv3.engine.cuda_graph import CUDAGraphDecoder
from dsv3.engine.llm import LLM
from dsv3.engine.sampling import SamplingParams, sample
from dsv3.model import Transformer
from dsv3.sample import generate
from conftest import far_from_ties_
from test_engine import PROMPTS, random_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import dsv3
    return dsv3.load_pretrained(random_checkpoint(tmp_path_factory.mktemp("fast"), mtp_layers=1, seed=3))


def _run_staggered(llm, params, prompts=PROMPTS):
    """Requests join a running batch at different times, so the batch size (and bucket) changes."""
    seqs = [llm.add_request(prompts[0], params), llm.add_request(prompts[1], params)]
    for extra in prompts[2:]:
        for _ in range(2):
            llm.step()
        seqs.append(llm.add_request(extra, params))
    while llm.scheduler.has_work():
        llm.step()
    return [s.output for s in seqs]


def test_static_decode_steps_equal_plain_engine_and_model(model):
    greedy = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    plain = _run_staggered(LLM(model, block_size=4, max_num_batched_tokens=16, max_model_len=64), greedy)
    llm = LLM(model, block_size=4, max_num_batched_tokens=16, max_model_len=64, max_num_seqs=6, cuda_graphs=True)
    assert isinstance(llm.runner.graphs, CUDAGraphDecoder) and not llm.runner.graphs.capture
    static = _run_staggered(llm, greedy)
    assert static == plain
    assert static[2] == generate(model, PROMPTS[2], 9, temperature=0)   # contiguous cache, no engine at all
    # Padding rows wrote only the scratch block, which no sequence ever owns.
    assert llm.cache.scratch_slot == llm.cache.num_blocks * llm.cache.block_size


def test_uncaptured_static_steps_read_only_the_block_columns_in_use(model):
    """A long max_model_len must not make every CPU step read max_model_len slots per row."""
    greedy = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    plain = _run_staggered(LLM(model, block_size=4, max_model_len=64), greedy)
    llm = LLM(model, block_size=4, max_model_len=2048, max_num_seqs=6, cuda_graphs=True)
    graphs = llm.runner.graphs
    widths, forward = [], graphs.steps["main"]
    graphs.steps["main"] = lambda b, tables: widths.append(tables.shape[1]) or forward(b, tables)
    assert _run_staggered(llm, greedy) == plain
    longest = max(len(p) for p in PROMPTS) + 9
    assert widths and max(widths) <= -(-longest // 4) < graphs.max_blocks == 512
    assert min(widths) >= 2


def test_static_decode_with_mtp_speculation_equals_plain_greedy(model):
    """Verification rows (last token + drafts) and MTP drafts run on the static buffers too."""
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = PROMPTS[:3]
    plain = _run_staggered(LLM(model, block_size=4, max_model_len=64), greedy, prompts)
    spec = LLM(model, block_size=4, max_model_len=64, max_num_seqs=4, speculative="mtp", num_speculative_tokens=2,
               cuda_graphs=True)
    graphs = spec.runner.graphs
    assert graphs.max_query_len == 3 and graphs.buckets[-1] == 12
    rows = {"main": [], "mtp": []}
    for kind in rows:
        step = graphs.steps[kind]
        graphs.steps[kind] = lambda b, tables, kind=kind, step=step: rows[kind].append(b) or step(b, tables)
    assert _run_staggered(spec, greedy, prompts) == plain
    assert spec.spec_stats["verify_steps"] > 0
    assert max(rows["main"]) >= 3 * 2 and rows["mtp"]        # verification of 2+ sequences; drafts


def test_buckets_and_fit():
    class _Cache:
        block_size, scratch_slot = 4, 40
        kv = torch.zeros(1, 44, 3)

    g = CUDAGraphDecoder(None, _Cache(), max_num_seqs=20, max_model_len=30, capture=False)
    assert g.max_blocks == 8
    assert [g.bucket(n) for n in (1, 2, 3, 5, 9, 17, 20)] == [1, 2, 4, 8, 16, 20, 20]
    assert g.fits([([1], 0, [0] * 8)]) and not g.fits([([1], 0, [0] * 9)])
    assert not g.fits([([1], 0, [0])] * 21)
    # Uncaptured steps read the longest table's columns (at least 2, at most max_blocks).
    assert g.table_width([([1], 0, [0]), ([1], 0, [0, 1, 2])]) == 3
    assert g.table_width([([1], 0, [0])]) == 2
    assert g.table_width([([1], 0, list(range(8)))]) == 8
    with pytest.raises(ValueError, match="CUDA"):
        CUDAGraphDecoder(None, _Cache(), 4, 30, capture=True)


def test_greedy_shortcut_equals_full_sampler():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g) * 3
    params = [SamplingParams(temperature=0)] * 5
    fast = sample(logits, params, [None] * 5)
    # Force the general pipeline: one row asks for logprobs (the shortcut needs none requested).
    full = sample(logits, params[:4] + [SamplingParams(temperature=0, logprobs=0)], [None] * 5)
    assert torch.equal(fast.token_ids, logits.argmax(-1)) and torch.equal(fast.token_ids, full.token_ids)
    torch.testing.assert_close(fast.logprobs, full.logprobs)
    torch.testing.assert_close(fast.logprobs, logits.double().log_softmax(-1).gather(1, fast.token_ids[:, None])
                               .squeeze(1).float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_equal_eager_on_gpu(model, dtype):
    import copy
    m = copy.deepcopy(model).to("cuda", dtype)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    eager = _run_staggered(LLM(m, block_size=16, max_model_len=128), greedy)
    llm = LLM(m, block_size=16, max_model_len=128, cuda_graphs=True)
    graphed = _run_staggered(llm, greedy)
    assert llm.runner.graphs is not None
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] >= 9:
        assert llm.runner.graphs.graphs, "bf16 on sm90+ (grouped-GEMM experts) must be capturable"
    same = sum(a == b for a, b in zip(eager, graphed))
    assert same == len(eager) if dtype == torch.float32 else same >= len(eager) - 1   # bf16: near-ties may flip


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_steps_are_captured_on_gpu(model, dtype):
    """compile=True on CUDA: the torch.compile'd step (gathered or grouped experts, no host sync) is
    what each bucket's CUDA graph replays, with the eager engine's tokens."""
    import copy
    m = copy.deepcopy(model).to("cuda", dtype)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    eager = _run_staggered(LLM(m, block_size=16, max_model_len=128), greedy)
    llm = LLM(m, block_size=16, max_model_len=128, max_num_seqs=6, compile=True)
    compiled = _run_staggered(llm, greedy)
    assert llm.runner.graphs.capture and llm.runner.graphs.graphs, "the compiled step must be captured"
    if dtype == torch.float32:
        assert compiled == eager
        return
    # bf16: fused kernels round differently from eager ones, so greedy tokens may part at a near-tie;
    # compare one step's hidden states instead (same inputs, same cache).
    seq = llm.add_request(PROMPTS[2], greedy)
    llm.step()                                                       # prefill (eager) + first token
    item = [(seq.tokens[-1:], len(seq.tokens) - 1, seq.block_table)]
    h_compiled = llm.runner.graphs.run(item)[0].float()
    graphs, llm.runner.graphs = llm.runner.graphs, None
    h_eager = llm.runner.forward(item)[0][0].float()
    llm.runner.graphs = graphs
    assert (h_compiled - h_eager).norm() / h_eager.norm() < 2e-2


def test_decode_step_bytes_counts_the_parameters_a_step_touches(tiny_config):
    """The roofline's bytes per step against a count over the model's actual tensors."""
    import dsv3
    from dsv3.bench.decode import decode_step_bytes

    cfg = tiny_config()
    m = dsv3.Transformer(cfg)
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    used = 0.0
    for name, p in m.named_parameters():
        if name.startswith("mtp."):
            continue
        if name == "embed_tokens.weight":
            used += cfg.hidden_size                     # one row per token
        elif ".experts." in name:
            used += p.numel() * k / E                   # k of the E stacked experts
        else:
            used += p.numel()
    got = decode_step_bytes(cfg, batch=1, mean_context=10, dtype_bytes=2)
    assert got["weights"] == pytest.approx(2 * used)
    assert got["cache"] == 2 * 10 * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    # More sequences use more distinct experts, never more than all of them.
    assert decode_step_bytes(cfg, 8, 10, 2)["experts_per_moe_layer"] <= E


def test_one_forward_serves_eager_and_compiled_steps(model):
    """No second copy of the forward: the engine never walks the model's layers itself, and the
    compiled steps wrap the very methods the eager static steps run, which call the model's own
    ``hidden_states`` / ``mtp_states``."""
    import ast
    import pathlib

    import dsv3.engine

    engine_dir = pathlib.Path(dsv3.engine.__file__).parent
    assert not (engine_dir / "compiled.py").exists()
    for path in engine_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("layers", "self_attn", "input_layernorm", "post_attention_layernorm"), \
                    f"{path.name}:{node.lineno} reaches into the model's layers ({node.attr})"
    llm = LLM(model, block_size=4, max_model_len=64, max_num_seqs=2, speculative="mtp", compile=True)
    graphs = llm.runner.graphs
    for kind, method in (("main", graphs._forward), ("mtp", graphs._forward_mtp)):
        assert graphs.compiled[kind]._torchdynamo_orig_callable == method == graphs.steps[kind]
    calls, real = [], {"hidden_states": Transformer.hidden_states, "mtp_states": Transformer.mtp_states}

    def spy(name):
        def method(self, *args, **kwargs):
            calls.append(name)
            return real[name](self, *args, **kwargs)
        return method

    graphs.compiled = None                                        # the same steps, run eagerly
    items = [([5], 3, [0, 1])]
    with mock.patch.object(Transformer, "hidden_states", spy("hidden_states")), \
         mock.patch.object(Transformer, "mtp_states", spy("mtp_states")):
        graphs.run(items)
        graphs.run_mtp(items, torch.zeros(1, model.config.hidden_size))
    assert calls == ["hidden_states", "mtp_states"]


@pytest.mark.slow
def test_compiled_decode_steps_equal_plain_engine(tiny_config, monkeypatch):
    """LLM(compile=True): torch.compile of the whole static decode step, one graph per batch bucket,
    each with its bucket's experts (gathered for one sequence, grouped GEMMs for two here)."""
    import dsv3
    import dsv3.engine.experts

    # tiny: 8 experts, top-2. Bucket 1 reads 2 experts (gathered), bucket 2 reads 4 (> 0.25 * 8: grouped).
    monkeypatch.setattr(dsv3.engine.experts, "GATHERED_MAX_READS_PER_EXPERT", 0.25)
    torch.manual_seed(1)
    model = far_from_ties_(dsv3.Transformer(tiny_config(num_nextn_predict_layers=0)).eval())   # 1 dense + 1 MoE
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [PROMPTS[2], PROMPTS[4], PROMPTS[0]]     # two together, then the third alone
    plain = _run_staggered(LLM(model, block_size=4, max_model_len=48, max_num_seqs=2), greedy, prompts)
    llm = LLM(model, block_size=4, max_model_len=48, max_num_seqs=2, compile=True)
    torch._dynamo.utils.counters.clear()
    graphs = []                                        # the ops of each graph inductor generates code for
    with mock.patch.object(torch._inductor.config, "post_grad_custom_post_pass", _RecordOps(graphs)):
        assert _run_staggered(llm, greedy, prompts) == plain
    assert llm.runner.graphs.compiled is not None and llm.runner.graphs._compiled_once == {("main", 1), ("main", 2)}
    # The block-table width grows during decoding (block_size 4) and stays symbolic: one graph per bucket.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2 and len(graphs) == 2
    grouped = ["dsv3.grouped_swiglu.default" in ops for ops in graphs]
    assert sorted(grouped) == [False, True]            # (compiled in the order the buckets came)
    for ops in graphs:
        # The cache write stays in place: writing through a per-layer view of the cache made inductor
        # scatter the whole layer back into the whole cache (a full copy every step).
        assert "aten.index_put.default" in ops
        assert not [op for op in ops if op.endswith("_scatter.default")]
    # The model handed in keeps its own experts outside the compiled steps.
    assert all(type(m.experts).__name__ == "RoutedExperts" for m in model.moe_layers())


@pytest.mark.slow
def test_compiled_bf16_decoding_equals_eager_on_a_model_far_from_ties(tiny_config):
    """bf16: the compiled step (gathered experts, fused kernels) and the eager engine (grouped GEMMs)
    round differently; away from near-tied logits that never changes a greedy token."""
    import dsv3

    torch.manual_seed(4)
    model = far_from_ties_(dsv3.Transformer(tiny_config(num_nextn_predict_layers=0))).to(torch.bfloat16).eval()
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = PROMPTS[:2]
    eager = [o.token_ids for o in LLM(model, block_size=4, max_model_len=48, max_num_seqs=1).generate(prompts, greedy)]
    # Precondition, so the comparison means something: along the eager sequences, the fp32 model
    # (same bf16-valued weights) keeps its top two logits >= 2% of the largest apart, far above
    # bf16's rounding (which, at a real near-tie, may pick either token).
    exact = dsv3.Transformer(model.config).eval()
    exact.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        for prompt, out in zip(prompts, eager):
            logits = exact(torch.tensor([prompt + out[:-1]]))[0, len(prompt) - 1:].double()   # [8, V]
            top = logits.topk(2, dim=-1).values
            assert ((top[:, 0] - top[:, 1]) / logits.abs().amax(-1)).min() > 0.02
            assert logits.argmax(-1).tolist() == out
    compiled = LLM(model, block_size=4, max_model_len=48, max_num_seqs=1, compile=True).generate(prompts, greedy)
    assert [o.token_ids for o in compiled] == eager


@pytest.mark.slow
def test_mtp_speculation_under_compile_equals_plain_greedy(model):
    """speculative='mtp' with compile=True: verification rows and drafts run in compiled steps."""
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    plain = LLM(model, block_size=4, max_model_len=64).generate([PROMPTS[2]], greedy)
    spec = LLM(model, block_size=4, max_model_len=64, max_num_seqs=1, speculative="mtp", num_speculative_tokens=1,
               compile=True)
    assert spec.generate([PROMPTS[2]], greedy)[0].token_ids == plain[0].token_ids
    compiled = spec.runner.graphs._compiled_once
    assert ("main", 2) in compiled and any(kind == "mtp" for kind, _ in compiled)   # verify (1 + 1 rows), drafts
    assert spec.spec_stats["verify_steps"] > 0


class _RecordOps:
    """An inductor post-grad pass that only records each graph's ops (no uuid: the FX cache is bypassed)."""

    def __init__(self, graphs: list):
        self.graphs = graphs

    def __call__(self, graph) -> None:
        self.graphs.append([str(n.target) for n in graph.nodes if n.op == "call_function"])

    def uuid(self):
        return None


def test_bench_decode_random_preset_cli(tmp_path):
    """``dsv3 bench decode --random-preset``: no checkpoint, roofline fields in the JSON."""
    import json

    from dsv3.cli import main

    out = tmp_path / "roofline.json"
    rc = main(["bench", "decode", "--random-preset", "tiny", "--dtype", "float32", "--prompt-len", "8",
               "--gen-len", "3", "--repeats", "1", "--device", "cpu", "--json", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0 and r["random_weights"] and r["preset"] == "tiny" and r["dtype"] == "float32"
    eager = r["results"][0]
    assert eager["name"] == "eager" and eager["step_ms_median"] > 0
    assert eager["fraction_of_measured_bandwidth"] == pytest.approx(
        r["bytes_per_step"]["total"] / (eager["step_ms_median"] / 1000) / r["measured_bandwidth_bytes_per_s"])
    with pytest.raises(SystemExit):
        main(["bench", "decode", "--random-preset", "tiny", "--dtype", "int8"])


def test_engine_stores_its_own_linear_weights_column_major(tmp_path):
    """LLM(path) on a CPU re-stores Linear weights column-major (same values), never a model handed to it."""
    import dsv3
    from dsv3.engine.weight_layout import column_major_linears

    path = random_checkpoint(tmp_path, mtp_layers=1, seed=5)
    row_major = dsv3.load_pretrained(path)
    llm = LLM(path, block_size=4, max_model_len=64)
    linears = {n: m.weight for n, m in llm.model.named_modules()
               if type(m) is torch.nn.Linear and not n.endswith("kv_b_proj")}
    assert linears and all(w.stride() == (1, w.shape[0]) for w in linears.values())
    # MLA's kv_b_proj stays row-major: the absorbed decode reads it through per-head views whose
    # compiled single-row products vectorize along its contiguous latent dimension.
    kv_b = [m.weight for n, m in llm.model.named_modules() if n.endswith("kv_b_proj")]
    assert kv_b and all(w.is_contiguous() for w in kv_b)
    for name, w in row_major.state_dict().items():
        torch.testing.assert_close(llm.model.state_dict()[name], w, rtol=0, atol=0)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    given = LLM(row_major, block_size=4, max_model_len=64)
    assert all(p.is_contiguous() for p in row_major.parameters())
    assert [o.token_ids for o in llm.generate(PROMPTS, greedy)] == [o.token_ids for o in given.generate(PROMPTS, greedy)]
    # A head tied to the embedding keeps the embedding's row-major layout.
    tied = dsv3.Transformer(row_major.config.replace(tie_word_embeddings=True, num_nextn_predict_layers=0))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    column_major_linears(tied)
    assert tied.lm_head.weight.is_contiguous()
    # bf16 stays row-major (column-major bf16 GEMMs are ~10x slower on a CPU without bf16 units).
    half = dsv3.load_pretrained(path, dtype=torch.bfloat16)
    assert column_major_linears(half) == 0 and all(p.is_contiguous() for p in half.parameters())
    assert column_major_linears(dsv3.load_pretrained(path)) == len(linears)


class _HostCountExperts(torch.nn.Module):
    """An experts implementation that reads its token counts on the host (as the reference loop
    and the weight-only quantized experts do): it cannot be part of one compiled graph."""

    def __init__(self, experts):
        super().__init__()
        self.inner = experts

    def forward(self, x, weights, topk):
        from dsv3.model.moe import dispatch_experts, swiglu_expert
        e = self.inner
        return dispatch_experts(x, weights, topk, list(zip(e.gate_proj, e.up_proj, e.down_proj)), swiglu_expert)


def test_compiled_steps_fall_back_to_eager_static_steps_when_the_experts_do_not_compile(model):
    import copy

    from dsv3.engine.experts import use_experts

    m = copy.deepcopy(model)
    use_experts(m, _HostCountExperts)                  # not a RoutedExperts: the engine keeps it
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    plain = LLM(m, block_size=4, max_model_len=64).generate(PROMPTS[:2], greedy)
    llm = LLM(m, block_size=4, max_model_len=64, max_num_seqs=2, compile=True)
    with pytest.warns(RuntimeWarning, match="cannot take the main decode step whole"):
        out = llm.generate(PROMPTS[:2], greedy)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    assert llm.runner.graphs.compiled is None
