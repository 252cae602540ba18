"""data.decode=gpu (sparse_mae/data/gpu_decode.py): the switch's error where it cannot run, the
crop draw shared with the CPU path, the device-side crop/resize/flip checked on CPU tensors
(Pillow standing in for nvjpeg) against FastTrainTransform, the byte items through a real
DataLoader, and on a CUDA machine nvjpeg itself, a few pretrain steps and a damaged sample."""
from __future__ import annotations

import io
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sparse_mae.bench.images import photo, write_jpegs
from sparse_mae.data import gpu_decode
from sparse_mae.data.decode import FastEvalTransform, FastTrainTransform, train_crop
from sparse_mae.data.gpu_decode import JpegCrop, collate, crop_resize, decode_batch, pil_decode
from sparse_mae.data.prepare import PrepareOptions, prepare
from sparse_mae.data.dataset import SeededDataset
from sparse_mae.data.shards import ShardSource
from sparse_mae.data.transforms import model_input, random_resized_crop_box

# Mean absolute difference, in grey levels (0-255), allowed between the GPU path's pixels and
# the CPU path's for the same sample and crop. The two resample differently: the CPU path
# decodes at 1/2-1/8 size with libjpeg's DCT scaling and resizes a fractional box with Pillow;
# the GPU path decodes at full size and resizes the whole-pixel box with torch's antialiased
# bicubic. Measured on these photos (120x90 to 1600x1200, 64px crops): 0-1.2 levels; the same crop
# flipped the wrong way is 8-15 levels off.
GREY_LEVELS = 2.0


def jpeg_bytes(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("photos")
    write_jpegs(src, 12, 160, 120)
    out = tmp_path_factory.mktemp("shards") / "train"
    prepare(src, out, PrepareOptions(short_side=120, shard_size=5))
    return out


def gpu_dataset(root: Path, size: int = 64, **kw) -> SeededDataset:
    cpu = FastTrainTransform(size)
    return SeededDataset(ShardSource(root, **kw), JpegCrop(cpu), cpu_transform=cpu)


def grey_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean())


# -- the switch -------------------------------------------------------------------------------

def test_decode_switch_is_declared_cpu_by_default():
    from sparse_mae.apps.finetune import compose_config as finetune_config
    from sparse_mae.apps.pretrain import compose_config

    assert compose_config(["data=shards", "data.root=x"]).data.decode == "cpu"
    assert finetune_config(["finetune/data@data=shards", "data.root=x"]).data.decode == "cpu"


@pytest.mark.parametrize("app, data", [("pretrain", "data=shards"), ("finetune", "finetune/data@data=shards")])
def test_decode_gpu_without_cuda_exits_2_naming_the_fix(tmp_path, shard_root, capsys, monkeypatch, app, data):
    from sparse_mae.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a CUDA machine
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.chdir(tmp_path)
    root = shard_root if app == "pretrain" else shard_root.parent  # finetune reads root/train and root/val
    with pytest.raises(SystemExit) as exit_:  # a Hydra app ends through sys.exit
        main([app, data, f"data.root={root}", "data.decode=gpu", "model=debug", "data.size=64", "device=cpu",
              "logger=none", "max_steps=1", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "data.decode=gpu" in err and "data.decode=cpu" in err and "CUDA machine with torchvision" in err
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))


def test_decode_gpu_without_torchvision_on_a_cuda_machine_names_the_fix(monkeypatch):
    from sparse_mae.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    with pytest.raises(ConfigError, match="needs torchvision.*make setup.*data.decode=cpu"):
        gpu_decode.require_gpu_decode()


def test_decode_batch_refuses_a_cpu_device_without_an_injected_decoder(shard_root):
    ds = gpu_dataset(shard_root)
    batch = collate([ds[(i, i)] for i in range(2)])
    with pytest.raises(ValueError, match="device=cuda.*data.decode=cpu"):
        decode_batch(batch, torch.device("cpu"), ds)


# -- the crop draw, shared ----------------------------------------------------------------------

