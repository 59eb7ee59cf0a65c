"""One faulty site among five: held-out AUROC per aggregation rule and attack (benchmarks/robustness.md).

Five non-IID digits sites and a held-out cohort run the real ServerApp and ClientApps in process
(tiny TDA-MIL, 4 rounds); from round 1 on, site_e sends a sign-flipped update (``2 w_global - w``),
an update scaled by 10 or by 1e6, or all-zero weights. Two baselines per rule and seed: site_e
honest (``none``) and site_e absent (``absent``: NaN weights, refused by the message contract, so
the other four sites aggregate alone: what a perfect detector would leave). The issue's bar is
|delta AUROC| <= 0.02 against the honest run; the delta against the absent run is the attack's own
effect beyond losing site_e's data.

Each rule runs with the project's screens (``+ screens``, the default deployment) or without them
(``screens off``: the rule's own robustness). Every federation is one process with one torch thread
(``--jobs`` at a time); each result is appended to ``<out>.runs.jsonl`` together with what the
screens saw in each round (norm ratios, cosines, who was dropped), and a rerun reuses results whose
configuration and screening code are unchanged.

    .venv/bin/python benchmarks/bench_robustness.py --seeds 0 1 2 --jobs 2
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SITES = ["site_a", "site_b", "site_c", "site_d", "site_e"]
SCREENS_OFF = {"update_norm_factor": None, "update_min_cosine": None}
# Krum and MultiKrum with f=1 need n >= 2f + 3 = 5 replies every round: with five sites, a round in
# which one site is refused (or absent) cannot aggregate, so they run with min_replies 5
ROBUST = {
    "fedmedian": {"strategy": "fedmedian"},
    "fedtrimmedavg (beta 0.2)": {"strategy": "fedtrimmedavg", "trim_beta": 0.2},
    "krum (f=1)": {"strategy": "krum", "faulty_sites": 1, "min_replies": 5},
    "multikrum (f=1, 3 kept)": {"strategy": "multikrum", "faulty_sites": 1, "krum_select": 3, "min_replies": 5},
}
RULES = {"fedavg + screens": {"strategy": "fedavg"}, "fedavg, screens off": {"strategy": "fedavg"} | SCREENS_OFF}
for _name, _rule in ROBUST.items():
    RULES[f"{_name} + screens"] = dict(_rule)
    RULES[f"{_name}, screens off"] = _rule | SCREENS_OFF
ATTACKS = ["sign-flipped", "scaled x10", "scaled x1e6", "all-zero weights"]
CODE = ["tdamil/federation/screening.py", "tdamil/federation/strategies.py"]  # a change here reruns


def attack(name: str):
    from flwr.app import Array, ArrayRecord

    def edit(reply, fn) -> None:
        arrays = {k: a.numpy() for k, a in reply.content["arrays"].items()}
        reply.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(fn(k, v) if v.dtype.kind == "f" else v))
                                               for k, v in arrays.items()})

    def tamper(msg, reply) -> None:
        if msg.metadata.message_type != "train" or reply.has_error():
            return
        received = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        if name == "sign-flipped":
            edit(reply, lambda k, v: 2 * received[k] - v)
        elif name.startswith("scaled x"):
            factor = float(name.split("x", 1)[1])
            edit(reply, lambda k, v: received[k] + factor * (v - received[k]) if factor < 100 else v * factor)
        elif name == "all-zero weights":
            edit(reply, lambda k, v: np.zeros_like(v))
        elif name == "absent":  # NaN weights: refused by the message contract, so site_e counts for nothing
            edit(reply, lambda k, v: np.full_like(v, np.nan))
        else:
            raise ValueError(f"unknown attack {name!r}")
    return tamper


def _watch_screens(seen: list[list[dict]]) -> None:
    """Record, per train round, what the screens saw: each site's norm over the others' median,
    its cosine with the others' mean and whether it was kept (only the benchmark's process)."""
    from tdamil.federation import intake, screening
    from tdamil.federation.records import reply_site

    screen = screening.screen_updates

    def watched(global_arrays, replies, *args, **kwargs):
        deltas = screening.updates(global_arrays, replies)
        norms = [float(np.linalg.norm(d)) for d in deltas]
        kept, dropped = screen(global_arrays, replies, *args, **kwargs)
        kept_ids = {id(r) for r in kept}
        after = {id(r): float(np.linalg.norm(d)) for r, d in zip(kept, screening.updates(global_arrays, kept))}
        rows = []
        for i, reply in enumerate(replies):
            others = [n for j, n in enumerate(norms) if j != i and n > 0]
            rest = [d for j, d in enumerate(deltas) if j != i and np.any(d)]
            mean = np.mean(rest, axis=0) if rest else None
            cos = (float(deltas[i] @ mean / (np.linalg.norm(deltas[i]) * np.linalg.norm(mean)))
                   if mean is not None and norms[i] > 0 and np.any(mean) else 0.0)
            rows.append({"site": reply_site(reply), "norm_ratio": round(norms[i] / float(np.median(others)), 3)
                         if others else None, "cosine": round(cos, 3), "kept": id(reply) in kept_ids,
                         "clipped": id(reply) in after and not np.isclose(after[id(reply)], norms[i], rtol=1e-4)})
        seen.append(rows)
        return kept, dropped

    intake.screen_updates = watched


def run(rule: dict, condition: str, seed: int, *, keep_model: bool = False) -> dict:
    import logging

    import torch
    from flwr.app import Message

    from tdamil.data.digits import DigitsBagsConfig, make_digits_sites
    from tdamil.federation.config import FederationConfig
    from tdamil.federation.task import SiteData
    from tdamil.simulation.config import SimConfig
    from tdamil.simulation.engines import run_federation
    from tdamil.simulation.sites import SimSites

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    seen: list[list[dict]] = []
    _watch_screens(seen)
    bags = DigitsBagsConfig(num_train_bags=40, num_val_bags=6, num_test_bags=200, mean_bag_size=6, seed=seed)
    made = make_digits_sites(bags, len(SITES), site_test_bags=4, site_names=SITES)
    sims = SimSites({n: SiteData(n, s.train, s.val, s.test) for n, s in made.items()}, {"held_out": made.held_out},
                    int(made["site_a"].train.in_dim))
    settings = dict(rounds=4, lr=1e-3, local_epochs=2, min_sites=5, min_replies=4, round_timeout_s=120,
                    wait_for_sites_s=5, evaluate_sites=False, seed=seed) | rule
    with tempfile.TemporaryDirectory() as out:
        cfg = SimConfig(model={"name": "tdamil", "dim": 32, "depth": 1, "num_heads": 2}, output_dir=Path(out),
                        baselines=False)
        cfg.federation = FederationConfig(**settings)
        tamper = attack(condition) if condition != "none" else None
        hostile = 1000 + SITES.index("site_e")

        def on_message(msg: Message, reply: Message) -> None:
            if tamper is not None and msg.metadata.dst_node_id == hostile:
                tamper(msg, reply)

        setup = run_federation(cfg, sims, Path(out), on_message=on_message)
        events = [json.loads(x) for x in (Path(out) / "audit.jsonl").read_text().splitlines()]
    aggregated = {e["round"]: e["sites"] for e in events if e["event"] == "aggregated"}
    extra = {"model": setup.result.arrays, "in_dim": sims.in_dim} if keep_model else {}
    return extra | {"auroc": float([e for e in events if e["event"] == "heldout_evaluation"][-1]["metrics"]["auroc"]),
            "aggregated": [aggregated.get(r) for r in range(1, 5)], "screens": seen,
            "screens_acted": any(not x["kept"] or x["clipped"] for rows in seen for x in rows),
            "honest_dropped": sum(s != "site_e" for r in range(1, 5) for s in SITES if s not in (aggregated.get(r) or []))}


def _job(rule_name: str, condition: str, seed: int) -> tuple[str, str, int, dict, float]:
    t0 = time.time()
    result = run(RULES[rule_name], condition, seed)
    return rule_name, condition, seed, result, time.time() - t0


def _code_hash() -> str:
    """A hash of the screening and strategy code, docstrings and comments left out (a rerun reuses a
    result only while the code it measured is unchanged)."""
    parts = []
    for path in CODE:
        tree = ast.parse((REPO / path).read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        parts.append(ast.dump(tree))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _key(rule_name: str, condition: str, seed: int, code: str) -> str:
    return json.dumps([RULES[rule_name], condition, seed, code], sort_keys=True)


def summarise(results: dict, rules: list[str], conditions: list[str], seeds: list[int]) -> list[str]:
    """One line per rule and attack: delta vs site_e honest and vs site_e absent (mean, max |d|)."""
    lines = []
    for rule in rules:
        got = results.get(rule, {})
        if not all(s in got.get(c, {}) for c in ("none", "absent") for s in seeds):
            continue
        none = [got["none"][s] for s in seeds]
        line = [f"{rule}: none {statistics.mean(none):.3f}"]
        for name in conditions:
            if name == "none" or not all(s in got.get(name, {}) for s in seeds):
                continue
            for base in ("none", "absent"):
                if base == name:
                    continue
                d = [got[name][s] - got[base][s] for s in seeds]
                line.append(f"{name} vs {base} {statistics.mean(d):+.3f} (max |d| {max(map(abs, d)):.3f})")
        lines.append("; ".join(line))
    return lines


def markdown(results: dict, rules: list[str], attacks: list[str], seeds: list[int], bar: float = 0.02) -> list[str]:
    """Tables for benchmarks/robustness.md: mean delta (max |delta| over the seeds) per rule and
    attack against both baselines, marked where the max exceeds ``bar``; then every seed's delta."""
    def cell(a: list[float], b: list[float]) -> str:
        d = [x - y for x, y in zip(a, b)]
        worst = max(map(abs, d))
        return f"{statistics.mean(d):+.3f} ({worst:.3f}){'' if worst <= bar else ' over'}"

    head = "| rule | site_e honest | site_e absent vs honest | " + " | ".join(
        f"{a} vs honest | {a} vs absent" for a in attacks) + " |"
    out = [head, "|" + "---|" * (2 + 2 * len(attacks) + 1)]
    per_seed = ["| rule | condition | " + " | ".join(f"seed {s}: vs honest / vs absent" for s in seeds) + " |",
                "|" + "---|" * (2 + len(seeds))]
    for rule in rules:
        got = results.get(rule, {})
        if not all(s in got.get(c, {}) for c in ("none", "absent") for s in seeds):
            continue
        none, absent = [got["none"][s] for s in seeds], [got["absent"][s] for s in seeds]
        row = [rule, f"{statistics.mean(none):.3f}", cell(absent, none)]
        per_seed.append(f"| {rule} | absent | " + " | ".join(f"{a - n:+.3f} / -" for a, n in zip(absent, none)) + " |")
        for name in attacks:
            if all(s in got.get(name, {}) for s in seeds):
                hit = [got[name][s] for s in seeds]
                row += [cell(hit, none), cell(hit, absent)]
                per_seed.append(f"| {rule} | {name} | " + " | ".join(
                    f"{h - n:+.3f} / {h - a:+.3f}" for h, n, a in zip(hit, none, absent)) + " |")
            else:
                row += ["not run", "not run"]
        out.append("| " + " | ".join(row) + " |")
    return out + [""] + per_seed


