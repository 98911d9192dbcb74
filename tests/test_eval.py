"""Evaluation: perplexity against transformers, seeded reproducibility, task accuracy, the CLI and
the lm-eval task files."""

from __future__ import annotations

import json

import pytest
import torch
from post_fixtures import tiny_chat_model

from dsv3.checkpoint import load_pretrained
from dsv3.cli import main
from dsv3.eval.lm_eval import write_lm_eval_task
from dsv3.eval.perplexity import heldout_tokens, perplexity
from dsv3.eval.tasks import task_accuracy
from dsv3.tasks import Arithmetic, Sort, problems

TEXT = ("What is 12 + 7? 12 + 7 = 19. Sort: 5 2 9 gives 2 5 9. Balanced? ([]) yes. " * 12).strip()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    path, tok = tiny_chat_model(root / "model", seed=4, head_scale=10.0)
    text = root / "heldout.txt"
    text.write_text(TEXT)
    return path, tok, text


def test_perplexity_matches_transformers(setup):
    from transformers import AutoModelForCausalLM
    path, tok, text = setup
    tokens = heldout_tokens(tok, [str(text)])
    assert tokens.tolist() == tok.encode(TEXT) + [tok.eos_id]        # pre-training layout: text then EOS
    ours = perplexity(load_pretrained(path), tokens, seq_len=24, max_windows=None, batch_size=3)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for k in range(ours["total_windows"]):
            w = torch.from_numpy(tokens[k * 24:k * 24 + 25])[None]
            loss = hf(input_ids=w[:, :-1]).logits.double().log_softmax(-1).gather(-1, w[:, 1:, None]).sum()
            nll -= float(loss)
            n += 24
    assert ours["windows"] == ours["total_windows"] == (len(tokens) - 1) // 24 and ours["tokens"] == n
    assert ours["loss"] == pytest.approx(nll / n, rel=1e-5)


def test_perplexity_is_seeded(setup):
    path, tok, text = setup
    model = load_pretrained(path)
    tokens = heldout_tokens(tok, [str(text)])
    a = perplexity(model, tokens, seq_len=8, max_windows=5, seed=1)
    assert a == perplexity(model, tokens, seq_len=8, max_windows=5, seed=1)
    b = perplexity(model, tokens, seq_len=8, max_windows=5, seed=2)
    assert a["windows"] == 5 < a["total_windows"] and a["loss"] != b["loss"]
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tokens[:5], seq_len=8)


def test_default_heldout_text_is_the_stdlib_val_split(setup):
    _, tok, _ = setup
    from dsv3.data import iter_documents, split_of
    first_val = next(d for d in iter_documents(None) if split_of(d.doc_id, 0.02) == "val")
    tokens = heldout_tokens(tok, None, max_tokens=300)
    assert len(tokens) == 300 and tokens.tolist() == (tok.encode(first_val.text) + [tok.eos_id])[:300]


def test_task_accuracy_is_reproducible(setup):
    path, tok, _ = setup
    model = load_pretrained(path)
    a = task_accuracy(model, tok, Sort(), n=5, seed=3, max_new_tokens=4, temperature=1.0)
    assert a == task_accuracy(model, tok, Sort(), n=5, seed=3, max_new_tokens=4, temperature=1.0)
    assert [s["prompt"] for s in a["samples"]] == [p.prompt for p in problems(Sort(), 3, 3)]
    g = task_accuracy(model, tok, Arithmetic(), n=4, seed=0, max_new_tokens=4)
    assert g["temperature"] == 0.0 and 0.0 <= g["accuracy"] <= g["format_rate"] <= 1.0
    # accuracy is the exact-match rule on the (greedy) completions it reports
    assert g == task_accuracy(model, tok, Arithmetic(), n=4, seed=0, max_new_tokens=4)


def test_cli_eval_twice_gives_the_same_numbers(setup, tmp_path, capsys):
    path, _, text = setup
    outs = []
    for i in range(2):
        f = tmp_path / f"r{i}.json"
        assert main(["eval", "--model", str(path), "--perplexity", "--data", str(text), "--seq-len", "16",
                     "--max-windows", "3", "--task", "arithmetic", "brackets", "--num", "3",
                     "--max-new-tokens", "3", "--seed", "5", "--json", str(f)]) == 0
        outs.append(json.loads(f.read_text()))
    assert outs[0] == outs[1]
    assert set(outs[0]["tasks"]) == {"arithmetic", "brackets"} and outs[0]["perplexity"]["windows"] == 3
    assert "perplexity" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tmp_path / "missing")])


def test_lm_eval_task_files(tmp_path):
    yaml_file, data = write_lm_eval_task(tmp_path / "tasks", Arithmetic(), n=7, seed=2)
    spec = json.loads(open(yaml_file).read())             # JSON is YAML
    assert spec["task"] == "dsv3_arithmetic" and spec["output_type"] == "generate_until"
    assert spec["dataset_kwargs"]["data_files"]["test"] == data
    rows = [json.loads(ln) for ln in open(data)]
    assert [(r["prompt"], r["answer"]) for r in rows] == [(p.prompt, p.answer) for p in problems(Arithmetic(), 7, 2)]
    assert main(["eval", "--lm-eval-task", str(tmp_path / "cli"), "--task", "sort", "--num", "2"]) == 0
    assert (tmp_path / "cli" / "dsv3_sort.yaml").is_file()
