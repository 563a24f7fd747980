"""The committed attention benchmark still runs (a smoke run at a tiny size; no timing is checked)."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_attention.py"


def test_bench_attention_runs_every_implementation_with_its_options(tmp_path):
    # chunk 256 and select_dense_rows 256 at T = 512: the NSA run takes both selected-branch
    # formulations (block-masked first chunk, gathered second one)
    result = subprocess.run([sys.executable, str(BENCH), "--lengths", "512", "--layouts", "packed", "--steps", "1",
                             "--chunk", "256", "--select-dense-rows", "256", "--heads", "8"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "8 heads, 1 KV head" in lines[0] and "query chunk 256, select_dense_rows 256" in lines[0]
    rows = [line for line in lines if line.startswith("| packed | 512 |")]
    assert len(rows) == 1, result.stdout
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    # NSA, dense, dense-core: "seconds (peak MB)"; the ratios and the compile time: numbers
    for cell in (cells[2], cells[3], cells[5]):
        seconds, peak = cell.split(" ")
        assert float(seconds) > 0 and float(peak.strip("()")) > 0, rows[0]
    for cell in (cells[4], cells[6], cells[7]):
        assert float(cell) > 0, rows[0]


def test_bench_attention_profile_prints_where_the_op_time_went(tmp_path):
    # the gathered selected branch runs (select_dense_rows 0), so its gather and segment sum must show up
    result = subprocess.run([sys.executable, str(BENCH), "--profile", "nsa", "512", "packed", "--steps", "1",
                             "--chunk", "256", "--select-dense-rows", "0", "--profile-dir", str(tmp_path / "p")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    total = float(out.split("op time in the profiled step: ")[1].split(" ms")[0])
    by_type = {}
    for line in out.split("| op | calls | ms | share |")[1].split("| op | input shapes |")[0].splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 4 and cells[1].isdigit():
            by_type[cells[0]] = (int(cells[1]), float(cells[2]))
    assert total > 0 and {"BatchMatMul", "Gather", "UnsortedSegmentSum"} <= set(by_type), out
    assert sum(ms_ for _, ms_ in by_type.values()) <= total + len(by_type), out  # rounded shares of the total
    assert "| BatchMatMul | [" in out, out  # the per-shape table
