"""`sparse-mae bench`: a micro run writes every output with consistent numbers; bad input
(unknown / not installed backend, unsupported dtype, out of memory) is recorded per
configuration and the rest still run."""
import csv
import json
import re

import pytest
import torch

from sparse_mae.apps.bench import compose_config, run
from sparse_mae import create_model
from sparse_mae.backends import list_backends
from sparse_mae.bench import runner, settings_from
from sparse_mae.flops import STAGE_SITES_PER_PATCH, fcmae_gmacs
from sparse_mae.models.convnextv2 import VARIANTS

# in-process, one timed call: the numbers' consistency, not their speed, is under test
# on the CPU even where a GPU is visible: the memory and peak checks below are CPU ones
FAST = ["bench=micro", "device=cpu", "isolate=false", "warmup=0", "repeats=1", "plots=false"]


def bench(tmp_path, *overrides):
    cfg = compose_config([*FAST, f"output_dir={tmp_path}", *overrides])
    rows, paths = run(cfg, tmp_path, log=lambda *_: None)
    return {(r["backend"], r["mask_ratio"]): r for r in rows}, paths


def dwconv_gmacs(variant: str, visible_patches: int) -> float:
    spec = VARIANTS[variant]
    return sum(d * visible_patches * STAGE_SITES_PER_PATCH[i] * 49 * c
               for i, (d, c) in enumerate(zip(spec.depths, spec.dims))) / 1e9


def test_micro_preset_writes_everything_with_consistent_numbers(tmp_path):
    rows, paths = bench(tmp_path, "plots=true", "repeats=2")
    assert {p.name for p in tmp_path.iterdir()} >= {
        "results.csv", "results.json", "results.md", "throughput_vs_mask_ratio.png", "speedup_over_dense_masked.png"}
    assert len(rows) == len(list_backends()) * 2
    for (backend, ratio), r in rows.items():
        if r["status"] == "skipped":  # e.g. MinkowskiEngine not installed here
            assert "not installed" in r["reason"]
            continue
        assert r["status"] == "ok", r
        for key in ("fwd_ms", "step_ms", "fwd_images_s", "step_images_s", "dense_gmacs", "useful_gmacs",
                    "executed_gmacs", "step_gflop_s"):
            assert r[key] > 0, (backend, ratio, key, r[key])
        # in-process at 64px the step may fit in memory the allocator kept from the forward;
        # a fresh process measures it exactly (test_isolated_run_measures_memory_in_a_fresh_process)
        assert r["step_peak_mib"] >= 0, (backend, ratio, r["step_peak_mib"])
        assert r["fwd_ms_iqr"] >= 0 and r["step_ms_iqr"] >= 0
        assert r["step_images_s"] == pytest.approx(2 / (r["step_ms"] / 1e3))
        assert r["useful_gmacs"] < r["dense_gmacs"]
        assert r["visible_patches"] == int(4 * (1 - ratio))
        if backend == "dense_masked":
            assert r["executed_gmacs"] == pytest.approx(r["dense_gmacs"], rel=1e-9)
        elif backend == "minkowski":
            # ME's submanifold kernel maps skip taps onto absent neighbours, so its depthwise
            # convs may do less than the analytic 49 taps per visible site
            assert r["useful_gmacs"] - dwconv_gmacs("debug", r["visible_patches"]) <= r["executed_gmacs"]
            assert r["executed_gmacs"] <= r["dense_gmacs"]
        else:
            assert r["useful_gmacs"] - 1e-12 <= r["executed_gmacs"] <= r["dense_gmacs"] + 1e-12
    # the dense work differs only by the pred layer on the one more removed patch at 0.75
    decoder_dim = create_model("fcmae_convnextv2_debug").proj.out_channels
    assert (rows[("dense_masked", 0.75)]["dense_gmacs"] - rows[("dense_masked", 0.5)]["dense_gmacs"]
            == pytest.approx(decoder_dim * 32 * 32 * 3 / 1e9))
    for ratio in (0.5, 0.75):  # the rows carry the analytic model's numbers for their mask
        g = fcmae_gmacs("debug", (64, 64), mask_ratio=ratio)
        assert rows[("dense_masked", ratio)]["useful_gmacs"] == pytest.approx(g.total_useful)
        assert rows[("dense_masked", ratio)]["dense_gmacs"] == pytest.approx(g.total_dense)
    assert (fcmae_gmacs("debug", (64, 64), mask_ratio=0.75).encoder_useful
            < fcmae_gmacs("debug", (64, 64), mask_ratio=0.5).encoder_useful)

    with open(paths["csv"]) as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and float(csv_rows[0]["step_ms"]) > 0
    saved = json.loads(paths["json"].read_text())
    env = saved["environment"]
    assert env["torch"] == torch.__version__ and env["python"] and env["cpu"] and env["threads"] >= 1
    assert env["date"] and "git_commit" in env
    assert len(saved["results"]) == len(rows)
    md = paths["md"].read_text()
    assert "| dense_masked | debug | 0.5 | 2 | float32 |" in md and "Peak memory: CPU peak RSS" in md


