"""K/V compressor: NSA's learnable per-head block compression (paper Eq. 7) on packed segments."""

from typing import TypedDict

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from .layout import window_rows_tensor
from .ops import nsa_compress
from .precision import FLOAT32

__all__ = ["CompressorWeights", "KVCompressor"]


class CompressorWeights(TypedDict):
    """The compressor weights of an NSA core as tensors (its parameters, or a ``Morph`` body's inputs).

    Fields: ``k_weight``, ``v_weight`` ``(l, Hkv)``; ``v_position_embedding`` ``(l, Hkv, Dv)`` or None.
    """

    k_weight: Tensor
    v_weight: Tensor
    v_position_embedding: Tensor


class KVCompressor(nn.Cell):
    r"""Compress keys or values window by window with learnable per-head weights.

    For a window of ``block`` rows starting at row ``s`` (inside one segment):

    .. math:: \phi(x)[h] = \sum_{j < \text{block}} w[j, h] \, (x[s + j, h] + pe[j, h])

    which is ``nsa_compress(x, w)`` plus the per-head bias ``sum_j w[j, h] pe[j, h]`` (the
    position embedding applied exactly, folded into a bias). ``w`` starts as mean pooling
    (``1 / block``); ``pe`` (optional) starts at 0. As ``nsa_compress``'s kernel: ``x`` and ``w`` in the
    compute dtype, the products and sums in float32, the result rounded to the compute dtype once.

    Args:
        block (int): window length ``l``.
        kv_heads (int): heads ``Hkv``.
        dim (int): head dimension ``D``.
        use_position_embedding (bool): learn ``pe (block, Hkv, D)``. Useful for values only: on keys
            the bias is the same for every window of a head, which a softmax over the keys ignores.
        own_parameters (bool): False: no parameters; every call passes ``weight`` (and
            ``position_embedding``), as a ``Morph`` body on one rank's shard does (``nsa_layers.parallel``).
        precision (Precision, optional): the layer's; default float32.

    Inputs:
        x (Tensor): ``(T, Hkv, D)`` float.
        window_starts (Tensor): ``(S,)`` int32 window start rows (``PackedLayout``).
        weight, position_embedding (Tensor, optional): used in place of the cell's parameters (what
            a ``Morph`` body passes, which may not read parameters itself); default the parameters.

    Outputs:
        Tensor ``(S, Hkv, D)``: one compressed row per slot (rows of invalid slots are meaningless).
    """

    def __init__(self, block, kv_heads, dim, use_position_embedding=True, own_parameters=True, precision=None):
        super().__init__()
        self.block = block
        self.precision = FLOAT32 if precision is None else precision
        self.use_position_embedding = use_position_embedding
        self.weight = None
        self.position_embedding = None
        if own_parameters:
            self.weight = Parameter(Tensor(np.full((block, kv_heads), 1.0 / block, np.float32)), name="weight")
            if use_position_embedding:
                self.position_embedding = Parameter(Tensor(np.zeros((block, kv_heads, dim), np.float32)),
                                                    name="position_embedding")

    def construct(self, x, window_starts, weight=None, position_embedding=None):
        total, heads, dim = x.shape
        slots = window_starts.shape[0]
        rows = window_rows_tensor(window_starts, self.block, total)
        return self.compress_windows(ops.gather(x, rows.reshape(-1), 0).reshape(slots, self.block, heads, dim),
                                     weight, position_embedding)

    def compress_windows(self, windows, weight=None, position_embedding=None):
        """``(S, l, Hkv, D)`` windows of rows -> ``(S, Hkv, D)`` compressed rows (Eq. 7; what the cell
        computes after gathering each window's rows, and what a decode step applies to the windows
        that complete)."""
        p = self.precision
        heads = windows.shape[2]
        weight = p.stats(p.hold(self.weight if weight is None else weight))
        out = (p.stats(windows) * weight.reshape(1, self.block, heads, 1)).sum(axis=1)
        return p.hold(self._add_position_bias(out, weight, position_embedding))

    def with_kernel(self, x, stride, prefix, slots, weight=None, position_embedding=None):
        """The same through ``nsa_layers.ops.nsa_compress`` (the Ascend kernel there): ``x (T, Hkv, D)``,
        host prefix sums ``prefix`` (tuple) -> ``(slots, Hkv, D)``, the windows first (in row order, as
        :meth:`construct` lays them out), then zero rows."""
        p = self.precision
        weight = p.hold(self.weight if weight is None else weight)
        out = nsa_compress(x, weight, self.block, stride, actual_seq_len=prefix)
        if out.shape[0] < slots:
            out = ops.cat((out, ops.zeros((slots - out.shape[0],) + out.shape[1:], out.dtype)), 0)
        if not self.use_position_embedding:
            return out
        return p.hold(self._add_position_bias(p.stats(out), p.stats(weight), position_embedding))

    def _add_position_bias(self, out, weight, position_embedding):
        """``out + sum_j w[j] pe[j]`` in float32 (``out`` and ``weight`` float32)."""
        if not self.use_position_embedding:
            return out
        if position_embedding is None:
            position_embedding = self.position_embedding
        _, heads, dim = out.shape
        pe = self.precision.stats(self.precision.hold(position_embedding))
        bias = (pe * weight.reshape(self.block, heads, 1)).sum(axis=0)
        return out + bias.reshape(1, heads, dim)
