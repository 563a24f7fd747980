"""The sharded NSA core (``nsa_layers.parallel``): its declared layouts, read back from the Morph built
under a semi-auto parallel context, and an exact per-rank emulation: each rank of a ``(dp, cp, tp)``
device matrix runs the Morph body on the slices the declared layouts give it, and the outputs and
every gradient, reassembled by the layouts, equal the unsplit core."""

import dataclasses
import json
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, context, nn
from mindspore.context import ParallelMode

from helpers.common import random_normal
from helpers.msrun import run_two_ranks
from helpers.nsa_cases import small_config
from helpers.sharding import assemble, local_shard, rank_coordinates, summed
from nsa_layers import NativeSparseAttention
from nsa_layers.parallel import NSACoreShard, check_tensor_parallel, core_layouts

INPUTS_SHARED = ("q", "k", "v", "gates", "actual_seq_len", "k_weight", "v_weight", "v_position_embedding")
INPUTS_INDEPENDENT = ("q", "k_cmp", "k_slc", "k_win", "v_cmp", "v_slc", "v_win", "gates", "actual_seq_len",
                      "k_weight", "v_weight", "v_position_embedding")


def _probed(body, probe):
    """``sum(body(*inputs) * probe)`` as a function of the inputs."""
    return lambda *inputs: (body(*inputs) * probe).sum()


def _layout_of(layouts, name):
    """The declared layout of a Morph input (the branches' K/V share the K or V layout)."""
    kinds = {"k_cmp": "k", "k_slc": "k", "k_win": "k", "v_cmp": "v", "v_slc": "v", "v_win": "v",
             "k_weight": "compressor_weight", "v_weight": "compressor_weight",
             "v_position_embedding": "position_embedding"}
    return getattr(layouts, kinds.get(name, name))


class Batch:
    """A random global batch: ``dp * rows`` batch rows of ``row_length`` tokens, each data-parallel
    shard's documents given as its own prefix sums (MindFormers' per-rank ``actual_seq_len``), random
    compressor parameters."""

    def __init__(self, cfg, documents, row_length, seed):
        rng = np.random.default_rng(seed)
        self.cfg, self.row_length = cfg, row_length
        self.shard_rows = sum(documents[0])
        assert all(sum(d) == self.shard_rows for d in documents)
        total = self.shard_rows * len(documents)
        hkv, block = cfg.num_kv_heads, cfg.compress_block_size
        branches = ("cmp", "slc", "win") if cfg.independent_kv else ("",)
        self.arrays = {"q": random_normal(rng, (total, cfg.num_heads, cfg.head_dim)),
                       "gates": rng.random((total, cfg.num_heads, 3)).astype(np.float32),
                       "k_weight": random_normal(rng, (block, hkv)), "v_weight": random_normal(rng, (block, hkv)),
                       "v_position_embedding": random_normal(rng, (block, hkv, cfg.v_head_dim), 0.5)}
        for branch in branches:
            suffix = f"_{branch}" if branch else ""
            self.arrays["k" + suffix] = random_normal(rng, (total, hkv, cfg.head_dim))
            self.arrays["v" + suffix] = random_normal(rng, (total, hkv, cfg.v_head_dim))
        # each shard's own prefix sums, padded alike (a leading 0 and a repeated end, as MindFormers pads)
        width = max(len(d) for d in documents) + 2
        local = [np.concatenate(([0], np.cumsum(d), [self.shard_rows] * (width - len(d) - 1))).astype(np.int32)
                 for d in documents]
        self.arrays["actual_seq_len"] = np.concatenate(local)
        # the same layout as global prefix sums, with every batch row's end, for the unsplit core
        ends = [e + i * self.shard_rows for i, sums in enumerate(local) for e in sums]
        self.global_ends = tuple(sorted(set(ends) | set(range(row_length, total + 1, row_length))))
        self.probe = random_normal(rng, (total, cfg.num_heads, cfg.v_head_dim))
        self.names = INPUTS_INDEPENDENT if cfg.independent_kv else INPUTS_SHARED

    def unsplit(self, with_grads):
        """Output, and gradients by input name, of the unsplit core."""
        net = NativeSparseAttention(self.cfg)
        net.k_compressor.weight.set_data(Tensor(self.arrays["k_weight"]))
        net.v_compressor.weight.set_data(Tensor(self.arrays["v_weight"]))
        net.v_compressor.position_embedding.set_data(Tensor(self.arrays["v_position_embedding"]))
        a = {name: Tensor(x) for name, x in self.arrays.items()}
        if self.cfg.independent_kv:
            def run(q, kc, ks, kw, vc, vs, vw, g):
                return net(q, (kc, ks, kw), (vc, vs, vw), g, self.global_ends)
            tensor_names = ("q", "k_cmp", "k_slc", "k_win", "v_cmp", "v_slc", "v_win", "gates")
        else:
            def run(q, k, v, g):
                return net(q, k, v, g, self.global_ends)
            tensor_names = ("q", "k", "v", "gates")
        args = [a[name] for name in tensor_names]
        out = run(*args).asnumpy()
        if not with_grads:
            return out, {}
        probe = Tensor(self.probe)
        inputs, weights = ms.grad(lambda *x: (run(*x) * probe).sum(), grad_position=tuple(range(len(args))),
                                  weights=net.trainable_params())(*args)
        grads = dict(zip(tensor_names, (g.asnumpy() for g in inputs)))
        params = {p.name: g.asnumpy() for p, g in zip(net.trainable_params(), weights)}
        grads.update(k_weight=params["k_compressor.weight"], v_weight=params["v_compressor.weight"],
                     v_position_embedding=params["v_compressor.position_embedding"])
        return out, grads

    def ranks(self, dp, cp, tp, with_grads):
        """Every rank's output and gradients by input name: the Morph body on its declared slices."""
        layouts = core_layouts(dp, cp, tp)
        results = []
        for rank in range(dp * cp * tp):
            shard = NSACoreShard(self.cfg, dp, cp, tp, row_length=self.row_length,
                                 cp_rank=rank_coordinates((dp, cp, tp), rank)[1])
            body = shard.rank_forward_independent_kv if self.cfg.independent_kv else shard.rank_forward
            local = [Tensor(np.ascontiguousarray(local_shard(self.arrays[name], _layout_of(layouts, name), rank)))
                     for name in self.names]
            out = body(*local).asnumpy()
            grads = {}
            if with_grads:
                probe = Tensor(np.ascontiguousarray(local_shard(self.probe, layouts.out, rank)))
                positions = tuple(i for i, name in enumerate(self.names) if name != "actual_seq_len")
                values = ms.grad(_probed(body, probe), grad_position=positions)(*local)
                grads = {self.names[i]: g.asnumpy() for i, g in zip(positions, values)}
            results.append((out, grads))
        return layouts, results


