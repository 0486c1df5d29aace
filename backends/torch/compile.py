"""`nlc.compile`: a spec (or path) to a torch.nn.Module, by generating its source and running it.

With ``compile=True`` the model's hot loops run under ``torch.compile``: the functions marked
:func:`hot` (the stacked generators' chunk step and read, the inner loop of Hope's scan), each
compiled once per process for each shape it meets and cached (inductor also keeps its compiled
code on disk, so a later process compiles faster). Only those: compiling a whole block traced its
loops unrolled and took minutes for no further gain (``benchmarks/BENCHMARKS.md``). Where
inductor cannot compile (no C++ compiler for CPU code), the model runs eager and says so once.
"""
from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from nlc import spec as S

__all__ = ["compile_model", "compiled", "hot", "can_compile"]

_ON: ContextVar[bool] = ContextVar("nlc_compiled", default=False)
_CACHE: dict = {}          # function -> its torch.compile'd form (one per process)
_WHY_NOT: list = []        # memo: [] unknown, [None] can compile, [reason] cannot


def compile_model(spec, backend: str = "auto", compile: bool = False):
    """The model of a spec: `forward(input_ids, state=None) -> (logits, state)`.

    `backend`: who runs the levels that have Triton kernels (`model.backend`, changeable later):
    "torch" (the reference), "triton" (compiled on CUDA, Triton's interpreter on CPU) or "auto"
    (Triton for CUDA tensors, torch otherwise). Levels with no kernel run on torch whatever the
    backend; `nlc build --backend triton` lists them and says why.

    `compile`: run the model's hot loops under `torch.compile` (`model.compiled`, changeable
    later; a model without one runs as it is). Without a C++ compiler it runs eager, with a warning.
    """
    from nlc.backends.dispatch import BACKENDS
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(map(repr, BACKENDS))}")
    from nlc.backends.torch.codegen import generate, load_source
    source_name = ""
    if isinstance(spec, (str, Path)):
        from nlc.loader import load_located
        source_name = str(spec)
        spec = load_located(spec).spec
    if not isinstance(spec, S.ModelSpec):
        raise TypeError(f"nlc.compile takes a model spec; `{spec.name}` is an optimizer (use nlc.compile_optimizer)")
    module = load_source(generate(spec, source_name, backend), f"nlc_{spec.name}")
    model = module.Model()
    model.source = module.__dict__.get("__doc__", "")
    model.compiled = bool(compile) and can_compile()
    return model


def can_compile() -> bool:
    """Whether torch.compile's inductor can compile here; if not, warn once and say why."""
    if not _WHY_NOT:
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
            get_cpp_compiler()
            _WHY_NOT.append(None)
        except Exception as e:  # no g++ / clang++ (or CXX names none)
            _WHY_NOT.append(f"{type(e).__name__}: {e}".strip())
            warnings.warn(f"nlc: torch.compile needs a C++ compiler for CPU code and found none "
                          f"({_WHY_NOT[0][:200]}); the model runs eager", RuntimeWarning, stacklevel=3)
    return _WHY_NOT[0] is None


@contextmanager
def compiled(on: bool = True):
    """Within this block the functions marked :func:`hot` run compiled (`Model.run` opens it
    with `model.compiled`)."""
    token = _ON.set(bool(on))
    try:
        yield
    finally:
        _ON.reset(token)


def hot(fn):
    """Mark a pure tensor function as worth compiling: inside :func:`compiled` it runs as
    ``torch.compile(fn, dynamic=False)``, compiled once per process (per shape it meets)."""
    @functools.wraps(fn)
    def run(*args):
        if not _ON.get():
            return fn(*args)
        c = _CACHE.get(fn)
        if c is None:
            import torch
            c = _CACHE[fn] = torch.compile(fn, dynamic=False)
        return c(*args)
    run.eager = fn
    return run
