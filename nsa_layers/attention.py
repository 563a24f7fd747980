"""``NativeSparseAttention``: the NSA core on packed batches (TND), exact to the paper (arXiv 2502.11089, §3).

``o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` (Eq. 5) where, for a query at in-segment
position ``t`` (all three branches stay inside the query's segment):

- ``o_cmp`` (§3.3.1, Eq. 7-8): attention over the compressed windows that have ended
  (``i*d + l - 1 <= t``); 0 if none;
- ``o_slc`` (§3.3.2, Eq. 9-12): attention over the tokens (at positions ``<= t``) of the top-``n``
  selection blocks, scored from the compression probabilities by exact token overlap, summed over
  the KV group, with the initial and local blocks forced;
- ``o_win`` (§3.3.3): attention over the ``w`` tokens ending at ``t``.

The bookkeeping is one :class:`~nsa_layers.layout.PackedLayout` of static-shape tensors, so the same
graph serves every layout (PyNative and graph mode, prefix sums as data). Each branch is one call
that runs its query chunks; which branches run an Ascend kernel is decided once
(``kernel_routing``). How it runs: ``docs/design.md``.
"""

from typing import TypedDict

import mindspore as ms
from mindspore import Tensor, nn, ops

from . import kernel_routing, packing
from .attention_math import group_queries, ungroup_outputs
from .compressed_attention import CompressedAttention
from .compressor import KVCompressor
from .gate import GatedSum
from .input_checks import check_float_input, check_kv_inputs, checked_prefix_sums
from .layout import packed_layout
from .selected_attention import BlockMaskedSelectedAttention, SelectedAttention
from .sliding_window import SlidingWindowAttention

__all__ = ["NativeSparseAttention", "NSADetails"]


