"""The inductor options of the compiled decode step (engine/compile_options.py): which are chosen per
device, that the decoder passes them, and that a weight changed in place after compiling is used
(the contract inductor's freezing, which may fold parameters into the graph, does not promise)."""

from __future__ import annotations

import pytest
import torch

from dsv3.engine import compile_options
from dsv3.engine.compile_options import decode_compile_options, options_for, skip_guard_eval
from dsv3.engine.cuda_graph import CUDAGraphDecoder
from dsv3.engine.llm import LLM
from dsv3.engine.sampling import SamplingParams
from conftest import far_from_ties_
from test_engine import PROMPTS


def test_cpu_steps_use_the_cpp_wrapper_and_keep_precision_casts():
    opts = decode_compile_options("cpu")
    assert opts["cpp_wrapper"] is True                      # the measured win on a CPU (RESULTS.md)
    assert opts["emulate_precision_casts"] is True          # compiled bf16 rounds where eager does
    assert not opts.get("freezing")                         # see test_weights_changed_after_compiling_are_used
    assert not skip_guard_eval("cpu")


def test_cuda_steps_keep_the_options_their_graph_capture_was_verified_with():
    assert decode_compile_options("cuda") == compile_options.BASE_OPTIONS
    assert decode_compile_options("cuda:0") == compile_options.BASE_OPTIONS


def test_unknown_switches_are_refused_by_name():
    with pytest.raises(ValueError, match="frezing"):
        options_for(["frezing"])
    assert options_for(["freezing", "cpp_wrapper"]) == {**compile_options.BASE_OPTIONS, "freezing": True,
                                                       "cpp_wrapper": True}


def test_the_decoder_compiles_with_the_device_options(tiny_config):
    import dsv3
    model = dsv3.Transformer(tiny_config(num_nextn_predict_layers=0)).eval()
    llm = LLM(model, block_size=4, max_model_len=32, max_num_seqs=1, compile=True)
    graphs = llm.runner.graphs
    assert isinstance(graphs, CUDAGraphDecoder)
    assert graphs.compile_options == decode_compile_options("cpu") and not graphs.skip_guard_eval
    assert LLM(model, block_size=4, max_model_len=32, max_num_seqs=1).runner.graphs is None


@pytest.mark.slow
def test_weights_changed_after_compiling_are_used(tiny_config):
    """A model object handed to LLM(compile=True) and changed in place afterwards (training on, a
    load_state_dict) decodes with its new weights, exactly as the eager engine does."""
    import dsv3
    torch.manual_seed(4)
    model = far_from_ties_(dsv3.Transformer(tiny_config(num_nextn_predict_layers=0)).eval())
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    llm = LLM(model, block_size=4, max_model_len=48, max_num_seqs=1, compile=True)
    before = [o.token_ids for o in llm.generate([PROMPTS[2]], greedy)]
    assert ("main", 1) in llm.runner.graphs._compiled_once
    with torch.no_grad():                                    # new head rows: other greedy tokens
        model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight) * 0.3)
    eager = [o.token_ids for o in LLM(model, block_size=4, max_model_len=48, max_num_seqs=1).generate([PROMPTS[2]], greedy)]
    assert eager != before, "the test needs a weight change that changes the greedy tokens"
    assert [o.token_ids for o in llm.generate([PROMPTS[2]], greedy)] == eager
