"""Package discovery only; metadata lives in pyproject.toml.

Top-level folders `kernels/` and `conf/` install under the import names
`sparse_mae_kernels` and `sparse_mae_conf`: PyPI's unrelated `kernels` package owns the
bare name, and Hydra finds the configs as `pkg://sparse_mae_conf` from any install.
"""
from setuptools import find_packages, setup

RENAMED = {"kernels": "sparse_mae_kernels", "conf": "sparse_mae_conf"}


def renamed_packages(folder: str) -> list[str]:
    subs = find_packages(where=folder)
    return [RENAMED[folder]] + [f"{RENAMED[folder]}.{s}" for s in subs]


setup(
    packages=find_packages(include=["sparse_mae*"]) + renamed_packages("kernels") + renamed_packages("conf"),
    package_dir={"": ".", "sparse_mae_kernels": "kernels", "sparse_mae_conf": "conf"},
    package_data={"sparse_mae_conf": ["*.yaml", "**/*.yaml"], "sparse_mae_kernels": ["csrc/*.c", "csrc/*.h"]},
)
