"""The layer spec that puts NSA into MindFormers' GPT layer."""

from mindformers.parallel_core.training_graph.base_models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from mindformers.parallel_core.utils.spec_utils import ModuleSpec

from ..gate import NSAGate
from .attention import GPTNSASelfAttention, GPTNSASelfAttentionContiguous, NSACoreAttention, NSASelfAttentionSubmodules

__all__ = ["get_nsa_layer_spec"]


def get_nsa_layer_spec(config, nsa_params, qk_layernorm=True):
    """MindFormers' local GPT layer spec with NSA in the ``self_attention`` slot.

    Args:
        config (TransformerConfig): the model's config (``fused_norm``, the weight layouts).
        nsa_params (dict): ``NSAConfig`` keyword arguments for the NSA sizes (``compress_block_size``, ...).
        qk_layernorm (bool): per-head RMSNorm on queries and keys (Qwen3: True).

    Returns:
        ModuleSpec of a ``TransformerLayer`` whose self-attention is :class:`GPTNSASelfAttention`
        (or its contiguous-layout twin), with the stock ``linear_qkv``, norms and ``linear_proj``,
        the gate ``NSAGate`` and ``core_attention = NSACoreAttention(**nsa_params)``.
    """
    layer = get_gpt_layer_local_spec(
        qk_layernorm=qk_layernorm, fused_norm=config.fused_norm,
        use_contiguous_weight_layout_attention=config.use_contiguous_weight_layout_attention,
        use_interleaved_weight_layout_mlp=config.use_interleaved_weight_layout_mlp)
    stock = layer.submodules.self_attention.submodules
    host = GPTNSASelfAttentionContiguous if config.use_contiguous_weight_layout_attention else GPTNSASelfAttention
    layer.submodules.self_attention = ModuleSpec(module=host, submodules=NSASelfAttentionSubmodules(
        linear_qkv=stock.linear_qkv, core_attention=ModuleSpec(module=NSACoreAttention, params=dict(nsa_params)),
        linear_proj=stock.linear_proj, q_layernorm=stock.q_layernorm, k_layernorm=stock.k_layernorm, gate=NSAGate))
    return layer
