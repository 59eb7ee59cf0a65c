"""How the simulation's memory and time grow with the number of sites and of slides.

Synthetic UNI-sized features (1024-d, fp16, ``--patches`` patches per slide) are written as
TRIDENT-layout h5 files with a manifest whose ``cohort`` column makes the sites; each configuration
then runs ``tdamil-simulate``'s code (``engine: inprocess`` and ``engine: ray``, a private Ray
instance with 1 CPU per site) in a fresh process, which reports:

* the driver's peak RSS (VmHWM) and each Ray actor's peak RSS (sampled from /proc while it runs),
* seconds per round: round 2 (start-up excluded), from the audit log's round_started times, as
  wall time and as CPU seconds of the driver + actors (the shared cores make wall time noisy).

Sweeps: sites 1, 3, 6 at ``--slides`` slides per site; slides x0.5, x1, x2 at 3 sites. Results:
``benchmarks/results/scale.json`` (+ the table printed for ``benchmarks/scale.md``). The synthetic
data are deleted afterwards unless ``--keep``.

    python benchmarks/bench_scale.py [--patches 8192] [--slides 20] [--root /tmp/tdamil_scale]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# ABMIL by default: its cost is linear in the patches, so the time measures the data path (reading,
# fp16 -> fp32, one bag per site in memory); TDA-MIL's attention cost per bag is in attention.md.
MODELS = {"abmil": {"name": "abmil", "dim": 32, "attn_dim": 16},
          "tdamil": {"name": "tdamil", "dim": 32, "depth": 1, "num_heads": 2}}
SPLITS = ("val", "test")  # the first slides of a site; the rest train


def write_data(root: Path, slides_per_site: dict[int, int], patches: int, dim: int) -> float:
    """``root/features/site<s>_<i>.h5`` (fp16, TRIDENT layout); returns the GB in the folder."""
    import h5py

    feats = root / "features"
    feats.mkdir(parents=True, exist_ok=True)
    # One random block, shifted per slide: drawing fresh normals for every slide costs minutes of
    # CPU on 2 cores and changes nothing about memory or time per round.
    base = np.random.default_rng(0).standard_normal((patches, dim), dtype=np.float32).astype(np.float16)
    coords = np.stack([np.arange(patches) % 128, np.arange(patches) // 128], 1).astype(np.int64) * 256
    for s, slides in slides_per_site.items():
        for i in range(slides):
            path = feats / f"site{s}_{i:03d}.h5"
            x = np.roll(base, s * 97 + i, axis=0)
            x[:, :8] += np.float16(0.5 * (i % 2))  # a weak label signal
            with h5py.File(path.with_suffix(".tmp"), "w") as f:
                f.create_dataset("features", data=x, chunks=(min(1024, patches), dim))
                f.create_dataset("coords", data=coords)
                f.attrs.update({"patch_size": 256, "encoder": "synthetic-uni-sized"})
            path.with_suffix(".tmp").rename(path)
    return sum(f.stat().st_size for f in feats.glob("*.h5")) / 1e9


def write_manifest(root: Path, sites: int, slides: int) -> Path:
    lines = ["slide_id,patient_id,label,cohort,split"]
    for s in range(sites):
        for i in range(slides):
            split = SPLITS[i] if i < len(SPLITS) else "train"
            lines.append(f"site{s}_{i:03d},p{s}_{i},{'pos' if i % 2 else 'neg'},site{s},{split}")
    path = root / f"manifest_{sites}x{slides}.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- child
def _peak_kb(pid: int | str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cpu_s(pid: int | str) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0.0


def _watch(peaks: dict[int, int], cpu: dict[int, float], samples: list, stop: threading.Event) -> None:
    """Peak RSS and CPU seconds of this process's Ray actors (children of the raylet we started),
    and (time, CPU seconds of the driver + actors) samples: CPU time per round does not depend on
    what else the shared cores are doing, wall time does."""
    while not stop.wait(0.5):
        for pid in _descendants(os.getpid()):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::ClientAppActor"):
                peaks[pid] = max(peaks.get(pid, 0), _peak_kb(pid))
                cpu[pid] = max(cpu.get(pid, 0.0), _cpu_s(pid))
        samples.append((time.time(), _cpu_s("self") + sum(cpu.values())))


def run_one(spec: dict) -> dict:
    """One configuration, in this (fresh) process."""
    from tdamil.simulation.cli import simulate
    from tdamil.simulation.config import load_sim_config

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "sim.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump({
        "output_dir": str(out), "model": MODELS[spec["model"]], "baselines": False, "engine": spec["engine"],
        "data": {"source": "manifest", "manifest": {"data": {"manifest": spec["manifest"],
                                                             "features_dir": spec["features"]}}},
        "federation": {"rounds": 2, "lr": 1e-3, "min_sites": spec["sites"], "round_timeout_s": 3600, "wait_for_sites_s": 600},
        "resources": {"num_cpus": 1, "num_gpus": 0},
        "ray": {"log_to_driver": False},
        "train": {"progress": False, "mixed_precision": False},
    }))
    peaks: dict[int, int] = {}
    cpu: dict[int, float] = {}
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(peaks, cpu, samples, stop), daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    simulate(load_sim_config(cfg_path))
    total = time.perf_counter() - t0
    stop.set()
    watcher.join()
    starts = [datetime.fromisoformat(e["time"]) for e in map(json.loads, (out / "audit.jsonl").read_text().splitlines())
              if e["event"] in ("round_started", "run_finished")]
    rounds = [(b - a).total_seconds() for a, b in zip(starts, starts[1:])]

    def cpu_at(t: datetime) -> float:
        return next((c for ts, c in samples if ts >= t.timestamp()), samples[-1][1])

    cpu_rounds = [cpu_at(b) - cpu_at(a) for a, b in zip(starts, starts[1:])]
    return {**{k: spec[k] for k in ("engine", "model", "sites", "slides")}, "patches": spec["patches"],
            "driver_peak_mb": _peak_kb("self") / 1024, "actor_peak_mb": sorted(v / 1024 for v in peaks.values()),
            "round_seconds": rounds, "round_cpu_seconds": cpu_rounds, "total_seconds": total}


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/tdamil_scale"))
    ap.add_argument("--patches", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--slides", type=int, default=20, help="slides per site in the sites sweep")
    ap.add_argument("--engines", default="inprocess,ray")
    ap.add_argument("--model", choices=sorted(MODELS), default="abmil")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic features")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode: one configuration as JSON
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    configs = [(n, args.slides) for n in (1, 3, 6)] + [(3, args.slides // 2), (3, 2 * args.slides)]
    t0 = time.perf_counter()
    per_site = {s: (2 * args.slides if s < 3 else args.slides) for s in range(6)}
    gb = write_data(args.root, per_site, args.patches, args.dim)
    print(f"synthetic features: {gb:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
    results = []
    try:
        for engine in args.engines.split(","):
            for sites, slides in configs:
                spec = {"engine": engine, "model": args.model, "sites": sites, "slides": slides, "patches": args.patches,
                        "manifest": str(write_manifest(args.root, sites, slides)),
                        "features": str(args.root / "features"), "out": str(args.root / f"run_{engine}_{sites}x{slides}")}
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                res = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True,
                                     text=True, timeout=3600, env=env)
                line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
                if res.returncode or not line:
                    raise SystemExit(f"{engine} {sites}x{slides} failed:\n{res.stderr[-3000:]}")
                results.append(json.loads(line[0][7:]))
                r = results[-1]
                print(f"{engine:9s} sites={sites} slides={slides:3d}: driver {r['driver_peak_mb']:.0f} MB, actors "
                      f"{[round(a) for a in r['actor_peak_mb']]} MB, round 2 {r['round_seconds'][-1]:.1f} s "
                      f"({r['round_cpu_seconds'][-1]:.1f} CPU s)", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                                    "gb_written": gb, "model": MODELS[args.model], "results": results}, indent=1))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
