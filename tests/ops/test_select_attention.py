"""nsa_select_attention: values, softmax statistics, masking, gradients and errors of the CPU fallback."""

import mindspore as ms
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import reference as ref
from helpers.common import UNIT_ROUNDOFF, grads, random_normal, run, to_ms, to_np
from helpers.strategies import prefix_sums
from nsa_layers.ops import nsa_select_attention

BLOCK, COUNT = 64, 16  # the only supported values


def _call(scale, qlen, kvlen, causal=False):
    mask = ms.Tensor(np.ones((4, 4), np.bool_)) if causal else None

    def fn(q, k, v, idx):
        return nsa_select_attention(q, k, v, idx, scale, q.shape[1], BLOCK, COUNT, atten_mask=mask,
                                    actual_seq_qlen=qlen, actual_seq_kvlen=kvlen)
    return fn


def _random_indices(rng, qlen, kvlen, n2):
    """Random in-range block indices with duplicates, local to each token's KV segment."""
    rows = []
    for (qs, qe), (ks, ke) in zip(ref.segments(qlen), ref.segments(kvlen)):
        blocks = -(-(ke - ks) // BLOCK)
        rows.append(rng.integers(0, blocks, size=(qe - qs, n2, COUNT)))
    return np.concatenate(rows).astype(np.int32)


def _check(q, k, v, idx, scale, qlen, kvlen, causal, dtype, mode="pynative"):
    out, mx, sm = run(mode, _call(scale, qlen, kvlen, causal), to_ms(q, dtype), to_ms(k, dtype), to_ms(v, dtype),
                      ms.Tensor(idx))
    e_out, e_mx, e_sm = ref.select_attention(q, k, v, idx, scale, BLOCK, qlen, kvlen, causal, dtype)
    assert out.shape == e_out.shape and out.dtype == to_ms(q[:1], dtype).dtype
    assert mx.shape == sm.shape == q.shape[:2] + (8,) and mx.dtype == ms.float32
    u = UNIT_ROUNDOFF[dtype]
    err = np.abs(to_np(out) - e_out)
    assert np.all(err <= 2 * u * np.abs(e_out) + 4 * u * np.abs(v).max() + 1e-6), err.max()
    np.testing.assert_allclose(mx.asnumpy(), np.repeat(e_mx[..., None], 8, -1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sm.asnumpy(), np.repeat(e_sm[..., None], 8, -1), rtol=1e-5)
    return to_np(out)


@st.composite
def _cases(draw):
    batches = draw(st.integers(1, 3))
    q_lengths = draw(st.lists(st.integers(0, 12), min_size=batches, max_size=batches))
    q_lengths[-1] += 1  # the op takes no empty query tensor
    kv_lengths = draw(st.lists(st.integers(1, 200), min_size=batches, max_size=batches))
    n2 = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 4]))
    d1 = draw(st.sampled_from([16, 32]))
    d2 = draw(st.sampled_from([d for d in (16, 32) if d <= d1]))
    causal = draw(st.booleans())
    dtype = draw(st.sampled_from(["float16", "bfloat16"]))
    return q_lengths, kv_lengths, n2, group, d1, d2, causal, dtype, draw(st.integers(0, 2 ** 31))


def _data(case):
    q_lengths, kv_lengths, n2, group, d1, d2, causal, dtype, seed = case
    rng = np.random.default_rng(seed)
    qlen, kvlen = prefix_sums(q_lengths), prefix_sums(kv_lengths)
    q = ref.round_to(random_normal(rng, (qlen[-1], n2 * group, d1)), dtype)
    k = ref.round_to(random_normal(rng, (kvlen[-1], n2, d1)), dtype)
    v = ref.round_to(random_normal(rng, (kvlen[-1], n2, d2)), dtype)
    return q, k, v, _random_indices(rng, qlen, kvlen, n2), d1 ** -0.5, qlen, kvlen, causal, dtype


