"""`sparse-mae prepare` stops cleanly (issue 24): a stop signal ends it within seconds with
exit 75 and one line on stderr, keeping the shards built, and the same command continues; a
second signal ends it at once; its pool workers never outlive it, whatever kills it; a
second prepare into the same out is refused (flock, and the lock file where there is no
flock); a full disk, a read-only out or an out that is a file is one sentence (exit 2), not
a traceback, and leaves no temp file.

The signal tests drive the real CLI in a process of its own (its own session, so a Ctrl-C
reaches its whole process group as a terminal's does); tests/prepare_hooks slows each image
down so the pool is busy when the signal lands."""
from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparse_mae.bench.images import write_jpegs

REPO = Path(__file__).resolve().parents[1]
HOOKS = REPO / "tests" / "prepare_hooks"
IMAGES, SHARD_SIZE = 24, 2  # 12 shards
EXIT_INTERRUPTED = 75


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    write_jpegs(src, IMAGES, 64, 48, labelled=True)
    return src


def command(src: Path, out: Path, workers: int = 2) -> list[str]:
    return [sys.executable, "-m", "sparse_mae.cli", "prepare", f"src={src}", f"out={out}",
            f"shard_size={SHARD_SIZE}", f"workers={workers}", "progress=false"]


def hooked_env(**hooks: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{HOOKS}{os.pathsep}{REPO}", **hooks}


def start(src: Path, out: Path, delay: float = 0.25, **hooks: str) -> subprocess.Popen:
    """`sparse-mae prepare` in a session of its own, each image `delay` s slower. Its output
    goes to files beside out (`ended` reads them): a pipe would stay open as long as any
    worker lives, and an orphaned worker lives for ever."""
    logs = out.parent / f"{out.name}.log"
    proc = subprocess.Popen(command(src, out), cwd=REPO, env=hooked_env(IMAGE_DELAY=str(delay), **hooks),
                            stdout=open(logs.with_suffix(".out"), "w"), stderr=open(logs.with_suffix(".err"), "w"),
                            text=True, start_new_session=True)
    proc.logs = logs
    return proc


def ended(proc: subprocess.Popen, timeout: float, what: str) -> str:
    """Wait for the main process to end -> its stderr; a failure (and no process left) if it does not."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"prepare still ran {timeout:.0f} s after {what}")
    return proc.logs.with_suffix(".err").read_text()


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until_busy(proc: subprocess.Popen, out: Path, timeout: float = 90) -> list[int]:
    """Wait until a shard is committed and the pool's workers run -> their pids."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        workers = children(proc.pid)
        if len(workers) >= 2 and list(out.glob("*.done.json")):
            return workers
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"prepare never got busy (exit {proc.wait()}): {proc.logs.with_suffix('.err').read_text()[-2000:]}")


