"""Hypothesis strategies for packed layouts."""

import numpy as np
from hypothesis import strategies as st


@st.composite
def segment_lengths(draw, max_segments=5, max_len=100, allow_empty=True, first_nonempty=True):
    """A list of segment lengths: zero-length segments and short ones included."""
    n = draw(st.integers(1, max_segments))
    low = 0 if allow_empty else 1
    lengths = draw(st.lists(st.integers(low, max_len), min_size=n, max_size=n))
    if first_nonempty and lengths[0] == 0:
        lengths[0] = draw(st.integers(1, max_len))
    return lengths


def prefix_sums(lengths):
    """Prefix sums (no leading 0) of segment lengths, as a tuple of ints."""
    return tuple(int(v) for v in np.cumsum(lengths))
