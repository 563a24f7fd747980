"""How the NSA core splits over MindFormers' ``(dp, cp, tp)`` device matrix: the rule, the layouts and
the sharded core.

The core has no parallel operator, so it runs as one self-defined-shard ``Morph`` (as MindFormers'
``transformer/dsa`` does): it declares the layouts of its inputs and outputs, MindSpore's engine
redistributes around it, and its body runs single-device code on one rank's shard.

- Tensor parallelism splits heads. Selection sums block importances over a GQA group's query heads
  (paper Eq. 10), so a group is never split: ``tp`` must divide the KV heads, and rank ``t`` then
  holds query heads ``[t*H/tp, (t+1)*H/tp)`` with exactly their KV heads, the compressor parameters
  of those KV heads, and nothing it needs from another rank.
- Data parallelism splits the packed token axis into whole batch rows; each data-parallel rank's
  ``actual_seq_len`` is its own prefix sums over its rows (MindFormers' dataset computes them per
  rank), so they are laid out by ``dp`` and used as they come.
- Context parallelism splits each data-parallel shard's tokens into ``cp`` contiguous query ranges
  and gathers the keys and values (the K/V all-gather of MindFormers' ``colossalai_cp``): rank ``c``
  computes its queries, rows ``c*Tq ..`` of the shard, against the whole shard (the core's
  ``query_offset``), with the segment bookkeeping on the whole shard. Every rank compresses all of the
  shard's keys and values; their gradients are summed by the engine's backward of the gather.
"""

from dataclasses import dataclass, replace

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .attention import NativeSparseAttention
from .input_checks import key_rows
from .layout import known_prefix_sums

__all__ = ["NSACoreLayouts", "NSACoreShard", "check_tensor_parallel", "core_layouts"]


