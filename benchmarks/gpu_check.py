"""GPU readiness check (issue #10), run by ``benchmarks/gpu_check.sh``; one JSON per step.

Steps, in order:

1. ``model``: forward + backward of the default TDA-MIL (d=512, 2 blocks, 8 heads, 1024-d UNI
   features) at 10k / 50k / 100k patches, fp32 and bf16 autocast: peak memory
   (``torch.cuda.max_memory_allocated``) and median time of 3 timed steps after a warm-up.
2. ``extract``: the real extraction pipeline (:func:`tdamil.wsi.extract.extract_slides`: open,
   tissue mask, grid, DataLoader reading, encoding, h5) with a UNI-shaped ViT-L/16 whose random
   weights are saved to a local file and loaded through :func:`~tdamil.wsi.encoders.load_encoder`
   like a real encoder (strict load, sha256; nothing is downloaded), on slides tiled from the
   repository's real H&E slide (``tests/data/cmu_small_region.svs``) to ~5k patches; throughput and
   its ratio to the encoder alone on the same number of patches in memory.
3. ``simulate``: the digits federation (``configs/sim_digits.yaml``, in-process engine) training on
   the device.

``--tiny`` (or ``TDAMIL_GPU_CHECK_TINY=1``): CPU-sized everything (tiny encoder, a few hundred
patches), so CI runs the same code path in well under a minute. Results go to
``<out>/gpu_check_<step>.json``; a failing step is recorded with its error and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO / "tests" / "data" / "cmu_small_region.svs"
DEFAULT_MODEL = {"name": "tdamil", "dim": 512, "depth": 2, "num_heads": 8}
TINY_MODEL = {"name": "tdamil", "dim": 32, "depth": 1, "num_heads": 2}


def device_info(device: torch.device) -> dict[str, Any]:
    info = {"device": str(device), "torch": torch.__version__, "host": platform.node(),
            "cpu_count": os.cpu_count(), "load": os.getloadavg()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported(), cuda=torch.version.cuda)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> Any:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: kernels, allocator, autotuning
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------
def step_model(device: torch.device, tiny: bool) -> dict[str, Any]:
    from tdamil.federation.task import ModelSpec, build_model

    arch = TINY_MODEL if tiny else DEFAULT_MODEL  # tiny: same code path, CPU-sized
    model = build_model(ModelSpec(arch, 1024, 2), seed=0).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    label = torch.tensor([1], device=device)
    rows = []
    for n in ((64, 128) if tiny else (10_000, 50_000, 100_000)):
        x = torch.randn(1, n, 1024, device=device)
        for precision in ("fp32", "bf16"):
            def step() -> None:
                opt.zero_grad(set_to_none=True)
                with autocast(device, precision):
                    out = model(x)
                loss = torch.nn.functional.cross_entropy(out.logits.float(), label)
                loss.backward()
                opt.step()

            row: dict[str, Any] = {"patches": n, "precision": precision}
            try:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                row["fwd_bwd_s"] = timed(step, device, repeats=1 if tiny else 3)
                if device.type == "cuda":
                    row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                row["patches_per_s"] = n / row["fwd_bwd_s"]
            except torch.OutOfMemoryError as exc:
                row["error"] = f"out of memory: {str(exc).splitlines()[0]}"
            rows.append(row)
            print(f"  model n={n} {precision}: {row}", flush=True)
        del x
    return {"model": arch, "params": sum(p.numel() for p in model.parameters()), "rows": rows}


def make_slides(folder: Path, slides: int, mosaic: int) -> list[Path]:
    """Slides tiled ``mosaic`` x ``mosaic`` (with flips) from the repository's real H&E slide, 20x."""
    from tdamil.wsi.reader import open_slide
    from tdamil.wsi.testslides import write_pyramid

    with open_slide(SLIDE) as s:
        rgb = s.read_region((0, 0), 0, s.dimensions)
    rows = [np.concatenate([rgb[:, ::-1] if (r + c) % 2 else rgb for c in range(mosaic)], axis=1)
            for r in range(mosaic)]
    big = np.ascontiguousarray(np.concatenate(rows, axis=0))
    folder.mkdir(parents=True, exist_ok=True)
    first = write_pyramid(folder / "check00.svs", big, 0.5, (1, 4), fmt="svs")
    copies = [folder / f"check{i:02d}.svs" for i in range(1, slides)]
    for copy in copies:  # writing the pyramid is the slow part: the other slides are copies of it
        shutil.copyfile(first, copy)
    return [first, *copies]


