"""Reduced precision (``nsa_layers.precision``): the core in float16 and bfloat16 against the float64
reference on the same rounded inputs, within bounds derived from the policy (float32 statistics,
values rounded once where stored; ``helpers.rounding_bounds`` states them and why), on random packed
layouts with zero-length and shorter-than-a-block segments; the selection up to near-ties the
dtype cannot resolve; the CPU's bfloat16 swap, and that nothing is swapped on Ascend; and a mutation
check: a softmax in the compute dtype breaks the bounds on long rows."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from helpers.common import random_normal, run
from helpers.nsa_cases import BRANCHES, Case, as_numpy, assert_selection_equivalent, small_config
from helpers.reference import round_to
from helpers.rounding_bounds import forward_bounds, gradient_bounds, selection_tie_rtol, worst_ratio
from nsa_layers import NativeSparseAttention, NSAConfig, NSAKVCache, precision
from nsa_layers.decode import DETAIL_FIELDS

DTYPES = ("float16", "bfloat16")


def rounded_case(dtype_name, lengths, seed, query_scale=1.0, **changes):
    """A :class:`Case` whose inputs, compressor weights and position embedding are rounded to the
    compute dtype (what the reference evaluates), with the core computing in that dtype; the queries
    times ``query_scale`` (3 gives scores of standard deviation about 3, a trained layer's)."""
    case = Case(small_config(compute_dtype=dtype_name, **changes), lengths, seed)

    def rounded(x):
        return None if x is None else round_to(x, dtype_name).astype(np.float32)

    case.q = rounded(case.q * query_scale)
    case.kv = {name: (rounded(k), rounded(v)) for name, (k, v) in case.kv.items()}
    case.gates = rounded(case.gates)
    case.weights = {name: rounded(w) for name, w in case.weights.items()}
    for param, name in ((case.net.k_compressor.weight, "w_k"), (case.net.v_compressor.weight, "w_v"),
                        (case.net.v_compressor.position_embedding, "pe_v")):
        if param is not None:
            param.set_data(type(param)(case.weights[name]))
    return case


def check_within_bounds(case, dtype_name, mode="pynative"):
    """Every branch and the gated output within their bounds, the selection up to near-ties; returns
    the worst error / bound ratio of each."""
    q, k, v, gates = case.tensors()

    def forward(q_, k_, v_, g_):
        # a tuple: MindSpore 2.9 builds a compiled graph's dict output on the host (PyExecute) and
        # there mistakes the float16 entries' size (pre-existing, also before the precision policy)
        details = case.net.forward_with_details(q_, k_, v_, g_, case.prefix)
        return tuple(details[name] for name in DETAIL_FIELDS)

    out, branches, selected = as_numpy(dict(zip(DETAIL_FIELDS, run(mode, forward, q, k, v, gates))))
    cfg = vars(case.cfg)
    ref_out, ref_branches, bounds = forward_bounds(case.q, case.kv, case.gates, case.prefix, cfg, case.weights,
                                                   case.cfg.scale, selected, dtype_name)
    ratios = {name: worst_ratio(branches[name], ref_branches[name], bounds[name]) for name in BRANCHES}
    ratios["out"] = worst_ratio(out, ref_out, bounds["out"])
    return ratios, selected


@pytest.mark.parametrize("dtype_name", [pytest.param("float16", marks=pytest.mark.slow), "bfloat16"])
def test_forward_within_the_derived_bounds(dtype_name):
    """Zero-length, shorter-than-a-block and multi-chunk segments; every branch, then the gated sum."""
    case = rounded_case(dtype_name, [70, 0, 5, 51], seed=21)
    ratios, selected = check_within_bounds(case, dtype_name)
    assert max(ratios.values()) <= 1.0, ratios
    # the bounds are not vacuous: the errors use a good part of them (an exact float32 run would not)
    assert max(ratios.values()) > 0.01, ratios
    _, _, ref_selected, importance = case.reference()
    rtol = selection_tie_rtol(case.q, case.kv["cmp"][0], case.weights["w_k"], case.prefix, vars(case.cfg),
                              case.cfg.scale, dtype_name)
    assert_selection_equivalent(selected, ref_selected, importance, rtol=rtol)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("seed", [31, 32])
def test_forward_within_the_derived_bounds_on_random_layouts(dtype_name, mode, seed):
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(0, 60, size=5)] + [int(rng.integers(60, 130))]
    case = rounded_case(dtype_name, lengths, seed=seed, query_chunk_size=32, select_dense_rows=40)
    ratios, _ = check_within_bounds(case, dtype_name, mode)
    assert max(ratios.values()) <= 1.0, ratios


