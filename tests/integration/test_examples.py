"""The examples run end to end (what ``make demo`` runs)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("extra", [[], ["--graph", "--docs", "40", "3", "70"]])
def test_compress_packed_batch_example(extra, tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "compress_packed_batch.py"), *extra], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "window starts none" in result.stdout and result.stdout.rstrip().endswith("done")


@pytest.mark.slow
def test_finetune_nsa_example_shortened(tmp_path):
    """`make demo`'s script end to end, shortened: trains, saves, reloads (same loss), continues a
    held-out prompt before and after training with the NSA cache, draws the PNG."""
    from PIL import Image

    out_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, str(EXAMPLES / "finetune_nsa.py"), "--steps", "3", "--seq-length", "128",
                             "--new-tokens", "8", "--out-dir", str(out_dir)], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "NSAQwen3ForCausalLM" in out and "documents per row" in out
    assert "reloaded into a fresh model (0 parameters not loaded)" in out and "-> same" in out
    assert "greedy continuation before training: '" in out and "greedy continuation after training:  '" in out
    assert re.search(r"decode with the NSA cache: \d+\.\d tokens/s", out), out[-2000:]
    png = out_dir / "nsa_selection.png"
    assert f"selection picture: {png}" in out
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 128 and image.height > 40
    assert (out_dir / "nsa_qwen3_tiny.ckpt").is_file()
