"""``nsa_compress``: NSA key/value compression over packed segments (TND).

On Ascend the MindSpore kernel ``mindspore.ops.nsa_compress`` runs; everywhere else
:func:`compress_windows`, a pure-MindSpore implementation with the kernel's semantics, its shapes,
dtypes and exact gradients.

How the fallback works (a few large operations, no loop over windows). ``B = gcd(block, stride)``
rows form a *chunk*; a window is ``Q = block / B`` consecutive chunks. Host-side (once per layout,
cached) the rows every window reads are laid out per segment on a chunk-aligned *virtual timeline*,
so that:

1. one ``gather`` copies ``x`` into head-major chunks ``X (N, B, K*D)`` (``K`` chunks in all);
2. one batched matmul with the per-head weights ``W (N, Q, B)`` gives every chunk's weighted
   partial sum for every chunk offset ``q`` inside a window: ``P (N, Q, K*D)``;
3. ``Q`` gathers pick, for each window, its ``q``-th chunk's partial sum, and ``Q - 1`` adds finish
   ``y (T', N, D)``.

The backward is the exact adjoint written by hand (a ``bprop``): one gather spreads ``dy`` back to
the partial sums (every ``(window, q)`` owns a distinct chunk, so no scatter-add is needed), two
batched matmuls give ``dW`` and ``dX``, one gather returns ``dX`` to the rows of ``x``; rows no
window reads get exactly 0.
"""

import functools
from math import gcd

import mindspore as ms
import numpy as np
from mindspore import Tensor, mint, nn, ops
from mindspore.ops import constexpr

from . import _checks, _varlen
from ._device import on_ascend

__all__ = ["nsa_compress", "check_nsa_compress", "compress_windows"]

_OP = "nsa_compress"
_BMM_TRANSPOSE_B = ops.BatchMatMul(transpose_b=True)
_BMM_TRANSPOSE_A = ops.BatchMatMul(transpose_a=True)


def nsa_compress(input, weight, compress_block_size, compress_stride, *, actual_seq_len):  # pylint: disable=redefined-builtin
    r"""Compress the KV sequence with NSA's learnable per-head block weights, segment by segment.

    Same contract as ``mindspore.ops.nsa_compress``. For every segment of length ``L`` given by the
    prefix sums, windows of ``compress_block_size`` rows start every ``compress_stride`` rows from
    the segment's first row; windows never cross a segment boundary and the outputs of all segments
    are concatenated in order. Window ``c`` starting at row ``s_c`` gives

    .. math:: y[c, n, :] = \sum_{j < \text{block}} \text{weight}[j, n] \cdot \text{input}[s_c + j, n, :]

    accumulated in float32 and cast once to the input dtype.

    Args:
        input (Tensor): ``(T, N, D)``, float16 or bfloat16; ``1 <= N <= 128``, ``D % 16 == 0``, ``D <= 256``.
        weight (Tensor): ``(compress_block_size, N)``, same dtype as ``input``.
        compress_block_size (int): window length in rows; a multiple of 16 in ``[16, 128]``.
        compress_stride (int): distance between window starts in rows; a multiple of 16 in
            ``[16, compress_block_size]``.

    Keyword Args:
        actual_seq_len (tuple[int] | list[int]): prefix sums of the segment lengths: non-empty,
            non-decreasing, positive, last element ``== T``.

    Returns:
        Tensor ``(T', N, D)``, dtype of ``input``, with
        ``T' = sum_i max(0, 1 + (L_i - compress_block_size) // compress_stride)``; ``T' = 0`` gives an
        empty ``(0, N, D)`` tensor.

    Raises:
        TypeError: ``input`` or ``weight`` not a Tensor; their dtypes differ; dtype not
            float16/bfloat16; ``compress_block_size`` or ``compress_stride`` not an int;
            ``actual_seq_len`` not a tuple/list of ints.
        RuntimeError: rank of ``input`` != 3 or of ``weight`` != 2; ``weight.shape != (block, N)``;
            ``D % 16 != 0`` or ``D > 256``; ``N`` outside ``[1, 128]``; ``compress_block_size`` not a
            multiple of 16 or outside ``[16, 128]``; ``compress_stride`` not a multiple of 16 or
            outside ``[16, compress_block_size]``; ``actual_seq_len`` empty, decreasing, with a
            non-positive element, or with last element != ``T``.

    Gradients:
        Differentiable with respect to ``input`` and ``weight`` (PyNative and ``mindspore.jit``):
        ``d_input[s_c + j, n] += weight[j, n] * dy[c, n]`` and
        ``d_weight[j, n] = sum_c sum_D dy[c, n] * input[s_c + j, n]``; rows read by no window get 0.
        On Ascend, the kernel's gradient (``NsaCompressGrad``) requires
        ``compress_block_size > compress_stride``; when they are equal this function runs the
        pure-MindSpore implementation on Ascend as well (forward and gradient), so the case works.
    """
    _checks.tensor(_OP, "input", input)
    _checks.tensor(_OP, "weight", weight)
    seq = _checked_arguments(input.shape, input.dtype, weight.shape, weight.dtype,
                             compress_block_size, compress_stride, actual_seq_len)
    if on_ascend() and compress_block_size != compress_stride:
        return ms.ops.nsa_compress(input, weight, compress_block_size, compress_stride, actual_seq_len=seq)
    return compress_windows(input, weight, compress_block_size, compress_stride, seq)


