"""Assemble a CUDA_HOME from NVIDIA's pip wheels, for building MinkowskiEngine without a system toolkit.

Usage: python tools/cuda_home_from_wheels.py SITE_PACKAGES OUT_DIR

The wheels unpack under SITE_PACKAGES/nvidia/: CUDA 13 wheels share one tree
(nvidia/cu13/{bin,include,lib,nvvm}), CUDA 12 wheels have one tree per package
(nvidia/cuda_nvcc/bin, nvidia/cuda_runtime/include, nvidia/cusparse/lib, ...).
torch.utils.cpp_extension wants a single CUDA_HOME with bin/nvcc, include/ and lib64/
holding unversioned libraries to link against (-lcudart, -lcusparse), which the wheels
do not ship (only libcudart.so.13 etc.). OUT_DIR becomes that CUDA_HOME, made of
symlinks into the wheels: the bin/, include/ and nvvm/ trees of all packages merged,
and lib64/ with every shared library plus an unversioned name for each.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

MERGED_TREES = ("bin", "include", "nvvm")


def package_roots(site_packages: Path) -> list[Path]:
    nvidia = site_packages / "nvidia"
    if not nvidia.is_dir():
        return []
    return sorted(p for p in nvidia.iterdir() if p.is_dir())


def merge_trees(sources: list[Path], dest: Path) -> None:
    """dest gets a symlink per entry of the sources; a directory present in several
    sources becomes a real directory merged the same way (first source wins on files)."""
    dest.mkdir(parents=True, exist_ok=True)
    entries: dict[str, list[Path]] = {}
    for source in sources:
        for entry in sorted(source.iterdir()):
            entries.setdefault(entry.name, []).append(entry)
    for name, paths in entries.items():
        dirs = [p for p in paths if p.is_dir()]
        if len(dirs) > 1:
            merge_trees(dirs, dest / name)
        else:
            (dest / name).symlink_to(paths[0])


def link_libraries(roots: list[Path], lib64: Path) -> None:
    lib64.mkdir(parents=True, exist_ok=True)
    for root in roots:
        for lib in sorted((root / "lib").glob("*.so*")) if (root / "lib").is_dir() else []:
            for name in (lib.name, lib.name.split(".so")[0] + ".so"):
                if not (lib64 / name).exists() and not (lib64 / name).is_symlink():
                    (lib64 / name).symlink_to(lib)


def build_cuda_home(site_packages: Path, out: Path) -> list[str]:
    """-> the problems found (empty when OUT is a usable CUDA_HOME)."""
    roots = package_roots(site_packages)
    if out.exists() and any(out.iterdir()):
        return [f"{out} exists and is not empty"]
    for tree in MERGED_TREES:
        sources = [root / tree for root in roots if (root / tree).is_dir()]
        if sources:
            merge_trees(sources, out / tree)
    link_libraries(roots, out / "lib64")
    problems = []
    for required, wheel in (("bin/nvcc", "nvidia-cuda-nvcc"), ("include/cuda_runtime.h", "nvidia-cuda-runtime"),
                            ("lib64/libcudart.so", "nvidia-cuda-runtime"), ("include/cusparse.h", "nvidia-cusparse"),
                            ("lib64/libcusparse.so", "nvidia-cusparse")):
        if not (out / required).exists():
            problems.append(f"{required} missing (from the {wheel} wheel) under {site_packages / 'nvidia'}")
    cccl = [out / "include" / "thrust", out / "include" / "cccl" / "thrust"]
    if not any(p.exists() for p in cccl):
        problems.append(f"thrust headers missing (from the nvidia-cuda-cccl wheel) under {site_packages / 'nvidia'}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    # Absolute: the symlinks must not depend on the directory this ran from.
    problems = build_cuda_home(Path(argv[1]).resolve(), Path(argv[2]).resolve())
    for problem in problems:
        print(f"cuda_home_from_wheels: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
