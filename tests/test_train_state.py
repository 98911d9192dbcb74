"""Run directories: deployable model directories, training state beside them, atomic saves.

Every crash window of a save is simulated by making the N-th ``os.rename`` (or a later ``rmtree``)
raise, as a kill at that instant would leave things; ``clean_stale_temps`` (run at the next start)
must then leave a complete checkpoint -- the previous one or the new one -- and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from dsv3 import Transformer, load_pretrained
from dsv3.checkpoint import GENERATION_CONFIG_FILE, save_pretrained, weights_metadata
from dsv3.config import DeploymentWarning
from dsv3.tokenizer import train_tokenizer
from dsv3.train import state as S


class Killed(RuntimeError):
    """Stands for the process dying at this point."""


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["def f(x):\n    return x + 1\n" * 40, "the cache holds the latent"] * 5, vocab_size=300)


def _trained(seed: int):
    """A tiny model and an AdamW that has taken one step (so it has moments to save)."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config(vocab_size=300))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 300, (1, 8))).float().mean().backward()
    opt.step()
    return model, opt


def _save(out, name, step, seed, tokenizer):
    model, opt = _trained(seed)
    S.save_training_checkpoint(out, name, model, tokenizer, opt, {"step": step})
    return model


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_pretrained(path).state_dict()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _layout(out: Path) -> list[str]:
    """Every path under ``out``, relative, directories marked with a slash."""
    return sorted(str(p.relative_to(out)) + ("/" if p.is_dir() else "") for p in out.rglob("*"))


MODEL_FILES = {"config.json", GENERATION_CONFIG_FILE, "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json"}


# ----------------------------------------------------------------------------- layout
def test_model_directory_holds_only_what_an_engine_loads(tmp_path, tokenizer):
    model = _save(tmp_path, "final", 7, 0, tokenizer)
    final = tmp_path / "final"
    assert {p.name for p in final.iterdir()} == MODEL_FILES
    sd = S.state_dir(final)
    assert sd is not None and sd.parent == tmp_path / S.STATE_DIR and sd.name.startswith("final.")
    assert {p.name for p in sd.iterdir()} == {S.OPTIMIZER_FILE, S.TRAINER_STATE}
    # the two halves carry the same id and step
    meta = weights_metadata(final)
    state = S.read_trainer_state(final)
    assert meta[S.SAVE_ID_KEY] == state["save_id"] == sd.name.split(".", 1)[1]
    assert meta[S.STEP_KEY] == "7" and state["step"] == 7
    assert _same(_weights(final), model.state_dict())
    # vLLM loads every *.safetensors it finds: the only one is the model's, with model tensors only
    assert [p.name for p in final.glob("*.safetensors")] == ["model.safetensors"]
    assert all(k.startswith(("model.", "lm_head.")) for k in load_file(str(final / "model.safetensors")))


def test_generation_config_is_what_transformers_reads(tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    _save(tmp_path, "final", 1, 0, tokenizer)
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "final")
    assert (gen.bos_token_id, gen.eos_token_id) == (0, 1) == (tokenizer.bos_id, tokenizer.eos_id)
    # the same ids transformers derives from config.json when a directory has no generation config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = transformers.AutoConfig.from_pretrained(tmp_path / "final")
    derived = transformers.GenerationConfig.from_model_config(hf_config)
    assert (derived.bos_token_id, derived.eos_token_id) == (gen.bos_token_id, gen.eos_token_id)


