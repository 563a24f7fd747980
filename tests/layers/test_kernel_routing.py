"""Routing of the NSA branches to the Ascend kernels (``nsa_layers.kernel_routing``).

No Ascend here: the kernel path is exercised by telling the layer it is on Ascend while
``nsa_layers.ops`` keeps running its fallbacks, which implement the kernels' documented contracts
(masks, the kernel's block-importance convention, top-k ties, fp16 rounding of the probabilities).
So these tests check what the layer hands to the kernels: masks, the shifted compressed layout,
empty selection slots, and that the result is the layer's exact NSA.
"""

import numpy as np
import pytest

import nsa_layers.compressor as compressor_module
from helpers.nsa_cases import BRANCHES, Case, as_numpy, assert_selection_equivalent
from nsa_layers import NSAConfig, kernel_routing
from nsa_layers.kernel_routing import COMPOSITE, KERNEL, plan_kernel_route
from nsa_layers.ops.compress_attention import kernel_importance_weights
from nsa_layers.selection import overlap_weights

PAPER = dict(hidden_size=64, num_heads=2, num_kv_heads=1, head_dim=16, v_head_dim=16, window_size=64,
             query_chunk_size=512)
LONG = (1024, 2112)  # two segments of 16 and 17 whole selection blocks: every kernel's constraints hold


def _paths(cfg, total, prefix, ascend=True):
    route = plan_kernel_route(cfg, total, prefix, ascend)
    return dict(route.paths), dict(route.reasons)


def test_every_branch_is_composite_off_ascend():
    net = Case(NSAConfig(**PAPER, compute_dtype="float16"), [1024, 1088], seed=0).net
    paths, reasons = net.branch_paths(2112, LONG)
    assert set(paths) == set(kernel_routing.BRANCHES) and set(paths.values()) == {COMPOSITE}
    assert reasons["selection"] == "the device is not Ascend"


def test_routing_decisions_on_ascend():
    cfg = NSAConfig(**PAPER, compute_dtype="float16")
    paths, reasons = _paths(cfg, 2112, LONG)
    assert paths == {"compress": KERNEL, "compressed_attention": KERNEL, "selection": KERNEL,
                     "selected_attention": KERNEL, "sliding_window": COMPOSITE}
    assert "no NSA kernel" in reasons["sliding_window"]
    # float32 compute, prefix sums only as a Tensor: nothing routed
    assert set(_paths(NSAConfig(**PAPER), 2112, LONG)[0].values()) == {COMPOSITE}
    paths, reasons = _paths(cfg, 2112, None)
    assert set(paths.values()) == {COMPOSITE} and "Tensor" in reasons["compress"]
    # a segment shorter than 16 blocks: compression still on the kernel, the rest composite, with the
    # kernel's own error as the reason
    paths, reasons = _paths(cfg, 2112, (100, 2112))
    assert paths["compress"] == KERNEL and paths["compressed_attention"] == paths["selection"] == COMPOSITE
    assert "select_block_count" in reasons["selection"]
    assert "at least" in reasons["selected_attention"] and "[100, 2012]" in reasons["selected_attention"]
    # not a whole number of blocks: the selected-attention kernel refuses; the compressed-attention one
    # too when the last block has no compressed window (the kernel would never score it)
    paths, _ = _paths(cfg, 2100, (1024, 2100))
    assert paths["selected_attention"] == COMPOSITE and paths["compressed_attention"] == KERNEL
    paths, reasons = _paths(cfg, 2060, (1024, 2060))
    assert paths["compressed_attention"] == COMPOSITE and "without a compressed window" in reasons["selection"]
    # l == d: the compress kernel's gradient is not available
    paths, reasons = _paths(NSAConfig(**dict(PAPER, compress_block_size=16), compute_dtype="float16"), 2112, LONG)
    assert paths["compress"] == COMPOSITE and "gradient" in reasons["compress"]
    # head_dim not a multiple of 16: the kernels' argument checks refuse
    paths, _ = _paths(NSAConfig(**dict(PAPER, head_dim=8, v_head_dim=8), compute_dtype="float16"), 2112, LONG)
    assert paths["compress"] == paths["compressed_attention"] == COMPOSITE


