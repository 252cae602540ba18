"""File names as they are on disk (issue 23, item 7): a non-UTF-8 name or one holding a newline
is stored and named unambiguously (sparse_mae/data/filenames.py), and a symlink back into the
source or above it is not followed, by prepare's walk or the image-folder reader: one image,
one label."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from sparse_mae.bench.images import write_jpegs
from sparse_mae.data.imagefolder import find_images, image_folder, labelled_image_folder
from sparse_mae.data.prepare import PrepareOptions, prepare
from sparse_mae.data.shards import ShardReader

OPTIONS = PrepareOptions(short_side=48, shard_size=8)


@pytest.fixture(scope="module")
def source_a(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("a")
    write_jpegs(src, 24, 64, 48, labelled=True)
    return src


def test_printable_names_are_one_line_and_one_to_one():
    from sparse_mae.data.filenames import printable_name

    names = [b"a\xff\nb.jpg", b"a\\xffb.jpg", b"a\\\xff", "caf\u00e9.jpg".encode(), b"\xc2\x85", b"\x85", b"t\tab"]
    shown = [printable_name(os.fsdecode(n)) for n in names]
    assert shown == ["a\\xff\\nb.jpg", "a\\\\xffb.jpg", "a\\\\\\xff", "caf\u00e9.jpg", "\\u0085", "\\x85", "t\\tab"]
    assert len(set(shown)) == len(names) and not any("\n" in s or "\t" in s for s in shown)
    assert all(s.encode("utf-8") for s in shown)  # always encodable


def test_non_utf8_and_newline_names_are_stored_and_named_unambiguously(tmp_path):
    src = tmp_path / "src"
    write_jpegs(src, 4, 48, 36)
    files = sorted(src.iterdir())
    odd = os.fsdecode(bytes(src) + b"/b\xff-latin1.jpg")
    newline = src / "c\nnewline.jpg"
    os.rename(files[1], odd)
    os.rename(files[2], newline)
    (src / "d\xe9-garbage.jpg").write_bytes(b"not an image")
    os.rename(src / "d\xe9-garbage.jpg", os.fsdecode(bytes(src) + b"/d\xe9-garbage.jpg"))  # latin-1 e-acute
    manifest = prepare(src, tmp_path / "out", PrepareOptions(shard_size=8))
    assert manifest["samples"] == 4
    assert manifest["unreadable"] == [f"{src}/d\\xe9-garbage.jpg\tUnidentifiedImageError: cannot identify the "
                                      f"image format"]
    reader = ShardReader(tmp_path / "out")
    assert [reader.name(i) for i in range(4)] == [  # in path order; after the newline each still its own name
        f"shard-00000 sample 0 ({src}/b\\xff-latin1.jpg)", f"shard-00000 sample 1 ({src}/c\\nnewline.jpg)",
        f"shard-00000 sample 2 ({files[0]})", f"shard-00000 sample 3 ({files[3]})"]


def test_a_prepare_with_a_non_utf8_name_runs_from_the_cli(tmp_path, capsys, monkeypatch):
    import sys

    from sparse_mae.cli import main

    src = tmp_path / "src"
    write_jpegs(src, 3, 48, 36)
    os.rename(sorted(src.iterdir())[0], os.fsdecode(bytes(src) + b"/\xff.jpg"))
    (src / "bad.jpg").write_bytes(b"garbage")
    os.rename(src / "bad.jpg", os.fsdecode(bytes(src) + b"/\xfe\n.jpg"))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    code = main(["prepare", f"src={src}", f"out={tmp_path / 'out'}", "progress=false", "workers=1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "3 images in 1 shards" in captured.out and "1 unreadable" in captured.out
    fingerprint = json.loads((tmp_path / "out" / "manifest.json").read_text())["fingerprint"]
    assert f"; fingerprint {fingerprint[:16]}" in captured.out  # the data set's identity, shown
    assert "\\xfe\\n.jpg" in (tmp_path / "out" / "unreadable.txt").read_text()


def test_symlinks_back_into_the_source_or_above_it_are_not_followed(tmp_path, source_a):
    src = tmp_path / "src"
    shutil.copytree(source_a, src)
    classes = sorted(p.name for p in src.iterdir())
    first, second = src / classes[0], src / classes[1]
    (first / "up").symlink_to("..")  # the source itself, seen from inside a class
    (first / "above").symlink_to("../..")  # the folder holding the source
    (first / "sibling").symlink_to(f"../{classes[1]}")  # another class's images under this label
    (second / "copy.jpg").symlink_to(f"../{classes[0]}/{sorted(first.glob('*.jpg'))[0].name}")
    (src / "alias").symlink_to(classes[0])  # a class folder that is another's
    outside = tmp_path / "more"
    write_jpegs(outside, 2, 64, 48, seed=5)
    (second / "more").symlink_to(outside)  # outside the source: followed, under this class
    plain = {p.relative_to(source_a): classes.index(p.relative_to(source_a).parts[0]) for p in source_a.rglob("*.jpg")}

    manifest = prepare(src, tmp_path / "out", OPTIONS)
    assert manifest["classes"] == classes  # no class "alias"
    assert manifest["samples"] == 24 + 2

    ds = labelled_image_folder(src, classes=classes)
    got = {Path(p).relative_to(src): label for p, label in ds.samples}
    expected = {**plain, **{Path(classes[1]) / "more" / p.name: 1 for p in outside.iterdir()}}
    assert got == expected

    assert find_images(first, tree=src)[0] == sorted(first.glob("*.jpg"))  # one class: its own images
    assert len(image_folder(src)) == 24 + 2  # the image-folder reader (pretraining)
