"""sparse_norm.SyncBatchNorm2d on two CPU processes (gloo): each holding half the rows, it gives
what one BatchNorm2d gives over all of them: outputs, input and affine gradients (summed over
the processes, as DDP averages them), running statistics. torch's nn.SyncBatchNorm refuses
CPU tensors, which is why it exists."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from sparse_mae.models.sparse_norm import SyncBatchNorm2d, batch_norm_rows, convert_sync_batchnorm

C = 6


def data():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(40, C, generator=g) * 2 + 1
    upstream = torch.randn(40, C, generator=g)
    weight, bias = torch.randn(C, generator=g), torch.randn(C, generator=g)
    return rows, upstream, weight, bias


def make_bn(cls, weight, bias):
    bn = cls(C)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    return bn


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rows, upstream, weight, bias = data()
    # uneven halves: 15 and 25 visible sites
    part = slice(0, 15) if rank == 0 else slice(15, 40)
    x = rows[part].clone().requires_grad_()
    bn = make_bn(SyncBatchNorm2d, weight, bias)
    out = batch_norm_rows(bn, x)
    (out * upstream[part]).sum().backward()
    torch.save({"out": out.detach(), "grad_x": x.grad, "grad_w": bn.weight.grad, "grad_b": bn.bias.grad,
                "running_mean": bn.running_mean, "running_var": bn.running_var},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_equal_one_batch_norm_over_all_rows(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in range(2))
    rows, upstream, weight, bias = data()
    x = rows.clone().requires_grad_()
    bn = make_bn(nn.BatchNorm2d, weight, bias)
    out = batch_norm_rows(bn, x)
    (out * upstream).sum().backward()
    torch.testing.assert_close(torch.cat([r0["out"], r1["out"]]), out.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r0["grad_x"], r1["grad_x"]]), x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r0["grad_w"] + r1["grad_w"], bn.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r0["grad_b"] + r1["grad_b"], bn.bias.grad, rtol=1e-4, atol=1e-5)
    for r in (r0, r1):
        torch.testing.assert_close(r["running_mean"], bn.running_mean)
        torch.testing.assert_close(r["running_var"], bn.running_var)


def test_conversion_keeps_parameters_buffers_and_mode():
    seq = nn.Sequential(nn.Conv2d(3, C, 1), nn.BatchNorm2d(C), nn.Sequential(nn.BatchNorm2d(C))).eval()
    nn.init.normal_(seq[1].weight)
    seq[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in seq.state_dict().items()}
    convert_sync_batchnorm(seq)
    assert type(seq[1]) is SyncBatchNorm2d and type(seq[2][0]) is SyncBatchNorm2d and not seq[1].training
    after = seq.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("training", [True, False])
def test_one_process_is_a_batch_norm(training):
    rows, _, weight, bias = data()
    ours, plain = make_bn(SyncBatchNorm2d, weight, bias).train(training), make_bn(nn.BatchNorm2d, weight, bias)
    plain.train(training)
    torch.testing.assert_close(batch_norm_rows(ours, rows), batch_norm_rows(plain, rows))
