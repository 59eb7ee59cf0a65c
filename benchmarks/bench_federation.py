"""Where a federated round's time goes, and the older path measured side by side (issue #10).

Real processes on 127.0.0.1 (``flwr-server --insecure`` + two ``tdamil-client`` SuperNodes); each
round's ``round_timeline`` audit line (:mod:`tdamil.federation.timeline`) gives the seconds per
segment, summing to the round's wall time.

    python benchmarks/bench_federation.py demo [--rounds 4]
        the README's demo federation (digits bags, tiny model, held-out cohort, site evaluation),
        run with this code's path and with the older path (``evaluate_with_train: false``: a train
        and an evaluate message per site per round; replies pulled every 3 s as Flower's grid does;
        SuperExec task poll at Flower's 1 s; sites with ``warm_start: false``, a fresh
        ``flwr-clientapp`` process per message, and the SuperNode's idle poll at Flower's 3 s),
        alternating, in one run on the same machine.
    python benchmarks/bench_federation.py default [--rounds 2 --bags 4 --patches 5000]
        the default model size (TDA-MIL d=512, 2 blocks, 8 heads, 1024-d features) on synthetic
        bags of 5k patches: per-round overhead against local training.
    python benchmarks/bench_federation.py sim [--rounds 3]
        the same timeline for the in-process and Ray simulation engines (they share the apps).
    python benchmarks/bench_federation.py imports
        ``python -X importtime`` of the ClientApp module: total and the largest imports.

Each writes ``benchmarks/results/federation_<mode>.json`` and prints markdown for
``benchmarks/federation.md``. The load average is recorded with every figure: the development
machine is shared.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_MODEL = {"name": "tdamil", "dim": 512, "depth": 2, "num_heads": 8}
OLD_PATH = {"evaluate_with_train": False, "reply_poll_s": 3.0}
# a fresh flwr-clientapp process per message, and Flower's 3 s idle poll (the reply wait stays at this
# code's 0.1 s instead of Flower's 0.5 s: in the older path's favour)
OLD_SITE = {"warm_start": False, "poll_interval_s": 3.0}
SHOWN = ("configure", "wait + spawn", "python + flower start", "app imports", "open data", "build model",
         "evaluate global", "train", "evaluate local", "push + poll", "aggregate", "site evaluate message",
         "held-out evaluation", "checkpoint")


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores"


def read_events(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "audit.jsonl").read_text().splitlines() if x.strip()]


def timelines(run: Path) -> list[dict]:
    return [e for e in read_events(run) if e["event"] == "round_timeline"]


def deploy(root: Path, server_yaml: Path, sites: dict[str, Path], timeout: float, env_extra: dict) -> Path:
    """Run coordinator + sites until the coordinator exits; returns the run's output folder."""
    from tdamil.federation.processes import ManagedProcess, flower_env

    env = {**flower_env(threads=1), **env_extra}
    py = sys.executable
    procs = [ManagedProcess("server", [py, "-m", "tdamil.server.coordinator", "--config", str(server_yaml),
                                       "--insecure"], root / "server.log", env=env)]
    for site, path in sites.items():
        procs.append(ManagedProcess(site, [py, "-m", "tdamil.client.site", "--config", str(path), "--insecure",
                                           "--no-extract", "--state-dir", str(root / "state" / site)],
                                    root / f"{site}.log", env=env))
    try:
        deadline = time.monotonic() + timeout
        while procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        if procs[0].poll() != 0:
            raise RuntimeError(f"coordinator did not finish:\n{procs[0].tail(40)}")
    finally:
        for p in reversed(procs):
            p.stop()
    return server_yaml.parent / yaml.safe_load(server_yaml.read_text())["output_dir"]


def _set_federation(server_yaml: Path, **fed) -> None:
    cfg = yaml.safe_load(server_yaml.read_text())
    cfg["federation"].update(fed)
    server_yaml.write_text(yaml.safe_dump(cfg, sort_keys=False))


def summarise(lines: list[dict]) -> dict:
    cols = {name: statistics.median(line["columns"][name] for line in lines) for name in lines[0]["columns"]}
    return {"round_s": [line["seconds"] for line in lines], "median_round_s": statistics.median(
        line["seconds"] for line in lines), "median_columns": cols}


