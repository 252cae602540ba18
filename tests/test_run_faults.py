"""Faults found by using the engine as a user would (issue 18, item 4); each test failed
before its fix."""
from __future__ import annotations

import errno
import hashlib
import os
import time

import pytest

from sparse_mae.train import metrics
from sparse_mae.train.checkpoint import list_checkpoints, load_checkpoint
from tests.test_pretrain import run


def snapshot(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_resume_from_an_older_checkpoint_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    run(out, **{"checkpoint.keep_last": 0})  # 8 steps, checkpoints every 2
    before = snapshot(out / "checkpoints")
    older = out / "checkpoints" / "step-00000004.pt"
    with pytest.raises(ValueError, match=r"is step 4, but output_dir .* later checkpoints .*step-00000008.pt"):
        run(out, resume=str(older), **{"checkpoint.keep_last": 0})
    assert snapshot(out / "checkpoints") == before
    branch = tmp_path / "branch"  # the way the message names: a new output_dir
    result = run(branch, resume=str(older), **{"checkpoint.keep_last": 0})
    assert result.steps == 8 and snapshot(out / "checkpoints") == before


class FailingFile:
    """A metrics file on a disk that fails (EIO) from its second line on, close() included."""

    def __init__(self):
        self.lines = 0

    def write(self, text):
        self.lines += 1
        if self.lines > 1:
            raise OSError(errno.EIO, "Input/output error")
        return len(text)

    def flush(self):
        pass

    def close(self):
        raise OSError(errno.EIO, "Input/output error")


def test_a_failing_metrics_file_costs_a_warning_not_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(metrics, "open", lambda *a, **k: FailingFile(), raising=False)
    out = tmp_path / "run"
    result = run(out)
    assert result.steps == 8
    assert [c.step for c in list_checkpoints(out / "checkpoints")][-1] == 8
    load_checkpoint(out / "checkpoints" / "step-00000008.pt")
    err = capsys.readouterr().err
    assert err.count("cannot write") == 1 and "metrics.jsonl" in err and "Input/output error" in err, err


def cli(tmp_path, *args, timeout=300):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "sparse_mae.cli", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(repo),
                                                           "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("override", ["bogus_key=1", "batch_size=abc", "model=no_such_variant"])
def test_a_config_hydra_rejects_exits_2_not_1(tmp_path, override):
    done = cli(tmp_path, "pretrain", override, f"output_dir={tmp_path / 'run'}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "sparse-mae --help" not in done.stderr and "pretrain --help" in done.stderr


def test_a_sweep_goes_on_past_a_failed_job_and_reports_it(tmp_path):
    from tests.test_pretrain import debug_overrides

    args = [a for a in debug_overrides(tmp_path / "unused", max_steps=2) if not a.startswith("output_dir=")]
    done = cli(tmp_path, "pretrain", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", *args, "mask_ratio=1.5,0.5")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "1 of 2 sweep jobs failed" in done.stderr and "mask_ratio=1.5: exit 2" in done.stderr, done.stderr
    assert [c.step for c in list_checkpoints(tmp_path / "sweep" / "1" / "checkpoints")] == [2]


@pytest.mark.parametrize("shape", [(1, 40000), (40000, 1), (3, 5000)])
def test_transforms_never_make_an_image_larger_than_their_output(monkeypatch, shape):
    from PIL import Image

    from sparse_mae.data.transforms import EvalTransform, TrainTransform

    size = 224
    real_resize = Image.Image.resize

    def resize(self, new_size, *args, **kwargs):  # refuse before Pillow allocates it
        assert new_size[0] * new_size[1] <= size * size, f"an intermediate {new_size} image for a {size}px output"
        return real_resize(self, new_size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", resize)
    img = Image.new("RGB", shape, (200, 10, 10))
    assert EvalTransform(size)(img).shape == (3, size, size)
    assert TrainTransform(size)(img, seed=1).shape == (3, size, size)


def no_flock(monkeypatch, err: int):
    import fcntl as fcntl_module

    def flock(f, op):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(fcntl_module, "flock", flock)


@pytest.mark.parametrize("err", [errno.ENOLCK, errno.ENOSYS])
def test_a_filesystem_without_flock_is_not_a_held_lock(tmp_path, monkeypatch, err):
    from sparse_mae.errors import RunDirectoryInUse
    from sparse_mae.train.rundir import FALLBACK_LOCK_NAME, RunDirectory

    no_flock(monkeypatch, err)
    first = RunDirectory(tmp_path)
    first.lock()  # was: "in use by another process", exit 3, for ever
    held = tmp_path / FALLBACK_LOCK_NAME
    assert f"pid {os.getpid()}" in held.read_text()
    with pytest.raises(RunDirectoryInUse, match="its filesystem has no flock"):
        RunDirectory(tmp_path).lock()  # a live holder is still refused
    first.unlock()
    assert not held.exists()


def test_the_fallback_lock_of_a_dead_holder_is_taken_over(tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys

    from sparse_mae.train.rundir import FALLBACK_LOCK_NAME, STALE_AFTER_S, RunDirectory

    no_flock(monkeypatch, errno.ENOLCK)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    held = tmp_path / FALLBACK_LOCK_NAME
    held.write_text(f"pid {dead.stdout.strip()} on host {socket.gethostname()} (since then)\n")
    d = RunDirectory(tmp_path)
    d.lock()  # a dead pid on this host
    d.unlock()
    held.write_text("pid 1 on host some-other-node (since then)\n")
    os.utime(held, (0, time.time() - STALE_AFTER_S - 5))  # no heartbeat for longer than STALE_AFTER_S
    d.lock()
    assert socket.gethostname() in held.read_text()
    d.unlock()


def test_an_empty_output_dir_is_refused_and_writes_nothing(tmp_path):
    from tests.test_pretrain import debug_overrides

    args = [a for a in debug_overrides(tmp_path / "unused", max_steps=1) if not a.startswith("output_dir=")]
    done = cli(tmp_path, "pretrain", *args, "output_dir=")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "output_dir is empty" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_resume_with_a_changed_run_defining_key_is_refused_and_others_warned(tmp_path, capsys):
    out = tmp_path / "run"
    run(out, max_steps=4)
    for key, value in [("batch_size", 16), ("accum_iter", 2), ("seed", 3), ("data.size", 96), ("epochs", 4),
                       ("optim.lr", 1e-3), ("mask_ratio", 0.5), ("data.num_images", 64)]:
        with pytest.raises(ValueError, match=rf"changed config: {key.replace('.', '[.]')}: \S+ -> \S+.*init="):
            run(out, resume="auto", **{key: value})
    assert [c.step for c in list_checkpoints(out / "checkpoints")] == [2, 4]
    capsys.readouterr()
    result = run(out, resume="auto", clip_grad=1.0, **{"logger.progress": "true", "checkpoint.keep_last": 5})
    assert result.steps == 8
    out_err = capsys.readouterr()
    text = out_err.out + out_err.err
    assert "changed settings" in text and "clip_grad: None -> 1.0" in text and "logger.progress" not in text


def test_an_empty_class_folder_in_training_data_is_refused_not_a_class(tmp_path):
    from PIL import Image

    from sparse_mae.data.imagefolder import labelled_image_folder

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (40, 40)).save(tmp_path / name / "a.png")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*empty_class has no images: it would be class 2 of 3"):
        labelled_image_folder(tmp_path)
    val = labelled_image_folder(tmp_path, classes=["cat", "dog", "empty_class"])
    assert len(val) == 2  # a validation split may lack a class


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    from sparse_mae.data.imagefolder import load_rgb

    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    img.save(tmp_path / "phone.jpg", exif=exif)
    assert load_rgb(tmp_path / "phone.jpg").size == (20, 40)


@pytest.mark.parametrize("size, ratio", [(32, 0.6), (32, 0.9)])
def test_an_image_with_nothing_to_mask_is_refused_before_a_nan_loss(tmp_path, size, ratio):
    with pytest.raises(ValueError, match=rf"data.size={size} gives .* keeps all of them"):
        run(tmp_path / "run", mask_ratio=ratio, **{"data.size": size, "data.draw_size": 64})


def test_eval_of_a_checkpoint_on_data_with_other_classes_names_the_mismatch(tmp_path):
    import torch

    import sparse_mae
    from sparse_mae.apps.evaluate import compose_eval_config, run_eval

    model = sparse_mae.create_model("convnextv2_debug", num_classes=2)
    ckpt = tmp_path / "two.pt"
    torch.save({"model": model.state_dict(), "metadata": {"classes": ["ant", "bee"]}}, ckpt)
    cfg = compose_eval_config([f"ckpt={ckpt}", "finetune/data@data=builtin", "data.size=64", "data.draw_size=64",
                               "data.num_val=8", "data.num_workers=0", "device=cpu", f"out={tmp_path / 'e'}"])
    with pytest.raises(ValueError, match=r"checkpoint's classes \['ant', 'bee'\] are not the val data's"):
        run_eval(cfg)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EFBIG])
def test_a_full_disk_during_a_checkpoint_stops_the_run_naming_it(tmp_path, monkeypatch, err):
    from sparse_mae.train import checkpoint
    from sparse_mae.errors import RunStopped

    real_save, calls = checkpoint.torch.save, []

    def save(obj, f, *args, **kwargs):  # as torch reports a failed write: its own error, the OSError below
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        try:
            f.write(b"x")
            raise OSError(err, os.strerror(err))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0") from None

    monkeypatch.setattr(checkpoint.torch, "save", save)
    out = tmp_path / "run"
    with pytest.raises(RunStopped, match=rf"cannot write checkpoint .*step-00000004.pt: {os.strerror(err)}"):
        run(out)
    assert [c.step for c in list_checkpoints(out / "checkpoints")] == [2]
    load_checkpoint(out / "checkpoints" / "step-00000002.pt")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002.json", "step-00000002.pt",
                                                                      "step-00000002.yaml"]


def test_an_output_dir_that_is_a_file_or_read_only_is_named_before_hydra_logs(tmp_path, monkeypatch):
    from sparse_mae.config import check_output_dir

    a_file = tmp_path / "file"
    a_file.write_text("x")
    done = cli(tmp_path, "pretrain", "model=debug", "logger=none", f"output_dir={a_file}")
    assert done.returncode == 2 and "is a file, not a folder" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only mount (root ignores chmod)
    assert "cannot be written" in check_output_dir(str(tmp_path / "new" / "run"))


def test_a_folder_of_only_bad_files_is_one_clear_error_and_few_warnings(tmp_path):
    import warnings

    from sparse_mae.data.dataset import MAX_NAMED_DAMAGED, SeededDataset
    from sparse_mae.data.imagefolder import image_folder
    from sparse_mae.data.transforms import TrainTransform

    for i in range(200):
        (tmp_path / f"{i:03d}.jpg").write_bytes(b"not a jpeg")
    ds = SeededDataset(image_folder(tmp_path), TrainTransform(32))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"none of the 200 image files .* can be decoded.*imagefolder"):
            ds[(0, 0)]
    assert len(seen) == MAX_NAMED_DAMAGED + 1, [str(w.message) for w in seen][:8]
