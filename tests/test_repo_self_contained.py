"""The repository stands on its own: no tracked file points outside it (a sibling `shared`
folder, absolute paths of one machine, design notes that a clone does not have), and every
"docs/design.md section N" that code, tests and docs cite exists."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DESIGN_DOC = REPO / "docs" / "design.md"

# Built from pieces so that this file does not match itself.
OUTSIDE_PATHS = (".." + "/shared", "/" + "work" + "/")
NOTES_NAME = "DESIGN" + ".md"
NOTES_MENTION = re.compile(r"[\w./-]*" + re.escape(NOTES_NAME))
SECTION_REFERENCE = re.compile(r"docs/design\.md,?\s+(?:sections?\s+)?(\d+(?:\s*(?:-|–|,|and)\s*\d+)*)")
SKIPPED_FOLDERS = {".git", ".venv", ".venv-timm", "__pycache__", ".pytest_cache", "outputs", "multirun", "wandb", "runs"}


def tracked_files() -> list[Path]:
    """`git ls-files`; outside a git checkout (an unpacked archive), every file but build output."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        return [REPO / name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        found = []
        for folder, subfolders, names in os.walk(REPO):
            subfolders[:] = [d for d in subfolders if d not in SKIPPED_FOLDERS and not d.endswith(".egg-info")]
            found += [Path(folder) / n for n in names]
        return found


def text_lines(path: Path):
    """(line number, line) of a text file; nothing for binary files (images) or deleted ones."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # deleted in the working tree, not yet in the index
        return
    if b"\0" in data[:8192]:
        return
    yield from enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1)


def where(path: Path, number: int, line: str) -> str:
    return f"{path.relative_to(REPO)}:{number}: {line.strip()[:160]}"


def test_no_tracked_file_points_outside_the_repository():
    found = [where(p, n, line) for p in tracked_files() for n, line in text_lines(p)
             if any(s in line for s in OUTSIDE_PATHS)]
    assert found == [], "paths outside the repository:\n" + "\n".join(found)


def test_every_cited_notes_file_exists_in_the_repository():
    files = tracked_files()
    present = {p.resolve() for p in files}
    found = []
    for path in files:
        for number, line in text_lines(path):
            for mention in NOTES_MENTION.findall(line):
                candidates = {(path.parent / mention).resolve(), (REPO / mention).resolve()}
                if not candidates & present:
                    found.append(where(path, number, line))
    assert found == [], (f"{NOTES_NAME} does not exist in this repository; cite docs/design.md "
                         f"section N instead:\n" + "\n".join(found))


def design_sections() -> set[int]:
    return {int(m[1]) for m in re.finditer(r"^## (\d+)\.", DESIGN_DOC.read_text(), flags=re.M)}


def cited_sections(text: str) -> set[int]:
    cited = set()
    for group in SECTION_REFERENCE.findall(text):
        for part in re.split(r"\s*(?:,|and)\s*", group):  # "4-5" is a range
            bounds = [int(x) for x in re.split(r"\s*[-–]\s*", part)]
            cited.update(range(bounds[0], bounds[-1] + 1))
    return cited


def test_cited_sections_parse():
    doc = "docs/design" + ".md"  # not written out, so this line cites nothing itself
    assert cited_sections(f"see {doc} section 3; {doc} sections 4-5, {doc} 2 and {doc} sections 1 and 9, "
                          f"{doc} section N") == {1, 2, 3, 4, 5, 9}


def test_every_cited_design_section_exists():
    assert DESIGN_DOC.is_file(), "docs/design.md is missing"
    sections = design_sections()
    assert sections == set(range(1, len(sections) + 1)), f"docs/design.md sections are not 1..N: {sections}"
    found = []
    for path in tracked_files():
        for number, line in text_lines(path):
            missing = cited_sections(line) - sections
            if missing:
                found.append(f"{where(path, number, line)} (no section {sorted(missing)})")
    assert found == [], "docs/design.md lacks the cited sections:\n" + "\n".join(found)
