"""nlc: the Nested Learning compiler.

`import nlc` never imports torch: the torch-facing names (`ops`, `compile`,
`compile_optimizer`) are resolved lazily on first use.
"""
from nlc.diagnostics import SpecError
from nlc.api import load, lower

__all__ = ["SpecError", "load", "lower", "compile", "compile_optimizer", "ops"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "ops":
        from nlc.backends.torch import ops
        return ops
    if name == "compile":
        from nlc.backends.torch.compile import compile_model
        return compile_model
    if name == "compile_optimizer":
        from nlc.backends.torch.optim import compile_optimizer
        return compile_optimizer
    raise AttributeError(f"module 'nlc' has no attribute {name!r}")
