# A part: a per-head workspace of per-token rows, [B*H, NT, D] (a line `# {include workspace}`),
# that the skeletons with a sequential state pass fill in one kernel and read in the next
# (skeleton 1's and 1d's). Offsets are int64; rows past NT and columns past D are masked.
import triton
import triton.language as tl


@triton.jit
def _ws(ptr, hd, n, NT, D, c0, BC: tl.constexpr, BD: tl.constexpr):
    """Pointers and mask: chunk n, columns c0 .. c0+BD of a per-head workspace [B*H, NT, D]."""
    rows = n * BC + tl.arange(0, BC)
    cols = c0 + tl.arange(0, BD)
    offs = (hd.to(tl.int64) * NT + rows[:, None].to(tl.int64)) * D + cols[None, :]
    return ptr + offs, (rows[:, None] < NT) & (cols[None, :] < D)
