"""The layers reject bad input tensors before any work, in both modes, with the MindSpore exception
type and a message that names the cell, the argument, the value and the rule."""

import mindspore as ms
import numpy as np
import pytest

from helpers.bad_prefix_sums import BAD, assert_check_refuses, assert_core_refuses, core_inputs
from helpers.common import run
from nsa_layers import NativeSparseAttention, NSAConfig, NSASelfAttention

CFG = NSAConfig(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=8, window_size=32,
                compress_block_size=8, compress_stride=4, select_block_size=16, select_block_count=4)
T = 40


def _x(shape, dtype=ms.float32):
    return ms.Tensor(np.random.default_rng(0).standard_normal(shape).astype(np.float32)).astype(dtype)


def _core_inputs(**changes):
    inputs = dict(q=_x((T, 4, 16)), k=_x((T, 2, 16)), v=_x((T, 2, 8)), gates=_x((T, 4, 3)))
    inputs.update(changes)
    return inputs


# (id, changes to valid core inputs, exception type, substrings of the message)
CORE_CASES = [
    ("q_not_tensor", dict(q=np.zeros((T, 4, 16), np.float32)), TypeError, ["'q'", "Tensor", "ndarray"]),
    ("q_int", dict(q=_x((T, 4, 16), ms.int32)), TypeError, ["'q'", "float16, bfloat16, float32 or float64", "Int32"]),
    ("q_rank", dict(q=_x((T, 64))), ValueError, ["'q'", "(T, num_heads=4, head_dim=16)", "rank 2"]),
    ("q_heads", dict(q=_x((T, 2, 16))), ValueError, ["'q'", "num_heads=4", "(40, 2, 16)", "num_heads is 2"]),
    ("q_dim", dict(q=_x((T, 4, 8))), ValueError, ["'q'", "head_dim=16", "head_dim is 8"]),
    ("k_rows", dict(k=_x((T - 1, 2, 16))), ValueError, ["'k'", "T=40", "(39, 2, 16)", "T is 39"]),
    ("k_heads", dict(k=_x((T, 4, 16))), ValueError, ["'k'", "num_kv_heads=2", "num_kv_heads is 4"]),
    ("v_dim", dict(v=_x((T, 2, 16))), ValueError, ["'v'", "v_head_dim=8", "v_head_dim is 16"]),
    ("v_dtype", dict(v=_x((T, 2, 8), ms.int64)), TypeError, ["'v'", "Int64"]),
    ("gates_branches", dict(gates=_x((T, 4, 2))), ValueError, ["'gates'", "branches=3", "branches is 2"]),
    ("gates_rows", dict(gates=_x((T + 1, 4, 3))), ValueError, ["'gates'", "T=40", "T is 41"]),
    ("kv_tuple_and_tensor", dict(k=(_x((T, 2, 16)),) * 3), TypeError, ["'k' and 'v'", "a tuple and a Tensor"]),
    ("kv_tuples_of_two", dict(k=(_x((T, 2, 16)),) * 2, v=(_x((T, 2, 8)),) * 2), ValueError,
     ["3 tensors each", "got 2 and 2"]),
    ("kv_tuple_member", dict(k=(_x((T, 2, 16)), _x((T, 2, 8)), _x((T, 2, 16))), v=(_x((T, 2, 8)),) * 3),
     ValueError, ["'k[1] (selected)'", "head_dim=16", "head_dim is 8"]),
]


@pytest.mark.parametrize("changes, error, words", [c[1:] for c in CORE_CASES], ids=[c[0] for c in CORE_CASES])
def test_core_rejects_bad_inputs(mode, changes, error, words):
    core = NativeSparseAttention(CFG)
    inputs = _core_inputs(**changes)

    def forward(q, k, v, gates):
        return core(q, k, v, gates, (15, T))

    with pytest.raises(error) as info:
        run(mode, forward, inputs["q"], inputs["k"], inputs["v"], inputs["gates"])
    message = str(info.value)
    assert "NativeSparseAttention" in message and all(w in message for w in words), message


# (id, hidden_states, position_ids, exception type, substrings of the message)
SELF_CASES = [
    ("hidden_size", _x((T, 32)), None, ValueError, ["'hidden_states'", "hidden_size=64", "hidden_size is 32"]),
    ("hidden_rank", _x((2, T, 64)), None, ValueError, ["'hidden_states'", "(T, hidden_size=64)", "rank 3"]),
    ("hidden_int", _x((T, 64), ms.int32), None, TypeError, ["'hidden_states'", "Int32"]),
    ("positions_float", _x((T, 64)), _x((T,)), TypeError, ["'position_ids'", "int32 or int64", "Float32"]),
    ("positions_count", _x((T, 64)), ms.Tensor(np.arange(T - 1), ms.int32), ValueError,
     ["'position_ids'", "T=40", "(39,)"]),
]


