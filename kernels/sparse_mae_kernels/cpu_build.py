"""Build and load the C kernels (csrc/*.c, one file per op plus the shared header and the
thread pool) as one shared library, on first use.

The sources are compiled with the system C compiler (`$CC`, else cc/gcc/clang),
`-O3 -march=native` (or the vector path `$SPARSE_MAE_KERNEL_ISA` asks for, see ISA_FLAGS),
into a cache folder keyed by the sources, compiler, flags and CPU
(`$SPARSE_MAE_CACHE/kernels`, default ~/.cache/sparse-mae/kernels), written atomically
so concurrent processes can build at once. It takes about a second. When no compiler
works, `available()` is False with the reason, and the native engine falls back to its
torch ops; SPARSE_MAE_CPU_KERNELS=0 switches the kernels off (`use_cpu_kernels`).

The ops call the library through `function(name, argtypes)`; features are passed as raw
pointers with a dtype code (`dtype_code`): the kernels read and write float32 and
bfloat16 directly.
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

from sparse_mae_kernels.constants import TAPS

CSRC = Path(__file__).with_name("csrc")
CACHE_ENV = "SPARSE_MAE_CACHE"
ISA_ENV = "SPARSE_MAE_KERNEL_ISA"
# -march=native first (vector width of this CPU); plain -O3 where the compiler refuses it.
# -ffp-contract=fast lets the compiler fuse a*b+c into FMAs (ISO C modes turn it off).
FLAG_SETS = (["-O3", "-march=native", "-ffp-contract=fast"], ["-O3", "-ffp-contract=fast"], ["-O3"])
# The vector paths a build can be asked for ($SPARSE_MAE_KERNEL_ISA), so that the paths
# other CPUs take (ARM servers, older x86) are built and tested on any x86 machine:
# native = this CPU's widest; no-avx512 = this CPU without AVX-512 (common.h's portable
# vector C, still AVX2 where the CPU has it); portable = the compiler's baseline target
# (x86-64: SSE2 only, no AVX, AVX2 or FMA).
ISA_FLAGS = {
    "native": FLAG_SETS,
    "no-avx512": (["-O3", "-march=native", "-mno-avx512f", "-ffp-contract=fast"],),
    "portable": (["-O3", "-ffp-contract=fast"],),
}
# bits of sm_compiled_isa() (csrc/isa.c)
ISA_BITS = {"avx512": 1, "avx2": 2, "fma": 4}


def requested_isa() -> str:
    isa = os.environ.get(ISA_ENV, "native") or "native"
    if isa not in ISA_FLAGS:
        raise RuntimeError(f"{ISA_ENV}={isa!r} is not a vector path; use one of {', '.join(ISA_FLAGS)}")
    return isa
COMMON_FLAGS = ["-std=gnu11", "-shared", "-fPIC", "-pthread", f"-DTAPS={TAPS}"]  # constants defined once, in Python

# ctypes argument kinds for the ops' declarations
PTR, INT, LONG, FLOAT = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # DT_F32, DT_BF16 in csrc/common.h

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_error: str | None = None  # why the kernels are unavailable, once a build was tried
_functions: dict[str, ctypes._CFuncPtr] = {}


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.c"))


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
    """Compile the C sources (or find them compiled) -> path of the shared library."""
    compilers = _compilers()
    if not compilers:
        wanted = os.environ.get("CC") or "cc, gcc or clang"
        raise RuntimeError(f"no C compiler found ({wanted}); install one (Debian: apt-get install -y gcc)")
    files = sources()
    text = b"\0".join(p.name.encode() + b"\0" + p.read_bytes() for p in sorted(CSRC.glob("*.[ch]")))
    errors = []
    for compiler in compilers:
        version = _compiler_version(compiler)
        for flags in ISA_FLAGS[requested_isa()]:
            key = hashlib.sha256(
                b"\0".join([text, compiler.encode(), version.encode(), " ".join(flags + COMMON_FLAGS).encode(),
                            _cpu_signature().encode()])
            ).hexdigest()[:16]
            target = _cache_dir() / f"sparse_mae_kernels-{key}.so"
            if target.exists():
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
            # a private temp name, then an atomic rename: concurrent builders never see half a file
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
            os.close(fd)
            try:
                done = subprocess.run([compiler, *flags, *COMMON_FLAGS, "-o", tmp, *map(str, files)],
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


def library() -> ctypes.CDLL:
    """The loaded kernels; builds them on the first call. Raises RuntimeError with the reason."""
    global _library, _error
    with _lock:
        if _library is None and _error is None:
            try:
                _library = ctypes.CDLL(str(_build()))
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


def compiled_isa() -> dict[str, bool]:
    """What the loaded build targets: {"avx512": the AVX-512 path, "avx2", "fma"}."""
    bits = function("sm_compiled_isa", [], ctypes.c_int)()
    return {name: bool(bits & bit) for name, bit in ISA_BITS.items()}


def vector_lanes() -> int:
    """Floats per vector in the loaded build: 16 on the AVX-512 path, else 8."""
    return function("sm_vector_lanes", [], ctypes.c_int)()


def cpu_isa() -> dict[str, bool] | None:
    """What this CPU offers, from /proc/cpuinfo (None where it does not say: not Linux x86)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    if line is None:
        return None
    flags = set(line.split(":", 1)[1].split())
    return {"avx512": {"avx512f", "avx512bw", "avx512vl"} <= flags, "avx2": "avx2" in flags, "fma": "fma" in flags}


def function(name: str, argtypes: list, restype=None):
    """The C function `name` with its ctypes signature (declared once, then cached)."""
    fn = _functions.get(name)
    if fn is None:
        fn = getattr(library(), name)
        fn.argtypes, fn.restype = argtypes, restype
        _functions[name] = fn
    return fn


def ptr(t: torch.Tensor | None) -> int | None:
    """A tensor's data pointer for a PTR argument (None -> NULL). The tensor must be contiguous
    and stay alive for the call."""
    return None if t is None else t.data_ptr()


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the C kernels read and write for features of `dtype`: float16 goes through
    float32 (the kernels have float32 and bfloat16 loads and stores only)."""
    return dtype if dtype in DTYPE_CODES else torch.float32


def threads() -> int:
    """The kernels use as many threads as torch's intra-op pool."""
    return max(1, torch.get_num_threads())


def require_cpu(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"the C kernels of {op} run on CPU tensors; {name} is on {t.device} "
                             f"(on CUDA the Triton kernels run: impl='triton' or impl=None)")
