"""DDP set-up from torchrun's or SLURM's environment. One code path: a plain `python` run
is world size 1.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous address). Without them,
a task started by `srun` (directly, from an sbatch script or from submitit) reads SLURM's:
SLURM_PROCID -> rank, SLURM_STEP_NUM_TASKS -> world size, SLURM_LOCALID -> local rank, and
the master address is the first host of the step's node list (`scontrol show hostnames`),
the port derived from the job id (MASTER_ADDR / MASTER_PORT in the environment win). Only
a step started by srun counts: an sbatch script's own shell also sees SLURM_NTASKS, but
it is one process, and treating it as rank 0 of several would wait forever for the rest.
We then join the process group (nccl on CUDA, gloo on CPU), pin each rank to its local
GPU and let only rank 0 log and write.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" -> this rank's CUDA device when there is one, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")


SLURM_PORT_BASE = 20000  # MASTER_PORT = this + job id % SLURM_PORT_SPAN (two jobs on a node rarely share it)
SLURM_PORT_SPAN = 20000


def slurm_master_address(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[01-04],cpu7" -> "gpu01"), as scontrol expands it."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=60, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"cannot expand the SLURM node list {nodelist!r} with `scontrol show hostnames` ({e}); "
                           f"set MASTER_ADDR to the first node's host name") from e
    if not out:
        raise RuntimeError(f"`scontrol show hostnames {nodelist}` printed no host; set MASTER_ADDR")
    return out[0]


def adopt_slurm_environment(env: dict | None = None) -> bool:
    """Inside an srun step of several tasks and outside torchrun: set RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT from SLURM's variables. -> whether it did."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env or int(env.get("SLURM_STEP_NUM_TASKS", "1")) <= 1:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = slurm_master_address(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    env.setdefault("MASTER_PORT", str(SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % SLURM_PORT_SPAN))
    return True


def init_distributed(device: str = "auto") -> DistInfo:
    adopt_slurm_environment()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor (a copy; identity when not distributed)."""
    t = t.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(*flags: bool, device: torch.device) -> list[bool]:
    """Each flag: whether any rank raised it. Under DDP a collective that every rank calls at
    the same point (one int32 all-reduce for all the flags); alone, the flags themselves."""
    if not dist.is_initialized():
        return list(flags)
    raised = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(raised, op=dist.ReduceOp.SUM)
    return [bool(v) for v in raised.tolist()]


def broadcast_from_main(value):
    """Rank 0's `value` on every rank (pickled; for small objects)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_on_main(fn, default=None):
    """`fn()` on rank 0 only (other ranks get `default`). An exception there is raised on
    every rank, so no rank waits forever for a rank that has given up."""
    if not dist.is_initialized():
        return fn()
    result, error = default, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    try:
        shared = broadcast_from_main(error)
    except Exception:  # noqa: BLE001 - an exception that does not pickle: send its text
        shared = broadcast_from_main(RuntimeError(f"{type(error).__name__}: {error}") if error else None)
    if error is not None:
        raise error
    if shared is not None:
        raise shared
    return result
