"""nsa_layers.packing (host) and nsa_layers.layout (graph): bookkeeping against explicit loops;
normalisation; the tensor versions against the host ones."""

import mindspore as ms
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import reference as ref
from helpers.common import run
from helpers.strategies import prefix_sums, segment_lengths
from nsa_layers import NSAConfig, layout, packing
from nsa_layers.ops import _varlen


@given(segment_lengths(max_segments=6, max_len=90), st.sampled_from([(16, 16), (32, 16), (48, 16), (64, 32)]))
def test_host_bookkeeping_matches_explicit_loops(lengths, block_stride):
    block, stride = block_stride
    prefix = prefix_sums(lengths)
    segs = ref.segments(prefix)
    assert packing.segment_starts(prefix).tolist() == [s for s, _ in segs]
    assert packing.segment_lengths(prefix).tolist() == [e - s for s, e in segs]
    windows = [s0 for s, e in segs for s0 in range(s, e - block + 1, stride)]
    assert packing.window_starts(prefix, block, stride).tolist() == windows
    counts = [len(range(s, e - block + 1, stride)) for s, e in segs]
    assert packing.compressed_lengths(prefix, block, stride).tolist() == counts
    ids = [b for b, (s, e) in enumerate(segs) for _ in range(s, e)]
    pos = [t - s for s, e in segs for t in range(s, e)]
    assert packing.token_segment_ids(prefix).tolist() == ids
    assert packing.token_positions(prefix).tolist() == pos


@pytest.mark.parametrize("given_ends,total,expected", [
    (None, 7, (7,)),                                                    # no prefix sums: one segment
    ((3, 7), 7, (3, 7)),
    ([0, 5, 12], 12, (5, 12)),                                          # leading 0
    (np.array([16, 64, 64, 64, 80, 128, 128, 128]), 128, (16, 64, 80, 128)),  # MindFormers, 2 rows of 64, padded
    (ms.Tensor(np.array([[300, 1000, 2048, 2048]], np.int32)), 2048, (300, 1000, 2048)),  # a tensor, 2-D
    ((5,), 9, (5, 9)),                                                  # the remaining rows form a segment
    ((), 4, (4,)),
])
def test_normalize_prefix_sums(given_ends, total, expected):
    assert packing.normalize_prefix_sums(given_ends, total) == expected


@pytest.mark.parametrize("given_ends,total,words", [
    ((5, 3, 9), 9, "non-decreasing"),
    ((-1, 9), 9, "non-negative"),
    ((5, 10), 9, "must not exceed T=9"),
    (np.array([1.5, 9.0]), 9, "integers"),
])
def test_normalize_prefix_sums_errors(given_ends, total, words):
    with pytest.raises(ValueError, match=words):
        packing.normalize_prefix_sums(given_ends, total)


def test_strict_checks_name_the_rule():
    with pytest.raises(RuntimeError, match="'seq' must be non-decreasing"):
        _varlen.check_prefix_sums((4, 2), 4, "seq", "op")
    with pytest.raises(ValueError, match="must be at most T=3"):
        _varlen.check_prefix_sums((0, 4), 3, "seq", "op", ValueError, positive=False, last="at_most")
    assert _varlen.check_prefix_sums((0, 3), 3, "seq", "op", positive=False) == (0, 3)
    with pytest.raises(TypeError, match="'seq' must be a tuple or list of int"):
        _varlen.as_int_tuple((1, True), "seq", "op")
    assert _varlen.as_int_tuple([np.int64(2), 5], "seq", "op") == (2, 5)


@pytest.mark.parametrize("raw", [
    [16, 64, 64, 64, 80, 128, 128, 128],   # global offsets, padded with repeated values
    [0, 5, 12, 12, 40, 128],               # leading 0 and a zero-length segment
    [128],
])
def test_tensor_versions_match_host_versions(mode, raw):
    total = 128
    ends = ms.Tensor(np.array(raw, np.int32))
    prefix = packing.normalize_prefix_sums(raw, total)

    cfg = NSAConfig(hidden_size=8, num_heads=1, num_kv_heads=1, head_dim=8, v_head_dim=8)

    def fn(e):
        return layout.packed_layout(e, total, cfg)["segment"], layout.positions_tensor(e, total)

    seg, pos = run(mode, fn, ends)
    seg, pos = seg.asnumpy(), pos.asnumpy()
    assert seg.dtype == np.int32 and pos.dtype == np.int32
    assert np.array_equal(pos, packing.token_positions(prefix))
    host = packing.token_segment_ids(prefix)
    # ids may skip numbers (repeated ends) but two tokens share an id iff they share a segment
    assert np.array_equal(seg[:, None] == seg[None, :], host[:, None] == host[None, :])


