"""Compressed replies in the main job's simulation: held-out AUROC and bytes per reply per codec.

Runs the main job's ``configs/sim_digits.yaml`` (its hospitals and held-out cohort, rounds and
local epochs) once per seed and ``federation.update_codec`` (fp32, fp16, fp16-delta), without the
baselines, and reads each run's audit: the held-out AUROC of the final model, the site
evaluation of the final model, and the bytes of every train reply as it travelled. Writes
``codec_results.json`` and a Markdown table (``codec_results.md``: per seed, then per codec over
seeds with the paired difference to fp32, mean +- sd and its 95 % CI) to ``--out``.

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


CONTROL = "fp32-ulp"  # not a codec: fp32 replies with every value moved by one unit in the last place


def _use_ulp_control(seed: int = 12345) -> None:
    """The control for the codecs: every train reply, as the coordinator opens it, moves each value
    one unit in the last place up or down at random (a relative change of ~1e-7, far below fp16's
    ~5e-4). Whatever AUROC difference this leaves to fp32 is the trajectory's sensitivity to any
    perturbation, not a codec's doing. In this process only (the runs go with one seed worker)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from tdamil.federation import intake
    from tdamil.federation.wire import ARRAYS

    rng = np.random.default_rng(seed)
    opened = intake.open_reply

    def open_reply(reply, layout, codec, base):
        problem = opened(reply, layout, codec, base)
        if problem is None and ARRAYS in reply.content.array_records:
            moved = {}
            for name, arr in reply.content[ARRAYS].items():
                x = arr.numpy()
                if x.dtype == np.float32:
                    toward = np.where(rng.random(x.shape) < 0.5, -np.inf, np.inf).astype(np.float32)
                    x = np.nextafter(x, toward)  # both float32: one float32 ulp
                moved[name] = Array(x)
            reply.content[ARRAYS] = ArrayRecord(moved)
        return problem

    intake.open_reply = open_reply


def _mean_sd_ci(values: list[float]) -> str:
    """mean +- sd and the 95 % t interval of the mean over seeds."""
    from scipy.stats import t

    m = statistics.mean(values)
    if len(values) < 2:
        return f"{m:+.4f} (one seed)"
    sd = statistics.stdev(values)
    half = t.ppf(0.975, len(values) - 1) * sd / len(values) ** 0.5
    return f"{m:+.4f} +- {sd:.4f} (95 % CI {m - half:+.4f} to {m + half:+.4f})"


def _summary(results: dict[str, dict[int, dict]]) -> list[str]:
    """Per codec over seeds: held-out AUROC and the sites' mean AUROC of the final model, and their
    paired differences to fp32 (mean +- sd, 95 % CI of the mean)."""
    ref = results.get("fp32")
    lines = ["| codec | seeds | held-out AUROC | - fp32 (paired over seeds) | site-mean AUROC | - fp32 (paired) | "
             "largest abs. held-out difference |", "|---|---|---|---|---|---|---|"]
    for codec, per_seed in results.items():
        seeds = sorted(per_seed)
        held = [statistics.mean(per_seed[s]["heldout_auroc"].values()) for s in seeds]
        site = [statistics.mean(v for v in per_seed[s]["site_eval_auroc"].values() if v is not None) for s in seeds]
        if ref is None or codec == "fp32":
            dh = ds = "-"
            worst = "-"
        else:
            ref_held = [statistics.mean(ref[s]["heldout_auroc"].values()) for s in seeds]
            ref_site = [statistics.mean(v for v in ref[s]["site_eval_auroc"].values() if v is not None) for s in seeds]
            diffs = [a - b for a, b in zip(held, ref_held)]
            dh, ds = _mean_sd_ci(diffs), _mean_sd_ci([a - b for a, b in zip(site, ref_site)])
            worst = f"{max(abs(d) for d in diffs):.4f}"
        sd_h = statistics.stdev(held) if len(held) > 1 else 0.0
        sd_s = statistics.stdev(site) if len(site) > 1 else 0.0
        lines.append(f"| {codec} | {len(seeds)} | {statistics.mean(held):.4f} +- {sd_h:.4f} | {dh} | "
                     f"{statistics.mean(site):.4f} +- {sd_s:.4f} | {ds} | {worst} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    from tdamil.logs import setup_logging
    from tdamil.simulation.cli import simulate
    from tdamil.simulation.config import load_sim_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "sim_digits.yaml"))
    parser.add_argument("--codecs", default="fp32,fp16,fp16-delta",
                        help=f"comma-separated; {CONTROL} is the control (fp32 replies moved by one ulp), run last")
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
        workers = args.seed_workers
        if codec == CONTROL:
            _use_ulp_control()
            workers = 1  # the patch lives in this process
        cfg = load_sim_config(args.config, {"federation.update_codec": "fp32" if codec == CONTROL else codec,
                                            "baselines": False, "seeds": seeds, "seed_workers": workers, **extra})
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
    lines += ["", *_summary(results)]
    (out / "codec_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
