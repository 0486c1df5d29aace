"""`nlc train`: train the compiled model of a spec with the optimizer the spec names.

The run reads top to bottom (`train`, its body `_train`): settings, the spec (with `--set` applied
and checked again: `nlc.runtime.overrides`), the data, the model and its optimizer, the run
directory (written to and locked before anything is computed: `checkpoint.claim`), maybe the
checkpoint to resume, then the loop: occasionally evaluate and save, then one step (forward,
backward, optimizer), then log.

Each batch is a pure function of (seed, step) (`nlc.runtime.data`, `nlc.runtime.tasks`), the
model is initialised from the seed, the learning rate is a function of the step
(`nlc.runtime.schedule`), and a checkpoint holds everything else (parameters, optimizer state, RNG
states; `nlc.runtime.checkpoint`: safetensors and JSON, nothing pickled), so stopping and resuming
gives the same trajectory as running straight through. Under torchrun the same loop trains
data-parallel (`nlc.runtime.distributed`): each rank takes its rows of each step's batch, and
rank 0 logs, evaluates and saves.
"""
from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt

# (benchmarks/studies import load_spec and parse_sets from here too)
from nlc.runtime.overrides import check_hyper_sets, load_spec, parse_sets

DEFAULT_OPTIMIZER = "adamw"


class TrainError(Exception):
    """A mistake in how a run was asked for (not in a spec): the CLI prints it and exits 2."""


class TrainConfig(BaseModel):
    """The settings of a run. On `--resume`, settings not given again come from the checkpoint."""
    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: Path = Field(description="the model spec file")
    data: Path | None = Field(None, description="a text file or a folder of them, read as bytes; None: a synthetic task")
    task: str = Field("copy", description="the synthetic task without data: `name` or `name:key=value,...` "
                                          "(`resolve` refuses one given with data)")
    steps: PositiveInt = Field(200, description="optimizer steps in all (a resumed run continues up to this step)")
    batch: PositiveInt = Field(16, description="sequences per step (under torchrun, split over the processes)")
    context: PositiveInt = Field(64, description="tokens per sequence")
    out: Path | None = Field(None, description="the run's directory; default runs/<spec file name>")
    resume: bool = Field(False, description="continue from the checkpoint in `out`")
    sets: tuple[str, ...] = Field((), description="`--set` overrides: `path.to.key=value` (spec) or `name=value` (optimizer)")
    seed: int = Field(0, description="seeds the model's initialisation and the data")
    device: str = Field("auto", description="`cpu`, `cuda`, `cuda:1`...; `auto`: cuda when available")
    log_every: PositiveInt = Field(10, description="steps between log lines")
    eval_every: PositiveInt = Field(100, description="steps between evaluations")
    eval_batches: PositiveInt = Field(4, description="validation batches per evaluation")
    save_every: PositiveInt = Field(100, description="steps between checkpoints (and at the end, and on Ctrl-C)")
    keep: PositiveInt = Field(3, description="how many checkpoints to keep, the newest")
    clip: float = Field(1.0, ge=0, allow_inf_nan=False, description="gradient norm clipping; 0: none")
    lr_schedule: Literal["constant", "cosine", "wsd"] = Field("constant", description="the learning rate's schedule")
    warmup: NonNegativeInt = Field(0, description="steps of linear warmup of the learning rate")
    init: Path | None = Field(None, description="initial weights: a safetensors file named as the model's "
                                               "tensors, or a run or checkpoint (its model); the rest from the seed")
    compile: bool = Field(False, description="run the model's hot loops under torch.compile (eager, with a "
                                             "warning, where no C++ compiler is found)")

    # what a resumed run takes from its checkpoint unless given again
    RESUMED: ClassVar[tuple[str, ...]] = ("data", "task", "steps", "batch", "context", "sets", "seed", "log_every",
                                          "eval_every", "eval_batches", "save_every", "keep", "clip",
                                          "lr_schedule", "warmup")

    @property
    def run_dir(self) -> Path:
        return self.out if self.out is not None else Path("runs") / self.spec.stem


# ---------------------------------------------------------------- Ctrl-C

