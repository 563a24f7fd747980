"""Dispatch: with the device reported as Ascend, each op calls its MindSpore kernel with arguments that
bind to the kernel's real signature. MindSpore's functional wrappers are ``(*args, **kwargs)``, so the
real signatures are taken from their docstrings and cross-checked against the primitives' ``__call__``."""

import inspect
import re

import mindspore as ms
import mindspore.ops
import numpy as np
import pytest
from mindspore.ops import auto_generate

import nsa_layers.ops._device as device
from helpers.common import random_normal, to_ms
from nsa_layers.ops import nsa_compress, nsa_compress_attention, nsa_select_attention

PRIMITIVES = {"nsa_compress": "NsaCompress", "nsa_compress_attention": "NsaCompressAttention",
              "nsa_select_attention": "NsaSelectAttention"}


def documented_signature(name):
    """The signature on the first line of ``mindspore.ops.<name>.__doc__``, as an inspect.Signature."""
    line = next(text.strip() for text in getattr(mindspore.ops, name).__doc__.splitlines() if text.strip())
    match = re.fullmatch(rf"{name}\((.*)\)(\s*->.*)?", line)
    assert match, line
    scope = {}
    exec(f"def {name}({match.group(1)}): pass", scope)  # pylint: disable=exec-used
    return inspect.signature(scope[name])


@pytest.mark.parametrize("name", sorted(PRIMITIVES))
def test_documented_signature_agrees_with_the_primitive(name):
    documented = list(documented_signature(name).parameters)
    primitive = list(inspect.signature(getattr(auto_generate, PRIMITIVES[name]).__call__).parameters)[1:]
    assert documented == primitive


@pytest.fixture
def ascend(monkeypatch):
    """Report Ascend and record every kernel call; each fake kernel returns a marker value."""
    calls = []
    signatures = {name: documented_signature(name) for name in PRIMITIVES}
    monkeypatch.setattr(device, "_device_target", lambda: "Ascend")

    def fake(name):
        def kernel(*args, **kwargs):
            bound = signatures[name].bind(*args, **kwargs)
            calls.append((name, bound.arguments))
            return f"{name} kernel result"
        return kernel

    for name in PRIMITIVES:
        monkeypatch.setattr(mindspore.ops, name, fake(name))
    return calls


def test_compress_calls_the_kernel(ascend):
    rng = np.random.default_rng(0)
    x, w = to_ms(random_normal(rng, (40, 2, 16)), "float16"), to_ms(random_normal(rng, (32, 2)), "float16")
    assert nsa_compress(x, w, 32, 16, actual_seq_len=[8, 40]) == "nsa_compress kernel result"
    (name, args), = ascend
    assert name == "nsa_compress" and args["input"] is x and args["weight"] is w
    assert (args["compress_block_size"], args["compress_stride"], args["actual_seq_len"]) == (32, 16, (8, 40))


def test_compress_with_block_equal_to_stride_uses_the_fallback_on_ascend(ascend):
    """NsaCompressGrad requires block > stride: that case runs (and differentiates) the fallback."""
    rng = np.random.default_rng(1)
    x, w = to_ms(random_normal(rng, (40, 2, 16)), "float16"), to_ms(random_normal(rng, (16, 2)), "float16")

    def loss(a, b):
        return nsa_compress(a, b, 16, 16, actual_seq_len=(8, 40)).astype(ms.float32).sum()

    y = nsa_compress(x, w, 16, 16, actual_seq_len=(8, 40))
    assert y.shape == (2, 2, 16)  # segment 8 < 16 gives nothing; 32 rows give 2 windows
    dx, dw = ms.grad(loss, grad_position=(0, 1))(x, w)
    assert dx.shape == x.shape and dw.shape == w.shape and ascend == []
    # d(sum y)/dx[t, n, :] = w[t - window start, n] for rows inside a window, 0 elsewhere
    expected = np.zeros((40, 2))
    expected[8:40] = np.tile(w.astype(ms.float32).asnumpy(), (2, 1))
    np.testing.assert_allclose(dx.astype(ms.float32).asnumpy()[:, :, 0], expected, rtol=1e-3)


def test_compress_attention_calls_the_kernel_with_its_masks(ascend):
    rng = np.random.default_rng(2)
    q, k = to_ms(random_normal(rng, (8, 4, 32)), "bfloat16"), to_ms(random_normal(rng, (12, 2, 32)), "bfloat16")
    v = to_ms(random_normal(rng, (12, 2, 16)), "bfloat16")
    atten, topk = ms.Tensor(np.zeros((5, 7), bool)), ms.Tensor(np.zeros((5, 2), bool))
    result = nsa_compress_attention(q, k, v, 0.2, 4, 32, 16, 64, 2, topk_mask=topk, atten_mask=atten,
                                    actual_seq_qlen=(3, 8), actual_cmp_seq_kvlen=(5, 12), actual_sel_seq_kvlen=(2, 4))
    assert result == "nsa_compress_attention kernel result"
    (name, args), = ascend
    assert args["topk_mask"] is topk and args["atten_mask"] is atten and args["query"] is q
    assert (args["head_num"], args["select_block_count"], args["actual_cmp_seq_kvlen"]) == (4, 2, (5, 12))


def test_select_attention_calls_the_kernel(ascend):
    rng = np.random.default_rng(3)
    q = to_ms(random_normal(rng, (6, 4, 32)), "float16")
    k, v = to_ms(random_normal(rng, (128, 2, 32)), "float16"), to_ms(random_normal(rng, (128, 2, 16)), "float16")
    idx = ms.Tensor(np.zeros((6, 2, 16), np.int32))
    result = nsa_select_attention(q, k, v, idx, 0.2, 4, 64, 16, actual_seq_qlen=[2, 6], actual_seq_kvlen=[64, 128])
    assert result == "nsa_select_attention kernel result"
    (name, args), = ascend
    assert args["topk_indices"] is idx and args["atten_mask"] is None and args["actual_seq_kvlen"] == [64, 128]


def test_arguments_are_checked_before_the_kernel_is_called(ascend):
    rng = np.random.default_rng(4)
    x, w = to_ms(random_normal(rng, (40, 2, 16)), "float16"), to_ms(random_normal(rng, (32, 2)), "float16")
    with pytest.raises(RuntimeError, match="T=40"):
        nsa_compress(x, w, 32, 16, actual_seq_len=[8, 39])
    assert ascend == []


def test_cpu_runs_the_fallback():
    assert not device.on_ascend()
