"""How the NSA core splits over MindFormers' ``(dp, cp, tp)`` device matrix: the rule and the layouts.

Tensor parallelism splits heads. Selection sums block importances over a GQA group's query heads
(paper Eq. 10), so a group is never split: ``tp`` must divide the KV heads, and rank ``t`` then holds
query heads ``[t*H/tp, (t+1)*H/tp)`` with exactly their KV heads ``[t*Hkv/tp, (t+1)*Hkv/tp)``, the
compressor parameters of those KV heads, and nothing it needs from another rank. The layouts are
MindSpore ``Layout`` objects over ``("dp", "cp", "tp")`` (MindFormers' device matrix, ``tp`` fastest),
what a self-defined-shard ``Morph`` declares (as MindFormers' ``transformer/dsa`` does). The token
axis stays whole for now: splitting it by data and context parallel needs the prefix sums rebased
per shard.
"""

from dataclasses import dataclass

__all__ = ["NSACoreLayouts", "check_tensor_parallel", "core_layouts"]


def check_tensor_parallel(num_heads, num_kv_heads, tp):
    """``ValueError`` unless ``tp >= 1`` divides ``num_kv_heads`` (and so ``num_heads``, a multiple of it)."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"NSA tensor parallel: the tensor-parallel size must be a positive integer, but got {tp!r}.")
    if num_kv_heads % tp or num_heads % tp:
        raise ValueError(f"NSA tensor parallel: the tensor-parallel size {tp} must divide num_kv_heads="
                         f"{num_kv_heads} (and num_heads={num_heads}): selection sums over each GQA group's "
                         f"heads, so a group is never split.")


@dataclass(frozen=True)
class NSACoreLayouts:
    """The core's layouts, one MindSpore ``Layout`` per input, parameter and output (``T`` tokens,
    ``H`` query heads, ``Hkv`` KV heads, ``l`` compress block size, ``D`` head size)."""

    q: object                       # (T, H, Dq)
    k: object                       # (T, Hkv, Dq)
    v: object                       # (T, Hkv, Dv)
    gates: object                   # (T, H, 3)
    out: object                     # (T, H, Dv)
    compressor_weight: object       # (l, Hkv), the key and the value compressor
    position_embedding: object      # (l, Hkv, Dv), the value compressor's


def core_layouts(dp=1, cp=1, tp=1):
    """The :class:`NSACoreLayouts` of the core on a ``(dp, cp, tp)`` device matrix: heads (query and
    KV, and the compressors' KV-head axis) split by ``tp``, every other axis whole."""
    from mindspore.parallel import Layout

    layout = Layout((dp, cp, tp), ("dp", "cp", "tp"))
    heads = layout("None", "tp", "None")
    return NSACoreLayouts(q=heads, k=heads, v=heads, gates=heads, out=heads,
                          compressor_weight=layout("None", "tp"), position_embedding=heads)
