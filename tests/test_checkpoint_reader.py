"""One guarded reader for every checkpoint a command reads (resume, init=, pretrained=,
eval, import, export): a FIFO, a directory, an empty file or /dev/zero is named for what it
is (exit 2), never read (a FIFO hung eval for ever); a zip whose records declare far more
bytes than the file holds (a DEFLATE bomb) is refused before anything is inflated."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sparse_mae.convert import read_state_dict
from sparse_mae.train.checkpoint import CorruptCheckpointError, guard_checkpoint_file, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def odd_paths(tmp_path):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    empty = tmp_path / "empty.pt"
    empty.touch()
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    return {"FIFO": fifo, "empty file": empty, "directory": folder, "character device": Path("/dev/zero")}


@pytest.mark.parametrize("reader", [guard_checkpoint_file, load_checkpoint, read_state_dict])
def test_every_reader_names_what_an_odd_path_is(odd_paths, reader):
    for kind, path in odd_paths.items():
        with pytest.raises(CorruptCheckpointError, match=kind):
            reader(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reader(odd_paths["FIFO"].parent / "missing.pt")


def zip_bomb(path: Path, inflated: int) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("archive/data/0", "w") as f:  # streamed: the test itself never holds it
            chunk = bytes(1 << 20)
            for _ in range(inflated >> 20):
                f.write(chunk)
    return path


def test_zip_records_declaring_more_than_the_file_holds_are_refused_before_inflating(tmp_path):
    bomb = zip_bomb(tmp_path / "bomb.pt", 256 << 20)
    assert bomb.stat().st_size < 1 << 20
    for reader in (guard_checkpoint_file, load_checkpoint, read_state_dict):
        with pytest.raises(CorruptCheckpointError, match="declares 268435456 bytes"):
            reader(bomb)


def test_a_real_checkpoint_passes_the_guard(tmp_path):
    import torch

    path = tmp_path / "w.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    assert guard_checkpoint_file(path) == path


@pytest.mark.parametrize("app,args", [("eval", ["finetune/data@data=builtin"]), ("import", ["format=timm",
                                                                                          "out=x.pt"]),
                                      ("export", ["out=x.safetensors"])])
def test_commands_exit_2_on_a_fifo_instead_of_hanging(tmp_path, app, args):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    done = subprocess.run([sys.executable, "-m", "sparse_mae.cli", app, f"ckpt={fifo}", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "is a FIFO (named pipe), not a regular file" in done.stderr
