"""The examples run end to end (what ``make demo`` runs)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("extra", [[], ["--graph", "--docs", "40", "3", "70"]])
def test_compress_packed_batch_example(extra, tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "compress_packed_batch.py"), *extra], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "window starts none" in result.stdout and result.stdout.rstrip().endswith("done")
