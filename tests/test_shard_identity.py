"""A shard folder's identity is its content (issue 23, item 3): `prepare` fingerprints each
source file's bytes and a continued prepare rebuilds exactly the shards whose sources changed
(never keeping a shard of another preparation); the reader checks the manifest's values and
every shard against the manifest's record before use (sparse_mae/data/manifest.py)."""
from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparse_mae.bench.images import write_jpegs
from sparse_mae.data import prepare as prepare_module
from sparse_mae.data.prepare import PrepareOptions, prepare
from sparse_mae.data.shards import ShardReader

OPTIONS = PrepareOptions(short_side=48, shard_size=8)  # 24 images: 3 shards


@pytest.fixture(scope="module")
def source_a(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("a")
    write_jpegs(src, 24, 64, 48, labelled=True)
    return src


@pytest.fixture(scope="module")
def source_b(tmp_path_factory) -> Path:
    """The same names and labels as source_a, other pixels (another preparation's source)."""
    src = tmp_path_factory.mktemp("b")
    write_jpegs(src, 24, 64, 48, labelled=True, seed=1)
    return src


def shard_files(out: Path, shard: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob(f"{shard}.*"))}


def samples(root: Path) -> list[tuple[int, bytes]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = ShardReader(root)
    return [reader.read(i) for i in range(len(reader))]


def rewrite(path: Path, seed: int) -> None:
    """Another image under the same name."""
    with Image.open(path) as img:
        size = img.size
    Image.effect_noise(size, 40 + seed).convert("RGB").save(path, "JPEG", quality=90)


# -- prepare: a data set is its content ---------------------------------------------------------

def test_an_image_rewritten_under_its_name_rebuilds_exactly_its_shard(tmp_path, source_a):
    src = tmp_path / "src"
    shutil.copytree(source_a, src)
    out = tmp_path / "out"
    first = prepare(src, out, OPTIONS)
    before = {s: shard_files(out, s) for s in ("shard-00000", "shard-00001", "shard-00002")}
    changed = sorted(src.rglob("*.jpg"))[9]  # the second image of shard 1 (files in path order)
    rewrite(changed, seed=3)
    messages = []
    again = prepare(src, out, OPTIONS, log=messages.append)
    assert messages == ["shard-00001 is built again: its source files changed since it was built",
                        "continuing: 2 of 3 shards already built and verified, 1 to build"]
    assert shard_files(out, "shard-00000") == before["shard-00000"]
    assert shard_files(out, "shard-00002") == before["shard-00002"]
    assert shard_files(out, "shard-00001") != before["shard-00001"]
    assert again["fingerprint"] != first["fingerprint"]
    prepare(src, tmp_path / "fresh", OPTIONS)
    assert samples(out) == samples(tmp_path / "fresh")  # what a fresh prepare holds


def test_an_interrupted_prepare_whose_sources_were_replaced_holds_only_the_new_images(
        tmp_path, source_a, source_b, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(source_a, src)
    real_build = prepare_module.build_shard

    def build_then_die(out, index, *rest):
        if index == 2:
            raise KeyboardInterrupt
        return real_build(out, index, *rest)

    monkeypatch.setattr(prepare_module, "build_shard", build_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "out", OPTIONS)
    monkeypatch.setattr(prepare_module, "build_shard", real_build)
    shutil.rmtree(src)
    shutil.copytree(source_b, src)  # the same names, other images
    messages = []
    manifest = prepare(src, tmp_path / "out", OPTIONS, log=messages.append)
    assert "shard-00000 is built again: its source files changed since it was built" in messages
    assert "shard-00001 is built again: its source files changed since it was built" in messages
    straight = prepare(source_b, tmp_path / "straight", OPTIONS)
    assert manifest["shards"] == straight["shards"] and manifest["fingerprint"] == straight["fingerprint"]
    assert samples(tmp_path / "out") == samples(tmp_path / "straight")


def test_prepare_rebuilds_a_shard_copied_from_another_preparation_and_keeps_its_own_digest(
        tmp_path, source_a, source_b):
    out, other = tmp_path / "out", tmp_path / "other"
    manifest = prepare(source_a, out, OPTIONS)
    prepare(source_b, other, OPTIONS)
    for name, data in shard_files(other, "shard-00001").items():  # data, index, names and its .done.json
        (out / name).write_bytes(data)
    messages = []
    again = prepare(source_a, out, OPTIONS, log=messages.append)
    assert messages == ["shard-00001 is built again: it was built from other files or options (another "
                        "preparation's shard)", "continuing: 2 of 3 shards already built and verified, 1 to build"]
    assert again["shards"] == manifest["shards"]  # not the foreign shard's digest
    prepare(source_a, tmp_path / "fresh", OPTIONS)
    assert samples(out) == samples(tmp_path / "fresh")


def test_a_damaged_plan_or_commit_record_is_a_clear_error_or_a_rebuild_never_a_traceback(tmp_path, source_a):
    out = tmp_path / "out"
    manifest = prepare(source_a, out, OPTIONS)
    (out / "shard-00001.done.json").write_text(json.dumps({"name": "shard-00001", "count": "8", "data_bytes": []}))
    assert prepare(source_a, out, OPTIONS)["shards"] == manifest["shards"]  # rebuilt, not a TypeError
    (out / "prepare.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"prepare\.json.*delete"):
        prepare(source_a, out, OPTIONS)
    (out / "prepare.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"prepare\.json.*delete"):
        prepare(source_a, out, OPTIONS)


# -- the reader: every shard checked against the manifest's record -----------------------------------

@pytest.fixture(scope="module")
def shards_a(tmp_path_factory, source_a) -> Path:
    out = tmp_path_factory.mktemp("shards") / "a"
    prepare(source_a, out, OPTIONS)
    return out


@pytest.fixture(scope="module")
def shards_b(tmp_path_factory, source_b) -> Path:
    out = tmp_path_factory.mktemp("shards") / "b"
    prepare(source_b, out, OPTIONS)
    return out


def copy_of(root: Path, tmp_path: Path) -> Path:
    shutil.copytree(root, tmp_path / "copy")
    return tmp_path / "copy"


def test_a_shard_copied_in_from_another_preparation_is_skipped_by_name(tmp_path, shards_a, shards_b):
    root = copy_of(shards_a, tmp_path)
    for suffix in (".data", ".index.npy", ".names.txt"):
        shutil.copy(shards_b / f"shard-00001{suffix}", root / f"shard-00001{suffix}")
    with pytest.warns(UserWarning, match=r"shard-00001 .*does not match .*manifest.*8 samples.*left out"):
        reader = ShardReader(root)
    theirs = samples(shards_b)[8:16]
    ours = samples(shards_a)
    assert len(reader) == 16 and reader.skipped_shards == ["shard-00001"]
    served = [reader.read(i) for i in range(len(reader))]
    assert served == ours[:8] + ours[16:] and not set(map(tuple, theirs)) & set(map(tuple, served))


def test_a_shard_whose_files_are_all_from_another_preparation_is_skipped(tmp_path, shards_a, shards_b):
    """Mixed: shard 2 and its commit record from b; a's manifest does not list that index."""
    root = copy_of(shards_a, tmp_path)
    for name, data in shard_files(shards_b, "shard-00002").items():
        (root / name).write_bytes(data)
    with pytest.warns(UserWarning, match="shard-00002"):
        reader = ShardReader(root)
    assert len(reader) == 16 and reader.skipped_shards == ["shard-00002"]


def edit_manifest(root: Path, edit, agree: bool = False) -> None:
    """Edit root's manifest.json; `agree`: and its fingerprint with the edit (what only a
    forger does: the reader must then find the disagreement with the files)."""
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    if agree and "fingerprint" in manifest:  # (one that has one)
        from sparse_mae.data.manifest import data_set_fingerprint

        manifest["fingerprint"] = data_set_fingerprint(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def set_count(i, value, samples_too=False):
    def edit(m):
        m["shards"][i]["count"] = value
        if samples_too:
            m["samples"] = sum(s["count"] for s in m["shards"])
    return edit


BAD_MANIFESTS = {
    "count -5": (set_count(1, -5, samples_too=True), r"shards\[1\]\.count.*-5"),
    "count 3e8": (set_count(1, 300_000_000, samples_too=True), r"shards\[1\]\.count.*300000000.*more samples than"),
    "count 9, samples not": (set_count(1, 9), r"samples is 24 .*add up to 25"),
    "count as a string": (set_count(1, "8"), r"shards\[1\]\.count.*'8'"),
    "count a float": (set_count(1, 8.0), r"shards\[1\]\.count"),
    "count true": (set_count(1, True), r"shards\[1\]\.count"),
    "samples a string": (lambda m: m.update(samples="24"), r"samples"),
    "shards not a list": (lambda m: m.update(shards={"a": 1}), r"shards"),
    "no shards": (lambda m: m.update(shards=[], samples=0), r"no samples|shards"),
    "a shard not a dict": (lambda m: m["shards"].__setitem__(0, "shard-00000"), r"shards\[0\]"),
    "a shard name outside": (lambda m: m["shards"][0].update(name="../../etc/passwd"), r"shards\[0\]\.name"),
    "shard names out of order": (lambda m: m["shards"].reverse(), r"shards\[0\]\.name"),
    "digest not hex": (lambda m: m["shards"][0].update(index_sha256=5), r"shards\[0\]\.index_sha256"),
    "data_bytes negative": (lambda m: m["shards"][0].update(data_bytes=-1), r"shards\[0\]\.data_bytes"),
    "classes not names": (lambda m: m.update(classes=[1, 2, 3, 4, 5, 6, 7, 8]), r"classes"),
    "classes repeated": (lambda m: m.update(classes=["a"] * 8), r"classes"),
    "options a list": (lambda m: m.update(options=[]), r"options"),
    "unreadable a string": (lambda m: m.update(unreadable="none"), r"unreadable"),
    "complete a string": (lambda m: m.update(complete="yes"), r"complete"),
    "fingerprint edited": (lambda m: m.update(fingerprint="0" * 64), r"fingerprint"),
    "not an object": (lambda m: m.clear(), r"format"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_manifest_values_are_checked_before_use_and_name_the_file_and_the_fix(tmp_path, shards_a, case):
    edit, problem = BAD_MANIFESTS[case]
    root = copy_of(shards_a, tmp_path)
    edit_manifest(root, edit)
    with pytest.raises(ValueError, match=problem) as refused:
        ShardReader(root)
    message = str(refused.value)
    assert str(root / "manifest.json") in message and "sparse-mae prepare" in message, message


def test_manifest_that_is_not_an_object_is_refused(tmp_path, shards_a):
    root = copy_of(shards_a, tmp_path)
    (root / "manifest.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match=r"manifest\.json.*sparse-mae prepare"):
        ShardReader(root)


def test_a_count_that_disagrees_with_its_index_leaves_out_that_shard(tmp_path, shards_a):
    """One shard's count and the total edited together, within the manifest's own ranges: the
    shard's index holds 8 rows, so the shard is left out by name."""
    root = copy_of(shards_a, tmp_path)
    edit_manifest(root, set_count(1, 9, samples_too=True), agree=True)
    with pytest.warns(UserWarning, match=r"shard-00001 .*holds 8 samples, but the manifest's record says 9"):
        reader = ShardReader(root)
    assert len(reader) == 16 and reader.skipped_shards == ["shard-00001"]


def forge_index(root: Path, shard: str, edit, reload: bool = True) -> None:
    """Edit a shard's index rows and make the manifest agree with them (its digest and the
    fingerprint): a consistent forgery, which only the values' ranges can tell."""
    from sparse_mae.io import sha256_of

    if reload:
        rows = np.load(root / f"{shard}.index.npy")
        edit(rows)
        np.save(root / f"{shard}.index.npy", rows)
    digest = sha256_of(root / f"{shard}.index.npy")

    def put(m):
        for s in m["shards"]:
            if s["name"] == shard:
                s["index_sha256"] = digest
    edit_manifest(root, put, agree=True)


@pytest.mark.parametrize("edit, problem", [
    (lambda rows: rows.__setitem__(3, (rows[3][0], 2**31, rows[3][2], rows[3][3])), "outside its data file"),
    (lambda rows: rows.__setitem__(3, (2**62, rows[3][1], rows[3][2], rows[3][3])), "outside its data file"),
    (lambda rows: rows.__setitem__(3, (rows[3][0], rows[3][1], 97, rows[3][3])), "label"),
    (lambda rows: rows.__setitem__(3, (rows[3][0], rows[3][1], -1, rows[3][3])), "label"),
    (lambda rows: rows.__setitem__(3, (rows[3][0], 0, rows[3][2], rows[3][3])), "empty"),
], ids=["length 2^31", "offset 2^62", "label 97 of 8 classes", "label -1 in labelled data", "length 0"])
def test_index_values_out_of_range_leave_out_that_shard_by_name(tmp_path, shards_a, edit, problem):
    root = copy_of(shards_a, tmp_path)
    forge_index(root, "shard-00001", edit)
    with pytest.warns(UserWarning, match=f"shard-00001 .*{problem}"):
        reader = ShardReader(root)
    assert len(reader) == 16 and reader.skipped_shards == ["shard-00001"]


def test_an_index_whose_header_claims_a_huge_shape_is_not_allocated(tmp_path, shards_a):
    root = copy_of(shards_a, tmp_path)
    rows = np.load(root / "shard-00001.index.npy")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(rows.dtype),
                                                  "fortran_order": False, "shape": (10**11,)})
    (root / "shard-00001.index.npy").write_bytes(header.getvalue() + rows.tobytes())
    forge_index(root, "shard-00001", lambda rows: None, reload=False)
    with pytest.warns(UserWarning, match="shard-00001"):
        reader = ShardReader(root)
    assert len(reader) == 16 and reader.skipped_shards == ["shard-00001"]


def test_no_shard_that_matches_the_manifest_is_an_error_naming_the_fix(tmp_path, shards_a, shards_b):
    root = copy_of(shards_a, tmp_path)
    for p in shards_b.glob("shard-*.index.npy"):
        shutil.copy(p, root / p.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"no shard of .* matches .*sparse-mae prepare"):
            ShardReader(root)


def test_a_version_1_folder_is_read_with_the_fingerprint_of_its_content(tmp_path, shards_a):
    """Folders prepared before the fingerprint existed: the same content, the same identity."""
    root = copy_of(shards_a, tmp_path)
    current = json.loads((root / "manifest.json").read_text())

    def as_version_1(m):
        m.update(version=1)
        m.pop("fingerprint")
        for record in m["shards"]:
            record.pop("sources_sha256")
    edit_manifest(root, as_version_1)
    reader = ShardReader(root)
    assert reader.manifest["fingerprint"] == current["fingerprint"] and len(reader) == 24


def test_a_bad_manifest_exits_2_from_an_app(tmp_path, shards_a, capsys, monkeypatch):
    import sys

    from sparse_mae.cli import main
    from tests.test_pretrain import debug_overrides

    root = copy_of(shards_a, tmp_path)
    edit_manifest(root, set_count(1, [8]))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    overrides = [a for a in debug_overrides(tmp_path / "run", max_steps=1)
                 if not a.startswith(("data.draw_size=", "data.num_images="))]
    with pytest.raises(SystemExit) as ended:
        main(["pretrain", "data=shards", f"data.root={root}", *overrides])
    assert ended.value.code == 2
    assert f"{root / 'manifest.json'}" in capsys.readouterr().err
