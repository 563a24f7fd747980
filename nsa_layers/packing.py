"""Packed variable-length batches: every piece of segment bookkeeping, written once.

A packed batch stores the tokens of all segments (documents) back to back along one axis ``T``
(the TND layout). Segment boundaries are given as *prefix sums* ``actual_seq_len``: segment
lengths ``(s1, s2, s3)`` are passed as ``(s1, s1 + s2, s1 + s2 + s3)``; segment ``b`` covers rows
``[ends[b-1], ends[b])`` with ``ends[-1] = 0``.

Two kinds of functions live here:

- host-side (Python / NumPy) functions of a prefix-sum tuple; they run once per layout (and at
  compile time under ``mindspore.jit``) and give segment lengths, starts, compressed lengths, window
  start rows, selection-block counts and per-token segment ids / positions;
- tensor functions (names ending in ``_tensor``) that compute per-token segment ids and positions
  from a prefix-sum *tensor* with static-shape MindSpore ops, for graph mode where the prefix sums
  are data, not constants.

``nsa_layers.ops`` applies the strict documented contract (:func:`check_prefix_sums`); layers
accept prefix sums as MindFormers produces them and pass them through :func:`normalize_prefix_sums`.
"""

import numbers

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops
from mindspore.ops import constexpr

from .attention_math import column_tiled, row_tiled

__all__ = [
    "as_int_tuple",
    "check_prefix_sums",
    "normalize_prefix_sums",
    "segment_starts",
    "segment_lengths",
    "compressed_lengths",
    "compressed_prefix_sums",
    "window_starts",
    "selection_block_counts",
    "token_segment_ids",
    "token_positions",
    "prefix_sums_tensor",
    "layout_tensors",
    "max_windows",
    "window_slots_tensor",
    "window_rows_tensor",
    "first_slot_tensor",
    "windows_ended_tensor",
    "segment_ids_tensor",
    "positions_tensor",
]


def _is_int(value):
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def as_int_tuple(value, name, op_name):
    """Return ``value`` as a tuple of Python ints, or raise ``TypeError``.

    Args:
        value: a ``tuple`` or ``list`` of ints (NumPy integers accepted; ``bool`` is not an int here).
        name (str): the argument name, used in the message.
        op_name (str): the calling function, used in the message.
    """
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{op_name}: '{name}' must be a tuple or list of int, but got {type(value).__name__}.")
    bad = [v for v in value if not _is_int(v)]
    if bad:
        raise TypeError(
            f"{op_name}: '{name}' must be a tuple or list of int, but it contains "
            f"{bad[0]!r} of type {type(bad[0]).__name__}.")
    return tuple(int(v) for v in value)


def check_prefix_sums(prefix, total, name, op_name, error=RuntimeError, *, positive=True, last="equal"):
    """Validate prefix sums against the documented contract of the NSA ops; raise ``error`` if broken.

    Rules, checked in this order: not empty; non-decreasing; every element ``> 0`` (``positive=True``)
    or ``>= 0``; last element ``== total`` (``last="equal"``) or ``<= total`` (``last="at_most"``).

    Args:
        prefix (tuple[int]): prefix sums, already converted by :func:`as_int_tuple`.
        total (int): number of rows ``T`` of the packed tensor.
    """
    if len(prefix) == 0:
        raise error(f"{op_name}: '{name}' must not be empty.")
    for i in range(1, len(prefix)):
        if prefix[i] < prefix[i - 1]:
            raise error(
                f"{op_name}: '{name}' must be non-decreasing, but element {i} is {prefix[i]} "
                f"after {prefix[i - 1]} (got {prefix}).")
    floor = 1 if positive else 0
    for i, v in enumerate(prefix):
        if v < floor:
            rule = "positive" if positive else "non-negative"
            raise error(f"{op_name}: every element of '{name}' must be {rule}, but element {i} is {v}.")
    if last == "equal" and prefix[-1] != total:
        raise error(
            f"{op_name}: the last element of '{name}' must equal T={total} (the first dimension of the "
            f"packed tensor), but got {prefix[-1]}.")
    if last == "at_most" and prefix[-1] > total:
        raise error(
            f"{op_name}: the last element of '{name}' must be at most T={total} (the first dimension of "
            f"the packed tensor), but got {prefix[-1]}.")
    return prefix