def test_both_paths_draw_the_same_boxes_and_flips_from_the_same_seeds():
    img, _ = photo(1, 640, 480)
    data = jpeg_bytes(img)
    cpu = FastTrainTransform(64, scale=(0.2, 1.0), hflip=0.5)
    gpu = JpegCrop(cpu)
    flips = 0
    for seed in range(40):
        item = gpu(data, seed)
        box, flip = train_crop(640, 480, seed, (0.2, 1.0), (3 / 4, 4 / 3), 0.5)
        # the draw as TrainTransform (the PIL path of data=imagefolder) makes it
        g = torch.Generator().manual_seed(seed)
        assert random_resized_crop_box(640, 480, (0.2, 1.0), (3 / 4, 4 / 3), g) == box
        assert (float(torch.rand(1, generator=g)) < 0.5) == flip
        assert item["box"].tolist() == list(box) and item["flip"] == flip
        flips += flip
    assert 8 < flips < 32  # both ways happen
    # eval: the centre crop's region of the full-size image (85x64 after the resize, left (85 - 64) // 2 = 10,
    # each resized pixel 640 / 85 source pixels wide: EvalTransform's box, the one centre crop of every path)
    eval_item = JpegCrop(FastEvalTransform(64))(data, 3)
    assert eval_item["box"].tolist() == pytest.approx([10 * 640 / 85, 0.0, 74 * 640 / 85, 480.0])
    assert eval_item["flip"] is False


# -- the device-side augmentation, on CPU tensors -------------------------------------------------

@pytest.mark.parametrize("width, height", [(800, 600), (500, 375), (120, 90)])
def test_device_crop_resize_flip_matches_fast_train_transform(width, height):
    img, _ = photo(7, width, height)
    data = jpeg_bytes(img)
    cpu = FastTrainTransform(64)
    items = [JpegCrop(cpu)(data, seed) | {"index": 0, "seed": seed, "skipped": 0} for seed in range(16)]
    batch = decode_batch(collate(items), torch.device("cpu"), None, decode=pil_decode)
    want = torch.stack([cpu(data, seed) for seed in range(16)])
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == want.shape == (16, 3, 64, 64)
    diffs = [grey_diff(a, b) for a, b in zip(batch["image"], want)]
    assert max(diffs) < GREY_LEVELS, diffs
    # a flipped crop compared unflipped is far off: the tolerance sees a wrong flip
    assert grey_diff(batch["image"][0].flip(-1), want[0]) > 2 * GREY_LEVELS
    normalised = model_input(batch["image"])
    assert normalised.dtype == torch.float32 and float((normalised - model_input(want)).abs().mean()) < 0.04


def test_device_centre_crop_matches_fast_eval_transform():
    img, _ = photo(5, 640, 400)
    data = jpeg_bytes(img)
    cpu = FastEvalTransform(64)
    item = JpegCrop(cpu)(data, 0) | {"index": 0, "seed": 0, "skipped": 0}
    batch = decode_batch(collate([item]), torch.device("cpu"), None, decode=pil_decode)
    assert grey_diff(batch["image"][0], cpu(data)) < GREY_LEVELS


def test_crop_resize_of_the_whole_image_at_its_own_size_is_the_image():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert torch.equal(crop_resize(image, (0, 0, 32, 32), False, 32), image)
    assert torch.equal(crop_resize(image, (0, 0, 32, 32), True, 32), image.flip(-1))


# -- byte items through a DataLoader --------------------------------------------------------------

def test_byte_items_through_a_dataloader_with_two_workers_match_the_cpu_path(shard_root):
    gpu_ds, cpu_ds = gpu_dataset(shard_root), SeededDataset(ShardSource(shard_root), FastTrainTransform(64))
    items = [(i, 100 + i) for i in range(len(cpu_ds))]
    loader = DataLoader(gpu_ds, batch_size=4, sampler=items, num_workers=2, collate_fn=collate)
    seen = 0
    for start, batch in zip(range(0, len(items), 4), loader):
        assert isinstance(batch["jpeg"], list) and all(t.dtype == torch.uint8 for t in batch["jpeg"])
        assert batch["box"].shape == (len(batch["jpeg"]), 4)
        batch = decode_batch(batch, torch.device("cpu"), gpu_ds, decode=pil_decode)
        want = collate([cpu_ds[it] for it in items[start:start + 4]])
        assert set(batch) == set(want) | {"index"}  # the same keys, and the sample each image is
        assert torch.equal(batch["seed"], want["seed"]) and torch.equal(batch["skipped"], want["skipped"])
        assert batch["image"].dtype == want["image"].dtype and batch["image"].shape == want["image"].shape
        assert max(grey_diff(a, b) for a, b in zip(batch["image"], want["image"])) < GREY_LEVELS
        seen += len(batch["seed"])
    assert seen == len(items)


