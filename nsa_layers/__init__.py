"""nsa-layers: Native Sparse Attention (DeepSeek, arXiv 2502.11089) for MindSpore.

- ``nsa_layers.ops``: the MindSpore NSA ops (``nsa_compress``, ``nsa_compress_attention``,
  ``nsa_select_attention``): the Ascend kernel on Ascend, an exact pure-MindSpore fallback elsewhere.
- ``nsa_layers.packing`` (host, NumPy) and ``nsa_layers.layout`` (graph, tensors): the bookkeeping of
  packed variable-length batches (TND, prefix-sum ``actual_seq_len``).
- The layers: :class:`NSAConfig`, :class:`NativeSparseAttention` (the core), :class:`NSASelfAttention`
  and the building blocks (:class:`KVCompressor`, :class:`CompressedAttention`, :class:`BlockSelector`,
  :class:`SelectedAttention`, :class:`SlidingWindowAttention`, :class:`NSAGate`, :class:`GatedSum`,
  :class:`RotaryEmbedding`).
- Decoding: :class:`NSADecoder` (prefill and steps of the core over an :class:`NSAKVCache`, checked on
  the host; its cells are in ``nsa_layers.decode``) and :class:`NSASelfAttentionDecoder` (the same
  from hidden states).
"""

from .attention import NativeSparseAttention, NSADetails
from .compressed_attention import CompressedAttention
from .compressor import KVCompressor
from .config import NSAConfig
from .decoder import NSADecoder
from .gate import GatedSum, NSAGate
from .kv_cache import NSAKVCache
from .rotary import RotaryEmbedding
from .selected_attention import SelectedAttention
from .selection import BlockSelector
from .self_attention import NSASelfAttention
from .self_attention_decoder import NSASelfAttentionDecoder
from .sliding_window import SlidingWindowAttention

__version__ = "0.1.0"

__all__ = ["NSAConfig", "KVCompressor", "CompressedAttention", "BlockSelector", "SelectedAttention",
           "SlidingWindowAttention", "NSAGate", "GatedSum", "RotaryEmbedding", "NativeSparseAttention",
           "NSADetails", "NSASelfAttention", "NSAKVCache", "NSADecoder", "NSASelfAttentionDecoder"]
