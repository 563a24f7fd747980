"""``nsa_select_attention``: attention of each query over the raw tokens of its selected blocks.

On Ascend the MindSpore kernel ``mindspore.ops.nsa_select_attention`` runs; everywhere else a
pure-MindSpore implementation of the documented math (see :func:`nsa_select_attention`) that
gathers every token's selected rows, in chunks of tokens to bound memory.
"""

import functools

import mindspore as ms
import numpy as np
from mindspore import Tensor, mint, ops
from mindspore.ops import constexpr

from . import _checks, _varlen
from ._device import on_ascend

__all__ = ["nsa_select_attention", "check_nsa_select_attention"]

_OP = "nsa_select_attention"
FLT_MAX = float(np.finfo(np.float32).max)
SOFTMAX_STAT_WIDTH = 8
SUPPORTED_BLOCK_SIZE = 64  # "select_block_size: currently only supports 64"
SUPPORTED_BLOCK_COUNT = 16  # "when select_block_size is 64, select_block_count should be 16"
MAX_GROUP = 32
MAX_BATCHES = 1024
GATHER_BUDGET = 1 << 22  # gathered key elements per chunk of query tokens (16 MiB of float32)
_BMM_TRANSPOSE_B = ops.BatchMatMul(transpose_b=True)
_ASSERT = ops.Assert(summarize=64)


