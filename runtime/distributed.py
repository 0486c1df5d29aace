"""Data-parallel training under torchrun: one process (rank) per device, DistributedDataParallel.

    torchrun --nproc_per_node 2 -m nlc.runtime.cli train SPEC --batch 32 ...

torchrun starts the processes and puts WORLD_SIZE, RANK and LOCAL_RANK (and the rendezvous,
MASTER_ADDR and MASTER_PORT) in their environment; without them a run is one process and every
function here is the identity. With them:

- the process group is gloo on a CPU and NCCL on CUDA, where each rank runs on cuda:LOCAL_RANK;
- `--batch` stays the global batch, split evenly: every rank draws the step's whole batch (a pure
  function of (seed, step), so resuming needs no data state) and trains on its own contiguous
  `batch / world` rows, so the ranks' rows together are the batch of a one-process run;
- each rank's loss is its rows' summed loss over the global batch's counted tokens, times the
  number of ranks (DDP averages the ranks' gradients): the gradient is the one-process gradient
  whatever the rows' counts, and every rank holds the same parameters after each step;
- rank 0 logs, evaluates and saves, while the others wait at a barrier; every rank reads the
  checkpoint on --resume. A Ctrl-C reaches each rank at its own moment, so the ranks agree on a
  stop at each step.

A CMS model needs nothing more: its in-context updates are per sequence, so they stay on the rank
that holds the sequence, and the inner gradients (`torch.autograd.grad` with respect to the fast
weights, in the forward and in each window's backward) never run the parameters' gradient
accumulators, whose hooks are where DDP averages the outer gradient.
"""
from __future__ import annotations

import atexit
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nlc.runtime.data import IGNORE
from nlc.runtime.train import TrainError


@dataclass(frozen=True)
class World:
    """The processes of a run: `size` of them, this one `rank`, `local_rank` on its machine."""
    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process logs, evaluates and saves."""
        return self.rank == 0


def world() -> World:
    """The world torchrun describes in the environment; one process without it."""
    env = os.environ
    if int(env.get("WORLD_SIZE", 1)) == 1:
        return World()
    return World(int(env["WORLD_SIZE"]), int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"])))


def start(w: World, device: torch.device, batch: int) -> torch.device:
    """Join the process group (once per process); returns this rank's device."""
    if w.size == 1:
        return device
    if batch % w.size:
        raise TrainError(f"--batch {batch} is the global batch, split evenly over the {w.size} processes: "
                         f"make it a multiple of {w.size}")
    if device.type == "cuda":
        if device.index is not None:
            raise TrainError(f"--device {device}: under torchrun each process runs on cuda:LOCAL_RANK; "
                             f"give --device cuda (or auto)")
        if w.local_rank >= torch.cuda.device_count():
            raise TrainError(f"rank {w.rank} is local rank {w.local_rank}, but torch sees "
                             f"{torch.cuda.device_count()} CUDA devices: start at most that many per machine")
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise TrainError(f"--device {device}: torchrun trains on cpu (gloo) or cuda (NCCL)")
    if not dist.is_initialized():
        dist.init_process_group(**({"backend": "nccl", "device_id": device} if device.type == "cuda"
                                   else {"backend": "gloo"}))
        atexit.register(dist.destroy_process_group)
    return device


def wrap(model: torch.nn.Module, w: World, device: torch.device) -> torch.nn.Module:
    """The module the training steps call: under torchrun, DDP over `model` (which averages the
    gradients over the ranks in backward); `model` itself in one process."""
    if w.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    # Hope's [1, 1, d] generator weights get gradients sliced from their stack, whose size-1 dims keep
    # the stack's strides: DDP copies them into its bucket and warns that this "may impair performance"
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard(x: torch.Tensor, y: torch.Tensor, w: World) -> tuple[torch.Tensor, torch.Tensor, float]:
    """This rank's rows of the global batch `(x, y)`, and what its summed loss is divided by: the
    global batch's counted tokens over the number of ranks."""
    rows = x.shape[0] // w.size
    mine = slice(w.rank * rows, (w.rank + 1) * rows)
    return x[mine], y[mine], max(int((y != IGNORE).sum()), 1) / w.size


def mean(value: torch.Tensor, w: World) -> float:
    """The mean of `value` over the ranks: of their shares of the loss, the global batch's loss."""
    if w.size > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= w.size
    return value.item()


def anyone(flag: bool, w: World, device: torch.device) -> bool:
    """Whether `flag` is set on any rank."""
    if w.size == 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(w: World) -> None:
    """Wait until every rank is here (the others, while rank 0 evaluates or saves)."""
    if w.size > 1:
        dist.barrier()
