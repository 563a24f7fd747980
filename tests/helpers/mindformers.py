"""Helpers for the MindFormers adapter tests: the tiny YAML, scaled down for fast CPU tests."""

import contextlib
import io
from pathlib import Path

import mindspore as ms
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "configs" / "nsa_qwen3_tiny_cpu.yaml"
LARGE_YAML = ROOT / "configs" / "nsa_qwen3_1_7b_32k.yaml"
PARALLEL_YAML = ROOT / "configs" / "nsa_qwen3_8b_64k.yaml"

# the tiny YAML, smaller still: 64-token rows, NSA sizes that give several blocks per row
SMALL = dict(seq_length=64, max_position_embeddings=64, hidden_size=64, intermediate_size=128, head_dim=16,
             nsa_compress_block_size=8, nsa_compress_stride=4, nsa_select_block_size=8, nsa_select_block_count=4,
             nsa_window_size=16, nsa_query_chunk_size=32)


def tiny_config(**overrides):
    """The tiny YAML as a MindFormerConfig with ``SMALL`` and ``overrides`` applied to its model_config."""
    from mindformers.tools.register import MindFormerConfig

    cfg = MindFormerConfig(str(TINY_YAML))
    for key, value in {**SMALL, **overrides}.items():
        cfg.model.model_config[key] = value
    return cfg


def build(cfg):
    """Build the model through the registry (MindFormers' conversion table print is dropped)."""
    from mindformers.models.build_model import build_model

    import nsa_layers.mindformers  # noqa: F401

    with contextlib.redirect_stdout(io.StringIO()):
        return build_model(cfg.model)


def packed_rows(rng, seq_length, docs_per_row, pad_id=256):
    """Random byte documents packed into rows (nsa_layers.data), lengths given per row."""
    from nsa_layers.data import pack_documents

    docs = [rng.integers(0, 256, n).astype(np.int32) for row in docs_per_row for n in row]
    return pack_documents(docs, seq_length, max_segments=4, pad_id=pad_id)


def model_inputs(rows, take=None):
    """Model keyword inputs (MindSpore tensors) for rows ``take`` (all by default)."""
    from nsa_layers.data import batch_rows

    take = range(rows["input_ids"].shape[0]) if take is None else take
    return {key: ms.Tensor(value) for key, value in batch_rows(rows, take).items()}
