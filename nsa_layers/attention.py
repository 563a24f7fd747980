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
from .input_checks import check_float_input, check_kv_inputs, check_query_offset, checked_prefix_sums, key_rows
from .layout import packed_layout, query_layout
from .selected_attention import BlockMaskedSelectedAttention, SelectedAttention, dense_chunks
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
        own_parameters (bool): False builds the compressors without parameters: every forward then
            passes them (``compressors``), as one rank of a sharded core does (``nsa_layers.parallel``).

    Inputs:
        q (Tensor): ``(T, H, Dq)``.
        k, v (Tensor or tuple): keys ``(T, Hkv, Dq)`` and values ``(T, Hkv, Dv)`` shared by the three
            branches, or 3-tuples ``(compressed, selected, window)`` of them (independent K/V).
        gates (Tensor): ``(T, H, 3)`` gate values for (compressed, selected, window).
        actual_seq_len: segment ends as prefix sums: ``None`` (one segment), a tuple/list/array, or an
            int Tensor as MindFormers gives it (leading 0, repeated values and padding tolerated).
            Values must lie in ``[0, T]`` and not decrease: host values are checked while compiling,
            a Tensor's when the graph runs (``ValueError`` either way).
        query_offset (int or None): the queries (and gates) are rows ``query_offset .. query_offset +
            Tq - 1`` of the ``T`` rows of ``k`` and ``v``, which ``actual_seq_len`` lays out (static;
            ``None``, the default: all of them, ``Tq = T``). Context parallelism gives each rank its own
            query rows this way (``nsa_layers.parallel``).

    Outputs:
        Tensor ``(Tq, H, Dv)`` in the dtype of ``q`` (empty for ``Tq = 0``).

    Parameters: ``k_compressor`` and ``v_compressor`` (``KVCompressor``: per-head weights
    ``(l, Hkv)``, initialised as mean pooling; the value compressor also has the optional
    intra-block position embedding, see ``NSAConfig.use_position_embedding``).
    """

    def __init__(self, config, own_parameters=True):
        super().__init__()
        self.config = config
        # keys get no intra-block position embedding: it would be inert (see NSAConfig.use_position_embedding)
        self.k_compressor = KVCompressor(config.compress_block_size, config.num_kv_heads, config.head_dim,
                                         use_position_embedding=False, own_parameters=own_parameters)
        self.v_compressor = KVCompressor(config.compress_block_size, config.num_kv_heads, config.v_head_dim,
                                         config.use_position_embedding, own_parameters)
        self.compressed_attention = CompressedAttention(config)
        self.selected_attention = SelectedAttention(config)
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

    def construct(self, q, k, v, gates, actual_seq_len=None, query_offset=None):
        return self.forward_with_details(q, k, v, gates, actual_seq_len, query_offset)["out"]

    def forward_with_details(self, q, k, v, gates, actual_seq_len=None, query_offset=None, compressors=None):
        """Like calling the cell, plus the branch outputs and the selection (an :class:`NSADetails`).

        Inputs are checked before any work (``input_checks``); then the layout is built once, the
        branches run (on the Ascend kernels where ``kernel_routing`` allows) and are gated.
        ``compressors`` (a :class:`~nsa_layers.compressor.CompressorWeights`, default the cell's own
        parameters) gives the compressor weights as tensors: how a ``Morph`` body passes them
        (``nsa_layers.parallel``).
        """
        self.check_inputs(q, k, v, gates, query_offset)
        cfg = self.config
        total = key_rows(k)
        if self.validates_prefix_sums and isinstance(actual_seq_len, Tensor):
            actual_seq_len = checked_prefix_sums("NativeSparseAttention", actual_seq_len, total)
        if q.shape[0] == 0:  # MindSpore's reductions reject empty inputs
            return self._no_tokens(q)
        dtype = cfg.ms_compute_dtype
        kv = self.branch_kv(k, v)
        if compressors is None:
            compressors = self.compressor_weights()
        layout = packed_layout(actual_seq_len, total, cfg)
        queries = query_layout(layout, query_offset or 0, q.shape[0], cfg.query_chunk_size)
        prefix_sums = packing.host_prefix_sums(actual_seq_len, total)
        route = kernel_routing.kernel_route(cfg, total, prefix_sums)
        if route.any_kernel and q.shape[0] == total:
            branches = self._branches_on_kernels(q.astype(dtype), kv, layout, queries, route, prefix_sums, compressors)
        else:
            branches = self._branches(q.astype(dtype), kv, layout, queries, compressors)
        out = self.gated_sum(gates.astype(dtype), branches["o_cmp"], branches["o_slc"], branches["o_win"])
        return {"out": out.astype(q.dtype), "o_cmp": branches["o_cmp"], "o_slc": branches["o_slc"],
                "o_win": branches["o_win"], "blocks": branches["blocks"], "valid": branches["valid"]}

    def _branches(self, q, kv, layout, queries, compressors):
        """The three branches, one call each: compression (Eq. 7), compressed attention with the
        blocks it selects (Eq. 8-11), selected attention (Eq. 12), the sliding window (§3.3.3).
        ``layout`` is the keys' (all ``T`` rows), ``queries`` the query rows' (``query_layout``)."""
        k_cmp = self.k_compressor(kv["cmp"][0], layout["window_starts"], compressors["k_weight"])
        v_cmp = self.v_compressor(kv["cmp"][1], layout["window_starts"], compressors["v_weight"],
                                  compressors["v_position_embedding"])
        o_cmp, blocks, valid = self._compressed_and_selection(q, k_cmp, v_cmp, queries)
        o_slc = self._selected(q, kv["slc"], blocks, valid, layout, queries)
        o_win = self._sliding_window(q, kv["win"], queries)
        return {"o_cmp": o_cmp, "o_slc": o_slc, "o_win": o_win, "blocks": blocks, "valid": valid}

    def _branches_on_kernels(self, q, kv, layout, queries, route, prefix_sums, compressors):
        """:meth:`_branches` with the branches that ``route`` sends to MindSpore's Ascend NSA kernels
        (``kernel_routing``: host prefix sums, half-precision compute, the kernels' constraints); the
        others, and the sliding window (no kernel), stay composite."""
        cfg = self.config
        k_w, v_w, v_pe = compressors["k_weight"], compressors["v_weight"], compressors["v_position_embedding"]
        if route.uses_kernel("compress"):
            slots = layout["window_starts"].shape[0]
            k_cmp = self.k_compressor.with_kernel(kv["cmp"][0], cfg.compress_stride, prefix_sums, slots, k_w)
            v_cmp = self.v_compressor.with_kernel(kv["cmp"][1], cfg.compress_stride, prefix_sums, slots, v_w, v_pe)
        else:
            k_cmp = self.k_compressor(kv["cmp"][0], layout["window_starts"], k_w)
            v_cmp = self.v_compressor(kv["cmp"][1], layout["window_starts"], v_w, v_pe)
        if route.uses_kernel("compressed_attention"):
            o_cmp, blocks, valid = kernel_routing.compressed_and_selection_kernel(
                cfg, q, k_cmp, v_cmp, layout["position"], prefix_sums)
        else:
            o_cmp, blocks, valid = self._compressed_and_selection(q, k_cmp, v_cmp, queries)
        if route.uses_kernel("selected_attention"):
            o_slc = kernel_routing.selected_kernel(cfg, q, kv["slc"][0], kv["slc"][1], blocks, valid, prefix_sums)
        else:
            o_slc = self._selected(q, kv["slc"], blocks, valid, layout, queries)
        o_win = self._sliding_window(q, kv["win"], queries)
        return {"o_cmp": o_cmp, "o_slc": o_slc, "o_win": o_win, "blocks": blocks, "valid": valid}

    def _compressed_and_selection(self, q, k_cmp, v_cmp, queries):
        """Compressed attention over the windows each query has seen, and the top-``n`` blocks its
        probabilities score: ``o_cmp (Tq, H, Dv)``, ``blocks`` and ``valid (Tq, Hkv, n)``."""
        return self.compressed_attention(q, k_cmp, v_cmp, queries["first_window"], queries["windows_ended"],
                                         queries["position"], queries["row_offset"])

    def _selected(self, q, kv_slc, blocks, valid, layout, queries):
        """Attention over the selected blocks' tokens, ``(Tq, H, Dv)``: block-masked for the chunks that
        end by row ``select_dense_rows`` (``BlockMaskedSelectedAttention``, one call per chunk), grouped
        by block after them (``SelectedAttention``, on the rows padded to whole chunks)."""
        cfg = self.config
        k, v = kv_slc
        chunk = cfg.query_chunk_size
        chunks = queries["chunks"]
        offset = queries["row_offset"]
        dense = dense_chunks(q.shape[0], chunk, offset, cfg.select_dense_rows)
        outs = []
        # head-major keys and values cut into the chunks once (unused, and compiled away, without dense chunks)
        k_pieces, v_pieces = _split_chunks(k.transpose(1, 0, 2), chunk, 1), _split_chunks(v.transpose(1, 0, 2), chunk, 1)
        for j in range(dense):
            c0, c1 = chunks[j]
            end = offset + c1  # the chunk's end among the keys
            outs.append(ungroup_outputs(self.block_masked_selected_attention(
                group_queries(q[c0:c1], cfg.num_kv_heads), _leading_rows(k_pieces, chunk, end),
                _leading_rows(v_pieces, chunk, end), layout["segment"][:end], layout["position"][:end],
                blocks[c0:c1].transpose(1, 0, 2), valid[c0:c1].transpose(1, 0, 2), queries["segment"][c0:c1],
                queries["position"][c0:c1]), c1 - c0))
        if dense < len(chunks):
            gathered = self.selected_attention(q, self.selected_attention.block_major(k, layout["block_starts"]),
                                               self.selected_attention.block_major(v, layout["block_starts"]),
                                               blocks, valid, queries["first_block"], queries["position"], offset)
            outs.append(gathered[dense * chunk:])
        return outs[0] if len(outs) == 1 else ops.cat(outs, 0)

    def _sliding_window(self, q, kv_win, queries):
        """Attention over the ``w`` keys ending at each query, ``(Tq, H, Dv)``."""
        return self.sliding_window(q, kv_win[0], kv_win[1], queries["position"], queries["row_offset"])

    def compressor_weights(self):
        """The cell's compressor parameters as a :class:`~nsa_layers.compressor.CompressorWeights`."""
        return {"k_weight": self.k_compressor.weight, "v_weight": self.v_compressor.weight,
                "v_position_embedding": self.v_compressor.position_embedding}

    def check_inputs(self, q, k, v, gates, query_offset=None):
        """Types, ranks, shapes and dtypes of the inputs, before any work (``input_checks``)."""
        cfg = self.config
        cell = "NativeSparseAttention"
        check_float_input(cell, "q", q, (("T", None), ("num_heads", cfg.num_heads), ("head_dim", cfg.head_dim)))
        rows = ("T", q.shape[0])
        keys = rows if query_offset is None else ("T", key_rows(k))
        check_kv_inputs(cell, k, v, (keys, ("num_kv_heads", cfg.num_kv_heads), ("head_dim", cfg.head_dim)),
                        (keys, ("num_kv_heads", cfg.num_kv_heads), ("v_head_dim", cfg.v_head_dim)))
        check_float_input(cell, "gates", gates, (rows, ("num_heads", cfg.num_heads), ("branches", 3)))
        if query_offset is not None:
            check_query_offset(cell, query_offset, q.shape[0], keys[1])

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
