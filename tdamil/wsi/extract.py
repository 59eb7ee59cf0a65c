"""Feature extraction for one site: slides -> tissue patches -> encoder -> ``<slide_id>.h5``.

:func:`extract_site` is what ``tdamil-extract`` runs and what the federation client calls before
training when features are missing. Per slide it opens the slide (resolution from metadata or an
override), segments tissue on a thumbnail, lays the 20x patch grid, reads patches in DataLoader
workers, encodes them in batches (autocast on GPU) and writes features + coordinates atomically.
A slide whose feature file already carries the same settings hash is skipped. A slide that fails
is logged and reported (reason and fix) and the others go on; finished files are never lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tdamil.data.config import DataConfig
from tdamil.data.h5 import FeatureFileError, read_attrs, write_features

from .encoders import EncoderError, PatchEncoder, get_spec, load_encoder, weights_digest
from .grid import ReadPlan, plan_read, tissue_grid
from .reader import MissingMppError, SlideError, SlideNotFoundError, SlideOpenError, SlideReadError, open_slide
from .tissue import TissueConfig, TissueMask, segment_tissue

logger = logging.getLogger(__name__)

__all__ = [
    "ExtractionConfig",
    "ExtractionError",
    "ExtractionSummary",
    "SlideResult",
    "SlideJob",
    "extract_site",
    "extract_slides",
    "settings_hash",
    "FEATURE_FORMAT_VERSION",
]

#: Bumped when the meaning of the stored features changes (forces re-extraction).
FEATURE_FORMAT_VERSION = 1

SLIDE_EXTENSIONS = [".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu", ".dcm"]


@dataclass
class ExtractionConfig:
    """The ``extraction:`` section of a site YAML. Relative paths are relative to the YAML file.

    encoder:              registry name (``uni``, ``uni2_h``, ``virchow2``, ``hoptimus0``,
                          ``gigapath``, ``resnet50_trunc``, ``conch``, ``phikon_v2``, ``tiny``).
                          Default ``uni``.
    weights:              LOCAL weights file of the encoder (required except for ``tiny``);
                          nothing is ever downloaded.
    batch_size:           patches per encoder batch (default 64).
    num_workers:          DataLoader processes reading patches (default 4; 0 = read in the main
                          process).
    device:               ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``...
    precision:            ``auto`` (bf16/fp16 autocast on GPU, fp32 on CPU), ``fp32``, ``fp16``, ``bf16``.
    patch_size:           patch side in pixels at the target magnification (default 512).
    target_magnification: 20.0 (= 0.5 um/px; magnification = 10 / mpp).
    min_tissue:           keep grid cells with at least this tissue fraction (default 0.25).
    mpp_overrides:        ``{slide_id: microns_per_pixel}`` for slides whose files lack or misstate
                          their resolution (a manifest ``mpp`` column works too; this wins).
    backend:              ``openslide`` (default), ``tiffslide`` (optional extra) or ``auto``.
    tissue:               tissue-mask settings (:class:`~tdamil.wsi.tissue.TissueConfig`).
    qc:                   write a QC thumbnail (tissue outline + patch grid) per slide (default true).
    qc_dir:               where QC pictures go (default ``<features_dir>/qc``).
    overwrite:            re-extract even when the feature file has the same settings (default false).
    slide_extensions:     file endings tried for ``<slides_dir>/<slide_id>.<ext>``.
    progress:             show progress bars (default true).
    """

    encoder: str = "uni"
    weights: Optional[Path] = None
    batch_size: int = 64
    num_workers: int = 4
    device: str = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    patch_size: int = 512
    target_magnification: float = 20.0
    min_tissue: float = 0.25
    mpp_overrides: dict[str, float] = field(default_factory=dict)
    backend: Literal["auto", "openslide", "tiffslide"] = "openslide"
    tissue: TissueConfig = field(default_factory=TissueConfig)
    qc: bool = True
    qc_dir: Optional[Path] = None
    overwrite: bool = False
    slide_extensions: list[str] = field(default_factory=lambda: list(SLIDE_EXTENSIONS))
    progress: bool = True

    def __post_init__(self) -> None:
        get_spec(self.encoder)  # EncoderError (a ValueError) lists the known names
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1 (default 64)")
        if self.num_workers < 0:
            raise ValueError("num_workers must be >= 0 (0 reads patches in the main process)")
        if self.patch_size < 8:
            raise ValueError("patch_size must be >= 8 pixels (default 512)")
        if not 0.0 < self.target_magnification <= 200.0:
            raise ValueError("target_magnification must be in (0, 200], e.g. 20 for 0.5 um/px")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError("min_tissue must be between 0 and 1 (default 0.25)")
        for sid, mpp in self.mpp_overrides.items():
            if not 0.05 <= float(mpp) <= 20.0:
                raise ValueError(f"mpp_overrides.{sid} = {mpp} is not a plausible um/px (0.25 for 40x, 0.5 for 20x)")
        if get_spec(self.encoder).needs_weights and self.weights is None:
            raise ValueError(
                f"encoder '{self.encoder}' needs weights: set extraction.weights to its local weights file "
                "(tdamil never downloads weights), or use encoder: tiny for a test run"
            )

    @property
    def target_mpp(self) -> float:
        """Microns per pixel of the patches (10 / target_magnification)."""
        return 10.0 / self.target_magnification


class ExtractionError(RuntimeError):
    """Extraction cannot start at all (no slides, bad encoder). Per-slide problems never raise."""


@dataclass
class SlideResult:
    """What happened to one slide.

    status:      ``extracted``, ``skipped`` (same settings already on disk) or ``failed``.
    reason/fix:  for failures: what went wrong (names the file) and what to do.
    timings:     seconds spent opening + segmenting, reading + encoding, encoder alone, writing.
    """

    slide_id: str
    status: Literal["extracted", "skipped", "failed"]
    path: Optional[Path] = None
    slide_path: Optional[Path] = None
    n_patches: int = 0
    seconds: float = 0.0
    read_level: Optional[int] = None
    reason: str = ""
    fix: str = ""
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class ExtractionSummary:
    """Outcome of :func:`extract_site`: one :class:`SlideResult` per slide, in input order."""

    results: list[SlideResult]
    encoder: str
    features_dir: Path
    seconds: float = 0.0

    @property
    def extracted(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "extracted"]

    @property
    def skipped(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "skipped"]

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def ok(self) -> bool:
        """True when no slide failed."""
        return not self.failed

    @property
    def n_patches(self) -> int:
        return sum(r.n_patches for r in self.extracted)

    def table(self) -> Any:
        """A rich Table: one row per slide, then totals."""
        from rich.table import Table

        t = Table(title=f"Feature extraction ({self.encoder}) -> {self.features_dir}", show_lines=False)
        for col, kw in (("slide", {}), ("status", {}), ("patches", {"justify": "right"}),
                        ("level", {"justify": "right"}), ("s", {"justify": "right"}), ("problem", {"ratio": 3}),
                        ("fix", {"ratio": 2})):
            t.add_column(col, **kw)
        style = {"extracted": "green", "skipped": "cyan", "failed": "bold red"}
        for r in self.results:
            t.add_row(r.slide_id, f"[{style[r.status]}]{r.status}[/]", str(r.n_patches) if r.n_patches else "",
                      "" if r.read_level is None else str(r.read_level), f"{r.seconds:.1f}", _first_sentence(r.reason), r.fix)
        t.caption = (f"{len(self.extracted)} extracted ({self.n_patches} patches), {len(self.skipped)} skipped, "
                     f"{len(self.failed)} failed in {self.seconds:.1f} s")
        return t

    def print(self, console: Any = None) -> None:
        """Print :meth:`table` (to ``console`` or a new rich Console on stderr)."""
        from rich.console import Console

        (console or Console(stderr=True)).print(self.table())


def _first_sentence(text: str) -> str:
    """The table shows the first sentence of a failure; the log has all of it."""
    head, sep, _ = text.partition(". ")
    return head + ("." if sep else "")


@dataclass
class SlideJob:
    """One slide to process: its id, file and optional resolution override."""

    slide_id: str
    path: Optional[Path]
    mpp_override: Optional[float] = None
    problem: str = ""  # why the file could not be located, if it could not


# --------------------------------------------------------------------------------------------
def settings_hash(ext_cfg: ExtractionConfig, weights_sha256: str, mpp_override: Optional[float]) -> str:
    """16 hex digits identifying everything that determines a slide's features."""
    payload = {
        "format": FEATURE_FORMAT_VERSION,
        "encoder": get_spec(ext_cfg.encoder).name,
        "weights_sha256": weights_sha256,
        "patch_size": ext_cfg.patch_size,
        "target_mpp": round(ext_cfg.target_mpp, 6),
        "min_tissue": ext_cfg.min_tissue,
        "tissue": asdict(ext_cfg.tissue),
        "mpp_override": mpp_override,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


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


@dataclass(frozen=True)
class _PatchKey:
    """What a DataLoader worker needs to read one patch (passed as the dataset 'index')."""

    slide: int
    path: Path
    mpp: float
    backend: str
    plan: ReadPlan
    x: int
    y: int


class PatchDataset(Dataset):
    """Reads patches named by :class:`_PatchKey`: ``(slide, uint8 (3, p, p), error text)``.

    Keys carry the slide file, resolution and read plan, so one pool of DataLoader workers serves
    every slide of a run (no worker start-up per slide) and slides can be prepared while earlier
    ones are still being read. Each worker keeps its own slide handles (at most two open). A
    read error is returned as text, not raised, so one corrupt slide cannot stop the run.
    """

    def __init__(self, patch_size: int) -> None:
        self.patch_size = patch_size
        self._open: dict[Path, Any] = {}

    def __len__(self) -> int:  # keys come from the batch sampler; the length is not used
        return 0

    def _slide(self, key: _PatchKey) -> Any:
        slide = self._open.get(key.path)
        if slide is None:
            while len(self._open) >= 2:
                self._open.pop(next(iter(self._open))).close()
            slide = open_slide(key.path, mpp_override=key.mpp, backend=key.backend,  # type: ignore[arg-type]
                               warn_override=False)
            self._open[key.path] = slide
        return slide

    def __getitem__(self, key: _PatchKey) -> tuple[int, torch.Tensor, str]:  # type: ignore[override]
        try:
            patch = key.plan.read(self._slide(key), key.x, key.y)
            return key.slide, torch.from_numpy(patch).permute(2, 0, 1), ""
        except Exception as exc:  # reported per slide by the main process
            bad = self._open.pop(key.path, None)
            if bad is not None:
                bad.close()
            empty = torch.zeros((3, self.patch_size, self.patch_size), dtype=torch.uint8)
            return key.slide, empty, type(exc).__name__ + "\x00" + _clean_reason(exc)

    def __getstate__(self) -> dict[str, Any]:
        return {"patch_size": self.patch_size, "_open": {}}


def _collate(items: list[tuple[int, torch.Tensor, str]]) -> tuple[int, torch.Tensor, str]:
    errors = [e for _, _, e in items if e]
    return items[0][0], torch.stack([t for _, t, _ in items]), errors[0] if errors else ""


@dataclass
class _Prepared:
    job: SlideJob
    out: Path
    shash: str
    plan: ReadPlan
    coords: np.ndarray
    attrs: dict[str, Any]
    t_start: float
    timings: dict[str, float]

# --------------------------------------------------------------------------------------------
def _fix_for(exc: BaseException) -> str:
    if isinstance(exc, SlideNotFoundError):
        return "put the slide file in data.slides_dir or set its slide_path in the manifest"
    if isinstance(exc, MissingMppError):
        return "set the slide's resolution: an 'mpp' column in the manifest or extraction.mpp_overrides"
    if isinstance(exc, SlideOpenError):
        return "re-copy the file from the scanner or remove the slide from the manifest"
    if isinstance(exc, SlideReadError):
        return "the slide has corrupt tiles: re-export or re-copy it, or remove it from the manifest"
    if isinstance(exc, _NoTissue):
        return "look at the QC thumbnail; lower extraction.min_tissue or tissue.min_saturation if tissue was missed"
    if isinstance(exc, SlideError):
        return "fix the slide or its settings as the message says"
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return "lower extraction.batch_size"
    return "see the log above for the traceback; fix and run tdamil-extract again (finished slides are kept)"


class _NoTissue(SlideError):
    pass


def _clean_reason(exc: BaseException) -> str:
    text = str(exc).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the final line
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, SlideError) else text


