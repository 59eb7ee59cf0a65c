"""The slide manifest: one CSV row per slide, validated before any work starts.

Columns (header names are case-sensitive, order does not matter):

==============  =========  ===============================================================
column          required   meaning
==============  =========  ===============================================================
slide_id        yes        unique slide name; features live in ``<features_dir>/<slide_id>.h5``
patient_id      yes        patient (case) the slide belongs to; splits never separate a patient
label           yes        class name (text), e.g. ``MSS`` / ``MSI``
cohort          no         cohort or site name (``site`` is accepted as a synonym)
split           no         ``train`` / ``val`` / ``test``: a fixed split to use instead of a random one
fold            no         whole number: a fixed cross-validation fold
slide_path      no         slide file, relative to the CSV's folder or absolute
==============  =========  ===============================================================

:func:`load_manifest` returns a :class:`pandas.DataFrame` with those columns (all text, except
``fold`` as integers) plus ``label_index`` (the class index, following ``classes``). The class
names in label order are stored in ``df.attrs["classes"]``.

Extraction needs no labels: :func:`load_slide_list` reads a manifest whose only required column is
``slide_id`` (``slide_path`` and ``mpp`` are used when present, other columns are ignored), so a site
can extract a whole archive before its labels are curated.

Every problem raises :class:`ManifestError` naming the CSV, the row (as a spreadsheet shows it: the
header is line 1) and the fix.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

logger = logging.getLogger(__name__)

__all__ = ["ManifestError", "REQUIRED_COLUMNS", "OPTIONAL_COLUMNS", "SPLIT_NAMES", "load_manifest", "load_slide_list",
           "manifest_classes"]

REQUIRED_COLUMNS = ("slide_id", "patient_id", "label")
OPTIONAL_COLUMNS = ("cohort", "split", "fold", "slide_path")
SPLIT_NAMES = ("train", "val", "test")


class ManifestError(ValueError):
    """The manifest CSV is invalid. The message names the file, the row and the fix."""


def _line(idx: int) -> int:
    """Data row index (0-based) -> line number in the CSV (header is line 1)."""
    return int(idx) + 2


def _rows(indices: Sequence[int], limit: int = 5) -> str:
    lines = [str(_line(i)) for i in list(indices)[:limit]]
    more = f" (and {len(indices) - limit} more)" if len(indices) > limit else ""
    return ", ".join(lines) + more


def load_manifest(path: str | Path, classes: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Read and validate a manifest CSV.

    Args:
        path: the CSV file.
        classes: class names in label order (``DataConfig.classes``). Labels not in this list are an
            error. Default: the labels found in the file, sorted.

    Returns:
        DataFrame with the manifest columns plus ``label_index``; ``df.attrs["classes"]`` and
        ``df.attrs["source"]`` are set. ``slide_path`` values are resolved relative to the CSV's folder.
    """
    path = Path(path)
    df = _read_csv(path, "slide_id,patient_id,label")
    if "site" in df.columns and "cohort" not in df.columns:
        df = df.rename(columns={"site": "cohort"})
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(
            f"{path}: missing required column(s) {', '.join(missing)}. The header line must contain "
            f"{', '.join(REQUIRED_COLUMNS)} (found: {', '.join(df.columns) or 'nothing'})."
        )
    dupcols = sorted({c for c in df.columns if list(df.columns).count(c) > 1})
    if dupcols:
        raise ManifestError(f"{path}: column(s) {', '.join(dupcols)} appear twice in the header; keep one of each.")
    if len(df) == 0:
        raise ManifestError(f"{path}: the manifest has a header but no slides. Add one row per slide.")

    for col in df.columns:
        df[col] = df[col].astype(str).str.strip()

    for col in ("slide_id", "patient_id", "label"):
        empty = df.index[df[col] == ""].tolist()
        if empty:
            raise ManifestError(
                f"{path}: empty {col} on row(s) {_rows(empty)}. Fill in a {col} for every slide or remove those rows."
            )

    dup_mask = df["slide_id"].duplicated(keep=False)
    if dup_mask.any():
        dup_id = df.loc[dup_mask, "slide_id"].iloc[0]
        rows = df.index[df["slide_id"] == dup_id].tolist()
        raise ManifestError(
            f"{path}: duplicate slide_id '{dup_id}' on rows {_rows(rows)}. Each slide must appear once; "
            f"remove the repeated row or give the slides distinct ids."
        )

    conflict = df.groupby("patient_id")["cohort"].nunique() if "cohort" in df.columns else None
    if conflict is not None and (conflict > 1).any():
        pid = conflict.index[conflict > 1][0]
        logger.warning("%s: patient %s has slides in more than one cohort; check the cohort column.", path, pid)

    found = sorted(df["label"].unique().tolist())
    if classes is None:
        class_list = found
    else:
        class_list = [str(c) for c in classes]
        if len(set(class_list)) != len(class_list):
            raise ManifestError(f"{path}: data.classes lists a class twice ({class_list}); list each class once.")
        unknown_mask = ~df["label"].isin(class_list)
        if unknown_mask.any():
            bad = df.loc[unknown_mask, "label"].iloc[0]
            rows = df.index[unknown_mask].tolist()
            raise ManifestError(
                f"{path}: unknown label '{bad}' on row(s) {_rows(rows)}; the configured classes are "
                f"{class_list}. Fix the label or add it to data.classes."
            )
    if len(class_list) < 2:
        raise ManifestError(
            f"{path}: only one class ({class_list}) is defined. A classifier needs at least two; set "
            f"data.classes to the full class list if this site holds one class only."
        )
    index = {name: i for i, name in enumerate(class_list)}
    df["label_index"] = df["label"].map(index).astype(int)

    if "split" in df.columns:
        df["split"] = df["split"].str.lower()
        bad_mask = ~df["split"].isin(SPLIT_NAMES + ("",))
        if bad_mask.any():
            rows = df.index[bad_mask].tolist()
            raise ManifestError(
                f"{path}: split '{df.loc[bad_mask, 'split'].iloc[0]}' on row(s) {_rows(rows)} is not one of "
                f"{', '.join(SPLIT_NAMES)}. Fix the value or drop the split column to split at random."
            )
        _check_patient_consistent(df, "split", path)

    if "fold" in df.columns:
        folds = pd.to_numeric(df["fold"], errors="coerce")
        bad_mask = folds.isna() | (folds != folds.round())
        if bad_mask.any():
            rows = df.index[bad_mask].tolist()
            raise ManifestError(
                f"{path}: fold '{df.loc[bad_mask, 'fold'].iloc[0]}' on row(s) {_rows(rows)} is not a whole "
                f"number. Use 0, 1, 2, ... or drop the fold column."
            )
        df["fold"] = folds.astype(int)
        _check_patient_consistent(df, "fold", path)

    _resolve_slide_paths(df, path)

    df.attrs["classes"] = class_list
    df.attrs["source"] = str(path)
    counts = df["label"].value_counts().to_dict()
    logger.info(
        "Manifest %s: %d slides, %d patients, classes %s (counts %s)",
        path, len(df), df["patient_id"].nunique(), class_list, counts,
    )
    return df


