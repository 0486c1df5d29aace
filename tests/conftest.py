import os

# Triton's interpreter must be chosen before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

try:  # test tensors are tiny: one thread avoids OpenMP spin-waits, which cost 10-30x on a busy 2-core machine
    import torch
    torch.set_num_threads(1)
except ImportError:
    pass


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """Fill torch.empty with NaN so an output element that a kernel never writes fails the test."""
    try:
        import torch
    except ImportError:  # the core tests run without torch
        yield
        return
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    def empty_like(*args, **kwargs):
        t = real_empty_like(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield
