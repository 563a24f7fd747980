"""NSA inside MindFormers' GPT layer: the core in the ``core_attention`` slot, and a self-attention
that feeds it the hidden state (for the gate) and the prefix-sum ``actual_seq_len``.

MindFormers' own ``SelfAttention`` hands its core only ``(q, k, v, mask, actual_seq_qlen, ...)`` and
casts q/k/v to float16 for FlashAttention; NSA needs the hidden state for its gate (paper Eq. 5) and
keeps the compute dtype. So :class:`GPTNSASelfAttention` subclasses MindFormers' ``SelfAttention``
(same ``linear_qkv``/``q_layernorm``/``k_layernorm``/``linear_proj``, so Qwen3 weights load), adds the
gate, and replaces ``construct``: the same projections, norms and rotary embedding, then TND layout,
then the NSA core.
"""

from dataclasses import dataclass
from typing import TypedDict, Union

import mindspore as ms
from mindformers.parallel_core.training_graph.communication import get_dp_cp_id
from mindformers.parallel_core.training_graph.transformer.attention import (
    SelfAttention,
    SelfAttentionContiguous,
    SelfAttentionSubmodules,
)
from mindformers.parallel_core.utils.spec_utils import ModuleSpec, build_module
from mindspore import ops
from mindspore.context import ParallelMode
from mindspore.parallel._utils import _get_parallel_mode

from ..attention import NativeSparseAttention
from ..config import NSAConfig
from ..layout import known_prefix_sums
from ..parallel import NSACoreShard, check_tensor_parallel
from .configuration import nsa_softmax_dtype

__all__ = ["NSACoreAttention", "NSASelfAttentionSubmodules", "GPTNSASelfAttention", "GPTNSASelfAttentionContiguous",
           "PrefillRequest", "StepRequest", "prefill_request", "step_request"]

_DTYPE_NAMES = {ms.float32: "float32", ms.float16: "float16", ms.bfloat16: "bfloat16"}


class PrefillRequest(TypedDict):
    """A cached generation's prefill, given to every :class:`GPTNSASelfAttention` in place of the prefix
    sums (the one input MindFormers' decoder block hands each attention unchanged): ``prefill_ends``
    ``(N,)`` int32 prompt ends and ``slots`` ``(N,)`` int32 their cache slots (``NSAPrefill``)."""

    prefill_ends: ms.Tensor
    slots: ms.Tensor


class StepRequest(TypedDict):
    """A cached generation's step, in the same place: ``step_counts`` ``(B,)`` int32 new tokens per cache
    slot (``NSADecodeStep``)."""

    step_counts: ms.Tensor


def prefill_request(ends, slots):
    """A :class:`PrefillRequest` (pass it through ``mindspore.mutable``: its tensors are graph data)."""
    return {"prefill_ends": ends, "slots": slots}


def step_request(counts):
    """A :class:`StepRequest` (pass it through ``mindspore.mutable``)."""
    return {"step_counts": counts}


