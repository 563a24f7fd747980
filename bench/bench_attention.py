"""Benchmark (not a test): NSASelfAttention vs dense causal attention, forward+backward, graph mode.

All layers have the same projections and run on the same packed batch in ``mindspore.jit``. Two
dense baselines (see ``Dense``): "dense" scores every query against all ``T`` keys and masks causally
and per segment with plain ops and autodiff (the full-mask attention); "dense-core" skips the keys
after each query chunk and uses NSA's own masked-attention core and backward. Every
(implementation, T) runs in a fresh subprocess, so the peak resident memory it reports
(``ru_maxrss``) belongs to that run alone; the time is the median of the steps after the compiling
one and one warm-up step (the first step after compiling is much slower). Where the full-mask dense
runs out of memory (16k here), its step is estimated from two runs that attend only the first 2 and
4 query chunks to all ``T`` keys (``estimate_full_mask``; ``--query-chunks``), marked "est." in the table.

Shapes (``--shape``): ``bench`` (hidden 256, 4 heads, 1 KV head, head_dim 64; the default) and
``qwen3-1.7b`` (Qwen3-1.7B's attention: hidden 2048, 16 heads, 8 KV heads, head_dim 128; NSA and
PyTorch only). ``torch`` (when PyTorch is importable; not a dependency): PyTorch's
``scaled_dot_product_attention`` per segment with ``is_causal``, the same projections, autograd.
Under the table: NSA's peak memory per added token between consecutive lengths.

Run: ``make bench-attention`` or ``python bench/bench_attention.py [--lengths 1024 2048 ...]``;
``--profile nsa 16384 one`` prints where one step's op time goes instead (MindSpore's profiler).
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

# (hidden, heads, KV heads, head_dim); the dense baselines take one KV head
SHAPES = {"bench": (256, 4, 1, 64), "qwen3-1.7b": (2048, 16, 8, 128)}
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = SHAPES["bench"]


DENSE_CHUNK = 1024  # query rows per chunk in the dense baselines (bounds their transient memory)


def segment_lengths(total, layout):
    """The benchmark's layouts: one segment, or 8 packed segments of alternating lengths."""
    return [total] if layout == "one" else [total // 8 - 37, total // 8 + 37] * 4


def run_torch(total, layout, steps, shape):
    """PyTorch dense causal attention per segment (``scaled_dot_product_attention``), the same
    projections, forward+backward; the same result dict as :func:`run_one`."""
    import torch  # pylint: disable=import-outside-toplevel,import-error
    hidden, heads, kv_heads, head_dim = SHAPES[shape]
    torch.manual_seed(0)
    q_proj, o_proj = torch.nn.Linear(hidden, heads * head_dim, bias=False), torch.nn.Linear(
        heads * head_dim, hidden, bias=False)
    k_proj, v_proj = (torch.nn.Linear(hidden, kv_heads * head_dim, bias=False) for _ in range(2))
    x = torch.randn(total, hidden)
    bounds = np.cumsum([0] + segment_lengths(total, layout)).tolist()

    def step():
        q = q_proj(x).view(total, heads, head_dim).transpose(0, 1)
        k, v = (p(x).view(total, kv_heads, head_dim).transpose(0, 1) for p in (k_proj, v_proj))
        # (1, H, S, D): with 3-D inputs CPU SDPA leaves its flash kernel for the T x T path
        outs = [torch.nn.functional.scaled_dot_product_attention(
            q[None, :, s:e], k[None, :, s:e], v[None, :, s:e], is_causal=True, enable_gqa=True)[0]
            for s, e in zip(bounds, bounds[1:])]
        out = torch.cat(outs, 1).transpose(0, 1).reshape(total, heads * head_dim)
        (o_proj(out) ** 2).mean().backward()

    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"impl": "torch", "T": total, "layout": layout, "compile_s": 0.0, "step_s": statistics.median(times[2:]),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_one(impl, total, layout, steps, chunk, select_count=16, dense_rows=None, heads=HEADS, profile_dir=None,
            query_chunks=None, shape="bench", compute_dtype="float32"):
    if impl == "torch":
        return run_torch(total, layout, steps, shape)
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from mindspore import Tensor, nn, ops  # pylint: disable=import-outside-toplevel

    from nsa_layers import NSAConfig, NSASelfAttention  # pylint: disable=import-outside-toplevel
    from nsa_layers.attention_math import MASKED, MaskedAttention, visibility_bias  # pylint: disable=import-outside-toplevel
    from nsa_layers.layout import known_prefix_sums, packed_layout  # pylint: disable=import-outside-toplevel

    ms.set_context(mode=ms.GRAPH_MODE)
    hidden, shape_heads, kv_heads, head_dim = SHAPES[shape]
    heads = heads if shape == "bench" else shape_heads
    if impl != "nsa" and kv_heads != 1:
        raise ValueError(f"the dense baselines take one KV head, shape {shape} has {kv_heads}")
    cfg = NSAConfig(hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                    v_head_dim=head_dim, window_size=512, query_chunk_size=chunk, independent_kv=False,
                    select_block_count=select_count, select_dense_rows=dense_rows, compute_dtype=compute_dtype)
    ends = Tensor(np.cumsum(segment_lengths(total, layout)).astype(np.int32))

    class Dense(nn.Cell):
        """Dense causal self-attention, segment-masked, with the same projections (one KV head shared
        by the query heads), in chunks of query rows.

        ``core=False``: every chunk scores all ``T`` keys, masked softmax by plain ops, autodiff (the
        full-mask attention a user writes first, chunked only so that 16k fits in memory).
        ``core=True``: keys up to the chunk's end only, through NSA's own masked-attention core and its
        backward (the fastest dense attention written with the ops NSA uses).
        """

        def __init__(self, core, query_rows):
            super().__init__()
            self.query_rows = query_rows  # queries attended (the first ones); the full-mask estimate uses fewer than T
            self.heads = heads
            self.q_proj = nn.Dense(HIDDEN, heads * HEAD_DIM, has_bias=False)
            self.k_proj = nn.Dense(HIDDEN, KV_HEADS * HEAD_DIM, has_bias=False)
            self.v_proj = nn.Dense(HIDDEN, KV_HEADS * HEAD_DIM, has_bias=False)
            self.out_proj = nn.Dense(heads * HEAD_DIM, HIDDEN, has_bias=False)
            self.core = core
            self.attention = MaskedAttention(HEAD_DIM ** -0.5)
            self.bmm_tb = ops.BatchMatMul(transpose_b=True)
            self.bmm = ops.BatchMatMul()

        def construct(self, x, actual_seq_len):
            t = x.shape[0]
            seg = packed_layout(known_prefix_sums(actual_seq_len), t, cfg)["segment"]
            rows = ops.arange(0, t, dtype=ms.int32)
            q = self.q_proj(x).reshape(t, self.heads, HEAD_DIM).transpose(1, 0, 2)  # (H, T, D), KV head 0
            k = self.k_proj(x).reshape(1, t, HEAD_DIM)
            v = self.v_proj(x).reshape(1, t, HEAD_DIM)
            outs = []
            for c0 in range(0, min(t, self.query_rows), DENSE_CHUNK):
                c1 = min(t, c0 + DENSE_CHUNK)
                keys = c1 if self.core else t
                visible = ops.logical_and(seg[c0:c1].reshape(-1, 1) == seg[:keys].reshape(1, -1),
                                          rows[:keys].reshape(1, -1) <= rows[c0:c1].reshape(-1, 1))
                bias = visibility_bias(visible, ms.float32, MASKED).reshape(1, c1 - c0, keys)
                if self.core:
                    out = self.attention(q[:, c0:c1].reshape(1, self.heads * (c1 - c0), HEAD_DIM), k[:, :keys],
                                         v[:, :keys], bias)[0]
                else:
                    scores = self.bmm_tb(q[:, c0:c1], ops.broadcast_to(k, (self.heads, t, HEAD_DIM))) * HEAD_DIM ** -0.5
                    out = self.bmm(ops.softmax(scores + bias, -1), ops.broadcast_to(v, (self.heads, t, HEAD_DIM)))
                outs.append(out.reshape(self.heads, c1 - c0, HEAD_DIM))
            out = ops.cat(outs, 1).transpose(1, 0, 2)
            out = out.reshape(out.shape[0], self.heads * HEAD_DIM)
            return self.out_proj(out)

    query_rows = total if query_chunks is None else query_chunks * DENSE_CHUNK
    layer = NSASelfAttention(cfg) if impl == "nsa" else Dense(impl == "dense_core", query_rows)
    x = Tensor(np.random.default_rng(0).standard_normal((total, hidden)).astype(np.float32))
    params = layer.trainable_params()

    def loss(inputs, seq):
        return (layer(inputs, actual_seq_len=seq) ** 2).mean()

    step = ms.jit(ms.grad(loss, grad_position=0, weights=params))
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        grads = step(x, ends)
        grads[0].asnumpy()
        times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"impl": impl, "T": total, "layout": layout, "compile_s": times[0] - min(times[2:]),
              "step_s": statistics.median(times[2:]), "peak_mb": peak_mb}
    if profile_dir is not None:  # one more step under MindSpore's profiler
        profiler = ms.Profiler(output_path=profile_dir)
        step(x, ends)[0].asnumpy()
        profiler.stop()
        profiler.analyse()
    return result


