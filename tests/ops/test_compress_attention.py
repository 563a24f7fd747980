"""nsa_compress_attention: values, top-k, softmax statistics, gradients and errors of the CPU fallback."""

import mindspore as ms
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import reference as ref
from helpers.common import UNIT_ROUNDOFF, grads, random_normal, run, to_ms, to_np
from helpers.strategies import prefix_sums
from nsa_layers.ops import nsa_compress_attention
from nsa_layers.ops.compress_attention import kernel_importance_weights

FLT_MAX = ref.FLT_MAX


def _call(scale, block, stride, sel, count, qlen, cmplen, topk_mask=None, atten_mask=None):
    n_sel = [-(-c // (sel // stride)) for c in np.diff((0,) + tuple(cmplen))]
    sellen = tuple(np.cumsum(n_sel).tolist())

    def fn(q, k, v):
        return nsa_compress_attention(q, k, v, scale, q.shape[1], block, stride, sel, count, topk_mask=topk_mask,
                                      atten_mask=atten_mask, actual_seq_qlen=qlen, actual_cmp_seq_kvlen=cmplen,
                                      actual_sel_seq_kvlen=sellen)
    return fn


def _expected_stats(per_batch, t1, n1):
    """Per-batch ``(N1, S1)`` arrays -> the kernel layout: ``(N1, S1, 8)`` blocks concatenated, as (T1, N1, 8)."""
    flat = np.concatenate([np.repeat(b[..., None], 8, axis=-1).reshape(-1) for b in per_batch] + [np.zeros(0)])
    flat = np.concatenate([flat, np.zeros(t1 * n1 * 8 - flat.size)])
    return flat.reshape(t1, n1, 8)


def _assert_topk_equivalent(actual, expected, q, k, scale, block, stride, sel, qlen, cmplen, atten_mask, topk_mask):
    """Same indices, or (for near-ties between float32 and float64) the same float64 scores."""
    if np.array_equal(actual, expected):
        return
    # recompute float64 importance per batch and compare the scores of the two selections
    n1, n2 = q.shape[1], k.shape[1]
    for (qs, qe), (ks, ke) in zip(ref.segments(qlen), ref.segments(cmplen)):
        s1, s2 = qe - qs, ke - ks
        imp = 0.0
        for h in range(n1):
            s = scale * q[qs:qe, h].astype(np.float64) @ k[ks:ke, h // (n1 // n2)].astype(np.float64).T
            if atten_mask is not None:
                s = np.where(atten_mask[:s1, :s2], -FLT_MAX, s)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            one = np.zeros((n2,) + p.shape[:1] + (-(-s2 // (sel // stride)),))
            one[h // (n1 // n2)] = ref.kernel_importance(p, block, stride, sel)
            imp = imp + one
        if topk_mask is not None:
            imp = np.where(topk_mask[None, :s1, :imp.shape[-1]], FLT_MAX, imp)
        got = np.take_along_axis(imp, actual[qs:qe].transpose(1, 0, 2), -1)
        want = np.take_along_axis(imp, expected[qs:qe].transpose(1, 0, 2), -1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def _nsa_masks(max_q, max_cmp, block, stride, sel, rng):
    """The masks an NSA layer builds: compressed window i visible to local query t iff
    i*stride + block - 1 <= t; force the first block and the query's own block."""
    t = np.arange(max_q)[:, None]
    atten = ~(np.arange(max_cmp)[None, :] * stride + block - 1 <= t)
    n_sel = -(-max_cmp // (sel // stride))
    topk = np.zeros((max_q, n_sel), bool)
    topk[:, 0] = True
    own = np.minimum(np.arange(max_q) // sel, n_sel - 1)
    topk[np.arange(max_q), own] = True
    if rng.random() < 0.3:
        atten = rng.random(atten.shape) < 0.3  # arbitrary mask, not causal
    return atten, topk


@st.composite
def _cases(draw):
    block, stride, sel = draw(st.sampled_from([(32, 16, 64), (16, 16, 32), (32, 32, 64), (48, 16, 96), (64, 16, 64)]))
    ratio = sel // stride
    batches = draw(st.integers(1, 3))
    cmp_lengths = draw(st.lists(st.integers(1, 3 * ratio), min_size=batches, max_size=batches))
    q_lengths = draw(st.lists(st.integers(0, 20), min_size=batches, max_size=batches))
    q_lengths[0] += 1  # the op takes no empty query tensor
    count = draw(st.integers(1, min(-(-c // ratio) for c in cmp_lengths)))
    n2 = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 4]))
    d1 = draw(st.sampled_from([16, 32]))
    d2 = draw(st.sampled_from([d for d in (16, 32) if d <= d1]))
    masks = draw(st.sampled_from(["none", "nsa"]))
    dtype = draw(st.sampled_from(["float16", "bfloat16"]))
    extra_rows = draw(st.sampled_from([0, 0, 3]))
    seed = draw(st.integers(0, 2 ** 31))
    return block, stride, sel, cmp_lengths, q_lengths, count, n2, group, d1, d2, masks, dtype, extra_rows, seed


def _check_case(case, mode="pynative"):
    block, stride, sel, cmp_lengths, q_lengths, count, n2, group, d1, d2, masks, dtype, extra_rows, seed = case
    rng = np.random.default_rng(seed)
    qlen, cmplen = prefix_sums(q_lengths), prefix_sums(cmp_lengths)
    t1, t2, n1 = qlen[-1] + extra_rows, cmplen[-1], n2 * group
    q = ref.round_to(random_normal(rng, (t1, n1, d1)), dtype)
    k = ref.round_to(random_normal(rng, (t2, n2, d1)), dtype)
    v = ref.round_to(random_normal(rng, (t2, n2, d2)), dtype)
    atten = topk = None
    if masks == "nsa":
        atten, topk = _nsa_masks(max(max(q_lengths), 1), max(cmp_lengths), block, stride, sel, rng)
    scale = d1 ** -0.5
    fn = _call(scale, block, stride, sel, count, qlen, cmplen,
               None if topk is None else ms.Tensor(topk), None if atten is None else ms.Tensor(atten))
    out, top, mx, sm = run(mode, fn, to_ms(q, dtype), to_ms(k, dtype), to_ms(v, dtype))
    e_out, e_top, e_mx, e_sm = ref.compress_attention(q, k, v, scale, block, stride, sel, count, qlen, cmplen,
                                                      atten, topk, dtype)
    assert out.shape == (t1, n1, d2) and out.dtype == to_ms(q[:1], dtype).dtype
    assert top.shape == (t1, n2, count) and top.dtype == ms.int32
    assert mx.shape == sm.shape == (t1, n1, 8) and mx.dtype == sm.dtype == ms.float32
    # probabilities are rounded to the input dtype before the product: allow that rounding too
    u = UNIT_ROUNDOFF[dtype]
    err = np.abs(to_np(out) - e_out)
    assert np.all(err <= 2 * u * np.abs(e_out) + 4 * u * np.abs(v).max() + 1e-6), err.max()
    _assert_topk_equivalent(top.asnumpy()[:qlen[-1]], e_top[:qlen[-1]], q, k, scale, block, stride, sel, qlen, cmplen,
                            atten, topk)
    assert not top.asnumpy()[qlen[-1]:].any() and not to_np(out)[qlen[-1]:].any()
    np.testing.assert_allclose(mx.asnumpy(), _expected_stats(e_mx, t1, n1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sm.asnumpy(), _expected_stats(e_sm, t1, n1), rtol=1e-5)


@given(_cases())
def test_matches_reference_on_random_layouts(case):
    _check_case(case)


def test_matches_reference_under_jit():
    rng = np.random.default_rng(7)
    for block, stride, sel, groups in ((32, 16, 64, 2), (16, 16, 32, 4)):
        case = (block, stride, sel, [7, 12], [5, 0], 2, 2, groups, 32, 16, "nsa", "bfloat16", 2, int(rng.integers(1e9)))
        _check_case(case, mode="graph")


def test_documentation_example_shapes():
    rng = np.random.default_rng(8)
    t, n, d = 256, 8, 128
    q = to_ms(random_normal(rng, (t, n, d)), "float16")
    k = to_ms(random_normal(rng, (t, n, d)), "float16")
    ones = ms.Tensor(np.ones((t, t), np.bool_))
    outs = nsa_compress_attention(q, k, k, d ** -0.5, n, 32, 16, 64, 16, topk_mask=ones, atten_mask=ones,
                                  actual_seq_qlen=[t], actual_cmp_seq_kvlen=[t], actual_sel_seq_kvlen=[t])
    assert [(o.shape, o.dtype) for o in outs] == [
        ((256, 8, 128), ms.float16), ((256, 8, 16), ms.int32), ((256, 8, 8), ms.float32), ((256, 8, 8), ms.float32)]
    # every block forced, every score tied: the first 16 blocks, in index order
    assert np.array_equal(outs[1].asnumpy(), np.broadcast_to(np.arange(16), (256, 8, 16)))


def test_importance_weights_pinned_by_hand():
    """Block 32, stride 16, selection 64 (m=4, n=2), 12 compressed windows (documented case):
    block 0 <- windows 0..4 weighted (1,2,2,2,1); block 1 <- windows 4..8; block 2 <- windows 8..11
    (window 12 does not exist). The kernel's window is one later than the exact token overlap."""
    w = kernel_importance_weights(12, 32, 16, 64)
    expected = np.zeros((12, 3))
    expected[0:5, 0] = [1, 2, 2, 2, 1]
    expected[4:9, 1] = [1, 2, 2, 2, 1]
    expected[8:12, 2] = [1, 2, 2, 2]
    np.testing.assert_array_equal(w, expected)


def test_top_k_ties_go_to_the_lower_index_and_forced_blocks_win():
    """Identical keys give uniform probabilities; with 12 windows the block scores are
    (8, 8, 7)/12 * G: blocks 0 and 1 tie. Forcing block 2 puts it first."""
    rng = np.random.default_rng(9)
    k_row = random_normal(rng, (1, 1, 16))
    k = to_ms(np.repeat(k_row, 12, axis=0), "float16")
    q = to_ms(random_normal(rng, (4, 2, 16)), "float16")
    v = to_ms(random_normal(rng, (12, 1, 16)), "float16")
    top = _call(0.25, 32, 16, 64, 3, (4,), (12,))(q, k, v)[1].asnumpy()
    assert np.array_equal(top, np.broadcast_to([0, 1, 2], (4, 1, 3)))
    force = np.zeros((4, 3), bool)
    force[:, 2] = True
    force[1, 1] = True
    top = _call(0.25, 32, 16, 64, 3, (4,), (12,), topk_mask=ms.Tensor(force))(q, k, v)[1].asnumpy()
    assert np.array_equal(top[:, 0], [[2, 0, 1], [1, 2, 0], [2, 0, 1], [2, 0, 1]])


def test_fully_masked_row_is_uniform_over_the_batch_keys():
    rng = np.random.default_rng(10)
    q = to_ms(random_normal(rng, (3, 1, 16)), "float16")
    k = to_ms(random_normal(rng, (5, 1, 16)), "float16")
    v_np = ref.round_to(random_normal(rng, (5, 1, 16)), "float16")
    mask = np.zeros((3, 5), bool)
    mask[1] = True
    out, _, mx, _ = _call(0.25, 16, 16, 16, 1, (3,), (5,), atten_mask=ms.Tensor(mask))(q, k, to_ms(v_np, "float16"))
    p = ref.round_to(np.full(5, 0.2), "float16")
    np.testing.assert_allclose(to_np(out)[1, 0], p @ v_np[:, 0], rtol=2e-3, atol=1e-3)
    # softmax_max of batch 0 is an (N1, S1, 8) block
    assert mx.asnumpy().reshape(1, 3, 8)[0, 1, 0] == -FLT_MAX and np.isfinite(to_np(out)).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gradients_match_float64_finite_differences(mode, dtype):
    """dq, dk, dv through attention_out (masked softmax backward) along random directions, against
    central differences of the float64 reference without probability rounding."""
    rng = np.random.default_rng(11)
    block, stride, sel, qlen, cmplen = 32, 16, 64, (6, 6, 15), (5, 9, 14)
    n2, group, d1, d2 = 1, 2, 16, 16
    q = ref.round_to(random_normal(rng, (15, n2 * group, d1)), dtype)
    k = ref.round_to(random_normal(rng, (14, n2, d1)), dtype)
    v = ref.round_to(random_normal(rng, (14, n2, d2)), dtype)
    dy = random_normal(rng, (15, n2 * group, d2))
    atten, topk = _nsa_masks(9, 5, block, stride, sel, np.random.default_rng(0))
    fn = _call(0.3, block, stride, sel, 1, qlen, cmplen, ms.Tensor(topk), ms.Tensor(atten))
    dy_ms = ms.Tensor(dy)

    def loss(a, b, c):
        return (fn(a, b, c)[0].astype(ms.float32) * dy_ms).sum()

    got = grads(mode, loss, (0, 1, 2), to_ms(q, dtype), to_ms(k, dtype), to_ms(v, dtype))

    def loss64(a, b, c):
        out = ref.compress_attention(a, b, c, 0.3, block, stride, sel, 1, qlen, cmplen, atten, topk, "float64")[0]
        return float((out * dy).sum())

    for i, g in enumerate(got):
        direction = random_normal(rng, g.shape)
        fd = ref.directional_derivative(loss64, (q, k, v), i, direction)
        analytic = float((to_np(g) * direction).sum())
        bound = 30 * UNIT_ROUNDOFF[dtype] * np.abs(to_np(g) * direction).sum() + 1e-4
        assert abs(analytic - fd) <= bound, (i, analytic, fd)


def _valid():
    rng = np.random.default_rng(12)
    return dict(query=to_ms(random_normal(rng, (8, 4, 32)), "float16"),
                key=to_ms(random_normal(rng, (12, 2, 32)), "float16"),
                value=to_ms(random_normal(rng, (12, 2, 16)), "float16"), scale_value=0.2, head_num=4,
                compress_block_size=32, compress_stride=16, select_block_size=64, select_block_count=2,
                topk_mask=None, atten_mask=None, actual_seq_qlen=(3, 8), actual_cmp_seq_kvlen=(5, 12),
                actual_sel_seq_kvlen=(2, 4))


def _t(shape, dtype="float16"):
    return to_ms(np.ones(shape, np.float32), dtype)


ERRORS = [
    ("query_not_tensor", dict(query=np.ones((8, 4, 32))), TypeError, "'query'"),
    ("mask_not_tensor", dict(atten_mask=np.ones((8, 12), bool)), TypeError, "'atten_mask'"),
    ("dtype_mismatch", dict(value=_t((12, 2, 16), "bfloat16")), TypeError, "same dtype"),
    ("dtype_not_half", dict(query=_t((8, 4, 32), "float32"), key=_t((12, 2, 32), "float32"),
                            value=_t((12, 2, 16), "float32")), TypeError, "float16 or bfloat16"),
    ("mask_dtype", dict(topk_mask=_t((8, 3), "float32")), TypeError, "'topk_mask'"),
    ("scale_not_float", dict(scale_value="0.2"), TypeError, "'scale_value'"),
    ("head_num_not_int", dict(head_num=4.0), TypeError, "'head_num'"),
    ("count_not_int", dict(select_block_count=True), TypeError, "'select_block_count'"),
    ("qlen_not_ints", dict(actual_seq_qlen=(3.0, 8)), TypeError, "'actual_seq_qlen'"),
    ("sellen_not_ints", dict(actual_sel_seq_kvlen="2,4"), TypeError, "'actual_sel_seq_kvlen'"),
    ("empty_query", dict(query=_t((0, 4, 32)), actual_seq_qlen=(0, 0)), ValueError, "empty tensor"),
    ("query_rank", dict(query=_t((8, 128))), ValueError, "rank of 'query'"),
    ("head_num_mismatch", dict(head_num=2), ValueError, "'head_num'"),
    ("head_num_zero", dict(head_num=0), ValueError, "'head_num'"),
    ("kv_rows_differ", dict(value=_t((11, 2, 16))), ValueError, "'value'"),
    ("dq_ne_dk", dict(key=_t((12, 2, 16))), ValueError, "D1=32"),
    ("dv_gt_dk", dict(value=_t((12, 2, 48))), ValueError, "D2=48"),
    ("d_not_multiple_of_16", dict(value=_t((12, 2, 8))), ValueError, "multiple of 16"),
    ("heads_not_multiple", dict(key=_t((12, 3, 32)), value=_t((12, 3, 16))), ValueError, "N2=3"),
    ("block_not_16", dict(compress_block_size=40), ValueError, "'compress_block_size'"),
    ("block_too_big", dict(compress_block_size=144, select_block_size=144), ValueError, "'compress_block_size'"),
    ("stride_too_big", dict(compress_stride=80, compress_block_size=80, select_block_size=80), ValueError,
     "'compress_stride'"),
    ("block_below_stride", dict(compress_block_size=16, compress_stride=32), ValueError, "'compress_block_size' (16)"),
    ("select_below_block", dict(select_block_size=16, compress_block_size=32), ValueError, "'select_block_size' (16)"),
    ("select_not_multiple_of_stride", dict(compress_stride=32, compress_block_size=32, select_block_size=48),
     ValueError, "multiple of 'compress_stride'"),
    ("count_zero", dict(select_block_count=0), ValueError, "'select_block_count'"),
    ("count_above_blocks", dict(select_block_count=3), ValueError, "ceil(S2 / 4)"),
    ("qlen_decreasing", dict(actual_seq_qlen=(5, 3)), ValueError, "non-decreasing"),
    ("qlen_beyond_T1", dict(actual_seq_qlen=(3, 9)), ValueError, "T=8"),
    ("batch_counts_differ", dict(actual_seq_qlen=(8,)), ValueError, "same number of batches"),
    ("empty_cmp_batch", dict(actual_cmp_seq_kvlen=(0, 12)), ValueError, "[1, 14000]"),
    ("atten_mask_too_small", dict(atten_mask=ms.Tensor(np.zeros((5, 6), bool))), ValueError, "'atten_mask'"),
]


@pytest.mark.parametrize("case_id,changes,error,words", ERRORS, ids=[c[0] for c in ERRORS])
def test_argument_errors(case_id, changes, error, words):
    args = _valid()
    args.update(changes)
    keywords = {name: args.pop(name) for name in ("topk_mask", "atten_mask", "actual_seq_qlen",
                                                   "actual_cmp_seq_kvlen", "actual_sel_seq_kvlen")}
    with pytest.raises(Exception) as info:
        nsa_compress_attention(*args.values(), **keywords)
    assert info.type is error, f"{case_id}: {info.type.__name__}: {info.value}"
    assert words in str(info.value), str(info.value)
