"""Which NSA branch runs on a MindSpore Ascend kernel (through ``nsa_layers.ops``) and which on the
composite MindSpore ops, decided once per layout from documented kernel constraints.

A branch goes to its kernel only when every condition holds; otherwise the reason is reported:

- the device is Ascend (``nsa_layers.ops`` would otherwise run its own fallbacks);
- ``actual_seq_len`` is known on the host (``None`` or a tuple/list): the kernels take prefix sums as
  ``tuple[int]``, so a Tensor of prefix sums (as MindFormers feeds them in graph mode) stays composite;
- ``compute_dtype`` is float16 or bfloat16 (the kernels' dtypes);
- the kernel's own argument check accepts the shapes and the layout (the public ``check_*`` functions
  of ``nsa_layers.ops``, which raise the documented errors), plus the documented constraints those checks leave to the
  kernel: ``nsa_compress`` only when ``l > d`` (its gradient needs it), ``nsa_select_attention`` only
  when every segment holds at least ``n`` blocks and is a whole number of blocks.

``nsa_compress_attention`` gives the compressed branch and the selection together; its causal mask
is built here (:func:`compressed_attention_masks`) and one masked compressed key is put in front of
each segment's keys, which shifts the kernel's block-importance mapping (``P_cmp[m*(t+1) - i]``) onto
the exact token overlap the layer uses. The sliding window has no NSA kernel and is always composite.
"""

import dataclasses
import functools

import mindspore as ms
import numpy as np
from mindspore import ops
from mindspore.ops import constexpr

from . import packing
from .ops import (
    check_nsa_compress,
    check_nsa_compress_attention,
    check_nsa_select_attention,
    nsa_compress_attention,
    nsa_select_attention,
    on_ascend,
)

__all__ = ["KERNEL", "COMPOSITE", "BRANCHES", "KernelRoute", "plan_kernel_route", "compressed_attention_masks",
           "shifted_compressed_rows", "route_for", "kernel_route", "compressed_and_selection_kernel",
           "selected_kernel"]

KERNEL = "ascend_kernel"
COMPOSITE = "mindspore"
BRANCHES = ("compress", "compressed_attention", "selection", "selected_attention", "sliding_window")
_KERNEL_ERRORS = (TypeError, ValueError, RuntimeError)


@dataclasses.dataclass(frozen=True)
class KernelRoute:
    """The decision for one layout: ``paths`` maps every branch of :data:`BRANCHES` to
    :data:`KERNEL` or :data:`COMPOSITE`; ``reasons`` says why a branch is composite."""

    paths: tuple
    reasons: tuple

    def uses_kernel(self, branch):
        """Whether ``branch`` (one of :data:`BRANCHES`) runs its Ascend kernel."""
        return dict(self.paths)[branch] == KERNEL

    @property
    def any_kernel(self):
        """Whether some branch runs an Ascend kernel."""
        return any(path == KERNEL for _, path in self.paths)


def plan_kernel_route(config, total, prefix_sums, ascend):
    """Decide each branch's path. ``prefix_sums``: a tuple of ints (host prefix sums, ``(total,)`` for one
    segment) or ``None`` when they only exist as a Tensor; ``ascend``: the device is Ascend."""
    if not ascend:
        common = "the device is not Ascend"
    elif prefix_sums is None:
        common = "actual_seq_len is a Tensor; the NSA kernels take host prefix sums (tuple[int])"
    elif config.compute_dtype == "float32":
        common = "compute_dtype is float32; the NSA kernels take float16 or bfloat16"
    else:
        common = None
    if common is None:
        reasons = _kernel_constraints(config, total, tuple(prefix_sums))
    else:
        reasons = {branch: common for branch in BRANCHES}
    reasons.setdefault("sliding_window", "no NSA kernel for the sliding window")
    paths = tuple((branch, COMPOSITE if branch in reasons else KERNEL) for branch in BRANCHES)
    return KernelRoute(paths, tuple(sorted(reasons.items())))


def _first_error(check):
    try:
        check()
    except _KERNEL_ERRORS as error:  # the kernel's documented argument errors: not routable
        return str(error)
    return None