def test_shifted_layout_lines_the_kernel_importance_up_with_the_exact_overlap():
    """One masked key in front: the kernel's weights over shifted index ``m*(t+1) - i`` are the exact
    overlap weights over window ``m*t + o`` (32/16/64: (1, 2, 2, 2, 1) over 4t-1 .. 4t+3)."""
    for block, stride, sel in ((32, 16, 64), (64, 16, 64), (16, 16, 64), (32, 32, 128)):
        num_cmp = 40
        kernel = kernel_importance_weights(num_cmp + 1, block, stride, sel)  # (S2' compressed, n_sel)
        exact = np.zeros((num_cmp, kernel.shape[1]))
        m = sel // stride
        for j in range(kernel.shape[1]):
            for offset, weight in overlap_weights(block, stride, sel):
                if 0 <= m * j + offset < num_cmp:
                    exact[m * j + offset, j] = weight
        np.testing.assert_array_equal(np.asarray(kernel)[1:], exact)


def test_masks_for_the_compressed_attention_kernel():
    atten, topk = kernel_routing.compressed_attention_masks((100, 300), 32, 16, 64, 1, 2)
    assert atten.shape == (200, 12) and topk.shape == (200, 3)  # (max S1, 11 windows + 1), ceil(12 / 4)
    assert atten[:, 0].all()  # the leading key is never visible
    for t in (0, 30, 31, 46, 47, 199):
        visible = [j - 1 for j in range(1, 12) if not atten[t, j]]
        assert visible == [i for i in range(11) if i * 16 + 31 <= t]
    assert topk[0].tolist() == [True, False, False]
    assert topk[64].tolist() == [True, True, False]
    assert topk[150].tolist() == [True, True, True]
    assert topk[199].tolist() == [True, False, True]  # own block 3 has no window: see the next test


def _routed(monkeypatch, calls):
    """Tell the layer it is on Ascend; count the ``nsa_layers.ops`` calls (which run their fallbacks)."""
    monkeypatch.setattr(kernel_routing, "on_ascend", lambda: True)
    kernel_routing.route_for.cache_clear()
    for module, name in ((compressor_module, "nsa_compress"), (kernel_routing, "nsa_compress_attention"),
                         (kernel_routing, "nsa_select_attention")):
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


@pytest.fixture(name="routed_case")
def _routed_case():
    case = Case(NSAConfig(**PAPER, compute_dtype="float16"), [1024, 1088], seed=21)
    case.q = (case.q * 3).astype(np.float32)  # peaked compression probabilities: fewer near-ties in fp16
    yield case
    kernel_routing.route_for.cache_clear()


@pytest.mark.slow  # 20-30 s: the whole layer at paper sizes, three times
def test_kernel_route_gives_the_exact_nsa(monkeypatch, routed_case):
    """Every branch through the kernels' contracts equals the float64 reference on the same
    selection, and that selection is the exact one (the composite path's)."""
    case = routed_case
    composite = case.run(prefix=LONG)
    calls = []
    _routed(monkeypatch, calls)
    assert set(case.net.branch_paths(2112, LONG)[0].values()) == {KERNEL, COMPOSITE}
    q, k, v, gates = case.tensors()
    routed = as_numpy(case.net.forward_with_details(q, k, v, gates, LONG))
    assert sorted(calls) == ["nsa_compress", "nsa_compress", "nsa_compress_attention", "nsa_select_attention"]
    out, branches, selected = routed
    # the same selection on both paths, up to near-ties (blocks of equal float64 importance within the
    # float16 rounding of the inputs): each path against the exact float64 one
    _, _, ref_selected, importance = case.reference()
    for path_selected in (selected, composite[2]):
        assert_selection_equivalent(path_selected, ref_selected, importance, rtol=5e-3)
    assert sum(sorted(selected[key]) != sorted(ref_selected[key]) for key in selected) < len(selected) // 50
    ref_out, ref_branches, _, _ = case.reference(selected=selected)
    for name in BRANCHES:
        scale = max(1.0, np.abs(ref_branches[name]).max())
        np.testing.assert_allclose(branches[name], ref_branches[name], rtol=0, atol=2e-2 * scale, err_msg=name)
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=2e-2 * max(1.0, np.abs(ref_out).max()))
    # first tokens: no compressed window ended yet -> exactly 0 (the kernel's fully masked row is zeroed)
    assert not branches["cmp"][[0, 30, 1024, 1054]].any() and branches["cmp"][[31, 1055]].any()
