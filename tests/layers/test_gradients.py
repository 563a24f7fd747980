"""Gradients: the masked-attention core's hand-written backward against autodiff, and the whole
NSA core's gradients (queries, per-branch keys and values, gates) against directional derivatives of
the float64 reference, for both formulations of the selected branch and both execution modes."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from helpers import nsa_reference as nref
from helpers.common import random_normal
from helpers.nsa_cases import BRANCHES, Case, small_config
from nsa_layers.attention_math import MaskedAttention, attention_forward, visibility_bias


@pytest.mark.parametrize("shared_bias,dim_v", [(True, 6), (False, 6), (False, 20)])
def test_masked_attention_backward_matches_autodiff_and_numpy(shared_bias, dim_v):
    """``MaskedAttention`` (kept probabilities, ``dO . O`` softmax backward) against autodiff of the same
    forward and against float64 NumPy; one row sees nothing and is zeroed by the caller (as the
    compressed branch does), so its gradients must be exactly 0 and finite. ``dim_v`` 6 (fewer than
    the 15 query rows: the row term goes into the matmul) and 20 (more: the row term is tiled)."""
    rng = np.random.default_rng(3)
    batch, group, rows, keys, dim_q, scale = 2, 3, 5, 7, 4, 0.4
    q = random_normal(rng, (batch, group * rows, dim_q))
    k, v = random_normal(rng, (batch, keys, dim_q)), random_normal(rng, (batch, keys, dim_v))
    visible = rng.random((1 if shared_bias else batch, rows, keys)) < 0.6
    visible[..., 0] = True
    visible[:, 2] = False  # row 2 sees no key
    keep = visible.any(-1, keepdims=True).astype(np.float32)  # (b, C, 1)
    target = random_normal(rng, (batch, group * rows, dim_v))
    bias = visibility_bias(Tensor(visible), ms.float32, -1e30)
    keep_rows = Tensor(np.tile(keep, (1, group, 1)))  # rows ordered (g, c)
    core = MaskedAttention(scale)

    def loss_core(q_, k_, v_):
        return (core(q_, k_, v_, bias)[0] * keep_rows * Tensor(target)).sum()

    def loss_autodiff(q_, k_, v_):
        return (attention_forward(q_, k_, v_, bias, scale)[0] * keep_rows * Tensor(target)).sum()

    inputs = (Tensor(q), Tensor(k), Tensor(v))
    got = [g.asnumpy() for g in ms.grad(loss_core, grad_position=(0, 1, 2))(*inputs)]
    want = [g.asnumpy() for g in ms.grad(loss_autodiff, grad_position=(0, 1, 2))(*inputs)]
    for g, w in zip(got, want):
        assert np.isfinite(g).all() and np.abs(w).max() > 0
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max())
    assert not got[0].reshape(batch, group, rows, dim_q)[:, :, 2].any()
    # forward against float64 NumPy
    out = core(*inputs, bias)[0].asnumpy().reshape(batch, group, rows, dim_v)
    q64 = q.astype(np.float64).reshape(batch, group, rows, dim_q)
    for b in range(batch):
        for g in range(group):
            for c in range(rows):
                seen = visible[0 if shared_bias else b, c]
                if not seen.any():
                    continue
                s = scale * k[b, seen].astype(np.float64) @ q64[b, g, c]
                p = np.exp(s - s.max())
                np.testing.assert_allclose(out[b, g, c], (p / p.sum()) @ v[b, seen], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dense_rows,mode", [(0, "pynative"), pytest.param(0, "graph", marks=pytest.mark.slow),
                                             (10 ** 6, "pynative"),
                                             pytest.param(10 ** 6, "graph", marks=pytest.mark.slow)])
def test_layer_gradients_match_reference_directional_derivatives(dense_rows, mode):
    """For each input (q, the keys and values of each branch, the gates): ``<grad, u>`` of
    ``sum(out * target)`` equals the central difference of the float64 reference along a random ``u``
    (the selection held at the layer's own, as no gradient flows through it). Segments: one shorter
    than a selection block, an empty one, GQA group 2; the selected branch gathered or block-masked.
    Compiled, the graph has run once before on other inputs."""
    lengths = [41, 5, 0, 26]
    case = Case(small_config(query_chunk_size=24, select_dense_rows=dense_rows), lengths, seed=21)
    rng = np.random.default_rng(22)
    total = sum(lengths)
    target = random_normal(rng, (total, case.cfg.num_heads, case.cfg.v_head_dim))
    q, k, v, gates = case.tensors()
    net = case.net

    def loss(q_, k_cmp, k_slc, k_win, v_cmp, v_slc, v_win, g_):
        return (net(q_, (k_cmp, k_slc, k_win), (v_cmp, v_slc, v_win), g_, case.prefix) * Tensor(target)).sum()

    grad_fn = ms.grad(loss, grad_position=tuple(range(8)))
    if mode == "graph":
        grad_fn = ms.jit(grad_fn)
        # a first call on other inputs: the loops' buffers and accumulators must not carry over
        grad_fn(q * 0.5, *k, *v, gates * 2.0)
    grads = [g.asnumpy().astype(np.float64) for g in grad_fn(q, *k, *v, gates)]
    _, _, selected = case.run()

    def ref_loss(q_, kv, gates_):
        out = nref.nsa_forward(q_, kv, gates_, case.prefix, vars(case.cfg), case.weights, case.cfg.scale,
                               selected_override=selected)[0]
        return float((out * target).sum())

    base_q = case.q.astype(np.float64)
    base_kv = {name: tuple(x.astype(np.float64) for x in case.kv[name]) for name in BRANCHES}
    base_gates = case.gates.astype(np.float64)
    names = ["q"] + [f"k_{b}" for b in BRANCHES] + [f"v_{b}" for b in BRANCHES] + ["gates"]
    eps = 1e-5
    for name, grad in zip(names, grads):
        direction = rng.standard_normal(grad.shape)

        def shifted(sign, name=name, direction=direction):
            q_, gates_ = base_q, base_gates
            kv = dict(base_kv)
            if name == "q":
                q_ = base_q + sign * eps * direction
            elif name == "gates":
                gates_ = base_gates + sign * eps * direction
            else:
                which, branch = name.split("_")
                pair = list(kv[branch])
                pair[0 if which == "k" else 1] = pair[0 if which == "k" else 1] + sign * eps * direction
                kv[branch] = tuple(pair)
            return ref_loss(q_, kv, gates_)

        numeric = (shifted(1) - shifted(-1)) / (2 * eps)
        analytic = float((grad * direction).sum())
        assert abs(numeric) > 1e-3, name  # the input matters to the loss
        assert abs(analytic - numeric) <= 2e-4 * max(1.0, abs(numeric)), (name, analytic, numeric)
