"""Which Triton kernels a call launches: a test holding a kernel to torch first shows that the
kernel ran (so the comparison is not torch against torch)."""
from __future__ import annotations


def launches(monkeypatch, mod, names) -> list:
    """Record the launches of the kernels ``names`` of module ``mod`` (``kernel[grid](...)``), in
    order, into the list returned; the kernels still run."""
    calls = []

    class Spy:
        def __init__(self, name, real):
            self.name, self.real = name, real

        def __getitem__(self, grid):
            calls.append(self.name)
            return self.real[grid]
    for name in names:
        monkeypatch.setattr(mod, name, Spy(name, getattr(mod, name)))
    return calls