def test_isolated_run_measures_memory_in_a_fresh_process(tmp_path):
    rows, _ = bench(tmp_path, "isolate=true", "backends=[dense_masked]", "mask_ratios=[0.5]")
    r = rows[("dense_masked", 0.5)]
    assert r["status"] == "ok", r
    # AdamW state and gradients alone (decoder dim 512) are tens of MiB
    assert r["step_peak_mib"] > 10 and "peak RSS" in r["memory_method"]


def test_unknown_backend_is_listed_as_skipped(tmp_path):
    rows, paths = bench(tmp_path, "backends=[dense_masked,nosuch]", "mask_ratios=[0.5]")
    assert rows[("dense_masked", 0.5)]["status"] == "ok"
    skipped = rows[("nosuch", 0.5)]
    assert skipped["status"] == "skipped" and "not registered" in skipped["reason"]
    assert "dense_masked" in skipped["reason"]  # names the valid ones
    assert "skipped: backend 'nosuch' is not registered" in paths["md"].read_text()


def test_only_unknown_backends_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="backends must be all, or a list naming at least one registered backend "
                                         r"\(dense_masked, native"):
        bench(tmp_path, "backends=[nosuch]")


def test_backend_not_installed_is_skipped_and_the_rest_run(tmp_path, monkeypatch):
    real = runner.backend_availability
    monkeypatch.setattr(runner, "backend_availability",
                        lambda name: (False, "pip install fake-engine") if name == "native" else real(name))
    rows, _ = bench(tmp_path, "backends=[native,dense_masked]", "mask_ratios=[0.5]")
    assert rows[("native", 0.5)]["status"] == "skipped"
    assert "not installed: pip install fake-engine" in rows[("native", 0.5)]["reason"]
    assert rows[("dense_masked", 0.5)]["status"] == "ok"


def test_out_of_memory_on_one_configuration_is_recorded(tmp_path, monkeypatch):
    real = runner.measure_configuration

    def measure(spec):
        if spec["mask_ratio"] == 0.5:
            raise torch.OutOfMemoryError("simulated: tried to allocate 80 GiB")
        return real(spec)

    monkeypatch.setattr(runner, "measure_configuration", measure)
    rows, paths = bench(tmp_path, "backends=[dense_masked]")
    assert rows[("dense_masked", 0.5)]["status"] == "oom"
    assert "simulated" in rows[("dense_masked", 0.5)]["reason"]
    assert rows[("dense_masked", 0.75)]["status"] == "ok"
    assert "| oom: OutOfMemoryError" in paths["md"].read_text()


def test_memory_guard_turns_a_large_configuration_into_oom(tmp_path):
    # a 1 MiB guard: the first step's gradients and AdamW state cannot fit
    rows, _ = bench(tmp_path, "isolate=true", "backends=[dense_masked]", "mask_ratios=[0.5]", "memory_guard_gib=0.001")
    r = rows[("dense_masked", 0.5)]
    assert r["status"] == "oom", r


def test_bf16_only_where_the_backend_allows_it(tmp_path, monkeypatch):
    from sparse_mae.backends.dense_masked import DenseMaskedBackend

    monkeypatch.setattr(DenseMaskedBackend, "autocast_devices", ("cuda",))
    rows, _ = bench(tmp_path, "backends=[dense_masked]", "mask_ratios=[0.5]", "dtypes=[bfloat16]", "device=cpu")
    r = rows[("dense_masked", 0.5)]
    assert r["status"] == "skipped" and "no bfloat16 autocast on cpu" in r["reason"]


@pytest.mark.parametrize("preset", ["quick", "full", "micro", "cpu", "compiled", "backends"])
def test_presets_compose(preset):
    settings = settings_from(compose_config([f"bench={preset}", "output_dir=x"]))
    assert settings.variants and settings.mask_ratios and settings.repeats >= 1


