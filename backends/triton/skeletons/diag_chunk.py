# Skeleton 1b: a per-channel (diagonal) retention without an erase, chunked, forward and backward
# (GLA; RetNet and linear attention are its scalar cases, served by delta_chunk).
#
#     h_t = diag(a_t) h_{t-1} + k_t w_t^T        o_t = h_t^T q_t        (a_t per key channel)
#
# Per chunk of BC tokens with start state h_n, G = cumsum(log a) per channel (G <= 0, decreasing):
#     A[r, i] = sum_c q_rc k_ic exp(G_rc - G_ic), i <= r      (a [BC, BC, BK] product: the decay
#               differs per channel, so it is not one matmul; every exponent is <= 0, so it is stable)
#     o = A w + (q exp(G)) h_n          h_{n+1} = diag(exp(G_end)) h_n + (k exp(G_end - G))^T w
# The chunk is 16 tokens (the 3-D product's size), the key channels are taken BKS at a time.
# Backward: a reverse pass carries dh (the gradient of each chunk-end state); each chunk's
# gradients then follow in parallel from its saved start state and dh (backends/triton/README.md).
# Conventions as delta_chunk.py: ACC accumulation, PREC for tl.dot, int64 offsets, masked loads.
import triton
import triton.language as tl


# {include rows}


@triton.jit
def _decays(la_ptr, t0, T, H, K, hd, k0, BC: tl.constexpr, BKS: tl.constexpr, ACC: tl.constexpr):
    """G (the per-channel cumsum of log a in the chunk, [BC, BKS]) and G at the chunk end [BKS]."""
    la = _load(_rows(la_ptr, t0, T, H, K, hd, k0, BC, BKS), ACC)
    return tl.cumsum(la, 0), tl.sum(la, 0)


@triton.jit
def _intra(q, k, G, BC: tl.constexpr):
    """E[r, i, c] = exp(G_rc - G_ic) for i <= r (else 0) and A = sum_c q_rc k_ic E[r, i, c]."""
    r = tl.arange(0, BC)
    incl = (r[:, None] >= r[None, :])[:, :, None]
    E = tl.exp(tl.where(incl, G[:, None, :] - G[None, :, :], float("-inf")))
    return E, tl.sum(q[:, None, :] * k[None, :, :] * E, 2)


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def diag_state_fwd(k_ptr, w_ptr, la_ptr, h0_ptr, hs_ptr, hT_ptr, T, H, K, V, N, HAS_H0: tl.constexpr,
                   BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
                   PREC: tl.constexpr):
    """Grid (B*H, K / BK, V / BV): the sequential pass over chunks; saves each chunk-start state."""
    hd = tl.program_id(0)
    k0 = tl.program_id(1) * BK
    v0 = tl.program_id(2) * BV
    if HAS_H0:
        h = _load(_st(h0_ptr, hd, 0, 1, K, V, v0, BK, BV, k0), ACC)
    else:
        h = tl.zeros([BK, BV], dtype=ACC)
    for n in range(N):
        t0 = n * BC
        _store(_st(hs_ptr, hd, n, N, K, V, v0, BK, BV, k0), h)
        G, g_end = _decays(la_ptr, t0, T, H, K, hd, k0, BC, BK, ACC)
        kd = _load(_rows(k_ptr, t0, T, H, K, hd, k0, BC, BK), ACC) * tl.exp(g_end[None, :] - G)
        w = _load(_rows(w_ptr, t0, T, H, V, hd, v0, BC, BV), ACC)
        h = tl.exp(g_end)[:, None] * h + tl.dot(tl.trans(kd), w, input_precision=PREC)
    _store(_st(hT_ptr, hd, 0, 1, K, V, v0, BK, BV, k0), h)