def test_generation_config_keeps_sampling_settings_already_there(tmp_path):
    model = Transformer(tiny_config(bos_token_id=5, eos_token_id=6))
    (tmp_path / GENERATION_CONFIG_FILE).write_text(json.dumps({"temperature": 0.6, "eos_token_id": 99}))
    save_pretrained(model, tmp_path)
    gen = json.loads((tmp_path / GENERATION_CONFIG_FILE).read_text())
    assert gen == {"temperature": 0.6, "bos_token_id": 5, "eos_token_id": 6}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_get_the_umask_mode(tmp_path, tokenizer, umask):
    old = os.umask(umask)
    try:
        _save(tmp_path, "checkpoint-1", 1, 0, tokenizer)
        save_pretrained(Transformer(tiny_config()), tmp_path / "plain", max_shard_size="20KB")
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == S.OPTIMIZER_FILE for p in files) and any(p.name.startswith("model-000") for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p


# ----------------------------------------------------------------------------- deployment warning
def test_save_warns_once_for_an_unservable_latent(tmp_path):
    model = Transformer(tiny_config(kv_lora_rank=16, qk_rope_head_dim=8))
    with pytest.warns(DeploymentWarning) as record:
        save_pretrained(model, tmp_path / "a", max_shard_size="20KB")   # several shards, one warning
    assert len(record) == 1
    message = str(record[0].message)
    for needle in ("vLLM", "SGLang", "FlashMLA", "CPU_MLA", "kv_lora_rank=512", "qk_rope_head_dim=64", "576",
                   "kv_lora_rank=16", "qk_rope_head_dim=8"):
        assert needle in message, needle


def test_save_of_a_servable_shape_does_not_warn(tmp_path):
    model = Transformer(tiny_config(kv_lora_rank=512, qk_rope_head_dim=64))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeploymentWarning)
        save_pretrained(model, tmp_path)


# ----------------------------------------------------------------------------- crash windows
def _kill_at_rename(monkeypatch, n: int):
    """Make the n-th os.rename from now on raise (the process 'dies' right before it)."""
    real = os.rename
    calls = {"n": 0}

    def rename(src, dst):
        calls["n"] += 1
        if calls["n"] == n:
            raise Killed(f"killed before rename #{n}: {src} -> {dst}")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    return calls


def _count_renames(monkeypatch, fn) -> int:
    calls = _kill_at_rename(monkeypatch, 0)
    fn()
    monkeypatch.undo()
    return calls["n"]


def _only_the_pair(out: Path, name: str) -> None:
    """``out`` holds checkpoint ``name`` as one complete pair and no leftovers."""
    sd = S.state_dir(out / name)
    assert sd is not None
    assert _layout(out) == sorted([f"{name}/", *(f"{name}/{f}" for f in MODEL_FILES), f"{S.STATE_DIR}/",
                                   f"{S.STATE_DIR}/{sd.name}/", f"{S.STATE_DIR}/{sd.name}/{S.OPTIMIZER_FILE}",
                                   f"{S.STATE_DIR}/{sd.name}/{S.TRAINER_STATE}"])


@pytest.mark.parametrize("name", ["final", "checkpoint-3"])
def test_a_kill_during_a_resave_keeps_the_old_or_the_new_pair(tmp_path, tokenizer, monkeypatch, name):
    # `final` saved again after a resumed run was extended: the old pair must survive every kill
    # before the commit, the new one every kill after it.
    old_model = _save(tmp_path / "probe", name, 10, 1, tokenizer)
    n_renames = _count_renames(monkeypatch, lambda: _save(tmp_path / "probe", name, 20, 2, tokenizer))
    assert n_renames == 3  # state into place, old model aside, new model into place
    new_weights = _trained(2)[0].state_dict()
    for n in range(1, n_renames + 1):
        out = tmp_path / f"kill{n}"
        _save(out, name, 10, 1, tokenizer)
        _kill_at_rename(monkeypatch, n)
        with pytest.raises(Killed):
            _save(out, name, 20, 2, tokenizer)
        monkeypatch.undo()
        S.clean_stale_temps(out)
        _only_the_pair(out, name)
        step = S.read_trainer_state(out / name)["step"]
        assert step == 10, n  # every rename before the last one is before the commit
        assert _same(_weights(out / name), old_model.state_dict())
    # no kill: the new pair, and the old one is gone
    out = tmp_path / "kill_none"
    _save(out, name, 10, 1, tokenizer)
    _save(out, name, 20, 2, tokenizer)
    _only_the_pair(out, name)
    assert S.read_trainer_state(out / name)["step"] == 20 and _same(_weights(out / name), new_weights)


