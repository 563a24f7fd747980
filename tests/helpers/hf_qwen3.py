"""A tiny Hugging Face-format Qwen3 checkpoint written from NumPy (``config.json`` + ``model.safetensors``,
no torch), and MindFormers' stock Qwen3 training model with a dense causal core attention for CPU."""

import json
import os

import mindspore as ms
import numpy as np
from mindspore import nn, ops

# Qwen3's config.json keys, at the sizes of helpers.mindformers.SMALL (vocab: the tiny YAML's bytes + pad)
HF_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 257, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "max_position_embeddings": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "torch_dtype": "float32",
    "bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 256,
}


def hf_tensors(config, rng):
    """Random float32 weights under Qwen3's Hugging Face names (norm weights around 1)."""
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, inner, vocab = config["head_dim"], config["intermediate_size"], config["vocab_size"]

    def weight(*shape, scale=None):
        scale = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def norm(size):
        return (1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": weight(vocab, hidden, scale=0.5), "model.norm.weight": norm(hidden)}
    if not config["tie_word_embeddings"]:
        tensors["lm_head.weight"] = weight(vocab, hidden)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": weight(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": weight(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": weight(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": weight(hidden, heads * head_dim),
            p + "self_attn.q_norm.weight": norm(head_dim),
            p + "self_attn.k_norm.weight": norm(head_dim),
            p + "mlp.gate_proj.weight": weight(inner, hidden),
            p + "mlp.up_proj.weight": weight(inner, hidden),
            p + "mlp.down_proj.weight": weight(hidden, inner),
            p + "input_layernorm.weight": norm(hidden),
            p + "post_attention_layernorm.weight": norm(hidden),
        })
    return tensors


def write_hf_qwen3(directory, seed=0, **config_changes):
    """Write a Hugging Face Qwen3 directory; returns its ``(config, tensors)``."""
    from safetensors.numpy import save_file

    config = {**HF_CONFIG, **config_changes}
    tensors = hf_tensors(config, np.random.default_rng(seed))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return config, tensors


def read_hf_tensors(directory):
    """Every tensor of the ``*.safetensors`` files in ``directory``, by name (NumPy)."""
    import glob

    from safetensors.numpy import load_file

    tensors = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        tensors.update(load_file(path))
    return tensors


def unused_tensors(net, tensors):
    """Names of the checkpoint ``tensors`` with a row that no parameter of ``net`` holds (a loaded
    tensor's rows are rows of some parameter whatever the layout, e.g. q/k/v interleaved into
    ``linear_qkv``), sorted."""
    rows = {row.tobytes() for p in net.get_parameters() for row in np.atleast_2d(p.asnumpy())}
    return sorted(name for name, value in tensors.items()
                  if not all(row.tobytes() in rows for row in np.atleast_2d(value)))


class DenseCausalCore(nn.Cell):
    """Plain softmax attention for the ``core_attention`` slot of MindFormers' stock ``SelfAttention``
    with ``use_flash_attention: False`` (float32 throughout, where the flash path casts q/k/v to float16).

    That path passes ``query (S, B, N, D)``, ``key``/``value`` from its ``_repeat_kv``, which lays out a
    ``(S, B, Nkv, D)`` tensor as ``(S, B * rep, Nkv, D)`` (each batch row repeated ``rep = N / Nkv``
    times, not the heads), and the ``(B, 1, S, S)`` mask (nonzero = masked). Every ``rep``-th row is the
    original; head ``n`` then uses KV head ``n // rep``, Qwen3's grouping. Returns ``(S, B, N * D)``.
    """

    def construct(self, query, key, value, attention_mask):
        seq, batch, heads, dim = query.shape
        rep = key.shape[1] // batch
        key, value = key[:, ::rep], value[:, ::rep]  # (S, B, Nkv, D)
        groups = heads // key.shape[2]
        key = ops.repeat_interleave(key, groups, 2)
        value = ops.repeat_interleave(value, groups, 2)
        q, k, v = (x.transpose(1, 2, 0, 3) for x in (query, key, value))  # (B, N, S, D)
        scores = ops.matmul(q, k.swapaxes(-1, -2)) / float(np.sqrt(dim))
        scores = ops.masked_fill(scores, attention_mask.astype(ms.bool_), float("-inf"))
        out = ops.matmul(ops.softmax(scores, -1), v)  # (B, N, S, D)
        return out.transpose(2, 0, 1, 3).reshape(seq, batch, heads * dim)



def stock_qwen3(config):
    """MindFormers' stock Qwen3 training model (``TrainingQwen3ForCausalLM``: its ``GPTModel`` and stock
    layer spec) from a ``Qwen3Config``, as it runs on CPU: the spec built with the config's
    ``fused_norm`` (the stock ``__init__`` drops it, and fused RmsNorm has no CPU kernel), a
    :class:`DenseCausalCore` in each ``core_attention`` slot (FlashAttention has none) and the CPU
    swaps (``apply_cpu_swaps``). Parameter names and the HF weight template are the stock ones."""
    from mindformers.checkpoint.converter.template import WeightTemplate
    from mindformers.models.qwen3.modeling_qwen3_train import TrainingQwen3ForCausalLM
    from mindformers.parallel_core.training_graph.base_models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from mindformers.parallel_core.training_graph.base_models.gpt.gpt_model import GPTModel
    from mindformers.parallel_core.training_graph.transformer.norm import get_norm_cls
    from mindformers.parallel_core.training_graph.transformer.transformer_block import TransformerBlockSubmodules

    from nsa_layers.mindformers import apply_cpu_swaps

    class CPUQwen3ForCausalLM(TrainingQwen3ForCausalLM):
        def __init__(self, cfg):  # pylint: disable=super-init-not-called
            super(TrainingQwen3ForCausalLM, self).__init__(cfg, auto_prefix=False)
            tc = self.convert_to_transformer_config(self.config)
            layer = get_gpt_layer_local_spec(
                qk_layernorm=True, fused_norm=tc.fused_norm,
                use_contiguous_weight_layout_attention=tc.use_contiguous_weight_layout_attention,
                use_interleaved_weight_layout_mlp=tc.use_interleaved_weight_layout_mlp)
            block = TransformerBlockSubmodules(layer_specs=[layer] * tc.num_layers,
                                               layer_norm=get_norm_cls(tc.fused_norm))
            self.model = GPTModel(config=tc, transformer_layer_spec=block, vocab_size=tc.vocab_size,
                                  max_sequence_length=tc.max_position_embeddings,
                                  position_embedding_type=tc.position_embedding_type,
                                  rotary_base=self.config.rope_theta,
                                  share_embeddings_and_output_weights=self.config.tie_word_embeddings,
                                  post_process=tc.post_process)
            self.template = WeightTemplate(weight_converters=self.weight_converters)
            self.template.set_model_config(tc)

    net = CPUQwen3ForCausalLM(config)
    for layer in net.model.decoder.layers:
        layer.self_attention.core_attention = DenseCausalCore()
    apply_cpu_swaps(net)
    return net
