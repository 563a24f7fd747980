"""Attention arithmetic shared by the NSA branches: GQA grouping, the visibility bias and the
masked attention core with its hand-written backward, at the precision of ``nsa_layers.precision``
(scores, softmax and the softmax backward in the softmax dtype, float32 by default; values rounded
to the compute dtype).

Shapes: a chunk of ``C`` queries ``(C, H, D)`` with ``H = Hkv * G`` heads, head ``n`` reading KV head
``n // G`` (blocked grouping, as MindFormers and the Ascend kernels).
"""

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import constexpr

from .precision import FLOAT32

__all__ = ["MASKED", "masked_score", "index_range", "row_slice", "loop_buffer", "write_rows", "add_rows",
           "chunk_buckets", "loop_rows", "padded_rows", "group_queries", "ungroup_outputs", "visibility_bias",
           "column_tiled", "row_tiled", "row_dot", "attention_forward", "attention_probs", "attention_backward",
           "MaskedAttention"]

# Primitives, not ops.* functions, in what a graph-mode bprop calls: MindSpore 2.9 fails to compile
# many ops.* functions there (their Python branches). A branch on static shapes compiles in a function
# only a bprop calls when both arms assign (attention_backward); one without `else` does not, nor any
# branch in a function a forward calls too (hence the unconditional tile in attention_probs and
# padded_rows; docs/design.md).
_SOFTMAX = ops.Softmax(axis=-1)
_CAST = ops.Cast()
_LOGICAL_NOT = ops.LogicalNot()
_BMM = ops.BatchMatMul()
_BMM_TRANSPOSE_A = ops.BatchMatMul(transpose_a=True)
_BMM_TRANSPOSE_B = ops.BatchMatMul(transpose_b=True)
_ZEROS_LIKE = ops.ZerosLike()
_ONES_LIKE = ops.OnesLike()
_TILE = ops.Tile()
_CONCAT_LAST = ops.Concat(-1)
_RANGE = ops.Range()
_CONCAT_ROWS = ops.Concat(0)
_SLICE = ops.Slice()
# In place: TensorScatterUpdate / TensorScatterAdd copy their whole input at every loop iteration
# (quadratic in T; 2.8 ms per iteration for 32 MB here). Only on buffers from loop_buffer.
_WRITE_ROWS = ops.ScatterUpdate(use_locking=False)
_ADD_ROWS = ops.ScatterAdd(use_locking=False)
# Nothing here broadcasts: on MindSpore's CPU backend a broadcasting binary op costs several times its
# output in memory and time against an explicit tile and a same-shape op (docs/design.md).

# Score of a masked key: finite, so no inf - inf; exp(MASKED - row max) is exactly 0 in float32.
MASKED = -1e30
# float16 cannot hold MASKED (it would become -inf, and 0 * -inf = NaN): a finite score whose sum with
# any real score stays finite and whose exp after the row max is still exactly 0. Only a float16
# softmax (softmax_dtype float16) needs it.
MASKED_FLOAT16 = -3.0e4


def masked_score(dtype):
    """The masked-key score for scores of ``dtype`` (:data:`MASKED`, or :data:`MASKED_FLOAT16`)."""
    return MASKED_FLOAT16 if dtype == ms.float16 else MASKED


def index_range(count):
    """``(count,)`` int32 ``0 .. count - 1`` (the ``Range`` primitive: ``ops.arange`` does not compile in
    a graph-mode bprop)."""
    return _RANGE(ms.Tensor(0, ms.int32), ms.Tensor(count, ms.int32), ms.Tensor(1, ms.int32))


def row_slice(x, start, stop):
    """Rows ``start .. stop - 1`` of ``x`` (static bounds) by the ``Slice`` primitive. ``x[start:stop]``
    compiles to ``StridedSlice``, which MindSpore 2.9's CPU backend runs about 30x slower when the slice
    spans the whole tensor (100 ms for 16 MB; docs/design.md): the branches' outputs often do."""
    return _SLICE(x, (start,) + (0,) * (x.ndim - 1), (stop - start,) + x.shape[1:])


def loop_buffer(anchor, shape, dtype):
    """Zeros of static ``shape`` and ``dtype`` for a graph loop to fill (primitives only: bprops call
    it), computed from the tensor ``anchor`` so that every call makes a new buffer: MindSpore folds
    ``ops.zeros`` of a static shape into a graph constant, which writes in place (:func:`write_rows`,
    :func:`add_rows`) would carry over to the next call."""
    zero = _CAST(_ZEROS_LIKE(anchor.reshape(-1)[:1]), dtype)
    return _TILE(zero.reshape((1,) * len(shape)), shape)


