"""The compiled loops of :mod:`dissect_core.fused` (imported by it only when numba is).

Module-level functions, so that numba's on-disk cache finds them again in the next
process (loops defined inside a function close over objects that differ per process,
and were compiled anew each time).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils


@numba.extending.intrinsic
def fma(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """``fma(a, b, c)``: float32 a * b + c rounded once (LLVM's ``llvm.fma.f32``)."""
    f32 = numba.types.float32
    sig = f32(f32, f32, f32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType()] * 3)
        return builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.f32"), args)

    return sig, codegen


jit = numba.njit(cache=True, nogil=True, boundscheck=False)
inline = numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")  # helpers of the loops
_ABS = np.int32(0x7FFFFFFF)
_ZERO = np.float32(0.0)


@inline
def _blend_row(native, m, t, r_lo, r_hi, r_w0, r_w1, rows_fma, blended):  # pragma: no cover - compiled
    # Upsampled row t of map m before the columns product: a * x + b * y from +0, as
    # a dot product rounds it (fused multiply-adds, or each product rounded, then the sum).
    # (Plain indexing throughout these loops: a slice would count references.)
    a, b, lo, hi = r_w0[t], r_w1[t], r_lo[t], r_hi[t]
    if rows_fma:
        for x in range(blended.shape[0]):
            blended[x] = fma(b, native[m, hi, x], fma(a, native[m, lo, x], _ZERO))
    else:
        for x in range(blended.shape[0]):
            blended[x] = (_ZERO + a * native[m, lo, x]) + b * native[m, hi, x]


@inline
def _blend_part(blended, part, p_first, p_weights, cols_fma, out, k):  # pragma: no cover - compiled
    # Part ``part`` of a row into out[k]: the native columns it reads in order, each
    # times its weights (zero where a column is not read: adding an exact zero changes
    # nothing).
    width = p_weights.shape[2]
    first = p_first[part]
    for j in range(width):
        out[k, j] = _ZERO
    for c in range(p_weights.shape[1]):
        v = blended[first + c]
        if cols_fma:
            for j in range(width):
                out[k, j] = fma(v, p_weights[part, c, j], out[k, j])
        else:
            for j in range(width):
                out[k, j] = out[k, j] + v * p_weights[part, c, j]


@inline
def _part_above(blended, part, p_first, p_scale, reads, level):  # pragma: no cover - compiled
    # Whether a part of a blended row may hold a value above level: each of its values
    # blends at most two of the native columns it reads with non-negative weights, so
    # it is at most max(their largest blend, 0) * p_scale[part] (the part's largest
    # weight sum, with room for the float32 rounding of the product), plus 2**-148 for
    # roundings among subnormal numbers.
    top = blended[p_first[part]]
    for c in range(1, reads):
        top = max(top, blended[p_first[part] + c])
    return not max(np.float64(top), 0.0) * p_scale[part] + 2.0**-148 <= level


@jit
def _upsample(
    native, kept, r_lo, r_hi, r_w0, r_w1, p_first, p_weights, rows_fma, cols_fma, out
):  # pragma: no cover - compiled
    # The kept parts (kept[m, t, part]) of each row t of each map m, in that order.
    blended = np.empty(native.shape[2], np.float32)
    k = 0
    for m in range(kept.shape[0]):
        for t in range(kept.shape[1]):
            ready = False
            for part in range(kept.shape[2]):
                if kept[m, t, part]:
                    if not ready:  # once for the row's parts
                        _blend_row(native, m, t, r_lo, r_hi, r_w0, r_w1, rows_fma, blended)
                        ready = True
                    _blend_part(blended, part, p_first, p_weights, cols_fma, out, k)
                    k += 1