def check_nsa_compress(input_shape, input_dtype, weight_shape, weight_dtype, compress_block_size, compress_stride,
                       actual_seq_len):
    """The documented argument errors of :func:`nsa_compress` (after its two Tensor checks), on static
    metadata, without running it: raises what ``nsa_compress`` would raise (types first).

    Args:
        input_shape, weight_shape (tuple[int]): the shapes of ``input`` and ``weight``.
        input_dtype, weight_dtype (mindspore.dtype): their dtypes.
        compress_block_size, compress_stride, actual_seq_len: as :func:`nsa_compress` takes them.

    Returns:
        tuple[int]: ``actual_seq_len`` as a tuple of ints.
    """
    block, stride = compress_block_size, compress_stride
    _checks.same_dtype(_OP, ("input", "weight"), (input_dtype, weight_dtype))
    _checks.half_dtype(_OP, "input", input_dtype)
    _checks.integer(_OP, "compress_block_size", block)
    _checks.integer(_OP, "compress_stride", stride)
    seq = _varlen.as_int_tuple(actual_seq_len, "actual_seq_len", _OP)

    _checks.rank(_OP, "input", input_shape, 3, RuntimeError)
    _checks.rank(_OP, "weight", weight_shape, 2, RuntimeError)
    total, heads, dim = input_shape
    if weight_shape[0] != block:
        raise RuntimeError(
            f"{_OP}: weight.shape[0] must equal compress_block_size={block}, but got {weight_shape[0]}.")
    if weight_shape[1] != heads:
        raise RuntimeError(
            f"{_OP}: weight.shape[1] must equal N={heads} (input.shape[1]), but got {weight_shape[1]}.")
    if dim % 16 != 0:
        raise RuntimeError(f"{_OP}: the last dimension D of 'input' must be a multiple of 16, but got D={dim}.")
    if dim > 256:
        raise RuntimeError(f"{_OP}: the last dimension D of 'input' must be at most 256, but got D={dim}.")
    if heads < 1:
        raise RuntimeError(f"{_OP}: the head count N of 'input' must be at least 1, but got N={heads}.")
    if heads > 128:
        raise RuntimeError(f"{_OP}: the head count N of 'input' must be at most 128, but got N={heads}.")
    _checks.multiple_of_16(_OP, "compress_block_size", block, RuntimeError)
    _checks.in_range(_OP, "compress_block_size", block, 16, 128, RuntimeError)
    _checks.multiple_of_16(_OP, "compress_stride", stride, RuntimeError)
    _checks.in_range(_OP, "compress_stride", stride, 16, block, RuntimeError, high_name="compress_block_size")
    return _varlen.check_prefix_sums(seq, total, "actual_seq_len", _OP, RuntimeError)


@constexpr
def _checked_arguments(*args):
    """:func:`check_nsa_compress` as a constexpr (so it also runs while ``mindspore.jit`` compiles)."""
    return check_nsa_compress(*args)


def compress_windows(x, weight, block, stride, prefix):
    """The pure-MindSpore compression (no argument checks): any float dtype, float32 compute.

    This is what :func:`nsa_compress` runs off Ascend, for callers (the layers) that have checked
    their arguments and may hold float32 data, which the documented op rejects.

    Args:
        x (Tensor): ``(T, N, D)``, float16, bfloat16 or float32.
        weight (Tensor): ``(block, N)``, any float dtype (cast to float32).
        block (int): window length in rows; ``block`` and ``stride`` are positive.
        stride (int): distance between window starts in rows.
        prefix (tuple[int]): segment prefix sums, last element ``== T``.

    Returns:
        Tensor ``(T', N, D)`` in the dtype of ``x``.
    """
    heads, dim = x.shape[1], x.shape[2]
    plan = _window_plan(tuple(prefix), int(block), int(stride), int(heads))
    if plan is None:
        return ops.zeros((0, heads, dim), x.dtype)
    x32 = x if x.dtype == ms.float32 else x.astype(ms.float32)
    w32 = weight if weight.dtype == ms.float32 else weight.astype(ms.float32)
    y = _WINDOW_SUM(x32, w32, *plan)
    return y if x.dtype == ms.float32 else y.astype(x.dtype)


