"""Sliding-window branch: exactly ``window_size`` keys ending at the query (itself included),
inside its segment."""

import numpy as np
from mindspore import Tensor, nn, ops

from .attention_math import MaskedAttention, column_tiled, masked_score, visibility_bias

__all__ = ["SlidingWindowAttention"]


class SlidingWindowAttention(nn.Cell):
    """Banded causal attention: query row ``t`` sees rows ``t - w + 1 .. t`` of its own segment.

    A chunk's keys are the consecutive rows from ``offset`` rows before its first query to its last
    query, so the distance from query ``i`` back to key ``j`` is ``offset + i - j`` whatever the
    layout: it is read from a constant table built once (``query_chunk_size x (query_chunk_size + w - 1)``
    int32), and only the segment start (the query's in-segment position) is data.

    Args:
        config (NSAConfig): sizes (``window_size``, ``query_chunk_size``).

    Inputs:
        q (Tensor): ``(Hkv, G*C, Dq)`` grouped queries of a chunk, ``C <= query_chunk_size``.
        k (Tensor): ``(Hkv, R, Dq)`` the key rows the chunk can reach, ``R = offset + C``: ``offset``
            rows before the chunk and the chunk itself, head-major; ``v``: ``(Hkv, R, Dv)``.
        position (Tensor): ``(C,)`` int32 in-segment positions of the queries.
        offset (int): rows between the first key and the first query, at most ``w - 1``.

    Outputs:
        Tensor ``(Hkv, G*C, Dv)``.
    """

    def __init__(self, config):
        super().__init__()
        self.window = config.window_size
        chunk = config.query_chunk_size
        # distance[i, j] = (w - 1) + i - j from query i of a chunk to key j of a chunk with offset w - 1;
        # keys after the query get w, which no reach (at most w - 1) admits
        distance = (self.window - 1) + np.arange(chunk).reshape(-1, 1) - np.arange(chunk + self.window - 1)
        self.distance = Tensor(np.where(distance < 0, self.window, distance).astype(np.int32))
        self.masked = masked_score(config.ms_compute_dtype)
        self.attention = MaskedAttention(config.scale)

    def construct(self, q, k, v, position, offset):
        rows = position.shape[0]
        keys = k.shape[1]
        first = self.window - 1 - offset
        distance = self.distance[:rows, first:first + keys]
        # a key at distance 0 .. min(position, w - 1) rows back: in the window and, since the query's
        # segment starts `position` rows back, in its segment (no segment-id comparison)
        visible = distance <= column_tiled(ops.minimum(position, self.window - 1), keys)
        bias = visibility_bias(visible, q.dtype, self.masked)
        return self.attention(q, k, v, bias.reshape(1, rows, keys))[0]
