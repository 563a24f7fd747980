"""Generation for ``NSAQwen3ForCausalLM`` through MindFormers' own ``generate`` (its
``GenerationConfig``: ``max_new_tokens``, ``do_sample``, ``top_k``, ``top_p``, ``temperature``, EOS),
with the NSA cache or without it.

MindFormers' generation loop calls the model's ``forward`` once per new token with the whole padded
``(B, S)`` batch; a training-graph model recomputes every row each time (the cache-free path, kept
as the reference). With the cache, the first call prefills each row's prompt (packed, ``B`` cache
slots) and every later call feeds only each unfinished row's newest token: the embedding, MindFormers'
own decoder block (each ``GPTNSASelfAttention`` gets a decode request in place of the prefix sums and
runs ``NSAPrefill`` / ``NSADecodeStep`` on its layer's cache) and the output layer, compiled as
one graph per prompt length and per number of unfinished rows.
"""

import contextlib
import time

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from ..decoder import NSADecoder
from ..packing import token_positions
from .attention import prefill_request, step_request

__all__ = ["CachedGeneration"]


class _CachedForward(nn.Cell):
    """Logits ``(T, vocab)`` float32 of ``T`` new tokens ``input_ids (1, T)`` whose rotary rows
    ``(T, 1, 1, D)`` are given; ``request`` (a ``PrefillRequest`` or ``StepRequest``) tells every NSA
    attention what to do with its cache."""

    def __init__(self, gpt):
        super().__init__(auto_prefix=False)
        self.gpt = gpt

    def construct(self, input_ids, rotary, request):
        hidden = self.gpt.embedding(input_ids, None)
        # the decoder block takes rotary embeddings as (freqs, mscale), as GPTModel's rotary_pos_emb gives them
        hidden = self.gpt.decoder(hidden, None, (rotary, self.gpt.rotary_pos_emb.mscale), None, request)[0]
        weight = self.gpt.shared_embedding_or_output_weight() if self.gpt.share_embeddings_and_output_weights \
            else None
        logits = self.gpt.output_layer(hidden, weight)[0]
        return logits.reshape(-1, logits.shape[-1]).astype(ms.float32)


class _CacheSession:
    """One layer's :class:`~nsa_layers.decoder.NSADecoder` per NSA attention for ``batch`` rows of up
    to ``max_len`` tokens; :meth:`attached` lends their cells to the attentions while a generation runs."""

    def __init__(self, model, batch, max_len):
        self.attentions = [layer.self_attention for layer in model.model.decoder.layers]
        self.decoders = [NSADecoder(attention.core_attention, batch, max_len, name=f"nsa_cache.layer{i}")
                         for i, attention in enumerate(self.attentions)]
        self.forward = model.nsa_cached_forward()
        rotary = model.model.rotary_pos_emb(max_len)
        self.rotary = (rotary[0] if isinstance(rotary, tuple) else rotary).asnumpy()  # (max_len, 1, 1, D)
        self.lengths = None
        self.timing = None
        self.start()

    def start(self):
        """A new generation: every row's slot is refilled by its prefill."""
        self.lengths = None  # host copy of the tokens each row has in the cache
        self.timing = {"prefill_s": 0.0, "steps": 0, "step_s": 0.0, "first_step_s": 0.0}

    @contextlib.contextmanager
    def attached(self):
        """A new generation (:meth:`start`) with every attention's decode requests going to its layer's
        cache cells, detached on the way out whatever happens."""
        self.start()
        for attention, decoder in zip(self.attentions, self.decoders):
            attention.attach_decode_cells(decoder.prefill_cell, decoder.step_cell)
        try:
            yield self
        finally:
            for attention in self.attentions:
                attention.attach_decode_cells(None, None)

    def logits(self, input_ids, valid_length):
        """``(B, vocab)`` next-token logits of every row (zeros for finished rows) from the padded
        ``input_ids (B, S)`` and each row's valid length, as MindFormers' loop gives them."""
        valid_length = np.asarray(valid_length, np.int64).reshape(-1)
        batch = valid_length.shape[0]
        first = self.lengths is None
        if first:  # prefill every prompt into its row's slot
            counts = valid_length
            tokens = np.concatenate([input_ids[b, :valid_length[b]] for b in range(batch)])
            positions = token_positions(np.cumsum(valid_length))
            ends, slots = self.decoders[0].check_prefill(tokens.size, np.cumsum(valid_length), np.arange(batch))
            request = prefill_request(ends, slots)
        else:  # one new token for each row whose valid length grew (finished rows stay)
            counts = valid_length - self.lengths
            active = np.flatnonzero(counts)
            tokens = input_ids[active, valid_length[active] - 1]
            positions = self.lengths[active]
            request = step_request(self.decoders[0].check_step(tokens.size, counts))
        start = time.perf_counter()
        logits = self.forward(Tensor(tokens.reshape(1, -1).astype(np.int32)), Tensor(self.rotary[positions]),
                              ms.mutable(request)).asnumpy()
        seconds = time.perf_counter() - start
        if first:
            self.timing["prefill_s"] = seconds
        else:
            self.timing["first_step_s"] = self.timing["first_step_s"] or seconds
            self.timing["steps"] += 1
            self.timing["step_s"] += seconds
        self.lengths = valid_length.copy()
        last = np.cumsum(counts) - 1
        rows = np.zeros((batch, logits.shape[1]), np.float32)
        rows[counts > 0] = logits[last[counts > 0]]
        return Tensor(rows)


