"""Packing tokenised documents into fixed-length rows, with the columns MindFormers' packed datasets
emit: ``input_ids``, ``labels``, ``loss_mask``, ``position_ids`` and ``actual_seq_len``.

Host-side NumPy; no MindFormers import. ``actual_seq_len`` follows MindFormers' packing
(``PackingHandler`` + ``create_compressed_eod_mask``): each row's document ends as prefix sums, no
leading 0, padded with ``seq_length``. :func:`batch_prefix_sums` then adds the row offsets, as
MindFormers' batching does, giving prefix sums over the flattened ``B*S`` tokens of a batch.
"""

import numpy as np

__all__ = ["pack_documents", "batch_rows", "batch_prefix_sums", "byte_tokens", "check_packed_rows",
           "check_packed_batch", "write_mindrecord"]

COLUMNS = ("input_ids", "labels", "loss_mask", "position_ids", "actual_seq_len")


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
        raise ValueError(f"pack_documents: max_segments must be >= 2 (documents + the padding), "
                         f"but got {max_segments}.")
    rows, row, ends = [], [], []

    def close_row():
        if row:
            rows.append((np.concatenate(row), list(ends)))
        row.clear()
        ends.clear()

    for i, doc in enumerate(documents):
        doc = np.asarray(doc)
        if doc.size and (not np.issubdtype(doc.dtype, np.integer) or doc.min() < 0):
            raise ValueError(f"pack_documents: document {i} must hold non-negative integer token ids, but got "
                             f"dtype {doc.dtype}" + (f", minimum {doc.min()}" if doc.size else "") + ".")
        doc = doc.astype(np.int32).reshape(-1)
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
    check_packed_rows(out)
    return out


def check_packed_rows(rows):
    """Check packed rows (:func:`pack_documents`' columns, as a MindFormers packed dataset stores
    them) for consistency, on the host; ``ValueError`` naming the row, the column, the value and the
    rule at the first violation.

    Rules, per row of ``S`` tokens: the ``(R, S)`` columns and ``actual_seq_len (R, E)`` are present
    with those shapes; ``actual_seq_len`` is non-decreasing with values in ``[0, S]`` (its segments,
    plus the rest of the row after its last value, are the row's documents); ``position_ids`` count
    ``0, 1, ...`` from each document's first token; ``loss_mask`` is 0 or 1, and 1 only where the
    label is the next token of the same document (so 0 on every document's last token).
    """
    missing = [key for key in COLUMNS if key not in rows]
    if missing:
        raise ValueError(f"check_packed_rows: missing columns {missing} (need {list(COLUMNS)}).")
    shape = np.shape(rows["input_ids"])
    if len(shape) != 2:
        raise ValueError(f"check_packed_rows: 'input_ids' must be (rows, seq_length), but got shape {shape}.")
    for key in ("labels", "loss_mask", "position_ids"):
        if np.shape(rows[key]) != shape:
            raise ValueError(f"check_packed_rows: '{key}' must have the shape of 'input_ids' {shape}, but got "
                             f"{np.shape(rows[key])}.")
    ends_all = np.asarray(rows["actual_seq_len"])
    if ends_all.ndim != 2 or ends_all.shape[0] != shape[0]:
        raise ValueError(f"check_packed_rows: 'actual_seq_len' must be (rows, segments) with {shape[0]} rows, but "
                         f"got shape {ends_all.shape}.")
    seq_length = shape[1]
    ids, labels = np.asarray(rows["input_ids"]), np.asarray(rows["labels"])
    mask, positions = np.asarray(rows["loss_mask"]), np.asarray(rows["position_ids"])
    for r in range(shape[0]):
        ends = ends_all[r]
        where = f"check_packed_rows: row {r}, column"
        if ends.size and (ends.min() < 0 or ends.max() > seq_length or np.any(np.diff(ends) < 0)):
            raise ValueError(f"{where} 'actual_seq_len': {ends.tolist()} must be non-decreasing with values in "
                             f"[0, {seq_length}].")
        starts = np.zeros(seq_length, np.int64)  # each token's document start
        bounds = np.unique(np.concatenate((ends[(ends > 0) & (ends < seq_length)], [seq_length])))
        first = 0
        for end in bounds:
            starts[first:end] = first
            first = end
        expected = np.arange(seq_length) - starts
        bad = np.flatnonzero(positions[r] != expected)
        if bad.size:
            t = int(bad[0])
            raise ValueError(f"{where} 'position_ids': token {t} has position {positions[r, t]}, but its document "
                             f"starts at token {starts[t]} (position {expected[t]}; actual_seq_len {ends.tolist()}).")
        bad = np.flatnonzero((mask[r] != 0) & (mask[r] != 1))
        if bad.size:
            raise ValueError(f"{where} 'loss_mask': token {int(bad[0])} has {mask[r, bad[0]]}, which is not 0 or 1.")
        next_same = np.zeros(seq_length, bool)  # token t + 1 is in t's document
        next_same[:-1] = starts[1:] == starts[:-1]
        next_ids = np.append(ids[r, 1:], -1)
        bad = np.flatnonzero((mask[r] == 1) & ~(next_same & (labels[r] == next_ids)))
        if bad.size:
            t = int(bad[0])
            reason = "the last token of its document" if not next_same[t] else \
                f"label {labels[r, t]} is not the next token {next_ids[t]}"
            raise ValueError(f"{where} 'loss_mask': token {t} is trained on ({reason}); loss_mask must be 1 only "
                             f"where the label is the next token of the same document.")


