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
from tests.test_pretrain import debug_overrides
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


def submit(slurm: SlurmCluster, run_dir: Path, overrides: list[str], *sbatch_args: str, step_delay: float) -> int:
    slurm.env.update({"SPARSE_MAE_CMD": f"{sys.executable} {DRIVER}", "STEP_DELAY": str(step_delay),
                      "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
    return slurm.sbatch(f"--output={run_dir.parent / (run_dir.name + '-%j.out')}", f"--chdir={run_dir.parent}",
                        *sbatch_args, str(SBATCH), "pretrain", *overrides)


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
