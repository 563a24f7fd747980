"""``nsa_compress_attention``: attention over compressed keys plus top-k selection-block scoring.

On Ascend the MindSpore kernel ``mindspore.ops.nsa_compress_attention`` runs; everywhere else a
pure-MindSpore implementation of the documented math (see :func:`nsa_compress_attention`), one
batch at a time (the batches come from host-side prefix sums, so the loop is static).
"""

import functools

import mindspore as ms
import numpy as np
from mindspore import Tensor, mint, ops
from mindspore.ops import constexpr

from . import _checks, _varlen
from ._device import on_ascend

__all__ = ["nsa_compress_attention", "check_nsa_compress_attention", "kernel_importance_weights"]

_OP = "nsa_compress_attention"
FLT_MAX = float(np.finfo(np.float32).max)
SOFTMAX_STAT_WIDTH = 8  # softmax_max / softmax_sum repeat each value 8 times (one 32-byte block)
MAX_COMPRESSED_KV = 14000  # per-batch compressed KV length the kernel's buffers hold
_BMM_TRANSPOSE_B = ops.BatchMatMul(transpose_b=True)


def nsa_compress_attention(query, key, value, scale_value, head_num, compress_block_size, compress_stride,
                           select_block_size, select_block_count, *, topk_mask=None, atten_mask=None,
                           actual_seq_qlen, actual_cmp_seq_kvlen, actual_sel_seq_kvlen):
    r"""Attention of every query over the compressed keys of its batch, and its top-k selection blocks.

    Same contract as ``mindspore.ops.nsa_compress_attention``. Per batch ``b`` (query rows from
    ``actual_seq_qlen``, compressed key rows from ``actual_cmp_seq_kvlen``, ``S1`` and ``S2`` rows)
    and query head ``n`` (KV head ``n // G``, ``G = N1 / N2``):

    1. ``s = scale_value * q @ k^T`` in float32; where ``atten_mask[:S1, :S2]`` is True the score is
       set to ``-FLT_MAX`` (True = masked; no causal mask is implied);
    2. ``P_cmp = softmax(s)`` in float32; ``attention_out = round(P_cmp) @ v`` where ``round`` casts
       the probabilities to the query dtype (as the kernel does) before the float32 product;
    3. importance of selection block ``t`` (``m = select_block_size / compress_stride``,
       ``n = compress_block_size / compress_stride``, ``n_sel = ceil(S2 / m)``):
       ``P_slc[t] = sum_{i=0}^{m+n-2} min(i+1, m+n-1-i, n) * P_cmp[m*(t+1) - i]``, out-of-range
       indices contributing 0 (the paper's Eq. 9 at ``j = t + 1``, the kernel's convention; see
       :func:`kernel_importance_weights`);
    4. summed over the ``G`` query heads of each KV group; where ``topk_mask[:S1, :n_sel]`` is True
       the score becomes ``+FLT_MAX`` (True = force-select);
    5. ``topk_indices`` = the ``select_block_count`` highest scores in descending order, ties to the
       lower index; indices are local to the batch.

    Args:
        query (Tensor): ``(T1, N1, D1)``, float16 or bfloat16.
        key (Tensor): ``(T2, N2, D1)`` compressed keys, same dtype.
        value (Tensor): ``(T2, N2, D2)``, same dtype, ``D2 <= D1``; ``D1``, ``D2`` multiples of 16.
        scale_value (float): score scale, e.g. ``D1 ** -0.5``.
        head_num (int): ``N1``.
        compress_block_size (int): ``l``, a multiple of 16 in ``[16, 128]``, ``>= compress_stride``.
        compress_stride (int): ``d``, a multiple of 16 in ``[16, 64]``.
        select_block_size (int): ``l'``, a multiple of 16 in ``[16, 128]``, ``>= l``, ``l' % d == 0``.
        select_block_count (int): ``K`` in ``[1, 32]``, at most every batch's ``n_sel``.

    Keyword Args:
        topk_mask (Tensor, optional): bool (or uint8), ``(>= max S1, >= max n_sel)``; each batch uses its
            top-left ``[0:S1, 0:n_sel]`` block. (The kernel addresses rows with stride
            ``ceil(max S2 / m)``: pass exactly that width for identical results on Ascend.)
        atten_mask (Tensor, optional): bool (or uint8), ``(>= max S1, >= max S2)``; each batch uses its
            top-left ``[0:S1, 0:S2]`` block (pass exactly ``max S2`` columns for Ascend).
        actual_seq_qlen (tuple[int] | list[int]): query prefix sums, non-decreasing, ``>= 0``, last ``<= T1``.
        actual_cmp_seq_kvlen (tuple[int] | list[int]): compressed-key prefix sums, same number of
            batches, last ``<= T2``; every batch needs ``1 <= S2 <= 14000``.
        actual_sel_seq_kvlen (tuple[int] | list[int]): type-checked and otherwise unused, as on
            Ascend: the selection-block count per batch is ``ceil(S2 / m)``.

    Returns:
        tuple of 4 Tensors:

        - ``attention_out (T1, N1, D2)``, query dtype;
        - ``topk_indices_out (T1, N2, select_block_count)``, int32;
        - ``softmax_max_out`` and ``softmax_sum_out (T1, N1, 8)``, float32: the row max of the scaled,
          masked scores and ``sum(exp(s - max))``, each repeated 8 times. Memory layout as the
          kernel's (FlashAttention varlen): per batch an ``(N1, S1, 8)`` block, blocks concatenated
          in batch order, the whole reshaped to ``(T1, N1, 8)``.

        Rows of ``T1`` past the last query prefix sum are 0 in every output.

    Fully masked rows (every score of a query masked): all scores equal ``-FLT_MAX``, so the
    probabilities are uniform over the batch's ``S2`` keys and ``softmax_max`` is ``-FLT_MAX`` (the
    kernel's arithmetic; it does not special-case such rows). NSA layers should zero those rows.

    Gradients:
        With respect to ``query``, ``key`` and ``value`` through ``attention_out`` only, as on Ascend
        (whose backward is ``FlashAttentionScoreGrad``): the masked-softmax attention backward.
        ``topk_indices_out``, ``softmax_max_out`` and ``softmax_sum_out`` carry no gradient.

    Raises:
        TypeError: a tensor argument is not a Tensor (masks: not None or a Tensor); the dtypes of
            ``query``, ``key``, ``value`` differ or are not float16/bfloat16; a mask is not bool/uint8;
            ``scale_value`` not a float; an int argument not an int; a prefix-sum argument not a
            tuple/list of ints.
        ValueError: any shape or value constraint above is broken (ranks, empty tensors, head counts and
            ``head_num``, dimensions, block sizes, counts, prefix sums, mask shapes).
    """
    for name, arg in (("query", query), ("key", key), ("value", value)):
        _checks.tensor(_OP, name, arg)
    _checks.optional_tensor(_OP, "topk_mask", topk_mask)
    _checks.optional_tensor(_OP, "atten_mask", atten_mask)
    plan = _checked_arguments(
        query.shape, query.dtype, key.shape, key.dtype, value.shape, value.dtype, scale_value, head_num,
        compress_block_size, compress_stride, select_block_size, select_block_count,
        _mask_meta(topk_mask), _mask_meta(atten_mask),
        actual_seq_qlen, actual_cmp_seq_kvlen, actual_sel_seq_kvlen)
    if on_ascend():
        return ms.ops.nsa_compress_attention(
            query, key, value, scale_value, head_num, compress_block_size, compress_stride, select_block_size,
            select_block_count, topk_mask=topk_mask, atten_mask=atten_mask, actual_seq_qlen=actual_seq_qlen,
            actual_cmp_seq_kvlen=actual_cmp_seq_kvlen, actual_sel_seq_kvlen=actual_sel_seq_kvlen)
    return _fallback(query, key, value, float(scale_value), int(select_block_count), topk_mask, atten_mask,
                     *plan)


