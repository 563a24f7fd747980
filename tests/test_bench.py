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
