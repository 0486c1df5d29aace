"""Generated models fed in pieces cut anywhere: the MLP and momentum memories' carried state holds
the open chunk (`key.offset`, and inside a chunk its anchor `key.A{i}` / `key.A`), so logits, final
state and gradients equal the whole sequence's, token by token included (float64)."""
from __future__ import annotations

import pytest
import torch

from tests.backends import test_speedups as speedups
from tests.backends.test_compile import small

T = 23                                   # odd, no multiple of the chunks (8 for titans, 4 for ttt_mlp)
CUTS = {"pieces": [3, 7, 16], "tokens": list(range(1, T)),
        "empty": [0, 3, 3, 16, 16]}     # pieces of 0 tokens between: no logits, the state as it was
SPECS = ["titans", "ttt_mlp", "titans_linear", "hope_nocms", "hope_heads_nocms"]


def spec_path(name, tmp_path):
    """A shipped spec at test size (`titans_linear`: a matrix memory with momentum, momentum_memory);
    `*_nocms` is Hope without its CMS level (its stacked generators M_k, M_v, M_eta, M_alpha, chunk
    4, and M_mem, chunk 8; the CMS's own streaming is tested in test_streaming_cms.py)."""
    if name.endswith("_nocms"):
        p = small(name[:-len("_nocms")], tmp_path)
        text = p.read_text()
        assert "block: [M_mem, cms]" in text
        p.write_text(text.replace("block: [M_mem, cms]", "block: [M_mem]"))
        return p
    return small(name, tmp_path)


def model_of(name, tmp_path, seed=0):
    return speedups.model_of(name, tmp_path, seed, path=spec_path)


def fed(model, ids, cuts, carry=lambda st: st):
    """Logits of `ids` fed in pieces cut at `cuts`, the state carried (through `carry`)."""
    outs, state = [], None
    for a, b in zip([0, *cuts], [*cuts, ids.shape[1]]):
        logits, state = model(ids[:, a:b], None if state is None else carry(state))
        outs.append(logits)
    return torch.cat(outs, 1), state


def chunk_of(key):
    """The chunk of the level a state key belongs to, at test size."""
    return 8 if key.split(".")[1] in ("memory", "M_mem") else 4


def close(a, b, what):
    err = (a - b).abs().max().item()
    assert err <= 1e-10, f"{what}: {err:.3g}"
    return err


@pytest.mark.parametrize("cut", sorted(CUTS))
@pytest.mark.parametrize("name", SPECS)
def test_pieces_equal_the_whole(name, cut, tmp_path):
    model = model_of(name, tmp_path)
    ids = torch.randint(0, 50, (2, T))
    probe = torch.randn(2, T, 50, dtype=torch.float64)
    whole, state = model(ids)
    pieces, carried = fed(model, ids, CUTS[cut])
    close(pieces, whole, "logits")
    assert carried.keys() == state.keys()
    for k, v in state.items():
        assert carried[k].dtype == v.dtype, k
        close(carried[k], v, k)
    offsets = {k: v for k, v in state.items() if k.endswith(".offset")}
    assert len(offsets) >= 2 and all(v.device.type == "cpu" and v.dtype == torch.long and v.dim() == 0
                                     for v in offsets.values())
    assert all(int(v) == T % chunk_of(k) for k, v in offsets.items())
    same_grads(model, pieces, whole, probe, lambda n: "_W." in n or n.endswith("_M0"))


def same_grads(model, pieces, whole, probe, memory):
    """The parameters' gradients of (logits * probe).sum() fed in pieces equal the whole's, and
    some parameter that `memory(name)` picks gets a nonzero one."""
    names, params = zip(*model.named_parameters())
    g_whole = torch.autograd.grad((whole * probe).sum(), params, allow_unused=True)
    g_pieces = torch.autograd.grad((pieces * probe).sum(), params, allow_unused=True)
    for n, a, b in zip(names, g_whole, g_pieces):
        assert (a is None) == (b is None), n
        if a is not None:
            close(b, a, f"grad {n}")
    assert any(a is not None and a.abs().max() > 0 for n, a in zip(names, g_whole) if memory(n))


@pytest.mark.parametrize("name", SPECS)
def test_recurrent_token_by_token_equals_chunked_whole(name, tmp_path):
    """The oracle (every memory token by token) fed one token per call equals the chunked form
    fed the whole sequence."""
    model = model_of(name, tmp_path, seed=1)
    ids = torch.randint(0, 50, (2, T))
    whole, state = model(ids)
    model.mode = "recurrent"
    tokens, carried = fed(model, ids, CUTS["tokens"])
    close(tokens, whole, "logits")
    for k, v in state.items():
        close(carried[k], v, k)


@pytest.mark.parametrize("name", SPECS)
def test_at_a_chunk_boundary_the_state_is_the_former_one(name, tmp_path):
    """At offset 0 the state holds no anchor, only `.offset` = 0 beside the former keys."""
    model = model_of(name, tmp_path)
    _, state = model(torch.randint(0, 50, (2, 16)))
    offsets = [k for k in state if k.endswith(".offset")]
    assert len(offsets) >= 2 and all(int(state[k]) == 0 for k in offsets)
    assert not any(k.split(".")[-1].startswith("A") for k in state)


