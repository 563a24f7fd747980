"""The NSA decode state of one layer: every branch's keys and values for ``B`` sequence slots, in
static-shape buffers updated in place (MindSpore ``Parameter``s), so that a compiled decode step is
compiled once whatever the sequences' lengths (they are int32 data). The cache owns its addressing:
where a slot's token, ring entry or compressed window lives in each buffer."""

import itertools

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from .precision import precision_of

__all__ = ["NSAKVCache", "compressed_rows"]

_SCATTER = ops.ScatterUpdate()  # in place on the cache's Parameters


def compressed_rows(max_len, block, stride):
    """Compressed windows a sequence of up to ``max_len`` tokens can complete, at least 1:
    ``(max_len - l) // d + 1`` (window ``i`` covers positions ``i*d .. i*d + l - 1``)."""
    return max(1, (max_len - block) // stride + 1)


class NSAKVCache(nn.Cell):
    """Static-shape keys and values of the three NSA branches for ``B`` slots of up to ``max_len`` tokens.

    Every buffer is a ``Parameter`` (``requires_grad=False``) of ``(rows * Hkv, D)``: row ``r`` of slot
    ``b`` and KV head ``h`` is ``(b * R + r) * Hkv + h``, so a decode step writes and reads single
    rows in place (``ScatterUpdate`` / ``Gather``; no copy of a buffer per step). What is stored:

    - ``k_selected``, ``v_selected``: the selected branch's K/V history, ``R = max_len`` rows per slot,
      row = position. With shared K/V (``independent_kv=False``) the window branch and the compressor
      read it too and nothing else is stored raw.
    - ``k_window``, ``v_window`` (independent K/V only): a ring of the window branch's last
      ``w - 1 + max_step_tokens`` K/V, row = ``position % R``: enough for a step's first query to see
      its ``w - 1`` keys back after the step wrote its tokens.
    - ``k_tail``, ``v_tail`` (independent K/V only): a ring of the compressor's last
      ``l - 1 + max_step_tokens`` raw K/V, the rows of windows not yet compressed.
    - ``k_compressed``, ``v_compressed``: compressed K/V, :func:`compressed_rows` rows per slot
      (row = window index), then one scratch row (``B * W``) that absorbs a step's writes for
      tokens that complete no window (never read).
    - ``lengths``: ``(B,)`` int32 tokens stored per slot.

    Every row index a reader or writer needs comes from the methods below (``history_rows``,
    ``window_rows``, ``tail_rows``, ``compressed_rows``, each ``(...)`` -> ``(..., Hkv)``, and
    ``history_rows_by_head`` where each KV head reads its own positions), and
    :meth:`read` / :meth:`write` move the rows.

    Keys are stored as the branches take them: after the rotary hook of ``NSASelfAttention``
    (queries and keys are rotated at their in-segment positions before compression), and the
    compressed K/V after compression (and the value position embedding). Rows beyond a slot's
    length (or a ring's reach) hold stale or garbage values that every read masks by position.
    Values are stored in the compute dtype (half the memory of float32 in bfloat16 or float16), in
    the tensors the layer holds them in (``precision.storage``: float32 for bfloat16 on CPU).

    Args:
        config (NSAConfig): the layer's sizes.
        batch_slots (int): ``B``, sequences decoded at once.
        max_len (int): tokens per slot, prompt included.
        max_step_tokens (int): most tokens a slot takes in one decode step (sizes the rings).
        name (str, optional): prefix of the buffers' parameter names (``{name}.k_selected``, ...),
            unique in a graph; default ``nsa_cache_{i}`` with ``i`` counting the caches made.
        precision (Precision, optional): the layer's (it decides the storage dtype); default decided
            from ``config``.
    """

    _made = itertools.count()

    def __init__(self, config, batch_slots, max_len, max_step_tokens=1, name=None, precision=None):
        super().__init__(auto_prefix=False)
        for argument, value in (("batch_slots", batch_slots), ("max_len", max_len),
                                ("max_step_tokens", max_step_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NSAKVCache: '{argument}' must be a positive int, but got {value!r}.")
        self.config = config
        self.prefix = name if name is not None else f"nsa_cache_{next(NSAKVCache._made)}"
        self.batch_slots, self.max_len, self.max_step_tokens = batch_slots, max_len, max_step_tokens
        self.kv_heads = config.num_kv_heads
        # values in the compute dtype, as the layer holds them (float32 tensors for bfloat16 on CPU)
        self.storage = precision_of(config, precision).storage
        self.windows = compressed_rows(max_len, config.compress_block_size, config.compress_stride)
        self.independent_kv = config.independent_kv
        dims = {"k": config.head_dim, "v": config.v_head_dim}
        self.lengths = Parameter(Tensor(np.zeros((batch_slots,), np.int32)), name=f"{self.prefix}.lengths",
                                 requires_grad=False)
        self.k_selected, self.v_selected = (self._buffer(f"{kind}_selected", max_len, dims[kind]) for kind in "kv")
        # rows per slot of the window branch's and the compressor's sources (the history when shared)
        self.window_ring = max_len
        self.tail_ring = max_len
        if self.independent_kv:
            self.window_ring = min(max_len, config.window_size - 1 + max_step_tokens)
            self.tail_ring = min(max_len, config.compress_block_size - 1 + max_step_tokens)
            self.k_window, self.v_window = (self._buffer(f"{kind}_window", self.window_ring, dims[kind])
                                            for kind in "kv")
            self.k_tail, self.v_tail = (self._buffer(f"{kind}_tail", self.tail_ring, dims[kind]) for kind in "kv")
        self.k_compressed, self.v_compressed = (self._buffer(f"{kind}_compressed", self.windows, dims[kind], scratch=1)
                                                for kind in "kv")
        self.heads = Tensor(np.arange(self.kv_heads, dtype=np.int32))

    def _buffer(self, name, rows, dim, scratch=0):
        shape = ((self.batch_slots * rows + scratch) * self.kv_heads, dim)
        return Parameter(Tensor(np.zeros(shape, np.float32), self.storage), name=f"{self.prefix}.{name}",
                         requires_grad=False)

    def window_source(self):
        """``(k, v)``: the buffers the window branch reads (rows: :meth:`window_rows`)."""
        if self.independent_kv:
            return self.k_window, self.v_window
        return self.k_selected, self.v_selected

    def tail_source(self):
        """``(k, v)``: the buffers the compressor reads (rows: :meth:`tail_rows`)."""
        if self.independent_kv:
            return self.k_tail, self.v_tail
        return self.k_selected, self.v_selected

    def head_rows(self, slot_rows):
        """Slot-major rows ``(...)`` int32 -> their ``(..., Hkv)`` rows in a ``(rows * Hkv, D)`` buffer."""
        shape = slot_rows.shape
        return slot_rows.reshape(shape + (1,)) * self.kv_heads + self.heads.reshape((1,) * len(shape) + (-1,))

    def history_rows(self, slot, position):
        """Rows of ``k_selected`` / ``v_selected`` holding the tokens at ``position`` of ``slot``
        (int32, same shape) -> ``(..., Hkv)``."""
        return self.head_rows(slot * self.max_len + position)

    def history_rows_by_head(self, slot, position):
        """Rows of ``k_selected`` / ``v_selected`` where KV head ``h`` reads ``position[:, h]`` of ``slot``
        (int32, ``(N, Hkv, ...)`` both) -> the same shape (each head its own tokens)."""
        rows = slot * self.max_len + position
        return rows * self.kv_heads + self.heads.reshape((1, -1) + (1,) * (rows.ndim - 2))

    def window_rows(self, slot, position):
        """Rows of :meth:`window_source` holding ``position >= 0`` of ``slot`` -> ``(..., Hkv)`` (a ring
        with independent K/V: row ``position % ring``)."""
        return self.head_rows(slot * self.window_ring + position % self.window_ring)

    def tail_rows(self, slot, position):
        """Rows of :meth:`tail_source` holding ``position >= 0`` of ``slot`` -> ``(..., Hkv)``."""
        return self.head_rows(slot * self.tail_ring + position % self.tail_ring)

    def compressed_rows(self, slot, window, used=None):
        """Rows of ``k_compressed`` / ``v_compressed`` holding compressed ``window`` of ``slot`` ->
        ``(..., Hkv)``; where ``used`` (bool, same shape) is False, the scratch row that no read sees."""
        rows = slot * self.windows + window
        if used is not None:
            rows = ops.where(used, rows, ops.full_like(rows, self.batch_slots * self.windows))
        return self.head_rows(rows)

    @staticmethod
    def read(buffer, rows):
        """``(rows * Hkv, D)`` buffer, int32 rows ``(...)`` -> ``(..., D)``."""
        return ops.gather(buffer, rows.reshape(-1), 0).reshape(rows.shape + (buffer.shape[1],))

    @staticmethod
    def write(buffer, rows, values):
        """``values (..., D)`` into the ``rows (...)`` of a buffer, in place (no copy of the buffer)."""
        return _SCATTER(buffer, rows, values)

    def set_lengths(self, slots, lengths):
        """Tokens stored per slot: ``lengths`` for ``slots`` (int32, in place)."""
        return _SCATTER(self.lengths, slots, lengths)

    def add_lengths(self, counts):
        """``counts (B,)`` more tokens stored per slot (in place)."""
        return ops.assign(self.lengths, self.lengths + counts.astype(ms.int32))

    def host_lengths(self):
        """``lengths`` as a NumPy array (a device read)."""
        return self.lengths.asnumpy()
