# A part: the addressing every chunked skeleton shares (a line `# {include rows}`): a [BC, BD]
# tile of a [B, T, H, D] tensor by tokens and columns, a tile of a stack of per-head states, and
# masked loads and stores. Offsets are
# int64; a load past T or D gives 0.
import triton
import triton.language as tl


@triton.jit
def _rows(ptr, t0, T, H, D, hd, c0, BC: tl.constexpr, BD: tl.constexpr):
    """Pointers and mask: tokens t0 .. t0+BC, columns c0 .. c0+BD of a [B, T, H, D] tensor, for
    the (batch, head) pair hd = b*H + h."""
    rows = t0 + tl.arange(0, BC)
    cols = c0 + tl.arange(0, BD)
    base = ((hd // H).to(tl.int64) * T + rows[:, None].to(tl.int64)) * H + (hd % H)
    return ptr + base * D + cols[None, :], (rows[:, None] < T) & (cols[None, :] < D)


@triton.jit
def _load(pm, ACC: tl.constexpr):
    return tl.load(pm[0], mask=pm[1], other=0.0).to(ACC)


@triton.jit
def _store(pm, x):
    tl.store(pm[0], x.to(pm[0].dtype.element_ty), mask=pm[1])


@triton.jit
def _st(ptr, hd, n, N, K, V, v0, BK: tl.constexpr, BV: tl.constexpr, k0=0):
    """Pointers and mask: rows k0 .. k0+BK, columns v0 .. v0+BV of state n of a [B*H, N, K, V]
    stack (a state per chunk, or N = 1: one state per (batch, head))."""
    rk = k0 + tl.arange(0, BK)
    rv = v0 + tl.arange(0, BV)
    base = (hd.to(tl.int64) * N + n) * K * V
    return ptr + base + rk[:, None] * V + rv[None, :], (rk[:, None] < K) & (rv[None, :] < V)