def write_rows(buffer, rows, values):
    """``buffer`` (from :func:`loop_buffer`) with rows ``rows (C,)`` int32 set to ``values (C, ...)``, in
    place (``ScatterUpdate``, which has no bool kernel)."""
    return _WRITE_ROWS(buffer, rows, values)


def add_rows(buffer, rows, values):
    """``buffer`` (from :func:`loop_buffer`) with ``values (C, ...)`` added to its distinct rows
    ``rows (C,)`` int32, in place (``ScatterAdd``)."""
    return _ADD_ROWS(buffer, rows, values)


def padded_rows(x, multiple):
    """``x`` with zero rows (``False`` for bool) appended up to a multiple of ``multiple`` rows
    (primitives only, so that a bprop can pad as its forward did). No ``if`` on the pad, although a
    copy is made when there is none: in MindFormers' model MindSpore 2.9 drops the branch it folded
    away while compiling a forward and then fails on it ("func graph is empty") in the bprop."""
    total = x.shape[0]
    pad = -total % multiple
    flat = x.reshape(total, -1)
    return _CONCAT_ROWS((flat, _TILE(_ZEROS_LIKE(flat[:1]), (pad, 1)))).reshape((total + pad,) + x.shape[1:])


# query chunks per graph loop of a branch whose per-chunk work grows along the sequence
_BUCKETS = 4


def chunk_buckets(first, last, count=_BUCKETS):
    """Chunk indices ``first .. last - 1`` cut into at most ``count`` consecutive ``(first, last)``
    ranges of nearly equal size, the larger ones last (static Python; one graph loop each, or a range
    of one chunk on its own rows: :func:`loop_rows`). No chunks, no ranges."""
    chunks = last - first
    parts = min(count, chunks)
    ranges = []
    for i in range(parts):
        size = chunks // parts + (1 if i >= parts - chunks % parts else 0)
        ranges.append((first, first + size))
        first += size
    return ranges


@constexpr
def loop_rows(buckets):
    """``(first_row, loop_row)`` of the static ``(first, last, ..., c0, c1)`` chunk ranges: the first row
    they cover, and the first row of their graph loops (ranges of several chunks, whose gathers need
    the inputs padded to whole chunks), or the rows' end ``c1`` of the last range if none loops. A
    range of one chunk runs on its own rows (static slices, no loop machinery: the same arithmetic as
    a loop iteration); a loop writes its range's rows into a buffer of its own."""
    loops = [bucket for bucket in buckets if bucket[1] - bucket[0] > 1]
    return buckets[0][-2], loops[0][-2] if loops else buckets[-1][-1]


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


def visibility_bias(visible, dtype, masked):
    """bool ``visible`` -> additive score bias of ``dtype``: 0 where visible, ``masked`` elsewhere."""
    return _CAST(_LOGICAL_NOT(visible), dtype) * masked


def column_tiled(values, width):
    """``(C,)`` -> ``(C, width)``, each value repeated along its row (an explicit tile, so that the
    comparisons that build a mask are same-shape ops: see the primitives above)."""
    return _TILE(values.reshape(-1, 1), (1, width))


def row_tiled(values, height):
    """``(N,)`` -> ``(height, N)``, the row repeated ``height`` times (see :func:`column_tiled`)."""
    return _TILE(values.reshape(1, -1), (height, 1))


def row_dot(a, b):
    """``sum(a * b, -1)`` of ``(B, R, N)`` tensors as ``(B, R, 1)``: a matmul with a column of ones
    (MindSpore's CPU ReduceSum over an axis is many times slower). Primitives only, so graph-mode
    bprops can call it."""
    batch, _, width = a.shape
    return _BMM(a * b, _ONES_LIKE(a[:, :1, :]).reshape(batch, width, 1))


def attention_forward(q, k, v, bias, scale, precision=FLOAT32):
    """``softmax(q k^T * scale + bias) v`` for grouped query rows.

    Args:
        q (Tensor): ``(B, G*C, Dq)``, rows ordered ``(g, c)`` (:func:`group_queries`; ``G`` may be 1).
        k (Tensor): ``(B, N, Dq)``; ``v``: ``(B, N, Dv)``; all compute-dtype values.
        bias (Tensor): ``(B or 1, C, N)`` additive score bias shared by the ``G`` query groups
            (:func:`visibility_bias`, in ``precision.softmax_storage``). Masked keys get probability
            exactly 0 (``exp(MASKED - max)`` underflows), so outputs never depend on them; a row that
            sees no key gets uniform probabilities over masked keys, and the caller zeroes its output
            (then its gradients are 0).
        scale (float): score scale.
        precision (Precision): the layer's (``nsa_layers.precision``); default float32 throughout.

    Returns:
        ``(out (B, G*C, Dv), probs (B, G, C, N))``: the output in the compute dtype (the value matmul
        takes the probabilities rounded to it), the probabilities in the softmax dtype.
    """
    probs = attention_probs(q, k, bias, scale, precision)
    batch, grouped, _ = q.shape
    p = precision
    return p.held(_BMM(p.hold_probs(probs.reshape(batch, grouped, k.shape[1])), v)), probs


