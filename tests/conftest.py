"""Shared test helpers: a tiny random-test config with every V3 feature switched on, weights far
from near-tied logits, a tiny chat checkpoint with its own tokenizer, a corpus of stdlib sources for
the training tests, a gloo process group for spawned ranks, an FP8 dequantization reference, and a
one-thread fixture.

Import them as ``from conftest import tiny_config, far_from_ties_, chat_checkpoint`` or ask for the
``tiny_config`` fixture (a factory) or the ``one_thread`` fixture.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import traceback
from pathlib import Path

import pytest
import torch

from dsv3 import ModelConfig

# Small enough for CPU tests in milliseconds; keeps q-LoRA, group-limited routing (4 groups of 2,
# keep 2), a shared expert, one dense first layer and one MTP module.
TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    num_hidden_layers=2, num_nextn_predict_layers=1, num_attention_heads=4, num_key_value_heads=4,
    kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
    n_routed_experts=8, n_shared_experts=1, n_group=4, topk_group=2, num_experts_per_tok=2,
    first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=256,
    rope_scaling=None, torch_dtype="float32",
)

# The training tests' model (``TrainConfig.model_overrides``): hidden 32, a dense layer then an MoE
# layer of 8 experts in 4 groups (keep 2), so a step of the real trainer takes milliseconds. A test
# that needs another shape writes ``dict(TRAIN_MODEL, field=value)``, so what it changes is explicit.
TRAIN_MODEL = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=24,
                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_group=4,
                   topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1)

# A small YaRN setting whose ramp is not degenerate for d=8 (low=0, high=3 with theta 100, L=64).
TINY_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def tiny_config(**overrides) -> ModelConfig:
    """A tiny, validated ``ModelConfig``; keyword arguments override any field."""
    return ModelConfig(**{**TINY, **overrides})


@pytest.fixture(name="tiny_config")
def tiny_config_fixture():
    return tiny_config


def far_from_ties_(model: torch.nn.Module, router_bias: float = 0.0) -> torch.nn.Module:
    """Large random weights in place (matrices N(0, 0.3), vectors 1 + N(0, 0.1)): greedy decoding then
    sits far from near-tied logits, so token-for-token comparisons between implementations hold.
    ``router_bias`` > 0 also draws the routers' selection biases (a buffer, so not among the
    parameters) from N(0, router_bias): a converter or peer that drops them then routes differently."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.1).add_(1 if p.dim() == 1 else 0)
        for m in model.modules():
            if router_bias and getattr(m, "e_score_correction_bias", None) is not None:
                m.e_score_correction_bias.normal_(0, router_bias)
    return model


# What the small BPE tokenizers of the CLI and server tests learn from: prose and a little code.
CHAT_WORDS = ("the engine reads a prompt and writes one token at a time while the latent cache keeps every "
              "position of every sequence so that no key is ever computed twice").split()
_CHAT_CODE = "def step(self, batch):\n    for seq in batch:\n        seq.output.append(token)\n    return batch\n"
CHAT_TEXT = ("\n".join(" ".join(CHAT_WORDS[(7 * i + 3 * j) % len(CHAT_WORDS)] for j in range(11)) for i in range(50))
             + _CHAT_CODE * 10)


def chat_checkpoint(path, tok=None, **overrides) -> str:
    """A tiny random V3 (one MTP module, weights far from ties) saved in ``path`` together with
    ``tok`` (default: a ~300-id BPE tokenizer trained on ``CHAT_TEXT``), the vocabulary sized to it;
    ``overrides`` go to :func:`tiny_config`."""
    import dsv3
    from dsv3.tokenizer import train_tokenizer

    if tok is None:
        tok = train_tokenizer([CHAT_TEXT], vocab_size=300)
    torch.manual_seed(0)
    model = far_from_ties_(dsv3.Transformer(tiny_config(vocab_size=tok.vocab_size, **overrides)))
    dsv3.save_pretrained(model, path)
    tok.save(path)
    return str(path)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: its ops are tiny, and on a busy 2-core machine a second intra-op
    thread that must meet the first at every op can stall each one for a scheduler time slice (10x
    slower tests); also the same kernels as single-threaded workers. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def source_corpus(d: Path, modules: tuple[str, ...], chunk: int = 4000, max_chars: int | None = None) -> Path:
    """Write the Python source of each stdlib module in ``modules`` to ``d`` as text files of ``chunk``
    characters (``NAME_OFFSET.txt``; only the first ``max_chars`` of each module when given): real text
    that trains a tokenizer and a tiny model in seconds, in many documents so the val split isn't empty.
    The files and their names decide the data order, so a test's losses depend on these arguments."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    for name in modules:
        src = inspect.getsource(importlib.import_module(name))
        for j in range(0, len(src) if max_chars is None else min(len(src), max_chars), chunk):
            (d / f"{name}_{j}.txt").write_text(src[j:j + chunk])
    return d


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, tmp):
    """The body of a spawned test rank: a gloo process group met through a file under ``tmp`` (no port
    to pick, and race for, on a shared CI machine), one torch thread (ranks share the test's cores),
    the traceback printed before a failure propagates (``mp.spawn`` reports only the exception's type
    otherwise), and the group always torn down."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size)
    try:
        yield
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def blockwise_dequant64(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Independent FP8 dequantization reference: an explicit loop over ``block``-sized tiles of ``q``
    times their scale in ``s``, in float64."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            sl = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            out[sl] = q[sl].double() * s[i, j].double()
    return out
