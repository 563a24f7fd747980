"""Helpers shared by the tests: execution modes, random data, dtype conversions, tolerances."""

import mindspore as ms
import numpy as np


def run(mode, fn, *args):
    """Call ``fn(*args)`` eagerly, or compiled by ``mindspore.jit`` when ``mode == "graph"``."""
    return ms.jit(fn)(*args) if mode == "graph" else fn(*args)


def grads(mode, loss, positions, *args):
    """Gradients of scalar ``loss`` with respect to the arguments at ``positions``."""
    return run(mode, ms.grad(loss, grad_position=positions), *args)


def random_normal(rng, shape, scale=1.0):
    """Random normal float32 data (never zeros)."""
    return (scale * rng.standard_normal(shape)).astype(np.float32)


MS_DTYPES = {"float16": ms.float16, "bfloat16": ms.bfloat16, "float32": ms.float32}


def to_ms(array, dtype_name):
    """NumPy float array -> MindSpore tensor of the named dtype."""
    return ms.Tensor(np.asarray(array, np.float32)).astype(MS_DTYPES[dtype_name])


def to_np(tensor):
    """MindSpore tensor (any float dtype) -> float64 NumPy array."""
    return tensor.astype(ms.float32).asnumpy().astype(np.float64)


# One rounding of float32 results to the output dtype: the unit roundoff of each dtype.
UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float32": 2.0 ** -24}


def assert_rounded_close(actual, expected, dtype_name, slack=2.0, floor=1e-6):
    """``|actual - expected| <= slack * u * |expected| + floor * max|expected|`` elementwise, where
    ``u`` is the unit roundoff of ``dtype_name``: what float32 accumulation plus one final rounding
    allows (``slack`` covers the float32 part)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.size == 0:
        return
    scale = np.abs(expected).max()
    bound = slack * UNIT_ROUNDOFF[dtype_name] * np.abs(expected) + floor * scale + 1e-30
    err = np.abs(actual - expected)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), (
        f"max error {err[worst]:.3g} at {worst} > bound {bound[worst]:.3g} (expected {expected[worst]:.6g})")


def examples(count):
    """A hypothesis budget for tests whose examples are each slow: ``count`` at the full tier's 20
    examples per test, scaled with the tier's budget (``conftest``), at least 2."""
    from hypothesis import settings  # pylint: disable=import-outside-toplevel
    return max(2, count * settings.default.max_examples // 20)
