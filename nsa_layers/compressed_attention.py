"""Compressed-attention branch and the block selection it scores: each query attends to the
compressed windows of its own segment that have ended (window ``i`` is visible to in-segment
position ``t`` iff ``i*d + l - 1 <= t``), and its probabilities choose the selected blocks."""

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.ops import constexpr

from .attention_math import (
    attention_backward,
    attention_forward,
    attention_probs,
    chunk_buckets,
    column_tiled,
    group_queries,
    index_range,
    loop_buffer,
    loop_rows,
    masked_score,
    padded_rows,
    row_slice,
    row_tiled,
    ungroup_outputs,
    visibility_bias,
)
from .precision import precision_of
from .selection import BlockSelector

__all__ = ["CompressedAttention"]

# primitives in what bprop calls (see attention_math)
_GATHER = ops.Gather()
_SCATTER_UPDATE = ops.TensorScatterUpdate()
_CAST = ops.Cast()
_LOGICAL_AND = ops.LogicalAnd()
_ZEROS_LIKE = ops.ZerosLike()
_TILE = ops.Tile()
_CONCAT_SLOTS = ops.Concat(1)
_CONCAT_ROWS = ops.Concat(0)


@constexpr
def _buckets(total, slots, chunk, stride, row_offset):
    """Static ``(first, last, slots, c0, c1)`` ranges of query chunks (``chunk_buckets``): chunks
    ``first .. last - 1``, rows ``c0 .. c1 - 1`` of the ``total`` queries, each chunk reading the
    window slots its range's last chunk can reach: slots are in row order, so a chunk ending at row
    ``c1`` reaches at most ``c1 // d + (S - T // d)`` of them (``packing.max_windows``; ``T``
    unpadded). The queries are rows ``row_offset ..`` of the keys' ``T >= row_offset + total`` rows:
    ``row_offset + total`` in place of ``T`` bounds the reach from above."""
    end = row_offset + total
    return tuple((first, last, min(slots, (row_offset + last * chunk) // stride + slots - end // stride),
                  first * chunk, min(total, last * chunk))
                 for first, last in chunk_buckets(0, -(-total // chunk)))


class CompressedAttention(nn.Cell):
    """Softmax attention over compressed keys with NSA's causal rule, and the top-``n`` selection blocks
    from its probabilities (``BlockSelector``), over a whole sequence.

    Compressed windows are in slots numbered in row order, so the windows a query sees are the
    consecutive slots ``first_window .. first_window + ended - 1``: its segment's first ``ended``
    windows (``PackedLayout``). A query that sees no window (``ended = 0``: ``t < l - 1``) outputs
    exactly 0 with zero gradients (its probabilities do not matter to selection: such a query is in
    block 0, its only candidate, which is forced).

    The queries go through in chunks of ``query_chunk_size`` in graph loops (compiled once each,
    whatever ``T``): one loop per bucket of consecutive chunks, each chunk against the window slots
    its bucket's last chunk can reach (static shapes in a loop, fewer wasted slots than one loop over
    all of them); a bucket of one chunk runs on its own rows (``attention_math.loop_rows``). The
    forward keeps only the outputs, the backward recomputes each chunk's probabilities
    (``docs/design.md``).

    Args:
        config (NSAConfig): sizes.
        precision (Precision, optional): the enclosing layer's; default decided from ``config``.

    Inputs:
        q (Tensor): ``(T, H, Dq)`` (padded inside to whole chunks for loops; the padding sees no window).
        k (Tensor): ``(S, Hkv, Dq)`` compressed keys of the window slots; ``v``: ``(S, Hkv, Dv)``.
        first_window, windows_ended, position (Tensor): ``(T,)`` int32 (``PackedLayout``).
        row_offset (int): the queries are rows ``row_offset ..`` of the sequence the slots come from
            (static; 0 for all of it).

    Outputs:
        ``(out (T, H, Dv), blocks (T, Hkv, n) int32, valid (T, Hkv, n) bool)``: the branch output, the
        selected in-segment block ids (best first) and which slots are used; no gradient flows
        through the selection.
    """

    def __init__(self, config, precision=None):
        super().__init__()
        self.chunk = config.query_chunk_size
        self.kv_heads = config.num_kv_heads
        self.block = config.select_block_size
        self.stride = config.compress_stride
        self.count = config.select_block_count
        self.scale = config.scale
        self.precision = precision_of(config, precision)
        self.masked = masked_score(self.precision.softmax)
        self.selector = BlockSelector(config)
        self.query_rows = Tensor(np.arange(self.chunk, dtype=np.int32).reshape(-1, 1))

    def construct(self, q, k, v, first_window, windows_ended, position, row_offset):
        total = q.shape[0]
        buckets = _buckets(total, k.shape[0], self.chunk, self.stride, row_offset)
        _, loop_row = loop_rows(buckets)
        if loop_row < total:  # whole chunks for the loops' gathers
            q_pad, first_pad, ended_pad, position_pad = self._padded(q, first_window, windows_ended, position)
        else:  # every chunk runs on its own rows
            q_pad, first_pad, ended_pad, position_pad = q, first_window, windows_ended, position
        k_heads, v_heads = k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # (Hkv, S, D)
        pieces = []  # each bucket's (out, blocks, valid), in order
        for first, last, slots, c0, c1 in buckets:
            # a bound on the queries' own blocks, plus one
            num_blocks = (row_offset + last * self.chunk - 1) // self.block + 1
            k_reach, v_reach = k_heads[:, :slots], v_heads[:, :slots]
            if last - first == 1:  # one chunk: its rows directly, no loop machinery (the same arithmetic)
                pieces.append(self._chunk_forward(
                    row_slice(q, c0, c1), row_slice(first_window, c0, c1), row_slice(windows_ended, c0, c1),
                    row_slice(position, c0, c1), k_reach, v_reach, num_blocks))
                continue
            # the bucket's own buffers (each write copies its buffer: the bucket's rows, not all T)
            rows_in_bucket = (last - first) * self.chunk
            out = ops.zeros((rows_in_bucket, q.shape[1], v.shape[2]), q.dtype)
            blocks = ops.zeros((rows_in_bucket, self.kv_heads, self.count), ms.int32)
            valid = ops.zeros((rows_in_bucket, self.kv_heads, self.count), ms.bool_)
            j = Tensor(first, ms.int32)
            while j < last:
                rows = self.query_rows + (j - first) * self.chunk  # in the bucket
                flat = rows.reshape(-1) + c0  # in the queries
                out_chunk, chosen, used = self._chunk_forward(
                    _GATHER(q_pad, flat, 0), _GATHER(first_pad, flat, 0), _GATHER(ended_pad, flat, 0),
                    _GATHER(position_pad, flat, 0), k_reach, v_reach, num_blocks)
                out = _SCATTER_UPDATE(out, rows, out_chunk)
                blocks = _SCATTER_UPDATE(blocks, rows, chosen)
                valid = _SCATTER_UPDATE(valid, rows, used)
                j = j + 1
            pieces.append((row_slice(out, 0, c1 - c0), row_slice(blocks, 0, c1 - c0), row_slice(valid, 0, c1 - c0)))
        if len(pieces) == 1:
            return pieces[0]
        return tuple(_CONCAT_ROWS([piece[i] for piece in pieces]) for i in range(3))

    def bprop(self, q, k, v, first_window, windows_ended, position, row_offset, out, dout):
        total = q.shape[0]
        p = self.precision
        buckets = _buckets(total, k.shape[0], self.chunk, self.stride, row_offset)
        _, loop_row = loop_rows(buckets)
        if loop_row < total:  # as the forward (both arms assign: see attention_math)
            q_pad, first_pad, ended_pad = (padded_rows(x, self.chunk) for x in (q, first_window, windows_ended))
            outputs, d_outputs = padded_rows(out[0], self.chunk), padded_rows(dout[0], self.chunk)
        else:
            q_pad, first_pad, ended_pad, outputs, d_outputs = q, first_window, windows_ended, out[0], dout[0]
        k_heads, v_heads = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
        # the key and value gradients are sums over chunks: float32 accumulators
        d_k, d_v = _ZEROS_LIKE(p.stats(k_heads)), _ZEROS_LIKE(p.stats(v_heads))
        pieces = []  # each bucket's d_q, in order
        for first, last, slots, c0, c1 in buckets:
            k_reach, v_reach = k_heads[:, :slots], v_heads[:, :slots]
            if last - first == 1:  # one chunk, as the forward
                d_q_chunk, dk_chunk, dv_chunk = self._chunk_backward(
                    row_slice(q, c0, c1), row_slice(first_window, c0, c1), row_slice(windows_ended, c0, c1), k_reach,
                    v_reach, row_slice(out[0], c0, c1), row_slice(dout[0], c0, c1))
                pieces.append(d_q_chunk)
                d_k_reach, d_v_reach = p.stats(dk_chunk), p.stats(dv_chunk)
            else:
                d_k_reach, d_v_reach = _ZEROS_LIKE(p.stats(k_reach)), _ZEROS_LIKE(p.stats(v_reach))
                d_q = loop_buffer(q, ((last - first) * self.chunk,) + q.shape[1:], q.dtype)  # the bucket's, as forward
                j = Tensor(first, ms.int32)
                while j < last:
                    rows = self.query_rows + (j - first) * self.chunk
                    flat = rows.reshape(-1) + c0
                    dq_chunk, dk_chunk, dv_chunk = self._chunk_backward(
                        _GATHER(q_pad, flat, 0), _GATHER(first_pad, flat, 0), _GATHER(ended_pad, flat, 0), k_reach,
                        v_reach, _GATHER(outputs, flat, 0), _GATHER(d_outputs, flat, 0))
                    d_q = _SCATTER_UPDATE(d_q, rows, dq_chunk)
                    d_k_reach = d_k_reach + p.stats(dk_chunk)
                    d_v_reach = d_v_reach + p.stats(dv_chunk)
                    j = j + 1
                pieces.append(row_slice(d_q, 0, c1 - c0))
            if slots < k.shape[0]:  # the slots the range does not reach get no gradient from it
                d_k = d_k + _CONCAT_SLOTS((d_k_reach, _ZEROS_LIKE(d_k[:, slots:])))
                d_v = d_v + _CONCAT_SLOTS((d_v_reach, _ZEROS_LIKE(d_v[:, slots:])))
            else:
                d_k = d_k + d_k_reach
                d_v = d_v + d_v_reach
        d_q = pieces[0] if len(pieces) == 1 else _CONCAT_ROWS(pieces)
        return (d_q, p.hold(d_k).transpose(1, 0, 2), p.hold(d_v).transpose(1, 0, 2),
                _ZEROS_LIKE(first_window), _ZEROS_LIKE(windows_ended), _ZEROS_LIKE(position), 0)

    def _chunk_forward(self, q, first_window, windows_ended, position, k_reach, v_reach, num_blocks):
        """One chunk of ``C'`` queries against the window slots ``k_reach``/``v_reach`` ``(Hkv, slots, .)``:
        its output ``(C', H, Dv)`` and selection ``(C', Hkv, n)`` (blocks, valid)."""
        rows = q.shape[0]
        q_chunk, bias, sees = self._chunk(q, first_window, windows_ended, k_reach.shape[1], v_reach.shape[2])
        out_chunk, probs = attention_forward(q_chunk, k_reach, v_reach, bias, self.scale, self.precision)
        chosen, used = self.selector(probs, first_window, position, num_blocks)
        return ungroup_outputs(out_chunk * sees, rows), chosen.transpose(1, 0, 2), used.transpose(1, 0, 2)

    def _chunk_backward(self, q, first_window, windows_ended, k_reach, v_reach, out, dout):
        """The gradients of one chunk's output: ``d_q (C', H, Dq)`` and the chunk's ``d_k``/``d_v``
        ``(Hkv, slots, .)`` in the compute dtype (the probabilities recomputed: the same as the forward's)."""
        p = self.precision
        rows = q.shape[0]
        q_chunk, bias, sees = self._chunk(q, first_window, windows_ended, k_reach.shape[1], v_reach.shape[2])
        probs = attention_probs(q_chunk, k_reach, bias, self.scale, p)
        d_out = group_queries(dout, self.kv_heads) * sees  # rows that see no window: zero gradients
        dq_chunk, dk_chunk, dv_chunk = attention_backward(
            q_chunk, k_reach, v_reach, probs, group_queries(out, self.kv_heads), d_out, self.scale, p)
        return ungroup_outputs(dq_chunk, rows), dk_chunk, dv_chunk

    def _padded(self, q, first_window, windows_ended, position):
        """The inputs padded to whole chunks: the padding rows see no window."""
        return (padded_rows(q, self.chunk), padded_rows(first_window, self.chunk),
                padded_rows(windows_ended, self.chunk), padded_rows(position, self.chunk))

    def _chunk(self, q, first, ended, slots, dim_v):
        """A chunk's grouped queries, its score bias over the ``slots`` and its "sees a window" mask
        ``(Hkv, G*C, Dv)`` (1 or 0, tiled: nothing broadcasts, see attention_math), from its ``C``
        queries ``q (C, H, Dq)`` and their ``first_window`` and ``windows_ended`` ``(C,)``."""
        rows = q.shape[0]
        # slot - first_window in [0, ended): mask comparisons on explicitly tiled operands (see attention_math)
        relative = row_tiled(index_range(slots), rows) - column_tiled(first, slots)
        visible = _LOGICAL_AND(relative >= 0, relative < column_tiled(ended, slots))
        bias = visibility_bias(visible, self.precision.softmax_storage, self.masked).reshape(1, rows, slots)
        q_chunk = group_queries(q, self.kv_heads)
        sees = _CAST(ended > 0, q.dtype).reshape(1, 1, rows, 1)
        sees = _TILE(sees, (self.kv_heads, q_chunk.shape[1] // rows, 1, dim_v))
        return q_chunk, bias, sees.reshape(self.kv_heads, -1, dim_v)
