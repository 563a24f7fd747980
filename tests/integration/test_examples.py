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
@pytest.mark.parametrize("pretrained", [False, True])
def test_finetune_nsa_example_shortened(tmp_path, pretrained):
    """`make demo`'s script end to end, shortened: writes the rows as MindRecord, trains through
    mindformers.Trainer (which checkpoints), reloads the Trainer's checkpoint (same loss), continues a
    held-out prompt before and after training with the NSA cache, draws the PNG."""
    from PIL import Image

    out_dir = tmp_path / "run"
    extra = []
    if pretrained:  # a tiny Hugging Face Qwen3 checkpoint (its sizes: 64-token rows)
        from helpers.hf_qwen3 import write_hf_qwen3

        write_hf_qwen3(tmp_path / "qwen3", seed=4)
        extra = ["--pretrained", str(tmp_path / "qwen3")]
    result = subprocess.run([sys.executable, str(EXAMPLES / "finetune_nsa.py"), "--steps", "3", "--seq-length",
                             "64" if pretrained else "128", "--new-tokens", "8", "--out-dir", str(out_dir), *extra],
                            cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "NSAQwen3ForCausalLM" in out and "documents per row" in out
    assert (f"(Qwen3 weights from {tmp_path / 'qwen3'})" in out) == pretrained
    assert ("2 layers, hidden 64," if pretrained else "2 layers, hidden 128,") in out  # sizes from config.json
    assert f"training rows for MindFormers: {out_dir / 'data' / 'train.mindrecord'}" in out
    assert "training with mindformers.Trainer: AdamW" in out and "NSATrainOneStepCell, 3 steps of 2 rows" in out
    assert re.search(r"train: 100%.*3/3", out), out[-2000:]
    ckpt = out_dir / "checkpoint" / "iteration_00000003" / "CKP-model-0000000-0000001.safetensors"
    assert f"checkpoint (written by the Trainer): {ckpt}" in out
    assert "reloaded into a fresh model (0 parameters not loaded)" in out and "-> same" in out
    assert "greedy continuation before training: '" in out and "greedy continuation after training:  '" in out
    assert re.search(r"decode with the NSA cache: \d+\.\d tokens/s", out), out[-2000:]
    png = out_dir / "nsa_selection.png"
    assert f"selection picture: {png}" in out
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 128 and image.height > 40
    assert ckpt.is_file()
