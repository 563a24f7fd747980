"""nsa_compress: every error condition of the documentation, one case each, raised before any work."""

import mindspore as ms
import numpy as np
import pytest

import nsa_layers.ops.compress as compress_module
from nsa_layers.ops import nsa_compress


def _x(shape, dtype=ms.float16):
    return ms.Tensor(np.random.default_rng(0).standard_normal(shape).astype(np.float32)).astype(dtype)


def _valid():
    return dict(input=_x((64, 2, 16)), weight=_x((32, 2)), compress_block_size=32, compress_stride=16,
                actual_seq_len=(20, 64))


# (id, changes to the valid arguments, exception type, substrings the message must contain)
CASES = [
    ("input_not_tensor", dict(input=np.zeros((64, 2, 16), np.float16)), TypeError, ["'input'", "Tensor", "ndarray"]),
    ("weight_not_tensor", dict(weight=[[0.0] * 2] * 32), TypeError, ["'weight'", "Tensor", "list"]),
    ("dtypes_differ", dict(weight=_x((32, 2), ms.bfloat16)), TypeError, ["same dtype", "Float16", "BFloat16"]),
    ("dtype_not_half", dict(input=_x((64, 2, 16), ms.float32), weight=_x((32, 2), ms.float32)), TypeError,
     ["float16 or bfloat16", "Float32"]),
    ("block_not_int", dict(compress_block_size=32.0), TypeError, ["'compress_block_size'", "int", "32.0"]),
    ("stride_not_int", dict(compress_stride="16"), TypeError, ["'compress_stride'", "int", "'16'"]),
    ("seq_not_int_tuple", dict(actual_seq_len=(20.0, 64)), TypeError, ["'actual_seq_len'", "20.0", "float"]),
    ("seq_is_tensor", dict(actual_seq_len=ms.Tensor([20, 64])), TypeError, ["'actual_seq_len'", "Tensor"]),
    ("input_rank", dict(input=_x((64, 32))), RuntimeError, ["rank of 'input'", "3", "2"]),
    ("weight_rank", dict(weight=_x((32, 2, 1))), RuntimeError, ["rank of 'weight'", "2", "3"]),
    ("weight_rows", dict(weight=_x((48, 2))), RuntimeError, ["weight.shape[0]", "compress_block_size=32", "48"]),
    ("weight_cols", dict(weight=_x((32, 3))), RuntimeError, ["weight.shape[1]", "N=2", "3"]),
    ("dim_not_multiple_of_16", dict(input=_x((64, 2, 24))), RuntimeError, ["multiple of 16", "D=24"]),
    ("dim_above_256", dict(input=_x((64, 1, 272)), weight=_x((32, 1))), RuntimeError, ["at most 256", "D=272"]),
    ("heads_below_1", dict(input=_x((64, 0, 16)), weight=_x((32, 0))), RuntimeError, ["at least 1", "N=0"]),
    ("heads_above_128", dict(input=_x((64, 129, 16)), weight=_x((32, 129))), RuntimeError, ["at most 128", "N=129"]),
    ("block_not_multiple_of_16", dict(compress_block_size=40, weight=_x((40, 2))), RuntimeError,
     ["'compress_block_size'", "multiple of 16", "40"]),
    ("block_out_of_range", dict(compress_block_size=144, weight=_x((144, 2))), RuntimeError,
     ["'compress_block_size'", "[16, 128]", "144"]),
    ("stride_not_multiple_of_16", dict(compress_stride=24), RuntimeError,
     ["'compress_stride'", "multiple of 16", "24"]),
    ("stride_above_block", dict(compress_stride=48), RuntimeError,
     ["'compress_stride'", "[16, compress_block_size=32]", "48"]),
    ("stride_below_16", dict(compress_stride=0), RuntimeError, ["'compress_stride'", "[16,", "got 0"]),
    ("seq_empty", dict(actual_seq_len=()), RuntimeError, ["'actual_seq_len'", "empty"]),
    ("seq_decreasing", dict(actual_seq_len=[40, 20, 64]), RuntimeError, ["'actual_seq_len'", "non-decreasing", "20"]),
    ("seq_non_positive", dict(actual_seq_len=(0, 64)), RuntimeError, ["'actual_seq_len'", "positive", "is 0"]),
    ("seq_last_not_T", dict(actual_seq_len=(20, 60)), RuntimeError, ["'actual_seq_len'", "T=64", "60"]),
]


@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly if the computation is reached: errors must come before any work."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the computation started before the argument error was raised")
    monkeypatch.setattr(compress_module, "compress_windows", forbidden)


@pytest.mark.parametrize("case_id,changes,error,words", CASES, ids=[c[0] for c in CASES])
def test_documented_error(no_work, case_id, changes, error, words):
    args = _valid()
    args.update(changes)
    seq = args.pop("actual_seq_len")
    with pytest.raises(Exception) as info:
        nsa_compress(*args.values(), actual_seq_len=seq)
    assert info.type is error, f"{case_id}: expected {error.__name__}, got {info.type.__name__}: {info.value}"
    message = str(info.value)
    for word in words:
        assert word in message, f"{case_id}: {word!r} not in {message!r}"


GRAPH_CASES = [c for c in CASES if c[0] not in ("input_not_tensor", "weight_not_tensor", "seq_is_tensor")]


@pytest.mark.parametrize("case_id,changes,error,words", GRAPH_CASES, ids=[c[0] for c in GRAPH_CASES])
def test_documented_error_under_jit(case_id, changes, error, words):
    """The same checks run while ``mindspore.jit`` compiles, with the same exception types."""
    args = _valid()
    args.update(changes)
    block, stride, seq = args["compress_block_size"], args["compress_stride"], args["actual_seq_len"]

    def fn(x, w):
        return nsa_compress(x, w, block, stride, actual_seq_len=seq)

    with pytest.raises(Exception) as info:
        ms.jit(fn)(args["input"], args["weight"])
    assert info.type is error, f"{case_id}: expected {error.__name__}, got {info.type.__name__}"
    assert words[0] in str(info.value)


def test_keyword_only_prefix_sums():
    args = _valid()
    with pytest.raises(TypeError):
        nsa_compress(*args.values())  # pylint: disable=too-many-function-args
