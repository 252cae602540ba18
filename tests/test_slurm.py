"""Runs under a real SLURM (tests/slurm_cluster.py starts munged, slurmctld and slurmd on
localhost; the tests skip, naming why, where it cannot). Jobs go through the batch script
users submit, tools/slurm/train.sbatch, and are signalled, preempted and timed out as a
scheduler does; each ends bit for bit like a run never stopped, with no temp file left and
the run lock free.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, SlurmUnavailable
from sparse_mae.train.checkpoint import list_checkpoints, load_checkpoint
from tests.test_fault_injection import metrics_without_timing
from tests.test_pretrain import assert_states_equal, debug_overrides
from tests.test_signals import assert_no_leftovers, assert_same_final_state, run_to_end

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "tools" / "slurm" / "train.sbatch"
DRIVER = REPO / "tests" / "fault_injection.py"
PRETRAIN = {"checkpoint.every_steps": 100, "checkpoint.keep_last": 0}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as e:
        cluster.stop()
        pytest.skip(f"no SLURM here: {e}")
    yield cluster
    cluster.stop()


def submit(slurm: SlurmCluster, run_dir: Path, overrides: list[str], *sbatch_args: str, step_delay: float,
           env: dict[str, str] | None = None) -> int:
    """sbatch the script; `env`: variables for this job only (sbatch passes the environment on)."""
    slurm.env.update({"SPARSE_MAE_CMD": f"{sys.executable} {DRIVER}", "STEP_DELAY": str(step_delay),
                      "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
    slurm.env.update(env or {})
    try:
        return slurm.sbatch(f"--output={run_dir.parent / (run_dir.name + '-%j.out')}", f"--chdir={run_dir.parent}",
                            *sbatch_args, str(SBATCH), "pretrain", *overrides)
    finally:
        for name in env or {}:
            slurm.env.pop(name)


def steps_logged(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def wait_until(what, check, slurm: SlurmCluster, job: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        state = slurm.job(job).get("JobState")
        if state in ("FAILED", "CANCELLED", "COMPLETED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            raise AssertionError(f"job {job} {state} while waiting for {what}: {job_log(slurm, job)}")
        time.sleep(0.2)
    raise AssertionError(f"{what}: not after {timeout} s; {slurm.job(job)}\n{job_log(slurm, job)}")


def job_log(slurm: SlurmCluster, job: int) -> str:
    path = Path(slurm.job(job)["StdOut"])
    return path.read_text()[-5000:] if path.exists() else f"(no {path})"


@pytest.mark.slow
def test_signalled_then_preempted_job_requeues_and_ends_bit_exact(slurm, tmp_path):
    straight, job_dir = tmp_path / "straight", tmp_path / "job"
    args = {**PRETRAIN, "epochs": 6}
    run_to_end("pretrain", debug_overrides(straight, **args), tmp_path)
    job = submit(slurm, job_dir, debug_overrides(job_dir, **args), step_delay=0.3)
    wait_until("3 steps", lambda: steps_logged(job_dir) >= 3, slurm, job)
    slurm.run("scancel", "--signal=USR1", str(job))  # as --signal=USR1@180 does before the time limit
    wait_until("a restart", lambda: int(slurm.job(job).get("Restarts", 0)) >= 1, slurm, job, timeout=120)
    first = steps_logged(job_dir)
    wait_until("progress after the restart", lambda: steps_logged(job_dir) >= first + 3, slurm, job)
    slurm.run("scontrol", "requeue", str(job))  # as preemption with PreemptMode=REQUEUE does (TERM, then requeue)
    info = slurm.wait_state(job, ("COMPLETED", "FAILED"), timeout=300, restarts=2)
    log = job_log(slurm, job)
    assert info["JobState"] == "COMPLETED", log
    assert "stopped on SIGUSR1" in log and "stopped on SIGTERM" in log, log
    assert_same_final_state(straight, job_dir)
    assert_no_leftovers(job_dir)


@pytest.mark.slow
def test_job_with_too_short_a_time_limit_requeues_itself_and_finishes(slurm, tmp_path):
    straight, job_dir = tmp_path / "straight", tmp_path / "job"
    # 40 steps of >= 1.5 s plus start-up: longer than the 2-minute limit less the 60 s warning (SLURM checks
    # limits every 30 s, so the USR1 comes 30-60 s into each attempt)
    args = {**PRETRAIN, "epochs": 10}
    run_to_end("pretrain", debug_overrides(straight, **args), tmp_path)
    start = time.monotonic()
    job = submit(slurm, job_dir, debug_overrides(job_dir, **args), "--time=2", "--signal=USR1@60", step_delay=1.5)
    info = slurm.wait_state(job, ("COMPLETED", "FAILED", "TIMEOUT"), timeout=900)
    log = job_log(slurm, job)
    print(f"time-limited job: {int(info['Restarts'])} restart(s), {time.monotonic() - start:.0f} s in all")
    assert info["JobState"] == "COMPLETED", log
    assert int(info["Restarts"]) >= 1 and "stopped on SIGUSR1" in log, log
    assert_same_final_state(straight, job_dir)
    assert_no_leftovers(job_dir)


@pytest.mark.slow
def test_two_task_job_runs_ddp_from_slurms_environment_and_survives_a_signal(slurm, tmp_path):
    straight, job_dir = tmp_path / "straight", tmp_path / "job"
    args = {**PRETRAIN, "epochs": 6, "batch_size": 4}
    run_to_end("pretrain", debug_overrides(straight, **args), tmp_path, nproc=2)  # torchrun's DDP
    job = submit(slurm, job_dir, debug_overrides(job_dir, **args), "--ntasks-per-node=2", step_delay=0.3)
    wait_until("3 steps", lambda: steps_logged(job_dir) >= 3, slurm, job)
    slurm.run("scancel", "--signal=TERM", str(job))
    info = slurm.wait_state(job, ("COMPLETED", "FAILED"), timeout=300, restarts=1)
    log = job_log(slurm, job)
    assert info["JobState"] == "COMPLETED", log
    assert "cpu x 2" in log and log.count("stopped on SIGTERM") == 2, log  # both ranks heard it, one step
    assert_same_final_state(straight, job_dir)
    assert_no_leftovers(job_dir)


@pytest.mark.slow
def test_job_branching_from_a_checkpoint_starts_there_and_a_requeue_continues_the_branch(slurm, tmp_path):
    """resume=<checkpoint of another run> output_dir=<new>: the first start honours it (the
    script used to append resume=auto, which won: step 0); the requeued start continues from
    the branch's own newest checkpoint (the given one would be refused there, being older)."""
    source, job_dir = tmp_path / "source", tmp_path / "job"
    args = {**PRETRAIN, "epochs": 6}
    run_to_end("pretrain", debug_overrides(source, **{**args, "checkpoint.every_steps": 8}), tmp_path)
    branch_point = source / "checkpoints" / "step-00000008.pt"
    job = submit(slurm, job_dir, [*debug_overrides(job_dir, **args), f"resume={branch_point}"], step_delay=0.3)
    wait_until("3 steps", lambda: steps_logged(job_dir) >= 3, slurm, job)
    first_logged = metrics_without_timing(job_dir / "metrics.jsonl")[0]["step"]
    assert first_logged == 9, f"the branch started at step {first_logged - 1}, not 8: {job_log(slurm, job)}"
    slurm.run("scancel", "--signal=USR1", str(job))
    info = slurm.wait_state(job, ("COMPLETED", "FAILED"), timeout=300, restarts=1)
    log = job_log(slurm, job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, log
    assert f"resumed from {branch_point}" in log and "stopped on SIGUSR1" in log, log
    assert "continuing from the branch's own newest checkpoint" in log, log
    assert f"resumed from {job_dir / 'checkpoints'}" in log, log
    # the branch ends where the source run did, and logged the source's steps 9-24 once each
    a, b = list_checkpoints(source / "checkpoints")[-1], list_checkpoints(job_dir / "checkpoints")[-1]
    assert_states_equal(load_checkpoint(a.path), load_checkpoint(b.path))
    assert metrics_without_timing(job_dir / "metrics.jsonl") == metrics_without_timing(source / "metrics.jsonl")[8:]
    assert_no_leftovers(job_dir)


@pytest.mark.slow
def test_job_stopped_before_its_first_step_ends_instead_of_requeueing(slurm, tmp_path):
    """A signal during set-up: the run exits 75 with "checkpoint none (no step was taken)". A
    requeue would start over the same way (for ever, where every start is signalled so): the
    job ends, saying why."""
    job_dir = tmp_path / "job"
    job = submit(slurm, job_dir, debug_overrides(job_dir, **PRETRAIN, max_steps=2), step_delay=0,
                 env={"START_DELAY": "6"})
    wait_until("the run's set-up", lambda: "waiting before the first step" in job_log(slurm, job), slurm, job)
    slurm.run("scancel", "--signal=USR1", str(job))
    info = slurm.wait_state(job, ("COMPLETED", "FAILED"), timeout=120)
    log = job_log(slurm, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0" and int(info["Restarts"]) == 0, log
    assert "checkpoint none (no step was taken)" in log and "no new checkpoint since this start" in log, log
    assert not (job_dir / "checkpoints").exists() or not list_checkpoints(job_dir / "checkpoints")
    assert_no_leftovers(job_dir)


@pytest.mark.slow
def test_requeue_cap_ends_a_job_that_keeps_being_stopped(slurm, tmp_path):
    """SPARSE_MAE_MAX_REQUEUES=1: stopped (with progress) on its first start, the job is
    requeued; stopped again on the second, it ends, naming the variable."""
    job_dir = tmp_path / "job"
    job = submit(slurm, job_dir, debug_overrides(job_dir, **PRETRAIN, epochs=6), step_delay=0.3,
                 env={"SPARSE_MAE_MAX_REQUEUES": "1"})
    for start in range(2):
        logged = steps_logged(job_dir)
        wait_until(f"3 steps on start {start}", lambda: steps_logged(job_dir) >= logged + 3
                   and int(slurm.job(job).get("Restarts", 0)) == start, slurm, job)
        slurm.run("scancel", "--signal=USR1", str(job))
        if start == 0:
            wait_until("a restart", lambda: int(slurm.job(job).get("Restarts", 0)) >= 1, slurm, job, timeout=120)
    info = slurm.wait_state(job, ("COMPLETED", "FAILED"), timeout=120, restarts=1)
    log = job_log(slurm, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0" and int(info["Restarts"]) == 1, log
    assert log.count("stopped on SIGUSR1") == 2 and "SPARSE_MAE_MAX_REQUEUES=1" in log, log
    assert_no_leftovers(job_dir)


def test_slurm_environment_gives_rank_world_and_master(monkeypatch):
    from sparse_mae.train import distributed

    env = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
           "SLURM_STEP_NODELIST": "gpu[07-08]"}
    monkeypatch.setattr(distributed, "slurm_master_address", lambda nodelist: {"gpu[07-08]": "gpu07"}[nodelist])
    assert distributed.adopt_slurm_environment(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("3", "4", "1", "gpu07")
    assert env["MASTER_PORT"] == str(distributed.SLURM_PORT_BASE + 1234)
    # torchrun's variables win; a batch script's own shell (no srun step) is one process
    assert not distributed.adopt_slurm_environment({"RANK": "0", "WORLD_SIZE": "2", "SLURM_STEP_NUM_TASKS": "4"})
    assert not distributed.adopt_slurm_environment({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"})


def test_sbatch_script_requeues_only_on_the_interrupted_exit_code():
    from sparse_mae.train.signals import EXIT_INTERRUPTED

    text = SBATCH.read_text()
    assert f"EXIT_INTERRUPTED={EXIT_INTERRUPTED}" in text and "resume=auto" in text
    assert os.access(SBATCH, os.X_OK)
    assert signal.SIGUSR1.name.removeprefix("SIG") in text  # the warning signal is one the run stops on


@pytest.mark.slow
def test_submitit_launcher_requeues_a_job_signalled_before_its_time_limit(slurm, tmp_path):
    """`-m hydra/launcher=slurm`: submitit's time-limit signal (USR2) makes the run checkpoint,
    then submitit's own handler requeues the job, which resumes and ends bit-exact."""
    import subprocess

    straight, sweep = tmp_path / "straight", tmp_path / "sweep"
    args = {**PRETRAIN, "epochs": 6}
    run_to_end("pretrain", debug_overrides(straight, **args), tmp_path)
    env = {**slurm.env, "STEP_DELAY": "0.3", "PYTHONPATH": f"{REPO / 'tests' / 'slow_steps'}:{REPO}",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    submitter = subprocess.Popen(
        [sys.executable, "-m", "sparse_mae.cli", "pretrain", "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}",
         "hydra.launcher.timeout_min=30", *debug_overrides(sweep / "unused", **args), "resume=auto"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run_dir = sweep / "0"  # the sweep's job 0
        deadline = time.monotonic() + 240
        while steps_logged(run_dir) < 3:
            assert submitter.poll() is None and time.monotonic() < deadline, submitter.communicate()[0][-4000:]
            time.sleep(0.2)
        job = int(slurm.run("squeue", "-h", "-o", "%A").split()[0])
        slurm.run("scancel", "--signal=USR2", str(job))
        out, _ = submitter.communicate(timeout=300)
    finally:
        if submitter.poll() is None:
            submitter.kill()
    slurm.wait_state(job, ("COMPLETED", "FAILED"), timeout=120)  # submitit returns before the job has ended
    logs = "".join(p.read_text() for p in sweep.rglob("*_log.*"))
    assert submitter.returncode == 0, out[-3000:] + logs[-3000:]
    assert int(slurm.job(job)["Restarts"]) >= 1, logs[-3000:]
    assert "stopped on SIGUSR2" in logs, logs[-3000:]
    assert_same_final_state(straight, run_dir)
    assert_no_leftovers(run_dir)


# -- the batch script's logic, without SLURM (fake srun / scontrol / sparse-mae on PATH) ------

FAKE_CMD = """#!/bin/bash
# newest-step: the step in $STATE/step (exit $NEWEST_CODE); a run: its arguments to $STATE/run,
# then $RUN_STEP (if set) as the new newest step, exit $RUN_CODE
if [ "$1" = newest-step ]; then
    [ "${NEWEST_CODE:-0}" -eq 0 ] || { echo "newest-step failed" >&2; exit "$NEWEST_CODE"; }
    cat "$STATE/step"; exit 0
fi
printf '%s\\n' "$@" > "$STATE/run"
[ -z "$RUN_STEP" ] || echo "$RUN_STEP" > "$STATE/step"
exit "${RUN_CODE:-0}"
"""


def run_script(tmp_path: Path, args: list[str], step: int = 0, restarts: int = 0, **env: str):
    """-> (exit code, output, the run's arguments or None, `scontrol` calls)."""
    import subprocess

    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir(exist_ok=True)
    state.mkdir(exist_ok=True)
    for name, text in (("fake-sparse-mae", FAKE_CMD), ("srun", '#!/bin/bash\nshift\nexec "$@"\n'),
                       ("scontrol", '#!/bin/bash\necho "$@" >> "$STATE/scontrol"\n')):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (state / "step").write_text(f"{step}\n")
    for name in ("run", "scontrol"):
        (state / name).unlink(missing_ok=True)
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STATE": str(state), "SPARSE_MAE_CMD": "fake-sparse-mae",
                "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": str(restarts), **env}
    done = subprocess.run(["bash", str(SBATCH), "pretrain", *args], env=full_env, capture_output=True, text=True,
                          timeout=60)
    ran = (state / "run").read_text().splitlines() if (state / "run").exists() else None
    calls = (state / "scontrol").read_text().splitlines() if (state / "scontrol").exists() else []
    return done.returncode, done.stdout + done.stderr, ran, calls


def test_sbatch_adds_resume_auto_only_without_a_resume_argument(tmp_path):
    code, out, ran, _ = run_script(tmp_path, ["output_dir=/r"])
    assert code == 0 and ran == ["pretrain", "output_dir=/r", "resume=auto"], out
    # the user's checkpoint on the first start, and also on a requeued start while the branch has none
    for restarts, step in ((0, 0), (0, 300), (2, 0)):
        code, out, ran, _ = run_script(tmp_path, ["resume=/a/step-5.pt", "output_dir=/b"], step=step, restarts=restarts)
        assert code == 0 and ran == ["pretrain", "output_dir=/b", "resume=/a/step-5.pt"], (restarts, step, out)
    # a requeued branch continues from its own newest checkpoint, not from where it branched
    code, out, ran, _ = run_script(tmp_path, ["resume=/a/step-5.pt", "output_dir=/b"], step=8, restarts=1)
    assert code == 0 and ran == ["pretrain", "output_dir=/b", "resume=auto"], out
    assert "step 8" in out and "resume=/a/step-5.pt" in out


@pytest.mark.parametrize("code", [75, 138, 140, 143])
def test_sbatch_requeues_a_stopped_run_only_when_it_made_progress(tmp_path, code):
    got, out, _, calls = run_script(tmp_path, ["output_dir=/r"], step=4, RUN_CODE=str(code), RUN_STEP="6")
    assert got == code and calls == ["requeue 77"], out
    got, out, _, calls = run_script(tmp_path, ["output_dir=/r"], step=4, RUN_CODE=str(code))  # no new checkpoint
    assert got == code and calls == [], out
    assert "no new checkpoint since this start (newest step 4)" in out and "not requeueing job 77" in out


def test_sbatch_says_how_to_continue_a_job_it_does_not_requeue(tmp_path):
    branch = ["resume=/a/step-5.pt", "output_dir=/b"]
    _, out, _, _ = run_script(tmp_path, ["output_dir=/r"], step=4, RUN_CODE="75")
    assert "Submit the same command again to continue" in out, out  # the script adds resume=auto
    _, out, _, _ = run_script(tmp_path, branch, step=0, RUN_CODE="75")  # the branch has no checkpoint yet
    assert "Submit the same command again to continue" in out, out
    _, out, _, _ = run_script(tmp_path, branch, step=8, restarts=1, RUN_CODE="75")  # it has: resume= would be refused
    assert "with resume=auto in place of resume=/a/step-5.pt to continue from step 8" in out, out


def test_sbatch_ends_other_exits_without_requeue(tmp_path):
    for code in (0, 1, 2, 3):
        got, out, _, calls = run_script(tmp_path, ["output_dir=/r"], RUN_CODE=str(code), RUN_STEP="6")
        assert got == code and calls == [], out


def test_sbatch_requeue_cap_ends_a_job_naming_the_variable(tmp_path):
    progress = {"step": 4, "RUN_CODE": "75", "RUN_STEP": "6"}
    got, out, _, calls = run_script(tmp_path, ["output_dir=/r"], restarts=49, **progress)  # default 50
    assert calls == ["requeue 77"] and "restart 50 of at most 50" in out, out
    got, out, _, calls = run_script(tmp_path, ["output_dir=/r"], restarts=50, **progress)
    assert got == 75 and calls == [] and "SPARSE_MAE_MAX_REQUEUES=50" in out, out
    got, out, _, calls = run_script(tmp_path, ["output_dir=/r"], restarts=2, SPARSE_MAE_MAX_REQUEUES="2", **progress)
    assert got == 75 and calls == [] and "restarted 2 time(s), SPARSE_MAE_MAX_REQUEUES=2" in out, out
    got, out, ran, _ = run_script(tmp_path, ["output_dir=/r"], SPARSE_MAE_MAX_REQUEUES="lots")
    assert got == 2 and ran is None and "SPARSE_MAE_MAX_REQUEUES=lots" in out, out


def test_sbatch_without_the_newest_step_does_not_requeue(tmp_path):
    # bad input (a dated output_dir, a bad override): the job ends before the run, with the message
    got, out, ran, _ = run_script(tmp_path, ["output_dir=/r"], NEWEST_CODE="2")
    assert got == 2 and ran is None and "newest-step failed" in out, out
    # anything else: the run goes ahead but is not requeued
    got, out, ran, calls = run_script(tmp_path, ["output_dir=/r"], NEWEST_CODE="1", RUN_CODE="75", RUN_STEP="6")
    assert got == 75 and ran is not None and calls == [] and "will not requeue itself" in out, out


def test_newest_step_command_prints_the_newest_verified_checkpoint(tmp_path, capsys):
    import torch

    from sparse_mae.cli import main as cli_main
    from sparse_mae.train.checkpoint import save_checkpoint

    run = tmp_path / "run"
    assert cli_main(["newest-step", "pretrain", f"output_dir={run}"]) == 0
    assert capsys.readouterr().out.split() == ["0"]
    for step in (2, 4):
        save_checkpoint(run / "checkpoints", step, {"step": step, "w": torch.ones(3)}, keep_last=0, run_id="r")
    assert cli_main(["newest-step", "pretrain", f"output_dir={run}"]) == 0
    assert capsys.readouterr().out.split() == ["4"]
    with open(run / "checkpoints" / "step-00000004.pt", "r+b") as f:  # damaged: its record no longer matches
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(b"\0" if last != b"\0" else b"\1")
    assert cli_main(["newest-step", "finetune", f"output_dir={run}"]) == 0
    assert capsys.readouterr().out.split() == ["2"]
    assert cli_main(["newest-step", "pretrain"]) == 2  # the default output_dir is new at every start
    assert "a new directory at every start" in capsys.readouterr().err
    assert cli_main(["newest-step", "bench", f"output_dir={run}"]) == 2
    assert cli_main(["newest-step", "pretrain", "no_such_key=1"]) == 2
