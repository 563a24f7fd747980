"""NSASelfAttention: hidden states in and out, prefix sums as MindFormers gives them, both modes."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from helpers import nsa_reference as nref
from helpers.common import random_normal, run
from helpers.nsa_cases import small_config
from nsa_layers import NSASelfAttention, RotaryEmbedding, packing


def _layer(seed=0, **changes):
    ms.set_seed(seed)
    cfg = small_config(query_chunk_size=200, **changes)
    return cfg, NSASelfAttention(cfg, rotary=RotaryEmbedding(cfg.head_dim))


def test_matches_the_reference_built_from_its_own_projections():
    cfg, layer = _layer()
    rng = np.random.default_rng(1)
    prefix = (17, 17, 40)
    x = random_normal(rng, (40, cfg.hidden_size))
    out = layer(Tensor(x), actual_seq_len=prefix).asnumpy()

    def dense(cell, inputs):
        return inputs @ cell.weight.asnumpy().T.astype(np.float64)

    positions = packing.token_positions(packing.normalize_prefix_sums(prefix, 40))
    rope = RotaryEmbedding(cfg.head_dim)

    def rotate(a):
        return rope(Tensor(a.astype(np.float32)), Tensor(positions.astype(np.int32))).asnumpy()

    q = rotate(dense(layer.q_proj, x).reshape(40, cfg.num_heads, cfg.head_dim))
    k = dense(layer.k_proj, x).reshape(40, 3, cfg.num_kv_heads, cfg.head_dim)
    v = dense(layer.v_proj, x).reshape(40, 3, cfg.num_kv_heads, cfg.v_head_dim)
    kv = {name: (rotate(k[:, i]), v[:, i]) for i, name in enumerate(("cmp", "slc", "win"))}
    logits = dense(layer.gate.proj, x) + layer.gate.proj.bias.asnumpy()
    gates = (1 / (1 + np.exp(-logits))).reshape(40, cfg.num_heads, 3)
    weights = {"w_k": layer.core.k_compressor.weight.asnumpy(), "w_v": layer.core.v_compressor.weight.asnumpy(),
               "pe_k": None,
               "pe_v": layer.core.v_compressor.position_embedding.asnumpy()}
    attn = nref.nsa_forward(q, kv, gates, (17, 40), vars(cfg), weights, cfg.scale)[0]
    expected = dense(layer.out_proj, attn.reshape(40, -1))
    np.testing.assert_allclose(out, expected, atol=2e-5 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("actual_seq_len", [
    None, (40,), [0, 40], np.array([40, 40, 40]), Tensor(np.array([0, 40, 40, 40], np.int32))])
def test_one_segment_in_every_spelling(actual_seq_len):
    cfg, layer = _layer(seed=2)
    x = Tensor(random_normal(np.random.default_rng(2), (40, cfg.hidden_size)))
    expected = layer(x).asnumpy()
    np.testing.assert_array_equal(layer(x, actual_seq_len=actual_seq_len).asnumpy(), expected)


def test_graph_mode_training_step_reaches_every_parameter():
    cfg, layer = _layer(seed=3, independent_kv=False)
    rng = np.random.default_rng(3)
    x = Tensor(random_normal(rng, (48, cfg.hidden_size)))
    ends = Tensor(np.array([16, 30, 48, 48], np.int32))  # MindFormers style: padded with the final value
    params = layer.trainable_params()

    def loss(inputs, seq):
        return (layer(inputs, actual_seq_len=seq) ** 2).mean()

    eager = ms.grad(loss, grad_position=None, weights=params)(x, ends)
    compiled = ms.jit(ms.grad(loss, grad_position=None, weights=params))(x, ends)
    names = [p.name for p in params]
    assert any("compressor.position_embedding" in n for n in names) and any("gate" in n for n in names)
    largest = max(float(np.abs(g.asnumpy()).max()) for g in eager)
    for name, g_eager, g_graph in zip(names, eager, compiled):
        g = g_eager.asnumpy()
        # well above rounding noise (an inert parameter would sit near 1e-7 of the largest)
        assert np.isfinite(g).all() and np.abs(g).max() > 1e-4 * largest, name
        np.testing.assert_allclose(g_graph.asnumpy(), g, rtol=1e-4, atol=1e-6 * np.abs(g).max(), err_msg=name)


def test_bfloat16_hidden_states_come_back_in_bfloat16():
    cfg, layer = _layer(seed=4)
    x = Tensor(random_normal(np.random.default_rng(4), (20, cfg.hidden_size))).astype(ms.bfloat16)
    out = layer(x, actual_seq_len=(7, 20))
    assert out.dtype == ms.bfloat16 and out.shape == (20, cfg.hidden_size)
    assert np.isfinite(out.astype(ms.float32).asnumpy()).all()


def test_an_empty_batch_gives_empty_outputs_and_zero_gradients(mode):
    """T = 0 (no tokens at all): empty outputs of the right shapes (layer, core, rotary hook), and zero
    parameter gradients."""
    cfg, layer = _layer()
    x = Tensor(np.zeros((0, cfg.hidden_size), np.float32))

    def loss(inputs):
        return layer(inputs).sum()

    assert run(mode, layer, x).shape == (0, cfg.hidden_size)
    weight_grads = run(mode, ms.grad(loss, grad_position=None, weights=layer.trainable_params()), x)
    assert [p.name for p, g in zip(layer.trainable_params(), weight_grads) if g.asnumpy().any()] == []
    details = layer.core.forward_with_details(Tensor(np.zeros((0, cfg.num_heads, cfg.head_dim), np.float32)),
                                              Tensor(np.zeros((0, cfg.num_kv_heads, cfg.head_dim), np.float32)),
                                              Tensor(np.zeros((0, cfg.num_kv_heads, cfg.v_head_dim), np.float32)),
                                              Tensor(np.zeros((0, cfg.num_heads, 3), np.float32)))
    assert [details[name].shape for name in ("out", "o_cmp", "o_slc", "o_win", "blocks", "valid")] == [
        (0, cfg.num_heads, cfg.v_head_dim)] * 4 + [
        (0, cfg.num_kv_heads, cfg.select_block_count)] * 2
    rotated = layer.rotary(Tensor(np.zeros((0, cfg.num_heads, cfg.head_dim), np.float32)),
                           Tensor(np.zeros((0,), np.int32)))
    assert rotated.shape == (0, cfg.num_heads, cfg.head_dim)
