"""Compiled optimizer specs against torch's optimizers, the optimizer object, and located mistakes.

Everything runs in float64 on a gradient stream from a seeded generator: at step t the loss is
sum_p 1/2 |A_t vec(p) - y_t|^2 with fresh random A_t, y_t, so gradients depend on the parameters
(the trajectories must agree, not just single updates) and change from step to step. The
M3 family and delta momentum against transcriptions of the maths: ``test_optim_transcriptions``.
"""
import copy
import io
import math

import pytest
import torch

import nlc
from nlc.backends.torch import optim as O
from nlc.backends.torch import optim_lanes as lanes
from nlc.backends.torch.optim import compile_optimizer

F64 = torch.float64
SHAPES = [(5, 3), (3, 6), (4,), (2, 3, 2), ()]
MATRICES = [(6, 4), (4, 6), (5, 5)]


# ---------------------------------------------------------------- the gradient stream

def params_of(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=F64) for s in shapes]


def stream_of(shapes, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(8, max(1, math.prod(s)), generator=g, dtype=F64), torch.randn(8, generator=g, dtype=F64))
             for s in shapes] for _ in range(steps)]


def loss_at(params, batch):
    return sum(0.5 * ((A @ p.reshape(-1) - y) ** 2).sum() for p, (A, y) in zip(params, batch))


def grads_at(params, batch):
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    loss_at(ps, batch).backward()
    return [p.grad for p in ps]


def trajectory(make_opt, params0, stream):
    """Parameters after each step of an optimizer built by `make_opt(params)`."""
    ps = [p.clone().requires_grad_(True) for p in params0]
    opt = make_opt(ps)
    out = []
    for batch in stream:
        opt.zero_grad()
        loss_at(ps, batch).backward()
        opt.step()
        out.append([p.detach().clone() for p in ps])
    return out


def max_diff(a, b):
    return max((x - y).abs().max().item() if x.numel() else 0.0 for sa, sb in zip(a, b) for x, y in zip(sa, sb))


# ---------------------------------------------------------------- AdamW, SGD, Muon against torch

@pytest.mark.parametrize("hyper", [{}, {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}])
def test_adamw_equals_torch(hyper):
    p0, stream = params_of(SHAPES), stream_of(SHAPES, 8)
    ours = trajectory(lambda ps: compile_optimizer("adamw", ps, **hyper), p0, stream)
    theirs = trajectory(lambda ps: torch.optim.AdamW(ps, foreach=False, **hyper), p0, stream)
    assert max_diff(ours, theirs) < 1e-13


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_equals_torch(nesterov):
    p0, stream = params_of(SHAPES), stream_of(SHAPES, 8)
    hyper = dict(lr=0.02, momentum=0.8, nesterov=nesterov, weight_decay=0.05)
    ours = trajectory(lambda ps: compile_optimizer("sgd_momentum", ps, **hyper), p0, stream)
    theirs = trajectory(lambda ps: torch.optim.SGD(ps, foreach=False, **hyper), p0, stream)
    assert max_diff(ours, theirs) < 1e-13


