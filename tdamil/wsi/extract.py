"""Feature extraction for one site: slides -> tissue patches -> encoder -> ``<slide_id>.h5``.

:func:`extract_site` is what ``tdamil-extract`` runs and what the federation client calls before
training when features are missing. Per slide it opens the slide (resolution from metadata or an
override), segments tissue on a thumbnail, lays the 20x patch grid (:mod:`.prepare`), reads
patches in DataLoader workers (:mod:`.patches`), encodes them in batches (autocast on GPU) and
writes features + coordinates atomically. A slide whose feature file already carries the same
settings hash (:mod:`.extract_config`) is skipped. A slide that fails is logged and reported
(:mod:`.extract_report`) and the others go on; finished files are never lost.

Several processes (one per GPU: ``--device cuda:1``, or shards) may work on one features folder at
once: each slide is claimed (:mod:`.claims`) before it is prepared, so no two processes write the
same slide, and a claim left by a crashed process is taken over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from tdamil.data.config import DataConfig
from tdamil.data.h5 import FeatureFileError, read_attrs, write_features

from .claims import Claim, try_claim
from .encoders import EncoderError, PatchEncoder, get_spec, load_encoder, weights_digest
from .extract_config import FEATURE_FORMAT_VERSION, ExtractionConfig, ExtractionError, settings_hash
from .extract_report import READ_ERRORS, ExtractionSummary, SlideResult, failure
from .jobs import SlideJob, plan_jobs
from .patches import PatchDataset, PatchKey, collate_patches
from .prepare import Prepared, prepare_slide
from .reader import SlideError

logger = logging.getLogger(__name__)

__all__ = [
    "ExtractionConfig",
    "ExtractionError",
    "ExtractionSummary",
    "SlideResult",
    "SlideJob",
    "extract_site",
    "extract_slides",
    "plan_jobs",
    "settings_hash",
    "FEATURE_FORMAT_VERSION",
]


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ExtractionError(f"extraction.device is '{name}' but no CUDA GPU is visible; use device: cpu or auto.")
    return dev


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if precision == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _run_todo(
    todo: list[tuple[int, SlideJob, Path, str]],
    results: list[Optional[SlideResult]],
    ext_cfg: ExtractionConfig,
    encoder: PatchEncoder,
    device: torch.device,
    qc_dir: Optional[Path],
    since: float,
) -> None:
    """Stream every patch of every slide in ``todo`` through one DataLoader and the encoder.

    The batch sampler prepares slides lazily (in the main process, as the loader asks for more
    work), so tissue segmentation of the next slide overlaps reading and encoding of the current
    one, and a batch never mixes two slides. A slide is claimed just before it is prepared and
    its claim released once its result is known.
    """
    from tqdm.auto import tqdm

    prepared: dict[int, Prepared] = {}
    claims: dict[int, Claim] = {}
    bs = ext_cfg.batch_size
    overall = tqdm(total=len(todo), desc="slides", unit="slide", disable=not ext_cfg.progress, position=0)

    def settle(i: int, result: SlideResult) -> None:
        results[i] = result
        claim = claims.pop(i, None)
        if claim is not None:
            claim.release()

    def batches():
        for i, job, out, shash in todo:
            claimed = _claim(i, job, out, shash, ext_cfg, since, results)
            if claimed is None:
                overall.update(1)
                continue
            claims[i] = claimed
            try:
                prep = prepare_slide(job, ext_cfg, encoder, out, shash, qc_dir)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                settle(i, failure(job, exc, 0.0))
                overall.update(1)
                continue
            prepared[i] = prep
            keys = [PatchKey(i, job.path, prep.attrs["mpp"], prep.attrs["backend"], prep.plan, int(x), int(y))
                    for x, y in prep.coords]
            for b in range(0, len(keys), bs):
                yield keys[b: b + bs]

    loader = DataLoader(
        PatchDataset(ext_cfg.patch_size), batch_sampler=batches(), num_workers=ext_cfg.num_workers,
        collate_fn=collate_patches, pin_memory=device.type == "cuda",
        prefetch_factor=4 if ext_cfg.num_workers else None,
    )
    state: dict[str, Any] = {"k": None, "buf": None, "done": 0, "encode": 0.0, "bar": None}
    failed_now: set[int] = set()

    def end_slide() -> None:
        if state["bar"] is not None:
            state["bar"].close()
        state.update(k=None, buf=None, done=0, encode=0.0, bar=None)
        overall.update(1)

    try:
        with torch.inference_mode(), _autocast(device, ext_cfg.precision):
            for k, images, error in loader:
                if k in failed_now:
                    continue
                prep = prepared[k]
                claims[k].touch()  # heartbeat: other processes see the slide is being worked on
                if k != state["k"]:
                    state.update(k=k, done=0, encode=0.0,
                                 buf=torch.empty((len(prep.coords), encoder.dim), dtype=torch.float32, device=device),
                                 bar=tqdm(total=len(prep.coords), desc=prep.job.slide_id, unit="patch", leave=False,
                                          disable=not ext_cfg.progress, position=1))
                if error:
                    kind, _, reason = error.partition("\x00")
                    settle(k, failure(prep.job, READ_ERRORS.get(kind, SlideError)(reason),
                                      time.perf_counter() - prep.t_start))
                    failed_now.add(k)
                    end_slide()
                    continue
                te = time.perf_counter()
                out = encoder(images.to(device, non_blocking=True))
                done = state["done"]
                state["buf"][done: done + len(images)] = out.float()
                if device.type != "cuda":  # on GPU the copy in _finish synchronises
                    state["encode"] += time.perf_counter() - te
                state["done"] = done + len(images)
                state["bar"].update(len(images))
                if state["done"] == len(prep.coords):
                    try:
                        settle(k, _finish(prep, state["buf"], state["encode"]))
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as exc:
                        settle(k, failure(prep.job, exc, time.perf_counter() - prep.t_start))
                    prepared.pop(k, None)
                    end_slide()
    finally:
        if state["bar"] is not None:
            state["bar"].close()
        overall.close()
        for claim in claims.values():  # stopped early (error, Ctrl-C): leave the slides to others
            claim.release()
    for i, job, _, _ in todo:
        if results[i] is None:  # only if the loader stopped early
            results[i] = failure(job, RuntimeError("extraction stopped before this slide was finished"), 0.0)


def _finish(prep: Prepared, buf: torch.Tensor, encode_s: float) -> SlideResult:
    t_w = time.perf_counter()
    features = buf.cpu().numpy()  # on GPU this waits for the slide's last batch
    prep.timings["encode"] = encode_s
    prep.timings["read_encode"] = t_w - prep.t_start - prep.timings["open_segment"]
    if not np.isfinite(features).all():
        raise EncoderError(
            f"{prep.job.path}: the encoder produced NaN/inf features; check the weights file and try precision: fp32"
        )
    attrs = dict(prep.attrs, extracted_by=f"{socket.gethostname()}:{os.getpid()}")
    write_features(prep.out, features, prep.coords, attrs, padded=prep.padded)
    prep.timings["write"] = time.perf_counter() - t_w
    seconds = time.perf_counter() - prep.t_start
    logger.info("%s: %d patches (%d padded at the edge; level %d, %d px read) in %.1f s -> %s", prep.job.slide_id,
                len(prep.coords), int(prep.padded.sum()), prep.plan.level, prep.plan.read_size, seconds, prep.out)
    return SlideResult(prep.job.slide_id, "extracted", prep.out, prep.job.path, len(prep.coords), seconds,
                       prep.plan.level, timings=dict(prep.timings))


def extract_slides(
    jobs: Sequence[SlideJob],
    features_dir: Path,
    ext_cfg: ExtractionConfig,
    encoder: Optional[PatchEncoder] = None,
) -> ExtractionSummary:
    """Extract the features of ``jobs`` into ``features_dir`` (see :func:`extract_site`).

    ``encoder`` may be given already loaded (benchmarks, tests); by default it is loaded from
    ``ext_cfg`` only when at least one slide needs work.
    """
    t0 = time.perf_counter()
    features_dir = Path(features_dir)
    features_dir.mkdir(parents=True, exist_ok=True)
    device = _resolve_device(ext_cfg.device)
    if encoder is not None:
        weights_sha = encoder.weights_sha256
    elif get_spec(ext_cfg.encoder).needs_weights:
        if ext_cfg.weights is None or not Path(ext_cfg.weights).exists():
            load_encoder(ext_cfg.encoder, ext_cfg.weights)  # raises the clear EncoderError
        weights_path = Path(ext_cfg.weights)  # type: ignore[arg-type]
        logger.info("hashing encoder weights %s ...", weights_path)
        weights_sha = weights_digest(weights_path)
    else:
        weights_sha = "none"
    qc_dir = (ext_cfg.qc_dir or features_dir / "qc") if ext_cfg.qc else None
    if qc_dir is not None:
        qc_dir.mkdir(parents=True, exist_ok=True)

    results: list[Optional[SlideResult]] = [None] * len(jobs)
    todo: list[tuple[int, SlideJob, Path, str]] = []
    since = time.time()
    for i, job in enumerate(jobs):
        out = features_dir / f"{job.slide_id}.h5"
        shash = settings_hash(ext_cfg, weights_sha, job.mpp_override)
        results[i] = _already_done(job, out, shash, ext_cfg.overwrite, since, log=True)
        if results[i] is None:
            todo.append((i, job, out, shash))
    logger.info("%d slides: %d to extract, %d already done with these settings",
                len(jobs), len(todo), len(jobs) - len(todo))

    if todo and encoder is None:
        encoder = load_encoder(ext_cfg.encoder, ext_cfg.weights, device=device, weights_sha256=weights_sha)
    elif encoder is not None:
        encoder = encoder.to(device).eval()

    if todo:
        _run_todo(todo, results, ext_cfg, encoder, device, qc_dir, since)  # type: ignore[arg-type]
    summary = ExtractionSummary([r for r in results if r is not None], get_spec(ext_cfg.encoder).name
                                if encoder is None else encoder.spec.name, features_dir, time.perf_counter() - t0)
    level = logging.WARNING if summary.failed else logging.INFO
    logger.log(level, "extraction finished: %d extracted, %d skipped, %d busy in other processes, %d failed",
               len(summary.extracted), len(summary.skipped), len(summary.busy), len(summary.failed))
    return summary


def _already_done(job: SlideJob, out: Path, shash: str, overwrite: bool, since: float,
                  log: bool = False) -> Optional[SlideResult]:
    """A 'skipped' result when ``out`` already holds these settings (with ``overwrite``: only when
    another process of this run wrote it, i.e. after ``since``); None when the slide needs work."""
    if not out.exists() or (overwrite and out.stat().st_mtime < since):
        return None
    try:
        old = read_attrs(out)
    except FeatureFileError as exc:
        logger.warning("%s: existing feature file unreadable, extracting again (%s)", job.slide_id, exc)
        return None
    if old.get("settings_hash") == shash:
        return SlideResult(job.slide_id, "skipped", out, job.path, _n_rows(out), 0.0, old.get("read_level"))
    if log and old:
        logger.info("%s: feature file was made with other settings; extracting again", job.slide_id)
    return None


def _claim(i: int, job: SlideJob, out: Path, shash: str, ext_cfg: ExtractionConfig, since: float,
           results: list[Optional[SlideResult]]) -> Optional[Claim]:
    """Claim the slide for this process, or record why not (busy elsewhere, finished meanwhile)."""
    claim = try_claim(out.parent, job.slide_id, ext_cfg.claim_stale_minutes * 60.0)
    if claim is None:
        logger.info("%s: another extraction process is working on it; leaving it to that process", job.slide_id)
        results[i] = SlideResult(job.slide_id, "busy", None, job.path,
                                 reason="claimed by another extraction process on this features folder")
        return None
    done = _already_done(job, out, shash, ext_cfg.overwrite, since)
    if done is not None:  # another process finished it after this run started
        claim.release()
        results[i] = done
        return None
    return claim


def _n_rows(path: Path) -> int:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return int(f["features"].shape[0])
    except (OSError, KeyError):
        return 0


def extract_site(data_cfg: DataConfig, ext_cfg: ExtractionConfig, slide_ids: Optional[Sequence[str]] = None,
                 shard: Optional[tuple[int, int]] = None) -> ExtractionSummary:
    """Extract features for a site's slides into ``data_cfg.features_dir/<slide_id>.h5``.

    ``slide_ids`` limits the work to those slides (default: every slide of the manifest, or every
    slide file in ``data_cfg.slides_dir`` when there is no manifest); ``shard=(i, n)`` to every
    n-th of them. Other processes may extract into the same folder at the same time.
    Slides whose feature file already holds the same settings are skipped; a slide that fails
    is reported in the summary (reason and fix) and does not stop the others. Raises
    :class:`ExtractionError` / :class:`~tdamil.wsi.encoders.EncoderError` only when nothing can
    start (no slides folder, missing weights).
    """
    jobs = plan_jobs(data_cfg, ext_cfg, slide_ids, shard)
    if not jobs:
        raise ExtractionError(f"{data_cfg.manifest or data_cfg.slides_dir}: no slides to extract.")
    return extract_slides(jobs, Path(data_cfg.features_dir), ext_cfg)
