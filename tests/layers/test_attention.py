"""NativeSparseAttention against the float64 reference; causality, segment isolation, gradients."""

import mindspore as ms
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mindspore import Tensor

from helpers.common import examples, random_normal
from helpers.nsa_cases import BRANCHES, Case, as_numpy, assert_close, check_against_reference, small_config
from nsa_layers import NSAConfig
from nsa_layers.attention_math import chunk_buckets


@st.composite
def _cases(draw):
    kv_heads, group = draw(st.sampled_from([(1, 1), (2, 1), (1, 2), (2, 2), (1, 4)]))
    init, local = draw(st.integers(0, 1)), draw(st.integers(1, 2))
    cfg = small_config(
        num_heads=kv_heads * group, num_kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([8, 16])), v_head_dim=draw(st.sampled_from([8, 16])),
        compress_block_size=draw(st.sampled_from([4, 8])), select_block_count=draw(st.integers(init + local, 4)),
        num_init_blocks=init, num_local_blocks=local,
        window_size=draw(st.integers(1, 40)), query_chunk_size=draw(st.sampled_from([16, 40, 200])),
        select_dense_rows=draw(st.sampled_from([0, 40, None])), use_position_embedding=draw(st.booleans()))
    n = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(0, 70), min_size=n, max_size=n))
    if sum(lengths) == 0:
        lengths[0] = draw(st.integers(1, 70))
    return cfg, lengths, draw(st.booleans()), draw(st.integers(0, 2 ** 31))


@given(_cases())
def test_matches_reference_on_random_packed_layouts(case):
    """Every branch and the gated output, on layouts with zero-length segments, segments shorter
    than a block, GQA groups 1/2/4, head_dim != v_head_dim, shared or independent K/V."""
    cfg, lengths, shared, seed = case
    check_against_reference(Case(cfg, lengths, seed, shared_kv=shared))


@pytest.mark.parametrize("dense_rows", [0, None], ids=["gathered", "block-masked"])
def test_paper_sizes_match_reference(dense_rows):
    """l=32, d=16, l'=64, n=16 (1 initial + 2 local), with a window of 40 and a GQA group of 4; the
    selected branch grouped by block, or block-masked (the default for chunks ending by row 2048)."""
    cfg = NSAConfig(hidden_size=64, num_heads=4, num_kv_heads=1, head_dim=16, v_head_dim=8, window_size=40,
                    query_chunk_size=128, select_dense_rows=dense_rows)
    # five query chunks: three run on their own rows, the last two in a graph loop (both paths, one call)
    assert chunk_buckets(0, 5) == [(0, 1), (1, 2), (2, 3), (3, 5)]
    selected = check_against_reference(Case(cfg, [300, 20, 0, 200], seed=5))
    # a query late in a 300-token segment has 5 blocks: all selected, 11 slots empty
    assert sorted(selected[(299, 0)]) == [0, 1, 2, 3, 4]


def test_graph_mode_with_mindformers_prefix_sums():
    """Compiled, with the prefix sums as a tensor as MindFormers gives them (leading 0, padding); the
    window (40 rows) spans three query chunks (16 rows). Then bad prefix sums, checked in the graph."""
    c = Case(small_config(query_chunk_size=16, window_size=40), [30, 5, 41], seed=6)
    assert chunk_buckets(0, 5) == [(0, 1), (1, 2), (2, 3), (3, 5)]  # chunks on their own rows and a loop
    check_against_reference(c)
    eager = c.run()
    ends = Tensor(np.array([0, 30, 35, 76, 76, 76], np.int32))
    q, k, v, gates = c.tensors()

    def details(q_, g_, e_):
        return c.net.forward_with_details(q_, k, v, g_, e_)

    compiled = ms.jit(details)
    graph = as_numpy(compiled(q, gates, ends))
    assert graph[2] == eager[2]
    assert_close(graph[0], eager[0], rel=1e-6)
    # the same graph refuses prefix sums that decrease (two rows' own ends), naming the value; last,
    # as MindSpore cannot rerun a graph that raised
    with pytest.raises(ValueError, match=r"NativeSparseAttention: 'actual_seq_len' must be non-decreasing .* got 5 at "
                                         r"index 3"):
        compiled(q, gates, Tensor(np.array([0, 30, 38, 5, 38, 38], np.int32)))


