"""Image-folder dataset and Pillow+torch transforms: formats, modes, sizes, bad files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sparse_mae.data.builtin import BuiltinSource
from sparse_mae.data.dataset import SeededDataset
from sparse_mae.data.imagefolder import count_unreadable, find_images, image_folder, labelled_image_folder
from sparse_mae.data.transforms import EvalTransform, TrainTransform, random_resized_crop_box
from sparse_mae.train.sampler import ResumableDistributedSampler

SIZE = 64


def _noise_image(w: int, h: int, mode: str, seed: int) -> Image.Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    if mode == "I;16":
        return Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)  # uint16 -> I;16
    return img.convert(mode)


def write_image_tree(root, bad: bool = True) -> dict:
    """Good images in nested folders (every extension, several modes and sizes) plus, with
    `bad`, a corrupt jpg, a truncated png, a zero-byte webp and a non-image file."""
    good = [
        ("a/rgb.jpg", 100, 80, "RGB"), ("a/b/gray.png", 70, 90, "L"), ("a/b/c/rgba.png", 64, 64, "RGBA"),
        ("palette.bmp", 120, 50, "P"), ("cmyk.jpeg", 90, 90, "CMYK"), ("x/deep16.png", 40, 30, "I;16"),
        ("tiny.webp", 5, 3, "RGB"), ("one.PNG", 1, 1, "RGB"),
    ]
    for i, (rel, w, h, mode) in enumerate(good):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _noise_image(w, h, mode, i).save(path)
    counts = {"good": len(good), "corrupt": 0, "empty": 0}
    if bad:
        (root / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
        png = (root / "a" / "rgb.jpg").read_bytes()
        (root / "x" / "truncated.jpg").write_bytes(png[: len(png) // 3])
        (root / "x" / "empty.webp").write_bytes(b"")
        (root / "notes.txt").write_text("not an image")
        counts.update(corrupt=2, empty=1)
    return counts


def test_finds_images_recursively_and_sets_aside_zero_byte_files(tmp_path):
    counts = write_image_tree(tmp_path)
    files, empty = find_images(tmp_path)
    assert len(files) == counts["good"] + counts["corrupt"]
    assert [p.name for p in empty] == ["empty.webp"]
    assert count_unreadable(files) == counts["corrupt"]


def test_every_mode_and_size_gives_an_rgb_crop(tmp_path):
    write_image_tree(tmp_path, bad=False)
    ds = SeededDataset(image_folder(tmp_path), TrainTransform(SIZE))
    for i in range(len(ds)):
        item = ds[(i, 123 + i)]
        assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
        assert torch.isfinite(item["image"]).all()
        assert item["skipped"] == 0


def test_bad_files_are_skipped_and_counted_in_workers(tmp_path):
    counts = write_image_tree(tmp_path)
    ds = SeededDataset(image_folder(tmp_path), TrainTransform(SIZE))
    assert len(ds.empty_files) == counts["empty"]
    sampler = ResumableDistributedSampler(ds, shuffle=False)
    loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2)
    batches = list(loader)  # warnings are raised inside the worker processes
    images = torch.cat([b["image"] for b in batches])
    assert images.shape == (len(ds), 3, SIZE, SIZE)
    # each corrupt file is met once per pass and replaced by the next good image
    assert int(sum(b["skipped"].sum() for b in batches)) == counts["corrupt"]


def test_unreadable_file_is_replaced_by_a_good_one_drawn_from_its_seed_with_a_warning(tmp_path):
    write_image_tree(tmp_path)
    ds = SeededDataset(image_folder(tmp_path), TrainTransform(SIZE))
    bad = next(i for i, p in enumerate(ds.source.files) if p.name == "corrupt.jpg")
    with pytest.warns(UserWarning, match="skipping unreadable image .*corrupt.jpg"):
        item = ds[(bad, 5)]
    assert item["skipped"] == 1 and item["index"] == bad
    # a good file with the item's own crop: the same one for the same seed (exact resume)
    assert any(torch.equal(item["image"], ds[(j, 5)]["image"]) for j in range(len(ds)) if j != bad)
    assert torch.equal(ds[(bad, 5)]["image"], item["image"])


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SeededDataset(image_folder(tmp_path / "missing"), TrainTransform(SIZE))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no readable images"):
        SeededDataset(image_folder(tmp_path), TrainTransform(SIZE))
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="1 zero-byte"):
        SeededDataset(image_folder(tmp_path), TrainTransform(SIZE))
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        SeededDataset(image_folder(tmp_path / "file.png"), TrainTransform(SIZE))


def _tiny_png(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _noise_image(4, 4, "RGB", sum(map(ord, path.name))).save(path)


def test_symlink_loop_to_a_parent_is_scanned_once(tmp_path):
    """sub/up -> .. would otherwise be followed again and again (root/sub/up/sub/up/...)."""
    _tiny_png(tmp_path / "top.png")
    _tiny_png(tmp_path / "sub" / "inner.png")
    (tmp_path / "sub" / "up").symlink_to("..", target_is_directory=True)
    files, empty = find_images(tmp_path)
    assert files == [tmp_path / "sub" / "inner.png", tmp_path / "top.png"] and empty == []


def test_two_folder_symlink_cycle_is_scanned_once(tmp_path):
    _tiny_png(tmp_path / "x" / "in_x.png")
    _tiny_png(tmp_path / "y" / "in_y.png")
    (tmp_path / "x" / "to_y").symlink_to(tmp_path / "y", target_is_directory=True)
    (tmp_path / "y" / "to_x").symlink_to(tmp_path / "x", target_is_directory=True)
    files, _ = find_images(tmp_path)
    assert sorted(p.name for p in files) == ["in_x.png", "in_y.png"]
    assert len({p.resolve() for p in files}) == len(files)


def test_symlinked_folder_outside_root_is_followed_and_scanned_once(tmp_path):
    """A legit link (data kept elsewhere) is still followed; two links to the same folder
    give its files once, under the first link in name order, so the scan is deterministic."""
    outside = tmp_path / "elsewhere"
    _tiny_png(outside / "a.png")
    _tiny_png(outside / "deeper" / "b.png")
    root = tmp_path / "root"
    _tiny_png(root / "own.png")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "linked_again").symlink_to(outside, target_is_directory=True)
    files, _ = find_images(root)
    assert files == [root / "linked" / "a.png", root / "linked" / "deeper" / "b.png", root / "own.png"]


def test_labelled_image_folder_with_a_symlink_loop_lists_each_image_once(tmp_path):
    """eval / finetune's class folders go through the same scan."""
    for cls in ("cat", "dog"):
        _tiny_png(tmp_path / cls / f"{cls}.png")
    (tmp_path / "cat" / "again").symlink_to(".", target_is_directory=True)
    ds = labelled_image_folder(tmp_path)
    assert ds.classes == ["cat", "dog"]
    assert sorted((p.name, label) for p, label in ds.samples) == [("cat.png", 0), ("dog.png", 1)]


