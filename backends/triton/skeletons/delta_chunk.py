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
# input_precision. Tensors are contiguous: q, k [B, T, H, K]; w [B, T, H, V]; log a, b [B, T, H];
# states [B, H, K, V]. Workspaces (ACC) are per head: rows [B*H, N*BC, D], states [B*H, N, K, V].
# Offsets are int64; every load is masked (T need not be a multiple of BC; K, V of BK, BV).
import triton
import triton.language as tl

DECAY: tl.constexpr = True
ERASE: tl.constexpr = True


# ---------------------------------------------------------------------------------------------
# addressing


@triton.jit
def _rows(ptr, t0, T, H, D, hd, c0, BC: tl.constexpr, BD: tl.constexpr):
    """Pointers and mask: tokens t0 .. t0+BC, columns c0 .. c0+BD of a [B, T, H, D] tensor, for
    the (batch, head) pair hd = b*H + h."""
    rows = t0 + tl.arange(0, BC)
    cols = c0 + tl.arange(0, BD)
    base = ((hd // H).to(tl.int64) * T + rows[:, None].to(tl.int64)) * H + (hd % H)
    return ptr + base * D + cols[None, :], (rows[:, None] < T) & (cols[None, :] < D)


@triton.jit
def _scalars(ptr, t0, T, H, hd, BC: tl.constexpr):
    """Per-token scalars t0 .. t0+BC of a [B, T, H] tensor; 0 past T (the identity step)."""
    rows = t0 + tl.arange(0, BC)
    offs = ((hd // H).to(tl.int64) * T + rows.to(tl.int64)) * H + (hd % H)
    return tl.load(ptr + offs, mask=rows < T, other=0.0)


@triton.jit
def _ws(ptr, hd, n, NT, D, c0, BC: tl.constexpr, BD: tl.constexpr):
    """Pointers and mask: chunk n, columns c0 .. c0+BD of a per-head workspace [B*H, NT, D]."""
    rows = n * BC + tl.arange(0, BC)
    cols = c0 + tl.arange(0, BD)
    offs = (hd.to(tl.int64) * NT + rows[:, None].to(tl.int64)) * D + cols[None, :]
    return ptr + offs, (rows[:, None] < NT) & (cols[None, :] < D)


@triton.jit
def _st(ptr, hd, n, N, K, V, v0, BK: tl.constexpr, BV: tl.constexpr):
    """Pointers and mask: columns v0 .. v0+BV of state n of a [B*H, N, K, V] stack."""
    rk = tl.arange(0, BK)
    rv = v0 + tl.arange(0, BV)
    base = (hd.to(tl.int64) * N + n) * K * V
    return ptr + base + rk[:, None] * V + rv[None, :], (rk[:, None] < K) & (rv[None, :] < V)


@triton.jit
def _load(pm, ACC: tl.constexpr):
    return tl.load(pm[0], mask=pm[1], other=0.0).to(ACC)


@triton.jit
def _store(pm, x):
    tl.store(pm[0], x.to(pm[0].dtype.element_ty), mask=pm[1])


@triton.jit
def _decay(la_ptr, t0, T, H, hd, BC: tl.constexpr, ACC: tl.constexpr):
    """log a, G (its inclusive cumsum in the chunk), Gp = G - log a, and G at the chunk end."""
    la = _scalars(la_ptr, t0, T, H, hd, BC).to(ACC)
    G = tl.cumsum(la, 0)
    return la, G, G - la, tl.sum(la, 0)


# ---------------------------------------------------------------------------------------------
# forward


if ERASE:  # the UT transform: only a level with an erase has something to solve
    @triton.jit
    def delta_prep(k_ptr, w_ptr, la_ptr, b_ptr, u_ptr, wk_ptr, tm_ptr, T, H, K, V, NT,
                   BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
                   PREC: tl.constexpr):
        """Grid (N, B*H); ERASE only. Tm = (I + A)^-1 by forward substitution, U = Tm w, W = Tm (d k)."""
        n = tl.program_id(0)
        hd = tl.program_id(1)
        t0 = n * BC
        r = tl.arange(0, BC)
        k = _load(_rows(k_ptr, t0, T, H, K, hd, 0, BC, BK), ACC)
        w = _load(_rows(w_ptr, t0, T, H, V, hd, 0, BC, BV), ACC)
        b = _scalars(b_ptr, t0, T, H, hd, BC).to(ACC)
        strict = r[:, None] > r[None, :]
        if DECAY:
            la, G, Gp, g_end = _decay(la_ptr, t0, T, H, hd, BC, ACC)
            E = tl.exp(tl.where(strict, Gp[:, None] - G[None, :], float("-inf")))
            d = b * tl.exp(Gp)
        else:
            E = tl.where(strict, 1.0, 0.0).to(ACC)
            d = b
        A = b[:, None] * E * tl.dot(k, tl.trans(k), input_precision=PREC)
        eye = tl.where(r[:, None] == r[None, :], 1.0, 0.0).to(ACC)
        Tm = eye
        for i in range(1, BC):  # row i of Tm = e_i - sum_{j<i} A[i, j] (row j of Tm)
            a_i = tl.sum(tl.where(r[:, None] == i, A, 0.0), 0)
            row = -tl.sum(a_i[:, None] * Tm, 0)
            Tm = tl.where(r[:, None] == i, row[None, :] + eye, Tm)
        _store(_ws(u_ptr, hd, n, NT, V, 0, BC, BV), tl.dot(Tm, w, input_precision=PREC))
        _store(_ws(wk_ptr, hd, n, NT, K, 0, BC, BK), tl.dot(Tm, d[:, None] * k, input_precision=PREC))
        _store(_ws(tm_ptr, hd, n, NT, BC, 0, BC, BC), Tm)


@triton.jit
def delta_state_fwd(k_ptr, w_ptr, la_ptr, u_ptr, wk_ptr, z_ptr, h0_ptr, hs_ptr, hT_ptr,
                    T, H, K, V, N, NT, HAS_H0: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Grid (B*H, V / BV): the sequential pass over chunks. Saves h_n and Z for each chunk."""
    hd = tl.program_id(0)
    v0 = tl.program_id(1) * BV
    if HAS_H0:
        h = _load(_st(h0_ptr, hd, 0, 1, K, V, v0, BK, BV), ACC)
    else:
        h = tl.zeros([BK, BV], dtype=ACC)
    for n in range(N):
        t0 = n * BC
        _store(_st(hs_ptr, hd, n, N, K, V, v0, BK, BV), h)
        k = _load(_rows(k_ptr, t0, T, H, K, hd, 0, BC, BK), ACC)
        if ERASE:
            Wk = _load(_ws(wk_ptr, hd, n, NT, K, 0, BC, BK), ACC)
            Z = _load(_ws(u_ptr, hd, n, NT, V, v0, BC, BV), ACC) - tl.dot(Wk, h, input_precision=PREC)
        else:
            Z = _load(_rows(w_ptr, t0, T, H, V, hd, v0, BC, BV), ACC)
        _store(_ws(z_ptr, hd, n, NT, V, v0, BC, BV), Z)
        if DECAY:
            la, G, Gp, g_end = _decay(la_ptr, t0, T, H, hd, BC, ACC)
            kd = k * tl.exp(g_end - G)[:, None]
            h = tl.exp(g_end) * h + tl.dot(tl.trans(kd), Z, input_precision=PREC)
        else:
            h = h + tl.dot(tl.trans(k), Z, input_precision=PREC)
    _store(_st(hT_ptr, hd, 0, 1, K, V, v0, BK, BV), h)


@triton.jit
def delta_out(q_ptr, k_ptr, la_ptr, z_ptr, hs_ptr, o_ptr, T, H, K, V, N, NT,
              BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
              PREC: tl.constexpr):
    """Grid (N, B*H, V / BV): o = (q k^T * Gamma) Z + (q exp(G)) h_n."""
    n = tl.program_id(0)
    hd = tl.program_id(1)
    v0 = tl.program_id(2) * BV
    t0 = n * BC
    r = tl.arange(0, BC)
    q = _load(_rows(q_ptr, t0, T, H, K, hd, 0, BC, BK), ACC)
    k = _load(_rows(k_ptr, t0, T, H, K, hd, 0, BC, BK), ACC)
    incl = r[:, None] >= r[None, :]
    if DECAY:
        la, G, Gp, g_end = _decay(la_ptr, t0, T, H, hd, BC, ACC)
        Gamma = tl.exp(tl.where(incl, G[:, None] - G[None, :], float("-inf")))
        q_state = q * tl.exp(G)[:, None]
    else:
        Gamma = tl.where(incl, 1.0, 0.0).to(ACC)
        q_state = q
    P = tl.dot(q, tl.trans(k), input_precision=PREC) * Gamma
    Z = _load(_ws(z_ptr, hd, n, NT, V, v0, BC, BV), ACC)
    h = _load(_st(hs_ptr, hd, n, N, K, V, v0, BK, BV), ACC)
    o = tl.dot(P, Z, input_precision=PREC) + tl.dot(q_state, h, input_precision=PREC)
    _store(_rows(o_ptr, t0, T, H, V, hd, v0, BC, BV), o)


# ---------------------------------------------------------------------------------------------
# backward


@triton.jit
def delta_state_bwd(q_ptr, k_ptr, la_ptr, wk_ptr, do_ptr, dhT_ptr, dhs_ptr, dh0_ptr,
                    T, H, K, V, N, NT, HAS_DHT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Grid (B*H, V / BV): the reverse pass. dhs[n] is the gradient of chunk n's end state;
    dh_n = exp(G_end) dh + (q exp(G))^T do - W^T dZ with dZ = P^T do + kd dh."""
    hd = tl.program_id(0)
    v0 = tl.program_id(1) * BV
    r = tl.arange(0, BC)
    if HAS_DHT:
        dh = _load(_st(dhT_ptr, hd, 0, 1, K, V, v0, BK, BV), ACC)
    else:
        dh = tl.zeros([BK, BV], dtype=ACC)
    incl = r[:, None] >= r[None, :]
    for m in range(N):
        n = N - 1 - m
        t0 = n * BC
        _store(_st(dhs_ptr, hd, n, N, K, V, v0, BK, BV), dh)
        q = _load(_rows(q_ptr, t0, T, H, K, hd, 0, BC, BK), ACC)
        k = _load(_rows(k_ptr, t0, T, H, K, hd, 0, BC, BK), ACC)
        do = _load(_rows(do_ptr, t0, T, H, V, hd, v0, BC, BV), ACC)
        if DECAY:
            la, G, Gp, g_end = _decay(la_ptr, t0, T, H, hd, BC, ACC)
            Gamma = tl.exp(tl.where(incl, G[:, None] - G[None, :], float("-inf")))
            qd = q * tl.exp(G)[:, None]
            kd = k * tl.exp(g_end - G)[:, None]
            carry = tl.exp(g_end) * dh
        else:
            Gamma = tl.where(incl, 1.0, 0.0).to(ACC)
            qd = q
            kd = k
            carry = dh
        P = tl.dot(q, tl.trans(k), input_precision=PREC) * Gamma
        dZ = tl.dot(tl.trans(P), do, input_precision=PREC) + tl.dot(kd, dh, input_precision=PREC)
        dh = carry + tl.dot(tl.trans(qd), do, input_precision=PREC)
        if ERASE:
            Wk = _load(_ws(wk_ptr, hd, n, NT, K, 0, BC, BK), ACC)
            dh = dh - tl.dot(tl.trans(Wk), dZ, input_precision=PREC)
    _store(_st(dh0_ptr, hd, 0, 1, K, V, v0, BK, BV), dh)


@triton.jit
def delta_chunk_bwd(q_ptr, k_ptr, la_ptr, b_ptr, u_ptr, wk_ptr, tm_ptr, z_ptr, hs_ptr, dhs_ptr,
                    do_ptr, dq_ptr, dk_ptr, dw_ptr, dla_ptr, db_ptr, T, H, K, V, N, NT,
                    BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
                    PREC: tl.constexpr):
    """Grid (N, B*H): one chunk's gradients from its start state h_n and end-state gradient dh,
    the forward's adjoint line by line (backends/triton/README.md). The value columns are taken
    BV at a time; what sums over them (dP, dqd, dkd, dW, dA, <h, dh>) accumulates."""
    n = tl.program_id(0)
    hd = tl.program_id(1)
    t0 = n * BC
    r = tl.arange(0, BC)
    q = _load(_rows(q_ptr, t0, T, H, K, hd, 0, BC, BK), ACC)
    k = _load(_rows(k_ptr, t0, T, H, K, hd, 0, BC, BK), ACC)
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
    kd = k * kdecay[:, None]
    QK = tl.dot(q, tl.trans(k), input_precision=PREC)
    P = QK * Gamma
    # o = P Z + qd h;  h_end = exp(g_end) h + kd^T Z;  Z = U - W h;  [U | W] = Tm [w | d k]
    dP = tl.zeros([BC, BC], dtype=ACC)
    dqd = tl.zeros([BC, BK], dtype=ACC)
    dkd = tl.zeros([BC, BK], dtype=ACC)
    hdh = tl.zeros([BK], dtype=ACC)
    if ERASE:
        Tm = _load(_ws(tm_ptr, hd, n, NT, BC, 0, BC, BC), ACC)
        dW = tl.zeros([BC, BK], dtype=ACC)
        dA = tl.zeros([BC, BC], dtype=ACC)
    for v0 in range(0, V, BV):
        do = _load(_rows(do_ptr, t0, T, H, V, hd, v0, BC, BV), ACC)
        Z = _load(_ws(z_ptr, hd, n, NT, V, v0, BC, BV), ACC)
        h = _load(_st(hs_ptr, hd, n, N, K, V, v0, BK, BV), ACC)
        dh = _load(_st(dhs_ptr, hd, n, N, K, V, v0, BK, BV), ACC)
        dZ = tl.dot(tl.trans(P), do, input_precision=PREC) + tl.dot(kd, dh, input_precision=PREC)
        dP += tl.dot(do, tl.trans(Z), input_precision=PREC)
        dqd += tl.dot(do, tl.trans(h), input_precision=PREC)
        dkd += tl.dot(Z, tl.trans(dh), input_precision=PREC)
        hdh += tl.sum(h * dh, 1)
        if ERASE:
            dW -= tl.dot(dZ, tl.trans(h), input_precision=PREC)
            dw = tl.dot(tl.trans(Tm), dZ, input_precision=PREC)          # dR for the w columns
            U = _load(_ws(u_ptr, hd, n, NT, V, v0, BC, BV), ACC)
            dA -= tl.dot(dw, tl.trans(U), input_precision=PREC)
        else:
            dw = dZ
        _store(_rows(dw_ptr, t0, T, H, V, hd, v0, BC, BV), dw)
    dP = dP * Gamma                                                      # d(q k^T)
    dq = tl.dot(dP, k, input_precision=PREC) + dqd * eG[:, None]
    dk = tl.dot(tl.trans(dP), q, input_precision=PREC) + dkd * kdecay[:, None]
    if DECAY:
        X = dP * QK                                                      # dGamma * Gamma
        dG = tl.sum(X, 1) - tl.sum(X, 0) + tl.sum(dqd * q * eG[:, None], 1)
        s = tl.sum(dkd * kd, 1)
        dG = dG - s
        dg_end = tl.sum(s, 0) + tl.sum(hdh, 0) * tl.exp(g_end)
        dGp = tl.zeros([BC], dtype=ACC)
    if ERASE:
        b = _scalars(b_ptr, t0, T, H, hd, BC).to(ACC)
        Wk = _load(_ws(wk_ptr, hd, n, NT, K, 0, BC, BK), ACC)
        dRk = tl.dot(tl.trans(Tm), dW, input_precision=PREC)             # dR for the d k columns
        dA -= tl.dot(dRk, tl.trans(Wk), input_precision=PREC)
        dA = tl.where(strict, dA, 0.0)
        if DECAY:
            E = tl.exp(tl.where(strict, Gp[:, None] - G[None, :], float("-inf")))
            ed = tl.exp(Gp)
        else:
            E = tl.where(strict, 1.0, 0.0).to(ACC)
            ed = tl.full([BC], 1.0, ACC)
        S = tl.dot(k, tl.trans(k), input_precision=PREC)
        dS = dA * b[:, None] * E
        dk += tl.dot(dS + tl.trans(dS), k, input_precision=PREC) + (b * ed)[:, None] * dRk
        dd = tl.sum(dRk * k, 1)
        db = tl.sum(dA * E * S, 1) + dd * ed
        _store((db_ptr + ((hd // H).to(tl.int64) * T + (t0 + r).to(tl.int64)) * H + (hd % H), t0 + r < T), db)
        if DECAY:
            X2 = dS * S                                                  # dA * A
            dGp = tl.sum(X2, 1) + dd * b * ed
            dG = dG - tl.sum(X2, 0)
    _store(_rows(dq_ptr, t0, T, H, K, hd, 0, BC, BK), dq)
    _store(_rows(dk_ptr, t0, T, H, K, hd, 0, BC, BK), dk)
    if DECAY:
        dG = dG + tl.where(r == BC - 1, dg_end, 0.0)
        # G = cumsum(la), Gp = G - la: dla_i = sum_{r >= i} (dG + dGp)_r - dGp_i
        tot = dG + dGp
        dla = tl.sum(tot, 0) - tl.cumsum(tot, 0) + tot - dGp
        _store((dla_ptr + ((hd // H).to(tl.int64) * T + (t0 + r).to(tl.int64)) * H + (hd % H), t0 + r < T), dla)
