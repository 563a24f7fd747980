"""Decoding for one :class:`~nsa_layers.NativeSparseAttention`, checked on the host: its cache
(:class:`~nsa_layers.kv_cache.NSAKVCache`) and the core's decode cells (:mod:`nsa_layers.decode`),
with every argument checked before any work, so that a rejected call leaves the cache unchanged."""

import mindspore as ms
import numpy as np
from mindspore import Tensor

from .decode import DETAIL_FIELDS, NSADecodeStep, NSAPrefill
from .kv_cache import NSAKVCache

__all__ = ["NSADecoder"]


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
        self.cache = NSAKVCache(core.config, batch_slots, max_len, max_step_tokens, name, core.precision)
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
