"""`sparse-mae pretrain`: outputs, exact resume, failure handling, config validation.

Runs are in-process (`run_pretrain` on a composed config) with the debug variant at 64px,
logger=none and no DataLoader workers unless a test is about them; nothing touches the
network (wandb is only used offline, in the CLI test).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import MissingMandatoryValue
from PIL import Image

import sparse_mae.train.checkpoint as checkpoint_module
from sparse_mae.apps.pretrain import NonFiniteLossError, compose_config, run_pretrain
from sparse_mae.backends import resolve_backend
from sparse_mae.models.fcmae import FCMAE
from sparse_mae.train.checkpoint import find_latest, list_checkpoints, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """The debug model's ops are tiny: one thread is as fast, and far faster than two
    when other processes load the cores (OpenMP threads then wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "sparse_mae_conf" / "experiment").glob("*.yaml"))


def debug_overrides(out: Path, **extra) -> list[str]:
    """A small, fast run: 32 built-in images at 64px, batch 8 -> 4 steps per epoch. On the CPU
    even where a GPU is visible: bit-exact resume and 1-vs-2-process equality are CPU claims
    (the GPU runs are the `gpu` tests)."""
    base = {
        "device": "cpu", "model": "debug", "backend": "dense_masked", "logger": "none", "logger.progress": "false",
        "data.size": 64, "data.draw_size": 64, "data.num_images": 32, "data.num_workers": 0,
        "batch_size": 8, "epochs": 2, "sched.warmup_steps": 2, "optim.lr": 2e-3,
        "checkpoint.every_steps": 2, "recon.every_steps": 0, "recon.num_images": 2, "log_every_steps": 1,
        "output_dir": str(out),
    }
    base.update(extra)
    if base.get("data") == "imagefolder":  # keys only the built-in data has
        base.pop("data.draw_size")
        base.pop("data.num_images")
    return [f"{k}={v}" for k, v in base.items()]


