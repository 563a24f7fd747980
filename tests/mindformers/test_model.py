"""The compiled MindFormers model: packed prefix sums reaching NSA (segment isolation, causality),
the TND layout, training, checkpoints, the CPU train wrapper and the selection probe.

Each compile of the tiny model costs tens of seconds on 2 cores, so the fast tier runs one logits
graph of the model; its training graph and the other checks are ``slow`` (NSA's own graph-mode
training step is in the fast tier: ``tests/layers/test_self_attention.py``).
"""

import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from helpers.bad_prefix_sums import BAD, assert_check_refuses, assert_core_refuses
from helpers.mindformers import build, model_inputs, packed_rows, tiny_config
from nsa_layers.data import pack_documents


def _logits(net, inputs):
    net.set_train(False)
    out = net(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
              actual_seq_len=inputs["actual_seq_len"]).asnumpy()
    return out.reshape(inputs["input_ids"].shape + (-1,))


@pytest.mark.parametrize("independent_kv", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_packed_prefix_sums_reach_the_core_segment_isolation_and_causality(independent_kv):
    """Row 0 = [A | B], row 1 = [B | A], row 2 = row 0 with B's tail changed. With the prefix sums
    reaching NSA (and positions restarting), A's logits are the same wherever A sits, and changing
    later tokens changes nothing before them (up to float32 rounding of the CPU kernels); without them
    (negative control) A in row 1 sees B."""
    net = build(tiny_config(nsa_independent_kv=independent_kv))
    assert hasattr(net.model.decoder.layers[0].self_attention, "linear_kv_branches") == independent_kv
    rng = np.random.default_rng(1)
    a, b = 27, 37
    doc_a, doc_b = rng.integers(0, 256, a), rng.integers(0, 256, b)
    changed_b = np.concatenate([doc_b[:20], rng.integers(0, 256, b - 20)])
    rows = pack_documents([doc_a, doc_b, doc_b, doc_a, doc_a, changed_b], 64, max_segments=4, pad_id=256)
    assert rows["input_ids"].shape == (3, 64)
    inputs = model_inputs(rows)
    logits = _logits(net, inputs)
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits[1, b:], logits[0, :a], rtol=1e-4, atol=1e-4)   # A alone, wherever it is
    np.testing.assert_allclose(logits[1, :b], logits[0, a:], rtol=1e-4, atol=1e-4)   # B alone, wherever it is
    np.testing.assert_allclose(logits[2, :a + 20], logits[0, :a + 20], rtol=1e-5, atol=1e-6)  # causality
    assert not np.allclose(logits[2, a + 20:], logits[0, a + 20:], atol=1e-3)
    # negative control: one segment per row (prefix sums of the row ends only, same shape: the same
    # compiled graph): A after B now sees B
    row_ends = np.repeat(np.arange(1, 4) * 64, inputs["actual_seq_len"].shape[0] // 3).astype(np.int32)
    control = _logits(net, dict(inputs, actual_seq_len=ms.Tensor(row_ends)))
    assert not np.allclose(control[1, b:], control[0, :a], atol=1e-3)
    # the rows' own ends, without the row offsets MindFormers' batching adds (a MindDataset read as
    # it is): refused when the graph runs, naming the first value that decreases
    local = rows["actual_seq_len"].reshape(-1)
    first = int(np.argmax(local[1:] < local[:-1])) + 1
    with pytest.raises(ValueError, match=rf"NSAQwen3ForCausalLM: 'actual_seq_len' must be non-decreasing prefix "
                                         rf"sums with values in \[0, 192\] .* got {local[first]} at index {first}"):
        _logits(net, dict(inputs, actual_seq_len=ms.Tensor(local)))


@pytest.mark.slow
def test_tnd_layout_gives_the_default_layouts_results():
    """``use_eod_attn_mask_compression`` (TND, MindFormers needs S >= 2048 for it) and the default layout
    feed NSA the same prefix sums: same weights, same packed row -> same logits."""
    overrides = dict(seq_length=2048, max_position_embeddings=2048, nsa_query_chunk_size=1024)
    default = build(tiny_config(**overrides))
    tnd = build(tiny_config(use_eod_attn_mask_compression=True, **overrides))
    assert tnd.get_gpt_transformer_config().input_layout == "TND"
    assert default.get_gpt_transformer_config().input_layout == "BNSD"
    ms.load_param_into_net(tnd, {p.name: p for p in default.get_parameters()})
    inputs = model_inputs(packed_rows(np.random.default_rng(6), 2048, [[300, 700, 1048]]))
    np.testing.assert_allclose(_logits(tnd, inputs), _logits(default, inputs), rtol=1e-5, atol=1e-6)


def _train(net, inputs, steps, lr=3e-3):
    net.set_train(True)
    params = net.trainable_params()
    optimizer = nn.AdamWeightDecay(params, learning_rate=lr)

    def loss_fn(input_ids, labels, loss_mask, position_ids, actual_seq_len):
        return net(input_ids=input_ids, labels=labels, loss_mask=loss_mask, position_ids=position_ids,
                   actual_seq_len=actual_seq_len)[0]

    grad_fn = ms.value_and_grad(loss_fn, None, params)
    args = (inputs["input_ids"], inputs["labels"], inputs["loss_mask"], inputs["position_ids"],
            inputs["actual_seq_len"])
    losses = []
    for _ in range(steps):
        loss, grads = grad_fn(*args)
        optimizer(grads)
        losses.append(float(loss.asnumpy()))
    return losses, grads


@pytest.mark.slow
def test_training_steps_on_a_repeated_packed_batch_lower_the_loss():
    net = build(tiny_config())
    inputs = model_inputs(packed_rows(np.random.default_rng(2), 64, [[10, 30, 24], [64], [5, 40, 19]]))
    losses, grads = _train(net, inputs, steps=6)
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 0.3, losses
    names = [p.name for p in net.trainable_params()]
    norms = {n: float(np.abs(g.asnumpy()).max()) for n, g in zip(names, grads)}
    assert all(np.isfinite(v) for v in norms.values())
    assert norms["decoder.layers.0.self_attention.gate.proj.weight"] > 1e-6
    assert norms["decoder.layers.0.self_attention.core_attention.k_compressor.weight"] > 1e-6


@pytest.mark.slow
def test_checkpoint_round_trip_gives_the_same_loss(tmp_path):
    cfg = tiny_config()
    net = build(cfg)
    inputs = model_inputs(packed_rows(np.random.default_rng(3), 64, [[20, 44], [33, 31]]))
    _train(net, inputs, steps=2)
    logits = _logits(net, inputs)
    path = str(tmp_path / "nsa.ckpt")
    ms.save_checkpoint(net, path)
    fresh = build(cfg)
    assert not np.allclose(_logits(fresh, inputs), logits, atol=1e-3)  # a new model differs ...
    not_loaded, _ = ms.load_param_into_net(fresh, ms.load_checkpoint(path))
    assert not not_loaded
    np.testing.assert_array_equal(_logits(fresh, inputs), logits)      # ... until it loads the checkpoint


@pytest.mark.slow
def test_train_wrapper_runs_on_cpu():
    from nsa_layers.mindformers import NSATrainOneStepCell

    net = build(tiny_config())
    net.set_train(True)
    inputs = model_inputs(packed_rows(np.random.default_rng(4), 64, [[30, 34], [64]]))
    wrapper = NSATrainOneStepCell(net, nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-3),
                                  use_clip_grad=True)
    assert wrapper.overflow_check == "isfinite"
    before = [p.asnumpy().copy() for p in net.trainable_params()]
    loss, overflow, *_ = wrapper(inputs["input_ids"], inputs["position_ids"], None, None, inputs["labels"], None,
                                 None, inputs["loss_mask"], inputs["actual_seq_len"])
    assert np.isfinite(float(loss.asnumpy())) and not bool(overflow.asnumpy())
    # Adam's first step moves every parameter whose gradient is not zero (no weight decay): a zero
    # gradient anywhere (MindSpore's parameter-key mix-up under a double forward) leaves it unchanged
    unchanged = [p.name for b, p in zip(before, net.trainable_params()) if np.array_equal(b, p.asnumpy())]
    assert not unchanged


