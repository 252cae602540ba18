"""C kernels of the native sparse engine on the CPU: the sparse depthwise 7x7 on packed rows.

`sparse_dwconv(x, nbr, weight, bias)` has the contract of `dwconv_rows` (the same as the
Triton op, and `dwconv_rows.sparse_dwconv_reference` is its plain-torch reference): rows
x (M, C), symmetric neighbour map nbr (M, 49) int32, weight (C, 49) or (C, 1, 7, 7).
Forward, input gradient (the same kernel with the taps flipped) and weight gradient run
in C (csrc/dwconv_rows.c, float32, pthreads over rows); the bias gradient is a torch sum.
Other float dtypes are computed in float32 and returned in x's dtype, as the reference
does (fp32 accumulation).

The C source is compiled on first use with the system C compiler (`$CC`, else cc/gcc),
`-O3 -march=native`, into a cache folder keyed by the source, compiler, flags and CPU
(`$SPARSE_MAE_CACHE/kernels`, default ~/.cache/sparse-mae/kernels), written atomically
so concurrent processes can build at once. It takes well under a second. When no
compiler works, `available()` is False with the reason and the engine falls back to its
torch ops; SPARSE_MAE_CPU_KERNELS=0 switches the kernels off (see `use_cpu_kernels`).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from sparse_mae_kernels.dwconv_rows import TAPS, _check_dwconv, _check_neighbour_range, _dwconv_autocast

SOURCE = Path(__file__).with_name("csrc") / "dwconv_rows.c"
CACHE_ENV = "SPARSE_MAE_CACHE"
# -march=native first (vector width of this CPU); plain -O3 where the compiler refuses it
FLAG_SETS = (["-O3", "-march=native"], ["-O3"])
COMMON_FLAGS = ["-std=c99", "-shared", "-fPIC", "-pthread"]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_error: str | None = None  # why the kernels are unavailable, once a build was tried


# -- build and load ----------------------------------------------------------------------


def _compilers() -> list[str]:
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return [path for path in (shutil.which(n) for n in names) if path]


def _cpu_signature() -> str:
    """What -march=native depends on: a cached library must not move to another CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "sparse-mae")
    return Path(root) / "kernels"


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build() -> Path:
    """Compile the C source (or find it compiled) -> path of the shared library."""
    compilers = _compilers()
    if not compilers:
        wanted = os.environ.get("CC") or "cc, gcc or clang"
        raise RuntimeError(f"no C compiler found ({wanted}); install one (Debian: apt-get install -y gcc)")
    source = SOURCE.read_bytes()
    errors = []
    for compiler in compilers:
        version = _compiler_version(compiler)
        for flags in FLAG_SETS:
            key = hashlib.sha256(
                b"\0".join([source, compiler.encode(), version.encode(), " ".join(flags + COMMON_FLAGS).encode(),
                            _cpu_signature().encode()])
            ).hexdigest()[:16]
            target = _cache_dir() / f"dwconv_rows-{key}.so"
            if target.exists():
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
            # a private temp name, then an atomic rename: concurrent builders never see half a file
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
            os.close(fd)
            try:
                done = subprocess.run([compiler, *flags, *COMMON_FLAGS, "-o", tmp, str(SOURCE)],
                                      capture_output=True, text=True, timeout=300)
                if done.returncode == 0:
                    os.replace(tmp, target)
                    return target
                errors.append(f"{compiler} {' '.join(flags)}: {done.stderr.strip()[-500:]}")
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{compiler} {' '.join(flags)}: {exc}")
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    raise RuntimeError("compiling the C kernels failed: " + " | ".join(errors))


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_build()))
    f32, i32 = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int32)
    lib.sparse_dwconv_rows_f32.argtypes = [f32, i32, f32, f32, f32, ctypes.c_long, ctypes.c_long, ctypes.c_int]
    lib.sparse_dwconv_rows_f32.restype = None
    lib.sparse_dwconv_rows_weight_grad_f32.argtypes = [f32, i32, f32, f32, ctypes.c_long, ctypes.c_long, ctypes.c_int]
    lib.sparse_dwconv_rows_weight_grad_f32.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL:
    """The loaded kernels; builds them on the first call. Raises RuntimeError with the reason."""
    global _library, _error
    with _lock:
        if _library is None and _error is None:
            try:
                _library = _load()
            except (RuntimeError, OSError) as exc:
                _error = str(exc)
        if _library is None:
            raise RuntimeError(f"the sparse-mae C kernels are unavailable: {_error}")
        return _library


