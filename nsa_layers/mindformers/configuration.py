"""``NSAQwen3Config``: a Qwen3 config with the NSA hyper-parameters, selected by ``model_type: nsa_qwen3``."""

import dataclasses

from mindformers.models.qwen3.config_converter_qwen3 import Qwen3ConfigConverter
from mindformers.models.qwen3.configuration_qwen3 import Qwen3Config
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from ..config import NSAConfig

__all__ = ["NSAQwen3Config", "NSA_CONFIG_KEYS", "CHECKPOINT_KEYS", "use_checkpoint_config"]

# the model_config keys a Hugging Face Qwen3 checkpoint's config.json gives: sizes and special tokens
CHECKPOINT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rms_norm_eps",
                   "tie_word_embeddings", "pad_token_id", "eos_token_id")


def use_checkpoint_config(cfg, directory):
    """Make a MindFormers YAML config (``MindFormerConfig``) take its model's sizes and special tokens
    from the Hugging Face checkpoint in ``directory``: the :data:`CHECKPOINT_KEYS` leave
    ``model.model_config`` and ``model.pretrained_model_dir`` points MindFormers at the checkpoint's
    ``config.json`` (every other key, e.g. the ``nsa_*`` sizes, stays the YAML's). In place; returns ``cfg``."""
    for key in CHECKPOINT_KEYS:
        cfg.model.model_config.pop(key, None)
    cfg.model.pretrained_model_dir = str(directory)
    return cfg

# The NSA algorithm's own sizes (NSAConfig fields that the transformer config does not already give),
# as ``nsa_<field>`` config keys with their defaults. Shared K/V by default here: the host model's one
# Q/K/V projection (as in a Qwen3 checkpoint) then feeds all three branches, and nothing new has to be
# learnt from scratch except the gate and the compressors (initialised as mean pooling).
_MODEL_FIELDS = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "v_head_dim", "compute_dtype",
                 "softmax_dtype", "softmax_scale")
NSA_CONFIG_KEYS = {
    "nsa_" + field.name: (False if field.name == "independent_kv" else field.default)
    for field in dataclasses.fields(NSAConfig) if field.name not in _MODEL_FIELDS
}


def nsa_softmax_dtype(compute_dtype, softmax_compute_dtype):
    """MindFormers' ``softmax_compute_dtype`` as NSA's ``softmax_dtype`` (names of dtypes): float32, or
    the compute dtype; ``ValueError`` for any other (NSA's scores are float32 or compute-dtype values)."""
    if softmax_compute_dtype not in ("float32", compute_dtype):
        raise ValueError(f"NSA attention: softmax_compute_dtype {softmax_compute_dtype!r} with compute_dtype "
                         f"{compute_dtype!r} cannot be honoured: NSA computes its scores and softmax in float32 "
                         f"(recommended) or in the compute dtype.")
    return softmax_compute_dtype


@MindFormerRegister.register(MindFormerModuleType.CONFIG, legacy=False, search_names="nsa_qwen3")
class NSAQwen3Config(Qwen3Config):
    """Qwen3's config (every Qwen3 key keeps its meaning) plus the NSA keys of :data:`NSA_CONFIG_KEYS`:

    ``nsa_compress_block_size`` (l, 32), ``nsa_compress_stride`` (d, 16), ``nsa_select_block_size``
    (l', 64), ``nsa_select_block_count`` (n, 16), ``nsa_num_init_blocks`` (1), ``nsa_num_local_blocks``
    (2), ``nsa_window_size`` (w, 512), ``nsa_independent_kv`` (False: the host's K/V shared by the
    three branches; True adds a projection for the compressed and window branches'
    K/V), ``nsa_use_position_embedding`` (True), ``nsa_query_chunk_size`` (512 queries per chunk),
    ``nsa_select_dense_rows`` (None: ``2 * n * l'``, see ``NSAConfig``).
    Sizes are in tokens. Head sizes, GQA, the compute dtype and the softmax dtype
    (``softmax_compute_dtype``: float32, or the compute dtype) come from the Qwen3 keys.

    Raises ``ValueError`` at construction for an unknown ``nsa_*`` key or sizes ``NSAConfig`` rejects.
    The NSA keys are removed before MindFormers converts the config to its ``TransformerConfig``.
    """

    model_type = "nsa_qwen3"

    def __init__(self, **kwargs):
        unknown = sorted(key for key in kwargs if key.startswith("nsa_") and key not in NSA_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"NSAQwen3Config: unknown NSA key(s) {unknown}; the NSA keys are "
                             f"{sorted(NSA_CONFIG_KEYS)}.")
        for key, default in NSA_CONFIG_KEYS.items():
            setattr(self, key, kwargs.pop(key, default))
        super().__init__(**kwargs)
        self.nsa_config()  # validate now, before any model is built

    def nsa_params(self):
        """The NSA hyper-parameters as ``NSAConfig`` keyword arguments (no ``nsa_`` prefix)."""
        return {key[len("nsa_"):]: getattr(self, key) for key in NSA_CONFIG_KEYS}

    def nsa_config(self):
        """The :class:`~nsa_layers.NSAConfig` of one attention layer of this model."""
        heads = self.num_attention_heads
        kv_heads = self.num_key_value_heads or heads
        head_dim = self.head_dim or self.hidden_size // heads
        return NSAConfig(hidden_size=self.hidden_size, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                         v_head_dim=head_dim, compute_dtype=str(self.compute_dtype),
                         softmax_dtype=nsa_softmax_dtype(str(self.compute_dtype), str(self.softmax_compute_dtype)),
                         **self.nsa_params())

    def convert_to_transformer_config(self, is_mla_model: bool = False):
        """MindFormers' ``TransformerConfig`` from the Qwen3 keys only (the NSA keys are not its fields)."""
        values = {key: value for key, value in self.to_dict().items() if key not in NSA_CONFIG_KEYS}
        return Qwen3ConfigConverter.convert(values, is_mla_model=is_mla_model)
