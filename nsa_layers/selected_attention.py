"""Selected-attention branch: each query attends to the raw tokens of its selected blocks, with a
token-level causal mask inside its own block.

:class:`SelectedAttention` is the branch, one call from the core; it runs two exact formulations,
chosen per query chunk:

- :class:`BlockMaskedSelectedAttention` attends to every row before the chunk's end through a
  per-query block mask (one matmul; cheaper while the chunk ends early, ``NSAConfig.select_dense_rows``);
- :class:`BlockGroupedSelectedAttention` groups the chunk's (query, slot) pairs by the block they
  read, so each block is read once per tile of pairs, not copied per query (work linear in ``T``).
"""

from typing import TypedDict

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.ops import constexpr

from .attention_math import (
    MaskedAttention,
    chunk_buckets,
    column_tiled,
    group_queries,
    index_range,
    loop_buffer,
    loop_rows,
    masked_score,
    padded_rows,
    row_dot,
    row_slice,
    row_tiled,
    ungroup_outputs,
    visibility_bias,
)
from .layout import window_rows_tensor
from .precision import precision_of

__all__ = ["SelectedAttention", "BlockGroupedSelectedAttention", "BlockMaskedSelectedAttention", "SelectedTilePlan",
           "dense_chunks", "selected_tile_plan", "selected_key_limit", "block_grouped_slots", "selected_block_mask",
           "tile_pairs"]

# primitives in what bprop calls (see attention_math)
_GATHER = ops.Gather()
_CONCAT_ROWS = ops.Concat(0)
_ZEROS_LIKE = ops.ZerosLike()
_ONES_LIKE = ops.OnesLike()
_CAST = ops.Cast()
_TILE = ops.Tile()
_SOFTMAX = ops.Softmax(axis=-1)
_MATMUL = ops.MatMul()
_BMM = ops.BatchMatMul()
_BMM_TRANSPOSE_A = ops.BatchMatMul(transpose_a=True)
_BMM_TRANSPOSE_B = ops.BatchMatMul(transpose_b=True)
_SCATTER_UPDATE = ops.TensorScatterUpdate()
_SEGMENT_SUM = ops.UnsortedSegmentSum()
_SORT = ops.Sort()
_CUMSUM = ops.CumSum()
_MINIMUM = ops.Minimum()
_SELECT = ops.Select()