class NSACoreAttention(NativeSparseAttention):
    """:class:`~nsa_layers.NativeSparseAttention` built the MindFormers way, from a ``TransformerConfig``.

    Args:
        config (TransformerConfig): gives ``hidden_size``, the heads (``num_attention_heads``,
            ``num_query_groups``), the head size (``kv_channels``, used for keys and values),
            ``compute_dtype`` and ``softmax_compute_dtype`` (NSA's ``softmax_dtype``).
        layer_number (int): the layer (kept for reference; every layer has its own parameters).
        **nsa_params: the NSA sizes, ``NSAConfig`` keyword arguments (``compress_block_size``, ...).

    Inputs and outputs: those of :class:`~nsa_layers.NativeSparseAttention` (TND).

    Under a semi-auto parallel context it also builds ``core_shard``, the core as one Morph with
    declared layouts over the config's ``(dp, cp, tp)`` (:class:`~nsa_layers.parallel.NSACoreShard`),
    which the host attention calls instead (:meth:`sharded`); otherwise ``core_shard`` is None.
    """

    def __init__(self, config, layer_number=1, **nsa_params):
        heads = config.num_attention_heads
        compute_dtype = _DTYPE_NAMES[config.compute_dtype]
        super().__init__(NSAConfig(
            hidden_size=config.hidden_size, num_heads=heads, num_kv_heads=config.num_query_groups or heads,
            head_dim=config.kv_channels, v_head_dim=config.kv_channels, compute_dtype=compute_dtype,
            softmax_dtype=nsa_softmax_dtype(compute_dtype, _DTYPE_NAMES[config.softmax_compute_dtype]),
            **nsa_params))
        self.layer_number = layer_number
        self.core_shard = None
        if _get_parallel_mode() == ParallelMode.SEMI_AUTO_PARALLEL:
            _, cp_rank = get_dp_cp_id(config)
            self.core_shard = NSACoreShard(self.config, config.data_parallel_size or 1,
                                           config.context_parallel_size or 1, config.tensor_model_parallel_size or 1,
                                           row_length=config.seq_length, cp_rank=cp_rank)
            self.core_shard.declare_layouts()

    def sharded(self, q, k, v, gates, actual_seq_len):
        """The core through ``core_shard``: inputs as the cell's, ``actual_seq_len`` the fed
        ``(B, E)`` prefix sums of each data-parallel rank's own rows, or None."""
        if actual_seq_len is None:  # one document per row: the body adds the row ends
            actual_seq_len = ops.zeros((self.core_shard.dp,), ms.int32)
        weights = self.compressor_weights()
        return self.core_shard(q, k, v, gates, actual_seq_len.reshape(-1), weights["k_weight"],
                               weights["v_weight"], weights["v_position_embedding"])


@dataclass
class NSASelfAttentionSubmodules(SelfAttentionSubmodules):
    """MindFormers' self-attention submodules plus the NSA gate (``gate(hidden_size, num_heads)``)."""

    gate: Union[ModuleSpec, type] = None


