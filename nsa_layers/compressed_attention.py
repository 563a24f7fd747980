"""Compressed-attention branch: each query attends to the compressed windows of its own segment
that have ended (window ``i`` is visible to in-segment position ``t`` iff ``i*d + l - 1 <= t``)."""

from mindspore import nn, ops

from .attention_math import MaskedAttention, masked_score, visibility_bias

__all__ = ["CompressedAttention"]


class CompressedAttention(nn.Cell):
    """Softmax attention over compressed keys with NSA's causal rule.

    A query that sees no window (``t < l - 1``) outputs exactly 0 with zero gradients.

    Args:
        config (NSAConfig): sizes.

    Inputs:
        q (Tensor): ``(Hkv, G*C, Dq)`` grouped queries of a chunk (``attention_math.group_queries``).
        k (Tensor): ``(Hkv, S, Dq)`` compressed keys; ``v``: ``(Hkv, S, Dv)`` compressed values.
        slot_segment, slot_last, slot_valid (Tensor): ``(S,)`` segment id, in-segment position of the
            last token, and validity of each compressed window.
        segment, position (Tensor): ``(C,)`` the queries' segment ids and in-segment positions.

    Outputs:
        ``(out (Hkv, G*C, Dv), probs (Hkv, G, C, S))``: float, the probabilities for block selection
        (no gradient flows through them). A query that sees no window (``t < l - 1``) has arbitrary
        probabilities over masked windows; they do not matter to selection, since such a query is in
        block 0 (``l' >= l``), its only candidate, which is forced.
    """

    def __init__(self, config):
        super().__init__()
        self.masked = masked_score(config.ms_compute_dtype)
        self.attention = MaskedAttention(config.scale)

    def construct(self, q, k, v, slot_segment, slot_last, slot_valid, segment, position):
        kv_heads, grouped, _ = q.shape
        rows = segment.shape[0]
        visible = ops.logical_and(
            ops.logical_and(slot_valid.reshape(1, -1), slot_segment.reshape(1, -1) == segment.reshape(-1, 1)),
            slot_last.reshape(1, -1) <= position.reshape(-1, 1))
        out, probs = self.attention(q, k, v, visibility_bias(visible, q.dtype, self.masked).reshape(1, rows, -1))
        # rows that see no window attend uniformly to masked keys: zero their outputs (and so their gradients)
        sees = visible.any(axis=-1).astype(q.dtype).reshape(1, 1, rows, 1)
        out = (out.reshape(kv_heads, grouped // rows, rows, -1) * sees).reshape(kv_heads, grouped, -1)
        return out, probs