def _torch_ns_float64(grad, ns_coefficients, ns_steps, eps):
    """torch.optim._muon._zeropower_via_newtonschulz line for line, minus its cast to bfloat16."""
    a, b, c = ns_coefficients
    X = grad.clone()
    if grad.size(0) > grad.size(1):
        X = X.T
    X.div_(X.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram = X @ X.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        X = torch.addmm(X, update, X, beta=a)
    return X.T if grad.size(0) > grad.size(1) else X


@pytest.mark.parametrize("hyper", [{}, {"lr": 0.02, "momentum": 0.9, "nesterov": False, "weight_decay": 0.01, "ns_steps": 3}])
def test_muon_equals_torch(hyper, monkeypatch):
    # torch.optim.Muon runs Newton-Schulz in bfloat16; nlc runs it in the parameter's dtype. With
    # torch's NS replaced by the same code in float64 (only the cast removed), everything else
    # (EMA buffer, Nesterov lerp, adjust_lr "original", decoupled decay, eps) is torch's own code,
    # and the trajectories agree to float64 rounding (< 1e-12 over 8 steps, tall/wide/square).
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", _torch_ns_float64)
    p0, stream = params_of(MATRICES), stream_of(MATRICES, 8)
    ours = trajectory(lambda ps: compile_optimizer("muon", ps, **hyper), p0, stream)
    theirs = trajectory(lambda ps: torch.optim.Muon(ps, **hyper), p0, stream)
    assert max_diff(ours, theirs) < 1e-12


def test_muon_close_to_torch_bfloat16():
    # Unpatched torch Muon (bfloat16 NS) on float32 parameters: one step agrees to bfloat16 rounding
    # of the orthogonalised update, a few per cent of the step lr * sqrt(max(1, rows / cols)).
    p0 = [p.float() for p in params_of(MATRICES)]
    stream = [[(A.float(), y.float()) for A, y in b] for b in stream_of(MATRICES, 1)]
    lr = 0.02
    ours = trajectory(lambda ps: compile_optimizer("muon", ps, lr=lr), p0, stream)
    theirs = trajectory(lambda ps: torch.optim.Muon(ps, lr=lr), p0, stream)
    assert max_diff(ours, theirs) < 0.05 * lr * math.sqrt(1.5)


def test_muon_rest_is_adamw():
    # muon delegates parameters with fewer than 2 dims to `adamw(lr=lr)`.
    shapes = [(4,), ()]
    p0, stream = params_of(shapes), stream_of(shapes, 5)
    ours = trajectory(lambda ps: compile_optimizer("muon", ps, lr=0.03), p0, stream)
    theirs = trajectory(lambda ps: torch.optim.AdamW(ps, lr=0.03, foreach=False), p0, stream)
    assert max_diff(ours, theirs) < 1e-13


# ---------------------------------------------------------------- the optimizer object

@pytest.mark.parametrize("name", ["m3", "muon", "adamw", "m3_ema"])
def test_state_dict_resumes_identical_trajectory(name):
    shapes = [(5, 3), (5, 3), (4, 6), (4,)]
    p0, stream = params_of(shapes), stream_of(shapes, 9)
    hyper = {"slow_every": 3} if name.startswith("m3") else {}
    full = trajectory(lambda ps: compile_optimizer(name, ps, **hyper), p0, stream)

    ps = [p.clone().requires_grad_(True) for p in p0]
    opt = compile_optimizer(name, ps, **hyper)
    for batch in stream[:4]:                           # stop mid-block (blocks of 3)
        opt.zero_grad()
        loss_at(ps, batch).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    resumed = [p.detach().clone().requires_grad_(True) for p in ps]
    opt2 = compile_optimizer(name, resumed, **hyper)
    opt2.load_state_dict(torch.load(buf))
    for t, batch in enumerate(stream[4:], start=4):
        opt2.zero_grad()
        loss_at(resumed, batch).backward()
        opt2.step()
        assert all(torch.equal(a.detach(), b) for a, b in zip(resumed, full[t]))


def test_closure_and_zero_grad():
    p0, stream = params_of(SHAPES), stream_of(SHAPES, 3)
    ref = trajectory(lambda ps: compile_optimizer("m3", ps, slow_every=2), p0, stream)
    ps = [p.clone().requires_grad_(True) for p in p0]
    opt = compile_optimizer("m3", ps, slow_every=2)
    for t, batch in enumerate(stream):
        def closure(batch=batch):
            opt.zero_grad()
            loss = loss_at(ps, batch)
            loss.backward()
            return loss
        loss = opt.step(closure)
        assert torch.is_tensor(loss) and loss.item() > 0
        assert all(torch.equal(a.detach(), b) for a, b in zip(ps, ref[t]))
    opt.zero_grad()
    assert all(p.grad is None for p in ps)
    before, state = [p.detach().clone() for p in ps], copy.deepcopy(opt.state_dict())
    opt.step()                                         # no gradients: nothing moves
    assert all(torch.equal(a.detach(), b) for a, b in zip(ps, before))
    assert opt.state_dict()["state"][0]["step"] == state["state"][0]["step"] == 3


def test_param_group_lr_is_read_each_step():
    # Hyperparameters live in torch's param groups (LR schedulers work), delegated groups included.
    ps = [torch.randn(4, 3, dtype=F64, requires_grad=True), torch.randn(3, dtype=F64, requires_grad=True)]
    opt = compile_optimizer("muon", ps)
    opt.param_groups[0]["lr"] = 0.0
    before = [p.detach().clone() for p in ps]
    loss_at(ps, stream_of([(4, 3), (3,)], 1)[0]).backward()
    opt.step()
    assert all(torch.equal(a.detach(), b) for a, b in zip(ps, before))


def test_batched_newton_schulz_equals_per_parameter(monkeypatch):
    shapes = [(5, 3), (5, 3), (5, 3), (4, 6)]
    p0, stream = params_of(shapes), stream_of(shapes, 8)
    calls = []
    real = lanes.newton_schulz
    monkeypatch.setattr(lanes, "newton_schulz", lambda x, s: calls.append(x.shape[0]) or real(x, s))

    def make(batch):
        def mk(ps):
            opt = compile_optimizer("m3", ps, slow_every=4)
            opt.batch_ns = batch
            return opt
        return mk
    batched = trajectory(make(True), p0, stream)
    n_batched, calls[:] = list(calls), []
    single = trajectory(make(False), p0, stream)
    assert max_diff(batched, single) < 1e-13
    # M1: one call per shape per step. NS(prev(M2)) is cached: recomputed at steps 1 and 5 only.
    assert len(n_batched) == 8 * 2 + 2 * 2 and sorted(set(n_batched)) == [1, 3]
    assert len(calls) == 8 * 4 + 2 * 4 and set(calls) == {1}


# ---------------------------------------------------------------- mistakes, located

def _spec_with(tmp_path, old, new, name="m3"):
    text = (O.SPECS_DIR / f"{name}.yaml").read_text()
    assert old in text
    path = tmp_path / f"bad_{name}.yaml"
    path.write_text(text.replace(old, new))
    line = next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if ln.startswith("hyper:"))
    return path, line