def step_extract(device: torch.device, tiny: bool, work: Path) -> dict[str, Any]:
    from tdamil.wsi.encoders import build_encoder, load_encoder
    from tdamil.wsi.extract import ExtractionConfig, SlideJob, extract_slides

    name = "tiny" if tiny else "uni"
    weights = None
    t0 = time.perf_counter()
    if not tiny:  # a UNI-shaped ViT-L/16 with random weights, written like a downloaded file
        weights = work / "uni_random.bin"
        torch.save(build_encoder("uni").backbone.state_dict(), weights)
    slides = make_slides(work / "slides", 1 if tiny else 5, 1 if tiny else 5)  # ~40 patches per tile: ~5k
    setup_s = time.perf_counter() - t0
    cfg = ExtractionConfig(encoder=name, weights=weights, device=str(device), patch_size=256,
                           batch_size=32 if tiny else 256, num_workers=0 if tiny else min(12, os.cpu_count() or 1),
                           qc=False, progress=False, overwrite=True)
    jobs = [SlideJob(p.stem, p) for p in slides]
    t0 = time.perf_counter()
    summary = extract_slides(jobs, work / "features", cfg)
    sync(device)
    pipeline_s = time.perf_counter() - t0
    if summary.failed or not summary.extracted:
        raise RuntimeError(f"extraction failed: {[(r.slide_id, r.reason) for r in summary.failed]}")
    patches = sum(r.n_patches for r in summary.extracted)
    encoder = load_encoder(name, weights, device=device)
    batch = torch.randint(0, 256, (cfg.batch_size, 3, 256, 256), dtype=torch.uint8, device=device)
    precision = "bf16" if device.type == "cuda" else "fp32"

    def encode_all() -> None:
        with torch.inference_mode(), autocast(device, precision):
            for _ in range(max(1, patches // cfg.batch_size)):
                encoder(batch)

    encoder_s = timed(encode_all, device, repeats=1) * patches / (max(1, patches // cfg.batch_size) * cfg.batch_size)
    return {"encoder": name, "weights_file_bytes": weights.stat().st_size if weights else 0, "slides": len(slides),
            "patches": patches, "setup_s": setup_s, "pipeline_s": pipeline_s,
            "pipeline_patches_per_s": patches / pipeline_s, "encoder_only_s": encoder_s,
            "encoder_only_patches_per_s": patches / encoder_s, "pipeline_over_encoder": encoder_s / pipeline_s}


def step_simulate(device: torch.device, tiny: bool, work: Path) -> dict[str, Any]:
    cfg = yaml.safe_load((REPO / "configs" / "sim_digits.yaml").read_text())
    cfg["output_dir"] = str(work / "sim_run")
    cfg["train"].pop("device", None)  # the device follows resources.num_gpus (tdamil.simulation.config)
    cfg["resources"] = {"num_gpus": 1 if device.type == "cuda" else 0}
    cfg["baselines"] = False
    if tiny:  # one seed: the check is that the device trains, not the spread over seeds
        cfg["seeds"] = [0]
        cfg["data"]["digits"]["site_test_bags"] = 20
        cfg["data"]["digits"]["bags"].update(num_train_bags=12, num_val_bags=8, num_test_bags=40)
    path = work / "sim_digits.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rounds = 1 if tiny else 5
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tdamil.simulation.cli", "--config", str(path), "--rounds",
                           str(rounds), "--no-baselines"], capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"tdamil-simulate exited {done.returncode}: {done.stderr[-1500:]}")
    audits = sorted((work / "sim_run").rglob("audit.jsonl"))
    events = [json.loads(x) for x in audits[0].read_text().splitlines() if x.strip()]
    heldout = [e for e in events if e["event"] == "heldout_evaluation" and e["round"] == rounds]
    return {"device": device.type, "rounds": rounds, "wall_s": wall,
            "round_s": [e["seconds"] for e in events if e["event"] == "round_finished"],
            "final_heldout": heldout[0]["metrics"] if heldout else None}


STEPS = {"model": step_model, "extract": step_extract, "simulate": step_simulate}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("TDAMIL_GPU_CHECK_TINY") == "1",
                        help="CPU-sized run (CI); also TDAMIL_GPU_CHECK_TINY=1")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1")
    parser.add_argument("--steps", default="model,extract,simulate")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tdamil_gpu_check"))
    args = parser.parse_args()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    else:
        device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows: what a site's trainer would get
    args.out.mkdir(parents=True, exist_ok=True)
    info = device_info(device)
    print(f"gpu_check on {info}", flush=True)
    failed = 0
    for name in args.steps.split(","):
        work = args.work / name
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        record: dict[str, Any] = {"step": name, "tiny": args.tiny, **info}
        try:
            fn = STEPS[name]
            record["result"] = fn(device, args.tiny) if name == "model" else fn(device, args.tiny, work)
        except Exception as exc:  # noqa: BLE001 - record it; the next step still runs
            failed += 1
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc()[-3000:]
        record["step_s"] = time.perf_counter() - t0
        suffix = "_tiny" if args.tiny else ""
        (args.out / f"gpu_check_{name}{suffix}.json").write_text(json.dumps(record, indent=2, default=str))
        print(f"{name}: {'FAILED ' + record['error'] if 'error' in record else 'ok'} in {record['step_s']:.1f} s",
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
