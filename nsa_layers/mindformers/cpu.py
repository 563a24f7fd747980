"""What MindFormers' graph-mode GPT model needs to run on the CPU backend, decided once per model.

Three kernels without a CPU implementation stop it there (found by running it): the rotary
embedding's ``Outer``, the embedding's backward (``EmbeddingDenseBackward``) and generation's greedy
``ArgMaxExt``. The swaps below replace them per instance, with the same results, and only where the
device is CPU; nothing is patched globally. (The train wrapper's overflow status,
``NPUGetFloatStatusV2``, is the fourth: ``NSATrainOneStepCell`` reads ``on_cpu`` and checks with
``IsFinite`` instead.)

A bfloat16 model (``compute_dtype: bfloat16``) meets the CPU's missing bfloat16 kernels everywhere
(``nsa_layers.precision``): there the ``cast`` of every MindFormers cell is swapped for one that
holds a bfloat16 result in float32 (rounded to bfloat16 and back), as the NSA layers hold theirs, so
no bfloat16 tensor is made. MindFormers' layers then compute in float32 on bfloat16 operands and
round at their next cast (on Ascend each op's result is bfloat16).
"""

import mindspore as ms
from mindformers.parallel_core.training_graph.base_models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from mindformers.parallel_core.training_graph.tensor_parallel.layers import (
    VocabParallelEmbedding,
    embedding_infer_dtype,
    embedding_infer_shape,
)
from mindspore import nn, ops
from mindspore.ops import constexpr
from mindspore.ops import operations as P

from ..precision import on_cpu

__all__ = ["apply_cpu_swaps", "on_cpu"]

_CAST = P.Cast()


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


@constexpr
def _held_dtype(dtype):
    """The dtype a cast to ``dtype`` returns under the bfloat16 swap: float32 for bfloat16."""
    return ms.float32 if dtype == ms.bfloat16 else dtype


class _HeldCast(nn.Cell):
    """``Cast(x, dtype)``, with a bfloat16 result held in float32: rounded to bfloat16 and back."""

    def construct(self, x, dtype):
        return _CAST(_CAST(x, dtype), _held_dtype(dtype))


def _argmax(x, dim=-1):
    """``mint.argmax(x, dim)`` as the ``Argmax`` primitive (``ArgMaxExt`` has no CPU kernel)."""
    return P.Argmax(axis=dim, output_type=ms.int32)(x)


def apply_cpu_swaps(network, bfloat16=False):
    """Swap the CPU-missing kernels inside a built MindFormers graph-mode model, in place.

    Rotary embeddings get a broadcast outer product; embeddings without tensor parallelism get an
    ``ops.gather`` body; generation's greedy ``argmax`` gets the ``Argmax`` primitive; with
    ``bfloat16`` (the model's compute dtype) every MindFormers cell's ``cast`` holds bfloat16 in
    float32. Returns the names of the swapped attributes (each once).
    """
    done = []
    if hasattr(network, "argmax"):
        network.argmax = _argmax
        done.append("GenerationMixin.argmax")
    for _, cell in network.cells_and_names():
        if bfloat16 and isinstance(getattr(cell, "cast", None), P.Cast):
            cell.cast = _HeldCast()
            done.append(f"{type(cell).__name__}.cast (bfloat16 held in float32)")
        if isinstance(cell, RotaryEmbedding):
            cell.outer = _OuterProduct()
            cell.outer_for_eod = _OuterProduct()
            done.append("RotaryEmbedding.outer")
        if isinstance(cell, VocabParallelEmbedding) and not cell.enable_embedding_tp:
            cell.embedding_morph = P.Morph(_GatherEmbedding(cell.reshape).__call__, embedding_infer_shape,
                                           embedding_infer_dtype).add_prim_attr("self_define_shard", True)
            done.append("VocabParallelEmbedding.embedding_morph")
    return sorted(set(done))
