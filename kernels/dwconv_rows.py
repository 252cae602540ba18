"""The packed-row contract of the sparse depthwise 7x7, shared by its kernels.

Sites are packed rows x (M, C); nbr (M, 49) int32 holds the row of each site's
neighbour at tap k = (dy+3)*7 + (dx+3) (ky-major, the order of a dense weight
(C, 1, 7, 7).view(C, 49)), -1 where absent; the map is symmetric (built from one set of
sites), which makes the input gradient the same op with the taps flipped.

    out[m, c] = sum_k x[nbr[m, k], c] * weight[c, k] + bias[c]

Here: the input checks, `neighbour_map`, and `sparse_dwconv_reference` in plain torch
(fp32 accumulation, output in x's dtype; under autocast x, weight, bias are cast to the
autocast dtype first, like a dense conv). Two kernels implement it: `triton_ops`
(CUDA) and `cpu_ops` (C), and the tests compare both against the reference.
"""
from __future__ import annotations

import torch

TAPS = 49  # 7x7 depthwise offsets
KERNEL = 7
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _check_rows(x) -> tuple[int, int]:
    """x must be float packed rows (M, C) (the GRN op of `triton_ops` takes them too) -> (M, C)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be packed rows (M, C), got {tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    return x.shape


def _check_dwconv(x, nbr, weight, bias, check_values: bool | None):
    """Validate and normalise the inputs; returns (x, nbr, weight (C, 49), bias) contiguous."""
    m, c = _check_rows(x)
    if nbr.dim() != 2 or nbr.shape[1] != TAPS or nbr.shape[0] != m:
        raise ValueError(f"nbr must be (M, 49) = ({m}, 49) neighbour rows, got {tuple(nbr.shape)}")
    if nbr.dtype != torch.int32:
        raise ValueError(f"nbr must be int32 (convert with nbr.to(torch.int32)), got {nbr.dtype}")
    if weight.dim() == 4 and tuple(weight.shape) == (c, 1, KERNEL, KERNEL):
        weight = weight.reshape(c, TAPS)  # a dense depthwise weight, same tap order
    if tuple(weight.shape) != (c, TAPS):
        raise ValueError(f"weight must be (C, 49) = ({c}, 49) or ({c}, 1, 7, 7), got {tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weight must be a float tensor, got {weight.dtype}")
    if bias is not None:
        if tuple(bias.shape) != (c,):
            raise ValueError(f"bias must be (C,) = ({c},), got {tuple(bias.shape)}")
        if bias.dtype not in FLOAT_DTYPES:
            raise ValueError(f"bias must be a float tensor, got {bias.dtype}")
    for name, t in (("nbr", nbr), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
    if check_values or (check_values is None and x.device.type == "cpu"):
        _check_neighbour_values(nbr)
    return x.contiguous(), nbr.contiguous(), weight.contiguous(), (bias.contiguous() if bias is not None else None)


def _check_neighbour_range(nbr: torch.Tensor) -> None:
    """Rows in [-1, M): the cheap part of `_check_neighbour_values` (two reductions)."""
    m = nbr.shape[0]
    if m and (int(nbr.min()) < -1 or int(nbr.max()) >= m):
        raise ValueError(f"nbr values must be rows in [0, {m}) or -1 for an absent neighbour")


def _check_neighbour_values(nbr: torch.Tensor) -> None:
    """Rows in [-1, M), and the map symmetric: n = nbr[m, k] iff m = nbr[n, 48 - k].

    Symmetry (output sites = input sites) is what lets the input gradient be the same
    gather with the flipped kernel. Costs a device sync, hence only on request on CUDA.
    """
    _check_neighbour_range(nbr)
    m = nbr.shape[0]
    if m == 0:
        return
    rows = torch.arange(m, device=nbr.device).unsqueeze(1).expand(m, TAPS)
    taps = torch.arange(TAPS, device=nbr.device).expand(m, TAPS)
    present = nbr >= 0
    back = nbr.long()[present], (TAPS - 1) - taps[present]
    if not bool((nbr[back] == rows[present]).all()):
        raise ValueError(
            "nbr is not a submanifold neighbour map: site n is m's neighbour at offset k but m "
            "is not n's neighbour at offset 48-k (build it from one set of site coordinates, "
            "e.g. with neighbour_map())"
        )


def neighbour_map(sites: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(M, 3) integer sites (sample, y, x) on an height x width grid -> (M, 49) int32 nbr.

    nbr[m, k] is the row of the site at (y + dy, x + dx) of the same sample,
    k = (dy+3)*7 + (dx+3), or -1 if that site is absent or off the grid.
    """
    if sites.dim() != 2 or sites.shape[1] != 3 or sites.is_floating_point():
        raise ValueError(f"sites must be (M, 3) integer (sample, y, x), got {tuple(sites.shape)} {sites.dtype}")
    sites = sites.long()
    m = sites.shape[0]
    if m == 0:
        return torch.empty(0, TAPS, dtype=torch.int32, device=sites.device)
    sample, y, x = sites.unbind(1)
    if int(sample.min()) < 0 or int(y.min()) < 0 or int(x.min()) < 0 or int(y.max()) >= height or int(x.max()) >= width:
        raise ValueError(f"sites must lie on the {height} x {width} grid with sample >= 0")
    halo = KERNEL // 2
    table = torch.full((int(sample.max()) + 1, height + 2 * halo, width + 2 * halo), -1, dtype=torch.long, device=sites.device)
    table[sample, y + halo, x + halo] = torch.arange(m, device=sites.device)
    if int((table >= 0).sum()) != m:
        raise ValueError("sites must be unique")
    taps = torch.arange(TAPS, device=sites.device)
    dy, dx = taps // KERNEL, taps % KERNEL  # already shifted by +halo
    nbr = table[sample[:, None], y[:, None] + dy, x[:, None] + dx]
    return nbr.to(torch.int32)


def _dwconv_autocast(x, weight, bias):
    dtype = _autocast_dtype(x.device)
    if dtype is None:
        return x, weight, bias
    return x.to(dtype), weight.to(dtype), (bias.to(dtype) if bias is not None else None)


def sparse_dwconv_reference(x, nbr, weight, bias=None):
    """Plain torch, autograd for the backward: one gather-multiply per tap, fp32 accumulation."""
    x, nbr, weight, bias = _check_dwconv(x, nbr, weight, bias, check_values=False)
    x, weight, bias = _dwconv_autocast(x, weight, bias)
    m, c = x.shape
    rows = torch.cat([x.float(), x.new_zeros(1, c, dtype=torch.float32)])  # row m = absent
    index = torch.where(nbr >= 0, nbr.long(), torch.full_like(nbr, m, dtype=torch.long))
    out = torch.zeros(m, c, dtype=torch.float32, device=x.device)
    w = weight.float()
    for k in range(TAPS):
        out = out + rows[index[:, k]] * w[:, k]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
