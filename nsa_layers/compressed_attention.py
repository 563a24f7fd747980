"""Compressed-attention branch: each query attends to the compressed windows of its own segment
that have ended (window ``i`` is visible to in-segment position ``t`` iff ``i*d + l - 1 <= t``)."""

from mindspore import nn, ops

from .attention_math import MaskedAttention, column_tiled, masked_score, row_tiled, visibility_bias

__all__ = ["CompressedAttention"]


class CompressedAttention(nn.Cell):
    """Softmax attention over compressed keys with NSA's causal rule.

    Compressed windows are in slots numbered in row order, so the windows a query sees are the
    consecutive slots ``first_window .. first_window + ended - 1``: its segment's first ``ended`` windows
    (``PackedLayout``). A query that sees no window
    (``ended = 0``: ``t < l - 1``) outputs exactly 0 with zero gradients.

    Args:
        config (NSAConfig): sizes.

    Inputs:
        q (Tensor): ``(Hkv, G*C, Dq)`` grouped queries of a chunk (``attention_math.group_queries``).
        k (Tensor): ``(Hkv, S, Dq)`` compressed keys (the first ``S`` slots); ``v``: ``(Hkv, S, Dv)``.
        first_window (Tensor): ``(C,)`` int32 slot of the first window of each query's segment.
        ended (Tensor): ``(C,)`` int32 windows of the query's segment that have ended at the query
            (all within the ``S`` slots).

    Outputs:
        ``(out (Hkv, G*C, Dv), probs (Hkv, G, C, S))``: float, the probabilities for block selection
        (no gradient flows through them). A query that sees no window has arbitrary probabilities
        over masked windows; they do not matter to selection, since such a query is in block 0
        (``l' >= l``), its only candidate, which is forced.
    """

    def __init__(self, config):
        super().__init__()
        self.masked = masked_score(config.ms_compute_dtype)
        self.attention = MaskedAttention(config.scale)

    def construct(self, q, k, v, first_window, ended):
        kv_heads, grouped, dim = q.shape[0], q.shape[1], v.shape[2]
        rows = first_window.shape[0]
        slots = k.shape[1]
        # slot - first_window in [0, ended): mask comparisons on explicitly tiled operands (see attention_math)
        relative = row_tiled(ops.arange(0, slots, dtype=first_window.dtype), rows) - column_tiled(first_window, slots)
        visible = ops.logical_and(relative >= 0, relative < column_tiled(ended, slots))
        out, probs = self.attention(q, k, v, visibility_bias(visible, q.dtype, self.masked).reshape(1, rows, slots))
        # rows that see no window attend uniformly to masked keys: zero their outputs (and so their gradients)
        sees = ops.stop_gradient((ended > 0).astype(q.dtype)).reshape(1, 1, rows, 1)
        sees = ops.tile(sees, (kv_heads, grouped // rows, 1, dim)).reshape(kv_heads, grouped, dim)
        return out * sees, probs
