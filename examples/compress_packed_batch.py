"""Compress the keys of a packed batch with ``nsa_layers.ops.nsa_compress`` and show what happened.

Three documents of 80, 12 and 96 tokens are packed into one TND tensor; the prefix sums
``actual_seq_len = (80, 92, 188)`` mark their ends. Windows of 32 tokens every 16 tokens are
compressed inside each document, never across a boundary; the 12-token document is shorter than a
window and gives none. The example then checks the result against a plain NumPy loop, takes the
gradient, and scores selection blocks with ``nsa_compress_attention``.

Run: ``make demo`` (or ``python examples/compress_packed_batch.py`` inside the project's venv).
"""

import argparse

import mindspore as ms
import numpy as np

from nsa_layers import packing
from nsa_layers.ops import nsa_compress, nsa_compress_attention, on_ascend


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, nargs="+", default=[80, 12, 96], help="document lengths in tokens")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=32, help="compress_block_size")
    parser.add_argument("--stride", type=int, default=16, help="compress_stride")
    parser.add_argument("--graph", action="store_true", help="run compiled with mindspore.jit")
    args = parser.parse_args()

    ms.set_context(mode=ms.PYNATIVE_MODE)
    rng = np.random.default_rng(0)
    prefix = tuple(int(v) for v in np.cumsum(args.docs))
    total, heads, dim, block, stride = prefix[-1], args.heads, args.dim, args.block, args.stride
    keys = ms.Tensor(rng.standard_normal((total, heads, dim)).astype(np.float32)).astype(ms.bfloat16)
    weight = ms.Tensor(np.full((block, heads), 1.0 / block, np.float32)).astype(ms.bfloat16)  # mean pooling

    print(f"device: {ms.get_context('device_target')} -> "
          f"{'Ascend kernel' if on_ascend() else 'pure-MindSpore fallback'}; "
          f"mode: {'graph' if args.graph else 'PyNative'}")
    print(f"packed keys: {keys.shape} {keys.dtype}, documents {args.docs}, actual_seq_len={prefix}")

    def compress(x, w):
        return nsa_compress(x, w, block, stride, actual_seq_len=prefix)

    run = ms.jit(compress) if args.graph else compress
    compressed = run(keys, weight)
    counts = packing.compressed_lengths(prefix, block, stride)
    starts = packing.window_starts(prefix, block, stride)
    print(f"windows of {block} tokens every {stride}: per document {counts.tolist()} -> output {compressed.shape} "
          f"{compressed.dtype}")
    for doc, (first, length) in enumerate(zip(packing.segment_starts(prefix), packing.segment_lengths(prefix))):
        mine = starts[(starts >= first) & (starts < first + length)]
        print(f"  document {doc}: rows [{first}, {first + length}) -> window starts {mine.tolist() or 'none'}")

    x = keys.astype(ms.float32).asnumpy().astype(np.float64)
    w = weight.astype(ms.float32).asnumpy().astype(np.float64)
    expected = np.stack([np.einsum("jn,jnd->nd", w, x[s:s + block]) for s in starts])
    error = np.abs(compressed.astype(ms.float32).asnumpy() - expected).max() / np.abs(expected).max()
    print(f"max relative difference to a float64 NumPy loop: {error:.1e} (bfloat16 output rounding is ~4e-3)")

    def loss(x_, w_):
        return compress(x_, w_).astype(ms.float32).square().sum()

    d_keys, d_weight = ms.grad(loss, grad_position=(0, 1))(keys, weight)
    untouched = int((np.abs(d_keys.astype(ms.float32).asnumpy()).sum(axis=(1, 2)) == 0).sum())
    print(f"gradients: d_keys {d_keys.shape}, d_weight {d_weight.shape}; {untouched} key rows read by no window "
          f"get exactly zero gradient")

    # Score selection blocks of 64 tokens from the compressed keys with the NSA masks a layer builds:
    # compressed window i is visible to in-document query t iff i*stride + block - 1 <= t.
    # A document with no window has no compressed keys to attend to: query only the others.
    with_windows = [d for d, c in enumerate(counts) if c > 0]
    q_lengths = packing.segment_lengths(prefix)[with_windows]
    qlen = tuple(int(v) for v in np.cumsum(q_lengths))
    cmplen = tuple(int(v) for v in np.cumsum(counts[with_windows]))
    doc_rows = np.concatenate([np.arange(packing.segment_starts(prefix)[d], prefix[d]) for d in with_windows])
    queries = ms.Tensor(rng.standard_normal((total, heads, dim)).astype(np.float32)[doc_rows]).astype(ms.bfloat16)
    longest, max_cmp = int(q_lengths.max()), int(counts.max())
    visible = np.arange(max_cmp)[None, :] * stride + block - 1 <= np.arange(longest)[:, None]
    n_sel = -(-max_cmp // (64 // stride))
    force = np.zeros((longest, n_sel), bool)
    force[:, 0] = True
    _, top, _, _ = nsa_compress_attention(
        queries, compressed, compressed, dim ** -0.5, heads, block, stride, 64, 1,
        topk_mask=ms.Tensor(force), atten_mask=ms.Tensor(~visible), actual_seq_qlen=qlen,
        actual_cmp_seq_kvlen=cmplen, actual_sel_seq_kvlen=cmplen)
    print(f"nsa_compress_attention over documents {with_windows}: top-1 selection block per query {top.shape}; "
          f"block 0 is forced, so every query picks block {sorted(set(top.asnumpy().reshape(-1).tolist()))}")
    print("done")


if __name__ == "__main__":
    main()