def normalize_prefix_sums(actual_seq_len, total):
    """Normalise prefix sums as MindFormers produces them into strictly increasing segment ends.

    Accepts ``None`` (one segment), a tuple/list, a NumPy array or a MindSpore ``Tensor`` of any
    shape (it is flattened), with any of: a leading 0, repeated values (zero-length segments, e.g.
    padding with the final value), global offsets over a flattened micro-batch, and a last value
    below ``total`` (the remaining rows form one more segment). Host-side only: a ``Tensor`` is read
    back with ``asnumpy()``, so use :func:`segment_ids_tensor` inside a compiled graph.

    Args:
        actual_seq_len: the prefix sums, or ``None``.
        total (int): number of rows ``T`` of the packed tensor.

    Returns:
        tuple[int]: strictly increasing segment ends, each in ``[1, total]``, the last equal to ``total``
        (empty tuple if ``total == 0``).

    Raises:
        ValueError: if the values decrease, are negative or exceed ``total``.
    """
    if actual_seq_len is None:
        ends = np.zeros(0, np.int64)
    else:
        if isinstance(actual_seq_len, Tensor):
            actual_seq_len = actual_seq_len.asnumpy()
        ends = np.asarray(actual_seq_len).reshape(-1)
        if ends.size and not np.issubdtype(ends.dtype, np.integer):
            raise ValueError(f"normalize_prefix_sums: 'actual_seq_len' must hold integers, got dtype {ends.dtype}.")
        ends = ends.astype(np.int64)
    if ends.size:
        if np.any(np.diff(ends) < 0):
            raise ValueError(f"normalize_prefix_sums: 'actual_seq_len' must be non-decreasing, got {ends.tolist()}.")
        if ends[0] < 0:
            raise ValueError(f"normalize_prefix_sums: 'actual_seq_len' must be non-negative, got {ends.tolist()}.")
        if ends[-1] > total:
            raise ValueError(
                f"normalize_prefix_sums: 'actual_seq_len' must not exceed T={total}, got {ends.tolist()}.")
    ends = np.unique(ends[ends > 0])
    if total > 0 and (ends.size == 0 or ends[-1] < total):
        ends = np.append(ends, total)
    return tuple(int(v) for v in ends)


def segment_starts(prefix):
    """First row of every segment, ``(B,)`` int64: ``(0, ends[0], ..., ends[B-2])``."""
    ends = np.asarray(prefix, np.int64).reshape(-1)
    return np.concatenate([np.zeros(1, np.int64), ends[:-1]]) if ends.size else ends


def segment_lengths(prefix):
    """Length of every segment, ``(B,)`` int64 (differences of the prefix sums; may contain 0)."""
    ends = np.asarray(prefix, np.int64).reshape(-1)
    return ends - segment_starts(ends)


