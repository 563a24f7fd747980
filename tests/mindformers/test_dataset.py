"""Packed MindRecord rows through MindFormers' own dataset (``CausalLanguageModelDataset`` built from the
tiny YAML's ``train_dataset``) and the callbacks' host-side checks; no graph is compiled."""

from types import SimpleNamespace

import numpy as np
import pytest

from helpers.mindformers import packed_rows, tiny_config
from nsa_layers.data import batch_rows, write_mindrecord

DOCS = [[30, 34], [20, 44], [64], [10, 54], [5, 59], [64]]


def _dataset(data_dir, **loader_changes):
    from mindformers.dataset import CausalLanguageModelDataset

    import nsa_layers.mindformers  # noqa: F401  (registers PackedMindRecordLoader)

    yaml = tiny_config()
    config = yaml.train_dataset
    config.micro_batch_num = yaml.parallel_config.micro_batch_num  # what the Trainer adds
    config.data_loader.dataset_dir = str(data_dir)
    for key, value in loader_changes.items():
        if value is None:
            config.data_loader.pop(key)
        else:
            config.data_loader[key] = value
    return CausalLanguageModelDataset(config)


def test_mindformers_batches_the_rows_with_global_prefix_sums(tmp_path):
    """What the model receives is what ``batch_rows`` builds: MindFormers adds the row offsets."""
    rows = packed_rows(np.random.default_rng(0), 64, DOCS)
    write_mindrecord(rows, str(tmp_path / "train.mindrecord"))
    batches = list(_dataset(tmp_path).create_dict_iterator(num_epochs=1, output_numpy=True))
    assert len(batches) == rows["input_ids"].shape[0] // 2
    for i, got in enumerate(batches):
        expected = batch_rows(rows, [2 * i, 2 * i + 1])
        for key, value in expected.items():
            np.testing.assert_array_equal(got[key].reshape(value.shape), value, err_msg=key)


def test_loader_refuses_a_config_that_would_mix_documents_up(tmp_path):
    write_mindrecord(packed_rows(np.random.default_rng(1), 64, DOCS[:2]), str(tmp_path / "train.mindrecord"))
    with pytest.raises(ValueError, match="'create_compressed_eod_mask' must be True"):
        _dataset(tmp_path, create_compressed_eod_mask=None)
    with pytest.raises(FileNotFoundError, match="no \\*.mindrecord file in dataset_dir"):
        _dataset(tmp_path / "missing")


def _run_context(dataset):
    params = SimpleNamespace(train_dataset=dataset)
    return SimpleNamespace(original_args=lambda: params)


def test_first_batch_check_passes_packed_batches_and_names_the_row_of_rows_own_ends(tmp_path):
    from nsa_layers.mindformers import PackedDataCheck

    rows = packed_rows(np.random.default_rng(2), 64, DOCS)
    write_mindrecord(rows, str(tmp_path / "train.mindrecord"))
    check = PackedDataCheck()
    check.on_train_begin(_run_context(_dataset(tmp_path)))
    assert check.checked["input_ids"] == (2, 64)
    # MindSpore's own MindDataset reads the same rows without the offsets
    plain = _dataset(tmp_path, type="MindDataset", create_compressed_eod_mask=None)
    with pytest.raises(ValueError, match=r"check_packed_batch: row 1, column 'actual_seq_len': 20 is outside "
                                         r"\[64, 128\]"):
        PackedDataCheck().on_train_begin(_run_context(plain))
