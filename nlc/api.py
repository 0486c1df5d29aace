"""The stable Python API of the core: `load` a spec, `lower` it to a level graph."""
from __future__ import annotations

from pathlib import Path

from nlc import spec as S


def load(path: str | Path) -> S.Spec:
    """Parse, validate and check a spec file (.yaml or .nl). Raises nlc.SpecError."""
    from nlc.loader import load_located
    return load_located(path).spec


def lower(spec):
    """The level graph of a spec (or of a path to one)."""
    from nlc.graph import lower as _lower
    return _lower(spec)
