"""A complete on-disk federation from the digits bags: per-site feature caches, manifests and YAMLs.

``write_demo_federation(root)`` writes, for each simulated site, ``<root>/<site>/features/*.h5``
(one file per bag, this project's feature layout), ``<root>/<site>/manifest.csv`` (with a fixed
``split`` column) and ``<root>/sites/<site>.yaml``; plus a held-out cohort for the coordinator and
``<root>/server.yaml``. It lets anyone try the real processes (``flwr-server`` + ``tdamil-client``)
on one machine, and serves the end-to-end tests.

By default the demo is written the way a consortium runs: a consortium CA and a coordinator
certificate for ``localhost``/``127.0.0.1`` under ``<root>/certs/`` (``tdamil-certs init``), a key
pair per site (``tdamil-certs issue``: ``certs/sites/<site>/``), every site's public key in
``certs/site_keys/<site>.pub``, TLS and node authentication switched on in the YAML files. So the
secure path is the one tried first. ``secure=False`` writes a plaintext demo (run it with
``--insecure``), for tests of the mechanics only.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

__all__ = ["write_demo_federation"]


def _write_bags(folder: Path, dataset: Any, split: str, rows: list[dict[str, Any]], cohort: str) -> None:
    from tdamil.data.h5 import write_features  # noqa: PLC0415

    feats = folder / "features"
    feats.mkdir(parents=True, exist_ok=True)
    for i in range(len(dataset)):
        bag = dataset[i]
        x = bag.features.numpy().astype(np.float32)
        coords = np.stack([np.arange(len(x)) * 512, np.zeros(len(x))], axis=1).astype(np.int64)
        write_features(feats / f"{bag.slide_id}.h5", x, coords, {"encoder": "digits-pixels", "name": bag.slide_id})
        rows.append({"slide_id": bag.slide_id, "patient_id": f"p_{bag.slide_id}",
                     "label": "positive" if bag.label == 1 else "negative", "cohort": cohort, "split": split})


def _server_security(root: Path) -> dict[str, Any]:
    """A consortium CA and a coordinator certificate for this machine (``certs/``), as
    ``tdamil-certs init --out certs --server-name localhost`` writes them."""
    from tdamil.security.certs import init_pki  # noqa: PLC0415

    pki = init_pki(root / "certs", ["localhost"], force=True)
    rel = {k: str(getattr(pki, k).relative_to(root)) for k in ("ca_cert", "server_cert", "server_key", "site_keys")}
    return {"tls": {"ca_cert": rel["ca_cert"], "cert": rel["server_cert"], "key": rel["server_key"]},
            "auth": {"enabled": True, "site_public_keys": rel["site_keys"]}}


def _site_security(root: Path, site: str) -> dict[str, Any]:
    """The site's key pair (``certs/sites/<site>/``, public half also in ``certs/site_keys/``), as
    ``tdamil-certs issue --site <site> --pki certs`` writes them; paths relative to ``sites/``."""
    from tdamil.security.certs import issue_site  # noqa: PLC0415

    bundle = issue_site(site, pki=root / "certs", force=True)
    return {"tls": {"ca_cert": f"../{bundle.ca_cert.relative_to(root)}"},
            "auth": {"private_key": f"../{bundle.private_key.relative_to(root)}"}}


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["slide_id", "patient_id", "label", "cohort", "split"])
        writer.writeheader()
        writer.writerows(rows)


def write_demo_federation(root: str | Path, *, num_sites: int = 2, train_bags: int = 20, val_bags: int = 10,
                          test_bags: int = 10, heldout_bags: int = 30, model: Optional[dict[str, Any]] = None,
                          federation: Optional[dict[str, Any]] = None, superlink: str = "127.0.0.1:9092",
                          internal_port: int = 9093, runtime_ports: Optional[list[int]] = None,
                          seed: int = 0, secure: bool = True) -> dict[str, Path]:
    """Write the demo federation; returns ``{"server": server.yaml, "<site>": site yaml, ...}``.

    ``secure``: TLS and registered site keys (see the module docstring); False = plaintext demo.
    """
    from tdamil.data.digits import DigitsBagsConfig, make_digits_sites  # noqa: PLC0415

    root = Path(root).resolve()
    cfg = DigitsBagsConfig(num_train_bags=train_bags, num_val_bags=val_bags, num_test_bags=heldout_bags, seed=seed)
    made = make_digits_sites(cfg, num_sites, site_test_bags=test_bags)
    classes = ["negative", "positive"]
    out: dict[str, Path] = {}
    (root / "sites").mkdir(parents=True, exist_ok=True)
    ports = runtime_ports or [9094 + i for i in range(num_sites)]
    server_security = _server_security(root) if secure else None  # the CA first: sites trust it
    for k, (name, splits) in enumerate(made.items()):
        folder = root / name
        rows: list[dict[str, Any]] = []
        for split in ("train", "val", "test"):
            _write_bags(folder, getattr(splits, split), split, rows, name)
        _write_manifest(folder / "manifest.csv", rows)
        site_yaml = {
            "site": name,
            "data": {"manifest": f"../{name}/manifest.csv", "features_dir": f"../{name}/features", "classes": classes},
            "train": {"device": "cpu", "progress": False},
            "federation": {"superlink": superlink, "runtime_port": ports[k], "extract_missing": False,
                           "max_retries": 3, "cpu_threads": 1},
        }
        if secure:
            site_yaml.update(_site_security(root, name))
        path = root / "sites" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(site_yaml, sort_keys=False), encoding="utf-8")
        out[name] = path
    held_rows: list[dict[str, Any]] = []
    _write_bags(root / "coordinator", made.held_out, "test", held_rows, "held_out")
    _write_manifest(root / "coordinator" / "manifest.csv", held_rows)
    server_yaml = {
        "output_dir": "run",
        "model": model or {"name": "tdamil", "dim": 32, "depth": 1, "num_heads": 2},
        "in_dim": 64,
        "num_classes": 2,
        "federation": {"rounds": 2, "local_epochs": 1, "lr": 1e-3, "min_sites": num_sites, "round_timeout_s": 120,
                       "wait_for_sites_s": 120, **(federation or {})},
        "checkpoint": {"metric": "auroc", "mode": "max", "keep_last": 5},
        "evaluation": {"data": {"manifest": "coordinator/manifest.csv", "features_dir": "coordinator/features",
                                "classes": classes}},
        "superlink": {"address": superlink, "internal_port": internal_port},
    }
    if server_security:
        server_yaml.update(server_security)
    out["server"] = root / "server.yaml"
    out["server"].write_text(yaml.safe_dump(server_yaml, sort_keys=False), encoding="utf-8")
    return out
