"""Selected-attention branch: each query attends to the raw tokens of its selected blocks, with a
token-level causal mask inside its own block."""

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, nn, ops

from .attention_math import masked_softmax

__all__ = ["SelectedAttention"]


class SelectedAttention(nn.Cell):
    """Attention over the tokens of ``k`` selected blocks per query and KV group.

    Every query gathers its own blocks' rows (shared by the ``G`` heads of its KV group), so the
    scores are one batched matmul per chunk: ``(Hkv*C, G, Dq) @ (Hkv*C, Dq, k*l')``.

    Args:
        config (NSAConfig): sizes.

    Inputs:
        q (Tensor): ``(C, H, Dq)`` a chunk of queries.
        k (Tensor): ``(T, Hkv, Dq)`` keys of the selection branch; ``v``: ``(T, Hkv, Dv)``.
        blocks, valid (Tensor): ``(Hkv, C, k)`` selected in-segment block ids and slot validity.
        start, position (Tensor): ``(C,)`` int32 segment start rows and in-segment positions.

    Outputs:
        Tensor ``(C, H, Dv)``.
    """

    def __init__(self, config):
        super().__init__()
        self.block = config.select_block_size
        self.scale = config.scale
        self.offsets = Tensor(np.arange(config.select_block_size, dtype=np.int32))
        self.bmm_transpose_b = ops.BatchMatMul(transpose_b=True)

    def construct(self, q, k, v, blocks, valid, start, position):
        rows, heads, dim = q.shape
        kv_heads, _, count = blocks.shape
        total, _, dim_v = v.shape
        keys = count * self.block
        in_segment = (blocks.reshape(kv_heads, rows, count, 1) * self.block
                      + self.offsets.reshape(1, 1, 1, -1)).reshape(kv_heads, rows, keys)
        visible = ops.logical_and(
            ops.broadcast_to(valid.reshape(kv_heads, rows, count, 1), (kv_heads, rows, count, self.block))
            .reshape(kv_heads, rows, keys),
            in_segment <= position.reshape(1, -1, 1))
        token_rows = start.reshape(1, -1, 1) + ops.masked_fill(in_segment, ops.logical_not(visible), 0)
        flat = (token_rows * kv_heads + ops.arange(0, kv_heads, dtype=ms.int32).reshape(-1, 1, 1)).reshape(-1)
        k_sel = ops.gather(k.reshape(total * kv_heads, dim), flat, 0).reshape(kv_heads * rows, keys, dim)
        v_sel = ops.gather(v.reshape(total * kv_heads, dim_v), flat, 0).reshape(kv_heads * rows, keys, dim_v)
        q_sel = q.reshape(rows, kv_heads, heads // kv_heads, dim).transpose(1, 0, 2, 3).reshape(
            kv_heads * rows, heads // kv_heads, dim)
        scores = self.bmm_transpose_b(q_sel, k_sel) * self.scale
        probs = masked_softmax(scores, visible.reshape(kv_heads * rows, 1, keys))
        out = mint.bmm(probs, v_sel).reshape(kv_heads, rows, heads // kv_heads, dim_v)
        return out.transpose(1, 0, 2, 3).reshape(rows, heads, dim_v)
