"""The ClientApp process of a round imports nothing it does not use (issue #10).

Flower starts a fresh ClientApp process for every message, so every import on that path is paid
every round. A child process imports Flower (which the real ``flwr-clientapp`` process has loaded
before our module), then the deployed ``tdamil.client.client_app`` module, and handles a train
message for a site read from its YAML and feature cache; the modules this added must not include
the slide, extraction and plotting stacks. No wall-clock assertion: the time is in
``benchmarks/federation.md``.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

# Top-level packages a train message must not import (``tdamil.wsi`` is the extraction stack).
FORBIDDEN = ("timm", "openslide", "tiffslide", "cv2", "matplotlib", "rich", "torchvision", "tdamil.wsi",
             "tdamil.server", "skimage")

CHILD = r"""
import json, sys
import flwr.app, flwr.clientapp  # what flwr-clientapp has imported before it loads the app
before = set(sys.modules)
import tdamil.client.client_app as ca
from flwr.app import ConfigRecord, RecordDict
from tdamil.federation.grids import InProcessGrid
from tdamil.federation.task import ModelSpec, build_model, model_to_arrays
spec = ModelSpec({"name": "tdamil", "dim": 16, "depth": 1, "num_heads": 2}, 8, 2)
grid = InProcessGrid(ca.app, {1: {"site": "site_a", "config": sys.argv[1]}})
from tdamil.federation.screening import layout_of
from tdamil.federation.wire import layout_to_json, pack
arrays = model_to_arrays(build_model(spec))
config = ConfigRecord({"server-round": 1, "local-epochs": 1, "lr": 1e-3, "weight-decay": 0.01,
                       "proximal-mu": 0.0, "model-spec": spec.to_json(), "evaluate-global": True,
                       "wire-layout": layout_to_json(layout_of(arrays))})
msg = grid.create_message(RecordDict({"arrays": pack(arrays, layout_of(arrays)), "config": config}),
                          "train", 1, "1")
(reply,) = grid.send_and_receive([msg])
assert not reply.has_error(), reply.error.reason
print(json.dumps({"new": sorted(set(sys.modules) - before), "flower": sorted(before),
                  "global_n": reply.content["metrics"]["global-n"]}))
"""


def _site(root: Path) -> Path:
    from tdamil.data.h5 import write_features

    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        sid = f"s{i}"
        write_features(root / "features" / f"{sid}.h5", rng.normal(size=(12, 8)).astype(np.float32),
                       np.zeros((12, 2), dtype=np.int64), {"encoder": "synthetic"})
        rows.append({"slide_id": sid, "patient_id": sid, "label": ["neg", "pos"][i % 2],
                     "split": "train" if i < 4 else "val"})
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    path = root / "site_a.yaml"
    path.write_text(yaml.safe_dump({
        "site": "site_a", "data": {"manifest": "manifest.csv", "features_dir": "features"},
        "extraction": {"encoder": "uni", "weights": "missing_uni.bin"},  # must stay unparsed here
        "train": {"device": "cpu", "progress": False},
        "federation": {"superlink": "127.0.0.1:9092", "extract_missing": False}}))
    return path


def _hits(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]


def test_a_train_message_imports_no_slide_extraction_or_plotting_stack(tmp_path):
    config = _site(tmp_path)
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(config)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["global_n"] == 2  # the message really ran: the global model was evaluated on 2 val slides
    assert _hits(result["new"]) == [], (
        f"the ClientApp path imported {_hits(result['new'])[:10]}: keep these imports inside the functions "
        "that need them (python -X importtime shows who imports them)")
    # rich is loaded by Flower itself (httpx's CLI module) before our app: not ours to avoid
    assert set(_hits(result["flower"])) <= {m for m in result["flower"] if m.split(".")[0] == "rich"}