def _with_zero_row(x):
    """``(N, F)`` -> ``(N + 1, F)``: a zero row appended (row ``N``, for indices that point nowhere)."""
    return _CONCAT_ROWS((x, _ZEROS_LIKE(x[:1])))


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
    """(query, slot) pairs per tile of :class:`BlockGroupedSelectedAttention` for KV groups of ``group_size``
    heads."""
    return min(16, max(4, _TILE_ROWS // group_size))


@constexpr
def _tile_capacity(pairs, num_groups, tile):
    """``R`` of :func:`block_grouped_slots`, in Python: a static branch in a function that both a
    forward and a bprop call makes MindSpore 2.9 fail in MindFormers' model ("func graph is empty")."""
    return -(-pairs // tile) + min(num_groups, pairs)


def block_grouped_slots(block_group, num_groups, tile):
    """The block-grouped layout of :class:`BlockGroupedSelectedAttention`: (query, slot) pairs grouped
    by the block they read, each group padded to whole tiles of ``tile`` pairs.

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
    capacity = _tile_capacity(pairs, num_groups, tile)
    pair_ids = index_range(pairs)
    # rank of each pair among the pairs before it in group order (any order within a group will do)
    order = _CAST(_SORT(_CAST(block_group, ms.float32))[1], ms.int32)
    sorted_rank = _SCATTER_UPDATE(pair_ids, order.reshape(-1, 1), pair_ids)
    counts = _SEGMENT_SUM(_ONES_LIKE(block_group), block_group, num_groups)
    tiles = (counts + (tile - 1)) // tile
    group_first_pair = _CUMSUM(counts, 0) - counts
    group_first_tile = _CUMSUM(tiles, 0) - tiles
    slot = _GATHER(group_first_tile, block_group, 0) * tile + sorted_rank - _GATHER(group_first_pair, block_group, 0)
    pair_of_slot = _SCATTER_UPDATE(_ZEROS_LIKE(index_range(capacity * tile)) + pairs, slot.reshape(-1, 1), pair_ids)
    # a used tile's first row always holds a pair; unused tiles read group 0 (their rows are padding)
    tile_group = _GATHER(_CONCAT_ROWS((block_group, _ZEROS_LIKE(block_group[:1]))), pair_of_slot[::tile], 0)
    return slot, pair_of_slot, tile_group


class SelectedTilePlan(TypedDict):
    """Where :class:`BlockGroupedSelectedAttention` moves every row, for one query chunk (all int32).

    Each ``a_from_b`` is a gather index: for every row of layout ``a``, its row in layout ``b``
    (one past the end of ``b`` where ``a`` has a row that ``b`` lacks: a zero row). The layouts:
    *tiles* (``R`` tiles of ``tile`` (query, slot) pairs of one block, times ``G`` heads each),
    *softmax* rows (per KV head, query and query head, the ``k`` slots' ``l'`` keys side by side) and
    *slots* (slot-major pairs, so the sum over the slots is one matmul).

    Fields:
        tile_blocks: ``(R,)`` row of ``k_blocks`` / ``v_blocks`` each tile reads.
        tile_queries: ``(R * tile,)`` (KV head, query) row each tile row reads, ``Hkv*C`` for padding.
        softmax_from_tiles, tiles_from_softmax: the score and probability rows, both ways.
        slots_from_tiles: the output rows (slot-major) from the tiles.
        key_bias: ``(Hkv*C*k,)`` row of the bias table of each pair: its last visible key offset + 1
            (all of a past block, up to the query in its own block, none of an empty slot).
    """

    tile_blocks: Tensor
    tile_queries: Tensor
    softmax_from_tiles: Tensor
    tiles_from_softmax: Tensor
    slots_from_tiles: Tensor
    key_bias: Tensor


def selected_key_limit(blocks, valid, position, block_size):
    """Last visible key offset inside each selected block: all ``l'`` keys of a past block, the keys
    up to the query in its own block, none (``-1``) in an empty slot.

    Args:
        blocks, valid (Tensor): selected in-segment block ids and slot validity, any shape.
        position (Tensor): the query's in-segment position, the shape of ``blocks`` (tiled).
        block_size (int): ``l'``.

    Returns:
        int32 Tensor of the shape of ``blocks``, in ``[-1, l' - 1]`` (primitives only: bprops call it).
    """
    last = position - blocks * block_size
    return _SELECT(valid, _MINIMUM(last, block_size - 1), _ZEROS_LIKE(last) - 1)


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
    block = _MINIMUM(first_block.reshape(1, -1, 1) + blocks, num_blocks - 1)
    kv_head = index_range(kv_heads).reshape(-1, 1, 1)
    slot, pair_of_slot, tile_group = block_grouped_slots((block + kv_head * num_blocks).reshape(-1),
                                                         kv_heads * num_blocks, tile)
    tile_head = tile_group // num_blocks
    query_of_slot = pair_of_slot // count
    slot_of_pair = pair_of_slot - query_of_slot * count
    head_ids = index_range(group)
    tiles_from_softmax = (query_of_slot.reshape(-1, 1) * group + head_ids.reshape(1, -1)) * count + \
        slot_of_pair.reshape(-1, 1)
    last = selected_key_limit(blocks, valid, _TILE(position.reshape(1, -1, 1), (kv_heads, 1, 1)), block_size)
    return {
        "tile_blocks": tile_head * blocks_per_head + tile_group - tile_head * num_blocks,
        "tile_queries": query_of_slot,
        "softmax_from_tiles": (slot.reshape(kv_heads, rows, 1, count) * group
                               + head_ids.reshape(1, 1, -1, 1)).reshape(-1),
        "tiles_from_softmax": _MINIMUM(tiles_from_softmax, pairs * group).reshape(-1),  # padding: the zero row
        "slots_from_tiles": slot.reshape(kv_heads * rows, count).transpose(1, 0).reshape(-1),
        "key_bias": last.reshape(-1) + 1,
    }


@constexpr
def dense_chunks(total, chunk, row_offset, dense_rows):
    """How many of the query chunks (``chunk`` rows each, the last one shorter) of ``total`` queries at
    rows ``row_offset ..`` end by row ``dense_rows``: those the block-masked formulation computes."""
    return len([c0 for c0 in range(0, total, chunk) if row_offset + min(total, c0 + chunk) <= dense_rows])


@constexpr
def _reach(total, block_slots, chunk, block, dense_rows, row_offset):
    """Static ``(first, last, num_blocks, c0, c1)`` ranges of the query chunks after the dense ones
    (``chunk_buckets``): chunks ``first .. last - 1``, rows ``c0 .. c1 - 1`` of the ``total`` queries,
    reading the block slots the range's last chunk can reach: block slots are in row order, so a chunk
    ending at row ``c1`` reaches at most ``c1 // l' + (B - T // l')`` of them (``packing.max_windows``),
    where ``row_offset + total <= T`` in place of ``T`` bounds the reach from above."""
    end = row_offset + total
    return tuple((first, last, min(block_slots, (row_offset + last * chunk) // block + block_slots - end // block),
                  first * chunk, min(total, last * chunk))
                 for first, last in chunk_buckets(dense_chunks(total, chunk, row_offset, dense_rows),
                                                  -(-total // chunk)))


class SelectedAttention(nn.Cell):
    """The selected branch (paper Eq. 12): attention over the tokens of each query's selected blocks,
    ``(Tq, H, Dv)``.

    The query chunks that end by row ``select_dense_rows`` (:func:`dense_chunks`) go through
    :class:`BlockMaskedSelectedAttention`, one call per chunk on the rows before its end; the later
    ones through :class:`BlockGroupedSelectedAttention` on the keys and values laid out block-major.

    Args:
        config (NSAConfig): sizes.
        precision (Precision, optional): the enclosing layer's; default decided from ``config``.

    Inputs:
        q (Tensor): ``(Tq, H, Dq)``; k, v (Tensor): ``(T, Hkv, Dq)`` and ``(T, Hkv, Dv)``, the keys'
            ``T`` rows.
        blocks, valid (Tensor): ``(Tq, Hkv, n)`` selected in-segment block ids and slot validity.
        layout (PackedLayout): the keys' (``layout.packed_layout``); queries (QueryLayout): the query
            rows' (``layout.query_layout``).

    Outputs:
        Tensor ``(Tq, H, Dv)``.
    """

    def __init__(self, config, precision=None):
        super().__init__()
        self.chunk = config.query_chunk_size
        self.dense_rows = config.select_dense_rows
        self.kv_heads = config.num_kv_heads
        self.block_masked = BlockMaskedSelectedAttention(config, precision)
        self.block_grouped = BlockGroupedSelectedAttention(config, precision)

    def construct(self, q, k, v, blocks, valid, layout, queries):
        chunk = self.chunk
        chunks = queries["chunks"]
        offset = queries["row_offset"]
        dense = dense_chunks(q.shape[0], chunk, offset, self.dense_rows)
        outs = []
        # head-major keys and values cut into the chunks once (unused, and compiled away, without dense chunks)
        k_pieces = _split_chunks(k.transpose(1, 0, 2), chunk, 1)
        v_pieces = _split_chunks(v.transpose(1, 0, 2), chunk, 1)
        for j in range(dense):
            c0, c1 = chunks[j]
            end = offset + c1  # the chunk's end among the keys
            outs.append(ungroup_outputs(self.block_masked(
                group_queries(q[c0:c1], self.kv_heads), _leading_rows(k_pieces, chunk, end),
                _leading_rows(v_pieces, chunk, end), layout["segment"][:end], layout["position"][:end],
                blocks[c0:c1].transpose(1, 0, 2), valid[c0:c1].transpose(1, 0, 2), queries["segment"][c0:c1],
                queries["position"][c0:c1]), c1 - c0))
        if dense < len(chunks):
            grouped = self.block_grouped(q, self.block_grouped.block_major(k, layout["block_starts"]),
                                         self.block_grouped.block_major(v, layout["block_starts"]), blocks, valid,
                                         queries["first_block"], queries["position"], offset)
            outs.append(row_slice(grouped, dense * chunk, grouped.shape[0]))
        return outs[0] if len(outs) == 1 else ops.cat(outs, 0)


def _leading_rows(pieces, chunk, end):
    """Rows ``0 .. end - 1`` of head-major rows split into pieces of ``chunk`` rows (``(Hkv, r_i, D)``
    each) -> ``(Hkv, end, D)``: whole pieces, then the head of the piece holding row ``end - 1`` (slices
    of pieces, so each gradient is piece-sized; no copy for a single whole piece)."""
    whole = end // chunk
    rest = end - whole * chunk
    rows = pieces[:whole]
    if rest:  # the head of the next piece (all of it if it is the shorter last one)
        rows += (pieces[whole] if pieces[whole].shape[1] == rest else pieces[whole][:, :rest],)
    return rows[0] if len(rows) == 1 else ops.cat(rows, 1)


def _split_chunks(x, chunk, axis):
    """``x`` split along ``axis`` into pieces of ``chunk`` rows (the last one shorter), as a tuple.

    One ``Split`` primitive, whose backward joins the pieces' gradients (slicing each piece instead
    gives every piece a gradient the size of ``x``; ``docs/design.md``).
    """
    total = x.shape[axis]
    whole = total // chunk
    if whole * chunk == total:
        return ops.Split(axis, whole)(x)
    tail = ops.narrow(x, axis, whole * chunk, total - whole * chunk)
    if whole == 0:
        return (tail,)
    return ops.Split(axis, whole)(ops.narrow(x, axis, 0, whole * chunk)) + (tail,)


class BlockGroupedSelectedAttention(nn.Cell):
    """Attention over the tokens of ``k`` selected blocks per query and KV group, grouped by block,
    over a whole sequence.

    Keys and values are laid out block-major once per forward (:meth:`block_major`: every selection
    block of every segment as one row of ``l' * D`` values). A chunk's (query, slot) pairs are grouped
    by the block they read and the groups padded to tiles of ``tile_pairs(G)`` pairs
    (:func:`selected_tile_plan`), so each tile reads one block: gather (each tile's block, each tile
    row's query) -> matmul ``(R, tile*G, Dq) @ (R, Dq, l')`` -> softmax over each (query, head)'s
    ``k * l'`` keys (in their own row layout and back) -> matmul with the values -> sum over the slots.
    No key or value is copied per query. Masked keys (after the query in its own block, and every key
    of an empty slot) get probability 0.

    The query chunks that end after row ``select_dense_rows`` (:func:`dense_chunks`) go through one
    graph loop per bucket of consecutive chunks (compiled once each, whatever ``T``), a bucket of one
    chunk on its own rows (``attention_math.loop_rows``). The forward keeps only the outputs and the
    backward recomputes each chunk's probabilities (``docs/design.md``).

    Args:
        config (NSAConfig): sizes.
        precision (Precision, optional): the enclosing layer's; default decided from ``config``.

    Inputs:
        q (Tensor): ``(T, H, Dq)`` (padded inside to whole chunks for loops; the padding selects nothing).
        k_blocks (Tensor): ``(Hkv * B, l' * Dq)`` from :meth:`block_major`; ``v_blocks``: ``(Hkv * B, l' * Dv)``.
        blocks, valid (Tensor): ``(T, Hkv, k)`` selected in-segment block ids and slot validity.
        first_block, position (Tensor): ``(T,)`` int32 (``PackedLayout``).
        row_offset (int): the queries are rows ``row_offset ..`` of the sequence the blocks come from
            (static; 0 for all of it).

    Outputs:
        Tensor ``(T, H, Dv)``; rows of the dense chunks (:func:`dense_chunks`) are left 0.
    """

    def __init__(self, config, precision=None):
        super().__init__()
        self.block = config.select_block_size
        self.chunk = config.query_chunk_size
        self.dense_rows = config.select_dense_rows
        self.kv_heads = config.num_kv_heads
        self.group = config.group_size
        self.count = config.select_block_count
        self.scale = config.scale
        self.tile = tile_pairs(config.group_size)
        self.precision = precision_of(config, precision)
        # row r: 0 for key offsets < r, masked from r on (a slot whose last visible offset is r - 1)
        offsets = np.arange(self.block)
        self.bias_table = Tensor(np.where(offsets.reshape(1, -1) < np.arange(self.block + 1).reshape(-1, 1), 0.0,
                                          masked_score(self.precision.softmax)).astype(np.float32))
        self.query_rows = Tensor(np.arange(self.chunk, dtype=np.int32).reshape(-1, 1))

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

    def construct(self, q, k_blocks, v_blocks, blocks, valid, first_block, position, row_offset):
        total = q.shape[0]
        buckets = self._buckets(total, k_blocks.shape[0], row_offset)
        first_row, loop_row = loop_rows(buckets)
        if loop_row < total:  # whole chunks for the loops' gathers
            rows_in = self._padded(q, blocks, valid, first_block, position)
        else:  # every chunk runs on its own rows
            rows_in = (q, blocks, valid, first_block, position)
        # rows before the buckets' are left 0
        pieces = [ops.zeros((first_row,) + q.shape[1:-1] + (v_blocks.shape[1] // self.block,), q.dtype)] \
            if first_row > 0 else []
        for first, last, num_blocks, c0, c1 in buckets:
            if last - first == 1:  # one chunk: its rows directly, no loop machinery (the same arithmetic)
                rows_chunk = tuple(row_slice(x, c0, c1) for x in (q, blocks, valid, first_block, position))
                pieces.append(self._chunk_forward(rows_chunk, k_blocks, v_blocks, num_blocks))
                continue
            # the bucket's own buffer (each write copies it: the bucket's rows, not all T)
            out = ops.zeros(((last - first) * self.chunk, q.shape[1], v_blocks.shape[1] // self.block), q.dtype)
            j = Tensor(first, ms.int32)
            while j < last:
                rows = self.query_rows + (j - first) * self.chunk  # in the bucket
                flat = rows.reshape(-1) + c0  # in the queries
                out_chunk = self._chunk_forward(tuple(_GATHER(x, flat, 0) for x in rows_in), k_blocks, v_blocks,
                                                num_blocks)
                out = _SCATTER_UPDATE(out, rows, out_chunk)
                j = j + 1
            pieces.append(row_slice(out, 0, c1 - c0))
        return pieces[0] if len(pieces) == 1 else _CONCAT_ROWS(pieces)

    def bprop(self, q, k_blocks, v_blocks, blocks, valid, first_block, position, row_offset, out, dout):
        total = q.shape[0]
        p = self.precision
        buckets = self._buckets(total, k_blocks.shape[0], row_offset)
        first_row, loop_row = loop_rows(buckets)
        if loop_row < total:  # as the forward (both arms assign: see attention_math)
            rows_in = self._padded(q, blocks, valid, first_block, position)
            out_rows, dout_rows = padded_rows(out, self.chunk), padded_rows(dout, self.chunk)
        else:
            rows_in, out_rows, dout_rows = (q, blocks, valid, first_block, position), out, dout
        # a block's gradient sums over the tiles that read it: float32 accumulators
        d_k, d_v = _ZEROS_LIKE(p.stats(k_blocks)), _ZEROS_LIKE(p.stats(v_blocks))
        pieces = [_ZEROS_LIKE(row_slice(q, 0, first_row))] if first_row > 0 else []  # rows before the buckets': 0
        for first, last, num_blocks, c0, c1 in buckets:
            if last - first == 1:  # one chunk, as the forward
                d_q_chunk, d_k_chunk, d_v_chunk = self._chunk_backward(
                    tuple(row_slice(x, c0, c1) for x in (q, blocks, valid, first_block, position)), k_blocks,
                    v_blocks, row_slice(out, c0, c1), row_slice(dout, c0, c1), num_blocks)
                pieces.append(d_q_chunk)
                d_k = d_k + d_k_chunk
                d_v = d_v + d_v_chunk
            else:
                d_q = loop_buffer(q, ((last - first) * self.chunk,) + q.shape[1:], q.dtype)  # the bucket's, as forward
                j = Tensor(first, ms.int32)
                while j < last:
                    rows = self.query_rows + (j - first) * self.chunk
                    flat = rows.reshape(-1) + c0
                    d_q_rows, d_k_chunk, d_v_chunk = self._chunk_backward(
                        tuple(_GATHER(x, flat, 0) for x in rows_in), k_blocks, v_blocks, _GATHER(out_rows, flat, 0),
                        _GATHER(dout_rows, flat, 0), num_blocks)
                    d_q = _SCATTER_UPDATE(d_q, rows, d_q_rows)
                    d_k = d_k + d_k_chunk
                    d_v = d_v + d_v_chunk
                    j = j + 1
                pieces.append(row_slice(d_q, 0, c1 - c0))
        d_q = pieces[0] if len(pieces) == 1 else _CONCAT_ROWS(pieces)
        return (d_q, p.hold(d_k), p.hold(d_v), _ZEROS_LIKE(blocks), _ZEROS_LIKE(valid),
                _ZEROS_LIKE(first_block), _ZEROS_LIKE(position), 0)

    def _chunk_forward(self, rows_in, k_blocks, v_blocks, num_blocks):
        """One chunk's output ``(C', H, Dv)`` from its rows ``(q, blocks, valid, first_block, position)``."""
        p = self.precision
        plan, _, _, v_tiles, probs = self._tiles(rows_in, k_blocks, v_blocks, num_blocks)
        slot_outputs = p.held(_BMM(p.hold_probs(probs), v_tiles))
        return p.hold(self._sum_over_slots(slot_outputs, plan))

    def _chunk_backward(self, rows_in, k_blocks, v_blocks, out, dout, num_blocks):
        """The gradients of one chunk's output ``out`` (given ``dout``, both ``(C', H, Dv)``): ``d_q (C', H,
        Dq)`` in the compute dtype, and the chunk's ``d_k_blocks``/``d_v_blocks`` in float32. The
        probabilities are recomputed (the same as the forward's); the softmax backward as
        ``attention_math.attention_backward``'s."""
        p = self.precision
        plan, q_tiles, k_tiles, v_tiles, probs = self._tiles(rows_in, k_blocks, v_blocks, num_blocks)
        # each tile row's output and its gradient (zero rows for padding)
        d_out_tiles = self._to_tiles(dout, plan)
        d_out_s = p.score_operand(d_out_tiles)
        out_s = p.score_operand(self._to_tiles(out, plan))
        row_term = p.held_scores(row_dot(d_out_s, out_s))
        d_probs = p.held_scores(_BMM_TRANSPOSE_B(d_out_s, p.score_operand(v_tiles)))
        d_probs = d_probs - _TILE(row_term, (1, 1, self.block))
        d_scores = p.hold_probs(p.held_scores(probs * d_probs))  # per unit of scaled score
        tiles = k_tiles.shape[0]
        d_q = self._sum_over_slots(p.held(_BMM(d_scores, k_tiles)), plan) * self.scale
        d_k_tiles = p.stats(p.held(_BMM_TRANSPOSE_A(d_scores, p.hold(q_tiles))))
        d_k = _SEGMENT_SUM(d_k_tiles.reshape(tiles, -1), plan["tile_blocks"], k_blocks.shape[0])
        d_v = _SEGMENT_SUM(p.stats(p.held(_BMM_TRANSPOSE_A(p.hold_probs(probs), d_out_tiles))).reshape(tiles, -1),
                           plan["tile_blocks"], v_blocks.shape[0])
        return p.hold(d_q), d_k, d_v

    def _padded(self, q, blocks, valid, first_block, position):
        """The per-query inputs padded to whole chunks: the padding selects nothing."""
        chunk = self.chunk
        return (padded_rows(q, chunk), padded_rows(blocks, chunk), padded_rows(valid, chunk),
                padded_rows(first_block, chunk), padded_rows(position, chunk))

    def _buckets(self, total, block_rows, row_offset):
        """Static ``(first, last, num_blocks, c0, c1)`` ranges of the query chunks after the dense ones,
        each reading the block slots its range's last chunk can reach (``_reach``; ``T`` unpadded)."""
        return _reach(total, block_rows // self.kv_heads, self.chunk, self.block, self.dense_rows, row_offset)

    def _tiles(self, rows_in, k_blocks, v_blocks, num_blocks):
        """The plan of a chunk over its first ``num_blocks`` block slots and its tiles, from the chunk's
        rows ``(q (C, H, Dq), blocks, valid (C, Hkv, k), first_block, position (C,))``: queries (scaled,
        in the softmax dtype), keys, values ``(R, ., .)`` and the probabilities ``(R, tile*G, l')`` in
        the softmax dtype (0 on padding rows)."""
        p = self.precision
        q, blocks, valid, first_block, position = rows_in
        chosen = blocks.transpose(1, 0, 2)
        used = valid.transpose(1, 0, 2)
        kv_heads, chunk, count = chosen.shape
        dim = q.shape[2]
        plan = selected_tile_plan(chosen, used, first_block, position, num_blocks, k_blocks.shape[0] // kv_heads,
                                  self.group, self.tile, self.block)
        tiles = plan["tile_blocks"].shape[0]
        k_tiles = _GATHER(k_blocks, plan["tile_blocks"], 0).reshape(tiles, self.block, dim)
        v_tiles = _GATHER(v_blocks, plan["tile_blocks"], 0).reshape(tiles, self.block, -1)
        q_tiles = self._to_tiles(p.held_scores(p.score_operand(q) * self.scale), plan)
        scores = p.held_scores(_BMM_TRANSPOSE_B(q_tiles, p.score_operand(k_tiles))).reshape(-1, self.block)
        # the softmax over each (query, head)'s k * l' keys, in rows of those keys (every row has a tile row)
        scores = _GATHER(scores, plan["softmax_from_tiles"], 0)
        scores = scores.reshape(kv_heads * chunk, self.group, count * self.block)
        bias = _GATHER(_CAST(self.bias_table, p.softmax_storage), plan["key_bias"], 0)
        probs = _SOFTMAX(scores + _TILE(bias.reshape(kv_heads * chunk, 1, count * self.block), (1, self.group, 1)))
        probs = p.held_scores(probs)
        probs = _GATHER(_with_zero_row(probs.reshape(-1, self.block)), plan["tiles_from_softmax"], 0)
        return plan, q_tiles, k_tiles, v_tiles, probs.reshape(tiles, self.tile * self.group, self.block)

    def _to_tiles(self, x, plan):
        """``(C, H, F)`` per query and head -> ``(R, tile*G, F)`` per tile row (0 for padding rows)."""
        chunk, heads, dim = x.shape
        x = x.reshape(chunk, self.kv_heads, self.group * dim).transpose(1, 0, 2).reshape(-1, self.group * dim)
        tiles = plan["tile_blocks"].shape[0]
        return _GATHER(_with_zero_row(x), plan["tile_queries"], 0).reshape(tiles, self.tile * self.group, dim)

    def _sum_over_slots(self, x, plan):
        """``(R, tile*G, F)`` per tile row -> ``(C, H, F)`` float32: each query's rows summed over its
        slots (slot-major rows, then one float32 matmul with a row of ones)."""
        dim = x.shape[2]
        count = self.count
        rows = plan["slots_from_tiles"].shape[0] // count  # Hkv * C
        x = self.precision.stats(_GATHER(x.reshape(-1, self.group * dim), plan["slots_from_tiles"], 0))
        x = x.reshape(count, -1)
        x = _MATMUL(_ONES_LIKE(x[:, :1]).reshape(1, count), x)
        chunk = rows // self.kv_heads
        return x.reshape(self.kv_heads, chunk, self.group, dim).transpose(1, 0, 2, 3).reshape(chunk, -1, dim)


class BlockMaskedSelectedAttention(nn.Cell):
    """The selected branch as one attention over every row before the chunk's end, masked per query to
    its selected blocks, its segment and its past (exactly the keys :class:`BlockGroupedSelectedAttention`
    gathers).

    Args:
        config (NSAConfig): sizes.
        precision (Precision, optional): the enclosing layer's; default decided from ``config``.

    Inputs:
        q (Tensor): ``(Hkv, G*C, Dq)`` grouped queries of a chunk (``attention_math.group_queries``).
        k (Tensor): ``(Hkv, R, Dq)`` the rows before the chunk's end, head-major; ``v``: ``(Hkv, R, Dv)``.
        key_segment, key_position (Tensor): ``(R,)`` int32 segment ids and in-segment positions of those rows.
        blocks, valid (Tensor): ``(Hkv, C, k)`` selected in-segment block ids and slot validity.
        segment, position (Tensor): ``(C,)`` int32 segment ids and in-segment positions of the queries.

    Outputs:
        Tensor ``(Hkv, G*C, Dv)``.
    """

    def __init__(self, config, precision=None):
        super().__init__()
        self.block = config.select_block_size
        self.precision = precision_of(config, precision)
        self.masked = masked_score(self.precision.softmax)
        self.attention = MaskedAttention(config.scale, self.precision)

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
        return self.attention(q, k, v, visibility_bias(visible, self.precision.softmax_storage, self.masked))[0]
