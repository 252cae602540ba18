"""Indexed shards: `sparse-mae prepare` (image folders and the Fashion-MNIST idx files), the
shard reader's damage policy, the fast decode's crop distribution, and pretraining from shards
(kill -9 + resume, 2 processes = 1)."""
from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparse_mae.bench.images import write_jpegs
from sparse_mae.data import prepare as prepare_module
from sparse_mae.data.decode import FastEvalTransform, FastTrainTransform, decode_reduced
from sparse_mae.data.fashion_mnist import CLASSES, FashionMnist, write_idx
from sparse_mae.data.prepare import PrepareOptions, prepare, prepare_fashion_mnist
from sparse_mae.data.dataset import SeededDataset
from sparse_mae.data.shards import ShardReader, ShardSource
from sparse_mae.data.transforms import EvalTransform, TrainTransform, model_input, to_normalized_tensor

REPO = Path(__file__).resolve().parents[1]
FMNIST = REPO / "tests" / "data" / "fashion_mnist"  # 320 train + 160 test images


@pytest.fixture(scope="module")
def labelled_src(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    write_jpegs(src, 24, 96, 72, labelled=True)
    return src


def raw_bytes(img: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90, **save)
    return out.getvalue()


# -- prepare ---------------------------------------------------------------------------------

def test_prepare_labels_bounded_size_exif_and_unreadable_files_listed(tmp_path, labelled_src):
    src = tmp_path / "src"
    (src / "cats").mkdir(parents=True)
    (src / "dogs").mkdir()
    Image.new("RGB", (120, 60), (200, 10, 10)).save(src / "cats" / "wide.jpg", quality=95)
    Image.new("RGBA", (30, 40), (10, 200, 10, 128)).save(src / "cats" / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    Image.new("RGB", (80, 40), (10, 10, 200)).save(src / "dogs" / "rotated.jpg", exif=exif.tobytes())
    (src / "dogs" / "garbage.jpg").write_bytes(b"not an image at all")
    (src / "dogs" / "empty.jpg").write_bytes(b"")
    good = raw_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))
    (src / "dogs" / "truncated.jpg").write_bytes(good[: len(good) // 3])

    manifest = prepare(src, tmp_path / "out", PrepareOptions(short_side=32, quality=90, shard_size=2), workers=2)
    assert manifest["classes"] == ["cats", "dogs"]
    reader = ShardReader(tmp_path / "out")
    got = {}
    for i in range(len(reader)):
        label, data = reader.read(i)
        name = reader.name(i)
        got[Path(name.split("(")[1].rstrip(")")).name] = (label, Image.open(io.BytesIO(data)))
    assert set(got) == {"wide.jpg", "alpha.png", "rotated.jpg"}
    assert got["wide.jpg"][0] == 0 and got["rotated.jpg"][0] == 1
    assert got["wide.jpg"][1].size == (64, 32)  # shorter side bounded to 32
    assert got["alpha.png"][1].size == (30, 40) and got["alpha.png"][1].mode == "RGB"  # never enlarged
    assert got["rotated.jpg"][1].size == (32, 64)  # EXIF orientation applied, then shrunk
    listed = (tmp_path / "out" / "unreadable.txt").read_text()
    for name in ("garbage.jpg", "empty.jpg", "truncated.jpg"):
        assert name in listed
    assert len(manifest["unreadable"]) == 3


def test_prepare_cli_bad_source_exits_2_with_message(tmp_path, capsys, monkeypatch):
    import sys

    from sparse_mae.cli import main

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the dispatcher rewrites it for the app
    code = main(["prepare", f"src={tmp_path / 'nowhere'}", f"out={tmp_path / 'out'}", "progress=false"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_prepare_refuses_a_folder_of_other_work(tmp_path, labelled_src):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        prepare(labelled_src, tmp_path / "out", PrepareOptions(shard_size=8))
    prepare(labelled_src, tmp_path / "out2", PrepareOptions(shard_size=8))
    with pytest.raises(ValueError, match="another source"):
        prepare(labelled_src, tmp_path / "out2", PrepareOptions(shard_size=8, quality=80))


def test_interrupted_prepare_continues_keeping_verified_shards_and_ends_like_a_straight_run(
        tmp_path, labelled_src, monkeypatch):
    opts = PrepareOptions(shard_size=5)
    straight = prepare(labelled_src, tmp_path / "straight", opts)
    real_build = prepare_module.build_shard

    def build_then_die(out, index, samples, options):
        if index == 3:
            (out / ".tmp-shard-00003.data.999").write_bytes(b"half a shard")  # what a killed writer leaves
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        return real_build(out, index, samples, options)

    monkeypatch.setattr(prepare_module, "build_shard", build_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(labelled_src, tmp_path / "cut", opts)
    with pytest.raises(ValueError, match="unfinished"):
        ShardReader(tmp_path / "cut")
    # one committed shard damaged after the fact: it must be rebuilt, not trusted
    with open(tmp_path / "cut" / "shard-00001.data", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    kept = (tmp_path / "cut" / "shard-00000.data").stat().st_mtime_ns
    monkeypatch.setattr(prepare_module, "build_shard", real_build)
    messages = []
    manifest = prepare(labelled_src, tmp_path / "cut", opts, log=messages.append)
    assert messages == ["continuing: 2 of 5 shards already built and verified, 3 to build"]
    assert (tmp_path / "cut" / "shard-00000.data").stat().st_mtime_ns == kept
    assert not [p for p in (tmp_path / "cut").iterdir() if p.name.startswith(".tmp-")]
    assert manifest["shards"] == straight["shards"]
    for p in (tmp_path / "straight").glob("shard-*"):
        if not p.name.endswith(".names.txt"):
            assert p.read_bytes() == (tmp_path / "cut" / p.name).read_bytes(), p.name


# -- damaged shards -----------------------------------------------------------------------------

def served(ds: SeededDataset) -> list[dict]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[(i, i)] for i in range(len(ds))] + [ds[(i, i)] for i in range(len(ds))]
    return items, [str(w.message) for w in caught]


def test_damaged_shard_costs_only_its_bad_samples_counted_named_once_never_a_wrong_image(tmp_path, labelled_src):
    out = tmp_path / "shards"
    prepare(labelled_src, out, PrepareOptions(shard_size=8))
    reader = ShardReader(out)
    truth = [reader.read(i) for i in range(len(reader))]
    rows = np.load(out / "shard-00000.index.npy")
    # shard 0: a flipped byte inside sample 2's JPEG data; shard 1: its index says sample 1 has another label;
    # shard 2: the data file cut off in the middle of its last sample
    with open(out / "shard-00000.data", "r+b") as f:
        at = int(rows[2]["offset"]) + int(rows[2]["length"]) // 2
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x10]))
    idx1 = np.load(out / "shard-00001.index.npy")
    idx1[1]["label"] = (idx1[1]["label"] + 1) % 8
    np.save(out / "shard-00001.index.npy", idx1)
    # an edited index differs from the manifest's record of it, which leaves out the whole shard
    # (below); with the manifest edited to agree, the sample's checksum, which covers its label, tells
    recorded = (out / "manifest.json").read_text()
    record_index_in_manifest(out, "shard-00001")
    rows2 = np.load(out / "shard-00002.index.npy")
    with open(out / "shard-00002.data", "r+b") as f:
        f.truncate(int(rows2[-1]["offset"]) + 10)
    bad = {2, 9, 23}

    decode = lambda data, seed: torch.from_numpy(np.array(Image.open(io.BytesIO(data)))).permute(2, 0, 1)  # noqa: E731
    ds = SeededDataset(ShardSource(out, labelled=True), decode)
    items, messages = served(ds)
    good = {j: (decode(data, 0), label) for j, (label, data) in enumerate(truth) if j not in bad}
    for i, item in enumerate(items):
        i %= len(ds)
        assert item["skipped"] == (i in bad) and item["index"] == i, i
        # a damaged sample's stand-in is a good sample with its own label, never a wrong image
        matches = [j for j, (image, label) in good.items()
                   if torch.equal(item["image"], image) and item["label"] == label]
        assert matches == [i] if i not in bad else len(matches) == 1, i
    assert len(messages) == 3  # each damaged sample named once, though read twice
    assert any("shard-00000 sample 2" in m and "checksum" in m for m in messages)
    assert any("shard-00001 sample 1" in m and "checksum" in m for m in messages)
    assert any("shard-00002 sample 7" in m and "truncated" in m for m in messages)
    assert all("img_" in m for m in messages)  # the source file is named

    (out / "manifest.json").write_text(recorded)  # the manifest as prepared: shard 1's index is not its own
    with pytest.warns(UserWarning, match="shard-00001 .*does not match the manifest's record"):
        ds = SeededDataset(ShardSource(out, labelled=True), decode)
    assert len(ds) == 16 and ds.source.reader.skipped_shards == ["shard-00001"]


def record_index_in_manifest(root: Path, shard: str) -> None:
    """Make root's manifest agree with the shard's (edited) index: its digest and the fingerprint."""
    from sparse_mae.data.manifest import data_set_fingerprint
    from sparse_mae.io import sha256_of

    manifest = json.loads((root / "manifest.json").read_text())
    for record in manifest["shards"]:
        if record["name"] == shard:
            record["index_sha256"] = sha256_of(root / f"{shard}.index.npy")
    manifest["fingerprint"] = data_set_fingerprint(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_missing_index_loses_only_that_shard_and_not_a_shard_folder_is_a_clear_error(tmp_path, labelled_src):
    out = tmp_path / "shards"
    prepare(labelled_src, out, PrepareOptions(shard_size=8))
    (out / "shard-00001.index.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.warns(UserWarning, match="shard-00001 .*its 8 samples are left out"):
        ds = SeededDataset(ShardSource(out), lambda data, seed: len(data))
    assert len(ds) == 16 and ds.source.reader.skipped_shards == ["shard-00001"]  # left out at the open, by name
    assert [ds[(i, i)]["skipped"] for i in range(len(ds))] == [0] * 16  # shards 0 and 2, each sample served
    with pytest.raises(FileNotFoundError, match="sparse-mae prepare src="):
        ShardReader(labelled_src)
    (tmp_path / "layout" / "train").mkdir(parents=True)
    (out / "manifest.json").rename(tmp_path / "layout" / "train" / "manifest.json")
    with pytest.raises(FileNotFoundError, match="data.root=.*layout/train"):
        ShardReader(tmp_path / "layout")


def test_images_beside_class_folders_mean_no_labels(tmp_path):
    write_jpegs(tmp_path / "src" / "a", 2, 40, 30)
    write_jpegs(tmp_path / "src", 1, 40, 30)
    manifest = prepare(tmp_path / "src", tmp_path / "out", PrepareOptions())
    assert manifest["classes"] is None and manifest["samples"] == 3  # a/ and the top level, unlabelled


# -- fast decode ------------------------------------------------------------------------------------

def test_model_input_normalises_uint8_exactly_like_the_cpu_transform():
    arr = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]
    assert torch.equal(model_input(x)[0], to_normalized_tensor(Image.fromarray(arr)))
    f = torch.randn(1, 3, 4, 4)
    assert model_input(f) is f


def test_fast_decode_keeps_the_crop_distribution_of_the_pil_transforms():
    """Same seed -> same box and flip (random_resized_crop_box on the full size); the
    DCT-reduced decode changes pixels only a little. Over many seeds the crops' scale, aspect
    ratio, flips and pixel mean/std match today's TrainTransform."""
    from sparse_mae.bench.images import photo

    img, _ = photo(3, 800, 600)
    data = raw_bytes(img)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    old, new = TrainTransform(64, scale=(0.2, 1.0)), FastTrainTransform(64, scale=(0.2, 1.0))
    diffs, reduced, old_px, new_px = [], 0, [], []
    for seed in range(60):
        a = old(full, seed)
        b = model_input(new(data, seed)[None])[0]
        diffs.append(float((a - b).abs().mean()))
        old_px.append(a)
        new_px.append(b)
        g = torch.Generator().manual_seed(seed)
        from sparse_mae.data.transforms import random_resized_crop_box

        l, t, r, btm = random_resized_crop_box(800, 600, (0.2, 1.0), (3 / 4, 4 / 3), g)
        reduced += decode_reduced(data, 800 * 64 / (r - l), 600 * 64 / (btm - t))[1] < 1
    assert reduced > 50  # the reduced decode is really used
    # per crop: the same region and flip (a wrong box or flip would differ by ~0.5-1 in normalised units)
    assert max(diffs) < 0.12, max(diffs)
    old_px, new_px = torch.stack(old_px), torch.stack(new_px)
    for dims in ((0, 2, 3),):
        torch.testing.assert_close(new_px.mean(dims), old_px.mean(dims), atol=0.02, rtol=0)
        torch.testing.assert_close(new_px.std(dims), old_px.std(dims), atol=0.02, rtol=0)


def test_fast_eval_transform_matches_the_pil_eval_transform():
    from sparse_mae.bench.images import photo

    img, _ = photo(5, 640, 400)
    data = raw_bytes(img)
    a = EvalTransform(64)(Image.open(io.BytesIO(data)).convert("RGB"))
    b = model_input(FastEvalTransform(64)(data)[None])[0]
    assert float((a - b).abs().mean()) < 0.06


# -- training from shards ------------------------------------------------------------------------

def shard_overrides(out: Path, root: Path, **extra) -> list[str]:
    from tests.test_pretrain import debug_overrides

    args = [a for a in debug_overrides(out, **extra) if not a.startswith(("data.draw_size=", "data.num_images="))]
    return ["data=shards", f"data.root={root}", *args]


@pytest.fixture(scope="module")
def pretrain_shards(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("photos")
    write_jpegs(src, 32, 96, 72)
    out = tmp_path_factory.mktemp("shards") / "train"
    prepare(src, out, PrepareOptions(short_side=72, shard_size=10))
    return out


def test_pretrain_and_finetune_read_shards(tmp_path, pretrain_shards, labelled_src):
    from sparse_mae.data.build import labelled_split as build_split
    from sparse_mae.apps.pretrain import compose_config, run_pretrain

    result = run_pretrain(compose_config(shard_overrides(tmp_path / "run", pretrain_shards, max_steps=2)))
    assert result.steps == 2 and result.checkpoint.exists()

    root = tmp_path / "labelled"
    prepare(labelled_src, root / "train", PrepareOptions(shard_size=8))
    only_some = tmp_path / "val_src"
    for name in ("ring", "disc"):  # a val split holding fewer classes keeps train's class indices
        (only_some / name).mkdir(parents=True)
        for p in sorted((labelled_src / name).iterdir())[:2]:
            (only_some / name / p.name).write_bytes(p.read_bytes())
    prepare(only_some, root / "val", PrepareOptions(shard_size=8))
    from sparse_mae.apps.finetune import compose_config as ft_config

    cfg = ft_config(["finetune/data@data=shards", f"data.root={root}", "data.size=64", "model=debug"])
    train, classes = build_split(cfg.data, "train")
    val, _ = build_split(cfg.data, "val", classes)
    assert train[(0, 0)]["image"].shape == (3, 64, 64) and train[(0, 0)]["image"].dtype == torch.uint8
    assert {val[(i, 0)]["label"] for i in range(len(val))} == {classes.index("ring"), classes.index("disc")}


@pytest.mark.slow
def test_pretrain_from_shards_killed_and_resumed_ends_bit_identical(tmp_path, pretrain_shards):
    from tests.test_fault_injection import assert_same_end, finish, launch, straight_run

    args = {"epochs": 3, "checkpoint.keep_last": 2, "model.drop_path_rate": 0.2, "recon.every_steps": 3,
            "data.num_workers": 1}
    straight_run("pretrain", shard_overrides(tmp_path / "straight", pretrain_shards, **args), tmp_path / "straight", 1)
    killed = tmp_path / "killed"
    history = []
    for fault, kill_after in (("save_half:2", None), ("after_rename:1", None), (None, 4.0), (None, None)):
        code, err = finish(launch("pretrain", [*shard_overrides(killed, pretrain_shards, **args), "resume=auto"],
                                  fault, 1, tmp_path), kill_after)
        history.append(f"{fault or kill_after}: exit {code}")
        assert code in (0, -9), "\n".join(history) + err[-3000:]
    assert history[-1].endswith("exit 0") and sum("exit -9" in h for h in history) >= 2, history
    assert_same_end(tmp_path / "straight", killed, history)


@pytest.mark.slow
def test_two_process_gloo_run_from_shards_matches_one_process(tmp_path, pretrain_shards):
    from sparse_mae.apps.pretrain import compose_config, run_pretrain
    from sparse_mae.train.checkpoint import load_checkpoint
    from tests.test_pretrain import read_metrics
    from tests.test_pretrain_distributed import torchrun_standalone

    steps = 3
    one = run_pretrain(compose_config(shard_overrides(tmp_path / "one", pretrain_shards, max_steps=steps,
                                                      batch_size=8)))
    out = tmp_path / "two"
    proc = torchrun_standalone(shard_overrides(out, pretrain_shards, max_steps=steps, batch_size=4), tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "cpu x 2" in proc.stderr
    two_state = load_checkpoint(out / "checkpoints" / f"step-{steps:08d}.pt")
    one_state = load_checkpoint(one.checkpoint)
    for key, value in one_state["model"].items():
        torch.testing.assert_close(two_state["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    torch.testing.assert_close(torch.tensor([r["loss"] for r in read_metrics(out / "metrics.jsonl")]),
                               torch.tensor([r["loss"] for r in read_metrics(one.metrics)]), rtol=1e-5, atol=1e-6)


def test_manifest_names_the_format(tmp_path, labelled_src):
    manifest = prepare(labelled_src, tmp_path / "o", PrepareOptions(shard_size=100))
    on_disk = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert on_disk == manifest and on_disk["format"] == "sparse-mae-shards" and on_disk["samples"] == 24


def test_bench_loader_measures_folder_and_shard_paths(tmp_path):
    from sparse_mae.apps.bench import compose_config, run

    cfg = compose_config(["bench=loader", "loader.images=3", "loader.jpeg_sizes=[[120,90],[320,240]]",
                          "image_size=64", "repeats=1", "loader.end_to_end=false", f"output_dir={tmp_path}"])
    rows, paths = run(cfg, tmp_path, log=lambda *_: None)
    assert [r["jpeg"] for r in rows] == ["120x90", "320x240"]
    assert all(r["folder_img_s_core"] > 0 and r["shards_img_s_core"] > 0 for r in rows)
    text = paths["md"].read_text()
    assert "load average" in text and "| 320x240 | 64 |" in text
    assert paths["png"] == tmp_path / "loader.png"
    with Image.open(paths["png"]) as plot:
        assert plot.format == "PNG" and plot.width > 300 and plot.height > 200


def test_loader_plot_is_drawn_again_from_recorded_numbers(tmp_path):
    import shutil
    import subprocess
    import sys

    recorded = tmp_path / "loader.json"
    shutil.copy(REPO / "docs" / "bench-loader" / "loader.json", recorded)
    proc = subprocess.run([sys.executable, "-m", "sparse_mae.bench.loader", str(recorded)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "loader.png") as plot:
        assert plot.format == "PNG" and plot.width > 300
    assert (REPO / "docs" / "bench-loader" / "loader.png").is_file()  # the README shows it


def flip_sample_byte(root: Path, shard: str, sample: int, at: int = 50) -> None:
    """Damage one sample of a shard folder: invert byte `at` of its JPEG (its checksum then fails)."""
    rows = np.load(root / f"{shard}.index.npy")
    with open(root / f"{shard}.data", "r+b") as f:
        f.seek(int(rows[sample]["offset"]) + at)
        b = f.read(1)
        f.seek(int(rows[sample]["offset"]) + at)
        f.write(bytes([b[0] ^ 0xFF]))


def test_pretrain_counts_a_damaged_sample_in_skipped_files(tmp_path, pretrain_shards):
    import shutil

    from sparse_mae.apps.pretrain import compose_config, run_pretrain

    root = tmp_path / "shards"
    shutil.copytree(pretrain_shards, root)
    flip_sample_byte(root, "shard-00001", 4)
    with pytest.warns(UserWarning, match="shard-00001 sample 4"):
        result = run_pretrain(compose_config(shard_overrides(tmp_path / "run", root, max_steps=4, epochs=1)))
    assert result.steps == 4 and result.skipped_files == 1  # one epoch reads every sample once
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped_files"] == 1


def test_prepare_killed_with_sigkill_continues_to_the_same_shards(tmp_path, labelled_src):
    import os
    import signal
    import subprocess
    import sys
    import time

    straight = prepare(labelled_src, tmp_path / "straight", PrepareOptions(shard_size=2))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sparse_mae.cli", "prepare", f"src={labelled_src}", f"out={out}", "shard_size=2",
           "workers=1", "progress=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list(out.glob("*.done.json"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "prepare ended before it could be killed; make the source larger"
    assert not (out / "manifest.json").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    import re

    kept = re.search(r"continuing: (\d+) of 12 shards", done.stdout + done.stderr)
    assert kept and 3 <= int(kept[1]) < 12, done.stdout + done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == straight["shards"]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_shards_train_split_without_augmentation_is_centre_cropped(tmp_path, labelled_src):
    """The probe embeds the train split with augment=False: centre crops, the same for every
    seed (shards used to give random crops there)."""
    from sparse_mae.apps.finetune import compose_config as ft_config
    from sparse_mae.data.build import labelled_split as build_split

    root = tmp_path / "labelled"
    prepare(labelled_src, root / "train", PrepareOptions(shard_size=8))
    cfg = ft_config(["finetune/data@data=shards", f"data.root={root}", "data.size=64", "model=debug"])
    plain, _ = build_split(cfg.data, "train", augment=False)
    assert torch.equal(plain[(0, 1)]["image"], plain[(0, 2)]["image"])
    assert torch.equal(plain[(0, 1)]["image"], FastEvalTransform(64)(plain.source.reader.read(0)[1]))
    augmented, _ = build_split(cfg.data, "train")
    assert not torch.equal(augmented[(0, 1)]["image"], augmented[(0, 2)]["image"])


def test_loader_end_to_end_runs_the_grid_mask_ratio_and_skips_slow_bf16(tmp_path, monkeypatch):
    """The end-to-end row times the bench step and the pretrain at the grid's mask ratio, and
    on a CPU without fast bf16 says so instead of timing torch's fallback."""
    import subprocess
    from types import SimpleNamespace

    from sparse_mae.bench import loader, runner

    seen = {}
    monkeypatch.setattr(runner, "run_isolated", lambda spec, **_: seen.update(spec=spec) or {"status": "failed"})
    monkeypatch.setattr(subprocess, "run", lambda args, **_: seen.update(args=args) or SimpleNamespace(
        returncode=1, stderr="stopped by the test"))
    settings = {"variant": "debug", "backend": "native", "batch_size": 2, "image_size": 64, "dtype": "float32",
                "mask_ratio": 0.75, "repeats": 1, "steps": 2, "threads": 1, "shards": "shards"}
    row = loader.measure_end_to_end(tmp_path, settings, log=lambda *_: None)
    assert seen["spec"]["mask_ratio"] == 0.75 and "mask_ratio=0.75" in seen["args"]
    assert row["mask_ratio"] == 0.75 and "stopped by the test" in row["error"]
    seen.clear()
    monkeypatch.setattr(runner, "cpu_has_fast_bf16", lambda: False)
    row = loader.measure_end_to_end(tmp_path, {**settings, "dtype": "bfloat16"}, log=lambda *_: None)
    assert not seen and row["bench_step_img_s"] is None and row["error"].startswith("not measured")
    assert "dtypes=[float32]" in row["error"]


# -- Fashion-MNIST idx files -> shards -------------------------------------------------------------

@pytest.fixture(scope="module")
def fmnist_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fmnist") / "shards"
    prepare_fashion_mnist(FMNIST, out, PrepareOptions(shard_size=100), workers=2)  # 4 train + 2 val shards
    return out


def test_fashion_mnist_becomes_labelled_train_and_val_shards_equal_to_the_idx_pixels(fmnist_shards):
    for folder, split, count, shards in (("train", "train", 320, 4), ("val", "test", 160, 2)):
        source = FashionMnist(FMNIST, split)
        reader = ShardReader(fmnist_shards / folder)
        assert len(reader) == len(source) == count and len(reader.shards) == shards
        assert reader.classes == list(CLASSES)
        assert reader.manifest["options"]["encoding"] == "png" and reader.manifest["unreadable"] == []
        assert reader.name(count - 1).endswith(f"({split.replace('test', 't10k')}-images-idx3-ubyte.gz[{count - 1}])")
        for i in range(count):
            label, data = reader.read(i)
            img = Image.open(io.BytesIO(data))
            assert (img.format, img.mode, img.size) == ("PNG", "L", (32, 32))
            assert label == int(source.labels[i])
            assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(source.rgb(i))), i


def test_fast_transforms_on_fashion_mnist_shards_equal_the_fashion_mnist_option(fmnist_shards):
    """Eval: the same Pillow bicubic resize of the same 32px pixels over the same box (no DCT
    reduction for PNG) and the same normalisation: equal to the last bit. Train: the box is
    resampled by torch's uint8 bicubic, which clamps at the crop's border where Pillow reads
    the pixels just outside it: close on average, apart at a border next to an edge."""
    source, reader = FashionMnist(FMNIST, "test"), ShardReader(fmnist_shards / "val")
    for i in range(0, 160, 9):
        data = reader.read(i)[1]
        expected = EvalTransform(128)(source.rgb(i))
        assert torch.equal(model_input(FastEvalTransform(128)(data)[None])[0], expected)
        expected = TrainTransform(64, scale=(0.08, 1.0))(source.rgb(i), seed=i)
        got = model_input(FastTrainTransform(64, scale=(0.08, 1.0))(data, seed=i)[None])[0]
        # measured: at most 0.030 on average (1.8 grey levels; the border pixels next to an
        # edge just outside the box differ most)
        assert float((got - expected).abs().mean()) < 0.04, i


def test_interrupted_fashion_mnist_prepare_continues_and_ends_like_a_straight_run(tmp_path, fmnist_shards,
                                                                                  monkeypatch):
    real_build = prepare_module.build_shard

    def build_then_die(out, index, samples, source):
        if out.name == "val" and index == 1:
            (out / ".tmp-shard-00001.data.999").write_bytes(b"half a shard")  # what a killed writer leaves
            raise KeyboardInterrupt  # Ctrl-C in the middle of the val split
        return real_build(out, index, samples, source)

    monkeypatch.setattr(prepare_module, "build_shard", build_then_die)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        prepare_fashion_mnist(FMNIST, cut, PrepareOptions(shard_size=100))
    assert (cut / "train" / "manifest.json").exists() and not (cut / "val" / "manifest.json").exists()
    with pytest.raises(ValueError, match="unfinished"):
        ShardReader(cut / "val")
    with open(cut / "train" / "shard-00002.data", "r+b") as f:  # damaged after the fact: rebuilt, not trusted
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    monkeypatch.setattr(prepare_module, "build_shard", real_build)
    messages = []
    prepare_fashion_mnist(FMNIST, cut, PrepareOptions(shard_size=100), log=messages.append)
    assert messages == ["train: continuing: 3 of 4 shards already built and verified, 1 to build",
                        "val: continuing: 1 of 2 shards already built and verified, 1 to build"]
    straight = sorted(p.relative_to(fmnist_shards) for p in fmnist_shards.rglob("*") if p.is_file())
    assert sorted(p.relative_to(cut) for p in cut.rglob("*") if p.is_file()) == straight  # no temp files left
    for rel in straight:  # 2 workers straight, 1 worker cut and continued: the same bytes
        assert (cut / rel).read_bytes() == (fmnist_shards / rel).read_bytes(), rel


def test_fashion_mnist_prepare_refuses_another_source_a_busy_out_and_an_ambiguous_src(tmp_path, fmnist_shards):
    other = tmp_path / "other"
    shutil.copytree(FMNIST, other)
    images = FashionMnist(other, "train").images.copy()
    images[5, 10, 10] ^= 1  # one pixel of one image differs
    write_idx(other / "train-images-idx3-ubyte.gz", images)
    before = {p: p.stat().st_mtime_ns for p in fmnist_shards.rglob("*")}
    with pytest.raises(ValueError, match="another source"):
        prepare_fashion_mnist(other, fmnist_shards, PrepareOptions(shard_size=100))
    with pytest.raises(ValueError, match="another source"):
        prepare_fashion_mnist(FMNIST, fmnist_shards, PrepareOptions(shard_size=50))
    assert {p: p.stat().st_mtime_ns for p in fmnist_shards.rglob("*")} == before  # refused before writing

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="more than the train/ and val/"):
        prepare_fashion_mnist(FMNIST, busy, PrepareOptions(shard_size=100))
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    Image.new("RGB", (8, 8)).save(other / "photo.png")
    with pytest.raises(ValueError, match="ambiguous"):
        prepare_fashion_mnist(other, tmp_path / "out", PrepareOptions(shard_size=100))
    (other / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        prepare_fashion_mnist(other, tmp_path / "out", PrepareOptions(shard_size=100))


def test_prepare_cli_detects_the_fashion_mnist_idx_files(tmp_path, capsys, monkeypatch):
    import sys

    from sparse_mae.cli import main

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the dispatcher rewrites it for the app
    code = main(["prepare", f"src={FMNIST}", f"out={tmp_path / 'out'}", "shard_size=200", "workers=1",
                 "progress=false"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"{tmp_path / 'out' / 'train'}: 320 images in 2 shards, 10 classes" in printed
    assert f"{tmp_path / 'out' / 'val'}: 160 images in 1 shards, 10 classes" in printed
    assert "data.size=128" in printed


def test_pretrain_reads_fashion_mnist_train_shards(tmp_path, fmnist_shards):
    from sparse_mae.apps.pretrain import compose_config, run_pretrain

    result = run_pretrain(compose_config(shard_overrides(tmp_path / "run", fmnist_shards / "train", max_steps=3)))
    assert result.steps == 3 and all(np.isfinite(result.losses)) and result.checkpoint.exists()


# -- every split checked before the first step; each damaged sample counted once ----------------

@pytest.fixture(scope="module")
def labelled_shards(tmp_path_factory, labelled_src) -> Path:
    """root/train and root/val, each 24 labelled images in 3 shards of 8."""
    root = tmp_path_factory.mktemp("labelled_shards")
    for split in ("train", "val"):
        prepare(labelled_src, root / split, PrepareOptions(short_side=72, shard_size=8))
    return root


def damage_split(folder: Path, how: str) -> None:
    if how == "deleted":
        (folder / "shard-00001.data").unlink()
    elif how == "truncated":
        with open(folder / "shard-00001.data", "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
    else:  # a manifest with 0 samples
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["shards"] = []
        (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("how", ["deleted", "truncated", "empty"])
def test_a_damaged_val_split_exits_2_before_the_first_step(tmp_path, labelled_shards, capsys, monkeypatch, how):
    """It used to train the first epoch and stop at the evaluation (exit 1, or silently short)."""
    import sys

    from sparse_mae.cli import main

    root = tmp_path / "data"
    shutil.copytree(labelled_shards, root)
    damage_split(root / "val", how)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:  # a Hydra app ends through sys.exit
        main(["finetune", "finetune/data@data=shards", f"data.root={root}", "data.size=64", "data.num_workers=0",
              "model=debug", "device=cpu", "logger=none", "logger.progress=false", "batch_size=8", "max_steps=2",
              f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert f"{root / 'val'}" in err and ("prepare" in err or "shard-00001" in err), err
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))  # nothing trained, nothing to lose


def test_a_damaged_knn_root_exits_2_before_the_first_step(tmp_path, labelled_shards, capsys, monkeypatch):
    """The monitor's splits used to be read first at its first cadence (1000 steps by default)."""
    import sys

    from sparse_mae.cli import main
    from tests.test_pretrain import debug_overrides

    root = tmp_path / "knn"
    shutil.copytree(labelled_shards, root)
    damage_split(root / "val", "deleted")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", *debug_overrides(tmp_path / "run", max_steps=2), "knn.enabled=true", f"knn.root={root}",
              "knn.num_train=16", "knn.num_val=8"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "shard-00001.data cannot be read" in err and f"{root / 'val'}" in err, err
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))


@pytest.mark.slow  # two processes under torchrun
def test_under_two_processes_a_damaged_knn_root_stops_every_rank_with_exit_2(tmp_path, labelled_shards):
    """Rank 0 alone opens the kNN splits; its refusal used to leave rank 1 to die with a
    traceback when rank 0 went away. Now every rank prints the refusal and stops."""
    from tests.test_pretrain import debug_overrides
    from tests.test_pretrain_distributed import torchrun_standalone

    root = tmp_path / "knn"
    shutil.copytree(labelled_shards, root)
    damage_split(root / "val", "deleted")
    result = torchrun_standalone([*debug_overrides(tmp_path / "run", max_steps=2), "knn.enabled=true",
                                  f"knn.root={root}", "knn.num_train=16", "knn.num_val=8"], tmp_path, timeout=180)
    assert result.returncode != 0
    assert result.stderr.count("shard-00001.data cannot be read") >= 2, result.stderr[-3000:]  # each rank says why
    # torchrun's launcher reports the failed child with its own traceback; the ranks print none
    frames = [line for line in result.stderr.splitlines() if line.lstrip().startswith("File ")]
    assert not [f for f in frames if "sparse_mae/" in f], result.stderr[-3000:]
    assert "terminate called" not in result.stderr, result.stderr[-3000:]
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))


def test_each_damaged_sample_counts_once_and_its_stand_in_is_drawn_from_its_seed(tmp_path, labelled_shards):
    """A run of 8 damaged samples: counted 8 (not 8 + 7 + ... + 1 = 36 rows walked), and the
    good sample after the run is not served 9 times in a pass."""
    from collections import Counter

    from sparse_mae.apps.finetune import compose_config as ft_config
    from sparse_mae.data.build import labelled_split

    root = tmp_path / "data"
    shutil.copytree(labelled_shards, root)
    for sample in range(8):  # all of shard 1: global samples 8..15
        flip_sample_byte(root / "train", "shard-00001", sample)
    cfg = ft_config(["finetune/data@data=shards", f"data.root={root}", "data.size=64", "model=debug"])
    ds, _ = labelled_split(cfg.data, "train", augment=False)  # centre crops: an image names its sample
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = [ds[(i, 1000 + i)] for i in range(len(ds))]
        again = ds[(9, 1009)]
        other_seeds = [ds[(9, seed)]["image"] for seed in range(10)]
    assert sum(int(it["skipped"]) for it in items) == 8
    assert [int(it["skipped"]) for it in items] == [0] * 8 + [1] * 8 + [0] * 8
    good = [it["image"] for it in items[:8] + items[16:]]
    served = Counter(next(j for j, g in enumerate(good) if torch.equal(it["image"], g)) for it in items)
    assert max(served.values()) <= 3, served  # the next-index rule served one sample 9 times
    assert torch.equal(again["image"], items[9]["image"])  # the same seed, the same stand-in (exact resume)
    assert len({bytes(x.flatten().numpy()) for x in other_seeds}) >= 3  # other seeds, other stand-ins


def test_pretrain_counts_each_damaged_sample_once_over_epochs(tmp_path, pretrain_shards):
    from sparse_mae.apps.pretrain import compose_config, run_pretrain

    root = tmp_path / "shards"
    shutil.copytree(pretrain_shards, root)
    flip_sample_byte(root, "shard-00001", 4)
    flip_sample_byte(root, "shard-00001", 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_pretrain(compose_config(shard_overrides(tmp_path / "run", root, max_steps=8, epochs=2)))
    assert result.steps == 8 and result.skipped_files == 2  # two epochs met them twice: still 2 samples
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped_files"] == 2


def test_evaluation_reports_damaged_samples_not_rows_walked(tmp_path, labelled_shards):
    """`eval` reported 171 unreadable files for a 24-image split: the rows walked to a good one."""
    from torch.utils.data import DataLoader

    from sparse_mae import create_model
    from sparse_mae.apps.finetune import compose_config as ft_config
    from sparse_mae.data.build import labelled_split
    from sparse_mae.data.gpu_decode import collate
    from sparse_mae.train.evaluation import evaluate_classifier

    root = tmp_path / "data"
    shutil.copytree(labelled_shards, root)
    for sample in range(3):
        flip_sample_byte(root / "val", "shard-00000", sample)
    cfg = ft_config(["finetune/data@data=shards", f"data.root={root}", "data.size=32", "model=debug"])
    val, classes = labelled_split(cfg.data, "val")
    model = create_model("convnextv2_debug", num_classes=len(classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = evaluate_classifier(model, DataLoader(val, batch_size=8, collate_fn=collate), len(classes),
                                     torch.device("cpu"))
    assert (result["skipped"], result["count"]) == (3, 21)
