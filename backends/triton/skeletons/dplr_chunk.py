# Skeleton 1d: the diagonal-plus-low-rank (DPLR) delta rule, chunked, forward and backward
# (RWKV-7's form: a per-channel retention and a general rank-one erase).
#
#     h_t = diag(a_t) h_{t-1} - u_t (e_t^T h_{t-1}) + k_t w_t^T        o_t = h_t^T q_t
#
# Per chunk of BC = 16 tokens with start state h_n, G = cumsum(log a) and Gp = G - log a (G_{r-1})
# per channel, gE = G at the chunk end (maths: backends/torch/README.md, the DPLR form):
#     Pk, Pu [r, i] = sum_c q_rc (k|u)_ic exp(G_rc - G_ic), i <= r
#     Aek, Aeu [r, i] = sum_c e_rc (k|u)_ic exp(Gp_rc - G_ic), i < r
#     (the decay differs per channel: [BC, BC, 16] products, every exponent <= 0, as skeleton 1b)
#     Tinv = (I + Aeu)^-1,  Uz = Tinv (Aek w),  Wz = Tinv (e exp(Gp))      (the UT transform)
#     qs = q exp(G) - Pu Wz,  ut = u exp(gE - G),  kt = k exp(gE - G)
#     o = Pk w - Pu Uz + qs h_n
#     h_{n+1} = Mn h_n + write,  Mn = diag(exp(gE)) - ut^T Wz [K, K],  write = kt^T w - ut^T Uz
# Unlike skeleton 1's, the erase mixes key rows, so the state transition is a dense [K, K] matrix:
# dplr_prep builds it per chunk (in parallel), the sequential pass only multiplies.
# Backward: a reverse pass carries dh (dh_n = Mn^T dh_{n+1} + qs^T do); then each chunk's VJP by
# hand from its saved start state, dh_{n+1} and the prep's products (dplr_chunk_bwd).
# Conventions as delta_chunk.py: ACC accumulation, PREC for tl.dot, int64 offsets, masked loads;
# workspaces (ACC) per head: rows [B*H, N*BC, D], matrices [B*H, N, 4, BC, BC] (Pk, Pu, Aek,
# Tinv), states [B*H, N, K, V] and transitions [B*H, N, K, K]. K <= 128 (the transition's tile).
import triton
import triton.language as tl


# ---------------------------------------------------------------------------------------------
# addressing


# {include rows}


# {include workspace}


@triton.jit
def _mat(ptr, hd, n, N, i, BC: tl.constexpr):
    """Pointers and mask: matrix i of chunk n of a [B*H, N, 4, BC, BC] workspace."""
    return _st(ptr, hd, n * 4 + i, N * 4, BC, BC, 0, BC, BC)


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _decays(la_ptr, t0, T, H, K, hd, k0, BC: tl.constexpr, BKS: tl.constexpr, ACC: tl.constexpr):
    """G (the per-channel cumsum of log a in the chunk), Gp = G - log a and G at the chunk end,
    for channels k0 .. k0+BKS (padded tokens and channels: log a = 0)."""
    la = _load(_rows(la_ptr, t0, T, H, K, hd, k0, BC, BKS), ACC)
    G = tl.cumsum(la, 0)
    return G, G - la, tl.sum(la, 0)


@triton.jit
def _gammas(G, Gp, BC: tl.constexpr):
    """E[r, i, c] = exp(G_rc - G_ic), i <= r, and Es[r, i, c] = exp(Gp_rc - G_ic), i < r (else 0)."""
    r = tl.arange(0, BC)
    incl = (r[:, None] >= r[None, :])[:, :, None]
    strict = (r[:, None] > r[None, :])[:, :, None]
    E = tl.exp(tl.where(incl, G[:, None, :] - G[None, :, :], float("-inf")))
    Es = tl.exp(tl.where(strict, Gp[:, None, :] - G[None, :, :], float("-inf")))
    return E, Es


@triton.jit
def _pair(x, y, E):
    """sum_c x_rc y_ic E[r, i, c]: [BC, BC]."""
    return tl.sum(x[:, None, :] * y[None, :, :] * E, 2)


