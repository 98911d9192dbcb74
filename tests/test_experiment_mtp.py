"""`dsv3 experiment mtp`: the deep-narrow preset's accounting, and the experiment's structure on a smoke run."""

from __future__ import annotations

import json

import pytest
import torch

import dsv3
from dsv3.config import preset
from dsv3.train.experiment_mtp import draft_share, speedup_bound


def _tensor_bytes(model, keep, batch_experts: float) -> float:
    """Bytes of the state_dict tensors whose name passes ``keep``, routed experts scaled by the used fraction."""
    E = model.config.n_routed_experts
    total = 0.0
    for name, t in model.state_dict().items():
        if not keep(name) or name.endswith("e_score_correction_bias"):   # a buffer; not in param_counts
            continue
        n = t.numel() * t.element_size()
        total += n * batch_experts / E if ".experts." in name else n
    return total


def test_tiny_deep_is_deep_narrow_and_servable():
    c = preset("tiny-deep")
    assert c.num_hidden_layers >= 16 and c.num_nextn_predict_layers == 1
    assert (c.kv_lora_rank, c.qk_rope_head_dim) == (512, 64) and c.servable_latent
    assert c.hidden_size <= 256


def test_draft_share_matches_the_real_model_tensors():
    # Independent count: the draft's bytes from the built model's own tensors (the mtp.* weights with
    # num_experts_per_tok of the stacked experts, the output head, one embedding row) against the
    # main step counted by bench.roofline.model_step_bytes from the same tensors.
    from dsv3.bench.roofline import model_step_bytes
    c = preset("tiny-deep")
    torch.manual_seed(0)
    model = dsv3.Transformer(c)
    ctx = 48.0
    a = draft_share(c, mean_context=ctx)
    k = c.num_experts_per_tok
    draft = (_tensor_bytes(model, lambda n: n.startswith("mtp."), k)
             + model.lm_head.weight.numel() * 4 + c.hidden_size * 4 + ctx * c.latent_dim * 4)
    assert a["draft_bytes"] == pytest.approx(draft, rel=1e-9)
    main = model_step_bytes(model, 1, ctx, 4)
    # model_step_bytes also reads the router bias buffers (E fp32 values per MoE layer): ~1e-4 of a step
    assert a["main_step_bytes"] == pytest.approx(main["total"], rel=1e-3)
    assert a["bound_k1"] == pytest.approx(speedup_bound(1, a["share"]))


def test_deep_narrow_makes_the_draft_a_small_share_of_a_step():
    deep, shallow = draft_share(preset("tiny-deep")), draft_share(preset("tiny"))
    # the MTP block plus the head re-read: under 1/6 of a 16-layer step, vs ~half of the 4-layer demo's
    assert deep["share"] < 1 / 6 < 0.4 < shallow["share"]
    assert deep["bound_k1"] > 1.7 and deep["bound_k2"] > 2.2
    assert speedup_bound(2, 0.0) == 3.0 and speedup_bound(1, 1.0) == 1.0


def test_draft_share_needs_an_mtp_module():
    with pytest.raises(ValueError, match="no MTP module"):
        draft_share(preset("tiny").replace(num_nextn_predict_layers=0))


def test_cli_flags_and_defaults():
    from dsv3.cli import build_parser
    from dsv3.cli.fields import from_args
    from dsv3.train.experiment_mtp import MTPExperimentConfig
    args = build_parser().parse_args(["experiment", "mtp", "--ks", "1,3", "--rounds", "2", "--eager"])
    assert args.preset == "tiny-deep" and args.func.__name__ == "cmd_experiment_mtp"
    exp = from_args(MTPExperimentConfig, args)
    assert exp.ks == (1, 3) and exp.rounds == 2 and exp.eager
    with pytest.raises(SystemExit):
        build_parser().parse_args(["experiment", "mtp", "--ks", "0"])


def test_smoke_run_writes_summary_and_table(tmp_path, capsys):
    # Two training steps of a 2-layer variant, then one eager round: the structure, not the numbers.
    from dsv3.cli import main
    out = tmp_path / "exp"
    rc = main(["experiment", "mtp", "--out", str(out), "--no-progress", "--max-steps", "2", "--batch-size", "2",
               "--seq-len", "32", "--eval-batches", "1", "--tokenizer-train-mb", "0.3", "--vocab-size", "384",
               "--model-set", "num_hidden_layers=2", "--prompts", "1", "--prompt-len", "8", "--gen-len", "6",
               "--rounds", "1", "--warmup", "1", "--eager"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["num_hidden_layers"] == 2 and s["train"]["steps"] == 2 and s["batch"] == 1
    assert set(s["speculative"]) == {"1", "2"}
    for k, r in s["speculative"].items():
        cnt = r["counts"]
        assert cnt["drafted"] >= int(k) and 0 <= cnt["accepted"] <= cnt["drafted"]
        assert r["acceptance_rate"] == cnt["accepted"] / cnt["drafted"]
        assert r["speedup"] == pytest.approx(s["plain"]["time_s_median"] / r["time_s_median"])
        # greedy speculation emits exactly plain decoding's tokens
        assert r["greedy_equal_plain_fraction"] == 1.0
    assert s["first_draft_acceptance"] == s["speculative"]["1"]["acceptance_rate"]
    assert 0 < s["accounting"]["share"] < 1 and isinstance(s["goal_met"], bool)
    table = (out / "mtp_results.md").read_text()
    assert "MTP k=1" in table and "MTP k=2" in table and "bound" in table
    assert "MTP k=2" in capsys.readouterr().out
