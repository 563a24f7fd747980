"""Bounds on how far a float16 / bfloat16 NSA forward may be from the float64 reference evaluated on
the same rounded inputs, derived from the precision policy (``nsa_layers.precision``).

Notation: ``u`` is the unit roundoff of the compute dtype (``2^-11`` float16, ``2^-8`` bfloat16),
``u32 = 2^-24`` float32's; for one query row and head of a branch, ``p`` are the float64 reference
probabilities over its ``N`` keys, ``o = p @ v`` its output and ``M = p @ |v|`` (elementwise). The
inputs, the compressor weights and the position embedding are already rounded to the compute
dtype, so every error comes from the layer's own roundings:

- scores are float32 matmuls of exact operands: ``|ds| <= e_s = (Dq + 2) u32 * scale * |q| . |k|``;
  the probabilities move by a factor within ``exp(+-2 max|ds|)``, so ``|dp| <= 2 max|ds| p``;
- the probabilities are rounded to the compute dtype for the value matmul (``u``), the matmul
  accumulates in float32 (``N u32``) and its result is rounded once (``u |o|``); the selected branch
  rounds each slot's partial sum once more before summing them in float32 (``u M`` again);
- the compressed branch's keys and values are stored rounded: ``|dk_cmp| <= (u + (l + 2) u32)
  phi(|k|)`` with ``phi`` the compression on magnitudes (``|w|``, ``|pe|``), which moves its scores by
  ``E = e_s + (u + (l + 2) u32) * scale * |q| . max_i phi(|k|)_i`` and its values by ``(u + (2l + 2)
  u32) phi(|v|)``;
- the gated output sums the three in float32 and is rounded once: ``sum_b g_b bound_b + u |out|``.

So, elementwise, ``bound_win = (2 e_s + u + (2N + 8) u32) M + u |o|``, ``bound_slc`` the same with
``2u``, ``bound_cmp = (2E + 2u + (2l + 2N + 12) u32) M_phi + u |o|`` with ``M_phi = p @ phi(|v|)``,
each times 1.01 for second-order terms. No term grows with the number of keys beyond ``N u32``:
that is what float32 statistics buy; a softmax in the compute dtype rounds the scores (``u |s|``)
and breaks these bounds once scores are large, as long rows make them.
"""

import numpy as np

from . import nsa_reference as nref
from .common import UNIT_ROUNDOFF
from .reference import segments

U32 = 2.0 ** -24
SECOND_ORDER = 1.01


def forward_bounds(q, kv, gates, prefix, cfg, weights, scale, selected, dtype_name):
    """The float64 reference forward on the given (already rounded) inputs, with the implementation's
    ``selected`` blocks, and elementwise error bounds for each branch and the gated output.

    Returns:
        ``(out, branches, bounds)``: ``bounds`` maps ``"cmp"``, ``"slc"``, ``"win"`` and ``"out"`` to
        arrays of the outputs' shape.
    """
    u = UNIT_ROUNDOFF[dtype_name]
    out, branches, _, _ = nref.nsa_forward(q, kv, gates, prefix, cfg, weights, scale, selected_override=selected)
    # M = p @ |v| per branch: the same probabilities (q, k and the key compressor unchanged) on magnitudes
    abs_kv = {name: (k, np.abs(v)) for name, (k, v) in kv.items()}
    abs_weights = dict(weights, w_v=np.abs(weights["w_v"]),
                       pe_v=None if weights["pe_v"] is None else np.abs(weights["pe_v"]))
    _, magnitudes, _, _ = nref.nsa_forward(q, abs_kv, gates, prefix, cfg, abs_weights, scale,
                                           selected_override=selected)
    block, stride = cfg["compress_block_size"], cfg["compress_stride"]
    dq = q.shape[2]
    q_abs = np.abs(np.asarray(q, np.float64))
    # most keys a query row can read in each branch (the float32 accumulation length)
    keys = {"cmp": max(prefix) // stride + 1, "slc": cfg["select_block_count"] * cfg["select_block_size"],
            "win": cfg["window_size"]}
    bounds = {}
    for name, rounding in (("slc", 2 * u), ("win", u)):
        e_s = _score_error(q_abs, np.abs(kv[name][0]), scale, dq)
        factor = 2 * e_s + rounding + (2 * keys[name] + 8) * U32
        bounds[name] = SECOND_ORDER * (factor * magnitudes[name] + u * np.abs(branches[name]))
    e_cmp = _compressed_score_error(q_abs, kv["cmp"][0], weights["w_k"], prefix, block, stride, scale, dq, u)
    factor = 2 * e_cmp + 2 * u + (2 * block + 2 * keys["cmp"] + 12) * U32
    bounds["cmp"] = SECOND_ORDER * (factor * magnitudes["cmp"] + u * np.abs(branches["cmp"]))
    g = np.asarray(gates, np.float64)
    summed = sum(g[..., i:i + 1] * (bounds[name] + 4 * U32 * np.abs(branches[name]))
                 for i, name in enumerate(("cmp", "slc", "win")))
    bounds["out"] = SECOND_ORDER * (summed + u * np.abs(out))
    return out, branches, bounds


def selection_tie_rtol(q, k, w_k, cfg, scale, dtype_name):
    """The relative gap between two blocks' importances that the dtype cannot resolve: importances are
    sums of compressed probabilities, which move by up to ``2E`` (``E`` as above, here its largest
    value over all rows), so two blocks may swap within ``4E``."""
    block, dq = cfg["compress_block_size"], q.shape[2]
    phi_max = np.abs(w_k).sum(0).max() * np.abs(k).max()
    a = scale * np.abs(q).sum(-1).max() * phi_max
    e_max = (UNIT_ROUNDOFF[dtype_name] + (block + 2) * U32) * a + (dq + 2) * U32 * a
    return SECOND_ORDER * 4 * e_max + 1e-6


def _score_error(q_abs, k_abs, scale, dq):
    """``(T, H, 1)``: the float32 score error bound of each query row and head against its worst key."""
    group = q_abs.shape[1] // k_abs.shape[1]
    k_max = np.repeat(k_abs.max(axis=0), group, axis=0)  # (H, Dq): the largest key magnitude per head
    return ((dq + 2) * U32 * scale * (q_abs * k_max).sum(-1))[..., None]


def _compressed_score_error(q_abs, k, w_k, prefix, block, stride, scale, dq, u):
    """``E`` of the module docstring, ``(T, H, 1)``: the compressed scores' error bound per query row and head."""
    total, heads, _ = q_abs.shape
    group = heads // k.shape[1]
    err = np.zeros((total, heads, 1))
    for start, end in segments(prefix):
        phi = nref.compress_segment(np.abs(np.asarray(k[start:end], np.float64)), np.abs(w_k), None, block, stride)
        for t in range(end - start):
            seen = [i for i in range(len(phi)) if i * stride + block - 1 <= t]
            if not seen:
                continue
            k_max = np.repeat(phi[seen].max(axis=0), group, axis=0)  # (H, Dq)
            a = scale * (q_abs[start + t] * k_max).sum(-1)
            err[start + t, :, 0] = (u + (block + 2) * U32) * a + (dq + 2) * U32 * a
    return err


def worst_ratio(actual, expected, bound):
    """``max |actual - expected| / bound`` (an exact match where the bound is 0 counts 0, a miss there inf)."""
    err = np.abs(np.asarray(actual, np.float64) - expected)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(bound > 0, err / np.where(bound > 0, bound, 1.0), np.where(err > 0, np.inf, 0.0))
    return float(ratio.max()) if ratio.size else 0.0
