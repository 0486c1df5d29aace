"""The settings of `nlc train`: `TrainConfig`, the one list of its options (runtime/cli_train.py makes
the command's options from its fields), and `resolve`, which fills them in (given, then on --resume
the checkpoint's, then the defaults); the device that `--device` names (`_device`), and the settings
as a checkpoint stores them (`_json_config`). A mistake in them is a `TrainError`. The loop that runs
them is `nlc.runtime.train`, which re-exports these names."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt


class TrainError(Exception):
    """A mistake in how a run was asked for (not in a spec): the CLI prints it and exits 2."""


def _cli(**how) -> dict:
    """How a setting appears in `nlc train` (runtime/cli_train.py builds the command from these fields):
    `flag`, `metavar`, `cli=False` for none."""
    return {"json_schema_extra": {"cli": how}}


class TrainConfig(BaseModel):
    """The settings of a run. On `--resume`, settings not given again come from the checkpoint.

    The one list of `nlc train`'s options: each field is an option named after it (`log_every`:
    `--log-every`) whose help is the field's description, `{default}` standing for its default."""
    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: Path = Field(description="a model spec file")
    data: Path | None = Field(None, description="a text file, or a folder of them (concatenated in sorted path "
                                                "order), read as bytes (vocab 256), split 90/10 into train/val; "
                                                "without it a synthetic task (not both)")
    task: str = Field("copy", description="synthetic task: copy (default), recall, mqar, niah, parity, anbn, with "
                                          "options (mqar:pairs=32,queries=16); `--task help` lists them; an error "
                                          "with --data", **_cli(metavar="NAME[:KEY=VALUE,...]", eager=True))
    steps: PositiveInt = Field(200, description="optimizer steps in all [{default}]")
    batch: PositiveInt = Field(16, description="sequences per step [{default}]; under torchrun the global batch, a "
                                               "multiple of the processes, split among them")
    context: PositiveInt = Field(64, description="tokens per sequence [{default}]")
    out: Path | None = Field(None, description="the run's directory, created and locked for the run "
                                               "[runs/<spec file name>]")
    resume: bool = Field(False, description="continue from the newest checkpoint in --out; settings not given "
                                            "again are the checkpoint's")
    sets: tuple[str, ...] = Field((), description="override: `name=value` an optimizer hyperparameter (lr=1e-3), "
                                                  "`path.key=value` the spec (model.d_model=64); repeatable",
                                  **_cli(flag="--set", metavar="KEY=VALUE"))
    seed: int = Field(0, description="seeds the initialisation and the data [{default}]")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto [{default}]; under torchrun cuda puts each "
                                            "process on cuda:LOCAL_RANK")
    lr_schedule: Literal["constant", "cosine", "wsd"] = Field(
        "constant", description="the learning rate's schedule: constant [default]; cosine (to 0 at --steps); wsd "
                                "(warmup, stable, then a linear decay to 0 over the last 20% of the steps)",
        **_cli(metavar="constant|cosine|wsd"))
    warmup: NonNegativeInt = Field(0, description="steps of linear warmup of the learning rate [{default}]")
    log_every: PositiveInt = Field(10, description="steps between log lines [{default}]")
    eval_every: PositiveInt = Field(100, description="steps between evaluations (loss and accuracy on the "
                                                     "validation split) [{default}]")
    save_every: PositiveInt = Field(100, description="steps between checkpoints [{default}]")
    keep: PositiveInt = Field(3, description="checkpoints to keep, the newest [{default}]")
    clip: float = Field(1.0, ge=0, allow_inf_nan=False, description="gradient norm clipping, 0 for none [{default}]")
    init: Path | None = Field(None, description="start from these weights: a safetensors file named as the model's "
                                                "tensors, or another run or checkpoint (its model); tensors it lacks "
                                                "keep the seed's initialisation")
    compile: bool = Field(False, description="run the model's hot loops (Hope's generator scan) under "
                                             "torch.compile: compiled once, cached; eager, with a warning, without "
                                             "a C++ compiler")
    backend: Literal["auto", "torch", "triton"] = Field(
        "auto", description="who runs the levels' chunked forms: auto [default] (Triton kernels on CUDA where "
                            "they are the faster, torch otherwise; `nlc explain SPEC` lists which), torch, or "
                            "triton (the kernels wherever they serve; on a CPU under Triton's interpreter: slow)",
        **_cli(metavar="auto|torch|triton"))
    precision: Literal["float32", "bf16"] = Field(
        "float32", description="float32 [default], or bf16: mixed precision, torch.autocast to bfloat16 around the "
                               "model (projections, attention, MLPs and the memories' reads in bfloat16; every "
                               "memory's recurrence in float32, its Triton kernels taking 16-bit q, k, v with TF32 "
                               "products); the weights and the optimizer stay float32",
        **_cli(metavar="float32|bf16"))
    tensorboard: bool = Field(False, description="also log the scalars (loss, lr, tokens/s, eval loss and "
                                                 "accuracy) for TensorBoard, in OUT/tensorboard; needs `pip "
                                                 "install tensorboard`")
    eval_batches: PositiveInt = Field(4, description="validation batches per evaluation", **_cli(cli=False))

    # what a resumed run takes from its checkpoint unless given again
    RESUMED: ClassVar[tuple[str, ...]] = ("data", "task", "steps", "batch", "context", "sets", "seed", "log_every",
                                          "eval_every", "eval_batches", "save_every", "keep", "clip",
                                          "lr_schedule", "warmup")

    @property
    def run_dir(self) -> Path:
        return self.out if self.out is not None else Path("runs") / self.spec.stem


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