def attention_probs(q, k, bias, scale, precision=FLOAT32):
    """The probabilities ``(B, G, C, N)`` of :func:`attention_forward`, in the softmax dtype."""
    p = precision
    batch, grouped, _ = q.shape
    keys = k.shape[1]
    rows = bias.shape[1]
    # (B, G*C, N); scale the small operand
    scores = p.held_scores(_BMM_TRANSPOSE_B(p.held_scores(p.score_operand(q) * scale), p.score_operand(k)))
    # the bias of every query group, the scores' shape (tiled even when that is a copy, see the primitives)
    return p.held_scores(_SOFTMAX(scores + _TILE(bias, (batch // bias.shape[0], grouped // rows, 1)))).reshape(
        batch, grouped // rows, rows, keys)


def attention_backward(q, k, v, probs, out, d_out, scale, precision=FLOAT32):
    """Gradients ``(d_q, d_k, d_v)`` of :func:`attention_forward` from its ``probs`` and ``out``.

    The softmax backward uses ``sum_j P_ij dP_ij = dO_i . O_i`` (one reduction over ``Dv`` instead of
    over the keys, as FlashAttention does); it holds for every row, since each row of ``probs`` sums to 1.
    That reduction is :func:`row_dot` (a matmul with a column of ones).
    When the query rows outnumber ``Dv``, that row term is subtracted inside the ``dP`` matmul (``dO``
    gets the column ``-dO.O``, ``v`` a column of ones), else it is tiled over the keys: no broadcast.
    ``dP``, the row term and the score gradient are in the softmax dtype; the score gradient is
    rounded to the compute dtype for the ``d_q`` / ``d_k`` matmuls, as FlashAttention's backward does
    (the scale goes on the smaller operands: ``q`` and ``d_q``).
    """
    p = precision
    batch, grouped, _ = q.shape
    keys = k.shape[1]
    probs = probs.reshape(batch, grouped, keys)
    d_out_s, v_s = p.score_operand(d_out), p.score_operand(v)
    row_term = p.held_scores(row_dot(d_out_s, p.score_operand(out)))  # (B, G*C, 1)
    if grouped > v.shape[2]:  # static shapes
        d_probs = _BMM_TRANSPOSE_B(_CONCAT_LAST((d_out_s, -row_term)), _CONCAT_LAST((v_s, _ONES_LIKE(v_s[:, :, :1]))))
    else:
        d_probs = p.held_scores(_BMM_TRANSPOSE_B(d_out_s, v_s)) - _TILE(row_term, (1, 1, keys))
    d_scores = p.hold_probs(p.held_scores(probs * p.held_scores(d_probs)))  # per unit of scaled score
    return (p.held(p.held(_BMM(d_scores, k)) * scale), p.held(_BMM_TRANSPOSE_A(d_scores, p.held(q * scale))),
            p.held(_BMM_TRANSPOSE_A(p.hold_probs(probs), d_out)))


class MaskedAttention(nn.Cell):
    """:func:`attention_forward` as a cell whose backward is :func:`attention_backward` (matmuls on
    the kept probabilities; no reduction over the keys, no transposed copies).

    Args:
        scale (float): score scale.
        precision (Precision): the layer's; default float32 throughout.

    Inputs:
        q, k, v, bias: as :func:`attention_forward`.

    Outputs:
        ``(out (B, G*C, Dv), probs (B, G, C, N))``; no gradient flows back through ``probs`` (they
        feed block selection, which is not differentiable) nor to ``bias``.
    """

    def __init__(self, scale, precision=FLOAT32):
        super().__init__()
        self.scale = scale
        self.precision = precision

    def construct(self, q, k, v, bias):
        return attention_forward(q, k, v, bias, self.scale, self.precision)

    def bprop(self, q, k, v, bias, out, dout):
        d_q, d_k, d_v = attention_backward(q, k, v, out[1], out[0], dout[0], self.scale, self.precision)
        return d_q, d_k, d_v, _ZEROS_LIKE(bias)
