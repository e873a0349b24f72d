"""The tokenizer's rank step as one numba kernel over a shard's CSR arrays.

Per row: validate values, collapse duplicate genes, score ``value / median`` (after the
per-cell normalisation), stable LSD radix sort of the float64 scores' bit patterns (exact
ordering, ties in column order) and write framed token ids into one buffer.
"""

from __future__ import annotations

import math

import numpy as np

from raypipe.errors import ConfigError

__all__ = ["rank_kernel", "rank_kernel_py"]

_COMPILED: list[object] = []


def rank_kernel():
    """Compile (once per process, cached on disk) and return the numba rank kernel."""
    if _COMPILED:
        return _COMPILED[0]
    try:
        import numba
    except ImportError as e:  # pragma: no cover - numba ships with scanpy
        raise ConfigError("the rank tokenizer needs numba", fix="pip install numba") from e
    _COMPILED.append(numba.njit(cache=True, nogil=True)(rank_kernel_py))
    return _COMPILED[0]


def rank_kernel_py(
    indptr, indices, data, col_gene, gene_median, gene_token, prefix, suffix, lognorm,
    own_total, totals, max_body, has_dups, starts, out, lens,
):  # fmt: skip
    """Per-row stable radix sort of each row's data segment (compiled by numba)."""
    n = indptr.shape[0] - 1
    n_genes = gene_median.shape[0]
    acc = np.zeros(n_genes, dtype=np.float64)
    width = 0
    for r in range(n):
        width = max(width, indptr[r + 1] - indptr[r])
    gbuf = np.empty(width, dtype=np.int32)
    vbuf = np.empty(width, dtype=np.float64)
    bits = vbuf.view(np.uint64)
    keys = np.empty(width, dtype=np.uint64)
    tkeys = np.empty(width, dtype=np.uint64)
    idx = np.empty(width, dtype=np.int64)
    tidx = np.empty(width, dtype=np.int64)
    cnt = np.zeros(257, dtype=np.int64)
    mask = np.uint64(255)
    status = np.zeros(3, dtype=np.int64)
    for r in range(n):
        lo, hi = indptr[r], indptr[r + 1]
        total = 0.0
        for j in range(lo, hi):
            x = np.float64(data[j])
            if not math.isfinite(x):
                status[0], status[1], status[2] = 1, r, j
                return status
            if x < 0:
                status[0], status[1], status[2] = 2, r, j
                return status
            total += x
        if not (own_total or lognorm):
            total = totals[r]
        k = 0
        for j in range(lo, hi):
            g = col_gene[indices[j]]
            x = np.float64(data[j])
            if g < 0 or x == 0:
                continue
            if lognorm:
                x = math.expm1(x)
            if has_dups:
                if acc[g] == 0.0:
                    gbuf[k] = g
                    k += 1
                acc[g] += x
            else:
                gbuf[k] = g
                vbuf[k] = x
                k += 1
        for t in range(k):
            g = gbuf[t]
            if has_dups:
                vbuf[t] = acc[g]
                acc[g] = 0.0
            if lognorm:
                vbuf[t] = vbuf[t] / gene_median[g]
            else:
                vbuf[t] = vbuf[t] / total * 10_000.0 / gene_median[g]
            keys[t] = ~bits[t]  # scores are > 0: their bits ascend with the value
            idx[t] = t
        # stable LSD radix sort (8 passes of 8 bits) of the keys: descending score, ties in
        # column order; a pass whose byte is the same for every key is skipped
        for p in range(8):
            shift = np.uint64(8 * p)
            cnt[:] = 0
            for t in range(k):
                cnt[((keys[t] >> shift) & mask) + 1] += 1
            if k == 0 or cnt[((keys[0] >> shift) & mask) + 1] == k:
                continue
            for b in range(256):
                cnt[b + 1] += cnt[b]
            for t in range(k):
                b = (keys[t] >> shift) & mask
                d = cnt[b]
                cnt[b] = d + 1
                tkeys[d] = keys[t]
                tidx[d] = idx[t]
            keys, tkeys = tkeys, keys
            idx, tidx = tidx, idx
        m = min(k, max_body)
        if m == 0:
            continue
        s = starts[r]
        for t in range(prefix.shape[0]):
            out[s + t] = prefix[t]
        s += prefix.shape[0]
        for t in range(m):
            out[s + t] = gene_token[gbuf[idx[t]]]
        for t in range(suffix.shape[0]):
            out[s + m + t] = suffix[t]
        lens[r] = m
    return status
