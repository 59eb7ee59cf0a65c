"""Per-round overhead of the federation against local training, measured side by side in one run.

A real deployment on 127.0.0.1 (``flwr-server --insecure`` = SuperLink + fleet gateway, two
``tdamil-client`` SuperNodes) trains the DEFAULT model size (TDA-MIL d=512, 2 blocks, 8 heads,
UNI-sized 1024-d features) for a few rounds on synthetic bags. For every round it compares:

* the round's wall time at the coordinator (send global model -> sites train -> replies -> FedAvg),
* the local training time the sites report for the same epoch (``train-seconds``),

the difference being the federation's overhead (fresh ClientApp process per message, model
(de)serialisation, transport through gateway + SuperLink, aggregation). It also measures the
pieces alone: state dict -> ArrayRecord -> bytes and back, and the start of a fresh Python process
importing the ClientApp. Results: ``benchmarks/results/federation.json`` and
``benchmarks/federation.md``.

    python benchmarks/bench_federation.py [--rounds 3] [--bags 16] [--patches 512]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = {"name": "tdamil", "dim": 512, "depth": 2, "num_heads": 8}


def write_sites(root: Path, bags: int, patches: int, dim: int, fleet: int, internal: int, ports: list[int],
                rounds: int) -> dict[str, Path]:
    from tdamil.data.h5 import write_features

    rng = np.random.default_rng(0)
    paths: dict[str, Path] = {}
    (root / "sites").mkdir(parents=True, exist_ok=True)
    for k, site in enumerate(("site_a", "site_b")):
        rows = []
        for i in range(bags):
            label = i % 2
            x = rng.normal(size=(patches, dim)).astype(np.float32)
            x[: patches // 10, :8] += 2.0 * label  # a few informative patches
            sid = f"{site}_{i:03d}"
            write_features(root / site / "features" / f"{sid}.h5", x,
                           np.zeros((patches, 2), dtype=np.int64), {"encoder": "synthetic"})
            rows.append({"slide_id": sid, "patient_id": sid, "label": ["neg", "pos"][label], "split": "train"})
        with open(root / site / "manifest.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        cfg = {"site": site, "data": {"manifest": f"../{site}/manifest.csv", "features_dir": f"../{site}/features"},
               "train": {"device": "cpu", "progress": False},
               "federation": {"superlink": f"127.0.0.1:{fleet}", "runtime_port": ports[k], "extract_missing": False,
                              "max_retries": 3}}
        paths[site] = root / "sites" / f"{site}.yaml"
        paths[site].write_text(yaml.safe_dump(cfg))
    server = {"output_dir": "run", "model": DEFAULT_MODEL, "in_dim": dim, "num_classes": 2,
              "federation": {"rounds": rounds, "local_epochs": 1, "lr": 1e-5, "min_sites": 2, "evaluate_sites": False,
                             "round_timeout_s": 1800, "wait_for_sites_s": 300},
              "checkpoint": {"keep_last": 1}, "superlink": {"address": f"127.0.0.1:{fleet}", "internal_port": internal}}
    paths["server"] = root / "server.yaml"
    paths["server"].write_text(yaml.safe_dump(server))
    return paths


def serialisation_seconds(dim: int, repeats: int = 5) -> dict[str, float]:
    """state dict -> ArrayRecord -> bytes -> ArrayRecord -> state dict, default model size."""
    from tdamil.federation.task import ModelSpec, build_model, load_arrays, model_to_arrays

    model = build_model(ModelSpec(DEFAULT_MODEL, dim, 2))
    to_rec, to_bytes, back = [], [], []
    size = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        rec = model_to_arrays(model)
        t1 = time.perf_counter()
        for a in rec.values():
            a.deflate()
        size = rec.count_bytes()
        t2 = time.perf_counter()
        load_arrays(model, rec)  # bytes held by the record -> numpy -> torch state dict
        t3 = time.perf_counter()
        to_rec.append(t1 - t0)
        to_bytes.append(t2 - t1)
        back.append(t3 - t2)
    return {"model_bytes": size, "params": sum(p.numel() for p in model.parameters()),
            "to_arrayrecord_s": statistics.median(to_rec), "to_bytes_s": statistics.median(to_bytes),
            "from_bytes_and_load_s": statistics.median(back)}


def process_start_seconds(repeats: int = 3) -> float:
    """A fresh Python process importing the ClientApp (Flower runs one per message)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import tdamil.client.client_app"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def deployment(root: Path, args: argparse.Namespace) -> list[dict]:
    from tdamil.federation.processes import ManagedProcess, flower_env, free_port

    fleet, internal, ports = free_port(), free_port(), [free_port(), free_port()]
    paths = write_sites(root, args.bags, args.patches, 1024, fleet, internal, ports, args.rounds)
    env = flower_env(threads=args.threads)
    py = sys.executable
    procs = [ManagedProcess("server", [py, "-m", "tdamil.server.coordinator", "--config", str(paths["server"]),
                                       "--insecure"], root / "server.log", env=env)]
    for site in ("site_a", "site_b"):
        procs.append(ManagedProcess(site, [py, "-m", "tdamil.client.site", "--config", str(paths[site]), "--insecure",
                                           "--state-dir", str(root / "state" / site)], root / f"{site}.log", env=env))
    try:
        deadline = time.monotonic() + args.timeout
        while procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        if procs[0].poll() != 0:
            raise RuntimeError(f"coordinator did not finish:\n{procs[0].tail(40)}")
    finally:
        for p in reversed(procs):
            p.stop()
    events = [json.loads(x) for x in (root / "run" / "audit.jsonl").read_text().splitlines()]
    rounds = []
    for r in range(1, args.rounds + 1):
        fin = next(e for e in events if e["event"] == "round_finished" and e["round"] == r)
        replies = [e for e in events if e["event"] == "reply" and e["round"] == r and e["phase"] == "train"]
        train = max(e["metrics"]["train-seconds"] for e in replies)
        rounds.append({"round": r, "round_s": fin["seconds"], "local_train_s": train,
                       "overhead_s": fin["seconds"] - train, "payload_bytes": replies[0]["payload_bytes"]})
    return rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bags", type=int, default=16, help="training bags per site")
    parser.add_argument("--patches", type=int, default=512, help="patches per bag")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/tdamil_bench_federation"))
    args = parser.parse_args()
    import shutil

    shutil.rmtree(args.work_dir, ignore_errors=True)
    torch.set_num_threads(args.threads)
    ser = serialisation_seconds(1024)
    start = process_start_seconds()
    rounds = deployment(args.work_dir, args)
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
                         f"{__import__('os').cpu_count()} cores", "args": {k: str(v) for k, v in vars(args).items()},
              "model": DEFAULT_MODEL, "serialisation": ser, "process_start_s": start, "rounds": rounds}
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "federation.json").write_text(json.dumps(result, indent=2))
    steady = rounds[1:] or rounds
    mean = lambda k: statistics.mean(r[k] for r in steady)  # noqa: E731
    lines = [
        "# Federation overhead per round (real processes on 127.0.0.1)",
        "",
        f"`python benchmarks/bench_federation.py --rounds {args.rounds} --bags {args.bags} --patches {args.patches}` "
        f"on {result['machine']}. Default model size: TDA-MIL d=512, 2 blocks, 8 heads, 1024-d features "
        f"({ser['params']:,} parameters; {ser['model_bytes'] / 2**20:.1f} MiB of arrays, {rounds[0]['payload_bytes'] / 2**20:.1f} MiB per site reply). Two sites, "
        f"{args.bags} training bags of {args.patches} patches each, 1 local epoch per round, site evaluation off.",
        "",
        "| round | round wall time (s) | local training, slowest site (s) | overhead (s) | overhead / training |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rounds:
        lines.append(f"| {r['round']} | {r['round_s']:.2f} | {r['local_train_s']:.2f} | {r['overhead_s']:.2f} | "
                     f"{r['overhead_s'] / r['local_train_s']:.2f} |")
    lines += [
        "",
        f"Steady state (rounds 2+): overhead {mean('overhead_s'):.2f} s per round against "
        f"{mean('local_train_s'):.2f} s of local training ({mean('overhead_s') / mean('local_train_s'):.2f}x).",
        "",
        "Where the overhead goes (measured alone, same machine):",
        "",
        f"- fresh ClientApp process (Python start + imports; Flower 1.42 starts one per message): "
        f"{start:.2f} s",
        f"- state dict -> ArrayRecord {ser['to_arrayrecord_s'] * 1e3:.1f} ms, -> bytes "
        f"{ser['to_bytes_s'] * 1e3:.1f} ms (Flower's deflate), ArrayRecord -> loaded model {ser['from_bytes_and_load_s'] * 1e3:.1f} ms",
        "- the rest: the site reading its features and building the model in the new process, the "
        "held-out-free aggregation and checkpoint at the coordinator, SuperLink/gateway polling.",
        "",
        "The overhead is roughly constant per round, so with real cohorts (hundreds of slides of 5k-100k "
        "patches per site, minutes to hours per local epoch) it becomes negligible; on tiny local epochs it "
        "dominates, which argues for more local epochs per round rather than more rounds.",
    ]
    (REPO / "benchmarks" / "federation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
