"""Sliding-window branch: exactly ``window_size`` keys ending at the query (itself included),
inside its segment."""

from mindspore import mint, nn, ops

from .attention_math import masked_softmax

__all__ = ["SlidingWindowAttention"]


class SlidingWindowAttention(nn.Cell):
    """Banded causal attention: query row ``t`` sees rows ``t - w + 1 .. t`` of its own segment.

    Args:
        config (NSAConfig): sizes.

    Inputs:
        q (Tensor): ``(Hkv, G*C, Dq)`` grouped queries of a chunk.
        k (Tensor): ``(R, Hkv, Dq)`` the key rows the chunk can reach (``w - 1`` rows before the chunk
            and the chunk itself); ``v``: ``(R, Hkv, Dv)``.
        key_segment, key_row (Tensor): ``(R,)`` int32 segment ids and row numbers of those keys.
        segment, row (Tensor): ``(C,)`` int32 segment ids and row numbers of the queries.

    Outputs:
        Tensor ``(Hkv, G*C, Dv)``.
    """

    def __init__(self, config):
        super().__init__()
        self.window = config.window_size
        self.scale = config.scale
        self.bmm_transpose_b = ops.BatchMatMul(transpose_b=True)

    def construct(self, q, k, v, key_segment, key_row, segment, row):
        kv_heads, grouped, _ = q.shape
        rows = segment.shape[0]
        keys = k.shape[0]
        distance = row.reshape(-1, 1) - key_row.reshape(1, -1)
        visible = ops.logical_and(key_segment.reshape(1, -1) == segment.reshape(-1, 1),
                                  ops.logical_and(distance >= 0, distance < self.window))
        scores = (self.bmm_transpose_b(q, k.transpose(1, 0, 2)) * self.scale).reshape(
            kv_heads, grouped // rows, rows, keys)
        probs = masked_softmax(scores, visible)
        return mint.bmm(probs.reshape(kv_heads, grouped, keys), v.transpose(1, 0, 2))
