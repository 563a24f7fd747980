"""Queries at an offset (``query_offset``): a context-parallel rank's own query rows of the whole
sequence. Cut into pieces at any rows, the pieces' outputs are the reference's rows, and their
gradients add up to the unsplit core's (keys, values and parameters are shared by the pieces)."""

import mindspore as ms
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mindspore import Tensor

from helpers.nsa_cases import BRANCHES, Case, as_numpy, check_against_reference, small_config


def _pieces(case, cuts, mode="pynative"):
    """``(out, {branch: output}, selection)`` of the core run piece by piece on the rows between ``cuts``."""
    q, k, v, gates = case.tensors()
    total = q.shape[0]
    bounds = [0] + sorted(cuts) + [total]
    outs, branches, selected = [], {name: [] for name in BRANCHES}, {}
    for r0, r1 in zip(bounds[:-1], bounds[1:]):
        def piece(q_, g_, r0=r0):
            return case.net.forward_with_details(q_, k, v, g_, case.prefix, r0)
        run = ms.jit(piece) if mode == "graph" else piece
        out, parts, chosen = as_numpy(run(q[r0:r1], gates[r0:r1]))
        outs.append(out)
        for name in BRANCHES:
            branches[name].append(parts[name])
        selected.update({(r0 + t, h): blocks for (t, h), blocks in chosen.items()})
    return np.concatenate(outs), {name: np.concatenate(p) for name, p in branches.items()}, selected


@st.composite
def _cut_cases(draw):
    kv_heads, group = draw(st.sampled_from([(1, 2), (2, 1), (2, 2)]))
    cfg = small_config(num_heads=kv_heads * group, num_kv_heads=kv_heads, window_size=draw(st.integers(1, 30)),
                       query_chunk_size=draw(st.sampled_from([8, 24])),
                       select_dense_rows=draw(st.sampled_from([0, 40, None])))
    lengths = draw(st.lists(st.integers(0, 50), min_size=1, max_size=4))
    if sum(lengths) < 2:
        lengths[0] = draw(st.integers(2, 50))
    cuts = draw(st.lists(st.integers(1, sum(lengths) - 1), min_size=1, max_size=3, unique=True))
    return cfg, lengths, cuts, draw(st.booleans()), draw(st.integers(0, 2 ** 31))


@given(_cut_cases())
def test_pieces_at_any_rows_match_the_reference(case):
    """Cuts anywhere (inside segments, off the query chunks, in the window's reach), zero-length and
    shorter-than-a-block segments, shared or independent K/V: every piece's rows are the float64
    reference's."""
    cfg, lengths, cuts, shared, seed = case
    c = Case(cfg, lengths, seed, shared_kv=shared)
    check_against_reference(c, _pieces(c, cuts))


@pytest.mark.slow  # a backward per piece: 25 s (PyNative), 100 s (graph)
@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_pieces_gradients_add_up_to_the_unsplit_core(mode):
    """Query and gate gradients are the pieces' rows; key, value and compressor-parameter gradients
    are the sum over pieces (what an all-gather's backward and a replicated parameter's reduction give)."""
    cfg = small_config(query_chunk_size=8, window_size=10, select_dense_rows=40)
    c = Case(cfg, [37, 3, 0, 26], seed=31, shared_kv=True)  # tuples of K/V do not go through grad_position
    q, k, v, gates = c.tensors()
    probe = Tensor(np.random.default_rng(32).standard_normal((q.shape[0], cfg.num_heads, cfg.v_head_dim))
                   .astype(np.float32))
    params = c.net.trainable_params()

    def grads(r0, r1, offset):
        def loss(q_, k_, v_, g_):
            return (c.net(q_, k_, v_, g_, c.prefix, offset) * probe[r0:r1]).sum()
        fn = ms.grad(loss, grad_position=(0, 1, 2, 3), weights=params)
        if mode == "graph":
            fn = ms.jit(fn)
        inputs, weights = fn(q[r0:r1], k, v, gates[r0:r1])
        d_q, d_k, d_v, d_g = (x.asnumpy() for x in inputs)
        return (d_q, d_g), (d_k, d_v), [w.asnumpy() for w in weights]

    (full_q, full_g), (full_k, full_v), full_w = grads(0, q.shape[0], None)
    bounds = [0, 5, 29, 45, q.shape[0]]  # off the 8-row chunks; the first piece ends before a block
    pieces = [grads(r0, r1, r0) for r0, r1 in zip(bounds[:-1], bounds[1:])]
    np.testing.assert_allclose(np.concatenate([p[0][0] for p in pieces]), full_q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([p[0][1] for p in pieces]), full_g, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sum(p[1][0] for p in pieces), full_k, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sum(p[1][1] for p in pieces), full_v, rtol=1e-5, atol=1e-5)
    for i, param in enumerate(params):
        np.testing.assert_allclose(sum(p[2][i] for p in pieces), full_w[i], rtol=1e-5, atol=1e-5, err_msg=param.name)
    # every piece's keys get gradient from more than its own rows (so the sums are not trivial)
    assert all(np.abs(p[1][0][:bounds[i]]).max() > 0 for i, p in enumerate(pieces) if bounds[i])


@pytest.mark.parametrize("offset, rows, message", [
    (-1, 4, "'query_offset' must be a non-negative int, but got -1"),
    (True, 4, "'query_offset' must be a non-negative int, but got True"),
    (60, 7, "the 7 query rows from 'query_offset'=60 must lie within the 66 rows of the keys, but end at row 67"),
])
def test_bad_query_offset_is_refused_before_any_work(offset, rows, message):
    c = Case(small_config(), [40, 26], seed=3)
    q, k, v, gates = c.tensors()
    with pytest.raises(ValueError, match=message):
        c.net(q[:rows], k, v, gates[:rows], c.prefix, offset)