@given(_cases())
def test_matches_reference_on_random_layouts(case):
    """Zero-length query batches, KV segments not a multiple of the block (partial last block),
    duplicate indices, GQA groups 1/2/4, with and without the causal mask."""
    _check(*_data(case))


def test_matches_reference_under_jit():
    _check(*_data(([5, 0, 9], [130, 64, 70], 2, 2, 32, 16, True, "bfloat16", 3)), mode="graph")


def test_documentation_example():
    rng = np.random.default_rng(13)
    q = to_ms(random_normal(rng, (256, 16, 192)), "float16")
    k = to_ms(random_normal(rng, (1024, 4, 192)), "float16")
    v = to_ms(random_normal(rng, (1024, 4, 128)), "float16")
    fn = _call(192 ** -0.5, [128, 256], [512, 1024])
    ok = ms.Tensor(rng.integers(0, 8, size=(256, 4, 16)).astype(np.int32))
    assert [(o.shape, o.dtype) for o in fn(q, k, v, ok)] == [
        ((256, 16, 128), ms.float16), ((256, 16, 8), ms.float32), ((256, 16, 8), ms.float32)]
    # the page's own indices go up to 15 with 512-token batches (8 blocks): out of range
    page = ms.Tensor(rng.integers(0, 16, size=(256, 4, 16)).astype(np.int32))
    with pytest.raises(RuntimeError):
        fn(q, k, v, page)[0].asnumpy()


def test_out_of_range_index_raises_under_jit():
    rng = np.random.default_rng(14)
    q, k, v = (to_ms(random_normal(rng, s), "float16") for s in ((4, 1, 16), (128, 1, 16), (128, 1, 16)))
    idx = np.zeros((4, 1, 16), np.int32)
    idx[2, 0, 5] = -1
    with pytest.raises(RuntimeError):
        out = run("graph", _call(0.25, (4,), (128,)), q, k, v, ms.Tensor(idx))
        out[0].asnumpy()  # graph execution is asynchronous: the error surfaces when results are read


def test_duplicate_blocks_count_twice():
    """15 slots of block 0 and one of block 1: block 0's keys weigh 15 times in the softmax."""
    rng = np.random.default_rng(15)
    q = ref.round_to(random_normal(rng, (1, 1, 16)), "float16")
    k = ref.round_to(random_normal(rng, (128, 1, 16)), "float16")
    v = ref.round_to(random_normal(rng, (128, 1, 16)), "float16")
    idx = np.zeros((1, 1, 16), np.int32)
    idx[0, 0, 7] = 1
    out = to_np(_call(0.25, (1,), (128,))(to_ms(q, "float16"), to_ms(k, "float16"), to_ms(v, "float16"),
                                           ms.Tensor(idx))[0])
    e = np.exp(0.25 * k[:, 0] @ q[0, 0])
    weight = np.where(np.arange(128) < 64, 15.0, 1.0) * e
    expected = (weight / weight.sum()) @ v[:, 0]
    np.testing.assert_allclose(out[0, 0], expected, rtol=5e-3, atol=5e-3)


def test_fully_masked_row_is_uniform_over_the_gathered_rows():
    """Query 0 of a segment with only a future block selected: every score is -FLT_MAX before the
    scale, so the probabilities are uniform over the 64 gathered rows (the kernel's arithmetic)."""
    rng = np.random.default_rng(18)
    q = to_ms(random_normal(rng, (2, 1, 16)), "float16")
    k = to_ms(random_normal(rng, (128, 1, 16)), "float16")
    v = ref.round_to(random_normal(rng, (128, 1, 16)), "float16")
    idx = np.ones((2, 1, 16), np.int32)
    out, mx, _ = _call(0.25, (2,), (128,), causal=True)(q, k, to_ms(v, "float16"), ms.Tensor(idx))
    uniform = ref.round_to(np.full(64, 1 / 64), "float16")  # 16 copies of each row: still 1/64 each
    np.testing.assert_allclose(to_np(out)[0, 0], uniform @ v[64:, 0] * 1.0, rtol=5e-3, atol=2e-3)
    assert mx.asnumpy()[0, 0, 0] == np.float32(-ref.FLT_MAX * 0.25)


