"""Shard format choice (docs/data.md): our indexed shards vs webdataset's indexed tar (`wids`).

    PYTHONPATH=<dir with wids installed> python benchmarks/shard_formats.py SHARD_FOLDER

Takes a folder written by `sparse-mae prepare`, writes the same samples as one webdataset tar
(key.jpg + key.cls), then times, for both: opening (index load), random access by sample index
(raw bytes, every sample once in a shuffled order, best of 3), and what each does with a
sample one of whose bytes was flipped (does a wrong image reach the caller?).
"""
from __future__ import annotations

import argparse
import io
import random
import shutil
import tarfile
import tempfile
from pathlib import Path

from PIL import Image

from sparse_mae.bench.timing import time_calls
from sparse_mae.data.shards import ShardReader


def best_of_3(fn) -> float:
    """Seconds of the fastest of 3 calls of fn() (docs/data.md reports the best)."""
    return min(time_calls(lambda _: fn(), warmup=0, repeats=3))


def flip_inside(path: Path, offset: int, length: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset + length // 2)
        b = f.read(1)
        f.seek(offset + length // 2)
        f.write(bytes([b[0] ^ 0x10]))


def decodes(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).load()
        return True
    except Exception:  # noqa: BLE001
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a shard folder written by `sparse-mae prepare`")
    args = parser.parse_args(argv)
    from wids.wids import IndexedTarSamples  # webdataset's reader: only this study needs it

    src = Path(args.folder)
    work = Path(tempfile.mkdtemp())
    ours_dir = work / "ours"
    shutil.copytree(src, ours_dir)
    reader = ShardReader(ours_dir)
    n = len(reader)
    samples = [reader.read(i) for i in range(n)]
    tar_path = work / "wds.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, (label, data) in enumerate(samples):
            for ext, payload in (("jpg", data), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{i:08d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    order = list(range(n))
    random.Random(0).shuffle(order)

    t_open_ours = best_of_3(lambda: ShardReader(ours_dir))
    t_open_wids = best_of_3(lambda: IndexedTarSamples(path=str(tar_path)).close())
    wds = IndexedTarSamples(path=str(tar_path))
    ours = ShardReader(ours_dir)
    t_ours = best_of_3(lambda: [ours.read(i) for i in order])
    t_wids = best_of_3(lambda: [wds[i][".jpg"].getvalue() for i in order])
    assert all(wds[i][".jpg"].getvalue() == samples[i][1] for i in range(n))
    wds.close()

    # flip one byte inside each of 20 samples' JPEG data, in both formats
    hit = order[:20]
    rows = {i: ours.indexes[ours.locate(i)[0]][ours.locate(i)[1]] for i in hit}
    for i in hit:
        shard, _ = ours.locate(i)
        flip_inside(ours_dir / f"{ours.shards[shard]}.data", int(rows[i]["offset"]), int(rows[i]["length"]))
    wds = IndexedTarSamples(path=str(tar_path))
    with tarfile.open(tar_path) as tar:
        members = {m.name: m for m in tar.getmembers()}
    for i in hit:
        m = members[f"{i:08d}.jpg"]
        flip_inside(tar_path, m.offset_data, m.size)
    wds = IndexedTarSamples(path=str(tar_path))
    ours = ShardReader(ours_dir)
    caught_ours = sum(isinstance(ours.read(i), str) for i in hit)
    wrong_wids = sum(decodes(wds[i][".jpg"].getvalue()) for i in hit)
    size = sum(len(d) for _, d in samples)
    print(f"{n} samples, {size / n / 1024:.1f} KiB each, {len(reader.shards)} shards")
    print(f"{'format':<10} {'open ms':>8} {'random read us/sample':>22} {'flipped byte: caught':>21} "
          f"{'served as an image':>19}")
    print(f"{'ours':<10} {t_open_ours * 1e3:8.2f} {t_ours / n * 1e6:22.1f} {caught_ours:>18}/20 {20 - caught_ours:>16}/20")
    print(f"{'wids':<10} {t_open_wids * 1e3:8.2f} {t_wids / n * 1e6:22.1f} {0:>18}/20 {wrong_wids:>16}/20")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
