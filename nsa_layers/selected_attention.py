"""Selected-attention branch: each query attends to the raw tokens of its selected blocks, with a
token-level causal mask inside its own block.

Two exact formulations of the same branch, chosen per query chunk by ``NativeSparseAttention``:

- :class:`SelectedAttention` gathers each query's ``n`` blocks (work linear in ``T``; its backward is
  written by hand so the gathered keys and values are recomputed instead of kept, and peak memory
  stays one chunk's worth);
- :class:`BlockMaskedSelectedAttention` attends to every row before the chunk's end through a
  per-query block mask (one matmul; cheaper while the chunk ends early, ``NSAConfig.select_dense_rows``).
"""

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, nn, ops

from . import packing
from .attention_math import masked_score, masked_softmax, softmax_over_visible

__all__ = ["SelectedAttention", "BlockMaskedSelectedAttention", "selected_block_mask"]


def selected_block_mask(blocks, valid, num_blocks):
    """``(Hkv, C, k)`` selected block ids and validity -> ``(Hkv, C, num_blocks)`` bool: block selected."""
    kv_heads, rows, count = blocks.shape
    ids = ops.arange(0, num_blocks, dtype=blocks.dtype).reshape(1, 1, 1, -1)
    hit = ops.logical_and(blocks.reshape(kv_heads, rows, count, 1) == ids, valid.reshape(kv_heads, rows, count, 1))
    return hit.any(axis=2)


