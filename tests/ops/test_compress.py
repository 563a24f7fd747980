"""nsa_compress: values, shapes, dtypes and gradients of the CPU fallback against float64 NumPy."""

import mindspore as ms
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import reference as ref
from helpers.common import assert_rounded_close, grads, random_normal, run, to_ms, to_np
from helpers.strategies import prefix_sums, segment_lengths
from nsa_layers.ops import nsa_compress
from nsa_layers.ops.compress import compress_windows


def _compress(block, stride, prefix):
    def fn(a, b):
        return nsa_compress(a, b, block, stride, actual_seq_len=prefix)
    return fn


def test_documentation_example_shape_and_values():
    rng = np.random.default_rng(0)
    n, d, block, stride = 8, 128, 64, 16
    prefix = tuple(np.cumsum([80, 96, 80]).tolist())
    x = random_normal(rng, (256, n, d))
    w = random_normal(rng, (block, n))
    y = nsa_compress(to_ms(x, "float16"), to_ms(w, "float16"), block, stride, actual_seq_len=prefix)
    assert y.shape == (7, 8, 128)
    assert y.dtype == ms.float16
    expected = ref.compress(ref.round_to(x, "float16"), ref.round_to(w, "float16"), prefix, block, stride)
    assert_rounded_close(to_np(y), expected, "float16")


@st.composite
def _cases(draw):
    block = draw(st.sampled_from([16, 32, 48, 64]))
    stride = draw(st.sampled_from([s for s in (16, 32, 48, 64) if s <= block]))
    lengths = draw(segment_lengths(max_segments=5, max_len=3 * block))
    heads = draw(st.integers(1, 4))
    dim = draw(st.sampled_from([16, 32]))
    dtype = draw(st.sampled_from(["float16", "bfloat16"]))
    seed = draw(st.integers(0, 2 ** 31))
    return block, stride, lengths, heads, dim, dtype, seed


