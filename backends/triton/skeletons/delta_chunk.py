# Skeleton 1: the generalized delta rule, chunked, forward and backward.
#
#     h_t = a_t h_{t-1} - b_t k_t (k_t^T h_{t-1}) + k_t w_t^T        o_t = h_t^T q_t
#
# Per chunk of BC tokens with chunk-start state h_n (maths and names: backends/triton/README.md):
#     G = cumsum(log a)      Gp = G - log a (G_{r-1})      Gamma[r, i] = exp(G_r - G_i), i <= r
#     A[r, i] = b_r exp(Gp_r - G_i) k_r.k_i, i < r          Tm = (I + A)^-1
#     U = Tm w      W = Tm (d k),  d_r = b_r exp(Gp_r)
#     Z = U - W h_n                                              (the chunk's corrected writes)
#     o = (q k^T * Gamma) Z + (q exp(G)) h_n
#     h_{n+1} = exp(G_end) h_n + (k exp(G_end - G))^T Z
# Backward: a reverse sequential pass carries dh (the gradient of each chunk-end state); each
# chunk's gradients then follow in parallel from its saved start state h_n, dh and Tm.
#
# Holes, resolved per level by nlc.backends.triton.template: DECAY (a per-token scalar
# retention, given as log a) and ERASE (b). Without ERASE nothing is solved and Z = w.
# Accumulation is in ACC (float32, or float64 for the oracle tests); PREC is tl.dot's
# input_precision; DT the operand type of the products of the inputs themselves (_dot16: 16-bit
# when the inputs are, else ACC). Tensors are contiguous: q, k [B, T, H, K]; w [B, T, H, V];
# log a, b [B, T, H]; states [B, H, K, V]. Workspaces (ACC) are per head: rows [B*H, N*BC, D], states [B*H, N, K, V].
# Offsets are int64; every load is masked (T need not be a multiple of BC; K, V of BK, BV).
import triton
import triton.language as tl

DECAY: tl.constexpr = True
ERASE: tl.constexpr = True


# ---------------------------------------------------------------------------------------------
# addressing


# {include rows}


# {include workspace}


