"""``dsv3 generate``, ``dsv3 chat`` and ``dsv3 bench decode`` on a tiny random checkpoint with its own tokenizer."""

import inspect
import io
import json
import sys

import pytest
import torch
from conftest import chat_checkpoint

import dsv3
from dsv3.cli import main
from dsv3.engine import LLM, SamplingParams

# Speculative decoding arrives with `LLM(..., speculative="mtp")`; its tests wait for it.
HAS_SPEC = "speculative" in inspect.signature(LLM.__init__).parameters
needs_spec = pytest.mark.skipif(not HAS_SPEC, reason="this dsv3.LLM has no speculative decoding yet")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random V3 (with one MTP module) whose vocabulary is a ~300-id BPE tokenizer's, saved together."""
    return chat_checkpoint(tmp_path_factory.mktemp("tiny-chat"))


def run_json_lines(capsys, argv: list[str]) -> list[dict]:
    assert main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_generate_prints_each_completion(model_dir, capsys):
    assert main(["generate", "--model", model_dir, "--prompt", "the engine", "--prompt", "def step(",
                 "--max-tokens", "5", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("--- [") == 2 and "'def step('" in captured.out
    assert "2 completions" in captured.err and "tokens/s" in captured.err


def test_generate_json_matches_the_engine(model_dir, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the engine\n\ndef step(\n", encoding="utf-8")
    rows = run_json_lines(capsys, ["generate", "--model", model_dir, "--prompt-file", str(prompts), "--json",
                                   "--max-tokens", "6", "--temperature", "0"])
    assert [r["prompt"] for r in rows] == ["the engine", "def step("]          # blank line skipped
    llm = LLM(model_dir)
    expected = llm.generate(["the engine", "def step("], SamplingParams(temperature=0, max_tokens=6))
    for r, e in zip(rows, expected):
        assert r["prompt_token_ids"][0] == llm.tokenizer.bos_id                # BOS in front, as LLM.encode
        assert r["token_ids"] == e.token_ids and r["text"] == e.text
        assert r["finish_reason"] in ("stop", "length") and r["num_tokens"] == len(r["token_ids"]) <= 6

    # Sampling with a seed is reproducible.
    argv = ["generate", "--model", model_dir, "--prompt", "the", "--json", "--max-tokens", "6", "--temperature",
            "0.9", "--top-p", "0.9", "--top-k", "50", "--seed", "7"]
    assert run_json_lines(capsys, argv) == run_json_lines(capsys, argv)


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--max-tokens", "0"], "max_tokens must be"),
])
def test_generate_bad_sampling_params_are_user_errors(model_dir, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", model_dir, "--prompt", "x", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv3: error:") and message in err and "Traceback" not in err


def test_generate_missing_model_or_prompt(tmp_path, model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"])
    assert e.value.code == 2 and "no such model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", model_dir])
    assert e.value.code == 2 and "no prompt" in capsys.readouterr().err


def test_chat_reads_a_pipe(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/exit\nnever read\n"))
    assert main(["chat", "--model", model_dir, "--max-tokens", "6", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.strip() and out.endswith("\n")


def test_chat_thinking_and_history(model_dir, capsys, monkeypatch):
    # Two turns, then end of input; the reasoning is shown after "thinking: " off a terminal.
    seen = []
    real_render = dsv3.tokenizer.Tokenizer.render_chat

    def render(self, messages, *args, **kwargs):
        seen.append([dict(m) for m in messages])
        return real_render(self, messages, *args, **kwargs)

    monkeypatch.setattr(dsv3.tokenizer.Tokenizer, "render_chat", render)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\nagain\n"))
    assert main(["chat", "--model", model_dir, "--think", "--system", "be brief", "--max-tokens", "5",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("thinking: ") == 2
    assert [m["role"] for m in seen[-1]] == ["system", "user", "assistant", "user"]
    assert seen[-1][0]["content"] == "be brief" and seen[-1][-1]["content"] == "again"
    assert "</think>" not in seen[-1][2]["content"]          # only the final answer stays in history


@pytest.fixture(scope="module")
def bench_json(model_dir, tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("bench") / "decode.json"
    argv = ["bench", "decode", "--model", model_dir, "--batch", "2", "--prompt-len", "8", "--gen-len", "4",
            "--threads", "1", "--repeats", "1", "--warmup", "0", "--json", str(out)]
    if HAS_SPEC:
        argv += ["--speculative", "mtp"]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_bench_decode_json(bench_json, model_dir):
    r = bench_json
    for key in ("model", "config", "batch", "prompt_len", "gen_len", "machine", "results", "ratio",
                "tokens_identical", "tokens_identical_fraction", "cache_bytes_per_token"):
        assert key in r, key
    assert r["batch"] == 2 and r["prompt_len"] == 8 and r["gen_len"] == 4 and r["machine"]["threads"] == 1
    ours, hf = r["results"][:2]
    assert ours["name"] == "dsv3" and hf["name"].startswith("transformers")
    for x in (ours, hf):
        assert x["time_s_median"] > 0 and len(x["time_s_all"]) == 1
        assert x["tokens_per_s"] == pytest.approx(2 * 4 / x["time_s_median"])
        assert x["latency_ms_per_token"] == pytest.approx(1000 * x["time_s_median"] / 4)
    assert r["ratio"] == pytest.approx(ours["tokens_per_s"] / hf["tokens_per_s"])
    assert r["tokens_identical"] is True and r["tokens_identical_fraction"] == 1.0
    cfg = dsv3.ModelConfig.from_json_file(model_dir)
    c = r["cache_bytes_per_token"]
    assert c["ours"] == c["formula"] == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert c["transformers"] > 0 and c["ratio_transformers_over_ours"] == pytest.approx(c["transformers"] / c["ours"])


@needs_spec
def test_bench_decode_speculative(bench_json):
    s = bench_json["speculative"]
    assert s["method"] == "mtp" and s["num_speculative_tokens"] == 1 and s["speedup_vs_ours"] > 0
    assert 0 <= s["acceptance_rate"] <= 1 and 1 <= s["mean_accepted_length"] <= 2
    assert s["tokens_equal_plain"] is True


@needs_spec
def test_generate_speculative_greedy_equals_plain(model_dir, capsys):
    argv = ["generate", "--model", model_dir, "--prompt", "the engine", "--json", "--max-tokens", "8",
            "--temperature", "0"]
    plain = run_json_lines(capsys, argv)
    spec = run_json_lines(capsys, argv + ["--speculative", "mtp", "--num-speculative-tokens", "2"])
    assert [r["token_ids"] for r in spec] == [r["token_ids"] for r in plain]


def test_generate_keeps_fp8_weights_with_keep_fp8(model_dir, capsys, tmp_path):
    """`--keep-fp8` on an FP8 checkpoint: the engine holds FP8 layers, and greedy decoding runs."""
    fp8_dir = str(tmp_path / "fp8")
    assert main(["convert", model_dir, fp8_dir, "--to", "fp8", "--block", "16", "16"]) == 0
    capsys.readouterr()
    argv = ["generate", "--model", fp8_dir, "--prompt", "def step(", "--max-tokens", "6", "--temperature", "0",
            "--json"]
    kept = run_json_lines(capsys, argv + ["--keep-fp8"])
    dequantized = run_json_lines(capsys, argv)
    assert len(kept) == len(dequantized) == 1
    assert len(kept[0]["token_ids"]) == 6
    llm = LLM(fp8_dir, keep_fp8=True)
    assert any(p.dtype == torch.float8_e4m3fn for p in llm.model.state_dict().values())


@pytest.mark.slow
def test_generate_compile_equals_eager_greedy(model_dir, capsys):
    """`--compile`: torch.compile'd decode steps give the eager engine's greedy tokens."""
    argv = ["generate", "--model", model_dir, "--prompt", "the engine", "--prompt", "def step(", "--json",
            "--max-tokens", "6", "--temperature", "0"]
    eager = run_json_lines(capsys, argv)
    compiled = run_json_lines(capsys, argv + ["--compile"])
    assert [r["token_ids"] for r in compiled] == [r["token_ids"] for r in eager]

