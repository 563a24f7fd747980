"""Host-side (NumPy) bookkeeping of packed variable-length batches, as the NSA ops need it.

A packed batch stores the tokens of all segments back to back along one axis ``T`` (TND). Segment
ends are given as *prefix sums*: lengths ``(s1, s2, s3)`` are passed as ``(s1, s1 + s2, s1 + s2 + s3)``;
segment ``b`` covers rows ``[ends[b-1], ends[b])`` with ``ends[-1] = 0``. Everything here is plain
Python / NumPy on a tuple of ints: it runs once per layout (at compile time under ``mindspore.jit``).
``nsa_layers.packing`` re-exports the public helpers for the layers.
"""

import numbers

import numpy as np

__all__ = ["as_int_tuple", "check_prefix_sums", "segment_starts", "segment_lengths", "compressed_lengths",
           "window_starts", "token_segment_ids", "token_positions"]


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

    Returns:
        ``prefix``, unchanged.
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


def window_starts(prefix, block, stride):
    """Global start row of every compressed window, in output order, ``(T',)`` int64.

    Window ``i`` of segment ``b`` starts at ``starts[b] + i * stride`` and covers ``block`` rows.
    """
    starts = segment_starts(prefix)
    counts = compressed_lengths(prefix, block, stride)
    if counts.sum() == 0:
        return np.zeros(0, np.int64)
    return np.concatenate([s + np.arange(c, dtype=np.int64) * stride for s, c in zip(starts, counts)])


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