def _check(batch, dp, cp, tp, with_grads):
    full_out, full_grads = batch.unsplit(with_grads)
    layouts, ranks = batch.ranks(dp, cp, tp, with_grads)
    np.testing.assert_allclose(assemble([out for out, _ in ranks], layouts.out, full_out.shape), full_out,
                               rtol=1e-5, atol=1e-5)
    for name, full in full_grads.items():
        # a block held by several ranks (K/V over cp, parameters over dp and cp) gets their sum
        got = summed([grads[name] for _, grads in ranks], _layout_of(layouts, name), full.shape)
        np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5, err_msg=name)
        assert np.abs(full).max() > 0, name


def _config(independent_kv=False):
    return small_config(num_heads=8, num_kv_heads=4, query_chunk_size=16, window_size=10, select_dense_rows=32,
                        independent_kv=independent_kv)


def test_context_and_tensor_parallel_ranks_reassemble_to_the_unsplit_core():
    """cp 2 x tp 2 (4 ranks), forward: a 37-token document crosses the context-parallel split at row
    32; 0-length and 3-token ones (shorter than a block) too. (dp 2 x cp 2 with gradients: slow tier.)"""
    batch = Batch(_config(), [[21, 37, 0, 3, 3]], row_length=64, seed=41)
    _check(batch, 1, 2, 2, with_grads=False)


@pytest.mark.slow  # a PyNative forward and backward per rank: 5-10 s each
@pytest.mark.parametrize("dp, cp, tp, independent_kv", [
    (1, 1, 2, False), (1, 1, 4, True), (1, 2, 1, False), (1, 2, 2, True), (2, 2, 1, False), (1, 4, 1, False)])
def test_ranks_forward_and_every_gradient_reassemble(dp, cp, tp, independent_kv):
    """Query and gate gradients are the ranks' blocks; K/V gradients sum over the context-parallel
    ranks (the all-gather's backward), parameter gradients over the data- and context-parallel ranks."""
    documents = [[21, 37, 0, 3, 3], [9, 9, 46]][:dp]
    batch = Batch(_config(independent_kv), documents, row_length=64, seed=42 + tp)
    _check(batch, dp, cp, tp, with_grads=True)


@pytest.mark.slow  # an msrun job of two processes, each a forward and backward: about 40 s
@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_context_parallel_across_two_processes_equals_one(mode, tmp_path):
    """cp 2 with real communication (``helpers/context_parallel_ranks.py``): each process holds its own
    rows of q, k, v and gates, all-gathers K/V across the processes and all-reduces the compressor
    gradients. Its output rows and the gradients of its rows and of the parameters equal the
    single-process core's; a 37-token document crosses the split at row 32."""
    batch = Batch(_config(), [[21, 37, 0, 3, 3]], row_length=64, seed=45)
    (tmp_path / "config.json").write_text(json.dumps(dict(dataclasses.asdict(batch.cfg), row_length=batch.row_length)))
    np.savez(tmp_path / "batch.npz", probe=batch.probe, **batch.arrays)
    run_two_ranks(Path(__file__).resolve().parents[1] / "helpers" / "context_parallel_ranks.py", (tmp_path, mode),
                  tmp_path)
    ranks = [np.load(tmp_path / f"rank_{rank}.npz") for rank in range(2)]
    full_out, full_grads = batch.unsplit(with_grads=True)
    np.testing.assert_allclose(np.concatenate([r["out"] for r in ranks]), full_out, rtol=1e-5, atol=1e-5)
    for name, full in full_grads.items():
        if name in ("k_weight", "v_weight", "v_position_embedding"):
            got = [r[name] for r in ranks]  # all-reduced: every rank holds the sum
        else:
            got = [np.concatenate([r[name] for r in ranks])]  # each rank's own rows
        for value in got:
            np.testing.assert_allclose(value, full, rtol=1e-5, atol=1e-5, err_msg=name)
        assert np.abs(full).max() > 0, name