@pytest.mark.parametrize("override, message", [
    ("variants=[atom]", "Invalid value 'atom', expected one of"),
    ("dtypes=[int8]", "Invalid value 'int8', expected one of"),
    ("repeats=many", "could not be converted to Integer"),
    ("no_such_key=1", "no_such_key"),
])
def test_wrong_types_and_choices_are_rejected_by_hydra_from_the_schema(override, message):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as error:
        compose_config(["bench=micro", "output_dir=x", override])
    assert message in f"{error.value} {error.value.__cause__}"


@pytest.mark.parametrize("override, message", [
    ("mask_ratios=[1.0]", "mask_ratios must be a non-empty list, each in (0, 1) (the paper uses 0.6), got [1.0]"),
    ("mask_ratios=[]", "mask_ratios must be a non-empty list"),
    ("image_size=100", "image_size must be >= 32 and a multiple of 32"),
    ("batch_sizes=[0]", "batch_sizes must be a non-empty list, each >= 1, got [0]"),
    ("variants=[]", "variants must be a non-empty list"),
    ("dtypes=[]", "dtypes must be a non-empty list"),
    ("backends=[nosuch]", "backends must be all, or a list naming at least one registered backend"),
    ("warmup=-1", "warmup must be >= 0"),
    ("repeats=0", "repeats must be > 0"),
    ("threads=0", "threads must be > 0"),
    ("memory_guard_gib=0", "memory_guard_gib must be > 0"),
    ("timeout_s=-1", "timeout_s must be > 0, got -1.0"),
    ("peak_size=8", "peak_size must be >= 64"),
    ("peak_tflops=-1", "peak_tflops must be > 0"),
    ("gomp_spincount=-1", "gomp_spincount must be >= 0"),
    ("timeout_s=0", "timeout_s must be > 0, got 0.0"),
])
def test_bad_settings_fail_when_the_config_is_composed(override, message):
    from sparse_mae.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(f"invalid config: {message}")):
        compose_config(["bench=micro", "output_dir=x", override])


def test_share_of_the_matmul_peak_measured_in_the_same_run(tmp_path):
    """Each dtype's matmul peak is timed before and after the grid; every row's share of peak
    is its executed GFLOP/s over the larger of the two, and MFU its useful GFLOP/s (no card
    peak on a CPU)."""
    rows, paths = bench(tmp_path, "backends=[dense_masked,native]", "mask_ratios=[0.5]")
    saved = json.loads(paths["json"].read_text())
    peaks = saved["environment"]["matmul_peaks"]
    assert set(peaks["before"]) == set(peaks["after"]) == set(peaks["used"]) == {"float32"}
    used = peaks["used"]["float32"]
    assert used == max(peaks["before"]["float32"]["gflop_s"], peaks["after"]["float32"]["gflop_s"]) > 0
    assert saved["environment"]["load_average"] is not None
    for r in rows.values():
        assert r["peak_gflop_s"] == used
        assert r["peak_share"] == pytest.approx(r["step_gflop_s"] / used)
        assert r["mfu"] == pytest.approx(3 * 2 * r["useful_gmacs"] * r["step_images_s"] / used)
        assert r["mfu_peak"] == "measured matmul"
    # dense_masked executes more than the useful FLOPs: a larger share of peak than its MFU
    dense = rows[("dense_masked", 0.5)]
    assert dense["peak_share"] > dense["mfu"]
    md = paths["md"].read_text()
    assert "share of peak" in md and "Matmul peak of this machine" in md
    assert f"{100 * rows[('native', 0.5)]['peak_share']:.1f}%" in md


def test_without_the_peak_shares_are_not_guessed(tmp_path):
    rows, paths = bench(tmp_path, "backends=[dense_masked]", "mask_ratios=[0.5]", "measure_peak=false")
    r = rows[("dense_masked", 0.5)]
    assert r["peak_share"] is None and r["mfu"] is None
    assert "not measured" in paths["md"].read_text()


def test_a_cards_peak_sets_mfu_and_the_measured_peak_the_share():
    row = {"status": "ok", "executed_gmacs": 2.0, "useful_gmacs": 1.0, "fwd_images_s": 10.0, "step_images_s": 4.0}
    runner.add_derived(row, card_peak_tflops=0.5, measured_peak_gflop_s=100.0)
    assert row["step_gflop_s"] == pytest.approx(48.0)  # 3 forwards x 2 FLOP/MAC x 2 GMAC x 4 img/s
    assert row["peak_share"] == pytest.approx(0.48)
    assert row["mfu"] == pytest.approx(24.0 / 500.0) and row["mfu_peak"] == "card"


