"""``NSAQwen3ForCausalLM``: MindFormers' Qwen3 training model with NSA attention, chosen by ``architectures``."""

from mindformers.checkpoint.converter.template import WeightTemplate
from mindformers.models.qwen3.modeling_qwen3_train import TrainingQwen3ForCausalLM
from mindformers.parallel_core.training_graph.base_models.gpt.gpt_model import GPTModel
from mindformers.parallel_core.training_graph.transformer.norm import get_norm_cls
from mindformers.parallel_core.training_graph.transformer.transformer_block import TransformerBlockSubmodules
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from .configuration import NSAQwen3Config
from . import cpu
from .generation import CachedGeneration
from .spec import get_nsa_layer_spec

__all__ = ["NSAQwen3ForCausalLM"]


@MindFormerRegister.register(MindFormerModuleType.MODELS, legacy=False)
class NSAQwen3ForCausalLM(CachedGeneration, TrainingQwen3ForCausalLM):
    """Qwen3 (graph-mode training track) with NSA in every layer: ``GPTModel`` built from
    :func:`~nsa_layers.mindformers.get_nsa_layer_spec`.

    Parameter names are Qwen3's (``embedding.word_embeddings.weight``,
    ``decoder.layers.{i}.self_attention.linear_qkv.weight``, ...) and the HF weight converters are
    inherited, so a Qwen3 checkpoint loads; the NSA parameters live under
    ``decoder.layers.{i}.self_attention.{gate,core_attention,linear_kv_branches}`` and keep their
    initialisation when a checkpoint lacks them.

    On CPU the instance swaps of :func:`~nsa_layers.mindformers.apply_cpu_swaps` are applied (listed in
    ``self.cpu_swaps``); on Ascend nothing is changed.

    ``generate`` is MindFormers' own, with the NSA KV cache (``nsa_layers.mindformers.generation``;
    ``nsa_cache = False`` for the cache-free path).

    Inputs and outputs: those of MindFormers' ``TrainingQwen3ForCausalLM`` (``input_ids (B, S)``,
    ``labels``, ``loss_mask``, ``position_ids``, ``actual_seq_len``; losses in training, logits
    ``(B*S, vocab)`` float32 in eval mode).
    """

    config_class = NSAQwen3Config

    def __init__(self, config: NSAQwen3Config):
        if not isinstance(config, NSAQwen3Config):
            raise TypeError(f"NSAQwen3ForCausalLM: config must be an NSAQwen3Config (model_type: nsa_qwen3), "
                            f"got {type(config).__name__}.")
        # TrainingQwen3ForCausalLM.__init__ hard-codes the stock layer spec: run its parents' instead
        super(TrainingQwen3ForCausalLM, self).__init__(config, auto_prefix=False)
        tc = self.convert_to_transformer_config(self.config)
        layer = get_nsa_layer_spec(tc, config.nsa_params())
        block = TransformerBlockSubmodules(layer_specs=[layer] * tc.num_layers, layer_norm=get_norm_cls(tc.fused_norm))
        self.model = GPTModel(
            config=tc,
            transformer_layer_spec=block,
            vocab_size=tc.vocab_size,
            max_sequence_length=tc.max_position_embeddings,
            position_embedding_type=tc.position_embedding_type,
            rotary_base=self.config.rope_theta,
            share_embeddings_and_output_weights=self.config.tie_word_embeddings,
            post_process=tc.post_process,
        )
        # what MindFormers' register_hf_weight_template does, from the config without the NSA keys
        self.template = WeightTemplate(weight_converters=self.weight_converters)
        self.template.set_model_config(tc)
        self.cpu_swaps = tuple(cpu.apply_cpu_swaps(self)) if cpu.on_cpu() else ()
