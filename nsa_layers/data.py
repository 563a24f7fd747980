"""Packing tokenised documents into fixed-length rows, with the columns MindFormers' packed datasets
emit: ``input_ids``, ``labels``, ``loss_mask``, ``position_ids`` and ``actual_seq_len``.

Host-side NumPy; no MindFormers import. ``actual_seq_len`` follows MindFormers' packing
(``PackingHandler`` + ``create_compressed_eod_mask``): each row's document ends as prefix sums, no
leading 0, padded with ``seq_length``. :func:`batch_prefix_sums` then adds the row offsets, as
MindFormers' batching does, giving prefix sums over the flattened ``B*S`` tokens of a batch.
"""

import numpy as np

__all__ = ["pack_documents", "batch_rows", "batch_prefix_sums", "byte_tokens"]


def byte_tokens(text):
    """Byte-level tokens of ``text`` (UTF-8), ``(L,)`` int32 in ``[0, 256)``."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def pack_documents(documents, seq_length, max_segments, pad_id):
    """Greedily pack documents, in order, into rows of ``seq_length`` tokens.

    A document that does not fit in the rest of a row fills it and continues, as a new segment, in
    the next row. A row also closes when it holds ``max_segments - 1`` documents, so that the last
    entry of its ``actual_seq_len`` is always ``seq_length``; its unused tail is padding (``pad_id``,
    ``loss_mask`` 0), a segment of its own. Every token's label is the next token
    of the same segment; a segment's last token has label ``pad_id`` and ``loss_mask`` 0, so no loss
    ever crosses a document boundary.

    Args:
        documents (iterable of 1-D int arrays): token ids; empty documents are skipped.
        seq_length (int): ``S``, tokens per row.
        max_segments (int): ``E >= 2``, the padded width of ``actual_seq_len`` (a row holds at most
            ``E - 1`` documents plus the padding segment, or ``E`` documents when they fill it exactly).
        pad_id (int): padding token and label.

    Returns:
        dict of arrays with ``R`` rows: ``input_ids``, ``labels``, ``position_ids`` ``(R, S)`` int32,
        ``loss_mask`` ``(R, S)`` float32, ``actual_seq_len`` ``(R, E)`` int32 (row-local ends, padded
        with ``S``).
    """
    if seq_length < 1:
        raise ValueError(f"pack_documents: seq_length must be >= 1, but got {seq_length}.")
    if max_segments < 2:
        raise ValueError(f"pack_documents: max_segments must be >= 2 (documents + the padding), but got {max_segments}.")
    rows, row, ends = [], [], []

    def close_row():
        if row:
            rows.append((np.concatenate(row), list(ends)))
        row.clear()
        ends.clear()

    for doc in documents:
        doc = np.asarray(doc, dtype=np.int32).reshape(-1)
        while doc.size:
            used = ends[-1] if ends else 0
            piece = doc[:seq_length - used]
            doc = doc[piece.size:]
            row.append(piece)
            ends.append(used + piece.size)
            if ends[-1] == seq_length or len(ends) == max_segments - 1:
                close_row()
    close_row()

    count = len(rows)
    out = {
        "input_ids": np.full((count, seq_length), pad_id, np.int32),
        "labels": np.full((count, seq_length), pad_id, np.int32),
        "loss_mask": np.zeros((count, seq_length), np.float32),
        "position_ids": np.zeros((count, seq_length), np.int32),
        "actual_seq_len": np.full((count, max_segments), seq_length, np.int32),
    }
    for r, (tokens, row_ends) in enumerate(rows):
        out["input_ids"][r, :tokens.size] = tokens
        out["actual_seq_len"][r, :len(row_ends)] = row_ends
        start = 0
        for end in row_ends:
            out["labels"][r, start:end - 1] = tokens[start + 1:end]
            out["loss_mask"][r, start:end - 1] = 1.0
            out["position_ids"][r, start:end] = np.arange(end - start)
            start = end
        out["position_ids"][r, start:] = np.arange(seq_length - start)
    return out


def batch_rows(rows, take):
    """Rows ``take`` of :func:`pack_documents`' output as one batch in the layout the model reads: the
    ``(B, S)`` columns as they are, ``actual_seq_len`` as ``(B*E,)`` prefix sums over the flattened
    batch (:func:`batch_prefix_sums`). NumPy arrays, keyed like the columns."""
    take = list(take)
    batch = {key: value[take] for key, value in rows.items() if key != "actual_seq_len"}
    batch["actual_seq_len"] = batch_prefix_sums(rows["actual_seq_len"][take], rows["input_ids"].shape[1])
    return batch


def batch_prefix_sums(actual_seq_len, seq_length):
    """Row-local prefix sums ``(B, E)`` of rows of ``seq_length`` tokens -> ``(B*E,)`` int32 prefix sums
    over the flattened batch: row ``b`` gets ``b * seq_length`` added, as MindFormers' batching
    (``asl_batch_wrapper``) does before the model reads them."""
    actual_seq_len = np.asarray(actual_seq_len, dtype=np.int64)
    offsets = np.arange(actual_seq_len.shape[0], dtype=np.int64)[:, None] * seq_length
    return (actual_seq_len + offsets).reshape(-1).astype(np.int32)
