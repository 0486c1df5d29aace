"""The fast paths of Hope's torch backend held to their slow references in float64 (issue 11):
stacked generators (one read, one update for all) against one `mlp_memory` call each, the CMS
window loop's single pass against its two passes, `torch.compile`d hot loops against eager.
Outputs, states and every gradient, odd lengths, carried state."""
from __future__ import annotations

import pytest
import torch

import nlc
from nlc.backends.torch import generators as G
from nlc.backends.torch.deep_memory import MLPState, mlp_forward, mlp_memory

from .test_compile import small

TOL = dict(rtol=1e-12, atol=1e-12)


def close(a, b, msg=""):
    torch.testing.assert_close(a, b, **TOL, msg=msg)


# ------------------------------------------------------------------ stacked generators, functional

def make_gens(B, H, K, forms, momentum, seed=0):
    """Generators of the given (d_out, residual) forms as parameters [H, o, i] and as carried
    state [B, H, o, i] (random, so that every term counts)."""
    torch.manual_seed(seed)
    params = {f"g{i}": torch.nn.ParameterList([torch.nn.Parameter(0.3 * torch.randn(H, d, K, dtype=torch.float64)),
                                              torch.nn.Parameter(0.3 * torch.randn(H, K, K, dtype=torch.float64))])
              for i, (d, _) in enumerate(forms)}
    state = {}
    if momentum:
        for name, ps in params.items():
            for i, p in enumerate(ps):
                state[f"x.{name}.S{i}"] = torch.randn(B, *p.shape, dtype=torch.float64) * 0.1
    return params, state


@pytest.mark.parametrize("case", ["hope", "momentum_dot", "plain"])
@pytest.mark.parametrize("T", [16, 7, 37])
def test_stacked_update_equals_one_call_each(case, T):
    """`update_generators` on the stacked state equals `mlp_memory` per generator: the weights and
    momenta it leaves, and the gradients of everything it read, over whole and ragged chunks."""
    B, H, K, C = 2, 2, 6, 8
    forms = [(1, False), (K, True), (1, False), (K, True)] if case != "plain" else [(K, False), (K, True)]
    momentum = case == "momentum_dot"
    params, state = make_gens(B, H, K, forms, momentum)
    residual = tuple(r for _, r in forms)
    torch.manual_seed(1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, dtype=torch.float64), dim=-1).requires_grad_()
    eta = (0.1 * torch.rand(B, T, H, dtype=torch.float64)).requires_grad_()
    alpha = (0.9 + 0.1 * torch.rand(B, T, H, dtype=torch.float64)).requires_grad_()
    if case == "hope":          # Eq. 96: self-generated targets, retention, DGD erase, all shared
        v = torch.randn(B, T, H, K, dtype=torch.float64, requires_grad=True)
        args = dict(v=v, eta=eta, beta=None, alpha=alpha, erase=eta, objective="l2", self_target=True)
    elif case == "momentum_dot":  # given targets (one per generator, sized to it), momentum, dot
        v = tuple(torch.randn(B, T, H, d, dtype=torch.float64, requires_grad=True) for d, _ in forms)
        beta = tuple((0.5 * torch.rand(B, T, H, dtype=torch.float64)).requires_grad_() for _ in forms)
        args = dict(v=v, eta=eta, beta=beta, alpha=None, erase=None, objective="dot", self_target=False)
    else:
        v = torch.randn(B, T, H, K, dtype=torch.float64, requires_grad=True)
        args = dict(v=v, eta=0.05, beta=None, alpha=None, erase=None, objective="l2", self_target=False)
    leaves = [k, eta, alpha, *(v if isinstance(v, tuple) else (v,)), *[p for ps in params.values() for p in ps]]
    if momentum:
        leaves += list(args["beta"])

    def run(reference):
        with G.reference(reference):
            gens = G.generators(state, "x.", params, residual=residual, activation="silu", momentum=momentum, like=k)
            gens = G.update_generators(gens, k, args["v"], args["eta"], args["beta"], args["alpha"], args["erase"],
                                       objective=args["objective"], self_target=args["self_target"], chunk_size=C)
            new = {}
            G.save_generators(new, "x.", gens)
        loss = sum((t * torch.sin(torch.arange(t.numel(), dtype=t.dtype)).view_as(t)).sum() for t in new.values())
        return new, torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)

    (fast, g_fast), (ref, g_ref) = run(False), run(True)
    assert fast.keys() == ref.keys()
    for key in ref:
        assert fast[key].shape == ref[key].shape, key
        close(fast[key], ref[key], key)
    for i, (a, b) in enumerate(zip(g_fast, g_ref)):
        close(a, b, f"gradient {i}")


