"""Decoding with an NSA KV cache: prefill a packed batch of new sequences into cache slots, then
step each slot by ``0 .. max_step_tokens`` new tokens, exact to the training forward.

A step writes its tokens' keys and values first, then compresses every window that its tokens
complete, then attends: each new query uses its own position for every rule (windows ended,
candidate and forced blocks, causal keys inside its block, the ``w``-key window), so the later
tokens of a step are invisible to the earlier ones. The rules are the training code's
(``windows_ended``, ``BlockSelector``, ``selected_key_limit``, ``window_reach``, the compressor's
``compress_windows``, ``attention_forward``, ``GatedSum``); only the addressing differs: a query
reads its keys from its slot's rows of :class:`~nsa_layers.kv_cache.NSAKVCache` by position.

Shapes: ``B`` slots, ``Q`` new tokens packed slot after slot (TND), ``H``/``Hkv`` heads,
``Dq``/``Dv`` head dims, ``n`` selected blocks, ``W`` compressed rows per slot.
"""

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from .input_checks import check_float_input
from .attention_math import attention_forward, column_tiled, masked_score, row_tiled, visibility_bias
from .kv_cache import NSAKVCache
from .layout import token_layout, windows_ended
from .selected_attention import selected_key_limit
from .sliding_window import window_reach

__all__ = ["NSADecoder", "NSASelfAttentionDecoder", "NSAPrefill", "NSADecodeStep", "step_positions", "DETAIL_FIELDS"]

# the cells' outputs, in this order (a tuple: a compiled graph's dict output comes back as a tuple
# under MindSpore's strict syntax level, which MindFormers sets process-wide); NSADecoder names them
DETAIL_FIELDS = ("out", "o_cmp", "o_slc", "o_win", "blocks", "valid")

_SCATTER = ops.ScatterUpdate()  # in place on the cache's Parameters
_FLOOR_MOD = ops.FloorMod()


def step_positions(lengths, counts, total):
    """Slot and position of each of a step's ``total`` new tokens, ``(Q,)`` int32 each: tokens come
    slot after slot, ``counts (B,)`` per slot, after the ``lengths (B,)`` tokens their slot holds."""
    slot, index = token_layout(ops.cumsum(counts.astype(ms.int32), 0), total)[:2]
    return slot, ops.gather(lengths, slot, 0) + index


def _head_rows(slot_rows, kv_heads):
    """Rows ``(...)`` of a slot-major buffer -> ``(..., Hkv)`` rows of its ``(rows * Hkv, D)`` layout."""
    heads = ops.arange(0, kv_heads, dtype=ms.int32)
    return slot_rows.reshape(slot_rows.shape + (1,)) * kv_heads + heads.reshape((1,) * slot_rows.ndim + (kv_heads,))


