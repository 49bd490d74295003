"""bench.gpu_check: the --quick CPU run writes every key the GPU run will, and a hung
subprocess is killed with its children instead of hanging the check."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from core.runtime import Dist

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"device", "torch", "cuda", "smp", "quick", "models", "train_fold", "pipeline_s"}
KEYS |= {"pipeline", "total_s"}


@pytest.mark.slow(112)
def test_quick_cpu_run_writes_every_section(tmp_path):
    out = tmp_path / "check.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result.keys() >= KEYS
    assert result["device"] == "cpu" and result["quick"] is True
    assert result["torch"] == torch.__version__ and result["smp"]
    assert result["errors"] == {}

    assert list(result["models"]) == [name for _, name in gpu_check.QUICK.models]
    for name, r in result["models"].items():
        assert "error" not in r, (name, r)
        assert r["train_img_s"] > 0 and r["train_img_s_plain"] > 0 and r["infer_img_s"] > 0
        assert r["params_m"] > 0 and r["peak_mem_gb"] is None

    fold = result["train_fold"]
    assert fold["exit_code"] == 0, fold.get("output_tail")
    assert fold["images_per_s"] > 0 and fold["gpu_busy_fraction"] is None
    assert result["pipeline"]["exit_code"] == 0, result["pipeline"].get("output_tail")
    assert 0 < result["pipeline_s"] < result["total_s"]
    # the markdown printed at the end has the measured row next to the H200 reference
    assert "| UNet ResNet-34 (`unet`) |" in run.stdout and "431 / 575 / 3254" in run.stdout


def test_a_hung_command_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    hang = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen(['sleep', '600']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(600)"
    )
    # No stopwatch: a command that ran its 600 s to the end would not be "hung".
    record = gpu_check.run_monitored(
        [sys.executable, "-c", hang], 2, tmp_path / "log.txt", Dist(0, 1, torch.device("cpu"))
    )
    assert record["hung"] is True and record["exit_code"] is None
    assert record["error"] == "timeout after 2 s" and record["gpu_busy_fraction"] is None
    child = Path(f"/proc/{pid_file.read_text()}/stat")
    deadline = time.monotonic() + 60  # only bounds the wait for the kernel to reap it
    while child.exists() and child.read_text().split()[2] != "Z" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not child.exists() or child.read_text().split()[2] == "Z"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_an_error(tmp_path, capsys):
    assert gpu_check.main(["--device", "cuda", "--out", str(tmp_path / "x.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
