"""What site-level DP costs: AUROC of federated TDA-MIL on the digits benchmark with and without DP.

Runs the project's real DP code path in one process: FedAvg (Flower 1.42 Message API) wrapped by
:func:`tdamil.security.dp.dp_server_strategy`, each site's train handler wrapped by
:func:`tdamil.security.dp.dp_client_mods`, local training with :func:`tdamil.train.engine.train_one_epoch`,
evaluation with :func:`tdamil.train.engine.evaluate`. Every setting sees the same sites, model
initialisation and number of rounds; only clipping and noise differ.

    python benchmarks/bench_dp.py --out benchmarks/results --seeds 3

Writes ``dp_results.json`` (per setting, seed and round) and ``dp_auroc.png``; ``benchmarks/dp.md``
reports the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from tdamil.security.config import PrivacyConfig
from tdamil.security.dp import PrivacyAccountant, dp_client_mods, dp_server_strategy

logger = logging.getLogger(__name__)


@dataclass
class Setting:
    """One row of the benchmark: ``clip`` None = plain FedAvg (weighted by slides, no DP)."""

    name: str
    clip: Optional[float]
    noise: float = 0.0


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _set_identity() -> None:
    """Flower's Message() needs a run identity; set a fixed one for this in-process loop."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def run_setting(setting: Setting, sites, held_out, *, rounds: int, seed: int, model_cfg: dict,
                lr: float, local_epochs: int = 1) -> dict:
    """Federated training of one setting; AUROC on the held-out cohort after every round."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    from tdamil.models import create_model
    from tdamil.train.engine import TrainConfig, evaluate, make_optimizer, seed_everything, train_one_epoch

    _set_identity()
    names = sorted(sites)
    first = sites[names[0]].train
    seed_everything(seed)
    model = create_model(model_cfg, in_dim=first.in_dim, num_classes=first.num_classes)
    global_arrays = ArrayRecord(model.state_dict())
    m = len(names)
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=m, min_available_nodes=m,
                      min_evaluate_nodes=0)
    privacy = None
    if setting.clip is not None:
        privacy = PrivacyConfig(enabled=True, clipping_norm=setting.clip, noise_multiplier=setting.noise)
        strategy = dp_server_strategy(strategy, privacy, num_sites=m)
    mods = dp_client_mods(privacy) if privacy else []
    np.random.seed(seed)  # Flower's node sampling
    grid = _Grid(list(range(1, m + 1)))
    tcfg = TrainConfig(epochs=local_epochs, lr=lr, device="cpu", progress=False, mixed_precision=False, seed=seed)
    history = []
    norms: list[float] = []
    res = evaluate(model, held_out, device="cpu")
    history.append({"round": 0, "auroc": res.metrics["auroc"]})
    for rnd in range(1, rounds + 1):
        msgs = list(strategy.configure_train(rnd, global_arrays, ConfigRecord({}), grid))
        replies = []
        for msg in msgs:
            site = names[(int(msg.metadata.dst_node_id) - 1) % m]

            def handler(message, _ctx, site=site):
                arrays = next(iter(message.content.array_records.values()))
                model.load_state_dict(arrays.to_torch_state_dict())
                start = {k: v.detach().clone() for k, v in model.state_dict().items()}
                opt = make_optimizer(model, tcfg)
                for ep in range(local_epochs):
                    train_one_epoch(model, sites[site].train, opt, tcfg, epoch=(rnd - 1) * local_epochs + ep)
                upd = math.sqrt(sum(float(((v.float() - start[k].float()) ** 2).sum())
                                    for k, v in model.state_dict().items()))
                norms.append(upd)
                content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                      "metrics": MetricRecord({"num-examples": len(sites[site].train)})})
                return Message(content, reply_to=message)

            call = handler
            for mod in reversed(mods):
                call = (lambda mod, nxt: (lambda msg, ctx: mod(msg, ctx, nxt)))(mod, call)
            replies.append(call(msg, None))
        arrays, _metrics = strategy.aggregate_train(rnd, replies)
        if arrays is not None:
            global_arrays = arrays
        model.load_state_dict(global_arrays.to_torch_state_dict())
        res = evaluate(model, held_out, device="cpu")
        history.append({"round": rnd, "auroc": res.metrics["auroc"]})
    site_auroc = {s: evaluate(model, sites[s].test, device="cpu").metrics["auroc"] for s in names}
    eps = PrivacyAccountant(privacy, 1.0).epsilon(rounds) if privacy and setting.noise > 0 else math.inf
    return {
        "setting": setting.name, "clip": setting.clip, "noise": setting.noise, "seed": seed,
        "history": history, "final_auroc": history[-1]["auroc"], "site_test_auroc": site_auroc,
        "median_update_norm": statistics.median(norms) if norms else float("nan"), "epsilon": eps,
        "num_params": int(sum(p.numel() for p in model.parameters())),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=None, help="clipping norm (default: median update norm of plain FedAvg)")
    p.add_argument("--noise", type=float, nargs="*", default=[0.01, 0.1, 0.3, 1.0])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # the machine is shared; more threads thrash

    from tdamil.data.digits import DigitsBagsConfig, make_digits_sites

    bags = DigitsBagsConfig(target_digit=9, mean_bag_size=10, std_bag_size=2, num_train_bags=60,
                            num_val_bags=40, num_test_bags=500, seed=0)
    data = make_digits_sites(bags, num_sites=3, label_skew=0.3, size_skew=0.4, site_test_bags=200,
                             held_out_fraction=0.3)
    sites = {k: v for k, v in data.items()}
    model_cfg = {"name": "tdamil", "dim": 64, "depth": 1, "num_heads": 4}
    results = []
    t0 = time.perf_counter()
    base = [run_setting(Setting("fedavg", None), sites, data.held_out, rounds=args.rounds, seed=s,
                        model_cfg=model_cfg, lr=args.lr) for s in range(args.seeds)]
    results += base
    clip = args.clip or float(statistics.median(r["median_update_norm"] for r in base))
    settings = [Setting("clip_only", clip, 0.0)] + [Setting(f"dp_sigma{z:g}", clip, z) for z in args.noise]
    for st in settings:
        for s in range(args.seeds):
            r = run_setting(st, sites, data.held_out, rounds=args.rounds, seed=s, model_cfg=model_cfg, lr=args.lr)
            results.append(r)
            print(f"{st.name:>14} seed {s}: AUROC {r['final_auroc']:.3f}  eps {r['epsilon']:.3g}", flush=True)
    elapsed = time.perf_counter() - t0
    summary = {}
    for name in dict.fromkeys(r["setting"] for r in results):
        rows = [r for r in results if r["setting"] == name]
        au = [r["final_auroc"] for r in rows]
        summary[name] = {
            "clip": rows[0]["clip"], "noise": rows[0]["noise"], "epsilon": rows[0]["epsilon"],
            "auroc_mean": statistics.mean(au), "auroc_sd": statistics.stdev(au) if len(au) > 1 else 0.0,
            "site_auroc_mean": statistics.mean(statistics.mean(r["site_test_auroc"].values()) for r in rows),
            "noise_std_per_coordinate": (rows[0]["noise"] * rows[0]["clip"] / 3) if rows[0]["clip"] else 0.0,
        }
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"clip": clip, "rounds": args.rounds, "seeds": args.seeds, "sites": 3, "model": model_cfg,
               "num_params": results[0]["num_params"], "elapsed_s": elapsed, "summary": summary, "runs": results}
    (args.out / "dp_results.json").write_text(json.dumps(payload, indent=1, default=float))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name in summary:
            rows = [r for r in results if r["setting"] == name]
            curve = np.mean([[h["auroc"] for h in r["history"]] for r in rows], axis=0)
            eps = summary[name]["epsilon"]
            label = name + ("" if not math.isfinite(eps) else f" (eps={eps:.3g})")
            ax.plot(range(len(curve)), curve, marker="o", ms=3, label=label)
        ax.set_xlabel("round")
        ax.set_ylabel("held-out AUROC (mean over seeds)")
        ax.set_title(f"Site-level DP, 3 digits sites, TDA-MIL, C={clip:.2f}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out / "dp_auroc.png", dpi=110)
    except Exception as exc:  # plotting is a convenience
        logger.warning("plot failed: %s", exc)
    print(json.dumps({k: {kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in v.items()}
                      for k, v in summary.items()}, indent=1))
    print(f"clip={clip:.3f} params={payload['num_params']} elapsed={elapsed:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
