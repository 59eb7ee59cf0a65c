"""Several extraction processes on one features folder: slide claims, stale claims, and two real
concurrent ``tdamil-extract`` processes on slides written from the real cmu slide's pixels."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tdamil.data.config import DataConfig
from tdamil.data.h5 import read_attrs
from tdamil.wsi.claims import claim_path, try_claim
from tdamil.wsi.extract import ExtractionConfig, extract_site
from tdamil.wsi.reader import open_slide
from tdamil.wsi.testslides import write_pyramid

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CMU = Path(__file__).parent / "data" / "cmu_small_region.svs"
IDS = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """Four 20x slides, each a different 1024 x 1536 region of the real slide."""
    folder = tmp_path_factory.mktemp("slides")
    with open_slide(CMU) as s:
        rgb = s.read_region((0, 0), 0, s.dimensions)
    for i, sid in enumerate(IDS):
        x, y = 512 + 256 * (i % 2), 1024 + 256 * (i // 2)
        write_pyramid(folder / f"{sid}.svs", rgb[y: y + 1536, x: x + 1024], 0.5, (1, 4), fmt="svs")
    return folder


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_claim(features: Path, sid: str, pid: int, host: str, age_s: float = 0.0) -> Path:
    path = claim_path(features, sid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"slide_id": sid, "pid": pid, "host": host, "time": "x"}))
    if age_s:
        past = time.time() - age_s
        os.utime(path, (past, past))
    return path


def test_one_claim_per_slide_and_stale_claims_are_taken_over(tmp_path):
    first = try_claim(tmp_path, "s1")
    assert first is not None and json.loads(first.path.read_text())["pid"] == os.getpid()
    assert try_claim(tmp_path, "s1") is None  # O_EXCL: held
    first.release()
    assert try_claim(tmp_path, "s1") is not None

    _write_claim(tmp_path, "crashed", _dead_pid(), socket.gethostname())
    assert try_claim(tmp_path, "crashed") is not None  # its process is gone
    _write_claim(tmp_path, "remote", 1, "another-host")
    assert try_claim(tmp_path, "remote", stale_s=60) is None  # fresh heartbeat on another machine
    _write_claim(tmp_path, "remote_old", 1, "another-host", age_s=120)
    assert try_claim(tmp_path, "remote_old", stale_s=60) is not None  # heartbeat too old


def test_a_slide_held_by_a_live_process_is_left_to_it_then_retried(slides, tmp_path):
    data = DataConfig(manifest=None, features_dir=tmp_path / "f", slides_dir=slides)  # type: ignore[arg-type]
    cfg = ExtractionConfig(encoder="tiny", batch_size=32, num_workers=0, progress=False, qc=False)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_claim(tmp_path / "f", "a", holder.pid, socket.gethostname())
        summary = extract_site(data, cfg, slide_ids=["a", "b"])
        assert [r.status for r in summary.results] == ["busy", "extracted"] and summary.ok
        assert not (tmp_path / "f" / "a.h5").exists() and not claim_path(tmp_path / "f", "b").exists()
    finally:
        holder.kill()
        holder.wait()
    summary = extract_site(data, cfg, slide_ids=["a", "b"])  # the holder crashed: its claim is stale
    assert [r.status for r in summary.results] == ["extracted", "skipped"]


@pytest.mark.slow
def test_two_concurrent_extract_processes_share_one_folder(slides, tmp_path):
    site = {"site": "s", "data": {"features_dir": str(tmp_path / "features"), "slides_dir": str(slides)},
            "extraction": {"encoder": "tiny", "batch_size": 8, "num_workers": 0, "device": "cpu"}}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(site))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "tdamil.wsi.cli", "--config", str(tmp_path / "site.yaml"), "--no-progress"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    written = {}
    for p, (_, err) in zip(procs, outs):
        for sid in re.findall(r"\] (\w+): \d+ patches \(", err) or re.findall(r"(\w+): \d+ patches \(", err):
            assert sid not in written, f"{sid} written by two processes"
            written[sid] = p.pid
    assert sorted(written) == IDS
    for sid, pid in written.items():  # the file records who wrote it
        assert read_attrs(tmp_path / "features" / f"{sid}.h5")["extracted_by"] == f"{socket.gethostname()}:{pid}"
    assert not list((tmp_path / "features" / ".claims").iterdir())  # every claim released
