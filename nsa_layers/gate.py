"""The NSA gate: per head and branch, a sigmoid of a linear map of the hidden state (paper Eq. 5),
and the gated sum of the three branch outputs."""

from mindspore import nn, ops

from .attention_math import row_dot
from .precision import FLOAT32, ComputeDense

__all__ = ["NSAGate", "GatedSum"]

# primitives in what bprop calls (see attention_math)
_TILE = ops.Tile()
_CONCAT_LAST = ops.Concat(-1)


class NSAGate(nn.Cell):
    """``g = sigmoid(hidden @ W + b)`` reshaped to ``(T, H, 3)`` for the (compressed, selected, window) branches.

    Args:
        hidden_size (int): input width.
        num_heads (int): query heads ``H``.
        precision (Precision, optional): the layer's (``nsa_layers.precision``); default float32.

    Inputs:
        hidden_states (Tensor): ``(T, hidden_size)``.

    Outputs:
        Tensor ``(T, H, 3)`` in ``[0, 1]``, compute-dtype values (the projection and the sigmoid each
        rounded to it, as on Ascend).
    """

    def __init__(self, hidden_size, num_heads, precision=None):
        super().__init__()
        self.num_heads = num_heads
        self.precision = FLOAT32 if precision is None else precision
        self.proj = ComputeDense(hidden_size, num_heads * 3, True, self.precision)
        self.sigmoid = ops.Sigmoid()

    def construct(self, hidden_states):
        logits = self.proj(hidden_states)
        return self.precision.held(self.sigmoid(logits)).reshape(hidden_states.shape[0], self.num_heads, 3)

    def shard_columns(self, token_parts, tp):
        """Column-parallel layout (semi-auto parallel): the tokens in ``token_parts``, the ``3H``
        outputs (head-major: head ``h``'s gates are columns ``3h .. 3h + 2``) in ``tp`` blocks of heads."""
        self.proj.matmul.shard(((token_parts, 1), (tp, 1)))
        self.proj.bias_add.shard(((token_parts, tp), (tp,)))
        self.sigmoid.shard(((token_parts, tp),))


def _branch_gate(gates, branch, dim):
    """Gate ``branch`` of ``(T, H, 3)`` gates, tiled to ``(T, H, dim)``."""
    return _TILE(gates[:, :, branch:branch + 1], (1, 1, dim))


class GatedSum(nn.Cell):
    """``o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win``, per token and head, summed in float32
    and rounded to the compute dtype once.

    The gates are tiled over ``Dv`` and the backward is written by hand: each gate's gradient is a
    row dot product (a float32 matmul with ones) instead of the broadcasting multiply and the
    reduction over ``Dv`` autodiff produces (several times slower on CPU).

    Args:
        precision (Precision, optional): the layer's (``nsa_layers.precision``); default float32.

    Inputs:
        gates (Tensor): ``(T, H, 3)`` gate values for (compressed, selected, window).
        o_cmp, o_slc, o_win (Tensor): ``(T, H, Dv)`` branch outputs; all compute-dtype values.

    Outputs:
        Tensor ``(T, H, Dv)``, compute-dtype values.
    """

    def __init__(self, precision=None):
        super().__init__()
        self.precision = FLOAT32 if precision is None else precision

    def construct(self, gates, o_cmp, o_slc, o_win):
        s = self.precision.stats
        dim = o_cmp.shape[2]
        gates = s(gates)
        return self.precision.hold(_branch_gate(gates, 0, dim) * s(o_cmp) + _branch_gate(gates, 1, dim) * s(o_slc)
                                   + _branch_gate(gates, 2, dim) * s(o_win))

    def bprop(self, gates, o_cmp, o_slc, o_win, out, dout):
        p = self.precision
        rows, heads, dim = dout.shape
        flat = p.stats(dout).reshape(1, rows * heads, dim)
        d_cmp = row_dot(flat, p.stats(o_cmp).reshape(1, rows * heads, dim)).reshape(rows, heads, 1)
        d_slc = row_dot(flat, p.stats(o_slc).reshape(1, rows * heads, dim)).reshape(rows, heads, 1)
        d_win = row_dot(flat, p.stats(o_win).reshape(1, rows * heads, dim)).reshape(rows, heads, 1)
        return (p.hold(_CONCAT_LAST((d_cmp, d_slc, d_win))), p.held(dout * _branch_gate(gates, 0, dim)),
                p.held(dout * _branch_gate(gates, 1, dim)), p.held(dout * _branch_gate(gates, 2, dim)))