def _save_qc(qc_dir: Path, slide_id: str, tissue: TissueMask, coords: np.ndarray, plan: ReadPlan) -> None:
    from .qc import save_qc_thumbnail

    try:
        save_qc_thumbnail(qc_dir / f"{slide_id}.png", tissue, coords, plan.patch_size_level0, title=slide_id)
    except Exception as exc:  # a picture must never cost the features
        logger.warning("%s: QC picture not written (%s)", slide_id, exc)


def _prepare(job: SlideJob, ext_cfg: ExtractionConfig, encoder: PatchEncoder, out: Path, shash: str,
             qc_dir: Optional[Path]) -> _Prepared:
    """Open the slide, resolve its resolution, segment tissue and lay the grid (main process)."""
    t0 = time.perf_counter()
    if job.path is None:
        raise SlideNotFoundError(job.problem)
    with open_slide(job.path, mpp_override=job.mpp_override, backend=ext_cfg.backend, slide_id=job.slide_id) as slide:
        plan = plan_read(slide, ext_cfg.patch_size, ext_cfg.target_mpp)
        tissue = segment_tissue(slide, ext_cfg.tissue)
        coords, _ = tissue_grid(slide.dimensions, plan.patch_size_level0, tissue, ext_cfg.min_tissue)
        attrs = {
            "patch_size": plan.patch_size,
            "patch_size_level0": plan.patch_size_level0,
            "level0_magnification": round(plan.level0_magnification, 3),
            "target_magnification": round(plan.target_magnification, 3),
            "overlap": 0,
            "level0_width": int(slide.dimensions[0]),
            "level0_height": int(slide.dimensions[1]),
            "name": job.slide_id,
            "encoder": encoder.spec.name,
            "encoder_dim": encoder.dim,
            "weights_sha256": encoder.weights_sha256,
            "mpp": float(slide.mpp),
            "mpp_source": slide.mpp_source,
            "read_level": plan.level,
            "read_size": plan.read_size,
            "min_tissue": ext_cfg.min_tissue,
            "tissue_threshold": float(tissue.threshold),
            "settings_hash": shash,
            "slide_file": job.path.name,
            "backend": slide.backend,
            "format_version": FEATURE_FORMAT_VERSION,
        }
    if qc_dir is not None:
        _save_qc(qc_dir, job.slide_id, tissue, coords, plan)
    if len(coords) == 0:
        raise _NoTissue(
            f"{job.path}: no grid cell of {plan.patch_size_level0} px has >= {ext_cfg.min_tissue:.0%} tissue "
            f"(tissue covers {tissue.tissue_fraction:.1%} of the thumbnail)"
        )
    return _Prepared(job, out, shash, plan, coords, attrs, t0, {"open_segment": time.perf_counter() - t0})


