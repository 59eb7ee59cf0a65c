"""One faulty site among five: held-out AUROC per aggregation rule and attack (benchmarks/robustness.md).

Five non-IID digits sites and a held-out cohort run the real ServerApp and ClientApps in process
(tiny TDA-MIL, 4 rounds); from round 1 on, site_e sends a sign-flipped update (``2 w_global - w``),
an update scaled by 10 or by 1e6, or all-zero weights. Each rule is compared with its own run
without an attack, seed by seed (the issue's bar: |delta AUROC| <= 0.02). ``fedavg`` is FedAvg with
the project's screens (default settings); every other rule runs with the screens OFF, so the
figure is the rule's own robustness.

    .venv/bin/python benchmarks/bench_robustness.py --seeds 0 1 2 --out benchmarks/results/robustness.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

REPO = Path(__file__).resolve().parents[1]
SITES = ["site_a", "site_b", "site_c", "site_d", "site_e"]
RULES = {  # name -> federation settings
    "fedavg": {"strategy": "fedavg"},
    "fedavg, screens off": {"strategy": "fedavg", "update_norm_factor": None, "update_min_cosine": None},
    "fedmedian": {"strategy": "fedmedian"},
    "fedtrimmedavg (beta 0.2)": {"strategy": "fedtrimmedavg", "trim_beta": 0.2},
    "krum (f=1)": {"strategy": "krum", "faulty_sites": 1},
    "multikrum (f=1, 3 kept)": {"strategy": "multikrum", "faulty_sites": 1, "krum_select": 3},
}
SCREENS_OFF = {"update_norm_factor": None, "update_min_cosine": None}


def _edit(reply: Message, fn) -> None:
    arrays = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    reply.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(fn(k, v) if v.dtype.kind == "f" else v))
                                           for k, v in arrays.items()})


def attack(name: str):
    def tamper(msg: Message, reply: Message) -> None:
        if msg.metadata.message_type != "train" or reply.has_error():
            return
        received = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        if name == "sign-flipped":
            _edit(reply, lambda k, v: 2 * received[k] - v)
        elif name.startswith("scaled x"):
            factor = float(name.split("x", 1)[1])
            _edit(reply, lambda k, v: received[k] + factor * (v - received[k]) if factor < 100 else v * factor)
        elif name == "all-zero weights":
            _edit(reply, lambda k, v: np.zeros_like(v))
        elif name == "absent":  # NaN weights: refused by the message contract, so site_e simply counts for nothing
            _edit(reply, lambda k, v: np.full_like(v, np.nan))
    return tamper


def run(rule: dict, attack_name: str | None, seed: int) -> float:
    from tdamil.data.digits import DigitsBagsConfig, make_digits_sites
    from tdamil.federation.config import FederationConfig
    from tdamil.federation.task import SiteData
    from tdamil.simulation.config import SimConfig
    from tdamil.simulation.engines import run_federation
    from tdamil.simulation.sites import SimSites

    bags = DigitsBagsConfig(num_train_bags=40, num_val_bags=6, num_test_bags=200, mean_bag_size=6, seed=seed)
    made = make_digits_sites(bags, len(SITES), site_test_bags=4, site_names=SITES)
    sims = SimSites({n: SiteData(n, s.train, s.val, s.test) for n, s in made.items()}, {"held_out": made.held_out},
                    int(made["site_a"].train.in_dim))
    settings = dict(rounds=4, lr=1e-3, local_epochs=2, min_sites=5, min_replies=4, round_timeout_s=120,
                    wait_for_sites_s=5, evaluate_sites=False, seed=seed)
    settings |= rule if rule["strategy"] == "fedavg" else rule | SCREENS_OFF
    with tempfile.TemporaryDirectory() as out:
        cfg = SimConfig(model={"name": "tdamil", "dim": 32, "depth": 1, "num_heads": 2}, output_dir=Path(out),
                        baselines=False)
        cfg.federation = FederationConfig(**settings)
        tamper = attack(attack_name) if attack_name else None
        hostile = 1000 + SITES.index("site_e")

        def on_message(msg: Message, reply: Message) -> None:
            if tamper is not None and msg.metadata.dst_node_id == hostile:
                tamper(msg, reply)

        run_federation(cfg, sims, Path(out), on_message=on_message)
        events = [json.loads(x) for x in (Path(out) / "audit.jsonl").read_text().splitlines()]
    return float([e for e in events if e["event"] == "heldout_evaluation"][-1]["metrics"]["auroc"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--attacks", nargs="+", default=["sign-flipped", "scaled x10", "scaled x1e6",
                                                          "all-zero weights"])
    parser.add_argument("--rules", nargs="+", default=list(RULES))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "robustness.json")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    results: dict[str, dict[str, list[float]]] = {}
    t0 = time.time()
    for rule in args.rules:
        results[rule] = {"none": [run(RULES[rule], None, s) for s in args.seeds]}
        for name in args.attacks:
            results[rule][name] = [run(RULES[rule], name, s) for s in args.seeds]
        base = results[rule]["none"]
        line = [f"{rule}: none {statistics.mean(base):.3f}"]
        for name in args.attacks:
            d = [a - b for a, b in zip(results[rule][name], base)]
            line.append(f"{name} {statistics.mean(d):+.3f} (max |d| {max(abs(x) for x in d):.3f})")
        print("; ".join(line), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seeds": args.seeds, "auroc": results, "seconds": time.time() - t0}, indent=1))
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