def nsa_select_attention(query, key, value, topk_indices, scale_value, head_num, select_block_size,
                         select_block_count, *, atten_mask=None, actual_seq_qlen, actual_seq_kvlen):
    r"""Attention of every query token over the tokens of its ``select_block_count`` selected blocks.

    Same contract as ``mindspore.ops.nsa_select_attention``. For query token ``t`` of batch ``b``
    (local index ``s1``), KV head ``h`` and its query heads ``h*G .. h*G+G-1`` (``G = N1 / N2``):
    the keys are the rows ``kv_start_b + idx * select_block_size + j`` for every index ``idx`` in
    ``topk_indices[t, h]`` (local to the batch's KV segment, in slot order, duplicates counted
    twice) and ``j < select_block_size``;
    ``s = scale_value * q @ k^T`` in float32, ``P = softmax(s)``,
    ``attention_out = round(P) @ v`` with ``P`` cast to the query dtype before the float32 product.

    Masking: without ``atten_mask`` nothing is masked (as the kernel: "full computation"). With an
    ``atten_mask`` tensor its *content is ignored* and the kernel's generated causal mask applies:
    gathered positions after the query's own local index are masked (``-FLT_MAX``, applied before
    the scale, as the kernel does). MindSpore's
    documentation calls ``atten_mask`` "currently not supported"; the kernel behaves as described.
    Positions past the end of the KV segment (a partial last block) are masked as well and read the
    segment's first row; such blocks do not arise where ``S_kv`` is a multiple of the block size, as
    the kernel requires.

    Fully masked rows: every score is ``-FLT_MAX``, so ``P`` is uniform over the gathered rows and
    ``softmax_max`` is ``-FLT_MAX * scale_value`` (the kernel's arithmetic). NSA layers avoid such rows by always
    selecting the query's own block.

    Args:
        query (Tensor): ``(T1, N1, D1)``, float16 or bfloat16.
        key (Tensor): ``(T2, N2, D1)``, same dtype.
        value (Tensor): ``(T2, N2, D2)``, same dtype, ``D2 <= D1``.
        topk_indices (Tensor): ``(T1, N2, select_block_count)`` int32, block indices local to the
            batch's KV segment, each in ``[0, ceil(S_kv_b / select_block_size))``.
        scale_value (float): score scale, e.g. ``D1 ** -0.5``.
        head_num (int): ``N1``; ``N1 % N2 == 0`` and ``N1 / N2 <= 32``.
        select_block_size (int): block length in tokens; only 64 is supported.
        select_block_count (int): selected blocks per token; with block 64 it must be 16.

    Keyword Args:
        atten_mask (Tensor, optional): bool or uint8, 2-D; its presence enables the causal mask.
        actual_seq_qlen (tuple[int] | list[int]): query prefix sums: non-empty, non-decreasing, ``>= 0``,
            last ``== T1``; at most 1024 batches.
        actual_seq_kvlen (tuple[int] | list[int]): KV prefix sums, same rules with ``T2``, same
            number of batches.

    Returns:
        tuple of 3 Tensors: ``attention_out (T1, N1, D2)`` in the query dtype; ``softmax_max`` and
        ``softmax_sum (T1, N1, 8)`` float32 (row max of the scaled, masked scores and
        ``sum(exp(s - max))``, repeated 8 times, row-major).

    Gradients:
        ``(dq, dk, dv)`` through ``attention_out``: the softmax-attention backward over the gathered
        rows, scatter-added into ``key``/``value`` (a block selected twice accumulates twice, rows
        never selected get 0). ``softmax_max``/``softmax_sum`` carry no gradient; ``topk_indices``
        none either.

    Raises:
        TypeError: ``query``, ``key``, ``value`` or ``topk_indices`` not a Tensor; ``atten_mask`` not
            None or a Tensor; data dtype not float16/bfloat16; ``topk_indices`` not int32; mask dtype
            not bool/uint8; ``scale_value`` not a float; ``head_num``, ``select_block_size`` or
            ``select_block_count`` not an int; a prefix-sum argument not a tuple/list of ints.
        ValueError: ``query``, ``key`` or ``value`` not of rank 3 (as MindSpore's shape inference).
        RuntimeError: dtypes of ``query``, ``key``, ``value`` differ; an input tensor is empty;
            ``head_num != N1``; ``D_q != D_k``
            or ``D_k < D_v``; ``key``/``value`` disagree on ``T2``/``N2``; ``N1 % N2 != 0`` or
            ``N1 / N2 > 32``; ``select_block_size != 64``; ``select_block_count != 16``;
            ``topk_indices`` shape not ``(T1, N2, select_block_count)``; prefix sums broken or with
            different batch counts; a mask not 2-D; and, in the fallback when it runs, an index
            outside ``[0, ceil(S_kv_b / select_block_size))`` (MindSpore's ``Assert``: "assert
            failed", with the offending indices printed; under ``mindspore.jit`` the error surfaces
            when the results are read). The Ascend kernel leaves such indices undefined.
    """
    for name, arg in (("query", query), ("key", key), ("value", value), ("topk_indices", topk_indices)):
        _checks.tensor(_OP, name, arg)
    _checks.optional_tensor(_OP, "atten_mask", atten_mask)
    plan = _checked_arguments(
        query.shape, query.dtype, key.shape, key.dtype, value.shape, value.dtype, topk_indices.shape,
        topk_indices.dtype, scale_value, head_num, select_block_size, select_block_count,
        None if atten_mask is None else (atten_mask.shape, atten_mask.dtype), actual_seq_qlen, actual_seq_kvlen)
    if on_ascend():
        return ms.ops.nsa_select_attention(
            query, key, value, topk_indices, scale_value, head_num, select_block_size, select_block_count,
            atten_mask=atten_mask, actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen)
    return _fallback(query, key, value, topk_indices, float(scale_value), int(select_block_size),
                     atten_mask is not None, *plan)


