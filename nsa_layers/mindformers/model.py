"""``NSAQwen3ForCausalLM``: MindFormers' Qwen3 training model with NSA attention, chosen by ``architectures``."""

from mindformers.checkpoint.converter.template import WeightTemplate
from mindformers.models.qwen3.modeling_qwen3_train import TrainingQwen3ForCausalLM
from mindformers.parallel_core.training_graph.base_models.gpt.gpt_model import GPTModel
from mindformers.parallel_core.training_graph.transformer.norm import get_norm_cls
from mindformers.parallel_core.training_graph.transformer.transformer_block import TransformerBlockSubmodules
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mindspore import Tensor
from mindspore.context import ParallelMode
from mindspore.parallel._utils import _get_parallel_mode

from ..input_checks import checked_prefix_sums
from . import cpu
from .configuration import NSAQwen3Config
from .generation import CachedGeneration
from .spec import get_nsa_layer_spec

__all__ = ["NSAQwen3ForCausalLM"]

# MindFormers' CausalMaskGenerate builds its compressed (TND) mask only for rows this long
COMPRESSED_MASK_MIN_SEQ_LENGTH = 2048


@MindFormerRegister.register(MindFormerModuleType.MODELS, legacy=False)
class NSAQwen3ForCausalLM(CachedGeneration, TrainingQwen3ForCausalLM):
    """Qwen3 (graph-mode training track) with NSA in every layer: ``GPTModel`` built from
    :func:`~nsa_layers.mindformers.get_nsa_layer_spec`.

    Parameter names are Qwen3's (``embedding.word_embeddings.weight``,
    ``decoder.layers.{i}.self_attention.linear_qkv.weight``, ...) and the HF weight converters are
    inherited, so a Qwen3 checkpoint loads; the NSA parameters live under
    ``decoder.layers.{i}.self_attention.{gate,core_attention,linear_kv_branches}`` and keep their
    initialisation when a checkpoint lacks them.

    ``use_eod_attn_mask_compression`` (which MindFormers' Trainer turns on for a dataset with
    ``create_compressed_eod_mask``) is kept off below 2048-token rows, where MindFormers cannot build
    its compressed mask: NSA gets ``actual_seq_len`` in either layout and does not read the mask.

    On CPU the instance swaps of :func:`~nsa_layers.mindformers.apply_cpu_swaps` are applied (listed in
    ``self.cpu_swaps``; with ``compute_dtype: bfloat16`` they include holding bfloat16 in float32, as
    ``nsa_layers.precision`` does for the NSA layers); on Ascend nothing is changed.

    ``generate`` is MindFormers' own, with the NSA KV cache (``nsa_layers.mindformers.generation``;
    ``nsa_cache = False`` for the cache-free path).

    Inputs and outputs: those of MindFormers' ``TrainingQwen3ForCausalLM`` (``input_ids (B, S)``,
    ``labels``, ``loss_mask``, ``position_ids``, ``actual_seq_len``; losses in training, logits
    ``(B*S, vocab)`` float32 in eval mode). ``actual_seq_len`` (int, e.g. ``(B, E)``) holds document
    ends over the flattened ``B*S`` tokens, as MindFormers' packed batches give them: values in
    ``[0, B*S]``, non-decreasing; a Tensor that breaks this raises ``ValueError`` when the graph runs,
    before the step changes any parameter (row-local ends fed without the row offsets do, for B > 1).
    Under a parallel context the ends are each data-parallel rank's own (MindFormers' per-rank
    dataset) and the graph is sharded: the in-graph check is off there (``checks_prefix_sums``) and
    ``PackedDataCheck`` checks the first batch on the host.
    """

    config_class = NSAQwen3Config

    def __init__(self, config: NSAQwen3Config):
        if not isinstance(config, NSAQwen3Config):
            raise TypeError(f"NSAQwen3ForCausalLM: config must be an NSAQwen3Config (model_type: nsa_qwen3), "
                            f"got {type(config).__name__}.")
        # TrainingQwen3ForCausalLM.__init__ hard-codes the stock layer spec: run its parents' instead
        super(TrainingQwen3ForCausalLM, self).__init__(config, auto_prefix=False)
        tc = self.convert_to_transformer_config(self.config)
        if tc.use_eod_attn_mask_compression and tc.seq_length < COMPRESSED_MASK_MIN_SEQ_LENGTH:
            # MindFormers turns this on for data with create_compressed_eod_mask; NSA reads
            # actual_seq_len in either layout and never the mask, whose compressed form needs S >= 2048
            tc.use_eod_attn_mask_compression = False
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
        bfloat16 = str(self.config.compute_dtype) == "bfloat16"
        self.cpu_swaps = tuple(cpu.apply_cpu_swaps(self, bfloat16)) if cpu.on_cpu() else ()
        self.checks_prefix_sums = _get_parallel_mode() not in (ParallelMode.SEMI_AUTO_PARALLEL,
                                                               ParallelMode.AUTO_PARALLEL)

    def construct(self, input_ids, position_ids=None, attention_mask=None, decoder_input=None, labels=None,
                  extra_block_kwargs=None, prefix_keys_values=None, loss_mask=None, actual_seq_len=None):
        """``TrainingQwen3ForCausalLM.construct``, with ``actual_seq_len`` checked first."""
        if self.checks_prefix_sums and isinstance(actual_seq_len, Tensor):
            tokens = input_ids.shape[0] * input_ids.shape[1]
            actual_seq_len = checked_prefix_sums(type(self).__name__, actual_seq_len, tokens)
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          decoder_input=decoder_input, labels=labels, extra_block_kwargs=extra_block_kwargs,
                          prefix_keys_values=prefix_keys_values, loss_mask=loss_mask,
                          actual_seq_len=actual_seq_len)
