"""`nlc.compile`: a spec (or path) to a torch.nn.Module, by generating its source and running it."""
from __future__ import annotations

from pathlib import Path

from nlc import spec as S


def compile_model(spec, backend: str = "auto"):
    """The model of a spec: `forward(input_ids, state=None) -> (logits, state)`.

    `backend`: who runs the levels that have Triton kernels (`model.backend`, changeable later):
    "torch" (the reference), "triton" (compiled on CUDA, Triton's interpreter on CPU) or "auto"
    (Triton for CUDA tensors, torch otherwise). Levels with no kernel run on torch whatever the
    backend; `nlc build --backend triton` lists them and says why.
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
    return model
