# Skeleton 2: the deep (MLP) memory of Titans / Hope, depth 2, chunked: the forward here, the
# backward from parts/mlp_chunk_bwd.py (and parts/mlp_err_paths.py).
#
#     M(z) = [z +] W1 act(W2 z)        W1 [d_out, h] (output side), W2 [h, D] (input side)
#
# One program per (batch, head) walks the chunks. The fast weights, in fla orientation
# H1 = W1^T [h, d_out], H2 = W2^T [D, h] (and the momenta S1, S2), live in global memory, in the
# anchor stacks the backward needs anyway: chunk n reads its anchor from stack n and writes its
# chunk-end state to stack n + 1 (the last chunk: to the final outputs); the initial state is
# copied to stack 0 first, and a barrier orders each chunk's writes before the next chunk's reads.
# Per chunk of BC tokens (the chunk IS the tile: the gradients are taken at the chunk's anchor):
#     pk = k H2, ak = act(pk), y = ak H1 [+ k]      tau = v, or M(v) at the anchor (SELF_TARGET)
#     err = y - tau (L2) or -tau (dot)              G1 = eta err,  G2 = eta (err H1^T * act'(pk))
# Each matrix is the momentum memory's core (backends/torch/README.md, "Memories") with keys ak
# (H1) or k (H2): segment products Pa[t, i] = prod_{i<m<=t} alpha_m (Pb for beta) by cumprod down
# the columns, Phi = Pa Pb, c = Pa cumprod(beta); the "before" forms (row t-1, token t's read) are
# the same products one row down. The DGD erase on H2 is a UT transform: Z = (I + L)^-1 rhs,
# L[t, m] = Pa_before[t, m] erase_m k_t.k_m, the inverse blockwise (as skeleton 1's delta_prep).
# The read is at the anchor, or (CURRENT) layer by layer at the weights before each token (masked
# C x C terms). The chunk-end state is row t_end (the last real token) of the same expressions.
#
# Every h-sized tile is taken BJ hidden units at a time, so no [h, .] tile is ever whole on chip:
# pass 1 over the hidden blocks accumulates y (and tau, and the anchor read), which err needs;
# pass 2 recomputes pk per block and takes G2, the erase, the current read (accumulating the
# [BC, .] sums over h) and the block's chunk-end weights and momenta, written as it goes. The
# chunk's operands that every block multiplies by (err, and the [BC, BC] masks q k^T * Phi_b, ...)
# go to per-program workspaces and, like q, k and the weights, are loaded where they are used;
# barriers split pass 2's stages. Float32 dots here are FMA loops whose operands each thread
# holds: what is kept live across a loop, or loaded early, is what ptxas spills.
#
# Holes, resolved per level by nlc.backends.triton.template: MOMENTUM (beta), RETAIN (alpha),
# ERASE (on the input-side matrix), SELF_TARGET, RESIDUAL, CURRENT (read), L2 (else the dot
# objective), GELU (exact erf GELU, else SiLU). Accumulation in ACC (float32, or float64 for the
# oracle tests); PREC is tl.dot's input_precision. Tensors are contiguous: q, k [B, T, H, D];
# v [B, T, H, DV]; per-token scalars [B, T, H]; weights [B*H, d_out, d_in] and the anchor stacks
# [B*H, N, d_out, d_in], in ACC (they carry the state). Offsets are int64; every load is masked
# (T need not be a multiple of BC; D, HID, DO of their blocks; padded rows and columns load 0,
# padded alpha and beta 1).
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
# addressing: the rows of [B, T, H, D] tensors (parts/rows.py, as every chunked skeleton's), and
# the deep memory's weight stacks (transposed) and workspaces

# {include rows}


