"""Tensor parallelism of the NSA core, emulated per rank on one process: each rank runs the core on
the slices its declared layouts give it (``nsa_layers.parallel.core_layouts``), and the outputs and
every gradient, reassembled by the layouts, equal the unsplit core."""

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from nsa_layers import NativeSparseAttention
from nsa_layers.parallel import check_tensor_parallel, core_layouts

from helpers.nsa_cases import Case, small_config
from helpers.sharding import assemble, local_shard


def _forward_and_grads(net, q, k, v, gates, prefix, probe):
    """The output and the gradients of ``(out * probe).sum()`` w.r.t. q, k, v, gates and the parameters."""
    params = net.trainable_params()

    def loss(q_, k_, v_, g_):
        return (net(q_, k_, v_, g_, prefix) * probe).sum()

    out = net(q, k, v, gates, prefix).asnumpy()
    inputs, weights = ms.grad(loss, grad_position=(0, 1, 2, 3), weights=params)(q, k, v, gates)
    return out, [g.asnumpy() for g in inputs], {p.name: g.asnumpy() for p, g in zip(params, weights)}


@pytest.mark.slow  # a PyNative forward and backward per rank: 10-20 s
@pytest.mark.parametrize("tp", [2, 4])
def test_head_split_ranks_reassemble_to_the_unsplit_core(tp):
    """H=8, Hkv=4, two packed documents, each past a selection block; shared K/V (the adapter's
    default). The forward is bitwise equal: a rank's heads compute exactly what they do unsplit."""
    cfg = small_config(num_heads=8, num_kv_heads=4)
    case = Case(cfg, [37, 19], seed=21, shared_kv=True)
    q, k, v, gates = case.tensors()
    probe = np.random.default_rng(22).standard_normal((q.shape[0], cfg.num_heads, cfg.v_head_dim)).astype(np.float32)
    full_out, full_inputs, full_params = _forward_and_grads(case.net, q, k, v, gates, case.prefix, Tensor(probe))
    layouts = core_layouts(tp=tp)
    arrays = {"q": q.asnumpy(), "k": k.asnumpy(), "v": v.asnumpy(), "gates": gates.asnumpy()}
    local_cfg = small_config(num_heads=cfg.num_heads // tp, num_kv_heads=cfg.num_kv_heads // tp)
    outs, grads, param_grads = [], [], []
    for rank in range(tp):
        net = NativeSparseAttention(local_cfg)
        net.k_compressor.weight.set_data(Tensor(local_shard(case.weights["w_k"], layouts.compressor_weight, rank)))
        net.v_compressor.weight.set_data(Tensor(local_shard(case.weights["w_v"], layouts.compressor_weight, rank)))
        net.v_compressor.position_embedding.set_data(
            Tensor(local_shard(case.weights["pe_v"], layouts.position_embedding, rank)))
        local = {name: Tensor(np.ascontiguousarray(local_shard(a, getattr(layouts, name), rank)))
                 for name, a in arrays.items()}
        out, inputs, params = _forward_and_grads(net, local["q"], local["k"], local["v"], local["gates"],
                                                 case.prefix, Tensor(local_shard(probe, layouts.out, rank).copy()))
        outs.append(out)
        grads.append(inputs)
        param_grads.append(params)
    np.testing.assert_array_equal(assemble(outs, layouts.out, full_out.shape), full_out)
    for i, name in enumerate(("q", "k", "v", "gates")):
        np.testing.assert_allclose(assemble([g[i] for g in grads], getattr(layouts, name), full_inputs[i].shape),
                                   full_inputs[i], rtol=1e-6, atol=1e-7, err_msg=name)
    for name, full in full_params.items():
        layout = layouts.position_embedding if "position_embedding" in name else layouts.compressor_weight
        np.testing.assert_allclose(assemble([p[name] for p in param_grads], layout, full.shape), full,
                                   rtol=1e-6, atol=1e-7, err_msg=name)
    assert set(full_params) == {"k_compressor.weight", "v_compressor.weight", "v_compressor.position_embedding"}
    assert all(np.abs(g).max() > 0 for g in full_params.values())


def test_tensor_parallel_size_must_divide_the_kv_heads():
    check_tensor_parallel(8, 4, 4)
    with pytest.raises(ValueError, match=r"tensor-parallel size 4 must divide num_kv_heads=2 \(and num_heads=8\)"):
        check_tensor_parallel(8, 2, 4)
    with pytest.raises(ValueError, match="positive integer, but got 0"):
        check_tensor_parallel(8, 2, 0)


def test_layouts_split_heads_by_tp_and_keep_tokens_whole():
    layouts = core_layouts(dp=2, cp=2, tp=2)
    spec = layouts.q.to_dict()
    assert tuple(spec["device_matrix"]) == (2, 2, 2) and tuple(spec["alias_name"]) == ("dp", "cp", "tp")
    assert tuple(spec["tensor_map"]) == (-1, 0, -1)  # tp is the last device-matrix axis: index 0
    assert tuple(layouts.compressor_weight.to_dict()["tensor_map"]) == (-1, 0)
