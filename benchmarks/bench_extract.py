"""Extraction throughput: the whole pipeline against the encoder alone, same batch size, same run.

    python benchmarks/bench_extract.py                                  # CPU, ResNet50-trunc
    python benchmarks/bench_extract.py --encoder uni --device cuda \\
        --batch-size 256 --num-workers 12 --slides 8 --mosaic 4          # UNI-shaped ViT-L/16 on a GPU

Test slides are written from the real H&E pixels of ``tests/data/cmu_small_region.svs`` (a
``mosaic`` x ``mosaic`` tiling with flips, 20x, saved as tiled Aperio-style SVS with a 4x level;
every other slide is a 40x version with a 2x level, so both read paths are timed). The encoder is
built with random weights: speed does not depend on the values, and no weights file is needed.

Measured, in one process and one run:

* encoder only: uint8 512x512 patches already in memory -> ``encoder(batch)`` (its resize and
  normalisation included), batch after batch, as many patches as the pipeline encodes;
* pipeline: :func:`tdamil.wsi.extract.extract_slides` on the slides (open, tissue mask, grid,
  DataLoader reading, encoding, h5 writing, QC pictures and tissue GeoJSON);
* per-slide overhead = (pipeline time - encoder-only time for the same patches) / slides, and
  its measured parts: open + tissue mask + grid + QC picture, h5 write; plus the time to read
  one patch serially (what DataLoader workers hide behind a GPU).

CPU seconds (this process plus its joined DataLoader workers) are reported beside wall time:
on a machine shared with other jobs they are much steadier than wall time.

Encoder-only and pipeline runs alternate (``--repeats``; medians reported), so a change in the
machine's load during the benchmark affects both sides alike.

Writes ``benchmarks/results/extract_<device>_<encoder>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CMU = ROOT / "tests" / "data" / "cmu_small_region.svs"


def make_slides(folder: Path, n: int, mosaic: int) -> list[Path]:
    from tdamil.wsi.reader import open_slide
    from tdamil.wsi.testslides import upsample, write_pyramid

    with open_slide(CMU) as s:
        rgb = s.read_region((0, 0), 0, s.dimensions)
    rows = []
    for r in range(mosaic):
        row = [rgb[:, ::-1] if (r + c) % 2 else rgb for c in range(mosaic)]
        rows.append(np.concatenate(row, axis=1)[::-1] if r % 2 else np.concatenate(row, axis=1))
    big = np.ascontiguousarray(np.concatenate(rows, axis=0))
    paths = []
    for i in range(n):
        if i % 2 == 0:
            paths.append(write_pyramid(folder / f"bench{i:02d}_20x.svs", big, 0.5, (1, 4), fmt="svs"))
        else:  # 40x with a 2x level, from a quarter of the mosaic (keeps the file small)
            h, w = big.shape[0] // 2, big.shape[1] // 2
            paths.append(write_pyramid(folder / f"bench{i:02d}_40x.tif", upsample(big[:h, :w], 2), 0.25, (1, 2, 8)))
    return paths


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers are joined)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main(argv: list[str] | None = None) -> int:
    from tdamil.wsi.encoders import build_encoder
    from tdamil.wsi.extract import ExtractionConfig, SlideJob, _autocast, _resolve_device, extract_slides
    from tdamil.wsi.grid import plan_read, tissue_grid
    from tdamil.wsi.reader import open_slide
    from tdamil.wsi.tissue import segment_tissue

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", default="resnet50_trunc")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--slides", type=int, default=4)
    p.add_argument("--mosaic", type=int, default=2, help="cmu tiles per side of each 20x slide")
    p.add_argument("--precision", default="auto")
    p.add_argument("--backend", default="openslide", choices=["openslide", "tiffslide", "auto"])
    p.add_argument("--repeats", type=int, default=2, help="pipeline runs, interleaved with encoder-only runs")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--pictures", type=Path, default=None,
                   help="copy the last run's QC pictures (overlay, tissue mask, grid, tissue GeoJSON) here")
    args = p.parse_args(argv)

    device = _resolve_device(args.device)
    torch.manual_seed(0)
    encoder = build_encoder(args.encoder).eval().to(device)
    encoder.weights_sha256 = "random-init"
    work = Path(tempfile.mkdtemp(prefix="tdamil_bench_"))
    try:
        t = time.perf_counter()
        slides = make_slides(work, args.slides, args.mosaic)
        print(f"wrote {len(slides)} slides in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        cfg = ExtractionConfig(encoder=args.encoder, weights=Path("unused"), batch_size=args.batch_size,
                               num_workers=args.num_workers, device=str(device), precision=args.precision,
                               backend=args.backend, progress=False)

        # the patches the pipeline will encode, read up front for the encoder-only run
        patches = []
        read_s = 0.0
        for path in slides:
            with open_slide(path) as s:
                plan = plan_read(s)
                coords, _ = tissue_grid(s.dimensions, plan.patch_size_level0, segment_tissue(s))
                t_read = time.perf_counter()
                patches += [plan.read(s, int(x), int(y)) for x, y in coords]
                read_s += time.perf_counter() - t_read
        images = torch.from_numpy(np.stack(patches)).permute(0, 3, 1, 2).contiguous()
        n = len(images)

        enc_cpu: list[float] = []
        pipe_cpu: list[float] = []

        def encoder_only() -> float:
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            with torch.inference_mode(), _autocast(device, args.precision):
                encoder(images[: args.batch_size].to(device))  # warm-up
                sync()
                t0, c0 = time.perf_counter(), cpu_seconds()
                for b in range(0, n, args.batch_size):
                    out = encoder(images[b: b + args.batch_size].to(device, non_blocking=True))
                    out.float().cpu() if b + args.batch_size >= n else None
                sync()
                enc_cpu.append(cpu_seconds() - c0)
                return time.perf_counter() - t0

        jobs = [SlideJob(pth.stem, pth) for pth in slides]
        enc_runs, pipe_runs, summary = [], [], None
        for rep in range(args.repeats):  # interleaved, so a change of machine load hits both alike
            enc_runs.append(encoder_only())
            t0, c0 = time.perf_counter(), cpu_seconds()
            summary = extract_slides(jobs, work / f"features{rep}", cfg, encoder=encoder)
            pipe_runs.append(time.perf_counter() - t0)
            pipe_cpu.append(cpu_seconds() - c0)
            assert summary.ok and summary.n_patches == n, (summary.n_patches, n, [r.reason for r in summary.failed])
        enc_runs.append(encoder_only())
        if args.pictures is not None:
            shutil.copytree(work / f"features{args.repeats - 1}" / "qc", args.pictures, dirs_exist_ok=True)
        # each pipeline run against the mean of the encoder-only runs just before and after it
        bracket = [(enc_runs[i] + enc_runs[i + 1]) / 2 for i in range(len(pipe_runs))]
        ratios = [b / p for b, p in zip(bracket, pipe_runs)]
        overheads = [(p - b) / len(slides) for b, p in zip(bracket, pipe_runs)]
        enc_s, pipe_s = float(np.median(enc_runs)), float(np.median(pipe_runs))
        res = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
            "encoder": args.encoder,
            "weights": "random init",
            "batch_size": args.batch_size,
            "num_workers": args.num_workers,
            "precision": args.precision,
            "backend": args.backend,
            "slides": len(slides),
            "patches": n,
            "encoder_only_s": round(enc_s, 3),
            "encoder_only_runs_s": [round(v, 3) for v in enc_runs],
            "pipeline_runs_s": [round(v, 3) for v in pipe_runs],
            "pipeline_s": round(pipe_s, 3),
            "encoder_only_patches_per_s": round(n / enc_s, 2),
            "pipeline_patches_per_s": round(n / pipe_s, 2),
            "pipeline_over_encoder_runs": [round(r, 3) for r in ratios],
            "pipeline_over_encoder": round(float(np.median(ratios)), 3),
            "per_slide_overhead_runs_s": [round(o, 3) for o in overheads],
            "per_slide_overhead_s": round(float(np.median(overheads)), 3),
            "cpu_s_encoder_only_runs": [round(v, 3) for v in enc_cpu],
            "cpu_s_pipeline_runs": [round(v, 3) for v in pipe_cpu],
            "cpu_ratio": round(float(np.median(enc_cpu)) / float(np.median(pipe_cpu)), 3),
            "cpu_overhead_per_slide_s": round((float(np.median(pipe_cpu)) - float(np.median(enc_cpu))) / len(slides), 3),
            "open_segment_qc_s_mean": round(float(np.mean([r.timings["open_segment"] for r in summary.extracted])), 3),
            "write_s_mean": round(float(np.mean([r.timings["write"] for r in summary.extracted])), 3),
            "read_ms_per_patch": round(read_s / n * 1000, 2),
            "torch": torch.__version__,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = args.out or ROOT / "benchmarks" / "results" / f"extract_{device.type}_{args.encoder}_w{args.num_workers}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    print("\n| device | encoder | batch | workers | patches | encoder only (patch/s) | pipeline (patch/s) "
          "| pipeline/encoder (runs) | overhead/slide s (runs) | open+mask+QC s | write s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {res['device']} | {args.encoder} | {args.batch_size} | {args.num_workers} | {n} | "
          f"{res['encoder_only_patches_per_s']} | {res['pipeline_patches_per_s']} | {res['pipeline_over_encoder']:.0%} "
          f"({', '.join(f'{r:.0%}' for r in ratios)}) | {res['per_slide_overhead_s']} "
          f"({', '.join(f'{o:.2f}' for o in overheads)}) | {res['open_segment_qc_s_mean']} | {res['write_s_mean']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
