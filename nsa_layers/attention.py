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

from . import kernel_routing
from .compressed_attention import CompressedAttention
from .compressor import KVCompressor
from .gate import GatedSum
from .input_checks import check_float_input, check_kv_inputs, check_query_offset, key_rows
from .layout import packed_layout, prefix_sums, query_layout
from .precision import precision_of
from .selected_attention import SelectedAttention
from .sliding_window import SlidingWindowAttention

__all__ = ["NativeSparseAttention", "NSADetails"]


class NSADetails(TypedDict):
    """What :meth:`NativeSparseAttention.forward_with_details` returns (a ``dict``, so that it also
    carries gradients in graph mode; see ``layout.PackedLayout``).

    Fields:
        out: ``(T, H, Dv)`` the gated output, in the dtype of ``q``.
        o_cmp, o_slc, o_win: ``(T, H, Dv)`` the branch outputs, compute-dtype values (in
            ``precision.storage``: float32 for bfloat16 on CPU).
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
        config (NSAConfig): sizes; ``compute_dtype`` and ``softmax_dtype`` set the precision
            (``nsa_layers.precision``: values in the compute dtype, statistics in float32).
        own_parameters (bool): False builds the compressors without parameters: every forward then
            passes them (``compressors``), as one rank of a sharded core does (``nsa_layers.parallel``).
        precision (Precision, optional): the enclosing layer's; default decided from ``config``. Every
            cell of the core takes this one.

    Inputs:
        q (Tensor): ``(T, H, Dq)``.
        k, v (Tensor or tuple): keys ``(T, Hkv, Dq)`` and values ``(T, Hkv, Dv)`` shared by the three
            branches, or 3-tuples ``(compressed, selected, window)`` of them (independent K/V).
        gates (Tensor): ``(T, H, 3)`` gate values for (compressed, selected, window).
        actual_seq_len: segment ends as prefix sums: ``None`` (one segment), a tuple/list/array, or an
            int Tensor as MindFormers gives it (leading 0, repeated values and padding tolerated).
            Values must lie in ``[0, T]`` and not decrease: host values are checked while compiling,
            a Tensor's when the graph runs (``ValueError`` either way). A
            :class:`~nsa_layers.layout.PrefixSums` record (what a calling layer has already checked,
            ``layout.prefix_sums``) is used as it is.
        query_offset (int or None): the queries (and gates) are rows ``query_offset .. query_offset +
            Tq - 1`` of the ``T`` rows of ``k`` and ``v``, which ``actual_seq_len`` lays out (static;
            ``None``, the default: all of them, ``Tq = T``). Context parallelism gives each rank its own
            query rows this way (``nsa_layers.parallel``).

    Outputs:
        Tensor ``(Tq, H, Dv)`` in the dtype of ``q`` (empty for ``Tq = 0``).

    Attributes: ``precision`` (:class:`~nsa_layers.precision.Precision`), decided once from the
    config and the device: ``precision.swaps`` says whether the CPU's bfloat16 swap applies.

    Parameters: ``k_compressor`` and ``v_compressor`` (``KVCompressor``: per-head weights
    ``(l, Hkv)``, initialised as mean pooling; the value compressor also has the optional
    intra-block position embedding, see ``NSAConfig.use_position_embedding``).
    """

    def __init__(self, config, own_parameters=True, precision=None):
        super().__init__()
        self.config = config
        self.precision = precision_of(config, precision)
        # keys get no intra-block position embedding: it would be inert (see NSAConfig.use_position_embedding)
        self.k_compressor = KVCompressor(config.compress_block_size, config.num_kv_heads, config.head_dim,
                                         use_position_embedding=False, own_parameters=own_parameters,
                                         precision=self.precision)
        self.v_compressor = KVCompressor(config.compress_block_size, config.num_kv_heads, config.v_head_dim,
                                         config.use_position_embedding, own_parameters, self.precision)
        self.compressed_attention = CompressedAttention(config, self.precision)
        self.selected_attention = SelectedAttention(config, self.precision)
        self.sliding_window = SlidingWindowAttention(config, self.precision)
        self.gated_sum = GatedSum(self.precision)

    def branch_paths(self, total, actual_seq_len=None):
        """Which implementation each branch takes for ``total`` tokens laid out by ``actual_seq_len``
        (the decision the forward makes, ``kernel_routing.plan_kernel_route``).

        Returns:
            ``(paths, reasons)``: ``paths`` maps ``"compress"``, ``"compressed_attention"``,
            ``"selection"``, ``"selected_attention"`` and ``"sliding_window"`` to ``"ascend_kernel"``
            (a MindSpore Ascend NSA kernel through ``nsa_layers.ops``) or ``"mindspore"`` (composite
            ops); ``reasons`` says, for each composite branch, which kernel condition failed.
        """
        sums = prefix_sums("NativeSparseAttention", actual_seq_len, total)
        route = kernel_routing.route_for(self.config, total, sums["host"])
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
        sums = prefix_sums("NativeSparseAttention", actual_seq_len, total)
        if q.shape[0] == 0:  # MindSpore's reductions reject empty inputs
            return self._no_tokens(q)
        hold = self.precision.hold
        kv = self.branch_kv(k, v)
        if compressors is None:
            compressors = self.compressor_weights()
        layout = packed_layout(sums, total, cfg)
        queries = query_layout(layout, query_offset or 0, q.shape[0], cfg.query_chunk_size)
        route = kernel_routing.kernel_route(cfg, total, sums["host"])
        if route.any_kernel and q.shape[0] == total:
            branches = self._branches_on_kernels(hold(q), kv, layout, queries, route, compressors)
        else:
            branches = self._branches(hold(q), kv, layout, queries, compressors)
        out = self.gated_sum(hold(gates), branches["o_cmp"], branches["o_slc"], branches["o_win"])
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
        o_slc = self.selected_attention(q, kv["slc"][0], kv["slc"][1], blocks, valid, layout, queries)
        o_win = self._sliding_window(q, kv["win"], queries)
        return {"o_cmp": o_cmp, "o_slc": o_slc, "o_win": o_win, "blocks": blocks, "valid": valid}

    def _branches_on_kernels(self, q, kv, layout, queries, route, compressors):
        """:meth:`_branches` with the branches that ``route`` sends to MindSpore's Ascend NSA kernels
        (``kernel_routing``: host prefix sums, half-precision compute, the kernels' constraints); the
        others, and the sliding window (no kernel), stay composite."""
        cfg = self.config
        prefix = layout["prefix_sums"]["host"]
        k_w, v_w, v_pe = compressors["k_weight"], compressors["v_weight"], compressors["v_position_embedding"]
        if route.uses_kernel("compress"):
            slots = layout["window_starts"].shape[0]
            k_cmp = self.k_compressor.with_kernel(kv["cmp"][0], cfg.compress_stride, prefix, slots, k_w)
            v_cmp = self.v_compressor.with_kernel(kv["cmp"][1], cfg.compress_stride, prefix, slots, v_w, v_pe)
        else:
            k_cmp = self.k_compressor(kv["cmp"][0], layout["window_starts"], k_w)
            v_cmp = self.v_compressor(kv["cmp"][1], layout["window_starts"], v_w, v_pe)
        if route.uses_kernel("compressed_attention"):
            o_cmp, blocks, valid = kernel_routing.compressed_and_selection_kernel(
                cfg, q, k_cmp, v_cmp, layout["position"], prefix)
        else:
            o_cmp, blocks, valid = self._compressed_and_selection(q, k_cmp, v_cmp, queries)
        if route.uses_kernel("selected_attention"):
            o_slc = kernel_routing.selected_kernel(cfg, q, kv["slc"][0], kv["slc"][1], blocks, valid, prefix)
        else:
            o_slc = self.selected_attention(q, kv["slc"][0], kv["slc"][1], blocks, valid, layout, queries)
        o_win = self._sliding_window(q, kv["win"], queries)
        return {"o_cmp": o_cmp, "o_slc": o_slc, "o_win": o_win, "blocks": blocks, "valid": valid}

    def _compressed_and_selection(self, q, k_cmp, v_cmp, queries):
        """Compressed attention over the windows each query has seen, and the top-``n`` blocks its
        probabilities score: ``o_cmp (Tq, H, Dv)``, ``blocks`` and ``valid (Tq, Hkv, n)``."""
        return self.compressed_attention(q, k_cmp, v_cmp, queries["first_window"], queries["windows_ended"],
                                         queries["position"], queries["row_offset"])

    def _sliding_window(self, q, kv_win, queries):
        """Attention over the ``w`` keys ending at each query, ``(Tq, H, Dv)``."""
        return self.sliding_window(q, kv_win[0], kv_win[1], queries["position"], queries["row_offset"])

    def compressor_weights(self):
        """The cell's compressor parameters as a :class:`~nsa_layers.compressor.CompressorWeights`."""
        return {"k_weight": self.k_compressor.weight, "v_weight": self.v_compressor.weight,
                "v_position_embedding": self.v_compressor.position_embedding}

    def compress_windows(self, k_windows, v_windows):
        """Windows of raw keys ``(S, l, Hkv, Dq)`` and values ``(S, l, Hkv, Dv)`` -> their compressed
        rows ``(k_cmp (S, Hkv, Dq), v_cmp (S, Hkv, Dv))`` with the cell's compressors (Eq. 7; what
        decoding applies to the windows its new tokens complete)."""
        return self.k_compressor.compress_windows(k_windows), self.v_compressor.compress_windows(v_windows)

    def select_blocks(self, probs, first_window, position, num_blocks):
        """The top-``n`` blocks that compression probabilities ``(Hkv, G, C, S)`` select for ``C``
        queries (``BlockSelector``, as the compressed branch applies it): ``(blocks, valid)``, each
        ``(Hkv, C, n)``."""
        return self.compressed_attention.selector(probs, first_window, position, num_blocks)

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
        hold = self.precision.hold
        if isinstance(k, (tuple, list)):
            return {"cmp": (hold(k[0]), hold(v[0])), "slc": (hold(k[1]), hold(v[1])), "win": (hold(k[2]), hold(v[2]))}
        k, v = hold(k), hold(v)
        return {"cmp": (k, v), "slc": (k, v), "win": (k, v)}

    def _no_tokens(self, q):
        cfg = self.config
        empty = ops.zeros((0, cfg.num_heads, cfg.v_head_dim), self.precision.storage)
        slots = (0, cfg.num_kv_heads, cfg.select_block_count)
        return {"out": empty.astype(q.dtype), "o_cmp": empty, "o_slc": empty, "o_win": empty,
                "blocks": ops.zeros(slots, ms.int32), "valid": ops.zeros(slots, ms.bool_)}