@given(_cases())
def test_matches_reference_on_random_layouts(case):
    block, stride, lengths, heads, dim, dtype, seed = case
    rng = np.random.default_rng(seed)
    prefix = prefix_sums(lengths)
    x = ref.round_to(random_normal(rng, (prefix[-1], heads, dim)), dtype)
    w = ref.round_to(random_normal(rng, (block, heads)), dtype)
    y = nsa_compress(to_ms(x, dtype), to_ms(w, dtype), block, stride, actual_seq_len=prefix)
    expected = ref.compress(x, w, prefix, block, stride)
    expected_rows = sum(max(0, 1 + (n - block) // stride) for n in lengths)
    assert y.shape == (expected_rows, heads, dim)
    assert y.dtype == to_ms(x[:1], dtype).dtype
    assert_rounded_close(to_np(y), expected, dtype)


# zero-length segments, a segment shorter than the block, one exactly a block, unaligned starts
LAYOUTS = [
    ((7, 7, 40, 40, 137), 32, 16),
    ((20, 52, 52, 100), 32, 32),
    ((64, 65, 200), 48, 16),
]


@pytest.mark.parametrize("prefix,block,stride", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_values_and_gradients_both_modes(mode, prefix, block, stride, dtype):
    rng = np.random.default_rng(1)
    heads, dim = 3, 16
    x = ref.round_to(random_normal(rng, (prefix[-1], heads, dim)), dtype)
    w = ref.round_to(random_normal(rng, (block, heads)), dtype)
    fn = _compress(block, stride, prefix)
    y = run(mode, fn, to_ms(x, dtype), to_ms(w, dtype))
    expected = ref.compress(x, w, prefix, block, stride)
    assert_rounded_close(to_np(y), expected, dtype)

    dy = ref.round_to(random_normal(rng, expected.shape), dtype)
    dy_ms = to_ms(dy, dtype)

    def loss(a, b):
        return (fn(a, b).astype(ms.float32) * dy_ms.astype(ms.float32)).sum()

    dx, dw = grads(mode, loss, (0, 1), to_ms(x, dtype), to_ms(w, dtype))
    assert dx.dtype == to_ms(x[:1], dtype).dtype and dw.dtype == dx.dtype
    dx_ref, dw_ref = ref.compress_grads(x, w, dy, prefix, block, stride)
    assert_rounded_close(to_np(dx), dx_ref, dtype)
    assert_rounded_close(to_np(dw), dw_ref, dtype, floor=1e-5)
    # rows read by no window (short segments, segment tails) get exactly zero gradient
    unread = np.all(dx_ref == 0, axis=(1, 2))
    assert unread.any()
    assert np.all(to_np(dx)[unread] == 0)


def test_single_rounding_of_a_float32_accumulation():
    """A long window (128 rows) of float16 data: float32 accumulation and one final rounding give
    the correctly rounded result almost everywhere and never more than one ulp away; accumulating
    in float16 would be off by several ulps."""
    rng = np.random.default_rng(2)
    block, stride, prefix = 128, 16, (512,)
    x = ref.round_to(random_normal(rng, (512, 4, 64)), "float16")
    w = ref.round_to(random_normal(rng, (block, 4)), "float16")
    y = to_np(nsa_compress(to_ms(x, "float16"), to_ms(w, "float16"), block, stride, actual_seq_len=prefix))
    exact = ref.compress(x, w, prefix, block, stride)
    rounded = ref.round_to(exact, "float16")
    assert np.mean(y == rounded) > 0.99
    ulp = np.spacing(np.abs(rounded).astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(y - rounded) <= ulp)


def test_no_window_gives_empty_output_and_zero_gradients(mode):
    rng = np.random.default_rng(3)
    prefix, block, stride = (10, 25, 25, 40), 16, 16  # every segment shorter than the block
    x = to_ms(random_normal(rng, (40, 2, 32)), "bfloat16")
    w = to_ms(random_normal(rng, (block, 2)), "bfloat16")
    fn = _compress(block, stride, prefix)
    y = run(mode, fn, x, w)
    assert y.shape == (0, 2, 32) and y.dtype == ms.bfloat16

    def loss(a, b):
        return fn(a, b).astype(ms.float32).sum()

    dx, dw = grads(mode, loss, (0, 1), x, w)
    assert dx.shape == x.shape and dw.shape == w.shape
    assert not to_np(dx).any() and not to_np(dw).any()


@pytest.mark.parametrize("block,stride", [(32, 16), (32, 32), (48, 16)])
def test_gradients_match_finite_differences(mode, block, stride):
    """The float32 core: directional derivatives of a random scalar loss by central differences.
    The op is linear in each argument, so the difference quotient is exact up to float32 rounding."""
    rng = np.random.default_rng(4)
    prefix = (5, 70, 70, 129)
    x = random_normal(rng, (129, 2, 16))
    w = random_normal(rng, (block, 2))
    rows = len(ref.compress(x, w, prefix, block, stride))
    dy = random_normal(rng, (rows, 2, 16))

    def loss(a, b):
        return (compress_windows(a, b, block, stride, prefix) * ms.Tensor(dy)).sum()

    dx, dw = grads(mode, loss, (0, 1), ms.Tensor(x), ms.Tensor(w))
    for arg, grad in ((0, dx), (1, dw)):
        base = [x, w]
        v = random_normal(rng, base[arg].shape)
        eps = 1e-2
        plus, minus = list(base), list(base)
        plus[arg] = base[arg] + eps * v
        minus[arg] = base[arg] - eps * v
        fd = (float(loss(*map(ms.Tensor, plus))) - float(loss(*map(ms.Tensor, minus)))) / (2 * eps)
        analytic = float((grad.asnumpy().astype(np.float64) * v).sum())
        assert abs(fd - analytic) <= 2e-3 * max(1.0, abs(analytic)), (arg, fd, analytic)


def test_float32_core_matches_reference_to_float32_precision():
    rng = np.random.default_rng(5)
    prefix, block, stride = (33, 33, 150), 32, 16
    x = random_normal(rng, (150, 3, 16))
    w = random_normal(rng, (block, 3))
    y = compress_windows(ms.Tensor(x), ms.Tensor(w), block, stride, prefix)
    assert y.dtype == ms.float32
    assert_rounded_close(y.asnumpy(), ref.compress(x, w, prefix, block, stride), "float32", slack=64)

