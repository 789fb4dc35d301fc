"""A real three-node Slurm cluster on this machine, from Debian's slurmctld, slurmd and munge.

munged, slurmctld and three slurmd daemons (`slurmd -N n1` ... `n3`) run from a private directory
with free ports, so the tests need no root-owned state and never meet another cluster. Three, so
that a two-node job can run again without one of them (a node excluded after a hang). Every node
is this host (NodeAddr=127.0.0.1) and declare 8 GPUs backed by plain files: jobs ask
for GPUs as on a real cluster, and train on the CPU (DS_ACCELERATOR=cpu).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")
NODES = ("n1", "n2", "n3")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        # Not the test process's wandb service (set where a test used wandb in this process): a
        # job would register its runs there, beyond the job's end.
        self.env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "SLURM_CONF": str(root / "slurm.conf")}

    def start(self) -> None:
        root = self.root
        for sub in ("munge", "state", "log", "dev", *(f"spool/{name}" for name in NODES)):
            (root / sub).mkdir(parents=True, exist_ok=True)
        munge = root / "munge"
        munge.chmod(0o700)
        (munge / "munge.key").write_bytes(os.urandom(1024))
        (munge / "munge.key").chmod(0o600)
        self._run(
            _binary("munged"),
            "--force",
            f"--socket={munge}/munge.socket",
            f"--key-file={munge}/munge.key",
            f"--pid-file={munge}/munged.pid",
            f"--log-file={munge}/munged.log",
            f"--seed-file={munge}/munged.seed",
        )
        for i in range(8):
            (root / "dev" / f"nvidia{i}").touch()
        ctld, node, *ports = _free_ports(2 + len(NODES))
        host = socket.gethostname()
        node_list = ",".join(NODES)
        first_job_id = 1 + 50 * (ctld % 290)
        nodes = "\n".join(
            f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=2 RealMemory=4000 Gres=gpu:8 State=UNKNOWN"
            for name, port in zip(NODES, ports)
        )
        (root / "slurm.conf").write_text(f"""\
ClusterName=zftest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={node}
SlurmUser={_user()}
SlurmdUser={_user()}
AuthType=auth/munge
AuthInfo=socket={munge}/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.%n.log
# This machine has two cores and no cgroups.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# Finished jobs stay visible to scontrol for the whole session.
MinJobAge=3600
# Job ids of their own: pretrain.sh puts a job's rendezvous on port 15000 + its id, so two test
# clusters at once (two pytest workers) must not both start at job 1.
FirstJobId={first_job_id}
JobRequeue=1
GresTypes=gpu
{nodes}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
""")
        (root / "gres.conf").write_text(f"AutoDetect=off\nNodeName={node_list} Name=gpu File={root}/dev/nvidia[0-7]\n")
        self._run(_binary("slurmctld"))
        for name in NODES:
            self._run(_binary("slurmd"), "-N", name)
        self.wait_for_idle_nodes()

    def _run(self, *cmd: str) -> None:
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}\n{self.logs()}")

    def wait_for_idle_nodes(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            states = self.command("sinfo", "-h", "-N", "-o", "%N %T", check=False)
            if states.count("idle") == len(NODES):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm nodes did not become idle in {timeout}s: {states!r}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.root / "log").glob("*.log")))

    def command(self, *cmd: str, check: bool = True, cwd: Optional[Path] = None, path: Optional[Path] = None) -> str:
        """Runs a Slurm client command; `path` goes in front of PATH (sbatch passes it on to the job)."""
        env = self.env if path is None else {**self.env, "PATH": f"{path}{os.pathsep}{self.env['PATH']}"}
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=cwd)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stdout}{result.stderr}")
        return result.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.command("scontrol", "show", "job", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        job = self.job(job_id)
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["JobState"] in states:
                return job
            time.sleep(1)
        raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {job}\n{self.logs()}")

    def rerun_requeued(self, job_id: str, timeout: float = 420) -> dict[str, str]:
        """A job requeued once runs to its end: where it still waits out Slurm's requeue delay
        (about two minutes), it starts now. Not within the second of the requeue: the relaunch's
        credential would count as revoked (Slurm compares credential times in whole seconds;
        "Killing non-startable batch JobId=2: Job credential revoked", seen once in CI)."""
        deadline = time.monotonic() + timeout
        while self.job(job_id)["Restarts"] != "1":
            assert time.monotonic() < deadline, f"job {job_id} was not requeued: {self.job(job_id)}\n{self.logs()}"
            time.sleep(1)
        if self.wait_for_state(job_id, {"PENDING", "RUNNING", *ENDED}, timeout=120)["JobState"] == "PENDING":
            self.wait_for_idle_nodes()
            time.sleep(2)
            self.command("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)  # it may have started
        return self.wait_for_state(job_id, ENDED, timeout=timeout)

    def stop(self) -> None:
        self.command("scancel", "--user", _user(), check=False)
        pid_files = [*self.root.glob("slurmd.*.pid"), self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"]
        for pid_file in pid_files:
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name
