"""Packed rows in MindRecord files, read by MindFormers' own ``CausalLanguageModelDataset``.

MindFormers adds the row offsets that turn each row's document ends into prefix sums over the
flattened batch (its ``asl_batch_wrapper``) only when the data loader's config says
``create_compressed_eod_mask: True``, which its Megatron and Hugging Face loaders accept and
MindSpore's ``MindDataset`` refuses. :class:`PackedMindRecordLoader` is a ``MindDataset`` that
accepts it, so a YAML reads packed MindRecord rows the way MindFormers batches its other packed data.
"""

import glob
import os

import mindspore.dataset as ds
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

__all__ = ["PackedMindRecordLoader"]


@MindFormerRegister.register(MindFormerModuleType.DATASET_LOADER)
class PackedMindRecordLoader:
    """``MindDataset`` over the ``*.mindrecord`` files of ``dataset_dir`` (sorted), for a YAML's
    ``train_dataset.data_loader``::

        data_loader:
          type: PackedMindRecordLoader
          dataset_dir: ./data          # written by nsa_layers.data.write_mindrecord
          create_compressed_eod_mask: True
          shuffle: False

    Args:
        dataset_dir (str): a directory of MindRecord files, or one file.
        column_names (list[str]): the columns to read (MindFormers passes ``input_columns``); their
            last must be ``actual_seq_len``, which MindFormers' batching offsets.
        create_compressed_eod_mask (bool): must be True: it is the key that makes MindFormers add
            the row offsets (rows' own ends in a batch of several rows would mix documents up).
        shuffle (bool): shuffle the rows (MindSpore's global shuffle, seeded by the YAML's seed).
        num_samples (int, optional): read only this many rows.
        num_shards, shard_id (int, optional): data-parallel sharding, given by MindFormers.
        **unused: the other arguments MindFormers passes every loader (``batch_size``,
            ``num_parallel_workers``, ``python_multiprocessing``): batching is MindFormers'.

    Returns a ``mindspore.dataset.MindDataset``.
    """

    def __new__(cls, dataset_dir, column_names, create_compressed_eod_mask=False, shuffle=False, num_samples=None,
                num_shards=None, shard_id=None, **unused):
        if not create_compressed_eod_mask:
            raise ValueError("PackedMindRecordLoader: 'create_compressed_eod_mask' must be True (it makes MindFormers "
                             "offset each row's actual_seq_len in a batch), but got "
                             f"{create_compressed_eod_mask!r}.")
        if not column_names or column_names[-1] != "actual_seq_len":
            raise ValueError(f"PackedMindRecordLoader: the last input column must be 'actual_seq_len' (MindFormers "
                             f"offsets the last column), but got {column_names}.")
        files = [dataset_dir] if os.path.isfile(dataset_dir) else \
            sorted(glob.glob(os.path.join(dataset_dir, "**", "*.mindrecord"), recursive=True))
        if not files:
            raise FileNotFoundError(f"PackedMindRecordLoader: no *.mindrecord file in dataset_dir={dataset_dir!r}.")
        return ds.MindDataset(files, columns_list=list(column_names), shuffle=shuffle, num_samples=num_samples,
                              num_shards=num_shards, shard_id=shard_id)