@triton.jit
def _scalars(ptr, t0, T, H, hd, BC: tl.constexpr, PAD: tl.constexpr, SHIFT: tl.constexpr):
    """Per-token scalars of a [B, T, H] tensor at tokens t0 - SHIFT .. t0 + BC - SHIFT; PAD
    outside the chunk and past T."""
    rows = t0 + tl.arange(0, BC) - SHIFT
    offs = ((hd // H).to(tl.int64) * T + rows.to(tl.int64)) * H + (hd % H)
    return tl.load(ptr + offs, mask=(rows >= t0) & (rows < T), other=PAD)


@triton.jit
def _mat(ptr, hd, n, N, R, C, i0, j0, BI: tl.constexpr, BJ: tl.constexpr):
    """Pointers and mask: the [BI, BJ] tile at (i0, j0) of the transpose (fla orientation,
    d_in x d_out) of matrix n of a [B*H, N, R, C] stack (paper orientation, d_out x d_in)."""
    ii = i0 + tl.arange(0, BI)
    jj = j0 + tl.arange(0, BJ)
    base = (hd.to(tl.int64) * N + n) * R * C
    return ptr + base + jj[None, :] * C + ii[:, None], (ii[:, None] < C) & (jj[None, :] < R)


@triton.jit
def _store_if(pm, x, ok):
    """Store x where the mask and the scalar condition ``ok`` hold."""
    tl.store(pm[0], x.to(pm[0].dtype.element_ty), mask=pm[1] & ok)


@triton.jit
def _ws(ptr, hd, s, S, BR: tl.constexpr, BW: tl.constexpr):
    """Pointers and mask: slot s of a [B*H, S, BR, BW] workspace (the program's own tiles)."""
    rr = tl.arange(0, BR)
    cc = tl.arange(0, BW)
    base = (hd.to(tl.int64) * S + s) * BR * BW
    return ptr + base + rr[:, None] * BW + cc[None, :], (rr[:, None] < BR) & (cc[None, :] < BW)


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


if ERASE:  # the UT transform's inverse, blockwise (as skeleton 1's delta_prep)
    # {include blocked_inverse}

# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def mlp_chunk_fwd(q_ptr, k_ptr, v_ptr, eta_ptr, beta_ptr, alpha_ptr, erase_ptr,
                  w1_ptr, w2_ptr, s1_ptr, s2_ptr, o_ptr, w1o_ptr, w2o_ptr, s1o_ptr, s2o_ptr,
                  w1s_ptr, w2s_ptr, s1s_ptr, s2s_ptr, e_ws_ptr, xk_ptr, m_ws_ptr, T, H, D, HID, DO, DV, N,
                  BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BO: tl.constexpr,
                  BV: tl.constexpr, BJ: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Grid (B*H,): the sequential pass over chunks; writes o, every chunk's anchor weights (and
    momenta) to the stacks, and the final weights (and momenta). BJ: the hidden block. The
    workspaces hold the chunk's operands that every hidden block multiplies by: err [BC, BO]
    (e_ws, [B*H, N, BC, BO]: every chunk's, kept for the backward) and the [BC, BC] matrices
    (m_ws); loaded where used, like q and k, not kept live across the hidden loops (as dot
    operands they would take most of the registers). CURRENT: every chunk's XK = x ak^T (the
    read's hidden activations against the keys', summed over the hidden layer) to xk
    [B*H, N, BC, BC], for the backward."""
    hd = tl.program_id(0)
    r = tl.arange(0, BC)
    for j0 in range(0, HID, BJ):  # the initial state is chunk 0's anchor
        _store(_mat(w1s_ptr, hd, 0, N, DO, HID, j0, 0, BJ, BO), _load(_mat(w1_ptr, hd, 0, 1, DO, HID, j0, 0, BJ, BO), ACC))
        _store(_mat(w2s_ptr, hd, 0, N, HID, D, 0, j0, BD, BJ), _load(_mat(w2_ptr, hd, 0, 1, HID, D, 0, j0, BD, BJ), ACC))
        if MOMENTUM:
            _store(_mat(s1s_ptr, hd, 0, N, DO, HID, j0, 0, BJ, BO), _load(_mat(s1_ptr, hd, 0, 1, DO, HID, j0, 0, BJ, BO), ACC))
            _store(_mat(s2s_ptr, hd, 0, N, HID, D, 0, j0, BD, BJ), _load(_mat(s2_ptr, hd, 0, 1, HID, D, 0, j0, BD, BJ), ACC))
    tl.debug_barrier()  # the stores above are seen by every thread's loads below
    for n in range(N):
        t0 = n * BC
        more = n + 1 < N                      # the chunk-end state goes to stack n + 1, else out
        fin = n + 1 == N
        eta = _scalars(eta_ptr, t0, T, H, hd, BC, 0.0, 0).to(ACC)
        last = r == tl.minimum(T - t0, BC) - 1                       # the chunk's last real token
        # pass 1, forward at the anchor: y = act(k H2) H1 [, tau = act(v H2) H1, o = act(q H2) H1]
        y = tl.zeros([BC, BO], dtype=ACC)
        if SELF_TARGET:
            tau = tl.zeros([BC, BO], dtype=ACC)
        if not CURRENT:
            o = tl.zeros([BC, BO], dtype=ACC)
        for j0 in range(0, HID, BJ):
            H1 = _load(_mat(w1s_ptr, hd, n, N, DO, HID, j0, 0, BJ, BO), ACC)     # rows j0.. of W1^T
            H2 = _load(_mat(w2s_ptr, hd, n, N, HID, D, 0, j0, BD, BJ), ACC)      # cols j0.. of W2^T
            k = _load(_rows(k_ptr, t0, T, H, D, hd, 0, BC, BD), ACC)
            y += tl.dot(_act(tl.dot(k, H2, input_precision=PREC))[0], H1, input_precision=PREC)
            if SELF_TARGET:
                v = _load(_rows(v_ptr, t0, T, H, DV, hd, 0, BC, BV), ACC)
                tau += tl.dot(_act(tl.dot(v, H2, input_precision=PREC))[0], H1, input_precision=PREC)
            if not CURRENT:
                q = _load(_rows(q_ptr, t0, T, H, D, hd, 0, BC, BD), ACC)
                o += tl.dot(_act(tl.dot(q, H2, input_precision=PREC))[0], H1, input_precision=PREC)
        v = _load(_rows(v_ptr, t0, T, H, DV, hd, 0, BC, BV), ACC)
        if RESIDUAL:
            y = y + _load(_rows(k_ptr, t0, T, H, D, hd, 0, BC, BD), ACC)
        if SELF_TARGET:
            if RESIDUAL:
                tau = tau + v
        else:
            tau = v
        if L2:
            err = y - tau                                               # G1 = eta err
        else:
            err = -tau
        _store(_ws(e_ws_ptr, hd, n, N, BC, BO), err)
        # decay coefficients: after token t's write (rows t) and before it (rows t - 1); of the
        # "after" forms only row t_end (the chunk end) is needed
        if RETAIN:
            Pa, Pab, A, Ab = _segprod(alpha_ptr, t0, T, H, hd, BC, ACC)
        else:
            Pa = tl.where(r[:, None] >= r[None, :], 1.0, 0.0).to(ACC)
            Pab = tl.where(r[:, None] > r[None, :], 1.0, 0.0).to(ACC)
            A = tl.full([BC], 1.0, ACC)
            Ab = A
        a_e = tl.sum(tl.where(last, A, 0.0), 0)
        pa_e = _row(Pa, last)                                           # Pa[t_end, :]
        if MOMENTUM:
            Pb, _Pbb, Bc, _Bcb = _segprod(beta_ptr, t0, T, H, hd, BC, ACC)
            Phib = tl.dot(Pab, Pb, input_precision=PREC)
            phi_e = tl.sum(pa_e[:, None] * Pb, 0)                       # (Pa Pb)[t_end, :]
            cb = tl.sum(Pab * Bc[None, :], 1)
            c_e = tl.sum(pa_e * Bc, 0)
            bc_e = tl.sum(tl.where(last, Bc, 0.0), 0)
            db_e = eta * _row(Pb, last)                                 # S's write coefficients
        else:
            Phib = Pab
            phi_e = pa_e
        phi_e = eta * phi_e                                             # H's, on err (G1 = eta err)
        k = _load(_rows(k_ptr, t0, T, H, D, hd, 0, BC, BD), ACC)
        # the erase's UT transform on the input-side matrix: Z_t = k_t^T H2_{t-1}
        if ERASE:
            eps = _scalars(erase_ptr, t0, T, H, hd, BC, 0.0, 0).to(ACC)
            KK = tl.dot(k, tl.trans(k), input_precision=PREC)
            Lm = Pab * eps[None, :] * KK
            Tinv = _unit_lower_inv(Lm, BC, ACC, PREC)
            _store(_ws(m_ws_ptr, hd, 2, 4, BC, BC), KK * Phib)
            _store(_ws(m_ws_ptr, hd, 3, 4, BC, BC), Tinv)
        if CURRENT:
            QK = tl.dot(_load(_rows(q_ptr, t0, T, H, D, hd, 0, BC, BD), ACC), tl.trans(k), input_precision=PREC)
            _store(_ws(m_ws_ptr, hd, 0, 4, BC, BC), QK * Phib)
            if ERASE:
                _store(_ws(m_ws_ptr, hd, 1, 4, BC, BC), QK * Pab)
            XK = tl.zeros([BC, BC], dtype=ACC)                          # sum over h of x ak^T
            o = tl.zeros([BC, BO], dtype=ACC)
        tl.debug_barrier()  # the workspaces are written
        # pass 2, per hidden block: G2, the erase, the current read, the chunk-end state. Each
        # tile is loaded where it is used (again where it is used again) and the stages are
        # split by barriers, so that no stage's operands are live during another's.
        for j0 in range(0, HID, BJ):
            k = _load(_rows(k_ptr, t0, T, H, D, hd, 0, BC, BD), ACC)
            pk = tl.dot(k, _load(_mat(w2s_ptr, hd, n, N, HID, D, 0, j0, BD, BJ), ACC), input_precision=PREC)
            ak, dak = _act(pk)                                          # [BC, BJ]
            H1T = tl.trans(_load(_mat(w1s_ptr, hd, n, N, DO, HID, j0, 0, BJ, BO), ACC))
            g2 = tl.dot(_load(_ws(e_ws_ptr, hd, n, N, BC, BO), ACC), H1T, input_precision=PREC) * dak
            tl.debug_barrier()                                          # G2 = eta g2 (keys k)
            if ERASE:
                rhs = Ab[:, None] * pk - tl.dot(_load(_ws(m_ws_ptr, hd, 2, 4, BC, BC), ACC), eta[:, None] * g2, input_precision=PREC)
                if MOMENTUM:
                    rhs -= cb[:, None] * tl.dot(k, _load(_mat(s2s_ptr, hd, n, N, HID, D, 0, j0, BD, BJ), ACC), input_precision=PREC)
                tl.debug_barrier()
                bZ = eps[:, None] * tl.dot(_load(_ws(m_ws_ptr, hd, 3, 4, BC, BC), ACC), rhs, input_precision=PREC)
                tl.debug_barrier()
            # the read at the weights before each token, this block of the hidden layer:
            # p = A_b (q H2) - (q k^T * Phi_b) G2 - c_b (q S2) [- (q k^T * Pa_b) eps Z]
            if CURRENT:
                q = _load(_rows(q_ptr, t0, T, H, D, hd, 0, BC, BD), ACC)
                p = Ab[:, None] * tl.dot(q, _load(_mat(w2s_ptr, hd, n, N, HID, D, 0, j0, BD, BJ), ACC), input_precision=PREC)
                tl.debug_barrier()
                p -= tl.dot(_load(_ws(m_ws_ptr, hd, 0, 4, BC, BC), ACC), eta[:, None] * g2, input_precision=PREC)
                tl.debug_barrier()
                if MOMENTUM:
                    p -= cb[:, None] * tl.dot(q, _load(_mat(s2s_ptr, hd, n, N, HID, D, 0, j0, BD, BJ), ACC), input_precision=PREC)
                    tl.debug_barrier()
                if ERASE:
                    p -= tl.dot(_load(_ws(m_ws_ptr, hd, 1, 4, BC, BC), ACC), bZ, input_precision=PREC)
                    tl.debug_barrier()
                x = _act(p)[0]
                XK += tl.dot(x, tl.trans(ak), input_precision=PREC)
                tl.debug_barrier()
                o += tl.dot(Ab[:, None] * x, _load(_mat(w1s_ptr, hd, n, N, DO, HID, j0, 0, BJ, BO), ACC), input_precision=PREC)
                tl.debug_barrier()
                if MOMENTUM:
                    o -= tl.dot(cb[:, None] * x, _load(_mat(s1s_ptr, hd, n, N, DO, HID, j0, 0, BJ, BO), ACC), input_precision=PREC)
                    tl.debug_barrier()
            # the block's chunk-end weights (and momenta), one matrix at a time, stored at once:
            # H <- A H - K^T (Phi_e G [+ Pa_e eps Z]) - c S,   S <- Bc S + K^T (Pb_e G)
            H1 = a_e * _load(_mat(w1s_ptr, hd, n, N, DO, HID, j0, 0, BJ, BO), ACC)
            H1 -= tl.dot(tl.trans(ak), phi_e[:, None] * _load(_ws(e_ws_ptr, hd, n, N, BC, BO), ACC), input_precision=PREC)
            if MOMENTUM:
                H1 -= c_e * _load(_mat(s1s_ptr, hd, n, N, DO, HID, j0, 0, BJ, BO), ACC)
            _store_if(_mat(w1s_ptr, hd, n + 1, N, DO, HID, j0, 0, BJ, BO), H1, more)
            _store_if(_mat(w1o_ptr, hd, 0, 1, DO, HID, j0, 0, BJ, BO), H1, fin)
            tl.debug_barrier()
            if MOMENTUM:
                S1 = bc_e * _load(_mat(s1s_ptr, hd, n, N, DO, HID, j0, 0, BJ, BO), ACC)
                S1 += tl.dot(tl.trans(ak), db_e[:, None] * _load(_ws(e_ws_ptr, hd, n, N, BC, BO), ACC), input_precision=PREC)
                _store_if(_mat(s1s_ptr, hd, n + 1, N, DO, HID, j0, 0, BJ, BO), S1, more)
                _store_if(_mat(s1o_ptr, hd, 0, 1, DO, HID, j0, 0, BJ, BO), S1, fin)
                tl.debug_barrier()
            coef2 = phi_e[:, None] * g2
            if ERASE:
                coef2 += pa_e[:, None] * bZ
            H2 = a_e * _load(_mat(w2s_ptr, hd, n, N, HID, D, 0, j0, BD, BJ), ACC)
            H2 -= tl.dot(tl.trans(k), coef2, input_precision=PREC)
            if MOMENTUM:
                H2 -= c_e * _load(_mat(s2s_ptr, hd, n, N, HID, D, 0, j0, BD, BJ), ACC)
            _store_if(_mat(w2s_ptr, hd, n + 1, N, HID, D, 0, j0, BD, BJ), H2, more)
            _store_if(_mat(w2o_ptr, hd, 0, 1, HID, D, 0, j0, BD, BJ), H2, fin)
            tl.debug_barrier()
            if MOMENTUM:
                S2 = bc_e * _load(_mat(s2s_ptr, hd, n, N, HID, D, 0, j0, BD, BJ), ACC)
                S2 += tl.dot(tl.trans(k), db_e[:, None] * g2, input_precision=PREC)
                _store_if(_mat(s2s_ptr, hd, n + 1, N, HID, D, 0, j0, BD, BJ), S2, more)
                _store_if(_mat(s2o_ptr, hd, 0, 1, HID, D, 0, j0, BD, BJ), S2, fin)
                tl.debug_barrier()
        # the read's output layer: o = A_b (x H1) - c_b (x S1) - (x ak^T * Phi_b) G1
        if CURRENT:
            _store(_ws(xk_ptr, hd, n, N, BC, BC), XK)
            o -= tl.dot(XK * Phib * eta[None, :], _load(_ws(e_ws_ptr, hd, n, N, BC, BO), ACC), input_precision=PREC)
        if RESIDUAL:
            o += _load(_rows(q_ptr, t0, T, H, D, hd, 0, BC, BD), ACC)
        _store(_rows(o_ptr, t0, T, H, DO, hd, 0, BC, BO), o)
        tl.debug_barrier()  # chunk n's end state (stack n + 1) is written before chunk n + 1 reads it


# {include mlp_chunk_bwd}

if L2 or SELF_TARGET:  # the backward's second walk: err's own paths
    # {include mlp_err_paths}
