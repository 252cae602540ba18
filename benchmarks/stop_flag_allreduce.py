"""What agreeing on a stop costs per step under DDP: one int32 all-reduce
(StopRequest.agreed), timed on N processes with gloo on the CPU (nccl on CUDA when
--device cuda). Prints the mean and median microseconds per call.

    python benchmarks/stop_flag_allreduce.py --nproc 2 --calls 2000
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparse_mae.bench.timing import time_calls
from sparse_mae.train.signals import StopRequest


def worker(rank: int, nproc: int, calls: int, device: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=nproc)
    dev = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    stop = StopRequest([])
    times = time_calls(lambda _: stop.agreed(True, dev), warmup=100, repeats=calls, device=dev)
    if rank == 0:
        print(f"{nproc} processes, {device}: stop-flag all-reduce {statistics.mean(times) * 1e6:.0f} us mean, "
              f"{statistics.median(times) * 1e6:.0f} us median over {calls} calls")
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--port", type=int, default=29611)
    a = p.parse_args(argv)
    mp.spawn(worker, args=(a.nproc, a.calls, a.device, a.port), nprocs=a.nproc)


if __name__ == "__main__":
    main()
