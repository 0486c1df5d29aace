# Skeleton 1c: the matrix memory with Titans momentum (``momentum_memory``), chunked, forward and
# backward.
#
#     g_t = k_t (k_t^T M_xi - v_t)^T (L2) or -k_t v_t^T (dot)        (at the chunk's anchor M_xi)
#     S_t = beta_t S_{t-1} + eta_t g_t        M_t = (alpha_t I - eps_t k_t k_t^T) M_{t-1} - S_t
#     o_t = M_t^T q_t                         (q already scaled; M, S [K, V], fla orientation)
#
# The deep memory's algebra (skeleton 2) without a hidden layer: one matrix, keyed by k, its
# gradient's error err = k M_xi - v a [BC, V] block, and the read after the token's write. Every
# term is column-separable in V, so one program per (batch, head, block of BV value columns) walks
# the chunks holding its columns of M and S in registers. Per chunk of BC tokens with start
# state (M0, S0) = the anchor (maths: backends/torch/README.md, "Memories"):
#     err = k M0 - v (L2) or -v
#     ERASE: rhs = Ab (k M0) - (k k^T * PhiB) err - cb (k S0),  bZ = eps (I + L)^-1 rhs,
#            L = DaB * eps^T * k k^T (strictly lower: the UT transform, inverted blockwise)
#     o    = A (q M0) - (q k^T * PhiA) err - c (q S0) [- (q k^T * DaA) bZ]
#     M_e  = aE M0 - k^T (phiE err [+ daE bZ]) - cE S0,      S_e = bcE S0 + k^T (dbE err)
# (a vector times a matrix scales its rows). The decay coefficients come in precomputed: the
# wrapper builds them from eta, beta and alpha with torch, differentiably, and sends their
# cotangents back through that graph. Per chunk: vectors cv [8, BC] = (A, c, Ab, cb, phiE, dbE,
# daE, 0), "after" rows (token t's read sees its own write) and "before" rows (t - 1: the erase's
# Z_t = k_t^T M_{t-1}) and the chunk-end row (the last real token's); scalars cs [4] = (aE, cE,
# bcE, 0); matrices cm [NM, BC, BC] = (PhiA, DaA, PhiB, DaB) (NM = 1 without the erase: PhiA).
# Phi and the end rows phiE, dbE carry eta by column (G = eta err is never formed).
#
# Backward: the reverse pass over chunks carries (dM, dS), the cotangents of the chunk-end state;
# chunk n is recomputed from its saved anchor and its VJP taken by hand. What sums over the value
# columns (dq, dk, d eps and the coefficients' cotangents) is written per value block, [NV, ...],
# and summed by the wrapper; dv, dM0 and dS0 are the block's own columns.
#
# Holes, resolved per level by nlc.backends.triton.template: ERASE (the DGD erase), L2 (else the
# dot objective). Accumulation in ACC (float32, or float64 for the oracle tests); PREC is tl.dot's
# input_precision. Tensors are contiguous, in ACC: q, k [B, T, H, K]; v, o [B, T, H, V]; eps
# [B, T, H]; states [B*H, K, V], the anchor stacks [B*H, N, K, V]. Offsets are int64; every load is
# masked (T need not be a multiple of BC; K, V of BK, BV; padded rows load 0).
import triton
import triton.language as tl

ERASE: tl.constexpr = True
L2: tl.constexpr = True


# ---------------------------------------------------------------------------------------------
# addressing


# {include rows}