def test_a_kill_after_the_commit_keeps_the_new_pair(tmp_path, tokenizer, monkeypatch):
    # Killed while deleting the old pair (the new model directory is already in place).
    new_weights = _trained(2)[0].state_dict()
    for n_rmtree in (1, 2):
        out = tmp_path / f"rm{n_rmtree}"
        _save(out, "final", 10, 1, tokenizer)
        real, calls = shutil.rmtree, {"n": 0}

        def rmtree(path, *a, **k):
            if Path(path).parent.name == S.STATE_DIR or Path(path).name.startswith(".final.old-"):
                calls["n"] += 1
                if calls["n"] == n_rmtree:
                    raise Killed(str(path))
            return real(path, *a, **k)

        monkeypatch.setattr(shutil, "rmtree", rmtree)
        with pytest.raises(Killed):
            _save(out, "final", 20, 2, tokenizer)
        monkeypatch.undo()
        assert S.read_trainer_state(out / "final")["step"] == 20  # complete even before the clean-up
        S.clean_stale_temps(out)
        _only_the_pair(out, "final")
        assert _same(_weights(out / "final"), new_weights)


def test_a_kill_during_a_first_save_leaves_no_checkpoint(tmp_path, tokenizer, monkeypatch):
    n_renames = _count_renames(monkeypatch, lambda: _save(tmp_path / "probe", "checkpoint-5", 5, 0, tokenizer))
    assert n_renames == 2
    for n in range(1, n_renames + 1):
        out = tmp_path / f"kill{n}"
        _save(out, "checkpoint-2", 2, 1, tokenizer)       # an earlier, complete checkpoint
        _kill_at_rename(monkeypatch, n)
        with pytest.raises(Killed):
            _save(out, "checkpoint-5", 5, 0, tokenizer)
        monkeypatch.undo()
        assert [s for s, _ in S.list_checkpoints(out)] == [2]   # the half-saved one never counts
        S.clean_stale_temps(out)
        _only_the_pair(out, "checkpoint-2")
        assert S.latest_checkpoint(out) == out / "checkpoint-2"


def test_a_kill_while_removing_a_checkpoint_leaves_no_partial_one(tmp_path, tokenizer, monkeypatch):
    for where in ("rename", "rmtree"):
        out = tmp_path / where
        _save(out, "checkpoint-1", 1, 0, tokenizer)
        _save(out, "checkpoint-2", 2, 1, tokenizer)
        if where == "rename":
            _kill_at_rename(monkeypatch, 1)
        else:
            real = shutil.rmtree
            monkeypatch.setattr(shutil, "rmtree", lambda p, *a, **k: (_ for _ in ()).throw(Killed(str(p)))
                                if ".del-" in str(p) else real(p, *a, **k))
        with pytest.raises(Killed):
            S.remove_checkpoint(out / "checkpoint-1")
        monkeypatch.undo()
        S.clean_stale_temps(out)
        if where == "rename":   # killed before anything moved: still whole
            assert [s for s, _ in S.list_checkpoints(out)] == [1, 2]
            S.remove_checkpoint(out / "checkpoint-1")
        _only_the_pair(out, "checkpoint-2")


def test_remove_checkpoint_removes_both_halves(tmp_path, tokenizer):
    _save(tmp_path, "checkpoint-1", 1, 0, tokenizer)
    _save(tmp_path, "final", 2, 1, tokenizer)
    S.remove_checkpoint(tmp_path / "checkpoint-1")
    _only_the_pair(tmp_path, "final")


def test_stale_state_without_its_model_is_removed(tmp_path, tokenizer):
    # e.g. a user deleted OUT/final by hand (the tests of the trainers do, to fake an interruption)
    _save(tmp_path, "checkpoint-1", 1, 0, tokenizer)
    _save(tmp_path, "final", 2, 1, tokenizer)
    shutil.rmtree(tmp_path / "final")
    assert S.resume_point(tmp_path) == tmp_path / "checkpoint-1"
    S.clean_stale_temps(tmp_path)
    _only_the_pair(tmp_path, "checkpoint-1")


