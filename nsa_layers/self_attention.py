"""``NSASelfAttention``: hidden states in, hidden states out, with NSA as the attention."""

from mindspore import nn, ops

from .attention import NativeSparseAttention
from .gate import NSAGate
from .input_checks import check_float_input, check_position_ids
from .layout import positions_tensor, prefix_sums
from .precision import ComputeDense, precision_of

__all__ = ["NSASelfAttention"]


class NSASelfAttention(nn.Cell):
    """Q/K/V projections, an optional rotary hook, the gate, the NSA core and the output projection.

    With ``config.independent_kv`` the key and value projections produce one K/V per branch
    (compressed, selected, window), as the paper prescribes; otherwise one K/V shared by the three.

    Args:
        config (NSAConfig): sizes.
        rotary (Cell, optional): called as ``rotary(x, positions)`` on the queries ``(T, H, Dq)`` and on
            every key tensor ``(T, Hkv, Dq)`` before compression, with ``positions`` the in-segment
            positions (or ``position_ids`` when given); e.g. :class:`nsa_layers.RotaryEmbedding`.

    Inputs:
        hidden_states (Tensor): ``(T, hidden_size)`` packed tokens.
        actual_seq_len: keyword, prefix sums as MindFormers gives them (tuple/list/array/int Tensor),
            or ``None`` for one segment; checked as :class:`NativeSparseAttention` checks them.
        position_ids (Tensor, optional): keyword, ``(T,)`` positions for the rotary hook.

    Outputs:
        Tensor ``(T, hidden_size)`` in the dtype of ``hidden_states`` (empty for ``T = 0``, with zero
        gradients).
    """

    def __init__(self, config, rotary=None):
        super().__init__()
        self.config = config
        self.kv_sets = 3 if config.independent_kv else 1
        heads, kv_heads = config.num_heads, config.num_kv_heads
        precision = self.precision = precision_of(config)
        self.q_proj = ComputeDense(config.hidden_size, heads * config.head_dim, False, precision)
        self.k_proj = ComputeDense(config.hidden_size, self.kv_sets * kv_heads * config.head_dim, False, precision)
        self.v_proj = ComputeDense(config.hidden_size, self.kv_sets * kv_heads * config.v_head_dim, False, precision)
        self.gate = NSAGate(config.hidden_size, heads, precision)
        self.core = NativeSparseAttention(config, precision=precision)
        self.out_proj = ComputeDense(heads * config.v_head_dim, config.hidden_size, False, precision)
        self.rotary = rotary

    def construct(self, hidden_states, actual_seq_len=None, position_ids=None):
        cfg = self.config
        check_float_input("NSASelfAttention", "hidden_states", hidden_states, (("T", None),
                                                                              ("hidden_size", cfg.hidden_size)))
        total = hidden_states.shape[0]
        check_position_ids("NSASelfAttention", position_ids, total)
        sums = prefix_sums("NSASelfAttention", actual_seq_len, total)  # checked here, once
        if total == 0:  # no tokens: empty output, zero gradients (MindSpore's CPU MatMul leaves a product
            # over zero rows uninitialised, so the projections' weight gradients would be garbage)
            return ops.zeros((0, cfg.hidden_size), hidden_states.dtype)
        positions = None
        if self.rotary is not None:
            positions = position_ids.reshape(-1) if position_ids is not None else positions_tensor(sums, total)
        q, k, v, gates = self.core_inputs(hidden_states, positions)
        return self.output(self.core(q, k, v, gates, sums), hidden_states.dtype)

    def core_inputs(self, hidden_states, positions=None):
        """``(q, k, v, gates)`` for the core from ``hidden_states (T, hidden)``: projections, the gate,
        and the rotary hook at ``positions (T,)`` int32 (unused without a hook); ``k``/``v`` are
        3-tuples with independent K/V."""
        cfg = self.config
        total = hidden_states.shape[0]
        x = self.precision.hold(hidden_states)
        q = self.q_proj(x).reshape(total, cfg.num_heads, cfg.head_dim)
        # one (T, Hkv, D) per set: a split, not a strided slice k[:, i] (slow on CPU)
        keys = [part.reshape(total, cfg.num_kv_heads, cfg.head_dim)
                for part in ops.split(self.k_proj(x), cfg.num_kv_heads * cfg.head_dim, 1)]
        values = [part.reshape(total, cfg.num_kv_heads, cfg.v_head_dim)
                  for part in ops.split(self.v_proj(x), cfg.num_kv_heads * cfg.v_head_dim, 1)]
        if self.rotary is not None:  # its result rounded to the compute dtype, where it is stored
            q = self.precision.hold(self.rotary(q, positions))
            keys = [self.precision.hold(self.rotary(key, positions)) for key in keys]
        if self.kv_sets == 3:
            return q, tuple(keys), tuple(values), self.gate(x)
        return q, keys[0], values[0], self.gate(x)

    def output(self, out, dtype):
        """The core's ``(T, H, Dv)`` output through the output projection, ``(T, hidden)`` in ``dtype``."""
        cfg = self.config
        return self.out_proj(out.reshape(out.shape[0], cfg.num_heads * cfg.v_head_dim)).astype(dtype)