def test_matmul_peak_measures_the_requested_dtype():
    from sparse_mae.bench.peak import matmul_peak

    result = matmul_peak("float32", "cpu", size=128, warmup=1, repeats=3)
    assert result["size"] == 128 and result["best_gflop_s"] >= result["gflop_s"] > 0


def test_summary_sets_each_backend_beside_the_reference(tmp_path):
    rows, paths = bench(tmp_path, "backends=[dense_masked,native]")
    summary = paths["summary"].read_text()
    for ratio in (0.5, 0.75):
        dense, native = rows[("dense_masked", ratio)], rows[("native", ratio)]
        line = next(l for l in summary.splitlines() if l.startswith(f"| native | debug | {ratio} |"))
        assert f"{dense['step_ms'] / native['step_ms']:.2f}x" in line
        assert f"{dense['dense_gmacs'] / native['useful_gmacs']:.2f}x" in line  # the FLOP bound
    assert "Matmul peak of this machine" in summary


@pytest.mark.parametrize("spincount, expected", [(2000, "2000"), (0, "0"), (None, None)])
def test_isolated_workers_get_the_openmp_spin_count(monkeypatch, spincount, expected):
    import subprocess

    seen = {}

    def fake_run(cmd, input, capture_output, text, timeout, env):
        seen["env"] = env
        return subprocess.CompletedProcess(cmd, 0, stdout='{"status": "ok"}\n', stderr="")

    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert runner.run_isolated({}, 10, gomp_spincount=spincount) == {"status": "ok"}
    assert seen["env"].get("GOMP_SPINCOUNT") == expected
    # a wait policy would override the spin count: dropped when one is set, inherited otherwise
    assert seen["env"].get("OMP_WAIT_POLICY") == (None if expected is not None else "ACTIVE")


def test_the_bench_times_the_engines_own_step(tmp_path, monkeypatch):
    """The bench's step and a pretraining run's step are one function called alike: the same
    optimizer recipe and parameter groups, clipping, accumulation, and the FCMAE loss with
    per-sample masks from seeds. Drift in either (a hard-coded beta, other groups, another
    loss) fails here."""
    from sparse_mae.apps.pretrain import compose_config as pretrain_config
    from sparse_mae.apps.pretrain import run_pretrain
    from sparse_mae.bench.measure import PretrainStep
    from sparse_mae.train import step as training_step
    from sparse_mae.train.step import fcmae_loss

    calls = []
    real = training_step.train_step

    def recording(model, loss_fn, micro_batches, optimizer, params, **kw):
        batches = list(micro_batches) if isinstance(micro_batches, list) else None
        unwrapped = getattr(model, "module", model)
        probe = {"image": torch.randn(2, 3, 64, 64), "seed": torch.tensor([11, 12])}
        with torch.no_grad():
            same_loss = torch.equal(loss_fn(unwrapped, probe, 0), fcmae_loss(unwrapped, probe, 0.6))
        calls.append({
            "defaults": {k: v for k, v in optimizer.defaults.items() if k != "lr"},
            "groups": [(len(g["params"]), g["weight_decay"]) for g in optimizer.param_groups],
            "clip_grad": kw.get("clip_grad"), "accum_iter": kw.get("accum_iter", 1),
            "autocast_dtype": kw.get("autocast_dtype"), "same_loss": same_loss,
            "optimizer": type(optimizer)})
        return real(model, loss_fn, batches if batches is not None else micro_batches, optimizer, params, **kw)

    monkeypatch.setattr(training_step, "train_step", recording)
    cfg = pretrain_config(["model=debug", "backend=native", "data.size=64", "batch_size=2", "max_steps=1",
                           "data.num_images=4", "data.num_workers=0", "logger=none", "recon.num_images=0",
                           "amp=false", f"output_dir={tmp_path / 'run'}"])
    run_pretrain(cfg)
    PretrainStep({"backend": "native", "variant": "debug", "image_size": 64, "mask_ratio": 0.6, "batch_size": 2,
                  "dtype": "float32", "device": "cpu", "seed": 0}).step(0)
    engine, bench = calls
    assert engine == bench
    assert engine["same_loss"] and engine["defaults"]["betas"] == (0.9, 0.95) and engine["defaults"]["fused"]