def test_causal_mask_hides_later_positions():
    """With atten_mask present, a query never depends on KV rows after its own local index."""
    q, k, v, idx, scale, qlen, kvlen, _, dtype = _data(([20, 30], [100, 128], 1, 2, 16, 16, True, "float16", 4))
    idx[:] = np.arange(COUNT)[None, None, :] % 2  # blocks 0 and 1 of each segment
    fn = _call(scale, qlen, kvlen, causal=True)
    base = to_np(fn(to_ms(q, dtype), to_ms(k, dtype), to_ms(v, dtype), ms.Tensor(idx))[0])
    local = np.concatenate([np.arange(20), np.arange(30)])
    kv_start = np.repeat([0, 100], [20, 30])
    for t in (0, 5, 19, 20, 37):
        v2, k2 = v.copy(), k.copy()
        later = slice(kv_start[t] + local[t] + 1, kv_start[t] + BLOCK * 2)
        v2[later] += 3.0
        k2[later] -= 2.0
        moved = to_np(fn(to_ms(q, dtype), to_ms(k2, dtype), to_ms(v2, dtype), ms.Tensor(idx))[0])
        np.testing.assert_array_equal(moved[t], base[t])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gradients_match_float64_finite_differences(mode, dtype):
    q, k, v, idx, scale, qlen, kvlen, causal, _ = _data(([3, 4], [70, 64], 1, 2, 16, 16, True, dtype, 5))
    idx[:3] = 0  # batch 0 selects only its first block: rows 64..69 are never read
    rng = np.random.default_rng(16)
    dy = random_normal(rng, (q.shape[0], q.shape[1], v.shape[2]))
    fn = _call(scale, qlen, kvlen, causal)
    dy_ms, idx_ms = ms.Tensor(dy), ms.Tensor(idx)

    def loss(a, b, c):
        return (fn(a, b, c, idx_ms)[0].astype(ms.float32) * dy_ms).sum()

    got = grads(mode, loss, (0, 1, 2), to_ms(q, dtype), to_ms(k, dtype), to_ms(v, dtype))

    def loss64(a, b, c):
        return float((ref.select_attention(a, b, c, idx, scale, BLOCK, qlen, kvlen, causal, "float64")[0] * dy).sum())

    for i, g in enumerate(got):
        direction = random_normal(rng, g.shape)
        fd = ref.directional_derivative(loss64, (q, k, v), i, direction)
        analytic = float((to_np(g) * direction).sum())
        bound = 30 * UNIT_ROUNDOFF[dtype] * np.abs(to_np(g) * direction).sum() + 1e-4
        assert abs(analytic - fd) <= bound, (i, analytic, fd)
    # rows no token selected get exactly zero key/value gradient
    unread = slice(64, 70)
    assert not to_np(got[1])[unread].any() and not to_np(got[2])[unread].any()
    assert to_np(got[2])[:64].any() and to_np(got[2])[70:].any()


def _valid():
    rng = np.random.default_rng(17)
    return dict(query=to_ms(random_normal(rng, (6, 4, 32)), "float16"),
                key=to_ms(random_normal(rng, (128, 2, 32)), "float16"),
                value=to_ms(random_normal(rng, (128, 2, 16)), "float16"),
                topk_indices=ms.Tensor(np.zeros((6, 2, 16), np.int32)), scale_value=0.2, head_num=4,
                select_block_size=64, select_block_count=16, atten_mask=None, actual_seq_qlen=(2, 6),
                actual_seq_kvlen=(64, 128))


def _t(shape, dtype="float16"):
    return to_ms(np.ones(shape, np.float32), dtype)


