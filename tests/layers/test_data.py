"""Packing documents into rows (nsa_layers.data): nothing lost, labels never cross a document."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsa_layers import packing
from nsa_layers.data import batch_prefix_sums, batch_rows, byte_tokens, pack_documents

PAD = 999


@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=12), seq_length=st.integers(1, 24),
       max_segments=st.integers(2, 5))
def test_packing_keeps_every_token_in_order_and_labels_inside_documents(lengths, seq_length, max_segments):
    rng = np.random.default_rng(sum(lengths) + seq_length)
    docs = [rng.integers(0, 256, n).astype(np.int32) for n in lengths]
    rows = pack_documents(docs, seq_length, max_segments, PAD)
    if not sum(lengths):
        assert rows["input_ids"].shape == (0, seq_length)
        return
    ids, labels, mask = rows["input_ids"], rows["labels"], rows["loss_mask"]
    asl, pos = rows["actual_seq_len"], rows["position_ids"]
    assert ids.shape == labels.shape == mask.shape == pos.shape and asl.shape == (ids.shape[0], max_segments)
    segments = []
    for r in range(ids.shape[0]):
        ends = packing.normalize_prefix_sums(tuple(asl[r].tolist()), seq_length)  # valid MindFormers prefix sums
        assert np.all(np.diff(asl[r]) >= 0) and asl[r, -1] == seq_length
        start = 0
        for end in ends:
            seg = ids[r, start:end]
            np.testing.assert_array_equal(pos[r, start:end], np.arange(end - start))
            np.testing.assert_array_equal(labels[r, start:end - 1], seg[1:])
            assert mask[r, end - 1] == 0 and np.all(mask[r, start:end - 1] == (seg[1:] != PAD))
            segments.append(seg)
            start = end
    real = np.concatenate(segments)
    np.testing.assert_array_equal(real[real != PAD], np.concatenate(docs))  # nothing lost or reordered


def test_bad_sizes_are_rejected_by_name():
    import pytest

    with pytest.raises(ValueError, match="max_segments must be >= 2"):
        pack_documents([np.arange(3)], 4, 1, PAD)
    with pytest.raises(ValueError, match="seq_length must be >= 1, but got 0"):
        pack_documents([np.arange(3)], 0, 2, PAD)


def test_hand_packed_example():
    rows = pack_documents([np.arange(1, 6), np.arange(10, 13), np.arange(20, 30)], 8, 3, PAD)
    np.testing.assert_array_equal(rows["input_ids"], [[1, 2, 3, 4, 5, 10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27],
                                                      [28, 29] + [PAD] * 6])
    np.testing.assert_array_equal(rows["actual_seq_len"], [[5, 8, 8], [8, 8, 8], [2, 8, 8]])
    np.testing.assert_array_equal(rows["labels"][0], [2, 3, 4, 5, PAD, 11, 12, PAD])
    np.testing.assert_array_equal(rows["position_ids"][2], [0, 1, 0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(batch_prefix_sums(rows["actual_seq_len"], 8), [5, 8, 8, 16, 16, 16, 18, 24, 24])
    np.testing.assert_array_equal(byte_tokens("aé"), [97, 195, 169])
    batch = batch_rows(rows, [2, 0])
    np.testing.assert_array_equal(batch["actual_seq_len"], [2, 8, 8, 13, 16, 16])
    np.testing.assert_array_equal(batch["input_ids"], rows["input_ids"][[2, 0]])
    np.testing.assert_array_equal(batch["labels"][1], rows["labels"][0])


def _corrupt(rows, kind, rng):
    """A copy of ``rows`` with one inconsistency of ``kind`` in a random row: ``(rows, row, column)``."""
    rows = {key: value.copy() for key, value in rows.items()}
    count, seq_length = rows["input_ids"].shape
    r = int(rng.integers(0, count))
    if kind == "position":
        t = int(rng.integers(0, seq_length))
        rows["position_ids"][r, t] += int(rng.choice([-1, 1, 5]))
        return rows, r, "position_ids"
    if kind == "boundary_loss":  # train across a document's end, on the next document's first token
        end = int(rows["actual_seq_len"][r, 0])
        rows["loss_mask"][r, end - 1] = 1.0
        if end < seq_length:
            rows["labels"][r, end - 1] = rows["input_ids"][r, end]
        return rows, r, "loss_mask"
    if kind == "label":
        trained = np.flatnonzero(rows["loss_mask"][r])
        if not trained.size:
            return _corrupt(rows, "position", rng)
        t = int(rng.choice(trained))
        rows["labels"][r, t] += 1
        return rows, r, "loss_mask"
    if kind == "mask_value":
        rows["loss_mask"][r, int(rng.integers(0, seq_length))] = 0.5
        return rows, r, "loss_mask"
    ends = rows["actual_seq_len"][r]
    if kind == "ends_order":  # a later end before an earlier one
        ends[0], ends[-1] = seq_length, seq_length - 1
    else:  # ends_range
        ends[-1] = seq_length + 1
    return rows, r, "actual_seq_len"


@pytest.mark.parametrize("kind", ["position", "boundary_loss", "label", "mask_value", "ends_order", "ends_range"])
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=8), seq_length=st.integers(2, 16),
       seed=st.integers(0, 1000))
def test_check_packed_rows_names_the_row_and_column_of_any_inconsistency(kind, lengths, seq_length, seed):
    from nsa_layers.data import check_packed_rows

    rng = np.random.default_rng(seed)
    rows = pack_documents([rng.integers(0, 256, n) for n in lengths], seq_length, 3, PAD)
    check_packed_rows(rows)  # what pack_documents made is consistent
    bad, r, column = _corrupt(rows, kind, rng)
    with pytest.raises(ValueError, match=rf"row {r}, column '{column}'"):
        check_packed_rows(bad)
    with pytest.raises(ValueError, match=rf"row 0, column '{column}'"):
        batch_rows(bad, [r])  # a batch is checked before it is built


def test_pack_documents_refuses_non_token_documents():
    import pytest

    with pytest.raises(ValueError, match="document 1 must hold non-negative integer token ids"):
        pack_documents([np.arange(3), np.array([1.5, 2.0])], 4, 2, PAD)
    with pytest.raises(ValueError, match="document 0 must hold non-negative integer token ids.*minimum -2"):
        pack_documents([np.array([3, -2])], 4, 2, PAD)


@pytest.mark.parametrize("kind", ["position", "boundary_loss", "label", "mask_value", "ends_order", "ends_range"])
@given(lengths=st.lists(st.integers(1, 30), min_size=2, max_size=8), seq_length=st.integers(2, 16),
       seed=st.integers(0, 1000))
def test_check_packed_batch_takes_global_ends_and_names_the_row_of_any_inconsistency(kind, lengths, seq_length,
                                                                                     seed):
    """A batch as MindFormers gives it (ends over the flattened B*S tokens) passes when consistent; a
    corrupted row is named (a row's own ends out of order or range fall outside the row's span)."""
    from nsa_layers.data import check_packed_batch

    rng = np.random.default_rng(seed)
    rows = pack_documents([rng.integers(0, 256, n) for n in lengths], seq_length, 3, PAD)
    take = list(range(rows["input_ids"].shape[0]))
    check_packed_batch(batch_rows(rows, take))
    bad, r, column = _corrupt(rows, kind, rng)
    batch = {key: value for key, value in bad.items() if key != "actual_seq_len"}
    batch["actual_seq_len"] = batch_prefix_sums(bad["actual_seq_len"], seq_length).reshape(len(take), -1)
    with pytest.raises(ValueError, match=rf"row {r}, column '{column}'"):
        check_packed_batch(batch)


def test_check_packed_batch_refuses_rows_own_ends_in_a_batch_of_several():
    from nsa_layers.data import check_packed_batch

    rows = pack_documents([np.arange(5), np.arange(9), np.arange(4), np.arange(6)], 8, 3, PAD)
    assert rows["input_ids"].shape[0] >= 2
    with pytest.raises(ValueError, match=r"row 1, column 'actual_seq_len': \d+ is outside \[8, 16\]; a batch's ends "
                                         r"are prefix sums over its flattened B\*S tokens"):
        check_packed_batch(rows)  # the rows' own ends, as a plain MindDataset gives them
    check_packed_batch({key: value[:1] for key, value in rows.items()})  # one row: its own ends are global


def test_write_mindrecord_round_trip(tmp_path):
    """The MindRecord file holds the rows exactly (MindSpore's MindDataset reads them back); bad rows
    are refused before anything is written."""
    import mindspore.dataset as ds

    from nsa_layers.data import COLUMNS, write_mindrecord

    rng = np.random.default_rng(4)
    rows = pack_documents([rng.integers(0, 256, n) for n in (7, 20, 3, 12)], 16, 3, PAD)
    path = write_mindrecord(rows, str(tmp_path / "rows.mindrecord"))
    read = list(ds.MindDataset(path, columns_list=list(COLUMNS), shuffle=False).create_dict_iterator(output_numpy=True))
    assert len(read) == rows["input_ids"].shape[0]
    for r, sample in enumerate(read):
        for key in COLUMNS:
            assert sample[key].dtype == rows[key].dtype
            np.testing.assert_array_equal(sample[key], rows[key][r])
    bad, r, column = _corrupt(rows, "label", rng)
    with pytest.raises(ValueError, match=rf"row {r}, column '{column}'"):
        write_mindrecord(bad, str(tmp_path / "bad.mindrecord"))
    assert not (tmp_path / "bad.mindrecord").exists()
