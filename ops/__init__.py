"""MindSpore's Ascend NSA ops with exact pure-MindSpore fallbacks (installed as ``nsa_layers.ops``).

Each op has the signature and contract of its ``mindspore.ops`` namesake. On an Ascend device it
calls the MindSpore kernel; on any other device it runs a pure-MindSpore implementation with the
same results, shapes, dtypes, gradients and argument errors, in PyNative and under ``mindspore.jit``.
Each ``check_*`` function raises the errors of its op from static metadata (shapes, dtypes,
arguments) without running it; :func:`on_ascend` says which path the ops take.

This package depends on MindSpore and NumPy only (nothing else of ``nsa_layers``).
"""

from ._device import on_ascend
from .compress import check_nsa_compress, nsa_compress
from .compress_attention import check_nsa_compress_attention, nsa_compress_attention
from .select_attention import check_nsa_select_attention, nsa_select_attention

__all__ = ["nsa_compress", "nsa_compress_attention", "nsa_select_attention", "check_nsa_compress",
           "check_nsa_compress_attention", "check_nsa_select_attention", "on_ascend"]
