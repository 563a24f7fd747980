"""Block selection: score each selection block by the exact token overlap of the compression
probabilities (the paper's Eq. 9 read 1-based), sum over each KV group, force the initial and
local blocks, take the top-k with ties to the lower index. Never a future block, never a block
outside the segment, never a duplicate; slots beyond the available blocks are marked invalid."""

import mindspore as ms
from mindspore import nn, ops

from .attention_math import MASKED, column_tiled, row_tiled
from .layout import window_rows_tensor

__all__ = ["BlockSelector", "overlap_weights"]

FORCED = 1e30  # score of a forced block: above every importance (probability sums are <= G)


def overlap_weights(compress_block_size, compress_stride, select_block_size):
    """Weight of compressed window ``i = j*M + o`` for selection block ``j``, by offset ``o``.

    Window ``i`` covers tokens ``[i*d, i*d + l)``, block ``j`` covers ``[j*l', (j+1)*l')``; the
    weight is their token overlap in units of ``d``: ``min(o + N, M) - max(o, 0)`` for
    ``o = -(N-1) .. M-1`` (``M = l'/d``, ``N = l/d``). For 32/16/64: ``(1, 2, 2, 2, 1)`` over windows
    ``4j-1 .. 4j+3``. (The Ascend kernel's mapping is one window later: ``4j .. 4j+4``.)

    Returns:
        list of ``(offset, weight)`` with positive weights.
    """
    m = select_block_size // compress_stride
    n = compress_block_size // compress_stride
    return [(o, min(o + n, m) - max(o, 0)) for o in range(-(n - 1), m)]


class BlockSelector(nn.Cell):
    """Top-k selection blocks per query and KV group (no gradient flows through selection).

    Args:
        config (NSAConfig): sizes.

    Inputs:
        probs (Tensor): ``(Hkv, G, C, S)`` compression probabilities of a chunk (zero outside the
            query's segment and for windows not yet visible, except in the rows of queries that see no
            window: any finite values there, since such a query's only candidate is block 0).
        first_window (Tensor): ``(C,)`` int32, window slot of the first window of each query's segment.
        position (Tensor): ``(C,)`` int32 in-segment positions.
        num_blocks (int): static bound on the blocks a query of the chunk can select (``own + 1``).

    Outputs:
        ``(blocks, valid)``: ``(Hkv, C, k)`` int32 in-segment block ids, best first, and ``(Hkv, C, k)``
        bool, False for slots left empty because the query has fewer than ``k`` blocks.
    """

    def __init__(self, config):
        super().__init__()
        self.block = config.select_block_size
        self.count = config.select_block_count
        self.num_init = config.num_init_blocks
        self.num_local = config.num_local_blocks
        self.windows_per_block = config.select_block_size // config.compress_stride
        self.left = config.compress_block_size // config.compress_stride - 1
        self.weights = overlap_weights(config.compress_block_size, config.compress_stride, config.select_block_size)

    def importance(self, probs, first_window, num_blocks):
        """Group-summed block importance ``(Hkv, C, num_blocks)`` from ``probs (Hkv, G, C, S)``."""
        kv_heads, group, rows, slots = probs.shape
        per_block = self.windows_per_block
        local = num_blocks * per_block
        # float32 whatever the compute dtype: the MASKED / FORCED scores below need its range. The sum
        # over the group is a matmul with ones (MindSpore's CPU ReduceSum over an inner axis is slow)
        summed = ops.matmul(ops.ones((kv_heads, 1, group), ms.float32),
                            ops.stop_gradient(probs).astype(ms.float32).reshape(kv_heads, group, rows * slots))
        summed = summed.reshape(kv_heads, rows, slots)
        summed = ops.cat((summed, ops.zeros((kv_heads, rows, 1), summed.dtype)), axis=2)
        # probabilities of the query's own segment by in-segment window index (slot S holds a 0)
        index = window_rows_tensor(first_window, local, slots + 1)
        by_window = ops.gather_elements(summed, 2, ops.broadcast_to(index.reshape(1, rows, local),
                                                                   (kv_heads, rows, local)))
        padded = ops.cat((ops.zeros((kv_heads, rows, self.left), summed.dtype), by_window,
                          ops.zeros((kv_heads, rows, per_block), summed.dtype)), axis=2)
        total = None
        for offset, weight in self.weights:
            first = self.left + offset
            term = padded[:, :, first:first + local:per_block] * weight
            total = term if total is None else total + term
        return total

    def construct(self, probs, first_window, position, num_blocks):
        kv_heads, _, rows, _ = probs.shape
        importance = self.importance(probs, first_window, num_blocks)
        # (Hkv, C, num_blocks) comparisons on explicitly tiled operands (see attention_math)
        own = column_tiled(position // self.block, num_blocks)
        block_ids = row_tiled(ops.arange(0, num_blocks, dtype=ms.int32), rows)
        candidate = block_ids <= own
        forced = ops.logical_and(candidate, ops.logical_or(block_ids < self.num_init,
                                                           block_ids > own - self.num_local))
        candidate, forced = (ops.tile(x.reshape(1, rows, num_blocks), (kv_heads, 1, 1)) for x in (candidate, forced))
        score = ops.where(candidate, importance, ops.full_like(importance, MASKED))
        score = ops.masked_fill(score, forced, FORCED)
        if num_blocks < self.count:
            empty = ops.full((kv_heads, rows, self.count - num_blocks), MASKED, dtype=score.dtype)
            score = ops.cat((score, empty), axis=2)
        # ops.sort is stable: equal scores keep ascending block order (ties to the lower index)
        order = ops.sort(score, axis=-1, descending=True)[1][..., :self.count].astype(ms.int32)
        valid = ops.gather_elements(score, 2, order) > MASKED / 2
        return order, valid
