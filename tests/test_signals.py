"""Signals: a run told to stop (SIGTERM, SIGINT, SIGUSR1, as a scheduler or Ctrl-C does)
finishes its step, writes a checkpoint, releases the run lock and exits 75; resumed with
resume=auto it ends bit for bit like a run never stopped. A second signal kills it at once
without harming a checkpoint already written. Under DDP a signal to one rank stops all of
them after the same step. Real signals to real processes (tests/fault_injection.py runs
the CLI; STEP_DELAY slows the tiny model's steps so the signal lands mid-run).
"""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sparse_mae.io import TEMP_PREFIX
from sparse_mae.train.checkpoint import list_checkpoints, load_checkpoint
from sparse_mae.train.signals import EXIT_INTERRUPTED, StopRequest, parse_signals
from tests.test_fault_injection import finetune_overrides, finish, launch, metrics_without_timing, process_tree
from tests.test_pretrain import assert_states_equal, debug_overrides

PRETRAIN = {"epochs": 6, "checkpoint.every_steps": 100, "checkpoint.keep_last": 0, "data.num_workers": 1}


def wait_for_steps(run_dir: Path, steps: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {steps}: "
                                 f"{proc.stderr.read()[-3000:]}")
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {steps} in {timeout} s")


def lock_is_free(run_dir: Path) -> bool:
    with open(run_dir / "run.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def assert_no_leftovers(run_dir: Path) -> None:
    leftovers = [p for p in run_dir.rglob("*") if p.name.startswith(TEMP_PREFIX)]
    assert not leftovers, leftovers
    assert lock_is_free(run_dir)


def assert_same_final_state(straight: Path, resumed: Path) -> None:
    a_info, b_info = list_checkpoints(straight / "checkpoints")[-1], list_checkpoints(resumed / "checkpoints")[-1]
    assert a_info.step == b_info.step
    a, b = load_checkpoint(a_info.path), load_checkpoint(b_info.path)
    assert_states_equal(a, b)
    assert a["engine"] == b["engine"]
    assert a.get("evals") == b.get("evals")
    for name, t in (a.get("ema") or {}).items():
        assert t.equal(b["ema"][name]), f"ema.{name}"
    assert metrics_without_timing(straight / "metrics.jsonl") == metrics_without_timing(resumed / "metrics.jsonl")


def run_to_end(app: str, args: list[str], cwd: Path, nproc: int = 1) -> None:
    code, err = finish(launch(app, [*args, "resume=auto"], None, nproc, cwd))
    assert code == 0, err[-4000:]


def signal_mid_run(app: str, args: list[str], run_dir: Path, sig: signal.Signals, after_steps: int = 3,
                   whole_group: bool = True, delay: float = 0.25, nproc: int = 1, to_rank: int | None = None):
    """Start the run, send `sig` once `after_steps` steps are logged; -> (exit code, stderr, seconds
    from the signal to the exit)."""
    proc = launch(app, [*args, "resume=auto"], None, nproc, run_dir.parent, {"STEP_DELAY": str(delay)})
    wait_for_steps(run_dir, after_steps, proc)
    sent = time.monotonic()
    if to_rank is not None:
        os.kill(rank_pid(proc, to_rank), sig)
    elif whole_group:  # as SLURM and a terminal do: every process of the job, DataLoader workers too
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    code, err = finish(proc, timeout=120)
    return code, err, time.monotonic() - sent


def rank_pid(proc: subprocess.Popen, rank: int) -> int:
    for pid in process_tree(proc.pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"fault_injection.py" in cmdline and b"torch.distributed.run" not in cmdline:
            return pid
    raise AssertionError(f"no rank {rank} process under {proc.pid}")


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [c.step for c in list_checkpoints(run_dir / "checkpoints")]


# -- unit ------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def fresh_outside_state():
    """The recorder's state is per process (the CLI's); these tests share one process."""
    from sparse_mae.train import signals

    yield
    signals._outside.update(pending=None, ended=False)


def test_signal_names_parse_and_bad_ones_are_named():
    assert parse_signals(["TERM", "sigusr1", "2"]) == [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT]
    with pytest.raises(ValueError, match="unknown signal 'TERMINATE'"):
        parse_signals(["TERMINATE"])
    assert parse_signals(["HUP", "USR2"]) == [signal.SIGHUP, signal.SIGUSR2]
    for name in ("KILL", "CHLD", "SIGALRM", str(int(signal.SIGPIPE))):  # a run stopping itself, or uncatchable
        with pytest.raises(ValueError, match="not a signal a run may stop on; use some of TERM, INT, USR1, USR2, HUP"):
            parse_signals([name])


@pytest.mark.parametrize("value", ["[CHLD]", "[TERM,KILL]"])
def test_stop_signals_outside_the_allowed_set_are_bad_input_naming_the_set(tmp_path, value, capsys):
    # SIGCHLD was accepted, and the run then stopped itself when a DataLoader worker exited
    from sparse_mae.cli import main

    with pytest.raises(SystemExit) as ended:
        main(["pretrain", *debug_overrides(tmp_path / "run"), f"stop_signals={value}"])
    assert ended.value.code == 2
    assert "stop_signals must be a list of signals a run may stop on, among TERM, INT, USR1, USR2, HUP" \
        in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_first_signal_sets_the_flag_and_restores_default_action_for_the_second():
    before = signal.getsignal(signal.SIGUSR2)
    stop = StopRequest([signal.SIGUSR2]).install()
    try:
        assert not stop.requested
        signal.raise_signal(signal.SIGUSR2)
        assert stop.requested and stop.received == signal.SIGUSR2
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL  # a second one kills at once
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR2) == before  # the handler from before the run, put back


def test_previous_handler_runs_after_the_checkpoint(monkeypatch):
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: seen.append(s))
    try:
        stop = StopRequest([signal.SIGUSR2]).install()
        signal.raise_signal(signal.SIGUSR2)
        assert seen == []  # ours only sets the flag
        stop.chain_previous()  # e.g. submitit's requeue, once our checkpoint is written
        assert seen == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


