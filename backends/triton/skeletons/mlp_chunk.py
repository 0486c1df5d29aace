# Skeleton 2: the deep (MLP) memory of Titans / Hope, depth 2, chunked, forward.
#
#     M(z) = [z +] W1 act(W2 z)        W1 [d_out, h] (output side), W2 [h, D] (input side)
#
# One program per (batch, head) keeps the fast weights on chip, in fla orientation
# H1 = W1^T [h, d_out], H2 = W2^T [D, h] (and the momenta S1, S2), and walks the chunks. Per chunk
# of BC tokens (the chunk IS the tile: the gradients are taken at the chunk's anchor weights):
#     pk = k H2, ak = act(pk), y = ak H1 [+ k]      tau = v, or M(v) at the anchor (SELF_TARGET)
#     err = y - tau (L2) or -tau (dot)              G1 = eta err,  G2 = eta (err H1^T * act'(pk))
# Each matrix is the momentum memory's core (backends/torch/README.md, "Memories") with keys ak
# (H1) or k (H2): segment products Pa[t, i] = prod_{i<m<=t} alpha_m (Pb for beta) by cumprod down
# the columns, Phi = Pa Pb, c = Pa cumprod(beta); the "before" forms (row t-1, token t's read) are
# the same products one row down. The DGD erase on H2 is a UT transform: Z = (I + L)^-1 rhs by
# forward substitution, L[t, m] = Pa_before[t, m] erase_m k_t.k_m. The read is at the anchor, or
# (CURRENT) layer by layer at the weights before each token (masked C x C terms). The chunk-end
# state is row t_end (the last real token) of the same expressions; the anchors (and momenta) of
# every chunk are saved, in paper orientation, for the backward (backends/triton/deep.py).
#
# Holes, resolved per level by nlc.backends.triton.template: MOMENTUM (beta), RETAIN (alpha),
# ERASE (on the input-side matrix), SELF_TARGET, RESIDUAL, CURRENT (read), L2 (else the dot
# objective), GELU (exact erf GELU, else SiLU). Accumulation in ACC (float32, or float64 for the
# oracle tests); PREC is tl.dot's input_precision. Tensors are contiguous: q, k [B, T, H, D];
# v [B, T, H, DV]; per-token scalars [B, T, H]; weights [B*H, d_out, d_in] and the anchor stacks
# [B*H, N, d_out, d_in]. Offsets are int64; every load is masked (T need not be a multiple of BC;
# D, HID, DO of their blocks; padded rows and columns load 0, padded alpha and beta 1).
import triton
import triton.language as tl

MOMENTUM: tl.constexpr = True
RETAIN: tl.constexpr = True
ERASE: tl.constexpr = True
SELF_TARGET: tl.constexpr = True
RESIDUAL: tl.constexpr = True
CURRENT: tl.constexpr = True
L2: tl.constexpr = True
GELU: tl.constexpr = True


# ---------------------------------------------------------------------------------------------
# addressing (as skeleton 1's)


