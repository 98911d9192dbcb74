"""The vLLM peer adapter without vLLM: argument checks, the venv lookup and the subprocess plumbing.

``run_vllm`` is driven end to end through the real worker script, run by a stand-in "python" whose
``vllm`` package is a fake (written here): it checks the engine arguments and environment the
adapter must pass and answers with tokens from a fixed rule, so the test can tell the worker relays
them in order. The real vLLM is exercised by tests/interop/test_vllm.py (`make interop`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from dsv3.bench.peers import vllm as peer

FAKE_VLLM = '''
import json, os
__version__ = "0.0.fake"

class SamplingParams:
    def __init__(self, temperature, max_tokens, ignore_eos, detokenize):
        assert temperature == 0.0 and ignore_eos is True and detokenize is False, "not greedy/ignore_eos/no-detok"
        self.max_tokens = max_tokens

class _Completion:
    def __init__(self, ids):
        self.token_ids = ids

class _Output:
    def __init__(self, ids):
        self.outputs = [_Completion(ids)]

class LLM:
    def __init__(self, **kwargs):
        for k, v in json.loads(os.environ["FAKE_VLLM_EXPECT"]).items():
            if kwargs.get(k) != v:
                raise ValueError(f"fake vllm: {k}={kwargs.get(k)!r}, expected {v!r}")
        for var in ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE"):
            if var not in os.environ:
                raise ValueError(f"fake vllm: {var} not set")

    def generate(self, prompts, params, use_tqdm=True):
        # the rule the test checks: token i of a prompt is (sum(prompt) + 3 i) mod 97
        return [_Output([(sum(p["prompt_token_ids"]) + 3 * i) % 97 for i in range(params.max_tokens)])
                for p in prompts]
'''
FAKE_INPUTS = '''
def TokensPrompt(prompt_token_ids):
    return {"prompt_token_ids": prompt_token_ids}
'''


@pytest.fixture
def fake_python(tmp_path):
    """A "python" that is this interpreter with the fake vllm package on its path."""
    pkg = tmp_path / "site" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_VLLM)
    (pkg / "inputs.py").write_text(FAKE_INPUTS)
    exe = tmp_path / "bin" / "python"
    exe.parent.mkdir()
    exe.write_text(f'#!/bin/sh\nPYTHONPATH="{tmp_path / "site"}" exec "{sys.executable}" "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"kv_lora_rank": 512, "qk_rope_head_dim": 64,
                                               "max_position_embeddings": 64}))
    return d


def expect(monkeypatch, **kwargs):
    monkeypatch.setenv("FAKE_VLLM_EXPECT", json.dumps(kwargs))


def test_run_vllm_relays_tokens_and_timings(fake_python, model_dir, monkeypatch):
    prompts = [[1, 2, 3], [10, 20], [5]]
    expect(monkeypatch, model=str(model_dir.resolve()), dtype="float32", max_num_seqs=2, max_model_len=3 + 6,
           attention_backend="CPU_MLA", enforce_eager=True, enable_prefix_caching=False,
           compilation_config={"custom_ops": ["-rotary_embedding"]})
    out = peer.run_vllm(model_dir, prompts, 6, threads=1, batch=2, python=fake_python)
    assert out["tokens"] == [[(sum(p) + 3 * i) % 97 for i in range(6)] for p in prompts]
    assert out["decode_tokens"] == 3 * 5
    assert out["version"] == "0.0.fake"
    assert out["prefill_s"] >= 0 and out["decode_s"] >= 0 and out["load_s"] >= 0
    assert (out["batch"], out["threads"], out["attention_backend"], out["native_rope"]) == (2, 1, "CPU_MLA", True)


def test_bf16_leaves_the_backend_to_vllm_and_keeps_its_rope_op_on_request(fake_python, model_dir, monkeypatch):
    expect(monkeypatch, dtype="bfloat16", attention_backend=None, compilation_config=None)
    out = peer.run_vllm(model_dir, [[1]], 2, threads=1, dtype="bfloat16", python=fake_python, native_rope=False)
    assert out["tokens"] == [[1, 4]]


def test_worker_failure_carries_vllms_message(fake_python, model_dir, monkeypatch, tmp_path):
    expect(monkeypatch, max_num_seqs=99)
    log = tmp_path / "vllm.log"
    with pytest.raises(RuntimeError, match=r"fake vllm: max_num_seqs=1, expected 99"):
        peer.run_vllm(model_dir, [[1]], 2, threads=1, python=fake_python, log_path=log)
    assert "Traceback" in log.read_text()


def test_unavailable_without_a_venv_names_the_installer(tmp_path):
    reason = peer.vllm_unavailable(tmp_path / "nowhere" / "python")
    assert "does not exist" in reason and "install_vllm.sh" in reason and peer.PYTHON_ENV in reason


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm importable in this venv")
def test_unavailable_when_import_fails():
    assert "import vllm" in peer.vllm_unavailable(sys.executable)


def test_available_reports_version(fake_python):
    assert peer.vllm_unavailable(fake_python) is None
    assert peer.vllm_version(fake_python) == "0.0.fake"


def test_python_lookup(monkeypatch, tmp_path):
    monkeypatch.setenv(peer.PYTHON_ENV, "rel/bin/python")
    assert peer.vllm_python() == Path.cwd() / "rel" / "bin" / "python"      # made absolute
    assert peer.vllm_python("sh") == Path(shutil.which("sh"))                # a bare name: from PATH
    assert peer.vllm_python("/x/python") == Path("/x/python")                # the argument wins
    monkeypatch.delenv(peer.PYTHON_ENV)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".venv-vllm" / "bin").mkdir(parents=True)
    (tmp_path / ".venv-vllm" / "bin" / "python").write_text("")
    assert peer.vllm_python() == tmp_path / ".venv-vllm" / "bin" / "python"


def test_unservable_latent_is_refused_before_starting_vllm(tmp_path):
    d = tmp_path / "narrow"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"kv_lora_rank": 64, "qk_rope_head_dim": 16}))
    with pytest.raises(ValueError, match=r"512 \+ 64 = 576; this checkpoint has 64 \+ 16 = 80"):
        peer.run_vllm(d, [[1]], 2, threads=1, python="/nonexistent/python")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        peer.check_servable(tmp_path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[]), "non-empty"),
    (dict(prompts=[[1], []]), "non-empty"),
    (dict(prompts=[[-1]]), ">= 0"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(batch=0), "batch"),
    (dict(dtype="int8"), "dtype"),
    (dict(prompts=[[1] * 60], max_new_tokens=8), "exceeds the model's max_position_embeddings = 64"),
])
def test_bad_arguments(kwargs, match):
    args = dict(model_dir="m", prompts=[[1, 2]], max_new_tokens=4, batch=1, dtype="float32",
                max_position_embeddings=64)
    with pytest.raises(ValueError, match=match):
        peer.build_request(**{**args, **kwargs})


def test_yarn_table_limits_the_sequence_length(tmp_path):
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    assert peer.position_limit({"max_position_embeddings": 512}) == (512, "the model's max_position_embeddings")
    assert peer.position_limit({"max_position_embeddings": 512, "rope_scaling": yarn})[0] == 128
    assert peer.position_limit({"max_position_embeddings": 64, "rope_scaling": yarn})[0] == 64
    d = tmp_path / "yarn"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"kv_lora_rank": 512, "qk_rope_head_dim": 64,
                                               "max_position_embeddings": 512, "rope_scaling": yarn}))
    with pytest.raises(ValueError, match=r"140 exceeds vLLM's YaRN table .* = 128"):
        peer.run_vllm(d, [[1] * 100], 40, threads=1, python="/nonexistent/python")


def test_thread_env_binds_the_first_allowed_cpus():
    cpus = sorted(os.sched_getaffinity(0))
    env = peer.thread_env(1, kv_cache_gib=2)
    assert env == {"VLLM_CPU_OMP_THREADS_BIND": str(cpus[0]), "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}
    with pytest.raises(ValueError, match="may use only"):
        peer.thread_env(len(cpus) + 1, kv_cache_gib=1)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        peer.thread_env(0, kv_cache_gib=1)


def test_worker_imports_only_vllm_and_the_standard_library():
    src = textwrap.dedent(peer.WORKER.read_text())
    imports = {line.split()[1].split(".")[0] for line in src.splitlines()
               if line.strip().startswith(("import ", "from ")) and not line.startswith("from __future__")}
    assert imports <= {"json", "os", "sys", "time", "vllm"}, imports
