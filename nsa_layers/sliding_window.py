"""Sliding-window branch: exactly ``window_size`` keys ending at the query (itself included),
inside its segment."""

from mindspore import nn, ops

from .attention_math import MaskedAttention, masked_score, visibility_bias

__all__ = ["SlidingWindowAttention"]


class SlidingWindowAttention(nn.Cell):
    """Banded causal attention: query row ``t`` sees rows ``t - w + 1 .. t`` of its own segment.

    Args:
        config (NSAConfig): sizes.

    Inputs:
        q (Tensor): ``(Hkv, G*C, Dq)`` grouped queries of a chunk.
        k (Tensor): ``(Hkv, R, Dq)`` the key rows the chunk can reach (``w - 1`` rows before the chunk
            and the chunk itself), head-major; ``v``: ``(Hkv, R, Dv)``.
        key_row (Tensor): ``(R,)`` int32 row numbers of those keys (consecutive packed rows).
        position, row (Tensor): ``(C,)`` int32 in-segment positions and row numbers of the queries.

    Outputs:
        Tensor ``(Hkv, G*C, Dv)``.
    """

    def __init__(self, config):
        super().__init__()
        self.window = config.window_size
        self.masked = masked_score(config.ms_compute_dtype)
        self.attention = MaskedAttention(config.scale)

    def construct(self, q, k, v, key_row, position, row):
        # a key at distance 0 .. min(position, w - 1) rows back: in the window and, since the query's
        # segment starts `position` rows back, in its segment (no segment-id comparison: on CPU a
        # broadcast Equal cost more than the rest of the mask)
        distance = row.reshape(-1, 1) - key_row.reshape(1, -1)
        reach = ops.minimum(position, self.window - 1).reshape(-1, 1)
        visible = ops.logical_and(distance >= 0, (reach - distance) >= 0)
        bias = visibility_bias(visible, q.dtype, self.masked)
        return self.attention(q, k, v, bias.reshape(1, row.shape[0], -1))[0]
