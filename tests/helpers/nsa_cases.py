"""Random NSA layer cases shared by the layer tests: a core with random parameters, random inputs,
and helpers to run it and the float64 reference."""

import numpy as np
from mindspore import Tensor

from nsa_layers import NativeSparseAttention, NSAConfig

from . import nsa_reference as nref
from .common import random_normal

BRANCHES = ("cmp", "slc", "win")


def small_config(**changes):
    """Small sizes that still exercise every rule: windows of 8 every 4, blocks of 16, 3 selected."""
    values = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=8, compress_block_size=8,
                  compress_stride=4, select_block_size=16, select_block_count=3, num_init_blocks=1,
                  num_local_blocks=1, window_size=6, query_chunk_size=24)
    values.update(changes)
    return NSAConfig(**values)


class Case:
    """A core with random parameters and random float32 inputs on a packed layout."""

    def __init__(self, cfg, lengths, seed, shared_kv=False):
        rng = np.random.default_rng(seed)
        self.cfg = cfg
        self.lengths = list(lengths)
        self.prefix = tuple(int(v) for v in np.cumsum(lengths))
        total = self.prefix[-1]
        hkv, dq, dv, block = cfg.num_kv_heads, cfg.head_dim, cfg.v_head_dim, cfg.compress_block_size
        self.q = random_normal(rng, (total, cfg.num_heads, dq))
        pairs = [(random_normal(rng, (total, hkv, dq)), random_normal(rng, (total, hkv, dv)))
                 for _ in range(1 if shared_kv else 3)]
        self.kv = {name: pairs[0 if shared_kv else i] for i, name in enumerate(BRANCHES)}
        self.shared_kv = shared_kv
        self.gates = rng.random((total, cfg.num_heads, 3)).astype(np.float32)
        self.weights = {"w_k": random_normal(rng, (block, hkv)), "w_v": random_normal(rng, (block, hkv)),
                        "pe_k": None,  # keys have no position embedding (it would be inert)
                        "pe_v": random_normal(rng, (block, hkv, dv), 0.5) if cfg.use_position_embedding else None}
        self.net = NativeSparseAttention(cfg)
        self.net.k_compressor.weight.set_data(Tensor(self.weights["w_k"]))
        self.net.v_compressor.weight.set_data(Tensor(self.weights["w_v"]))
        if cfg.use_position_embedding:
            self.net.v_compressor.position_embedding.set_data(Tensor(self.weights["pe_v"]))

    def tensors(self, q=None, kv=None, gates=None):
        """MindSpore inputs ``(q, k, v, gates)``; ``k``/``v`` are tensors when shared, else 3-tuples."""
        q = self.q if q is None else q
        kv = self.kv if kv is None else kv
        gates = self.gates if gates is None else gates
        if self.shared_kv:
            k, v = Tensor(kv["cmp"][0]), Tensor(kv["cmp"][1])
        else:
            k = tuple(Tensor(kv[name][0]) for name in BRANCHES)
            v = tuple(Tensor(kv[name][1]) for name in BRANCHES)
        return Tensor(q), k, v, Tensor(gates)

    def run(self, prefix=None, **inputs):
        """``(out, {branch: output}, {(row, kv_head): [blocks]})`` of the core, as float64 NumPy."""
        q, k, v, gates = self.tensors(**inputs)
        return as_numpy(self.net.forward_with_details(q, k, v, gates, self.prefix if prefix is None else prefix))

    def reference(self, selected=None):
        return nref.nsa_forward(self.q, self.kv, self.gates, self.prefix, vars(self.cfg), self.weights,
                                self.cfg.scale, selected_override=selected)


def as_numpy(details):
    """An ``NSADetails`` -> ``(out, {branch: output}, {(row, kv_head): [blocks]})`` as float64 NumPy."""
    out, blocks, valid = details["out"], details["blocks"].asnumpy(), details["valid"].asnumpy()
    o_cmp, o_slc, o_win = details["o_cmp"], details["o_slc"], details["o_win"]
    selected = {(t, h): [int(b) for b, ok in zip(blocks[t, h], valid[t, h]) if ok]
                for t in range(blocks.shape[0]) for h in range(blocks.shape[1])}
    branches = {name: o.asnumpy().astype(np.float64) for name, o in zip(BRANCHES, (o_cmp, o_slc, o_win))}
    return out.asnumpy().astype(np.float64), branches, selected


def assert_selection_equivalent(selected, ref_selected, importance, rtol=1e-5):
    """The same blocks, or (near-ties between float32 and float64) blocks of equal float64 importance."""
    for key, blocks in selected.items():
        expected = ref_selected[key]
        assert len(blocks) == len(expected) == len(set(blocks)), (key, blocks, expected)
        if blocks != expected:
            got = np.sort(importance[key][blocks])
            want = np.sort(importance[key][expected])
            np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-7, err_msg=str((key, blocks, expected)))


def assert_close(actual, expected, rel=2e-5):
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * scale)


def check_against_reference(case, result=None):
    """Selection (tie-robust), every branch and the gated output of ``case`` against the float64
    reference, the reference reusing the implementation's selection; returns that selection.
    ``result``: ``(out, branches, selected)`` computed otherwise (default ``case.run()``)."""
    out, branches, selected = case.run() if result is None else result
    _, _, ref_selected, importance = case.reference()
    assert_selection_equivalent(selected, ref_selected, importance)
    ref_out, ref_branches, _, _ = case.reference(selected=selected)
    for name in BRANCHES:
        assert_close(branches[name], ref_branches[name])
    assert_close(out, ref_out)
    return selected
