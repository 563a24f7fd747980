"""Starting from a Hugging Face Qwen3 checkpoint: a tiny one written from NumPy (``helpers/hf_qwen3.py``)
loads into ``NSAQwen3ForCausalLM`` through MindFormers' own loader (``load_hf_checkpoint``, what the
Trainer calls for ``checkpoint.load_path``), sizes from its ``config.json``; with NSA reduced to dense
causal attention the model's logits are those of MindFormers' stock Qwen3 on the same weights."""

import mindspore as ms
import numpy as np
import pytest

from helpers.hf_qwen3 import stock_qwen3, unused_tensors, write_hf_qwen3
from helpers.mindformers import LARGE_YAML, build, tiny_config
from nsa_layers.mindformers import use_checkpoint_config

NSA_OWN = ("self_attention.gate.", "self_attention.core_attention.", "self_attention.linear_kv_branches.")


def _load(net, directory):
    from mindformers.checkpoint.checkpoint import load_hf_checkpoint

    load_hf_checkpoint(pretrained_model_dir=str(directory), network=net)


def _assert_every_tensor_used(net, tensors, before):
    """Every row of every checkpoint tensor is a row of a loaded parameter (whatever the layout, e.g.
    q/k/v interleaved into linear_qkv); every Qwen3 parameter changed; NSA's own kept their values."""
    unused = unused_tensors(net, tensors)
    assert not unused, unused
    for name, value in ((p.name, p.asnumpy()) for p in net.get_parameters()):
        nsa_own = any(part in name for part in NSA_OWN)
        assert np.array_equal(value, before[name]) == nsa_own, name


@pytest.mark.parametrize("yaml", ["tiny", "large"])
def test_hf_checkpoint_loads_every_tensor_with_sizes_from_config_json(tmp_path, yaml):
    """From both configs: the YAML's own keys (NSA sizes, qkv layout, dtypes) plus config.json's sizes."""
    from mindformers.tools.register import MindFormerConfig

    _, tensors = write_hf_qwen3(tmp_path / "qwen3", seed=1)
    cfg = tiny_config() if yaml == "tiny" else MindFormerConfig(str(LARGE_YAML))
    if yaml == "large":  # registered by the import above, as run_mindformer.py's --register_path does; tiny rows
        cfg.model.model_config.pop("auto_register")
        cfg.model.model_config.seq_length = 64
        cfg.model.model_config.nsa_query_chunk_size = 32
    net = build(use_checkpoint_config(cfg, tmp_path / "qwen3"))
    got = net.config
    assert (got.hidden_size, got.num_hidden_layers, got.num_attention_heads, got.num_key_value_heads,
            got.vocab_size, got.tie_word_embeddings) == (64, 2, 4, 2, 257, False)
    before = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    _load(net, tmp_path / "qwen3")
    _assert_every_tensor_used(net, tensors, before)


def _force_window_branch(net):
    """Gates (compressed, selected, window) = (0, 0, 1) for every head: weight 0, biases -100/+100."""
    for layer in net.model.decoder.layers:
        proj = layer.self_attention.gate.proj
        proj.weight.set_data(ms.Tensor(np.zeros(proj.weight.shape, np.float32)))
        proj.bias.set_data(ms.Tensor(np.tile(np.array([-100.0, -100.0, 100.0], np.float32), proj.bias.shape[0] // 3)))


@pytest.mark.slow
def test_nsa_reduced_to_dense_attention_gives_stock_qwen3_logits(tmp_path):
    """Gate forced to the window branch and a window of the whole 64-token row: NSA is dense causal
    attention, so on the same checkpoint the logits equal MindFormers' stock Qwen3 with a dense core
    (float32), which pins the norms, rotary, GQA grouping and projections to Qwen3's. With NSA's gate
    as initialised (all three branches) they differ."""
    from mindformers.models.build_config import get_model_config

    _, tensors = write_hf_qwen3(tmp_path / "qwen3", seed=2)
    nsa = build(use_checkpoint_config(tiny_config(nsa_window_size=64), tmp_path / "qwen3"))
    before = {p.name: p.asnumpy().copy() for p in nsa.get_parameters()}
    _load(nsa, tmp_path / "qwen3")
    _assert_every_tensor_used(nsa, tensors, before)
    stock_cfg = use_checkpoint_config(tiny_config(), tmp_path / "qwen3")
    model_cfg = stock_cfg.model.model_config
    for key in [key for key in model_cfg if key.startswith("nsa_")]:
        model_cfg.pop(key)
    model_cfg.model_type, model_cfg.architectures = "qwen3", ["Qwen3ForCausalLM"]
    model_cfg.use_flash_attention = False  # the float32 path (flash casts q/k/v to float16)
    stock = stock_qwen3(get_model_config(stock_cfg.model))
    assert {p.name for p in stock.get_parameters()} == \
        {n for n in before if not any(part in n for part in NSA_OWN)}
    _load(stock, tmp_path / "qwen3")

    rng = np.random.default_rng(3)
    inputs = dict(input_ids=ms.Tensor(rng.integers(0, 256, (2, 64)).astype(np.int32)),
                  position_ids=ms.Tensor(np.tile(np.arange(64, dtype=np.int32), (2, 1))))
    nsa.set_train(False)
    stock.set_train(False)
    expected = stock(**inputs).asnumpy()
    as_initialised = nsa(**inputs).asnumpy()
    _force_window_branch(nsa)
    dense = nsa(**inputs).asnumpy()
    assert expected.shape == (128, 257) and np.abs(expected).max() > 1.0
    np.testing.assert_allclose(dense, expected, rtol=1e-5, atol=2e-5)
    assert np.abs(as_initialised - expected).max() > 1e-2


@pytest.mark.slow
def test_legacy_load_route_of_the_32k_yaml_needs_qkv_concat(tmp_path):
    """MindFormers' legacy route (``load_checkpoint`` + ``load_ckpt_format: safetensors``, the 32k
    YAML's and MindFormers' finetune_qwen3.yaml's) through the Trainer on one device: with
    ``qkv_concat: True`` (the 32k YAML's setting) MindFormers converts the checkpoint and every tensor
    is used; without it MindFormers fails in its own loader (a TypeError from ``load_param_into_net``),
    which the tiny YAML avoids by the new route (its ``checkpoint`` section, ``load_hf_checkpoint``)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "helpers" / "trainer_run.py"
    write_hf_qwen3(tmp_path / "qwen3", seed=5)

    def run(out, *extra):
        return subprocess.run([sys.executable, str(script), str(tmp_path / out), "--steps", "1", "--hf",
                               str(tmp_path / "qwen3"), *extra], capture_output=True, text=True, timeout=600,
                              check=False)

    concat = run("concat", "--qkv-concat")
    assert concat.returncode == 0, concat.stderr[-3000:]
    assert json.loads(concat.stdout.strip().splitlines()[-1])["unused"] == []
    assert (tmp_path / "concat" / "nsa_qwen3_ms_converted_weight").is_dir()  # MindFormers' conversion
    plain = run("plain")
    assert plain.returncode != 0
    assert "TypeError" in plain.stderr and "load_param_into_net" in plain.stderr, plain.stderr[-3000:]
