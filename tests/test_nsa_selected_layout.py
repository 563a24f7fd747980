"""The block-grouped layout of SelectedAttention: its bookkeeping (block_grouped_slots), the row
permutation with its gather-only backward, and the row softmax with its hand-written backward."""

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops
from hypothesis import given, strategies as st

from nsa_layers.attention_math import RowSoftmax
from nsa_layers.selected_attention import RowPermutation, block_grouped_slots, tile_pairs

from conftest import grads, random_normal, run


@st.composite
def _groupings(draw):
    num_groups = draw(st.integers(1, 12))
    pairs = draw(st.integers(1, 80))
    # skewed on purpose: some groups hold most pairs, others none
    weights = np.asarray(draw(st.lists(st.integers(0, 9), min_size=num_groups, max_size=num_groups)), np.float64) + 0.01
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 31)))
    groups = rng.choice(num_groups, size=pairs, p=weights / weights.sum()).astype(np.int32)
    return groups, num_groups, draw(st.integers(1, 17))


@given(_groupings())
def test_block_grouped_slots_give_each_pair_one_row_in_a_tile_of_its_group(case):
    groups, num_groups, tile = case
    pairs = groups.shape[0]
    slot, pair_of_slot, tile_group = (x.asnumpy() for x in block_grouped_slots(Tensor(groups), num_groups, tile))
    tiles = tile_group.shape[0]
    assert pair_of_slot.shape == (tiles * tile,)
    # the capacity bounds every grouping: each group's pairs in whole tiles
    used_tiles = sum(-(-int(np.sum(groups == g)) // tile) for g in range(num_groups))
    assert used_tiles <= tiles
    # one distinct row per pair, and the inverse map agrees
    assert np.unique(slot).shape == (pairs,) and slot.min() >= 0 and slot.max() < tiles * tile
    np.testing.assert_array_equal(pair_of_slot[slot], np.arange(pairs))
    assert np.sum(pair_of_slot < pairs) == pairs and np.all(pair_of_slot[pair_of_slot >= pairs] == pairs)
    # every pair's tile reads its own group
    np.testing.assert_array_equal(tile_group[slot // tile], groups)
    assert tile_group.min() >= 0 and tile_group.max() < num_groups


def test_block_grouped_slots_hand_case():
    # groups of 3, 1 and 0 pairs, tiles of 2: group 0 fills tile 0 and half of tile 1, group 1 tile 2
    slot, pair_of_slot, tile_group = block_grouped_slots(Tensor(np.array([0, 1, 0, 0], np.int32)), 3, 2)
    assert sorted(slot.asnumpy()[[0, 2, 3]]) == [0, 1, 2] and slot.asnumpy()[1] == 4
    assert tile_group.asnumpy()[:3].tolist() == [0, 0, 1]
    assert pair_of_slot.asnumpy()[3] == 4 and pair_of_slot.asnumpy()[5] == 4  # padding rows


def test_tile_pairs_fill_about_64_query_rows():
    assert [tile_pairs(g) for g in (1, 2, 4, 8, 16, 32)] == [16, 16, 16, 8, 4, 4]


@given(st.integers(1, 20), st.integers(1, 30), st.booleans(), st.booleans(), st.integers(0, 2 ** 31))
def test_row_permutation_and_its_gradient(rows, out_rows, index_pads, inverse_pads, seed):
    """Forward: ``x`` rows moved (index ``len(x)`` a zero row); gradient: the adjoint scatter, computed
    here with NumPy's ``add.at`` from the index alone (the cell's backward uses the inverse). Without
    ``index_pads`` every output row comes from ``x``; without ``inverse_pads`` every row of ``x`` goes
    somewhere (the cases where the cell appends no zero row)."""
    if not index_pads:
        out_rows = min(out_rows, rows)
    if not inverse_pads:
        rows = min(rows, out_rows)
    rng = np.random.default_rng(seed)
    # each row of x to at most one output row
    targets = rng.permutation(max(rows, out_rows))[:rows]
    index = np.full(out_rows, rows, np.int32)
    inverse = np.full(rows, out_rows, np.int32)
    for r, t in enumerate(targets):
        if t < out_rows:
            index[t], inverse[r] = r, t
    x = random_normal(rng, (rows, 3))
    cot = random_normal(rng, (out_rows, 3))
    padded = np.concatenate([x, np.zeros((1, 3), np.float32)])
    assert index_pads or (index < rows).all()
    assert inverse_pads or (inverse < out_rows).all()
    permute = RowPermutation(index_pads, inverse_pads)
    np.testing.assert_array_equal(permute(Tensor(x), Tensor(index), Tensor(inverse)).asnumpy(), padded[index])
    expected = np.zeros((rows + 1, 3), np.float64)
    np.add.at(expected, index, cot)
    cot = Tensor(cot)

    def loss(a, i, j):
        return (permute(a, i, j) * cot).sum()
    for mode in ("pynative", "graph"):
        got = grads(mode, loss, 0, Tensor(x), Tensor(index), Tensor(inverse))
        np.testing.assert_allclose(got.asnumpy(), expected[:rows], rtol=1e-6, atol=1e-6)


def test_row_softmax_gradient_matches_autodiff_softmax(mode):
    rng = np.random.default_rng(3)
    x = random_normal(rng, (2, 3, 7), scale=3.0)
    x[0, 1, 2:] = -1e30  # masked keys
    cot = Tensor(random_normal(rng, x.shape))
    softmax = RowSoftmax()

    def loss(a):
        return (softmax(a) * cot).sum()

    def autodiff_loss(a):
        return (ops.softmax(a, -1) * cot).sum()
    got = grads(mode, loss, 0, Tensor(x))
    expected = grads(mode, autodiff_loss, 0, Tensor(x))
    np.testing.assert_allclose(run(mode, softmax, Tensor(x)).asnumpy(), ops.softmax(Tensor(x), -1).asnumpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(got.asnumpy(), expected.asnumpy(), rtol=1e-5, atol=1e-6)
    # and against the analytic formula in float64
    p = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    c = cot.asnumpy().astype(np.float64)
    np.testing.assert_allclose(got.asnumpy(), p * (c - (p * c).sum(-1, keepdims=True)), rtol=1e-5, atol=1e-6)
