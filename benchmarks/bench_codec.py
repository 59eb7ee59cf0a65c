"""Compressed replies in the main job's simulation: held-out AUROC and bytes per reply per codec.

Runs ``configs/sim_digits.yaml`` (three hospitals and a held-out fourth, 5 rounds x 4 local
epochs) once per seed and ``federation.update_codec`` (fp32, fp16, fp16-delta), without the
baselines, and reads each run's audit: the held-out AUROC of the final model, the site
evaluation of the final model, and the bytes of every train reply as it travelled. Writes
``codec_results.json`` and a Markdown table (``codec_results.md``) to ``--out``.

    nice -n 10 .venv/bin/python benchmarks/bench_codec.py --out runs/bench_codec
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _read(run: Path) -> dict:
    from tdamil.federation.audit import read_audit

    events = read_audit(run / "audit.jsonl")
    heldout = [e for e in events if e["event"] == "heldout_evaluation"]
    last = max(e["round"] for e in heldout)
    final = {e["cohort"]: e["metrics"]["auroc"] for e in heldout if e["round"] == last}
    sites = [e for e in events if e["event"] == "site_evaluation" and e["round"] == last]
    replies = [e["payload_bytes"] for e in events if e["event"] == "reply" and e["phase"] == "train"]
    failures = [e["reason"] for e in events if e["event"] == "failure"]
    return {"heldout_auroc": final, "round": last, "replies": len(replies), "reply_bytes_mean": statistics.mean(replies),
            "reply_bytes_max": max(replies), "site_eval_auroc": {e["site"]: e["metrics"].get("auroc") for e in sites},
            "site_eval_via": sorted({e["via"] for e in sites}), "failures": failures}


def main(argv: list[str] | None = None) -> int:
    from tdamil.logs import setup_logging
    from tdamil.simulation.cli import simulate
    from tdamil.simulation.config import load_sim_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "sim_digits.yaml"))
    parser.add_argument("--codecs", default="fp32,fp16,fp16-delta")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--seed-workers", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench_codec"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a further config override (YAML value), e.g. torch_threads=2: a float-noise control")
    args = parser.parse_args(argv)
    setup_logging(False)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out).resolve()
    results: dict[str, dict[int, dict]] = {}
    for codec in args.codecs.split(","):
        extra = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
        cfg = load_sim_config(args.config, {"federation.update_codec": codec, "baselines": False, "seeds": seeds,
                                            "seed_workers": args.seed_workers, **extra})
        t0 = time.perf_counter()
        simulate(cfg, out_dir=out / codec)
        print(f"{codec}: {time.perf_counter() - t0:.0f} s", flush=True)
        results[codec] = {s: _read(out / codec / f"seed_{s}") for s in seeds}
    (out / "codec_results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    ref = results.get("fp32")
    lines = ["| codec | seed | held-out AUROC | - fp32 | bytes per train reply (mean) | x fp32 | site evaluation of the "
             "final model (AUROC per site) | failures |", "|---|---|---|---|---|---|---|---|"]
    for codec, per_seed in results.items():
        for seed, r in per_seed.items():
            auroc = statistics.mean(r["heldout_auroc"].values())
            base = statistics.mean(ref[seed]["heldout_auroc"].values()) if ref else float("nan")
            ratio = r["reply_bytes_mean"] / ref[seed]["reply_bytes_mean"] if ref else float("nan")
            sites = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["site_eval_auroc"].items()) if v is not None)
            lines.append(f"| {codec} | {seed} | {auroc:.4f} | {auroc - base:+.4f} | {r['reply_bytes_mean']:.0f} | "
                         f"{ratio:.3f} | {sites} | {len(r['failures'])} |")
    (out / "codec_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