@pytest.mark.parametrize("fast", [True, False])
def test_bf16_on_a_cpu_without_fast_bf16_is_skipped_naming_float32(tmp_path, monkeypatch, fast):
    """On x86 without AVX-512 torch's bf16 matmul is a slow fallback (25x below float32 on
    a Zen 3): timing it would time the fallback, and its matmul peak takes minutes."""
    monkeypatch.setattr(runner, "cpu_has_fast_bf16", lambda: fast)
    logged = []
    if fast:
        assert runner.skip_reason("native", "bfloat16", "cpu") is None
        return
    assert "dtypes=[float32]" in runner.skip_reason("native", "bfloat16", "cpu")
    assert runner.skip_reason("native", "float32", "cpu") is None
    assert runner.slow_dtype_reason("bfloat16", "cuda") is None
    settings = settings_from(compose_config(["bench=micro", "dtypes=[float32,bfloat16]", "peak_size=64"]))
    peaks = runner.measure_peaks(settings, log=logged.append)
    assert set(peaks) == {"float32"} and any("bfloat16: not measured" in line for line in logged)
    rows, _ = bench(tmp_path, "backends=[native]", "mask_ratios=[0.5]", "dtypes=[bfloat16]", "device=cpu",
                    "measure_peak=false")
    assert rows[("native", 0.5)]["status"] == "skipped"


def test_fast_bf16_is_what_the_cpu_flags_say():
    from sparse_mae.train.amp import cpu_has_fast_bf16
    from sparse_mae_kernels.cpu_build import cpu_isa

    isa = cpu_isa()
    if isa is None or not (isa["avx2"] or isa["avx512"]):
        pytest.skip("not an x86 CPU with flags in /proc/cpuinfo")
    assert cpu_has_fast_bf16() == isa["avx512"]


@pytest.mark.slow
def test_dense_masked_under_torch_compile_is_a_row_beside_the_others(tmp_path):
    """What a user would pick instead of a sparse engine: the reference under torch.compile,
    timed through the same step, its FLOPs counted on the eager model, and every other
    backend compared with it too."""
    rows, paths = bench(tmp_path, "backends=[dense_masked,dense_masked+compile,native]", "mask_ratios=[0.5]",
                        "measure_peak=false")
    eager, compiled = rows[("dense_masked", 0.5)], rows[("dense_masked+compile", 0.5)]
    assert compiled["status"] == "ok", compiled
    assert compiled["executed_gmacs"] == pytest.approx(eager["executed_gmacs"])
    assert compiled["useful_gmacs"] == pytest.approx(eager["useful_gmacs"])
    summary = paths["summary"].read_text()
    assert "step ms: dense_masked / backend" in summary and "step ms: dense_masked+compile / backend" in summary
    assert "| native | debug | 0.5 |" in summary


def test_compiled_backends_are_accepted_by_name_and_unknown_ones_skipped(tmp_path):
    settings = settings_from(compose_config(["backends=[dense_masked+compile,nonsense+compile]"]))
    assert settings.backends == ["dense_masked+compile", "nonsense+compile"]
    assert runner.skip_reason("dense_masked+compile", "float32", "cpu") is None
    assert "not registered" in runner.skip_reason("nonsense+compile", "float32", "cpu")
    with pytest.raises(ValueError, match=r"under torch.compile \(e.g. dense_masked\+compile\)"):
        compose_config(["backends=[nonsense+compile]"])


def test_resnet_rows_time_the_spark_training_step_and_count_its_flops(tmp_path, monkeypatch):
    """A ResNet variant benches SparK through the step `pretrain model=resnet*` runs (the same
    loss call, groups and recipe); dense_masked executes the dense FLOPs, native the useful ones."""
    from sparse_mae.flops import spark_gmacs
    from sparse_mae.train import step as training_step

    models = []
    real = training_step.train_step

    def recording(model, *args, **kw):
        models.append(type(model).__name__)
        return real(model, *args, **kw)

    monkeypatch.setattr(training_step, "train_step", recording)
    rows, _ = bench(tmp_path, "variants=[resnet_debug]", "backends=[dense_masked,native]", "mask_ratios=[0.75]")
    assert set(models) == {"SparK"}
    dense, native = rows[("dense_masked", 0.75)], rows[("native", 0.75)]
    assert dense["status"] == native["status"] == "ok"
    with torch.device("meta"):
        model = create_model("spark_resnet_debug")
    mask = torch.ones(2, 4)
    mask[:, 0] = 0  # one of the four patches kept at 0.75
    g = spark_gmacs(model, (64, 64), mask=mask)
    assert dense["dense_gmacs"] == pytest.approx(g.total_dense) and dense["useful_gmacs"] == pytest.approx(g.total_useful)
    assert dense["executed_gmacs"] == pytest.approx(g.total_dense, rel=1e-9)
    assert native["executed_gmacs"] == pytest.approx(g.total_useful, rel=1e-9)
