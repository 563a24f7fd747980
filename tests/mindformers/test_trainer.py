"""``mindformers.Trainer`` runs of the tiny YAML on CPU, each in its own process as a user runs them
(``helpers/trainer_run.py``): MindRecord rows read by MindFormers' dataset, the YAML's optimizer,
wrapper, callbacks and checkpoints; a resumed run; a misconfigured dataset refused before compiling.
Each run compiles the train step (about a minute on 2 cores): slow tier."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "helpers" / "trainer_run.py"


def _run(out_dir, *args, check=True):
    result = subprocess.run([sys.executable, str(SCRIPT), str(out_dir), *args], capture_output=True, text=True,
                            timeout=600, check=False)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
        return json.loads(result.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
def test_trainer_lowers_the_loss_and_a_resumed_run_continues_with_the_same_losses(tmp_path):
    """Run A: 6 steps, the first 4 on one repeated batch (the loss falls), then 2 new batches;
    checkpoint at step 4. Run B resumes from it: it starts at step 4, skips the 4 batches already
    seen and gives A's losses of steps 5 and 6 (same data, same parameters and optimizer state)."""
    first = _run(tmp_path / "a", "--rows", "varied", "--steps", "6", "--save-every", "4")
    losses = np.array(first["losses"])
    assert losses.shape == (6,) and np.isfinite(losses).all() and first["start_step"] == 0
    assert np.all(np.diff(losses[:4]) < 0) and losses[3] < losses[0] - 0.3, losses
    checkpoint = tmp_path / "a" / "checkpoint" / "iteration_00000004"
    assert {p.name.split("-")[1] for p in checkpoint.glob("*.safetensors")} == {"model", "opt"}
    resumed = _run(tmp_path / "b", "--rows", "varied", "--steps", "6", "--save-every", "4", "--resume",
                   str(checkpoint))
    assert resumed["start_step"] == 4
    np.testing.assert_allclose(resumed["losses"], losses[4:], rtol=1e-6)


@pytest.mark.slow
def test_bfloat16_trainer_run_on_cpu_lowers_the_loss_with_finite_gradients(tmp_path):
    """The production dtype (``compute_dtype: bfloat16``, both production YAMLs') through the Trainer on
    CPU: NSA's layers and MindFormers' hold bfloat16 in float32 there (``nsa_layers.precision``); the
    repeated batch's loss falls, every loss is finite and no step overflows."""
    run = _run(tmp_path / "bf16", "--rows", "repeated", "--steps", "4", "--save-every", "4",
               "--compute-dtype", "bfloat16")
    losses = np.array(run["losses"])
    assert losses.shape == (4,) and np.isfinite(losses).all(), losses
    assert losses[-1] < losses[0] - 0.3, losses
    assert run["overflow"] == [False] * 4 and np.isfinite(run["grad_norms"]).all() and min(run["grad_norms"]) > 0


@pytest.mark.slow
def test_rows_read_without_the_row_offsets_are_refused_before_compiling(tmp_path):
    """MindSpore's own MindDataset gives each row's own ends (MindFormers adds the offsets only for
    create_compressed_eod_mask): the first batch's host check names the row and the column."""
    result = _run(tmp_path / "plain", "--loader", "MindDataset", check=False)
    assert result.returncode != 0
    assert "check_packed_batch: row 1, column 'actual_seq_len'" in result.stderr, result.stderr[-3000:]
    assert "outside [64, 128]" in result.stderr
    assert "compiled" not in result.stderr  # the progress bar never saw a step
