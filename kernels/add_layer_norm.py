"""Triton kernels: residual add + LayerNorm + cast in one pass, and its backward in one pass.

Forward, per row of D values (rows R = N * T), the row in CHUNKS chunks of BLOCK_D lanes:
    s = x (+ branch) (+ branch_bias)           fp32 math, stored in s's dtype when there is a branch
    y = (s - mean) * rstd * weight + bias      of the stored s; mean and rstd in fp32 (saved, [R] each)
Backward, per row, with dy (the gradient of y) and ds (of s, from the residual path), xhat = (s-mean)*rstd:
    g  = dy * weight
    dz = (g - xhat * mean(g * xhat) - mean(g)) * rstd + ds   -> the gradient of s, x and branch
    partial sums over the program's rows: dy * xhat (dweight), dy (dbias), dz (dbranch_bias)
Each program of the backward handles a contiguous range of rows and writes its fp32 partials to
part [G, 3, D]; the caller adds them in a fixed order (deterministic, no atomics). Rows are read in
place with their stride (the last dim contiguous); row offsets are int64.
"""
import triton
import triton.language as tl


@triton.jit
def _chunks(ptr, lanes, D, CHUNKS: tl.constexpr, BLOCK_D: tl.constexpr):
    """A [D] parameter as CHUNKS fp32 chunks of BLOCK_D lanes (a tuple; 0 past D)."""
    out = ()
    for c in tl.static_range(CHUNKS):
        cols = c * BLOCK_D + lanes
        out = out + (tl.load(ptr + cols, mask=cols < D, other=0.0).to(tl.float32),)
    return out


@triton.jit
def add_layer_norm_fwd_kernel(
    x_ptr, br_ptr, brb_ptr, w_ptr, b_ptr, s_ptr, y_ptr, mean_ptr, rstd_ptr,
    R, D, sx, sbr, eps, ROWS,
    HAS_BRANCH: tl.constexpr, HAS_BRANCH_BIAS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_D: tl.constexpr, CHUNKS: tl.constexpr,
):
    # a row is CHUNKS chunks of BLOCK_D lanes kept in registers (a tuple): D = 768 is three chunks of 256,
    # every lane used, where one power-of-two block (1024) would leave a quarter of the lanes idle
    lanes = tl.arange(0, BLOCK_D)
    if HAS_W:
        w = _chunks(w_ptr, lanes, D, CHUNKS, BLOCK_D)
    if HAS_B:
        b = _chunks(b_ptr, lanes, D, CHUNKS, BLOCK_D)
    if HAS_BRANCH_BIAS:
        brb = _chunks(brb_ptr, lanes, D, CHUNKS, BLOCK_D)
    first = tl.program_id(0).to(tl.int64) * ROWS
    for i in range(ROWS):
        # rows past R (the last program's tail) redo row R - 1 and store the same values again
        row = tl.minimum(first + i, R - 1)
        vs = ()
        total = tl.zeros([], dtype=tl.float32)
        for c in tl.static_range(CHUNKS):
            cols = c * BLOCK_D + lanes
            m = cols < D
            v = tl.load(x_ptr + row * sx + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_BRANCH:
                v += tl.load(br_ptr + row * sbr + cols, mask=m, other=0.0).to(tl.float32)
                if HAS_BRANCH_BIAS:
                    v += brb[c]
                sv = v.to(s_ptr.dtype.element_ty)
                tl.store(s_ptr + row * D + cols, sv, mask=m)
                v = sv.to(tl.float32)  # normalise the stored s, as the backward sees it (exact for fp32)
            vs = vs + (v,)
            total += tl.sum(v, axis=0)
        mean = total / D
        sq = tl.zeros([], dtype=tl.float32)
        for c in tl.static_range(CHUNKS):
            xc = tl.where(c * BLOCK_D + lanes < D, vs[c] - mean, 0.0)
            sq += tl.sum(xc * xc, axis=0)
        rstd = 1.0 / tl.sqrt(sq / D + eps)
        for c in tl.static_range(CHUNKS):
            cols = c * BLOCK_D + lanes
            y = (vs[c] - mean) * rstd
            if HAS_W:
                y = y * w[c]
            if HAS_B:
                y = y + b[c]
            tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=cols < D)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)


@triton.jit
def add_layer_norm_bwd_kernel(
    dy_ptr, s_ptr, w_ptr, mean_ptr, rstd_ptr, ds_ptr, dz_ptr, dbr_ptr, part_ptr,
    R, D, sdy, ss, sds, ROWS,
    HAS_W: tl.constexpr, HAS_DS: tl.constexpr, STORE_DBR: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_dz = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = pid.to(tl.int64) * ROWS
    for i in range(ROWS):
        # rows past R (the last program's tail) are masked out entirely (the partial sums must not see them)
        row = tl.minimum(first + i, R - 1)
        m = col_ok & ((tl.zeros([BLOCK_D], dtype=tl.int64) + first + i) < R)
        dy = tl.load(dy_ptr + row * sdy + cols, mask=m, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + row * ss + cols, mask=m, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(m, (s - mean) * rstd, 0.0)
        if HAS_W:
            g = dy * w
        else:
            g = dy
        c1 = tl.sum(g * xhat, axis=0) / D
        c2 = tl.sum(g, axis=0) / D
        dz = tl.where(m, (g - xhat * c1 - c2) * rstd, 0.0)
        if HAS_DS:
            dz += tl.load(ds_ptr + row * sds + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(dz_ptr + row * D + cols, dz.to(dz_ptr.dtype.element_ty), mask=m)
        if STORE_DBR:
            tl.store(dbr_ptr + row * D + cols, dz.to(dbr_ptr.dtype.element_ty), mask=m)
        acc_dw += dy * xhat
        acc_db += dy
        acc_dz += dz
    base = part_ptr + pid.to(tl.int64) * 3 * D + cols
    tl.store(base, acc_dw, mask=col_ok)
    tl.store(base + D, acc_db, mask=col_ok)
    tl.store(base + 2 * D, acc_dz, mask=col_ok)
