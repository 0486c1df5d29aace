# A part of skeleton 2 (mlp_chunk.py), included where the level has an L2 objective or a
# self-generated target: the backward's second walk over the hidden blocks, the error's own paths
# err = y - tau with y = act(k H2) H1 [+ k] (L2) and tau = act(v H2) H1 [+ v] (SELF_TARGET, unless
# DETACH), from err's cotangent (e_ws slot 0, complete once the first walk is done). Per hidden
# block: dy H1^T summed over d_out's slices, k H2 and v H2 over D's, then H1's cotangent slice by
# slice, and H2's, dk's and dv's, read, added to and written back (a barrier between each slice's
# reads and its writes).
import triton
import triton.language as tl
from mlp_chunk import L2, SELF_TARGET  # noqa: F401  its flags
from mlp_chunk import _act, _load, _mat, _rows, _store  # and helpers
from mlp_chunk_bwd import _sl


@triton.jit
def _err_paths(k_ptr, v_ptr, w1s_ptr, w2s_ptr, dw1_ptr, dw2_ptr, dk_ptr, dv_ptr, e_ws_ptr, hd, n, N, t0,
               T, H, D, HID, DO, DV, BC: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr, BJ: tl.constexpr,
               DETACH: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Chunk n's gradient through err's own paths into the anchor cotangents dw1, dw2 (in place)
    and the chunk's rows of dk (L2) and dv (SELF_TARGET)."""
    for j0 in range(0, HID, BJ):
        dyH = tl.zeros([BC, BJ], dtype=ACC)                         # err's cotangent times H1^T
        for u0 in range(0, DO, BK):
            H1 = _load(_mat(w1s_ptr, hd, n, N, DO, HID, j0, u0, BJ, BK), ACC)
            dyH += tl.dot(_load(_sl(e_ws_ptr, hd, 0, 3, u0, BO, BC, BK), ACC), tl.trans(H1), input_precision=PREC)
        if L2:
            pk = tl.zeros([BC, BJ], dtype=ACC)                      # k H2
        if SELF_TARGET:
            pv = tl.zeros([BC, BJ], dtype=ACC)                      # v H2
        for s0 in range(0, D, BK):
            H2 = _load(_mat(w2s_ptr, hd, n, N, HID, D, s0, j0, BK, BJ), ACC)
            if L2:
                pk += tl.dot(_load(_rows(k_ptr, t0, T, H, D, hd, s0, BC, BK), ACC), H2, input_precision=PREC)
            if SELF_TARGET:
                if not DETACH:
                    pv += tl.dot(_load(_rows(v_ptr, t0, T, H, DV, hd, s0, BC, BK), ACC), H2, input_precision=PREC)
        cy = tl.zeros([BC, BJ], dtype=ACC)                          # H1's cotangent is cy^T dy
        if L2:
            ak, dak = _act(pk)
            dpk = dyH * dak
            cy += ak
        if SELF_TARGET:
            if not DETACH:
                av, dav = _act(pv)
                dpv = -dyH * dav
                cy -= av
        for u0 in range(0, DO, BK):
            dy = _load(_sl(e_ws_ptr, hd, 0, 3, u0, BO, BC, BK), ACC)
            nH1 = _load(_mat(dw1_ptr, hd, 0, 1, DO, HID, j0, u0, BJ, BK), ACC)
            nH1 += tl.dot(tl.trans(cy), dy, input_precision=PREC)
            tl.debug_barrier()
            _store(_mat(dw1_ptr, hd, 0, 1, DO, HID, j0, u0, BJ, BK), nH1)
        for s0 in range(0, D, BK):
            H2 = _load(_mat(w2s_ptr, hd, n, N, HID, D, s0, j0, BK, BJ), ACC)
            nH2 = _load(_mat(dw2_ptr, hd, 0, 1, HID, D, s0, j0, BK, BJ), ACC)
            if L2:
                k = _load(_rows(k_ptr, t0, T, H, D, hd, s0, BC, BK), ACC)
                dk = _load(_rows(dk_ptr, t0, T, H, D, hd, s0, BC, BK), ACC)
                dk += tl.dot(dpk, tl.trans(H2), input_precision=PREC)
                nH2 += tl.dot(tl.trans(k), dpk, input_precision=PREC)
            if SELF_TARGET:
                if not DETACH:
                    v = _load(_rows(v_ptr, t0, T, H, DV, hd, s0, BC, BK), ACC)
                    dv = _load(_rows(dv_ptr, t0, T, H, DV, hd, s0, BC, BK), ACC)
                    dv += tl.dot(dpv, tl.trans(H2), input_precision=PREC)
                    nH2 += tl.dot(tl.trans(v), dpv, input_precision=PREC)
            tl.debug_barrier()
            _store(_mat(dw2_ptr, hd, 0, 1, HID, D, s0, j0, BK, BJ), nH2)
            if L2:
                _store(_rows(dk_ptr, t0, T, H, D, hd, s0, BC, BK), dk)
            if SELF_TARGET:
                if not DETACH:
                    _store(_rows(dv_ptr, t0, T, H, DV, hd, s0, BC, BK), dv)
        tl.debug_barrier()
