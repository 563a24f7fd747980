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


def selection_tie_rtol(q, k, w_k, prefix, cfg, scale, dtype_name):
    """The relative gap between two blocks' importances that the dtype cannot resolve: importances are
    sums of compressed probabilities, which move by up to ``2E`` (``E`` as above, here its largest
    value over all rows), so two blocks may swap within ``4E``."""
    q_abs = np.abs(np.asarray(q, np.float64))
    e_max = _compressed_score_error(q_abs, k, w_k, prefix, cfg["compress_block_size"], cfg["compress_stride"], scale,
                                    q.shape[2], UNIT_ROUNDOFF[dtype_name]).max()
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


# Roundings to the compute dtype along the backward path of a branch input (module docstring style):
# the branch's output gradient (gate times dout, 1), the row term dO . O through the stored output
# and dO (3), dS before its matmuls (1), the matmul's result (1), a chunk's or tile's partial before
# the float32 sum (1) and the stored gradient (1).
BACKWARD_ROUNDINGS = 8
# the compressed path adds the compressed keys' / values' gradient and the rounded input gradient
COMPRESSED_ROUNDINGS = BACKWARD_ROUNDINGS + 2


def gradient_bounds(q, kv, gates, prefix, cfg, weights, scale, selected, target, dtype_name):
    """The float64 gradients of ``sum(out * target)`` with respect to the core's inputs and compressor
    parameters (the implementation's ``selected`` blocks, inputs already rounded), and elementwise
    bounds ``(C u + 2E + L u32) |g|`` where ``|g|`` is the same backward on magnitudes (every product's
    factors replaced by their absolute values, the softmax Jacobian by ``diag(p) + p p^T``), ``C``
    counts the roundings along the path (:data:`BACKWARD_ROUNDINGS`, :data:`COMPRESSED_ROUNDINGS`),
    ``E`` is the compressed scores' error (forward bounds) for what passes through them and ``L`` the
    longest float32 sum.

    Returns:
        ``(grads, bounds)``: dicts keyed ``q``, ``gates``, ``k_cmp``, ``v_cmp``, ``k_slc``, ``v_slc``,
        ``k_win``, ``v_win``, ``w_k``, ``w_v`` and (with a position embedding) ``pe_v``.
    """
    u = UNIT_ROUNDOFF[dtype_name]
    q = np.asarray(q, np.float64)
    target = np.asarray(target, np.float64)
    g = np.asarray(gates, np.float64)
    total, heads, dq = q.shape
    block, stride, sel = cfg["compress_block_size"], cfg["compress_stride"], cfg["select_block_size"]
    group = heads // kv["cmp"][0].shape[1]
    grad, mag = {}, {}
    for name in ("q", "gates"):
        grad[name] = np.zeros_like(g if name == "gates" else q)
        mag[name] = np.zeros_like(grad[name])
    for branch in ("cmp", "slc", "win"):
        for part, array in zip("kv", kv[branch]):
            grad[f"{part}_{branch}"] = np.zeros(array.shape)
            mag[f"{part}_{branch}"] = np.zeros(array.shape)
    for name in ("w_k", "w_v", "pe_v"):
        if weights[name] is not None:
            grad[name], mag[name] = np.zeros(weights[name].shape), np.zeros(weights[name].shape)
    e_cmp = _compressed_score_error(np.abs(q), kv["cmp"][0], weights["w_k"], prefix, block, stride, scale, dq, u)
    for start, end in segments(prefix):
        length = end - start
        k_seg, v_seg = (np.asarray(a[start:end], np.float64) for a in kv["cmp"])
        pe_v = weights["pe_v"]
        k_cmp = nref.compress_segment(k_seg, weights["w_k"], None, block, stride)
        v_cmp = nref.compress_segment(v_seg, weights["w_v"], pe_v, block, stride)
        k_cmp_abs = nref.compress_segment(np.abs(k_seg), np.abs(weights["w_k"]), None, block, stride)
        v_cmp_abs = nref.compress_segment(np.abs(v_seg), np.abs(weights["w_v"]),
                                          None if pe_v is None else np.abs(pe_v), block, stride)
        d_cmp = {"k": np.zeros_like(k_cmp), "v": np.zeros_like(v_cmp)}
        m_cmp = {"k": np.zeros_like(k_cmp), "v": np.zeros_like(v_cmp)}
        for t in range(length):
            row = start + t
            seen = [i for i in range(len(k_cmp)) if i * stride + block - 1 <= t]
            for n in range(heads):
                h = n // group
                chosen = selected[(row, h)]
                keys = {"cmp": seen, "slc": [b * sel + j for b in chosen for j in range(sel) if b * sel + j <= t],
                        "win": list(range(max(0, t - cfg["window_size"] + 1), t + 1))}
                for b, branch in enumerate(("cmp", "slc", "win")):
                    rows = keys[branch]
                    if not rows:
                        continue
                    if branch == "cmp":
                        k_rows, v_rows = k_cmp[rows, h], v_cmp[rows, h]
                        k_abs, v_abs = k_cmp_abs[rows, h], v_cmp_abs[rows, h]
                        dk_rows, dv_rows, mk_rows, mv_rows = d_cmp["k"], d_cmp["v"], m_cmp["k"], m_cmp["v"]
                    else:
                        k_rows = np.asarray(kv[branch][0][start:end], np.float64)[rows, h]
                        v_rows = np.asarray(kv[branch][1][start:end], np.float64)[rows, h]
                        k_abs, v_abs = np.abs(k_rows), np.abs(v_rows)
                        dk_rows, dv_rows = grad[f"k_{branch}"][start:end], grad[f"v_{branch}"][start:end]
                        mk_rows, mv_rows = mag[f"k_{branch}"][start:end], mag[f"v_{branch}"][start:end]
                    p = _softmax(scale * k_rows @ q[row, n])
                    o, o_abs = p @ v_rows, p @ v_abs
                    d_o, m_o = g[row, n, b] * target[row, n], np.abs(g[row, n, b] * target[row, n])
                    grad["gates"][row, n, b] += target[row, n] @ o
                    mag["gates"][row, n, b] += np.abs(target[row, n]) @ o_abs
                    d_s = p * (v_rows @ d_o - d_o @ o)
                    m_s = p * (v_abs @ m_o + m_o @ o_abs)
                    grad["q"][row, n] += scale * d_s @ k_rows
                    mag["q"][row, n] += scale * m_s @ k_abs
                    np.add.at(dk_rows, (rows, h), scale * np.outer(d_s, q[row, n]))
                    np.add.at(mk_rows, (rows, h), scale * np.outer(m_s, np.abs(q[row, n])))
                    np.add.at(dv_rows, (rows, h), np.outer(p, d_o))
                    np.add.at(mv_rows, (rows, h), np.outer(p, m_o))
        _compressor_backward(grad, mag, d_cmp, m_cmp, kv["cmp"], weights, start, end, block, stride)
    keys_max = max(max(prefix) // stride + 1, cfg["window_size"], cfg["select_block_count"] * sel)
    fp32 = (2 * keys_max + dq + 2 * block + 16) * U32
    e_max = float(e_cmp.max())
    bounds = {}
    for name in grad:
        compressed = name in ("k_cmp", "v_cmp", "w_k", "w_v", "pe_v")
        rounds = COMPRESSED_ROUNDINGS if compressed else BACKWARD_ROUNDINGS
        # what passes through the compressed scores (its p) carries their error 2E too
        through_cmp = 2 * e_max if compressed or name in ("q", "gates") else 0.0
        bounds[name] = SECOND_ORDER * (rounds * u + through_cmp + fp32) * mag[name]
    return grad, bounds


def _softmax(scores):
    e = np.exp(scores - scores.max())
    return e / e.sum()


def _compressor_backward(grad, mag, d_cmp, m_cmp, kv_cmp, weights, start, end, block, stride):
    """The compressed keys' and values' gradients of one segment through the compression: into the
    raw keys and values, the compressor weights and the value position embedding (and magnitudes)."""
    k = np.asarray(kv_cmp[0][start:end], np.float64)
    v = np.asarray(kv_cmp[1][start:end], np.float64)
    pe = weights["pe_v"]
    for i in range(d_cmp["k"].shape[0]):
        s = i * stride
        for j in range(block):
            for part, x, w in (("k", k, weights["w_k"]), ("v", v, weights["w_v"])):
                vals = x[s + j] + (pe[j] if part == "v" and pe is not None else 0.0)
                vals_abs = np.abs(x[s + j]) + (np.abs(pe[j]) if part == "v" and pe is not None else 0.0)
                grad[f"{part}_cmp"][start + s + j] += w[j][:, None] * d_cmp[part][i]
                mag[f"{part}_cmp"][start + s + j] += np.abs(w[j])[:, None] * m_cmp[part][i]
                grad[f"w_{part}"][j] += (d_cmp[part][i] * vals).sum(-1)
                mag[f"w_{part}"][j] += (m_cmp[part][i] * vals_abs).sum(-1)
                if part == "v" and pe is not None:
                    grad["pe_v"][j] += w[j][:, None] * d_cmp["v"][i]
                    mag["pe_v"][j] += np.abs(w[j])[:, None] * m_cmp["v"][i]