def compressed_lengths(prefix, block, stride):
    """Compressed windows per segment, ``(B,)`` int64: ``max(0, 1 + (L - block) // stride)``.

    A segment shorter than ``block`` gives 0 windows; windows never cross a segment boundary.
    """
    lengths = segment_lengths(prefix)
    return np.where(lengths >= block, (lengths - block) // stride + 1, 0).astype(np.int64)


def compressed_prefix_sums(prefix, block, stride):
    """Prefix sums of :func:`compressed_lengths`, as a tuple of ints (the compressed layout)."""
    return tuple(int(v) for v in np.cumsum(compressed_lengths(prefix, block, stride)))


def window_starts(prefix, block, stride):
    """Global start row of every compressed window, in output order, ``(T',)`` int64.

    Window ``i`` of segment ``b`` starts at ``starts[b] + i * stride`` and covers ``block`` rows.
    """
    starts = segment_starts(prefix)
    counts = compressed_lengths(prefix, block, stride)
    if counts.sum() == 0:
        return np.zeros(0, np.int64)
    return np.concatenate([s + np.arange(c, dtype=np.int64) * stride for s, c in zip(starts, counts)])


def selection_block_counts(prefix, select_block_size):
    """Selection blocks per segment, ``(B,)`` int64: ``ceil(L / select_block_size)``.

    Blocks tile each segment from its first token; the last block of a segment may be partial.
    """
    lengths = segment_lengths(prefix)
    return -(-lengths // select_block_size)


def token_segment_ids(prefix):
    """Segment index of every token, ``(T,)`` int64 (zero-length segments own no token)."""
    lengths = segment_lengths(prefix)
    return np.repeat(np.arange(lengths.size, dtype=np.int64), lengths)


def token_positions(prefix):
    """Position of every token inside its segment, ``(T,)`` int64 (0 at each segment's first token)."""
    starts = segment_starts(prefix)
    lengths = segment_lengths(prefix)
    total = int(lengths.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)


@constexpr
def _host_prefix_sums_tensor(actual_seq_len, total):
    return Tensor(np.asarray(normalize_prefix_sums(actual_seq_len, total), np.int32))


def prefix_sums_tensor(actual_seq_len, total):
    """Prefix sums for the layers as a flat int tensor, in graph mode too.

    ``None`` and Python/NumPy sequences are validated and normalised on the host
    (:func:`normalize_prefix_sums`, at compile time under ``mindspore.jit``); a ``Tensor`` (data in a
    compiled graph, as MindFormers feeds it) is flattened and used as it is: :func:`layout_tensors`
    tolerates its leading 0, repeated values and padding.
    """
    if isinstance(actual_seq_len, Tensor):
        return actual_seq_len.reshape(-1)
    if actual_seq_len is not None:
        actual_seq_len = tuple(np.asarray(actual_seq_len).reshape(-1).tolist())
    return _host_prefix_sums_tensor(actual_seq_len, total)


def _ends_tensor(ends):
    ends = ends.reshape(-1)
    return ends if ends.dtype == ms.int32 else ends.astype(ms.int32)


def layout_tensors(ends, total):
    """Graph-safe per-token layout from a prefix-sum tensor: segment id, position, start row, length.

    Tolerates everything :func:`normalize_prefix_sums` does (leading 0, repeated values, padding, a
    last value below ``total``: the remaining rows form one more segment), because each token's
    segment is delimited by the nearest ends at or before it and after it. Segment ids are not
    consecutive when there are repeated ends, but two tokens share an id iff they share a segment.

    Args:
        ends (Tensor): prefix sums, any integer dtype, any shape (flattened), values in ``[0, total]``.
        total (int): number of tokens ``T`` (static).

    Returns:
        tuple of four ``(T,)`` int32 tensors: ``(segment_id, position, start_row, segment_length)``.
    """
    if total == 0:  # no tokens (MindSpore's max and min reject empty inputs)
        empty = ops.zeros((0,), ms.int32)
        return empty, empty, empty, empty
    ends = _ends_tensor(ends).reshape(1, -1)
    rows = ops.arange(0, total, dtype=ms.int32).reshape(-1, 1)
    passed = ends <= rows  # (T, E): ends at or before each token
    segment = passed.astype(ms.int32).sum(axis=1).astype(ms.int32)
    start = ops.where(passed, ends, ops.zeros_like(ends)).max(axis=1)
    end = ops.where(passed, ops.full_like(ends, total), ends).min(axis=1)
    rows = rows.reshape(-1)
    return segment, rows - start, start, end - start


def segment_ids_tensor(ends, total):
    """Graph-safe segment id of every token, ``(T,)`` int32 (see :func:`layout_tensors`)."""
    return layout_tensors(ends, total)[0]


def positions_tensor(ends, total):
    """Graph-safe position of every token inside its segment, ``(T,)`` int32 (see :func:`layout_tensors`)."""
    return layout_tensors(ends, total)[1]


def max_windows(total, num_ends, block, stride):
    """Static bound on the compressed windows of ``total`` tokens in at most ``num_ends + 1`` segments.

    Each segment of length ``L >= block`` has ``(L - block) // stride + 1 <= L // stride + 1`` windows,
    and at most ``min(num_ends + 1, total // block)`` segments reach ``block`` tokens.
    """
    return max(1, total // stride + min(num_ends + 1, total // block))


def window_slots_tensor(position, length, block, stride, slots):
    """Graph-safe start rows of the compressed windows, in row order, padded to ``slots`` entries.

    A window starts at every row whose in-segment position is a multiple of ``stride`` and whose
    segment has ``block`` tokens from there on; windows never cross a segment boundary.

    Args:
        position (Tensor): ``(T,)`` int32 in-segment positions (from :func:`layout_tensors`).
        length (Tensor): ``(T,)`` int32 segment length of each token.
        slots (int): static number of slots, at least the number of windows (:func:`max_windows`).

    Returns:
        ``(start_rows, valid, is_start)``: ``(slots,)`` int32 window start rows (0 where invalid),
        ``(slots,)`` bool, True for the real windows (which come first), and ``(T,)`` bool, True at
        the rows where a window starts.
    """
    total = position.shape[0]
    if total >= 2 ** 23:
        raise ValueError(f"window_slots_tensor: T={total} is too large for the float32 sort key.")
    starts = ops.logical_and(position % stride == 0, position + block <= length)
    rows = ops.arange(0, total, dtype=ms.int32)
    key = ops.where(starts, rows, rows + total).astype(ms.float32)  # windows first, in row order
    if slots > total:
        key = ops.cat((key, ops.full((slots - total,), 2.0 * total, dtype=ms.float32)))
    ordered = ops.sort(key)[0][:slots].astype(ms.int32)
    valid = ordered < total
    return ops.where(valid, ordered, ops.zeros_like(ordered)), valid, starts


def window_rows_tensor(start_rows, width, total):
    """Rows ``start + j`` for ``j < width`` of every window, ``(S, width)`` int32, clipped to row ``T - 1``.

    Callers mask the clipped rows and the rows past a segment's end (by position), so the clip only
    keeps gathers in range. (Any run of ``width`` consecutive indices from each start works the same:
    the selection reads compressed slots this way.) The sum is of explicitly tiled operands (see
    ``attention_math``).
    """
    rows = start_rows.shape[0]
    offsets = row_tiled(ops.arange(0, width, dtype=ms.int32), rows)
    return ops.minimum(column_tiled(start_rows, width) + offsets, total - 1)


def windows_ended_tensor(position, block, stride):
    """Compressed windows of its segment that have ended at each token, ``(T,)`` int32.

    Window ``i`` (tokens ``i*stride .. i*stride + block - 1``) has ended at in-segment position ``t``
    iff ``i*stride + block - 1 <= t``, so the count is ``max(0, t - block + 1 + stride) // stride``.
    They are the first windows of the segment, which start at its :func:`first_slot_tensor` slot.

    Args:
        position (Tensor): ``(T,)`` int32 in-segment positions (from :func:`layout_tensors`).
    """
    return ops.maximum(position - (block - 1 - stride), 0) // stride


def first_slot_tensor(is_start, start):
    """Slot index of the first window (or block) of each token's segment, ``(T,)`` int32.

    Slots are numbered in row order (as :func:`window_slots_tensor` lays them out), so a segment's
    first slot is the number of slots starting at rows before the segment's start row.

    Args:
        is_start (Tensor): ``(T,)`` bool, True where a slot starts.
        start (Tensor): ``(T,)`` int32 start row of each token's segment.
    """
    starts = is_start.astype(ms.int32)
    return ops.gather(ops.cumsum(starts, 0) - starts, start, 0)
