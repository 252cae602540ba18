"""The one DataLoader of every app, and the one way a batch reaches the model.

`make_loader` builds every DataLoader (training, evaluation, the probe). `to_model` turns
what a loader (or a list of items) gives into what the model takes: collated, decoded on
the device (data.decode=gpu; sparse_mae/data/gpu_decode.py), moved to the device and
normalised (uint8 batches: sparse_mae.data.transforms.model_input). The callers import
neither gpu_decode nor transforms.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch.utils.data import DataLoader

from sparse_mae.data.gpu_decode import collate, decode_batch
from sparse_mae.data.transforms import model_input

# what counts damaged samples and stays on the CPU: reading it needs no device sync
BOOKKEEPING = ("skipped", "index")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a SLURM or cgroup allotment, not
    the machine's count), shared among the processes of this node's run (torchrun's
    LOCAL_WORLD_SIZE; 1 otherwise)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def default_workers() -> int:
    """data.num_workers=null: one loader worker per usable core, less the training process's own."""
    return max(1, usable_cores() - 1)


def make_loader(dataset, batch_size: int, *, num_workers: int | None = None, seed: int = 0, sampler=None,
                drop_last: bool = False, device: torch.device | None = None, persistent: bool = False,
                worker_init_fn: Callable[[int], None] | None = None) -> DataLoader:
    """The DataLoader of `dataset` (a SeededDataset): `num_workers` None is default_workers();
    its own generator from `seed`, since iterating must not draw from the global RNG (the global
    stream would then depend on where a run was resumed or when it evaluated); pinned memory
    for a CUDA `device`; `persistent` workers (training: a new epoch reaches them through the
    sampler, which runs in this process); `worker_init_fn` (the stop-signal policy of
    train.signals: a scheduler signals every process, and a worker killed by it would fail
    the run instead of stopping it)."""
    workers = default_workers() if num_workers is None else num_workers
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=workers,
                      persistent_workers=persistent and workers > 0,
                      pin_memory=device is not None and device.type == "cuda", collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=worker_init_fn)


def to_model(batch: dict | list[dict], device: torch.device, dataset=None) -> dict:
    """A loader's batch (or a list of items) as the model takes it: "image" normalised float32
    on `device`, the other tensors on `device` too except BOOKKEEPING ("skipped": 1 for an
    item standing in for a damaged sample; "index": the sample asked for), which stay on the
    CPU. `dataset`: the batch's own, whose CPU path decodes a sample the GPU refuses."""
    if isinstance(batch, list):
        batch = collate(batch)
    batch = decode_batch(batch, device, dataset)  # data.decode=gpu: decoded here; other batches pass unchanged
    batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and k not in BOOKKEEPING else v
             for k, v in batch.items()}
    batch["image"] = model_input(batch["image"])
    return batch