class _NSAHostAttention:
    """What :class:`GPTNSASelfAttention` adds to a MindFormers self-attention (a mixin)."""

    def __init__(self, config, submodules, layer_number, attn_mask_type=None, cp_comm_type=None):
        check_tensor_parallel(config.num_attention_heads, config.num_query_groups or config.num_attention_heads,
                              config.tensor_model_parallel_size or 1)
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type)
        if self.cp_ds > 1:
            raise NotImplementedError(f"{type(self).__name__}: Ulysses context parallelism (ulysses_degree_in_cp="
                                      f"{self.cp_ds}) is not supported by the NSA attention; its context "
                                      f"parallelism gathers keys and values (context_parallel_algo: colossalai_cp).")
        if not isinstance(self.core_attention, NativeSparseAttention):
            raise TypeError(f"{type(self).__name__}: the core_attention submodule must build a "
                            f"NativeSparseAttention (e.g. NSACoreAttention), got {type(self.core_attention).__name__}.")
        self.gate = build_module(submodules.gate, self.hidden_size, self.num_heads, self.core_attention.precision)
        # the layer's NSAPrefill / NSADecodeStep while a cached generation runs (attach_decode_cells)
        self.nsa_prefill = None
        self.nsa_step = None
        self.independent_kv = self.core_attention.config.independent_kv
        if self.independent_kv:
            # keys and values of the compressed and the window branches, head-major (per KV head: k_cmp,
            # v_cmp, k_win, v_win), so a head split needs no communication; the selected branch uses the
            # host's own K/V (linear_qkv), so a dense checkpoint's K/V keep feeding token-level attention
            self.linear_kv_branches = build_module(
                submodules.linear_qkv, self.hidden_size, 4 * self.kv_hidden_size, config=self.config,
                init_method=self.init_method, bias=self.config.add_bias_linear or self.config.add_qkv_bias)
            self.split_kv_branches = ops.auto_generate.SplitWithSize()
        self.gate_transpose = ops.Transpose()
        if _get_parallel_mode() == ParallelMode.SEMI_AUTO_PARALLEL:
            self.shard_nsa()

    def attach_decode_cells(self, prefill, step):
        """Use ``prefill`` (``NSAPrefill``) and ``step`` (``NSADecodeStep``) of this layer's cache for the
        decode requests; ``None`` for both detaches them. Called by the cached generation only
        (``CachedGeneration``), around each ``generate``."""
        # plain attributes, not sub-cells: a sub-cell would prefix (rename) the layer's parameters
        object.__setattr__(self, "nsa_prefill", prefill)
        object.__setattr__(self, "nsa_step", step)

    def shard_nsa(self):
        """Lay out what the NSA host adds (MindFormers' ``(dp, cp, tp)``): the gate as a column-parallel
        projection (its ``3H`` outputs are head-major, so a head split is ``tp`` column blocks) on the
        tokens of ``(B, S)`` split by ``dp`` and ``cp``, and the branch K/V split per KV head."""
        dp, cp, tp = self.dp, self.cp, self.tp
        self.gate_transpose.shard(((cp, dp, 1),))
        self.gate.shard_columns(dp * cp, tp)
        if self.independent_kv:
            self.split_kv_branches.shard(((cp, dp, tp, 1),))

    def construct(self, hidden_states, attention_mask, key_value_states=None, rotary_pos_emb=None,
                  prefix_keys_values=None, actual_seq_len=None, sharded_key=None, sharded_value=None):
        """``hidden_states (S, B, hidden)`` -> ``(output (S, B, hidden), bias)`` like MindFormers' attention.

        ``attention_mask`` is not read: NSA builds its causal, per-document masks from
        ``actual_seq_len`` (global prefix sums over the flattened ``B*S`` tokens, padded, as MindFormers
        feeds them; ``None`` = every row is one document). A document never crosses a row. A
        :class:`PrefillRequest` or :class:`StepRequest` there runs the layer's cache instead.
        """
        if prefix_keys_values is not None:
            raise NotImplementedError("GPTNSASelfAttention: prefix_keys_values is not supported.")
        if isinstance(actual_seq_len, dict):  # a PrefillRequest or StepRequest of the cached generation
            return self._decode(hidden_states, rotary_pos_emb, actual_seq_len)
        seq_len, bs, _ = self.shape(hidden_states)
        if self.core_attention.core_shard is not None:  # the sharded core adds each rank's row ends itself
            q, k, v, gates, _ = self._core_inputs(hidden_states, rotary_pos_emb, None)
            out = self.core_attention.sharded(q, k, v, gates, actual_seq_len)
        else:
            out = self.core_attention(*self._core_inputs(hidden_states, rotary_pos_emb, actual_seq_len))
        return self._output(out, hidden_states, seq_len, bs)

    def _decode(self, hidden_states, rotary_pos_emb, request):
        """New tokens ``hidden_states (T, 1, hidden)`` through the layer's cache: ``request`` is a
        :class:`PrefillRequest` (:class:`~nsa_layers.decode.NSAPrefill`) or a :class:`StepRequest`
        (:class:`~nsa_layers.decode.NSADecodeStep`); ``rotary_pos_emb`` holds each token's rotary row."""
        seq_len, bs, _ = self.shape(hidden_states)
        q, k, v, gates, _ = self._core_inputs(hidden_states, rotary_pos_emb, None)
        if "step_counts" in request:
            out = self.nsa_step(q, k, v, gates, request["step_counts"])[0]
        else:
            out = self.nsa_prefill(q, k, v, gates, request["prefill_ends"], request["slots"])[0]
        return self._output(out, hidden_states, seq_len, bs)

    def _output(self, out, hidden_states, seq_len, bs):
        """The core's TND output back to ``(S, B, hidden)`` through ``linear_proj``: ``(output, bias)``."""
        out = self.bs_transpose(self.reshape(out, (bs, seq_len, -1)), (1, 0, 2))
        output, bias = self.linear_proj(self.cast(out, self.compute_dtype))
        return self.cast(output, hidden_states.dtype), bias

    def block_selection(self, hidden_states, rotary_pos_emb=None, actual_seq_len=None):
        """The blocks the selection branch picks: ``(blocks, valid)``, each ``(B*S, Hkv, n)``.

        ``blocks`` are selection-block indices inside each token's document (block ``j`` covers the
        document's tokens ``[j*l', (j+1)*l')``), ``valid`` marks the used slots. Rows are B-major.
        Inputs as in ``construct`` (``hidden_states`` is the layer-normed input of the attention).
        """
        details = self.core_attention.forward_with_details(
            *self._core_inputs(hidden_states, rotary_pos_emb, actual_seq_len))
        return details["blocks"], details["valid"]

    def _core_inputs(self, hidden_states, rotary_pos_emb, actual_seq_len):
        seq_len, bs, _ = self.shape(hidden_states)
        query, key, value = self.get_query_key_value_tensors(hidden_states)
        query = self.reshape(query, (seq_len, bs, self.num_heads, self.head_dim))
        key = self.reshape(key, (seq_len, bs, self.kv_num_heads, self.head_dim))
        value = self.reshape(value, (seq_len, bs, self.kv_num_heads, self.head_dim))
        query, key = self._apply_rotary_pos_emb(query, key, rotary_pos_emb)
        q = self.sbh2tnd(query, self.num_heads)
        k = self.sbh2tnd(key, self.kv_num_heads)
        v = self.sbh2tnd(value, self.kv_num_heads)
        if self.independent_kv:
            (k_cmp, v_cmp), (k_win, v_win) = self._branch_kv(hidden_states, rotary_pos_emb)
            k, v = (k_cmp, k, k_win), (v_cmp, v, v_win)
        # (S, B, hidden) -> (B*S, hidden), the TND token order
        gates = self.gate(self.reshape(self.gate_transpose(hidden_states, (1, 0, 2)), (bs * seq_len, -1)))
        return q, k, v, gates, self._segment_ends(actual_seq_len, seq_len, bs)

    def _branch_kv(self, hidden_states, rotary_pos_emb):
        """K/V ``(B*S, Hkv, D)`` of the compressed and the window branch, normed and rotated like the host's."""
        seq_len, bs, _ = self.shape(hidden_states)
        kv, _ = self.linear_kv_branches(hidden_states)
        kv = self.reshape(self.cast(kv, self.compute_dtype), (seq_len, bs, self.kv_num_heads, 4 * self.head_dim))
        kv = self.split_kv_branches(kv, (self.head_dim,) * 4, -1)
        pairs = []
        for i in (0, 2):
            key, value = kv[i], kv[i + 1]
            if self.k_layernorm is not None:
                key = self.k_layernorm(key)
            if not self.is_nope_layer and rotary_pos_emb is not None:
                key = self.apply_rotary_pos_emb(key, rotary_pos_emb)
            pairs.append((self.sbh2tnd(key, self.kv_num_heads), self.sbh2tnd(value, self.kv_num_heads)))
        return pairs

    @staticmethod
    def _segment_ends(actual_seq_len, seq_len, bs):
        """The core's :class:`~nsa_layers.layout.PrefixSums` over the ``B*S`` tokens: the fed ends
        (which ``NSAQwen3ForCausalLM`` checks once per step) plus every row end, in any order, so that
        documents stay inside their rows whatever is fed."""
        row_ends = ops.arange(1, bs + 1, dtype=ms.int32) * seq_len
        if actual_seq_len is None:
            return known_prefix_sums(row_ends)
        return known_prefix_sums(ops.cat((actual_seq_len.reshape(-1).astype(ms.int32), row_ends)))


