"""Attention arithmetic shared by the NSA branches: GQA grouping and the masked softmax.

Shapes: a chunk of ``C`` queries ``(C, H, D)`` with ``H = Hkv * G`` heads, head ``n`` reading KV head
``n // G`` (blocked grouping, as MindFormers and the Ascend kernels).
"""

import mindspore as ms
from mindspore import ops

__all__ = ["MASKED", "masked_score", "group_queries", "ungroup_outputs", "masked_softmax", "softmax_over_visible"]

_SOFTMAX = ops.Softmax(axis=-1)
_CAST = ops.Cast()

# Score of a masked key: finite, so no inf - inf; exp(MASKED - row max) is exactly 0 in float32.
MASKED = -1e30
# float16 cannot hold MASKED (it would become -inf, and 0 * -inf = NaN): a finite score whose sum with
# any real score stays finite and whose exp after the row max is still exactly 0.
MASKED_FLOAT16 = -3.0e4


def masked_score(dtype):
    """The masked-key score for scores of ``dtype`` (:data:`MASKED`, or :data:`MASKED_FLOAT16`)."""
    return MASKED_FLOAT16 if dtype == ms.float16 else MASKED


def group_queries(q, kv_heads):
    """``(C, H, D)`` -> ``(Hkv, G * C, D)``: the queries of each KV head, rows ordered (g, c)."""
    rows, heads, dim = q.shape
    group = heads // kv_heads
    return q.reshape(rows, kv_heads, group, dim).transpose(1, 2, 0, 3).reshape(kv_heads, group * rows, dim)


def ungroup_outputs(out, rows):
    """``(Hkv, G * C, Dv)`` -> ``(C, H, Dv)``, the inverse of :func:`group_queries`."""
    kv_heads, grouped, dim = out.shape
    group = grouped // rows
    return out.reshape(kv_heads, group, rows, dim).transpose(2, 0, 1, 3).reshape(rows, kv_heads * group, dim)


def masked_softmax(scores, visible, may_be_empty=False):
    """Softmax over the last axis restricted to ``visible`` keys.

    Masked keys get probability exactly 0 (``exp(MASKED - max)`` underflows to 0), so outputs never
    depend on them. With ``may_be_empty``, a row with no visible key gets all-zero probabilities and
    a zero gradient (no NaN, no uniform average); otherwise every row must see at least one key.

    Args:
        scores (Tensor): ``(..., K)`` float.
        visible (Tensor): bool, broadcastable to ``scores`` (a small mask is broadcast in the add).
        may_be_empty (bool): zero the rows that see nothing.
    """
    probs = softmax_over_visible(scores, visible, masked_score(scores.dtype))
    if may_be_empty:
        probs = probs * visible.any(axis=-1, keep_dims=True).astype(probs.dtype)
    return probs


def softmax_over_visible(scores, visible, masked):
    """:func:`masked_softmax` for rows that each see at least one key, with the masked score
    ``masked`` (:func:`masked_score` of the scores' dtype) given by the caller: primitives only and no
    Python branch, so a graph-mode ``bprop`` can call it (MindSpore 2.9 fails to compile a function
    with a Python ``if`` there, and most ``ops.*`` functions have one)."""
    return _SOFTMAX(scores + _CAST(ops.logical_not(visible), scores.dtype) * masked)
