"""Which backend runs an op: ``backend="torch" | "triton" | "auto"``.

``"auto"`` sends CUDA tensors to Triton (when it imports and the op has a kernel for the
arguments) and everything else to torch. ``"triton"`` runs the kernels on CUDA tensors compiled
and on CPU tensors under Triton's interpreter; what the kernels cannot take is a ``ValueError``
that names ``backend="torch"``.
"""
from __future__ import annotations

import importlib
import os
import sys

__all__ = ["BACKENDS", "pick", "triton_error"]

BACKENDS = ("auto", "torch", "triton")
_triton_error: list = []      # memo: [] unknown, [None] usable, [message] not usable


def triton_error() -> str | None:
    """None when Triton imports, else why not. Where torch sees no GPU and Triton is not imported
    yet, its interpreter is chosen first (``TRITON_INTERPRET=1``): Triton decides that at import."""
    if not _triton_error:
        try:
            if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ:
                import torch
                if not torch.cuda.is_available():
                    os.environ["TRITON_INTERPRET"] = "1"
            import triton  # noqa: F401
            importlib.import_module("triton.language")
            _triton_error.append(None)
        except Exception as e:  # ImportError, or a broken install
            _triton_error.append(f"{type(e).__name__}: {e}")
    return _triton_error[0]


def interpreter_ready() -> bool:
    """Whether Triton was imported with its interpreter on (CPU tensors need it: the language's
    own library functions, tl.sum and the like, are interpreted only when it was)."""
    import triton.language as tl
    return type(tl.sum).__name__ != "JITFunction"


def _why_not_here(q) -> str | None:
    """Why no Triton kernel can take tensors like ``q`` here (None: one can)."""
    from nlc.backends.triton.delta import DTYPES
    if q.dtype not in DTYPES:
        return f"the Triton kernels take {', '.join(str(d) for d in DTYPES)}, not {q.dtype}"
    if q.device.type not in ("cuda", "cpu"):
        return f"the Triton kernels run on CUDA (or the CPU interpreter), not on {q.device.type}"
    if triton_error():
        return f"Triton is not usable here ({triton_error()})"
    if not q.is_cuda and not interpreter_ready():
        return ("CPU tensors run under Triton's interpreter, which must be chosen before triton is "
                "imported: set TRITON_INTERPRET=1 in the environment (nlc does so itself when no GPU "
                "is visible)")
    return None


def pick(op: str, backend: str, q, *, why_not: str | None = None) -> str:
    """"torch" or "triton" for an op on tensors like ``q``.

    ``why_not``: why the op's arguments have no kernel (None: they have one).
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and q.device.type != "cuda"):
        return "torch"
    reason = why_not or _why_not_here(q)
    if backend == "auto":
        return "triton" if reason is None and q.is_cuda else "torch"
    if reason is not None:
        raise ValueError(f"{op}: backend='triton': {reason}; use backend='torch'")
    return "triton"
