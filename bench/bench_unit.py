"""Benchmark (not a test): NSASelfAttention at unit-test sizes vs a plain dense attention, PyNative and graph.

What a user's unit test of a layer costs: one forward+backward (``mindspore.grad`` of a squared-output
loss over the inputs and every weight) of ``NSASelfAttention`` at hidden 128, 4 heads, 2 KV heads,
head_dim 32, ``l = d = l' = 16``, ``n = 4``, ``w = 32``, three packed documents; "dense" is the same
Q/K/V/output projections around a causal, document-masked softmax attention in plain MindSpore ops
and autodiff (what a user would otherwise unit-test). Each (implementation, T, mode) runs in a fresh
process:

- PyNative: the median of the steps after the first (the first pays one-time op compilation);
- graph (``mindspore.jit``): the first call (compile + run) and the median of the later steps.

Kernels per step: the kernel launches MindSpore's profiler records in one more step (graph: the
kernels of the compiled graph as it runs, loop bodies once per iteration; PyNative: the ops it
records, which miss those of MindSpore's fast path, so the counts are low there).
``--profile IMPL T MODE`` prints where that step's op time goes instead.

Run: ``make bench-unit`` or ``python bench/bench_unit.py [--lengths 96 1024] [--steps 5]``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 128, 4, 2, 32
DOCUMENTS = 3
MODES = ("pynative", "graph")
IMPLS = ("nsa", "dense")


def document_ends(total):
    """Prefix sums of three documents of about a third of ``total`` each (the last takes the rest)."""
    first = total // DOCUMENTS + 5
    second = total // DOCUMENTS - 7
    return np.cumsum([first, second, total - first - second]).astype(np.int32)


def build(impl):
    """The layer of ``impl`` at the unit-test shape, with random weights (seeded)."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from mindspore import nn, ops  # pylint: disable=import-outside-toplevel

    from nsa_layers import NSAConfig, NSASelfAttention  # pylint: disable=import-outside-toplevel
    from nsa_layers.layout import known_prefix_sums, token_layout  # pylint: disable=import-outside-toplevel

    ms.set_seed(0)
    if impl == "nsa":
        return NSASelfAttention(NSAConfig(
            hidden_size=HIDDEN, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, v_head_dim=HEAD_DIM,
            compress_block_size=16, compress_stride=16, select_block_size=16, select_block_count=4, window_size=32))

    class Dense(nn.Cell):
        """Causal, document-masked softmax attention with NSA's projections (GQA: each KV head's
        keys repeated for its query heads), plain ops and autodiff."""

        def __init__(self):
            super().__init__()
            self.q_proj = nn.Dense(HIDDEN, HEADS * HEAD_DIM, has_bias=False)
            self.k_proj = nn.Dense(HIDDEN, KV_HEADS * HEAD_DIM, has_bias=False)
            self.v_proj = nn.Dense(HIDDEN, KV_HEADS * HEAD_DIM, has_bias=False)
            self.out_proj = nn.Dense(HEADS * HEAD_DIM, HIDDEN, has_bias=False)

        def construct(self, x, actual_seq_len):
            total = x.shape[0]
            segment = token_layout(known_prefix_sums(actual_seq_len)["ends"], total)[0]
            rows = ops.arange(0, total, dtype=ms.int32)
            visible = ops.logical_and(segment.reshape(-1, 1) == segment.reshape(1, -1),
                                      rows.reshape(1, -1) <= rows.reshape(-1, 1))
            q = self.q_proj(x).reshape(total, HEADS, HEAD_DIM).transpose(1, 0, 2)
            k = self.k_proj(x).reshape(total, KV_HEADS, HEAD_DIM).transpose(1, 0, 2)
            v = self.v_proj(x).reshape(total, KV_HEADS, HEAD_DIM).transpose(1, 0, 2)
            k, v = (ops.repeat_interleave(t, HEADS // KV_HEADS, 0) for t in (k, v))
            scores = ops.bmm(q, k.transpose(0, 2, 1)) * HEAD_DIM ** -0.5
            scores = ops.where(visible.reshape(1, total, total), scores, ops.full_like(scores, -1e30))
            out = ops.bmm(ops.softmax(scores, -1), v).transpose(1, 0, 2).reshape(total, HEADS * HEAD_DIM)
            return self.out_proj(out)

    return Dense()


def run_one(impl, total, mode, steps, profile_dir=None):
    """Time ``impl`` at ``total`` tokens in ``mode`` -> result dict (seconds)."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from mindspore import Tensor  # pylint: disable=import-outside-toplevel

    layer = build(impl)
    x = Tensor(np.random.default_rng(0).standard_normal((total, HIDDEN)).astype(np.float32))
    ends = Tensor(document_ends(total))
    params = layer.trainable_params()

    def loss(inputs, seq):
        return (layer(inputs, actual_seq_len=seq) ** 2).mean()

    step = ms.grad(loss, grad_position=0, weights=params)
    if mode == "graph":
        step = ms.jit(step)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        step(x, ends)[0].asnumpy()
        times.append(time.perf_counter() - start)
    result = {"impl": impl, "T": total, "mode": mode, "first_s": times[0], "step_s": statistics.median(times[1:])}
    if profile_dir is not None:
        profile_dir = tempfile.mkdtemp(dir=profile_dir)  # this run's files alone
        profiler = ms.Profiler(output_path=profile_dir)
        step(x, ends)[0].asnumpy()
        profiler.stop()
        profiler.analyse()
        result["kernels"] = kernel_launches(profile_dir)
        result["profile_dir"] = profile_dir
    return result


def kernel_launches(profile_dir):
    """Kernel launches in a profiled step: the lines of MindSpore 2.9's CPU op timestamp file."""
    import glob  # pylint: disable=import-outside-toplevel
    framework = sorted(glob.glob(f"{profile_dir}/*/FRAMEWORK"))[-1]
    with open(f"{framework}/cpu_op_execute_timestamp_0.txt", encoding="utf-8") as lines:
        return sum(1 for line in lines if line.strip())


def run_subprocess(impl, total, mode, steps, profile_dir):
    """One ``--one`` run in a fresh process -> its result dict, or None if it failed."""
    done = subprocess.run([sys.executable, __file__, "--one", impl, str(total), mode, "--steps", str(steps),
                           "--profile-dir", profile_dir], capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(done.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[96, 1024])
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    parser.add_argument("--profile-dir", default="profile_unit", help="where the profiler writes its files")
    parser.add_argument("--one", nargs=3, metavar=("IMPL", "T", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--profile", nargs=3, metavar=("IMPL", "T", "MODE"),
                        help="instead of the table: profile one step of one run and print where its op time went")
    args = parser.parse_args()
    if args.one or args.profile:
        impl, total, mode = args.one or args.profile
        if impl not in IMPLS or mode not in MODES:
            parser.error(f"IMPL must be one of {IMPLS} and MODE one of {MODES}, got {impl!r} {mode!r}")
        import mindspore as ms  # pylint: disable=import-outside-toplevel
        ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
        os.makedirs(args.profile_dir, exist_ok=True)
        result = run_one(impl, int(total), mode, args.steps, args.profile_dir)
        print(json.dumps(result))
        if args.profile:
            sys.path.insert(0, __file__.rsplit("/", 1)[0])
            from bench_attention import print_profile  # pylint: disable=import-outside-toplevel
            print_profile(result["profile_dir"])
        return
    print(f"NSASelfAttention vs dense attention at unit-test sizes: hidden {HIDDEN}, {HEADS} heads, {KV_HEADS} KV "
          f"heads, head_dim {HEAD_DIM}, l=d=l'=16, n=4, w=32, {DOCUMENTS} documents; forward+backward; "
          "seconds (kernels per step)\n")
    print("| T | mode | time | NSA | dense | NSA / dense |\n|---|---|---|---|---|---|")
    for total in args.lengths:
        for mode in MODES:
            runs = {impl: run_subprocess(impl, total, mode, args.steps, args.profile_dir) for impl in IMPLS}
            rows = [("each step after the first", "step_s", True)]
            if mode == "graph":
                rows = [("first call (compile + run)", "first_s", False), ("each later step", "step_s", True)]
            for label, key, kernels in rows:
                def cell(run, key=key, kernels=kernels):
                    if run is None:
                        return "failed"
                    return f"{run[key]:.3f}" + (f" ({run['kernels']})" if kernels else "")
                ratio = (f"{runs['nsa'][key] / runs['dense'][key]:.1f}x" if None not in runs.values() else "-")
                print(f"| {total} | {mode} | {label} | {cell(runs['nsa'])} | {cell(runs['dense'])} | {ratio} |",
                      flush=True)


if __name__ == "__main__":
    main()
