"""K/V compressor: NSA's learnable per-head block compression (paper Eq. 7) on packed segments."""

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from .layout import window_rows_tensor
from .ops import nsa_compress

__all__ = ["KVCompressor"]


class KVCompressor(nn.Cell):
    r"""Compress keys or values window by window with learnable per-head weights.

    For a window of ``block`` rows starting at row ``s`` (inside one segment):

    .. math:: \phi(x)[h] = \sum_{j < \text{block}} w[j, h] \, (x[s + j, h] + pe[j, h])

    which is ``nsa_compress(x, w)`` plus the per-head bias ``sum_j w[j, h] pe[j, h]`` (the
    position embedding applied exactly, folded into a bias). ``w`` starts as mean pooling
    (``1 / block``); ``pe`` (optional) starts at 0.

    Args:
        block (int): window length ``l``.
        kv_heads (int): heads ``Hkv``.
        dim (int): head dimension ``D``.
        use_position_embedding (bool): learn ``pe (block, Hkv, D)``. Useful for values only: on keys
            the bias is the same for every window of a head, which a softmax over the keys ignores.

    Inputs:
        x (Tensor): ``(T, Hkv, D)`` float.
        window_starts (Tensor): ``(S,)`` int32 window start rows (``PackedLayout``).

    Outputs:
        Tensor ``(S, Hkv, D)``: one compressed row per slot (rows of invalid slots are meaningless).
    """

    def __init__(self, block, kv_heads, dim, use_position_embedding=True):
        super().__init__()
        self.block = block
        self.weight = Parameter(Tensor(np.full((block, kv_heads), 1.0 / block, np.float32)), name="weight")
        self.position_embedding = None
        if use_position_embedding:
            self.position_embedding = Parameter(Tensor(np.zeros((block, kv_heads, dim), np.float32)),
                                                name="position_embedding")

    def construct(self, x, window_starts):
        total, heads, dim = x.shape
        slots = window_starts.shape[0]
        rows = window_rows_tensor(window_starts, self.block, total)
        return self.compress_windows(ops.gather(x, rows.reshape(-1), 0).reshape(slots, self.block, heads, dim))

    def compress_windows(self, windows):
        """``(S, l, Hkv, D)`` windows of rows -> ``(S, Hkv, D)`` compressed rows (Eq. 7; what the cell
        computes after gathering each window's rows, and what a decode step applies to the windows
        that complete)."""
        heads = windows.shape[2]
        weight = self.weight.astype(windows.dtype)
        out = (windows * weight.reshape(1, self.block, heads, 1)).sum(axis=1)
        return self._add_position_bias(out, weight)

    def with_kernel(self, x, stride, prefix, slots):
        """The same through ``nsa_layers.ops.nsa_compress`` (the Ascend kernel there): ``x (T, Hkv, D)``,
        host prefix sums ``prefix`` (tuple) -> ``(slots, Hkv, D)``, the windows first (in row order, as
        :meth:`construct` lays them out), then zero rows."""
        weight = self.weight.astype(x.dtype)
        out = nsa_compress(x, weight, self.block, stride, actual_seq_len=prefix)
        if out.shape[0] < slots:
            out = ops.cat((out, ops.zeros((slots - out.shape[0],) + out.shape[1:], out.dtype)), 0)
        return self._add_position_bias(out, weight)

    def _add_position_bias(self, out, weight):
        if self.position_embedding is None:
            return out
        _, heads, dim = out.shape
        bias = (self.position_embedding.astype(out.dtype) * weight.reshape(self.block, heads, 1)).sum(axis=0)
        return out + bias.reshape(1, heads, dim)
