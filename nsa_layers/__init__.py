"""nsa-layers: Native Sparse Attention (DeepSeek, arXiv 2502.11089) for MindSpore.

Sub-packages and modules:

- ``nsa_layers.ops``: the MindSpore NSA ops (``nsa_compress``, ``nsa_compress_attention``,
  ``nsa_select_attention``): the Ascend kernel on Ascend, an exact pure-MindSpore fallback elsewhere.
- ``nsa_layers.packing``: packed variable-length batch (TND, prefix-sum ``actual_seq_len``) bookkeeping
  shared by every op and layer.
"""

__version__ = "0.1.0"
