"""Checkpoints of a training run that anyone can load safely: tensors in safetensors, the rest JSON.

One directory per run; every file written atomically (`nlc.fileio.atomic_write`):

    DIR/ckpt-00000100.safetensors  the tensors: `model.<name>` (the state dict) and
                                   `optimizer.<param index>.<state key>` (its state tensors)
    DIR/ckpt-00000100.json         the rest: format, nlc version, step, the next training batch,
                                   RNG states (base64 and lists), the optimizer's parameter groups and
                                   scalar state, the spec's canonical text and its sha256, the run's
                                   settings and its metric history, the tensors file's name and sha256
    DIR/spec.yaml                  the canonical text of the spec trained (after --set), for people
    DIR/metrics.jsonl              one JSON record per logged step and per evaluation
    DIR/loss.png                   the loss curves, when matplotlib is installed
    DIR/.lock                      locked (flock) while a run trains into DIR; holds its process id

The tensors are written before the JSON, and the JSON names them with their hash, so the newest
JSON always describes a whole checkpoint. A number that is not finite (a diverged loss) is written as
null, so every file is JSON; tensors that are not finite are never saved (`non_finite`). After a save, the newest `keep` checkpoints stay; older
ones, and any newer one left by an earlier run in the same directory, are removed. Loading parses
JSON and safetensors only: nothing is unpickled.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import random
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from nlc import __version__
from nlc.fileio import atomic_write
from nlc.runtime import safetensors

FORMAT = 2
SPEC, METRICS, PLOT, LOCK = "spec.yaml", "metrics.jsonl", "loss.png", ".lock"
LEGACY = "ckpt.pt"                 # format 1 (torch.save), no longer loaded
NAME = re.compile(r"ckpt-(\d+)\.(json|safetensors)")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or from another spec."""


