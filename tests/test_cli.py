"""The ``dsv3`` CLI, run in-process through ``main(argv)`` (and once through ``python -m dsv3``)."""

import json
import subprocess
import sys
import types

import pytest

import dsv3.cli
from dsv3 import CheckpointError, preset
from dsv3.cli import main
from dsv3.cli.common import add_command

# The --forward runs are tiny; with the suite's parallel workers on few cores extra intra-op threads
# only contend (a 10 ms forward can take seconds).
pytestmark = pytest.mark.usefixtures("one_thread")


def run_error(capsys, argv):
    """Run a command expected to fail; return its stderr after checking status 2 and no traceback."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    return err


def test_info_v3(capsys):
    assert main(["info", "--preset", "v3"]) == 0
    out = capsys.readouterr().out
    assert "671.03B" in out and "70,272 B" in out and "4,997,120 B" in out and "1.4%" in out
    assert "YaRN: mode always" in out and "factor=40" in out and "theta=10000" in out


def test_info_v3_json(capsys):
    assert main(["info", "--preset", "v3", "--json", "--seq-len", "8192", "--dtype", "fp8"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert 670e9 < s["params"]["total"] < 672e9
    assert 36e9 < s["params"]["active_no_embedding"] < s["params"]["active"] < 38e9
    assert s["flops_per_token"]["seq_len"] == 8192
    assert s["cache"]["dtype"] == "fp8" and s["cache"]["latent_bytes_per_token"] == 35_136
    assert s["rope"]["yarn_mode"] == "always"


def test_info_tiny_forward(capsys):
    assert main(["info", "--preset", "tiny", "--forward"]) == 0
    out = capsys.readouterr().out
    assert "logits       (2, 64, 8192)" in out
    assert "MTP logits   (2, 63, 8192)" in out
    assert "vs formula: ok" in out


def test_info_forward_json(capsys):
    assert main(["info", "--preset", "tiny", "--forward", "--json", "--batch", "1", "--seq-len", "8", "--seed", "3"]) == 0
    f = json.loads(capsys.readouterr().out)["forward"]
    assert f["logits_shape"] == [1, 8, 8192] and f["mtp_logits_shapes"] == [[1, 7, 8192]]
    assert f["params_match"] and f["finite"] and f["seed"] == 3


def test_info_model_dir(tmp_path, capsys):
    cfg = preset("tiny").replace(q_lora_rank=None, rope_scaling={
        "type": "yarn", "factor": 4, "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}, yarn_mode="past_original")
    cfg.to_json_file(tmp_path / "config.json")
    assert main(["info", "--model", str(tmp_path), "--seq-len", "128"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "q_proj (no q LoRA)" in out
    assert "YaRN: mode past_original" in out and "off at seq_len 128" in out
    assert main(["info", "--model", str(tmp_path / "config.json"), "--json", "--seq-len", "1024"]) == 0
    assert json.loads(capsys.readouterr().out)["rope"]["yarn_active"] is True


def test_info_warns_about_a_latent_vllm_cannot_serve(tmp_path, capsys):
    preset("tiny").replace(kv_lora_rank=64, qk_rope_head_dim=16).to_json_file(tmp_path / "config.json")
    assert main(["info", "--model", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("dsv3: warning:") and "latent 80" in err and "vLLM and SGLang" in err
    assert main(["info", "--model", str(tmp_path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["deployment_warnings"] == [err.removeprefix("dsv3: warning: ").rstrip("\n")]
    assert main(["info", "--preset", "tiny", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["deployment_warnings"] == [] and err == ""


def test_bad_preset(capsys):
    err = run_error(capsys, ["info", "--preset", "v9"])
    assert "invalid choice: 'v9'" in err and err.startswith("usage:")


def test_preset_and_model_are_exclusive_and_required(capsys):
    assert "not allowed with" in run_error(capsys, ["info", "--preset", "tiny", "--model", "x"])
    assert "one of the arguments --preset --model is required" in run_error(capsys, ["info"])
    assert "must be > 0" in run_error(capsys, ["info", "--preset", "tiny", "--seq-len", "0"])
    assert "required" in run_error(capsys, [])


def test_missing_model_dir(tmp_path, capsys):
    err = run_error(capsys, ["info", "--model", str(tmp_path / "nowhere")])
    assert err.startswith("dsv3: error:") and "nowhere" in err
    err = run_error(capsys, ["info", "--model", str(tmp_path)])  # exists, but no config.json
    assert err.startswith("dsv3: error:") and "no config.json" in err


def test_malformed_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    err = run_error(capsys, ["info", "--model", str(tmp_path)])
    assert err.startswith("dsv3: error:") and "not valid JSON" in err
    d = preset("tiny").to_hf()
    d["hidden_act"] = "gelu"
    (tmp_path / "config.json").write_text(json.dumps(d))
    err = run_error(capsys, ["info", "--model", str(tmp_path)])
    assert err.startswith("dsv3: error: hidden_act=")


def test_forward_refuses_big_models(capsys):
    err = run_error(capsys, ["info", "--preset", "v3", "--forward"])
    assert err.startswith("dsv3: error: --forward") and "682.6B" in err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["info", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the help text's line wrapping
    assert "(default: bf16)" in out and "(default: 4096)" in out and "(default: 64)" in out
    assert "(default: None)" not in out


def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "dsv3", "info", "--preset", "tiny"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "model: tiny" in r.stdout and "MLA latent" in r.stdout


def test_runtime_user_errors_have_no_traceback(capsys, monkeypatch):
    # A subcommand that fails the way a checkpoint load can: reported as "dsv3: error: ...", status 2.
    def fail(args):
        raise CheckpointError("model.safetensors: missing tensor lm_head.weight")

    group = types.ModuleType("dsv3.cli.failing")  # a command group, registered as every group is
    group.register = lambda subparsers: add_command(subparsers, "fail", fail, help="always fails")
    monkeypatch.setitem(sys.modules, group.__name__, group)
    monkeypatch.setattr(dsv3.cli, "COMMAND_GROUPS", [*dsv3.cli.COMMAND_GROUPS, "failing"])
    err = run_error(capsys, ["fail"])
    assert err == "dsv3: error: model.safetensors: missing tensor lm_head.weight\n"
