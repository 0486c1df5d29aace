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
# which keeps every chunk's. Passes over the hidden blocks, BJ units each: C) everything but err's
# own paths through y and tau, and the anchor's cotangents, written block by block; D) those
# paths (L2: y; SELF_TARGET unless DETACH: tau). Coefficient cotangents go to dcv, dcs, dcm; the
# wrapper sends them through the coefficients' torch graph.
import triton
import triton.language as tl
from mlp_chunk import CURRENT, ERASE, GELU, L2, MOMENTUM, RESIDUAL, SELF_TARGET  # noqa: F401  its flags
from mlp_chunk import _act, _load, _mat, _rows, _scalars, _store, _unit_lower_inv, _ws  # and helpers


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
def mlp_chunk_bwd(q_ptr, k_ptr, v_ptr, erase_ptr, do_ptr, cv_ptr, cs_ptr, cm_ptr,
                  w1s_ptr, w2s_ptr, s1s_ptr, s2s_ptr, dw1_ptr, dw2_ptr, ds1_ptr, ds2_ptr,
                  dq_ptr, dk_ptr, dv_ptr, derase_ptr, dcv_ptr, dcs_ptr, dcm_ptr, es_ptr, xk_ptr, e_ws_ptr, m_ws_ptr,
                  T, H, D, HID, DO, DV, N,
                  BC: tl.constexpr, BD: tl.constexpr, BO: tl.constexpr, BV: tl.constexpr, BJ: tl.constexpr,
                  DETACH: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Grid (B*H,): the reverse pass over chunks. dw1 .. ds2 [B*H, R, C] (paper orientation) hold
    the cotangent of the final state on entry and of the initial state on exit. From the forward:
    es [B*H, N, BC, BO] every chunk's err, xk [B*H, N, BC, BC] (CURRENT) every chunk's XK.
    Workspaces: e_ws [B*H, 1, BC, BO] (err's cotangent), m_ws [B*H, 6, BC, BC] (q k^T * PhiE,
    dXK, k k^T * PhiE, the erase's (I + L)^-1, q k^T * Pab). DETACH: no outer gradient through
    a self-generated target."""
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
        err = _load(_ws(es_ptr, hd, n, N, BC, BO), ACC)                 # y - tau at the anchor
        dO = _load(_rows(do_ptr, t0, T, H, DO, hd, BC, BO), ACC)
        k = _load(_rows(k_ptr, t0, T, H, D, hd, BC, BD), ACC)
        q = _load(_rows(q_ptr, t0, T, H, D, hd, BC, BD), ACC)
        if ERASE:                            # the UT transform of the erase on H2
            eps = _scalars(erase_ptr, t0, T, H, hd, BC, 0.0, 0).to(ACC)
            pa_e = tl.load(_vec(cv_ptr, hd, n, N, 4, 5, BC)).to(ACC)
            Pab = tl.load(_cc(cm_ptr, hd, n, N, 1, BC)).to(ACC)
            KK = tl.dot(k, tl.trans(k), input_precision=PREC)
            _store(_ms(m_ws_ptr, hd, 2, BC), KK * PhiE, True)
            _store(_ms(m_ws_ptr, hd, 3, BC), _unit_lower_inv(Pab * eps[None, :] * KK, BC, ACC, PREC), True)
        if CURRENT:
            QK = tl.dot(q, tl.trans(k), input_precision=PREC)
            _store(_ms(m_ws_ptr, hd, 0, BC), QK * PhiE, True)
            if ERASE:
                _store(_ms(m_ws_ptr, hd, 4, BC), QK * Pab, True)
        tl.debug_barrier()
        # the current read's output layer: XK = x ak^T, summed over the hidden blocks
        derr = tl.zeros([BC, BO], dtype=ACC)
        if CURRENT:
            XK = _load(_ws(xk_ptr, hd, n, N, BC, BC), ACC)
            dOE = tl.dot(dO, tl.trans(err), input_precision=PREC)           # dO err^T
            _store(_ms(m_ws_ptr, hd, 1, BC), -dOE * PhiE, True)             # dXK
            derr -= tl.dot(tl.trans(XK * PhiE), dO, input_precision=PREC)
            dPhi = -dOE * XK
            tl.debug_barrier()
        else:
            dPhi = tl.zeros([BC, BC], dtype=ACC)
        # C) per hidden block: the state's, the read's, the erase's and g2's cotangents
        dk = tl.zeros([BC, BD], dtype=ACC)
        dq = tl.zeros([BC, BD], dtype=ACC)
        AKd1 = tl.zeros([BC, BO], dtype=ACC)                                # sum_j ak_j dH1e_j
        dAb = tl.zeros([BC], dtype=ACC)
        dphiE = tl.zeros([BC], dtype=ACC)
        da_e = tl.sum(tl.zeros([BC], dtype=ACC), 0)
        if MOMENTUM:
            AKs1 = tl.zeros([BC, BO], dtype=ACC)                            # sum_j ak_j dS1e_j
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
            k = _load(_rows(k_ptr, t0, T, H, D, hd, BC, BD), ACC)
            q = _load(_rows(q_ptr, t0, T, H, D, hd, BC, BD), ACC)
            H1 = _load(_mat(w1s_ptr, hd, n, N, DO, HID, j0, 0, BJ, BO), ACC)   # [BJ, BO]
            H2 = _load(_mat(w2s_ptr, hd, n, N, HID, D, 0, j0, BD, BJ), ACC)    # [BD, BJ]
            pk = tl.dot(k, H2, input_precision=PREC)
            ak, dak, ddak = _act2(pk)
            e2 = tl.dot(err, tl.trans(H1), input_precision=PREC)
            g2 = e2 * dak
            dH1e = _load(_mat(dw1_ptr, hd, 0, 1, DO, HID, j0, 0, BJ, BO), ACC)
            dH2e = _load(_mat(dw2_ptr, hd, 0, 1, HID, D, 0, j0, BD, BJ), ACC)
            nH1 = a_e * dH1e                                                # the anchor's cotangents
            nH2 = a_e * dH2e
            da_e += tl.sum(tl.sum(dH1e * H1, 1), 0) + tl.sum(tl.sum(dH2e * H2, 1), 0)
            if MOMENTUM:
                S1 = _load(_mat(s1s_ptr, hd, n, N, DO, HID, j0, 0, BJ, BO), ACC)
                S2 = _load(_mat(s2s_ptr, hd, n, N, HID, D, 0, j0, BD, BJ), ACC)
            if ERASE:                        # the forward's bZ for this block
                rhs = Ab[:, None] * pk - tl.dot(_load(_ms(m_ws_ptr, hd, 2, BC), ACC), g2, input_precision=PREC)
                if MOMENTUM:
                    kS2 = tl.dot(k, S2, input_precision=PREC)
                    rhs -= cb[:, None] * kS2
                Y = tl.dot(_load(_ms(m_ws_ptr, hd, 3, BC), ACC), rhs, input_precision=PREC)
                bZ = eps[:, None] * Y
            # the end state: H1e, H2e (and S1e, S2e)
            dakC = -tl.dot(phiE[:, None] * err, tl.trans(dH1e), input_precision=PREC)
            AKd1 += tl.dot(ak, dH1e, input_precision=PREC)
            kd = tl.dot(k, dH2e, input_precision=PREC)
            dg2 = -phiE[:, None] * kd
            dphiE -= tl.sum(kd * g2, 1)
            dk -= tl.dot(phiE[:, None] * g2, tl.trans(dH2e), input_precision=PREC)
            if ERASE:
                dbZ = -pa_e[:, None] * kd
                dpa_e -= tl.sum(kd * bZ, 1)
                dk -= tl.dot(pa_e[:, None] * bZ, tl.trans(dH2e), input_precision=PREC)
            if MOMENTUM:
                dS1e = _load(_mat(ds1_ptr, hd, 0, 1, DO, HID, j0, 0, BJ, BO), ACC)
                dS2e = _load(_mat(ds2_ptr, hd, 0, 1, HID, D, 0, j0, BD, BJ), ACC)
                nS1 = bc_e * dS1e - c_e * dH1e
                nS2 = bc_e * dS2e - c_e * dH2e
                dc_e -= tl.sum(tl.sum(dH1e * S1, 1), 0) + tl.sum(tl.sum(dH2e * S2, 1), 0)
                dbc_e += tl.sum(tl.sum(dS1e * S1, 1), 0) + tl.sum(tl.sum(dS2e * S2, 1), 0)
                dakC += tl.dot(dbE[:, None] * err, tl.trans(dS1e), input_precision=PREC)
                AKs1 += tl.dot(ak, dS1e, input_precision=PREC)
                ks = tl.dot(k, dS2e, input_precision=PREC)
                dg2 += dbE[:, None] * ks
                ddbE += tl.sum(ks * g2, 1)
                dk += tl.dot(dbE[:, None] * g2, tl.trans(dS2e), input_precision=PREC)
            # the read
            qH2 = tl.dot(q, H2, input_precision=PREC)
            dOH1 = tl.dot(dO, tl.trans(H1), input_precision=PREC)          # [BC, BJ]
            if CURRENT:
                QKP = _load(_ms(m_ws_ptr, hd, 0, BC), ACC)
                p = Ab[:, None] * qH2 - tl.dot(QKP, g2, input_precision=PREC)
                dXK = _load(_ms(m_ws_ptr, hd, 1, BC), ACC)
                dx = Ab[:, None] * dOH1 + tl.dot(dXK, ak, input_precision=PREC)
                if MOMENTUM:
                    qS2 = tl.dot(q, S2, input_precision=PREC)
                    p -= cb[:, None] * qS2
                    dOS1 = tl.dot(dO, tl.trans(S1), input_precision=PREC)
                    dx -= cb[:, None] * dOS1
                if ERASE:
                    QZ = _load(_ms(m_ws_ptr, hd, 4, BC), ACC)
                    p -= tl.dot(QZ, bZ, input_precision=PREC)
                x, dxp = _act(p)
                dAb += tl.sum(x * dOH1, 1)
                nH1 += tl.dot(tl.trans(x), Ab[:, None] * dO, input_precision=PREC)
                dakC += tl.dot(tl.trans(dXK), x, input_precision=PREC)
                dp = dx * dxp
                nH2 += tl.dot(tl.trans(q), Ab[:, None] * dp, input_precision=PREC)
                dq += tl.dot(Ab[:, None] * dp, tl.trans(H2), input_precision=PREC)
                dAb += tl.sum(dp * qH2, 1)
                if MOMENTUM:
                    dcb -= tl.sum(x * dOS1, 1) + tl.sum(dp * qS2, 1)
                    nS1 -= tl.dot(tl.trans(x), cb[:, None] * dO, input_precision=PREC)
                    nS2 -= tl.dot(tl.trans(q), cb[:, None] * dp, input_precision=PREC)
                    dq -= tl.dot(cb[:, None] * dp, tl.trans(S2), input_precision=PREC)
                dQKs += tl.dot(dp, tl.trans(g2), input_precision=PREC)
                dg2 -= tl.dot(tl.trans(QKP), dp, input_precision=PREC)
                if ERASE:
                    dbZ -= tl.dot(tl.trans(QZ), dp, input_precision=PREC)
                    dQZs += tl.dot(dp, tl.trans(bZ), input_precision=PREC)
            else:
                xq, dxq = _act(qH2)
                nH1 += tl.dot(tl.trans(xq), dO, input_precision=PREC)
                dpq = dOH1 * dxq
                nH2 += tl.dot(tl.trans(q), dpq, input_precision=PREC)
                dq += tl.dot(dpq, tl.trans(H2), input_precision=PREC)
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
                    nS2 -= tl.dot(tl.trans(k), cb[:, None] * drhs, input_precision=PREC)
                    dk -= tl.dot(cb[:, None] * drhs, tl.trans(S2), input_precision=PREC)
            # g2 = (err H1^T) * act'(pk), and ak = act(pk) with pk = k H2
            de2 = dg2 * dak
            derr += tl.dot(de2, H1, input_precision=PREC)
            nH1 += tl.dot(tl.trans(de2), err, input_precision=PREC)
            dpk += dakC * dak + dg2 * e2 * ddak
            dk += tl.dot(dpk, tl.trans(H2), input_precision=PREC)
            nH2 += tl.dot(tl.trans(k), dpk, input_precision=PREC)
            tl.debug_barrier()                  # every thread has read this block's dw before it is replaced
            _store(_mat(dw1_ptr, hd, 0, 1, DO, HID, j0, 0, BJ, BO), nH1, True)
            _store(_mat(dw2_ptr, hd, 0, 1, HID, D, 0, j0, BD, BJ), nH2, True)
            if MOMENTUM:
                _store(_mat(ds1_ptr, hd, 0, 1, DO, HID, j0, 0, BJ, BO), nS1, True)
                _store(_mat(ds2_ptr, hd, 0, 1, HID, D, 0, j0, BD, BJ), nS2, True)
            tl.debug_barrier()
        # the sums over the hidden layer: H1e's and S1e's terms in err, q k^T's and k k^T's
        # cotangents, and the erase's triangular inverse
        derr -= phiE[:, None] * AKd1
        dphiE -= tl.sum(AKd1 * err, 1)
        if MOMENTUM:
            derr += dbE[:, None] * AKs1
            ddbE += tl.sum(AKs1 * err, 1)
        k = _load(_rows(k_ptr, t0, T, H, D, hd, BC, BD), ACC)
        q = _load(_rows(q_ptr, t0, T, H, D, hd, BC, BD), ACC)
        if ERASE:
            dPab = tl.zeros([BC, BC], dtype=ACC)
        if CURRENT:
            dQK = -dQKs * PhiE
            dPhi -= dQKs * QK
            if ERASE:
                dQK -= dQZs * Pab
                dPab -= dQZs * QK
            dq += tl.dot(dQK, k, input_precision=PREC)
            dk += tl.dot(tl.trans(dQK), q, input_precision=PREC)
        if ERASE:
            Tinv = _load(_ms(m_ws_ptr, hd, 3, BC), ACC)
            dL = -tl.dot(tl.trans(Tinv), tl.dot(dTs, tl.trans(Tinv), input_precision=PREC), input_precision=PREC)
            dL = tl.where(r[:, None] > r[None, :], dL, 0.0)
            dPab += dL * eps[None, :] * KK
            deps += tl.sum(dL * Pab * KK, 0)
            dKK = dL * Pab * eps[None, :] - dKKs * PhiE
            dPhi -= dKKs * KK
            dk += tl.dot(dKK + tl.trans(dKK), k, input_precision=PREC)
            tl.store(_cc(dcm_ptr, hd, n, N, 1, BC), dPab)
            tl.store(_vec(dcv_ptr, hd, n, N, 4, 5, BC), dpa_e)
            rows = t0 + r
            tl.store(derase_ptr + ((hd // H).to(tl.int64) * T + rows.to(tl.int64)) * H + (hd % H), deps,
                     mask=rows < T)
        tl.store(_cc(dcm_ptr, hd, n, N, 0, BC), dPhi)
        if RESIDUAL:
            dq += dO
        # D) err's own paths: through y = act(k H2) H1 [+ k] (L2) and tau = act(v H2) H1 [+ v]
        _store(_ws(e_ws_ptr, hd, 0, 1, BC, BO), derr, True)
        if SELF_TARGET:                      # tau = act(v H2) H1 [+ v]: its residual path here
            dv = tl.zeros([BC, BV], dtype=ACC)
            if RESIDUAL:
                if not DETACH:
                    dv -= derr
        else:
            dv = -derr
        if L2:
            if RESIDUAL:
                dk += derr
        tl.debug_barrier()
        if L2 or SELF_TARGET:
            for j0 in range(0, HID, BJ):
                H1T = tl.trans(_load(_mat(w1s_ptr, hd, n, N, DO, HID, j0, 0, BJ, BO), ACC))
                H2 = _load(_mat(w2s_ptr, hd, n, N, HID, D, 0, j0, BD, BJ), ACC)
                dy = _load(_ws(e_ws_ptr, hd, 0, 1, BC, BO), ACC)
                nH1 = _load(_mat(dw1_ptr, hd, 0, 1, DO, HID, j0, 0, BJ, BO), ACC)
                nH2 = _load(_mat(dw2_ptr, hd, 0, 1, HID, D, 0, j0, BD, BJ), ACC)
                if L2:
                    k = _load(_rows(k_ptr, t0, T, H, D, hd, BC, BD), ACC)
                    ak, dak = _act(tl.dot(k, H2, input_precision=PREC))
                    dpk = tl.dot(dy, H1T, input_precision=PREC) * dak
                    dk += tl.dot(dpk, tl.trans(H2), input_precision=PREC)
                    nH1 += tl.dot(tl.trans(ak), dy, input_precision=PREC)
                    nH2 += tl.dot(tl.trans(k), dpk, input_precision=PREC)
                if SELF_TARGET:
                    if not DETACH:                      # dtau = -derr
                        v = _load(_rows(v_ptr, t0, T, H, DV, hd, BC, BV), ACC)
                        av, dav = _act(tl.dot(v, H2, input_precision=PREC))
                        dpv = -tl.dot(dy, H1T, input_precision=PREC) * dav
                        dv += tl.dot(dpv, tl.trans(H2), input_precision=PREC)
                        nH1 -= tl.dot(tl.trans(av), dy, input_precision=PREC)
                        nH2 += tl.dot(tl.trans(v), dpv, input_precision=PREC)
                tl.debug_barrier()
                _store(_mat(dw1_ptr, hd, 0, 1, DO, HID, j0, 0, BJ, BO), nH1, True)
                _store(_mat(dw2_ptr, hd, 0, 1, HID, D, 0, j0, BD, BJ), nH2, True)
                tl.debug_barrier()
        _store(_rows(dv_ptr, t0, T, H, DV, hd, BC, BV), dv, True)
        _store(_rows(dq_ptr, t0, T, H, D, hd, BC, BD), dq, True)
        _store(_rows(dk_ptr, t0, T, H, D, hd, BC, BD), dk, True)
        tl.store(_vec(dcv_ptr, hd, n, N, 0, 5, BC), dAb)
        tl.store(_vec(dcv_ptr, hd, n, N, 2, 5, BC), dphiE)
        tl.store(dcs_ptr + (hd.to(tl.int64) * N + n) * 4 + r, tl.where(r == 0, da_e, 0.0), mask=r < 1)
        if MOMENTUM:
            tl.store(_vec(dcv_ptr, hd, n, N, 1, 5, BC), dcb)
            tl.store(_vec(dcv_ptr, hd, n, N, 3, 5, BC), ddbE)
            tl.store(dcs_ptr + (hd.to(tl.int64) * N + n) * 4 + r, tl.where(r == 1, dc_e, dbc_e), mask=(r >= 1) & (r < 3))
        tl.debug_barrier()                      # chunk n's anchor cotangents are written before chunk n - 1 reads them