@settings(max_examples=examples(8))
@given(st.integers(0, 2 ** 31), st.integers(0, 75))
def test_causality_every_branch(seed, t):
    """Changing every input after row t never changes any branch's output at rows <= t."""
    c = Case(small_config(), [30, 5, 41], seed=seed % 1000)
    rng = np.random.default_rng(seed)
    base = c.run()
    q = c.q.copy()
    q[t + 1:] = random_normal(rng, q[t + 1:].shape)
    kv = {name: (k.copy(), v.copy()) for name, (k, v) in c.kv.items()}
    for k, v in kv.values():
        k[t + 1:] += 3.0
        v[t + 1:] -= 2.0
    gates = c.gates.copy()
    gates[t + 1:] = 1 - gates[t + 1:]
    moved = c.run(q=q, kv=kv, gates=gates)
    for name in BRANCHES:
        np.testing.assert_array_equal(moved[1][name][:t + 1], base[1][name][:t + 1], err_msg=name)
    np.testing.assert_array_equal(moved[0][:t + 1], base[0][:t + 1])


@settings(max_examples=examples(8))
@given(st.integers(0, 2 ** 31), st.integers(0, 2))
def test_segment_isolation(seed, changed):
    """Changing one segment's inputs never changes another segment's outputs."""
    lengths = [30, 5, 41]
    c = Case(small_config(), lengths, seed=seed % 1000)
    base = c.run()
    bounds = np.cumsum([0] + lengths)
    rows = slice(bounds[changed], bounds[changed + 1])
    q = c.q.copy()
    q[rows] *= -1.5
    kv = {name: (k.copy(), v.copy()) for name, (k, v) in c.kv.items()}
    for k, v in kv.values():
        k[rows] += 1.0
        v[rows] *= 2.0
    moved = c.run(q=q, kv=kv)
    others = np.ones(bounds[-1], bool)
    others[rows] = False
    np.testing.assert_array_equal(moved[0][others], base[0][others])