def _noise_job(rule_name: str, condition: str, seed: int, big: int) -> dict:
    """One federation, then its final model's held-out scores on the run's 200-bag cohort and on a
    ``big``-bag cohort drawn from the same held-out images (the sites' data are drawn first, so
    they are the same)."""
    from tdamil.data.digits import DigitsBagsConfig, make_digits_sites
    from tdamil.federation.task import ModelSpec, build_model, load_arrays
    from tdamil.train.engine import evaluate as evaluate_bags

    result = run(RULES[rule_name], condition, seed, keep_model=True)
    model = build_model(ModelSpec({"name": "tdamil", "dim": 32, "depth": 1, "num_heads": 2}, result["in_dim"], 2),
                        seed=None)
    load_arrays(model, result["model"])
    out = {"auroc": result["auroc"]}
    for name, n in (("cohort", 200), ("big", big)):
        bags = DigitsBagsConfig(num_train_bags=40, num_val_bags=6, num_test_bags=n, mean_bag_size=6, seed=seed)
        held = make_digits_sites(bags, len(SITES), site_test_bags=4, site_names=SITES).held_out
        res = evaluate_bags(model, held)
        out[name] = {"labels": np.asarray(res.labels).tolist(), "p": np.asarray(res.probs)[:, 1].tolist()}
    return out


