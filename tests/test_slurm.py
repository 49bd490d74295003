"""pipeline.py --launcher slurm on a real one-node SLURM cluster: slurmctld, slurmd and
munge started here (installed by scripts/test_services.sh from Debian's packages), two
fold jobs of the tiny experiment submitted through submitit, then the later stages, to a
valid submission."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pipeline
from data.submission import check_submission
from tests.trainkit import write_config

MUNGE_KEY = Path("/etc/munge/munge.key")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_munge() -> bool:
    """munged as the munge user, with a key made once; whether this call started it (a
    munged already running is the machine's, and is left as it is)."""
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return False
    if not MUNGE_KEY.is_file():
        subprocess.run(["mungekey", "-c", "-k", str(MUNGE_KEY)], check=True)
    for folder in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "munge", "munge")
    shutil.chown(MUNGE_KEY, "munge", "munge")
    MUNGE_KEY.chmod(0o400)
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
    return True


def slurm_conf(base: Path) -> str:
    host = socket.gethostname().split(".")[0]
    return f"""ClusterName=neopolyp
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmdUser=root
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName={host} CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm() -> Iterator[Path]:
    """A one-node cluster for this module (root only: the daemons switch users); its
    slurm.conf, which SLURM_CONF points every SLURM command at."""
    if os.geteuid() != 0:
        pytest.fail("the SLURM test starts slurmctld and slurmd, which needs root")
    if not shutil.which("slurmctld"):
        pytest.fail("SLURM is not installed: run scripts/test_services.sh (make test does)")
    started_munge = start_munge()
    base = Path(tempfile.mkdtemp(prefix="neopolyp-slurm-"))
    for folder in ("state", "spool"):
        (base / folder).mkdir()
    conf = base / "slurm.conf"
    conf.write_text(slurm_conf(base))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        subprocess.run(["slurmctld", "-c"], check=True, env=env)
        subprocess.run(["slurmd", "-c"], check=True, env=env)
        deadline = time.monotonic() + 60
        while (
            "idle"
            not in subprocess.run(
                ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env
            ).stdout
        ):
            assert time.monotonic() < deadline, (base / "slurmctld.log").read_text()[-2000:]
            time.sleep(0.5)
        yield conf
    finally:
        for daemon in ("slurmd", "slurmctld"):
            pid = base / f"{daemon}.pid"
            if pid.is_file():
                os.kill(int(pid.read_text()), signal.SIGTERM)
        if started_munge:
            subprocess.run(["pkill", "-x", "munged"], check=False)
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow(53)
def test_fold_jobs_run_on_slurm_and_the_pipeline_submits(
    slurm: Path, tmp_path: Path, tiny_data: Path, capsys
) -> None:
    config = write_config(tmp_path, tiny_data, epochs=1)
    argv = ["--config", str(config), "--launcher", "slurm", "--set", "slurm.timeout_min=20"]
    assert pipeline.main(argv) == 0, capsys.readouterr().err
    exp = tmp_path / "out" / "tiny"
    for fold in (0, 1):
        assert (exp / "tiny" / f"fold{fold}" / "best.pt").is_file()
    # each fold ran as a SLURM job of its own, its output collected under logs/slurm
    outputs = sorted((exp / "logs" / "slurm").glob("*_0_log.out"))
    assert len(outputs) == 2
    assert all("best competition" in p.read_text() for p in outputs)
    assert check_submission(exp / "submission.csv", tiny_data) == []
    assert "train (slurm)" in capsys.readouterr().out