@pytest.mark.parametrize("raw", [[16, 64, 64, 64, 80, 128, 128, 128], [0, 5, 12, 12, 40, 128], [128, 40, 0, 77]])
def test_layout_from_host_values_equals_the_graph_ops(raw):
    """PyNative reads checked prefix sums and builds the layout with NumPy, once per layout
    (``host_layout``); a compiled graph builds it with ops from the tensor: every field equal, shapes
    included (ends in any order, as a layer's own ends may be)."""
    cfg = NSAConfig(hidden_size=8, num_heads=1, num_kv_heads=1, head_dim=8, v_head_dim=8, compress_block_size=16,
                    compress_stride=8, select_block_size=32)
    fields = ("segment", "position", "window_starts", "first_window", "windows_ended", "block_starts", "first_block")

    def fn(ends):
        record = layout.packed_layout(layout.known_prefix_sums(ends), 128, cfg)
        return tuple(record[name] for name in fields)

    ends = ms.Tensor(np.array(raw, np.int32))
    eager, graph = fn(ends), ms.jit(fn)(ends)
    for name, host, ops_ in zip(fields, eager, graph):
        assert host.shape == ops_.shape and np.array_equal(host.asnumpy(), ops_.asnumpy()), name
    assert fn(ends)[0] is eager[0]  # built once per layout


def test_layout_of_no_tokens_is_empty(mode):
    """T = 0: four empty int32 tensors (MindSpore's max and min reject empty inputs)."""
    def fn(ends):
        return layout.token_layout(ends, 0)

    tokens = run(mode, fn, ms.Tensor(np.array([0], np.int32)))
    assert [(x.shape, x.dtype) for x in tokens] == [((0,), ms.int32)] * 4


@given(segment_lengths(max_segments=6, max_len=90), st.sampled_from([(16, 16), (32, 16), (48, 16), (64, 32)]))
def test_windows_ended_are_consecutive_slots_from_the_first(lengths, block_stride):
    """The windows a token sees (its segment's, ended at it: ``i*d + l - 1 <= t``) are the slots
    ``first_window .. first_window + windows_ended - 1`` of the row-ordered layout, as the compressed
    branch reads them, and its segment's selection blocks are the block slots from ``first_block``;
    checked against explicit loops over the segments."""
    block, stride = block_stride
    prefix = prefix_sums(lengths)
    total = prefix[-1]
    cfg = NSAConfig(hidden_size=8, num_heads=1, num_kv_heads=1, head_dim=8, v_head_dim=8, compress_block_size=block,
                    compress_stride=stride, select_block_size=max(64, block))
    record = layout.packed_layout(ms.Tensor(np.array(prefix, np.int32)), total, cfg)
    first = record["first_window"].asnumpy()
    ended = record["windows_ended"].asnumpy()
    rows = record["window_starts"].asnumpy()
    first_block, block_rows = record["first_block"].asnumpy(), record["block_starts"].asnumpy()
    windows = sum(len(range(s, e - block + 1, stride)) for s, e in ref.segments(prefix))
    blocks = sum(len(range(s, e, cfg.select_block_size)) for s, e in ref.segments(prefix))
    for s, e in ref.segments(prefix):
        for t in range(s, e):
            expected = [w for w in range(s, e - block + 1, stride) if w + block - 1 <= t]
            seen = slice(first[t], first[t] + ended[t])
            assert rows[seen].tolist() == expected and seen.stop <= windows, (t, s, e)  # real windows come first
            own = list(range(s, e, cfg.select_block_size))
            assert block_rows[first_block[t]:first_block[t] + len(own)].tolist() == own, (t, s, e)
            assert first_block[t] + len(own) <= blocks
