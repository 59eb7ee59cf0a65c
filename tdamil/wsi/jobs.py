"""Which slides an extraction run processes, where their files are and their resolution overrides.

Labels are not needed to extract: the slides come from a manifest whose only required column is
``slide_id`` (:func:`tdamil.data.manifest.load_slide_list`), or, when the site has no manifest
(``data.manifest`` left out), from every slide file in ``data.slides_dir``. A slide's file is the
manifest's ``slide_path`` or ``<slides_dir>/<slide_id>.<ext>``.

``shard=(i, n)`` keeps every n-th slide starting at the i-th, so n processes (one per GPU, or one
per machine sharing the features folder) split a site's archive without talking to each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from tdamil.data.config import DataConfig

from .extract_config import ExtractionConfig, ExtractionError

__all__ = ["SlideJob", "plan_jobs", "index_slides_dir", "take_shard"]


@dataclass
class SlideJob:
    """One slide to process: its id, file and optional resolution override."""

    slide_id: str
    path: Optional[Path]
    mpp_override: Optional[float] = None
    problem: str = ""  # why the file could not be located, if it could not


def index_slides_dir(slides_dir: Path, extensions: Iterable[str]) -> dict[str, Path]:
    """``{stem: file}`` of the slide files directly in ``slides_dir`` (first file per stem)."""
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    index: dict[str, Path] = {}
    for p in sorted(slides_dir.iterdir()):
        if p.suffix.lower() in exts:
            index.setdefault(p.stem, p)
    return index


def take_shard(items: Sequence, shard: Optional[tuple[int, int]]) -> list:
    """The ``i``-th of ``n`` interleaved shards of ``items`` (all of them when ``shard`` is None)."""
    if shard is None:
        return list(items)
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ExtractionError(f"shard {i}/{n} is not valid: use i/n with 0 <= i < n, e.g. 0/2 and 1/2.")
    return list(items)[i::n]


def _manifest_rows(manifest: Path) -> dict[str, dict[str, str]]:
    from tdamil.data.manifest import load_slide_list

    df = load_slide_list(manifest)
    return {str(r["slide_id"]): {k: str(v) for k, v in r.items()} for r in df.to_dict("records")}


def plan_jobs(data_cfg: DataConfig, ext_cfg: ExtractionConfig, slide_ids: Optional[Sequence[str]] = None,
              shard: Optional[tuple[int, int]] = None) -> list[SlideJob]:
    """Locate each slide's file and resolution override from the manifest (or folder) and config."""
    index: dict[str, Path] = {}
    if data_cfg.slides_dir is not None:
        if not Path(data_cfg.slides_dir).is_dir():
            raise ExtractionError(f"data.slides_dir {data_cfg.slides_dir} is not a folder; fix the path in the site YAML.")
        index = index_slides_dir(Path(data_cfg.slides_dir), ext_cfg.slide_extensions)
    if data_cfg.manifest is not None:
        rows = _manifest_rows(Path(data_cfg.manifest))
    elif data_cfg.slides_dir is not None:
        rows = {sid: {} for sid in index}
    else:
        raise ExtractionError("no slides to look for: set data.manifest (a CSV with a slide_id column) or "
                              "data.slides_dir (every slide file in it is extracted) in the site YAML.")
    ids = take_shard(list(slide_ids) if slide_ids is not None else list(rows), shard)
    return [_job(sid, rows.get(sid, {}), index, data_cfg, ext_cfg) for sid in ids]


def _job(sid: str, row: dict[str, str], index: dict[str, Path], data_cfg: DataConfig,
         ext_cfg: ExtractionConfig) -> SlideJob:
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
    return SlideJob(sid, path if not problem else None, None if mpp is None else float(mpp), problem)
