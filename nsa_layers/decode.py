"""The core's decode cells: prefill a packed batch of new sequences into cache slots, then step each
slot by ``0 .. max_step_tokens`` new tokens, exact to the training forward.

A step writes its tokens' keys and values first, then compresses every window that its tokens
complete, then attends: each new query uses its own position for every rule (windows ended,
candidate and forced blocks, causal keys inside its block, the ``w``-key window), so the later
tokens of a step are invisible to the earlier ones. The rules are the training code's
(``windows_ended``, the core's ``select_blocks`` and ``compress_windows``, ``selected_key_limit``,
``window_reach``, ``attention_forward``, ``GatedSum``); only the addressing differs: a query reads
its keys from its slot's rows of :class:`~nsa_layers.kv_cache.NSAKVCache` by position, and the cache
says which rows those are.

The host-checked front of these cells is :class:`~nsa_layers.decoder.NSADecoder`.

Shapes: ``B`` slots, ``Q`` new tokens packed slot after slot (TND), ``H``/``Hkv`` heads,
``Dq``/``Dv`` head dims, ``n`` selected blocks, ``W`` compressed rows per slot.
"""

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .attention_math import attention_forward, column_tiled, masked_score, row_tiled, visibility_bias
from .layout import known_prefix_sums, token_layout, windows_ended
from .selected_attention import selected_key_limit
from .sliding_window import window_reach

__all__ = ["NSAPrefill", "NSADecodeStep", "step_positions", "DETAIL_FIELDS"]

# the cells' outputs, in this order (a tuple: a compiled graph's dict output comes back as a tuple
# under MindSpore's strict syntax level, which MindFormers sets process-wide); NSADecoder names them
DETAIL_FIELDS = ("out", "o_cmp", "o_slc", "o_win", "blocks", "valid")

_FLOOR_MOD = ops.FloorMod()


def step_positions(lengths, counts, total):
    """Slot and position of each of a step's ``total`` new tokens, ``(Q,)`` int32 each: tokens come
    slot after slot, ``counts (B,)`` per slot, after the ``lengths (B,)`` tokens their slot holds."""
    slot, index = token_layout(ops.cumsum(counts.astype(ms.int32), 0), total)[:2]
    return slot, ops.gather(lengths, slot, 0) + index


def _per_head(bias, kv_heads):
    """``(Q, 1, N)`` bias of each query -> ``(Q * Hkv, 1, N)``, the same for its KV heads."""
    rows, _, keys = bias.shape
    return ops.tile(bias.reshape(rows, 1, 1, keys), (1, kv_heads, 1, 1)).reshape(rows * kv_heads, 1, keys)


