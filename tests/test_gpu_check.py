"""benchmarks/gpu_check.sh runs end to end at CPU size (``--tiny``), so the GPU run works first time:
every step writes its JSON without an error and with figures that make sense."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_every_step_at_tiny_size(tmp_path):
    # the interpreter running the tests, wherever the project is installed (not necessarily .venv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TDAMIL_GPU_CHECK_TINY": "1", "PYTHON": sys.executable}
    done = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path / "out"),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=470,
                          env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    read = {step: json.loads((tmp_path / "out" / f"gpu_check_{step}_tiny.json").read_text())
            for step in ("model", "extract", "simulate")}
    for step, record in read.items():
        assert "error" not in record, (step, record.get("traceback"))
        assert record["device"] == "cpu" and record["tiny"]
    rows = read["model"]["result"]["rows"]
    assert {(r["patches"], r["precision"]) for r in rows} == {(n, p) for n in (64, 128) for p in ("fp32", "bf16")}
    assert all(r["fwd_bwd_s"] > 0 for r in rows)
    ext = read["extract"]["result"]
    assert ext["patches"] > 10 and 0 < ext["pipeline_over_encoder"] <= 1.5
    sim = read["simulate"]["result"]
    assert sim["rounds"] == 1 and len(sim["round_s"]) == 1 and sim["final_heldout"]["n"] > 0


def test_gpu_check_without_an_environment_says_how_to_name_one(tmp_path):
    """No PYTHON, no .venv and no python on PATH that imports tdamil: one line saying to set PYTHON."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    script = repo / "benchmarks" / "gpu_check.sh"
    script.write_text((REPO / "benchmarks" / "gpu_check.sh").read_text())
    script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/bin:/bin"  # a system python3 without tdamil-fl (or none at all)
    probe = subprocess.run(["/usr/bin/env", "python3", "-c", "import tdamil"], capture_output=True, env=env, cwd=tmp_path)
    if probe.returncode == 0:
        pytest.skip("the system python3 has tdamil-fl installed")
    done = subprocess.run([str(script), "--tiny"], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 2 and "PYTHON=" in done.stderr and "Traceback" not in done.stderr
