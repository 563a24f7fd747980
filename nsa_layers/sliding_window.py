"""Sliding-window branch: exactly ``window_size`` keys ending at the query (itself included),
inside its segment."""

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.ops import constexpr

from .attention_math import (
    add_rows,
    attention_backward,
    attention_forward,
    attention_probs,
    column_tiled,
    group_queries,
    loop_buffer,
    masked_score,
    padded_rows,
    row_slice,
    ungroup_outputs,
    visibility_bias,
    write_rows,
)
from .precision import STATS_DTYPE, precision_of

__all__ = ["SlidingWindowAttention", "window_chunk_size", "window_reach"]

# queries per window chunk: each reads its own C + w - 1 keys, so small chunks waste fewer masked keys
_WINDOW_CHUNK = 256


def window_chunk_size(config):
    """Queries per chunk of :class:`SlidingWindowAttention`: 256 where it divides ``query_chunk_size``
    (the core pads ``T`` to whole query chunks), else ``query_chunk_size``."""
    size = config.query_chunk_size
    return _WINDOW_CHUNK if size % _WINDOW_CHUNK == 0 else size

def window_reach(position, window):
    """How many rows back a query at in-segment ``position`` sees: ``min(position, w - 1)`` (the
    ``w`` keys ending at it, none before its segment's start). Primitives only: bprops call it."""
    return _MINIMUM(position, window - 1)


# primitives in what bprop calls (see attention_math)
_GATHER = ops.Gather()
_SCATTER_UPDATE = ops.TensorScatterUpdate()
_CONCAT_ROWS = ops.Concat(0)
_CAST = ops.Cast()
_MINIMUM = ops.Minimum()
_ZEROS_LIKE = ops.ZerosLike()
_TILE = ops.Tile()


@constexpr
def _padding_rows(rows, needed):
    """Zero rows to append to ``rows`` rows to have ``needed`` (at least 1: a zero-row tile is not
    used, see ``attention_math.padded_rows``)."""
    return max(1, needed - rows)


@constexpr
def _distances(rows, window):
    """``(rows, rows + w - 1)`` int32 distance from query ``i`` back to key ``j`` of its rows (from ``w - 1``
    before the first query), ``w`` for keys after the query, which no reach admits."""
    distance = (window - 1) + np.arange(rows).reshape(-1, 1) - np.arange(rows + window - 1)
    return Tensor(np.where(distance < 0, window, distance).astype(np.int32))


@constexpr
def _grad_padding(row_offset, window, rows, total):
    """``(front, start, ahead)``: zero rows in front of and after the ``rows`` key-row gradients, and
    where row 0 of the keys' ``total`` rows then is (at least one row each side, no ``if`` in a bprop)."""
    front = max(1, row_offset - (window - 1))
    start = front + (window - 1) - row_offset
    return front, start, max(1, start + total - front - rows)


