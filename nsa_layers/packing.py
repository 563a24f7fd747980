"""Packed variable-length batches, host side: prefix sums as Python / NumPy values.

A packed batch stores the tokens of all segments (documents) back to back along one axis ``T``
(the TND layout). Segment boundaries are given as *prefix sums* ``actual_seq_len``: segment
lengths ``(s1, s2, s3)`` are passed as ``(s1, s1 + s2, s1 + s2 + s3)``; segment ``b`` covers rows
``[ends[b-1], ends[b])`` with ``ends[-1] = 0``.

The functions here run on the host, once per layout (at compile time under ``mindspore.jit``):
segment starts and lengths, compressed-window counts and starts, per-token segment ids and
positions (from ``nsa_layers.ops``, which applies the ops' strict contract to them), and the
normalisation of prefix sums as MindFormers produces them. The layers take prefix sums through
:func:`nsa_layers.layout.prefix_sums`, which uses :func:`host_prefix_sums` for host values; the
graph-side bookkeeping, also for prefix sums given as a Tensor, is in :mod:`nsa_layers.layout`.
"""

import numpy as np
from mindspore import Tensor
from mindspore.ops import constexpr

from .ops._varlen import (
    compressed_lengths,
    segment_lengths,
    segment_starts,
    token_positions,
    token_segment_ids,
    window_starts,
)

__all__ = ["segment_starts", "segment_lengths", "compressed_lengths", "window_starts", "token_segment_ids",
           "token_positions", "normalize_prefix_sums", "host_prefix_sums", "max_windows"]


def normalize_prefix_sums(actual_seq_len, total):
    """Normalise prefix sums as MindFormers produces them into strictly increasing segment ends.

    Accepts ``None`` (one segment), a tuple/list, a NumPy array or a MindSpore ``Tensor`` of any
    shape (it is flattened), with any of: a leading 0, repeated values (zero-length segments, e.g.
    padding with the final value), global offsets over a flattened micro-batch, and a last value
    below ``total`` (the remaining rows form one more segment). A ``Tensor`` is read back with
    ``asnumpy()``: inside a compiled graph use :func:`nsa_layers.layout.prefix_sums`.

    Args:
        actual_seq_len: the prefix sums, or ``None``.
        total (int): number of rows ``T`` of the packed tensor.

    Returns:
        tuple[int]: strictly increasing segment ends, each in ``[1, total]``, the last equal to ``total``
        (empty tuple if ``total == 0``).

    Raises:
        ValueError: if the values are not integers, decrease, are negative or exceed ``total``.
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


def host_prefix_sums(actual_seq_len, total):
    """The normalised prefix sums (:func:`normalize_prefix_sums`) of a host value (``None``, tuple,
    list, array), also while ``mindspore.jit`` compiles (a constant of the graph)."""
    if actual_seq_len is not None:
        actual_seq_len = tuple(np.asarray(actual_seq_len).reshape(-1).tolist())
    return _normalized(actual_seq_len, total)


@constexpr
def _normalized(actual_seq_len, total):
    return normalize_prefix_sums(actual_seq_len, total)


def max_windows(total, num_ends, block, stride):
    """Static bound on the windows of ``block`` tokens every ``stride`` tokens in ``total`` tokens cut
    into at most ``num_ends + 1`` segments (``block=1, stride=l'`` bounds the selection blocks).

    Each segment of length ``L >= block`` has ``(L - block) // stride + 1 <= L // stride + 1`` windows,
    and at most ``min(num_ends + 1, total // block)`` segments reach ``block`` tokens.
    """
    return max(1, total // stride + min(num_ends + 1, total // block))
