"""``NativeSparseAttention``: the NSA core on packed batches (TND), exact to the paper.

``o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` where, for a query at in-segment position
``t`` (all three branches stay inside the query's segment):

- ``o_cmp``: attention over the compressed windows that have ended (``i*d + l - 1 <= t``); 0 if none;
- ``o_slc``: attention over the tokens (at positions ``<= t``) of the top-``n`` selection blocks,
  scored from the compression probabilities by exact token overlap, summed over the KV group, with
  the initial and local blocks forced;
- ``o_win``: attention over the ``w`` tokens ending at ``t``.

Everything runs with static shapes from the per-token layout (``packing.layout_tensors``), so it
works in PyNative and in graph mode with the prefix sums as data (as MindFormers feeds them).
Queries are processed in chunks of ``query_chunk_size``: no ``T x T`` tensor is built. The selected
branch of a chunk ending by row ``NSAConfig.select_dense_rows`` is one block-masked attention over
the rows before it; later chunks read each query's blocks grouped by block (same result, see
``selected_attention``).
"""

import mindspore as ms
from mindspore import nn, ops

from . import kernel_routing, packing
from .attention_math import group_queries, ungroup_outputs
from .compressed_attention import CompressedAttention
from .compressor import KVCompressor
from .gate import GatedSum
from .input_checks import check_float_input, check_kv_inputs
from .selected_attention import BlockMaskedSelectedAttention, SelectedAttention
from .selection import BlockSelector
from .sliding_window import SlidingWindowAttention
from .ops import nsa_compress_attention, nsa_select_attention

__all__ = ["NativeSparseAttention"]


def _rows_from_pieces(pieces, chunk, r0, last):
    """Rows ``r0 ..`` the end of piece ``last`` of head-major rows split into pieces of ``chunk`` rows
    (``(Hkv, r_i, D)`` each) -> ``(Hkv, R, D)``: the tail of the piece holding ``r0``, then whole pieces
    (slices of pieces, so each gradient is piece-sized; no copy for a single whole piece)."""
    first = r0 // chunk
    offset = r0 - first * chunk
    head = pieces[first] if offset == 0 else pieces[first][:, offset:]
    rows = (head,) + pieces[first + 1:last + 1]
    return rows[0] if len(rows) == 1 else ops.cat(rows, 1)


def _split_chunks(x, chunk, axis):
    """``x`` split along ``axis`` into pieces of ``chunk`` rows (the last one shorter), as a tuple.

    The whole pieces come from one ``Split`` primitive, whose backward joins the pieces' gradients.
    (``ops.split`` with a list of sizes slices each piece instead, and the backward of each slice is a
    gradient of the whole of ``x``: 32 of them, summed, for a 16k-row input in 512-row chunks.)
    """
    total = x.shape[axis]
    whole = total // chunk
    if whole * chunk == total:
        return ops.Split(axis, whole)(x)
    tail = ops.narrow(x, axis, whole * chunk, total - whole * chunk)
    if whole == 0:
        return (tail,)
    return ops.Split(axis, whole)(ops.narrow(x, axis, 0, whole * chunk)) + (tail,)


