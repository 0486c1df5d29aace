# Skeleton 3: a level's flow, fused: projection output -> short causal convolution -> a chain of
# element-wise functions and per-head L2 normalisations, forward and backward.
#
#     z_0 = conv(P) (or P)      z_{i+1} = f_i(z_i)      y = z_n           P, y: [B, T, H, K]
#     conv(P)[t, c] = sum_j w[c, j] P[t - (W-1) + j, c], rows before the first from `past` [B, W-1, H*K]
#
# Holes: CONV (a boolean, as delta_chunk's) and two code holes filled from the flow expression by
# nlc.backends.triton.prologue: the chain's forward (`# {FORWARD}`: statements taking `z` to the
# flow's value) and its backward (`# {BACKWARD}`: statements taking `g`, the gradient of the value,
# to the gradient of z_0, recomputing what they need from `z0`). Unfilled, the chain is the identity.
# Backward: dP[s] = sum_j w[:, j] g0[s + (W-1) - j], with g0 the chain's gradient at the conv
# output. A block of BT rows needs g0 at its rows and at the W-1 after them (the halo, HB >= W-1
# rows, owned by the next block): it computes both (the chain once per row, plus the halo's), puts
# them in its own slot of a workspace and reads them back shifted, after a barrier, so no block
# reads another's results. dw is summed per block (and over blocks and batch by the wrapper).
# Program 0 takes the rows before the first token: the gradient of `past`. Accumulation in ACC,
# every load masked, offsets int64.
import triton
import triton.language as tl

CONV: tl.constexpr = True