# {include blocked_inverse}


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def dplr_prep(q_ptr, k_ptr, u_ptr, e_ptr, w_ptr, la_ptr, mat_ptr, uz_ptr, wz_ptr, qs_ptr, mn_ptr, wr_ptr,
              T, H, K, V, N, NT, BC: tl.constexpr, BKS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              ACC: tl.constexpr, PREC: tl.constexpr):
    """Grid (N, B*H): one chunk's Pk, Pu, Aek, Tinv (saved), Uz, Wz, qs, its transition Mn and write."""
    n = tl.program_id(0)
    hd = tl.program_id(1)
    t0 = n * BC
    Pk = tl.zeros([BC, BC], dtype=ACC)
    Pu = tl.zeros([BC, BC], dtype=ACC)
    Aek = tl.zeros([BC, BC], dtype=ACC)
    Aeu = tl.zeros([BC, BC], dtype=ACC)
    for k0 in range(0, K, BKS):  # the per-channel products, BKS channels at a time
        q = _load(_rows(q_ptr, t0, T, H, K, hd, k0, BC, BKS), ACC)
        k = _load(_rows(k_ptr, t0, T, H, K, hd, k0, BC, BKS), ACC)
        u = _load(_rows(u_ptr, t0, T, H, K, hd, k0, BC, BKS), ACC)
        e = _load(_rows(e_ptr, t0, T, H, K, hd, k0, BC, BKS), ACC)
        G, Gp, gE = _decays(la_ptr, t0, T, H, K, hd, k0, BC, BKS, ACC)
        E, Es = _gammas(G, Gp, BC)
        Pk += _pair(q, k, E)
        Pu += _pair(q, u, E)
        Aek += _pair(e, k, Es)
        Aeu += _pair(e, u, Es)
    Tinv = _unit_lower_inv(Aeu, BC, ACC, PREC)
    _store(_mat(mat_ptr, hd, n, N, 0, BC), Pk)
    _store(_mat(mat_ptr, hd, n, N, 1, BC), Pu)
    _store(_mat(mat_ptr, hd, n, N, 2, BC), Aek)
    _store(_mat(mat_ptr, hd, n, N, 3, BC), Tinv)
    G, Gp, gE = _decays(la_ptr, t0, T, H, K, hd, 0, BC, BK, ACC)       # all channels: [BC, BK]
    Wz = _dot(Tinv, _load(_rows(e_ptr, t0, T, H, K, hd, 0, BC, BK), ACC) * tl.exp(Gp), PREC)
    _store(_ws(wz_ptr, hd, n, NT, K, 0, BC, BK), Wz)
    qs = _load(_rows(q_ptr, t0, T, H, K, hd, 0, BC, BK), ACC) * tl.exp(G) - _dot(Pu, Wz, PREC)
    _store(_ws(qs_ptr, hd, n, NT, K, 0, BC, BK), qs)
    dec = tl.exp(gE[None, :] - G)
    ut = _load(_rows(u_ptr, t0, T, H, K, hd, 0, BC, BK), ACC) * dec
    kt = _load(_rows(k_ptr, t0, T, H, K, hd, 0, BC, BK), ACC) * dec
    rk = tl.arange(0, BK)
    Mn = tl.where(rk[:, None] == rk[None, :], tl.exp(gE)[:, None], 0.0) - _dot(tl.trans(ut), Wz, PREC)
    _store(_st(mn_ptr, hd, n, N, K, K, 0, BK, BK), Mn)
    for v0 in range(0, V, BV):
        w = _load(_rows(w_ptr, t0, T, H, V, hd, v0, BC, BV), ACC)
        Uz = _dot(Tinv, _dot(Aek, w, PREC), PREC)
        _store(_ws(uz_ptr, hd, n, NT, V, v0, BC, BV), Uz)
        _store(_st(wr_ptr, hd, n, N, K, V, v0, BK, BV), _dot(tl.trans(kt), w, PREC) - _dot(tl.trans(ut), Uz, PREC))


