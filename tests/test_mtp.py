"""Multi-token prediction: output shapes, which tokens each depth may see, and the shared embedding/head."""

import pytest
import torch

import dsv3
from conftest import tiny_config
from dsv3 import ModelOutput

S = 10


def tiny_model(depth=1, seed=0, **overrides):
    torch.manual_seed(seed)
    model = dsv3.Transformer(tiny_config(num_nextn_predict_layers=depth, **overrides))
    model.init_weights(std=0.15)
    return model.eval()


def random_ids(vocab, seed=0, B=2):
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


def perturbed(ids, pos, vocab):
    out = ids.clone()
    out[:, pos] = (out[:, pos] + 1 + torch.arange(out.shape[0])) % vocab
    return out


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_output_shapes(depth):
    model = tiny_model(depth)
    V, D = model.config.vocab_size, model.config.hidden_size
    ids = random_ids(V)
    with torch.no_grad():
        out = model(ids, return_mtp=True)
        plain = model(ids)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, S, V) and out.logits.dtype == torch.float32
    assert out.hidden.shape == (2, S, D)
    assert torch.equal(out.logits, plain)  # asking for MTP does not change the main logits
    assert len(out.mtp_logits) == depth
    for k, logits in enumerate(out.mtp_logits, start=1):
        assert logits.shape == (2, S - k, V) and logits.dtype == torch.float32


def test_short_sequence_stops_at_available_depth():
    model = tiny_model(2)
    with torch.no_grad():
        out = model(torch.tensor([[3, 4]]), return_mtp=True)
    assert [t.shape[1] for t in out.mtp_logits] == [1]


def changed(a, b):
    """Per position: whether logits differ (batch and vocab reduced)."""
    return ((a - b).abs().amax(dim=(0, 2)) > 1e-4).tolist()


@pytest.mark.parametrize("depth", [1, 2])
def test_depth_k_at_position_i_sees_tokens_up_to_i_plus_k(depth):
    model = tiny_model(2, seed=1)
    V = model.config.vocab_size
    ids = random_ids(V, seed=2)
    with torch.no_grad():
        base = model(ids, return_mtp=True).mtp_logits[depth - 1]
        for i in (0, 3, S - depth - 1):
            # token i+k+1 is the target of position i: it must not leak into positions <= i
            if i + depth + 1 < S:
                out = model(perturbed(ids, i + depth + 1, V), return_mtp=True).mtp_logits[depth - 1]
                diff = changed(out, base)
                assert not any(diff[: i + 1]), f"depth {depth}: positions <= {i} saw token {i + depth + 1}"
                assert diff[i + 1], "the next position must see it"
            # token i+k is the newest input of position i
            out = model(perturbed(ids, i + depth, V), return_mtp=True).mtp_logits[depth - 1]
            diff = changed(out, base)
            assert diff[i], f"depth {depth}: position {i} ignores token {i + depth}"
            assert not any(diff[:i])


def test_depth1_recomputed_from_parts():
    """h' = eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)]) -> block -> shared_head.norm -> lm_head; depth 2 chains."""
    model = tiny_model(2, seed=3)
    ids = random_ids(model.config.vocab_size, seed=4)
    with torch.no_grad():
        out = model(ids, return_mtp=True)
        cos, sin = model.rope(torch.arange(S))
        h = out.hidden
        for k, module in enumerate(model.mtp, start=1):
            emb = model.embed_tokens(ids[:, k:])
            x = module.eh_proj(torch.cat([module.enorm(emb), module.hnorm(h[:, : S - k])], dim=-1))
            h = module.block(x, cos[: S - k], sin[: S - k])
            torch.testing.assert_close(out.mtp_logits[k - 1], model.lm_head(module.norm(h)), atol=1e-5, rtol=1e-5)
            # the order of the concatenation matters: embedding first
            swapped = module.eh_proj(torch.cat([module.hnorm(h[:, : S - k]), module.enorm(emb)], dim=-1))
            assert not torch.allclose(swapped, x, atol=1e-3)


def test_embedding_and_head_are_shared():
    model = tiny_model(2, seed=5)
    V = model.config.vocab_size
    # No MTP module owns a vocab-sized tensor: they use the model's embedding and head.
    for name, p in model.mtp.named_parameters():
        assert V not in p.shape, name
    mtp_params = {id(p) for p in model.mtp.parameters()}
    assert id(model.embed_tokens.weight) not in mtp_params and id(model.lm_head.weight) not in mtp_params
    ids = random_ids(V, seed=6)
    with torch.no_grad():
        before = model(ids, return_mtp=True).mtp_logits
        # Zeroing a row of the main head zeroes that vocab column in every depth's logits.
        model.lm_head.weight[7] = 0
        after = model(ids, return_mtp=True).mtp_logits
        for a in after:
            assert bool((a[..., 7] == 0).all())
        # Changing the main embedding of the token at position 2 changes depth 1 at position 1.
        model.embed_tokens.weight[ids[0, 2]] += 1.0
        again = model(ids, return_mtp=True).mtp_logits
    assert bool((before[0][..., 7] != 0).all())
    torch.testing.assert_close(after[0][..., 8:], before[0][..., 8:])
    assert (again[0][0, 1] - after[0][0, 1]).abs().max() > 1e-4


def test_mtp_layer_indices_follow_the_main_layers():
    model = tiny_model(2)
    L = model.config.num_hidden_layers
    assert [m.block.self_attn.layer_idx for m in model.mtp] == [L, L + 1]
    # An MTP block is a full block: MoE when the config says its layer index is an MoE layer.
    assert [type(m.block.mlp).__name__ for m in model.mtp] == ["MoE", "MoE"]
    assert all(model.config.is_moe_layer(i) for i in (L, L + 1))


def test_mtp_backward_reaches_shared_and_own_weights():
    model = tiny_model(1, seed=7).train()
    ids = random_ids(model.config.vocab_size, seed=8)
    out = model(ids, return_mtp=True)
    out.mtp_logits[0].logsumexp(-1).sum().backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    assert model.embed_tokens.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.layers[0].self_attn.kv_a_proj_with_mqa.weight.grad.abs().sum() > 0  # through h