@pytest.mark.slow
def test_train_step_refuses_row_local_ends_before_changing_a_parameter():
    from nsa_layers.mindformers import NSATrainOneStepCell

    net = build(tiny_config())
    net.set_train(True)
    rows = packed_rows(np.random.default_rng(8), 64, [[30, 34], [20, 44]])
    inputs = model_inputs(rows)
    wrapper = NSATrainOneStepCell(net, nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-2),
                                  use_clip_grad=True)
    before = [p.asnumpy().copy() for p in net.trainable_params()]
    with pytest.raises(ValueError, match=r"NSAQwen3ForCausalLM: 'actual_seq_len' .* got 20 at index 4"):
        wrapper(inputs["input_ids"], inputs["position_ids"], None, None, inputs["labels"], None, None,
                inputs["loss_mask"], ms.Tensor(rows["actual_seq_len"]))
    assert all(np.array_equal(b, p.asnumpy()) for b, p in zip(before, net.trainable_params()))


@pytest.mark.slow
@pytest.mark.parametrize("per_token", [False, True])
def test_train_wrapper_gradient_norm_matches_independent_gradients(per_token):
    """The wrapper's global gradient norm (before clipping) is the norm of the loss's gradients taken
    independently (``value_and_grad`` of the token-mean loss), with MindFormers' mean loss and with
    its per-token loss (numerator, denominator): the one-forward objective and its scaling."""
    from nsa_layers.mindformers import NSATrainOneStepCell

    net = build(tiny_config(calculate_per_token_loss=per_token))
    net.set_train(True)
    inputs = model_inputs(packed_rows(np.random.default_rng(7), 64, [[21, 43], [64]]))
    args = (inputs["input_ids"], inputs["position_ids"], None, None, inputs["labels"], None, None,
            inputs["loss_mask"], inputs["actual_seq_len"])

    def mean_loss(*a):
        out = net(*a)
        return out[0] / out[1] if per_token else out[0]
    expected_loss, grads = ms.value_and_grad(mean_loss, None, net.trainable_params())(*args)
    expected_norm = np.sqrt(sum(float((g.asnumpy().astype(np.float64) ** 2).sum()) for g in grads))
    wrapper = NSATrainOneStepCell(net, nn.AdamWeightDecay(net.trainable_params(), learning_rate=0.0),
                                  use_clip_grad=True, scale_sense=4.0, calculate_per_token_loss=per_token)
    loss, overflow, _, _, global_norm = wrapper(*args)
    assert not bool(overflow.asnumpy())
    np.testing.assert_allclose(float(loss.asnumpy().reshape(-1)[0]), float(expected_loss.asnumpy().reshape(-1)[0]),
                               rtol=1e-5)
    np.testing.assert_allclose(float(global_norm.asnumpy()), expected_norm, rtol=1e-4)
    assert expected_norm > 1e-3