def test_auto_runs_generators_on_the_stacked_torch_scan():
    """backend='auto' runs the stacked torch scan, under autograd and without: one update of
    every generator per chunk dispatches fewer ops than a kernel call per generator per chunk
    (plan.AUTO_GENERATORS); only backend='triton' asks the dispatcher."""
    from unittest import mock
    B, T, H, K = 2, 9, 2, 6
    forms = [(1, False), (K, True)]
    params, state = make_gens(B, H, K, forms, False)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, K, dtype=torch.float64)

    def update(backend):
        gens = G.generators(state, "x.", params, residual=(False, True), activation="silu", momentum=False, like=k)
        return G.update_generators(gens, k, v, 0.05, chunk_size=16, backend=backend)
    with mock.patch("nlc.backends.dispatch.pick", return_value="torch") as pick:
        update("auto")                                # params require grad
        with torch.no_grad():
            update("auto")
        assert not pick.called
        update("triton")
        assert pick.called


def test_stacked_read_equals_one_read_each():
    B, T, H, K = 2, 5, 2, 6
    forms = [(1, False), (K, True), (K, False)]
    params, _ = make_gens(B, H, K, forms, False)
    gens = G.generators({}, "x.", params, residual=tuple(r for _, r in forms), activation="gelu", momentum=False,
                        like=torch.zeros(B))
    x = torch.randn(B, T, H, K, dtype=torch.float64)
    xs = tuple(torch.randn(B, T, H, K, dtype=torch.float64) for _ in forms)
    for inputs in (x, xs):
        reads = G.read_generators(gens, inputs)
        for g, ((d, r), ps) in enumerate(zip(forms, params.values())):
            xi = inputs[g] if isinstance(inputs, tuple) else x
            want = mlp_forward(xi.transpose(1, 2), list(ps), "gelu", r)[0].transpose(1, 2)
            assert reads[g].shape == (B, T, H, d)
            close(reads[g], want)
            close(G.read_generator(gens, f"g{g}", xi), want)


def test_stacked_state_round_trips():
    """Saved under each generator's own keys and shapes, read back unchanged."""
    B, H, K = 3, 2, 5
    params, state = make_gens(B, H, K, [(1, False), (K, True)], True)
    gens = G.generators(state, "x.", params, residual=(False, True), activation="silu", momentum=True,
                        like=torch.zeros(B))
    new = {}
    G.save_generators(new, "x.", gens)
    assert new["x.g0.W0"].shape == (B, H, 1, K) and new["x.g1.W0"].shape == (B, H, K, K)
    again = G.generators(new, "x.", params, residual=(False, True), activation="silu", momentum=True,
                         like=torch.zeros(B))
    for a, b in zip(gens.weights + gens.momenta, again.weights + again.momenta):
        assert torch.equal(a, b)
    st = mlp_memory(torch.zeros(B, 1, H, K), torch.zeros(B, 1, H, K), torch.zeros(B, 1, H, 1), 0.0,
                    initial_state=MLPState(tuple(new[f"x.g0.W{i}"] for i in range(2))), residual=False)[1]
    assert st.weights[0].shape == (B, H, 1, K)


# ------------------------------------------------------------------ whole models: fast vs reference

GENERATOR_SPECS = ["hope", "hope_heads"]
CMS_SPECS = ["hope", "hope_heads", "hope_attention"]


def model_of(name, tmp_path, seed=0, path=small):
    """The spec `path(name, tmp_path)` compiled in float64, its learned initial states drawn at
    random (they start at zero, which would hide a state that is dropped)."""
    torch.manual_seed(seed)
    model = nlc.compile(path(name, tmp_path)).double()
    for p in model.parameters():
        if p.dim() == 3:
            torch.nn.init.normal_(p, std=0.1)
    return model


def outputs(model, ids, cut, use_backward):
    """Logits and state of `ids` fed in two calls (cut at `cut`, the state carried), and the
    gradient of a loss of both, through `.backward()` or `torch.autograd.grad`."""
    first, state = model(ids[:, :cut])
    second, state = model(ids[:, cut:], state)
    logits = torch.cat([first, second], 1)
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}
    loss = (logits * logits.detach().sin()).sum() + sum((v * v.detach().cos()).sum() for v in tensors.values())
    params = list(model.parameters())
    if use_backward:
        model.zero_grad(set_to_none=True)
        loss.backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    else:
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    return logits.detach(), {k: v.detach() for k, v in tensors.items()}, state["cms.pending"], grads