class NativeSparseAttention(nn.Cell):
    """The NSA core: compressors, the three branches and the gated sum, on packed batches.

    Args:
        config (NSAConfig): sizes; ``compute_dtype`` is used for all arithmetic.

    Inputs:
        q (Tensor): ``(T, H, Dq)``.
        k, v (Tensor or tuple): keys ``(T, Hkv, Dq)`` and values ``(T, Hkv, Dv)`` shared by the three
            branches, or 3-tuples ``(compressed, selected, window)`` of them (independent K/V).
        gates (Tensor): ``(T, H, 3)`` gate values for (compressed, selected, window).
        actual_seq_len: segment ends as prefix sums: ``None`` (one segment), a tuple/list/array, or an
            int Tensor as MindFormers gives it (leading 0, repeated values and padding tolerated).

    Outputs:
        Tensor ``(T, H, Dv)`` in the dtype of ``q`` (empty for ``T = 0``).

    Parameters: ``k_compressor`` and ``v_compressor`` (``KVCompressor``: per-head weights
    ``(l, Hkv)``, initialised as mean pooling; the value compressor also has the optional
    intra-block position embedding, see ``NSAConfig.use_position_embedding``).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.config_items = kernel_routing.config_items(config)
        # No intra-block position embedding on keys: with the linear per-head compression it would add
        # the same vector to every compressed key of a head, which shifts each query's scores by a
        # constant that the softmax (and so the selection) ignores: a parameter that never learns.
        self.k_compressor = KVCompressor(config.compress_block_size, config.num_kv_heads, config.head_dim,
                                         use_position_embedding=False)
        self.v_compressor = KVCompressor(config.compress_block_size, config.num_kv_heads, config.v_head_dim,
                                         config.use_position_embedding)
        self.compressed_attention = CompressedAttention(config)
        self.selector = BlockSelector(config)
        self.selected_attention = SelectedAttention(config)
        self.block_masked_selected_attention = BlockMaskedSelectedAttention(config)
        self.sliding_window = SlidingWindowAttention(config)
        self.gated_sum = GatedSum()

    def branch_paths(self, total, actual_seq_len=None):
        """Which implementation each branch takes for ``total`` tokens laid out by ``actual_seq_len``
        (the decision the forward makes, ``kernel_routing.plan_kernel_route``).

        Returns:
            ``(paths, reasons)``: ``paths`` maps ``"compress"``, ``"compressed_attention"``,
            ``"selection"``, ``"selected_attention"`` and ``"sliding_window"`` to ``"ascend_kernel"``
            (a MindSpore Ascend NSA kernel through ``nsa_layers.ops``) or ``"mindspore"`` (composite
            ops); ``reasons`` says, for each composite branch, which kernel condition failed.
        """
        route = kernel_routing.route_for(self.config_items, total, kernel_routing.host_prefix(actual_seq_len, total))
        return dict(route.paths), dict(route.reasons)

    def construct(self, q, k, v, gates, actual_seq_len=None):
        return self._forward(q, k, v, gates, actual_seq_len, False)[0]

    def forward_with_details(self, q, k, v, gates, actual_seq_len=None):
        """Like calling the cell, plus the branch outputs and the selection, for tests and diagnostics.

        Returns:
            ``(out, o_cmp, o_slc, o_win, blocks, valid)``: the three ``(T, H, Dv)`` branch outputs in the
            compute dtype and the selected blocks ``(T, Hkv, n)`` int32 with their validity (bool).
        """
        return self._forward(q, k, v, gates, actual_seq_len, True)

    def _check_inputs(self, q, k, v, gates):
        """Types, ranks, shapes and dtypes of the inputs, before any work (``input_checks``)."""
        cfg = self.config
        cell = "NativeSparseAttention"
        check_float_input(cell, "q", q, (("T", None), ("num_heads", cfg.num_heads), ("head_dim", cfg.head_dim)))
        rows = ("T", q.shape[0])
        check_kv_inputs(cell, k, v, (rows, ("num_kv_heads", cfg.num_kv_heads), ("head_dim", cfg.head_dim)),
                        (rows, ("num_kv_heads", cfg.num_kv_heads), ("v_head_dim", cfg.v_head_dim)))
        check_float_input(cell, "gates", gates, (rows, ("num_heads", cfg.num_heads), ("branches", 3)))

    def _branch_inputs(self, k, v):
        dtype = self.config.ms_compute_dtype
        if isinstance(k, (tuple, list)):
            return tuple((kk.astype(dtype), vv.astype(dtype)) for kk, vv in zip(k, v))
        k, v = k.astype(dtype), v.astype(dtype)
        return (k, v), (k, v), (k, v)

    def _forward(self, q, k, v, gates, actual_seq_len, details):
        cfg = self.config
        self._check_inputs(q, k, v, gates)
        dtype = cfg.ms_compute_dtype
        total = q.shape[0]
        kv_heads = cfg.num_kv_heads
        out_dtype = q.dtype
        if total == 0:  # no tokens (MindSpore's reductions reject empty inputs): empty outputs
            empty = ops.zeros((0, cfg.num_heads, cfg.v_head_dim), dtype)
            slots = (0, kv_heads, cfg.select_block_count)
            return empty.astype(out_dtype), empty, empty, empty, ops.zeros(slots, ms.int32), ops.zeros(slots, ms.bool_)
        q = q.astype(dtype)
        gates = gates.astype(dtype)
        (k_cmp, v_cmp), (k_slc, v_slc), (k_win, v_win) = self._branch_inputs(k, v)
        host = kernel_routing.host_prefix(actual_seq_len, total)
        kernel_compress, kernel_cmp, kernel_slc = kernel_routing.kernel_flags(self.config_items, total, host)

        # packed-sequence bookkeeping, once for every branch
        ends = packing.prefix_sums_tensor(actual_seq_len, total)
        segment, position, start, length = packing.layout_tensors(ends, total)
        slots = packing.max_windows(total, ends.shape[0], cfg.compress_block_size, cfg.compress_stride)
        slot_rows, _, is_start = packing.window_slots_tensor(
            position, length, cfg.compress_block_size, cfg.compress_stride, slots)
        first_slot = packing.first_slot_tensor(is_start, start)  # slot of each segment's first window
        windows_ended = packing.windows_ended_tensor(position, cfg.compress_block_size, cfg.compress_stride)
        if kernel_compress:
            keys_cmp = self.k_compressor.with_kernel(k_cmp, cfg.compress_stride, host, slots)
            values_cmp = self.v_compressor.with_kernel(v_cmp, cfg.compress_stride, host, slots)
        else:
            keys_cmp = self.k_compressor(k_cmp, slot_rows)  # (S, Hkv, Dq)
            values_cmp = self.v_compressor(v_cmp, slot_rows)
        cmp_all, blocks_all, valid_all = None, None, None  # (graph mode: defined on every path)
        if kernel_cmp:
            cmp_all, blocks_all, valid_all = self._compressed_and_selection_kernel(q, keys_cmp, values_cmp, position,
                                                                                   host)
        keys_cmp, values_cmp = keys_cmp.transpose(1, 0, 2), values_cmp.transpose(1, 0, 2)  # (Hkv, S, D)
        # selection blocks, block-major: the first rows of every segment's blocks, in row order
        num_blocks_all = packing.max_windows(total, ends.shape[0], 1, cfg.select_block_size)
        block_rows, _, is_block_start = packing.window_slots_tensor(position, length, 1, cfg.select_block_size,
                                                                    num_blocks_all)
        block_base = packing.first_slot_tensor(is_block_start, start)  # block-major index of its first block
        gathers = total > cfg.dense_selection_rows and not kernel_slc  # some chunk gathers its queries' blocks
        keys_slc = self.selected_attention.block_major(k_slc, block_rows) if gathers else None
        values_slc = self.selected_attention.block_major(v_slc, block_rows) if gathers else None
        # Queries and the head-major (Hkv, T, D) keys/values are cut into the query chunks once
        # (_split_chunks): a chunk then joins the pieces it reads, and every piece's gradient is piece-sized.
        # (Slicing rows per chunk instead costs, in the backward, a T-sized gradient per chunk and slice.)
        chunk = cfg.query_chunk_size
        q_pieces = _split_chunks(q, chunk, 0)
        k_win_pieces, v_win_pieces = (_split_chunks(x.transpose(1, 0, 2), chunk, 1) for x in (k_win, v_win))
        k_slc_pieces, v_slc_pieces = (_split_chunks(x.transpose(1, 0, 2), chunk, 1) for x in (k_slc, v_slc))

        parts = []  # per chunk: (o_cmp, o_slc or None, o_win, blocks, valid), (C, ...) layouts
        for j, q_chunk in enumerate(q_pieces):
            rows = q_chunk.shape[0]
            c0 = j * chunk
            c1 = c0 + rows
            q_grouped = group_queries(q_chunk, kv_heads)
            seg_q, pos_q = segment[c0:c1], position[c0:c1]
            if kernel_cmp:
                o_cmp = cmp_all[c0:c1]
                blocks, valid = blocks_all[c0:c1].transpose(1, 0, 2), valid_all[c0:c1].transpose(1, 0, 2)
            else:
                # windows starting before row c1 are the first slots (they are in row order)
                reach = min(slots, packing.max_windows(c1, ends.shape[0], cfg.compress_block_size,
                                                       cfg.compress_stride))
                o_cmp, probs = self.compressed_attention(q_grouped, keys_cmp[:, :reach], values_cmp[:, :reach],
                                                         first_slot[c0:c1], windows_ended[c0:c1])
                o_cmp = ungroup_outputs(o_cmp, rows)
                blocks, valid = self.selector(probs, first_slot[c0:c1], pos_q, (c1 - 1) // cfg.select_block_size + 1)
            if kernel_slc:
                o_slc = None
            elif c1 <= cfg.dense_selection_rows:
                o_slc = ungroup_outputs(self.block_masked_selected_attention(
                    q_grouped, _rows_from_pieces(k_slc_pieces, chunk, 0, j),
                    _rows_from_pieces(v_slc_pieces, chunk, 0, j), segment[:c1], position[:c1], blocks, valid,
                    seg_q, pos_q), rows)
            else:
                # the blocks starting before row c1 are the first ones (block-major is in row order)
                reach_blocks = min(num_blocks_all, packing.max_windows(c1, ends.shape[0], 1, cfg.select_block_size))
                o_slc = self.selected_attention(q_chunk, keys_slc, values_slc, blocks, valid, block_base[c0:c1],
                                                pos_q, reach_blocks)
            r0 = max(0, c0 - cfg.window_size + 1)  # the window's first row
            o_win = ungroup_outputs(self.sliding_window(
                q_grouped, _rows_from_pieces(k_win_pieces, chunk, r0, j), _rows_from_pieces(v_win_pieces, chunk, r0, j),
                pos_q, c0 - r0), rows)
            parts.append((o_cmp, o_slc, o_win, blocks.transpose(1, 0, 2), valid.transpose(1, 0, 2)))
        o_cmp, o_win, blocks, valid = (ops.cat([p[i] for p in parts], 0) for i in (0, 2, 3, 4))
        if kernel_slc:
            o_slc = self._selected_kernel(q, k_slc, v_slc, blocks, valid, host)
        else:
            o_slc = ops.cat([p[1] for p in parts], 0)
        out = self.gated_sum(gates, o_cmp, o_slc, o_win).astype(out_dtype)
        if not details:
            return (out,)
        return out, o_cmp, o_slc, o_win, blocks, valid

    def _compressed_and_selection_kernel(self, q, keys_cmp, values_cmp, position, host):
        """``nsa_compress_attention`` on the shifted layout (one masked compressed key in front of each
        segment, so the kernel's block-importance indices give the exact token overlap; see
        ``kernel_routing``). Returns ``o_cmp (T, H, Dv)`` (0 where no window has ended), the blocks
        ``(T, Hkv, n)`` and their validity (a block after the query's own one is an empty slot)."""
        cfg = self.config
        rows, cmp_prefix, sel_prefix = kernel_routing.shifted_rows_tensor(host, cfg.compress_block_size,
                                                                          cfg.compress_stride, cfg.select_block_size)
        atten_mask, topk_mask = kernel_routing.masks_tensors(host, cfg.compress_block_size, cfg.compress_stride,
                                                             cfg.select_block_size, cfg.num_init_blocks,
                                                             cfg.num_local_blocks)
        o_cmp, blocks, _, _ = nsa_compress_attention(
            q, ops.gather(keys_cmp, rows, 0), ops.gather(values_cmp, rows, 0), cfg.scale, cfg.num_heads,
            cfg.compress_block_size, cfg.compress_stride, cfg.select_block_size, cfg.select_block_count,
            topk_mask=topk_mask, atten_mask=atten_mask, actual_seq_qlen=host, actual_cmp_seq_kvlen=cmp_prefix,
            actual_sel_seq_kvlen=sel_prefix)
        sees_window = (position >= cfg.compress_block_size - 1).astype(o_cmp.dtype).reshape(-1, 1, 1)
        valid = blocks <= (position // cfg.select_block_size).reshape(-1, 1, 1)
        return o_cmp * sees_window, blocks, valid

    def _selected_kernel(self, q, k, v, blocks, valid, host):
        """``nsa_select_attention`` with its causal mask enabled; an empty slot ``s`` points at block
        ``s`` (a future block: fully masked, and distinct from the valid ones, which come first)."""
        cfg = self.config
        slot = ops.arange(0, cfg.select_block_count, dtype=ms.int32).reshape(1, 1, -1)
        indices = ops.where(valid, blocks.astype(ms.int32), ops.broadcast_to(slot, blocks.shape))
        return nsa_select_attention(
            q, k, v, indices, cfg.scale, cfg.num_heads, cfg.select_block_size, cfg.select_block_count,
            atten_mask=ops.ones((1, 1), ms.bool_), actual_seq_qlen=host, actual_seq_kvlen=host)[0]