class NSAPrefill(nn.Cell):
    """Prefill: the training forward of a packed batch of new sequences, and its K/V written into
    cache slots (each sequence replaces what its slot held).

    Args:
        core (NativeSparseAttention): the layer.
        cache (NSAKVCache): its cache.

    Inputs:
        q, k, v, gates: as :meth:`NativeSparseAttention.forward_with_details` (``T`` tokens).
        actual_seq_len (Tensor): ``(N,)`` int32 prefix sums, one end per sequence (the last is ``T``;
            a repeated value is an empty sequence), checked on the host by ``NSADecoder``.
        slots (Tensor): ``(N,)`` int32 distinct cache slot of each sequence.

    Outputs:
        The :class:`NSADetails` of the ``T`` tokens (the training forward's) as a tuple in
        :data:`DETAIL_FIELDS` order.
    """

    def __init__(self, core, cache):
        super().__init__(auto_prefix=False)  # the core's parameter names stay the layer's
        self.core = core
        self.cache = cache

    def construct(self, q, k, v, gates, actual_seq_len, slots):
        total = q.shape[0]
        sums = known_prefix_sums(actual_seq_len)
        details = self.core.forward_with_details(q, k, v, gates, sums)
        cache, cfg = self.cache, self.core.config
        kv = self.core.branch_kv(k, v)
        ends = sums["ends"]
        segment, position = token_layout(ends, total)[:2]
        slot = ops.gather(slots, segment, 0)
        history = cache.history_rows(slot, position)
        cache.write(cache.k_selected, history, kv["slc"][0])
        cache.write(cache.v_selected, history, kv["slc"][1])
        lengths = ends - ops.cat((ops.zeros((1,), ms.int32), ends[:-1]))
        starts = ends - lengths
        if cache.independent_kv:
            self._fill_ring(cache.window_source(), cache.window_ring, cache.window_rows, kv["win"], starts, lengths,
                            slots)
            self._fill_ring(cache.tail_source(), cache.tail_ring, cache.tail_rows, kv["cmp"], starts, lengths, slots)
        # the first window rows of the slot, as many as T tokens can complete, from the sequence's
        # rows (rows of windows it has not completed hold garbage, never visible)
        block, stride = cfg.compress_block_size, cfg.compress_stride
        count = min(cache.windows, max(1, (total - block) // stride + 1))
        window_ids = ops.arange(0, count, dtype=ms.int32)
        first_rows = column_tiled(starts, count) + row_tiled(window_ids * stride, starts.shape[0])
        rows = ops.minimum(first_rows.reshape(-1, 1) + ops.arange(0, block, dtype=ms.int32).reshape(1, -1), total - 1)
        target = cache.compressed_rows(column_tiled(slots, count), row_tiled(window_ids, slots.shape[0]))
        target = target.reshape(-1, cache.kv_heads)
        k_rows, v_rows = ops.gather(kv["cmp"][0], rows.reshape(-1), 0), ops.gather(kv["cmp"][1], rows.reshape(-1), 0)
        shape = (rows.shape[0], block, cfg.num_kv_heads)
        k_cmp, v_cmp = self.core.compress_windows(k_rows.reshape(shape + (cfg.head_dim,)),
                                                  v_rows.reshape(shape + (cfg.v_head_dim,)))
        cache.write(cache.k_compressed, target, k_cmp)
        cache.write(cache.v_compressed, target, v_cmp)
        cache.set_lengths(slots, lengths)
        return tuple(details[name] for name in DETAIL_FIELDS)

    def _fill_ring(self, buffers, ring, ring_rows, kv, starts, lengths, slots):
        """Every row ``r`` of each sequence's ring (``ring`` rows, addressed by ``ring_rows``): its latest
        position ``p < length`` with ``p % ring == r`` (garbage where there is none)."""
        total = kv[0].shape[0]
        ring_ids = ops.arange(0, ring, dtype=ms.int32)
        last = column_tiled(lengths - 1, ring)
        position = last - _FLOOR_MOD(last - row_tiled(ring_ids, lengths.shape[0]), ring)
        rows = ops.minimum(column_tiled(starts, ring) + ops.maximum(position, 0), total - 1).reshape(-1)
        target = ring_rows(column_tiled(slots, ring), row_tiled(ring_ids, slots.shape[0]))
        target = target.reshape(-1, self.cache.kv_heads)
        self.cache.write(buffers[0], target, ops.gather(kv[0], rows, 0))
        self.cache.write(buffers[1], target, ops.gather(kv[1], rows, 0))


class NSADecodeStep(nn.Cell):
    """One decode step: ``counts[b]`` new tokens for slot ``b`` (0 = idle; more than 1 = chunked
    prefill or multi-token decode), attending to their slot's cache; the cache is updated in place.

    Args:
        core (NativeSparseAttention): the layer.
        cache (NSAKVCache): its cache.

    Inputs:
        q (Tensor): ``(Q, H, Dq)`` the new tokens' queries, slot after slot; ``k``, ``v``: their keys
            ``(Q, Hkv, Dq)`` and values ``(Q, Hkv, Dv)``, or 3-tuples (independent K/V), as the core takes.
        gates (Tensor): ``(Q, H, 3)``.
        counts (Tensor): ``(B,)`` int32 new tokens per slot, summing to ``Q``.

    Outputs:
        The :class:`NSADetails` of the ``Q`` new tokens (what ``forward_with_details`` on each whole
        sequence gives at their rows) as a tuple in :data:`DETAIL_FIELDS` order.
    """

    def __init__(self, core, cache):
        super().__init__(auto_prefix=False)  # the core's parameter names stay the layer's
        cfg = core.config
        self.core = core
        self.cache = cache
        self.precision = core.precision
        self.masked = masked_score(self.precision.softmax)
        self.num_blocks = (cache.max_len - 1) // cfg.select_block_size + 1  # any position's own block + 1
        self.window_ids = Tensor(np.arange(cache.windows, dtype=np.int32))
        self.tail_offsets = Tensor(np.arange(cfg.compress_block_size, dtype=np.int32))
        self.block_offsets = Tensor(np.arange(cfg.select_block_size, dtype=np.int32))
        # key j of a query's window is at position t - (w - 1) + j, distance w - 1 - j back
        self.window_distance = Tensor(np.arange(cfg.window_size - 1, -1, -1, dtype=np.int32))

    def construct(self, q, k, v, gates, counts):
        slot, position = self.positions(counts, q.shape[0])
        return self.attend(q, k, v, gates, counts, slot, position)

    def positions(self, counts, total):
        """Slot and position ``(Q,)`` int32 of each of the step's ``total`` new tokens (:func:`step_positions`
        after the tokens the cache holds)."""
        return step_positions(self.cache.lengths, counts, total)

    def attend(self, q, k, v, gates, counts, slot, position):
        """The step with each new token's ``slot`` and ``position`` ``(Q,)`` int32 already known
        (:func:`step_positions`; the self-attention step needs them for rotary first)."""
        self.core.check_inputs(q, k, v, gates)
        out_dtype = q.dtype
        kv = self.core.branch_kv(k, v)
        q = self.precision.hold(q)
        self._write_tokens(kv, slot, position)
        self._write_compressed(kv, slot, position)
        o_cmp, blocks, valid = self._compressed_and_selection(q, slot, position)
        o_slc = self._selected(q, slot, position, blocks, valid)
        o_win = self._window(q, slot, position)
        out = self.core.gated_sum(self.precision.hold(gates), o_cmp, o_slc, o_win)
        self.cache.add_lengths(counts)
        return out.astype(out_dtype), o_cmp, o_slc, o_win, blocks, valid

    def _write_tokens(self, kv, slot, position):
        """The new tokens' K/V into the history (row = position) and, with independent K/V, the rings."""
        cache = self.cache
        history = cache.history_rows(slot, position)
        cache.write(cache.k_selected, history, kv["slc"][0])
        cache.write(cache.v_selected, history, kv["slc"][1])
        if cache.independent_kv:
            k_window, v_window = cache.window_source()
            window = cache.window_rows(slot, position)
            cache.write(k_window, window, kv["win"][0])
            cache.write(v_window, window, kv["win"][1])
            k_tail, v_tail = cache.tail_source()
            tail = cache.tail_rows(slot, position)
            cache.write(k_tail, tail, kv["cmp"][0])
            cache.write(v_tail, tail, kv["cmp"][1])

    def _write_compressed(self, kv, slot, position):
        """Compress the window each new token completes (``L >= l`` and ``(L - l) % d == 0`` for
        ``L = position + 1``) into its row; tokens that complete none write the scratch row."""
        cache, cfg = self.cache, self.core.config
        block, stride = cfg.compress_block_size, cfg.compress_stride
        k_src, v_src = cache.tail_source()
        start = position - (block - 1)
        complete = ops.logical_and(start >= 0, start % stride == 0)
        window_positions = ops.maximum(start.reshape(-1, 1) + self.tail_offsets.reshape(1, -1), 0)
        rows = cache.tail_rows(slot.reshape(-1, 1), window_positions)  # (Q, l, Hkv)
        target = cache.compressed_rows(slot, ops.maximum(start, 0) // stride, complete)
        k_cmp, v_cmp = self.core.compress_windows(cache.read(k_src, rows), cache.read(v_src, rows))
        cache.write(cache.k_compressed, target, k_cmp)
        cache.write(cache.v_compressed, target, v_cmp)

    def _grouped(self, q):
        """``(Q, H, Dq)`` -> ``(Q * Hkv, G, Dq)``: each KV head's queries (heads are blocked by group)."""
        cfg = self.core.config
        return q.reshape(q.shape[0] * cfg.num_kv_heads, cfg.group_size, q.shape[2])

    def _attend(self, q, k, v, bias):
        """Grouped attention of the new queries over ``(Q * Hkv, N, D)`` keys and values with a
        ``(Q, 1, N)`` bias: ``(out (Q, H, Dv), probs (Q * Hkv, G, 1, N))``."""
        cfg = self.core.config
        out, probs = attention_forward(self._grouped(q), k, v, _per_head(bias, cfg.num_kv_heads), cfg.scale,
                                       self.precision)
        return out.reshape(q.shape[0], cfg.num_heads, v.shape[2]), probs

    def _compressed_and_selection(self, q, slot, position):
        """The compressed branch over the slot's ended windows, and the blocks its probabilities select."""
        cache, cfg = self.cache, self.core.config
        total = q.shape[0]
        rows = cache.compressed_rows(slot.reshape(-1, 1), self.window_ids.reshape(1, -1)).transpose(0, 2, 1)
        keys = cache.read(cache.k_compressed, rows).reshape(total * cache.kv_heads, cache.windows, cfg.head_dim)
        values = cache.read(cache.v_compressed, rows).reshape(total * cache.kv_heads, cache.windows, cfg.v_head_dim)
        ended = windows_ended(position, cfg.compress_block_size, cfg.compress_stride)
        visible = row_tiled(self.window_ids, total) < column_tiled(ended, cache.windows)
        bias = visibility_bias(visible, self.precision.softmax_storage, self.masked).reshape(total, 1, cache.windows)
        out, probs = self._attend(q, keys, values, bias)
        sees = ops.tile(ops.cast(ended > 0, q.dtype).reshape(-1, 1, 1), (1, cfg.num_heads, cfg.v_head_dim))
        # the selector reads (Hkv, G, Q, W) probabilities, windows from slot 0 of each query's rows
        probs = probs.reshape(total, cache.kv_heads, cfg.group_size, cache.windows).transpose(1, 2, 0, 3)
        blocks, valid = self.core.select_blocks(probs, ops.zeros_like(position), position, self.num_blocks)
        return out * sees, blocks.transpose(1, 0, 2), valid.transpose(1, 0, 2)

    def _selected(self, q, slot, position, blocks, valid):
        """The selected branch: each query over its ``n`` blocks' tokens (up to itself in its own block)."""
        cache, cfg = self.cache, self.core.config
        total, block = q.shape[0], cfg.select_block_size
        count = cfg.select_block_count
        heads = cache.kv_heads
        last = selected_key_limit(blocks, valid, ops.tile(position.reshape(-1, 1, 1), (1, heads, count)), block)
        keys = blocks.reshape(total, heads, count, 1) * block + self.block_offsets.reshape(1, 1, 1, -1)
        visible = self.block_offsets.reshape(1, 1, 1, -1) <= last.reshape(total, heads, count, 1)
        slots = ops.tile(slot.reshape(-1, 1, 1, 1), (1, heads, count, block))
        rows = cache.history_rows_by_head(slots, ops.minimum(keys, cache.max_len - 1))
        rows = rows.reshape(total, heads, count * block)
        k_sel = cache.read(cache.k_selected, rows).reshape(total * heads, count * block, cfg.head_dim)
        v_sel = cache.read(cache.v_selected, rows).reshape(total * heads, count * block, cfg.v_head_dim)
        bias = visibility_bias(visible, self.precision.softmax_storage, self.masked)
        bias = bias.reshape(total * heads, 1, count * block)
        out = attention_forward(self._grouped(q), k_sel, v_sel, bias, cfg.scale, self.precision)[0]
        return out.reshape(total, cfg.num_heads, cfg.v_head_dim)

    def _window(self, q, slot, position):
        """The window branch: each query over the ``w`` keys ending at it, inside its sequence."""
        cache, cfg = self.cache, self.core.config
        total, window = q.shape[0], cfg.window_size
        k_src, v_src = cache.window_source()
        keys = position.reshape(-1, 1) - self.window_distance.reshape(1, -1)  # (Q, w) positions
        visible = row_tiled(self.window_distance, total) <= column_tiled(window_reach(position, window), window)
        rows = cache.window_rows(slot.reshape(-1, 1), ops.maximum(keys, 0)).transpose(0, 2, 1)
        k_win = cache.read(k_src, rows).reshape(total * cache.kv_heads, window, cfg.head_dim)
        v_win = cache.read(v_src, rows).reshape(total * cache.kv_heads, window, cfg.v_head_dim)
        bias = visibility_bias(visible, self.precision.softmax_storage, self.masked).reshape(total, 1, window)
        return self._attend(q, k_win, v_win, bias)[0]
