"""CMS models fed in pieces cut anywhere: a call that ends inside a CMS window leaves it open
(`state['cms.open']`: its tokens and the state at its start) and the next call runs it again from
its start, so logits, final state and parameter gradients equal the whole sequence's, token by
token included, in the one-pass form and in the two-pass reference (float64)."""
from __future__ import annotations

import pytest
import torch

from nlc.backends.torch import generators
from tests.backends.test_streaming import close, fed, model_of, same_grads

T = 23                                   # the small specs' CMS window is 8: 23 ends inside one
CUTS = {"pieces": [3, 7, 16], "tokens": list(range(1, T)),
        "empty": [0, 3, 3, 16, 16]}     # pieces of 0 tokens between: no logits, the state as it was


def leaves(x, path=""):
    """(path, tensor) for every tensor in a state value: tensors, Pending, the open window, lists
    and dicts."""
    if isinstance(x, torch.Tensor):
        yield path, x
    elif isinstance(x, dict):
        for k in sorted(x):
            yield from leaves(x[k], f"{path}.{k}")
    elif isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            yield from leaves(v, f"{path}[{i}]")


def same_state(a: dict, b: dict):
    la, lb = list(leaves(a)), list(leaves(b))
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype, p
        close(x, y, p)


@pytest.mark.parametrize("reference", [False, True], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("cut", sorted(CUTS))
@pytest.mark.parametrize("name", ["hope", "hope_attention"])
def test_cms_pieces_equal_the_whole(name, cut, reference, tmp_path):
    model = model_of(name, tmp_path)
    ids = torch.randint(0, 50, (2, T), generator=torch.Generator().manual_seed(2))
    probe = torch.randn(2, T, 50, dtype=torch.float64)
    with generators.reference(reference):
        whole, state = model(ids)
        pieces, carried = fed(model, ids, CUTS[cut])
    assert state["cms.open"][0].shape == (2, T % 8)
    close(pieces, whole, "logits")
    same_state(carried, state)
    same_grads(model, pieces, whole, probe, lambda n: "cms" in n)


def test_dropping_the_open_window_changes_the_logits(tmp_path):
    """The test can fail: carried without its open window, a piece's in-context gradient stops at
    the cut and the pieces no longer equal the whole."""
    model = model_of("hope", tmp_path)
    ids = torch.randint(0, 50, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole, _ = model(ids)
        pieces, _ = fed(model, ids, CUTS["pieces"], lambda st: {k: v for k, v in st.items() if k != "cms.open"})
    assert (pieces - whole).abs().max() > 1e-8