def run(out: Path, **extra):
    return run_pretrain(compose_config(debug_overrides(out, **extra)))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_states_equal(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key, ta in a["model"].items():
        assert torch.equal(ta, b["model"][key]), f"model.{key} differs"
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for pid, sa in oa["state"].items():
        for name, ta in sa.items():
            assert torch.equal(ta, ob["state"][pid][name]), f"optimizer state {pid}.{name} differs"


def test_short_debug_run_writes_checkpoint_metrics_png_and_learns(tmp_path):
    result = run(tmp_path, epochs=12, **{"data.num_images": 16, "recon.every_steps": 8, "log_every_steps": 2})
    assert result.steps == 24  # 16 images / batch 8 = 2 steps per epoch
    # checkpoints every 2 steps, last 3 kept, each with its config beside it
    assert [c.step for c in list_checkpoints(tmp_path / "checkpoints")] == [20, 22, 24]
    assert result.checkpoint == tmp_path / "checkpoints" / "step-00000024.pt"
    assert "variant: debug" in result.checkpoint.with_suffix(".yaml").read_text()
    state = load_checkpoint(result.checkpoint)
    assert state["step"] == 24 and "mask_token" in state["model"] and state["optimizer"]["state"]
    # metrics: one line per 2 steps, with loss, lr, throughput
    records = read_metrics(result.metrics)
    assert [r["step"] for r in records] == list(range(2, 25, 2))
    assert all({"loss", "lr", "img_per_s", "epoch"} <= r.keys() for r in records)
    # reconstruction: 2 images x 4 panels of 64px with 2px gaps, at steps 8, 16, 24
    with Image.open(result.reconstruction) as png:
        assert png.size == (4 * 64 + 5 * 2, 2 * 64 + 3 * 2) and png.mode == "RGB"
    assert sorted(p.name for p in (tmp_path / "reconstructions").iterdir()) == [
        "step-00000008.png", "step-00000016.png", "step-00000024.png"]
    # the loss goes down
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert last < first - 0.05, (first, last)


def test_resume_is_bit_exact(tmp_path):
    # drop path draws from the global RNG; 4 steps per epoch, so the split falls mid-epoch
    extra = {"model.drop_path_rate": 0.2, "checkpoint.keep_last": 0}
    straight = run(tmp_path / "straight", **extra)
    assert straight.steps == 8
    first_half = run(tmp_path / "split", max_steps=3, **extra)
    assert first_half.steps == 3
    # the rest: a new process would do the same; DataLoader workers must not change anything
    second_half = run(tmp_path / "split", resume="auto", **{"data.num_workers": 2}, **extra)
    assert second_half.steps == 8 and len(second_half.losses) == 5
    assert straight.losses[3:] == second_half.losses
    assert_states_equal(load_checkpoint(straight.checkpoint), load_checkpoint(second_half.checkpoint))


def _loss_turning_nan_at(monkeypatch, calls_to_poison: set[int]):
    """FCMAE's loss becomes NaN at the given forward calls (1-based; one forward per step here)."""
    real_loss = FCMAE.forward_loss
    calls = {"n": 0}

    def loss(self, imgs, pred, mask):
        calls["n"] += 1
        value = real_loss(self, imgs, pred, mask)
        return value * float("nan") if calls["n"] in calls_to_poison else value

    monkeypatch.setattr(FCMAE, "forward_loss", loss)
    return real_loss


def test_nan_losses_in_a_row_stop_clearly_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    # the 6th and 7th forwards = steps 5 and 6 (0-based); the checkpoint after step 5 (named
    # step-6: six steps done) holds the weights of step 4, untouched by the skipped step
    real_loss = _loss_turning_nan_at(monkeypatch, {6, 7})
    with pytest.raises(NonFiniteLossError, match=r"step 6: loss is nan .*2 non-finite steps in a row .*"
                                                 r"last good checkpoint: .*step-00000006.pt"):
        run(tmp_path, **{"recon.num_images": 0, "nonfinite.max_in_a_row": 2})
    ckpt = find_latest(tmp_path / "checkpoints")
    assert ckpt.name == "step-00000006.pt"
    state = load_checkpoint(ckpt)
    assert state["step"] == 6 and all(torch.isfinite(t).all() for t in state["model"].values())
    assert all(int(s["step"]) == 5 for s in state["optimizer"]["state"].values())  # 5 updates of 6 steps
    # and the run continues from it once the cause is gone
    monkeypatch.setattr(FCMAE, "forward_loss", real_loss)
    assert run(tmp_path, resume="auto").steps == 8


def test_a_nan_loss_skips_the_step_counts_it_and_the_run_goes_on(tmp_path, monkeypatch):
    clean = run(tmp_path / "clean", **{"recon.num_images": 0})
    _loss_turning_nan_at(monkeypatch, {6})  # step 5 only
    result = run(tmp_path / "poisoned", **{"recon.num_images": 0})
    assert result.steps == 8 and result.nonfinite_steps == 1
    assert result.losses[5] is None and result.losses[:5] == clean.losses[:5]
    metrics = read_metrics(result.metrics)
    assert metrics[5]["step"] == 6 and metrics[5]["loss"] == "nan" and metrics[-1]["nonfinite_steps"] == 1
    state = load_checkpoint(result.checkpoint)
    assert state["engine"]["nonfinite_steps"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values())
    # the skipped step did not touch the weights: its AdamW step count is one behind
    assert all(int(s["step"]) == 7 for s in state["optimizer"]["state"].values())


class Killed(BaseException):
    """Stands for the process dying: not an Exception, so nothing in the app catches it."""


def test_kill_between_temp_write_and_rename_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    run(tmp_path, max_steps=2)
    ckpt_dir = tmp_path / "checkpoints"
    old = ckpt_dir / "step-00000002.pt"
    old_bytes = old.read_bytes()

    real_replace = os.replace

    def dies_before_rename(src, dst):
        if str(dst).endswith(".pt"):
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", dies_before_rename)
    with pytest.raises(Killed):
        run(tmp_path, resume="auto", max_steps=4)
    monkeypatch.setattr(checkpoint_module.os, "replace", real_replace)
    assert old.read_bytes() == old_bytes and find_latest(ckpt_dir) == old
    # a hard kill (no cleanup) leaves a temp file; resume must ignore it, the next save removes it
    (ckpt_dir / f"{checkpoint_module.TEMP_PREFIX}step-00000004.pt.12345").write_bytes(b"half a checkpoint")
    assert find_latest(ckpt_dir) == old
    resumed = run(tmp_path, resume="auto")
    assert resumed.losses and resumed.steps == 8
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [
        f"step-0000000{s}.{ext}" for s in (4, 6, 8) for ext in ("json", "pt", "yaml")]


def test_imagefolder_run_with_bad_files_among_good_ones(tmp_path):
    from tests.test_data_imagefolder import write_image_tree

    counts = write_image_tree(tmp_path / "images")
    out = tmp_path / "run"
    cfg = compose_config(debug_overrides(out, data="imagefolder", batch_size=2, epochs=1) +
                         [f"data.root={tmp_path / 'images'}", "data.num_workers=2"])
    result = run_pretrain(cfg)
    assert result.steps == (counts["good"] + counts["corrupt"]) // 2
    # both corrupt files met once in the epoch, plus the zero-byte file set aside at the scan
    assert result.skipped_files == counts["corrupt"] + counts["empty"]
    assert read_metrics(result.metrics)[-1]["skipped_files"] == counts["corrupt"]


def test_empty_data_folder_is_a_clear_error(tmp_path):
    (tmp_path / "images").mkdir()
    cfg = compose_config(debug_overrides(tmp_path / "run", data="imagefolder") + [f"data.root={tmp_path / 'images'}"])
    with pytest.raises(ValueError, match="holds no readable images"):
        run_pretrain(cfg)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_pretrain(compose_config(debug_overrides(tmp_path / "run", data="imagefolder") + ["data.root=/no/such/dir"]))
    with pytest.raises(MissingMandatoryValue, match="data.root"):  # forgot data.root=...
        run_pretrain(compose_config(debug_overrides(tmp_path / "run", data="imagefolder")))


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    full = run(tmp_path / "full", max_steps=3)
    accumulated = run(tmp_path / "accum", max_steps=3, batch_size=4, accum_iter=2)
    a, b = load_checkpoint(full.checkpoint)["model"], load_checkpoint(accumulated.checkpoint)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def _available(name: str) -> bool:
    from sparse_mae.backends import backend_availability, list_backends

    return name in list_backends() and backend_availability(name)[0]


@pytest.mark.parametrize("backend", ["dense_masked", "native", "minkowski"])
def test_every_available_backend_trains_and_resumes_another_backends_checkpoint(backend, tmp_path):
    if not _available(backend):
        pytest.skip(f"backend {backend} is not available here")
    run(tmp_path, max_steps=1, **{"data.num_images": 16})  # written by dense_masked
    resumed = run(tmp_path, backend=backend, resume="auto", max_steps=2, **{"data.num_images": 16})
    assert resumed.steps == 2 and len(resumed.losses) == 1 and math.isfinite(resumed.losses[0])


def test_bf16_autocast_on_cpu_when_asked(tmp_path):
    result = run(tmp_path, amp="true", max_steps=2)
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)