def _check_patient_consistent(df: pd.DataFrame, column: str, path: Path) -> None:
    """A patient's slides must share one split / fold, otherwise the split leaks the patient."""
    n = df.groupby("patient_id")[column].nunique()
    if (n > 1).any():
        pid = n.index[n > 1][0]
        rows = df.index[df["patient_id"] == pid].tolist()
        raise ManifestError(
            f"{path}: patient '{pid}' has slides in different {column} values (rows {_rows(rows)}). "
            f"All slides of a patient must share one {column}, or the evaluation leaks the patient."
        )


def manifest_classes(df: pd.DataFrame) -> list[str]:
    """Class names in label order of a DataFrame from :func:`load_manifest`."""
    classes = df.attrs.get("classes")
    if not classes:
        raise ValueError("this DataFrame did not come from load_manifest (no attrs['classes']).")
    return list(classes)


def load_slide_list(path: str | Path) -> pd.DataFrame:
    """Read a manifest for extraction only: ``slide_id`` required and unique, nothing else checked.

    ``slide_path`` values are resolved relative to the CSV's folder, as in :func:`load_manifest`.
    """
    path = Path(path)
    df = _read_csv(path, "slide_id")
    if "slide_id" not in df.columns:
        raise ManifestError(f"{path}: no slide_id column (found: {', '.join(df.columns) or 'nothing'}). "
                            "Extraction needs at least a header line 'slide_id' and one slide per row.")
    for col in df.columns:
        df[col] = df[col].astype(str).str.strip()
    empty = df.index[df["slide_id"] == ""].tolist()
    if empty:
        raise ManifestError(f"{path}: empty slide_id on row(s) {_rows(empty)}. Fill them in or remove those rows.")
    dup = df["slide_id"].duplicated(keep=False)
    if dup.any():
        dup_id = df.loc[dup, "slide_id"].iloc[0]
        raise ManifestError(f"{path}: duplicate slide_id '{dup_id}' on rows {_rows(df.index[df['slide_id'] == dup_id].tolist())}. "
                            "Each slide must appear once.")
    _resolve_slide_paths(df, path)
    df.attrs["source"] = str(path)
    return df


def _read_csv(path: Path, header: str) -> pd.DataFrame:
    """The CSV as text columns with stripped names; a missing, empty or unreadable file is a
    :class:`ManifestError` naming the file and the fix (``header``: the header line it needs)."""
    if not path.is_file():
        raise ManifestError(f"{path}: manifest CSV not found. Check data.manifest in your YAML (cwd is {Path.cwd()}).")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise ManifestError(f"{path}: the manifest is empty. It needs a header line '{header}' and one row per slide.") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not a readable CSV ({exc}). Save it as comma-separated UTF-8 text.") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _resolve_slide_paths(df: pd.DataFrame, path: Path) -> None:
    """``slide_path`` values, where the column exists, resolved relative to the CSV's folder."""
    if "slide_path" in df.columns:
        base = path.resolve().parent
        df["slide_path"] = ["" if not p else str(Path(p) if Path(p).is_absolute() else base / p) for p in df["slide_path"]]