def table(rows: list[tuple[str, dict]]) -> list[str]:
    """Markdown: one row per (label, round timeline); the columns sum to the round time."""
    head = ["round"] + list(SHOWN) + ["unaccounted / polling", "round time"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for label, line in rows:
        cols = line["columns"]
        other = cols["unaccounted"] + cols["flower -> handler"] + cols["serialise reply"]
        cells = [f"{cols[k]:.2f}" for k in SHOWN] + [f"{other:.2f}", f"**{line['seconds']:.2f}**"]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


# ------------------------------------------------------------------------------------------------
def run_demo(args: argparse.Namespace) -> dict:
    from tdamil.federation.demo import write_demo_federation
    from tdamil.net import free_port

    results: dict[str, dict] = {}
    order = ["new", "old"] * args.repeats
    for i, path in enumerate(order):
        root = args.work_dir / f"demo_{path}_{i}"
        shutil.rmtree(root, ignore_errors=True)
        fleet, internal = free_port(), free_port()
        files = write_demo_federation(root, superlink=f"127.0.0.1:{fleet}", internal_port=internal,
                                      runtime_ports=[free_port(), free_port()], secure=False,
                                      federation={"rounds": args.rounds})
        if path == "old":
            _set_federation(files["server"], **OLD_PATH)
            for name, site_yaml in files.items():
                if name != "server":
                    _set_federation(site_yaml, **OLD_SITE)
        env = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0"} if path == "old" else {}
        before = load()
        run = deploy(root, files["server"], {k: v for k, v in files.items() if k != "server"}, args.timeout, env)
        lines = timelines(run)
        entry = results.setdefault(path, {"runs": []})
        entry["runs"].append({"load_before": before, "load_after": load(), "timelines": lines})
        print(f"{path}: rounds {[round(x['seconds'], 2) for x in lines]} (load {before} -> {load()})", flush=True)
    for entry in results.values():
        entry.update(summarise([line for run in entry["runs"] for line in run["timelines"]]))
    results["ratio_new_over_old"] = results["new"]["median_round_s"] / results["old"]["median_round_s"]
    return results


def demo_markdown(res: dict, args: argparse.Namespace) -> list[str]:
    lines = [f"Median round: this path {res['new']['median_round_s']:.2f} s, older path "
             f"{res['old']['median_round_s']:.2f} s: **{res['ratio_new_over_old']:.2f}x** "
             f"({args.rounds} rounds x {args.repeats} run(s) each, alternating; load averages "
             f"{', '.join(r['load_before'] for p in ('new', 'old') for r in res[p]['runs'])}).", ""]
    rows = []
    for path in ("old", "new"):
        for run in res[path]["runs"][:1]:
            rows += [(f"{path} r{t['round']}", t) for t in run["timelines"]]
    return lines + table(rows)


def write_sites(root: Path, bags: int, patches: int, dim: int, fleet: int, internal: int, ports: list[int],
                rounds: int) -> dict[str, Path]:
    from tdamil.data.h5 import write_features

    rng = np.random.default_rng(0)
    paths: dict[str, Path] = {}
    (root / "sites").mkdir(parents=True, exist_ok=True)
    for k, site in enumerate(("site_a", "site_b")):
        rows = []
        for i in range(bags + 2):
            label = i % 2
            x = rng.normal(size=(patches, dim)).astype(np.float32)
            x[: patches // 10, :8] += 2.0 * label  # a few informative patches
            sid = f"{site}_{i:03d}"
            write_features(root / site / "features" / f"{sid}.h5", x,
                           np.zeros((patches, 2), dtype=np.int64), {"encoder": "synthetic"})
            rows.append({"slide_id": sid, "patient_id": sid, "label": ["neg", "pos"][label],
                         "split": "train" if i < bags else "val"})
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
              "federation": {"rounds": rounds, "local_epochs": 1, "lr": 1e-5, "min_sites": 2,
                             "round_timeout_s": 3600, "wait_for_sites_s": 600},
              "checkpoint": {"keep_last": 1}, "superlink": {"address": f"127.0.0.1:{fleet}", "internal_port": internal}}
    paths["server"] = root / "server.yaml"
    paths["server"].write_text(yaml.safe_dump(server))
    return paths


def run_default(args: argparse.Namespace) -> dict:
    from tdamil.net import free_port

    root = args.work_dir / "default"
    shutil.rmtree(root, ignore_errors=True)
    paths = write_sites(root, args.bags, args.patches, 1024, free_port(), free_port(), [free_port(), free_port()],
                        args.rounds)
    before = load()
    run = deploy(root, paths["server"], {k: v for k, v in paths.items() if k != "server"}, args.timeout, {})
    lines = timelines(run)
    res = {"load_before": before, "load_after": load(), "timelines": lines, **summarise(lines)}
    # overhead = everything but work: the critical site's training, its validation passes (the incoming
    # global model's and the trained one's) and, in the last round, the one evaluation of the final
    # model by every site (a separate message, once per run)
    for line in lines:
        c = line["columns"]
        line["overhead_s"] = (line["seconds"] - c["train"] - c["evaluate global"] - c["evaluate local"]
                              - c["site evaluate message"])
    res["overhead_s"] = statistics.median(line["overhead_s"] for line in lines)
    res["train_s"] = statistics.median(line["columns"]["train"] for line in lines)
    res["overhead_of_training"] = res["overhead_s"] / res["train_s"]
    res["overhead_at_60s_epoch"] = res["overhead_s"] / 60.0
    return res


def default_markdown(res: dict, args: argparse.Namespace) -> list[str]:
    return [f"{args.bags} training bags of {args.patches} patches per site (+2 validation bags), 1 local epoch; "
            f"load average {res['load_before']} -> {res['load_after']}.", ""] + table(
        [(f"r{t['round']}", t) for t in res["timelines"]]) + [
        "", f"Per-round overhead (round time minus the critical site's training, its two validation passes "
            f"and the last round's evaluation of the final model; median over rounds): **{res['overhead_s']:.2f} s** "
            f"against {res['train_s']:.2f} s of training: **{100 * res['overhead_of_training']:.1f} %** "
            f"({100 * res['overhead_at_60s_epoch']:.1f} % of a 60 s epoch)."]


def run_sim(args: argparse.Namespace) -> dict:
    out: dict[str, dict] = {}
    for engine in ("inprocess", "ray"):
        run = args.work_dir / f"sim_{engine}"
        shutil.rmtree(run, ignore_errors=True)
        before = load()
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "tdamil.simulation.cli", "--config",
                               str(REPO / "configs" / "sim_digits.yaml"), "--engine", engine, "--rounds",
                               str(args.rounds), "--output-dir", str(run), "--no-baselines", "--folds", "0"],
                              capture_output=True, text=True, timeout=args.timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            out[engine] = {"error": done.stderr[-2000:]}
            continue
        runs = sorted(run.rglob("audit.jsonl"))
        lines = timelines(runs[0].parent)
        out[engine] = {"load_before": before, "wall_s": time.perf_counter() - t0, "timelines": lines,
                       **summarise(lines)}
    return out