@triton.jit
def _scalars(ptr, t0, T, H, hd, BC: tl.constexpr):
    """Per-token scalars t0 .. t0+BC of a [B, T, H] tensor; 0 past T (the identity step)."""
    rows = t0 + tl.arange(0, BC)
    offs = ((hd // H).to(tl.int64) * T + rows.to(tl.int64)) * H + (hd % H)
    return tl.load(ptr + offs, mask=rows < T, other=0.0)


@triton.jit
def _dot16(a, b, DT: tl.constexpr, PREC: tl.constexpr):
    """a b for the products of the inputs themselves (q, k, do and the bounded P, dP, dS): the
    operands in DT, the inputs' own 16-bit type when they are 16-bit, accumulated in float32."""
    return tl.dot(a.to(DT), b.to(DT), input_precision=PREC)


@triton.jit
def _decay(la_ptr, t0, T, H, hd, BC: tl.constexpr, ACC: tl.constexpr):
    """log a, G (its inclusive cumsum in the chunk), Gp = G - log a, and G at the chunk end."""
    la = _scalars(la_ptr, t0, T, H, hd, BC).to(ACC)
    G = tl.cumsum(la, 0)
    return la, G, G - la, tl.sum(la, 0)


# ---------------------------------------------------------------------------------------------
# forward


if ERASE:  # the UT transform: only a level with an erase has something to solve
    # {include blocked_inverse}


    @triton.jit
    def delta_prep(k_ptr, w_ptr, la_ptr, b_ptr, u_ptr, wk_ptr, tm_ptr, T, H, K, V, NT,
                   BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
                   PREC: tl.constexpr, DT: tl.constexpr):
        """Grid (N, B*H); ERASE only. Tm = (I + A)^-1 blockwise (the 16 x 16 diagonal blocks by
        forward substitution, then merged to 32 and 64 by block products); U = Tm w, W = Tm (d k),
        BV columns at a time."""
        n = tl.program_id(0)
        hd = tl.program_id(1)
        t0 = n * BC
        r = tl.arange(0, BC)
        b = _scalars(b_ptr, t0, T, H, hd, BC).to(ACC)
        strict = r[:, None] > r[None, :]
        if DECAY:
            la, G, Gp, g_end = _decay(la_ptr, t0, T, H, hd, BC, ACC)
            E = tl.exp(tl.where(strict, Gp[:, None] - G[None, :], float("-inf")))
            d = b * tl.exp(Gp)
        else:
            E = tl.where(strict, 1.0, 0.0).to(ACC)
            d = b
        S = tl.zeros([BC, BC], dtype=ACC)
        for c0 in range(0, K, BV):
            k = _load(_rows(k_ptr, t0, T, H, K, hd, c0, BC, BV), ACC)
            S += _dot16(k, tl.trans(k), DT, PREC)
        A = b[:, None] * E * S
        Tm = _unit_lower_inv(A, BC, ACC, PREC)
        for c0 in range(0, V, BV):
            w = _load(_rows(w_ptr, t0, T, H, V, hd, c0, BC, BV), ACC)
            _store(_ws(u_ptr, hd, n, NT, V, c0, BC, BV), tl.dot(Tm, w, input_precision=PREC))
        for c0 in range(0, K, BV):
            k = _load(_rows(k_ptr, t0, T, H, K, hd, c0, BC, BV), ACC)
            _store(_ws(wk_ptr, hd, n, NT, K, c0, BC, BV), tl.dot(Tm, d[:, None] * k, input_precision=PREC))
        _store(_ws(tm_ptr, hd, n, NT, BC, 0, BC, BC), Tm)


@triton.jit
def delta_state_fwd(k_ptr, w_ptr, la_ptr, u_ptr, wk_ptr, z_ptr, h0_ptr, hs_ptr, hT_ptr,
                    T, H, K, V, N, NT, HAS_H0: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                    BKS: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr):
    """Grid (B*H, V / BV): the sequential pass over chunks. Saves h_n and Z for each chunk. The
    state is held as two tiles of BKS key rows when BK > BKS (h1: rows 0 .. BKS, h2: the rest):
    no [BC, BK] tile is live, only [BC, BKS] ones."""
    hd = tl.program_id(0)
    v0 = tl.program_id(1) * BV
    if HAS_H0:
        h1 = _load(_st(h0_ptr, hd, 0, 1, K, V, v0, BKS, BV), ACC)
        if BK > BKS:
            h2 = _load(_st(h0_ptr, hd, 0, 1, K, V, v0, BKS, BV, BKS), ACC)
    else:
        h1 = tl.zeros([BKS, BV], dtype=ACC)
        if BK > BKS:
            h2 = tl.zeros([BKS, BV], dtype=ACC)
    for n in range(N):
        t0 = n * BC
        _store(_st(hs_ptr, hd, n, N, K, V, v0, BKS, BV), h1)
        if BK > BKS:
            _store(_st(hs_ptr, hd, n, N, K, V, v0, BKS, BV, BKS), h2)
        if ERASE:
            Z = _load(_ws(u_ptr, hd, n, NT, V, v0, BC, BV), ACC)
            Z -= tl.dot(_load(_ws(wk_ptr, hd, n, NT, K, 0, BC, BKS), ACC), h1, input_precision=PREC)
            if BK > BKS:
                Z -= tl.dot(_load(_ws(wk_ptr, hd, n, NT, K, BKS, BC, BKS), ACC), h2, input_precision=PREC)
        else:
            Z = _load(_rows(w_ptr, t0, T, H, V, hd, v0, BC, BV), ACC)
        _store(_ws(z_ptr, hd, n, NT, V, v0, BC, BV), Z)
        if DECAY:
            la, G, Gp, g_end = _decay(la_ptr, t0, T, H, hd, BC, ACC)
            kdecay = tl.exp(g_end - G)[:, None]
            kd = _load(_rows(k_ptr, t0, T, H, K, hd, 0, BC, BKS), ACC) * kdecay
            h1 = tl.exp(g_end) * h1 + tl.dot(tl.trans(kd), Z, input_precision=PREC)
            if BK > BKS:
                kd = _load(_rows(k_ptr, t0, T, H, K, hd, BKS, BC, BKS), ACC) * kdecay
                h2 = tl.exp(g_end) * h2 + tl.dot(tl.trans(kd), Z, input_precision=PREC)
        else:
            h1 += tl.dot(tl.trans(_load(_rows(k_ptr, t0, T, H, K, hd, 0, BC, BKS), ACC)), Z, input_precision=PREC)
            if BK > BKS:
                h2 += tl.dot(tl.trans(_load(_rows(k_ptr, t0, T, H, K, hd, BKS, BC, BKS), ACC)), Z,
                             input_precision=PREC)
    _store(_st(hT_ptr, hd, 0, 1, K, V, v0, BKS, BV), h1)
    if BK > BKS:
        _store(_st(hT_ptr, hd, 0, 1, K, V, v0, BKS, BV, BKS), h2)


@triton.jit
def delta_out(q_ptr, k_ptr, la_ptr, z_ptr, hs_ptr, o_ptr, T, H, K, V, N, NT,
              BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
              PREC: tl.constexpr, DT: tl.constexpr):
    """Grid (N, B*H, V / BV): o = (q k^T * Gamma) Z + (q exp(G)) h_n, over key blocks of BV."""
    n = tl.program_id(0)
    hd = tl.program_id(1)
    v0 = tl.program_id(2) * BV
    t0 = n * BC
    r = tl.arange(0, BC)
    incl = r[:, None] >= r[None, :]
    if DECAY:
        la, G, Gp, g_end = _decay(la_ptr, t0, T, H, hd, BC, ACC)
        Gamma = tl.exp(tl.where(incl, G[:, None] - G[None, :], float("-inf")))
        eG = tl.exp(G)[:, None]
    else:
        Gamma = tl.where(incl, 1.0, 0.0).to(ACC)
    QK = tl.zeros([BC, BC], dtype=ACC)
    o = tl.zeros([BC, BV], dtype=ACC)
    for c0 in range(0, K, BV):
        q = _load(_rows(q_ptr, t0, T, H, K, hd, c0, BC, BV), ACC)
        QK += _dot16(q, tl.trans(_load(_rows(k_ptr, t0, T, H, K, hd, c0, BC, BV), ACC)), DT, PREC)
        if DECAY:
            q = q * eG
        o += tl.dot(q, _load(_st(hs_ptr, hd, n, N, K, V, v0, BV, BV, c0), ACC), input_precision=PREC)
    Z = _load(_ws(z_ptr, hd, n, NT, V, v0, BC, BV), ACC)
    o += tl.dot(QK * Gamma, Z, input_precision=PREC)
    _store(_rows(o_ptr, t0, T, H, V, hd, v0, BC, BV), o)


# ---------------------------------------------------------------------------------------------
# backward


@triton.jit
def delta_state_bwd(q_ptr, k_ptr, la_ptr, wk_ptr, do_ptr, dhT_ptr, dhs_ptr, dh0_ptr,
                    T, H, K, V, N, NT, HAS_DHT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                    BKS: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr):
    """Grid (B*H, V / BV): the reverse pass. dhs[n] is the gradient of chunk n's end state;
    dh_n = exp(G_end) dh + (q exp(G))^T do - W^T dZ with dZ = P^T do + kd dh. dh is held as
    two tiles of BKS key rows when BK > BKS (as delta_state_fwd's h)."""
    hd = tl.program_id(0)
    v0 = tl.program_id(1) * BV
    r = tl.arange(0, BC)
    if HAS_DHT:
        dh1 = _load(_st(dhT_ptr, hd, 0, 1, K, V, v0, BKS, BV), ACC)
        if BK > BKS:
            dh2 = _load(_st(dhT_ptr, hd, 0, 1, K, V, v0, BKS, BV, BKS), ACC)
    else:
        dh1 = tl.zeros([BKS, BV], dtype=ACC)
        if BK > BKS:
            dh2 = tl.zeros([BKS, BV], dtype=ACC)
    incl = r[:, None] >= r[None, :]
    for m in range(N):
        n = N - 1 - m
        t0 = n * BC
        _store(_st(dhs_ptr, hd, n, N, K, V, v0, BKS, BV), dh1)
        if BK > BKS:
            _store(_st(dhs_ptr, hd, n, N, K, V, v0, BKS, BV, BKS), dh2)
        do = _load(_rows(do_ptr, t0, T, H, V, hd, v0, BC, BV), ACC)
        if DECAY:
            la, G, Gp, g_end = _decay(la_ptr, t0, T, H, hd, BC, ACC)
            Gamma = tl.exp(tl.where(incl, G[:, None] - G[None, :], float("-inf")))
            eG = tl.exp(G)[:, None]
            kdecay = tl.exp(g_end - G)[:, None]
            carry = tl.exp(g_end)
        else:
            Gamma = tl.where(incl, 1.0, 0.0).to(ACC)
        q1 = _load(_rows(q_ptr, t0, T, H, K, hd, 0, BC, BKS), ACC)
        k1 = _load(_rows(k_ptr, t0, T, H, K, hd, 0, BC, BKS), ACC)
        QK = _dot16(q1, tl.trans(k1), DT, PREC)
        if BK > BKS:
            q2 = _load(_rows(q_ptr, t0, T, H, K, hd, BKS, BC, BKS), ACC)
            k2 = _load(_rows(k_ptr, t0, T, H, K, hd, BKS, BC, BKS), ACC)
            QK += _dot16(q2, tl.trans(k2), DT, PREC)
        if DECAY:
            q1 = q1 * eG
            k1 = k1 * kdecay
            if BK > BKS:
                q2 = q2 * eG
                k2 = k2 * kdecay
        dZ = _dot16(tl.trans(QK * Gamma), do, DT, PREC) + tl.dot(k1, dh1, input_precision=PREC)
        if BK > BKS:
            dZ += tl.dot(k2, dh2, input_precision=PREC)
        if DECAY:
            dh1 = carry * dh1
            if BK > BKS:
                dh2 = carry * dh2
        dh1 += _dot16(tl.trans(q1), do, DT, PREC)
        if BK > BKS:
            dh2 += _dot16(tl.trans(q2), do, DT, PREC)
        if ERASE:
            dh1 -= tl.dot(tl.trans(_load(_ws(wk_ptr, hd, n, NT, K, 0, BC, BKS), ACC)), dZ, input_precision=PREC)
            if BK > BKS:
                dh2 -= tl.dot(tl.trans(_load(_ws(wk_ptr, hd, n, NT, K, BKS, BC, BKS), ACC)), dZ,
                              input_precision=PREC)
    _store(_st(dh0_ptr, hd, 0, 1, K, V, v0, BKS, BV), dh1)
    if BK > BKS:
        _store(_st(dh0_ptr, hd, 0, 1, K, V, v0, BKS, BV, BKS), dh2)


@triton.jit
def delta_chunk_bwd(q_ptr, k_ptr, la_ptr, b_ptr, u_ptr, wk_ptr, tm_ptr, z_ptr, hs_ptr, dhs_ptr,
                    do_ptr, dz_ptr, dq_ptr, dk_ptr, dw_ptr, dla_ptr, db_ptr, T, H, K, V, N, NT,
                    BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
                    PREC: tl.constexpr, DT: tl.constexpr):
    """Grid (N, B*H): one chunk's gradients from its start state h_n and end-state gradient dh,
    the forward's adjoint line by line (backends/triton/README.md). No tile wider than BV
    columns is live: a pass over the value blocks (dZ, dw, and dP, dA, which sum over them; dZ
    goes to the workspace dz), then one over the key blocks, each summing over the value blocks
    what it needs (dqd, dkd, dW, <h, dh>), and with ERASE a last one adding (dS + dS^T) k to dk."""
    n = tl.program_id(0)
    hd = tl.program_id(1)
    t0 = n * BC
    r = tl.arange(0, BC)
    incl = r[:, None] >= r[None, :]
    strict = r[:, None] > r[None, :]
    if DECAY:
        la, G, Gp, g_end = _decay(la_ptr, t0, T, H, hd, BC, ACC)
        Gamma = tl.exp(tl.where(incl, G[:, None] - G[None, :], float("-inf")))
        eG = tl.exp(G)
        kdecay = tl.exp(g_end - G)
    else:
        Gamma = tl.where(incl, 1.0, 0.0).to(ACC)
        eG = tl.full([BC], 1.0, ACC)
        kdecay = eG
    QK = tl.zeros([BC, BC], dtype=ACC)
    if ERASE:
        S = tl.zeros([BC, BC], dtype=ACC)
    for c0 in range(0, K, BV):
        kb = _load(_rows(k_ptr, t0, T, H, K, hd, c0, BC, BV), ACC)
        QK += _dot16(_load(_rows(q_ptr, t0, T, H, K, hd, c0, BC, BV), ACC), tl.trans(kb), DT, PREC)
        if ERASE:
            S += _dot16(kb, tl.trans(kb), DT, PREC)
    P = QK * Gamma
    # o = P Z + qd h;  h_end = exp(g_end) h + kd^T Z;  Z = U - W h;  [U | W] = Tm [w | d k]
    dP = tl.zeros([BC, BC], dtype=ACC)
    if ERASE:
        Tm = _load(_ws(tm_ptr, hd, n, NT, BC, 0, BC, BC), ACC)
        dA = tl.zeros([BC, BC], dtype=ACC)
    for v0 in range(0, V, BV):                                           # value blocks
        do = _load(_rows(do_ptr, t0, T, H, V, hd, v0, BC, BV), ACC)
        dZ = _dot16(tl.trans(P), do, DT, PREC)
        for c0 in range(0, K, BV):
            kd = _load(_rows(k_ptr, t0, T, H, K, hd, c0, BC, BV), ACC) * kdecay[:, None]
            dh = _load(_st(dhs_ptr, hd, n, N, K, V, v0, BV, BV, c0), ACC)
            dZ += tl.dot(kd, dh, input_precision=PREC)
        Z = _load(_ws(z_ptr, hd, n, NT, V, v0, BC, BV), ACC)
        dP += tl.dot(do, tl.trans(Z), input_precision=PREC)
        if ERASE:
            _store(_ws(dz_ptr, hd, n, NT, V, v0, BC, BV), dZ)
            dw = tl.dot(tl.trans(Tm), dZ, input_precision=PREC)          # dR for the w columns
            U = _load(_ws(u_ptr, hd, n, NT, V, v0, BC, BV), ACC)
            dA -= tl.dot(dw, tl.trans(U), input_precision=PREC)
        else:
            dw = dZ
        _store(_rows(dw_ptr, t0, T, H, V, hd, v0, BC, BV), dw)
    dP = dP * Gamma                                                      # d(q k^T)
    if DECAY:
        X = dP * QK                                                      # dGamma * Gamma
        dG = tl.sum(X, 1) - tl.sum(X, 0)
        s = tl.zeros([BC], dtype=ACC)
        hdh = tl.zeros([BV], dtype=ACC)
        dGp = tl.zeros([BC], dtype=ACC)
    if ERASE:
        b = _scalars(b_ptr, t0, T, H, hd, BC).to(ACC)
        if DECAY:
            ed = tl.exp(Gp)
        else:
            ed = tl.full([BC], 1.0, ACC)
        dd = tl.zeros([BC], dtype=ACC)
    for c0 in range(0, K, BV):                                           # key blocks
        qb = _load(_rows(q_ptr, t0, T, H, K, hd, c0, BC, BV), ACC)
        kb = _load(_rows(k_ptr, t0, T, H, K, hd, c0, BC, BV), ACC)
        dqd = tl.zeros([BC, BV], dtype=ACC)
        dkd = tl.zeros([BC, BV], dtype=ACC)
        if ERASE:
            dW = tl.zeros([BC, BV], dtype=ACC)
        for v0 in range(0, V, BV):
            h = _load(_st(hs_ptr, hd, n, N, K, V, v0, BV, BV, c0), ACC)
            dh = _load(_st(dhs_ptr, hd, n, N, K, V, v0, BV, BV, c0), ACC)
            dqd += tl.dot(_load(_rows(do_ptr, t0, T, H, V, hd, v0, BC, BV), ACC), tl.trans(h), input_precision=PREC)
            dkd += tl.dot(_load(_ws(z_ptr, hd, n, NT, V, v0, BC, BV), ACC), tl.trans(dh), input_precision=PREC)
            if DECAY:
                hdh += tl.sum(h * dh, 0)
            if ERASE:
                dW -= tl.dot(_load(_ws(dz_ptr, hd, n, NT, V, v0, BC, BV), ACC), tl.trans(h), input_precision=PREC)
        _store(_rows(dq_ptr, t0, T, H, K, hd, c0, BC, BV), _dot16(dP, kb, DT, PREC) + dqd * eG[:, None])
        dk = _dot16(tl.trans(dP), qb, DT, PREC) + dkd * kdecay[:, None]
        if DECAY:
            dG += tl.sum(dqd * qb * eG[:, None], 1)
            s += tl.sum(dkd * kb * kdecay[:, None], 1)
        if ERASE:
            dRk = tl.dot(tl.trans(Tm), dW, input_precision=PREC)         # dR for the d k columns
            Wk = _load(_ws(wk_ptr, hd, n, NT, K, c0, BC, BV), ACC)
            dA -= tl.dot(dRk, tl.trans(Wk), input_precision=PREC)
            dd += tl.sum(dRk * kb, 1)
            dk += (b * ed)[:, None] * dRk
        _store(_rows(dk_ptr, t0, T, H, K, hd, c0, BC, BV), dk)
    if DECAY:
        dG = dG - s
        dg_end = tl.sum(s, 0) + tl.sum(hdh, 0) * tl.exp(g_end)
    if ERASE:
        dA = tl.where(strict, dA, 0.0)
        if DECAY:
            E = tl.exp(tl.where(strict, Gp[:, None] - G[None, :], float("-inf")))
        else:
            E = tl.where(strict, 1.0, 0.0).to(ACC)
        dS = dA * b[:, None] * E
        db = tl.sum(dA * E * S, 1) + dd * ed
        _store((db_ptr + ((hd // H).to(tl.int64) * T + (t0 + r).to(tl.int64)) * H + (hd % H), t0 + r < T), db)
        if DECAY:
            X2 = dS * S                                                  # dA * A
            dGp = tl.sum(X2, 1) + dd * b * ed
            dG = dG - tl.sum(X2, 0)
        dSS = dS + tl.trans(dS)
        tl.debug_barrier()                                               # dk's rows, stored above by other threads
        for c0 in range(0, K, BV):
            kb = _load(_rows(k_ptr, t0, T, H, K, hd, c0, BC, BV), ACC)
            pm = _rows(dk_ptr, t0, T, H, K, hd, c0, BC, BV)
            _store(pm, _load(pm, ACC) + _dot16(dSS, kb, DT, PREC))
    if DECAY:
        dG = dG + tl.where(r == BC - 1, dg_end, 0.0)
        # G = cumsum(la), Gp = G - la: dla_i = sum_{r >= i} (dG + dGp)_r - dGp_i
        tot = dG + dGp
        dla = tl.sum(tot, 0) - tl.cumsum(tot, 0) + tot - dGp
        _store((dla_ptr + ((hd // H).to(tl.int64) * T + (t0 + r).to(tl.int64)) * H + (hd % H), t0 + r < T), dla)
