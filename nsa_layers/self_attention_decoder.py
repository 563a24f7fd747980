"""Decoding for one :class:`~nsa_layers.NSASelfAttention`: hidden states in, hidden states out,
through the :class:`~nsa_layers.decoder.NSADecoder` of its core."""

from mindspore import nn

from .decoder import NSADecoder
from .input_checks import check_float_input
from .layout import token_layout

__all__ = ["NSASelfAttentionDecoder"]


class _SelfAttentionPrefill(nn.Cell):
    """:class:`NSAPrefill` from hidden states: projections and rotary at in-sequence positions."""

    def __init__(self, attention, core_prefill):
        super().__init__(auto_prefix=False)
        self.attention = attention
        self.core_prefill = core_prefill

    def construct(self, hidden_states, actual_seq_len, slots):
        positions = token_layout(actual_seq_len, hidden_states.shape[0])[1]
        q, k, v, gates = self.attention.core_inputs(hidden_states, positions)
        out = self.core_prefill(q, k, v, gates, actual_seq_len, slots)[0]
        return self.attention.output(out, hidden_states.dtype)


class _SelfAttentionStep(nn.Cell):
    """:class:`NSADecodeStep` from hidden states: projections and rotary at the cache positions."""

    def __init__(self, attention, core_step):
        super().__init__(auto_prefix=False)
        self.attention = attention
        self.core_step = core_step

    def construct(self, hidden_states, counts):
        slot, position = self.core_step.positions(counts, hidden_states.shape[0])
        q, k, v, gates = self.attention.core_inputs(hidden_states, position)
        out = self.core_step.attend(q, k, v, gates, counts, slot, position)[0]
        return self.attention.output(out, hidden_states.dtype)


class NSASelfAttentionDecoder:
    """Decoding for one :class:`~nsa_layers.NSASelfAttention`: hidden states in, hidden states out,
    through an :class:`NSADecoder` of its core (same checks, same cache; the rotary hook sees each
    token's position in its sequence, as in training).

    Args:
        attention (NSASelfAttention): the layer.
        batch_slots, max_len, max_step_tokens, name: as :class:`NSADecoder`.
    """

    def __init__(self, attention, batch_slots, max_len, max_step_tokens=1, name=None):
        self.attention = attention
        self.core_decoder = NSADecoder(attention.core, batch_slots, max_len, max_step_tokens, name)
        self.cache = self.core_decoder.cache
        self.prefill_cell = _SelfAttentionPrefill(attention, self.core_decoder.prefill_cell)
        self.step_cell = _SelfAttentionStep(attention, self.core_decoder.step_cell)

    def prefill(self, hidden_states, actual_seq_len, slots):
        """``hidden_states (T, hidden)`` of new sequences (prefix sums and slots as
        :meth:`NSADecoder.prefill`) -> ``(T, hidden)``, what the layer gives on them."""
        self._check_hidden(hidden_states)
        ends, slot_ids = self.core_decoder.check_prefill(hidden_states.shape[0], actual_seq_len, slots)
        return self.prefill_cell(hidden_states, ends, slot_ids)

    def step(self, hidden_states, counts):
        """``hidden_states (Q, hidden)`` of new tokens, slot after slot (``counts`` as
        :meth:`NSADecoder.step`) -> ``(Q, hidden)``."""
        self._check_hidden(hidden_states)
        return self.step_cell(hidden_states, self.core_decoder.check_step(hidden_states.shape[0], counts))

    def lengths(self):
        """Tokens stored per slot, ``(B,)`` NumPy int32."""
        return self.cache.host_lengths()

    def _check_hidden(self, hidden_states):
        check_float_input("NSASelfAttentionDecoder", "hidden_states", hidden_states,
                          (("T", None), ("hidden_size", self.attention.config.hidden_size)))