@jit
def _parts(
    native,
    level,
    sure,
    r_lo,
    r_hi,
    r_w0,
    r_w1,
    cell_start,
    cell_scale,
    p_first,
    p_weights,
    p_scale,
    slack,
    zeros_apart,
    rows_fma,
    cols_fma,
    out,
    items,
    zero_parts,
    counting,
    images,
    units,
    pixel,
    blocks,
    cells,
    block_act,
    block_inter,
):  # pragma: no cover - compiled
    # The parts of the upsampled rows of each map m that may hold a value above level[m]:
    # stored in out (items: each one's index, (m * T_h + t) * parts + part), or, when
    # counting, counted as _count does (units[m] on image images[m]; values above level
    # but not sure[m] are returned). Target rows come in cells that read the same two
    # native rows (cell_start: the first row of each, then the end). A cell's part is
    # passed over when its bound says no value lies above the level: per native row
    # and part, c = max(max, 0) + slack * max|value| over the native columns the part
    # reads, and the bound max(c of the cell's two rows) * cell_scale (the cell's
    # largest row weight sum times the parts' column weight sum, with a margin). Then
    # per row, a part whose blend of native rows bounds it at or below the level
    # (_part_above). With zeros_apart, a cell's parts whose native values are all exact
    # zeros are counted in zero_parts[m] (one per row) and not stored.
    h = native.shape[1]
    n_parts = p_weights.shape[0]
    reads = p_weights.shape[1]
    width = p_weights.shape[2]
    row_width = width * n_parts
    height = r_lo.shape[0]
    labels = pixel.shape[2]
    c = np.empty((h, n_parts), np.float64)
    z = np.empty((h, n_parts), np.bool_)
    active = np.empty(n_parts, np.bool_)
    blended = np.empty(native.shape[2], np.float32)
    o = np.empty((1, width), np.float32)
    on = np.empty(width, np.int64)
    amb_m = np.empty(256, np.int64)
    amb_p = np.empty(256, np.int64)
    amb_v = np.empty(256, np.float32)
    n_amb = 0
    k = 0
    for m in range(native.shape[0]):
        lvl = level[m]
        for i in range(h):
            for g in range(n_parts):
                first = p_first[g]
                hi = native[m, i, first]
                lo = hi
                for x in range(first + 1, first + reads):
                    hi = max(hi, native[m, i, x])
                    lo = min(lo, native[m, i, x])
                hi64 = np.float64(hi)
                c[i, g] = max(hi64, 0.0) + slack * max(abs(hi64), abs(np.float64(lo)))
                z[i, g] = hi == 0 and lo == 0
        for cell in range(cell_start.shape[0] - 1):
            t0, t1 = cell_start[cell], cell_start[cell + 1]
            a, b = r_lo[t0], r_hi[t0]
            any_active = False
            for g in range(n_parts):
                active[g] = False
                if zeros_apart and z[a, g] and z[b, g]:
                    zero_parts[m] += t1 - t0
                elif not max(c[a, g], c[b, g]) * cell_scale[cell] <= lvl:
                    active[g] = True
                    any_active = True
            if not any_active:
                continue
            for t in range(t0, t1):
                _blend_row(native, m, t, r_lo, r_hi, r_w0, r_w1, rows_fma, blended)
                for g in range(n_parts):
                    if not active[g] or not _part_above(blended, g, p_first, p_scale, reads, lvl):
                        continue
                    if not counting:
                        _blend_part(blended, g, p_first, p_weights, cols_fma, out, k)
                        items[k] = (m * height + t) * n_parts + g
                        k += 1
                        continue
                    _blend_part(blended, g, p_first, p_weights, cols_fma, o, 0)
                    u = units[m]
                    im = images[m]
                    blk = blocks[im]
                    s = sure[m]
                    n = 0
                    for x in range(width):  # the pixels above the level first (no branch)
                        on[n] = x
                        n += o[0, x] > lvl
                    start = t * row_width + g * width
                    for j in range(n):
                        x = on[j]
                        p = start + x
                        if o[0, x] > s:
                            block_act[blk, u, cells[p]] += 1
                            for q in range(labels):
                                block_inter[blk, u, pixel[im, p, q]] += 1
                        else:  # at or below the sure level: left to the caller
                            if n_amb == amb_m.size:
                                amb_m = np.concatenate((amb_m, np.empty_like(amb_m)))
                                amb_p = np.concatenate((amb_p, np.empty_like(amb_p)))
                                amb_v = np.concatenate((amb_v, np.empty_like(amb_v)))
                            amb_m[n_amb] = m
                            amb_p[n_amb] = p
                            amb_v[n_amb] = o[0, x]
                            n_amb += 1
    return k, amb_m[:n_amb], amb_p[:n_amb], amb_v[:n_amb]