def _gather_rows(buffer, rows):
    """``(rows * Hkv, D)`` buffer, int32 row indices ``(...)`` -> ``(..., D)``."""
    return ops.gather(buffer, rows.reshape(-1), 0).reshape(rows.shape + (buffer.shape[1],))


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
            a repeated value is an empty sequence).
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
        details = self.core.forward_with_details(q, k, v, gates, actual_seq_len)
        cache, cfg = self.cache, self.core.config
        kv = self.core.branch_kv(k, v)
        total = q.shape[0]
        ends = actual_seq_len.reshape(-1).astype(ms.int32)
        segment, position = token_layout(ends, total)[:2]
        slot = ops.gather(slots, segment, 0)
        selected = _head_rows(slot * cache.max_len + position, cache.kv_heads)
        _SCATTER(cache.k_selected, selected, kv["slc"][0])
        _SCATTER(cache.v_selected, selected, kv["slc"][1])
        lengths = ends - ops.cat((ops.zeros((1,), ms.int32), ends[:-1]))
        starts = ends - lengths
        if cache.independent_kv:
            self._fill_ring(cache.k_window, cache.v_window, cache.window_rows, kv["win"], starts, lengths, slots)
            self._fill_ring(cache.k_tail, cache.v_tail, cache.tail_rows, kv["cmp"], starts, lengths, slots)
        # the first window rows of the slot, as many as T tokens can complete, from the sequence's
        # rows (rows of windows it has not completed hold garbage, never visible)
        block, stride = cfg.compress_block_size, cfg.compress_stride
        count = min(cache.windows, max(1, (total - block) // stride + 1))
        window_ids = ops.arange(0, count, dtype=ms.int32)
        first_rows = column_tiled(starts, count) + row_tiled(window_ids * stride, starts.shape[0])
        rows = ops.minimum(first_rows.reshape(-1, 1) + ops.arange(0, block, dtype=ms.int32).reshape(1, -1), total - 1)
        target = _head_rows(column_tiled(slots, count) * cache.windows + row_tiled(window_ids, slots.shape[0]),
                            cache.kv_heads).reshape(-1, cache.kv_heads)
        k_rows, v_rows = ops.gather(kv["cmp"][0], rows.reshape(-1), 0), ops.gather(kv["cmp"][1], rows.reshape(-1), 0)
        shape = (rows.shape[0], block, cfg.num_kv_heads)
        _SCATTER(cache.k_compressed, target, self.core.k_compressor.compress_windows(
            k_rows.reshape(shape + (cfg.head_dim,))))
        _SCATTER(cache.v_compressed, target, self.core.v_compressor.compress_windows(
            v_rows.reshape(shape + (cfg.v_head_dim,))))
        _SCATTER(cache.lengths, slots, lengths)
        return tuple(details[name] for name in DETAIL_FIELDS)

    def _fill_ring(self, k_ring, v_ring, ring, kv, starts, lengths, slots):
        """Every row ``r`` of each sequence's ring: its latest position ``p < length`` with
        ``p % ring == r`` (garbage where there is none)."""
        total = kv[0].shape[0]
        ring_ids = ops.arange(0, ring, dtype=ms.int32)
        last = column_tiled(lengths - 1, ring)
        position = last - _FLOOR_MOD(last - row_tiled(ring_ids, lengths.shape[0]), ring)
        rows = ops.minimum(column_tiled(starts, ring) + ops.maximum(position, 0), total - 1).reshape(-1)
        target = _head_rows(column_tiled(slots, ring) * ring + row_tiled(ring_ids, slots.shape[0]),
                            self.cache.kv_heads).reshape(-1, self.cache.kv_heads)
        _SCATTER(k_ring, target, ops.gather(kv[0], rows, 0))
        _SCATTER(v_ring, target, ops.gather(kv[1], rows, 0))


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
        self.masked = masked_score(cfg.ms_compute_dtype)
        self.num_blocks = (cache.max_len - 1) // cfg.select_block_size + 1  # any position's own block + 1
        self.window_ids = Tensor(np.arange(cache.windows, dtype=np.int32))
        self.tail_offsets = Tensor(np.arange(cfg.compress_block_size, dtype=np.int32))
        self.block_offsets = Tensor(np.arange(cfg.select_block_size, dtype=np.int32))
        # key j of a query's window is at position t - (w - 1) + j, distance w - 1 - j back
        self.window_distance = Tensor(np.arange(cfg.window_size - 1, -1, -1, dtype=np.int32))

    def construct(self, q, k, v, gates, counts):
        slot, position = step_positions(self.cache.lengths, counts, q.shape[0])
        return self.attend(q, k, v, gates, counts, slot, position)

    def attend(self, q, k, v, gates, counts, slot, position):
        """The step with each new token's ``slot`` and ``position`` ``(Q,)`` int32 already known
        (:func:`step_positions`; the self-attention step needs them for rotary first)."""
        self.core.check_inputs(q, k, v, gates)
        cfg = self.core.config
        dtype, out_dtype = cfg.ms_compute_dtype, q.dtype
        kv = self.core.branch_kv(k, v)
        q = q.astype(dtype)
        self._write_tokens(kv, slot, position)
        self._write_compressed(kv, slot, position)
        o_cmp, blocks, valid = self._compressed_and_selection(q, slot, position)
        o_slc = self._selected(q, slot, position, blocks, valid)
        o_win = self._window(q, slot, position)
        out = self.core.gated_sum(gates.astype(dtype), o_cmp, o_slc, o_win)
        ops.assign(self.cache.lengths, self.cache.lengths + counts.astype(ms.int32))
        return out.astype(out_dtype), o_cmp, o_slc, o_win, blocks, valid

    def _write_tokens(self, kv, slot, position):
        """The new tokens' K/V into the history (row = position) and, with independent K/V, the rings."""
        cache = self.cache
        selected = _head_rows(slot * cache.max_len + position, cache.kv_heads)
        _SCATTER(cache.k_selected, selected, kv["slc"][0])
        _SCATTER(cache.v_selected, selected, kv["slc"][1])
        if cache.independent_kv:
            window = _head_rows(slot * cache.window_rows + position % cache.window_rows, cache.kv_heads)
            _SCATTER(cache.k_window, window, kv["win"][0])
            _SCATTER(cache.v_window, window, kv["win"][1])
            tail = _head_rows(slot * cache.tail_rows + position % cache.tail_rows, cache.kv_heads)
            _SCATTER(cache.k_tail, tail, kv["cmp"][0])
            _SCATTER(cache.v_tail, tail, kv["cmp"][1])

    def _write_compressed(self, kv, slot, position):
        """Compress the window each new token completes (``L >= l`` and ``(L - l) % d == 0`` for
        ``L = position + 1``) into its row; tokens that complete none write the scratch row."""
        cache, cfg = self.cache, self.core.config
        block, stride = cfg.compress_block_size, cfg.compress_stride
        k_src, v_src, ring = cache.tail_source()
        start = position - (block - 1)
        complete = ops.logical_and(start >= 0, start % stride == 0)
        rows = _head_rows(slot.reshape(-1, 1) * ring + (ops.maximum(start.reshape(-1, 1) + self.tail_offsets.reshape(
            1, -1), 0) % ring), cache.kv_heads)  # (Q, l, Hkv)
        target = ops.where(complete, slot * cache.windows + ops.maximum(start, 0) // stride,
                           ops.full_like(slot, cache.batch_slots * cache.windows))
        target = _head_rows(target, cache.kv_heads)
        _SCATTER(cache.k_compressed, target, self.core.k_compressor.compress_windows(_gather_rows(k_src, rows)))
        _SCATTER(cache.v_compressed, target, self.core.v_compressor.compress_windows(_gather_rows(v_src, rows)))

    def _grouped(self, q):
        """``(Q, H, Dq)`` -> ``(Q * Hkv, G, Dq)``: each KV head's queries (heads are blocked by group)."""
        cfg = self.core.config
        return q.reshape(q.shape[0] * cfg.num_kv_heads, cfg.group_size, q.shape[2])

    def _attend(self, q, k, v, bias):
        """Grouped attention of the new queries over ``(Q * Hkv, N, D)`` keys and values with a
        ``(Q, 1, N)`` bias: ``(out (Q, H, Dv), probs (Q * Hkv, G, 1, N))``."""
        cfg = self.core.config
        out, probs = attention_forward(self._grouped(q), k, v, _per_head(bias, cfg.num_kv_heads), cfg.scale)
        return out.reshape(q.shape[0], cfg.num_heads, v.shape[2]), probs

    def _compressed_and_selection(self, q, slot, position):
        """The compressed branch over the slot's ended windows, and the blocks its probabilities select."""
        cache, cfg = self.cache, self.core.config
        total = q.shape[0]
        rows = _head_rows(slot.reshape(-1, 1) * cache.windows + self.window_ids.reshape(1, -1), cache.kv_heads)
        rows = rows.transpose(0, 2, 1)  # (Q, Hkv, W)
        keys = _gather_rows(cache.k_compressed, rows).reshape(total * cache.kv_heads, cache.windows, cfg.head_dim)
        values = _gather_rows(cache.v_compressed, rows).reshape(total * cache.kv_heads, cache.windows, cfg.v_head_dim)
        ended = windows_ended(position, cfg.compress_block_size, cfg.compress_stride)
        visible = row_tiled(self.window_ids, total) < column_tiled(ended, cache.windows)
        bias = visibility_bias(visible, q.dtype, self.masked).reshape(total, 1, cache.windows)
        out, probs = self._attend(q, keys, values, bias)
        sees = ops.tile(ops.cast(ended > 0, q.dtype).reshape(-1, 1, 1), (1, cfg.num_heads, cfg.v_head_dim))
        # the selector reads (Hkv, G, Q, W) probabilities, windows from slot 0 of each query's rows
        probs = probs.reshape(total, cache.kv_heads, cfg.group_size, cache.windows).transpose(1, 2, 0, 3)
        blocks, valid = self.core.compressed_attention.selector(probs, ops.zeros_like(position), position,
                                                                self.num_blocks)
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
        slot_rows = ops.tile(slot.reshape(-1, 1, 1, 1), (1, heads, count, block)) * cache.max_len + ops.minimum(
            keys, cache.max_len - 1)
        rows = (slot_rows * heads + ops.arange(0, heads, dtype=ms.int32).reshape(1, -1, 1, 1)).reshape(total, heads, count * block)
        k_sel = _gather_rows(cache.k_selected, rows).reshape(total * heads, count * block, cfg.head_dim)
        v_sel = _gather_rows(cache.v_selected, rows).reshape(total * heads, count * block, cfg.v_head_dim)
        bias = visibility_bias(visible, q.dtype, self.masked).reshape(total * heads, 1, count * block)
        out = attention_forward(self._grouped(q), k_sel, v_sel, bias, cfg.scale)[0]
        return out.reshape(total, cfg.num_heads, cfg.v_head_dim)

    def _window(self, q, slot, position):
        """The window branch: each query over the ``w`` keys ending at it, inside its sequence."""
        cache, cfg = self.cache, self.core.config
        total, window = q.shape[0], cfg.window_size
        k_src, v_src, ring = cache.window_source()
        keys = position.reshape(-1, 1) - self.window_distance.reshape(1, -1)  # (Q, w) positions
        visible = row_tiled(self.window_distance, total) <= column_tiled(window_reach(position, window), window)
        rows = _head_rows(slot.reshape(-1, 1) * ring + ops.maximum(keys, 0) % ring, cache.kv_heads).transpose(0, 2, 1)
        k_win = _gather_rows(k_src, rows).reshape(total * cache.kv_heads, window, cfg.head_dim)
        v_win = _gather_rows(v_src, rows).reshape(total * cache.kv_heads, window, cfg.v_head_dim)
        bias = visibility_bias(visible, q.dtype, self.masked).reshape(total, 1, window)
        return self._attend(q, k_win, v_win, bias)[0]


class NSADecoder:
    """Decoding for one :class:`~nsa_layers.NativeSparseAttention`: its cache, prefill and step, with
    every argument checked on the host before any work (a rejected call leaves the cache unchanged).

    The two calls are cells (:class:`NSAPrefill`, :class:`NSADecodeStep`): they run in the context's
    mode, and in graph mode a step is compiled once per ``Q`` whatever the lengths.

    Args:
        core (NativeSparseAttention): the layer (its parameters are shared, not copied).
        batch_slots (int): ``B``.
        max_len (int): tokens per slot.
        max_step_tokens (int): most tokens a slot takes in one step.
        name (str, optional): prefix of the cache's parameter names (see :class:`NSAKVCache`).
    """

    def __init__(self, core, batch_slots, max_len, max_step_tokens=1, name=None):
        self.core = core
        self.cache = NSAKVCache(core.config, batch_slots, max_len, max_step_tokens, name)
        self.prefill_cell = NSAPrefill(core, self.cache)
        self.step_cell = NSADecodeStep(core, self.cache)

    def prefill(self, q, k, v, gates, actual_seq_len, slots):
        """Run the training forward on a packed batch of new sequences and store them in ``slots``.

        Args:
            q, k, v, gates: as :meth:`NativeSparseAttention.forward_with_details` (``T`` tokens).
            actual_seq_len: ``N`` prefix sums (tuple/list/array/int Tensor), one end per sequence,
                non-decreasing, the last ``T`` (a repeated value is an empty sequence).
            slots: ``N`` distinct slot indices in ``[0, B)``.

        Returns:
            :class:`NSADetails` of the ``T`` tokens.
        """
        self.core.check_inputs(q, k, v, gates)
        ends, slot_ids = self.check_prefill(q.shape[0], actual_seq_len, slots)
        return dict(zip(DETAIL_FIELDS, self.prefill_cell(q, _graph_input(k), _graph_input(v), gates, ends, slot_ids)))

    def step(self, q, k, v, gates, counts):
        """Append ``counts[b]`` new tokens to slot ``b`` and attend with them.

        Args:
            q, k, v, gates: the ``Q`` new tokens, slot after slot (see :class:`NSADecodeStep`).
            counts: ``B`` ints (tuple/list/array/int Tensor) in ``[0, max_step_tokens]`` summing to ``Q``.

        Returns:
            :class:`NSADetails` of the ``Q`` new tokens.
        """
        self.core.check_inputs(q, k, v, gates)
        counts = self.check_step(q.shape[0], counts)
        return dict(zip(DETAIL_FIELDS, self.step_cell(q, _graph_input(k), _graph_input(v), gates, counts)))

    def check_prefill(self, total, actual_seq_len, slots):
        """Host checks of a prefill of ``total`` tokens; returns ``(ends, slots)`` as int32 Tensors."""
        if total == 0:
            raise ValueError("NSADecoder.prefill: the batch holds no tokens (T=0); a prefill needs at least one.")
        ends = _host_ints("actual_seq_len", actual_seq_len)
        slot_ids = _host_ints("slots", slots)
        cache = self.cache
        if ends.size == 0 or ends.size != slot_ids.size:
            raise ValueError(f"NSADecoder.prefill: 'actual_seq_len' must hold one end per slot of 'slots' "
                             f"({slot_ids.size}), but got {ends.size}.")
        if np.any(np.diff(ends) < 0) or ends[0] < 0 or ends[-1] != total:
            raise ValueError(f"NSADecoder.prefill: 'actual_seq_len' must be non-decreasing from >= 0 and end at "
                             f"T={total}, but got {ends.tolist()}.")
        _check_slots("NSADecoder.prefill", slot_ids, cache.batch_slots)
        if len(set(slot_ids.tolist())) != slot_ids.size:
            raise ValueError(f"NSADecoder.prefill: 'slots' must be distinct, but got {slot_ids.tolist()}.")
        lengths = np.diff(np.concatenate(([0], ends)))
        if np.any(lengths > cache.max_len):
            i = int(np.argmax(lengths > cache.max_len))
            raise ValueError(f"NSADecoder.prefill: sequence {i} has {lengths[i]} tokens, more than "
                             f"max_len={cache.max_len}.")
        return Tensor(ends.astype(np.int32)), Tensor(slot_ids.astype(np.int32))

    def check_step(self, total, counts):
        """Host checks of a step of ``total`` new tokens; returns ``counts`` as an int32 Tensor."""
        cache = self.cache
        counts_host = _host_ints("counts", counts)
        if counts_host.shape != (cache.batch_slots,):
            raise ValueError(f"NSADecoder.step: 'counts' must hold one count per slot (B={cache.batch_slots}), "
                             f"but got shape {counts_host.shape}.")
        if np.any(counts_host < 0) or np.any(counts_host > cache.max_step_tokens):
            raise ValueError(f"NSADecoder.step: 'counts' must be in [0, max_step_tokens={cache.max_step_tokens}], "
                             f"but got {counts_host.tolist()}.")
        if int(counts_host.sum()) != total:
            raise ValueError(f"NSADecoder.step: 'counts' must sum to the new tokens Q={total}, but got "
                             f"{counts_host.tolist()} (sum {int(counts_host.sum())}).")
        lengths = cache.host_lengths()
        over = lengths + counts_host > cache.max_len
        if np.any(over):
            b = int(np.argmax(over))
            raise ValueError(f"NSADecoder.step: slot {b} holds {lengths[b]} tokens and would exceed "
                             f"max_len={cache.max_len} with {counts_host[b]} more.")
        return Tensor(counts_host.astype(np.int32))

    def lengths(self):
        """Tokens stored per slot, ``(B,)`` NumPy int32."""
        return self.cache.host_lengths()


class _SelfAttentionPrefill(nn.Cell):
    """:class:`NSAPrefill` from hidden states: projections and rotary at in-sequence positions."""

    def __init__(self, attention, core_prefill):
        super().__init__(auto_prefix=False)
        self.attention = attention
        self.core_prefill = core_prefill

    def construct(self, hidden_states, actual_seq_len, slots):
        positions = token_layout(actual_seq_len, hidden_states.shape[0])[1]
        q, k, v, gates = self.attention.core_inputs(hidden_states, positions)
        out = self.core_prefill(q, k, v, gates, actual_seq_len, slots)[0]
        return self.attention.output(out, hidden_states.dtype)


class _SelfAttentionStep(nn.Cell):
    """:class:`NSADecodeStep` from hidden states: projections and rotary at the cache positions."""

    def __init__(self, attention, core_step):
        super().__init__(auto_prefix=False)
        self.attention = attention
        self.core_step = core_step

    def construct(self, hidden_states, counts):
        slot, position = step_positions(self.core_step.cache.lengths, counts, hidden_states.shape[0])
        q, k, v, gates = self.attention.core_inputs(hidden_states, position)
        out = self.core_step.attend(q, k, v, gates, counts, slot, position)[0]
        return self.attention.output(out, hidden_states.dtype)


class NSASelfAttentionDecoder:
    """Decoding for one :class:`~nsa_layers.NSASelfAttention`: hidden states in, hidden states out,
    through an :class:`NSADecoder` of its core (same checks, same cache; the rotary hook sees each
    token's position in its sequence, as in training).

    Args:
        attention (NSASelfAttention): the layer.
        batch_slots, max_len, max_step_tokens, name: as :class:`NSADecoder`.
    """

    def __init__(self, attention, batch_slots, max_len, max_step_tokens=1, name=None):
        self.attention = attention
        self.core_decoder = NSADecoder(attention.core, batch_slots, max_len, max_step_tokens, name)
        self.cache = self.core_decoder.cache
        self.prefill_cell = _SelfAttentionPrefill(attention, self.core_decoder.prefill_cell)
        self.step_cell = _SelfAttentionStep(attention, self.core_decoder.step_cell)

    def prefill(self, hidden_states, actual_seq_len, slots):
        """``hidden_states (T, hidden)`` of new sequences (prefix sums and slots as
        :meth:`NSADecoder.prefill`) -> ``(T, hidden)``, what the layer gives on them."""
        self._check_hidden(hidden_states)
        ends, slot_ids = self.core_decoder.check_prefill(hidden_states.shape[0], actual_seq_len, slots)
        return self.prefill_cell(hidden_states, ends, slot_ids)

    def step(self, hidden_states, counts):
        """``hidden_states (Q, hidden)`` of new tokens, slot after slot (``counts`` as
        :meth:`NSADecoder.step`) -> ``(Q, hidden)``."""
        self._check_hidden(hidden_states)
        return self.step_cell(hidden_states, self.core_decoder.check_step(hidden_states.shape[0], counts))

    def lengths(self):
        """Tokens stored per slot, ``(B,)`` NumPy int32."""
        return self.cache.host_lengths()

    def _check_hidden(self, hidden_states):
        check_float_input("NSASelfAttentionDecoder", "hidden_states", hidden_states,
                          (("T", None), ("hidden_size", self.attention.config.hidden_size)))


def _graph_input(kv):
    """A K/V tuple as graph data (``mutable``): graph mode otherwise compiles its values in as constants."""
    return ms.mutable(tuple(kv)) if isinstance(kv, (tuple, list)) else kv


def _host_ints(name, value):
    """An int sequence or Tensor as a flat NumPy int64 array (``TypeError`` for non-integers)."""
    array = value.asnumpy() if isinstance(value, Tensor) else np.asarray(value)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"NSADecoder: '{name}' must hold integers, but got dtype {array.dtype}.")
    return array.reshape(-1).astype(np.int64)


def _check_slots(where, slot_ids, batch_slots):
    bad = (slot_ids < 0) | (slot_ids >= batch_slots)
    if np.any(bad):
        raise ValueError(f"{where}: slot {int(slot_ids[np.argmax(bad)])} is out of range [0, {batch_slots}).")
