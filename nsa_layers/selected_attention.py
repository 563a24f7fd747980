"""Selected-attention branch: each query attends to the raw tokens of its selected blocks, with a
token-level causal mask inside its own block.

Two exact formulations of the same branch, chosen per query chunk by ``NativeSparseAttention``:

- :class:`SelectedAttention` groups the chunk's (query, slot) pairs by the block they read, so each
  block is read once per tile of pairs, not copied per query (work linear in ``T``);
- :class:`BlockMaskedSelectedAttention` attends to every row before the chunk's end through a
  per-query block mask (one matmul; cheaper while the chunk ends early, ``NSAConfig.select_dense_rows``).
"""

from typing import TypedDict

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from .attention_math import MaskedAttention, RowSoftmax, column_tiled, masked_score, row_tiled, visibility_bias
from .layout import window_rows_tensor

__all__ = ["SelectedAttention", "BlockMaskedSelectedAttention", "RowPermutation", "SelectedTilePlan",
           "selected_tile_plan", "block_grouped_slots", "selected_block_mask", "tile_pairs"]

# primitives in what bprop calls (see attention_math)
_GATHER = ops.Gather()
_CONCAT_ROWS = ops.Concat(0)
_ZEROS_LIKE = ops.ZerosLike()


def selected_block_mask(blocks, valid, num_blocks):
    """``(Hkv, C, k)`` selected block ids and validity -> ``(Hkv, C, num_blocks)`` bool: block selected."""
    kv_heads, rows, count = blocks.shape
    ids = ops.arange(0, num_blocks, dtype=blocks.dtype).reshape(1, 1, 1, -1)
    hit = ops.logical_and(blocks.reshape(kv_heads, rows, count, 1) == ids, valid.reshape(kv_heads, rows, count, 1))
    return hit.any(axis=2)


# query rows (a pair's G heads count G) per tile of the block-grouped layout: 64 matches the 64-token
# blocks' matmuls; the pairs per tile stay within 4..16 so that tiles neither degenerate nor pad much
_TILE_ROWS = 64


