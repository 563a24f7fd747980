"""Benchmark of the nsa_compress CPU fallback (not a test): time and effective bandwidth.

For three shapes it prints the forward and forward+backward time of the pure-MindSpore fallback
(float32 compute; PyNative and compiled with ``mindspore.jit``), next to a NumPy float32
implementation of the same op (a loop over windows; its backward as explicit loops), PyTorch CPU
autograd if torch is installed, and the bandwidth floor measured with a NumPy copy.

Effective GB/s counts the input read once plus the output written once; "x floor" is the time over
the time a copy of those bytes takes at the measured copy bandwidth.

Run: ``make bench`` (or ``python bench/bench_compress.py [--repeat N] [--shapes small medium long]``).
"""

import argparse
import statistics
import time

import mindspore as ms
import numpy as np

from nsa_layers import packing
from nsa_layers.ops import nsa_compress
from nsa_layers.ops.compress import compress_windows

SHAPES = {
    # name: (segment lengths, heads N, dim D, block, stride)
    "small": ([80, 96, 80], 8, 128, 64, 16),        # the documentation example
    "medium": ([2048] * 8, 16, 128, 32, 16),
    "long": ([65536], 4, 128, 32, 16),
}


def median_ms(fn, repeat):
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def copy_bandwidth_gbs(repeat):
    src = np.ones(64 * 2 ** 20, np.float32)  # 256 MiB
    dst = np.empty_like(src)
    seconds = median_ms(lambda: np.copyto(dst, src), repeat) / 1e3
    return 2 * src.nbytes / seconds / 1e9


def sync(tensors):
    for t in tensors if isinstance(tensors, (tuple, list)) else (tensors,):
        t.reshape(-1)[0:1].asnumpy()  # PyNative runs asynchronously: read back to time the work


def mindspore_rows(x, w, block, stride, prefix, dy, repeat):
    xt, wt, dyt = ms.Tensor(x), ms.Tensor(w), ms.Tensor(dy)

    def forward(a, b):
        return compress_windows(a, b, block, stride, prefix)

    def loss(a, b):
        return (compress_windows(a, b, block, stride, prefix) * dyt).sum()

    grad = ms.grad(loss, grad_position=(0, 1))
    rows = {}
    for mode, fwd, bwd in (("PyNative", forward, grad), ("ms.jit", ms.jit(forward), ms.jit(grad))):
        rows[f"MindSpore fallback, {mode}"] = (
            median_ms(lambda fwd=fwd: sync(fwd(xt, wt)), repeat), median_ms(lambda bwd=bwd: sync(bwd(xt, wt)), repeat))
    x16, w16 = xt.astype(ms.float16), wt.astype(ms.float16)

    def forward16(a, b):
        return nsa_compress(a, b, block, stride, actual_seq_len=prefix)

    jit16 = ms.jit(forward16)
    rows["nsa_compress float16 in/out, ms.jit"] = (median_ms(lambda: sync(jit16(x16, w16)), repeat), None)
    return rows


def numpy_rows(x, w, block, stride, prefix, dy, repeat):
    starts = packing.window_starts(prefix, block, stride)

    def forward():
        out = np.empty((starts.size,) + x.shape[1:], np.float32)
        for c, s in enumerate(starts):
            np.einsum("jn,jnd->nd", w, x[s:s + block], out=out[c])
        return out

    def forward_backward():
        forward()
        dx = np.zeros_like(x)
        dw = np.zeros_like(w)
        for c, s in enumerate(starts):
            dx[s:s + block] += w[:, :, None] * dy[c][None]
            dw += np.einsum("nd,jnd->jn", dy[c], x[s:s + block])
        return dx, dw

    return {"NumPy float32, loop over windows": (median_ms(forward, repeat), median_ms(forward_backward, repeat))}


def torch_rows(x, w, block, stride, prefix, dy, repeat):
    """PyTorch CPU autograd of a block-diagonal matmul on a view of x (needs chunk-aligned segments)."""
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
        return {}
    chunk = int(np.gcd(block, stride))
    starts = packing.window_starts(prefix, block, stride)
    if np.any(packing.segment_starts(prefix) % chunk) or x.shape[0] % chunk:
        return {}
    total, heads, dim = x.shape
    per_window = block // chunk
    xt = torch.from_numpy(x).requires_grad_(True)
    wt = torch.from_numpy(w).requires_grad_(True)
    dyt = torch.from_numpy(dy)
    first_chunk = torch.from_numpy(starts // chunk)
    eye = torch.eye(heads)

    def forward():
        # Wbd[q*N + n, b*N + m] = w[q*B + b, n] * (n == m); z[k, q] = sum_b w[q*B + b] x[k*B + b]
        wbd = wt.reshape(per_window, chunk, heads).permute(0, 2, 1)[:, :, :, None] * eye[None, :, None, :]
        wbd = wbd.reshape(per_window * heads, chunk * heads)
        z = torch.matmul(wbd, xt.reshape(total // chunk, chunk * heads, dim))
        z = z.reshape(total // chunk, per_window, heads, dim)
        return sum(z[first_chunk + q, q] for q in range(per_window))

    def forward_backward():
        xt.grad = wt.grad = None
        (forward() * dyt).sum().backward()

    with torch.no_grad():
        check = forward().numpy()
    expected = np.stack([np.einsum("jn,jnd->nd", w, x[s:s + block]) for s in starts[:64]])
    if not np.allclose(check[:64], expected, rtol=1e-4, atol=1e-4):
        raise AssertionError("the PyTorch formulation disagrees with the NumPy loop")
    return {f"PyTorch {torch.__version__} CPU autograd ({torch.get_num_threads()} threads)": (
        median_ms(lambda: forward().detach(), repeat), median_ms(forward_backward, repeat))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    ms.set_context(mode=ms.PYNATIVE_MODE)
    bandwidth = copy_bandwidth_gbs(args.repeat)
    print(f"measured copy bandwidth (NumPy copyto, read + write): {bandwidth:.1f} GB/s\n")
    for name in args.shapes:
        lengths, heads, dim, block, stride = SHAPES[name]
        prefix = tuple(int(v) for v in np.cumsum(lengths))
        rng = np.random.default_rng(0)
        x = rng.standard_normal((prefix[-1], heads, dim)).astype(np.float32)
        w = rng.standard_normal((block, heads)).astype(np.float32)
        rows_out = int(packing.compressed_lengths(prefix, block, stride).sum())
        dy = rng.standard_normal((rows_out, heads, dim)).astype(np.float32)
        moved = (x.nbytes + dy.nbytes) / 1e9  # input read once + output written once (float32)
        floor_ms = 1e3 * moved / bandwidth
        rows = {}
        rows.update(mindspore_rows(x, w, block, stride, prefix, dy, args.repeat))
        rows.update(numpy_rows(x, w, block, stride, prefix, dy, args.repeat))
        rows.update(torch_rows(x, w, block, stride, prefix, dy, args.repeat))
        print(f"### {name}: T={prefix[-1]} ({len(lengths)} segments), N={heads}, D={dim}, block {block}, "
              f"stride {stride}, T'={rows_out}; {1e3 * moved:.1f} MB moved, floor {floor_ms:.2f} ms\n")
        print("| implementation | forward ms | GB/s | x floor | forward+backward ms |")
        print("|---|---|---|---|---|")
        for label, (fwd, both) in rows.items():
            both_text = "-" if both is None else f"{both:.1f}"
            print(f"| {label} | {fwd:.2f} | {moved / (fwd / 1e3):.1f} | {fwd / floor_ms:.1f} | {both_text} |")
        print()


if __name__ == "__main__":
    main()