class GPTNSASelfAttention(_NSAHostAttention, SelfAttention):
    """NSA self-attention for MindFormers' ``GPTModel`` (interleaved ``linear_qkv`` layout, Qwen3's).

    Built from :class:`NSASelfAttentionSubmodules` (see :func:`~nsa_layers.mindformers.get_nsa_layer_spec`):
    ``linear_qkv``, ``q_layernorm``, ``k_layernorm`` and ``linear_proj`` as in MindFormers' ``SelfAttention``
    (same parameter names), ``gate`` (:class:`~nsa_layers.NSAGate`), ``core_attention``
    (:class:`NSACoreAttention`), and with ``nsa_independent_kv`` a ``linear_kv_branches`` projection.

    Inputs: ``hidden_states (S, B, hidden)``, ``attention_mask`` (ignored), ``rotary_pos_emb``,
    ``actual_seq_len`` (1-D int prefix sums over the flattened ``B*S`` tokens, or None). Output:
    ``(S, B, hidden)`` in the input dtype, and the projection bias (None).
    """


class GPTNSASelfAttentionContiguous(_NSAHostAttention, SelfAttentionContiguous):
    """:class:`GPTNSASelfAttention` for ``use_contiguous_weight_layout_attention: True`` ([Q; K; V] weights)."""
