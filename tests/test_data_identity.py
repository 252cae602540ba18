"""A data set's identity is its content: resume compares identities, not data.root as a string.
The same data under another spelling or at another path continues (bit for bit, with a
note); other data under the same path is refused, naming both."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sparse_mae.bench.images import write_jpegs
from sparse_mae.data.identity import data_identity
from sparse_mae.data.prepare import PrepareOptions, prepare
from tests.test_data_imagefolder import write_image_tree
from tests.test_shards import shard_overrides
from tests.test_signals import assert_same_final_state


def shards_of(tmp_path: Path, name: str, images: int = 32, seed: int = 0) -> Path:
    src = tmp_path / f"{name}-src"
    write_jpegs(src, images, 96, 72, seed=seed)
    out = tmp_path / name
    prepare(src, out, PrepareOptions(short_side=72, shard_size=10))
    return out


def identity(name: str, root) -> dict | None:
    return data_identity(OmegaConf.create({"name": name, "root": str(root)}))


def run(overrides: list[str]):
    from sparse_mae.apps.pretrain import compose_config, run_pretrain

    return run_pretrain(compose_config([*overrides, "resume=auto"]))


# -- the identity itself ---------------------------------------------------------------------------

def test_identity_follows_content_not_path(tmp_path):
    shards = shards_of(tmp_path, "shards")
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(shards, copy)
    a, b = identity("shards", shards), identity("shards", copy)
    assert a["digest"] == b["digest"] and a["root"] != b["root"]
    assert identity("shards", tmp_path / "elsewhere" / "." / "copy")["digest"] == a["digest"]

    folder = tmp_path / "images"
    write_image_tree(folder, bad=False)
    before = identity("imagefolder", folder)
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    assert identity("imagefolder", moved)["digest"] == before["digest"]
    victim = next(p for p in sorted(moved.rglob("*")) if p.is_file())
    victim.write_bytes(victim.read_bytes() + b"more")  # the same name, other bytes of another size
    assert identity("imagefolder", moved)["digest"] != before["digest"]
    assert identity("builtin", None) is None and identity("imagefolder", tmp_path / "missing") is None


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
    assert f"data.root moved from {shards.resolve()} to {staged.resolve()}: the same data" in out
    assert_same_final_state(straight, moved_run)


def test_the_same_folder_spelled_otherwise_resumes(tmp_path, monkeypatch):
    shards = shards_of(tmp_path, "shards")
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    run(shard_overrides(run_dir, Path("shards"), max_steps=2))
    # before: './shards/' was refused as another data.root with no override
    result = run(shard_overrides(run_dir, "./shards/", max_steps=4))
    assert result.steps == 4


def test_other_data_under_the_same_path_is_refused_naming_both(tmp_path, monkeypatch):
    first = shards_of(tmp_path, "first")
    other = shards_of(tmp_path, "other", seed=8)  # other images, the same count
    root = tmp_path / "data"
    shutil.copytree(first, root)
    run_dir = tmp_path / "run"
    run(shard_overrides(run_dir, root, max_steps=2))
    shutil.rmtree(root)
    shutil.copytree(other, root)  # the same path now names another data set: it was accepted silently
    with pytest.raises(ValueError) as refused:
        run(shard_overrides(run_dir, root, max_steps=4))
    message = str(refused.value)
    assert "another data set under data.root" in message
    assert identity("shards", first)["digest"][:12] in message and identity("shards", other)["digest"][:12] in message