def assert_gone(workers: list[int], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [w for w in workers if alive(w)]
    for w in left:  # do not leave them to the next test
        os.kill(w, signal.SIGKILL)
    assert not left, f"pool workers {left} outlived prepare by {within} s"


def temp_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp-")) if out.is_dir() else []


def continue_to_the_end(src: Path, out: Path) -> int:
    """The same command again, undisturbed -> how many shards it kept."""
    done = subprocess.run(command(src, out), cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["samples"] == IMAGES
    assert not temp_files(out)
    kept = re.search(r"continuing: (\d+) of 12 shards", done.stdout + done.stderr)
    return int(kept[1]) if kept else 0


# -- signals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["ctrl-c", "TERM", "USR1"])
def test_one_stop_signal_ends_prepare_in_seconds_with_75_and_one_line_and_the_same_command_continues(
        tmp_path, src, how):
    out = tmp_path / "out"
    proc = start(src, out)
    workers = wait_until_busy(proc, out)
    sent = time.monotonic()
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the main process and its workers
    else:
        proc.send_signal(signal.Signals[f"SIG{how}"])  # a scheduler's, or `kill`: the main pid
    err = ended(proc, 60, f"SIG{how}")
    took = time.monotonic() - sent
    assert_gone(workers)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert took < 5, f"{took:.1f} s from the signal to the exit"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "run the same command again" in lines[0], err
    assert not temp_files(out)
    assert continue_to_the_end(src, out) >= 1  # the shards committed before the signal were kept


def ctrl_c_twice(tmp_path: Path, src: Path, tries: int) -> None:
    rng = random.Random(24)
    for i in range(tries):
        out = tmp_path / f"out-{i}"
        proc = start(src, out)
        workers = wait_until_busy(proc, out)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(rng.uniform(0.1, 0.5))
        try:
            os.killpg(proc.pid, signal.SIGINT)
        except ProcessLookupError:  # it had ended, workers and all
            pass
        err = ended(proc, 20, f"two Ctrl-C's (try {i + 1})")
        assert_gone(workers)
        # ended by the first (its clean stop was done before the second came) or by the second
        assert proc.returncode in (EXIT_INTERRUPTED, -signal.SIGINT), (i, proc.returncode, err[-2000:])
        assert "Traceback" not in err, (i, err[-2000:])


def test_a_second_ctrl_c_ends_prepare_at_once(tmp_path, src):
    ctrl_c_twice(tmp_path, src, tries=3)


@pytest.mark.slow
def test_a_double_ctrl_c_never_hangs_in_20_tries(tmp_path, src):
    ctrl_c_twice(tmp_path, src, tries=20)


def test_pool_workers_end_when_prepare_is_killed_with_sigkill(tmp_path, src):
    out = tmp_path / "out"
    proc = start(src, out, delay=0.5)
    workers = wait_until_busy(proc, out)
    proc.kill()  # nothing of prepare runs: the workers must see their parent die by themselves
    proc.wait()
    assert_gone(workers, within=5.0)


# -- one prepare per out -----------------------------------------------------------------------

@pytest.mark.parametrize("flock", [True, False], ids=["flock", "no-flock"])
def test_a_second_prepare_into_the_same_out_is_refused_and_the_first_finishes(tmp_path, src, flock):
    out = tmp_path / "out"
    no_flock = {} if flock else {"NO_FLOCK": "1"}
    first = start(src, out, delay=0.6, **no_flock)
    wait_until_busy(first, out)
    second = subprocess.run(command(src, out), cwd=REPO, env=hooked_env(**no_flock), capture_output=True,
                            text=True, timeout=120)
    still_running = first.poll() is None
    err_first = ended(first, 120, "the second prepare")
    assert second.returncode == 3, second.stderr[-2000:]
    assert "Traceback" not in second.stderr and "in use by pid" in second.stderr
    assert f"out {out} is in use" in second.stderr and "pass another out" in second.stderr
    assert still_running, "the first prepare ended before the second started; make it slower"
    assert first.returncode == 0, err_first[-2000:]
    assert json.loads((out / "manifest.json").read_text())["samples"] == IMAGES
    assert not (out / "run.lock.held").exists()  # the lock file of a filesystem without flock is removed


# -- out cannot be written ---------------------------------------------------------------------

def run_cli(monkeypatch, src: Path, out: Path, workers: int = 1) -> int:
    from sparse_mae.cli import main

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the dispatcher rewrites it for the app
    return main(command(src, out, workers)[3:])


def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_an_out_that_is_a_file_is_one_sentence(tmp_path, src, capsys, monkeypatch):
    out = tmp_path / "out"
    out.write_text("not a folder")
    assert run_cli(monkeypatch, src, out) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err)
    assert out.read_text() == "not a folder"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_disk_is_one_sentence_leaves_no_temp_file_and_keeps_the_built_shards(
        tmp_path, src, capsys, monkeypatch, workers):
    out = tmp_path / "out"
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills up while shard 3 is written (in whichever process writes it)
        if ".tmp-shard-00003.data" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert run_cli(monkeypatch, src, out, workers) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no space left" in line.lower() and "run the same command again" in line, line
    assert not temp_files(out)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert continue_to_the_end(src, out) >= (3 if workers == 1 else 1)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs mounted with them (skips where mounting is not allowed)."""
    mounted = []

    def mount(options: str) -> Path:
        where = tmp_path / f"mnt-{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                              text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("existing", [True, False], ids=["out-exists", "out-to-create"])
def test_a_read_only_out_is_one_sentence(tmp_path, src, capsys, monkeypatch, tmpfs, existing):
    read_only = tmpfs("ro,size=1m")
    out = read_only if existing else read_only / "shards"
    assert run_cli(monkeypatch, src, out) == 2
    assert "read-only" in one_error_line(capsys.readouterr().err)


def test_a_really_full_disk_is_one_sentence_and_leaves_no_temp_file(tmp_path, src, capsys, monkeypatch, tmpfs):
    out = tmpfs("size=64k")  # a few shards fit (tmpfs counts whole pages)
    assert run_cli(monkeypatch, src, out, workers=2) == 2
    assert "no space left" in one_error_line(capsys.readouterr().err).lower()
    assert not temp_files(out)