def test_a_sample_the_gpu_refuses_goes_through_the_cpu_path_and_an_undecodable_one_is_skipped(tmp_path):
    src = tmp_path / "src"
    write_jpegs(src, 6, 96, 72, labelled=True)
    root = tmp_path / "shards"
    prepare(src, root, PrepareOptions(shard_size=10))
    ds = SeededDataset(ShardSource(root, labelled=True), JpegCrop(FastTrainTransform(48)),
                       cpu_transform=FastTrainTransform(48))
    cpu_ds = SeededDataset(ShardSource(root, labelled=True), FastTrainTransform(48))

    def refuses_sample_1(jpegs, device):
        images = pil_decode(jpegs, device)
        images[1] = None
        return images

    batch = decode_batch(collate([ds[(i, i)] for i in range(3)]), torch.device("cpu"), ds, decode=refuses_sample_1)
    assert torch.equal(batch["image"][1], cpu_ds[(1, 1)]["image"])  # the CPU path's own pixels
    assert batch["skipped"].tolist() == [0, 0, 0] and batch["label"][1] == cpu_ds[(1, 1)]["label"]

    # bytes that pass the checksum but no decoder reads: skipped and counted as data.decode=cpu does
    unreadable = ds.source.reader.read(1)[1]

    def pillow_fails_on_sample_1(data, seed, real=FastTrainTransform(48)):
        if data == unreadable:
            raise OSError("broken data stream when reading image file")
        return real(data, seed)

    ds.cpu_transform = cpu_ds.transform = pillow_fails_on_sample_1
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        batch = decode_batch(collate([ds[(i, i)] for i in range(3)]), torch.device("cpu"), ds,
                             decode=refuses_sample_1)
        want = cpu_ds[(1, 1)]
    assert want["skipped"] == 1 and batch["skipped"].tolist() == [0, 1, 0]
    assert torch.equal(batch["image"][1], want["image"]) and batch["label"][1] == want["label"]


# -- on a CUDA machine --------------------------------------------------------------------------------

@pytest.mark.gpu
def test_nvjpeg_decode_and_augment_of_a_shard_folder_equals_the_cpu_path(shard_root):
    device = torch.device("cuda")
    gpu_decode.require_gpu_decode()
    for make in (lambda: FastTrainTransform(64), lambda: FastEvalTransform(64)):
        gpu_ds = SeededDataset(ShardSource(shard_root), JpegCrop(make()), cpu_transform=make())
        cpu_ds = SeededDataset(ShardSource(shard_root), make())
        items = [(i, 7 + i) for i in range(len(cpu_ds))]
        loader = DataLoader(gpu_ds, batch_size=6, sampler=items, num_workers=2, collate_fn=collate)
        for start, batch in zip(range(0, len(items), 6), loader):
            batch = decode_batch(batch, device, gpu_ds)
            assert batch["image"].device.type == "cuda" and batch["image"].dtype == torch.uint8
            want = torch.stack([cpu_ds[it]["image"] for it in items[start:start + 6]])
            diffs = [grey_diff(a.cpu(), b) for a, b in zip(batch["image"], want)]
            assert max(diffs) < GREY_LEVELS, diffs


@pytest.mark.gpu
def test_pretrain_steps_with_gpu_decode_have_finite_loss(tmp_path, shard_root):
    from sparse_mae.apps.pretrain import compose_config, run_pretrain
    from tests.test_shards import shard_overrides

    cfg = compose_config(shard_overrides(tmp_path / "run", shard_root, max_steps=3, batch_size=4,
                                         **{"device": "cuda", "data.decode": "gpu", "data.num_workers": 2}))
    result = run_pretrain(cfg)
    assert result.steps == 3 and all(math.isfinite(x) for x in result.losses)


@pytest.mark.gpu
def test_pretrain_with_gpu_decode_skips_and_counts_a_damaged_sample(tmp_path, shard_root):
    import shutil

    from sparse_mae.apps.pretrain import compose_config, run_pretrain
    from tests.test_shards import flip_sample_byte, shard_overrides

    root = tmp_path / "shards"
    shutil.copytree(shard_root, root)
    flip_sample_byte(root, "shard-00001", 2)
    with pytest.warns(UserWarning, match="shard-00001 sample 2"):
        result = run_pretrain(compose_config(shard_overrides(
            tmp_path / "run", root, max_steps=3, epochs=1, batch_size=4,
            **{"device": "cuda", "data.decode": "gpu", "data.num_workers": 0})))
    assert result.steps == 3 and result.skipped_files == 1  # one epoch reads every sample once