@jit
def _stats(rows, bits, units, floor, shift, pos_top, neg_top):  # pragma: no cover - compiled
    n = 0
    for i in range(rows.shape[0]):
        u = units[i]
        f = floor[u]
        pos = -1
        neg = -1
        if f >= 0:  # only positive values lie above: the largest bits are the top bucket
            for j in range(rows.shape[1]):
                above = rows[i, j] > f
                n += above
                if above:
                    pos = max(pos, bits[i, j] >> shift)
        else:
            for j in range(rows.shape[1]):
                v = rows[i, j]
                if v > f:
                    n += 1
                    if v > 0:
                        pos = max(pos, bits[i, j] >> shift)
                    elif v < 0:
                        neg = max(neg, (bits[i, j] & _ABS) >> shift)
        pos_top[u] = max(pos_top[u], pos)
        neg_top[u] = max(neg_top[u], neg)
    return n


@jit
def _bucket(
    rows, bits, units, floor, shift, pos_off, pos_counts, neg_off, neg_counts, zeros, floor_count
):  # pragma: no cover - compiled
    cols = np.empty(rows.shape[1], np.int64)
    for i in range(rows.shape[0]):
        u = units[i]
        f = floor[u]
        if f >= 0:
            # The columns of the values above the floor first (no branch), then their counts.
            off = pos_off[u]
            n = 0
            for j in range(rows.shape[1]):
                cols[n] = max((bits[i, j] >> shift) - off, 0)
                n += rows[i, j] > f
            for k in range(n):
                pos_counts[u, cols[k]] += 1
            floor_count[u] += rows.shape[1] - n
            continue
        for j in range(rows.shape[1]):  # a floor below 0: values of either sign, and zeros
            v = rows[i, j]
            if not v > f:
                floor_count[u] += 1
            elif v > 0:
                pos_counts[u, max((bits[i, j] >> shift) - pos_off[u], 0)] += 1
            elif v < 0:
                neg_counts[u, max(((bits[i, j] & _ABS) >> shift) - neg_off[u], 0)] += 1
            else:  # an exact zero above the floor has a count of its own
                zeros[u] += 1


@jit
def _count(
    rows, idx, height, images, units, cand, sure, pixel, blocks, cells, block_act, block_inter
):  # pragma: no cover - compiled
    width = rows.shape[1]
    labels = pixel.shape[2]
    on = np.empty(width, np.int64)
    amb = np.empty(256, np.int64)
    n_amb = 0
    for k in range(rows.shape[0]):
        r = idx[k]
        m = r // height
        y = r - m * height
        u = units[m]
        im = images[m]
        t = cand[u]
        s = sure[u]
        blk = blocks[im]
        n = 0
        for x in range(width):  # the pixels above the level first (no branch)
            on[n] = x
            n += rows[k, x] > t
        for j in range(n):
            x = on[j]
            if rows[k, x] > s:
                p = y * width + x
                block_act[blk, u, cells[p]] += 1
                for c in range(labels):
                    block_inter[blk, u, pixel[im, p, c]] += 1
            else:  # at or below the sure level: left to the caller
                if n_amb == amb.size:
                    grown = np.empty(2 * amb.size, np.int64)
                    grown[:n_amb] = amb[:n_amb]
                    amb = grown
                amb[n_amb] = k * width + x
                n_amb += 1
    return amb[:n_amb]


@jit
def _contend(inter, w, act, con, lab, pair_unit, pair_concept, above, level, reach):  # pragma: no cover - compiled
    # The label evidence's contenders (evidence.label_evidence): each (unit, concept) pair's
    # IoU in every resample, from its blocks' intersections [p, m] and the resampling weights
    # [m, R] (integer counts: every sum is an exact integer in float64, whatever its order),
    # compared with the label's: above[u, r] (some pair beats it), level[u, r] (pairs equal
    # to it), reach[k] (pair k reaches it in some resample). One pass per pair, no [p, R]
    # temporaries.
    n_res = w.shape[1]
    acc = np.empty(n_res)
    for k in range(inter.shape[0]):
        u, c = pair_unit[k], pair_concept[k]
        for r in range(n_res):
            acc[r] = 0.0
        for b in range(inter.shape[1]):
            v = inter[k, b]
            if v != 0.0:
                for r in range(n_res):
                    acc[r] += v * w[b, r]
        hit = False
        for r in range(n_res):
            union = act[u, r] + con[c, r] - acc[r]
            iou = acc[r] / union if union > 0.0 else 0.0
            target = lab[u, r]
            if iou >= target:
                hit = True
                if iou > target:
                    above[u, r] = True
                else:
                    level[u, r] += 1
        reach[k] = hit


KERNELS = {
    "stats": _stats,
    "bucket": _bucket,
    "count": _count,
    "upsample": _upsample,
    "parts": _parts,
    "contend": _contend,
}
