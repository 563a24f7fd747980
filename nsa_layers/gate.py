"""The NSA gate: per head and branch, a sigmoid of a linear map of the hidden state (paper Eq. 5),
and the gated sum of the three branch outputs."""

from mindspore import nn, ops

from .attention_math import row_dot

__all__ = ["NSAGate", "GatedSum"]

# primitives in what bprop calls (see attention_math)
_TILE = ops.Tile()
_CONCAT_LAST = ops.Concat(-1)


class NSAGate(nn.Cell):
    """``g = sigmoid(hidden @ W + b)`` reshaped to ``(T, H, 3)`` for the (compressed, selected, window) branches.

    Args:
        hidden_size (int): input width.
        num_heads (int): query heads ``H``.

    Inputs:
        hidden_states (Tensor): ``(T, hidden_size)``.

    Outputs:
        Tensor ``(T, H, 3)`` in ``[0, 1]``.
    """

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.proj = nn.Dense(hidden_size, num_heads * 3, has_bias=True)
        self.sigmoid = ops.Sigmoid()

    def construct(self, hidden_states):
        logits = self.proj(hidden_states)
        return self.sigmoid(logits).reshape(hidden_states.shape[0], self.num_heads, 3)

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
    """``o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win``, per token and head.

    The gates are tiled over ``Dv`` and the backward is written by hand: each gate's gradient is a
    row dot product (a matmul with ones) instead of the broadcasting multiply and the reduction over
    ``Dv`` autodiff produces (several times slower on CPU).

    Inputs:
        gates (Tensor): ``(T, H, 3)`` gate values for (compressed, selected, window).
        o_cmp, o_slc, o_win (Tensor): ``(T, H, Dv)`` branch outputs, the dtype of ``gates``.

    Outputs:
        Tensor ``(T, H, Dv)``.
    """

    def construct(self, gates, o_cmp, o_slc, o_win):
        dim = o_cmp.shape[2]
        return (_branch_gate(gates, 0, dim) * o_cmp + _branch_gate(gates, 1, dim) * o_slc
                + _branch_gate(gates, 2, dim) * o_win)

    def bprop(self, gates, o_cmp, o_slc, o_win, out, dout):
        rows, heads, dim = dout.shape
        flat = dout.reshape(1, rows * heads, dim)
        d_cmp = row_dot(flat, o_cmp.reshape(1, rows * heads, dim)).reshape(rows, heads, 1)
        d_slc = row_dot(flat, o_slc.reshape(1, rows * heads, dim)).reshape(rows, heads, 1)
        d_win = row_dot(flat, o_win.reshape(1, rows * heads, dim)).reshape(rows, heads, 1)
        return (_CONCAT_LAST((d_cmp, d_slc, d_win)), dout * _branch_gate(gates, 0, dim),
                dout * _branch_gate(gates, 1, dim), dout * _branch_gate(gates, 2, dim))