def _mask_meta(mask):
    return None if mask is None else (mask.shape, mask.dtype)


def check_nsa_compress_attention(q_shape, q_dtype, k_shape, k_dtype, v_shape, v_dtype, scale_value, head_num,
                                 compress_block_size, compress_stride, select_block_size, select_block_count,
                                 topk_mask_meta, atten_mask_meta, actual_seq_qlen, actual_cmp_seq_kvlen,
                                 actual_sel_seq_kvlen):
    """The documented argument errors of :func:`nsa_compress_attention` (after its Tensor checks), on
    static metadata, without running it: raises what the op would raise (types first).

    Args:
        q_shape, k_shape, v_shape (tuple[int]) and q_dtype, k_dtype, v_dtype: of query, key, value.
        topk_mask_meta, atten_mask_meta: ``None`` (no mask) or the mask's ``(shape, dtype)``.
        The others: as :func:`nsa_compress_attention` takes them.

    Returns:
        ``(qlen, cmplen)``: the query and compressed-key prefix sums as tuples of ints.
    """
    scale, block, stride, sel_block, count = (scale_value, compress_block_size, compress_stride, select_block_size,
                                              select_block_count)
    topk_meta, atten_meta = topk_mask_meta, atten_mask_meta
    qlen, cmplen, sellen = actual_seq_qlen, actual_cmp_seq_kvlen, actual_sel_seq_kvlen
    bad = ValueError
    _checks.same_dtype(_OP, ("query", "key", "value"), (q_dtype, k_dtype, v_dtype))
    _checks.half_dtype(_OP, "query", q_dtype)
    for name, meta in (("topk_mask", topk_meta), ("atten_mask", atten_meta)):
        if meta is not None and meta[1] not in (ms.bool_, ms.uint8):
            raise TypeError(f"{_OP}: the dtype of '{name}' must be bool or uint8, but got {meta[1]}.")
    _checks.real(_OP, "scale_value", scale)
    for name, val in (("head_num", head_num), ("compress_block_size", block), ("compress_stride", stride),
                      ("select_block_size", sel_block), ("select_block_count", count)):
        _checks.integer(_OP, name, val)
    qlen = _varlen.as_int_tuple(qlen, "actual_seq_qlen", _OP)
    cmplen = _varlen.as_int_tuple(cmplen, "actual_cmp_seq_kvlen", _OP)
    _varlen.as_int_tuple(sellen, "actual_sel_seq_kvlen", _OP)

    for name, shape in (("query", q_shape), ("key", k_shape), ("value", v_shape)):
        _checks.rank(_OP, name, shape, 3, bad)
    for name, shape in (("query", q_shape), ("key", k_shape), ("value", v_shape)):
        _checks.not_empty(_OP, name, shape, bad)
    (t1, n1, d1), (t2, n2, dk), (tv, nv, d2) = q_shape, k_shape, v_shape
    if head_num <= 0 or head_num != n1:
        raise bad(f"{_OP}: 'head_num' must be positive and equal N1={n1} (query.shape[1]), but got {head_num}.")
    if (tv, nv) != (t2, n2):
        raise bad(f"{_OP}: 'value' must have the T2 and N2 of 'key' {(t2, n2)}, but got {(tv, nv)}.")
    if dk != d1:
        raise bad(f"{_OP}: key.shape[2] must equal D1={d1} (query.shape[2]), but got {dk}.")
    if d2 > d1:
        raise bad(f"{_OP}: value.shape[2] (D2={d2}) must be at most D1={d1}.")
    _checks.multiple_of_16(_OP, "D1 (query.shape[2])", d1, bad)
    _checks.multiple_of_16(_OP, "D2 (value.shape[2])", d2, bad)
    if n2 < 1 or n1 % n2 != 0:
        raise bad(f"{_OP}: N1={n1} must be a positive multiple of N2={n2} (key heads).")
    group = n1 // n2
    if group >= 128 or 128 % group != 0:
        raise bad(f"{_OP}: the group size N1/N2 must divide 128 and be below 128, but got {group}.")
    for name, val, high in (("compress_block_size", block, 128), ("compress_stride", stride, 64),
                            ("select_block_size", sel_block, 128)):
        _checks.multiple_of_16(_OP, name, val, bad)
        _checks.in_range(_OP, name, val, 16, high, bad)
    if block < stride:
        raise bad(f"{_OP}: 'compress_block_size' ({block}) must be >= 'compress_stride' ({stride}).")
    if sel_block < block:
        raise bad(f"{_OP}: 'select_block_size' ({sel_block}) must be >= 'compress_block_size' ({block}).")
    if sel_block % stride != 0:
        raise bad(f"{_OP}: 'select_block_size' ({sel_block}) must be a multiple of 'compress_stride' ({stride}).")
    _checks.in_range(_OP, "select_block_count", count, 1, 32, bad)

    _varlen.check_prefix_sums(qlen, t1, "actual_seq_qlen", _OP, bad, positive=False, last="at_most")
    _varlen.check_prefix_sums(cmplen, t2, "actual_cmp_seq_kvlen", _OP, bad, positive=False, last="at_most")
    if len(qlen) != len(cmplen):
        raise bad(f"{_OP}: 'actual_seq_qlen' and 'actual_cmp_seq_kvlen' must have the same number of batches, "
                  f"but got {len(qlen)} and {len(cmplen)}.")
    cmp_lengths = _varlen.segment_lengths(cmplen)
    if cmp_lengths.min() < 1 or cmp_lengths.max() > MAX_COMPRESSED_KV:
        raise bad(f"{_OP}: every batch's compressed KV length must be in [1, {MAX_COMPRESSED_KV}], "
                  f"but 'actual_cmp_seq_kvlen' gives {cmp_lengths.tolist()}.")
    ratio = sel_block // stride
    n_sel = -(-cmp_lengths // ratio)
    if count > n_sel.min():
        raise bad(f"{_OP}: 'select_block_count' ({count}) must be at most every batch's selection-block count "
                  f"ceil(S2 / {ratio}) = {n_sel.tolist()}.")
    q_lengths = _varlen.segment_lengths(qlen)
    for name, meta, width in (("atten_mask", atten_meta, int(cmp_lengths.max())),
                              ("topk_mask", topk_meta, int(n_sel.max()))):
        if meta is not None and (len(meta[0]) != 2 or meta[0][0] < q_lengths.max() or meta[0][1] < width):
            raise bad(f"{_OP}: '{name}' must be 2-D with at least ({int(q_lengths.max())}, {width}) elements "
                      f"(max query length, max {'S2' if name == 'atten_mask' else 'n_sel'}), "
                      f"but got shape {tuple(meta[0])}.")
    return qlen, cmplen


@constexpr
def _checked_arguments(*args):
    """:func:`check_nsa_compress_attention` as a constexpr (so it also runs while ``mindspore.jit``
    compiles); returns the fallback's batch layout ``(qlen, cmplen, block, stride, sel_block)``."""
    qlen, cmplen = check_nsa_compress_attention(*args)
    return qlen, cmplen, args[8], args[9], args[10]


@functools.lru_cache(maxsize=512)
def kernel_importance_weights(num_cmp, compress_block_size, compress_stride, select_block_size):
    """The kernel's compressed-window to selection-block map as a matrix ``M (S2, ceil(S2 / m))``.

    ``importance = P_cmp @ M`` with ``M[m*(t+1) - i, t] = min(i+1, m+n-1-i, n)`` for
    ``i = 0 .. m+n-2`` (indices outside ``[0, S2)`` dropped), ``m = l'/d``, ``n = l/d``. This is the
    paper's Eq. 9 at ``j = t + 1``: one compressed window later than the exact token overlap of
    window and block (for 32/16/64 it weights windows ``4t..4t+4`` by ``(1, 2, 2, 2, 1)``).

    Returns:
        np.ndarray float32 ``(num_cmp, ceil(num_cmp / m))``.
    """
    m = select_block_size // compress_stride
    n = compress_block_size // compress_stride
    n_sel = -(-num_cmp // m)
    weights = np.zeros((num_cmp, n_sel), np.float32)
    for t in range(n_sel):
        for i in range(m + n - 1):
            c = m * (t + 1) - i
            if 0 <= c < num_cmp:
                weights[c, t] += min(i + 1, m + n - 1 - i, n)
    return weights


@constexpr
def _importance_matrix(num_cmp, block, stride, sel_block):
    return Tensor(kernel_importance_weights(num_cmp, block, stride, sel_block))


def _fallback(query, key, value, scale, count, topk_mask, atten_mask, qlen, cmplen, block, stride, sel_block):
    """Pure-MindSpore forward (see :func:`nsa_compress_attention`); float32 compute."""
    t1, n1, _ = query.shape
    n2 = key.shape[1]
    d2 = value.shape[2]
    group = n1 // n2
    q32, k32, v32 = (a.astype(ms.float32) for a in (query, key, value))
    outs, tops, maxes, sums = [], [], [], []
    q_start, k_start = 0, 0
    for q_end, k_end in zip(qlen, cmplen):
        s1, s2 = q_end - q_start, k_end - k_start
        if s1 > 0:
            # (N2, G*S1, D1) queries of each KV group against (N2, S2, D1) keys
            q_b = q32[q_start:q_end].reshape(s1, n2, group, -1).transpose(1, 2, 0, 3).reshape(n2, group * s1, -1)
            k_b = k32[k_start:k_end].transpose(1, 0, 2)
            v_b = v32[k_start:k_end].transpose(1, 0, 2)
            scores = (_BMM_TRANSPOSE_B(q_b, k_b) * scale).reshape(n2, group, s1, s2)
            if atten_mask is not None:
                masked = atten_mask[:s1, :s2].astype(ms.bool_).reshape(1, 1, s1, s2)
                scores = ops.masked_fill(scores, masked, -FLT_MAX)
            row_max = scores.max(axis=-1, keepdims=True)
            expo = ops.exp(scores - row_max)
            row_sum = expo.sum(axis=-1, keepdims=True)
            probs = expo / row_sum
            rounded = probs.astype(query.dtype).astype(ms.float32)
            out = mint.bmm(rounded.reshape(n2, group * s1, s2), v_b)  # (N2, G*S1, D2)
            outs.append(out.reshape(n2, group, s1, d2).transpose(2, 0, 1, 3).reshape(s1, n1, d2))
            tops.append(_top_blocks(ops.stop_gradient(probs), topk_mask, count, s1, s2, block, stride, sel_block))
            stat_shape = (n1 * s1, SOFTMAX_STAT_WIDTH)
            maxes.append(ops.broadcast_to(ops.stop_gradient(row_max).reshape(-1, 1), stat_shape).reshape(-1))
            sums.append(ops.broadcast_to(ops.stop_gradient(row_sum).reshape(-1, 1), stat_shape).reshape(-1))
        q_start, k_start = q_end, k_end
    tail = t1 - q_start
    if tail > 0 or not outs:
        outs.append(ops.zeros((tail, n1, d2), ms.float32))
        tops.append(ops.zeros((tail, n2, count), ms.int32))
        maxes.append(ops.zeros((tail * n1 * SOFTMAX_STAT_WIDTH,), ms.float32))
        sums.append(ops.zeros((tail * n1 * SOFTMAX_STAT_WIDTH,), ms.float32))
    out = ops.cat(outs, 0).astype(query.dtype)
    stat = (t1, n1, SOFTMAX_STAT_WIDTH)
    return out, ops.cat(tops, 0), ops.cat(maxes, 0).reshape(stat), ops.cat(sums, 0).reshape(stat)


def _top_blocks(probs, topk_mask, count, s1, s2, block, stride, sel_block):
    """``(S1, N2, K)`` int32 top-k selection blocks of one batch from probabilities ``(N2, G, S1, S2)``."""
    n2, group = probs.shape[0], probs.shape[1]
    weights = _importance_matrix(s2, block, stride, sel_block)
    n_sel = weights.shape[1]
    score = mint.matmul(probs.reshape(n2 * group * s1, s2), weights).reshape(n2, group, s1, n_sel).sum(axis=1)
    if topk_mask is not None:
        forced = topk_mask[:s1, :n_sel].astype(ms.bool_).reshape(1, s1, n_sel)
        score = ops.masked_fill(score, forced, FLT_MAX)
    # ops.sort is stable on CPU: equal scores keep ascending index order (ties to the lower index)
    order = ops.sort(score, axis=-1, descending=True)[1][..., :count]
    return order.astype(ms.int32).transpose(1, 0, 2)