def _failure(job: SlideJob, exc: BaseException, seconds: float) -> SlideResult:
    reason = _clean_reason(exc)
    if isinstance(exc, (SlideError, EncoderError)):
        logger.error("%s: FAILED: %s", job.slide_id, reason)
    else:
        logger.error("%s: FAILED with an unexpected error", job.slide_id, exc_info=exc)
    return SlideResult(job.slide_id, "failed", None, job.path, 0, seconds, reason=reason, fix=_fix_for(exc))


_READ_ERRORS = {"SlideReadError": SlideReadError, "SlideOpenError": SlideOpenError, "SlideNotFoundError": SlideNotFoundError,
                "MissingMppError": MissingMppError}


def _run_todo(
    todo: list[tuple[int, SlideJob, Path, str]],
    results: list[Optional[SlideResult]],
    ext_cfg: ExtractionConfig,
    encoder: PatchEncoder,
    device: torch.device,
    qc_dir: Optional[Path],
) -> None:
    """Stream every patch of every slide in ``todo`` through one DataLoader and the encoder.

    The batch sampler prepares slides lazily (in the main process, as the loader asks for more
    work), so tissue segmentation of the next slide overlaps reading and encoding of the current
    one, and a batch never mixes two slides.
    """
    from tqdm.auto import tqdm

    prepared: dict[int, _Prepared] = {}
    bs = ext_cfg.batch_size
    overall = tqdm(total=len(todo), desc="slides", unit="slide", disable=not ext_cfg.progress, position=0)

    def batches():
        for i, job, out, shash in todo:
            try:
                prep = _prepare(job, ext_cfg, encoder, out, shash, qc_dir)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                results[i] = _failure(job, exc, 0.0)
                overall.update(1)
                continue
            prepared[i] = prep
            keys = [_PatchKey(i, job.path, prep.attrs["mpp"], prep.attrs["backend"], prep.plan, int(x), int(y))
                    for x, y in prep.coords]
            for b in range(0, len(keys), bs):
                yield keys[b: b + bs]

    loader = DataLoader(
        PatchDataset(ext_cfg.patch_size), batch_sampler=batches(), num_workers=ext_cfg.num_workers,
        collate_fn=_collate, pin_memory=device.type == "cuda",
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
                if k != state["k"]:
                    state.update(k=k, done=0, encode=0.0,
                                 buf=torch.empty((len(prep.coords), encoder.dim), dtype=torch.float32, device=device),
                                 bar=tqdm(total=len(prep.coords), desc=prep.job.slide_id, unit="patch", leave=False,
                                          disable=not ext_cfg.progress, position=1))
                if error:
                    kind, _, reason = error.partition("\x00")
                    results[k] = _failure(prep.job, _READ_ERRORS.get(kind, SlideError)(reason),
                                          time.perf_counter() - prep.t_start)
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
                        results[k] = _finish(prep, state["buf"], state["encode"])
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as exc:
                        results[k] = _failure(prep.job, exc, time.perf_counter() - prep.t_start)
                    prepared.pop(k, None)
                    end_slide()
    finally:
        if state["bar"] is not None:
            state["bar"].close()
        overall.close()
    for i, job, _, _ in todo:
        if results[i] is None:  # only if the loader stopped early
            results[i] = _failure(job, RuntimeError("extraction stopped before this slide was finished"), 0.0)


def _finish(prep: _Prepared, buf: torch.Tensor, encode_s: float) -> SlideResult:
    t_w = time.perf_counter()
    features = buf.cpu().numpy()  # on GPU this waits for the slide's last batch
    prep.timings["encode"] = encode_s
    prep.timings["read_encode"] = t_w - prep.t_start - prep.timings["open_segment"]
    if not np.isfinite(features).all():
        raise EncoderError(
            f"{prep.job.path}: the encoder produced NaN/inf features; check the weights file and try precision: fp32"
        )
    write_features(prep.out, features, prep.coords, prep.attrs)
    prep.timings["write"] = time.perf_counter() - t_w
    seconds = time.perf_counter() - prep.t_start
    logger.info("%s: %d patches (level %d, %d px read) in %.1f s -> %s", prep.job.slide_id, len(prep.coords),
                prep.plan.level, prep.plan.read_size, seconds, prep.out)
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
    for i, job in enumerate(jobs):
        out = features_dir / f"{job.slide_id}.h5"
        shash = settings_hash(ext_cfg, weights_sha, job.mpp_override)
        if out.exists() and not ext_cfg.overwrite:
            try:
                old = read_attrs(out)
            except FeatureFileError as exc:
                logger.warning("%s: existing feature file unreadable, extracting again (%s)", job.slide_id, exc)
                old = {}
            if old.get("settings_hash") == shash:
                results[i] = SlideResult(job.slide_id, "skipped", out, job.path, _n_rows(out), 0.0,
                                         old.get("read_level"))
                continue
            if old:
                logger.info("%s: feature file was made with other settings; extracting again", job.slide_id)
        todo.append((i, job, out, shash))
    logger.info("%d slides: %d to extract, %d already done with these settings",
                len(jobs), len(todo), len(jobs) - len(todo))

    if todo and encoder is None:
        encoder = load_encoder(ext_cfg.encoder, ext_cfg.weights, device=device, weights_sha256=weights_sha)
    elif encoder is not None:
        encoder = encoder.to(device).eval()

    if todo:
        _run_todo(todo, results, ext_cfg, encoder, device, qc_dir)  # type: ignore[arg-type]
    summary = ExtractionSummary([r for r in results if r is not None], get_spec(ext_cfg.encoder).name
                                if encoder is None else encoder.spec.name, features_dir, time.perf_counter() - t0)
    level = logging.WARNING if summary.failed else logging.INFO
    logger.log(level, "extraction finished: %d extracted, %d skipped, %d failed",
               len(summary.extracted), len(summary.skipped), len(summary.failed))
    return summary


def _n_rows(path: Path) -> int:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return int(f["features"].shape[0])
    except (OSError, KeyError):
        return 0


# --------------------------------------------------------------------------------------------
def _manifest_rows(data_cfg: DataConfig) -> dict[str, dict[str, str]]:
    from tdamil.data.manifest import load_manifest

    df = load_manifest(data_cfg.manifest, classes=data_cfg.classes)
    return {str(r["slide_id"]): {k: str(v) for k, v in r.items()} for r in df.to_dict("records")}


def _index_slides_dir(slides_dir: Path, extensions: Iterable[str]) -> dict[str, Path]:
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    index: dict[str, Path] = {}
    for p in sorted(slides_dir.iterdir()):
        if p.suffix.lower() in exts:
            index.setdefault(p.stem, p)
    return index


def plan_jobs(data_cfg: DataConfig, ext_cfg: ExtractionConfig, slide_ids: Optional[Sequence[str]] = None) -> list[SlideJob]:
    """Locate each slide's file and resolution override from the manifest and config."""
    rows = _manifest_rows(data_cfg)
    ids = list(slide_ids) if slide_ids is not None else list(rows)
    index: dict[str, Path] = {}
    if data_cfg.slides_dir is not None:
        if not Path(data_cfg.slides_dir).is_dir():
            raise ExtractionError(
                f"data.slides_dir {data_cfg.slides_dir} is not a folder; fix the path in the site YAML."
            )
        index = _index_slides_dir(Path(data_cfg.slides_dir), ext_cfg.slide_extensions)
    jobs = []
    for sid in ids:
        row = rows.get(sid, {})
        path: Optional[Path] = None
        problem = ""
        if row.get("slide_path"):
            path = Path(row["slide_path"])
        elif sid in index:
            path = index[sid]
        elif data_cfg.slides_dir is not None:
            problem = (f"{Path(data_cfg.slides_dir) / sid}.*: no slide file for '{sid}' in data.slides_dir "
                       f"(tried {', '.join(ext_cfg.slide_extensions)}); add it or set its slide_path in the manifest")
        else:
            problem = (f"slide '{sid}': no file location; set data.slides_dir in the site YAML or a slide_path "
                       "column in the manifest")
        mpp = ext_cfg.mpp_overrides.get(sid)
        if mpp is None and row.get("mpp"):
            try:
                mpp = float(row["mpp"])
            except ValueError:
                problem = problem or (f"{data_cfg.manifest}: mpp '{row['mpp']}' of slide '{sid}' is not a number; "
                                      "write microns per pixel, e.g. 0.25")
                path = None
        jobs.append(SlideJob(sid, path if not problem else None, None if mpp is None else float(mpp), problem))
    return jobs


def extract_site(data_cfg: DataConfig, ext_cfg: ExtractionConfig, slide_ids: Optional[Sequence[str]] = None) -> ExtractionSummary:
    """Extract features for a site's slides into ``data_cfg.features_dir/<slide_id>.h5``.

    ``slide_ids`` limits the work to those slides (default: every slide of the manifest).
    Slides whose feature file already holds the same settings are skipped; a slide that fails
    is reported in the summary (reason and fix) and does not stop the others. Raises
    :class:`ExtractionError` / :class:`~tdamil.wsi.encoders.EncoderError` only when nothing can
    start (no slides folder, missing weights).
    """
    jobs = plan_jobs(data_cfg, ext_cfg, slide_ids)
    if not jobs:
        raise ExtractionError(f"{data_cfg.manifest}: no slides to extract.")
    return extract_slides(jobs, Path(data_cfg.features_dir), ext_cfg)
