"""The MindFormers adapter as built from the YAMLs (no graph is compiled here): registry and spec,
Qwen3 parameter names, the NSA config keys, the CPU swaps, and every YAML under configs/."""

import os

import pytest

from helpers.mindformers import LARGE_YAML, PARALLEL_YAML, ROOT, TINY_YAML, build, tiny_config


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
    assert net.cpu_swaps == ("GenerationMixin.argmax", "RotaryEmbedding.outer",
                             "VocabParallelEmbedding.embedding_morph")


def test_no_swap_off_cpu(monkeypatch):
    from mindformers.parallel_core.training_graph.base_models.common.embeddings.rotary_pos_embedding import (
        RotaryEmbedding,
    )

    import nsa_layers.mindformers.cpu as cpu
    from nsa_layers import precision

    def swapped(net):
        rotary = [cell for _, cell in net.cells_and_names() if isinstance(cell, RotaryEmbedding)]
        assert rotary
        return [isinstance(cell.outer, cpu._OuterProduct) for cell in rotary]

    assert all(swapped(build(tiny_config())))          # on this CPU machine: swapped
    monkeypatch.setattr(cpu, "on_cpu", lambda: False)  # as on Ascend: untouched
    monkeypatch.setattr(precision, "on_cpu", lambda: False)
    net = build(tiny_config())
    assert net.cpu_swaps == () and not any(swapped(net))
    net = build(tiny_config(compute_dtype="bfloat16"))  # nor bfloat16 held in float32, in the cores either
    assert net.cpu_swaps == () and not any(swapped(net))
    assert all(layer.self_attention.core_attention.precision.swaps == () for layer in net.model.decoder.layers)


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
    ("softmax_compute_dtype", "bfloat16", "softmax_compute_dtype 'bfloat16' with compute_dtype 'float32' cannot "
                                          "be honoured"),
])
def test_config_rejects_bad_nsa_keys_by_name(key, value, match):
    from nsa_layers.mindformers import NSAQwen3Config

    values = {k: v for k, v in tiny_config().model.model_config.items() if k not in ("model_type", "architectures")}
    values[key] = value
    with pytest.raises(ValueError, match=match):
        NSAQwen3Config(**values)


@pytest.mark.parametrize("compute, softmax", [("bfloat16", "float32"), ("bfloat16", "bfloat16")])
def test_softmax_compute_dtype_reaches_the_nsa_core(compute, softmax):
    """The model's compute dtype and ``softmax_compute_dtype`` become every core's, and its gate's."""
    import mindspore as ms

    net = build(tiny_config(compute_dtype=compute, softmax_compute_dtype=softmax))
    dtypes = {"bfloat16": ms.bfloat16, "float32": ms.float32}
    for layer in net.model.decoder.layers:
        precision = layer.self_attention.core_attention.precision
        assert (precision.compute, precision.softmax) == (dtypes[compute], dtypes[softmax])
        assert layer.self_attention.gate.precision is precision
    held = [swap for swap in net.cpu_swaps if swap.endswith(".cast (bfloat16 held in float32)")]
    names = {swap.split(".")[0] for swap in held}
    assert {"ColumnParallelLinear", "RMSNorm"} <= names if compute == "bfloat16" else not names


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


def test_every_yaml_under_configs_is_valid(monkeypatch, tmp_path):
    from mindformers.models.build_config import get_model_config
    from mindformers.tools.register import MindFormerConfig

    from nsa_layers.mindformers import NSAQwen3Config

    found = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert found == sorted([TINY_YAML.name, LARGE_YAML.name, PARALLEL_YAML.name])
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
    assert {"actual_seq_len", "position_ids"} <= set(columns)
    assert columns == list(large.train_dataset.construct_args_key)
    assert large.train_dataset.data_loader.create_compressed_eod_mask
    assert len(large.parallel.dataset_strategy) == len(columns)
    assert os.path.isfile(ROOT / "configs" / "register" / "nsa_register.py")


def test_parallel_yaml_converts_and_lays_out_the_core_over_its_devices(monkeypatch, tmp_path):
    """The 8B / 64k YAML: dp 2 x cp 4 x tp 2 on 16 devices, K/V all-gather context parallel; the core it
    configures, built under a semi-auto context, declares its layouts over that device matrix and
    runs 16 query heads and 4 KV heads per rank."""
    from mindformers.models.build_config import get_model_config
    from mindformers.tools.register import MindFormerConfig
    from mindspore import context
    from mindspore.context import ParallelMode

    from nsa_layers.parallel import NSACoreShard

    monkeypatch.setenv("REGISTER_PATH", str(ROOT / "configs" / "register"))
    monkeypatch.chdir(tmp_path)
    yaml = MindFormerConfig(str(PARALLEL_YAML))
    model = yaml.model
    model.model_config.parallel_config = yaml.parallel_config  # what MindFormers' Trainer does
    config = get_model_config(model)
    tc = config.convert_to_transformer_config()
    assert (tc.data_parallel_size, tc.context_parallel_size, tc.tensor_model_parallel_size) == (2, 4, 2)
    assert tc.cp_comm_type == "all_gather" and tc.hierarchical_context_parallel_sizes == 1  # colossalai_cp
    assert (tc.seq_length, tc.num_attention_heads, tc.num_query_groups, tc.num_layers) == (65536, 32, 8, 36)
    assert yaml.parallel.parallel_mode == 1 and len(yaml.parallel.dataset_strategy) == len(
        yaml.train_dataset.input_columns)
    context.set_auto_parallel_context(parallel_mode=ParallelMode.SEMI_AUTO_PARALLEL, device_num=16)
    try:
        shard = NSACoreShard(config.nsa_config(), 2, 4, 2, row_length=tc.seq_length)
        shard.declare_layouts()
    finally:
        context.reset_auto_parallel_context()
    layouts = shard.morph.attrs["in_layout"]
    assert all(tuple(layout["device_matrix"]) == (2, 4, 2) for layout in layouts)
    assert tuple(layouts[0]["tensor_map"]) == ((2, 1), 0, -1)  # queries: tokens by dp, cp; heads by tp
    assert tuple(layouts[1]["tensor_map"]) == (2, 0, -1)  # keys: tokens by dp only (gathered over cp)
    assert (shard.rank_core.config.num_heads, shard.rank_core.config.num_kv_heads) == (16, 4)
