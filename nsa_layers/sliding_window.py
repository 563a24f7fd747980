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
        key_segment, key_row (Tensor): ``(R,)`` int32 segment ids and row numbers of those keys.
        segment, row (Tensor): ``(C,)`` int32 segment ids and row numbers of the queries.

    Outputs:
        Tensor ``(Hkv, G*C, Dv)``.
    """

    def __init__(self, config):
        super().__init__()
        self.window = config.window_size
        self.masked = masked_score(config.ms_compute_dtype)
        self.attention = MaskedAttention(config.scale)

    def construct(self, q, k, v, key_segment, key_row, segment, row):
        distance = row.reshape(-1, 1) - key_row.reshape(1, -1)
        visible = ops.logical_and(key_segment.reshape(1, -1) == segment.reshape(-1, 1),
                                  ops.logical_and(distance >= 0, distance < self.window))
        bias = visibility_bias(visible, q.dtype, self.masked)
        return self.attention(q, k, v, bias.reshape(1, segment.shape[0], -1))[0]
