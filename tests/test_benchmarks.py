"""The scripts under benchmarks/ are clients of sparse_mae.bench: each prints its --help, the
cheap ones run at a tiny size, and timing and the CPU's name each have one home."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.rglob("*.py"))
# a clock read around a call: what a timing loop is made of
CLOCK_READ = re.compile(r"\b(perf_counter|process_time|thread_time|monotonic)\(\)|Event\(enable_timing")


def load(script: Path):
    """The script as a module (its `if __name__ == "__main__"` block does not run)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(BENCHMARKS).as_posix())
def test_every_script_prints_its_help(script, capsys):
    with pytest.raises(SystemExit) as exited:
        load(script).main(["--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_time_calls_warms_up_then_times_each_call():
    from sparse_mae.bench.timing import median_iqr, time_calls

    calls = []
    ticks = iter([0.0, 1.0, 1.0, 3.0, 3.0, 7.0])
    times = time_calls(calls.append, warmup=2, repeats=3, clock=lambda: next(ticks))
    assert calls == [0, 1, 2, 3, 4]  # k counts the warm-up calls too
    assert times == [1.0, 2.0, 4.0]
    assert median_iqr(times) == (2.0, 1.5)


def test_one_timing_loop_and_one_cpu_name():
    bench_files = [*SCRIPTS, *(REPO / "sparse_mae" / "bench").glob("*.py")]
    reads_a_clock = {p.relative_to(REPO).as_posix() for p in bench_files if CLOCK_READ.search(p.read_text())}
    # the runner's one read is a configuration's whole wall time (set-up included), not a loop
    assert reads_a_clock == {"sparse_mae/bench/timing.py", "sparse_mae/bench/runner.py"}
    sources = [*SCRIPTS, *(REPO / "sparse_mae").rglob("*.py")]
    for name in ("time_calls", "cpu_name"):
        defined = [p.relative_to(REPO).as_posix() for p in sources if re.search(rf"^def {name}\(", p.read_text(), re.M)]
        assert len(defined) == 1, f"{name} defined in {defined}"


def test_the_fashion_mnist_study_writes_where_the_docs_show_its_results():
    study = load(BENCHMARKS / "studies" / "fashion_mnist_study.py")
    assert study.REPO == REPO
    assert (REPO / "docs" / "fashion-mnist" / "results.md").is_file()


@pytest.mark.slow
def test_the_study_pretrains_a_resnet_with_spark_and_probes_it(tmp_path):
    """--variant resnet_debug --no-finetune: SparK pretraining, then the linear probe and kNN
    only; the results say which recipe ran and that fine-tuning did not."""
    import json

    from sparse_mae.data.fashion_mnist import DEFAULT_ROOT

    if not Path(DEFAULT_ROOT).is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    study = load(BENCHMARKS / "studies" / "fashion_mnist_study.py")
    study.main(["--quick", "--variant", "resnet_debug", "--no-finetune", "--seeds", "0", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in result["rows"]} == {"linear probe", "kNN"}
    assert {r["start"] for r in result["rows"]} == {"pretrained", "random init"}
    assert set(result["goals"]) == {f"{m} {f:.0%}" for m in ("linear probe", "kNN") for f in study.FRACTIONS}
    assert result["knn_curve"][0]["step"] == 0 and result["knn_curve"][-1]["step"] == 6
    table = (tmp_path / "results.md").read_text()
    assert "SparK on resnet_debug" in table and "fine-tuning not run: --no-finetune" in table
    assert "| fine-tune |" not in table
    assert (tmp_path / "study.png").stat().st_size > 0


def test_profile_step_profiles_the_step_the_bench_times(capsys):
    profile_step = load(BENCHMARKS / "profile_step.py")
    assert profile_step.main(["bench=micro", "backends=[dense_masked,not_a_backend]", "mask_ratios=[0.5]",
                              "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "backend=dense_masked variant=debug mask_ratio=0.5 batch_size=2 dtype=float32, 64px on cpu" in out
    assert "Self CPU time total" in out
    assert "backend=not_a_backend" in out and "skipped" in out


def test_row_kernels_time_every_stage(capsys):
    import torch

    import sparse_mae_kernels

    if not sparse_mae_kernels.use_cpu_kernels(torch.device("cpu")):
        pytest.skip("the C row kernels are not built here")
    row_kernels = load(BENCHMARKS / "row_kernels.py")
    assert row_kernels.main(["--variant", "debug", "--batch", "1", "--warmup", "0", "--reps", "1",
                             "--dtype", "float32"]) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines() if re.match(r"\s+[1-4] ", line)]
    assert [(row[0], row[1]) for row in table] == [
        (str(stage), op) for stage in range(1, 5) for op in ("dwconv+LN", "bias+GELU+GRN", "residual")]
