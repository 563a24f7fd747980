"""MindFormers 1.9 adapter: NSA as the attention of a MindFormers (Megatron-style) GPT model.

Importing this module registers, with ``MindFormerRegister`` (``legacy=False``):

- :class:`NSAQwen3Config` (``model_type: nsa_qwen3``): Qwen3's config plus the NSA hyper-parameters
  (``nsa_*`` keys), which are validated here and kept out of MindFormers' ``TransformerConfig``;
- :class:`NSAQwen3ForCausalLM` (``architectures: [NSAQwen3ForCausalLM]``): MindFormers' ``GPTModel``
  with :class:`GPTNSASelfAttention` in every layer's ``self_attention`` slot. Qwen3 parameter names are
  unchanged, so a Qwen3 checkpoint loads and only the NSA parameters (gate, compressors) start from
  their initialisation;
- :class:`NSATrainOneStepCell` (``runner_wrapper: {type: NSATrainOneStepCell}``): MindFormers' train
  wrapper with an overflow check that runs on CPU;
- :class:`PackedMindRecordLoader` (``train_dataset.data_loader``): packed rows from MindRecord files,
  batched by MindFormers with the row offsets of ``actual_seq_len``;
- the callbacks :class:`PackedDataCheck` (the first batch checked on the host) and
  :class:`NSAProgressBar` (loss and tokens per second).

``nsa_layers`` itself never imports MindFormers; this module needs the ``mindformers`` extra.
"""

try:
    import mindformers  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the installation
    raise ImportError("nsa_layers.mindformers needs MindFormers 1.9: pip install 'nsa-layers[mindformers]'") from err

from .attention import GPTNSASelfAttention, GPTNSASelfAttentionContiguous, NSACoreAttention, NSASelfAttentionSubmodules
from .callbacks import NSAProgressBar, PackedDataCheck
from .configuration import CHECKPOINT_KEYS, NSA_CONFIG_KEYS, NSAQwen3Config, use_checkpoint_config
from .cpu import apply_cpu_swaps
from .dataset import PackedMindRecordLoader
from .model import NSAQwen3ForCausalLM
from .selection_probe import LayerSelection
from .spec import get_nsa_layer_spec
from .wrapper import NSATrainOneStepCell

__all__ = ["NSAQwen3Config", "NSA_CONFIG_KEYS", "CHECKPOINT_KEYS", "use_checkpoint_config", "NSACoreAttention",
           "NSASelfAttentionSubmodules", "GPTNSASelfAttention", "GPTNSASelfAttentionContiguous", "get_nsa_layer_spec",
           "NSAQwen3ForCausalLM", "apply_cpu_swaps", "NSATrainOneStepCell", "LayerSelection", "PackedMindRecordLoader",
           "PackedDataCheck", "NSAProgressBar"]