@pytest.mark.slow
def test_layer_selection_probe_never_picks_future_or_other_documents():
    from nsa_layers.mindformers import LayerSelection

    net = build(tiny_config())
    rows = packed_rows(np.random.default_rng(5), 64, [[9, 40, 15]])
    inputs = model_inputs(rows)
    blocks, valid = LayerSelection(net, 1)(inputs["input_ids"], inputs["position_ids"], inputs["actual_seq_len"])
    blocks, valid = blocks.asnumpy(), valid.asnumpy()
    nsa = net.config.nsa_config()
    assert blocks.shape == (64, nsa.num_kv_heads, nsa.select_block_count)
    position = rows["position_ids"][0]
    for t in range(64):
        own = position[t] // nsa.select_block_size
        for h in range(nsa.num_kv_heads):
            chosen = blocks[t, h][valid[t, h]]
            assert len(set(chosen.tolist())) == len(chosen)             # no duplicates
            assert chosen.min() >= 0 and chosen.max() <= own            # never a future block
            assert own in chosen and 0 in chosen                        # local and initial blocks forced
            assert valid[t, h].sum() == min(nsa.select_block_count, own + 1)
    with pytest.raises(ValueError, match="layer_index"):
        LayerSelection(net, 2)


# Last in the module: MindFormers has set its strict graph syntax for the whole process
# (``build_context``) and the model has compiled and run; the layers' check still fires.
@pytest.mark.parametrize("ends, value, index", [BAD[0][1:], pytest.param(*BAD[1][1:], marks=pytest.mark.slow)])
def test_prefix_sum_check_fires_in_graph_mode_after_the_mindformers_model(ends, value, index):
    assert os.environ.get("MS_DEV_JIT_SYNTAX_LEVEL") == "0"  # strict, as MindFormers leaves it
    assert_check_refuses("graph", ends, value, index)


@pytest.mark.slow
def test_core_refuses_bad_prefix_sums_in_graph_mode_after_the_mindformers_model():
    assert_core_refuses("graph", *BAD[-1][1:])