def op_times(profile_dir):
    """Per-op times of a profiled step (MindSpore 2.9's CPU profiler files) ->
    ``{(op type, input shapes): [total ms, calls]}``.

    The shapes file names each kernel by its short name only (``BatchMatMul-op8``), which a forward
    kernel and a backward one (``Gradients/...``) can share with different shapes; its entries are in
    launch order, so the k-th kernel of a short name there is the k-th one of that name to start in the
    timings file."""
    import glob  # pylint: disable=import-outside-toplevel
    framework = sorted(glob.glob(f"{profile_dir}/*/FRAMEWORK"))[-1]
    shapes = {}  # short name -> input shapes of its kernels, in launch order
    with open(f"{framework}/cpu_framework_0.txt", encoding="utf-8") as lines:
        for line in lines:
            fields = line.strip().split(";")
            if len(fields) > 3:
                inputs = [f.split(":", 1)[1] for f in fields[3:] if f and "NoShape" not in f]
                shapes.setdefault(fields[1], []).append(
                    " ".join(inputs) if len(inputs) <= 4 else f"{len(inputs)} x {inputs[0]}")
    launches = []  # (start, short name, ms)
    with open(f"{framework}/cpu_op_execute_timestamp_0.txt", encoding="utf-8") as lines:
        for line in lines:
            full_name, _, timing = line.strip().split(";")
            start, duration = timing.split(",")[:2]
            launches.append((int(start), full_name.split("/")[-1], float(duration)))
    times, seen = {}, {}
    for _, name, duration in sorted(launches):
        kernels = shapes.get(name, ["?"])
        index = seen.get(name, 0)
        seen[name] = index + 1
        key = (name.split("-")[0], kernels[min(index, len(kernels) - 1)])
        entry = times.setdefault(key, [0.0, 0])
        entry[0] += duration
        entry[1] += 1
    return times


