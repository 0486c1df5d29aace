"""`nlc eval`: a trained model's loss, perplexity, accuracy and speed on the validation split, with
and without its test-time updates.

`load_run` takes a run directory (its newest checkpoint) or one checkpoint (`ckpt-STEP.json` or its
`.safetensors`), reads it as `nlc.runtime.checkpoint` does (JSON and safetensors: nothing is
unpickled), checks the stored spec text against its hash, parses and checks it from that text, and
compiles the model from it; `nlc sample` loads runs the same way.

`evaluate` reads the validation batches of the data the run trained on (its checkpoint's settings)
or of the `--task`/`--data` given, and scores each batch several ways (`MODES`):

- `whole`: each sequence in one forward pass, from a fresh state: the model as trained;
- `carried`: each sequence cut into `pieces`, fed in order with the state carried from piece to
  piece (what a long stream does); equal to `whole` wherever the generated model guarantees it;
- `reset`: the same pieces, each from a fresh state: the in-context levels forget at every cut;
- `cms_off` (models with a continuum memory): each sequence in one pass of `model.run` with no
  fast weights, so no CMS level updates in context while its other levels still do. The generated
  `Model.forward` of a CMS model is `L.cms_forward`, which calls `model.run(ids, state, fast)`
  window by window with the CMS deltas in `fast`; `fast = {}` leaves every CMS MLP at its trained
  weights (`L.mlp_with(mlp, x, None)`), which is the switch: nothing generated is changed.

The loss counts the positions the data counts (`IGNORE` elsewhere), summed over the batches and
divided by their number; the perplexity is its exponential; the accuracy (synthetic tasks) is the
exact arg-max accuracy over the same positions; tokens/s is the tokens of the batches over the time
of each mode's forward passes.
"""
from __future__ import annotations

import json
import linecache
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nlc.runtime import checkpoint

EVAL_JSON = "eval.json"


class EvalError(Exception):
    """A mistake in what was asked (no checkpoint, a corrupt one, bad data): the CLI exits 2."""


# ---------------------------------------------------------------- loading a run

@dataclass
class Run:
    model: object              # the compiled model, its weights loaded, in eval mode
    spec: object               # the ModelSpec trained
    checkpoint: Path           # the checkpoint's JSON
    step: int
    config: dict               # the run's settings as saved (data, task, context, seed...)
    source: str = ""           # the generated source of the model
    version: str = "?"

    @property
    def dir(self) -> Path:
        return self.checkpoint.parent

    @property
    def text_model(self) -> bool:
        """Trained on text (bytes); otherwise on a synthetic task (token ids)."""
        return self.config.get("data") is not None


def checkpoint_path(path: Path) -> Path:
    """The JSON of the checkpoint that `path` names: a run directory's newest, or the given one."""
    path = Path(path)
    if path.is_dir():
        found = checkpoint.latest(path)
        if found is None:
            legacy = (path / checkpoint.LEGACY).exists()
            old = " (only an older nlc's ckpt.pt, a pickle, which is not loaded)" if legacy else ""
            raise EvalError(f"no checkpoint in {path}{old}: train into it first (nlc train SPEC --out {path})")
        return found
    if checkpoint.NAME.fullmatch(path.name) is None:
        if not path.exists():
            raise EvalError(f"{path} does not exist: give a run directory or a checkpoint (DIR/ckpt-STEP.json)")
        raise EvalError(f"{path} is neither a run directory nor a checkpoint (ckpt-STEP.json or ckpt-STEP.safetensors)")
    found = path.with_suffix(".json")
    if not found.is_file():
        raise EvalError(f"{found} does not exist: a checkpoint is a ckpt-STEP.json and its .safetensors, "
                        f"and the JSON is written last (a save that was cut short leaves none)")
    return found


def spec_from_text(text: str, where: str):
    """Parse, validate and check a spec from its text (as a .yaml file); EvalError if it fails."""
    from nlc.check import check
    from nlc.diagnostics import Collector, Span, SpecError
    from nlc.loader import Loaded, parse_text, validate
    errors = Collector(where, text)
    try:
        raw, smap = parse_text(text, where, errors)
        spec = validate(raw, smap, errors) if raw is not None else None
        if spec is None and not errors.diagnostics:
            errors.error("E001", "the checkpoint holds no spec", Span(where, 1, 1))
        errors.raise_if_any()
        check(Loaded(spec, smap, text, where), errors)
        errors.raise_if_any()
    except SpecError as e:
        e.sources.setdefault(where, text)
        raise EvalError(f"the spec stored in the checkpoint does not check:\n{e.render()}") from None
    return spec