def test_tensor_parallel_size_must_divide_the_kv_heads():
    check_tensor_parallel(8, 4, 4)
    with pytest.raises(ValueError, match=r"tensor-parallel size 4 must divide num_kv_heads=2 \(and num_heads=8\)"):
        check_tensor_parallel(8, 2, 4)
    with pytest.raises(ValueError, match="positive integer, but got 0"):
        check_tensor_parallel(8, 2, 0)
    with pytest.raises(ValueError, match="must divide num_kv_heads=4"):
        NSACoreShard(_config(), tp=8)


@pytest.fixture
def semi_auto_parallel():
    """A semi-auto parallel context (construction only: MindSpore compiles none on CPU), then stand-alone."""
    def enter(devices):
        context.set_auto_parallel_context(parallel_mode=ParallelMode.SEMI_AUTO_PARALLEL, device_num=devices)
    yield enter
    context.reset_auto_parallel_context()


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("cp", [1, 2])
@pytest.mark.parametrize("independent_kv", [False, True])
def test_declared_layouts_read_back_from_the_morph(semi_auto_parallel, tp, cp, independent_kv):
    """Tensor maps count device-matrix axes from the last (tp = 0, cp = 1, dp = 2), -1 is whole."""
    dp = 2
    semi_auto_parallel(dp * cp * tp)
    shard = NSACoreShard(_config(independent_kv), dp, cp, tp, row_length=64)
    shard.declare_layouts()
    ins, outs = shard.morph.attrs["in_layout"], shard.morph.attrs["out_layout"]
    rows, keys = ((2, 1), 0, -1), (2, 0, -1)  # queries: tokens by dp then cp; keys: by dp (gathered over cp)
    kv = (keys,) * (6 if independent_kv else 2)
    expected = (rows,) + kv + (rows, (2,), (-1, 0), (-1, 0), (-1, 0, -1))
    assert tuple(tuple(layout["tensor_map"]) for layout in ins) == expected
    assert [tuple(layout["tensor_map"]) for layout in outs] == [rows]
    assert all(tuple(layout["device_matrix"]) == (dp, cp, tp) for layout in ins + outs)
    assert shard.morph.attrs["self_define_shard"] is True


@pytest.mark.slow  # two graph-mode compilations of a forward and backward: about 60 s
def test_morph_in_graph_mode_equals_the_core():
    """Without a parallel context the Morph runs its body on the whole tensors: forward and every
    gradient (inputs and compressor parameters) equal the plain core's, bitwise; documents cross batch
    rows in the fed prefix sums, and the body cuts them at the row ends as the host attention does."""
    cfg = _config()
    batch = Batch(cfg, [[21, 37, 0, 3, 3, 32]], row_length=32, seed=43)
    net = NativeSparseAttention(cfg)
    for name, param in (("k_weight", net.k_compressor.weight), ("v_weight", net.v_compressor.weight),
                        ("v_position_embedding", net.v_compressor.position_embedding)):
        param.set_data(Tensor(batch.arrays[name]))
    a = {name: Tensor(x) for name, x in batch.arrays.items()}
    probe = Tensor(batch.probe)

    class Plain(nn.Cell):
        def __init__(self):
            super().__init__()
            self.net = net

        def construct(self, q, k, v, g):
            return (self.net(q, k, v, g, batch.global_ends) * probe).sum()

    class Sharded(nn.Cell):
        def __init__(self):
            super().__init__()
            self.net = net
            self.core_shard = NSACoreShard(cfg, row_length=32)

        def construct(self, q, k, v, g):
            net = self.net
            return (self.core_shard(q, k, v, g, a["actual_seq_len"], net.k_compressor.weight,
                                    net.v_compressor.weight, net.v_compressor.position_embedding) * probe).sum()

    results = []
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        for cell in (Plain(), Sharded()):
            inputs, weights = ms.grad(cell, grad_position=(0, 1, 2, 3), weights=net.trainable_params())(
                a["q"], a["k"], a["v"], a["gates"])
            out = cell(a["q"], a["k"], a["v"], a["gates"])
            results.append([out.asnumpy()] + [x.asnumpy() for x in inputs + weights])
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert len(results[0]) == 8
    for ours, theirs in zip(*results):
        np.testing.assert_array_equal(ours, theirs)
