"""The records of a shard folder, read and checked in one place before anything uses them.
`sparse-mae prepare` writes them (sparse_mae/data/prepare.py); the shard reader
(sparse_mae/data/shards.py) and a continued prepare read them through here:

- `manifest.json`, the data set: its types, ranges and inner agreement (shard names in order,
  counts that add up to `samples`, no more samples than bytes, digests of 64 hex digits,
  distinct class names, the fingerprint its content's). A fault refuses the whole folder
  (ManifestError, exit 2, naming the file and the fix): nothing it says can be trusted then.
- each shard against the manifest's record of it (`check_shard`): its index file's SHA-256 (a
  shard copied in from another preparation, or an index edited or damaged, differs), then the
  index's dtype, row count and values (every sample inside the data file, labels among the
  classes). A shard that disagrees raises ShardMismatch with the reason: the reader leaves it
  out by name, a continued prepare builds it again. An index is read only when its size fits
  the record, and its header is checked before any row is made, so memory is bounded by the
  files' real sizes whatever a record claims.
- `prepare.json` (the plan a continued prepare must match) and each shard's commit record
  (`shard-NNNNN.done.json`): a damaged plan is an error naming the fix; a damaged commit
  record means that shard is built again.

A data set's identity is its content (`data_set_fingerprint`): the class names and each
shard's sample count and index digest. The index rows hold every sample's offset, length,
label and a checksum of its bytes, so two shard folders with one fingerprint serve the same
images with the same labels, wherever they lie and whatever their source folder was called.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np

from sparse_mae.errors import ConfigError

FORMAT = "sparse-mae-shards"
# 2: per-shard source digests and the data set's fingerprint in the manifest, escaped names.
# Version 1 folders are read as well (the fingerprint is computed from their records); a
# prepare continued on one builds every shard again (its records hold no source digests).
VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
PLAN = "prepare.json"
INDEX_DTYPE = np.dtype([("offset", "<u8"), ("length", "<u4"), ("label", "<i4"), ("checksum", "<u8")])
INDEX_HEADER_MAX = 65536 + 16  # the largest header of a version 1.0 .npy file (prepare writes those)
MAX_BYTES = 2**63 - 1  # a file size the reader's offsets (int64) can hold
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


class ManifestError(ConfigError):
    """A shard folder's record that cannot be used: bad input, exit 2. The message names
    the file and what to do."""


class ShardMismatch(Exception):
    """A shard's files disagree with its record (the message says how)."""


def prepare_again(root: Path, source: object = None) -> str:
    """The fix for a damaged record: the prepare that wrote the folder, run again, verifies
    each shard, builds again what does not verify and writes the records again."""
    src = f" (its source: {source})" if isinstance(source, str) else ""
    return (f"run the `sparse-mae prepare` command that wrote {root} again{src}: it keeps every shard that "
            f"verifies and writes the records again; or restore the folder from a good copy")