def load_run(path: Path, device: str = "cpu") -> Run:
    """The model of a checkpoint, rebuilt from the spec text it stores, its weights loaded."""
    import torch

    import nlc
    from nlc import spec as S
    from nlc.backends.torch.codegen import Unsupported
    from nlc.runtime.train import TrainError, _device
    json_path = checkpoint_path(path)
    try:
        dev = _device(device)
    except TrainError as e:
        raise EvalError(str(e)) from None
    try:
        ck = checkpoint.read(json_path)
    except checkpoint.CheckpointError as e:
        raise EvalError(str(e)) from None
    except (KeyError, TypeError, AttributeError, ValueError) as e:   # JSON of the right keys, wrong contents
        raise EvalError(f"{json_path} is not a well-formed checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ck.spec, str) or not isinstance(ck.config, dict) or not isinstance(ck.step, int):
        raise EvalError(f"{json_path} is not a well-formed checkpoint (its spec, settings or step)")
    if checkpoint.spec_hash(ck.spec) != ck.spec_sha256:
        raise EvalError(f"{json_path} is corrupt: its spec text does not match its sha256 "
                        f"({checkpoint.spec_hash(ck.spec)[:12]}... against {str(ck.spec_sha256)[:12]}...)")
    spec = spec_from_text(ck.spec, f"{json_path.name}:spec.yaml")
    if not isinstance(spec, S.ModelSpec):
        raise EvalError(f"{json_path} holds the optimizer spec `{spec.name}`, not a model")
    torch.manual_seed(0)          # every weight comes from the checkpoint
    try:
        model = nlc.compile(spec)
    except Unsupported as e:
        raise EvalError(f"{json_path}: this nlc cannot compile its spec: {e.message}") from None
    source = source_of(model)
    try:
        model.load_state_dict(ck.model)
    except RuntimeError as e:
        why = " ".join(str(e).split())
        raise EvalError(f"{json_path}: its tensors do not fit the spec it stores (a checkpoint from another "
                        f"spec, or edited): {why[:400]}") from None
    model.to(dev).eval()
    return Run(model, spec, json_path, ck.step, ck.config, source, ck.version)


# ---------------------------------------------------------------- what the generated model guarantees

def source_of(model) -> str:
    """The generated source of a compiled model (kept by `load_source` for tracebacks)."""
    file = type(model).forward.__globals__.get("__file__") or ""
    return "".join(linecache.getlines(file))


def cms_of(model) -> list | None:
    """The CMS levels of a generated model, [(name, period, lr)], or None."""
    return type(model).forward.__globals__.get("CMS") or None


def approximations(source: str) -> list[str]:
    """Why feeding a sequence in pieces cut anywhere may not equal feeding it whole, from the
    generated source; empty: it does. Every generated model carries what makes it exact:
    attention its KV cache, convolutions their past, matrix memories nothing more (their chunked
    forms are exact for any chunk), MLP and momentum memories the open chunk's anchor and offset,
    CMS models the open window (its tokens and its start state; the next call runs it again). What
    is left to check is that the source is nlc's."""
    if not source:
        return ["its generated source is not available to check"]
    return []


# ---------------------------------------------------------------- evaluation

LABELS = {"whole": "whole sequence", "carried": "{k} pieces of {p}, state carried",
          "reset": "{k} pieces of {p}, state reset", "cms_off": "whole, CMS updates off"}


@dataclass
class Tally:
    loss: float = 0.0          # summed over counted positions
    counted: int = 0
    right: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def row(self, task: bool) -> dict:
        loss = self.loss / self.counted if self.counted else math.nan
        ppl = math.nan if math.isnan(loss) else math.exp(loss) if loss < 700 else math.inf
        return {"loss": loss, "perplexity": ppl,
                "accuracy": self.right / self.counted if task and self.counted else None,
                "tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else None,
                "tokens": self.tokens, "counted": self.counted}


def in_pieces(model, x, piece: int, carry: bool):
    """Logits of `x` fed `piece` tokens at a time, the state carried from one to the next or not."""
    import torch
    outs, state = [], None
    for s in range(0, x.shape[1], piece):
        logits, new = model(x[:, s:s + piece], state)
        outs.append(logits)
        state = new if carry else None
    return torch.cat(outs, 1)


def evaluate(run: Run, data: Path | None = None, task: str | None = None, context: int | None = None,
             batches: int = 8, batch: int | None = None, pieces: int = 4, progress_every: int = 10,
             progress: Callable[[str], None] = lambda s: None) -> dict:
    """Score the run's model on `batches` validation batches; returns what eval.json holds."""
    import torch
    import torch.nn.functional as F

    from nlc.runtime.data import IGNORE, DataError, correct, make_data
    if data is not None and task is not None:
        raise EvalError("give --task or --data, not both")
    for name, value in (("batches", batches), ("pieces", pieces), ("context", context), ("batch", batch)):
        if value is not None and value < 1:
            raise EvalError(f"--{name} must be at least 1, got {value}")
    cfg = run.config
    if data is None and task is None:
        data, task = cfg.get("data"), cfg.get("task") or "copy"
    context = context or int(cfg.get("context") or 64)
    batch = batch or int(cfg.get("batch") or 16)
    if pieces > context:
        raise EvalError(f"--pieces {pieces} is more than the {context} tokens of a sequence")
    try:
        source = make_data(Path(data) if data is not None else None, task or "copy", run.spec.model.vocab, context,
                           int(cfg.get("seed") or 0))
    except DataError as e:
        hint = ("\nhint: the run trained on it; give --data PATH (or --task) to evaluate on other data"
                if data is not None and data == cfg.get("data") else "")
        raise EvalError(f"{e}{hint}") from None
    is_task = data is None
    piece = -(-context // pieces)
    model, device = run.model, next(run.model.parameters()).device
    cms = cms_of(model)
    modes = {"whole": lambda x: model(x)}
    if pieces > 1:
        modes["carried"] = lambda x: (in_pieces(model, x, piece, True), None)
        modes["reset"] = lambda x: (in_pieces(model, x, piece, False), None)
    if cms:
        modes["cms_off"] = lambda x: model.run(x, {}, {})
    tallies = {m: Tally() for m in modes}
    worst, stateful = 0.0, False
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(batches):
            x, y = source.batch("val", i, batch)
            x, y = x.to(device), y.to(device)
            out = {}
            for mode, fn in modes.items():
                start = time.perf_counter()
                logits, state = fn(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = tallies[mode]
                t.seconds += time.perf_counter() - start
                t.tokens += x.numel()
                t.loss += F.cross_entropy(logits.double().flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                          reduction="sum").item()
                r, c = correct(logits, y)
                t.right, t.counted = t.right + r, t.counted + c
                out[mode] = logits
                stateful = stateful or bool(state)
            if "carried" in out:
                worst = max(worst, (out["carried"] - out["whole"]).abs().max().item())
            if progress_every and (i + 1) % progress_every == 0 and i + 1 < batches:
                progress(f"eval: batch {i + 1}/{batches} ({time.perf_counter() - t0:.1f} s)")
    why = approximations(run.source)
    rows = {m: {"label": LABELS[m].format(k=-(-context // piece), p=piece), **t.row(is_task)}
            for m, t in tallies.items()}
    return {"checkpoint": str(run.checkpoint), "step": run.step, "spec": run.spec.name,
            "data": source.describe, "task": getattr(source, "spelled", None) if is_task else None,
            "text": str(data) if not is_task else None, "split": "val", "context": context, "batch": batch,
            "batches": batches, "pieces": -(-context // piece), "piece": piece, "device": str(device),
            "in_context_state": stateful, "cms": [list(c) for c in cms] if cms else None, "rows": rows,
            "carried_vs_whole_max_abs_logit": worst if pieces > 1 else None,
            "streaming": {"exact_at_any_cut": not why, "why_not": why},
            "seconds": time.perf_counter() - t0, "nlc_version": run.version}


# ---------------------------------------------------------------- output

def table(result: dict) -> str:
    """The result as the lines `nlc eval` prints."""
    head = (f"eval `{result['spec']}` at step {result['step']} ({result['checkpoint']})\n"
            f"data: {result['data']}; val split, {result['batches']} batches x {result['batch']} x "
            f"{result['context']} tokens; device {result['device']}")
    width = max(len(r["label"]) for r in result["rows"].values())
    lines = [head, "", f"{'mode':<{width}}  {'loss':>8}  {'perplexity':>10}  {'accuracy':>8}  {'tokens/s':>10}"]
    for r in result["rows"].values():
        acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        lines.append(f"{r['label']:<{width}}  {r['loss']:>8.4f}  {r['perplexity']:>10.3f}  {acc:>8}  {tps:>10}")
    diff, s = result["carried_vs_whole_max_abs_logit"], result["streaming"]
    if diff is not None:
        if s["exact_at_any_cut"]:
            note = "exact: this model's pieces equal the whole at any cut, up to rounding"
        else:
            note = f"not known to be exact: {'; '.join(s['why_not'])}"
        lines += ["", f"carried vs whole: max |logit difference| {diff:.3g} ({note})"]
    if not result["in_context_state"]:
        lines += ["", "this model carries no state from call to call: carried and reset are the same"]
    return "\n".join(lines)


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def output_path(run_dir: Path, out: Path | None) -> Path:
    """Where eval.json goes (`--out`: a file, or a directory to put eval.json in), checked writable
    before any compute is spent."""
    path = Path(out) if out is not None else Path(run_dir) / EVAL_JSON
    if path.is_dir():
        path = path / EVAL_JSON
    parent = path.parent
    if not parent.is_dir():
        raise EvalError(f"cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise EvalError(f"cannot write {path}: permission denied (give --out FILE)")
    return path


def write(result: dict, path: Path) -> Path:
    from nlc.fileio import atomic_write
    return atomic_write(path, json.dumps(_finite(result), indent=1, allow_nan=False) + "\n")
