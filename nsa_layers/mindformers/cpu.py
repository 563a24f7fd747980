"""What MindFormers' graph-mode GPT model and train wrapper need to run on the CPU backend.

Three Ascend-only kernels stop them there (found by running them, see the README): the rotary
embedding's ``Outer``, the embedding's backward (``EmbeddingDenseBackward``) and the train wrapper's
overflow status (``NPUGetFloatStatusV2``). The swaps below replace them per instance, with the same
results, and only where the device is CPU; nothing is patched globally.
"""

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import operations as P
from mindformers.parallel_core.training_graph.base_models.common.embeddings.rotary_pos_embedding import (
    RotaryEmbedding)
from mindformers.parallel_core.training_graph.tensor_parallel.layers import (
    VocabParallelEmbedding, embedding_infer_dtype, embedding_infer_shape)
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mindformers.wrapper.wrapper import MFTrainOneStepCell

__all__ = ["apply_cpu_swaps", "NSATrainOneStepCell", "on_cpu"]


def on_cpu():
    """Whether MindSpore's device target is the CPU (the swaps below apply only then)."""
    return ms.get_context("device_target") == "CPU"


class _OuterProduct(nn.Cell):
    """``Outer(a, b)`` as a broadcast product (``Outer`` has no CPU kernel)."""

    def construct(self, a, b):
        return a.reshape(-1, 1) * b.reshape(1, -1)


class _GatherEmbedding:
    """The body of ``VocabParallelEmbedding``'s Morph for one device: ``ops.gather`` (its backward runs on CPU)."""

    def __init__(self, reshape):
        self.reshape = reshape

    def __call__(self, input_ids, weight):
        bs, seq_len = input_ids.shape
        out = ops.gather(weight, self.reshape(input_ids, (bs * seq_len,)), 0)
        return self.reshape(out, (bs, -1, weight.shape[1]))


def apply_cpu_swaps(network):
    """Swap the CPU-missing kernels inside a built MindFormers graph-mode model, in place.

    Rotary embeddings get a broadcast outer product; embeddings without tensor parallelism get an
    ``ops.gather`` body. Returns the names of the swapped attributes (each once).
    """
    done = []
    for _, cell in network.cells_and_names():
        if isinstance(cell, RotaryEmbedding):
            cell.outer = _OuterProduct()
            cell.outer_for_eod = _OuterProduct()
            done.append("RotaryEmbedding.outer")
        if isinstance(cell, VocabParallelEmbedding) and not cell.enable_embedding_tp:
            cell.embedding_morph = P.Morph(_GatherEmbedding(cell.reshape).__call__, embedding_infer_shape,
                                           embedding_infer_dtype).add_prim_attr("self_define_shard", True)
            done.append("VocabParallelEmbedding.embedding_morph")
    return sorted(set(done))


@MindFormerRegister.register(MindFormerModuleType.WRAPPER)
class NSATrainOneStepCell(MFTrainOneStepCell):
    """MindFormers' ``MFTrainOneStepCell`` (same arguments, same outputs) that also runs on CPU.

    MindSpore's loss-scale wrapper treats every non-GPU device as Ascend and reads the NPU float
    status; on CPU this wrapper checks gradients with ``IsFinite`` instead (MindSpore's own
    "INFNAN" branch). On Ascend it is exactly ``MFTrainOneStepCell``. Use it in a YAML as
    ``runner_wrapper: {type: NSATrainOneStepCell, ...}``.
    """

    def __init__(self, network, optimizer, **kwargs):
        super().__init__(network, optimizer, **kwargs)
        self.overflow_check = "npu-status"
        if on_cpu():
            self.gpu_target = False
            self.ascend_910b_target = True
            self._ascend_check_overflow_mode = "INFNAN_MODE"
            self.enable_allfinite = False
            self.overflow_check = "isfinite"
