"""The C kernels' other vector paths, built and tested on every run: users on ARM servers
and older x86 run common.h's portable vector C, which this machine's -march=native build
may never take. `SPARSE_MAE_KERNEL_ISA` builds a path on purpose; the C kernels' tests
(outputs and gradients against the plain-torch references) then run on it in a child
process. And the path the default build takes must be the widest this CPU offers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_mae_kernels import cpu_build

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not cpu_build.available(), reason=f"C kernels: {cpu_build.unavailable_reason()}")


def child_env(isa: str) -> dict:
    return {**os.environ, cpu_build.ISA_ENV: isa}


@pytest.mark.skipif(os.environ.get(cpu_build.ISA_ENV, "native") != "native", reason="a path was asked for")
def test_the_default_build_takes_the_widest_path_this_cpu_offers():
    cpu = cpu_build.cpu_isa()
    if cpu is None:
        pytest.skip("/proc/cpuinfo lists no x86 flags here")
    assert cpu_build.compiled_isa() == cpu, (
        f"the kernels were built for {cpu_build.compiled_isa()} on a CPU with {cpu}: -march=native was refused?")


@pytest.mark.parametrize("isa, expected", [
    ("no-avx512", {"avx512": False}),
    ("portable", {"avx512": False, "avx2": False, "fma": False}),
])
def test_a_requested_path_is_what_gets_built(isa, expected):
    out = subprocess.run([sys.executable, "-c", "import json; from sparse_mae_kernels import cpu_build; "
                          "print(json.dumps(cpu_build.compiled_isa()))"],
                         env=child_env(isa), capture_output=True, text=True, check=True, cwd=ROOT)
    built = json.loads(out.stdout.strip().splitlines()[-1])
    assert {k: built[k] for k in expected} == expected


@pytest.mark.parametrize("isa", ["native", "no-avx512", "portable"])
def test_vectors_are_one_avx512_register_on_that_path_and_8_floats_elsewhere(isa):
    """Wider vectors than the target's registers are split by the compiler through the stack
    (an AVX2 build with 16-float vectors ran the kernels at 0.4-0.8x of torch's ops)."""
    out = subprocess.run([sys.executable, "-c", "import json; from sparse_mae_kernels import cpu_build; "
                          "print(json.dumps([cpu_build.compiled_isa(), cpu_build.vector_lanes()]))"],
                         env=child_env(isa), capture_output=True, text=True, check=True, cwd=ROOT)
    built, lanes = json.loads(out.stdout.strip().splitlines()[-1])
    assert lanes == (16 if built["avx512"] else 8), (built, lanes)


def test_an_unknown_path_is_a_clear_reason():
    out = subprocess.run([sys.executable, "-c", "from sparse_mae_kernels import cpu_build; "
                          "print(cpu_build.unavailable_reason())"],
                         env=child_env("sse9"), capture_output=True, text=True, check=True, cwd=ROOT)
    assert "SPARSE_MAE_KERNEL_ISA='sse9' is not a vector path; use one of native, no-avx512, portable" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["no-avx512", "portable"])
def test_the_c_kernels_match_their_references_on_another_path(isa):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not triton",
         "tests/test_kernels_c.py", "tests/test_kernels_rows.py", "tests/test_kernels_gather_conv.py"],
        env=child_env(isa), capture_output=True, text=True, cwd=ROOT)
    tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
    assert proc.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail
