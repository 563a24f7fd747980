"""MindSpore's Ascend NSA ops with exact pure-MindSpore fallbacks (installed as ``nsa_layers.ops``).

Each op has the signature and contract of its ``mindspore.ops`` namesake. On an Ascend device it
calls the MindSpore kernel; on any other device it runs a pure-MindSpore implementation with the
same results, shapes, dtypes, gradients and argument errors, in PyNative and under ``mindspore.jit``.
"""

from .compress import nsa_compress
from .compress_attention import nsa_compress_attention
from .select_attention import nsa_select_attention

__all__ = ["nsa_compress", "nsa_compress_attention", "nsa_select_attention"]