# -- real processes --------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_mid_run_checkpoints_exits_75_and_the_resumed_run_is_bit_exact(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_to_end("pretrain", debug_overrides(straight, **PRETRAIN), tmp_path)
    code, err, took = signal_mid_run("pretrain", debug_overrides(stopped, **PRETRAIN), stopped, signal.SIGTERM)
    print(f"SIGTERM to exit: {took:.2f} s (one step of >= 0.25 s + one checkpoint + exit)")
    assert code == EXIT_INTERRUPTED, err[-3000:]
    assert "stopped on SIGTERM at step" in err and "continue with resume=auto" in err
    steps = checkpoint_steps(stopped)
    assert len(steps) == 1 and 0 < steps[0] < 24, steps  # the step it stopped at, nothing lost
    assert_no_leftovers(stopped)
    run_to_end("pretrain", debug_overrides(stopped, **PRETRAIN), tmp_path)
    assert_same_final_state(straight, stopped)
    assert_no_leftovers(stopped)


@pytest.mark.slow
def test_stop_signals_are_configurable(tmp_path):
    out = tmp_path / "usr1"
    code, err, _ = signal_mid_run("pretrain", debug_overrides(out, **PRETRAIN), out, signal.SIGUSR1, after_steps=2)
    assert code == EXIT_INTERRUPTED and "stopped on SIGUSR1" in err, err[-3000:]
    out = tmp_path / "term_only"
    code, err, _ = signal_mid_run("pretrain", debug_overrides(out, **PRETRAIN, stop_signals="[TERM]"), out,
                                  signal.SIGUSR1, after_steps=2, whole_group=False)
    assert code == -signal.SIGUSR1, err[-3000:]  # not in the set: the signal's default action


