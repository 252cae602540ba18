"""A data set's identity is its content: resume compares identities, not data.root as a string.
The same data under another spelling or at another path continues (bit for bit, with a
note); other data under the same path is refused (exit 2), naming both."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sparse_mae.bench.images import write_jpegs
from sparse_mae.data.identity import data_identity
from sparse_mae.data.prepare import PrepareOptions, prepare
from tests.test_pretrain import debug_overrides
from tests.test_run_faults import cli
from tests.test_shards import shard_overrides
from tests.test_signals import assert_same_final_state

FASHION_MNIST = Path(__file__).parent / "data" / "fashion_mnist"


def shards_of(tmp_path: Path, name: str, images: int = 32, seed: int = 0) -> Path:
    src = tmp_path / f"{name}-src"
    write_jpegs(src, images, 96, 72, seed=seed)
    out = tmp_path / name
    prepare(src, out, PrepareOptions(short_side=72, shard_size=10))
    return out


def identity(name: str, root) -> dict | None:
    return data_identity(OmegaConf.create({"name": name, "root": None if root is None else str(root)}))


def run(overrides: list[str]):
    from sparse_mae.apps.pretrain import compose_config, run_pretrain

    return run_pretrain(compose_config([*overrides, "resume=auto"]))


def folder_overrides(out: Path, root, **extra) -> list[str]:
    return [*debug_overrides(out, data="imagefolder", **extra), f"data.root={root}"]


# -- the identity itself ---------------------------------------------------------------------------

def test_shard_identity_follows_the_manifests_not_the_path(tmp_path):
    shards = shards_of(tmp_path, "shards")
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(shards, copy)
    a, b = identity("shards", shards), identity("shards", copy)
    assert a["digest"] == b["digest"] and a["root"] != b["root"]
    assert identity("shards", tmp_path / "elsewhere" / "." / "copy")["digest"] == a["digest"]
    assert identity("shards", shards_of(tmp_path, "other", seed=8))["digest"] != a["digest"]  # same count
    layout = tmp_path / "layout"  # the fine-tuning layout: train/ and val/ together
    shutil.copytree(shards, layout / "train")
    shutil.copytree(copy, layout / "val")
    assert identity("shards", layout)["digest"] not in (None, a["digest"])


def test_image_folder_identity_is_its_images_paths_and_sizes(tmp_path):
    folder = tmp_path / "images"
    write_jpegs(folder / "cats", 3, 40, 30)
    before = identity("imagefolder", folder)
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    assert identity("imagefolder", moved)["digest"] == before["digest"]
    (moved / "notes.txt").write_text("not an image: the data set never reads it")
    (moved / "cats" / "empty.jpg").write_bytes(b"")  # set aside, never read
    assert identity("imagefolder", moved)["digest"] == before["digest"]
    victim = moved / "cats" / "img_000000.jpg"
    victim.write_bytes(victim.read_bytes() + b"more")  # the same name, another size
    assert identity("imagefolder", moved)["digest"] != before["digest"]
    (moved / "cats" / "img_000000.jpg").rename(moved / "cats" / "img_000009.jpg")
    assert identity("imagefolder", moved)["digest"] != before["digest"]


def test_no_identity_for_built_in_images_or_a_missing_root(tmp_path):
    assert identity("builtin", None) is None
    assert identity("imagefolder", tmp_path / "missing") is None
    assert identity("shards", tmp_path) is None  # no manifest: the data set's own error names it


def test_fashion_mnist_identity_is_its_idx_files(tmp_path):
    a = identity("fashion_mnist", FASHION_MNIST)
    copy = tmp_path / "copy"
    shutil.copytree(FASHION_MNIST, copy)
    assert identity("fashion_mnist", copy)["digest"] == a["digest"]
    (copy / "t10k-labels-idx1-ubyte.gz").unlink()  # a pretraining copy: the train split alone
    assert identity("fashion_mnist", copy)["digest"] != a["digest"]


# -- resume ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_after_moving_the_shard_folder_continues_bit_for_bit(tmp_path, capsys):
    shards = shards_of(tmp_path, "shards")
    args = {"epochs": 3, "checkpoint.keep_last": 0, "checkpoint.every_steps": 100}
    straight, moved_run = tmp_path / "straight", tmp_path / "moved-run"
    run(shard_overrides(straight, shards, **args))
    run(shard_overrides(moved_run, shards, max_steps=5, **args))
    staged = tmp_path / "node-local" / "train"
    shutil.move(str(shards), str(staged))  # as a job staging its data set on a node's own disk
    capsys.readouterr()
    result = run(shard_overrides(moved_run, staged, **args))
    assert result.steps == 12
    out = capsys.readouterr().out
    assert f"note: the data moved from {shards.resolve()} to {staged.resolve()}: the same data" in out
    assert_same_final_state(straight, moved_run)


def test_the_same_folder_spelled_otherwise_resumes_with_a_note(tmp_path, monkeypatch, capsys):
    """Before: './shards/' or the absolute path was refused as another data.root, with no override."""
    shards = shards_of(tmp_path, "shards")
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    run(shard_overrides(run_dir, Path("shards"), max_steps=2))
    capsys.readouterr()
    assert run(shard_overrides(run_dir, "./shards/", max_steps=3)).steps == 3
    assert run(shard_overrides(run_dir, shards.resolve(), max_steps=4)).steps == 4
    out = capsys.readouterr().out
    assert f"note: data.root=./shards/ is the folder the run read as data.root=shards ({shards.resolve()})" in out
    assert f"note: data.root={shards.resolve()} is the folder the run read as data.root=./shards/" in out


def test_the_same_relative_path_from_another_directory_naming_other_images_is_refused(tmp_path, monkeypatch):
    """Before: data.root=d from another working directory, naming a folder of other images
    (twice as many), was accepted silently and the epoch counter jumped."""
    write_jpegs(tmp_path / "a" / "d", 8, 40, 30)
    write_jpegs(tmp_path / "b" / "d", 16, 40, 30, seed=3)
    run_dir = tmp_path / "run"
    monkeypatch.chdir(tmp_path / "a")
    run(folder_overrides(run_dir, "d", max_steps=1))
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(ValueError) as refused:
        run(folder_overrides(run_dir, "d", max_steps=2))
    message = str(refused.value)
    ran, found = identity("imagefolder", tmp_path / "a" / "d"), identity("imagefolder", tmp_path / "b" / "d")
    assert (f"data.root=d holds other data: the run read {ran['root']} (image files and sizes "
            f"{ran['digest'][:12]}), this start finds {found['root']} (image files and sizes "
            f"{found['digest'][:12]})") in message
    assert "init=" in message  # the way to go on: a new run from the weights


def test_other_data_under_the_same_path_is_refused_naming_both(tmp_path):
    """Before: a shard folder prepared again from other images (the same count) under the
    same data.root was trained on silently."""
    first = shards_of(tmp_path, "first")
    other = shards_of(tmp_path, "other", seed=8)
    root = tmp_path / "data"
    shutil.copytree(first, root)
    run_dir = tmp_path / "run"
    run(shard_overrides(run_dir, root, max_steps=2))
    shutil.rmtree(root)
    shutil.copytree(other, root)
    done = cli(tmp_path, "pretrain", *shard_overrides(run_dir, root, max_steps=4), "resume=auto")
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"data.root={root} holds other data" in done.stderr
    assert identity("shards", first)["digest"][:12] in done.stderr
    assert identity("shards", other)["digest"][:12] in done.stderr
    assert "point data.root at the data the run read" in done.stderr and "init=" in done.stderr


@pytest.mark.slow
def test_under_two_processes_the_refusal_stops_every_rank_with_its_message(tmp_path):
    """Rank 0 alone computes and compares the identity (inside run_on_main), so its refusal
    must reach rank 1, which waits in the broadcast: both end with the message, none hangs
    in a collective or aborts."""
    from tests.test_pretrain_distributed import torchrun_standalone

    first, other = shards_of(tmp_path, "first"), shards_of(tmp_path, "other", seed=8)
    root, run_dir = tmp_path / "data", tmp_path / "run"
    shutil.copytree(first, root)
    started = torchrun_standalone(shard_overrides(run_dir, root, max_steps=2, batch_size=4), tmp_path)
    assert started.returncode == 0, started.stderr[-3000:]
    shutil.rmtree(root)
    shutil.copytree(other, root)
    refused = torchrun_standalone([*shard_overrides(run_dir, root, batch_size=4), "resume=auto"], tmp_path,
                                  timeout=180)
    assert refused.returncode != 0
    assert refused.stderr.count(f"data.root={root} holds other data") == 2, refused.stderr[-3000:]  # each rank
    assert "terminate called" not in refused.stderr and "Timeout" not in refused.stderr
    assert [c.name for c in sorted((run_dir / "checkpoints").glob("*.pt"))] == ["step-00000002.pt"]
