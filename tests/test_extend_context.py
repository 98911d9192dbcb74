"""Context-extension stages (dsv3 train --resume RUN --extend-context L): the plan scaled from the run
(YaRN config, batch, constant final LR, steps), a stage run into a new directory that leaves the source
untouched, its exported config read by transformers with logits equal to ours past the original length,
stage 2 keeping the original length, resuming a stage, and the errors."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TRAIN_MODEL, source_corpus

import dsv3
from dsv3.train.context import EXTEND_STEPS_FRACTION, V3_YARN_PARAMS, plan_stage
from dsv3.train.state import read_trainer_state
from dsv3.train.trainer import TrainConfig, TrainError, train

SMALL_MODEL = dict(TRAIN_MODEL, rope_theta=100.0)
QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, one_thread) -> Path:
    """A finished run at 32 tokens (20 steps, LR 1e-2 decaying to 1e-3)."""
    corpus = source_corpus(tmp_path_factory.mktemp("corpus"),
                           ("argparse", "collections", "json", "textwrap", "inspect"))
    out = tmp_path_factory.mktemp("runs") / "base"
    train(TrainConfig(data=[str(corpus)], out=str(out), max_steps=20, batch_size=8, seq_len=32, lr=1e-2,
                      min_lr_ratio=0.1, warmup_steps=2, save_every=0, eval_every=0, eval_batches=1, vocab_size=400,
                      tokenizer_train_mb=0.2, val_fraction=0.1, progress=False, sample_tokens=0,
                      model_overrides=dict(SMALL_MODEL), device="cpu"), **QUIET)
    return out


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


@pytest.fixture(scope="module")
def stage1(pretrained) -> tuple[Path, dict]:
    before = snapshot(pretrained)
    summary = train(TrainConfig(extend_context=128, progress=False, device="cpu"), max_steps=3,
                    extend_from=pretrained, **QUIET)
    assert snapshot(pretrained) == before, "the extended run must not be written"
    return Path(summary["out"]), summary


def test_plan_scales_the_run(pretrained):
    s = plan_stage(pretrained, 128)
    assert s.source == pretrained / "final"
    rs = s.config["model_overrides"]["rope_scaling"]
    assert rs["type"] == "yarn" and rs["factor"] == 4.0 and rs["original_max_position_embeddings"] == 32
    assert {k: rs[k] for k in V3_YARN_PARAMS} == {"beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert s.config["model_overrides"]["max_position_embeddings"] == 128
    assert s.config["seq_len"] == 128 and s.config["batch_size"] == 2       # 8 x 32 tokens = 2 x 128
    assert s.config["lr"] == pytest.approx(1e-3)                              # the run's final LR ...
    assert s.config["min_lr_ratio"] == 1.0 and s.config["warmup_steps"] == 0  # ... constant
    assert s.config["max_steps"] == max(1, round(EXTEND_STEPS_FRACTION * 20))
    assert s.config["out"] == f"{pretrained}-ctx128"
    assert s.config["cache_dir"] == str(pretrained)  # the run's tokenized data, not tokenized again
    assert plan_stage(pretrained, 256, steps=7, granule=2).config["batch_size"] == 2  # 8 x 32 / 256 = 1 -> 2 ranks
    assert plan_stage(pretrained, 1024).config["batch_size"] == 1                    # never below one sequence


def test_stage_trains_at_the_long_length(stage1, pretrained):
    out, summary = stage1
    assert out == Path(f"{pretrained}-ctx128")
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 128
    rs = cfg["rope_scaling"]
    assert rs["factor"] == 4.0 and rs["original_max_position_embeddings"] == 32 and rs["beta_fast"] == 32
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "kind" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["lr"] == pytest.approx(1e-3) for r in steps)  # constant final LR
    evals = [r for r in recs if r.get("kind") == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 3    # the long-length loss before and after
    state = read_trainer_state(out / "final")
    assert state["train_config"]["seq_len"] == 128 and state["train_config"]["batch_size"] == 2
    assert state["train_config"]["extend_context"] is None
    assert state["data"]["seq_len"] == 128
    ext = state["context_extension"]
    assert ext["stage"] == 1 and ext["source"] == str(pretrained / "final") and ext["source_step"] == 20
    assert summary["context_extension"]["val_loss_at_start"] == evals[0]["val_loss"]
    # the stage continued the trained weights: its first loss is far below a fresh model's ln(V)
    assert steps[0]["lm_loss"] < 0.9 * torch.log(torch.tensor(400.0)).item()


def test_extended_checkpoint_matches_transformers_past_the_original_length(stage1):
    transformers = pytest.importorskip("transformers")
    out, _ = stage1
    ours = dsv3.load_pretrained(out / "final")
    assert ours.config.yarn["factor"] == 4.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    ids = torch.randint(0, 400, (1, 120), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert (ref[:, 32:] - got[:, 32:]).abs().max() < 1e-4     # positions beyond the trained 32
    assert (ref - got).abs().max() < 1e-4
    # and YaRN matters there: the same weights without rope scaling give other logits
    plain = dsv3.Transformer(ours.config.replace(rope_scaling=None))
    plain.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (plain(ids)[:, 32:] - got[:, 32:]).abs().max() > 1e-3


def test_engine_reads_the_extended_config(stage1):
    """dsv3.LLM decodes the extended checkpoint as the reference sampler does, past the original length."""
    from dsv3.engine.llm import LLM
    from dsv3.engine.sampling import SamplingParams
    from dsv3.sample import generate
    out, _ = stage1
    llm = LLM(out / "final")
    assert llm.model.config.yarn["factor"] == 4.0 and llm.model.config.max_position_embeddings == 128
    prompt = torch.randint(0, 400, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    got = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].token_ids
    assert got == generate(dsv3.load_pretrained(out / "final"), prompt, 12, temperature=0.0)


def test_stage2_keeps_the_original_length(stage1, pretrained):
    out, _ = stage1
    s = plan_stage(out, 512)
    rs = s.config["model_overrides"]["rope_scaling"]
    assert rs["original_max_position_embeddings"] == 32 and rs["factor"] == 16.0
    assert s.config["batch_size"] == 1                       # 2 x 128 / 512 -> at least one sequence
    assert s.config["lr"] == pytest.approx(1e-3)            # stage 1's constant LR is its final LR
    assert s.config["max_steps"] == max(1, round(EXTEND_STEPS_FRACTION * 20))  # of the pre-training steps
    assert s.record["stage"] == 2 and s.config["cache_dir"] == str(pretrained)
    with pytest.raises(ValueError, match="not longer"):
        plan_stage(out, 128)


def test_a_larger_factor_of_the_run_is_kept(stage1, tmp_path):
    """A run whose config already has a YaRN factor above L / original (as the v3 preset's 40) keeps it."""
    import shutil
    out, _ = stage1
    copy = tmp_path / "big"
    shutil.copytree(out, copy)
    cfg = json.loads((copy / "final" / "config.json").read_text())
    cfg["rope_scaling"]["factor"] = 40.0
    (copy / "final" / "config.json").write_text(json.dumps(cfg))
    rs = plan_stage(copy, 256).config["model_overrides"]["rope_scaling"]
    assert rs["factor"] == 40.0 and rs["original_max_position_embeddings"] == 32


def test_resuming_a_stage_continues_it(stage1, tmp_path):
    import shutil
    out, _ = stage1
    copy = tmp_path / "stage"
    shutil.copytree(out, copy)
    train(TrainConfig(out=str(copy), progress=False), resume=True, max_steps=4, **QUIET)
    state = read_trainer_state(copy / "final")
    assert state["step"] == 4 and state["train_config"]["seq_len"] == 128
    assert state["context_extension"]["stage"] == 1
    assert json.loads((copy / "final" / "config.json").read_text())["rope_scaling"]["factor"] == 4.0


def test_explicit_flags_override_the_scaled_values(pretrained):
    from dsv3.train.trainer import extension_stage
    cfg, stage = extension_stage(TrainConfig(extend_context=128, batch_size=3, eval_every=1, seq_len=999),
                                 pretrained, resume=False, steps=5)
    assert cfg.batch_size == 3 and cfg.eval_every == 1 and stage.record["batch_size"] == 3
    assert cfg.seq_len == 128 and cfg.max_steps == 5 and cfg.lr == pytest.approx(1e-3)  # the plan's, not the flag
    assert cfg.vocab_size == 400 and cfg.model_overrides["hidden_size"] == 32            # the run's own settings


def test_errors(pretrained, tmp_path):
    with pytest.raises(ValueError, match="not longer than the run's sequence length 32"):
        plan_stage(pretrained, 32)
    with pytest.raises(ValueError, match="not a whole multiple"):
        plan_stage(pretrained, 100)
    with pytest.raises(ValueError, match="no run directory"):
        plan_stage(tmp_path / "missing", 128)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        plan_stage(tmp_path / "empty", 128)
    with pytest.raises(ValueError, match="new run directory"):
        plan_stage(pretrained, 128, out=str(pretrained))
    with pytest.raises(TrainError, match="needs --resume RUN"):
        train(TrainConfig(extend_context=128, out=str(tmp_path / "x"), progress=False), **QUIET)
    with pytest.raises(TrainError, match="starts a new run"):
        train(TrainConfig(extend_context=128, progress=False), resume=True, extend_from=pretrained, **QUIET)


def test_cli_needs_resume(capsys):
    from dsv3.cli import main
    with pytest.raises(SystemExit):
        main(["train", "--extend-context", "128"])
    assert "--extend-context L needs --resume RUN" in capsys.readouterr().err
