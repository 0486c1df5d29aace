# A part: Triton functions that skeletons include (a line `# {include blocked_inverse}`), so that
# every generated kernel file stays one self-contained module. Shared by skeleton 1's delta_prep
# and skeleton 2's erase.
import triton
import triton.language as tl


@triton.jit
def _inv16(A, BC: tl.constexpr, ACC: tl.constexpr):
    """The 16 x 16 diagonal blocks of (I + A)^-1 (A strictly lower [BC, BC]), as a
    block-diagonal [BC, BC]: forward substitution, 15 row steps on all blocks at once."""
    rb = tl.arange(0, BC // 16)
    r = tl.arange(0, 16)
    same = (rb[:, None, None, None] == rb[None, None, :, None])                  # [NB, 1, NB, 1]
    A3 = tl.sum(tl.where(same, tl.reshape(A, [BC // 16, 16, BC // 16, 16]), 0.0), 2)         # [NB, 16, 16]
    eye = tl.where(r[:, None] == r[None, :], 1.0, 0.0).to(ACC)[None, :, :]
    X = eye + tl.zeros([BC // 16, 16, 16], dtype=ACC)
    for i in range(1, 16):  # row i of each block = e_i - sum_{j<i} A[i, j] (row j)
        a_i = tl.sum(tl.where(r[None, :, None] == i, A3, 0.0), 1)                 # [NB, 16]
        row = -tl.sum(a_i[:, :, None] * X, 1)                                     # [NB, 16]
        X = tl.where(r[None, :, None] == i, row[:, None, :] + eye, X)
    return tl.reshape(tl.where(same, X[:, :, None, :], 0.0), [BC, BC])


@triton.jit
def _merge(M, A, s: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr):
    """M, the inverse of the s-block-diagonal part of I + A, to that of its 2s-block-diagonal
    part: [[X1, 0], [L21, L22]]^-1 = [[X1, 0], [-X2 L21 X1, X2]], i.e. M - M L M with L the
    (lower, left) s-blocks of A in each 2s-block (M L M is zero but there)."""
    r = tl.arange(0, BC)
    low = ((r[:, None] // s) % 2 == 1) & (r[None, :] // s == r[:, None] // s - 1)
    L = tl.where(low, A, 0.0)
    return M - tl.dot(tl.dot(M, L, input_precision=PREC), M, input_precision=PREC)


@triton.jit
def _unit_lower_inv(A, BC: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """(I + A)^-1 for a strictly lower A [BC, BC], BC in 16, 32, 64: the 16 x 16 diagonal blocks
    by substitution, then merged to 32 and 64 by block products (log2(BC / 16) dependent steps
    instead of BC - 1 row steps)."""
    Tm = _inv16(A, BC, ACC)
    if BC >= 32:
        Tm = _merge(Tm, A, 16, BC, PREC)
    if BC >= 64:
        Tm = _merge(Tm, A, 32, BC, PREC)
    return Tm
