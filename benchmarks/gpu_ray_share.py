"""Two virtual sites share one GPU under the Ray engine (``resources.num_gpus: 0.5``).

Runs the digits simulation (2 sites, 2 rounds, no baselines) with ``engine: ray`` on a private Ray
instance and reads the sites' ``placement.jsonl``: each message notes its Ray actor's process and the
GPU ids Ray gave it. Recorded in ``benchmarks/results/gpu_check_ray_share.json``: the GPU ids per
site, whether both sites ran on the same GPU, and whether two actors held it at the same time.
Without a CUDA GPU it records the reason and exits 0. Part of ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
OUT_NAME = "gpu_check_ray_share.json"


def main() -> int:
    # the same --out folder as gpu_check.py (other gpu_check options are ignored here)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    OUT = parser.parse_known_args()[0].out / OUT_NAME
    OUT.parent.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        OUT.write_text(json.dumps({"skipped": "no CUDA GPU on this machine"}, indent=2))
        print("ray_share: skipped (no CUDA GPU)")
        return 0
    work = Path("/tmp/tdamil_gpu_ray_share")
    cfg = yaml.safe_load((REPO / "configs" / "sim_digits.yaml").read_text())
    cfg.pop("train", None)  # the device follows resources.num_gpus
    cfg.update(output_dir=str(work / "run"), engine="ray", baselines=False,
               resources={"num_cpus": 1, "num_gpus": 0.5}, ray={"num_gpus": 1, "log_to_driver": False})
    cfg["data"]["digits"]["num_sites"] = 2
    cfg["federation"].update(min_sites=2, rounds=2)
    work.mkdir(parents=True, exist_ok=True)
    (work / "sim.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tdamil.simulation.cli", "--config", str(work / "sim.yaml")],
                          capture_output=True, text=True, timeout=420)
    record: dict = {"returncode": done.returncode, "wall_s": time.perf_counter() - t0,
                    "gpu": torch.cuda.get_device_name(0)}
    if done.returncode:
        record["stderr_tail"] = done.stderr[-2000:]
    else:
        rows = [json.loads(x) for x in (work / "run" / "placement.jsonl").read_text().splitlines()]
        gpus = {r["site"]: sorted({g for row in rows if row["site"] == r["site"] for g in row["gpu_ids"]}) for r in rows}
        record.update(gpu_ids_per_site=gpus, devices=sorted({r["device"] for r in rows}),
                      actors=sorted({r["pid"] for r in rows}),
                      shared_one_gpu=len({g for ids in gpus.values() for g in ids}) == 1 and len(gpus) == 2,
                      two_actors_on_it=len({r["pid"] for r in rows}) == 2)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record, indent=2))
    print("ray_share:", json.dumps({k: v for k, v in record.items() if k != "stderr_tail"}))
    return 0 if done.returncode == 0 and record.get("shared_one_gpu") else 1


if __name__ == "__main__":
    sys.exit(main())