def spec_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(bytes(t.tolist())).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.tensor(list(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict:
    """The RNG states as JSON: torch's (and CUDA's) bytes in base64, Python's as lists."""
    version, internal, gauss = random.getstate()
    state = {"torch": _b64(torch.get_rng_state()), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


@dataclass
class Checkpoint:
    step: int
    model: dict            # state dict: name -> tensor
    optimizer: dict        # torch's optimizer state dict ({"state": {index: {key: value}}, "param_groups"})
    rng: dict              # rng_state()
    spec: str              # canonical text of the spec (nlc.spec.dump)
    spec_sha256: str
    config: dict           # the run's settings (JSON types)
    history: list          # metric records so far
    version: str = __version__  # of the nlc that saved it


# ---------------------------------------------------------------- JSON values

def _to_json(x, where: str):
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, tuple):
        return {"tuple": [_to_json(v, where) for v in x]}
    if isinstance(x, list):
        return [_to_json(v, where) for v in x]
    if isinstance(x, dict) and all(isinstance(k, str) for k in x):
        return {k: _to_json(v, where) for k, v in x.items()}
    raise CheckpointError(f"cannot save {where}: a {type(x).__name__} is neither a tensor nor a JSON value")


def _finite_json(x):
    """`x` with every float that is not finite (NaN, inf) as None: JSON has no NaN."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, list):
        return [_finite_json(v) for v in x]
    if isinstance(x, dict):
        return {k: _finite_json(v) for k, v in x.items()}
    return x


def _from_json(x, tensors: dict):
    if isinstance(x, list):
        return [_from_json(v, tensors) for v in x]
    if isinstance(x, dict):
        if set(x) == {"tuple"}:
            return tuple(_from_json(v, tensors) for v in x["tuple"])
        if set(x) == {"tensor"}:
            if x["tensor"] not in tensors:
                raise CheckpointError(f"the tensors file has no `{x['tensor']}`")
            return tensors[x["tensor"]]
        return {k: _from_json(v, tensors) for k, v in x.items()}
    return x


def _split_optimizer(sd: dict) -> tuple[dict, dict]:
    """(tensors named optimizer.<index>.<key>, the rest as JSON with {"tensor": name} in their place)."""
    tensors, state = {}, {}
    for index, st in sd["state"].items():
        state[str(index)] = entry = {}
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[name := f"optimizer.{index}.{key}"] = value
                entry[key] = {"tensor": name}
            else:
                entry[key] = _to_json(value, f"optimizer state `{key}` of parameter {index}")
    groups = [_to_json(g, "the optimizer's parameter groups") for g in sd["param_groups"]]
    return tensors, {"state": state, "param_groups": groups}


# ---------------------------------------------------------------- save, find, load

def stem(step: int) -> str:
    return f"ckpt-{step:08d}"


def steps(out: Path) -> dict[int, list[Path]]:
    """The checkpoint files in `out`, by step (a JSON and its tensors; either alone after a crash)."""
    found: dict[int, list[Path]] = {}
    for p in Path(out).glob("ckpt-*"):
        m = NAME.fullmatch(p.name)
        if m:
            found.setdefault(int(m.group(1)), []).append(p)
    return found


def latest(out: Path) -> Path | None:
    """The JSON of the newest checkpoint in `out`."""
    done = [s for s, files in steps(out).items() if any(p.suffix == ".json" for p in files)]
    return Path(out) / f"{stem(max(done))}.json" if done else None


def save(out: Path, ck: Checkpoint, keep: int = 3, plot: bool = True, fresh: bool = False) -> Path:
    """Write the run's files into `out`, each atomically: the tensors, then the checkpoint's JSON;
    then remove all but the newest `keep` checkpoints (`fresh`, the first save of a run that
    started over: all but this one). Returns the JSON's path."""
    out = Path(out)
    opt_tensors, opt_json = _split_optimizer(ck.optimizer)
    tensors = {f"model.{k}": v for k, v in ck.model.items()} | opt_tensors
    blob = safetensors.dumps(tensors, {"format": f"nlc-checkpoint-{FORMAT}", "step": str(ck.step)})
    atomic_write(out / SPEC, ck.spec)
    history = _finite_json(ck.history)
    atomic_write(out / METRICS, "".join(json.dumps(r, allow_nan=False) + "\n" for r in history))
    if plot:
        plot_losses(ck.history, out / PLOT)
    name = stem(ck.step)
    atomic_write(out / f"{name}.safetensors", blob)
    meta = {"format": FORMAT, "nlc_version": ck.version, "step": ck.step,
            "data": {"split": "train", "next_batch": ck.step},
            "tensors": f"{name}.safetensors", "tensors_sha256": hashlib.sha256(blob).hexdigest(),
            "spec_sha256": ck.spec_sha256, "rng": ck.rng, "optimizer": opt_json,
            "config": ck.config, "history": history, "spec": ck.spec}
    path = atomic_write(out / f"{name}.json", json.dumps(_finite_json(meta), indent=1, allow_nan=False) + "\n")
    prune(out, ck.step, 1 if fresh else keep, everything=fresh)
    return path


def non_finite(model: dict, optimizer: dict) -> str | None:
    """Which tensor of a state dict and an optimizer state dict first holds a NaN or an infinity
    (`model.embed.weight is NaN`, `optimizer.3.exp_avg is infinite`), or None: what is never saved."""
    named = [(f"model.{k}", v) for k, v in model.items()]
    named += [(f"optimizer.{i}.{k}", v) for i, st in optimizer.get("state", {}).items() for k, v in st.items()]
    for name, t in named:
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all():
            return f"{name} {'is NaN' if torch.isnan(t).any() else 'is infinite'}"
    return None


@contextmanager
def claim(out: Path):
    """Hold the run directory `out` for one run, before its first step: create it, check that files
    can be written there (a probe file, written and removed), and lock it (an exclusive `flock` on
    DIR/.lock, which holds this process's id) until the run ends, so that a second run into the
    same directory is refused at once instead of replacing this one's checkpoints. The lock goes
    with the process (a crash or a kill releases it); the file stays. CheckpointError when `out`
    cannot be written or another process holds it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file, not a directory: give a directory for the run's files")
    doing = "cannot create the directory"
    try:
        out.mkdir(parents=True, exist_ok=True)
        doing = "cannot write files in it"
        fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=".tmp", dir=out)
        os.close(fd)
        os.unlink(probe)
        lock = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CheckpointError(f"--out {out}: {doing} ({e.strerror or e}); give a directory you can write "
                              f"to") from None
    try:
        import fcntl
    except ImportError:        # no flock (Windows): the run goes unlocked
        fcntl = None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(lock, 32, 0).decode(errors="replace").strip()
                raise CheckpointError(f"--out {out} is in use: another training (process {pid or '?'}) is writing "
                                      f"its checkpoints there (it holds {out / LOCK}); wait for it to end, or give "
                                      f"another --out") from None
            except OSError:    # a file system without locks: the run goes unlocked
                fcntl = None
        os.ftruncate(lock, 0)
        os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
        yield out
    finally:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)


def prune(out: Path, step: int, keep: int, everything: bool = False) -> None:
    """Keep the newest `keep` checkpoints up to `step` (`everything`: only `step`'s); remove the
    others (JSON first)."""
    found = steps(out)
    kept = [step] if everything else sorted((s for s in found if s <= step), reverse=True)[:max(keep, 1)]
    for s, files in found.items():
        if s not in kept:
            for p in sorted(files, key=lambda p: p.suffix != ".json"):
                p.unlink(missing_ok=True)


def _read_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    need = {"format", "step", "tensors", "tensors_sha256", "spec", "spec_sha256", "rng", "optimizer", "config", "history"}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not need <= set(meta):
        raise CheckpointError(f"{path} is not an nlc checkpoint of format {FORMAT}")
    return meta


def load(out: Path, tensors: bool = True) -> Checkpoint:
    """The newest checkpoint in `out` (tensors on the CPU). `tensors=False` reads only its JSON
    (the model and optimizer state are then empty)."""
    out = Path(out)
    path = latest(out)
    if path is None:
        if (out / LEGACY).is_file():
            raise CheckpointError(f"{out / LEGACY} is a checkpoint of an older nlc (a pickle), which this one does "
                                  f"not load; train without --resume to start over")
        raise CheckpointError(f"no checkpoint at {out}: train without --resume first")
    return read(path, tensors)


def read(path: Path, tensors: bool = True) -> Checkpoint:
    """The checkpoint whose JSON is `path` (its tensors file beside it), as `load` reads it."""
    path = Path(path)
    meta = _read_json(path)
    model, optimizer = {}, {"state": {}, "param_groups": []}
    if tensors:
        file = path.parent / Path(meta["tensors"]).name
        try:
            blob = file.read_bytes()
        except OSError as e:
            raise CheckpointError(f"cannot read {file}, the tensors of {path}: {e.strerror or e}") from None
        if hashlib.sha256(blob).hexdigest() != meta["tensors_sha256"]:
            raise CheckpointError(f"{file} is not the file {path} was saved with (its sha256 differs)")
        try:
            named = safetensors.loads(blob)
        except safetensors.SafetensorsError as e:
            raise CheckpointError(f"{file}: {e}") from None
        model = {k[len("model."):]: v for k, v in named.items() if k.startswith("model.")}
        opt = _from_json(meta["optimizer"], named)
        optimizer = {"state": {int(i): st for i, st in opt["state"].items()}, "param_groups": opt["param_groups"]}
    return Checkpoint(step=meta["step"], model=model, optimizer=optimizer, rng=meta["rng"], spec=meta["spec"],
                      spec_sha256=meta["spec_sha256"], config=meta["config"], history=meta["history"],
                      version=meta.get("nlc_version", "?"))


def initialise(model, path: Path) -> tuple[list[str], list[str]]:
    """Copy tensors into `model` (`nlc train --init`); returns (copied, left new), by name.

    From a run directory or checkpoint JSON: its model tensors whose names and shapes match the
    model's (another architecture shares what it can: a Transformer's embedding and head with
    Hope). From a safetensors file: tensors named as the model's, every one of which must match
    (a file made for this model, such as a mapping of another model's tensors)."""
    path = Path(path)
    strict = not (path.is_dir() or path.suffix == ".json")
    if not strict:
        json_path = latest(path) if path.is_dir() else path
        if json_path is None:
            raise CheckpointError(f"--init {path}: no checkpoint there")
        named = read(json_path).model
    else:
        try:
            named = safetensors.loads(path.read_bytes())
        except OSError as e:
            raise CheckpointError(f"--init {path}: cannot read it: {e.strerror or e}") from None
        except safetensors.SafetensorsError as e:
            raise CheckpointError(f"--init {path}: {e}") from None
    own = model.state_dict()
    unknown = [k for k in named if k not in own]
    wrong = [f"{k} {tuple(v.shape)} (the model's is {tuple(own[k].shape)})" for k, v in named.items()
             if k in own and own[k].shape != v.shape]
    if strict and (unknown or wrong):
        what = (f"names no tensor of the model: {', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}"
                if unknown else f"has other shapes: {'; '.join(wrong[:3])}")
        raise CheckpointError(f"--init {path} {what}\nhint: name the tensors as the model's state_dict "
                              f"(`nlc build` shows them in model.py); the model has {', '.join(list(own)[:4])} ...")
    copied = [k for k, v in named.items() if k in own and own[k].shape == v.shape]
    if not copied:
        raise CheckpointError(f"--init {path}: no tensor there matches one of the model's in name and shape")
    with torch.no_grad():
        for k in copied:
            own[k].copy_(named[k])
    return copied, [k for k in own if k not in set(copied)]


def restore(out: Path, model, optimizer, spec_sha256: str) -> Checkpoint:
    """Load the newest checkpoint in `out` into `model` and `optimizer` and set the RNG states as
    they were; the checkpoint must be of the spec whose hash is `spec_sha256`."""
    ck = load(out)
    if ck.spec_sha256 != spec_sha256:
        raise CheckpointError(f"{latest(out)} was trained from another spec (its text is in {Path(out) / SPEC}); "
                              f"give the same spec and --set values, or train without --resume to start over")
    model.load_state_dict(ck.model)
    optimizer.load_state_dict(ck.optimizer)
    set_rng_state(ck.rng)
    return ck


def plot_losses(history: list, path: Path) -> Path | None:
    """loss.png: training and validation loss against step; skipped without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in history if r.get("loss") is not None]   # None: not finite
    val = [(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    for pts, label in ((train, "train"), (val, "val")):
        if pts:
            ax.plot(*zip(*pts), label=label, marker="." if label == "val" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write(path, buf.getvalue())
