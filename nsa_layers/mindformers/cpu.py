"""What MindFormers' graph-mode GPT model needs to run on the CPU backend, decided once per model.

Three kernels without a CPU implementation stop it there (found by running it): the rotary
embedding's ``Outer``, the embedding's backward (``EmbeddingDenseBackward``) and generation's greedy
``ArgMaxExt``. The swaps below replace them per instance, with the same results, and only where the
device is CPU; nothing is patched globally. (The train wrapper's overflow status,
``NPUGetFloatStatusV2``, is the fourth: ``NSATrainOneStepCell`` reads ``on_cpu`` and checks with
``IsFinite`` instead.)
"""

import mindspore as ms
from mindformers.parallel_core.training_graph.base_models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from mindformers.parallel_core.training_graph.tensor_parallel.layers import (
    VocabParallelEmbedding,
    embedding_infer_dtype,
    embedding_infer_shape,
)
from mindspore import nn, ops
from mindspore.ops import operations as P

__all__ = ["apply_cpu_swaps", "on_cpu"]


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


def _argmax(x, dim=-1):
    """``mint.argmax(x, dim)`` as the ``Argmax`` primitive (``ArgMaxExt`` has no CPU kernel)."""
    return P.Argmax(axis=dim, output_type=ms.int32)(x)


def apply_cpu_swaps(network):
    """Swap the CPU-missing kernels inside a built MindFormers graph-mode model, in place.

    Rotary embeddings get a broadcast outer product; embeddings without tensor parallelism get an
    ``ops.gather`` body; generation's greedy ``argmax`` gets the ``Argmax`` primitive. Returns the
    names of the swapped attributes (each once).
    """
    done = []
    if hasattr(network, "argmax"):
        network.argmax = _argmax
        done.append("GenerationMixin.argmax")
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