def available() -> bool:
    """True when the kernels are (or can be) built and loaded here; never raises."""
    try:
        library()
        return True
    except RuntimeError:
        return False


def unavailable_reason() -> str | None:
    return None if available() else _error


# -- launches ----------------------------------------------------------------------------


def _ptr(t: torch.Tensor | None, kind):
    return None if t is None else ctypes.cast(t.data_ptr(), ctypes.POINTER(kind))


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _forward_rows(x: torch.Tensor, nbr: torch.Tensor, weight_by_tap: torch.Tensor, bias: torch.Tensor | None):
    """fp32 contiguous x (M, C), weight (49, C), bias (C,) -> out (M, C) fp32."""
    m, c = x.shape
    out = torch.empty(m, c, dtype=torch.float32)
    if m and c:
        library().sparse_dwconv_rows_f32(
            _ptr(x, ctypes.c_float), _ptr(nbr, ctypes.c_int32), _ptr(weight_by_tap, ctypes.c_float),
            _ptr(bias, ctypes.c_float), _ptr(out, ctypes.c_float), m, c, _threads(),
        )
    return out


def _weight_grad_rows(x: torch.Tensor, nbr: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """fp32 contiguous x, grad (M, C) -> grad weight (C, 49) fp32."""
    m, c = x.shape
    if m == 0 or c == 0:
        return torch.zeros(c, TAPS, dtype=torch.float32)
    threads = _threads()
    partials = torch.empty(threads, TAPS, c, dtype=torch.float32)
    used = library().sparse_dwconv_rows_weight_grad_f32(
        _ptr(x, ctypes.c_float), _ptr(nbr, ctypes.c_int32), _ptr(grad, ctypes.c_float),
        _ptr(partials, ctypes.c_float), m, c, threads,
    )
    return partials[:used].sum(0).t()


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


class _SparseDwconv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, nbr, weight, bias):
        ctx.save_for_backward(x, nbr, weight)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        out = _forward_rows(_f32(x), nbr, _f32(weight).t().contiguous(), _f32(bias))
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, nbr, weight = ctx.saved_tensors
        grad = _f32(grad_out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # the adjoint of a submanifold conv is the same gather with the taps flipped
            grad_x = _forward_rows(grad, nbr, _f32(weight).flip(1).t().contiguous(), None).to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_w = _weight_grad_rows(_f32(x), nbr, grad).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            grad_b = grad.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_w, grad_b


def sparse_dwconv(x, nbr, weight, bias=None, *, check_values: bool | None = None):
    """Submanifold depthwise 7x7 on packed CPU rows, in C: (M, C) -> (M, C) in x's dtype.

    The contract of `dwconv_rows.sparse_dwconv_reference`. check_values (default on)
    also checks that nbr is symmetric; its value range is checked always, since it keeps
    the C code's reads in bounds. The engine, which builds the map itself, turns it off.
    """
    check_values = True if check_values is None else check_values
    x, nbr, weight, bias = _check_dwconv(x, nbr, weight, bias, check_values)
    if not check_values:
        _check_neighbour_range(nbr)  # the cheap part, always: it keeps the C code's reads in bounds
    for name, t in (("x", x), ("nbr", nbr), ("weight", weight)):
        if t.device.type != "cpu":
            raise ValueError(f"cpu_ops.sparse_dwconv runs on CPU tensors; {name} is on {t.device} "
                             f"(on CUDA use sparse_mae_kernels.triton_ops.sparse_dwconv)")
    library()  # a clear error now rather than inside autograd
    x, weight, bias = _dwconv_autocast(x, weight, bias)
    return _SparseDwconv.apply(x, nbr, weight, bias)
