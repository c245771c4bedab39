"""Launching the project on several gloo ranks from a test, as torchrun launches it on GPUs."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from merge_distill.distributed import REHEARSE


def torchrun(*args: str, nproc: int = 2, timeout: int = 240, script: str | None = None) -> subprocess.CompletedProcess:
    """`merge-distill ARGS` (or `python SCRIPT ARGS`) on `nproc` gloo ranks. A run still going after `timeout` s (a hang) fails the test:
    the launcher is stopped (it stops its workers, which run in sessions of their own), and a collective
    left waiting gives up after MERGE_DISTILL_DIST_TIMEOUT_S. The ranks build the process group a CUDA run
    builds (`distributed.REHEARSE`): a collective on a host tensor that NCCL alone would refuse fails here too."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MERGE_DISTILL_DIST_TIMEOUT_S": "120",
           REHEARSE: "cuda"}  # the process group built as on CUDA (`cpu:gloo,cuda:<gloo for nccl>`)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *([script] if script else ["-m", "merge_distill"]), *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # not pipes: workers hold them
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        try:
            hung = proc.wait(timeout=timeout) is None
        except subprocess.TimeoutExpired:
            hung = True
            proc.terminate()  # torchrun stops its workers on SIGTERM
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if hung:
        pytest.fail(f"merge-distill {' '.join(args)} on {nproc} ranks still running after {timeout} s (a hang)\n"
                    + stderr[-3000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