@triton.jit
def dplr_state_fwd(mn_ptr, wr_ptr, h0_ptr, hs_ptr, hT_ptr, K, V, N, HAS_H0: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Grid (B*H, V / BV): h_{n+1} = Mn h_n + write_n over the chunks; saves each chunk-start state."""
    hd = tl.program_id(0)
    v0 = tl.program_id(1) * BV
    if HAS_H0:
        h = _load(_st(h0_ptr, hd, 0, 1, K, V, v0, BK, BV), ACC)
    else:
        h = tl.zeros([BK, BV], dtype=ACC)
    for n in range(N):
        _store(_st(hs_ptr, hd, n, N, K, V, v0, BK, BV), h)
        h = _dot(_load(_st(mn_ptr, hd, n, N, K, K, 0, BK, BK), ACC), h, PREC) \
            + _load(_st(wr_ptr, hd, n, N, K, V, v0, BK, BV), ACC)
    _store(_st(hT_ptr, hd, 0, 1, K, V, v0, BK, BV), h)


@triton.jit
def dplr_out(w_ptr, mat_ptr, uz_ptr, qs_ptr, hs_ptr, o_ptr, T, H, K, V, N, NT, BC: tl.constexpr,
             BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Grid (N, B*H, V / BV): o = Pk w - Pu Uz + qs h_n."""
    n = tl.program_id(0)
    hd = tl.program_id(1)
    v0 = tl.program_id(2) * BV
    t0 = n * BC
    o = _dot(_load(_mat(mat_ptr, hd, n, N, 0, BC), ACC), _load(_rows(w_ptr, t0, T, H, V, hd, v0, BC, BV), ACC), PREC)
    o -= _dot(_load(_mat(mat_ptr, hd, n, N, 1, BC), ACC), _load(_ws(uz_ptr, hd, n, NT, V, v0, BC, BV), ACC), PREC)
    o += _dot(_load(_ws(qs_ptr, hd, n, NT, K, 0, BC, BK), ACC), _load(_st(hs_ptr, hd, n, N, K, V, v0, BK, BV), ACC),
              PREC)
    _store(_rows(o_ptr, t0, T, H, V, hd, v0, BC, BV), o)


# ---------------------------------------------------------------------------------------------
# backward


@triton.jit
def dplr_state_bwd(mn_ptr, qs_ptr, do_ptr, dhT_ptr, dhs_ptr, dh0_ptr, T, H, K, V, N, NT, HAS_DHT: tl.constexpr,
                   BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Grid (B*H, V / BV): the reverse pass. dhs[n] is the gradient of chunk n's end state;
    dh_n = Mn^T dh + qs^T do."""
    hd = tl.program_id(0)
    v0 = tl.program_id(1) * BV
    if HAS_DHT:
        dh = _load(_st(dhT_ptr, hd, 0, 1, K, V, v0, BK, BV), ACC)
    else:
        dh = tl.zeros([BK, BV], dtype=ACC)
    for m in range(N):
        n = N - 1 - m
        _store(_st(dhs_ptr, hd, n, N, K, V, v0, BK, BV), dh)
        dh = _dot(tl.trans(_load(_st(mn_ptr, hd, n, N, K, K, 0, BK, BK), ACC)), dh, PREC) \
            + _dot(tl.trans(_load(_ws(qs_ptr, hd, n, NT, K, 0, BC, BK), ACC)),
                   _load(_rows(do_ptr, n * BC, T, H, V, hd, v0, BC, BV), ACC), PREC)
    _store(_st(dh0_ptr, hd, 0, 1, K, V, v0, BK, BV), dh)


@triton.jit
def dplr_chunk_bwd(q_ptr, k_ptr, u_ptr, e_ptr, w_ptr, la_ptr, do_ptr, mat_ptr, uz_ptr, wz_ptr, hs_ptr, dhs_ptr,
                   y_ptr, d_ptr, g_ptr, dq_ptr, dk_ptr, du_ptr, de_ptr, dw_ptr, dla_ptr, T, H, K, V, N, NT,
                   BC: tl.constexpr, BKS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   ACC: tl.constexpr, PREC: tl.constexpr):
    """Grid (N, B*H): one chunk's gradients from h_n, dh_{n+1} (dh1) and do. Workspaces: y, d
    [B*H, N*BC, V] (Y = Uz + Wz h_n, D = ut dh1) and g [B*H, 4, N*BC, K] (dqs, dkt, dut, dEt).
    1) over value blocks: dPk, dPu, dAek, dAeu (their w-side terms), dw, Y, D;
    2) over channel blocks: dqs, dkt, dut, dWz, dEt = Tinv^T dWz (saved) and the rest of dPu, dAeu;
    3) over channel blocks: through the per-channel products and decays to dq, dk, du, de, d log a."""
    n = tl.program_id(0)
    hd = tl.program_id(1)
    t0 = n * BC
    r = tl.arange(0, BC)
    Pk = _load(_mat(mat_ptr, hd, n, N, 0, BC), ACC)
    Pu = _load(_mat(mat_ptr, hd, n, N, 1, BC), ACC)
    Aek = _load(_mat(mat_ptr, hd, n, N, 2, BC), ACC)
    Tinv = _load(_mat(mat_ptr, hd, n, N, 3, BC), ACC)
    G, Gp, gE = _decays(la_ptr, t0, T, H, K, hd, 0, BC, BK, ACC)
    dec = tl.exp(gE[None, :] - G)
    ut = _load(_rows(u_ptr, t0, T, H, K, hd, 0, BC, BK), ACC) * dec
    kt = _load(_rows(k_ptr, t0, T, H, K, hd, 0, BC, BK), ACC) * dec
    Wz = _load(_ws(wz_ptr, hd, n, NT, K, 0, BC, BK), ACC)
    dPk = tl.zeros([BC, BC], dtype=ACC)
    dPu = tl.zeros([BC, BC], dtype=ACC)
    dAek = tl.zeros([BC, BC], dtype=ACC)
    dAeu = tl.zeros([BC, BC], dtype=ACC)
    for v0 in range(0, V, BV):  # 1) o = Pk w - Pu Uz + qs h;  write = kt^T w - ut^T Uz;  Uz = Tinv Aek w
        do = _load(_rows(do_ptr, t0, T, H, V, hd, v0, BC, BV), ACC)
        w = _load(_rows(w_ptr, t0, T, H, V, hd, v0, BC, BV), ACC)
        Uz = _load(_ws(uz_ptr, hd, n, NT, V, v0, BC, BV), ACC)
        dh1 = _load(_st(dhs_ptr, hd, n, N, K, V, v0, BK, BV), ACC)
        dPk += _dot(do, tl.trans(w), PREC)
        dPu -= _dot(do, tl.trans(Uz), PREC)
        dR1 = _dot(tl.trans(Tinv), -_dot(tl.trans(Pu), do, PREC) - _dot(ut, dh1, PREC), PREC)
        dAek += _dot(dR1, tl.trans(w), PREC)
        dAeu -= _dot(dR1, tl.trans(Uz), PREC)
        dw = _dot(tl.trans(Pk), do, PREC) + _dot(tl.trans(Aek), dR1, PREC) + _dot(kt, dh1, PREC)
        _store(_rows(dw_ptr, t0, T, H, V, hd, v0, BC, BV), dw)
        h = _load(_st(hs_ptr, hd, n, N, K, V, v0, BK, BV), ACC)
        _store(_ws(y_ptr, hd, n, NT, V, v0, BC, BV), Uz + _dot(Wz, h, PREC))
        _store(_ws(d_ptr, hd, n, NT, V, v0, BC, BV), _dot(ut, dh1, PREC))
    tl.debug_barrier()
    for k0 in range(0, K, BKS):  # 2) qs = qt - Pu Wz;  Mn = diag(exp gE) - ut^T Wz;  Wz = Tinv Et
        dqs = tl.zeros([BC, BKS], dtype=ACC)
        dkt = tl.zeros([BC, BKS], dtype=ACC)
        dut = tl.zeros([BC, BKS], dtype=ACC)
        dWz = tl.zeros([BC, BKS], dtype=ACC)
        for v0 in range(0, V, BV):
            hb = _load(_st(hs_ptr, hd, n, N, K, V, v0, BKS, BV, k0), ACC)
            dhb = _load(_st(dhs_ptr, hd, n, N, K, V, v0, BKS, BV, k0), ACC)
            dqs += _dot(_load(_rows(do_ptr, t0, T, H, V, hd, v0, BC, BV), ACC), tl.trans(hb), PREC)
            dkt += _dot(_load(_rows(w_ptr, t0, T, H, V, hd, v0, BC, BV), ACC), tl.trans(dhb), PREC)
            dut -= _dot(_load(_ws(y_ptr, hd, n, NT, V, v0, BC, BV), ACC), tl.trans(dhb), PREC)
            dWz -= _dot(_load(_ws(d_ptr, hd, n, NT, V, v0, BC, BV), ACC), tl.trans(hb), PREC)
        dWz -= _dot(tl.trans(Pu), dqs, PREC)
        dEt = _dot(tl.trans(Tinv), dWz, PREC)
        Wzb = _load(_ws(wz_ptr, hd, n, NT, K, k0, BC, BKS), ACC)
        dPu -= _dot(dqs, tl.trans(Wzb), PREC)
        dAeu -= _dot(dEt, tl.trans(Wzb), PREC)
        _store(_ws(g_ptr, hd, n, 4 * NT, K, k0, BC, BKS), dqs)
        _store(_ws(g_ptr, hd, N + n, 4 * NT, K, k0, BC, BKS), dkt)
        _store(_ws(g_ptr, hd, 2 * N + n, 4 * NT, K, k0, BC, BKS), dut)
        _store(_ws(g_ptr, hd, 3 * N + n, 4 * NT, K, k0, BC, BKS), dEt)
    tl.debug_barrier()
    for k0 in range(0, K, BKS):  # 3) the per-channel products and the decays
        q = _load(_rows(q_ptr, t0, T, H, K, hd, k0, BC, BKS), ACC)
        k = _load(_rows(k_ptr, t0, T, H, K, hd, k0, BC, BKS), ACC)
        u = _load(_rows(u_ptr, t0, T, H, K, hd, k0, BC, BKS), ACC)
        e = _load(_rows(e_ptr, t0, T, H, K, hd, k0, BC, BKS), ACC)
        Gb, Gpb, gEb = _decays(la_ptr, t0, T, H, K, hd, k0, BC, BKS, ACC)
        E, Es = _gammas(Gb, Gpb, BC)
        X = dPk[:, :, None] * E
        Xu = dPu[:, :, None] * E
        Z = dAeu[:, :, None] * Es
        Zk = dAek[:, :, None] * Es
        dq = tl.sum(X * k[None, :, :] + Xu * u[None, :, :], 1)
        dk = tl.sum(X * q[:, None, :], 0) + tl.sum(Zk * e[:, None, :], 0)
        du = tl.sum(Xu * q[:, None, :], 0) + tl.sum(Z * e[:, None, :], 0)
        de = tl.sum(Z * u[None, :, :] + Zk * k[None, :, :], 1)
        Yg = (X * k[None, :, :] + Xu * u[None, :, :]) * q[:, None, :]      # dE * E, through Pk and Pu
        Ys = (Z * u[None, :, :] + Zk * k[None, :, :]) * e[:, None, :]      # dEs * Es, through Aeu and Aek
        dG = tl.sum(Yg, 1) - tl.sum(Yg, 0) - tl.sum(Ys, 0)
        dGp = tl.sum(Ys, 1)
        dqs = _load(_ws(g_ptr, hd, n, 4 * NT, K, k0, BC, BKS), ACC)
        dkt = _load(_ws(g_ptr, hd, N + n, 4 * NT, K, k0, BC, BKS), ACC)
        dut = _load(_ws(g_ptr, hd, 2 * N + n, 4 * NT, K, k0, BC, BKS), ACC)
        dEt = _load(_ws(g_ptr, hd, 3 * N + n, 4 * NT, K, k0, BC, BKS), ACC)
        eG = tl.exp(Gb)
        decb = tl.exp(gEb[None, :] - Gb)
        eGp = tl.exp(Gpb)
        dq += dqs * eG
        dG += dqs * q * eG
        dk += dkt * decb
        du += dut * decb
        s = (dkt * k + dut * u) * decb
        dG -= s
        dgM = tl.zeros([BKS], dtype=ACC)                 # diag(dMn) = rowsum(dh1 * h)
        for v0 in range(0, V, BV):
            dgM += tl.sum(_load(_st(hs_ptr, hd, n, N, K, V, v0, BKS, BV, k0), ACC)
                         * _load(_st(dhs_ptr, hd, n, N, K, V, v0, BKS, BV, k0), ACC), 1)
        dgE = tl.sum(s, 0) + dgM * tl.exp(gEb)
        de += dEt * eGp
        dGp += dEt * e * eGp
        # G = cumsum(log a), Gp = G - log a, gE = G at the last row: d log a by reverse cumsum
        dGt = dG + dGp + tl.where(r[:, None] == BC - 1, dgE[None, :], 0.0)
        dla = tl.sum(dGt, 0)[None, :] - tl.cumsum(dGt, 0) + dGt - dGp
        _store(_rows(dq_ptr, t0, T, H, K, hd, k0, BC, BKS), dq)
        _store(_rows(dk_ptr, t0, T, H, K, hd, k0, BC, BKS), dk)
        _store(_rows(du_ptr, t0, T, H, K, hd, k0, BC, BKS), du)
        _store(_rows(de_ptr, t0, T, H, K, hd, k0, BC, BKS), de)
        _store(_rows(dla_ptr, t0, T, H, K, hd, k0, BC, BKS), dla)