def check_nsa_select_attention(q_shape, q_dtype, k_shape, k_dtype, v_shape, v_dtype, idx_shape, idx_dtype,
                               scale_value, head_num, select_block_size, select_block_count, atten_mask_meta,
                               actual_seq_qlen, actual_seq_kvlen):
    """The documented argument errors of :func:`nsa_select_attention` (after its Tensor checks), on
    static metadata, without running it: raises what the op would raise (types first).

    Args:
        q_shape, k_shape, v_shape, idx_shape (tuple[int]) and their dtypes: of query, key, value and
            topk_indices.
        atten_mask_meta: ``None`` (no mask) or the mask's ``(shape, dtype)``.
        The others: as :func:`nsa_select_attention` takes them.

    Returns:
        ``(qlen, kvlen)``: the prefix sums as tuples of ints.
    """
    scale, block, count, mask_meta = scale_value, select_block_size, select_block_count, atten_mask_meta
    qlen, kvlen = actual_seq_qlen, actual_seq_kvlen
    _checks.half_dtype(_OP, "query", q_dtype)
    if idx_dtype != ms.int32:
        raise TypeError(f"{_OP}: the dtype of 'topk_indices' must be int32, but got {idx_dtype}.")
    if mask_meta is not None and mask_meta[1] not in (ms.bool_, ms.uint8):
        raise TypeError(f"{_OP}: the dtype of 'atten_mask' must be bool or uint8, but got {mask_meta[1]}.")
    _checks.real(_OP, "scale_value", scale)
    for name, val in (("head_num", head_num), ("select_block_size", block), ("select_block_count", count)):
        _checks.integer(_OP, name, val)
    qlen = _varlen.as_int_tuple(qlen, "actual_seq_qlen", _OP)
    kvlen = _varlen.as_int_tuple(kvlen, "actual_seq_kvlen", _OP)
    for name, shape in (("query", q_shape), ("key", k_shape), ("value", v_shape)):
        _checks.rank(_OP, name, shape, 3, ValueError)

    bad = RuntimeError
    _checks.same_dtype(_OP, ("query", "key", "value"), (q_dtype, k_dtype, v_dtype), bad)
    for name, shape in (("query", q_shape), ("key", k_shape), ("value", v_shape), ("topk_indices", idx_shape)):
        _checks.not_empty(_OP, name, shape, bad)
    (t1, n1, d1), (t2, n2, dk), (tv, nv, d2) = q_shape, k_shape, v_shape
    if head_num != n1:
        raise bad(f"{_OP}: 'head_num' must equal N1={n1} (query.shape[1]), but got {head_num}.")
    if dk != d1 or d2 > d1:
        raise bad(f"{_OP}: head dimensions must satisfy D_q == D_k >= D_v, but got D_q={d1}, D_k={dk}, D_v={d2}.")
    if (tv, nv) != (t2, n2):
        raise bad(f"{_OP}: 'value' must have the T2 and N2 of 'key' {(t2, n2)}, but got {(tv, nv)}.")
    if n2 < 1 or n1 % n2 != 0 or n1 // n2 > MAX_GROUP:
        raise bad(f"{_OP}: N1={n1} must be a multiple of N2={n2} with N1/N2 <= {MAX_GROUP}.")
    if block != SUPPORTED_BLOCK_SIZE:
        raise bad(f"{_OP}: 'select_block_size' must be {SUPPORTED_BLOCK_SIZE} (the only supported value), "
                  f"but got {block}.")
    if count != SUPPORTED_BLOCK_COUNT:
        raise bad(f"{_OP}: 'select_block_count' must be {SUPPORTED_BLOCK_COUNT} when 'select_block_size' is "
                  f"{SUPPORTED_BLOCK_SIZE}, but got {count}.")
    if tuple(idx_shape) != (t1, n2, count):
        raise bad(f"{_OP}: 'topk_indices' must have shape (T1, N2, select_block_count) = {(t1, n2, count)}, "
                  f"but got {tuple(idx_shape)}.")
    if mask_meta is not None and len(mask_meta[0]) != 2:
        raise bad(f"{_OP}: 'atten_mask' must be 2-D, but got shape {tuple(mask_meta[0])}.")
    _varlen.check_prefix_sums(qlen, t1, "actual_seq_qlen", _OP, bad, positive=False)
    _varlen.check_prefix_sums(kvlen, t2, "actual_seq_kvlen", _OP, bad, positive=False)
    if len(qlen) != len(kvlen) or len(qlen) > MAX_BATCHES:
        raise bad(f"{_OP}: 'actual_seq_qlen' and 'actual_seq_kvlen' must describe the same number of batches "
                  f"(at most {MAX_BATCHES}), but got {len(qlen)} and {len(kvlen)}.")
    return qlen, kvlen