@pytest.mark.gpu
def test_pretraining_on_the_gpu_trains_checkpoints_and_resumes(tmp_path):
    first = run(tmp_path, device="cuda", backend="auto", amp="auto", max_steps=3)
    resumed = run(tmp_path, device="cuda", backend="auto", amp="auto", resume="auto")
    assert first.steps == 3 and resumed.steps == 8 and len(resumed.losses) == 5
    assert all(math.isfinite(x) for x in first.losses + resumed.losses)


def test_autocast_on_a_backend_without_it_is_a_clear_error(tmp_path):
    if not _available("minkowski"):
        pytest.skip("minkowski (the fp32-only backend) is not installed")
    with pytest.raises(ValueError, match="has no autocast on cpu"):
        run(tmp_path, amp="true", backend="minkowski", max_steps=1)


# -- configs -------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("batch_size=eight", "Value 'eight' of type 'str' could not be converted to Integer"),
    ("model.variant=gigantic", "Invalid value 'gigantic', expected one of"),
    ("backend=faster", "backend/faster"),
    ("mask_ratio=[0.6]", "mask_ratio"),
    ("logger.mode=sometimes", "Invalid value 'sometimes'"),
    ("data=imagefolder data.num_images=4", "data.num_images"),  # a key of the other data option
])
def test_wrong_types_and_choices_are_rejected_by_hydra_from_the_schema(override, message):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(override.split())
    assert message in f"{error.value} {error.value.__cause__}"


def test_a_model_variant_is_one_key_with_its_defaults_in_one_place():
    tiny = compose_config(["model=tiny"])
    assert tiny.model.variant == "tiny" and compose_config(["model.variant=tiny"]).model == tiny.model
    assert tiny.model.decoder_dim == 512 and tiny.model.norm_pix_loss and tiny.model.drop_path_rate == 0.0
    assert not (REPO / "conf" / "sparse_mae_conf" / "model").exists()


def test_unknown_override_key_and_option_are_hydra_errors():
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        compose_config(["no_such_key=1"])
    with pytest.raises(ConfigCompositionException, match="optim.betta"):
        compose_config(["optim.betta=[0.9,0.9]"])
    with pytest.raises(ConfigCompositionException, match="model/nosuch"):
        compose_config(["model=nosuch"])


def test_warmup_longer_than_the_run_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="warmup .* is longer than the whole schedule"):
        run(tmp_path, **{"sched.warmup_steps": "null", "sched.warmup_epochs": 5})


def test_auto_backend_picks_native_when_available():
    from sparse_mae.backends import backend_availability, list_backends

    expected = "native" if "native" in list_backends() and backend_availability("native")[0] else "dense_masked"
    assert resolve_backend("auto") == expected
    assert compose_config([]).backend.name == "auto"


