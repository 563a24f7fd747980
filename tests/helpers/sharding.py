"""What each rank of a ``(dp, cp, tp)`` device matrix holds under a MindSpore ``Layout``, on the host:
the per-rank emulation the parallel tests run (the slices come from the declared layouts, so the
test and the declaration cannot drift apart)."""

import numpy as np


def rank_coordinates(device_matrix, rank):
    """The rank's index along each device-matrix axis (row-major, the last axis fastest)."""
    return tuple(int(i) for i in np.unravel_index(rank, device_matrix))


def local_shard(array, layout, rank):
    """The block of ``array`` that ``rank`` holds under ``layout`` (``Layout.to_dict()``'s
    ``tensor_map``: per tensor axis, -1 for whole, a device-matrix axis counted from the last, or a
    tuple of them, outer first)."""
    spec = layout.to_dict()
    matrix = tuple(spec["device_matrix"])
    coords = rank_coordinates(matrix, rank)
    index = []
    for axis, entry in enumerate(spec["tensor_map"]):
        entries = entry if isinstance(entry, tuple) else (entry,)
        parts, part = 1, 0
        for e in entries:
            if e == -1:
                continue
            dim = len(matrix) - 1 - e
            parts, part = parts * matrix[dim], part * matrix[dim] + coords[dim]
        size = array.shape[axis]
        if size % parts:
            raise ValueError(f"axis {axis} of size {size} does not split into {parts} parts")
        step = size // parts
        index.append(slice(part * step, (part + 1) * step))
    return array[tuple(index)]


def assemble(shards, layout, shape):
    """The full array from every rank's block (ranks that hold the same block must agree)."""
    full = np.full(shape, np.nan, dtype=np.asarray(shards[0]).dtype)
    for rank, shard in enumerate(shards):
        view = local_shard(full, layout, rank)
        seen = ~np.isnan(view)
        assert np.array_equal(view[seen], np.asarray(shard)[seen]), f"rank {rank} disagrees with another rank"
        view[...] = shard
    return full


def summed(shards, layout, shape):
    """The full array from every rank's block, blocks held by several ranks summed: how the gradients
    of a replicated input or parameter combine (an all-gather's backward, the gradient reduction)."""
    full = np.zeros(shape, dtype=np.asarray(shards[0]).dtype)
    for rank, shard in enumerate(shards):
        local_shard(full, layout, rank)[...] += shard
    return full