@pytest.mark.parametrize("drop", ["offset", "anchor"])
@pytest.mark.parametrize("name", SPECS)
def test_dropping_the_open_chunk_changes_the_logits(name, drop, tmp_path):
    """The test can fail: carried without its offset (the anchor then ignored), or with the anchor
    replaced by the running weights, the pieces no longer equal the whole."""
    model = model_of(name, tmp_path)
    ids = torch.randint(0, 50, (2, T))
    whole, _ = model(ids)

    def lose(st):
        st = dict(st)
        for k in [k for k in st if k.split(".")[-1].startswith("A") or k.endswith(".offset")]:
            if drop == "offset" and k.endswith(".offset"):
                del st[k]
            if drop == "anchor" and not k.endswith(".offset"):
                base, i = k.rsplit(".", 1)
                st[k] = st[f"{base}.{'W' + i[1:] if i[1:] else 'M'}"]
        return st

    pieces, _ = fed(model, ids, CUTS["pieces"], lose)
    assert (pieces - whole).abs().max() > 1e-8


@pytest.mark.parametrize("case", ["hope", "momentum_dot"])
def test_stacked_generators_fed_in_pieces(case):
    """`update_generators` and `read_generators` on the stacked state: fed in pieces cut anywhere
    (the scan's spans), the reads at each chunk's anchor and the final state (weights, momenta,
    offset, anchor) equal the whole, stacked and one `mlp_memory` call each (the reference), with
    the gradients of everything read."""
    from nlc.backends.torch import generators as G
    from tests.backends.test_speedups import make_gens
    B, H, K, C = 2, 2, 6, 8
    forms = [(1, False), (K, True), (1, False), (K, True)]
    momentum = case == "momentum_dot"
    params, state = make_gens(B, H, K, forms, momentum)
    torch.manual_seed(1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, dtype=torch.float64), dim=-1).requires_grad_()
    eta = (0.1 * torch.rand(B, T, H, dtype=torch.float64)).requires_grad_()
    alpha = (0.9 + 0.1 * torch.rand(B, T, H, dtype=torch.float64)).requires_grad_()
    if case == "hope":
        v = torch.randn(B, T, H, K, dtype=torch.float64, requires_grad=True)
        args = dict(v=v, beta=None, erase=eta, objective="l2", self_target=True)
        leaves = [k, eta, alpha, v]
    else:
        v = tuple(torch.randn(B, T, H, d, dtype=torch.float64, requires_grad=True) for d, _ in forms)
        beta = (0.5 * torch.rand(B, T, H, dtype=torch.float64)).requires_grad_()
        args = dict(v=v, beta=beta, erase=None, objective="dot", self_target=False)
        leaves = [k, eta, alpha, *v, beta]
    leaves += [p for ps in params.values() for p in ps]

    def run(cuts, reference):
        gens = G.generators(state, "x.", params, residual=tuple(r for _, r in forms), activation="silu",
                            momentum=momentum, like=k)
        reads = []
        with G.reference(reference):
            for a, b in zip([0, *cuts], [*cuts, T]):
                for c0, c1 in G.spans(b - a, C, gens.offset):
                    s = slice(a + c0, a + c1)
                    def part(x, s=s):
                        return x if x is None else tuple(t[:, s] for t in x) if isinstance(x, tuple) else x[:, s]
                    reads += [torch.cat(G.read_generators(gens, k[:, s]), -1)]
                    gens = G.update_generators(gens, k[:, s], part(args["v"]), eta[:, s], part(args["beta"]),
                                               alpha[:, s], part(args["erase"]), objective=args["objective"],
                                               self_target=args["self_target"], chunk_size=C)
        new = {}
        G.save_generators(new, "x.", gens)
        reads = torch.cat(reads, 1)
        probe = torch.sin(torch.arange(reads.numel(), dtype=reads.dtype)).view_as(reads)
        loss = (reads * probe).sum() + sum((t * torch.cos(torch.arange(t.numel(), dtype=t.dtype)).view_as(t)).sum()
                                           for t in new.values() if t.is_floating_point())
        return reads, new, torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)

    whole = run([], False)
    assert int(whole[1]["x.g0.offset"]) == T % C and "x.g0.A0" in whole[1]
    for cuts, reference in (([3, 7, 16], False), (list(range(1, T)), False), ([5, 11], True), ([], True)):
        reads, new, grads = run(cuts, reference)
        close(reads, whole[0], f"reads {cuts} {reference}")
        assert new.keys() == whole[1].keys()
        for key, t in whole[1].items():
            close(new[key], t, key)
        for i, (a, b) in enumerate(zip(grads, whole[2])):
            close(a, b, f"gradient {i}")


@pytest.mark.parametrize("name", ["hope_nocms"])
def test_dropping_the_generators_open_chunk_changes_the_logits(name, tmp_path):
    """The generators' own offsets matter (M_mem's kept): without them the pieces differ."""
    model = model_of(name, tmp_path)
    ids = torch.randint(0, 50, (2, T))
    whole, _ = model(ids)
    keep = lambda st: {k: v for k, v in st.items() if not (k.endswith(".offset") and ".M_mem." not in k)}  # noqa: E731
    pieces, _ = fed(model, ids, CUTS["pieces"], keep)
    assert (pieces - whole).abs().max() > 1e-8
