"""Packed variable-length batches, graph side: the per-token layout as tensors, built once per forward.

Prefix sums enter a layer once, through :func:`prefix_sums`: normalised and checked there, they
travel as one :class:`PrefixSums` record (the graph tensor, and the host tuple when the values are
known on the host), which every later step takes as it is.

The NSA core never branches on the layout in Python: every segment rule is data in the tensors of
one record, :class:`PackedLayout`, computed with static-shape MindSpore ops from the prefix sums,
so the same graph serves every layout of ``T`` tokens (MindFormers feeds prefix sums as graph data).
Terms, used with one meaning throughout the layers:

- *position*: a token's index inside its segment (0 at the segment's first token);
- *window slots*: the compressed windows (``l`` tokens every ``d`` inside a segment) in row order,
  padded to a static count ``S`` (:func:`nsa_layers.packing.max_windows`); ``window_starts`` are
  their first rows;
- *block slots*: the selection blocks (``l'`` tokens from each segment's first token), block-major
  in row order, padded to a static count ``B``; ``block_starts`` are their first rows;
- *query chunks*: the ``(c0, c1)`` row ranges of ``query_chunk_size`` queries processed together
  (:class:`QueryLayout`).

The host-side counterparts, on prefix sums as Python values, are in :mod:`nsa_layers.packing`.
"""

import functools
from typing import Optional, TypedDict

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from mindspore.ops import constexpr

from .attention_math import column_tiled, row_tiled
from .input_checks import checked_prefix_sums
from .packing import host_prefix_sums, max_windows

__all__ = ["PrefixSums", "PackedLayout", "QueryLayout", "prefix_sums", "known_prefix_sums", "packed_layout",
           "query_layout", "host_layout", "positions_tensor", "window_rows_tensor", "windows_ended", "token_layout"]


class PrefixSums(TypedDict):
    """The segment ends of a packed batch of ``T`` tokens, normalised and checked where they entered a
    layer (:func:`prefix_sums`); a layer given this record uses it as it is.

    Fields:
        ends: ``(E,)`` int32 Tensor, values in ``[0, T]``; a token's segment is delimited by the nearest
            ends at or before it and after it, so their order, a leading 0, repeats and padding do not
            matter (:func:`token_layout`).
        host: the normalised ends as a tuple of ints (strictly increasing, the last ``T``;
            ``packing.normalize_prefix_sums``) when the values are known on the host, else None (a
            Tensor: graph data). The Ascend kernel route needs them (``kernel_routing``).
    """

    ends: Tensor
    host: Optional[tuple]


def prefix_sums(cell, actual_seq_len, total):
    """``actual_seq_len`` as a :class:`PrefixSums` record of ``total`` tokens: the one place where
    prefix sums enter a layer and are checked.

    - a :class:`PrefixSums` record (a ``dict``) has been checked: it is returned as it is;
    - ``None`` (one segment) and Python/NumPy sequences are normalised and checked on the host
      (``packing.normalize_prefix_sums``; while compiling under ``mindspore.jit``);
    - a ``Tensor`` (graph data, as MindFormers feeds it) is flattened and its values are checked when
      the graph runs (``input_checks.checked_prefix_sums``, which names ``cell``).
    """
    if isinstance(actual_seq_len, dict):
        return actual_seq_len
    if isinstance(actual_seq_len, Tensor):
        return {"ends": checked_prefix_sums(cell, actual_seq_len, total), "host": None}
    host = host_prefix_sums(actual_seq_len, total)
    return {"ends": _host_ends_tensor(host), "host": host}


def known_prefix_sums(ends):
    """A :class:`PrefixSums` record of ends a caller built from checked values (e.g. checked prefix
    sums plus the batch rows' ends, in any order): ``ends`` int Tensor of any shape, flattened."""
    ends = ends.reshape(-1)
    return {"ends": ends if ends.dtype == ms.int32 else ends.astype(ms.int32), "host": None}


@constexpr
def _host_ends_tensor(host):
    return Tensor(np.asarray(host, np.int32))


class PackedLayout(TypedDict):
    """The bookkeeping of one packed batch of ``T`` tokens for an NSA layer (a ``dict``: MindSpore 2.9's
    graph mode runs a ``NamedTuple`` through its Python fallback, which stops gradients).

    Tensors (int32 unless noted):
        segment: ``(T,)`` segment id of each token (two tokens share an id iff they share a segment).
        position: ``(T,)`` in-segment position.
        window_starts: ``(S,)`` first row of each window slot (0 for unused slots, which come last).
        first_window: ``(T,)`` window slot of the first window of each token's segment.
        windows_ended: ``(T,)`` windows of its segment that have ended at each token
            (``i*d + l - 1 <= t``); they are the slots ``first_window .. first_window + windows_ended - 1``.
        block_starts: ``(B,)`` first row of each block slot.
        first_block: ``(T,)`` block slot of the first block of each token's segment.

    And ``prefix_sums``, the :class:`PrefixSums` it was built from.
    """

    segment: Tensor
    position: Tensor
    window_starts: Tensor
    first_window: Tensor
    windows_ended: Tensor
    block_starts: Tensor
    first_block: Tensor
    prefix_sums: PrefixSums