class NSADetails(TypedDict):
    """What :meth:`NativeSparseAttention.forward_with_details` returns (a ``dict``, so that it also
    carries gradients in graph mode; see ``layout.PackedLayout``).

    Fields:
        out: ``(T, H, Dv)`` the gated output, in the dtype of ``q``.
        o_cmp, o_slc, o_win: ``(T, H, Dv)`` the branch outputs, in the compute dtype.
        blocks: ``(T, Hkv, n)`` int32 selected in-segment block ids, best first.
        valid: ``(T, Hkv, n)`` bool, False for slots left empty (the query has fewer than ``n`` blocks).
    """

    out: Tensor
    o_cmp: Tensor
    o_slc: Tensor
    o_win: Tensor
    blocks: Tensor
    valid: Tensor


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
            Values must lie in ``[0, T]`` and not decrease: host values are checked while compiling,
            a Tensor's when the graph runs (``ValueError`` either way).

    Outputs:
        Tensor ``(T, H, Dv)`` in the dtype of ``q`` (empty for ``T = 0``).

    Parameters: ``k_compressor`` and ``v_compressor`` (``KVCompressor``: per-head weights
    ``(l, Hkv)``, initialised as mean pooling; the value compressor also has the optional
    intra-block position embedding, see ``NSAConfig.use_position_embedding``).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        # keys get no intra-block position embedding: it would be inert (see NSAConfig.use_position_embedding)
        self.k_compressor = KVCompressor(config.compress_block_size, config.num_kv_heads, config.head_dim,
                                         use_position_embedding=False)
        self.v_compressor = KVCompressor(config.compress_block_size, config.num_kv_heads, config.v_head_dim,
                                         config.use_position_embedding)
        self.compressed_attention = CompressedAttention(config)
        self.selected_attention = SelectedAttention(config, first_chunk=config.select_dense_rows // config.query_chunk_size)
        self.block_masked_selected_attention = BlockMaskedSelectedAttention(config)
        self.sliding_window = SlidingWindowAttention(config)
        self.gated_sum = GatedSum()
        # False where the caller has already checked a Tensor's values (input_checks.checked_prefix_sums)
        self.validates_prefix_sums = True

    def branch_paths(self, total, actual_seq_len=None):
        """Which implementation each branch takes for ``total`` tokens laid out by ``actual_seq_len``
        (the decision the forward makes, ``kernel_routing.plan_kernel_route``).

        Returns:
            ``(paths, reasons)``: ``paths`` maps ``"compress"``, ``"compressed_attention"``,
            ``"selection"``, ``"selected_attention"`` and ``"sliding_window"`` to ``"ascend_kernel"``
            (a MindSpore Ascend NSA kernel through ``nsa_layers.ops``) or ``"mindspore"`` (composite
            ops); ``reasons`` says, for each composite branch, which kernel condition failed.
        """
        route = kernel_routing.route_for(self.config, total, packing.host_prefix_sums(actual_seq_len, total))
        return dict(route.paths), dict(route.reasons)

    def construct(self, q, k, v, gates, actual_seq_len=None):
        return self.forward_with_details(q, k, v, gates, actual_seq_len)["out"]

    def forward_with_details(self, q, k, v, gates, actual_seq_len=None):
        """Like calling the cell, plus the branch outputs and the selection (an :class:`NSADetails`).

        Inputs are checked before any work (``input_checks``); then the layout is built once, the
        branches run (on the Ascend kernels where ``kernel_routing`` allows) and are gated.
        """
        self.check_inputs(q, k, v, gates)
        cfg = self.config
        total = q.shape[0]
        if self.validates_prefix_sums and isinstance(actual_seq_len, Tensor):
            actual_seq_len = checked_prefix_sums("NativeSparseAttention", actual_seq_len, total)
        if total == 0:  # MindSpore's reductions reject empty inputs
            return self._no_tokens(q)
        dtype = cfg.ms_compute_dtype
        kv = self.branch_kv(k, v)
        layout = packed_layout(actual_seq_len, total, cfg)
        prefix_sums = packing.host_prefix_sums(actual_seq_len, total)
        route = kernel_routing.kernel_route(cfg, total, prefix_sums)
        if route.any_kernel:
            branches = self._branches_on_kernels(q.astype(dtype), kv, layout, route, prefix_sums)
        else:
            branches = self._branches(q.astype(dtype), kv, layout)
        out = self.gated_sum(gates.astype(dtype), branches["o_cmp"], branches["o_slc"], branches["o_win"])
        return {"out": out.astype(q.dtype), "o_cmp": branches["o_cmp"], "o_slc": branches["o_slc"],
                "o_win": branches["o_win"], "blocks": branches["blocks"], "valid": branches["valid"]}

    def _branches(self, q, kv, layout):
        """The three branches, one call each: compression (Eq. 7), compressed attention with the
        blocks it selects (Eq. 8-11), selected attention (Eq. 12), the sliding window (§3.3.3)."""
        k_cmp = self.k_compressor(kv["cmp"][0], layout["window_starts"])
        v_cmp = self.v_compressor(kv["cmp"][1], layout["window_starts"])
        o_cmp, blocks, valid = self._compressed_and_selection(q, k_cmp, v_cmp, layout)
        o_slc = self._selected(q, kv["slc"], blocks, valid, layout)
        o_win = self._sliding_window(q, kv["win"], layout)
        return {"o_cmp": o_cmp, "o_slc": o_slc, "o_win": o_win, "blocks": blocks, "valid": valid}

    def _branches_on_kernels(self, q, kv, layout, route, prefix_sums):
        """:meth:`_branches` with the branches that ``route`` sends to MindSpore's Ascend NSA kernels
        (``kernel_routing``: host prefix sums, half-precision compute, the kernels' constraints); the
        others, and the sliding window (no kernel), stay composite."""
        cfg = self.config
        if route.uses_kernel("compress"):
            slots = layout["window_starts"].shape[0]
            k_cmp = self.k_compressor.with_kernel(kv["cmp"][0], cfg.compress_stride, prefix_sums, slots)
            v_cmp = self.v_compressor.with_kernel(kv["cmp"][1], cfg.compress_stride, prefix_sums, slots)
        else:
            k_cmp = self.k_compressor(kv["cmp"][0], layout["window_starts"])
            v_cmp = self.v_compressor(kv["cmp"][1], layout["window_starts"])
        if route.uses_kernel("compressed_attention"):
            o_cmp, blocks, valid = kernel_routing.compressed_and_selection_kernel(
                cfg, q, k_cmp, v_cmp, layout["position"], prefix_sums)
        else:
            o_cmp, blocks, valid = self._compressed_and_selection(q, k_cmp, v_cmp, layout)
        if route.uses_kernel("selected_attention"):
            o_slc = kernel_routing.selected_kernel(cfg, q, kv["slc"][0], kv["slc"][1], blocks, valid, prefix_sums)
        else:
            o_slc = self._selected(q, kv["slc"], blocks, valid, layout)
        o_win = self._sliding_window(q, kv["win"], layout)
        return {"o_cmp": o_cmp, "o_slc": o_slc, "o_win": o_win, "blocks": blocks, "valid": valid}

    def _compressed_and_selection(self, q, k_cmp, v_cmp, layout):
        """Compressed attention over the windows each query has seen, and the top-``n`` blocks its
        probabilities score: ``o_cmp (T, H, Dv)``, ``blocks`` and ``valid (T, Hkv, n)``."""
        return self.compressed_attention(q, k_cmp, v_cmp, layout["first_window"], layout["windows_ended"],
                                         layout["position"])

    def _selected(self, q, kv_slc, blocks, valid, layout):
        """Attention over the selected blocks' tokens, ``(T, H, Dv)``: block-masked for the chunks that
        end by row ``select_dense_rows`` (``BlockMaskedSelectedAttention``, one call per chunk), grouped
        by block after them (``SelectedAttention``, on the rows padded to whole chunks)."""
        cfg = self.config
        k, v = kv_slc
        chunk = cfg.query_chunk_size
        chunks = layout["chunks"]
        dense = len([c1 for _, c1 in chunks if c1 <= cfg.select_dense_rows])
        outs = []
        # head-major keys and values cut into the chunks once (unused, and compiled away, without dense chunks)
        k_pieces, v_pieces = _split_chunks(k.transpose(1, 0, 2), chunk, 1), _split_chunks(v.transpose(1, 0, 2), chunk, 1)
        for j in range(dense):
            c0, c1 = chunks[j]
            outs.append(ungroup_outputs(self.block_masked_selected_attention(
                group_queries(q[c0:c1], cfg.num_kv_heads), _rows_from_pieces(k_pieces, chunk, 0, j),
                _rows_from_pieces(v_pieces, chunk, 0, j), layout["segment"][:c1], layout["position"][:c1],
                blocks[c0:c1].transpose(1, 0, 2), valid[c0:c1].transpose(1, 0, 2), layout["segment"][c0:c1],
                layout["position"][c0:c1]), c1 - c0))
        if dense < len(chunks):
            gathered = self.selected_attention(q, self.selected_attention.block_major(k, layout["block_starts"]),
                                               self.selected_attention.block_major(v, layout["block_starts"]),
                                               blocks, valid, layout["first_block"], layout["position"])
            outs.append(gathered[dense * chunk:])
        return outs[0] if len(outs) == 1 else ops.cat(outs, 0)

    def _sliding_window(self, q, kv_win, layout):
        """Attention over the ``w`` keys ending at each query, ``(T, H, Dv)``."""
        return self.sliding_window(q, kv_win[0], kv_win[1], layout["position"])

    def check_inputs(self, q, k, v, gates):
        """Types, ranks, shapes and dtypes of the inputs, before any work (``input_checks``)."""
        cfg = self.config
        cell = "NativeSparseAttention"
        check_float_input(cell, "q", q, (("T", None), ("num_heads", cfg.num_heads), ("head_dim", cfg.head_dim)))
        rows = ("T", q.shape[0])
        check_kv_inputs(cell, k, v, (rows, ("num_kv_heads", cfg.num_kv_heads), ("head_dim", cfg.head_dim)),
                        (rows, ("num_kv_heads", cfg.num_kv_heads), ("v_head_dim", cfg.v_head_dim)))
        check_float_input(cell, "gates", gates, (rows, ("num_heads", cfg.num_heads), ("branches", 3)))

    def branch_kv(self, k, v):
        """``{"cmp", "slc", "win"}`` -> ``(k, v)`` of each branch, in the compute dtype."""
        dtype = self.config.ms_compute_dtype
        if isinstance(k, (tuple, list)):
            return {"cmp": (k[0].astype(dtype), v[0].astype(dtype)), "slc": (k[1].astype(dtype), v[1].astype(dtype)),
                    "win": (k[2].astype(dtype), v[2].astype(dtype))}
        k, v = k.astype(dtype), v.astype(dtype)
        return {"cmp": (k, v), "slc": (k, v), "win": (k, v)}

    def _no_tokens(self, q):
        cfg = self.config
        empty = ops.zeros((0, cfg.num_heads, cfg.v_head_dim), cfg.ms_compute_dtype)
        slots = (0, cfg.num_kv_heads, cfg.select_block_count)
        return {"out": empty.astype(q.dtype), "o_cmp": empty, "o_slc": empty, "o_win": empty,
                "blocks": ops.zeros(slots, ms.int32), "valid": ops.zeros(slots, ms.bool_)}


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