def sim_markdown(res: dict, args: argparse.Namespace) -> list[str]:
    rows, lines = [], []
    for engine in ("inprocess", "ray"):
        if "error" in res[engine]:
            lines.append(f"- {engine}: failed: `{res[engine]['error'].splitlines()[-1]}`")
            continue
        lines.append(f"- {engine}: median round {res[engine]['median_round_s']:.2f} s, whole command "
                     f"{res[engine]['wall_s']:.1f} s (load {res[engine]['load_before']})")
        rows += [(f"{engine} r{t['round']}", t) for t in res[engine]["timelines"]]
    return lines + [""] + table(rows)


def run_imports(args: argparse.Namespace) -> dict:
    res: dict = {"load_before": load()}
    totals = []
    for _ in range(args.repeats):
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import tdamil.client.client_app"],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        top: dict[str, float] = {}
        total = float("nan")
        for line in done.stderr.splitlines():
            if not line.startswith("import time:"):
                continue
            _own, cum, name = line[len("import time:"):].split("|")
            depth = (len(name) - len(name.lstrip()) - 1) // 2  # importtime indents 2 spaces per level
            if not cum.strip().isdigit():
                continue
            if name.strip() == "tdamil.client.client_app":
                total = int(cum) / 1e6
            elif depth in (1, 2):  # what client_app imports, one level down too
                top[name.strip()] = int(cum) / 1e6
        totals.append(total)
        res["top_level_s"] = dict(sorted(top.items(), key=lambda kv: -kv[1])[:8])
    res["total_s"] = statistics.median(totals)
    res["load_after"] = load()
    return res


def imports_markdown(res: dict, args: argparse.Namespace) -> list[str]:
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in res["top_level_s"].items())
    return [f"`python -X importtime -c 'import tdamil.client.client_app'`: {res['total_s']:.2f} s "
            f"(median of {args.repeats}; load {res['load_before']} -> {res['load_after']}); top level: {parts}."]


MODES = {"demo": (run_demo, demo_markdown), "default": (run_default, default_markdown),
         "sim": (run_sim, sim_markdown), "imports": (run_imports, imports_markdown)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="demo: runs per path; imports: repetitions")
    parser.add_argument("--bags", type=int, default=4, help="default: training bags per site")
    parser.add_argument("--patches", type=int, default=5000, help="default: patches per bag")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/tdamil_bench_federation"))
    args = parser.parse_args()
    run, markdown = MODES[args.mode]
    res = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "result": res}
    (RESULTS / f"federation_{args.mode}.json").write_text(json.dumps(record, indent=2))
    print("\n".join(markdown(res, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
