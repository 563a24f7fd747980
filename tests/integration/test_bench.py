"""The committed attention benchmark still runs (smoke runs at a tiny size; no timing is checked), and its
helpers (the full-mask estimate, the profile table, the option checks) do what they say on made-up inputs."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_attention.py"


@pytest.mark.slow
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
    # NSA, dense, dense-core (and PyTorch where importable): "seconds (peak MB)"; the ratios and the
    # compile time: numbers
    torch_columns = (7, 8) if _load_bench().torch_importable() else ()
    for index in (2, 3, 5) + torch_columns[:1]:
        seconds, peak = cells[index].split(" ")
        assert float(seconds) > 0 and float(peak.strip("()")) > 0, rows[0]
    for index in (4, 6, 9) + torch_columns[1:]:
        assert float(cells[index]) > 0, rows[0]
    if not torch_columns:
        assert cells[7] == cells[8] == "-", rows[0]
    assert "NSA peak memory per added token, packed" not in result.stdout  # one length: no slope


@pytest.mark.slow
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


def _load_bench():
    import importlib.util  # pylint: disable=import-outside-toplevel
    spec = importlib.util.spec_from_file_location("bench_attention", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_mask_estimate_extends_the_partial_runs_linearly(monkeypatch):
    bench = _load_bench()
    calls = []

    def fake_run(impl, total, layout, options):
        chunks = int(options[options.index("--query-chunks") + 1])
        calls.append((impl, total, layout, chunks))
        return {"step_s": {2: 4.5, 4: 8.0}[chunks], "peak_mb": 1.0}

    monkeypatch.setattr(bench, "run_subprocess", fake_run)
    # 16 chunks of 1024 rows: 1.75 s per chunk from the two runs, 8.0 + 12 * 1.75 = 29.0 s
    estimate = bench.estimate_full_mask(16384, "one", ["--steps", "1"])
    assert calls == [("dense", 16384, "one", 2), ("dense", 16384, "one", 4)]
    assert estimate["estimated"] and abs(estimate["step_s"] - 29.0) < 1e-9
    # 20000 rows: 20 chunks (the last one short counts as one), 8.0 + 16 * 1.75 = 36.0 s
    assert abs(bench.estimate_full_mask(20000, "one", ["--steps", "1"])["step_s"] - 36.0) < 1e-9
    # too few chunks to extend, or a partial run failing: no estimate
    assert bench.estimate_full_mask(4096, "one", []) is None
    monkeypatch.setattr(bench, "run_subprocess", lambda *args: None)
    assert bench.estimate_full_mask(16384, "one", ["--steps", "1"]) is None


@pytest.mark.slow
def test_partial_full_mask_run_attends_only_the_first_query_chunks(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH), "--one", "dense", "2048", "packed", "--steps", "1",
                             "--query-chunks", "1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [text for text in result.stdout.splitlines() if text.startswith("{")][-1]
    assert '"impl": "dense"' in line and '"T": 2048' in line


def test_op_times_give_kernels_sharing_a_short_name_their_own_shapes(tmp_path):
    # a forward and a backward kernel named BatchMatMul-op8 with different shapes; the timings file
    # lists launches out of order (by start time the forward is first)
    framework = tmp_path / "run" / "FRAMEWORK"
    framework.mkdir(parents=True)
    (framework / "cpu_framework_0.txt").write_text(
        "BatchMatMul;BatchMatMul-op8;1;input_1:[4, 8, 8];input_2:[4, 8, 2];input_3:NoShape;\n"
        "Add;Add-op1;1;input_1:[3];input_2:[3];\n"
        "BatchMatMul;BatchMatMul-op8;1;input_1:[4, 8, 2];input_2:[4, 2, 8];input_3:NoShape;\n")
    (framework / "cpu_op_execute_timestamp_0.txt").write_text(
        "Gradients/Default/Grad_BatchMatMul/BatchMatMul-op8;HostCpuOps;300,2.5,0\n"
        "Default/Add-op1;HostCpuOps;200,0.25,0\n"
        "Default/BatchMatMul-op8;HostCpuOps;100,1.5,0\n")
    times = _load_bench().op_times(str(tmp_path))
    assert times == {("BatchMatMul", "[4, 8, 8] [4, 8, 2]"): [1.5, 1], ("Add", "[3] [3]"): [0.25, 1],
                     ("BatchMatMul", "[4, 8, 2] [4, 2, 8]"): [2.5, 1]}


@pytest.mark.parametrize("args", [["--one", "nsa", "512", "one", "--query-chunks", "2"],
                                  ["--one", "dense", "512", "one", "--query-chunks", "0"],
                                  ["--lengths", "512", "--query-chunks", "2"]])
def test_query_chunks_only_for_one_partial_dense_run(args, tmp_path):
    result = subprocess.run([sys.executable, str(BENCH)] + args, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 2 and "--query-chunks" in result.stderr and "only with --one dense" in result.stderr


def test_memory_slopes_are_per_added_token_between_consecutive_lengths():
    bench = _load_bench()
    runs = [{"T": 4096, "peak_mb": 900.0}, None, {"T": 2048, "peak_mb": 500.0}, {"T": 8192, "peak_mb": 1500.0},
            {"T": 16384, "estimated": True, "step_s": 1.0}]
    assert bench.memory_slopes(runs) == [(2048, 4096, 400.0 / 2048), (4096, 8192, 600.0 / 4096)]


def test_qwen3_shape_refuses_the_one_kv_head_baselines():
    result = subprocess.run([sys.executable, str(BENCH), "--shape", "qwen3-1.7b", "--impls", "dense"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and "the dense baselines take one KV head" in result.stderr


@pytest.mark.slow
def test_bench_decode_runs_and_prints_its_table(tmp_path):
    """The decode benchmark at a tiny context: one table row per (context, batch), every number parsed."""
    script = BENCH.parent / "bench_decode.py"
    result = subprocess.run([sys.executable, str(script), "--contexts", "600", "--batches", "1", "2", "--steps", "1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 600 |")]
    assert len(rows) == 2, result.stdout
    for row, batch in zip(rows, (1, 2)):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] == str(batch) and cells[4].endswith("x"), row
        dense_ms, nsa_ms, dense_mb, nsa_mb = float(cells[2]), float(cells[3]), float(cells[5]), float(cells[6])
        assert dense_ms > 0 and nsa_ms > 0 and nsa_mb >= dense_mb > 0, row


@pytest.mark.slow
def test_bench_unit_runs_and_prints_its_table(tmp_path):
    """The unit-test-size benchmark at a tiny T: the PyNative row and the graph rows, every number parsed,
    with profiler kernel counts on the step rows."""
    script = BENCH.parent / "bench_unit.py"
    command = [sys.executable, str(script), "--lengths", "40", "--steps", "1", "--profile-dir", str(tmp_path / "p")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in result.stdout.splitlines()
            if line.startswith("| 40 |")]
    assert [row[1] for row in rows] == ["pynative", "graph", "graph"], result.stdout
    for row in rows:
        counted = "first call" not in row[2]
        for cell in row[3:5]:
            seconds, *kernels = cell.split(" ")
            assert float(seconds) > 0 and (int(kernels[0].strip("()")) > 0 if counted else not kernels), row
        assert float(row[5].rstrip("x")) > 0, row
