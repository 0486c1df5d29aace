# A part of skeleton 2 (mlp_chunk.py): the deep memory's backward. One program per (batch, head)
# walks the chunks in reverse; chunk n is recomputed from its anchor (stack n of the forward) and
# its VJP taken by hand, carrying the cotangent of the chunk-end state (dw*, in place: chunk n's
# end state in, its anchor's out) to chunk n - 1.
#
# The decay coefficients come in precomputed (the wrapper builds them from alpha, beta and eta
# with torch, differentiably, and maps their cotangents back): per chunk the vectors cv [5, BC]
# = (Ab, cb, phiE, dbE, pa_e), the scalars cs [4] = (a_e, c_e, bc_e, 0) and the matrices
# [2, BC, BC] = (PhiE, Pab): Phi before each token's write times eta by column, and Pa before it.
# With them, in fla orientation (H1 = W1^T [h, do], H2 = W2^T [D, h], S1, S2 the momenta):
#     pk = k H2, ak = act(pk), tau = v or M(v) = act(v H2) H1 [+ v] (SELF_TARGET, at the anchor)
#     err = ak H1 [+ k] - tau (L2) or -tau,      g2 = (err H1^T) * act'(pk)
#     ERASE: rhs = Ab pk - (k k^T * PhiE) g2 - cb (k S2),  bZ = eps (I + L)^-1 rhs,
#            L = Pab * eps^T * k k^T (strictly lower)
#     H1e = a_e H1 - ak^T (phiE err) - c_e S1,   S1e = bc_e S1 + ak^T (dbE err)
#     H2e = a_e H2 - k^T (phiE g2 [+ pa_e bZ]) - c_e S2,     S2e = bc_e S2 + k^T (dbE g2)
#     CURRENT: p = Ab (q H2) - (q k^T * PhiE) g2 - cb (q S2) [- (q k^T * Pab) bZ],  x = act(p)
#              o = Ab (x H1) - cb (x S1) - (x ak^T * PhiE) err [+ q]
#     else:    o = act(q H2) H1 [+ q]
# (a vector times a matrix scales its rows). err and (CURRENT) XK = x ak^T come from the forward,
# which keeps every chunk's.
#
# Tiles: no tile is wider than BK columns (the slice; plan.mlp_slice keeps BC x BK within the
# H100's shared memory), so a 256-wide level runs as 64-wide slices at chunk 64. The hidden layer
# is walked BJ units at a time, as in the forward; per hidden block, 1) the [BC, BJ] products
# (k H2, err H1^T, ...) are summed over the slices of D and d_out, 2) the block's own algebra runs
# on [BC, BJ] and [BC, BC] tiles, 3) the block's anchor cotangents are written slice by slice,
# and the chunk's sums over the hidden layer (dq, dk, dv in their output rows; err's cotangent
# and ak^T dH1e, ak^T dS1e in the workspace e_ws) are read, added to and written back slice by
# slice. After the hidden blocks: the [BC, BC] cotangents (q k^T's, k k^T's, the triangular
# inverse's), then err's own paths through y (L2) and tau (SELF_TARGET unless DETACH) in a second
# walk over the hidden blocks (parts/mlp_err_paths.py). Coefficient cotangents go to dcv, dcs, dcm; the wrapper sends them
# through the coefficients' torch graph. A barrier separates every slice's reads from its writes.
import triton
import triton.language as tl
from mlp_chunk import CURRENT, ERASE, GELU, L2, MOMENTUM, RESIDUAL, SELF_TARGET  # noqa: F401  its flags
from mlp_chunk import _act, _load, _mat, _rows, _scalars, _store, _unit_lower_inv, _ws  # and helpers
from mlp_err_paths import _err_paths  # the second walk (included after this part where the level has it)


@triton.jit
def _act2(x):
    """The activation, its derivative and its second derivative."""
    if GELU:
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        return x * cdf, cdf + x * pdf, pdf * (2.0 - x * x)
    else:
        s = 1.0 / (1.0 + tl.exp(-x))
        return x * s, s * (1.0 + x * (1.0 - s)), s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))