def packed_layout(actual_seq_len, total, config):
    """The :class:`PackedLayout` of ``total >= 1`` tokens for an NSA layer of ``config`` (``NSAConfig``).

    Where the prefix sums are known on the host (host values, or a Tensor's values in PyNative outside
    ``mindspore.jit``), the layout is built once per layout with NumPy (:func:`host_layout`, cached)
    and used as constants; otherwise (a Tensor in a graph: graph data) by static-shape ops from the
    prefix-sum tensor, one graph for every layout. The two are equal.

    Args:
        actual_seq_len: the segment ends, a :class:`PrefixSums` record or anything :func:`prefix_sums`
            takes (and checks).
        total (int): ``T``, static.
        config (NSAConfig): gives ``l``, ``d`` and ``l'``.
    """
    sums = prefix_sums("packed_layout", actual_seq_len, total)
    ends = sums["ends"]
    block, stride, select = config.compress_block_size, config.compress_stride, config.select_block_size
    values = sums["host"]
    if values is None and not _compiling():  # PyNative: the checked tensor's values can be read
        values = tuple(ends.asnumpy().tolist())
    if values is not None:
        tensors = host_layout(values, total, block, stride, select)
        return {"segment": tensors[0], "position": tensors[1], "window_starts": tensors[2],
                "first_window": tensors[3], "windows_ended": tensors[4], "block_starts": tensors[5],
                "first_block": tensors[6], "prefix_sums": sums}
    num_ends = ends.shape[0]
    segment, position, start, length = token_layout(ends, total)
    window_slots = max_windows(total, num_ends, block, stride)
    window_starts, window_start_here = _slots_tensor(position, length, block, stride, window_slots)
    block_slots = max_windows(total, num_ends, 1, select)
    block_starts, block_start_here = _slots_tensor(position, length, 1, select, block_slots)
    return {
        "segment": segment,
        "position": position,
        "window_starts": window_starts,
        "first_window": _first_slot_tensor(window_start_here, start),
        "windows_ended": windows_ended(position, block, stride),
        "block_starts": block_starts,
        "first_block": _first_slot_tensor(block_start_here, start),
        "prefix_sums": sums,
    }


@constexpr(check=False)
def _is_none(value):
    return value is None


def _compiling():
    """True while ``mindspore.jit`` (or graph mode) compiles the caller, False when PyNative runs it: a
    function is a constant a compiled graph cannot pass to ``constexpr`` (MindSpore's own test)."""
    def _probe():
        return 0
    return _is_none(_probe)


@constexpr
def host_layout(ends, total, block, stride, select):
    """The tensors of :class:`PackedLayout` (``segment .. first_block``, in its order) of ``total >= 1``
    tokens from host prefix-sum values ``ends`` (a tuple, as :class:`PrefixSums` allows: any order,
    values in ``[0, T]``), built with NumPy as the ops of :func:`packed_layout` build them from the same
    values in a tensor (equal, shapes included), and cached per ``(ends, T, l, d, l')``: constants of
    the graph under ``mindspore.jit``, the same tensors at every PyNative call."""
    return _host_layout_tensors(tuple(ends), total, block, stride, select)


@functools.lru_cache(maxsize=64)
def _host_layout_tensors(ends, total, block, stride, select):
    values = np.asarray(ends, np.int64).reshape(1, -1)
    rows = np.arange(total).reshape(-1, 1)
    passed = values <= rows  # as token_layout
    segment = passed.sum(axis=1)
    start = np.where(passed, values, 0).max(axis=1, initial=0)
    length = np.where(passed, total, values).min(axis=1, initial=total) - start
    position = rows.reshape(-1) - start
    window_starts, window_here = _host_slots(position, length, block, stride,
                                             max_windows(total, len(ends), block, stride))
    block_starts, block_here = _host_slots(position, length, 1, select, max_windows(total, len(ends), 1, select))
    ended = np.maximum(position - (block - 1 - stride), 0) // stride
    tensors = (segment, position, window_starts, _host_first_slot(window_here, start), ended, block_starts,
               _host_first_slot(block_here, start))
    return tuple(Tensor(np.asarray(x, np.int32)) for x in tensors)


def _host_slots(position, length, block, stride, slots):
    """:func:`_slots_tensor` on the host: window starts in row order, padded with 0 to ``slots``."""
    here = (position % stride == 0) & (position + block <= length)
    starts = np.zeros(slots, np.int64)
    rows = np.flatnonzero(here)[:slots]
    starts[:rows.size] = rows
    return starts, here


def _host_first_slot(here, start):
    """:func:`_first_slot_tensor` on the host."""
    return (np.cumsum(here) - here)[start]