@triton.jit
def _toks(ptr, t0, T, H, hd, BC: tl.constexpr):
    """Pointers and mask: per-token scalars t0 .. t0+BC of a [B, T, H] tensor."""
    rows = t0 + tl.arange(0, BC)
    return ptr + ((hd // H).to(tl.int64) * T + rows.to(tl.int64)) * H + (hd % H), rows < T


@triton.jit
def _vec(ptr, hd, n, N, i, BC: tl.constexpr):
    """Pointers: vector i of chunk n of a [B*H, N, 8, BC] tensor."""
    return ptr + ((hd.to(tl.int64) * N + n) * 8 + i) * BC + tl.arange(0, BC)


@triton.jit
def _cm(ptr, hd, n, N, i, NM: tl.constexpr, BC: tl.constexpr):
    """Pointers: matrix i of chunk n of a [B*H, N, NM, BC, BC] tensor."""
    rr = tl.arange(0, BC)
    return ptr + ((hd.to(tl.int64) * N + n) * NM + i) * BC * BC + rr[:, None] * BC + rr[None, :]


@triton.jit
def _lv(ptr, hd, n, N, i, BC: tl.constexpr, ACC: tl.constexpr):
    return tl.load(_vec(ptr, hd, n, N, i, BC)).to(ACC)


@triton.jit
def _lm(ptr, hd, n, N, i, NM: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    return tl.load(_cm(ptr, hd, n, N, i, NM, BC)).to(ACC)


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


if ERASE:  # the UT transform's inverse, blockwise (as skeleton 1's delta_prep)
    # {include blocked_inverse}


@triton.jit
def _error(k, M0, v_ptr, t0, T, H, V, hd, v0, BC: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
           PREC: tl.constexpr):
    """k M0 and the error at the anchor: k M0 - v (L2) or -v."""
    kM = _dot(k, M0, PREC)
    v = _load(_rows(v_ptr, t0, T, H, V, hd, v0, BC, BV), ACC)
    if L2:
        return kM, kM - v
    else:
        return kM, -v


if ERASE:
    @triton.jit
    def _erase(k, S0, kM, err, eps, cv_ptr, cm_ptr, hd, n, N, NM: tl.constexpr, BC: tl.constexpr,
               ACC: tl.constexpr, PREC: tl.constexpr):
        """The erase's terms: k k^T, (I + L)^-1, k S0, Y = (I + L)^-1 rhs (bZ = eps Y)."""
        KK = _dot(k, tl.trans(k), PREC)
        Tinv = _unit_lower_inv(_lm(cm_ptr, hd, n, N, 3, NM, BC, ACC) * eps[None, :] * KK, BC, ACC, PREC)
        kS = _dot(k, S0, PREC)
        rhs = _lv(cv_ptr, hd, n, N, 2, BC, ACC)[:, None] * kM
        rhs -= _lv(cv_ptr, hd, n, N, 3, BC, ACC)[:, None] * kS
        rhs -= _dot(KK * _lm(cm_ptr, hd, n, N, 2, NM, BC, ACC), err, PREC)
        return KK, Tinv, kS, rhs, _dot(Tinv, rhs, PREC)


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def momentum_fwd(q_ptr, k_ptr, v_ptr, e_ptr, cv_ptr, cs_ptr, cm_ptr, m0_ptr, s0_ptr,
                 o_ptr, mT_ptr, sT_ptr, ms_ptr, ss_ptr, T, H, K, V, N,
                 BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NM: tl.constexpr,
                 ACC: tl.constexpr, PREC: tl.constexpr):
    """Grid (B*H, V / BV): the sequential pass over chunks; writes o, every chunk's anchor (M, S)
    to the stacks (the backward's recompute points) and the final state."""
    hd = tl.program_id(0)
    v0 = tl.program_id(1) * BV
    M = _load(_st(m0_ptr, hd, 0, 1, K, V, v0, BK, BV), ACC)
    S = _load(_st(s0_ptr, hd, 0, 1, K, V, v0, BK, BV), ACC)
    for n in range(N):
        t0 = n * BC
        _store(_st(ms_ptr, hd, n, N, K, V, v0, BK, BV), M)
        _store(_st(ss_ptr, hd, n, N, K, V, v0, BK, BV), S)
        q = _load(_rows(q_ptr, t0, T, H, K, hd, 0, BC, BK), ACC)
        k = _load(_rows(k_ptr, t0, T, H, K, hd, 0, BC, BK), ACC)
        kM, err = _error(k, M, v_ptr, t0, T, H, V, hd, v0, BC, BV, ACC, PREC)
        QK = _dot(q, tl.trans(k), PREC)
        A = _lv(cv_ptr, hd, n, N, 0, BC, ACC)
        c = _lv(cv_ptr, hd, n, N, 1, BC, ACC)
        o = A[:, None] * _dot(q, M, PREC) - c[:, None] * _dot(q, S, PREC)
        o -= _dot(QK * _lm(cm_ptr, hd, n, N, 0, NM, BC, ACC), err, PREC)
        coef = _lv(cv_ptr, hd, n, N, 4, BC, ACC)[:, None] * err
        if ERASE:
            pe = _toks(e_ptr, t0, T, H, hd, BC)
            eps = tl.load(pe[0], mask=pe[1], other=0.0).to(ACC)
            KK, Tinv, kS, rhs, Y = _erase(k, S, kM, err, eps, cv_ptr, cm_ptr, hd, n, N, NM, BC, ACC, PREC)
            bZ = eps[:, None] * Y
            o -= _dot(QK * _lm(cm_ptr, hd, n, N, 1, NM, BC, ACC), bZ, PREC)
            coef += _lv(cv_ptr, hd, n, N, 6, BC, ACC)[:, None] * bZ
        _store(_rows(o_ptr, t0, T, H, V, hd, v0, BC, BV), o)
        cs = cs_ptr + (hd.to(tl.int64) * N + n) * 4
        aE, cE, bcE = tl.load(cs).to(ACC), tl.load(cs + 1).to(ACC), tl.load(cs + 2).to(ACC)
        dbE = _lv(cv_ptr, hd, n, N, 5, BC, ACC)
        M, S = (aE * M - _dot(tl.trans(k), coef, PREC) - cE * S,
                bcE * S + _dot(tl.trans(k), dbE[:, None] * err, PREC))
    _store(_st(mT_ptr, hd, 0, 1, K, V, v0, BK, BV), M)
    _store(_st(sT_ptr, hd, 0, 1, K, V, v0, BK, BV), S)


# ---------------------------------------------------------------------------------------------
# backward


@triton.jit
def momentum_bwd(q_ptr, k_ptr, v_ptr, e_ptr, do_ptr, cv_ptr, cs_ptr, cm_ptr, ms_ptr, ss_ptr,
                 dmT_ptr, dsT_ptr, dq_ptr, dk_ptr, dv_ptr, de_ptr, dcv_ptr, dcs_ptr, dcm_ptr,
                 dm0_ptr, ds0_ptr, T, H, K, V, N, BH,
                 BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NM: tl.constexpr,
                 ACC: tl.constexpr, PREC: tl.constexpr):
    """Grid (B*H, V / BV): the reverse pass over chunks. dq, dk, d eps and the coefficients'
    cotangents are this value block's share (slice program_id(1) of their [NV, ...] buffers)."""
    hd = tl.program_id(0)
    iv = tl.program_id(1).to(tl.int64)
    v0 = tl.program_id(1) * BV
    r = tl.arange(0, BC)
    incl = r[:, None] >= r[None, :]                 # the "after" matrices' support
    strict = r[:, None] > r[None, :]                # the "before" ones'
    dq_ptr += iv * BH * T * K                       # this block's share of the summed cotangents
    dk_ptr += iv * BH * T * K
    de_ptr += iv * BH * T
    dcv_ptr += iv * BH * N * 8 * BC
    dcs_ptr += iv * BH * N * 4
    dcm_ptr += iv * BH * N * NM * BC * BC
    dM = _load(_st(dmT_ptr, hd, 0, 1, K, V, v0, BK, BV), ACC)
    dS = _load(_st(dsT_ptr, hd, 0, 1, K, V, v0, BK, BV), ACC)
    for i in range(N):
        n = N - 1 - i
        t0 = n * BC
        M0 = _load(_st(ms_ptr, hd, n, N, K, V, v0, BK, BV), ACC)
        S0 = _load(_st(ss_ptr, hd, n, N, K, V, v0, BK, BV), ACC)
        q = _load(_rows(q_ptr, t0, T, H, K, hd, 0, BC, BK), ACC)
        k = _load(_rows(k_ptr, t0, T, H, K, hd, 0, BC, BK), ACC)
        do = _load(_rows(do_ptr, t0, T, H, V, hd, v0, BC, BV), ACC)
        kM, err = _error(k, M0, v_ptr, t0, T, H, V, hd, v0, BC, BV, ACC, PREC)
        phiE = _lv(cv_ptr, hd, n, N, 4, BC, ACC)
        dbE = _lv(cv_ptr, hd, n, N, 5, BC, ACC)
        coef = phiE[:, None] * err
        if ERASE:
            pe = _toks(e_ptr, t0, T, H, hd, BC)
            eps = tl.load(pe[0], mask=pe[1], other=0.0).to(ACC)
            KK, Tinv, kS, rhs, Y = _erase(k, S0, kM, err, eps, cv_ptr, cm_ptr, hd, n, N, NM, BC, ACC, PREC)
            bZ = eps[:, None] * Y
            daE = _lv(cv_ptr, hd, n, N, 6, BC, ACC)
            coef += daE[:, None] * bZ
        # the chunk-end state: M_e = aE M0 - k^T coef - cE S0,  S_e = bcE S0 + k^T (dbE err)
        cs = cs_ptr + (hd.to(tl.int64) * N + n) * 4
        aE, cE, bcE = tl.load(cs).to(ACC), tl.load(cs + 1).to(ACC), tl.load(cs + 2).to(ACC)
        dcs = dcs_ptr + (hd.to(tl.int64) * N + n) * 4
        tl.store(dcs, tl.sum(tl.sum(M0 * dM, 1), 0))
        tl.store(dcs + 1, -tl.sum(tl.sum(S0 * dM, 1), 0))
        tl.store(dcs + 2, tl.sum(tl.sum(S0 * dS, 1), 0))
        tl.store(dcs + 3, 0.0)
        dcoef = -_dot(k, dM, PREC)
        dX = _dot(k, dS, PREC)
        dk = _dot(dbE[:, None] * err, tl.trans(dS), PREC) - _dot(coef, tl.trans(dM), PREC)
        dM0 = aE * dM
        dS0 = bcE * dS - cE * dM
        derr = dbE[:, None] * dX + phiE[:, None] * dcoef
        tl.store(_vec(dcv_ptr, hd, n, N, 4, BC), tl.sum(dcoef * err, 1))
        tl.store(_vec(dcv_ptr, hd, n, N, 5, BC), tl.sum(dX * err, 1))
        # the read: o = A (q M0) - c (q S0) - (q k^T * PhiA) err [- (q k^T * DaA) bZ]
        A = _lv(cv_ptr, hd, n, N, 0, BC, ACC)
        c = _lv(cv_ptr, hd, n, N, 1, BC, ACC)
        tl.store(_vec(dcv_ptr, hd, n, N, 0, BC), tl.sum(do * _dot(q, M0, PREC), 1))
        tl.store(_vec(dcv_ptr, hd, n, N, 1, BC), -tl.sum(do * _dot(q, S0, PREC), 1))
        QK = _dot(q, tl.trans(k), PREC)
        PhiA = _lm(cm_ptr, hd, n, N, 0, NM, BC, ACC)
        derr -= _dot(tl.trans(QK * PhiA), do, PREC)
        DE = _dot(do, tl.trans(err), PREC)
        dQK = -DE * PhiA
        tl.store(_cm(dcm_ptr, hd, n, N, 0, NM, BC), tl.where(incl, -DE * QK, 0.0))
        if ERASE:
            DaA = _lm(cm_ptr, hd, n, N, 1, NM, BC, ACC)
            tl.store(_vec(dcv_ptr, hd, n, N, 6, BC), tl.sum(dcoef * bZ, 1))
            dbZ = daE[:, None] * dcoef - _dot(tl.trans(QK * DaA), do, PREC)
            DB = _dot(do, tl.trans(bZ), PREC)
            dQK -= DB * DaA
            tl.store(_cm(dcm_ptr, hd, n, N, 1, NM, BC), tl.where(incl, -DB * QK, 0.0))
        else:
            tl.store(_vec(dcv_ptr, hd, n, N, 6, BC), tl.zeros([BC], dtype=ACC))
        dqM = A[:, None] * do
        dqS = -c[:, None] * do
        dq = _dot(dqM, tl.trans(M0), PREC) + _dot(dqS, tl.trans(S0), PREC) + _dot(dQK, k, PREC)
        dM0 += _dot(tl.trans(q), dqM, PREC)
        dS0 += _dot(tl.trans(q), dqS, PREC)
        dk += _dot(tl.trans(dQK), q, PREC)
        _store(_rows(dq_ptr, t0, T, H, K, hd, 0, BC, BK), dq)
        # the erase: bZ = eps Y, Y = (I + L)^-1 rhs, L = DaB * eps^T * KK,
        #            rhs = Ab (k M0) - cb (k S0) - (KK * PhiB) err
        dkM = tl.zeros([BC, BV], dtype=ACC)
        if ERASE:
            pde = _toks(de_ptr, t0, T, H, hd, BC)
            drhs = _dot(tl.trans(Tinv), eps[:, None] * dbZ, PREC)
            dL = tl.where(strict, -_dot(drhs, tl.trans(Y), PREC), 0.0)
            DaB = _lm(cm_ptr, hd, n, N, 3, NM, BC, ACC)
            PhiB = _lm(cm_ptr, hd, n, N, 2, NM, BC, ACC)
            tl.store(pde[0], tl.sum(dbZ * Y, 1) + tl.sum(dL * DaB * KK, 0), mask=pde[1])
            tl.store(_cm(dcm_ptr, hd, n, N, 3, NM, BC), dL * eps[None, :] * KK)
            Ab = _lv(cv_ptr, hd, n, N, 2, BC, ACC)
            cb = _lv(cv_ptr, hd, n, N, 3, BC, ACC)
            tl.store(_vec(dcv_ptr, hd, n, N, 2, BC), tl.sum(drhs * kM, 1))
            tl.store(_vec(dcv_ptr, hd, n, N, 3, BC), -tl.sum(drhs * kS, 1))
            dkM = Ab[:, None] * drhs
            derr -= _dot(tl.trans(KK * PhiB), drhs, PREC)
            DR = _dot(drhs, tl.trans(err), PREC)
            tl.store(_cm(dcm_ptr, hd, n, N, 2, NM, BC), tl.where(strict, -DR * KK, 0.0))
            dKK = dL * DaB * eps[None, :] - DR * PhiB
            dkS = -cb[:, None] * drhs
            dk += _dot(dkS, tl.trans(S0), PREC) + _dot(dKK + tl.trans(dKK), k, PREC)
            dS0 += _dot(tl.trans(k), dkS, PREC)
        else:
            tl.store(_vec(dcv_ptr, hd, n, N, 2, BC), tl.zeros([BC], dtype=ACC))
            tl.store(_vec(dcv_ptr, hd, n, N, 3, BC), tl.zeros([BC], dtype=ACC))
        tl.store(_vec(dcv_ptr, hd, n, N, 7, BC), tl.zeros([BC], dtype=ACC))
        # the error: err = k M0 - v (L2) or -v
        if L2:
            dkM += derr
        _store(_rows(dv_ptr, t0, T, H, V, hd, v0, BC, BV), -derr)
        dk += _dot(dkM, tl.trans(M0), PREC)
        dM0 += _dot(tl.trans(k), dkM, PREC)
        _store(_rows(dk_ptr, t0, T, H, K, hd, 0, BC, BK), dk)
        dM = dM0
        dS = dS0
    _store(_st(dm0_ptr, hd, 0, 1, K, V, v0, BK, BV), dM)
    _store(_st(ds0_ptr, hd, 0, 1, K, V, v0, BK, BV), dS)
