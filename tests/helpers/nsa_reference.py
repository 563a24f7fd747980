"""Independent float64 NumPy reference of the whole NSA forward (paper arXiv 2502.11089, §3).

Slow and obvious on purpose: explicit loops over segments, tokens and heads, with every rule
written out where it is used. Nothing is shared with ``nsa_layers``.

Conventions (in-segment positions ``t``, 0-based):
- compressed window ``i`` covers positions ``[i*d, i*d + l)``; it is visible to ``t`` iff
  ``i*d + l - 1 <= t``; ``phi(window) = sum_j w[j, h] * (k[j] + pe[j, h])``;
- a query with no visible window has compressed output 0;
- selection block ``b`` covers ``[b*l', (b+1)*l')``; its importance is
  ``sum_i overlap_tokens(window i, block b) / d * p_cmp[i]`` (the paper's Eq. 9, 1-based), summed over
  the query heads of each KV group; blocks ``b > t // l'`` are never candidates; the first
  ``num_init_blocks`` and the ``num_local_blocks`` blocks ending at ``t // l'`` are forced; the top
  ``select_block_count`` are taken by (forced first, score descending, index ascending);
- selected attention: the tokens of the selected blocks at positions ``<= t``;
- sliding window: positions ``max(0, t - w + 1) .. t``.
"""

import numpy as np


def _softmax(scores):
    e = np.exp(scores - scores.max())
    return e / e.sum()


def _segments(prefix):
    start = 0
    for end in prefix:
        yield start, int(end)
        start = int(end)


def compress_segment(x, w, pe, block, stride):
    """Compressed keys/values of one segment ``x (L, Hkv, D)``: ``(n_windows, Hkv, D)``."""
    n = (len(x) - block) // stride + 1 if len(x) >= block else 0
    out = np.zeros((n,) + x.shape[1:])
    for i in range(n):
        window = x[i * stride:i * stride + block]
        if pe is not None:
            window = window + pe
        out[i] = np.einsum("jh,jhd->hd", w, window)
    return out


def overlap_weight(i, b, block, stride, select_block):
    """Tokens of compressed window ``i`` inside selection block ``b``, in units of the stride."""
    lo = max(i * stride, b * select_block)
    hi = min(i * stride + block, (b + 1) * select_block)
    return max(0, hi - lo) // stride


def select_blocks(importance, t, cfg):
    """Selected block ids for a query at position ``t`` (list, best first) from group-summed importance."""
    own = t // cfg["select_block_size"]
    forced = set(range(min(cfg["num_init_blocks"], own + 1)))
    forced |= set(range(max(0, own - cfg["num_local_blocks"] + 1), own + 1))
    candidates = list(range(own + 1))
    order = sorted(candidates, key=lambda b: (0 if b in forced else 1, -importance[b] if b not in forced else 0, b))
    return order[:cfg["select_block_count"]]


def nsa_forward(q, kv, gates, prefix, cfg, weights, scale, selected_override=None):
    """The NSA output ``(T, H, Dv)`` and, per token and KV head, the selected blocks.

    Args:
        q: ``(T, H, Dq)``.
        kv: dict with ``"cmp"``, ``"slc"``, ``"win"`` -> ``(k (T, Hkv, Dq), v (T, Hkv, Dv))``.
        gates: ``(T, H, 3)`` gate values for (cmp, slc, win).
        prefix: segment prefix sums (strictly increasing, last == T).
        cfg: dict of the NSA sizes.
        weights: dict ``w_k, w_v (l, Hkv)``, ``pe_k (l, Hkv, Dq)``, ``pe_v (l, Hkv, Dv)`` or None.
        selected_override: optional ``{(token, kv_head): [blocks]}`` used instead of the reference's
            own top-k (to check downstream arithmetic independently of near-tie flips).

    Returns:
        ``(out, branch_outputs dict, selected {(token, kv_head): [blocks]}, importance {(token, kv_head): array})``
    """
    q = np.asarray(q, np.float64)
    total, heads, _ = q.shape
    block, d, sel = cfg["compress_block_size"], cfg["compress_stride"], cfg["select_block_size"]
    kv_heads = kv["cmp"][0].shape[1]
    group = heads // kv_heads
    dv = kv["cmp"][1].shape[2]
    outs = {name: np.zeros((total, heads, dv)) for name in ("cmp", "slc", "win")}
    selected, importance_all = {}, {}
    for start, end in _segments(prefix):
        length = end - start
        k_seg, v_seg = (np.asarray(a[start:end], np.float64) for a in kv["cmp"])
        k_cmp = compress_segment(k_seg, weights["w_k"], weights["pe_k"], block, d)
        v_cmp = compress_segment(v_seg, weights["w_v"], weights["pe_v"], block, d)
        k_slc, v_slc = (np.asarray(a[start:end], np.float64) for a in kv["slc"])
        k_win, v_win = (np.asarray(a[start:end], np.float64) for a in kv["win"])
        n_blocks = -(-length // sel)
        for t in range(length):
            row = start + t
            visible = [i for i in range(len(k_cmp)) if i * d + block - 1 <= t]
            importance = np.zeros((kv_heads, n_blocks))
            for n in range(heads):
                h = n // group
                if visible:
                    p = _softmax(scale * k_cmp[visible, h] @ q[row, n])
                    outs["cmp"][row, n] = p @ v_cmp[visible, h]
                    for i, pi in zip(visible, p):
                        for b in range(n_blocks):
                            importance[h, b] += overlap_weight(i, b, block, d, sel) * pi
            for h in range(kv_heads):
                importance_all[(row, h)] = importance[h]
                chosen = selected_override[(row, h)] if selected_override else select_blocks(importance[h], t, cfg)
                selected[(row, h)] = chosen
                positions = [b * sel + u for b in chosen for u in range(sel) if b * sel + u <= t]
                window = list(range(max(0, t - cfg["window_size"] + 1), t + 1))
                for n in range(h * group, (h + 1) * group):
                    p = _softmax(scale * k_slc[positions, h] @ q[row, n])
                    outs["slc"][row, n] = p @ v_slc[positions, h]
                    p = _softmax(scale * k_win[window, h] @ q[row, n])
                    outs["win"][row, n] = p @ v_win[window, h]
    g = np.asarray(gates, np.float64)
    out = g[..., 0:1] * outs["cmp"] + g[..., 1:2] * outs["slc"] + g[..., 2:3] * outs["win"]
    return out, outs, selected, importance_all