class SelectedAttention(nn.Cell):
    """Attention over the tokens of ``k`` selected blocks per query and KV group, gathered per query.

    Keys and values are first laid out block-major once per forward (:meth:`block_major`: every
    selection block of every segment as one contiguous row of ``l' * D`` values), so each query
    gathers ``k`` large rows, and the scores are one batched matmul per chunk:
    ``(Hkv*C, G, Dq) @ (Hkv*C, Dq, k*l')``. The backward (``bprop``) gathers again instead of keeping
    the ``(C, k*l', D)`` copies alive until the backward pass.

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
        self.masked = masked_score(config.ms_compute_dtype)
        self.offsets = Tensor(np.arange(config.select_block_size, dtype=np.int32))
        # a constant, not ops.arange: MindSpore 2.9 fails to compile ops.arange inside a graph-mode bprop
        self.kv_head_ids = Tensor(np.arange(config.num_kv_heads, dtype=np.int32))
        # primitives (not ops.* functions) in what bprop calls, see attention_math.softmax_over_visible
        self.bmm = ops.BatchMatMul()
        self.bmm_transpose_a = ops.BatchMatMul(transpose_a=True)
        self.bmm_transpose_b = ops.BatchMatMul(transpose_b=True)
        self.row_sum = ops.ReduceSum(keep_dims=True)
        self.zeros_like = ops.ZerosLike()
        self.segment_sum = ops.UnsortedSegmentSum()

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

    def _gathered(self, q, k_blocks, v_blocks, blocks, valid, block_base, position):
        """The per-query operands: grouped queries ``(Hkv*C, G, Dq)``, gathered keys ``(Hkv*C, k*l', Dq)``
        and values, the visibility ``(Hkv*C, 1, k*l')`` and the block-major row of every slot."""
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
            self.kv_head_ids.reshape(-1, 1, 1) * per_head
        index = index.reshape(-1)
        k_sel = ops.gather(k_blocks, index, 0).reshape(kv_heads * rows, keys, dim)
        v_sel = ops.gather(v_blocks, index, 0).reshape(kv_heads * rows, keys, dim_v)
        q_sel = q.reshape(rows, kv_heads, heads // kv_heads, dim).transpose(1, 0, 2, 3).reshape(
            kv_heads * rows, heads // kv_heads, dim)
        return q_sel, k_sel, v_sel, visible.reshape(kv_heads * rows, 1, keys), index

    def _probs(self, q_sel, k_sel, visible):
        return softmax_over_visible(self.bmm_transpose_b(q_sel, k_sel) * self.scale, visible, self.masked)

    def construct(self, q, k_blocks, v_blocks, blocks, valid, block_base, position):
        rows, heads, _ = q.shape
        kv_heads = blocks.shape[0]
        q_sel, k_sel, v_sel, visible, _ = self._gathered(q, k_blocks, v_blocks, blocks, valid, block_base, position)
        out = self.bmm(self._probs(q_sel, k_sel, visible), v_sel)
        return out.reshape(kv_heads, rows, heads // kv_heads, -1).transpose(1, 0, 2, 3).reshape(rows, heads, -1)

    def bprop(self, q, k_blocks, v_blocks, blocks, valid, block_base, position, out, dout):
        """Gradients for ``q``, ``k_blocks`` and ``v_blocks`` (none through the selection)."""
        rows, heads, dim = q.shape
        kv_heads = blocks.shape[0]
        q_sel, k_sel, v_sel, visible, index = self._gathered(q, k_blocks, v_blocks, blocks, valid, block_base,
                                                             position)
        probs = self._probs(q_sel, k_sel, visible)  # (Hkv*C, G, K)
        d_out = dout.reshape(rows, kv_heads, heads // kv_heads, -1).transpose(1, 0, 2, 3).reshape(
            kv_heads * rows, heads // kv_heads, -1)
        d_probs = self.bmm_transpose_b(d_out, v_sel)
        d_scores = probs * (d_probs - self.row_sum(d_probs * probs, -1)) * self.scale
        d_q = self.bmm(d_scores, k_sel).reshape(kv_heads, rows, heads // kv_heads, dim).transpose(1, 0, 2, 3)
        slots = index.shape[0]
        d_k = self.segment_sum(self.bmm_transpose_a(d_scores, q_sel).reshape(slots, -1), index, k_blocks.shape[0])
        d_v = self.segment_sum(self.bmm_transpose_a(probs, d_out).reshape(slots, -1), index, v_blocks.shape[0])
        return (d_q.reshape(rows, heads, dim), d_k, d_v, self.zeros_like(blocks), self.zeros_like(valid),
                self.zeros_like(block_base), self.zeros_like(position))


class BlockMaskedSelectedAttention(nn.Cell):
    """The selected branch as one attention over every row before the chunk's end, masked per query to
    its selected blocks, its segment and its past (exactly the keys :class:`SelectedAttention` gathers).

    Args:
        config (NSAConfig): sizes.

    Inputs:
        q (Tensor): ``(Hkv, G*C, Dq)`` grouped queries of a chunk (``attention_math.group_queries``).
        k (Tensor): ``(R, Hkv, Dq)`` the rows before the chunk's end; ``v``: ``(R, Hkv, Dv)``.
        key_segment, key_position (Tensor): ``(R,)`` int32 segment ids and in-segment positions of those rows.
        blocks, valid (Tensor): ``(Hkv, C, k)`` selected in-segment block ids and slot validity.
        segment, position (Tensor): ``(C,)`` int32 segment ids and in-segment positions of the queries.

    Outputs:
        Tensor ``(Hkv, G*C, Dv)``.
    """

    def __init__(self, config):
        super().__init__()
        self.block = config.select_block_size
        self.scale = config.scale
        self.bmm_transpose_b = ops.BatchMatMul(transpose_b=True)

    def construct(self, q, k, v, key_segment, key_position, blocks, valid, segment, position):
        kv_heads, grouped, _ = q.shape
        rows = segment.shape[0]
        keys = k.shape[0]
        num_blocks = (keys - 1) // self.block + 1  # in-segment blocks of rows before the chunk's end
        chosen = selected_block_mask(blocks, valid, num_blocks)  # (Hkv, C, B)
        key_block = ops.broadcast_to((key_position // self.block).reshape(1, 1, keys), (kv_heads, rows, keys))
        visible = ops.logical_and(
            ops.gather_elements(chosen.astype(ms.int32), 2, key_block) > 0,
            ops.logical_and(key_segment.reshape(1, 1, -1) == segment.reshape(1, -1, 1),
                            key_position.reshape(1, 1, -1) <= position.reshape(1, -1, 1)))
        scores = (self.bmm_transpose_b(q, k.transpose(1, 0, 2)) * self.scale).reshape(
            kv_heads, grouped // rows, rows, keys)
        probs = masked_softmax(scores, visible.reshape(kv_heads, 1, rows, keys))
        return mint.bmm(probs.reshape(kv_heads, grouped, keys), v.transpose(1, 0, 2))