@triton.jit
def _vec(ptr, hd, n, N, i, S: tl.constexpr, BC: tl.constexpr):
    """Row i of chunk n's [S, BC] block of a [B*H, N, S, BC] tensor: pointers."""
    return ptr + ((hd.to(tl.int64) * N + n) * S + i) * BC + tl.arange(0, BC)


@triton.jit
def _cc(ptr, hd, n, N, i, BC: tl.constexpr):
    """Matrix i of chunk n of a [B*H, N, 2, BC, BC] tensor: pointers."""
    rr = tl.arange(0, BC)
    return ptr + ((hd.to(tl.int64) * N + n) * 2 + i) * BC * BC + rr[:, None] * BC + rr[None, :]


@triton.jit
def _ms(ptr, hd, s, BC: tl.constexpr):
    """Slot s of the program's [6, BC, BC] workspace: pointers and mask."""
    return _ws(ptr, hd, s, 6, BC, BC)


@triton.jit
def _sl(ptr, hd, s, S, u0, BO: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """Pointers and mask: columns u0 .. u0+BK of slot s of a [B*H, S, BC, BO] tensor (the
    forward's err stack, or the e_ws workspace)."""
    rr = tl.arange(0, BC)
    cc = u0 + tl.arange(0, BK)
    base = (hd.to(tl.int64) * S + s) * BC * BO
    return ptr + base + rr[:, None] * BO + cc[None, :], (rr[:, None] < BC) & (cc[None, :] < BO)


@triton.jit
def mlp_chunk_bwd(q_ptr, k_ptr, v_ptr, erase_ptr, do_ptr, cv_ptr, cs_ptr, cm_ptr,
                  w1s_ptr, w2s_ptr, s1s_ptr, s2s_ptr, dw1_ptr, dw2_ptr, ds1_ptr, ds2_ptr,
                  dq_ptr, dk_ptr, dv_ptr, derase_ptr, dcv_ptr, dcs_ptr, dcm_ptr, es_ptr, xk_ptr, e_ws_ptr, m_ws_ptr,
                  T, H, D, HID, DO, DV, N,
                  BC: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr, BJ: tl.constexpr,
                  DETACH: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Grid (B*H,): the reverse pass over chunks. dw1 .. ds2 [B*H, R, C] (paper orientation) hold
    the cotangent of the final state on entry and of the initial state on exit; dq, dk, dv are
    also the chunk's accumulators. From the forward: es [B*H, N, BC, BO] every chunk's err, xk
    [B*H, N, BC, BC] (CURRENT) every chunk's XK. Workspaces: e_ws [B*H, 3, BC, BO] (err's
    cotangent, ak^T dH1e and ak^T dS1e summed over the hidden layer), m_ws [B*H, 6, BC, BC]
    (q k^T * PhiE, dXK, k k^T * PhiE, the erase's (I + L)^-1, q k^T * Pab). DETACH: no outer
    gradient through a self-generated target."""
    hd = tl.program_id(0)
    r = tl.arange(0, BC)
    for i in range(0, N):
        n = N - 1 - i
        t0 = n * BC
        Ab = tl.load(_vec(cv_ptr, hd, n, N, 0, 5, BC)).to(ACC)
        phiE = tl.load(_vec(cv_ptr, hd, n, N, 2, 5, BC)).to(ACC)
        a_e = tl.load(cs_ptr + (hd.to(tl.int64) * N + n) * 4).to(ACC)
        PhiE = tl.load(_cc(cm_ptr, hd, n, N, 0, BC)).to(ACC)
        if MOMENTUM:
            cb = tl.load(_vec(cv_ptr, hd, n, N, 1, 5, BC)).to(ACC)
            dbE = tl.load(_vec(cv_ptr, hd, n, N, 3, 5, BC)).to(ACC)
            c_e = tl.load(cs_ptr + (hd.to(tl.int64) * N + n) * 4 + 1).to(ACC)
            bc_e = tl.load(cs_ptr + (hd.to(tl.int64) * N + n) * 4 + 2).to(ACC)
        # the chunk's [BC, BC] products over D (k k^T, q k^T), and its accumulators zeroed
        if ERASE:
            KK = tl.zeros([BC, BC], dtype=ACC)
        if CURRENT:
            QK = tl.zeros([BC, BC], dtype=ACC)
        for s0 in range(0, D, BK):
            ks = _load(_rows(k_ptr, t0, T, H, D, hd, s0, BC, BK), ACC)
            if ERASE:
                KK += tl.dot(ks, tl.trans(ks), input_precision=PREC)
            if CURRENT:
                QK += tl.dot(_load(_rows(q_ptr, t0, T, H, D, hd, s0, BC, BK), ACC), tl.trans(ks), input_precision=PREC)
            _store(_rows(dk_ptr, t0, T, H, D, hd, s0, BC, BK), tl.zeros([BC, BK], dtype=ACC))
            _store(_rows(dq_ptr, t0, T, H, D, hd, s0, BC, BK), tl.zeros([BC, BK], dtype=ACC))
        if ERASE:                            # the UT transform of the erase on H2
            eps = _scalars(erase_ptr, t0, T, H, hd, BC, 0.0, 0).to(ACC)
            pa_e = tl.load(_vec(cv_ptr, hd, n, N, 4, 5, BC)).to(ACC)
            Pab = tl.load(_cc(cm_ptr, hd, n, N, 1, BC)).to(ACC)
            _store(_ms(m_ws_ptr, hd, 2, BC), KK * PhiE)
            _store(_ms(m_ws_ptr, hd, 3, BC), _unit_lower_inv(Pab * eps[None, :] * KK, BC, ACC, PREC))
        # the current read's output layer (XK = x ak^T, summed over the hidden layer): err's
        # cotangent starts as -(XK * PhiE)^T dO
        if CURRENT:
            _store(_ms(m_ws_ptr, hd, 0, BC), QK * PhiE)
            if ERASE:
                _store(_ms(m_ws_ptr, hd, 4, BC), QK * Pab)
            XK = _load(_ws(xk_ptr, hd, n, N, BC, BC), ACC)
            dOE = tl.zeros([BC, BC], dtype=ACC)                            # dO err^T
        for u0 in range(0, DO, BK):
            zero = tl.zeros([BC, BK], dtype=ACC)
            if CURRENT:
                dOu = _load(_rows(do_ptr, t0, T, H, DO, hd, u0, BC, BK), ACC)
                dOE += tl.dot(dOu, tl.trans(_load(_sl(es_ptr, hd, n, N, u0, BO, BC, BK), ACC)), input_precision=PREC)
                _store(_sl(e_ws_ptr, hd, 0, 3, u0, BO, BC, BK), -tl.dot(tl.trans(XK * PhiE), dOu, input_precision=PREC))
            else:
                _store(_sl(e_ws_ptr, hd, 0, 3, u0, BO, BC, BK), zero)
            _store(_sl(e_ws_ptr, hd, 1, 3, u0, BO, BC, BK), zero)
            if MOMENTUM:
                _store(_sl(e_ws_ptr, hd, 2, 3, u0, BO, BC, BK), zero)
        if CURRENT:
            _store(_ms(m_ws_ptr, hd, 1, BC), -dOE * PhiE)             # dXK
            dPhi = -dOE * XK
        else:
            dPhi = tl.zeros([BC, BC], dtype=ACC)
        tl.debug_barrier()
        # per hidden block: the state's, the read's, the erase's and g2's cotangents
        dAb = tl.zeros([BC], dtype=ACC)
        dphiE = tl.zeros([BC], dtype=ACC)
        da_e = tl.sum(tl.zeros([BC], dtype=ACC), 0)
        if MOMENTUM:
            dcb = tl.zeros([BC], dtype=ACC)
            ddbE = tl.zeros([BC], dtype=ACC)
            dc_e = da_e
            dbc_e = da_e
        if CURRENT:
            dQKs = tl.zeros([BC, BC], dtype=ACC)                            # sum_j dp_j g2_j^T
        if ERASE:
            deps = tl.zeros([BC], dtype=ACC)
            dpa_e = tl.zeros([BC], dtype=ACC)
            dTs = tl.zeros([BC, BC], dtype=ACC)                             # sum_j dY_j rhs_j^T
            dKKs = tl.zeros([BC, BC], dtype=ACC)                            # sum_j drhs_j g2_j^T
            if CURRENT:
                dQZs = tl.zeros([BC, BC], dtype=ACC)                        # sum_j dp_j bZ_j^T
        for j0 in range(0, HID, BJ):
            # 1) the block's [BC, BJ] products, summed over the slices of D, then of d_out
            pk = tl.zeros([BC, BJ], dtype=ACC)
            kd = tl.zeros([BC, BJ], dtype=ACC)                              # k dH2e
            qH2 = tl.zeros([BC, BJ], dtype=ACC)
            if MOMENTUM:
                ks = tl.zeros([BC, BJ], dtype=ACC)                          # k dS2e
                if ERASE:
                    kS2 = tl.zeros([BC, BJ], dtype=ACC)
                if CURRENT:
                    qS2 = tl.zeros([BC, BJ], dtype=ACC)
            for s0 in range(0, D, BK):
                k = _load(_rows(k_ptr, t0, T, H, D, hd, s0, BC, BK), ACC)
                q = _load(_rows(q_ptr, t0, T, H, D, hd, s0, BC, BK), ACC)
                H2 = _load(_mat(w2s_ptr, hd, n, N, HID, D, s0, j0, BK, BJ), ACC)     # [BK, BJ]
                dH2e = _load(_mat(dw2_ptr, hd, 0, 1, HID, D, s0, j0, BK, BJ), ACC)
                pk += tl.dot(k, H2, input_precision=PREC)
                kd += tl.dot(k, dH2e, input_precision=PREC)
                qH2 += tl.dot(q, H2, input_precision=PREC)
                da_e += tl.sum(tl.sum(dH2e * H2, 1), 0)
                if MOMENTUM:
                    S2 = _load(_mat(s2s_ptr, hd, n, N, HID, D, s0, j0, BK, BJ), ACC)
                    dS2e = _load(_mat(ds2_ptr, hd, 0, 1, HID, D, s0, j0, BK, BJ), ACC)
                    ks += tl.dot(k, dS2e, input_precision=PREC)
                    if ERASE:
                        kS2 += tl.dot(k, S2, input_precision=PREC)
                    if CURRENT:
                        qS2 += tl.dot(q, S2, input_precision=PREC)
                    dc_e -= tl.sum(tl.sum(dH2e * S2, 1), 0)
                    dbc_e += tl.sum(tl.sum(dS2e * S2, 1), 0)
            e2 = tl.zeros([BC, BJ], dtype=ACC)                              # err H1^T
            dakC = tl.zeros([BC, BJ], dtype=ACC)                            # ak's cotangent but g2's path
            dOH1 = tl.zeros([BC, BJ], dtype=ACC)
            if MOMENTUM:
                if CURRENT:
                    dOS1 = tl.zeros([BC, BJ], dtype=ACC)
            for u0 in range(0, DO, BK):
                err = _load(_sl(es_ptr, hd, n, N, u0, BO, BC, BK), ACC)   # y - tau at the anchor
                dO = _load(_rows(do_ptr, t0, T, H, DO, hd, u0, BC, BK), ACC)
                H1 = _load(_mat(w1s_ptr, hd, n, N, DO, HID, j0, u0, BJ, BK), ACC)    # [BJ, BK]
                dH1e = _load(_mat(dw1_ptr, hd, 0, 1, DO, HID, j0, u0, BJ, BK), ACC)
                e2 += tl.dot(err, tl.trans(H1), input_precision=PREC)
                dakC -= tl.dot(phiE[:, None] * err, tl.trans(dH1e), input_precision=PREC)
                dOH1 += tl.dot(dO, tl.trans(H1), input_precision=PREC)
                da_e += tl.sum(tl.sum(dH1e * H1, 1), 0)
                if MOMENTUM:
                    S1 = _load(_mat(s1s_ptr, hd, n, N, DO, HID, j0, u0, BJ, BK), ACC)
                    dS1e = _load(_mat(ds1_ptr, hd, 0, 1, DO, HID, j0, u0, BJ, BK), ACC)
                    dakC += tl.dot(dbE[:, None] * err, tl.trans(dS1e), input_precision=PREC)
                    if CURRENT:
                        dOS1 += tl.dot(dO, tl.trans(S1), input_precision=PREC)
                    dc_e -= tl.sum(tl.sum(dH1e * S1, 1), 0)
                    dbc_e += tl.sum(tl.sum(dS1e * S1, 1), 0)
            # 2) the block's algebra: g2, the erase's bZ, the end state's and the read's cotangents
            ak, dak, ddak = _act2(pk)
            g2 = e2 * dak
            if ERASE:                        # the forward's bZ for this block
                rhs = Ab[:, None] * pk - tl.dot(_load(_ms(m_ws_ptr, hd, 2, BC), ACC), g2, input_precision=PREC)
                if MOMENTUM:
                    rhs -= cb[:, None] * kS2
                Y = tl.dot(_load(_ms(m_ws_ptr, hd, 3, BC), ACC), rhs, input_precision=PREC)
                bZ = eps[:, None] * Y
                dbZ = -pa_e[:, None] * kd
                dpa_e -= tl.sum(kd * bZ, 1)
            dg2 = -phiE[:, None] * kd
            dphiE -= tl.sum(kd * g2, 1)
            if MOMENTUM:
                dg2 += dbE[:, None] * ks
                ddbE += tl.sum(ks * g2, 1)
            if CURRENT:
                QKP = _load(_ms(m_ws_ptr, hd, 0, BC), ACC)
                p = Ab[:, None] * qH2 - tl.dot(QKP, g2, input_precision=PREC)
                dXK = _load(_ms(m_ws_ptr, hd, 1, BC), ACC)
                dx = Ab[:, None] * dOH1 + tl.dot(dXK, ak, input_precision=PREC)
                if MOMENTUM:
                    p -= cb[:, None] * qS2
                    dx -= cb[:, None] * dOS1
                if ERASE:
                    QZ = _load(_ms(m_ws_ptr, hd, 4, BC), ACC)
                    p -= tl.dot(QZ, bZ, input_precision=PREC)
                x, dxp = _act(p)
                dAb += tl.sum(x * dOH1, 1)
                dakC += tl.dot(tl.trans(dXK), x, input_precision=PREC)
                dp = dx * dxp
                dAb += tl.sum(dp * qH2, 1)
                if MOMENTUM:
                    dcb -= tl.sum(x * dOS1, 1) + tl.sum(dp * qS2, 1)
                dQKs += tl.dot(dp, tl.trans(g2), input_precision=PREC)
                dg2 -= tl.dot(tl.trans(QKP), dp, input_precision=PREC)
                if ERASE:
                    dbZ -= tl.dot(tl.trans(QZ), dp, input_precision=PREC)
                    dQZs += tl.dot(dp, tl.trans(bZ), input_precision=PREC)
                xA = Ab[:, None] * x         # H1's cotangent from the read: xA^T dO
                dpA = Ab[:, None] * dp       # the read's pre-activation cotangent on q H2
            else:
                xA, dxq = _act(qH2)
                dpA = dOH1 * dxq
            dpk = tl.zeros([BC, BJ], dtype=ACC)
            if ERASE:                        # bZ = eps Y, Y = (I + L)^-1 rhs
                dY = eps[:, None] * dbZ
                deps += tl.sum(dbZ * Y, 1)
                drhs = tl.dot(tl.trans(_load(_ms(m_ws_ptr, hd, 3, BC), ACC)), dY, input_precision=PREC)
                dTs += tl.dot(dY, tl.trans(rhs), input_precision=PREC)
                dAb += tl.sum(drhs * pk, 1)
                dpk += Ab[:, None] * drhs
                dKKs += tl.dot(drhs, tl.trans(g2), input_precision=PREC)
                dg2 -= tl.dot(tl.trans(_load(_ms(m_ws_ptr, hd, 2, BC), ACC)), drhs, input_precision=PREC)
                if MOMENTUM:
                    dcb -= tl.sum(drhs * kS2, 1)
            # g2 = (err H1^T) * act'(pk), and ak = act(pk) with pk = k H2
            de2 = dg2 * dak
            dpk += dakC * dak + dg2 * e2 * ddak
            cH2 = -phiE[:, None] * g2                                       # k's coefficient on dH2e
            if ERASE:
                cH2 -= pa_e[:, None] * bZ
            # 3) the block's anchor cotangents, and the chunk's sums, slice by slice
            for u0 in range(0, DO, BK):
                err = _load(_sl(es_ptr, hd, n, N, u0, BO, BC, BK), ACC)
                dO = _load(_rows(do_ptr, t0, T, H, DO, hd, u0, BC, BK), ACC)
                H1 = _load(_mat(w1s_ptr, hd, n, N, DO, HID, j0, u0, BJ, BK), ACC)
                dH1e = _load(_mat(dw1_ptr, hd, 0, 1, DO, HID, j0, u0, BJ, BK), ACC)
                nH1 = a_e * dH1e + tl.dot(tl.trans(xA), dO, input_precision=PREC)
                nH1 += tl.dot(tl.trans(de2), err, input_precision=PREC)
                derr = _load(_sl(e_ws_ptr, hd, 0, 3, u0, BO, BC, BK), ACC) + tl.dot(de2, H1, input_precision=PREC)
                akd = _load(_sl(e_ws_ptr, hd, 1, 3, u0, BO, BC, BK), ACC) + tl.dot(ak, dH1e, input_precision=PREC)
                if MOMENTUM:
                    dS1e = _load(_mat(ds1_ptr, hd, 0, 1, DO, HID, j0, u0, BJ, BK), ACC)
                    nS1 = bc_e * dS1e - c_e * dH1e
                    if CURRENT:
                        nS1 -= tl.dot(tl.trans(x), cb[:, None] * dO, input_precision=PREC)
                    aks = _load(_sl(e_ws_ptr, hd, 2, 3, u0, BO, BC, BK), ACC) + tl.dot(ak, dS1e, input_precision=PREC)
                tl.debug_barrier()               # every thread has read this slice before it is replaced
                _store(_mat(dw1_ptr, hd, 0, 1, DO, HID, j0, u0, BJ, BK), nH1)
                _store(_sl(e_ws_ptr, hd, 0, 3, u0, BO, BC, BK), derr)
                _store(_sl(e_ws_ptr, hd, 1, 3, u0, BO, BC, BK), akd)
                if MOMENTUM:
                    _store(_mat(ds1_ptr, hd, 0, 1, DO, HID, j0, u0, BJ, BK), nS1)
                    _store(_sl(e_ws_ptr, hd, 2, 3, u0, BO, BC, BK), aks)
            for s0 in range(0, D, BK):
                k = _load(_rows(k_ptr, t0, T, H, D, hd, s0, BC, BK), ACC)
                q = _load(_rows(q_ptr, t0, T, H, D, hd, s0, BC, BK), ACC)
                H2 = _load(_mat(w2s_ptr, hd, n, N, HID, D, s0, j0, BK, BJ), ACC)
                dH2e = _load(_mat(dw2_ptr, hd, 0, 1, HID, D, s0, j0, BK, BJ), ACC)
                nH2 = a_e * dH2e + tl.dot(tl.trans(q), dpA, input_precision=PREC)
                nH2 += tl.dot(tl.trans(k), dpk, input_precision=PREC)
                dk = _load(_rows(dk_ptr, t0, T, H, D, hd, s0, BC, BK), ACC)
                dk += tl.dot(cH2, tl.trans(dH2e), input_precision=PREC) + tl.dot(dpk, tl.trans(H2), input_precision=PREC)
                dq = _load(_rows(dq_ptr, t0, T, H, D, hd, s0, BC, BK), ACC) + tl.dot(dpA, tl.trans(H2), input_precision=PREC)
                if MOMENTUM:
                    S2 = _load(_mat(s2s_ptr, hd, n, N, HID, D, s0, j0, BK, BJ), ACC)
                    dS2e = _load(_mat(ds2_ptr, hd, 0, 1, HID, D, s0, j0, BK, BJ), ACC)
                    dk += tl.dot(dbE[:, None] * g2, tl.trans(dS2e), input_precision=PREC)
                    nS2 = bc_e * dS2e - c_e * dH2e
                    if CURRENT:
                        nS2 -= tl.dot(tl.trans(q), cb[:, None] * dp, input_precision=PREC)
                        dq -= tl.dot(cb[:, None] * dp, tl.trans(S2), input_precision=PREC)
                    if ERASE:
                        nS2 -= tl.dot(tl.trans(k), cb[:, None] * drhs, input_precision=PREC)
                        dk -= tl.dot(cb[:, None] * drhs, tl.trans(S2), input_precision=PREC)
                tl.debug_barrier()
                _store(_mat(dw2_ptr, hd, 0, 1, HID, D, s0, j0, BK, BJ), nH2)
                _store(_rows(dk_ptr, t0, T, H, D, hd, s0, BC, BK), dk)
                _store(_rows(dq_ptr, t0, T, H, D, hd, s0, BC, BK), dq)
                if MOMENTUM:
                    _store(_mat(ds2_ptr, hd, 0, 1, HID, D, s0, j0, BK, BJ), nS2)
            tl.debug_barrier()
        # the sums over the hidden layer: H1e's and S1e's terms in err, q k^T's and k k^T's
        # cotangents, and the erase's triangular inverse
        for u0 in range(0, DO, BK):
            err = _load(_sl(es_ptr, hd, n, N, u0, BO, BC, BK), ACC)
            akd = _load(_sl(e_ws_ptr, hd, 1, 3, u0, BO, BC, BK), ACC)
            derr = _load(_sl(e_ws_ptr, hd, 0, 3, u0, BO, BC, BK), ACC) - phiE[:, None] * akd
            dphiE -= tl.sum(akd * err, 1)
            if MOMENTUM:
                aks = _load(_sl(e_ws_ptr, hd, 2, 3, u0, BO, BC, BK), ACC)
                derr += dbE[:, None] * aks
                ddbE += tl.sum(aks * err, 1)
            tl.debug_barrier()
            _store(_sl(e_ws_ptr, hd, 0, 3, u0, BO, BC, BK), derr)
        if ERASE:
            dPab = tl.zeros([BC, BC], dtype=ACC)
        if CURRENT:
            dQK = -dQKs * PhiE
            dPhi -= dQKs * QK
            if ERASE:
                dQK -= dQZs * Pab
                dPab -= dQZs * QK
        if ERASE:
            Tinv = _load(_ms(m_ws_ptr, hd, 3, BC), ACC)
            dL = -tl.dot(tl.trans(Tinv), tl.dot(dTs, tl.trans(Tinv), input_precision=PREC), input_precision=PREC)
            dL = tl.where(r[:, None] > r[None, :], dL, 0.0)
            dPab += dL * eps[None, :] * KK
            deps += tl.sum(dL * Pab * KK, 0)
            dKK = dL * Pab * eps[None, :] - dKKs * PhiE
            dKK += tl.trans(dKK)
            dPhi -= dKKs * KK
            tl.store(_cc(dcm_ptr, hd, n, N, 1, BC), dPab)
            tl.store(_vec(dcv_ptr, hd, n, N, 4, 5, BC), dpa_e)
            rows = t0 + r
            tl.store(derase_ptr + ((hd // H).to(tl.int64) * T + rows.to(tl.int64)) * H + (hd % H), deps,
                     mask=rows < T)
        tl.store(_cc(dcm_ptr, hd, n, N, 0, BC), dPhi)
        tl.debug_barrier()
        for s0 in range(0, D, BK):
            k = _load(_rows(k_ptr, t0, T, H, D, hd, s0, BC, BK), ACC)
            dk = _load(_rows(dk_ptr, t0, T, H, D, hd, s0, BC, BK), ACC)
            dq = _load(_rows(dq_ptr, t0, T, H, D, hd, s0, BC, BK), ACC)
            if CURRENT:
                dq += tl.dot(dQK, k, input_precision=PREC)
                dk += tl.dot(tl.trans(dQK), _load(_rows(q_ptr, t0, T, H, D, hd, s0, BC, BK), ACC), input_precision=PREC)
            if ERASE:
                dk += tl.dot(dKK, k, input_precision=PREC)
            if RESIDUAL:                     # o = .. + q, y = .. + k (D == d_out)
                dq += _load(_rows(do_ptr, t0, T, H, DO, hd, s0, BC, BK), ACC)
                if L2:
                    dk += _load(_sl(e_ws_ptr, hd, 0, 3, s0, BO, BC, BK), ACC)
            tl.debug_barrier()
            _store(_rows(dk_ptr, t0, T, H, D, hd, s0, BC, BK), dk)
            _store(_rows(dq_ptr, t0, T, H, D, hd, s0, BC, BK), dq)
        # v: tau = v (v's cotangent -err's), or M(v) = act(v H2) H1 [+ v] (SELF_TARGET)
        for s0 in range(0, DV, BK):
            dv = tl.zeros([BC, BK], dtype=ACC)
            if SELF_TARGET:
                if RESIDUAL:
                    if not DETACH:
                        dv -= _load(_sl(e_ws_ptr, hd, 0, 3, s0, BO, BC, BK), ACC)
            else:
                dv -= _load(_sl(e_ws_ptr, hd, 0, 3, s0, BO, BC, BK), ACC)
            _store(_rows(dv_ptr, t0, T, H, DV, hd, s0, BC, BK), dv)
        tl.debug_barrier()
        if L2 or SELF_TARGET:                # err's own paths through y (L2) and tau (SELF_TARGET)
            _err_paths(k_ptr, v_ptr, w1s_ptr, w2s_ptr, dw1_ptr, dw2_ptr, dk_ptr, dv_ptr, e_ws_ptr, hd, n, N, t0,
                       T, H, D, HID, DO, DV, BC, BO, BK, BJ, DETACH, ACC, PREC)
        tl.store(_vec(dcv_ptr, hd, n, N, 0, 5, BC), dAb)
        tl.store(_vec(dcv_ptr, hd, n, N, 2, 5, BC), dphiE)
        tl.store(dcs_ptr + (hd.to(tl.int64) * N + n) * 4 + r, tl.where(r == 0, da_e, 0.0), mask=r < 1)
        if MOMENTUM:
            tl.store(_vec(dcv_ptr, hd, n, N, 1, 5, BC), dcb)
            tl.store(_vec(dcv_ptr, hd, n, N, 3, 5, BC), ddbE)
            tl.store(dcs_ptr + (hd.to(tl.int64) * N + n) * 4 + r, tl.where(r == 1, dc_e, dbc_e), mask=(r >= 1) & (r < 3))
        tl.debug_barrier()                      # chunk n's anchor cotangents are written before chunk n - 1 reads them
