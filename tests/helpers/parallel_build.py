"""One rank of an ``msrun`` job: build the tiny NSA model under a semi-auto parallel context (MindSpore
compiles none on CPU; construction is what runs) and write what layer 0 declares to ``OUT/rank_R.json``.

Usage (from tests/mindformers/test_parallel_build.py): ``msrun ... parallel_build.py DP CP TP OUT``.
"""

import json
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, so `helpers` imports

import mindspore as ms  # noqa: E402
from mindspore import context  # noqa: E402
from mindspore.communication import get_rank, init  # noqa: E402
from mindspore.context import ParallelMode  # noqa: E402


def _strategy(prim):
    value = prim.attrs.get("in_strategy")
    return None if value is None else [list(s) for s in value]


def main():
    dp, cp, tp = (int(a) for a in sys.argv[1:4])
    out_dir = sys.argv[4]
    init()
    from mindformers.core.context.build_context import build_context
    from mindformers.tools.register import MindFormerConfig

    from helpers.mindformers import build, tiny_config

    build_context(tiny_config())
    ms.set_context(mode=ms.GRAPH_MODE)
    context.set_auto_parallel_context(parallel_mode=ParallelMode.SEMI_AUTO_PARALLEL, device_num=dp * cp * tp)
    cfg = tiny_config(num_attention_heads=4, num_key_value_heads=2, vocab_size=260, nsa_independent_kv=True,
                      use_flash_attention=True)  # MindFormers requires it for cp > 1 (NSA does not read it)
    cfg.model.model_config.parallel_config = MindFormerConfig(data_parallel=dp, model_parallel=tp,
                                                              context_parallel=cp)
    net = build(cfg)
    attention = net.model.decoder.layers[0].self_attention
    shard = attention.core_attention.core_shard
    report = {
        "cp_rank": shard.cp_rank,
        "checks_prefix_sums": net.checks_prefix_sums,
        "core_in": [[lay["device_matrix"], lay["tensor_map"]] for lay in shard.morph.attrs["in_layout"]],
        "core_out": [[lay["device_matrix"], lay["tensor_map"]] for lay in shard.morph.attrs["out_layout"]],
        "rank_heads": [shard.rank_core.config.num_heads, shard.rank_core.config.num_kv_heads],
        "gate_matmul": _strategy(attention.gate.proj.matmul),
        "gate_bias_add": _strategy(attention.gate.proj.bias_add),
        "gate_sigmoid": _strategy(attention.gate.sigmoid),
        "gate_transpose": _strategy(attention.gate_transpose),
        "split_kv_branches": _strategy(attention.split_kv_branches),
        "parameters": sorted(p.name for p in attention.get_parameters()),
    }
    with open(os.path.join(out_dir, f"rank_{get_rank()}.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, default=list)


if __name__ == "__main__":
    main()
