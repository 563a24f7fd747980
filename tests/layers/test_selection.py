"""Block selection rules, each pinned by a small hand-computed case; config validation."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from helpers.nsa_cases import small_config
from nsa_layers import BlockSelector, NSAConfig
from nsa_layers.ops.compress_attention import kernel_importance_weights
from nsa_layers.selection import overlap_weights


def _paper(**changes):
    values = dict(hidden_size=64, num_heads=2, num_kv_heads=1, head_dim=16, v_head_dim=16)
    values.update(changes)
    return NSAConfig(**values)


def test_overlap_weights_are_the_paper_equation_read_one_based():
    # block 32, stride 16, selection 64: windows 4j-1 .. 4j+3 weighted (1, 2, 2, 2, 1)
    assert overlap_weights(32, 16, 64) == [(-1, 1), (0, 2), (1, 2), (2, 2), (3, 1)]
    # compression block == selection block == stride: p_slc = p_cmp
    assert overlap_weights(64, 64, 64) == [(0, 1)]


def _importance(cfg, probs_by_window, num_blocks):
    """Importance of one query (1 KV head, 1 query head) whose segment starts at slot 0."""
    probs = Tensor(np.asarray(probs_by_window, np.float32).reshape(1, 1, 1, -1))
    return BlockSelector(cfg).importance(probs, Tensor(np.array([0], np.int32)), num_blocks).asnumpy()[0, 0]


@pytest.mark.parametrize("window,expected", [
    (0, [2, 0, 0]),   # tokens 0..31: block 0 only
    (3, [1, 1, 0]),   # tokens 48..79: 16 in block 0, 16 in block 1
    (4, [0, 2, 0]),   # tokens 64..95
    (7, [0, 1, 1]),   # tokens 112..143
])
def test_importance_is_exact_token_overlap(window, expected):
    probs = np.zeros(12)
    probs[window] = 1.0
    np.testing.assert_array_equal(_importance(_paper(), probs, 3), expected)


def test_kernel_convention_is_one_window_later_than_exact_overlap():
    """nsa_compress_attention's mapping weights window c for block t as the exact overlap weights
    window c - 1: prepending one masked compressed key lines the kernel up with the exact rule."""
    for block, stride, select in ((32, 16, 64), (16, 16, 64), (48, 16, 96), (64, 32, 64)):
        cfg = _paper(compress_block_size=block, compress_stride=stride, select_block_size=select,
                     select_block_count=3)
        windows = 15
        n_sel = -(-windows // (select // stride))
        exact = np.stack([_importance(cfg, np.eye(windows)[c], n_sel) for c in range(windows)])
        kernel = kernel_importance_weights(windows + 1, block, stride, select)
        np.testing.assert_array_equal(kernel[1:, :n_sel], exact, err_msg=str((block, stride, select)))


def _select(cfg, importance_rows, positions):
    """Selection for queries at ``positions`` of one segment whose block importance is given."""
    importance_rows = np.asarray(importance_rows, np.float32)
    rows, blocks = importance_rows.shape
    selector = BlockSelector(cfg)
    selector.importance = lambda probs, first, num: Tensor(importance_rows.reshape(1, rows, blocks))
    probs = Tensor(np.zeros((1, 1, rows, 4), np.float32))
    order, valid = selector(probs, Tensor(np.zeros(rows, np.int32)), Tensor(np.asarray(positions, np.int32)), blocks)
    return [[int(b) for b, ok in zip(o, v) if ok] for o, v in zip(order.asnumpy()[0], valid.asnumpy()[0])]


def test_forced_initial_and_local_blocks_then_best_scores_ties_to_lower_index():
    cfg = _paper(select_block_count=5)  # 1 initial + 2 local forced, 2 free slots
    scores = [0.0, 0.5, 0.9, 0.5, 0.5, 0.1, 0.0, 0.0]
    # a query in block 6 (position 400): forced 0, 5, 6; then 2 (0.9), then 1 (tie 1/3/4 -> lowest)
    assert _select(cfg, [scores], [400]) == [[0, 5, 6, 2, 1]]


def test_never_a_future_block_and_empty_slots_stay_empty():
    cfg = _paper(select_block_count=4)
    scores = [[0.1, 0.2, 9.0, 9.0]] * 3
    # position 10 (block 0): only block 0 exists so far; position 70 (block 1): blocks 0, 1;
    # position 130 (block 2): three blocks, block 3 (score 9) lies in the future
    assert _select(cfg, scores, [10, 70, 130]) == [[0], [0, 1], [0, 1, 2]]


def test_no_initial_block_forced_when_configured_off():
    cfg = _paper(select_block_count=2, num_init_blocks=0, num_local_blocks=1)
    assert _select(cfg, [[0.1, 0.7, 0.3, 0.0]], [200]) == [[3, 1]]


@pytest.mark.parametrize("changes,words", [
    (dict(num_heads=3, num_kv_heads=2), "multiple of num_kv_heads"),
    (dict(compress_block_size=24, compress_stride=16), "compress_block_size (24) must be a multiple"),
    (dict(select_block_size=40), "select_block_size (40) must be a multiple"),
    (dict(select_block_size=16), "select_block_size (16) must be >= compress_block_size (32)"),
    (dict(select_block_count=2), "must not exceed select_block_count (2)"),
    (dict(window_size=0), "'window_size' must be a positive int"),
    (dict(num_init_blocks=-1), "'num_init_blocks' must be a non-negative int"),
    (dict(compute_dtype="float64"), "compute_dtype"),
    (dict(head_dim=True), "'head_dim' must be a positive int"),
])
def test_config_validation(changes, words):
    with pytest.raises(ValueError) as info:
        _paper(**changes)
    assert words in str(info.value)


def test_config_defaults_are_the_paper_sizes():
    cfg = _paper()
    assert (cfg.compress_block_size, cfg.compress_stride, cfg.select_block_size, cfg.select_block_count,
            cfg.num_init_blocks, cfg.num_local_blocks, cfg.window_size) == (32, 16, 64, 16, 1, 2, 512)
    assert small_config().group_size == 2 and cfg.scale == 16 ** -0.5 and cfg.ms_compute_dtype == ms.float32
