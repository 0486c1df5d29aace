"""Optimizer specs compiled to torch optimizers: a small interpreter of levels on the step clock.

An optimizer spec (``specs/adamw.yaml``, ``specs/m3.yaml``, ...) gives, per parameter group, levels
over the gradient stream and an ``update`` expression. ``compile_optimizer`` turns it into a
:class:`SpecOptimizer`, one generic ``torch.optim.Optimizer``. Each step, for each parameter with a
gradient:

1. ``step`` counts up (1 on the first step); ``prev(L)`` is level L's value before this step;
2. the levels are written in declaration order. An every-step level runs its rule chain on its
   input; a slow level (``every: f steps``) adds its input to a block sum and, at the block's last
   step (``step % f == 0``), runs its chain once on the sum and starts the next block. The chain's
   output is the level's new value, read as ``L``;
3. the update expression is evaluated (``L`` after this step's writes, ``prev(L)`` before) and
   added to the parameter.

So a slow level written at step f is seen by ``L`` at step f and by ``prev(L)`` from step f + 1:
M3 reads ``prev(M2)`` and its slow term lags one block, as Algorithm 1 prints it.

Expressions compile once into closures over *lanes*: a closure maps the list of a group's
parameters (their ``_Env``) to the list of values, so ``newton_schulz`` stacks parameters of equal
shape into one batched matmul chain. A subexpression that reads only slow levels and
hyperparameters is cached per parameter until a level it reads is rewritten (M3's NS(M2) runs once
per block). Level state lives in ``optimizer.state[p]`` under ``step``, ``L`` (the value),
``L.<i>`` (the state of chain step i) and ``L.sum`` (a slow level's block sum); values are never
updated in place, which keeps the cache's identity test sound and ``state_dict`` exact.

The tensor side (Newton-Schulz, the rule primitives, the expression compiler) is in
``optim_lanes.py``; loading a spec and compiling it into a program, and ``optimizer_of``, in
``optim_program.py``. This module holds the ``torch.optim.Optimizer`` that runs a program and
re-exports the names other modules import from it.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from nlc.diagnostics import Collector

from .optim_lanes import NS_BATCH_MAX_NUMEL_CPU, NS_COEFFICIENTS, NS_EPS, _Env, newton_schulz
from .optim_program import SPECS_DIR, _compile, _load, _RuleGroup, optimizer_of

# The public names, re-exported from where they live (runtime/train.py also imports `_load` from here).
__all__ = ["compile_optimizer", "optimizer_of", "SpecOptimizer", "newton_schulz", "SPECS_DIR", "NS_COEFFICIENTS", "NS_EPS",
           "NS_BATCH_MAX_NUMEL_CPU"]


class SpecOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs an optimizer spec (see the module docstring).

    Hyperparameters live in each param group under their spec names, so LR schedulers and
    per-group settings work as with torch's optimizers. ``batch_ns = False`` runs Newton-Schulz
    parameter by parameter (the batched form stacks parameters of equal shape).
    """

    def __init__(self, params, spec, **hyper):
        spec_, smap, file, source = _load(spec)
        errors = Collector(file, source)
        from nlc.check_common import check_hyper
        check_hyper(spec_, smap, hyper, errors)
        errors.raise_if_any()
        defaults = {**spec_.hyper, **hyper}
        self.spec, self.batch_ns = spec_, True
        self._program = _compile(spec_, smap, file, source, defaults)
        self._where = (smap, file, source)
        self._cache: dict[Tensor, dict] = {}
        self._routes: dict[Tensor, tuple] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        smap, file, source = self._where
        errors = Collector(file, source)
        from nlc.check_common import check_hyper
        check_hyper(self.spec, smap, {k: v for k, v in param_group.items() if k in self.spec.hyper}, errors)
        errors.raise_if_any()
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._routes[p] = self._program.route(p)
            if self._routes[p] is None:
                raise ValueError(f"optimizer `{self.spec.name}`: no group takes a parameter of shape "
                                 f"{tuple(p.shape)} (groups: {', '.join(g.params for g in self._program.groups)})")

    def load_state_dict(self, state_dict) -> None:
        self._cache.clear()
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            hyper = {k: group[k] for k in self.spec.hyper}
            lanes: dict[tuple, list[_Env]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.is_complex():
                    raise RuntimeError(f"optimizer `{self.spec.name}` takes dense real parameters")
                lanes[self._routes[p]].append(self._env(p))
            for route, envs in lanes.items():
                h = hyper
                for use in route[:-1]:
                    h = use.child_hyper(h)
                for env in envs:
                    env.hyper = h
                self._run(route[-1], envs)
        return loss

    def _env(self, p: Tensor) -> _Env:
        state = self.state[p]
        if not state:
            state["step"] = 0
        leaf = self._routes[p][-1]
        for lv in leaf.levels:
            if lv.name not in state:
                state[lv.name] = torch.zeros_like(p)
        for n in leaf.slow:
            state.setdefault(n + ".sum", torch.zeros_like(p))
        state["step"] += 1
        return _Env(hyper={}, grad=p.grad, param=p, step=state["step"], state=state,
                    prev={lv.name: state[lv.name] for lv in leaf.levels},
                    cache=self._cache.setdefault(p, {}), batch_ns=self.batch_ns)

    @staticmethod
    def _run(leaf: _RuleGroup, envs: list[_Env]) -> None:
        for lv in leaf.levels:
            lv.write(envs)
        for env, u in zip(envs, leaf.update(envs)):
            env.param.add_(u)


def compile_optimizer(spec, params, **hyper) -> SpecOptimizer:
    """An optimizer from a spec: a shipped name (``"adamw"``, ``"muon"``, ``"m3"``...), a path to a
    ``.yaml``/``.nl`` optimizer spec, or an ``OptimizerSpec`` (a model's inline optimizer,
    ``model_spec.optimizer``, is one; :func:`optimizer_of` gives a model's optimizer in either form). Keyword arguments override the spec's
    hyperparameters by name and are range-checked (``nlc.SpecError``, code E502, located at the
    hyperparameter's declaration).

    >>> opt = compile_optimizer("m3", model.parameters(), lr=0.01, slow_every=8)
    """
    return SpecOptimizer(params, spec, **hyper)