def batch_rows(rows, take):
    """Rows ``take`` of :func:`pack_documents`' output as one batch in the layout the model reads: the
    ``(B, S)`` columns as they are, ``actual_seq_len`` as ``(B*E,)`` prefix sums over the flattened
    batch (:func:`batch_prefix_sums`). NumPy arrays, keyed like the columns."""
    take = list(take)
    check_packed_rows({key: value[take] for key, value in rows.items()})
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


def check_packed_batch(batch):
    """Check one batch as MindFormers' packed dataset gives it to the model, on the host: the ``(B, S)``
    columns of :func:`check_packed_rows` and ``actual_seq_len`` (``(B, E)`` or ``(B*E,)``) as prefix
    sums over the flattened ``B*S`` tokens (row ``b``'s ends offset by ``b * S``, as
    :func:`batch_prefix_sums` and MindFormers' ``asl_batch_wrapper`` make them). ``ValueError`` naming
    the row, the column, the value and the rule at the first violation (then :func:`check_packed_rows`'
    rules, on the rows' own ends).
    """
    if "input_ids" not in batch or "actual_seq_len" not in batch:
        raise ValueError(f"check_packed_batch: missing columns (need {list(COLUMNS)}), got {sorted(batch)}.")
    count, seq_length = np.shape(batch["input_ids"])
    ends = np.asarray(batch["actual_seq_len"], np.int64)
    if ends.size % max(count, 1):
        raise ValueError(f"check_packed_batch: 'actual_seq_len' must hold the same number of ends for each of the "
                         f"{count} rows, but got shape {ends.shape}.")
    ends = ends.reshape(count, -1)
    for r in range(count):
        low, high = r * seq_length, (r + 1) * seq_length
        outside = np.flatnonzero((ends[r] < low) | (ends[r] > high))
        if outside.size:
            raise ValueError(f"check_packed_batch: row {r}, column 'actual_seq_len': {int(ends[r, outside[0]])} is "
                             f"outside [{low}, {high}]; a batch's ends are prefix sums over its flattened B*S tokens, "
                             f"row {r}'s offset by {r}*S (row ends {ends[r].tolist()}; rows' own ends need the offsets "
                             f"MindFormers' batching adds, see nsa_layers.mindformers.PackedMindRecordLoader).")
    rows = {key: np.asarray(batch[key]) for key in COLUMNS if key in batch}
    rows["actual_seq_len"] = ends - np.arange(count)[:, None] * seq_length
    check_packed_rows(rows)


def write_mindrecord(rows, path):
    """Write packed rows (:func:`pack_documents`' columns, checked first) as one MindRecord file
    ``path`` (and its ``.db`` index), replacing them if present; each row one sample, each column a
    1-D int32 (``loss_mask`` float32) field. Returns ``path``."""
    from mindspore.mindrecord import FileWriter

    check_packed_rows(rows)
    writer = FileWriter(path, shard_num=1, overwrite=True)
    writer.add_schema({key: {"type": "float32" if key == "loss_mask" else "int32", "shape": [-1]}
                       for key in COLUMNS}, "nsa packed rows")
    count = rows["input_ids"].shape[0]
    writer.write_raw_data([{key: np.asarray(rows[key][r], np.float32 if key == "loss_mask" else np.int32)
                            for key in COLUMNS} for r in range(count)])
    writer.commit()
    return path
