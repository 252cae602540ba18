"""A real one-node SLURM cluster on localhost for the tests: munged, slurmctld and slurmd
started directly (no systemd), with a minimal slurm.conf in a temp folder.

Debian's packages (slurm-wlm, munge) are installed with apt-get when missing and this
process is root (CI is); otherwise, or where a daemon does not come up, `start()` raises
SlurmUnavailable with the reason and the tests skip with it.

The settings need no cgroups (containers and VMs without systemd): process tracking by
parent pid (proctrack/linuxproc), no task plugin, no accounting. AuthInfo's cred_expire
is short because a requeued job may not start again before it has passed (120 s by
default). The node claims 4 CPUs whatever the machine has (config_overrides), so a
2-task job runs on a 1- or 2-core machine.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ("munged", "slurmctld", "slurmd")


class SlurmUnavailable(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_if_missing() -> None:
    if all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM is not installed and this is not root: apt-get install {' '.join(PACKAGES)}")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("SLURM is not installed and there is no apt-get here")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}")


def _daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []
        self.munged_pid: int | None = None

    # -- daemons ---------------------------------------------------------------------------

    def start(self) -> SlurmCluster:
        install_if_missing()
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmd must run as root to start jobs as the submitting user; not root here")
        for sub in ("state", "spool", "munge", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        self._start_munge()
        self._write_conf()
        self.procs.append(self._spawn([_daemon("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld"))
        self.procs.append(self._spawn([_daemon("slurmd"), "-D", "-f", str(self.conf), "-N", self.host], "slurmd"))
        self._wait_idle()
        return self

    def _spawn(self, cmd: list[str], name: str) -> subprocess.Popen:
        log = open(self.root / "logs" / f"{name}.out", "w")
        return subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _start_munge(self) -> None:
        key, sock = self.root / "munge" / "munge.key", self.root / "munge" / "munge.sock"
        done = subprocess.run([_daemon("mungekey"), "--create", f"--keyfile={key}", "--force"], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise SlurmUnavailable(f"mungekey failed: {done.stderr.strip()}")
        pid_file = self.root / "munge" / "munged.pid"
        done = subprocess.run([_daemon("munged"), "--force", f"--key-file={key}", f"--socket={sock}",
                               f"--pid-file={pid_file}", f"--log-file={self.root / 'logs' / 'munged.log'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SlurmUnavailable(f"munged did not start: {done.stderr.strip() or done.stdout.strip()}")
        self.munged_pid = int(pid_file.read_text().split()[0])
        self.munge_socket = sock

    def _write_conf(self) -> None:
        r = self.root
        self.conf.write_text(f"""\
ClusterName=sparsemaetest
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'logs' / 'slurmctld.log'}
SlurmdLogFile={r / 'logs' / 'slurmd.log'}
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
NodeName={self.host} NodeAddr=127.0.0.1 CPUs=4 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise SlurmUnavailable(f"{Path(p.args[0]).name} exited with {p.returncode}: {self.logs()}")
            done = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
            last = (done.stdout + done.stderr).strip()
            if done.returncode == 0 and last in ("idle", "mixed"):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"the node did not become idle in {timeout:.0f} s (sinfo: {last!r}): {self.logs()}")

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "logs").glob("*")):
            out.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-2000:])
        return "\n".join(out)

    def stop(self) -> None:
        if self.procs and all(p.poll() is None for p in self.procs):
            # end every job while the daemons still run: a step daemon left without its
            # controller waits for it for ever
            for job in self.run("squeue", "-h", "-o", "%A", check=False).split():
                self.run("scancel", job, check=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%A", check=False).strip():
                time.sleep(0.5)
            time.sleep(2)  # the step daemons report their end to the controller
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs = []
        if self.munged_pid:
            try:
                os.kill(self.munged_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.munged_pid = None

    # -- jobs ------------------------------------------------------------------------------

    def run(self, *cmd: str, check: bool = True) -> str:
        done = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def sbatch(self, *args: str) -> int:
        return int(self.run("sbatch", "--parsable", *args).strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id))
        fields = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_state(self, job_id: int, states: tuple[str, ...], timeout: float, restarts: int | None = None) -> dict:
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states and (restarts is None or int(info.get("Restarts", 0)) >= restarts):
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not in {states} after {timeout:.0f} s: {info}\n{self.logs()}")
