"""The MindFormers adapter: registry and spec, Qwen3 names, packed prefix sums reaching NSA, training,
checkpoints, the CPU swaps, the selection probe, and every YAML under configs/.

MindFormers' GPT model runs in graph mode only; this module builds MindFormers' context once (graph
mode, CPU) and puts the suite's PyNative default back afterwards.
"""

import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

from mf_helpers import LARGE_YAML, ROOT, TINY_YAML, build, model_inputs, packed_rows, tiny_config


@pytest.fixture(scope="module", autouse=True)
def mindformers_context():
    from mindformers.core.context.build_context import build_context

    build_context(tiny_config())
    ms.set_seed(0)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_yaml_resolves_to_nsa_classes_in_the_self_attention_slot():
    from nsa_layers import NSAGate
    from nsa_layers.mindformers import GPTNSASelfAttention, NSACoreAttention, NSAQwen3Config, NSAQwen3ForCausalLM

    cfg = tiny_config()
    net = build(cfg)
    assert type(net) is NSAQwen3ForCausalLM and type(net.config) is NSAQwen3Config
    layers = net.model.decoder.layers
    assert len(layers) == cfg.model.model_config.num_hidden_layers
    expected = net.config.nsa_config()
    for layer in layers:
        attention = layer.self_attention
        assert type(attention) is GPTNSASelfAttention
        assert type(attention.core_attention) is NSACoreAttention and type(attention.gate) is NSAGate
        assert attention.core_attention.config == expected
    assert expected.compress_block_size == 8 and expected.window_size == 16 and expected.num_kv_heads == 2
    assert net.cpu_swaps == ("RotaryEmbedding.outer", "VocabParallelEmbedding.embedding_morph")


def test_no_swap_off_cpu(monkeypatch):
    from mindformers.parallel_core.training_graph.base_models.common.embeddings.rotary_pos_embedding import (
        RotaryEmbedding)
    import nsa_layers.mindformers.cpu as cpu

    def swapped(net):
        rotary = [cell for _, cell in net.cells_and_names() if isinstance(cell, RotaryEmbedding)]
        assert rotary
        return [isinstance(cell.outer, cpu._OuterProduct) for cell in rotary]

    assert all(swapped(build(tiny_config())))          # on this CPU machine: swapped
    monkeypatch.setattr(cpu, "on_cpu", lambda: False)  # as on Ascend: untouched
    net = build(tiny_config())
    assert net.cpu_swaps == () and not any(swapped(net))


def test_layer_spec_keeps_stock_submodules_and_adds_the_gate():
    from mindformers.parallel_core.training_graph.base_models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from nsa_layers import NSAGate
    from nsa_layers.mindformers import GPTNSASelfAttentionContiguous, NSACoreAttention, get_nsa_layer_spec

    tc = build(tiny_config()).get_gpt_transformer_config()
    params = {"window_size": 16, "compress_block_size": 8}
    spec = get_nsa_layer_spec(tc, params)
    stock = get_gpt_layer_local_spec(qk_layernorm=True, fused_norm=tc.fused_norm).submodules.self_attention.submodules
    sub = spec.submodules.self_attention.submodules
    assert (sub.linear_qkv, sub.linear_proj, sub.q_layernorm, sub.k_layernorm) == (
        stock.linear_qkv, stock.linear_proj, stock.q_layernorm, stock.k_layernorm)
    assert sub.gate is NSAGate and sub.core_attention.module is NSACoreAttention
    assert sub.core_attention.params == params
    tc.use_contiguous_weight_layout_attention = True
    assert get_nsa_layer_spec(tc, params).submodules.self_attention.module is GPTNSASelfAttentionContiguous


@pytest.mark.parametrize("key, value, match", [
    ("nsa_windw_size", 64, "unknown NSA key.*nsa_windw_size"),
    ("nsa_select_block_size", 6, "select_block_size \\(6\\) must be a multiple of compress_stride \\(4\\)"),
    ("nsa_window_size", 0, "'window_size' must be a positive int, but got 0"),
])
def test_config_rejects_bad_nsa_keys_by_name(key, value, match):
    from nsa_layers.mindformers import NSAQwen3Config

    values = {k: v for k, v in tiny_config().model.model_config.items() if k not in ("model_type", "architectures")}
    values[key] = value
    with pytest.raises(ValueError, match=match):
        NSAQwen3Config(**values)