def test_defaults_follow_the_paper_recipe():
    cfg = compose_config(["experiment=in1k_atto_800ep", "data.root=/x"])
    assert cfg.model.variant == "atto" and cfg.data.name == "imagefolder" and cfg.data.size == 224
    assert list(cfg.optim.betas) == [0.9, 0.95] and cfg.optim.weight_decay == 0.05 and cfg.optim.blr == 1.5e-4
    assert cfg.epochs == 800 and cfg.sched.warmup_epochs == 40 and cfg.sched.min_lr == 0.0
    assert cfg.batch_size * 8 * cfg.accum_iter == 4096  # on 8 GPUs
    assert cfg.mask_ratio == 0.6 and list(cfg.data.scale) == [0.2, 1.0] and cfg.model.norm_pix_loss
    assert cfg.model.decoder_dim == 512 and cfg.model.decoder_depth == 1


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_runs_one_step(experiment, tmp_path):
    from tests.test_data_imagefolder import write_image_tree

    cfg = compose_config([f"experiment={experiment}"])  # as written, nothing overridden: ranges checked
    overrides = [f"experiment={experiment}", "model=debug", "max_steps=1", "logger=none", "data.size=64",
                 "batch_size=2", "data.num_workers=0", "recon.num_images=1", f"output_dir={tmp_path / 'run'}"]
    if cfg.data.name == "imagefolder":
        write_image_tree(tmp_path / "images", bad=False)
        for i in range(2 * cfg.accum_iter):
            Image.new("RGB", (80, 72), (i * 10, 100, 200)).save(tmp_path / "images" / f"extra{i}.png")
        overrides.append(f"data.root={tmp_path / 'images'}")
    else:
        overrides += ["data.draw_size=64", f"data.num_images={2 * cfg.accum_iter}"]
    result = run_pretrain(compose_config(overrides))
    assert result.steps == 1 and result.checkpoint.exists() and result.reconstruction.exists()


# -- the command line (subprocesses: Hydra's own app, exit codes, wandb offline) ---------


def cli(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
           "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sparse_mae.cli", "pretrain", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_key_with_its_value_and_help(tmp_path):
    proc = cli(["model=tiny", "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "variant: tiny  # encoder variant" in proc.stdout  # composed with the overrides given
    assert "max_in_a_row: 3  # a step with a non-finite loss" in proc.stdout
    assert "groups, chosen with group=option: model, backend, data, logger" in proc.stdout
    assert not (tmp_path / "outputs").exists()  # --help starts nothing


def test_cli_unknown_key_fails_with_hydras_message(tmp_path):
    proc = cli(["model=debug", "batch_sise=8"], tmp_path)
    assert proc.returncode != 0
    assert "Could not override 'batch_sise'" in proc.stderr and "Key 'batch_sise' not in 'PretrainConfig'" in proc.stderr


@pytest.mark.slow
def test_cli_run_with_wandb_offline_and_multirun_sweep(tmp_path):
    out = tmp_path / "run"
    args = debug_overrides(out, epochs=1, **{"logger": "wandb", "recon.every_steps": 2})
    proc = cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint:     {out}/checkpoints/step-00000004.pt" in proc.stdout
    assert (out / "metrics.jsonl").exists() and (out / "reconstruction.png").exists()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "wandb should run offline inside the run directory"
    assert list(runs[0].rglob("media/images/reconstruction_*.png")), "reconstruction not logged to wandb"

    sweep = cli(["-m", "backend=dense_masked,auto", "mask_ratio=0.4,0.6", "max_steps=1",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}",
                 *[a for a in debug_overrides(out) if not a.startswith(("output_dir", "backend"))]], tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep").iterdir())
    assert [j.name for j in jobs if j.is_dir() and not j.name.startswith(".")] == ["0", "1", "2", "3"]
    for job in ("0", "1", "2", "3"):
        assert find_latest(tmp_path / "sweep" / job / "checkpoints").name == "step-00000001.pt"
    assert "mask_ratio: 0.4" in (tmp_path / "sweep" / "0" / "config.yaml").read_text()


@pytest.mark.parametrize("fast", [True, False])
def test_amp_on_a_cpu_without_fast_bf16_warns_to_use_float32(monkeypatch, fast):
    import warnings

    from sparse_mae.train import amp

    monkeypatch.setattr(amp, "cpu_has_fast_bf16", lambda: fast)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert amp.resolve_amp("true", torch.device("cpu")) is True
        assert amp.resolve_amp("auto", torch.device("cpu")) is False  # auto never picks bf16 on a CPU
    messages = [str(w.message) for w in caught]
    assert (any("amp=false" in m and "bf16" in m for m in messages)) is (not fast)