@constexpr
@functools.lru_cache(maxsize=256)
def _window_plan(prefix, block, stride, heads):
    """Host-side index tensors for one layout (see the module docstring), or ``None`` if ``T' = 0``.

    Returns ``(chunk_rows, row_slots, part_rows, part_slots)``:

    - ``chunk_rows (N, B, K)``: flat row ``t * N + n`` of ``x`` for head ``n``, row ``b`` of chunk ``k``;
    - ``row_slots (T * N,)``: inverse of ``chunk_rows``; ``N * B * K`` (a zero row) for unread rows;
    - ``part_rows (Q, T', N)``: row ``(n * Q + q) * K + k`` of the partial sums that window ``c``
      takes for chunk offset ``q``;
    - ``part_slots (N * Q * K,)``: inverse of ``part_rows``; ``T' * N`` (a zero row) where unused.
    """
    starts = _varlen.window_starts(prefix, block, stride)
    if starts.size == 0:
        return None
    chunk = gcd(block, stride)
    per_window = block // chunk
    total = int(prefix[-1])
    # Rows each segment's windows read, from its first window start to its last window end: a whole
    # number of chunks, because block and stride are multiples of the chunk.
    seg_first = _varlen.segment_starts(prefix)
    counts = _varlen.compressed_lengths(prefix, block, stride)
    read = [s + np.arange((c - 1) * stride + block) for s, c in zip(seg_first, counts) if c > 0]
    virtual_rows = np.concatenate(read)
    chunks = virtual_rows.size // chunk
    # chunk index of each window's first chunk on the virtual timeline
    seg_chunk_offset = np.cumsum([0] + [r.size // chunk for r in read])[:-1]
    window_chunk = np.concatenate([
        off + np.arange(c) * (stride // chunk) for off, c in zip(seg_chunk_offset, counts[counts > 0])])
    windows = window_chunk.size

    limit = max(total * heads, heads * per_window * chunks) + 1
    itype = np.int32 if limit < 2 ** 31 else np.int64
    head = np.arange(heads)
    chunk_rows = virtual_rows.reshape(chunks, chunk).T[None] * heads + head[:, None, None]
    row_slots = np.full(total * heads, heads * chunk * chunks, itype)
    row_slots[chunk_rows.reshape(-1)] = np.arange(heads * chunk * chunks)
    q = np.arange(per_window)
    part_rows = ((head[None, None, :] * per_window + q[:, None, None]) * chunks
                 + window_chunk[None, :, None] + q[:, None, None])
    part_slots = np.full(heads * per_window * chunks, windows * heads, itype)
    for qq in range(per_window):
        part_slots[part_rows[qq].reshape(-1)] = np.arange(windows * heads)
    return tuple(Tensor(a.astype(itype)) for a in (chunk_rows, row_slots, part_rows, part_slots))


class _WindowSum(nn.Cell):
    """``y = window sums of x`` given a plan from :func:`_window_plan`; exact adjoint as ``bprop``.

    Inputs: ``x (T, N, D)`` float32, ``w (block, N)`` float32 and the four plan tensors; output
    ``(T', N, D)`` float32. All sizes come from the plan tensors' static shapes.
    """

    def construct(self, x, w, chunk_rows, row_slots, part_rows, part_slots):
        heads, chunk, chunks = chunk_rows.shape
        per_window, windows, _ = part_rows.shape
        dim = x.shape[-1]
        x_chunks = ops.gather(x.reshape(-1, dim), chunk_rows.reshape(-1), 0).reshape(heads, chunk, chunks * dim)
        w_heads = w.T.reshape(heads, per_window, chunk)
        partial = mint.bmm(w_heads, x_chunks).reshape(heads * per_window * chunks, dim)
        y = ops.gather(partial, part_rows[0].reshape(-1), 0)
        for q in range(1, per_window):
            y = y + ops.gather(partial, part_rows[q].reshape(-1), 0)
        return y.reshape(windows, heads, dim)

    def bprop(self, x, w, chunk_rows, row_slots, part_rows, part_slots, out, dout):
        heads, chunk, chunks = chunk_rows.shape
        per_window, windows, _ = part_rows.shape
        dim = x.shape[-1]
        x_chunks = ops.gather(x.reshape(-1, dim), chunk_rows.reshape(-1), 0).reshape(heads, chunk, chunks * dim)
        w_heads = w.T.reshape(heads, per_window, chunk)
        dy = ops.cat((dout.reshape(windows * heads, dim), ops.zeros((1, dim), dout.dtype)), 0)
        d_partial = ops.gather(dy, part_slots, 0).reshape(heads, per_window, chunks * dim)
        d_w = _BMM_TRANSPOSE_B(d_partial, x_chunks).reshape(heads, per_window * chunk).T
        d_chunks = _BMM_TRANSPOSE_A(w_heads, d_partial).reshape(heads * chunk * chunks, dim)
        d_chunks = ops.cat((d_chunks, ops.zeros((1, dim), d_chunks.dtype)), 0)
        d_x = ops.gather(d_chunks, row_slots, 0).reshape(x.shape)
        return (d_x, d_w, ops.zeros_like(chunk_rows), ops.zeros_like(row_slots),
                ops.zeros_like(part_rows), ops.zeros_like(part_slots))


_WINDOW_SUM = _WindowSum()