def test_a_mismatched_pair_is_not_a_checkpoint(tmp_path, tokenizer):
    # A model directory whose weights carry another save's id (copied over by hand) has no state.
    _save(tmp_path / "a", "checkpoint-1", 1, 0, tokenizer)
    _save(tmp_path / "b", "checkpoint-1", 1, 1, tokenizer)
    shutil.rmtree(tmp_path / "a" / "checkpoint-1")
    shutil.copytree(tmp_path / "b" / "checkpoint-1", tmp_path / "a" / "checkpoint-1")
    assert S.state_dir(tmp_path / "a" / "checkpoint-1") is None and S.list_checkpoints(tmp_path / "a") == []
    with pytest.raises(Exception, match="not a complete training checkpoint"):
        S.read_trainer_state(tmp_path / "a" / "checkpoint-1")


def test_a_checkpoint_with_state_inside_still_resumes(tmp_path, tokenizer):
    # The layout before the training state moved out: optimizer and trainer state in the model dir.
    model, opt = _trained(0)
    ckpt = tmp_path / "checkpoint-4"
    save_pretrained(model, ckpt)
    tokenizer.save(ckpt)
    shutil.copytree(_state_of(tmp_path / "src", tokenizer), ckpt, dirs_exist_ok=True)
    assert S.state_dir(ckpt) == ckpt and S.list_checkpoints(tmp_path) == [(4, ckpt)]
    S.clean_stale_temps(tmp_path)
    fresh = torch.optim.AdamW(Transformer(tiny_config(vocab_size=300)).parameters(), lr=1e-3)
    assert S.load_training_state(ckpt, fresh)["step"] == 4
    assert fresh.state_dict()["state"]


def _state_of(out: Path, tokenizer) -> Path:
    _save(out, "checkpoint-4", 4, 0, tokenizer)
    return S.state_dir(out / "checkpoint-4")


def test_load_training_state_of_an_incomplete_checkpoint_is_an_error(tmp_path):
    save_pretrained(Transformer(tiny_config()), tmp_path / "final")
    opt = torch.optim.AdamW(Transformer(tiny_config()).parameters())
    with pytest.raises(Exception, match="no training state"):
        S.load_training_state(tmp_path / "final", opt)


def test_bad_checkpoint_name_is_refused(tmp_path, tokenizer):
    model, opt = _trained(0)
    with pytest.raises(ValueError, match="checkpoint name"):
        S.save_training_checkpoint(tmp_path, "best", model, tokenizer, opt, {"step": 1})


# ----------------------------------------------------------------------------- through the trainer
def test_pruning_and_a_fresh_run_remove_both_halves(tmp_path):
    from dsv3.train.trainer import TrainConfig, train

    import inspect, textwrap, argparse  # noqa: E401 -- a little real Python to train on
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, mod in enumerate((inspect, textwrap, argparse)):
        (corpus / f"m{i}.py").write_text(inspect.getsource(mod))
    model = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=16,
                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, n_group=2,
                 topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1)
    out = tmp_path / "run"
    cfg = TrainConfig(data=[str(corpus)], out=str(out), max_steps=5, batch_size=2, seq_len=32, warmup_steps=1,
                      save_every=1, keep_checkpoints=2, eval_every=0, eval_batches=1, vocab_size=300,
                      tokenizer_train_mb=0.1, val_fraction=0.1, progress=False, sample_tokens=0, device="cpu",
                      model_overrides=model)
    train(cfg, log=lambda *a: None)
    assert [s for s, _ in S.list_checkpoints(out)] == [3, 4]
    states = sorted(p.name.split(".")[0] for p in (out / S.STATE_DIR).iterdir())
    assert states == ["checkpoint-3", "checkpoint-4", "final"]
    assert all(S.state_dir(p) is not None for p in (out / "checkpoint-3", out / "checkpoint-4", out / "final"))
    assert {p.name for p in (out / "final").iterdir()} == MODEL_FILES
    logs = []
    train(TrainConfig(**{**cfg.__dict__, "max_steps": 1, "save_every": 0}), log=logs.append)
    assert any("removing 3 checkpoint(s)" in m for m in logs)
    assert not list(out.glob("checkpoint-*")) and not list(out.glob(".*"))
    assert [p.name for p in (out / S.STATE_DIR).iterdir()] == [S.state_dir(out / "final").name]