@pytest.mark.parametrize("use_backward", [False, True], ids=["autograd.grad", "backward"])
@pytest.mark.parametrize("name", sorted(set(GENERATOR_SPECS + CMS_SPECS)))
def test_model_fast_paths_equal_the_references(name, use_backward, tmp_path):
    """Stacked generators and the CMS single pass against one call per generator and two passes
    per window: logits, states, the pending pair and every parameter's gradient, at 1e-12, for a
    sequence of odd length fed in two calls (the cut a multiple of every window)."""
    model = model_of(name, tmp_path)
    ids = torch.randint(0, 50, (2, 27), generator=torch.Generator().manual_seed(5))
    fast = outputs(model, ids, 16, use_backward)
    with G.reference():
        ref = outputs(model, ids, 16, use_backward)
    close(fast[0], ref[0], "logits")
    assert fast[1].keys() == ref[1].keys()
    for key in ref[1]:
        close(fast[1][key], ref[1][key], key)
    close(fast[2].logits.detach(), ref[2].logits.detach(), "pending logits")
    for (pname, _), a, b in zip(model.named_parameters(), fast[3], ref[3]):
        assert b.abs().sum() > 0 or a.abs().sum() == 0, pname
        close(a, b, pname)


def test_the_outer_gradient_reaches_every_parameter(tmp_path):
    model = model_of("hope", tmp_path)
    logits, _ = model(torch.randint(0, 50, (1, 19)))
    logits.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_a_cms_model_under_no_grad_matches(tmp_path):
    """Without the outer gradient, the in-context updates are the same."""
    model = model_of("hope_attention", tmp_path)
    ids = torch.randint(0, 50, (2, 21))
    logits, state = model(ids)
    with torch.no_grad():
        plain, plain_state = model(ids)
    close(plain, logits.detach())
    for k, v in state.items():
        if torch.is_tensor(v) and v.is_floating_point():
            close(plain_state[k], v.detach(), k)
    assert not plain.requires_grad


def test_backward_twice_needs_retain_graph(tmp_path):
    model = model_of("hope_attention", tmp_path)
    logits, _ = model(torch.randint(0, 50, (1, 20)))
    loss = logits.square().sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    loss.backward()                 # kept by retain_graph: the gradients double
    for p, g in zip(model.parameters(), first):
        close(p.grad, 2 * g)
    with pytest.raises(RuntimeError, match="a second time"):
        loss.backward()


def test_stacked_generators_dispatch_fewer_ops(tmp_path):
    """A regression guard for the point of it all: the stacked scan and the single CMS pass
    dispatch well under half the aten ops of one call per generator and two passes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    model = model_of("hope", tmp_path)
    ids = torch.randint(0, 50, (1, 32))
    counts = []
    for ref in (False, True):
        Count.n = 0
        with G.reference(ref), Count():
            logits, _ = model(ids)
            logits.sum().backward()
        counts.append(Count.n)
    assert counts[0] < 0.5 * counts[1], counts


# ------------------------------------------------------------------ torch.compile

def test_compiled_hot_loops_equal_eager(tmp_path):
    from nlc.backends.torch.compile import can_compile
    if not can_compile():
        pytest.skip("no C++ compiler: torch.compile cannot run here")
    eager = model_of("hope", tmp_path)
    model = nlc.compile(small("hope", tmp_path), compile=True).double()
    model.load_state_dict(eager.state_dict())
    assert model.compiled
    ids = torch.randint(0, 50, (2, 19))     # windows of 8: a ragged last window, a ragged chunk
    a, b = outputs(eager, ids, 8, False), outputs(model, ids, 8, False)
    close(b[0], a[0], "logits")
    for key in a[1]:
        close(b[1][key], a[1][key], key)
    for (pname, _), x, y in zip(eager.named_parameters(), b[3], a[3]):
        close(x, y, pname)


def test_without_a_cpp_compiler_the_model_runs_eager_and_says_so_once(tmp_path, monkeypatch):
    import torch._inductor.cpp_builder as builder

    from nlc.backends.torch import compile as C

    def none():
        raise RuntimeError("no C++ compiler found")
    monkeypatch.setattr(builder, "get_cpp_compiler", none)
    monkeypatch.setattr(C, "_WHY_NOT", [])
    with pytest.warns(RuntimeWarning, match="needs a C\\+\\+ compiler"):
        model = nlc.compile(small("hope", tmp_path), compile=True)
    assert model.compiled is False
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nlc.compile(small("hope", tmp_path), compile=True).compiled is False   # said once
    logits, _ = model(torch.randint(0, 50, (1, 9)))
    assert torch.isfinite(logits).all()


def test_train_compile_option_reaches_the_model(tmp_path, monkeypatch):
    from nlc.runtime.train import TrainConfig
    seen = {}
    real = nlc.compile

    def spy(spec, **kw):
        seen.update(kw)
        return real(spec, **kw)
    monkeypatch.setattr(nlc, "compile", spy, raising=False)
    from nlc.runtime import train as T
    cfg = TrainConfig(spec=small("transformer", tmp_path), steps=1, batch=2, context=8, out=tmp_path / "run",
                      compile=True, log_every=1, eval_every=1, eval_batches=1)
    T.train(cfg, log=lambda s: None)
    assert seen.get("compile") is True