@triton.jit
def _tile(ptr, past_ptr, rows, T, H, K, hd, W: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):
    """P at `rows` for one (batch, head): rows < 0 read `past` [B, W-1, H*K] (zeros past its start)."""
    cols = tl.arange(0, BK)
    b = (hd // H).to(tl.int64)
    h = hd % H
    cm = cols[None, :] < K
    x = tl.load(ptr + ((b * T + rows[:, None].to(tl.int64)) * H + h) * K + cols[None, :],
                mask=(rows[:, None] >= 0) & (rows[:, None] < T) & cm, other=0.0).to(ACC)
    if CONV:
        prow = rows + (W - 1)
        pmask = (rows[:, None] < 0) & (prow[:, None] >= 0) & cm
        x += tl.load(past_ptr + (b * (W - 1) + prow[:, None].to(tl.int64)) * (H * K) + h * K + cols[None, :],
                     mask=pmask, other=0.0).to(ACC)
    return x


@triton.jit
def _z0(p_ptr, past_ptr, cw_ptr, rows, T, H, K, hd, W: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):
    """The chain's input at `rows`: the convolution of P, or P."""
    if CONV:
        cols = tl.arange(0, BK)
        z = tl.zeros([rows.shape[0], BK], dtype=ACC)
        for j in tl.static_range(W):
            wj = tl.load(cw_ptr + ((hd % H) * K + cols) * W + j, mask=cols < K, other=0.0).to(ACC)
            z += wj[None, :] * _tile(p_ptr, past_ptr, rows - (W - 1) + j, T, H, K, hd, W, BK, ACC)
    else:
        z = _tile(p_ptr, past_ptr, rows, T, H, K, hd, W, BK, ACC)
    return z


@triton.jit
def _chain(z):
    """The flow's functions, innermost first."""
    # {FORWARD}
    return z


@triton.jit
def _chain_bwd(z0, g):
    """The gradient at z0 of the chain's value, given its gradient g."""
    # {BACKWARD}
    return g


@triton.jit
def flow_fwd(p_ptr, past_ptr, cw_ptr, y_ptr, T, H, K, W: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
             ACC: tl.constexpr):
    """Grid (T / BT, B*H): y = chain(conv(P))."""
    t0 = tl.program_id(0) * BT
    hd = tl.program_id(1)
    rows = t0 + tl.arange(0, BT)
    cols = tl.arange(0, BK)
    y = _chain(_z0(p_ptr, past_ptr, cw_ptr, rows, T, H, K, hd, W, BK, ACC))
    offs = (((hd // H).to(tl.int64) * T + rows[:, None].to(tl.int64)) * H + hd % H) * K + cols[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < T) & (cols[None, :] < K))


@triton.jit
def _g0(p_ptr, past_ptr, cw_ptr, dy_ptr, rows, T, H, K, hd, W: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):
    """The gradient at the chain's input for `rows` (0 outside [0, T))."""
    cols = tl.arange(0, BK)
    ok = (rows[:, None] >= 0) & (rows[:, None] < T) & (cols[None, :] < K)
    offs = (((hd // H).to(tl.int64) * T + rows[:, None].to(tl.int64)) * H + hd % H) * K + cols[None, :]
    g = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(ACC)
    g0 = _chain_bwd(_z0(p_ptr, past_ptr, cw_ptr, rows, T, H, K, hd, W, BK, ACC), g)
    return tl.where(ok, g0, 0.0)


@triton.jit
def flow_bwd(p_ptr, past_ptr, cw_ptr, dy_ptr, dp_ptr, dpast_ptr, dcw_ptr, g0_ws_ptr, T, H, K, W: tl.constexpr,
             BT: tl.constexpr, HB: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):
    """Grid (1 + T / BT, B*H): program i > 0 writes dP for rows (i-1)*BT ..; program 0 the rows
    before the first token (d past). Each writes its block's share of dw [blocks, B*H, K, W]; CONV:
    g0 at its rows and its halo goes through its slot of g0_ws [blocks, B*H, BT + HB, BK]."""
    i = tl.program_id(0)
    hd = tl.program_id(1)
    t0 = (i - 1) * BT
    rows = t0 + tl.arange(0, BT)
    cols = tl.arange(0, BK)
    cm = cols[None, :] < K
    b = (hd // H).to(tl.int64)
    h = hd % H
    if CONV:
        g = tl.zeros([BT, BK], dtype=ACC)    # program 0's rows precede the sequence: only its halo counts
        if i > 0:
            g = _g0(p_ptr, past_ptr, cw_ptr, dy_ptr, rows, T, H, K, hd, W, BK, ACC)
        ws = g0_ws_ptr + (i.to(tl.int64) * tl.num_programs(1) + hd) * (BT + HB) * BK
        tl.store(ws + tl.arange(0, BT)[:, None] * BK + cols[None, :], g)
        halo = tl.arange(0, HB)
        tl.store(ws + (BT + halo[:, None]) * BK + cols[None, :],
                 _g0(p_ptr, past_ptr, cw_ptr, dy_ptr, t0 + BT + halo, T, H, K, hd, W, BK, ACC))
        tl.debug_barrier()  # the slot is written before any thread reads it shifted
        dx = tl.zeros([BT, BK], dtype=ACC)
        for j in tl.static_range(W):
            wj = tl.load(cw_ptr + (h * K + cols) * W + j, mask=cols < K, other=0.0).to(ACC)
            shift = tl.arange(0, BT) + (W - 1) - j          # rows (W-1)-j .. of the slot: within BT + HB
            dx += wj[None, :] * tl.load(ws + shift[:, None] * BK + cols[None, :],
                                        mask=(shift[:, None] < BT + HB) & cm, other=0.0)
            # dw[c, j] = sum_t g0[t, c] P[t - (W-1) + j, c], over this block's rows t (program 0:
            # none, and its slot of dw is zeros)
            if i > 0:
                xj = _tile(p_ptr, past_ptr, rows - (W - 1) + j, T, H, K, hd, W, BK, ACC)
                tl.store(dcw_ptr + ((i.to(tl.int64) * tl.num_programs(1) + hd) * K + cols) * W + j,
                         tl.sum(g * xj, 0), mask=cols < K)
        prow = rows + (W - 1)
        tl.store(dpast_ptr + (b * (W - 1) + prow[:, None].to(tl.int64)) * (H * K) + h * K + cols[None, :],
                 dx.to(dpast_ptr.dtype.element_ty), mask=(rows[:, None] < 0) & (prow[:, None] >= 0) & cm)
    else:
        dx = _g0(p_ptr, past_ptr, cw_ptr, dy_ptr, rows, T, H, K, hd, W, BK, ACC)
    tl.store(dp_ptr + ((b * T + rows[:, None].to(tl.int64)) * H + h) * K + cols[None, :],
             dx.to(dp_ptr.dtype.element_ty), mask=(rows[:, None] >= 0) & (rows[:, None] < T) & cm)
