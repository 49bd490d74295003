"""Ctrl-C and SIGTERM end a command with one line, exit 130 or 143 (issue 40 item 4).

Ctrl-C printed a 30-frame KeyboardInterrupt traceback and nothing about resuming, though
a rerun resumed. Now the line says what the command finished and the command that
resumes it, and the processes it started end with it: pipeline.py's train.py children,
their data loader workers. A terminal's Ctrl-C reaches the whole process group (here
`killpg`); a SIGTERM (`kill`, a scheduler) reaches the parent alone.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import pipeline
import report
import train
from chain import studies
from core import invocation
from core.config import reports_environment_errors
from tests.trainkit import ROOT, write_config

LINE = re.compile(r"interrupted \((Ctrl-C|SIGTERM)\)(?:; finished: (.+?))?; resume with: (.+)")


def marked_processes(mark: str) -> list[int]:
    """The live processes whose environment holds `mark` (every descendant inherits it)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and mark.encode() in (entry / "environ").read_bytes():
                status = (entry / "status").read_text()
                if "\nState:\tZ" not in status:  # a zombie has ended
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def interrupt(argv: list[str], logs: Path, sig: signal.Signals, group: bool) -> tuple[int, str]:
    """Run `python argv` in its own session, send `sig` once a fold's first epoch is in
    `logs` (to the process group, as a terminal's Ctrl-C, or to the process alone); its
    exit code and output, once it and every process it started have ended."""
    mark = f"NEOPOLYP_TEST_{uuid.uuid4().hex}"
    env = {**os.environ, mark: "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not any(p.stat().st_size for p in logs.glob("*/fold*/log.jsonl")):
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "no epoch was logged"
        time.sleep(0.1)
    (os.killpg if group else os.kill)(proc.pid, sig)
    out, _ = proc.communicate(timeout=120)
    while marked_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marked_processes(mark) == [], "a process it started outlived it"
    return proc.returncode, out


def test_ctrl_c_in_training_ends_in_one_line_that_resumes(tmp_path, tiny_data, caplog) -> None:
    """Ctrl-C (to the process group, as a terminal sends it) once an epoch is saved."""
    config = write_config(tmp_path, tiny_data, epochs=4)
    argv = ["train.py", "--config", str(config), "--model", "tiny", "--fold", "0"]
    code, out = interrupt(argv, tmp_path / "out" / "tiny", signal.SIGINT, True)
    assert code == 130, out
    assert "Traceback" not in out
    last = out.strip().splitlines()[-1]
    how, done, command = LINE.fullmatch(last).groups()
    assert how == "Ctrl-C" and re.fullmatch(r"tiny fold 0 epoch [123] of 4 saved", done), last
    words = shlex.split(command)
    assert words == ["python", *argv, "--resume"]
    with caplog.at_level(logging.INFO):
        assert train.main(words[2:]) == 0
    assert any(m.startswith("tiny fold 0: resuming after epoch") for m in caplog.messages)


@pytest.mark.slow(46)
def test_sigterm_to_the_pipeline_alone_ends_its_fold_processes(tmp_path, tiny_data) -> None:
    """A SIGTERM to pipeline.py only (not its group): its train.py children and their
    loader workers end with it, and the line names the pipeline's command."""
    config = write_config(tmp_path, tiny_data, epochs=20)  # stopped long before the end
    argv = ["pipeline.py", "--config", str(config), "--parallel", "2"]
    argv += ["--set", "data.num_workers=1"]
    code, out = interrupt(argv, tmp_path / "out" / "tiny", signal.SIGTERM, False)
    assert code == 143, out
    assert "Traceback" not in out
    how, _, command = LINE.fullmatch(out.strip().splitlines()[-1]).groups()
    assert how == "SIGTERM" and shlex.split(command) == ["python", *argv]
    # a fold process stopped says so in its own log, naming the pipeline, which resumes it
    logs = [p.read_text() for p in (tmp_path / "out" / "tiny" / "logs").glob("train_*.log")]
    assert logs and not any("Traceback" in text for text in logs)
    tails = [LINE.fullmatch(text.strip().splitlines()[-1]) for text in logs]
    assert any(t and shlex.split(t.group(3)) == ["python", *argv] for t in tails), logs


def test_an_interrupt_inside_a_stage_names_the_pipeline_that_runs_it(
    tmp_path, tiny_data, monkeypatch, capsys
) -> None:
    """Ctrl-C while pipeline.py runs train.py's main in its own process: the line is the
    pipeline's (train.py's own would resume one model, not the run)."""
    config = write_config(tmp_path, tiny_data)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "prepare_train_data", stop)
    assert pipeline.main(["--config", str(config)]) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == f"interrupted (Ctrl-C); resume with: python pipeline.py --config {config}"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_any_command_ends_an_interrupt_in_one_line(
    tmp_path, tiny_data, monkeypatch, capsys, sig
) -> None:
    config = write_config(tmp_path, tiny_data)

    def build(cfg):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the signal arrives here
        pytest.fail("not interrupted")

    monkeypatch.setattr(report, "build", build)
    previous = signal.getsignal(signal.SIGTERM)
    assert report.main(["--config", str(config)]) == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig]
    how = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}[sig]
    assert capsys.readouterr().err == (
        f"interrupted ({how}); resume with: python report.py --config {config}\n"
    )
    assert signal.getsignal(signal.SIGTERM) == previous  # given back


def test_an_interrupted_study_says_how_many_trials_it_kept(tmp_path, capsys) -> None:
    """An optuna stage (ensemble, tune, hpo) stopped in its third trial: the two finished
    are in the storage, where the rerun goes on from."""
    calls = []

    def objective(trial) -> float:
        calls.append(trial.number)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return trial.suggest_float("x", 0.0, 1.0)

    @reports_environment_errors
    def main(argv) -> int:
        place = studies.StudyPlace(f"sqlite:///{tmp_path / 'optuna.db'}")
        studies.run_study("demo", objective, 10, 0, place)
        return 0

    assert main(["--trials", "10"]) == 130
    line = capsys.readouterr().err.strip()
    how, done, command = LINE.fullmatch(line).groups()
    assert how == "Ctrl-C" and re.fullmatch(r"study demo-\w+: 2 of 10 trials finished", done)
    assert shlex.split(command)[-2:] == ["--trials", "10"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_while_a_command_imports_is_one_line(monkeypatch, capsys, sig) -> None:
    """Between stages.preflight and `main` (torch and the rest import for seconds), an
    interrupt stopped whichever import it fell in, with its traceback."""
    monkeypatch.setattr(sys, "argv", ["train.py", "--model", "tiny", "--fold", "0"])
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        invocation.quiet_start("train")
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the signal arrives here
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert stopped.value.code == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig]
    how = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}[sig]
    assert capsys.readouterr().err == (
        f"interrupted ({how}) while starting; run again: python train.py --model tiny --fold 0\n"
    )
