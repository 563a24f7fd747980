"""Independent float64 NumPy references of the NSA ops, written with explicit per-segment loops.

Slow and obvious on purpose: nothing here is shared with the code under test (not even the
packed-sequence helpers), so a bookkeeping error on either side shows up as a mismatch.
"""

import numpy as np

FLT_MAX = float(np.finfo(np.float32).max)


def segments(prefix):
    """``[(start, end), ...]`` for prefix sums without a leading 0."""
    out, start = [], 0
    for end in prefix:
        out.append((start, int(end)))
        start = int(end)
    return out


def compress(x, w, prefix, block, stride):
    """``y (T', N, D)``: for each segment, windows of ``block`` rows every ``stride`` rows."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    rows = []
    for start, end in segments(prefix):
        s = start
        while s + block <= end:
            rows.append(np.einsum("jn,jnd->nd", w, x[s:s + block]))
            s += stride
    return np.stack(rows) if rows else np.zeros((0,) + x.shape[1:])


def compress_grads(x, w, dy, prefix, block, stride):
    """Analytic adjoint of :func:`compress`: ``(dx, dw)`` for output cotangent ``dy``."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    dy = np.asarray(dy, np.float64)
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    c = 0
    for start, end in segments(prefix):
        s = start
        while s + block <= end:
            dx[s:s + block] += w[:, :, None] * dy[c][None]
            dw += np.einsum("nd,jnd->jn", dy[c], x[s:s + block])
            c += 1
            s += stride
    return dx, dw


def round_to(values, dtype_name):
    """Round float64 values to float16 / bfloat16 (round to nearest even) / float32 and back to
    float64; ``"float64"`` leaves them unchanged."""
    if dtype_name == "float64":
        return np.asarray(values, np.float64)
    if dtype_name == "float32":
        return np.asarray(values, np.float32).astype(np.float64)
    if dtype_name == "float16":
        return np.asarray(values, np.float16).astype(np.float64)
    bits = np.asarray(values, np.float32).view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def _softmax_rows(scores):
    mx = scores.max(axis=-1, keepdims=True)
    e = np.exp(scores - mx)
    s = e.sum(axis=-1, keepdims=True)
    return e / s, mx[..., 0], s[..., 0]


def kernel_importance(p_cmp, block, stride, select_block_size):
    """``P_slc (..., n_sel)`` from ``P_cmp (..., S2)`` with the kernel's convention, as a literal
    double sum: ``P_slc[t] = sum_a sum_b P_cmp[m * (t + 1) - a - b]`` (``m = l'/d``, ``n = l/d``,
    ``a < m``, ``b < n``), out-of-range indices contributing 0, ``n_sel = ceil(S2 / m)``."""
    m, n = select_block_size // stride, block // stride
    s2 = p_cmp.shape[-1]
    n_sel = -(-s2 // m)
    out = np.zeros(p_cmp.shape[:-1] + (n_sel,))
    for t in range(n_sel):
        for a in range(m):
            for b in range(n):
                c = m * (t + 1) - a - b
                if 0 <= c < s2:
                    out[..., t] += p_cmp[..., c]
    return out


def compress_attention(q, k, v, scale, block, stride, select_block_size, count, qlen, cmplen,
                       atten_mask=None, topk_mask=None, dtype_name="float32"):
    """Per batch and head: masked softmax (True = masked, filled with -FLT_MAX), output with the
    probabilities rounded to the input dtype, group-summed importance, forced blocks, stable top-k.

    Returns ``(out (T1,N1,D2), topk (T1,N2,K), max (per batch (N1,S1)), sum (same))``."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    t1, n1, _ = q.shape
    n2 = k.shape[1]
    g = n1 // n2
    out = np.zeros((t1, n1, v.shape[2]))
    topk = np.zeros((t1, n2, count), np.int64)
    maxes, sums = [], []
    for (qs, qe), (ks, ke) in zip(segments(qlen), segments(cmplen)):
        s1, s2 = qe - qs, ke - ks
        mx_b = np.zeros((n1, s1))
        sm_b = np.zeros((n1, s1))
        imp = np.zeros((n2, s1, -(-s2 // (select_block_size // stride))))
        for h in range(n1):
            kh = h // g
            s = scale * q[qs:qe, h] @ k[ks:ke, kh].T
            if atten_mask is not None:
                s = np.where(atten_mask[:s1, :s2], -FLT_MAX, s)
            p, mx_b[h], sm_b[h] = _softmax_rows(s)
            out[qs:qe, h] = round_to(p, dtype_name) @ v[ks:ke, kh]
            imp[kh] += kernel_importance(p, block, stride, select_block_size)
        if topk_mask is not None:
            imp = np.where(topk_mask[None, :s1, :imp.shape[-1]], FLT_MAX, imp)
        order = np.argsort(-imp, axis=-1, kind="stable")[..., :count]
        topk[qs:qe] = order.transpose(1, 0, 2)
        maxes.append(mx_b)
        sums.append(sm_b)
    return out, topk, maxes, sums


def select_attention(q, k, v, topk, scale, block, qlen, kvlen, causal=False, dtype_name="float32"):
    """Per token and KV head: gather the selected blocks' rows (local to the batch's KV segment),
    optional causal mask (position > query's local index masked), softmax, rounded probabilities @ V.

    Returns ``(out (T1,N1,D2), max (T1,N1), sum (T1,N1))``."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    t1, n1, _ = q.shape
    n2 = k.shape[1]
    g = n1 // n2
    out = np.zeros((t1, n1, v.shape[2]))
    mx = np.zeros((t1, n1))
    sm = np.zeros((t1, n1))
    for (qs, qe), (ks, ke) in zip(segments(qlen), segments(kvlen)):
        for t in range(qs, qe):
            local = t - qs
            for h in range(n1):
                kh = h // g
                pos = np.concatenate([idx * block + np.arange(block) for idx in topk[t, kh]])
                outside = pos >= ke - ks  # past the segment end (a partial last block)
                masked = outside | (pos > local) if causal else outside
                rows = ks + np.where(outside, 0, pos)
                s = scale * np.where(masked, -FLT_MAX, k[rows, kh] @ q[t, h])  # filled before scaling
                p, mx[t, h], sm[t, h] = _softmax_rows(s)
                out[t, h] = round_to(p, dtype_name) @ v[rows, kh]
    return out, mx, sm


def directional_derivative(fn, args, index, direction, eps=1e-4):
    """Central difference of scalar ``fn(*args)`` along ``direction`` for argument ``index`` (float64)."""
    plus, minus = list(args), list(args)
    plus[index] = np.asarray(args[index], np.float64) + eps * direction
    minus[index] = np.asarray(args[index], np.float64) - eps * direction
    return (fn(*plus) - fn(*minus)) / (2 * eps)
