"""Benchmark (not a test): one decode step of NSA over its cache against dense attention over a
full K/V cache, graph mode, CPU.

Both decode ``B`` sequences holding ``context`` tokens each and add one token per sequence per step.
NSA is :class:`nsa_layers.NSADecoder`'s step (the paper's sizes: l=32, d=16, l'=64, n=16, w=512,
shared K/V); dense is the same kind of cell with the same ops (``ScatterUpdate`` into a static
cache, ``Gather`` of the slot's rows, ``attention_forward``) over every cached key. The caches are
filled with random keys and values instead of a prefill (the step's cost does not depend on them).
Reported: the step's median wall time over the timed steps (after compiling and a warm-up) and the
cache's size. Shape: 16 query heads, 4 KV heads (GQA groups of 4), head dim 128.

Run: ``python bench/bench_decode.py [--contexts 1024 4096 ...] [--batches 1 8] [--steps 6]``; each
(context, batch) runs in a fresh subprocess.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np

HEADS, KV_HEADS, HEAD_DIM = 16, 4, 128


def run_one(context, batch, steps):
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from mindspore import Parameter, Tensor, nn, ops  # pylint: disable=import-outside-toplevel

    from nsa_layers import NativeSparseAttention, NSAConfig, NSADecoder  # pylint: disable=import-outside-toplevel
    from nsa_layers.attention_math import MASKED, attention_forward  # pylint: disable=import-outside-toplevel

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    rng = np.random.default_rng(0)
    max_len = context + steps + 2
    cfg = NSAConfig(hidden_size=HEADS * HEAD_DIM, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                    v_head_dim=HEAD_DIM, independent_kv=False)

    class DenseStep(nn.Cell):
        """Dense decode: write the new token's K/V, attend to all of its slot's rows up to it."""

        def __init__(self):
            super().__init__()
            shape = (batch * max_len * KV_HEADS, HEAD_DIM)
            self.k_cache = Parameter(Tensor(rng.standard_normal(shape).astype(np.float32)), name="dense_k",
                                     requires_grad=False)
            self.v_cache = Parameter(Tensor(rng.standard_normal(shape).astype(np.float32)), name="dense_v",
                                     requires_grad=False)
            self.lengths = Parameter(Tensor(np.full((batch,), context, np.int32)), name="dense_lengths",
                                     requires_grad=False)
            self.keys = Tensor(np.arange(max_len, dtype=np.int32))
            self.heads = Tensor(np.arange(KV_HEADS, dtype=np.int32))
            self.slots = Tensor(np.arange(batch, dtype=np.int32))
            self.scatter = ops.ScatterUpdate()

        def construct(self, q, k, v):
            position = self.lengths
            rows = (self.slots * max_len + position).reshape(-1, 1) * KV_HEADS + self.heads.reshape(1, -1)
            self.scatter(self.k_cache, rows, k)
            self.scatter(self.v_cache, rows, v)
            every = ((self.slots.reshape(-1, 1) * max_len + self.keys.reshape(1, -1)).reshape(batch, 1, max_len)
                     * KV_HEADS + self.heads.reshape(1, -1, 1))  # (B, Hkv, max_len)
            keys = ops.gather(self.k_cache, every.reshape(-1), 0).reshape(batch * KV_HEADS, max_len, HEAD_DIM)
            values = ops.gather(self.v_cache, every.reshape(-1), 0).reshape(batch * KV_HEADS, max_len, HEAD_DIM)
            visible = self.keys.reshape(1, -1) <= position.reshape(-1, 1)
            bias = ops.tile(((1 - visible.astype(ms.float32)) * MASKED).reshape(batch, 1, 1, max_len),
                            (1, KV_HEADS, 1, 1)).reshape(batch * KV_HEADS, 1, max_len)
            out = attention_forward(q.reshape(batch * KV_HEADS, HEADS // KV_HEADS, HEAD_DIM), keys, values, bias,
                                    HEAD_DIM ** -0.5)[0]
            ops.assign(self.lengths, self.lengths + 1)
            return out.reshape(batch, HEADS, HEAD_DIM)

    def random_inputs():
        return (Tensor(rng.standard_normal((batch, HEADS, HEAD_DIM)).astype(np.float32)),
                Tensor(rng.standard_normal((batch, KV_HEADS, HEAD_DIM)).astype(np.float32)),
                Tensor(rng.standard_normal((batch, KV_HEADS, HEAD_DIM)).astype(np.float32)))

    def timed(call):
        times = []
        for _ in range(steps + 2):
            args = random_inputs()
            start = time.perf_counter()
            call(*args).asnumpy()
            times.append(time.perf_counter() - start)
        return statistics.median(times[2:])

    dense = DenseStep()
    dense_s = timed(dense)
    dense_mb = sum(p.asnumpy().nbytes for p in (dense.k_cache, dense.v_cache)) / 2 ** 20
    del dense

    decoder = NSADecoder(NativeSparseAttention(cfg), batch, max_len)
    cache = decoder.cache
    for param in (cache.k_selected, cache.v_selected, cache.k_compressed, cache.v_compressed):
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32)))
    cache.lengths.set_data(Tensor(np.full((batch,), context, np.int32)))
    gates = Tensor(rng.random((batch, HEADS, 3)).astype(np.float32))
    counts = [1] * batch
    nsa_s = timed(lambda q, k, v: decoder.step(q, k, v, gates, counts)["out"])
    nsa_mb = sum(p.asnumpy().nbytes for p in cache.get_parameters()) / 2 ** 20
    return {"context": context, "batch": batch, "dense_ms": dense_s * 1e3, "nsa_ms": nsa_s * 1e3,
            "dense_cache_mb": dense_mb, "nsa_cache_mb": nsa_mb}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=6, help="timed steps after compiling and one warm-up")
    parser.add_argument("--one", nargs=2, type=int, metavar=("CONTEXT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.steps)))
        return
    print("| context | batch | dense step ms | NSA step ms | NSA speed-up | dense cache MB | NSA cache MB |")
    print("|---|---|---|---|---|---|---|")
    for context in args.contexts:
        for batch in args.batches:
            proc = subprocess.run([sys.executable, __file__, "--one", str(context), str(batch), "--steps",
                                   str(args.steps)], capture_output=True, text=True, check=False)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode or not lines:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"| {context} | {batch} | failed: {tail[:80]} | | | | |", flush=True)
                continue
            row = json.loads(lines[-1])
            print(f"| {context} | {batch} | {row['dense_ms']:.1f} | {row['nsa_ms']:.1f} | "
                  f"{row['dense_ms'] / row['nsa_ms']:.1f}x | {row['dense_cache_mb']:.0f} | {row['nsa_cache_mb']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