ERRORS = [
    ("key_not_tensor", dict(key=np.ones((128, 2, 32))), TypeError, "'key'"),
    ("indices_not_tensor", dict(topk_indices=[[0] * 16]), TypeError, "'topk_indices'"),
    ("dtype_not_half", dict(query=_t((6, 4, 32), "float32")), TypeError, "float16 or bfloat16"),
    ("indices_dtype", dict(topk_indices=ms.Tensor(np.zeros((6, 2, 16), np.int64))), TypeError, "int32"),
    ("mask_dtype", dict(atten_mask=_t((6, 128), "float32")), TypeError, "'atten_mask'"),
    ("scale_not_float", dict(scale_value=None), TypeError, "'scale_value'"),
    ("head_num_not_int", dict(head_num="4"), TypeError, "'head_num'"),
    ("block_not_int", dict(select_block_size=64.0), TypeError, "'select_block_size'"),
    ("kvlen_not_ints", dict(actual_seq_kvlen=ms.Tensor([64, 128])), TypeError, "'actual_seq_kvlen'"),
    ("query_rank", dict(query=_t((6, 128))), ValueError, "rank of 'query'"),
    ("dtypes_differ", dict(value=_t((128, 2, 16), "bfloat16")), RuntimeError, "same dtype"),
    ("head_num_mismatch", dict(head_num=2), RuntimeError, "'head_num'"),
    ("dq_ne_dk", dict(key=_t((128, 2, 16))), RuntimeError, "D_q == D_k >= D_v"),
    ("dv_gt_dk", dict(value=_t((128, 2, 48))), RuntimeError, "D_q == D_k >= D_v"),
    ("kv_rows_differ", dict(value=_t((127, 2, 16))), RuntimeError, "'value'"),
    ("heads_not_multiple", dict(key=_t((128, 3, 32)), value=_t((128, 3, 16)),
                                topk_indices=ms.Tensor(np.zeros((6, 3, 16), np.int32))), RuntimeError, "N2=3"),
    ("block_not_64", dict(select_block_size=32), RuntimeError, "must be 64"),
    ("count_not_16", dict(select_block_count=8, topk_indices=ms.Tensor(np.zeros((6, 2, 8), np.int32))),
     RuntimeError, "must be 16"),
    ("indices_shape", dict(topk_indices=ms.Tensor(np.zeros((6, 1, 16), np.int32))), RuntimeError, "(6, 2, 16)"),
    ("mask_rank", dict(atten_mask=ms.Tensor(np.ones((6,), bool))), RuntimeError, "2-D"),
    ("empty_query", dict(query=_t((0, 4, 32)), topk_indices=ms.Tensor(np.zeros((0, 2, 16), np.int32)),
                         actual_seq_qlen=(0, 0)), RuntimeError, "empty tensor"),
    ("qlen_last_not_T1", dict(actual_seq_qlen=(2, 5)), RuntimeError, "T=6"),
    ("kvlen_decreasing", dict(actual_seq_kvlen=(128, 64)), RuntimeError, "non-decreasing"),
    ("kvlen_empty", dict(actual_seq_kvlen=[]), RuntimeError, "empty"),
    ("batch_counts_differ", dict(actual_seq_kvlen=(128,)), RuntimeError, "same number of batches"),
]


@pytest.mark.parametrize("case_id,changes,error,words", ERRORS, ids=[c[0] for c in ERRORS])
def test_argument_errors(case_id, changes, error, words):
    args = _valid()
    args.update(changes)
    keywords = {name: args.pop(name) for name in ("atten_mask", "actual_seq_qlen", "actual_seq_kvlen")}
    with pytest.raises(Exception) as info:
        nsa_select_attention(*args.values(), **keywords)
    assert info.type is error, f"{case_id}: {info.type.__name__}: {info.value}"
    assert words in str(info.value), str(info.value)
