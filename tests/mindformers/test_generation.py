"""Generation through MindFormers' own ``generate``: with the NSA cache, ``NSAQwen3ForCausalLM``
produces the cache-free path's tokens (greedy, and sampled with the same seed), for a batch of
prompts of different lengths, some rows finishing early at EOS.

Each path compiles the tiny model (the cached one once per prompt batch and per number of
unfinished rows), so these run in the slow tier.
"""

import numpy as np
import pytest

from helpers.mindformers import build, tiny_config

PAD = 256


def _randomized_model(independent_kv, seed):
    """The tiny model with every parameter randomised (projections, norms, gate, compressors), so
    that its next tokens depend on the whole context."""
    net = build(tiny_config(nsa_independent_kv=independent_kv))
    rng = np.random.default_rng(seed)
    for param in net.trainable_params():
        value = param.asnumpy()
        param.set_data(type(param.data)((value + 0.3 * rng.standard_normal(value.shape)).astype(np.float32)))
    net.set_train(False)
    return net


def _prompts(rng, lengths):
    prompts = np.full((len(lengths), max(lengths)), PAD, np.int32)
    for row, length in enumerate(lengths):
        prompts[row, :length] = rng.integers(0, 256, length)
    return prompts


def _generate(net, prompts, cache, **kwargs):
    net.nsa_cache = cache
    return [row.tolist() for row in net.generate(prompts, **kwargs)]


@pytest.mark.slow
@pytest.mark.parametrize("independent_kv", [False, True])
def test_cached_generation_equals_cache_free(independent_kv):
    net = _randomized_model(independent_kv, seed=1)
    names = [param.name for param in net.get_parameters()]
    # window 16, blocks of 8, 4 selected, windows of 8 every 4: 30 new tokens cross every boundary
    prompts = _prompts(np.random.default_rng(2), (3, 9, 17))
    greedy = dict(max_new_tokens=30, do_sample=False)
    cached = _generate(net, prompts, True, **greedy)
    assert cached == _generate(net, prompts, False, **greedy)
    assert len({tuple(row[-10:]) for row in cached}) == len(cached)  # the rows do not all repeat one token
    # EOS: the 6th token row 0 generates ends it there (and any other row that meets it)
    eos = cached[0][3 + 5]
    early = _generate(net, prompts, True, eos_token_id=[eos], **greedy)
    assert early == _generate(net, prompts, False, eos_token_id=[eos], **greedy)
    assert len(early[0]) <= 3 + 6 and max(len(row) for row in early) > len(early[0])
    sampled = dict(max_new_tokens=12, do_sample=True, top_k=8, top_p=0.9, temperature=0.8, seed=5)
    assert _generate(net, prompts, True, **sampled) == _generate(net, prompts, False, **sampled)
    assert [param.name for param in net.get_parameters()] == names  # the caches never join the model