def data_set_fingerprint(manifest: dict) -> str:
    """The identity of a (checked) manifest's data: SHA-256 over the class names and every
    shard's count and index digest, not where the folder or its source lies."""
    content = {"classes": manifest["classes"],
               "shards": [[s["count"], s["index_sha256"]] for s in manifest["shards"]]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


# -- values --------------------------------------------------------------------------------------

def _whole(value: object, field: str, low: int = 0, high: int = MAX_BYTES) -> str | None:
    """None if `value` is an int in [low, high] (a bool is not), else what is wrong."""
    if type(value) is not int:
        return f"{field} is {value!r}, not a whole number"
    if value < low:
        return f"{field} is {value}, expected at least {low}"
    if value > high:
        return f"{field} is {value}, expected at most {high}"
    return None


def _digest(value: object, field: str) -> str | None:
    if not (isinstance(value, str) and SHA256_HEX.fullmatch(value)):
        return f"{field} is {value!r}, not a SHA-256 (64 hex digits)"
    return None


def shard_record_problem(record: object, i: int, field: str, digests: tuple[str, ...]) -> str | None:
    """What is wrong with shard i's record (its entry in the manifest, or its .done.json), or None."""
    if not isinstance(record, dict):
        return f"{field} is {record!r}, not a shard record"
    if record.get("name") != shard_name(i):
        return f"{field}.name is {record.get('name')!r}, expected {shard_name(i)!r} (the shards in order)"
    for key in ("count", "data_bytes"):
        problem = _whole(record.get(key), f"{field}.{key}")
        if problem:
            return problem
    if record["count"] > record["data_bytes"]:
        return f"{field}.count is {record['count']}, more samples than its data_bytes ({record['data_bytes']})"
    for key in digests:
        problem = _digest(record.get(key), f"{field}.{key}")
        if problem:
            return problem
    return None


def _list_of_str(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def manifest_problem(manifest: dict) -> str | None:
    """What is wrong with a manifest's values (format, version and completeness checked
    before), or None."""
    if not isinstance(manifest.get("source"), str):
        return f"source is {manifest.get('source')!r}, not a text"
    if not isinstance(manifest.get("options"), dict):
        return f"options is {manifest.get('options')!r}, not a mapping"
    classes = manifest.get("classes")
    if classes is not None and not (_list_of_str(classes) and classes and all(classes)
                                    and len(set(classes)) == len(classes)):
        return f"classes is {classes!r}, neither null (unlabelled) nor a list of distinct class names"
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        return f"shards is {shards!r}, not a list of shard records"
    digests = ("index_sha256",) if manifest["version"] == 1 else ("index_sha256", "sources_sha256")
    for i, record in enumerate(shards):
        problem = shard_record_problem(record, i, f"shards[{i}]", digests)
        if problem:
            return problem
    problem = _whole(manifest.get("samples"), "samples", low=1)
    if problem:
        return problem + " (a data set holds at least one sample)"
    total = sum(s["count"] for s in shards)
    if manifest["samples"] != total:
        return f"samples is {manifest['samples']} but the shards' counts add up to {total}"
    if not _list_of_str(manifest.get("unreadable")):
        return f"unreadable is {manifest.get('unreadable')!r}, not a list of texts"
    if manifest["version"] > 1 and manifest.get("fingerprint") != data_set_fingerprint(manifest):
        return (f"fingerprint is {manifest.get('fingerprint')!r}, not its content's "
                f"({data_set_fingerprint(manifest)})")
    return None


# -- manifest.json ----------------------------------------------------------------------------------

def read_manifest(root: str | Path) -> dict:
    """The checked manifest of the shard folder `root` (its "fingerprint" filled in for a
    version 1 folder); a clear error for anything else."""
    root = Path(root).expanduser()
    path = root / MANIFEST
    if not path.is_file() and (root / PLAN).is_file():
        raise ValueError(f"{root} is an unfinished `sparse-mae prepare` (interrupted?): continue it with the "
                         f"same command, then train")
    if not path.is_file() and (root / "train" / MANIFEST).is_file():
        raise FileNotFoundError(f"data.root={root} holds train/ and val/ shard folders (the fine-tuning layout); "
                                f"pretraining reads one of them: data.root={root / 'train'}")
    if not path.is_file():
        hint = (f"; it is an image folder: use data=imagefolder, or turn it into shards with "
                f"`sparse-mae prepare src={root} out=<shard folder>`" if root.is_dir() else "")
        raise FileNotFoundError(f"data.root={root} has no {MANIFEST}: not a shard folder written by "
                                f"`sparse-mae prepare`{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path} is unreadable ({e}); {prepare_again(root)}") from e
    if not isinstance(manifest, dict):
        manifest = {"format": None}
    if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE_VERSIONS:
        raise ManifestError(f"{path} is not a {FORMAT} manifest of version {' or '.join(map(str, READABLE_VERSIONS))} "
                            f"(format {manifest.get('format')!r}, version {manifest.get('version')!r}); prepare "
                            f"it again with this version: `sparse-mae prepare src=<source> out={root}`")
    if manifest.get("complete") is not True:
        if manifest.get("complete") is False:
            raise ValueError(f"{root} is an unfinished `sparse-mae prepare` (interrupted?): continue it with "
                             f"the same command, then train")
        raise ManifestError(f"{path}: complete is {manifest.get('complete')!r}, not true or false; "
                            f"{prepare_again(root, manifest.get('source'))}")
    problem = manifest_problem(manifest)
    if problem:
        raise ManifestError(f"{path}: {problem}; the file was edited or damaged: "
                            f"{prepare_again(root, manifest.get('source'))}")
    if manifest["version"] == 1:
        manifest["fingerprint"] = data_set_fingerprint(manifest)
    return manifest


# -- a shard's index -----------------------------------------------------------------------------

def parse_index(data: bytes, count: int) -> np.ndarray:
    """The rows of an index file's bytes, which must hold exactly `count` rows of INDEX_DTYPE;
    the header is checked before any row is made (a header may claim any shape)."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f".npy version {version}")
        shape, fortran_order, dtype = read_header[version](f)
    except (ValueError, SyntaxError, EOFError) as e:
        raise ShardMismatch(f"its index is not a readable .npy file ({e})") from None
    if dtype != INDEX_DTYPE or fortran_order or len(shape) != 1:
        raise ShardMismatch(f"its index holds {dtype} of shape {shape}, not one row of {INDEX_DTYPE} per sample")
    if shape[0] != count:
        raise ShardMismatch(f"its index holds {shape[0]} samples, but the manifest's record says {count}")
    if len(data) - f.tell() != count * INDEX_DTYPE.itemsize:
        raise ShardMismatch(f"its index file is {len(data)} bytes, not a header and {count} rows")
    return np.frombuffer(data, INDEX_DTYPE, count, offset=f.tell())


def rows_problem(rows: np.ndarray, data_bytes: int, classes: list[str] | None) -> str | None:
    """What is wrong with an index's values, or None: each sample must lie in the data file
    (of `data_bytes`) and hold a label of `classes` (-1 where the data is unlabelled)."""
    size = np.uint64(data_bytes)
    outside = (rows["offset"] > size) | (rows["length"] > size - np.minimum(rows["offset"], size))
    empty = rows["length"] == 0
    labels = rows["label"]
    wrong_label = (labels < 0) | (labels >= len(classes)) if classes else labels != -1
    for bad, why in ((outside, "lies outside its data file of {size} bytes (offset {offset}, length {length})"),
                     (empty, "is empty (length 0)"),
                     (wrong_label, "has label {label}, " + (f"outside the manifest's {len(classes)} classes"
                                                           if classes else "but the data is unlabelled (-1)"))):
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            row = rows[k]
            return f"sample {k} " + why.format(size=data_bytes, offset=int(row["offset"]), length=int(row["length"]),
                                               label=int(row["label"]))
    return None


def check_shard(root: Path, record: dict, classes: list[str] | None) -> tuple[np.ndarray, int]:
    """A checked shard record's files -> (its index rows, its data file's size in bytes);
    ShardMismatch when they are not the files the record describes. A data file of another
    size than recorded is not a mismatch here: each sample's checksum finds what is damaged
    (a truncated shard loses only its last samples)."""
    name, count = record["name"], record["count"]
    index = root / f"{name}.index.npy"
    try:
        index_size = index.stat().st_size
        data_size = (root / f"{name}.data").stat().st_size
    except OSError as e:
        raise ShardMismatch(f"{Path(e.filename).name} cannot be read ({e.strerror})") from None
    if index_size > INDEX_HEADER_MAX + count * INDEX_DTYPE.itemsize:
        raise ShardMismatch(f"its index is {index_size} bytes, more than {count} rows (the manifest's count) take")
    try:
        data = index.read_bytes()
    except OSError as e:
        raise ShardMismatch(f"its index cannot be read ({e.strerror})") from None
    if hashlib.sha256(data).hexdigest() != record["index_sha256"]:
        raise ShardMismatch("its index does not match the manifest's record of it (SHA-256): a shard of another "
                            "preparation, or an index damaged or edited")
    rows = parse_index(data, count)
    problem = rows_problem(rows, record["data_bytes"], classes)
    if problem:
        raise ShardMismatch(f"its index is out of range: {problem}")
    return rows, data_size


# -- prepare's own records ---------------------------------------------------------------------------

def read_plan(out: Path) -> dict:
    """The plan an earlier prepare into `out` wrote (prepare.json): {"fingerprint": ..., ...}."""
    path = out / PLAN
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        plan, why = None, str(e)
    else:
        why = "not a plan with a fingerprint"
    if not (isinstance(plan, dict) and isinstance(plan.get("fingerprint"), str)):
        raise ManifestError(f"{path} is damaged ({why}): the folder's shards cannot be matched to a source; delete "
                            f"{out} (or choose a new out=) and prepare again")
    return plan


def read_commit_record(out: Path, i: int) -> dict:
    """Shard i's commit record (.done.json), checked (ShardMismatch when it is missing,
    unreadable or not one this version writes)."""
    path = out / f"{shard_name(i)}.done.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ShardMismatch(f"its commit record is unreadable ({e})") from None
    problem = shard_record_problem(record, i, path.name, ("index_sha256", "sources_sha256", "items_sha256"))
    if problem is None and not _list_of_str(record.get("unreadable")):
        problem = f"{path.name}.unreadable is not a list of texts"
    if problem:
        raise ShardMismatch(problem)
    return record