def check_gradients_within_bounds(case, dtype_name, mode="pynative"):
    """The gradients of ``sum(out * target)`` with respect to queries, every branch's keys and values,
    the gates and the compressor parameters, each within its bound (``gradient_bounds``); returns the
    worst error / bound ratio of each."""
    net, cfg = case.net, case.cfg
    target = random_normal(np.random.default_rng(5), (case.q.shape[0], cfg.num_heads, cfg.v_head_dim))
    q, k, v, gates = case.tensors()
    params = [net.k_compressor.weight, net.v_compressor.weight] + (
        [net.v_compressor.position_embedding] if cfg.use_position_embedding else [])

    def loss(q_, k_cmp, k_slc, k_win, v_cmp, v_slc, v_win, g_):
        out = net(q_, (k_cmp, k_slc, k_win), (v_cmp, v_slc, v_win), g_, case.prefix)
        return (out.astype(ms.float32) * Tensor(target)).sum()

    grad_fn = ms.grad(loss, grad_position=tuple(range(8)), weights=params)
    inputs, weights = run(mode, grad_fn, q, *k, *v, gates)
    names = ["q", "k_cmp", "k_slc", "k_win", "v_cmp", "v_slc", "v_win", "gates", "w_k", "w_v", "pe_v"]
    got = dict(zip(names, [x.astype(ms.float32).asnumpy() for x in list(inputs) + list(weights)]))
    selected = as_numpy(net.forward_with_details(q, k, v, gates, case.prefix))[2]
    want, bounds = gradient_bounds(case.q, case.kv, case.gates, case.prefix, vars(cfg), case.weights, cfg.scale,
                                   selected, target, dtype_name)
    return {name: worst_ratio(got[name], want[name], bounds[name]) for name in want}


@pytest.mark.parametrize("dtype_name", [pytest.param("float16", marks=pytest.mark.slow), "bfloat16"])
def test_gradients_within_the_derived_bounds(dtype_name):
    """Input and parameter gradients of every branch, through the gated sum and the compressor."""
    case = rounded_case(dtype_name, [70, 0, 5, 51], seed=22)
    ratios = check_gradients_within_bounds(case, dtype_name)
    assert max(ratios.values()) <= 1.0, ratios
    assert max(ratios.values()) > 0.01, ratios


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_gradients_within_the_derived_bounds_on_random_layouts(dtype_name, mode):
    rng = np.random.default_rng(33)
    lengths = [int(x) for x in rng.integers(0, 60, size=4)] + [int(rng.integers(60, 130))]
    case = rounded_case(dtype_name, lengths, seed=33, query_chunk_size=32, select_dense_rows=40)
    ratios = check_gradients_within_bounds(case, dtype_name, mode)
    assert max(ratios.values()) <= 1.0, ratios


@pytest.mark.slow
def test_a_softmax_in_bfloat16_breaks_the_bounds_on_long_rows():
    """Mutation check: the same layer with ``softmax_dtype="bfloat16"`` (scores and probabilities rounded
    to bfloat16) on one 2048-token document whose window reads 1024 keys, with scores of a trained
    layer's spread (standard deviation about 3): the window and selected branches and the gated
    output leave the bounds that float32 statistics keep (about 6x, 3.5x and 1.5x here; about 1.1-1.5x
    in the window branch for unit-spread scores), while the policy stays inside them."""
    lengths, changes = [2048], dict(window_size=1024, query_chunk_size=256, select_dense_rows=0, compress_block_size=32,
                                    compress_stride=32, select_block_size=128, select_block_count=3)
    policy = rounded_case("bfloat16", lengths, seed=41, query_scale=3.0, **changes)
    assert max(check_within_bounds(policy, "bfloat16")[0].values()) <= 1.0
    mutant = rounded_case("bfloat16", lengths, seed=41, query_scale=3.0, softmax_dtype="bfloat16", **changes)
    ratios = check_within_bounds(mutant, "bfloat16")[0]
    assert ratios["win"] > 3 and ratios["slc"] > 1.5 and ratios["out"] > 1.2, ratios


def test_the_cpu_swap_is_decided_once_and_never_on_ascend(monkeypatch):
    """bfloat16 on CPU holds its values in float32 tensors (every cell of the core and the decode
    cache decided alike); float16 and float32 swap nothing; with the device reported as Ascend
    nothing is swapped and the cache is bfloat16 (half the memory of float32)."""
    def precisions(net):
        return [cell.precision for _, cell in net.cells_and_names() if hasattr(cell, "precision")]

    sizes = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=16)
    bf16 = NSAConfig(compute_dtype="bfloat16", **sizes)
    on_cpu = NativeSparseAttention(bf16)
    assert on_cpu.precision.swaps and all(p.emulated and p.storage == precision.STATS_DTYPE
                                          for p in precisions(on_cpu))
    assert all(p is on_cpu.precision for p in precisions(on_cpu))  # decided once, by the core
    assert NSAKVCache(bf16, 1, 64).k_selected.dtype == ms.float32
    for dtype_name in ("float16", "float32"):
        assert not NativeSparseAttention(NSAConfig(compute_dtype=dtype_name, **sizes)).precision.swaps
    monkeypatch.setattr(precision, "on_cpu", lambda: False)
    on_ascend = NativeSparseAttention(bf16)
    assert on_ascend.precision.swaps == ()
    assert all(not p.emulated and p.storage == p.compute for p in precisions(on_ascend))
    assert NSAKVCache(bf16, 1, 64).k_selected.dtype == ms.bfloat16


def test_softmax_dtype_must_be_float32_or_the_compute_dtype():
    sizes = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=16)
    NSAConfig(compute_dtype="bfloat16", softmax_dtype="bfloat16", **sizes)
    with pytest.raises(ValueError, match="softmax_dtype must be 'float32' or the compute_dtype \\('bfloat16'\\)"):
        NSAConfig(compute_dtype="bfloat16", softmax_dtype="float16", **sizes)
