"""One rank of a 2-process ``msrun`` job (CPU, ``mccl``): the context-parallel NSA core with real
communication. Each rank holds its own rows of the batch's queries, gates, keys and values (what the
context-parallel split of the sequence gives it), all-gathers the keys and values across the processes,
runs the sharded core's body (``NSACoreShard.rank_forward``) on its query rows, and all-reduces the
gradients of the replicated compressor parameters, as the engine's gradient reduction would. It writes
its output rows and gradients to ``OUT/rank_R.npz``.

Usage (from tests/layers/test_parallel.py): ``msrun ... context_parallel_ranks.py OUT MODE``, MODE
``pynative`` or ``graph``, with ``OUT/config.json`` (the ``NSAConfig`` fields and ``row_length``) and
``OUT/batch.npz`` (the whole batch, written by the test).
"""

import json
import os
import sys

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.communication import get_group_size, get_rank, init

from nsa_layers import NSAConfig
from nsa_layers.parallel import NSACoreShard


class GatherTokens(nn.Cell):
    """All-gather along the token axis. Its backward is this rank's rows of the all-reduced gradient:
    what the all-gather's own backward (ReduceScatter) gives, which has no CPU kernel."""

    def __init__(self, rank):
        super().__init__()
        self.all_gather, self.all_reduce, self.rank = ops.AllGather(), ops.AllReduce(), rank

    def construct(self, x):
        return self.all_gather(x)

    def bprop(self, x, out, dout):
        rows = x.shape[0]
        return (self.all_reduce(dout)[self.rank * rows:(self.rank + 1) * rows],)


class RankLoss(nn.Cell):
    """``sum(body(q, all_gather(k), all_gather(v), ...) * probe)`` on this rank's rows. The keys and
    values go through one all-gather (side by side), so each backward has one all-reduce: two
    independent collectives may run in a different order on ranks whose graphs differ (each rank's
    query offset is static), and a ring all-reduce then pairs tensors of different sizes."""

    def __init__(self, shard, rank):
        super().__init__()
        self.core_shard, self.gather = shard, GatherTokens(rank)

    def construct(self, q, k, v, gates, actual_seq_len, k_weight, v_weight, v_position_embedding, probe):
        rows, heads, dim = k.shape
        kv = self.gather(ops.cat((k.reshape(rows, heads * dim), v.reshape(rows, -1)), 1))
        k_all, v_all = kv[:, :heads * dim].reshape(-1, heads, dim), kv[:, heads * dim:].reshape(-1, heads, v.shape[2])
        out = self.core_shard.rank_forward(q, k_all, v_all, gates, actual_seq_len, k_weight, v_weight,
                                           v_position_embedding)
        return (out * probe).sum(), out


def main():
    out_dir, mode = sys.argv[1:3]
    ms.set_context(mode={"pynative": ms.PYNATIVE_MODE, "graph": ms.GRAPH_MODE}[mode])
    init()
    rank, ranks = get_rank(), get_group_size()
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
        settings = json.load(f)
    row_length = settings.pop("row_length")
    cfg = NSAConfig(**settings)
    batch = np.load(os.path.join(out_dir, "batch.npz"))
    tokens = batch["q"].shape[0]
    own = slice(rank * tokens // ranks, (rank + 1) * tokens // ranks)
    shard = NSACoreShard(cfg, cp=ranks, row_length=row_length, cp_rank=rank)
    args = [Tensor(np.ascontiguousarray(batch[name][own])) for name in ("q", "k", "v", "gates")]
    args += [Tensor(batch[name]) for name in ("actual_seq_len", "k_weight", "v_weight", "v_position_embedding")]
    args.append(Tensor(np.ascontiguousarray(batch["probe"][own])))
    (_, out), grads = ms.value_and_grad(RankLoss(shard, rank), grad_position=(0, 1, 2, 3, 5, 6, 7),
                                        has_aux=True)(*args)
    names = ("q", "k", "v", "gates", "k_weight", "v_weight", "v_position_embedding")
    result = {name: g for name, g in zip(names, grads)}
    for name in ("k_weight", "v_weight", "v_position_embedding"):
        result[name] = ops.AllReduce()(result[name])  # the gradient reduction over the replicas
    np.savez(os.path.join(out_dir, f"rank_{rank}.npz"), out=out.asnumpy(),
             **{name: g.asnumpy() for name, g in result.items()})


if __name__ == "__main__":
    main()
