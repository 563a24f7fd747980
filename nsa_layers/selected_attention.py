"""Selected-attention branch: each query attends to the raw tokens of its selected blocks, with a
token-level causal mask inside its own block.

Two exact formulations of the same branch, chosen per query chunk by ``NativeSparseAttention``:

- :class:`SelectedAttention` gathers each query's ``n`` blocks (work linear in ``T``; hand-written
  backward on the gathered operands);
- :class:`BlockMaskedSelectedAttention` attends to every row before the chunk's end through a
  per-query block mask (one matmul; cheaper while the chunk ends early, ``NSAConfig.select_dense_rows``).
"""

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from . import packing
from .attention_math import (MaskedAttention, attention_backward, attention_forward, attention_probs, masked_score,
                             visibility_bias)

__all__ = ["SelectedAttention", "BlockMaskedSelectedAttention", "selected_block_mask"]

# added to the first key position of an empty slot: beyond any in-segment position (int32 positions,
# T < 2**30), so that slot's keys are masked by the causal comparison alone
_PAST_EVERY_POSITION = 2 ** 30


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
    ``(Hkv*C, G, Dq) @ (Hkv*C, Dq, k*l')``. The backward (``bprop``) is written out on the gathered
    operands with the ``attention_math`` core formulas and scatters the key/value gradients back with
    one segment sum per chunk. In PyNative it gathers again; in graph mode common-subexpression
    elimination shares the forward's gather with it (forcing a regather measured 20% slower at
    T = 8k for no lower peak memory, before the masked-attention core stopped broadcasting, 7a7246f).

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
        # primitives (not ops.* functions with a Python branch) in what bprop calls, see attention_math
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
        and values, the score bias ``(Hkv*C, 1, k*l')`` and the block-major row of every slot."""
        rows, heads, dim = q.shape
        kv_heads, _, count = blocks.shape
        per_head = k_blocks.shape[0] // kv_heads
        dim_v = v_blocks.shape[1] // self.block
        keys = count * self.block
        # in-segment position of every gathered key; an empty slot's keys are put past every position
        first = blocks * self.block + ops.logical_not(valid).astype(blocks.dtype) * _PAST_EVERY_POSITION
        in_segment = (first.reshape(kv_heads, rows, count, 1) + self.offsets.reshape(1, 1, 1, -1)).reshape(
            kv_heads, rows, keys)
        visible = in_segment <= position.reshape(1, -1, 1)
        index = ops.minimum(block_base.reshape(1, -1, 1) + blocks, per_head - 1) + \
            self.kv_head_ids.reshape(-1, 1, 1) * per_head
        index = index.reshape(-1)
        k_sel = ops.gather(k_blocks, index, 0).reshape(kv_heads * rows, keys, dim)
        v_sel = ops.gather(v_blocks, index, 0).reshape(kv_heads * rows, keys, dim_v)
        q_sel = self._by_kv_head(q, kv_heads)
        bias = visibility_bias(visible.reshape(kv_heads * rows, 1, keys), q.dtype, self.masked)
        return q_sel, k_sel, v_sel, bias, index

    @staticmethod
    def _by_kv_head(x, kv_heads):
        """``(C, H, D)`` -> ``(Hkv*C, G, D)``, the layout of the gathered operands."""
        rows, heads, dim = x.shape
        return x.reshape(rows, kv_heads, heads // kv_heads, dim).transpose(1, 0, 2, 3).reshape(
            kv_heads * rows, heads // kv_heads, dim)

    def construct(self, q, k_blocks, v_blocks, blocks, valid, block_base, position):
        rows, heads, _ = q.shape
        kv_heads = blocks.shape[0]
        q_sel, k_sel, v_sel, bias, _ = self._gathered(q, k_blocks, v_blocks, blocks, valid, block_base, position)
        out = attention_forward(q_sel, k_sel, v_sel, bias, self.scale)[0]
        return out.reshape(kv_heads, rows, heads // kv_heads, -1).transpose(1, 0, 2, 3).reshape(rows, heads, -1)

    def bprop(self, q, k_blocks, v_blocks, blocks, valid, block_base, position, out, dout):
        """Gradients for ``q``, ``k_blocks`` and ``v_blocks`` (none through the selection)."""
        rows, heads, dim = q.shape
        kv_heads = blocks.shape[0]
        q_sel, k_sel, v_sel, bias, index = self._gathered(q, k_blocks, v_blocks, blocks, valid, block_base, position)
        probs = attention_probs(q_sel, k_sel, bias, self.scale)
        d_q, d_k, d_v = attention_backward(q_sel, k_sel, v_sel, probs, self._by_kv_head(out, kv_heads),
                                           self._by_kv_head(dout, kv_heads), self.scale)
        d_q = d_q.reshape(kv_heads, rows, heads // kv_heads, dim).transpose(1, 0, 2, 3)
        slots = index.shape[0]
        d_k = self.segment_sum(d_k.reshape(slots, -1), index, k_blocks.shape[0])
        d_v = self.segment_sum(d_v.reshape(slots, -1), index, v_blocks.shape[0])
        return (d_q.reshape(rows, heads, dim), d_k, d_v, self.zeros_like(blocks), self.zeros_like(valid),
                self.zeros_like(block_base), self.zeros_like(position))


class BlockMaskedSelectedAttention(nn.Cell):
    """The selected branch as one attention over every row before the chunk's end, masked per query to
    its selected blocks, its segment and its past (exactly the keys :class:`SelectedAttention` gathers).

    Args:
        config (NSAConfig): sizes.

    Inputs:
        q (Tensor): ``(Hkv, G*C, Dq)`` grouped queries of a chunk (``attention_math.group_queries``).
        k (Tensor): ``(Hkv, R, Dq)`` the rows before the chunk's end, head-major; ``v``: ``(Hkv, R, Dv)``.
        key_segment, key_position (Tensor): ``(R,)`` int32 segment ids and in-segment positions of those rows.
        blocks, valid (Tensor): ``(Hkv, C, k)`` selected in-segment block ids and slot validity.
        segment, position (Tensor): ``(C,)`` int32 segment ids and in-segment positions of the queries.

    Outputs:
        Tensor ``(Hkv, G*C, Dv)``.
    """

    def __init__(self, config):
        super().__init__()
        self.block = config.select_block_size
        self.masked = masked_score(config.ms_compute_dtype)
        self.attention = MaskedAttention(config.scale)

    def construct(self, q, k, v, key_segment, key_position, blocks, valid, segment, position):
        kv_heads, _, _ = q.shape
        rows = segment.shape[0]
        keys = k.shape[1]
        dtype = q.dtype
        num_blocks = (keys - 1) // self.block + 1  # in-segment blocks of rows before the chunk's end
        chosen = selected_block_mask(blocks, valid, num_blocks).astype(dtype).reshape(kv_heads * rows, num_blocks)
        key_block = (key_position // self.block).reshape(1, keys) == ops.arange(
            0, num_blocks, dtype=key_position.dtype).reshape(-1, 1)
        # the key's block is selected: a matmul with the keys' one-hot blocks (exact 0/1 sums)
        in_selected = ops.matmul(chosen, key_block.astype(dtype)).reshape(kv_heads, rows, keys) > 0.5
        causal = ops.logical_and(key_segment.reshape(1, -1) == segment.reshape(-1, 1),
                                 key_position.reshape(1, -1) <= position.reshape(-1, 1))
        visible = ops.logical_and(in_selected, causal.reshape(1, rows, keys))
        return self.attention(q, k, v, visibility_bias(visible, dtype, self.masked))[0]