class QueryLayout(TypedDict):
    """The per-query part of a :class:`PackedLayout` for the query rows ``row_offset ..
    row_offset + Tq - 1`` of its ``T`` rows (a context-parallel rank's queries, or all of them).

    Tensors ``(Tq,)`` int32: ``segment``, ``position``, ``first_window``, ``windows_ended``,
    ``first_block`` (the layout's rows). Static: ``row_offset`` (int) and ``chunks``, the query chunks
    as ``(c0, c1)`` rows of the ``Tq`` queries.
    """

    segment: Tensor
    position: Tensor
    first_window: Tensor
    windows_ended: Tensor
    first_block: Tensor
    row_offset: int
    chunks: tuple


def query_layout(layout, row_offset, rows, chunk):
    """The :class:`QueryLayout` of ``rows`` queries from row ``row_offset`` of ``layout`` (chunks of
    ``chunk`` queries); the layout's own tensors when the queries are all its rows."""
    total = layout["position"].shape[0]
    chunks = tuple((c0, min(rows, c0 + chunk)) for c0 in range(0, rows, chunk))
    end = None if row_offset == 0 and rows == total else row_offset + rows
    return {"segment": _query_rows(layout["segment"], row_offset, end),
            "position": _query_rows(layout["position"], row_offset, end),
            "first_window": _query_rows(layout["first_window"], row_offset, end),
            "windows_ended": _query_rows(layout["windows_ended"], row_offset, end),
            "first_block": _query_rows(layout["first_block"], row_offset, end),
            "row_offset": row_offset, "chunks": chunks}


def _query_rows(x, start, end):
    """Rows ``start .. end - 1`` of ``x``; ``x`` itself for ``end`` None (all rows)."""
    return x if end is None else x[start:end]


def windows_ended(position, block, stride):
    """Compressed windows (``block`` tokens every ``stride``) of a segment that have ended at each
    in-segment ``position``: window ``i`` has ended iff ``i * stride + block - 1 <= position``."""
    return ops.maximum(position - (block - 1 - stride), 0) // stride


def positions_tensor(actual_seq_len, total):
    """In-segment position of every token, ``(T,)`` int32, from prefix sums in any form :func:`prefix_sums`
    takes (a Tensor's values are checked)."""
    return token_layout(prefix_sums("positions_tensor", actual_seq_len, total)["ends"], total)[1]


def token_layout(ends, total):
    """Per-token ``(segment, position, start_row, segment_length)``, four ``(T,)`` int32 tensors, from a
    prefix-sum tensor with values in ``[0, total]`` in any order (:class:`PrefixSums`)."""
    if total == 0:  # no tokens (MindSpore's max and min reject empty inputs)
        empty = ops.zeros((0,), ms.int32)
        return empty, empty, empty, empty
    ends = ends.reshape(1, -1)
    ends = ends if ends.dtype == ms.int32 else ends.astype(ms.int32)
    rows = ops.arange(0, total, dtype=ms.int32).reshape(-1, 1)
    passed = ends <= rows  # (T, E): ends at or before each token
    segment = passed.astype(ms.int32).sum(axis=1).astype(ms.int32)
    start = ops.where(passed, ends, ops.zeros_like(ends)).max(axis=1)
    end = ops.where(passed, ops.full_like(ends, total), ends).min(axis=1)
    rows = rows.reshape(-1)
    return segment, rows - start, start, end - start


def _slots_tensor(position, length, block, stride, slots):
    """First rows of the windows of ``block`` tokens every ``stride`` inside each segment, in row order,
    padded with 0 to ``slots`` entries, and the ``(T,)`` bool "a window starts here"."""
    total = position.shape[0]
    if total >= 2 ** 23:
        raise ValueError(f"packed_layout: T={total} is too large for the float32 sort key.")
    starts = ops.logical_and(position % stride == 0, position + block <= length)
    rows = ops.arange(0, total, dtype=ms.int32)
    key = ops.where(starts, rows, rows + total).astype(ms.float32)  # windows first, in row order
    if slots > total:
        key = ops.cat((key, ops.full((slots - total,), 2.0 * total, dtype=ms.float32)))
    ordered = ops.sort(key)[0][:slots].astype(ms.int32)
    return ops.where(ordered < total, ordered, ops.zeros_like(ordered)), starts


def _first_slot_tensor(start_here, start):
    """Slot of the first window (or block) of each token's segment: the slots starting at rows before
    the segment's start row (slots are in row order)."""
    starts = start_here.astype(ms.int32)
    return ops.gather(ops.cumsum(starts, 0) - starts, start, 0)


def window_rows_tensor(window_starts, width, total):
    """Rows ``start + j`` for ``j < width`` of every window, ``(S, width)`` int32, clipped to row ``T - 1``.

    Callers mask the clipped rows and the rows past a segment's end (by position), so the clip only
    keeps gathers in range. (Any run of ``width`` consecutive indices from each start works the same:
    the selection reads window slots this way.) The sum is of explicitly tiled operands (see
    ``attention_math``).
    """
    rows = window_starts.shape[0]
    offsets = row_tiled(ops.arange(0, width, dtype=ms.int32), rows)
    return ops.minimum(column_tiled(window_starts, width) + offsets, total - 1)
