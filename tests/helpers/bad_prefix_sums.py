"""Prefix sums given as a Tensor with bad values, and the check that the NSA core refuses them
(shared by the layer tests and by the MindFormers tests, which run it after MindFormers has set its
strict graph syntax for the whole process)."""

import mindspore as ms
import numpy as np
import pytest

from nsa_layers import NativeSparseAttention, NSAConfig
from nsa_layers.input_checks import checked_prefix_sums

from .common import random_normal, run

CFG = NSAConfig(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=8, window_size=32,
                compress_block_size=8, compress_stride=4, select_block_size=16, select_block_count=4)
T = 40

# (id, prefix sums, the bad value the message names, its index)
BAD = [
    ("above_T", [15, 41], 41, 1),
    ("decreasing", [20, 15, 40], 15, 1),
    ("negative", [-1, 15, 40], -1, 0),
    ("row_local_ends_of_two_rows", [12, 20, 20, 8, 20, 20], 8, 3),
]


def core_inputs(seed=0):
    """Random q, k, v, gates for ``CFG`` and ``T`` tokens."""
    rng = np.random.default_rng(seed)
    shapes = ((T, 4, 16), (T, 2, 16), (T, 2, 8), (T, 4, 3))
    return [ms.Tensor(random_normal(rng, shape)) for shape in shapes]


def assert_check_refuses(mode, ends, value, index):
    """``checked_prefix_sums`` raises ValueError naming the argument, the rule, the bad value and
    its index, and passes valid values through (a leading 0, repeats, padding), flattened. The call
    itself raises, before any output is read: under MindFormers' strict syntax level an ``ops.Assert``
    in a graph only fails at the next read of a tensor (why the earlier Assert check "did not fire"
    in the suite)."""
    def check(actual_seq_len):
        return checked_prefix_sums("Cell", actual_seq_len, T)

    valid = np.array([[0, 15, 15], [33, T, T]], np.int64)
    np.testing.assert_array_equal(run(mode, check, ms.Tensor(valid)).asnumpy(), valid.reshape(-1))
    with pytest.raises(ValueError) as info:
        run(mode, check, ms.Tensor(np.array(ends, np.int32)))
    message = str(info.value)
    for words in ("Cell: 'actual_seq_len'", "non-decreasing", f"values in [0, {T}]", f"got {value} at index {index}"):
        assert words in message, message


def assert_core_refuses(mode, ends, value, index):
    """The core raises ValueError naming the argument, the rule, the bad value and its index."""
    core = NativeSparseAttention(CFG)

    def forward(q, k, v, gates, actual_seq_len):
        return core(q, k, v, gates, actual_seq_len)

    with pytest.raises(ValueError) as info:
        run(mode, forward, *core_inputs(), ms.Tensor(np.array(ends, np.int32)))
    message = str(info.value)
    for words in ("NativeSparseAttention", "'actual_seq_len'", "non-decreasing", f"[0, {T}]",
                  f"got {value} at index {index}"):
        assert words in message, message