def tile_pairs(group_size):
    """(query, slot) pairs per tile of :class:`SelectedAttention` for KV groups of ``group_size`` heads."""
    return min(16, max(4, _TILE_ROWS // group_size))


def block_grouped_slots(block_group, num_groups, tile):
    """The block-grouped layout of :class:`SelectedAttention`: (query, slot) pairs grouped by the
    block they read, each group padded to whole tiles of ``tile`` pairs.

    Args:
        block_group (Tensor): ``(P,)`` int32 in ``[0, num_groups)``, the (KV head, block) each pair reads.
        num_groups (int): static number of groups.
        tile (int): pairs per tile.

    Returns:
        ``(slot, pair_of_slot, tile_group)``: ``(P,)`` int32 row of each pair in the layout;
        ``(R * tile,)`` int32 pair of each row, ``P`` for a padding row; ``(R,)`` int32 group of each
        tile (0 for unused tiles). ``R = ceil(P / tile) + min(num_groups, P)`` bounds
        ``sum_g ceil(count_g / tile)`` for every grouping (at most ``tile - 1`` padding rows per
        non-empty group).
    """
    pairs = block_group.shape[0]
    capacity = (pairs + tile - 1) // tile + min(num_groups, pairs)
    pair_ids = ops.arange(0, pairs, dtype=ms.int32)
    # rank of each pair among the pairs before it in group order (any order within a group will do)
    order = ops.sort(block_group.astype(ms.float32))[1].astype(ms.int32)
    sorted_rank = ops.tensor_scatter_update(pair_ids, order.reshape(-1, 1), pair_ids)
    counts = ops.unsorted_segment_sum(ops.ones((pairs,), ms.int32), block_group, num_groups)
    tiles = (counts + (tile - 1)) // tile
    group_first_pair = ops.cumsum(counts, 0) - counts
    group_first_tile = ops.cumsum(tiles, 0) - tiles
    slot = (ops.gather(group_first_tile, block_group, 0) * tile + sorted_rank
            - ops.gather(group_first_pair, block_group, 0))
    pair_of_slot = ops.tensor_scatter_update(ops.full((capacity * tile,), pairs, dtype=ms.int32),
                                             slot.reshape(-1, 1), pair_ids)
    # a used tile's first row always holds a pair; unused tiles read group 0 (their rows are padding)
    tile_group = ops.gather(ops.cat((block_group, ops.zeros((1,), ms.int32))), pair_of_slot[::tile], 0)
    return slot, pair_of_slot, tile_group


class RowPermutation(nn.Cell):
    """``x`` with a zero row appended, gathered by ``index``: rows of ``x`` moved to new places, index
    ``len(x)`` giving a zero row. Each row of ``x`` goes to at most one place, so the backward is the
    gather by ``inverse`` (the output row of each row of ``x``, or ``len(index)`` for none), not a
    scatter-add (MindSpore's CPU UnsortedSegmentSum is several times slower than Gather).

    Args:
        index_pads (bool): ``index`` may hold ``len(x)``; when False, no zero row is appended to ``x``
            (appending copies ``x``).
        inverse_pads (bool): ``inverse`` may hold ``len(index)`` (some row of ``x`` goes nowhere);
            when False, the backward appends no zero row to the output's gradient.

    Inputs:
        x (Tensor): ``(N, F)``.
        index (Tensor): ``(M,)`` int32 in ``[0, N]``; ``inverse``: ``(N,)`` int32 in ``[0, M]``.

    Outputs:
        Tensor ``(M, F)``.
    """

    def __init__(self, index_pads=True, inverse_pads=True):
        super().__init__()
        self.index_pads = index_pads
        self.inverse_pads = inverse_pads

    def construct(self, x, index, inverse):
        if self.index_pads:  # (both arms assign: see attention_math on branches in graph mode)
            source = _CONCAT_ROWS((x, _ZEROS_LIKE(x[:1])))
        else:
            source = x
        return _GATHER(source, index, 0)

    def bprop(self, x, index, inverse, out, dout):
        if self.inverse_pads:
            source = _CONCAT_ROWS((dout, _ZEROS_LIKE(dout[:1])))
        else:
            source = dout
        return _GATHER(source, inverse, 0), _ZEROS_LIKE(index), _ZEROS_LIKE(inverse)


class SelectedTilePlan(TypedDict):
    """Where :class:`SelectedAttention` moves every row, for one query chunk (all int32).

    Each ``a_from_b`` is a gather index: for every row of layout ``a``, its row in layout ``b``
    (one past the end of ``b`` where ``a`` has a row that ``b`` lacks: a zero row). The layouts:
    *tiles* (``R`` tiles of ``tile`` (query, slot) pairs of one block, times ``G`` heads each),
    *softmax* rows (per KV head, query and query head, the ``k`` slots' ``l'`` keys side by side) and
    *slots* (slot-major pairs, so the sum over the slots is one matmul).

    Fields:
        tile_blocks: ``(R,)`` row of ``k_blocks`` / ``v_blocks`` each tile reads.
        tile_queries: ``(R * tile,)`` (KV head, query) row each tile row reads, ``Hkv*C`` for padding.
        softmax_from_tiles, tiles_from_softmax: the score and probability rows, both ways.
        slots_from_tiles, tiles_from_slots: the output rows, both ways.
        key_bias: ``(Hkv*C*k,)`` row of the bias table of each pair: its last visible key offset + 1
            (all of a past block, up to the query in its own block, none of an empty slot).
    """

    tile_blocks: Tensor
    tile_queries: Tensor
    softmax_from_tiles: Tensor
    tiles_from_softmax: Tensor
    slots_from_tiles: Tensor
    tiles_from_slots: Tensor
    key_bias: Tensor


def selected_tile_plan(blocks, valid, first_block, position, num_blocks, blocks_per_head, group, tile, block_size):
    """The :class:`SelectedTilePlan` of a query chunk: its (query, slot) pairs grouped by the block
    they read (:func:`block_grouped_slots`), and every permutation the branch applies.

    Args:
        blocks, valid (Tensor): ``(Hkv, C, k)`` selected in-segment block ids and slot validity.
        first_block (Tensor): ``(C,)`` int32 block slot of the first block of each query's segment.
        position (Tensor): ``(C,)`` int32 in-segment positions.
        num_blocks (int): the block slots the chunk can read (static; an empty slot's block beyond
            them is clipped, its keys are all masked).
        blocks_per_head (int): ``B``, block slots per KV head in ``k_blocks``.
        group (int): query heads per KV head ``G``.
        tile (int): pairs per tile (:func:`tile_pairs`).
        block_size (int): ``l'``.
    """
    kv_heads, rows, count = blocks.shape
    pairs = kv_heads * rows * count  # pair (h, c, s): KV head h, query c, slot s
    block = ops.minimum(first_block.reshape(1, -1, 1) + blocks, num_blocks - 1)
    kv_head = ops.arange(0, kv_heads, dtype=ms.int32).reshape(-1, 1, 1)
    slot, pair_of_slot, tile_group = block_grouped_slots((block + kv_head * num_blocks).reshape(-1),
                                                         kv_heads * num_blocks, tile)
    tile_head = tile_group // num_blocks
    query_of_slot = pair_of_slot // count
    slot_of_pair = pair_of_slot - query_of_slot * count
    head_ids = ops.arange(0, group, dtype=ms.int32)
    tiles_from_softmax = (query_of_slot.reshape(-1, 1) * group + head_ids.reshape(1, -1)) * count + \
        slot_of_pair.reshape(-1, 1)
    slots_to_pairs = (pair_of_slot % count) * (kv_heads * rows) + pair_of_slot // count
    last = ops.tile(position.reshape(1, -1, 1), (kv_heads, 1, 1)) - blocks * block_size
    last = ops.where(valid, ops.minimum(last, block_size - 1), ops.full_like(last, -1))
    return {
        "tile_blocks": tile_head * blocks_per_head + tile_group - tile_head * num_blocks,
        "tile_queries": query_of_slot,
        "softmax_from_tiles": (slot.reshape(kv_heads, rows, 1, count) * group
                               + head_ids.reshape(1, 1, -1, 1)).reshape(-1),
        "tiles_from_softmax": ops.minimum(tiles_from_softmax, pairs * group).reshape(-1),  # padding: the zero row
        "slots_from_tiles": slot.reshape(kv_heads * rows, count).transpose(1, 0).reshape(-1),
        "tiles_from_slots": ops.where(pair_of_slot < pairs, slots_to_pairs, pair_of_slot),
        "key_bias": last.reshape(-1) + 1,
    }


class SelectedAttention(nn.Cell):
    """Attention over the tokens of ``k`` selected blocks per query and KV group, grouped by block.

    Keys and values are laid out block-major once per forward (:meth:`block_major`: every selection
    block of every segment as one row of ``l' * D`` values). A chunk's (query, slot) pairs are grouped
    by the block they read and the groups padded to tiles of ``tile_pairs(G)`` pairs
    (:func:`selected_tile_plan`), so each tile reads one block: the scores are one batched matmul
    ``(R, tile*G, Dq) @ (R, Dq, l')`` that reads every selected block once per tile, not once per
    query. The scores move to (query, head) rows for the softmax over the ``k * l'`` keys and the
    probabilities back to tiles (:class:`RowPermutation`); the outputs return to their queries and
    are summed over the slots. Masked keys (after the query in its own block, and every key of an
    empty slot) get probability 0. See ``docs/design.md``.

    Args:
        config (NSAConfig): sizes.

    Inputs:
        q (Tensor): ``(C, H, Dq)`` a chunk of queries.
        k_blocks (Tensor): ``(Hkv * B, l' * Dq)`` from :meth:`block_major`; ``v_blocks``: ``(Hkv * B, l' * Dv)``.
        blocks, valid (Tensor): ``(Hkv, C, k)`` selected in-segment block ids and slot validity.
        first_block (Tensor): ``(C,)`` int32 block slot of the first block of each query's segment.
        position (Tensor): ``(C,)`` int32 in-segment positions.
        num_blocks (int): the block slots the chunk can read (those starting before its end); at most ``B``.

    Outputs:
        Tensor ``(C, H, Dv)``.
    """

    def __init__(self, config):
        super().__init__()
        self.block = config.select_block_size
        self.scale = config.scale
        self.tile = tile_pairs(config.group_size)
        # row r: 0 for key offsets < r, masked from r on (a slot whose last visible offset is r - 1)
        offsets = np.arange(self.block)
        self.bias_table = Tensor(np.where(offsets.reshape(1, -1) < np.arange(self.block + 1).reshape(-1, 1), 0.0,
                                          masked_score(config.ms_compute_dtype)).astype(np.float32))
        # every (pair, head) row has a tile row, but tiles have padding rows: no zero row is needed
        # when moving to the pairs (forward) nor when moving to the tiles (backward)
        self.to_pairs = RowPermutation(index_pads=False, inverse_pads=True)
        self.to_tiles = RowPermutation(index_pads=True, inverse_pads=False)
        self.softmax = RowSoftmax()
        self.bmm_transpose_b = ops.BatchMatMul(transpose_b=True)

    def block_major(self, x, block_starts):
        """``x (T, Hkv, D)`` -> ``(Hkv * B, l' * D)``: block ``b`` of head ``h`` is row ``h * B + b``.

        ``block_starts (B,)`` are the blocks' first rows (``PackedLayout``); rows past a segment's end
        belong to the next segment or are clipped, and are masked by position in :meth:`construct`.
        """
        total, kv_heads, dim = x.shape
        count = block_starts.shape[0]
        rows = window_rows_tensor(block_starts, self.block, total)  # (B, l')
        flat = rows.reshape(1, -1) * kv_heads + ops.arange(0, kv_heads, dtype=ms.int32).reshape(-1, 1)
        return ops.gather(x.reshape(total * kv_heads, dim), flat.reshape(-1), 0).reshape(
            kv_heads * count, self.block * dim)

    def construct(self, q, k_blocks, v_blocks, blocks, valid, first_block, position, num_blocks):
        rows, heads, dim = q.shape
        kv_heads, _, count = blocks.shape
        group = heads // kv_heads
        dim_v = v_blocks.shape[1] // self.block
        plan = selected_tile_plan(blocks, valid, first_block, position, num_blocks, k_blocks.shape[0] // kv_heads,
                                  group, self.tile, self.block)
        tiles = plan["tile_blocks"].shape[0]
        # gather: each tile's block, each tile row's query (scaled; a zero row for padding)
        k_tiles = ops.gather(k_blocks, plan["tile_blocks"], 0).reshape(tiles, self.block, dim)
        v_tiles = ops.gather(v_blocks, plan["tile_blocks"], 0).reshape(tiles, self.block, dim_v)
        q_rows = q.reshape(rows, kv_heads, group * dim).transpose(1, 0, 2).reshape(kv_heads * rows, group * dim)
        q_rows = ops.cat((q_rows * self.scale, ops.zeros((1, group * dim), q.dtype)), 0)
        q_tiles = ops.gather(q_rows, plan["tile_queries"], 0).reshape(tiles, self.tile * group, dim)
        # matmul, then the softmax over each (query, head)'s k * l' keys
        scores = self.bmm_transpose_b(q_tiles, k_tiles).reshape(tiles * self.tile * group, self.block)
        scores = self.to_pairs(scores, plan["softmax_from_tiles"], plan["tiles_from_softmax"])
        scores = scores.reshape(kv_heads * rows, group, count * self.block)
        bias = ops.gather(self.bias_table.astype(q.dtype), plan["key_bias"], 0)
        probs = self.softmax(scores + ops.tile(bias.reshape(kv_heads * rows, 1, count * self.block), (1, group, 1)))
        probs = self.to_tiles(probs.reshape(-1, self.block), plan["tiles_from_softmax"], plan["softmax_from_tiles"])
        # matmul with the values, then the sum over the slots (one matmul with a row of ones)
        out = ops.bmm(probs.reshape(tiles, self.tile * group, self.block), v_tiles)
        out = self.to_pairs(out.reshape(tiles * self.tile, group * dim_v), plan["slots_from_tiles"],
                            plan["tiles_from_slots"])
        out = ops.matmul(ops.ones((1, count), out.dtype), out.reshape(count, kv_heads * rows * group * dim_v))
        return out.reshape(kv_heads, rows, group, dim_v).transpose(1, 0, 2, 3).reshape(rows, heads, dim_v)


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
        causal = ops.logical_and(row_tiled(key_segment, rows) == column_tiled(segment, keys),
                                 row_tiled(key_position, rows) <= column_tiled(position, keys))
        visible = ops.logical_and(in_selected, causal.reshape(1, rows, keys))
        return self.attention(q, k, v, visibility_bias(visible, dtype, self.masked))[0]