@pytest.mark.parametrize("hidden, positions, error, words", [c[1:] for c in SELF_CASES],
                         ids=[c[0] for c in SELF_CASES])
def test_self_attention_rejects_bad_inputs(mode, hidden, positions, error, words):
    layer = NSASelfAttention(CFG)

    def forward(x):
        return layer(x, actual_seq_len=(15, x.shape[0]), position_ids=positions)

    with pytest.raises(error) as info:
        run(mode, forward, hidden)
    message = str(info.value)
    assert "NSASelfAttention" in message and all(w in message for w in words), message


@pytest.mark.parametrize("mode", ["pynative", pytest.param("graph", marks=pytest.mark.slow)])
def test_valid_inputs_pass_the_checks(mode):
    core = NativeSparseAttention(CFG)
    inputs = _core_inputs()
    tuples = dict(k=(inputs["k"],) * 3, v=(inputs["v"],) * 3)

    def forward(q, k, v, gates):
        return core(q, k, v, gates, (15, T))

    assert run(mode, forward, inputs["q"], inputs["k"], inputs["v"], inputs["gates"]).shape == (T, 4, 8)
    assert run(mode, forward, inputs["q"], tuples["k"], tuples["v"], inputs["gates"]).shape == (T, 4, 8)
    layer = NSASelfAttention(CFG)
    positions = ms.Tensor(np.arange(T), ms.int64)

    def self_forward(x):
        return layer(x, actual_seq_len=None, position_ids=positions)

    assert run(mode, self_forward, _x((T, 64), ms.float16)).shape == (T, 64)


@pytest.mark.parametrize("mode", ["pynative", pytest.param("graph", marks=pytest.mark.slow)])
@pytest.mark.parametrize("ends, value, index", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_tensor_prefix_sums_are_refused_by_value(mode, ends, value, index):
    """The check itself, on each kind of bad value (graph data: checked when the graph runs; a
    failing graph takes MindSpore about 3 s, so the graph sweep is slow)."""
    assert_check_refuses(mode, ends, value, index)


@pytest.mark.parametrize("mode", ["pynative", pytest.param("graph", marks=pytest.mark.slow)])
def test_core_refuses_row_local_ends_of_two_rows(mode):
    """The core runs the check before its work, compiled into the whole core in graph mode (the fast
    tier's graph case is ``test_attention.py::test_graph_mode_with_mindformers_prefix_sums``)."""
    assert_core_refuses(mode, *BAD[-1][1:])


def test_tensor_prefix_sums_need_an_integer_dtype(mode):
    core = NativeSparseAttention(CFG)

    def forward(q, k, v, gates, ends):
        return core(q, k, v, gates, ends)

    with pytest.raises(TypeError, match=r"NativeSparseAttention: the dtype of 'actual_seq_len' must be int32 or "
                                        r"int64, but got Float32"):
        run(mode, forward, *core_inputs(), ms.Tensor(np.array([15.0, 40.0], np.float32)))


@pytest.mark.parametrize("mode", ["pynative", pytest.param("graph", marks=pytest.mark.slow)])
def test_self_attention_refuses_bad_tensor_prefix_sums(mode):
    layer = NSASelfAttention(CFG)

    def forward(x, ends):
        return layer(x, actual_seq_len=ends)

    with pytest.raises(ValueError, match=r"NSASelfAttention: 'actual_seq_len' must be non-decreasing .* but got 15 "
                                         r"at index 1"):
        run(mode, forward, _x((T, 64)), ms.Tensor(np.array([20, 15, T], np.int32)))


@pytest.mark.parametrize("mode", ["pynative", pytest.param("graph", marks=pytest.mark.slow)])
def test_checked_tensor_prefix_sums_mean_what_the_same_tuple_means(mode):
    """A valid Tensor (leading 0, repeats, padding) passes and gives the tuple's result, bitwise."""
    core = NativeSparseAttention(CFG)
    inputs = core_inputs(1)

    def forward(q, k, v, gates, ends):
        return core(q, k, v, gates, ends)

    tensor_out = run(mode, forward, *inputs, ms.Tensor(np.array([0, 15, 15, 33, T, T], np.int32)))
    np.testing.assert_array_equal(tensor_out.asnumpy(), core(*inputs, (15, 33, T)).asnumpy())