class CachedGeneration:
    """The generation hooks of :class:`~nsa_layers.mindformers.NSAQwen3ForCausalLM` (a mixin placed
    before MindFormers' model class).

    ``model.generate(...)`` is MindFormers' (same arguments, same outputs); set ``model.nsa_cache =
    False`` for the cache-free path. The cache holds ``seq_length`` tokens per row (MindFormers'
    loop never lets a row reach it); a finished row takes no more tokens. The cache-free path gets
    the ``position_ids`` MindFormers' ``use_eod_reset`` needs (each row one document from position 0).
    After a cached generation, ``nsa_generation_timing`` holds its wall-clock seconds: ``prefill_s``,
    ``steps``, ``step_s`` (all steps) and ``first_step_s`` (the first, which compiles the step graph).
    """

    nsa_cache = True

    def generate(self, input_ids, *args, **kwargs):
        """MindFormers' ``GenerationMixin.generate``, with the NSA cache when ``nsa_cache``."""
        if not self.nsa_cache:
            return super().generate(input_ids, *args, **kwargs)
        session = self.nsa_cache_session(np.asarray(input_ids).shape[0])
        with session.attached():
            self._nsa_session = session  # pylint: disable=attribute-defined-outside-init
            try:
                return super().generate(input_ids, *args, **kwargs)
            finally:
                self._nsa_session = None  # pylint: disable=attribute-defined-outside-init
                self.nsa_generation_timing = session.timing  # pylint: disable=attribute-defined-outside-init

    def forward(self, input_ids, valid_length_each_example, *args, **kwargs):
        """MindFormers' per-token ``forward``: ``(logits, current_index)``; with the cache, one
        ``(B, vocab)`` row per example."""
        session = getattr(self, "_nsa_session", None)
        if session is None:
            return super().forward(input_ids, valid_length_each_example, *args, **kwargs)
        input_ids = np.reshape(input_ids, (-1, np.shape(input_ids)[-1]))
        logits = session.logits(input_ids, valid_length_each_example)
        return logits, np.arange(input_ids.shape[0])

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        """MindFormers' inputs plus, with ``use_eod_reset``, positions ``0 .. S - 1`` on every row."""
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        if getattr(self.config, "use_eod_reset", False) and "position_ids" not in inputs:
            rows, length = inputs["input_ids"].shape
            inputs["position_ids"] = Tensor(np.tile(np.arange(length, dtype=np.int32), (rows, 1)))
        return inputs

    def nsa_cache_session(self, batch):
        """The caches for ``batch`` rows, made once and kept: a compiled graph holds the cache
        Parameters it was compiled with, so every generation of a batch size must use the same."""
        sessions = getattr(self, "_nsa_cache_sessions", None)
        if sessions is None:
            sessions = {}
            object.__setattr__(self, "_nsa_cache_sessions", sessions)
        if batch not in sessions:
            sessions[batch] = _CacheSession(self, batch, self.config.seq_length)
        return sessions[batch]

    def nsa_cached_forward(self):
        """The cell that runs new tokens through the model with the NSA caches (built once)."""
        if getattr(self, "_nsa_cached_forward", None) is None:
            object.__setattr__(self, "_nsa_cached_forward", _CachedForward(self.model))
        return self._nsa_cached_forward