@triton.jit
def diag_out(q_ptr, k_ptr, w_ptr, la_ptr, hs_ptr, o_ptr, T, H, K, V, N,
             BC: tl.constexpr, BKS: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Grid (N, B*H, V / BV): o = A w + (q exp(G)) h_n, the key channels BKS at a time."""
    n = tl.program_id(0)
    hd = tl.program_id(1)
    v0 = tl.program_id(2) * BV
    t0 = n * BC
    A = tl.zeros([BC, BC], dtype=ACC)
    o = tl.zeros([BC, BV], dtype=ACC)
    for k0 in range(0, K, BKS):
        q = _load(_rows(q_ptr, t0, T, H, K, hd, k0, BC, BKS), ACC)
        k = _load(_rows(k_ptr, t0, T, H, K, hd, k0, BC, BKS), ACC)
        G, g_end = _decays(la_ptr, t0, T, H, K, hd, k0, BC, BKS, ACC)
        E, Ak = _intra(q, k, G, BC)
        A += Ak
        h = _load(_st(hs_ptr, hd, n, N, K, V, v0, BKS, BV, k0), ACC)
        o += tl.dot(q * tl.exp(G), h, input_precision=PREC)
    w = _load(_rows(w_ptr, t0, T, H, V, hd, v0, BC, BV), ACC)
    _store(_rows(o_ptr, t0, T, H, V, hd, v0, BC, BV), o + tl.dot(A, w, input_precision=PREC))


# ---------------------------------------------------------------------------------------------
# backward


@triton.jit
def diag_state_bwd(q_ptr, la_ptr, do_ptr, dhT_ptr, dhs_ptr, dh0_ptr, T, H, K, V, N, HAS_DHT: tl.constexpr,
                   BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
                   PREC: tl.constexpr):
    """Grid (B*H, K / BK, V / BV): the reverse pass. dhs[n] is the gradient of chunk n's end
    state; dh_n = diag(exp(G_end)) dh + (q exp(G))^T do."""
    hd = tl.program_id(0)
    k0 = tl.program_id(1) * BK
    v0 = tl.program_id(2) * BV
    if HAS_DHT:
        dh = _load(_st(dhT_ptr, hd, 0, 1, K, V, v0, BK, BV, k0), ACC)
    else:
        dh = tl.zeros([BK, BV], dtype=ACC)
    for m in range(N):
        n = N - 1 - m
        t0 = n * BC
        _store(_st(dhs_ptr, hd, n, N, K, V, v0, BK, BV, k0), dh)
        G, g_end = _decays(la_ptr, t0, T, H, K, hd, k0, BC, BK, ACC)
        qd = _load(_rows(q_ptr, t0, T, H, K, hd, k0, BC, BK), ACC) * tl.exp(G)
        do = _load(_rows(do_ptr, t0, T, H, V, hd, v0, BC, BV), ACC)
        dh = tl.exp(g_end)[:, None] * dh + tl.dot(tl.trans(qd), do, input_precision=PREC)
    _store(_st(dh0_ptr, hd, 0, 1, K, V, v0, BK, BV, k0), dh)


@triton.jit
def diag_dw(q_ptr, k_ptr, la_ptr, dhs_ptr, do_ptr, dw_ptr, dA_ptr, w_ptr, T, H, K, V, N,
            BC: tl.constexpr, BKS: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Grid (N, B*H): dw = A^T do + kd dh, and dA = (do w^T) masked (saved for diag_dqk)."""
    n = tl.program_id(0)
    hd = tl.program_id(1)
    t0 = n * BC
    r = tl.arange(0, BC)
    A = tl.zeros([BC, BC], dtype=ACC)
    for k0 in range(0, K, BKS):
        q = _load(_rows(q_ptr, t0, T, H, K, hd, k0, BC, BKS), ACC)
        k = _load(_rows(k_ptr, t0, T, H, K, hd, k0, BC, BKS), ACC)
        G, g_end = _decays(la_ptr, t0, T, H, K, hd, k0, BC, BKS, ACC)
        E, Ak = _intra(q, k, G, BC)
        A += Ak
    dA = tl.zeros([BC, BC], dtype=ACC)
    for v0 in range(0, V, BV):
        do = _load(_rows(do_ptr, t0, T, H, V, hd, v0, BC, BV), ACC)
        w = _load(_rows(w_ptr, t0, T, H, V, hd, v0, BC, BV), ACC)
        dw = tl.dot(tl.trans(A), do, input_precision=PREC)
        for k0 in range(0, K, BKS):
            k = _load(_rows(k_ptr, t0, T, H, K, hd, k0, BC, BKS), ACC)
            G, g_end = _decays(la_ptr, t0, T, H, K, hd, k0, BC, BKS, ACC)
            dh = _load(_st(dhs_ptr, hd, n, N, K, V, v0, BKS, BV, k0), ACC)
            dw += tl.dot(k * tl.exp(g_end[None, :] - G), dh, input_precision=PREC)
        _store(_rows(dw_ptr, t0, T, H, V, hd, v0, BC, BV), dw)
        dA += tl.dot(do, tl.trans(w), input_precision=PREC)
    dA = tl.where(r[:, None] >= r[None, :], dA, 0.0)
    offs = (hd.to(tl.int64) * N + n) * BC * BC + r[:, None] * BC + r[None, :]
    tl.store(dA_ptr + offs, dA)


@triton.jit
def diag_dqk(q_ptr, k_ptr, w_ptr, la_ptr, hs_ptr, dhs_ptr, do_ptr, dA_ptr, dq_ptr, dk_ptr, dla_ptr,
             T, H, K, V, N, BC: tl.constexpr, BKS: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
             PREC: tl.constexpr):
    """Grid (N, B*H, K / BKS): dq, dk and d log a of one chunk and one block of key channels."""
    n = tl.program_id(0)
    hd = tl.program_id(1)
    k0 = tl.program_id(2) * BKS
    t0 = n * BC
    r = tl.arange(0, BC)
    q = _load(_rows(q_ptr, t0, T, H, K, hd, k0, BC, BKS), ACC)
    k = _load(_rows(k_ptr, t0, T, H, K, hd, k0, BC, BKS), ACC)
    G, g_end = _decays(la_ptr, t0, T, H, K, hd, k0, BC, BKS, ACC)
    eG = tl.exp(G)
    kdec = tl.exp(g_end[None, :] - G)
    dA = tl.load(dA_ptr + (hd.to(tl.int64) * N + n) * BC * BC + r[:, None] * BC + r[None, :]).to(ACC)
    # o = A w + (q eG) h;  h_end = diag(exp(g_end)) h + (k kdec)^T w
    dqd = tl.zeros([BC, BKS], dtype=ACC)
    dkd = tl.zeros([BC, BKS], dtype=ACC)
    deE = tl.zeros([BKS], dtype=ACC)
    for v0 in range(0, V, BV):
        do = _load(_rows(do_ptr, t0, T, H, V, hd, v0, BC, BV), ACC)
        w = _load(_rows(w_ptr, t0, T, H, V, hd, v0, BC, BV), ACC)
        h = _load(_st(hs_ptr, hd, n, N, K, V, v0, BKS, BV, k0), ACC)
        dh = _load(_st(dhs_ptr, hd, n, N, K, V, v0, BKS, BV, k0), ACC)
        dqd += tl.dot(do, tl.trans(h), input_precision=PREC)
        dkd += tl.dot(w, tl.trans(dh), input_precision=PREC)
        deE += tl.sum(h * dh, 1)
    E, Ak = _intra(q, k, G, BC)
    X = dA[:, :, None] * E                                       # d A[r, i] through channel c
    dq = tl.sum(X * k[None, :, :], 1) + dqd * eG
    dk = tl.sum(X * q[:, None, :], 0) + dkd * kdec
    Y = X * q[:, None, :] * k[None, :, :]                        # dE * E
    s = dkd * k * kdec
    dG = tl.sum(Y, 1) - tl.sum(Y, 0) + dqd * q * eG - s
    dg_end = tl.sum(s, 0) + deE * tl.exp(g_end)
    dG = dG + tl.where(r[:, None] == BC - 1, dg_end[None, :], 0.0)
    # G = cumsum(la) along the tokens: dla_i = sum_{r >= i} dG_r
    dla = tl.sum(dG, 0)[None, :] - tl.cumsum(dG, 0) + dG
    _store(_rows(dq_ptr, t0, T, H, K, hd, k0, BC, BKS), dq)
    _store(_rows(dk_ptr, t0, T, H, K, hd, k0, BC, BKS), dk)
    _store(_rows(dla_ptr, t0, T, H, K, hd, k0, BC, BKS), dla)