def test_qwen3_parameter_names_and_shapes_are_kept():
    from mindformers.models.qwen3.configuration_qwen3 import Qwen3Config
    from mindformers.models.qwen3.modeling_qwen3_train import TrainingQwen3ForCausalLM
    from nsa_layers.mindformers import NSA_CONFIG_KEYS

    cfg = tiny_config(tie_word_embeddings=False)  # so that lm_head -> output_layer.weight exists
    net = build(cfg)
    qwen3_keys = {k: v for k, v in cfg.model.model_config.items()
                  if k not in ("model_type", "architectures") and k not in NSA_CONFIG_KEYS}
    stock = TrainingQwen3ForCausalLM(Qwen3Config(**qwen3_keys))
    ours = {p.name: p.shape for p in net.get_parameters()}
    theirs = {p.name: p.shape for p in stock.get_parameters()}
    assert {name: ours.get(name) for name in theirs} == theirs
    extra = sorted(set(ours) - set(theirs))
    assert extra and all(".self_attention.gate." in n or ".self_attention.core_attention." in n for n in extra), extra
    # every name the Qwen3 HF weight converters write exists in the model
    layers = cfg.model.model_config.num_hidden_layers
    for op in net.weight_converters:
        for name in op.mf_names:
            for i in range(layers if "{}" in name else 1):
                assert name.format(i) in ours, name


def _logits(net, inputs):
    net.set_train(False)
    out = net(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
              actual_seq_len=inputs["actual_seq_len"]).asnumpy()
    return out.reshape(inputs["input_ids"].shape + (-1,))


@pytest.mark.parametrize("independent_kv", [False, True])
def test_packed_prefix_sums_reach_the_core_segment_isolation_and_causality(independent_kv):
    """Row 0 = [A | B], row 1 = [B | A], row 2 = row 0 with B's tail changed. With the prefix sums
    reaching NSA (and positions restarting), A's logits are the same wherever A sits, and changing
    later tokens changes nothing before them (up to float32 rounding of the CPU kernels); without them (negative control) A in row 1 sees B."""
    net = build(tiny_config(nsa_independent_kv=independent_kv))
    assert hasattr(net.model.decoder.layers[0].self_attention, "linear_kv_branches") == independent_kv
    rng = np.random.default_rng(1)
    a, b = 27, 37
    rows = packed_rows(rng, 64, [[a, b], [b, a], [a, b]])
    doc_a, doc_b = rows["input_ids"][0, :a].copy(), rows["input_ids"][0, a:].copy()
    rows["input_ids"][1] = np.concatenate([doc_b, doc_a])
    rows["input_ids"][2] = np.concatenate([doc_a, doc_b[:20], rng.integers(0, 256, b - 20)])
    inputs = model_inputs(rows)
    logits = _logits(net, inputs)
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits[1, b:], logits[0, :a], rtol=1e-4, atol=1e-4)   # A alone, wherever it is
    np.testing.assert_allclose(logits[1, :b], logits[0, a:], rtol=1e-4, atol=1e-4)   # B alone, wherever it is
    np.testing.assert_allclose(logits[2, :a + 20], logits[0, :a + 20], rtol=1e-5, atol=1e-6)  # causality
    assert not np.allclose(logits[2, a + 20:], logits[0, a + 20:], atol=1e-3)
    # negative control: one segment per row (no prefix sums): A after B now sees B
    unpacked = dict(inputs, actual_seq_len=None)
    control = _logits(net, unpacked)
    assert not np.allclose(control[1, b:], control[0, :a], atol=1e-3)


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
    assert any(not np.array_equal(b, p.asnumpy()) for b, p in zip(before, net.trainable_params()))


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


def test_every_yaml_under_configs_is_valid(monkeypatch, tmp_path):
    from mindformers.models.build_config import get_model_config
    from mindformers.tools.register import MindFormerConfig
    from nsa_layers.mindformers import NSAQwen3Config

    found = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert found == sorted([TINY_YAML.name, LARGE_YAML.name])
    # tiny: built and run by the tests above; here its full size builds and converts
    tiny = MindFormerConfig(str(TINY_YAML))
    assert type(build(tiny)).__name__ == "NSAQwen3ForCausalLM"
    # large: through auto_register from --register_path, to its transformer config only
    monkeypatch.setenv("REGISTER_PATH", str(ROOT / "configs" / "register"))
    monkeypatch.chdir(tmp_path)  # auto_register copies the shim into ./modules (MindFormers' module cache)
    large = MindFormerConfig(str(LARGE_YAML))
    config = get_model_config(large.model)
    assert type(config) is NSAQwen3Config
    nsa = config.nsa_config()
    assert (nsa.compress_block_size, nsa.compress_stride, nsa.select_block_size, nsa.select_block_count,
            nsa.num_init_blocks, nsa.num_local_blocks, nsa.window_size) == (32, 16, 64, 16, 1, 2, 512)
    tc = config.convert_to_transformer_config()
    assert tc.input_layout == "TND" and tc.use_eod_reset and tc.seq_length == 32768 and tc.num_layers == 28
    columns = list(large.train_dataset.input_columns)
    assert {"actual_seq_len", "position_ids"} <= set(columns) and columns == list(large.train_dataset.construct_args_key)
    assert large.train_dataset.data_loader.create_compressed_eod_mask
    assert len(large.parallel.dataset_strategy) == len(columns)
    assert os.path.isfile(ROOT / "configs" / "register" / "nsa_register.py")
