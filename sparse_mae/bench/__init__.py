"""`sparse-mae bench`: FCMAE time, memory and FLOPs across backends, variants, mask ratios,
batch sizes and dtypes. runner plans and runs the grid, measure times one configuration,
report writes the files; timing holds the one timing loop that they and benchmarks/ use."""
from sparse_mae.bench.report import write_results
from sparse_mae.bench.runner import plan, run_bench, settings_from

__all__ = ["plan", "run_bench", "settings_from", "write_results"]
