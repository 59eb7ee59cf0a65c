"""What happened to each slide of an extraction run: results, the summary table, failure reasons.

Every failure carries a one-line reason (naming the file) and a fix, printed under the summary table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from .encoders import EncoderError
from .jobs import SlideJob
from .reader import MissingMppError, SlideError, SlideNotFoundError, SlideOpenError, SlideReadError

logger = logging.getLogger("tdamil.wsi.extract")

__all__ = ["SlideResult", "ExtractionSummary", "NoTissueError", "failure", "clean_reason", "READ_ERRORS"]


@dataclass
class SlideResult:
    """What happened to one slide.

    status:      ``extracted``, ``skipped`` (same settings already on disk), ``busy`` (another
                 extraction process holds the slide's claim) or ``failed``.
    reason/fix:  for failures: what went wrong (names the file) and what to do.
    timings:     seconds spent opening + segmenting, reading + encoding, encoder alone, writing.
    """

    slide_id: str
    status: Literal["extracted", "skipped", "busy", "failed"]
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
    """Outcome of :func:`extract_site`: one :class:`SlideResult` per slide, in input order.

    ``from_folder``: the slides were every file of ``data.slides_dir`` (no manifest), so a fix
    that says "remove the slide from the manifest" is told as "move its file out of the folder".
    """

    results: list[SlideResult]
    encoder: str
    features_dir: Path
    seconds: float = 0.0
    from_folder: bool = False

    @property
    def extracted(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "extracted"]

    @property
    def skipped(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "skipped"]

    @property
    def busy(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "busy"]

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

    def fix(self, result: SlideResult) -> str:
        """A failed slide's fix in the words of this run's mode (manifest or slides folder)."""
        text = result.fix
        if self.from_folder:
            for manifest_words, folder_words in _FOLDER_WORDING.items():
                text = text.replace(manifest_words, folder_words)
        return text

    def table(self) -> Any:
        """A rich Table: one short row per slide (it fits 80 columns), totals in the caption.
        Each failure's reason and fix follow the table (:meth:`print`)."""
        from rich.table import Table

        t = Table(title=f"Feature extraction ({self.encoder}) -> {self.features_dir}", show_lines=False)
        for col, kw in (("slide", {"overflow": "fold"}), ("status", {}), ("patches", {"justify": "right"}),
                        ("level", {"justify": "right"}), ("s", {"justify": "right"})):
            t.add_column(col, **kw)
        style = {"extracted": "green", "skipped": "cyan", "busy": "yellow", "failed": "bold red"}
        for r in self.results:
            t.add_row(r.slide_id, f"[{style[r.status]}]{r.status}[/]", str(r.n_patches) if r.n_patches else "",
                      "" if r.read_level is None else str(r.read_level), f"{r.seconds:.1f}")
        t.caption = (f"{len(self.extracted)} extracted ({self.n_patches} patches), {len(self.skipped)} skipped, "
                     f"{len(self.busy)} busy in other processes, {len(self.failed)} failed in {self.seconds:.1f} s")
        return t

    def failure_lines(self) -> list[str]:
        """One paragraph per failed slide: ``<slide>: <first sentence of the reason> Fix: <fix>.``"""
        return [f"{r.slide_id}: {_first_sentence(r.reason).rstrip('.')}. Fix: {self.fix(r)}." for r in self.failed]

    def print(self, console: Any = None) -> None:
        """Print :meth:`table` and the failures under it (to ``console`` or a new rich Console on stderr)."""
        from rich.console import Console
        from rich.text import Text

        console = console or Console(stderr=True)
        console.print(self.table())
        for line in self.failure_lines():
            console.print(Text(line, style="red"))


#: A fix worded for a manifest -> the same fix for a run over every file of data.slides_dir.
_FOLDER_WORDING = {
    "remove the slide from the manifest": "move its file out of data.slides_dir",
    "an 'mpp' column in the manifest or extraction.mpp_overrides": "extraction.mpp_overrides in the site YAML",
}


def _first_sentence(text: str) -> str:
    """The table shows the first sentence of a failure; the log has all of it."""
    head, sep, _ = text.partition(". ")
    return head + ("." if sep else "")


def fix_for(exc: BaseException) -> str:
    if isinstance(exc, SlideNotFoundError):
        return "put the slide file in data.slides_dir or set its slide_path in the manifest"
    if isinstance(exc, MissingMppError):
        return "set the slide's resolution: an 'mpp' column in the manifest or extraction.mpp_overrides"
    if isinstance(exc, SlideOpenError):
        return "re-copy the file from the scanner or remove the slide from the manifest"
    if isinstance(exc, SlideReadError):
        return "the slide has corrupt tiles: re-export or re-copy it, or remove the slide from the manifest"
    if isinstance(exc, NoTissueError):
        return "look at the QC thumbnail; lower extraction.min_tissue or tissue.min_saturation if tissue was missed"
    if isinstance(exc, SlideError):
        return "fix the slide or its settings as the message says"
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return "lower extraction.batch_size"
    return "see the log above for the traceback; fix and run tdamil-extract again (finished slides are kept)"


class NoTissueError(SlideError):
    """No grid cell holds enough tissue."""


def clean_reason(exc: BaseException) -> str:
    text = str(exc).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the final line
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, SlideError) else text


def failure(job: SlideJob, exc: BaseException, seconds: float) -> SlideResult:
    reason = clean_reason(exc)
    if isinstance(exc, (SlideError, EncoderError)):
        logger.error("%s: FAILED: %s", job.slide_id, reason)
    else:
        logger.error("%s: FAILED with an unexpected error", job.slide_id, exc_info=exc)
    return SlideResult(job.slide_id, "failed", None, job.path, 0, seconds, reason=reason, fix=fix_for(exc))


#: Exception classes by name, to rebuild a DataLoader worker's read error in the main process.
READ_ERRORS = {"SlideReadError": SlideReadError, "SlideOpenError": SlideOpenError, "SlideNotFoundError": SlideNotFoundError,
                "MissingMppError": MissingMppError}