def check_tensor_parallel(num_heads, num_kv_heads, tp):
    """``ValueError`` unless ``tp >= 1`` divides ``num_kv_heads`` (and so ``num_heads``, a multiple of it)."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"NSA tensor parallel: the tensor-parallel size must be a positive integer, but got {tp!r}.")
    if num_kv_heads % tp or num_heads % tp:
        raise ValueError(f"NSA tensor parallel: the tensor-parallel size {tp} must divide num_kv_heads="
                         f"{num_kv_heads} (and num_heads={num_heads}): selection sums over each GQA group's "
                         f"heads, so a group is never split.")


@dataclass(frozen=True)
class NSACoreLayouts:
    """The core's layouts, one MindSpore ``Layout`` per input, parameter and output (``T`` tokens,
    ``H`` query heads, ``Hkv`` KV heads, ``l`` compress block size, ``D`` head size, ``E`` ends)."""

    q: object                       # (T, H, Dq)
    k: object                       # (T, Hkv, Dq)
    v: object                       # (T, Hkv, Dv)
    gates: object                   # (T, H, 3)
    actual_seq_len: object          # (E,) int32
    compressor_weight: object       # (l, Hkv), the key and the value compressor
    position_embedding: object      # (l, Hkv, Dv), the value compressor's
    out: object                     # (T, H, Dv)


def core_layouts(dp=1, cp=1, tp=1):
    """The :class:`NSACoreLayouts` of the core on a ``(dp, cp, tp)`` device matrix: heads (query and
    KV, and the compressors' KV-head axis) split by ``tp``; tokens split by ``dp`` and then ``cp`` for
    the queries, gates and outputs, by ``dp`` only for the keys and values (gathered over ``cp``)."""
    from mindspore.parallel import Layout

    layout = Layout((dp, cp, tp), ("dp", "cp", "tp"))
    queries = layout(("dp", "cp"), "tp", "None")
    keys = layout("dp", "tp", "None")
    return NSACoreLayouts(q=queries, k=keys, v=keys, gates=queries, actual_seq_len=layout("dp"),
                          compressor_weight=layout("None", "tp"), position_embedding=layout("None", "tp", "None"),
                          out=queries)


class NSACoreShard(nn.Cell):
    """The NSA core as one self-defined-shard ``Morph`` over a ``(dp, cp, tp)`` device matrix.

    Its body (:meth:`rank_forward`, :meth:`rank_forward_independent_kv`) is what one rank runs on its
    shard: a :class:`~nsa_layers.NativeSparseAttention` of ``H/tp`` heads and ``Hkv/tp`` KV heads,
    without parameters of its own (the compressor weights are inputs: a ``Morph`` body may not read a
    parameter), on its query rows at offset ``cp_rank * Tq`` of its data-parallel shard. The
    declared layouts (``layouts``, :func:`core_layouts`) are set by :meth:`declare_layouts` under a
    semi-auto parallel context, where the engine redistributes around the Morph; without one the
    Morph runs the body on the whole tensors (graph mode only, as every ``Morph``).

    Args:
        config (NSAConfig): the global sizes.
        dp, cp, tp (int): the device matrix; ``tp`` must divide ``num_kv_heads`` (:func:`check_tensor_parallel`).
        row_length (int): ``S``, tokens per batch row: the body adds each row's end to the prefix
            sums, so that no document crosses a row.
        cp_rank (int): this rank's index along ``cp`` (MindFormers' ``get_dp_cp_id``).

    Inputs:
        q (Tensor): ``(T, H, Dq)``; k, v: ``(T, Hkv, D)`` (or 3-tuples with ``independent_kv``);
        gates (Tensor): ``(T, H, 3)``; actual_seq_len (Tensor): ``(E,)`` int32, the prefix sums of each
        data-parallel rank's rows, concatenated (MindFormers' TND); compressor weights ``(l, Hkv)``
        twice and the value position embedding ``(l, Hkv, Dv)`` (zeros when the config has none).

    Outputs:
        Tensor ``(T, H, Dv)`` in the dtype of ``q``.
    """

    def __init__(self, config, dp=1, cp=1, tp=1, row_length=None, cp_rank=0):
        super().__init__()
        check_tensor_parallel(config.num_heads, config.num_kv_heads, tp)
        self.config = config
        self.dp, self.cp, self.tp = dp, cp, tp
        self.row_length = row_length
        self.cp_rank = cp_rank
        self.layouts = core_layouts(dp, cp, tp)
        self.rank_core = NativeSparseAttention(
            replace(config, num_heads=config.num_heads // tp, num_kv_heads=config.num_kv_heads // tp),
            own_parameters=False)
        body = self.rank_forward_independent_kv if config.independent_kv else self.rank_forward
        self.morph = ops.Morph(body, self._infer_shape, self._infer_dtype).add_prim_attr("self_define_shard", True)
        self.no_position_embedding = Tensor(np.zeros((config.compress_block_size, config.num_kv_heads,
                                                      config.v_head_dim), np.float32))

    def declare_layouts(self):
        """``shard`` the Morph with :attr:`layouts` (under a semi-auto parallel context, where it takes effect)."""
        lay = self.layouts
        kv = (lay.k,) * 3 + (lay.v,) * 3 if self.config.independent_kv else (lay.k, lay.v)
        self.morph.shard((lay.q,) + kv + (lay.gates, lay.actual_seq_len, lay.compressor_weight,
                                          lay.compressor_weight, lay.position_embedding), (lay.out,))

    def construct(self, q, k, v, gates, actual_seq_len, k_weight, v_weight, v_position_embedding=None):
        if v_position_embedding is None:
            v_position_embedding = self.no_position_embedding
        if self.config.independent_kv:
            return self.morph(q, k[0], k[1], k[2], v[0], v[1], v[2], gates, actual_seq_len, k_weight, v_weight,
                              v_position_embedding)
        return self.morph(q, k, v, gates, actual_seq_len, k_weight, v_weight, v_position_embedding)

    def rank_forward(self, q, k, v, gates, actual_seq_len, k_weight, v_weight, v_position_embedding):
        """One rank's shard, shared K/V: ``q``, ``gates`` ``(Tq, H/tp, .)`` its query rows, ``k``, ``v``
        ``(T, Hkv/tp, .)`` its data-parallel shard, ``actual_seq_len`` that shard's prefix sums."""
        return self._rank_core(q, k, v, gates, actual_seq_len, k_weight, v_weight, v_position_embedding)

    def rank_forward_independent_kv(self, q, k_cmp, k_slc, k_win, v_cmp, v_slc, v_win, gates, actual_seq_len,
                                    k_weight, v_weight, v_position_embedding):
        """:meth:`rank_forward` with the three branches' own keys and values."""
        return self._rank_core(q, (k_cmp, k_slc, k_win), (v_cmp, v_slc, v_win), gates, actual_seq_len,
                               k_weight, v_weight, v_position_embedding)

    def _rank_core(self, q, k, v, gates, actual_seq_len, k_weight, v_weight, v_position_embedding):
        rows = key_rows(k)
        # the shard's ends (checked once per step by the model) and its row ends, in any order
        ends = ops.cat((actual_seq_len.reshape(-1).astype(ms.int32), _row_ends(rows, self.row_length)))
        compressors = {"k_weight": k_weight, "v_weight": v_weight, "v_position_embedding": v_position_embedding}
        return self.rank_core.forward_with_details(q, k, v, gates, known_prefix_sums(ends), q.shape[0] * self.cp_rank,
                                                   compressors)["out"]

    def _infer_shape(self, q, *inputs):
        return list(q[:2]) + [self.config.v_head_dim]

    @staticmethod
    def _infer_dtype(q, *inputs):
        return q


def _row_ends(rows, row_length):
    """``(rows / S,)`` int32, the end of every batch row of ``S = row_length`` tokens among ``rows``
    (``S`` None: one row)."""
    length = rows if row_length is None else row_length
    if rows % length:
        raise ValueError(f"NSACoreShard: the {rows} tokens of a data-parallel shard must be whole batch rows of "
                         f"row_length={length} tokens.")
    return ops.arange(length, rows + 1, length, dtype=ms.int32)