@pytest.mark.parametrize("old, new, name", [
    ("lr: 0.02", "lr: -0.02", "lr"), ("beta2: 0.999", "beta2: 1.5", "beta2"), ("slow_every: 16", "slow_every: 0", "slow_every"),
])
def test_bad_hyper_in_file_is_located(tmp_path, old, new, name):
    path, line = _spec_with(tmp_path, old, new)
    with pytest.raises(nlc.SpecError) as e:
        compile_optimizer(str(path), [torch.randn(3, 3)])
    (d,) = e.value.diagnostics
    assert d.code == "E502" and f"`{name}`" in d.message and "out of range" in d.message
    assert d.span.file == str(path) and d.span.line == line
    assert f"{line:>5} | hyper:" in str(e.value)


@pytest.mark.parametrize("override", [{"lr": -1.0}, {"beta1": 1.0}, {"beta3": -0.1}, {"slow_every": 0}, {"ns_steps": 2.5}])
def test_bad_hyper_override_is_located(override):
    with pytest.raises(nlc.SpecError) as e:
        compile_optimizer("m3", [torch.randn(3, 3)], **override)
    (d,) = e.value.diagnostics
    (name, value), = override.items()
    assert d.code == "E502" and d.message == f"override `{name}={value!r}` is out of range"
    assert d.span.file.endswith("m3.yaml") and d.span.line == 6


def test_bad_override_in_param_group_and_unknown_override():
    with pytest.raises(nlc.SpecError) as e:
        compile_optimizer("adamw", [{"params": [torch.randn(3)], "betas": (0.9, 1.0)}])
    assert e.value.codes == ["E502"]
    with pytest.raises(nlc.SpecError) as e:
        compile_optimizer("adamw", [torch.randn(3)], momentum=0.9)
    assert e.value.codes == ["E208"]


def test_unknown_names_are_located(tmp_path):
    path, _ = _spec_with(tmp_path, "alpha * newton_schulz", "alpah * newton_schulz")
    with pytest.raises(nlc.SpecError) as e:
        compile_optimizer(path, [torch.randn(3, 3)])
    (d,) = e.value.diagnostics
    assert d.code == "E201" and "alpah" in d.message and d.hint == "did you mean `alpha`?"
    assert (d.span.line, d.span.col) == (13, 50)
    with pytest.raises(nlc.SpecError) as e:
        compile_optimizer("adamww", [torch.randn(3)])
    assert e.value.codes == ["E207"]


def test_matrix_only_spec_rejects_vectors(tmp_path):
    path, _ = _spec_with(tmp_path, "  - params: rest\n    use: adamw(lr=lr, eps=eps)\n", "")
    with pytest.raises(ValueError, match="no group takes a parameter of shape"):
        compile_optimizer(path, [torch.randn(3, 3), torch.randn(3)])


def test_lr_scheduler_drives_the_spec_hyperparameter():
    p0, stream = params_of(SHAPES), stream_of(SHAPES, 6)
    out = []
    for make in (lambda ps: compile_optimizer("adamw", ps, lr=0.05),
                 lambda ps: torch.optim.AdamW(ps, lr=0.05, foreach=False)):
        ps = [p.clone().requires_grad_(True) for p in p0]
        opt = make(ps)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        traj = []
        for batch in stream:
            opt.zero_grad()
            loss_at(ps, batch).backward()
            opt.step()
            sched.step()
            traj.append([p.detach().clone() for p in ps])
        out.append(traj)
    assert max_diff(*out) < 1e-13


def test_spec_object_and_retain_in_an_optimizer_chain():
    # An OptimizerSpec given directly; `retain(alpha)` keeps alpha of the level's memory, which on
    # an optimizer level is heavy-ball momentum.
    from nlc.spec import OptimizerSpec
    spec = OptimizerSpec.model_validate({"nlc": 1, "name": "retained", "hyper": {"lr": 0.02},
                                         "groups": [{"params": "all", "levels": {"m": {"rule": ["retain(0.8)"]}},
                                                     "update": "-lr * m"}]})
    p0, stream = params_of(SHAPES), stream_of(SHAPES, 5)
    ours = trajectory(lambda ps: compile_optimizer(spec, ps), p0, stream)
    theirs = trajectory(lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.8, foreach=False), p0, stream)
    assert max_diff(ours, theirs) < 1e-13
