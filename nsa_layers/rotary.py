"""Rotary position embedding for the ``NSASelfAttention`` hook, with in-segment positions."""

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

__all__ = ["RotaryEmbedding"]


class RotaryEmbedding(nn.Cell):
    """Rotate-half rotary embedding (as Llama/Qwen): ``x * cos + rotate_half(x) * sin``.

    Args:
        head_dim (int): even dimension ``D`` of the rotated heads.
        base (float): frequency base.

    Inputs:
        x (Tensor): ``(T, heads, D)`` float.
        positions (Tensor): ``(T,)`` int positions (``NSASelfAttention`` passes in-segment positions).

    Outputs:
        Tensor ``(T, heads, D)``, same dtype.
    """

    def __init__(self, head_dim, base=10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, but got {head_dim}.")
        self.half = head_dim // 2
        inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        self.inv_freq = Tensor(inv_freq.astype(np.float32))

    def construct(self, x, positions):
        angles = positions.astype(ms.float32).reshape(-1, 1) * self.inv_freq.reshape(1, -1)
        angles = ops.cat((angles, angles), axis=-1).reshape(x.shape[0], 1, 2 * self.half)  # T may be 0
        cos, sin = ops.cos(angles).astype(x.dtype), ops.sin(angles).astype(x.dtype)
        rotated = ops.cat((-x[..., self.half:], x[..., :self.half]), axis=-1)
        return x * cos + rotated * sin