@pytest.mark.parametrize("wh", [(1, 1), (5, 3), (3, 200), (63, 64)])
def test_images_smaller_than_the_crop(wh):
    img = _noise_image(*wh, "RGB", 0)
    for seed in range(5):
        assert TrainTransform(SIZE)(img, seed).shape == (3, SIZE, SIZE)
    assert EvalTransform(SIZE)(img).shape == (3, SIZE, SIZE)


def test_random_resized_crop_box_respects_scale_ratio_and_bounds():
    g = torch.Generator().manual_seed(0)
    w, h = 640, 480
    for _ in range(500):
        left, top, right, bottom = random_resized_crop_box(w, h, (0.2, 1.0), (3 / 4, 4 / 3), g)
        bw, bh = right - left, bottom - top
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        if (bw, bh) != (w, h):  # not the fallback
            assert 0.2 * 0.95 <= bw * bh / (w * h) <= 1.0
            assert 3 / 4 * 0.95 <= bw / bh <= 4 / 3 * 1.05


def test_augmentation_is_a_function_of_the_seed():
    img = _noise_image(90, 70, "RGB", 1)
    t = TrainTransform(SIZE)
    assert torch.equal(t(img, 7), t(img, 7))
    assert not torch.equal(t(img, 7), t(img, 8))
    # flips happen about half the time
    flips = sum(torch.equal(TrainTransform(SIZE, scale=(1, 1), ratio=(90 / 70, 90 / 70))(img, s),
                            TrainTransform(SIZE, scale=(1, 1), ratio=(90 / 70, 90 / 70), hflip=0)(img, s))
                for s in range(40))
    assert 8 < flips < 32


def test_imagenet_normalisation():
    grey = Image.new("RGB", (32, 32), (124, 116, 104))  # ~ the ImageNet mean
    x = EvalTransform(32)(grey)
    assert x.abs().max() < 0.02


def test_builtin_dataset_matches_the_contract():
    ds = SeededDataset(BuiltinSource(10, 48), TrainTransform(32))
    item = ds[(3, 99)]
    assert item["image"].shape == (3, 32, 32) and item["label"] == 3 and item["seed"] == 99
    assert torch.equal(ds[(3, 99)]["image"], item["image"])
    with pytest.raises(ValueError, match="num_images"):
        BuiltinSource(0, 48)


def test_sampler_shards_and_resumes():
    data = list(range(21))
    full = list(ResumableDistributedSampler(data, seed=3))
    assert len(full) == 21 and sorted(i for i, _ in full) == data
    # two ranks cover the global order position by position (the last odd sample dropped)
    r0, r1 = (list(ResumableDistributedSampler(data, num_replicas=2, rank=r, seed=3)) for r in (0, 1))
    interleaved = [x for pair in zip(r0, r1) for x in pair]
    assert interleaved == full[:20]
    # resuming mid-epoch yields the rest of the same epoch, seeds included
    s = ResumableDistributedSampler(data, seed=3)
    s.set_epoch(0, start=8)
    assert list(s) == full[8:] and len(s) == 13
    s.set_epoch(1)
    assert list(s) != full