@triton.jit
def _rows(ptr, t0, T, H, D, hd, BC: tl.constexpr, BD: tl.constexpr):
    """Pointers and mask: tokens t0 .. t0+BC, columns 0 .. BD of a [B, T, H, D] tensor, for the
    (batch, head) pair hd = b*H + h."""
    rows = t0 + tl.arange(0, BC)
    cols = tl.arange(0, BD)
    base = ((hd // H).to(tl.int64) * T + rows[:, None].to(tl.int64)) * H + (hd % H)
    return ptr + base * D + cols[None, :], (rows[:, None] < T) & (cols[None, :] < D)


@triton.jit
def _scalars(ptr, t0, T, H, hd, BC: tl.constexpr, PAD: tl.constexpr, SHIFT: tl.constexpr):
    """Per-token scalars of a [B, T, H] tensor at tokens t0 - SHIFT .. t0 + BC - SHIFT; PAD
    outside the chunk and past T."""
    rows = t0 + tl.arange(0, BC) - SHIFT
    offs = ((hd // H).to(tl.int64) * T + rows.to(tl.int64)) * H + (hd % H)
    return tl.load(ptr + offs, mask=(rows >= t0) & (rows < T), other=PAD)


@triton.jit
def _mat(ptr, hd, n, N, R, C, BR: tl.constexpr, BC: tl.constexpr):
    """Pointers and mask: matrix n of a [B*H, N, R, C] stack (paper orientation, d_out x d_in),
    addressed as its transpose [BC, BR] (fla orientation, d_in x d_out)."""
    rr = tl.arange(0, BR)
    cc = tl.arange(0, BC)
    base = (hd.to(tl.int64) * N + n) * R * C
    return ptr + base + rr[None, :] * C + cc[:, None], (cc[:, None] < C) & (rr[None, :] < R)


@triton.jit
def _load(pm, ACC: tl.constexpr):
    return tl.load(pm[0], mask=pm[1], other=0.0).to(ACC)


@triton.jit
def _store(pm, x):
    tl.store(pm[0], x.to(pm[0].dtype.element_ty), mask=pm[1])


# ---------------------------------------------------------------------------------------------
# pieces


@triton.jit
def _act(x):
    """The activation and its derivative (as deep_memory.ACTIVATIONS)."""
    if GELU:
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        y = x * cdf
        dy = cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    else:
        s = 1.0 / (1.0 + tl.exp(-x))
        y = x * s
        dy = s * (1.0 + x * (1.0 - s))
    return y, dy


@triton.jit
def _segprod(ptr, t0, T, H, hd, BC: tl.constexpr, ACC: tl.constexpr):
    """P[t, i] = prod_{i<m<=t} x_m (i <= t, else 0), Pp[t, i] = P[t-1, i] (i < t, else 0), the
    cumulative products c[t] = prod_{m<=t} x_m and cp[t] = c[t-1] (cp[0] = 1); tokens of the chunk,
    pads 1. Cumulative products down masked columns: zeros and negative values are exact."""
    r = tl.arange(0, BC)
    x = _scalars(ptr, t0, T, H, hd, BC, 1.0, 0).to(ACC)
    xp = _scalars(ptr, t0, T, H, hd, BC, 1.0, 1).to(ACC)
    low = r[:, None] > r[None, :]
    P = tl.where(r[:, None] >= r[None, :], tl.cumprod(tl.where(low, x[:, None], 1.0), 0), 0.0)
    Pp = tl.where(low, tl.cumprod(tl.where(r[:, None] > r[None, :] + 1, xp[:, None], 1.0), 0), 0.0)
    return P, Pp, tl.cumprod(x, 0), tl.cumprod(xp, 0)


@triton.jit
def _row(M, sel):
    """Row ``sel`` (a one-hot [BC] mask) of M."""
    return tl.sum(tl.where(sel[:, None], M, 0.0), 0)


@triton.jit
def _unit_lower_inv(Lm, BC: tl.constexpr, ACC: tl.constexpr):
    """(I + Lm)^-1 for a strictly lower Lm, by forward substitution (as skeleton 1's delta_prep)."""
    r = tl.arange(0, BC)
    eye = tl.where(r[:, None] == r[None, :], 1.0, 0.0).to(ACC)
    Tm = eye
    for i in range(1, BC):  # row i of Tm = e_i - sum_{j<i} Lm[i, j] (row j of Tm)
        a_i = tl.sum(tl.where(r[:, None] == i, Lm, 0.0), 0)
        row = -tl.sum(a_i[:, None] * Tm, 0)
        Tm = tl.where(r[:, None] == i, row[None, :] + eye, Tm)
    return Tm


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def mlp_chunk_fwd(q_ptr, k_ptr, v_ptr, eta_ptr, beta_ptr, alpha_ptr, erase_ptr,
                  w1_ptr, w2_ptr, s1_ptr, s2_ptr, o_ptr, w1o_ptr, w2o_ptr, s1o_ptr, s2o_ptr,
                  w1s_ptr, w2s_ptr, s1s_ptr, s2s_ptr, T, H, D, HID, DO, DV, N,
                  BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BO: tl.constexpr,
                  BV: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Grid (B*H,): the sequential pass over chunks; writes o, the final weights (and momenta)
    and every chunk's anchor weights (and momenta)."""
    hd = tl.program_id(0)
    r = tl.arange(0, BC)
    H1 = _load(_mat(w1_ptr, hd, 0, 1, DO, HID, BO, BH), ACC)          # W1^T [BH, BO]
    H2 = _load(_mat(w2_ptr, hd, 0, 1, HID, D, BH, BD), ACC)           # W2^T [BD, BH]
    if MOMENTUM:
        S1 = _load(_mat(s1_ptr, hd, 0, 1, DO, HID, BO, BH), ACC)
        S2 = _load(_mat(s2_ptr, hd, 0, 1, HID, D, BH, BD), ACC)
    for n in range(N):
        t0 = n * BC
        _store(_mat(w1s_ptr, hd, n, N, DO, HID, BO, BH), H1)
        _store(_mat(w2s_ptr, hd, n, N, HID, D, BH, BD), H2)
        if MOMENTUM:
            _store(_mat(s1s_ptr, hd, n, N, DO, HID, BO, BH), S1)
            _store(_mat(s2s_ptr, hd, n, N, HID, D, BH, BD), S2)
        q = _load(_rows(q_ptr, t0, T, H, D, hd, BC, BD), ACC)
        k = _load(_rows(k_ptr, t0, T, H, D, hd, BC, BD), ACC)
        v = _load(_rows(v_ptr, t0, T, H, DV, hd, BC, BV), ACC)
        eta = _scalars(eta_ptr, t0, T, H, hd, BC, 0.0, 0).to(ACC)
        last = r == tl.minimum(T - t0, BC) - 1                       # the chunk's last real token
        # forward at the anchor, per-token errors and backprop signals (README "Memories")
        pk = tl.dot(k, H2, input_precision=PREC)                        # [BC, BH]
        ak, dak = _act(pk)
        y = tl.dot(ak, H1, input_precision=PREC)                        # [BC, BO]
        if RESIDUAL:
            y = y + k
        if SELF_TARGET:
            tau = tl.dot(_act(tl.dot(v, H2, input_precision=PREC))[0], H1, input_precision=PREC)
            if RESIDUAL:
                tau = tau + v
        else:
            tau = v
        if L2:
            err = y - tau
        else:
            err = -tau
        G1 = eta[:, None] * err                                         # [BC, BO], keys ak
        G2 = eta[:, None] * (tl.dot(err, tl.trans(H1), input_precision=PREC) * dak)  # [BC, BH], keys k
        # decay coefficients: after token t's write (rows t) and before it (rows t - 1)
        if RETAIN:
            Pa, Pab, A, Ab = _segprod(alpha_ptr, t0, T, H, hd, BC, ACC)
        else:
            Pa = tl.where(r[:, None] >= r[None, :], 1.0, 0.0).to(ACC)
            Pab = tl.where(r[:, None] > r[None, :], 1.0, 0.0).to(ACC)
            A = tl.full([BC], 1.0, ACC)
            Ab = A
        if MOMENTUM:
            Pb, _Pbb, Bc, _Bcb = _segprod(beta_ptr, t0, T, H, hd, BC, ACC)
            Phi = tl.dot(Pa, Pb, input_precision=PREC)
            Phib = tl.dot(Pab, Pb, input_precision=PREC)
            cb = tl.sum(Pab * Bc[None, :], 1)
        else:
            Phi = Pa
            Phib = Pab
        # the erase's UT transform on the input-side matrix: Z_t = k_t^T H2_{t-1}
        if ERASE:
            eps = _scalars(erase_ptr, t0, T, H, hd, BC, 0.0, 0).to(ACC)
            KK = tl.dot(k, tl.trans(k), input_precision=PREC)
            rhs = Ab[:, None] * pk - tl.dot(KK * Phib, G2, input_precision=PREC)
            if MOMENTUM:
                rhs = rhs - cb[:, None] * tl.dot(k, S2, input_precision=PREC)
            Tinv = _unit_lower_inv(Pab * eps[None, :] * KK, BC, ACC)
            bZ = eps[:, None] * tl.dot(Tinv, rhs, input_precision=PREC)
        # the read
        if CURRENT:
            QK = tl.dot(q, tl.trans(k), input_precision=PREC)
            p = Ab[:, None] * tl.dot(q, H2, input_precision=PREC) - tl.dot(QK * Phib, G2, input_precision=PREC)
            if MOMENTUM:
                p = p - cb[:, None] * tl.dot(q, S2, input_precision=PREC)
            if ERASE:
                p = p - tl.dot(QK * Pab, bZ, input_precision=PREC)
            x = _act(p)[0]
            XK = tl.dot(x, tl.trans(ak), input_precision=PREC)
            o = Ab[:, None] * tl.dot(x, H1, input_precision=PREC) - tl.dot(XK * Phib, G1, input_precision=PREC)
            if MOMENTUM:
                o = o - cb[:, None] * tl.dot(x, S1, input_precision=PREC)
        else:
            o = tl.dot(_act(tl.dot(q, H2, input_precision=PREC))[0], H1, input_precision=PREC)
        if RESIDUAL:
            o = o + q
        _store(_rows(o_ptr, t0, T, H, DO, hd, BC, BO), o)
        # the chunk-end state: row t_end of the expressions above
        a_e = tl.sum(tl.where(last, A, 0.0), 0)
        phi_e = _row(Phi, last)
        coef2 = phi_e[:, None] * G2
        if ERASE:
            coef2 = coef2 + _row(Pa, last)[:, None] * bZ
        H1n = a_e * H1 - tl.dot(tl.trans(ak), phi_e[:, None] * G1, input_precision=PREC)
        H2n = a_e * H2 - tl.dot(tl.trans(k), coef2, input_precision=PREC)
        if MOMENTUM:
            c_e = tl.sum(tl.where(last, tl.sum(Pa * Bc[None, :], 1), 0.0), 0)
            bc_e = tl.sum(tl.where(last, Bc, 0.0), 0)
            db_e = _row(Pb, last)
            H1n = H1n - c_e * S1
            H2n = H2n - c_e * S2
            S1 = bc_e * S1 + tl.dot(tl.trans(ak), db_e[:, None] * G1, input_precision=PREC)
            S2 = bc_e * S2 + tl.dot(tl.trans(k), db_e[:, None] * G2, input_precision=PREC)
        H1 = H1n
        H2 = H2n
    _store(_mat(w1o_ptr, hd, 0, 1, DO, HID, BO, BH), H1)
    _store(_mat(w2o_ptr, hd, 0, 1, HID, D, BH, BD), H2)
    if MOMENTUM:
        _store(_mat(s1o_ptr, hd, 0, 1, DO, HID, BO, BH), S1)
        _store(_mat(s2o_ptr, hd, 0, 1, HID, D, BH, BD), S2)