def print_profile(profile_dir, top=25):
    """The op types and the (op, shapes) that took the most time in the profiled step."""
    times = op_times(profile_dir)
    total = sum(ms_ for ms_, _ in times.values())
    by_type = {}
    for (op, _), (ms_, calls) in times.items():
        entry = by_type.setdefault(op, [0.0, 0])
        entry[0] += ms_
        entry[1] += calls
    print(f"op time in the profiled step: {total:.0f} ms\n\n| op | calls | ms | share |\n|---|---|---|---|")
    for op, (ms_, calls) in sorted(by_type.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {op} | {calls} | {ms_:.0f} | {ms_ / total:.1%} |")
    print("\n| op | input shapes | calls | ms |\n|---|---|---|---|")
    for (op, shape), (ms_, calls) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {op} | {shape} | {calls} | {ms_:.0f} |")


IMPLS = ("nsa", "dense", "dense_core", "torch")


def torch_importable():
    """Whether PyTorch can be imported here (the ``torch`` column is run only then)."""
    try:
        import torch  # noqa: F401  pylint: disable=import-outside-toplevel,import-error,unused-import
    except ImportError:
        return False
    return True


def memory_slopes(results):
    """``[(T0, T1, MB per added token)]`` between consecutive lengths of successful runs."""
    runs = sorted((r["T"], r["peak_mb"]) for r in results if r and not r.get("estimated"))
    return [(t0, t1, (m1 - m0) / (t1 - t0)) for (t0, m0), (t1, m1) in zip(runs, runs[1:])]
PARTIAL_CHUNKS = (2, 4)  # query chunks of the two partial full-mask runs behind an estimate


def run_subprocess(impl, total, layout, options):
    """One ``--one`` run in a fresh process -> its result dict, or None if it failed (out of memory)."""
    done = subprocess.run([sys.executable, __file__, "--one", impl, str(total), layout] + options,
                          capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if done.returncode == 0 and lines else None


def estimate_full_mask(total, layout, options):
    """The full-mask dense step at a ``T`` where it does not fit in memory, from two runs that attend
    only the first 2 and 4 query chunks to all ``T`` keys: every chunk of the full-mask dense does the
    same work (all ``T`` keys, whatever the mask), so the step is linear in the chunks attended;
    extended linearly to all ``ceil(T / DENSE_CHUNK)`` of them. None if a partial run fails too."""
    chunks = -(-total // DENSE_CHUNK)
    if chunks <= PARTIAL_CHUNKS[-1]:
        return None
    runs = [run_subprocess("dense", total, layout, options + ["--query-chunks", str(n)]) for n in PARTIAL_CHUNKS]
    if None in runs:
        return None
    (n0, n1), (r0, r1) = PARTIAL_CHUNKS, runs
    per_chunk = (r1["step_s"] - r0["step_s"]) / (n1 - n0)
    return {"impl": "dense", "T": total, "layout": layout, "estimated": True,
            "step_s": r1["step_s"] + (chunks - n1) * per_chunk, "partial": runs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--layouts", nargs="+", default=["one", "packed"], choices=["one", "packed"])
    parser.add_argument("--impls", nargs="+", default=None, choices=IMPLS,
                        help="default: nsa, dense, dense_core (nsa only for qwen3-1.7b), and torch if importable")
    parser.add_argument("--shape", default="bench", choices=sorted(SHAPES),
                        help="bench: hidden 256, 4 heads, 1 KV head, head_dim 64; qwen3-1.7b: 2048, 16, 8, 128")
    parser.add_argument("--steps", type=int, default=4, help="timed steps after compile and one warm-up")
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="NSA compute_dtype (on CPU bfloat16 is held in float32: slower, not the target)")
    parser.add_argument("--chunk", type=int, default=512, help="NSA query_chunk_size")
    parser.add_argument("--select-block-count", type=int, default=16, help="NSA n (blocks per query)")
    parser.add_argument("--select-dense-rows", type=int, default=None,
                        help="NSA select_dense_rows (default: NSAConfig's, 2 * n * 64)")
    parser.add_argument("--heads", type=int, default=HEADS,
                        help=f"query heads, all sharing the one KV head (default {HEADS})")
    parser.add_argument("--query-chunks", type=int, default=None,
                        help="dense only: attend the first N chunks of 1024 queries (to all T keys); "
                             "what the full-mask estimate measures")
    parser.add_argument("--one", nargs=3, metavar=("IMPL", "T", "LAYOUT"), help=argparse.SUPPRESS)
    parser.add_argument("--profile", nargs=3, metavar=("IMPL", "T", "LAYOUT"),
                        help="instead of the table: time one implementation in this process, then profile one "
                             "more step with MindSpore's profiler and print where its op time went")
    parser.add_argument("--profile-dir", default="profile_attention", help="where --profile writes the profiler files")
    args = parser.parse_args()
    if args.impls is None:
        args.impls = (["nsa"] if args.shape != "bench" else list(IMPLS[:3])) + (["torch"] if torch_importable() else [])
    if args.shape != "bench" and set(args.impls) & {"dense", "dense_core"}:
        parser.error(f"--shape {args.shape}: the dense baselines take one KV head; use --impls nsa torch")
    if args.profile:
        impl, total, layout = args.profile
        print(json.dumps(run_one(impl, int(total), layout, args.steps, args.chunk, args.select_block_count,
                                 args.select_dense_rows, args.heads, profile_dir=args.profile_dir, shape=args.shape,
                                 compute_dtype=args.compute_dtype)))
        print_profile(args.profile_dir)
        return
    if args.query_chunks is not None and (not args.one or args.one[0] != "dense" or args.query_chunks < 1):
        parser.error(f"--query-chunks {args.query_chunks}: only with --one dense, and at least 1")
    if args.one:
        impl, total, layout = args.one
        print(json.dumps(run_one(impl, int(total), layout, args.steps, args.chunk, args.select_block_count,
                                 args.select_dense_rows, args.heads, query_chunks=args.query_chunks,
                                 shape=args.shape, compute_dtype=args.compute_dtype)))
        return
    options = ["--steps", str(args.steps), "--chunk", str(args.chunk), "--select-block-count",
               str(args.select_block_count), "--heads", str(args.heads), "--shape", args.shape,
               "--compute-dtype", args.compute_dtype]  # every subprocess
    if args.select_dense_rows is not None:
        options += ["--select-dense-rows", str(args.select_dense_rows)]
    hidden, heads, kv_heads, head_dim = SHAPES[args.shape]
    heads = args.heads if args.shape == "bench" else heads
    print(f"NSASelfAttention vs dense ({args.shape}): hidden {hidden}, {heads} heads, {kv_heads} KV heads, "
          f"head_dim {head_dim}, l=32 d=16 l'=64 n={args.select_block_count}, window 512, {args.compute_dtype}, "
          f"NSA query chunk {args.chunk}"
          + (f", select_dense_rows {args.select_dense_rows}" if args.select_dense_rows is not None else "")
          + "; forward+backward, mindspore.jit; "
          "step time s (peak MB)\n")
    print("| layout | T | NSA | dense | dense / NSA | dense-core | dense-core / NSA | torch | torch / NSA | "
          "NSA compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    estimates = []  # the partial runs behind each estimated full-mask dense
    nsa_runs = {layout: [] for layout in args.layouts}
    for layout in args.layouts:
        for total in args.lengths:
            row = {impl: run_subprocess(impl, total, layout, options) for impl in args.impls}
            if "dense" in row and row["dense"] is None:
                row["dense"] = estimate_full_mask(total, layout, options)

            def cell(impl, row=row):
                if impl not in row:
                    return "-"  # not run (--impls)
                result = row[impl]
                if result is None:
                    return "failed"
                if result.get("estimated"):
                    return f"~{result['step_s']:.1f} (est.)"
                return f"{result['step_s']:.2f} ({result['peak_mb']:.0f})"

            def ratio(impl, row=row):
                nsa, other = row.get("nsa"), row.get(impl)
                if not (nsa and other):
                    return "-"
                return ("~" if other.get("estimated") else "") + f"{other['step_s'] / nsa['step_s']:.2f}"

            compile_s = f"{row['nsa']['compile_s']:.0f}" if row.get("nsa") else "-"
            nsa_runs[layout].append(row.get("nsa"))
            print(f"| {layout} | {total} | {cell('nsa')} | {cell('dense')} | {ratio('dense')} | "
                  f"{cell('dense_core')} | {ratio('dense_core')} | {cell('torch')} | {ratio('torch')} | "
                  f"{compile_s} |", flush=True)
            if row.get("dense") and row["dense"].get("estimated"):
                estimates.append(f"{layout} {total}: " + ", ".join(
                    f"{n} chunks {run['step_s']:.2f} s ({run['peak_mb']:.0f} MB)"
                    for n, run in zip(PARTIAL_CHUNKS, row["dense"]["partial"])))
    for layout, runs in nsa_runs.items():
        slopes = memory_slopes(runs)
        if slopes:
            print(f"\nNSA peak memory per added token, {layout}: " + ", ".join(
                f"{t0}->{t1}: {mb:.3f} MB" for t0, t1, mb in slopes))
    if estimates:
        print(f"\nest.: the full-mask dense out of memory; its partial runs (first query chunks of {DENSE_CHUNK} "
              "against all T keys), extended linearly to all chunks:\n" + "\n".join(estimates))


if __name__ == "__main__":
    main()