class SlidingWindowAttention(nn.Cell):
    """Banded causal attention over a whole sequence: row ``t`` sees rows ``t - w + 1 .. t`` of its segment.

    The queries go through in chunks of ``C`` (:func:`window_chunk_size`) in one graph loop (compiled
    once, whatever ``T``; measured, unrolling four chunks compiles slower), or, when ``T`` fits one
    chunk, as that chunk on its own rows (no loop machinery, the same arithmetic). Chunk ``j`` reads
    the ``C + w - 1`` key rows from ``w - 1`` before it, so the distance from query ``i`` back to key
    ``j`` is ``(w - 1) + i - j`` whatever the layout: a constant table, and only the segment start (the
    query's in-segment position) is data. The forward keeps only the outputs; the backward recomputes
    each chunk's probabilities (as FlashAttention does), so memory grows with ``T`` by rows, never by
    scores. See ``docs/design.md``.

    Args:
        config (NSAConfig): sizes (``window_size``, ``query_chunk_size``, heads and head dims).
        precision (Precision, optional): the enclosing layer's; default decided from ``config``.

    Inputs:
        q (Tensor): ``(T, H, Dq)`` (padded inside to whole chunks for the loop; the padding sees only itself).
        k (Tensor): ``(T', Hkv, Dq)``; ``v``: ``(T', Hkv, Dv)``, ``T' >= row_offset + T``.
        position (Tensor): ``(T,)`` int32 in-segment positions of the queries.
        row_offset (int): the queries are rows ``row_offset ..`` of the keys (static; 0 with ``T' = T``).

    Outputs:
        Tensor ``(T, H, Dv)``.
    """

    def __init__(self, config, precision=None):
        super().__init__()
        self.window = config.window_size
        self.chunk = window_chunk_size(config)
        self.kv_heads = config.num_kv_heads
        self.scale = config.scale
        self.keys = self.chunk + self.window - 1
        # distance[i, j] from query i of a chunk to key j of its rows (from w - 1 before the chunk);
        # keys after the query get w, which no reach (at most w - 1) admits
        self.distance = _distances(self.chunk, self.window)
        self.query_rows = Tensor(np.arange(self.chunk, dtype=np.int32).reshape(-1, 1))
        self.key_rows = Tensor(np.arange(self.keys, dtype=np.int32).reshape(-1, 1))
        self.precision = precision_of(config, precision)
        self.masked = masked_score(self.precision.softmax)
        # the w - 1 rows in front of the first chunk's keys (masked: further back than any position)
        self.k_front = Tensor(np.zeros((self.window - 1, config.num_kv_heads, config.head_dim), np.float32))
        self.v_front = Tensor(np.zeros((self.window - 1, config.num_kv_heads, config.v_head_dim), np.float32))

    def construct(self, q, k, v, position, row_offset):
        total = q.shape[0]
        if total <= self.chunk:  # one chunk: its rows directly, no loop machinery (the same arithmetic)
            k_rows = self._key_rows(k, self.k_front, row_offset, total)
            v_rows = self._key_rows(v, self.v_front, row_offset, total)
            q_chunk, k_chunk, v_chunk, bias = self._inputs(q, k_rows, v_rows, position, _distances(total, self.window))
            out_chunk = attention_forward(q_chunk, k_chunk, v_chunk, bias, self.scale, self.precision)[0]
            return ungroup_outputs(out_chunk, total)
        q, position = padded_rows(q, self.chunk), padded_rows(position, self.chunk)
        k_rows = self._key_rows(k, self.k_front, row_offset, q.shape[0])
        v_rows = self._key_rows(v, self.v_front, row_offset, q.shape[0])
        # not in place: an in-place write here fails to compile in a forward-only graph of MindFormers'
        # model ("Found not specialized node"); the backward's are (docs/design.md)
        out = ops.zeros((q.shape[0], q.shape[1], v.shape[2]), q.dtype)
        j = Tensor(0, ms.int32)
        while j < q.shape[0] // self.chunk:
            rows = self.query_rows + j * self.chunk
            q_chunk, k_chunk, v_chunk, bias = self._chunk(q, k_rows, v_rows, position, j)
            out_chunk = attention_forward(q_chunk, k_chunk, v_chunk, bias, self.scale, self.precision)[0]
            out = _SCATTER_UPDATE(out, rows, ungroup_outputs(out_chunk, self.chunk))
            j = j + 1
        return row_slice(out, 0, total)

    def bprop(self, q, k, v, position, row_offset, out, dout):
        total = q.shape[0]
        p = self.precision
        if total <= self.chunk:  # one chunk, as the forward
            k_rows = self._key_rows(k, self.k_front, row_offset, total)
            v_rows = self._key_rows(v, self.v_front, row_offset, total)
            q_chunk, k_chunk, v_chunk, bias = self._inputs(q, k_rows, v_rows, position, _distances(total, self.window))
            probs = attention_probs(q_chunk, k_chunk, bias, self.scale, p)
            dq_chunk, dk_chunk, dv_chunk = attention_backward(
                q_chunk, k_chunk, v_chunk, probs, group_queries(out, self.kv_heads),
                group_queries(dout, self.kv_heads), self.scale, p)
            return (ungroup_outputs(dq_chunk, total),
                    p.hold(self._key_grad(p.stats(dk_chunk).transpose(1, 0, 2), k, row_offset)),
                    p.hold(self._key_grad(p.stats(dv_chunk).transpose(1, 0, 2), v, row_offset)),
                    _ZEROS_LIKE(position), 0)
        q, position = padded_rows(q, self.chunk), padded_rows(position, self.chunk)
        out, dout = padded_rows(out, self.chunk), padded_rows(dout, self.chunk)
        k_rows = self._key_rows(k, self.k_front, row_offset, q.shape[0])
        v_rows = self._key_rows(v, self.v_front, row_offset, q.shape[0])
        # a key row's gradient sums over the chunks that read it: float32 accumulators
        d_q = loop_buffer(q, q.shape, q.dtype)
        d_k = loop_buffer(k_rows, k_rows.shape, STATS_DTYPE)
        d_v = loop_buffer(v_rows, v_rows.shape, STATS_DTYPE)
        j = Tensor(0, ms.int32)
        while j < q.shape[0] // self.chunk:
            rows = self.query_rows + j * self.chunk
            q_chunk, k_chunk, v_chunk, bias = self._chunk(q, k_rows, v_rows, position, j)
            probs = attention_probs(q_chunk, k_chunk, bias, self.scale, p)  # recomputed: the same as the forward's
            dq_chunk, dk_chunk, dv_chunk = attention_backward(
                q_chunk, k_chunk, v_chunk, probs, self._grouped(out, rows), self._grouped(dout, rows), self.scale, p)
            key_rows = self.key_rows + j * self.chunk
            d_q = write_rows(d_q, rows.reshape(-1), ungroup_outputs(dq_chunk, self.chunk))
            d_k = add_rows(d_k, key_rows.reshape(-1), p.stats(dk_chunk).transpose(1, 0, 2))
            d_v = add_rows(d_v, key_rows.reshape(-1), p.stats(dv_chunk).transpose(1, 0, 2))
            j = j + 1
        return (row_slice(d_q, 0, total), p.hold(self._key_grad(d_k, k, row_offset)),
                p.hold(self._key_grad(d_v, v, row_offset)), _ZEROS_LIKE(row_slice(position, 0, total)), 0)

    def _key_rows(self, x, front, row_offset, rows):
        """The key rows the ``rows`` (padded) queries from ``row_offset`` on read: from ``w - 1`` before
        the first one (rows before row 0 are ``front``, zeros) to the last one (zeros past ``x``)."""
        ahead = _padding_rows(x.shape[0], row_offset + rows)
        x = _CONCAT_ROWS((_CAST(front, x.dtype), x, _TILE(_ZEROS_LIKE(x[:1]), (ahead,) + (1,) * (x.ndim - 1))))
        return x[row_offset:row_offset + self.window - 1 + rows]

    def _key_grad(self, d_rows, x, row_offset):
        """The gradient of ``x`` from that of its rows read by :meth:`_key_rows` (row ``i`` of
        ``d_rows`` is row ``row_offset - (w - 1) + i`` of ``x``), with static zero padding on both sides."""
        front, start, ahead = _grad_padding(row_offset, self.window, d_rows.shape[0], x.shape[0])
        tail = (1,) * (d_rows.ndim - 1)
        zero = _ZEROS_LIKE(d_rows[:1])
        d_rows = _CONCAT_ROWS((_TILE(zero, (front,) + tail), d_rows, _TILE(zero, (ahead,) + tail)))
        return d_rows[start:start + x.shape[0]]

    def _grouped(self, x, rows):
        """Rows ``rows`` of ``(T, H, F)`` as grouped query rows ``(Hkv, G*C, F)``."""
        return group_queries(_GATHER(x, rows.reshape(-1), 0), self.kv_heads)

    def _inputs(self, q, k_rows, v_rows, position, distance):
        """A chunk's grouped queries, its head-major key and value rows and the bias, from its ``C``
        queries ``q``, their ``C + w - 1`` key and value rows (from ``w - 1`` before the first query),
        their positions and the ``(C, C + w - 1)`` distance table (:func:`_distances`)."""
        rows = q.shape[0]
        keys = k_rows.shape[0]
        # a key at distance 0 .. min(position, w - 1) rows back: in the window and, since the query's
        # segment starts `position` rows back, in its segment (no segment-id comparison)
        visible = distance <= column_tiled(window_reach(position, self.window), keys)
        bias = visibility_bias(visible, self.precision.softmax_storage, self.masked).reshape(1, rows, keys)
        return group_queries(q, self.kv_heads), k_rows.transpose(1, 0, 2), v_rows.transpose(1, 0, 2), bias

    def _chunk(self, q, k_rows, v_rows, position, j):
        """:meth:`_inputs` of chunk ``j`` of the padded queries, gathered in a loop."""
        key_rows = (self.key_rows + j * self.chunk).reshape(-1)
        rows = (self.query_rows + j * self.chunk).reshape(-1)
        return self._inputs(_GATHER(q, rows, 0), _GATHER(k_rows, key_rows, 0), _GATHER(v_rows, key_rows, 0),
                            _GATHER(position, rows, 0), self.distance)
