"""The NSA model built under a semi-auto parallel context by a real 2-process ``msrun`` job (CPU,
``mccl``): MindFormers builds a tensor- or context-parallel model only after
``mindspore.communication.init()``. MindSpore compiles no semi-auto graph on CPU, so what is checked
is what layer 0 declares on each rank (``helpers/parallel_build.py``)."""

import json
from pathlib import Path

import pytest

from helpers.msrun import run_two_ranks

HELPER = Path(__file__).resolve().parents[1] / "helpers" / "parallel_build.py"


def _run(dp, cp, tp, tmp_path):
    run_two_ranks(HELPER, (dp, cp, tp, tmp_path), tmp_path)
    return [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow  # an msrun job of two processes that import MindFormers and build the model: 25-30 s
@pytest.mark.parametrize("dp, cp, tp", [(1, 1, 2), (1, 2, 1)])
def test_two_ranks_declare_the_nsa_layouts(dp, cp, tp, tmp_path):
    ranks = _run(dp, cp, tp, tmp_path)
    matrix = [dp, cp, tp]
    rows, keys = [[2, 1], 0, -1], [2, 0, -1]  # tensor maps: device-matrix axes from the last (tp 0, cp 1, dp 2)
    expected_core = [rows] + [keys] * 6 + [rows, [2], [-1, 0], [-1, 0], [-1, 0, -1]]  # independent K/V
    for rank, report in enumerate(ranks):
        assert report["cp_rank"] == (rank if cp == 2 else 0)
        assert report["checks_prefix_sums"] is False  # per-rank ends: PackedDataCheck checks them on the host
        assert [m for m, _ in report["core_in"] + report["core_out"]] == [matrix] * 13
        assert [t for _, t in report["core_in"]] == expected_core and [t for _, t in report["core_out"]] == [rows]
        assert report["rank_heads"] == [4 // tp, 2 // tp]  # the body's core: this rank's heads
        # the gate: a column-parallel projection on the (dp, cp)-split tokens
        assert report["gate_matmul"] == [[dp * cp, 1], [tp, 1]]
        assert report["gate_bias_add"] == [[dp * cp, tp], [tp]] and report["gate_sigmoid"] == [[dp * cp, tp]]
        assert report["gate_transpose"] == [[cp, dp, 1]]
        assert report["split_kv_branches"] == [[cp, dp, tp, 1]]
        assert not any("rank_core" in name for name in report["parameters"])  # the body owns no parameters