def _kernel_constraints(cfg, total, prefix_sums):
    dtype = cfg.ms_compute_dtype
    hkv, heads = cfg.num_kv_heads, cfg.num_heads
    block, stride, sel, count = cfg.compress_block_size, cfg.compress_stride, cfg.select_block_size, \
        cfg.select_block_count
    lengths = packing.segment_lengths(prefix_sums)
    reasons = {}

    def compress_check():
        for dim in (cfg.head_dim, cfg.v_head_dim):
            check_nsa_compress((total, hkv, dim), dtype, (block, hkv), dtype, block, stride, prefix_sums)
        if block == stride:
            raise ValueError("nsa_compress: the kernel's gradient needs compress_block_size > compress_stride")

    error = _first_error(compress_check)
    if error:
        reasons["compress"] = error

    shifted = packing.compressed_lengths(prefix_sums, block, stride) + 1  # a masked key before each segment's windows
    cmplen = tuple(int(v) for v in np.cumsum(shifted))
    max_q, max_s2 = int(lengths.max()), int(shifted.max())
    max_sel = -(-max_s2 // (sel // stride))

    def compressed_check():
        check_nsa_compress_attention(
            (total, heads, cfg.head_dim), dtype, (cmplen[-1], hkv, cfg.head_dim), dtype,
            (cmplen[-1], hkv, cfg.v_head_dim), dtype, float(cfg.scale), heads, block, stride, sel, count,
            ((max_q, max_sel), ms.bool_), ((max_q, max_s2), ms.bool_), prefix_sums, cmplen, prefix_sums)
        kernel_blocks = -(-shifted // (sel // stride))
        if (kernel_blocks < -(-lengths // sel)).any():
            raise ValueError(f"nsa_compress_attention: the kernel scores ceil(S2 / {sel // stride}) = "
                             f"{kernel_blocks.tolist()} blocks per segment, fewer than the segments' "
                             f"{(-(-lengths // sel)).tolist()} (a last block without a compressed window)")

    error = _first_error(compressed_check)
    if error:
        reasons["compressed_attention"] = reasons["selection"] = error

    def selected_check():
        check_nsa_select_attention(
            (total, heads, cfg.head_dim), dtype, (total, hkv, cfg.head_dim), dtype, (total, hkv, cfg.v_head_dim),
            dtype, (total, hkv, count), ms.int32, float(cfg.scale), heads, sel, count, ((1, 1), ms.bool_),
            prefix_sums, prefix_sums)
        if lengths.min() < sel * count or (lengths % sel).any():
            raise ValueError(f"nsa_select_attention: every segment must hold at least select_block_count * "
                             f"select_block_size = {sel * count} tokens and be a multiple of {sel}, but the "
                             f"segment lengths are {lengths.tolist()}")

    error = _first_error(selected_check)
    if error:
        reasons["selected_attention"] = error
    return reasons


@functools.lru_cache(maxsize=64)
def compressed_attention_masks(prefix_sums, block, stride, sel_block, num_init, num_local):
    """Host masks for ``nsa_compress_attention`` on the shifted layout (one masked key first).

    Returns ``(atten_mask, topk_mask)`` bool NumPy arrays: ``atten_mask (max S1, max S2')`` True
    (masked) for the leading key and for windows not ended by the query (column ``j`` is window
    ``j - 1``, visible iff ``(j-1)*d + l - 1 <= s1``); ``topk_mask (max S1, max n_sel)`` True (forced)
    for the initial blocks and the local blocks ``own - num_local + 1 .. own``.
    """
    max_q = int(packing.segment_lengths(prefix_sums).max())
    max_s2 = int((packing.compressed_lengths(prefix_sums, block, stride) + 1).max())
    max_sel = -(-max_s2 // (sel_block // stride))
    pos = np.arange(max_q).reshape(-1, 1)
    column = np.arange(max_s2).reshape(1, -1)
    atten = (column == 0) | ((column - 1) * stride + block - 1 > pos)
    blocks = np.arange(max_sel).reshape(1, -1)
    own = pos // sel_block
    topk = (blocks <= own) & ((blocks < num_init) | (blocks > own - num_local))
    return atten, topk


@functools.lru_cache(maxsize=64)
def shifted_compressed_rows(prefix_sums, block, stride, sel_block):
    """The shifted layout: ``(rows, cmp_prefix, sel_prefix)``: the compressed-window slot feeding each
    shifted row (a segment's leading masked row reads slot 0), the shifted prefix sums, and the prefix_sums
    sums of the kernel's selection-block counts ``ceil(S2' / (l'/d))``."""
    windows = packing.compressed_lengths(prefix_sums, block, stride)
    rows, first = [], 0
    for count in windows:
        rows.extend([0] + list(range(first, first + int(count))))
        first += int(count)
    blocks = -(-(windows + 1) // (sel_block // stride))
    return (np.asarray(rows, np.int32), tuple(int(v) for v in np.cumsum(windows + 1)),
            tuple(int(v) for v in np.cumsum(blocks)))


@functools.lru_cache(maxsize=64)
def route_for(config, total, prefix_sums):
    """The :class:`KernelRoute` the layer takes on the current device (host side, cached;
    ``prefix_sums`` from ``packing.host_prefix_sums``: a tuple, or ``None`` for a Tensor)."""
    return plan_kernel_route(config, total, prefix_sums, on_ascend())


@constexpr
def kernel_route(config, total, prefix_sums):
    """:func:`route_for` as a constexpr: the route is a compile-time constant of the graph."""
    return route_for(config, total, prefix_sums)


@constexpr
def masks_tensors(prefix_sums, block, stride, sel_block, num_init, num_local):
    """:func:`compressed_attention_masks` as bool Tensors."""
    atten, topk = compressed_attention_masks(prefix_sums, block, stride, sel_block, num_init, num_local)
    return ms.Tensor(atten), ms.Tensor(topk)


@constexpr
def shifted_rows_tensor(prefix_sums, block, stride, sel_block):
    """:func:`shifted_compressed_rows` with the rows as an int32 Tensor."""
    rows, cmp_prefix, sel_prefix = shifted_compressed_rows(prefix_sums, block, stride, sel_block)
    return ms.Tensor(rows), cmp_prefix, sel_prefix


def compressed_and_selection_kernel(config, q, k_cmp, v_cmp, position, prefix_sums):
    """The compressed branch and the selection through ``nsa_compress_attention``, on the shifted layout
    (one masked compressed key in front of each segment, so that the kernel's block-importance
    indices give the exact token overlap).

    Args:
        config (NSAConfig): sizes.
        q (Tensor): ``(T, H, Dq)``; ``k_cmp``, ``v_cmp``: ``(S, Hkv, D)`` window slots (windows first).
        position (Tensor): ``(T,)`` int32 in-segment positions.
        prefix_sums (tuple[int]): host prefix sums.

    Returns:
        ``(o_cmp (T, H, Dv), blocks (T, Hkv, n) int32, valid (T, Hkv, n) bool)``: ``o_cmp`` is 0 where no
        window has ended; a block after the query's own one is an empty slot.
    """
    cfg = config
    rows, cmp_prefix, sel_prefix = shifted_rows_tensor(prefix_sums, cfg.compress_block_size, cfg.compress_stride,
                                                       cfg.select_block_size)
    atten_mask, topk_mask = masks_tensors(prefix_sums, cfg.compress_block_size, cfg.compress_stride,
                                          cfg.select_block_size, cfg.num_init_blocks, cfg.num_local_blocks)
    o_cmp, blocks, _, _ = nsa_compress_attention(
        q, ops.gather(k_cmp, rows, 0), ops.gather(v_cmp, rows, 0), cfg.scale, cfg.num_heads,
        cfg.compress_block_size, cfg.compress_stride, cfg.select_block_size, cfg.select_block_count,
        topk_mask=topk_mask, atten_mask=atten_mask, actual_seq_qlen=prefix_sums, actual_cmp_seq_kvlen=cmp_prefix,
        actual_sel_seq_kvlen=sel_prefix)
    sees_window = (position >= cfg.compress_block_size - 1).astype(o_cmp.dtype).reshape(-1, 1, 1)
    valid = blocks <= (position // cfg.select_block_size).reshape(-1, 1, 1)
    return o_cmp * sees_window, blocks, valid


def selected_kernel(config, q, k, v, blocks, valid, prefix_sums):
    """The selected branch through ``nsa_select_attention`` with its causal mask enabled, ``(T, H, Dv)``;
    an empty slot ``s`` points at block ``s`` (a future block: fully masked, and distinct from the
    valid ones, which come first)."""
    cfg = config
    slot = ops.arange(0, cfg.select_block_count, dtype=ms.int32).reshape(1, 1, -1)
    indices = ops.where(valid, blocks.astype(ms.int32), ops.broadcast_to(slot, blocks.shape))
    return nsa_select_attention(
        q, k, v, indices, cfg.scale, cfg.num_heads, cfg.select_block_size, cfg.select_block_count,
        atten_mask=ops.ones((1, 1), ms.bool_), actual_seq_qlen=prefix_sums, actual_seq_kvlen=prefix_sums)[0]