def cohort_noise(rule: str, seed: int, big: int, jobs: int) -> dict:
    """How much of 'site_e absent vs honest' is the 200-bag cohort's noise: the paired bootstrap of
    the AUROC difference over the cohort's bags, and the difference on a ``big``-bag cohort."""
    from sklearn.metrics import roc_auc_score

    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        none, absent = (f.result() for f in [pool.submit(_noise_job, rule, c, seed, big) for c in ("none", "absent")])
    out = {"rule": rule, "seed": seed, "run_auroc": {"none": none["auroc"], "absent": absent["auroc"]}}
    rng = np.random.default_rng(0)
    for name in ("cohort", "big"):
        y = np.asarray(none[name]["labels"])
        p0, p1 = np.asarray(none[name]["p"]), np.asarray(absent[name]["p"])
        diffs = []
        for _ in range(2000):
            i = rng.integers(0, len(y), len(y))
            if 0 < y[i].sum() < len(i):
                diffs.append(roc_auc_score(y[i], p1[i]) - roc_auc_score(y[i], p0[i]))
        out[name] = {"bags": int(len(y)), "delta": roc_auc_score(y, p1) - roc_auc_score(y, p0),
                     "bootstrap_sd": float(np.std(diffs)), "ci95": [float(np.percentile(diffs, 2.5)),
                                                                    float(np.percentile(diffs, 97.5))]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--attacks", nargs="+", default=ATTACKS)
    parser.add_argument("--rules", nargs="+", default=list(RULES))
    parser.add_argument("--baselines", nargs="+", default=["none", "absent"], choices=["none", "absent"])
    parser.add_argument("--jobs", type=int, default=2, help="federations at a time (one process, one thread each)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "robustness.json")
    parser.add_argument("--cohort-noise", type=int, metavar="BAGS", default=0,
                        help="instead: site_e honest vs absent under the first rule, per seed, on the run's cohort "
                             "(paired bootstrap) and on a cohort of BAGS bags")
    args = parser.parse_args()
    if args.cohort_noise:
        rows = [cohort_noise(args.rules[0], s, args.cohort_noise, args.jobs) for s in args.seeds]
        path = args.out.with_name(args.out.stem + "_cohort_noise.json")
        path.write_text(json.dumps(rows, indent=1))
        print(json.dumps(rows, indent=1))
        return 0
    unknown = [r for r in args.rules if r not in RULES]
    if unknown:
        parser.error(f"unknown rules {unknown}; choose from {list(RULES)}")
    code = _code_hash()
    runs_path = args.out.with_suffix(".runs.jsonl")
    done: dict[str, dict] = {}
    if runs_path.exists():
        for line in runs_path.read_text().splitlines():
            row = json.loads(line)
            done[row["key"]] = row
    conditions = [*args.baselines, *args.attacks]
    jobs = [(r, c, s) for r in args.rules for c in conditions for s in args.seeds]
    # a baseline without screens is the same federation as with them when the screens did nothing
    # in that run (no update dropped or clipped): reuse it instead of running it again
    twin = {r: r.replace(", screens off", " + screens") for r in args.rules if r.endswith(", screens off")}
    later = [j for j in jobs if j[0] in twin and twin[j[0]] in args.rules and j[1] in ("none", "absent")]
    t0 = time.time()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for phase in (0, 1):
        if phase == 0:
            todo = [j for j in jobs if j not in later]
        else:
            todo = []
            for rule, condition, seed in later:
                row = done.get(_key(twin[rule], condition, seed, code))
                if row is not None and not row["screens_acted"]:
                    done[_key(rule, condition, seed, code)] = row | {"reused_from": twin[rule]}
                else:
                    todo.append((rule, condition, seed))
        todo = [j for j in todo if _key(*j, code) not in done]
        print(f"{len(todo)} federations to run", flush=True)
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool, \
                runs_path.open("a") as log:
            for fut in as_completed([pool.submit(_job, *job) for job in todo]):
                rule, condition, seed, result, seconds = fut.result()
                row = {"key": _key(rule, condition, seed, code), "rule": rule, "condition": condition, "seed": seed,
                       "code": code, "seconds": round(seconds, 1), **result}
                done[row["key"]] = row
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(f"{rule} | {condition} | seed {seed} | {result['auroc']:.4f} | screens acted "
                      f"{result['screens_acted']} | honest sites dropped {result['honest_dropped']} | {seconds:.0f} s",
                      flush=True)
    results: dict[str, dict[str, dict[int, float]]] = {}
    for rule in args.rules:
        for condition in conditions:
            for seed in args.seeds:
                row = done.get(_key(rule, condition, seed, code))
                if row is not None:
                    results.setdefault(rule, {}).setdefault(condition, {})[seed] = row["auroc"]
    lines = summarise(results, args.rules, conditions, args.seeds)
    print("\n".join(lines))
    tables = markdown(results, args.rules, args.attacks, args.seeds)
    args.out.with_suffix(".md").write_text("\n".join(tables) + "\n")
    print("\n".join(tables))
    args.out.write_text(json.dumps({"seeds": args.seeds, "code": code, "auroc": results, "summary": lines,
                                    "seconds": round(time.time() - t0)}, indent=1))
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