@contextmanager
def stop_requests(log: Callable[[str], None]):
    """The first Ctrl-C (or SIGTERM) asks the loop to stop after the current step and save; a
    second Ctrl-C interrupts at once. `flag["stop"]` says whether a stop was asked for."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True
        log("interrupted: finishing this step and saving (Ctrl-C again to quit at once)")
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------- the run

def resolve(explicit: dict) -> TrainConfig:
    """The run's settings: given ones, then (on --resume) the checkpoint's, then the defaults."""
    if explicit.get("data") is not None and explicit.get("task") is not None:
        raise TrainError(f"--data {explicit['data']} and --task {explicit['task']} both say what to train on: drop "
                         f"--task to train on the text, or drop --data to train on the task")
    cfg = TrainConfig(**explicit)
    if not cfg.resume:
        return cfg
    from nlc.runtime import checkpoint
    try:
        saved = checkpoint.load(cfg.run_dir, tensors=False).config
    except checkpoint.CheckpointError as e:
        raise TrainError(str(e)) from None
    merged = {k: saved[k] for k in TrainConfig.RESUMED if k in saved and k not in explicit}
    if merged.get("data") is not None and "task" in explicit:   # the task would be ignored, as on a fresh run
        raise TrainError(f"--task {explicit['task']}: the run in {cfg.run_dir} trains on --data {merged['data']} "
                         f"(its checkpoint's): drop --task to resume it, or train the task into another --out")
    sets = {item.partition("=")[0].strip(): item for item in (*saved.get("sets", ()), *explicit.get("sets", ()))}
    merged["sets"] = tuple(sets.values())       # the checkpoint's --set values, then the new ones (a later one wins)
    return TrainConfig(**{**explicit, **merged})


def train(cfg: TrainConfig, log: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict:
    """Train as `cfg` says; returns a summary (losses first and last, steps, time, checkpoint)."""
    with ExitStack() as held:       # the run directory's lock (`checkpoint.claim`), held until the run ends
        return _train(cfg, log, held)


def _train(cfg: TrainConfig, log: Callable[[str], None], held: ExitStack) -> dict:
    import torch
    import torch.nn.functional as F

    import nlc
    from nlc import spec as S
    from nlc.backends.torch.codegen import Unsupported
    from nlc.backends.torch.optim import _load as load_optimizer, compile_optimizer, optimizer_of
    from nlc.runtime import checkpoint, distributed, schedule
    from nlc.runtime.data import IGNORE, DataError, correct, make_data

    world = distributed.world()                # torchrun's processes; one without it
    log = log if world.main else (lambda s: None)

    # -- the spec, with --set applied, checked like a file
    cmdline, sets = parse_sets(cfg.sets)
    spec_sets = [o for o in sets if "." in o.key]
    hyper_sets = [o for o in sets if "." not in o.key]
    loaded = load_spec(cfg.spec, spec_sets, cmdline)
    spec = loaded.spec
    if not isinstance(spec, S.ModelSpec):
        raise TrainError(f"{cfg.spec} is the optimizer spec `{spec.name}`; `nlc train` trains a model spec "
                         f"(name this optimizer in one: `optimizer: {spec.name}(lr=...)`)")
    opt_spec = optimizer_of(spec, Path(loaded.file).parent)
    if opt_spec is None:
        opt_spec = load_optimizer(DEFAULT_OPTIMIZER)[0]
        log(f"note: `{spec.name}` names no optimizer; training with `{DEFAULT_OPTIMIZER}` and its defaults")
    hyper = check_hyper_sets(opt_spec, hyper_sets, cmdline)
    trained = spec.model_copy(update={"optimizer": opt_spec.model_copy(update={"name": f"{spec.name}_optimizer"})})
    spec_text = S.dump(trained)               # the spec as trained: model, and its optimizer inline
    spec_sha = checkpoint.spec_hash(spec_text)
    out = cfg.run_dir

    # -- the device (this rank's under torchrun) and the data
    device = distributed.start(world, _device(cfg.device), cfg.batch)
    try:
        data = make_data(cfg.data, cfg.task, spec.model.vocab, cfg.context, cfg.seed)
    except DataError as e:
        raise TrainError(str(e)) from None

    # -- the model and its optimizer
    torch.manual_seed(cfg.seed)
    try:
        model = nlc.compile(spec, compile=cfg.compile).to(device)
    except Unsupported as e:
        raise e.located(loaded) from None
    if cfg.init is not None and not cfg.resume:      # a resumed run is its checkpoint
        try:
            copied, new = checkpoint.initialise(model, cfg.init)
        except checkpoint.CheckpointError as e:
            raise TrainError(str(e)) from None
        log(f"init: {len(copied)} of the model's {len(copied) + len(new)} tensors from {cfg.init}: "
            f"{', '.join(copied)}" + (f"; new (from the seed): {', '.join(new)}" if new else ""))
    optimizer = compile_optimizer(opt_spec, model.parameters(), **hyper)
    net = distributed.wrap(model, world, device)      # what the steps call: DDP under torchrun
    n_params = sum(p.numel() for p in model.parameters())
    base_lr = [group.get("lr") for group in optimizer.param_groups]   # what the schedule scales
    if (cfg.lr_schedule != "constant" or cfg.warmup) and None in base_lr:
        raise TrainError(f"--lr-schedule and --warmup scale the hyperparameter `lr`, which the optimizer "
                         f"`{opt_spec.name}` does not have")

    # -- the run directory: written to, and locked for this run, before anything is computed
    if world.main:
        try:
            held.enter_context(checkpoint.claim(out))
        except checkpoint.CheckpointError as e:
            raise TrainError(str(e)) from None

    # -- maybe resume
    step, history = 0, []
    if cfg.resume:
        try:   # the model, the optimizer and the RNG states as saved
            ck = checkpoint.restore(out, model, optimizer, spec_sha)
        except checkpoint.CheckpointError as e:
            raise TrainError(str(e)) from None
        for group in optimizer.param_groups:  # hyperparameters given again win over the checkpoint's
            group.update(hyper)
        step, history = ck.step, list(ck.history)
    elif checkpoint.latest(out) is not None:
        log(f"note: starting over; the checkpoints in {out} will be replaced (--resume continues them)")
    start = step
    if start >= cfg.steps:
        log(f"nothing to do: the checkpoint in {out} is at step {start}, and --steps is {cfg.steps}")
        return {"step": step, "steps": cfg.steps, "interrupted": False, "seconds": 0.0, "first_loss": None,
                "last_loss": None, "first_val": None, "last_val": None, "checkpoint": checkpoint.latest(out),
                "floor": data.floor}

    log(f"train `{spec.name}`: {n_params:,} parameters, {spec.model.layers} layers, d_model {spec.model.d_model}, "
        f"optimizer `{opt_spec.name}` ({', '.join(f'{k}={v}' for k, v in {**opt_spec.hyper, **hyper}.items())})")
    log(f"data: {data.describe}; batch {cfg.batch} x {cfg.context} tokens; device {device}; run {out}"
        + (f"; {world.size} processes, {cfg.batch // world.size} sequences each" if world.size > 1 else "")
        + (f"; lr schedule {cfg.lr_schedule}, warmup {cfg.warmup}" if cfg.lr_schedule != "constant" or cfg.warmup else "")
        + (f"; resumed at step {step}" if cfg.resume else ""))

    def evaluate() -> tuple[float, float]:
        """The mean loss over the validation batches, and the exact accuracy over all they count."""
        model.eval()
        losses, right, counted = [], 0, 0
        with torch.no_grad():
            for i in range(cfg.eval_batches):
                x, y = data.batch("val", i, cfg.batch)
                logits = model(x.to(device))[0]
                losses.append(loss_of(logits, y).item())
                r, c = correct(logits, y.to(device))
                right, counted = right + r, counted + c
        model.train()
        return sum(losses) / len(losses), right / max(counted, 1)

    def loss_of(logits, y, reduction="mean"):
        return F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=IGNORE,
                               reduction=reduction)

    def save() -> Path:
        state, opt_state = model.state_dict(), optimizer.state_dict()
        bad = checkpoint.non_finite(state, opt_state)
        if bad:   # never over the last good checkpoint
            kept = checkpoint.latest(out)
            raise TrainError(f"step {step}: {bad}: training diverged (lower the learning rate, e.g. "
                             f"--set lr=...); nothing saved, "
                             + (f"the last checkpoint ({kept}) is kept" if kept else "and no checkpoint before"))
        ck = checkpoint.Checkpoint(step=step, model=state, optimizer=opt_state,
                                   rng=checkpoint.rng_state(), spec=spec_text, spec_sha256=spec_sha,
                                   config=_json_config(cfg), history=history)
        return checkpoint.save(out, ck, keep=cfg.keep, fresh=path is None and not cfg.resume)   # replaces a run before

    # -- the loop: evaluate and save now and then, step, log
    evaluated = {r["step"] for r in history if "val_loss" in r}
    t_start = t_log = time.perf_counter()
    tokens, steps_since_log, path = 0, 0, None
    with stop_requests(log) as flag:
        while True:
            last, stop = step >= cfg.steps, distributed.anyone(flag["stop"], world, device)
            t_pause = time.perf_counter()
            if (step % cfg.eval_every == 0 or last) and step not in evaluated and not stop:
                evaluated.add(step)
                if world.main:
                    val, acc = evaluate()
                    history.append({"step": step, "val_loss": val, "val_acc": acc})
                    log(f"step {step:>6}/{cfg.steps} | val loss {val:.4f} | acc {acc:.4f}"
                        + (f" (loss without memory: {data.floor:.4f})" if data.floor else ""))
                distributed.barrier(world)
            if (step > start and (step % cfg.save_every == 0 or last)) or stop:
                if world.main:
                    path = save()
                distributed.barrier(world)
            if last or stop:
                break
            t_log += time.perf_counter() - t_pause    # the log reports training speed only

            x, y = data.batch("train", step, cfg.batch)
            xs, ys, counted = distributed.shard(x, y, world)   # this rank's rows (all of them in one process)
            try:   # the global batch's mean loss (under torchrun, this rank's share of it)
                loss = loss_of(net(xs.to(device))[0], ys, "sum") / counted
            except ValueError as e:  # an op's precondition, such as a retention gate that reached 0
                raise TrainError(f"step {step + 1}: {e}. The run has probably diverged (try a lower learning "
                                 f"rate: --set lr=...); the last checkpoint is kept") from None
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip if cfg.clip > 0 else math.inf)
            if not math.isfinite(norm.item()):  # before the step: a NaN gradient never reaches the parameters
                raise TrainError(f"the gradient is {norm.item()} at step {step + 1} (loss {loss.item():.4g}): training "
                                 f"diverged (lower the learning rate, e.g. --set lr=...); the last checkpoint is kept")
            schedule.apply(optimizer, base_lr, cfg.lr_schedule, step, cfg.steps, cfg.warmup)   # a function of the step
            optimizer.step()
            step += 1
            tokens += x.numel()
            steps_since_log += 1

            if step % cfg.log_every == 0 or step == start + 1:
                lossf = distributed.mean(loss, world)
                now = time.perf_counter()
                lr_now = optimizer.param_groups[0].get("lr")      # the learning rate of this step
                history.append({"step": step, "loss": lossf, "lr": lr_now, "tokens_per_s": tokens / (now - t_log)})
                log(f"step {step:>6}/{cfg.steps} | loss {lossf:.4f} | " + (f"lr {lr_now:.3g} | " if lr_now else "")
                    + f"{tokens / (now - t_log):,.0f} tok/s | {1000 * (now - t_log) / steps_since_log:.1f} ms/step")
                t_log, tokens, steps_since_log = now, 0, 0
                if not math.isfinite(lossf):
                    raise TrainError(f"the loss is {lossf} at step {step}: training diverged (lower the "
                                     f"learning rate, e.g. --set lr=...); the last checkpoint is kept")

    stopped = stop and not last
    elapsed = time.perf_counter() - t_start
    train_losses = [r["loss"] for r in history if r.get("loss") is not None]   # None: not finite, in a checkpoint
    val_losses = [r["val_loss"] for r in history if r.get("val_loss") is not None]
    summary = {"step": step, "steps": cfg.steps, "interrupted": stopped, "seconds": elapsed,
               "first_loss": train_losses[0] if train_losses else None,
               "last_loss": train_losses[-1] if train_losses else None,
               "first_val": val_losses[0] if val_losses else None, "last_val": val_losses[-1] if val_losses else None,
               "checkpoint": path, "floor": data.floor}
    what = "interrupted" if stopped else "done"
    log(f"{what}: step {step}/{cfg.steps} ({step - start} steps in {elapsed:.1f} s); "
        + (f"train loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}; " if train_losses else "")
        + (f"val loss {summary['first_val']:.4f} -> {summary['last_val']:.4f}; " if val_losses else "")
        + f"checkpoint {path}" + ("; continue with --resume" if stopped else ""))
    return summary


def _device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainError(f"unknown device `{name}`: use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise TrainError(f"device `{name}`: nlc runs on a CPU or a CUDA GPU: use --device cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device `{name}` asked for, but torch sees no CUDA device here: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise TrainError(f"device `{name}`: torch sees {n} CUDA device{'s' * (n != 1)} here, "
                         f"cuda:0 to cuda:{n - 1}")
    return device


def _json_config(cfg: TrainConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in cfg.model_dump().items()}
