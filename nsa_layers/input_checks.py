"""Checks of the layers' input tensors: types, ranks, shapes and dtypes, before any work.

The shape and dtype checks take static metadata (``tensor.shape``, ``tensor.dtype``) inside a
``constexpr``, so they run in PyNative and while ``mindspore.jit`` compiles. They raise the exception
types MindSpore uses (``TypeError`` for a type or dtype, ``ValueError`` for a rank or shape) with a
message that names the cell, the argument, the value and the rule.

Prefix sums given as a Tensor are graph data: :func:`checked_prefix_sums` checks their values when
the graph runs (a ``raise`` under a Tensor condition, which MindSpore runs in both modes).
"""

import mindspore as ms
from mindspore import Tensor, ops
from mindspore.ops import constexpr

__all__ = ["check_float_input", "check_kv_inputs", "check_position_ids", "check_query_offset", "checked_prefix_sums",
           "key_rows"]

FLOAT_DTYPES = (ms.float16, ms.bfloat16, ms.float32, ms.float64)


def check_float_input(cell, name, value, dims):
    """``value`` must be a float Tensor of shape ``dims``.

    Args:
        cell (str): the cell's name, for the message.
        name (str): the argument's name.
        value: the argument.
        dims (tuple): one ``(label, size)`` per axis; ``size`` None accepts any size (e.g. ``("T", None)``).
    """
    _check_tensor(cell, name, value)
    _check_shape_and_dtype(cell, name, value.shape, value.dtype, dims)


def check_kv_inputs(cell, k, v, k_dims, v_dims):
    """Keys and values: both Tensors (shared by the branches) or both 3-tuples (one per branch), each
    key of shape ``k_dims`` and each value of shape ``v_dims`` (see :func:`check_float_input`)."""
    k_set, v_set = isinstance(k, (tuple, list)), isinstance(v, (tuple, list))
    _check_kv_kinds(cell, k_set, v_set, len(k) if k_set else 0, len(v) if v_set else 0)
    if k_set:
        for i, branch in enumerate(("compressed", "selected", "window")):
            check_float_input(cell, f"k[{i}] ({branch})", k[i], k_dims)
            check_float_input(cell, f"v[{i}] ({branch})", v[i], v_dims)
    else:
        check_float_input(cell, "k", k, k_dims)
        check_float_input(cell, "v", v, v_dims)


def key_rows(k):
    """``T``, the rows of the keys (a Tensor, or the branches' tuple of them: the first one's); None
    when they are no Tensor (``check_kv_inputs`` then says so)."""
    keys = k[0] if isinstance(k, (tuple, list)) and len(k) > 0 else k
    return keys.shape[0] if isinstance(keys, Tensor) else None


@constexpr
def check_query_offset(cell, query_offset, rows, keys):
    """``query_offset``: an int ``>= 0`` with the ``rows`` queries inside the ``keys`` rows of the keys."""
    if isinstance(query_offset, bool) or not isinstance(query_offset, int) or query_offset < 0:
        raise ValueError(f"{cell}: 'query_offset' must be a non-negative int, but got {query_offset!r}.")
    if query_offset + rows > keys:
        raise ValueError(f"{cell}: the {rows} query rows from 'query_offset'={query_offset} must lie within the "
                         f"{keys} rows of the keys, but end at row {query_offset + rows}.")


def check_position_ids(cell, position_ids, total):
    """``position_ids``: None, or an integer Tensor of ``total`` elements."""
    if position_ids is not None:
        _check_tensor(cell, "position_ids", position_ids)
        _check_position_ids(cell, position_ids.shape, position_ids.dtype, total)


def checked_prefix_sums(cell, actual_seq_len, total):
    """Prefix sums given as a Tensor, checked: the rules :func:`nsa_layers.packing.normalize_prefix_sums`
    applies to host values (integers, values in ``[0, total]``, non-decreasing), so a Tensor layout
    means what the same values would mean as a tuple.

    Args:
        cell (str): the cell's name, for the message.
        actual_seq_len (Tensor): int32 or int64, any shape (flattened), e.g. MindFormers' ``(B, E)``
            ends over the flattened ``B*S`` tokens.
        total (int): ``T``, the tokens they cut.

    Returns:
        Tensor: the flattened values, int32. Use it in place of ``actual_seq_len``: in graph mode the
        check runs only for a result that is used, and the work that uses it waits for the check.

    Raises:
        TypeError: a non-integer dtype (at compile time in graph mode).
        ValueError: the first value that breaks a rule, with its index and the rule (when the graph
            runs, in graph mode; MindSpore cannot run that compiled graph again afterwards).
    """
    _check_tensor(cell, "actual_seq_len", actual_seq_len)
    _check_prefix_sums_dtype(cell, actual_seq_len.dtype)
    ends = actual_seq_len.reshape(-1).astype(ms.int32)
    if ends.shape[0] == 0:
        return ends
    previous = ops.cat((ends[:1], ends[:-1]))
    broken = (ends < 0).astype(ms.int32) + (ends > total).astype(ms.int32) + (ends < previous).astype(ms.int32)
    if broken.max() > 0:
        index = ops.argmax(broken, 0)
        raise ValueError(f"{cell}: 'actual_seq_len' must be non-decreasing prefix sums with values in [0, {total}] "
                         f"(T={total} tokens; a MindFormers batch gives its ends over the flattened B*S tokens), "
                         f"but got {ends[index]} at index {index}; all values: {ends}.")
    return ends


def _check_tensor(cell, name, value):
    if not isinstance(value, Tensor):
        raise TypeError(f"{cell}: '{name}' must be a Tensor, but got {type(value).__name__}.")


@constexpr
def _check_kv_kinds(cell, k_set, v_set, k_count, v_count):
    if k_set != v_set:
        raise TypeError(f"{cell}: 'k' and 'v' must both be Tensors (shared by the branches) or both tuples "
                        f"(one per branch), but got a {'tuple' if k_set else 'Tensor'} and a "
                        f"{'tuple' if v_set else 'Tensor'}.")
    if k_set and (k_count != 3 or v_count != 3):
        raise ValueError(f"{cell}: tuples 'k' and 'v' must hold 3 tensors each (compressed, selected, window), "
                         f"but got {k_count} and {v_count}.")


@constexpr
def _check_shape_and_dtype(cell, name, shape, dtype, dims):
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{cell}: the dtype of '{name}' must be float16, bfloat16, float32 or float64, "
                        f"but got {dtype}.")
    rule = "(" + ", ".join(label if size is None else f"{label}={size}" for label, size in dims) + ")"
    if len(shape) != len(dims):
        raise ValueError(f"{cell}: '{name}' must have shape {rule}, but got rank {len(shape)} "
                         f"(shape {tuple(shape)}).")
    for (label, size), got in zip(dims, shape):
        if size is not None and got != size:
            raise ValueError(f"{cell}: '{name}' must have shape {rule}, but got {tuple(shape)} ({label} is {got}).")


@constexpr
def _check_prefix_sums_dtype(cell, dtype):
    if dtype not in (ms.int32, ms.int64):
        raise TypeError(f"{cell}: the dtype of 'actual_seq_len' must be int32 or int64, but got {dtype}.")


@constexpr
def _check_position_ids(cell, shape, dtype, total):
    if dtype not in (ms.int32, ms.int64):
        raise TypeError(f"{cell}: the dtype of 'position_ids' must be int32 or int64, but got {dtype}.")
    count = 1
    for size in shape:
        count *= size
    if count != total:
        raise ValueError(f"{cell}: 'position_ids' must hold T={total} positions (one per token), "
                         f"but got shape {tuple(shape)}.")
