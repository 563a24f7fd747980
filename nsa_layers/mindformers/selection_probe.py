"""Look inside a built NSA model: which key blocks a layer's selection branch picks."""

from mindspore import nn

__all__ = ["LayerSelection"]


class LayerSelection(nn.Cell):
    """The selection of one NSA layer of an :class:`NSAQwen3ForCausalLM` (graph mode, like the model).

    Runs the embedding and the layers before ``layer_index``, then that layer's input norm and its
    attention's :meth:`~GPTNSASelfAttention.block_selection`.

    Args:
        model: a built ``NSAQwen3ForCausalLM``.
        layer_index (int): which decoder layer.

    Inputs:
        input_ids (Tensor): ``(B, S)`` int32.
        position_ids (Tensor, optional): ``(B, S)``; used when the model resets positions (``use_eod_reset``).
        actual_seq_len (Tensor, optional): prefix sums over the ``B*S`` tokens, as the model takes them.

    Outputs:
        ``(blocks, valid)``, each ``(B*S, Hkv, n)``: in-document selection-block indices (int32) and
        whether each slot is used (bool); rows are B-major.
    """

    def __init__(self, model, layer_index=0):
        super().__init__(auto_prefix=False)
        self.gpt = model.model
        if not 0 <= layer_index < len(self.gpt.decoder.layers):
            raise ValueError(f"LayerSelection: layer_index must be in [0, {len(self.gpt.decoder.layers)}), "
                             f"got {layer_index}.")
        self.layer_index = layer_index

    def construct(self, input_ids, position_ids=None, actual_seq_len=None):
        gpt = self.gpt
        if not gpt.config.use_eod_reset:
            position_ids = None
        if actual_seq_len is not None:
            actual_seq_len = actual_seq_len.reshape(-1)
        hidden = gpt.embedding(input_ids, position_ids)
        rotary = None
        if gpt.use_rotary_position_embeddings:
            rotary = gpt.rotary_pos_emb(input_ids.shape[1], position_ids=position_ids)
        for index in range(self.layer_index):
            hidden = gpt.decoder.layers[index](hidden, None, rotary_pos_emb=rotary, actual_seq_len=actual_seq_len)[0]
        layer = gpt.decoder.layers[self.layer_index]
        return layer.self_attention.block_selection(layer.input_layernorm(hidden), rotary, actual_seq_len)
