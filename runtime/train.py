"""`nlc train`: train the compiled model of a spec with the optimizer the spec names.

The run reads top to bottom (`train`, its body `_train`): settings (`TrainConfig` and `resolve`:
`nlc.runtime.train_config`), the spec (with `--set` applied and checked again:
`nlc.runtime.overrides`), the data, the model and its optimizer, the run directory (written to and
locked before anything is computed: `checkpoint.claim`), maybe the checkpoint to resume, then the
loop: occasionally evaluate and save, then one step (forward, backward, a check that the loss and
the gradient are finite: `nlc.runtime.diverge`, optimizer), then log (and report the step to a
progress bar: `nlc.runtime.progress`; to TensorBoard: `nlc.runtime.board`); at the end, curves.png
(`nlc.runtime.curves`) and the summary.

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
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Callable

# (benchmarks/studies import load_spec and parse_sets from here too)
from nlc.loader import not_a_model
from nlc.runtime.overrides import check_hyper_sets, load_spec, parse_sets
from nlc.runtime.stop import stop_requests
# the settings (`nlc.runtime.train_config`), imported from here too
from nlc.runtime.train_config import TrainConfig, TrainError, _device, _json_config, resolve

__all__ = ["DEFAULT_OPTIMIZER", "Diverged", "TrainConfig", "TrainError", "resolve", "train"]

DEFAULT_OPTIMIZER = "adamw"


class Diverged(TrainError):
    """The loss, a gradient or a weight became NaN or infinite: the run stops, keeping its last (finite)
    checkpoint; the message names the step and the first bad tensor. The CLI exits 3."""


# ---------------------------------------------------------------- the run

def _kernel_note(spec, backend: str, device) -> str | None:
    """A line saying which levels and fused flows run Triton kernels (the first step compiles them), or None."""
    from nlc.backends.dispatch import interpreter_ready, triton_error
    from nlc.backends.triton.plan import fused_flows, kernel_levels
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):    # auto runs torch on a CPU
        return None
    served = [f"level {n}" for n in kernel_levels(spec, backend)] + [f"flow {at}" for at, _ in fused_flows(spec)]
    if not served:
        return None
    if device.type != "cuda":
        why = triton_error() or (None if interpreter_ready() else "TRITON_INTERPRET=1 was not set before import")
        if why:
            raise TrainError(f"--backend triton on a CPU runs the kernels under Triton's interpreter, but {why}; "
                             "use --backend torch")
        return f"note: {', '.join(served)} run their kernels under Triton's interpreter (slow: for checking)"
    return (f"note: {', '.join(served)} run Triton kernels (`nlc explain SPEC --backend {backend}` lists them); "
            "the first step compiles them, which can take a minute or two, and Triton caches them")


def train(cfg: TrainConfig, log: Callable[[str], None] = lambda s: print(s, flush=True),
          progress: Callable[[int, int, float, int], None] | None = None) -> dict:
    """Train as `cfg` says; returns a summary (this run's first and final losses, steps, tokens,
    time, checkpoint). `progress(step, steps, loss, tokens)` hears of every step (a progress bar)."""
    with ExitStack() as held:       # the run directory's lock (`checkpoint.claim`), held until the run ends
        return _train(cfg, log, progress, held)


def _train(cfg: TrainConfig, log: Callable[[str], None], progress, held: ExitStack) -> dict:
    import torch
    import torch.nn.functional as F

    import nlc
    from nlc import spec as S
    from nlc.backends.torch.codegen import Unsupported
    from nlc.backends.torch.optim import _load as load_optimizer, compile_optimizer, optimizer_of
    from nlc.runtime import board, checkpoint, curves, distributed, diverge, schedule
    from nlc.runtime.data import IGNORE, DataError, correct, make_data

    world = distributed.world()                # torchrun's processes; one without it
    log = log if world.main else (lambda s: None)
    progress = progress if world.main else None
    try:                                       # --tensorboard without TensorBoard: refused before any work
        tb_writer = board.writer_class() if cfg.tensorboard and world.main else None
    except ImportError as e:
        raise TrainError(str(e)) from None

    # -- the spec, with --set applied, checked like a file
    cmdline, sets = parse_sets(cfg.sets)
    spec_sets = [o for o in sets if "." in o.key]
    hyper_sets = [o for o in sets if "." not in o.key]
    loaded = load_spec(cfg.spec, spec_sets, cmdline)
    spec = loaded.spec
    if not isinstance(spec, S.ModelSpec):
        raise TrainError(not_a_model(cfg.spec, spec.name, "train"))
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
        model = nlc.compile(spec, compile=cfg.compile, backend=cfg.backend).to(device)
    except Unsupported as e:
        raise e.located(loaded) from None
    kernels = _kernel_note(spec, cfg.backend, device)
    if kernels:
        log(kernels)
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
    if cfg.precision == "bf16" and device.type == "cpu":
        log("note: --precision bf16 on a CPU: bfloat16 matmuls are emulated on many CPUs (on a 2-core AMD EPYC "
            "a step ran about 25x slower than in float32); it is for checking a run meant for a GPU")
    start = step
    if start >= cfg.steps:
        log(f"nothing to do: the checkpoint in {out} is at step {start}, and --steps is {cfg.steps}")
        return {"step": step, "steps": cfg.steps, "interrupted": False, "seconds": 0.0, "start": start,
                "first_loss": None, "last_loss": None, "tokens": 0, "tokens_per_s": None, "first_val": None,
                "last_val": None, "checkpoint": checkpoint.latest(out), "floor": data.floor}

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
                with amp():
                    logits = model(x.to(device))[0]
                losses.append(loss_of(logits, y).item())
                r, c = correct(logits, y.to(device))
                right, counted = right + r, counted + c
        model.train()
        return sum(losses) / len(losses), right / max(counted, 1)

    def amp():   # --precision bf16: autocast around the model (the memories' recurrences opt out)
        if cfg.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    def under_amp(fn, *args):
        with amp():
            return fn(*args)

    def loss_of(logits, y, reduction="mean"):
        return F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=IGNORE,
                               reduction=reduction)

    def save() -> Path:
        state, opt_state = model.state_dict(), optimizer.state_dict()
        bad = checkpoint.non_finite(state, opt_state)
        if bad:   # never over the last good checkpoint
            kept = checkpoint.latest(out)
            raise Diverged(f"step {step}: {bad}: training diverged (lower the learning rate, e.g. "
                             f"--set lr=...); nothing saved, "
                             + (f"the last checkpoint ({kept}) is kept" if kept else "and no checkpoint before"))
        ck = checkpoint.Checkpoint(step=step, model=state, optimizer=opt_state,
                                   rng=checkpoint.rng_state(), spec=spec_text, spec_sha256=spec_sha,
                                   config=_json_config(cfg), history=history)
        return checkpoint.save(out, ck, keep=cfg.keep, fresh=path is None and not cfg.resume)   # replaces a run before

    # -- the loop: evaluate and save now and then, step, log
    evaluated = {r["step"] for r in history if "val_loss" in r}
    tb = board.Board(out, tb_writer) if tb_writer else None
    if tb:
        held.callback(tb.close)

    def record(r: dict) -> None:     # a line of the run's history (metrics.jsonl), and TensorBoard's
        history.append(r)
        if tb:
            tb.record(r)

    t_start = t_log = time.perf_counter()
    tokens, steps_since_log, path, all_tokens, first_loss, loss = 0, 0, None, 0, None, None
    with stop_requests(log) as flag:
        while True:
            last, stop = step >= cfg.steps, distributed.anyone(flag["stop"], world, device)
            t_pause = time.perf_counter()
            if (step % cfg.eval_every == 0 or last) and step not in evaluated and not stop:
                evaluated.add(step)
                if world.main:
                    val, acc = evaluate()
                    record({"step": step, "val_loss": val, "val_acc": acc})
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
                with amp():
                    logits, states = net(xs.to(device))[:2]
                loss = loss_of(logits, ys, "sum") / counted
            except ValueError as e:  # an op's precondition, such as a retention gate that reached 0
                raise Diverged(f"step {step + 1}: {e}. The run has probably diverged (try a lower learning "
                               f"rate: --set lr=...); {diverge.culprit(model) or 'every parameter is finite'}; "
                               f"the last checkpoint is kept") from None
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip if cfg.clip > 0 else math.inf).item()
            # before the optimizer step: a NaN loss or gradient never reaches the parameters (every rank agrees)
            if distributed.anyone(not (math.isfinite(norm) and math.isfinite(loss.item())), world, device):
                bad = diverge.culprit(model, states, rerun=lambda: under_amp(model, xs.to(device)))
                raise Diverged(diverge.message(step + 1, loss.item(), norm, bad,
                                               checkpoint.latest(out) if world.main else None))
            schedule.apply(optimizer, base_lr, cfg.lr_schedule, step, cfg.steps, cfg.warmup)   # a function of the step
            optimizer.step()
            step += 1
            tokens += x.numel()
            all_tokens += x.numel()
            steps_since_log += 1
            if progress:
                progress(step, cfg.steps, loss.item(), x.numel())   # (under torchrun rank 0's estimate)

            if step % cfg.log_every == 0 or step == start + 1:
                lossf = distributed.mean(loss, world)
                first_loss = lossf if step == start + 1 else first_loss
                now = time.perf_counter()
                lr_now = optimizer.param_groups[0].get("lr")      # the learning rate of this step
                record({"step": step, "loss": lossf, "lr": lr_now, "tokens_per_s": tokens / (now - t_log)})
                log(f"step {step:>6}/{cfg.steps} | loss {lossf:.4f} | " + (f"lr {lr_now:.3g} | " if lr_now else "")
                    + f"{tokens / (now - t_log):,.0f} tok/s | {1000 * (now - t_log) / steps_since_log:.1f} ms/step")
                t_log, tokens, steps_since_log = now, 0, 0

    stopped = stop and not last
    elapsed = time.perf_counter() - t_start
    final_loss = distributed.mean(loss, world) if loss is not None else None   # the last step's, logged or not
    if world.main:
        try:
            curves.write(history, out)
        except ImportError:       # matplotlib is a dependency; a broken install loses the plot, not the run
            log(f"note: no {curves.CURVES}: matplotlib does not import")
    # this run's numbers (a resumed run's from its first step on, not the checkpoint's history)
    vals = [(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None and r["step"] >= start]
    summary = {"step": step, "steps": cfg.steps, "interrupted": stopped, "seconds": elapsed, "start": start,
               "first_loss": first_loss, "last_loss": final_loss, "tokens": all_tokens,
               "tokens_per_s": all_tokens / elapsed if elapsed > 0 else None,
               "first_val": vals[0][1] if vals else None, "last_val": vals[-1][1] if vals else None,
               "checkpoint": path, "floor": data.floor}
    what = "interrupted" if stopped else "done"
    log(f"{what}: step {step}/{cfg.steps} ({step - start} steps, {all_tokens:,} tokens in {elapsed:.1f} s, "
        f"{summary['tokens_per_s'] or 0:,.0f} tok/s); "
        + (f"train loss {first_loss:.4f} (step {start + 1}) -> {final_loss:.4f} (step {step}); "
           if first_loss is not None and final_loss is not None else "")
        + (f"val loss {vals[0][1]:.4f} (step {vals[0][0]}) -> {vals[-1][1]:.4f} (step {vals[-1][0]}); "
           if vals else "")
        + f"checkpoint {path}" + ("; continue with --resume" if stopped else ""))
    return summary
