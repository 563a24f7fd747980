"""Selected-attention branch: each query attends to the raw tokens of its selected blocks, with a
token-level causal mask inside its own block."""

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, nn, ops

from . import packing
from .attention_math import masked_softmax

__all__ = ["SelectedAttention"]


class SelectedAttention(nn.Cell):
    """Attention over the tokens of ``k`` selected blocks per query and KV group.

    Keys and values are first laid out block-major once per forward (:meth:`block_major`: every
    selection block of every segment as one contiguous row of ``l' * D`` values), so each query
    gathers ``k`` large rows, and the scores are one batched matmul per chunk:
    ``(Hkv*C, G, Dq) @ (Hkv*C, Dq, k*l')``.

    Args:
        config (NSAConfig): sizes.

    Inputs:
        q (Tensor): ``(C, H, Dq)`` a chunk of queries.
        k_blocks (Tensor): ``(Hkv * B, l' * Dq)`` from :meth:`block_major`; ``v_blocks``: ``(Hkv * B, l' * Dv)``.
        blocks, valid (Tensor): ``(Hkv, C, k)`` selected in-segment block ids and slot validity.
        block_base (Tensor): ``(C,)`` int32, block-major index of the first block of each query's segment.
        position (Tensor): ``(C,)`` int32 in-segment positions.

    Outputs:
        Tensor ``(C, H, Dv)``.
    """

    def __init__(self, config):
        super().__init__()
        self.block = config.select_block_size
        self.scale = config.scale
        self.offsets = Tensor(np.arange(config.select_block_size, dtype=np.int32))
        self.bmm_transpose_b = ops.BatchMatMul(transpose_b=True)

    def block_major(self, x, block_rows):
        """``x (T, Hkv, D)`` -> ``(Hkv * B, l' * D)``: block ``b`` of head ``h`` is row ``h * B + b``.

        ``block_rows (B,)`` are the blocks' first rows (``packing.window_slots_tensor`` with block 1 and
        stride ``l'``); rows past a segment's end belong to the next segment or are clipped, and are
        masked by position in :meth:`construct`.
        """
        total, kv_heads, dim = x.shape
        count = block_rows.shape[0]
        rows = packing.window_rows_tensor(block_rows, self.block, total)  # (B, l')
        flat = rows.reshape(1, -1) * kv_heads + ops.arange(0, kv_heads, dtype=ms.int32).reshape(-1, 1)
        return ops.gather(x.reshape(total * kv_heads, dim), flat.reshape(-1), 0).reshape(
            kv_heads * count, self.block * dim)

    def construct(self, q, k_blocks, v_blocks, blocks, valid, block_base, position):
        rows, heads, dim = q.shape
        kv_heads, _, count = blocks.shape
        per_head = k_blocks.shape[0] // kv_heads
        dim_v = v_blocks.shape[1] // self.block
        keys = count * self.block
        in_segment = (blocks.reshape(kv_heads, rows, count, 1) * self.block
                      + self.offsets.reshape(1, 1, 1, -1)).reshape(kv_heads, rows, keys)
        visible = ops.logical_and(
            ops.broadcast_to(valid.reshape(kv_heads, rows, count, 1), (kv_heads, rows, count, self.block))
            .reshape(kv_heads, rows, keys),
            in_segment <= position.reshape(1, -1, 1))
        index = ops.minimum(block_base.reshape(1, -1, 1) + blocks, per_head - 1) + \
            ops.arange(0, kv_heads, dtype=ms.int32).reshape(-1, 1, 1) * per_head
        index = index.reshape(-1)
        k_sel = ops.gather(k_blocks, index, 0).reshape(kv_heads * rows, keys, dim)
        v_sel = ops.gather(v_blocks, index, 0).reshape(kv_heads * rows, keys, dim_v)
        q_sel = q.reshape(rows, kv_heads, heads // kv_heads, dim).transpose(1, 0, 2, 3).reshape(
            kv_heads * rows, heads // kv_heads, dim)
        scores = self.bmm_transpose_b(q_sel, k_sel) * self.scale
        probs = masked_softmax(scores, visible.reshape(kv_heads * rows, 1, keys))
        out = mint.bmm(probs, v_sel).reshape(kv_heads, rows, heads // kv_heads, dim_v)
        return out.transpose(1, 0, 2, 3).reshape(rows, heads, dim_v)