def test_a_key_position_embedding_would_be_inert():
    """Why the key compressor has no position embedding: in the float64 reference, adding one to
    the keys (a per-head constant after the linear compression) changes no output and no selection."""
    c = Case(small_config(), [30, 5, 41], seed=13)
    base_out, base_branches, base_selected, _ = c.reference()
    rng = np.random.default_rng(14)
    c.weights["pe_k"] = random_normal(rng, (c.cfg.compress_block_size, c.cfg.num_kv_heads, c.cfg.head_dim), 3.0)
    out, branches, selected, _ = c.reference()
    assert selected == base_selected
    np.testing.assert_allclose(out, base_out, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(branches["cmp"], base_branches["cmp"], rtol=1e-9, atol=1e-9)
    assert c.net.k_compressor.position_embedding is None and c.net.v_compressor.position_embedding is not None


def test_query_without_visible_window_outputs_zero_with_zero_gradient():
    cfg = small_config()
    c = Case(cfg, [20, 3], seed=7)
    _, branches, _ = c.run()
    early = [0, 1, 6, 20, 21, 22]  # positions < l - 1 = 7 (the 3-token segment has no window at all)
    assert not branches["cmp"][early].any() and branches["cmp"][7].any()
    q, k, v, gates = c.tensors()
    mask = np.zeros(c.q.shape[:1] + (1, 1), np.float32)
    mask[early] = 1.0

    def loss(q_, k0):
        o_cmp = c.net.forward_with_details(q_, (k0,) + k[1:], v, gates, c.prefix)["o_cmp"]
        return (o_cmp * Tensor(mask)).sum()

    dq, dk = ms.grad(loss, grad_position=(0, 1))(q, k[0])
    assert np.isfinite(dq.asnumpy()).all() and not dq.asnumpy().any() and not dk.asnumpy().any()


def test_sliding_window_has_exactly_w_keys():
    cfg = small_config(window_size=3)
    c = Case(cfg, [10, 6], seed=8)
    _, branches, _ = c.run()
    k, v = c.kv["win"]
    for t, first in ((0, 0), (1, 0), (5, 3), (9, 7), (10, 10), (12, 10), (15, 13)):
        for n in range(cfg.num_heads):
            h = n // cfg.group_size
            s = cfg.scale * k[first:t + 1, h].astype(np.float64) @ c.q[t, n]
            p = np.exp(s - s.max())
            expected = (p / p.sum()) @ v[first:t + 1, h]
            np.testing.assert_allclose(branches["win"][t, n], expected, rtol=1e-5, atol=1e-6)


# graph mode in the slow tier: the fast tier's compiled gradients are those of the whole layer
# (test_self_attention.py::test_graph_mode_training_step_reaches_every_parameter)
@pytest.mark.parametrize("mode", ["pynative", pytest.param("graph", marks=pytest.mark.slow)])
def test_gradients_are_finite_and_reach_every_parameter(mode):
    cfg = small_config(query_chunk_size=200)
    c = Case(cfg, [9, 2, 30], seed=9)
    q, k, v, gates = c.tensors()
    net = c.net

    def loss(q_, g_):
        return (net(q_, k, v, g_, c.prefix) ** 2).sum()

    grad_fn = ms.grad(loss, grad_position=(0, 1), weights=net.trainable_params())
    if mode == "graph":
        grad_fn = ms.jit(grad_fn)
    (dq, dg), dparams = grad_fn(q, gates)
    assert np.isfinite(dq.asnumpy()).all() and np.isfinite(dg.asnumpy()).all()
    # a segment's first token attends to itself only (its output does not depend on its query) and
    # has no compressed window (o_cmp = 0): its selected and window gates still receive gradient
    first_rows = [0, 9, 11]
    gate_grads = dg.asnumpy()[first_rows]
    assert np.abs(gate_grads[..., 1:]).min() > 0 and not gate_grads[..., 0].any()
    assert np.abs(dq.asnumpy()[[1, 12]]).min() > 0
    for param, grad in zip(net.trainable_params(), dparams):
        g = grad.asnumpy()
        assert np.isfinite(g).all() and np.abs(g).max() > 1e-3 * max(1.0, np.abs(param.asnumpy()).max()), param.name


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_selected_branch_gradients_same_gathered_and_block_masked(mode):
    """The two formulations of the selected branch (grouped by block, through tile matmuls, row
    permutations and the row softmax; block-masked, through the masked-attention core) give the same
    q/k/v gradients (test_nsa_gradients checks both against the float64 reference)."""
    lengths = [70, 3, 0, 50]
    rng = np.random.default_rng(13)
    target = Tensor(random_normal(rng, (sum(lengths), 4, 8)))
    grads = []
    for dense_rows in (0, 10 ** 6):
        c = Case(small_config(query_chunk_size=40, select_dense_rows=dense_rows), lengths, seed=14)
        q, k, v, gates = c.tensors()
        grad_fn = ms.grad(_independent_kv_loss(c.net, gates, c.prefix, target), grad_position=tuple(range(7)))
        if mode == "graph":
            grad_fn = ms.jit(grad_fn)
        grads.append([g.asnumpy() for g in grad_fn(q, *k, *v)])
    for gathered, masked in zip(*grads):
        assert np.abs(masked).max() > 0
        np.testing.assert_allclose(gathered, masked, rtol=1e-4, atol=1e-5 * np.abs(masked).max())


def _independent_kv_loss(net, gates, prefix, target):
    """``sum(net(q, k, v, gates, prefix) * target)`` as a function of ``q`` and the 3 + 3 K/V tensors."""
    def loss(q_, k_cmp, k_slc, k_win, v_cmp, v_slc, v_win):
        return (net(q_, (k_cmp, k_slc, k_win), (v_cmp, v_slc, v_win), gates, prefix) * target).sum()

    return loss


def test_compressor_weight_gradient_matches_finite_differences():
    """Directional derivative of a loss through the compressed branch w.r.t. the K/V compressor
    weights (selection is piecewise constant; a small step does not change it)."""
    cfg = small_config(query_chunk_size=200)
    c = Case(cfg, [40, 25], seed=10)
    q, k, v, gates = c.tensors()
    net = c.net
    rng = np.random.default_rng(11)
    target = Tensor(random_normal(rng, (65, cfg.num_heads, cfg.v_head_dim)))
    params = [net.k_compressor.weight, net.v_compressor.weight]

    def loss():
        return (net(q, k, v, gates, c.prefix) * target).sum()

    grads = ms.grad(loss, grad_position=None, weights=params)()
    for param, grad in zip(params, grads):
        base = param.asnumpy().copy()
        direction = random_normal(rng, base.shape)
        eps = 1e-3
        param.set_data(Tensor(base + eps * direction))
        plus = float(loss())
        param.set_data(Tensor(base - eps * direction))
        minus = float(loss())
        param.set_data(Tensor(base))
        fd = (plus - minus) / (2 * eps)
        analytic = float((grad.asnumpy() * direction).sum())
        assert abs(fd - analytic) <= 1e-2 * max(1.0, abs(analytic)), (param.name, fd, analytic)


@pytest.mark.parametrize("dtype", [ms.float16, ms.bfloat16])
def test_half_precision_inputs_are_computed_in_float32_and_cast_back(dtype):
    c = Case(small_config(), [20, 17], seed=12)
    q, k, v, gates = c.tensors()
    out = c.net(q.astype(dtype), tuple(x.astype(dtype) for x in k), tuple(x.astype(dtype) for x in v), gates,
                c.prefix)
    assert out.dtype == dtype
    reference = c.run()[0]
    np.testing.assert_allclose(out.astype(ms.float32).asnumpy(), reference, atol=0.05 * np.abs(reference).max())


def test_branch_paths_report():
    """On this machine (no Ascend) every branch is composite, for a tuple or a Tensor layout; the
    routing rules themselves are tested in test_kernel_routing.py."""
    net = Case(small_config(), [5], seed=0).net
    for layout in ((5,), Tensor(np.array([0, 5], np.int32))):
        paths, reasons = net.branch_paths(5, layout)
        assert set(paths.values()) == {"mindspore"} and set(reasons) == set(paths)