@constexpr
def _checked_arguments(*args):
    """:func:`check_nsa_select_attention` as a constexpr (so it also runs while ``mindspore.jit``
    compiles); returns the fallback's per-token host plan, as a 1-tuple."""
    qlen, kvlen = check_nsa_select_attention(*args)
    return (_token_plan(qlen, kvlen, args[10]),)


@functools.lru_cache(maxsize=256)
def _token_plan(qlen, kvlen, block):
    """Per query token ``(T1, 4)`` int32: KV start row, KV length, blocks in the KV segment, local index."""
    batch = _varlen.token_segment_ids(qlen)
    kv_start = _varlen.segment_starts(kvlen)[batch]
    kv_len = _varlen.segment_lengths(kvlen)[batch]
    plan = np.stack([kv_start, kv_len, -(-kv_len // block), _varlen.token_positions(qlen)], axis=1)
    return Tensor(plan.astype(np.int32))


def _fallback(query, key, value, topk, scale, block, causal, plan):
    """Pure-MindSpore forward (see :func:`nsa_select_attention`); float32 compute, token chunks."""
    t1, n1, d1 = query.shape
    t2, n2, d2 = value.shape
    count = topk.shape[2]
    group = n1 // n2
    in_range = ops.logical_and(topk >= 0, topk < plan[:, 2].reshape(t1, 1, 1))
    topk = ops.depend(topk, _ASSERT(in_range.all(), [topk, plan[:, 2]]))
    q32, k32, v32 = (a.astype(ms.float32) for a in (query, key, value))
    k_rows, v_rows = k32.reshape(t2 * n2, d1), v32.reshape(t2 * n2, d2)
    offsets = ops.arange(0, block, dtype=ms.int32).reshape(1, 1, 1, block)
    heads = ops.arange(0, n2, dtype=ms.int32).reshape(1, n2, 1)
    chunk = max(1, GATHER_BUDGET // (n2 * count * block * max(d1, d2)))
    outs, maxes, sums = [], [], []
    for start in range(0, t1, chunk):
        stop = min(t1, start + chunk)
        rows = stop - start
        tok = plan[start:stop]
        pos = (topk[start:stop].reshape(rows, n2, count, 1) * block + offsets).reshape(rows, n2, count * block)
        outside = pos >= tok[:, 1].reshape(rows, 1, 1)
        masked = ops.logical_or(outside, pos > tok[:, 3].reshape(rows, 1, 1)) if causal else outside
        flat = (tok[:, 0].reshape(rows, 1, 1) + ops.masked_fill(pos, outside, 0)) * n2 + heads
        k_sel = ops.gather(k_rows, flat.reshape(-1), 0).reshape(rows * n2, count * block, d1)
        v_sel = ops.gather(v_rows, flat.reshape(-1), 0).reshape(rows * n2, count * block, d2)
        q_b = q32[start:stop].reshape(rows * n2, group, d1)
        scores = _BMM_TRANSPOSE_B(q_b, k_sel)  # (rows*N2, G, K*bs)
        # as the kernel: masked scores are filled with -FLT_MAX before the scale is applied
        scores = ops.masked_fill(scores, masked.reshape(rows * n2, 1, count * block), -FLT_MAX) * scale
        row_max = scores.max(axis=-1, keepdims=True)
        expo = ops.exp(scores - row_max)
        row_sum = expo.sum(axis=-1, keepdims=True)
        rounded = (expo / row_sum).astype(query.dtype).astype(ms.float32)
        outs.append(mint.bmm(rounded, v_sel).reshape(rows, n1, d2))
        maxes.append(ops.stop_gradient(row_max).reshape(rows, n1, 1))
        sums.append(ops.stop_gradient(row_sum).reshape(rows, n1, 1))
    stat = (t1, n1, SOFTMAX_STAT_WIDTH)
    out = ops.cat(outs, 0).astype(query.dtype)
    return out, ops.broadcast_to(ops.cat(maxes, 0), stat), ops.broadcast_to(ops.cat(sums, 0), stat)
