"""The NSA gate: per head and branch, a sigmoid of a linear map of the hidden state (paper Eq. 5)."""

from mindspore import nn, ops

__all__ = ["NSAGate"]


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

    def construct(self, hidden_states):
        logits = self.proj(hidden_states)
        return ops.sigmoid(logits).reshape(hidden_states.shape[0], self.num_heads, 3)