@pytest.mark.slow
def test_second_signal_exits_at_once_and_keeps_written_checkpoints(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = {**PRETRAIN, "checkpoint.every_steps": 2}
    run_to_end("pretrain", debug_overrides(straight, **args), tmp_path)
    proc = launch("pretrain", [*debug_overrides(stopped, **args), "resume=auto"], None, 1, tmp_path,
                  {"STEP_DELAY": "2.0"})
    wait_for_steps(stopped, 3, proc)
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(0.2)  # inside a 2 s step: the first signal waits for it, the second does not
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    code, err = finish(proc, timeout=60)
    took = time.monotonic() - sent
    assert code == -signal.SIGTERM, err[-3000:]
    assert took < 1.5, f"the second signal took {took:.2f} s, more than the step it interrupted"
    for info in list_checkpoints(stopped / "checkpoints"):
        load_checkpoint(info.path)  # every one written is whole and matches its checksum
    assert checkpoint_steps(stopped)
    assert lock_is_free(stopped)
    run_to_end("pretrain", debug_overrides(stopped, **args), tmp_path)
    assert_same_final_state(straight, stopped)
    assert_no_leftovers(stopped)


@pytest.mark.slow
def test_finetune_stops_on_a_signal_and_resumes_bit_exact(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    extra = ["checkpoint.every_steps=100", "checkpoint.keep_last=0"]
    run_to_end("finetune", finetune_overrides(straight) + extra, tmp_path)
    code, err, took = signal_mid_run("finetune", finetune_overrides(stopped) + extra, stopped, signal.SIGINT,
                                     after_steps=5)
    print(f"SIGINT to exit (finetune): {took:.2f} s")
    assert code == EXIT_INTERRUPTED and "stopped on SIGINT" in err, err[-3000:]
    assert len(checkpoint_steps(stopped)) == 1
    run_to_end("finetune", finetune_overrides(stopped) + extra, tmp_path)
    assert_same_final_state(straight, stopped)
    assert_no_leftovers(stopped)


@pytest.mark.slow
def test_two_process_gloo_run_stops_on_one_ranks_signal_at_the_same_step(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = {**PRETRAIN, "batch_size": 4, "data.num_workers": 0}
    run_to_end("pretrain", debug_overrides(straight, **args), tmp_path, nproc=2)
    # only rank 1 hears it (a signal that reached one node): rank 0 must stop with it, no hang
    code, err, took = signal_mid_run("pretrain", debug_overrides(stopped, **args), stopped, signal.SIGTERM,
                                     nproc=2, to_rank=1)
    print(f"SIGTERM to one rank -> both ranks out: {took:.2f} s")
    assert code != 0 and "stopped on SIGTERM at step" in err and "stopped on a signal to another rank" in err, \
        err[-3000:]
    said = {line.split(" at step ")[1].split()[0] for line in err.splitlines() if "stopped on" in line}
    assert len(said) == 1, err[-3000:]  # the same step on both ranks
    assert checkpoint_steps(stopped) == [int(said.pop())]
    assert_no_leftovers(stopped)
    run_to_end("pretrain", debug_overrides(stopped, **args), tmp_path, nproc=2)
    assert_same_final_state(straight, stopped)


def test_a_signal_outside_the_run_is_recorded_then_stops_the_engine_before_its_first_step():
    from sparse_mae.train import signals

    previous = signal.getsignal(signal.SIGUSR2)
    try:
        signals.catch_outside_the_run([signal.SIGUSR2])
        signal.raise_signal(signal.SIGUSR2)  # during set-up (or after a finished run): recorded, not fatal
        assert signals._outside["pending"] == signal.SIGUSR2
        stop = StopRequest([signal.SIGUSR2]).install()
        assert stop.requested and signals._outside["pending"] is None  # the engine stops before step 1
        stop.uninstall()
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_once_the_work_is_safe_a_repeated_or_late_signal_changes_nothing():
    stop = StopRequest([signal.SIGUSR2]).install()
    try:
        signal.raise_signal(signal.SIGUSR2)
        stop.work_is_safe()  # the stop's checkpoint is written
        signal.raise_signal(signal.SIGUSR2)  # a scheduler's duplicate: was a kill (exit 140, not 75)
        assert stop.received == signal.SIGUSR2
    finally:
        stop.uninstall()
