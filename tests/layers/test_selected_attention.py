"""The block-grouped layout of BlockGroupedSelectedAttention: its bookkeeping (block_grouped_slots) and every
index of its plan (selected_tile_plan)."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from mindspore import Tensor

from nsa_layers.selected_attention import block_grouped_slots, selected_tile_plan, tile_pairs


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


def _numpy_tile_plan(blocks, valid, first_block, position, num_blocks, blocks_per_head, group, tile, block_size):
    """``selected_tile_plan`` written out with loops over the (query, slot) pairs: pairs grouped by
    (KV head, block), in pair order inside a group, each group in whole tiles of ``tile`` pairs."""
    kv_heads, rows, count = blocks.shape
    pairs = kv_heads * rows * count
    groups = np.zeros(pairs, np.int64)
    for h in range(kv_heads):
        for c in range(rows):
            for s in range(count):
                groups[(h * rows + c) * count + s] = h * num_blocks + min(first_block[c] + blocks[h, c, s],
                                                                          num_blocks - 1)
    capacity = -(-pairs // tile) + min(kv_heads * num_blocks, pairs)
    slot = np.zeros(pairs, np.int64)
    pair_of_slot = np.full(capacity * tile, pairs)
    tile_group = np.zeros(capacity, np.int64)
    used = 0
    for g in range(kv_heads * num_blocks):
        members = [p for p in range(pairs) if groups[p] == g]
        for i, p in enumerate(members):
            slot[p] = used * tile + i
            pair_of_slot[slot[p]] = p
        tile_group[used:used - (-len(members) // tile)] = g
        used -= -len(members) // tile
    tiles_from_softmax = np.full(capacity * tile * group, pairs * group)
    softmax_from_tiles = np.zeros(pairs * group, np.int64)
    slots_from_tiles = np.zeros(pairs, np.int64)
    key_bias = np.zeros(pairs, np.int64)
    for p in range(pairs):
        h, c, s = p // (rows * count), p // count % rows, p % count
        for g in range(group):
            tiles_from_softmax[slot[p] * group + g] = ((h * rows + c) * group + g) * count + s
            softmax_from_tiles[((h * rows + c) * group + g) * count + s] = slot[p] * group + g
        slots_from_tiles[s * kv_heads * rows + h * rows + c] = slot[p]
        last = min(position[c] - blocks[h, c, s] * block_size, block_size - 1) if valid[h, c, s] else -1
        key_bias[p] = last + 1
    return {"tile_blocks": tile_group // num_blocks * blocks_per_head + tile_group % num_blocks,
            "tile_queries": pair_of_slot // count, "softmax_from_tiles": softmax_from_tiles,
            "tiles_from_softmax": tiles_from_softmax, "slots_from_tiles": slots_from_tiles,
            "key_bias": key_bias}


@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 5), st.integers(1, 4), st.integers(1, 6),
       st.integers(0, 2 ** 31))
def test_selected_tile_plan_matches_a_numpy_loop(kv_heads, rows, count, group, num_blocks, seed):
    """Every index of the plan, against loops over the pairs (blocks beyond the chunk's reach are
    clipped to its last block; empty slots see no key)."""
    rng = np.random.default_rng(seed)
    block_size, tile = 4, int(rng.integers(1, 5))
    blocks = rng.integers(0, num_blocks + 2, (kv_heads, rows, count)).astype(np.int32)
    valid = rng.random((kv_heads, rows, count)) < 0.7
    first_block = rng.integers(0, num_blocks, rows).astype(np.int32)
    position = rng.integers(0, num_blocks * block_size, rows).astype(np.int32)
    blocks_per_head = num_blocks + int(rng.integers(0, 3))
    plan = selected_tile_plan(Tensor(blocks), Tensor(valid), Tensor(first_block), Tensor(position), num_blocks,
                              blocks_per_head, group, tile, block_size)
    expected = _numpy_tile_plan(blocks, valid, first_block, position, num_blocks, blocks_per_head, group, tile,
                                block_size)
    assert set(plan) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(plan[name].asnumpy(), value, err_msg=name)
